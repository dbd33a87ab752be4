"""A pruner that stops trials whose training diverged (NaN, Inf, or an exploding value).

A diverged run never recovers, but pruners that compare against other trials (median,
percentile, Hyperband) only notice late, or never when the value is NaN. This one looks at the
trial's own history and prunes at once, leaving a reason in the storage; otherwise it defers to
the pruner it wraps, like Optuna's ``PatientPruner``.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import optuna
from optuna.pruners import BasePruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial

from optuna_guard import preemption, tags
from optuna_guard._logging import get_logger
from optuna_guard._wrapping import class_for, warmup_steps
from optuna_guard.exceptions import ConfigError

_log = get_logger(__name__)

__all__ = ["DivergencePruner"]


class DivergencePruner(BasePruner):
    """Prune a trial whose latest intermediate value is NaN/Inf, or exploded: worse than the
    best value it reported so far and more than ``explode_factor`` times the trial's scale in
    size.

    The scale is ``|best|``, or the median size of the earlier values while ``|best|`` is at or
    below ``min_scale``: for a positive loss with the default factor, ``value > 10 * best``.
    There is no explosion without a scale: while it is at or below ``min_scale`` (values at
    zero, ``[0.0, 1e-6]``) only NaN/Inf count, and a value that merely crosses zero (``-0.1``
    then ``1.0``) is not more than 10x anything. For a maximized value
    the mirror image. Explosion is not checked before ``warmup_steps`` nor before the wrapped
    pruner's own ``n_warmup_steps``; NaN/Inf always is.

    Wrapping a ``HyperbandPruner`` keeps its brackets: the wrapper is then also a
    ``HyperbandPruner`` to Optuna, which keeps filtering trials by bracket.

    A pruned trial is tagged ``diverged=True`` and ``kill_reason`` ("NaN at step 12") in the
    storage. Otherwise the decision is the wrapped pruner's (no pruning without one).

    The pruner is also a preemption boundary: when the worker was asked to stop (SIGTERM,
    time budget), ``trial.should_prune()`` tags the trial ``preempted`` and raises
    ``TrialPreempted`` (set ``stop_boundary=False`` to leave that to other boundaries).

    Example:
        .. code-block:: python

            pruner = DivergencePruner(optuna.pruners.MedianPruner(), warmup_steps=5)
            study = optuna.create_study(pruner=pruner)

    Args:
        wrapped: The pruner that decides while values are sane (``None``: never prune then).
        explode_factor: How many times the trial's scale a worse value must exceed to count as
            an explosion; ``> 1``, or ``None`` to check only NaN/Inf.
        warmup_steps: Steps before which explosions are not checked (NaN/Inf always is).
        min_scale: The scale at or below which there is no explosion, only NaN/Inf; ``> 0``.
        stop_boundary: Also end the trial as ``preempted`` when the worker was asked to stop.

    Raises:
        ConfigError: ``wrapped`` is not an Optuna pruner, or a number is out of its range.
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
        # the constructor's arguments are checked here; __new__ only picks the class
        if wrapped is not None and not isinstance(wrapped, BasePruner):
            raise ConfigError(f"wrapped must be an Optuna pruner or None but got {wrapped!r}.")
        if explode_factor is not None and (
            isinstance(explode_factor, bool)
            or not isinstance(explode_factor, (int, float))
            or not math.isfinite(explode_factor)
            or explode_factor <= 1
        ):
            raise ConfigError(
                "explode_factor must be a number > 1 (or None to check only NaN/Inf) but got "
                f"{explode_factor!r}."
            )
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ConfigError(f"warmup_steps cannot be negative but got {warmup_steps!r}.")
        if not isinstance(min_scale, (int, float)) or not min_scale > 0:
            raise ConfigError(f"min_scale must be a positive number but got {min_scale!r}.")
        self._wrapped = wrapped
        self._explode_factor = None if explode_factor is None else float(explode_factor)
        self._warmup_steps = warmup_steps
        self._min_scale = float(min_scale)
        self._stop_boundary = stop_boundary

    def __new__(
        cls, wrapped: BasePruner | None = None, *args: Any, **kwargs: Any
    ) -> DivergencePruner:
        return super().__new__(class_for(cls, wrapped))

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
        if self._explode_factor is None or step < max(
            self._warmup_steps, warmup_steps(self._wrapped)
        ):
            return None
        earlier = [
            v for s, v in trial.intermediate_values.items() if s < step and math.isfinite(v)
        ]
        if not earlier:
            return None
        maximize = _direction(study) == StudyDirection.MAXIMIZE
        best = max(earlier) if maximize else min(earlier)
        scale = (
            abs(best)
            if abs(best) > self._min_scale
            else statistics.median(abs(v) for v in earlier)
        )
        if scale <= self._min_scale:
            return None  # no scale to explode from (values at zero)
        worse = value < best if maximize else value > best
        if not worse or abs(value) <= self._explode_factor * scale:
            return None
        return (
            f"exploded at step {step}: {value:.4g} is worse than the best so far ({best:.4g}) "
            f"and more than {self._explode_factor:g}x the trial's scale ({scale:.4g})"
        )


def _direction(study: optuna.Study) -> StudyDirection:
    directions = study.directions
    return directions[0]


def _tag_diverged(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    """Write the tags through the storage (a FrozenTrial cannot), before the trial is pruned."""
    try:
        for key, value in tags.diverged(reason).items():
            study._storage.set_trial_user_attr(trial._trial_id, key, value)
    except optuna.exceptions.UpdateFinishedTrialError:
        return
    _log.warning("Trial %d diverged: %s; pruned.", trial.number, reason)
