"""How a trial ended, in the words a report uses, and where a retried trial came from.

Optuna's state says PRUNED or FAIL; our tags say why. ``end_state`` folds both into one label
so tables and plots can colour "killed" apart from an ordinary pruned trial.
"""

from __future__ import annotations

from optuna.trial import FrozenTrial, TrialState

from optuna_guard import tags
from optuna_guard.retries import FAILED_TRIAL, RETRY_HISTORY

KILLED = "killed"
CRASHED = "crashed"
PREEMPTED = "preempted"
DIVERGED = "diverged"
COMPLETE = "complete"
PRUNED = "pruned"
FAILED = "failed"
RUNNING = "running"
WAITING = "waiting"

# Most specific first: a killed trial is reported as killed whatever Optuna state it ended in.
END_STATES = (COMPLETE, PRUNED, FAILED, KILLED, CRASHED, PREEMPTED, DIVERGED, RUNNING, WAITING)

# The tags that mark an early stop, and the end state each one gives.
STOP_TAGS = (
    (tags.EMERGENCY_KILLED, KILLED),
    (tags.WORKER_CRASHED, CRASHED),
    (tags.PREEMPTED, PREEMPTED),
    (tags.DIVERGED, DIVERGED),
)

# Optuna's own retry bookkeeping (RetryHeartbeatStaleTrialCallback), which our retries reuse.
FAILED_TRIAL_ATTR = FAILED_TRIAL
RETRY_HISTORY_ATTR = RETRY_HISTORY


def end_state(trial: FrozenTrial) -> str:
    """One of END_STATES: the stop tag if there is one, else the Optuna state in lower case."""
    if trial.state == TrialState.RUNNING:
        return RUNNING
    if trial.state == TrialState.WAITING:
        return WAITING
    for tag, label in STOP_TAGS:
        if trial.user_attrs.get(tag):
            return label
    if trial.state == TrialState.COMPLETE:
        return COMPLETE
    if trial.state == TrialState.PRUNED:
        return PRUNED
    return FAILED


def retry_origin(trial: FrozenTrial) -> int | None:
    """Number of the trial this one retries: our ``retry_of`` tag, else Optuna's ``failed_trial``."""
    value = trial.user_attrs.get(tags.RETRY_OF)
    if value is None:
        value = trial.system_attrs.get(FAILED_TRIAL_ATTR)
    return None if value is None else int(value)


def retry_history(trial: FrozenTrial) -> list[int]:
    """The chain of trial numbers this trial retries, oldest first (empty for an original)."""
    history = trial.system_attrs.get(RETRY_HISTORY_ATTR)
    if history:
        return [int(n) for n in history]
    origin = retry_origin(trial)
    return [] if origin is None else [origin]
