"""Filters that keep emergency-killed trials out of analysis (they never ran to the end)."""

from __future__ import annotations

from collections.abc import Container, Iterable

import optuna
from optuna.trial import FrozenTrial, TrialState

from optuna_guard import tags


def is_killed(trial: FrozenTrial) -> bool:
    """True when a memory limit stopped this trial (``emergency_killed`` tag)."""
    return bool(trial.user_attrs.get(tags.EMERGENCY_KILLED, False))


def killed_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Trials a memory guard or the supervisor stopped, in trial-number order.

    Args:
        study: The study to read the trials from.

    Returns:
        The trials tagged ``emergency_killed``, whatever their state.
    """
    return [t for t in study.get_trials(deepcopy=False) if is_killed(t)]


def valid_trials(
    study: optuna.Study,
    states: Container[TrialState] | Iterable[TrialState] | None = None,
    *,
    complete_only: bool = False,
    objective_version: int | str | None = None,
) -> list[FrozenTrial]:
    """All trials except emergency-killed ones.

    ``complete_only=True`` keeps only COMPLETE trials; ``states`` keeps only the given states;
    ``objective_version`` ("current" or a number) keeps one objective version's trials.

    Args:
        study: The study to read the trials from.
        states: Keep only trials in these states (any container or iterable); None keeps all.
        complete_only: Keep only COMPLETE trials (overrides ``states``).
        objective_version: ``"current"``, ``"all"`` or a version number >= 1; None keeps the
            trials of every version.

    Returns:
        The trials not tagged ``emergency_killed``, in trial-number order.

    Raises:
        ConfigError: ``objective_version`` is not ``"current"``, ``"all"`` or a number >= 1.
    """
    if complete_only:
        states = (TrialState.COMPLETE,)
    # a one-shot iterable is read once here; any other container is asked as it is
    allowed = tuple(states) if isinstance(states, Iterable) else states
    trials = [t for t in study.get_trials(deepcopy=False, states=allowed) if not is_killed(t)]
    if objective_version is None:
        return trials
    from optuna_guard.resume import filter_version, resolve_version_filter

    return filter_version(trials, resolve_version_filter(study, objective_version))
