"""The exception tree of optuna-guard: every error a user can catch derives from GuardError."""

from __future__ import annotations

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
    """Workers keep dying before they start their first trial; the launch is stopped."""

    exit_code = EXIT_CRASH_LOOP


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
