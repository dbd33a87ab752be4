"""optuna-guard: keep long Optuna studies alive.

Public names are imported lazily, so ``import optuna_guard`` is cheap, has no side effects and
never imports torch, pandas or plotly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    # The same names for type checkers and IDEs (``x as x`` re-exports them), so they resolve
    # ``optuna_guard.guard`` to its definition; at run time ``__getattr__`` imports on first use.
    # tests/test_package.py checks that this list and _EXPORTS agree.
    from optuna_guard.analysis import killed_trials as killed_trials
    from optuna_guard.analysis import trials_frame as trials_frame
    from optuna_guard.analysis import valid_trials as valid_trials
    from optuna_guard.checkpoint import CheckpointCleanupCallback as CheckpointCleanupCallback
    from optuna_guard.checkpoint import TrialCheckpointer as TrialCheckpointer
    from optuna_guard.divergence import DivergencePruner as DivergencePruner
    from optuna_guard.exceptions import CheckpointError as CheckpointError
    from optuna_guard.exceptions import ConfigError as ConfigError
    from optuna_guard.exceptions import CrashLoopError as CrashLoopError
    from optuna_guard.exceptions import GuardError as GuardError
    from optuna_guard.exceptions import InsufficientMemoryError as InsufficientMemoryError
    from optuna_guard.exceptions import ObjectiveSpecError as ObjectiveSpecError
    from optuna_guard.exceptions import StorageUnavailableError as StorageUnavailableError
    from optuna_guard.fingerprint import ObjectiveChangedError as ObjectiveChangedError
    from optuna_guard.limits import MemoryLimits as MemoryLimits
    from optuna_guard.pruners import MemoryGuardPruner as MemoryGuardPruner
    from optuna_guard.resilience import ResilientStorage as ResilientStorage
    from optuna_guard.resume import CurrentVersionSampler as CurrentVersionSampler
    from optuna_guard.retries import RetryPolicy as RetryPolicy
    from optuna_guard.storage import open_storage as open_storage
    from optuna_guard.supervisor._launch import launch as launch
    from optuna_guard.supervisor._summary import LaunchSummary as LaunchSummary
    from optuna_guard.time_budget import TimeBudget as TimeBudget
    from optuna_guard.trial_guard import check_memory as check_memory
    from optuna_guard.trial_guard import guard as guard
else:
    # Hidden from type checkers: a module ``__getattr__`` would make every misspelt name Any.

    def __getattr__(name: str) -> Any:
        """Import a public name from its module on first use (then it is a plain global)."""
        module = _EXPORTS.get(name)
        if module is None:
            raise AttributeError(f"module 'optuna_guard' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
