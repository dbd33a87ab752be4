"""The one definition of "best valid trial", for ``status``, ``report`` and the launch summary.

A trial is *valid* when Optuna says COMPLETE, it has values, and optuna-guard did not tag it as
stopped early (``STOP_TAGS``: a memory stop, a worker crash or loss, a preemption, a trial
timeout, a divergence). Such a tag on a COMPLETE trial means the objective returned after it
was told to stop (user code caught the interrupt, or the worker won the race against the
supervisor): its value measures a cut-short run, so it never counts as a result.

A valid trial is *feasible* unless a constraint value is > 0 (or NaN): Optuna's rule for
``Study.best_trial`` / ``best_trials`` under ``constraints_func`` (system attrs ``constraints``
or ``constraints:<name>``, the memory constraint included); a trial with no constraint values
counts as feasible, as in Optuna. The best valid trials are then the feasible valid trial with
the best value (ties: the lowest number) or, with several objectives, the Pareto front of the
feasible valid trials. On a study without stop tags this is what Optuna's
``best_trial`` / ``best_trials`` return.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from optuna_guard import tags

STOP_TAGS = tags.STOP_TAGS  # stopped early: the same set retries can be asked for


def is_valid(trial: FrozenTrial) -> bool:
    """COMPLETE with values, and no optuna-guard tag saying it was stopped early."""
    return (
        trial.state == TrialState.COMPLETE
        and trial.values is not None
        and not any(trial.user_attrs.get(tag) for tag in STOP_TAGS)
    )


def is_feasible(trial: FrozenTrial) -> bool:
    """Every constraint value <= 0 (Optuna's rule; NaN is infeasible, none at all feasible)."""
    return all(value <= 0.0 for value in trial.constraints.values())


@dataclasses.dataclass(frozen=True)
class BestValid:
    """The best valid trials among some trials, and the counts a report explains them with.

    Attributes:
        trials: the best trial (one objective) or the Pareto front, in trial-number order;
            empty when no trial is valid and feasible.
        valid: how many trials are valid (COMPLETE, values, no stop tag).
        feasible: how many of those are feasible.
        constrained: whether any of the trials carries a constraint value.
    """

    trials: list[FrozenTrial]
    valid: int
    feasible: int
    constrained: bool

    @property
    def single(self) -> FrozenTrial | None:
        """The best trial when there is exactly one (single objective), else None."""
        return self.trials[0] if len(self.trials) == 1 else None


def best_valid(trials: Iterable[FrozenTrial], directions: Sequence[StudyDirection]) -> BestValid:
    """The best valid trials among ``trials`` for a study with these ``directions``."""
    trials = list(trials)
    valid = [t for t in trials if is_valid(t)]
    feasible = [t for t in valid if is_feasible(t)]
    return BestValid(
        trials=_best_of(feasible, directions),
        valid=len(valid),
        feasible=len(feasible),
        constrained=any(t.constraints for t in trials),
    )


def best_valid_trials(
    trials: Iterable[FrozenTrial], directions: Sequence[StudyDirection]
) -> list[FrozenTrial]:
    """The best valid trial, or the Pareto front, among ``trials`` (the rule of this module).

    What ``optuna-guard status``, ``optuna-guard report`` and the launch summary show.

    Args:
        trials: trials of one study, e.g. ``study.get_trials(deepcopy=False)``.
        directions: the study's directions, ``study.directions``.

    Returns:
        One trial for a single objective, the Pareto front (in trial-number order) for
        several; empty when no trial is COMPLETE, untagged and feasible.
    """
    return best_valid(trials, directions).trials


def _best_of(
    candidates: Sequence[FrozenTrial], directions: Sequence[StudyDirection]
) -> list[FrozenTrial]:
    if not candidates:
        return []
    if len(directions) == 1:
        sign = -1.0 if directions[0] == StudyDirection.MAXIMIZE else 1.0
        # a valid trial has values; ties go to the earliest trial
        return [min(candidates, key=lambda t: (sign * t.values[0], t.number))]
    from optuna.study._multi_objective import _get_pareto_front_trials_by_trials

    front = _get_pareto_front_trials_by_trials(candidates, directions)
    return sorted(front, key=lambda t: t.number)
