"""The exception tree of optuna-guard: every error a user can catch derives from GuardError."""

from __future__ import annotations

from collections.abc import Sequence

# Exit codes of every ``optuna-guard`` command (README "Exit codes"); each error carries its own.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_CRASH_LOOP = 3
EXIT_MEMORY_STALL = 4
EXIT_STOPPED = 99  # SIGINT/SIGTERM/SIGHUP or the time budget: a SLURM script requeues on it


class GuardError(Exception):
    """Base class of every error raised by optuna-guard.

    ``exit_code`` is what the CLI exits with when this error ends a command (as click's
    ``ClickException.exit_code``).
    """

    exit_code: int = EXIT_ERROR


class ConfigError(GuardError, ValueError):
    """A setting is invalid; the message names the setting, the value and the fix."""

    exit_code = EXIT_BAD_INPUT


class ObjectiveSpecError(ConfigError):
    """An OBJECTIVE spec (``module:function`` or ``file.py:function``) cannot be loaded."""


class StorageUnavailableError(GuardError):
    """The study storage could not be reached (within the configured deadline)."""

    exit_code = EXIT_ERROR  # transient past the deadline: the input may be right


class InsufficientMemoryError(GuardError, MemoryError):
    """An allocation was refused up front because it would not fit in available memory."""


class CrashLoopError(GuardError):
    """Workers keep dying before they start their first trial; the launch is stopped.

    ``worker_id`` and ``log_path`` name the last worker that died, ``log_tail`` holds the last
    lines of its log (the message quotes them too), so a caller can show them without parsing.

    Args:
        message: The error message (it quotes the log tail).
        worker_id: The id of the last worker that died, if known.
        log_path: The path of that worker's log file, if it has one.
        log_tail: The last lines of that log, oldest first (stored as a tuple).
    """

    exit_code = EXIT_CRASH_LOOP

    def __init__(
        self,
        message: str,
        *,
        worker_id: int | None = None,
        log_path: str | None = None,
        log_tail: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.worker_id = worker_id
        self.log_path = log_path
        self.log_tail: tuple[str, ...] = tuple(log_tail)


class MemoryStallError(GuardError):
    """No worker could start for ``--memory-stall-timeout``: the memory is held outside the
    study (another job, an escaped process); the launch stops with exit code 4."""

    exit_code = EXIT_MEMORY_STALL


class CheckpointError(GuardError):
    """A checkpoint could not be written or no readable checkpoint exists."""


__all__ = [
    "CheckpointError",
    "ConfigError",
    "CrashLoopError",
    "GuardError",
    "InsufficientMemoryError",
    "MemoryStallError",
    "ObjectiveSpecError",
    "StorageUnavailableError",
]
