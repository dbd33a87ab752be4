"""The OOM-aware search the guard runs while a study is live: memory constraints for samplers
and the pre-flight prediction that skips a trial before it allocates.

It lives apart from ``analysis/`` (which only reads finished studies) because the in-trial
guard imports it; numpy is imported only by the pre-flight model.
"""

from __future__ import annotations

from optuna_guard.oom_aware.constraints import (
    is_memory_feasible,
    memory_constraint,
    memory_constraint_value,
    set_memory_constraint,
)
from optuna_guard.oom_aware.preflight import PreflightResult, preflight_check

__all__ = [
    "PreflightResult",
    "is_memory_feasible",
    "memory_constraint",
    "memory_constraint_value",
    "preflight_check",
    "set_memory_constraint",
]
