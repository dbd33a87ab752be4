"""optuna-guard: keep long Optuna studies alive.

Public names are imported lazily, so ``import optuna_guard`` is cheap, has no side effects and
never imports torch, pandas or plotly.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "CheckpointCleanupCallback": "optuna_guard.checkpoint",
    "CheckpointError": "optuna_guard.exceptions",
    "ConfigError": "optuna_guard.exceptions",
    "CrashLoopError": "optuna_guard.exceptions",
    "CurrentVersionSampler": "optuna_guard.resume",
    "DivergencePruner": "optuna_guard.divergence",
    "GuardError": "optuna_guard.exceptions",
    "InsufficientMemoryError": "optuna_guard.exceptions",
    "LaunchSummary": "optuna_guard.supervisor",
    "MemoryGuardPruner": "optuna_guard.pruners",
    "MemoryLimits": "optuna_guard.limits",
    "ObjectiveChangedError": "optuna_guard.fingerprint",
    "ObjectiveSpecError": "optuna_guard.exceptions",
    "ResilientStorage": "optuna_guard.resilience",
    "RetryPolicy": "optuna_guard.retries",
    "StorageUnavailableError": "optuna_guard.exceptions",
    "TimeBudget": "optuna_guard.time_budget",
    "TrialCheckpointer": "optuna_guard.checkpoint",
    "check_memory": "optuna_guard.trial_guard",
    "guard": "optuna_guard.trial_guard",
    "killed_trials": "optuna_guard.analysis",
    "launch": "optuna_guard.supervisor",
    "open_storage": "optuna_guard.storage",
    "trials_frame": "optuna_guard.analysis",
    "valid_trials": "optuna_guard.analysis",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'optuna_guard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
