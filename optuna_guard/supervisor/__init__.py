"""The supervised multi-worker launcher behind ``optuna-guard run``.

``launch(objective, study_name=..., workers=N, n_trials=T, ...) -> LaunchSummary`` starts N
fresh worker processes on one shared RDB study, hands out exactly T trial tickets, recycles
leaking or old workers between trials, hard-kills the right worker before the machine runs out
of memory, and never leaves a trial RUNNING. Names load lazily so that
``python -m optuna_guard.supervisor._worker`` / ``._objective_spec`` start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LaunchConfig": "optuna_guard.supervisor._config",
    "LaunchSummary": "optuna_guard.supervisor._summary",
    "launch": "optuna_guard.supervisor._launch",
    "run_launch": "optuna_guard.supervisor._launch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'optuna_guard.supervisor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
