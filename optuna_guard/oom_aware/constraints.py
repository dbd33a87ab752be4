"""Memory constraints: how a guarded trial tells the sampler that its region runs out of memory.

Optuna 5.0 stores ``trial.set_constraint(key, value)`` as the system attribute
``constraints:<key>``; a value > 0 means infeasible. TPE (and NSGA-II/III, GP) read it without a
``constraints_func``: TPE puts infeasible trials in its "above" group, so it samples less where
they were. We write ``memory = peak_rss_gb - budget_gb`` for every guarded trial, and for a killed
trial a value that is violated even when the peak seen before the kill was under the budget
(the kill proves the trial needed more than it got).

A killed trial must end PRUNED (not FAIL) for this to work: samplers never look at FAIL trials.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from optuna_guard import tags
from optuna_guard.exceptions import ConfigError

MEMORY_CONSTRAINT = "memory"
MEMORY_CONSTRAINT_ATTR = f"constraints:{MEMORY_CONSTRAINT}"  # the system attribute Optuna 5 reads
BUDGET_ENV_VAR = "OPTUNA_GUARD_MEMORY_BUDGET_GB"

# A killed trial's value is at least this far over the budget, so "violated" stands out even
# for small budgets (a 0.3 GB budget must not give a 0.01 GB violation).
_MIN_KILL_VIOLATION_GB = 1.0


def memory_constraint_value(peak_rss_gb: float | None, budget_gb: float, killed: bool) -> float:
    """The ``memory`` constraint of a trial: ``peak - budget``; > 0 means over budget.

    For a killed trial: ``max(peak - budget, 0) + max(budget, 1.0)``, always clearly violated.
    ``peak_rss_gb=None`` (no reading) counts as 0 for a finished trial and as the budget for a
    killed one.
    """
    budget = _check_budget(budget_gb)
    if peak_rss_gb is None:
        peak = budget if killed else 0.0
    else:
        peak = _check_number("peak_rss_gb", peak_rss_gb)
        if peak < 0:
            raise ConfigError(f"peak_rss_gb cannot be negative but got {peak}.")
    if killed:
        return max(peak - budget, 0.0) + max(budget, _MIN_KILL_VIOLATION_GB)
    return peak - budget


def set_memory_constraint(
    trial: optuna.Trial,
    peak_rss_gb: float | None,
    budget_gb: float,
    *,
    killed: bool = False,
) -> float | None:
    """Write the ``memory`` constraint on a running trial; return the value written.

    A trial already tagged ``emergency_killed`` counts as killed whatever ``killed`` says, and a
    trial the pre-flight check pruned counts with its predicted peak (its measured peak is only
    the idle worker's). Returns None (and writes nothing) when the trial already has a memory
    constraint: Optuna keeps the first value and warns on a second.
    """
    attrs = trial.user_attrs
    if attrs.get(tags.EMERGENCY_KILLED):
        killed = True
        predicted = attrs.get(tags.PREDICTED_PEAK_GB)
        if attrs.get(tags.KILL_LIMIT) == "preflight" and isinstance(predicted, (int, float)):
            peak_rss_gb = max(float(predicted), peak_rss_gb or 0.0)
    value = memory_constraint_value(peak_rss_gb, budget_gb, killed)
    if MEMORY_CONSTRAINT_ATTR in trial.storage.get_trial_system_attrs(trial._trial_id):
        return None
    trial.set_constraint(MEMORY_CONSTRAINT, value)
    return value


def memory_constraint_system_attrs(
    peak_rss_gb: float | None, budget_gb: float, *, killed: bool
) -> dict[str, float]:
    """The system attribute to write when a trial is ended from outside its process.

    For ``optuna_guard.storage.end_trial_from_outside(..., system_attrs=...)`` (the supervisor
    hard-kills a worker and cannot call ``trial.set_constraint``).
    """
    return {MEMORY_CONSTRAINT_ATTR: memory_constraint_value(peak_rss_gb, budget_gb, killed)}


def memory_constraint(trial: FrozenTrial) -> float | None:
    """The ``memory`` constraint a trial carries, or None."""
    value = trial.system_attrs.get(MEMORY_CONSTRAINT_ATTR)
    return None if value is None else float(value)


def is_memory_feasible(trial: FrozenTrial) -> bool | None:
    """True/False when the trial has a memory constraint (<= 0 is feasible), else None."""
    value = memory_constraint(trial)
    return None if value is None else value <= 0.0


def budget_from_env(environ: Mapping[str, str] | None = None) -> float | None:
    """The memory budget set by ``optuna-guard run --memory-budget-gb`` (env var), or None."""
    environ = os.environ if environ is None else environ
    raw = environ.get(BUDGET_ENV_VAR, "").strip()
    if raw == "" or raw.lower() in ("none", "off"):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(
            f"environment variable {BUDGET_ENV_VAR}={raw!r} is not a number; set it to e.g. 8.0."
        ) from None
    return _check_budget(value)


def _check_budget(budget_gb: Any) -> float:
    budget = _check_number("memory budget (budget_gb)", budget_gb)
    if budget <= 0:
        raise ConfigError(
            f"memory budget must be > 0 GB but got {budget}; pass e.g. budget_gb=8.0."
        )
    return budget


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number but got {value!r}.")
    if math.isnan(value) or math.isinf(value):
        raise ConfigError(f"{name} must be a finite number but got {value}.")
    return float(value)


__all__ = [
    "BUDGET_ENV_VAR",
    "MEMORY_CONSTRAINT",
    "MEMORY_CONSTRAINT_ATTR",
    "budget_from_env",
    "is_memory_feasible",
    "memory_constraint",
    "memory_constraint_system_attrs",
    "memory_constraint_value",
    "set_memory_constraint",
]
