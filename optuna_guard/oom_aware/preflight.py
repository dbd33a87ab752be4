"""The pre-flight check: prune a trial at once when it is predicted not to fit in memory now.

Called by ``@guard(preflight=True)`` before the objective runs (or by users at the top of their
objective). How it decides:

1. History: the study's finished trials (COMPLETE, PRUNED, FAIL) that carry a ``peak_rss_gb``
   tag, except trials this check pruned itself (they never ran). With fewer than
   ``min_history`` usable trials it abstains and the trial runs.
2. Params: a new trial usually has no params yet (samplers draw them in ``suggest_*``), so the
   params that every finished trial has (Optuna's intersection search space) are drawn now,
   through the normal ``trial.suggest_*`` calls: the objective's own ``suggest_*`` calls later
   return the same values. Params the objective suggests only sometimes are left alone.
3. Estimate: ``optuna_guard.oom_aware._peak_model.estimate_peak``, ``method="auto"`` by default:
   a base + power-law fit of the peak on the params (it also predicts configurations nobody
   tried) while that fit's typical error on the history is <= 15 %, else the nearest finished
   trials (``"knn"``, which never extrapolates); ``"regression"`` or ``"knn"`` force one. It
   abstains when it has too little to go on.
4. Decision: the trial needs ``predicted peak - RSS this worker already holds``. If that is more
   than ``available now - margin_gb`` (the margin defaults to the guard's ``min_available_gb``:
   the guard would kill the trial there), or the predicted peak is over ``max_trial_rss_gb``,
   the trial is tagged ``emergency_killed=True``, ``kill_limit="preflight"``,
   ``kill_reason="predicted OOM: ~X GB needed, Y GB available"``, ``available_gb_at_kill``,
   ``predicted_peak_gb``, gets a violated memory constraint when a budget is known, and
   ``optuna.TrialPruned`` is raised. Otherwise ``predicted_peak_gb`` is tagged and it returns.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.search_space import intersection_search_space
from optuna.trial import FrozenTrial, TrialState

from optuna_guard import tags
from optuna_guard._logging import get_logger
from optuna_guard._units import GB, to_gb
from optuna_guard.exceptions import ConfigError
from optuna_guard.limits import MemoryLimits
from optuna_guard.memory import MemoryProbe, default_probe
from optuna_guard.oom_aware._peak_model import (
    PREFLIGHT_LIMIT,
    Abstention,
    PeakEstimate,
    estimate_peak,
    observed_peak,
)
from optuna_guard.oom_aware.constraints import budget_from_env, set_memory_constraint

_log = get_logger(__name__)

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclasses.dataclass(frozen=True)
class PreflightResult:
    """What the check saw and decided (returned when the trial may run)."""

    trial_number: int
    estimate: PeakEstimate | None  # None: abstained
    reason: str  # why it abstained, or the sentence describing the estimate
    available_gb: float | None = None
    needed_gb: float | None = None
    margin_gb: float | None = None
    prune: bool = False

    @property
    def abstained(self) -> bool:
        return self.estimate is None


def preflight_check(
    trial: optuna.Trial,
    *,
    probe: MemoryProbe | None = None,
    margin_gb: float | None = None,
    min_history: int = 8,
    k: int = 5,
    method: str = "auto",
    budget_gb: float | None = None,
    max_trial_rss_gb: float | None = None,
    pin_params: bool = True,
) -> PreflightResult:
    """Prune ``trial`` (raise ``optuna.TrialPruned``) if its predicted peak memory does not fit now.

    ``margin_gb`` defaults to ``MemoryLimits.from_env().min_available_gb``; ``budget_gb`` (used
    only to write the memory constraint of a pruned trial) to ``OPTUNA_GUARD_MEMORY_BUDGET_GB``;
    ``max_trial_rss_gb`` to ``MemoryLimits.from_env().max_trial_rss_gb``. Returns a
    :class:`PreflightResult` when the trial may run (``abstained`` says whether it estimated).
    """
    _validate(min_history, k)
    if not isinstance(trial, optuna.Trial):
        return PreflightResult(
            getattr(trial, "number", -1), None, "not an optuna.Trial (nothing to look up)"
        )
    if margin_gb is None or max_trial_rss_gb is None:
        limits = MemoryLimits.from_env()
        if margin_gb is None:
            margin_gb = limits.min_available_gb or 0.0
        if max_trial_rss_gb is None:
            max_trial_rss_gb = limits.max_trial_rss_gb
    if margin_gb < 0:
        raise ConfigError(f"margin_gb cannot be negative but got {margin_gb}.")

    study = trial.study
    history = [
        t
        for t in study.get_trials(deepcopy=False, states=_FINISHED)
        if t.number != trial.number and observed_peak(t) is not None
    ]
    if len(history) < min_history:
        too_few = (
            f"only {len(history)} finished trial(s) with a peak_rss_gb tag; need {min_history}"
        )
        _log.debug("Pre-flight check for trial %d abstained: %s.", trial.number, too_few)
        return PreflightResult(trial.number, None, too_few)

    if pin_params:
        _draw_shared_params(trial, study)
    estimate = estimate_peak(
        trial.params, trial.distributions, history, method=method, min_history=min_history, k=k
    )
    if isinstance(estimate, Abstention):
        _log.debug("Pre-flight check for trial %d abstained: %s.", trial.number, estimate.reason)
        return PreflightResult(trial.number, None, estimate.reason)

    probe = probe or default_probe()
    available_gb = probe.system().available_bytes / GB
    held_gb = probe.process_tree_rss(os.getpid()) / GB
    needed_gb = max(estimate.peak_gb - held_gb, 0.0)
    _set_tag(trial, tags.PREDICTED_PEAK_GB, round(estimate.peak_gb, 2))

    reason: str | None = None
    if needed_gb > available_gb - margin_gb:
        reason = (
            f"predicted OOM: ~{_gb(needed_gb)} GB needed, {_gb(available_gb)} GB available "
            f"(predicted peak {_gb(estimate.peak_gb)} GB from {estimate.detail}; "
            f"{_gb(held_gb)} GB already held; {_gb(margin_gb)} GB margin)"
        )
    elif max_trial_rss_gb is not None and estimate.peak_gb > max_trial_rss_gb:
        reason = (
            f"predicted OOM: ~{_gb(estimate.peak_gb)} GB needed, over the max_trial_rss_gb limit of "
            f"{_gb(max_trial_rss_gb)} GB ({estimate.detail})"
        )
    if reason is None:
        return PreflightResult(
            trial.number,
            estimate,
            estimate.detail,
            available_gb,
            needed_gb,
            margin_gb,
            prune=False,
        )

    _set_tag(trial, tags.EMERGENCY_KILLED, True)
    _set_tag(trial, tags.KILL_REASON, reason)
    _set_tag(trial, tags.KILL_LIMIT, PREFLIGHT_LIMIT)
    _set_tag(trial, tags.AVAILABLE_GB_AT_KILL, to_gb(available_gb * GB))
    budget = budget_gb if budget_gb is not None else budget_from_env()
    if budget is not None:
        set_memory_constraint(trial, estimate.peak_gb, budget, killed=True)
    _log.warning(
        "Trial %d pruned before it started: %s.",
        trial.number,
        reason,
    )
    raise optuna.TrialPruned(reason)


def _gb(value: float) -> str:
    """GB with enough digits to tell 0.55 from 0.6, and no false precision for big values."""
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _validate(min_history: int, k: int) -> None:
    if isinstance(min_history, bool) or not isinstance(min_history, int) or min_history < 2:
        raise ConfigError(f"min_history must be an int >= 2 but got {min_history!r}.")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be an int >= 1 but got {k!r}.")


def _set_tag(trial: optuna.Trial, key: str, value: Any) -> None:
    trial.set_user_attr(key, value)


def _draw_shared_params(trial: optuna.Trial, study: optuna.Study) -> None:
    """Draw now the params every finished trial has, so the estimate can use them.

    They go through ``trial.suggest_*``, so the sampler (and enqueued/fixed params) decide as
    usual, and the objective's later ``suggest_*`` calls get the same values back.
    """
    finished: list[FrozenTrial] = study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)
    )
    for name, dist in intersection_search_space(finished, include_pruned=True).items():
        if name not in trial.params:
            _suggest(trial, name, dist)


def _suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    return None


__all__ = ["PreflightResult", "preflight_check"]
