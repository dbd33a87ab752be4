"""A pruner that stops trials whose training diverged (NaN, Inf, or an exploding value).

A diverged run never recovers, but pruners that compare against other trials (median,
percentile, Hyperband) only notice late, or never when the value is NaN. This one looks at the
trial's own history and prunes at once, leaving a reason in the storage; otherwise it defers to
the pruner it wraps, like Optuna's ``PatientPruner``.
"""

from __future__ import annotations

import math

import optuna
from optuna.pruners import BasePruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial

from optuna_guard import preemption, tags
from optuna_guard._logging import get_logger
from optuna_guard.exceptions import ConfigError

_log = get_logger(__name__)

__all__ = ["DivergencePruner"]


class DivergencePruner(BasePruner):
    """Prune a trial whose latest intermediate value is NaN/Inf, or worse than the best value
    it reported so far by more than ``explode_factor`` times that value's magnitude.

    For a minimized value with best-so-far ``b``, step ``s`` explodes when
    ``value > b + (explode_factor - 1) * max(|b|, min_scale)`` (``value > 10 * b`` for a
    positive loss and the default factor); for a maximized value the mirror image. Explosion is
    not checked before ``warmup_steps``; NaN/Inf always is.

    A pruned trial is tagged ``diverged=True`` and ``kill_reason`` ("NaN at step 12") in the
    storage. Otherwise the decision is the wrapped pruner's (no pruning without one).

    The pruner is also a preemption boundary: when the worker was asked to stop (SIGTERM,
    time budget), ``trial.should_prune()`` tags the trial ``preempted`` and raises
    ``TrialPreempted`` (set ``stop_boundary=False`` to leave that to other boundaries).
    """

    def __init__(
        self,
        wrapped: BasePruner | None = None,
        *,
        explode_factor: float | None = 10.0,
        warmup_steps: int = 0,
        min_scale: float = 1e-8,
        stop_boundary: bool = True,
    ) -> None:
        if wrapped is not None and not isinstance(wrapped, BasePruner):
            raise ConfigError(f"wrapped must be an Optuna pruner or None but got {wrapped!r}.")
        if explode_factor is not None and (
            isinstance(explode_factor, bool)
            or not isinstance(explode_factor, (int, float))
            or not math.isfinite(explode_factor)
            or explode_factor <= 1
        ):
            raise ConfigError(f"explode_factor must be a number > 1 (or None to check only NaN/Inf) but got {explode_factor!r}.")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ConfigError(f"warmup_steps cannot be negative but got {warmup_steps!r}.")
        if not isinstance(min_scale, (int, float)) or not min_scale > 0:
            raise ConfigError(f"min_scale must be a positive number but got {min_scale!r}.")
        self._wrapped = wrapped
        self._explode_factor = None if explode_factor is None else float(explode_factor)
        self._warmup_steps = warmup_steps
        self._min_scale = float(min_scale)
        self._stop_boundary = stop_boundary

    def __repr__(self) -> str:
        return (
            f"DivergencePruner(wrapped={self._wrapped!r}, explode_factor={self._explode_factor}, "
            f"warmup_steps={self._warmup_steps})"
        )

    @property
    def wrapped(self) -> BasePruner | None:
        return self._wrapped

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        if self._stop_boundary:
            preemption.raise_if_stop_requested_in_pruner(study, trial)
        reason = self.divergence_reason(study, trial)
        if reason is not None:
            _tag_diverged(study, trial, reason)
            return True
        if self._wrapped is None:
            return False
        return self._wrapped.prune(study, trial)

    def divergence_reason(self, study: optuna.Study, trial: FrozenTrial) -> str | None:
        """Why the trial's latest value counts as diverged, or None."""
        step = trial.last_step
        if step is None:
            return None
        value = trial.intermediate_values[step]
        if math.isnan(value):
            return f"NaN at step {step}"
        if math.isinf(value):
            return f"{'+' if value > 0 else '-'}Inf at step {step}"
        if self._explode_factor is None or step < self._warmup_steps:
            return None
        earlier = [v for s, v in trial.intermediate_values.items() if s < step and math.isfinite(v)]
        if not earlier:
            return None
        maximize = _direction(study) == StudyDirection.MAXIMIZE
        best = max(earlier) if maximize else min(earlier)
        margin = (self._explode_factor - 1.0) * max(abs(best), self._min_scale)
        exploded = value < best - margin if maximize else value > best + margin
        if not exploded:
            return None
        return (
            f"exploded at step {step}: {value:.4g} is worse than the best so far ({best:.4g}) "
            f"by more than {self._explode_factor:g}x its size"
        )


def _direction(study: optuna.Study) -> StudyDirection:
    directions = study.directions
    return directions[0]


def _tag_diverged(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    """Write the tags through the storage (a FrozenTrial cannot), before the trial is pruned."""
    try:
        study._storage.set_trial_user_attr(trial._trial_id, tags.DIVERGED, True)
        study._storage.set_trial_user_attr(trial._trial_id, tags.KILL_REASON, reason)
    except optuna.exceptions.UpdateFinishedTrialError:
        return
    _log.warning("Trial %d diverged: %s; pruned.", trial.number, reason)
