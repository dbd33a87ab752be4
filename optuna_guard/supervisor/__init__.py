"""The supervised multi-worker launcher behind ``optuna-guard run``.

``launch(objective, study_name=..., workers=N, n_trials=T, ...) -> LaunchSummary`` starts N
fresh worker processes on one shared RDB study, hands out exactly T trial tickets, recycles
leaking or old workers between trials, hard-kills the right worker before the machine runs out
of memory, and never leaves a trial RUNNING. Names load lazily so that
``python -m optuna_guard.supervisor._worker`` / ``._objective_spec`` start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "LaunchConfig": "optuna_guard.supervisor._config",
    "LaunchSummary": "optuna_guard.supervisor._summary",
    "launch": "optuna_guard.supervisor._launch",
    "run_launch": "optuna_guard.supervisor._launch",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    # The same names for type checkers and IDEs (as in optuna_guard/__init__.py).
    from optuna_guard.supervisor._config import LaunchConfig as LaunchConfig
    from optuna_guard.supervisor._launch import launch as launch
    from optuna_guard.supervisor._launch import run_launch as run_launch
    from optuna_guard.supervisor._summary import LaunchSummary as LaunchSummary
else:
    # Hidden from type checkers: a module ``__getattr__`` would make every misspelt name Any.

    def __getattr__(name: str) -> Any:
        """Import a public name from its module on first use (then it is a plain global)."""
        module = _EXPORTS.get(name)
        if module is None:
            raise AttributeError(f"module 'optuna_guard.supervisor' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
