"""The exception tree of optuna-guard: every error a user can catch derives from GuardError."""

from __future__ import annotations


class GuardError(Exception):
    """Base class of every error raised by optuna-guard."""


class ConfigError(GuardError, ValueError):
    """A setting is invalid; the message names the setting, the value and the fix."""


class ObjectiveSpecError(ConfigError):
    """An OBJECTIVE spec (``module:function`` or ``file.py:function``) cannot be loaded."""


class StorageUnavailableError(GuardError):
    """The study storage could not be reached (within the configured deadline)."""


class InsufficientMemoryError(GuardError, MemoryError):
    """An allocation was refused up front because it would not fit in available memory."""


class CrashLoopError(GuardError):
    """Workers keep dying before they start their first trial; the launch is stopped."""


class MemoryStallError(GuardError):
    """No worker could start for ``--memory-stall-timeout``: the memory is held outside the
    study (another job, an escaped process); the launch stops with exit code 4."""


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
