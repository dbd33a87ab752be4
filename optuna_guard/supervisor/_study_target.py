"""The study-wide trial target of ``optuna-guard run --study-trials N``.

``--n-trials`` counts the trials of one launch; a week-long study runs as many launches (SLURM
requeues, array tasks on other hosts), so the target that matters is counted in the storage,
which every launcher shares. A trial counts when it finished COMPLETE or PRUNED; a FAIL does
not, and when it is retried its retry counts once it finishes (as Optuna's
``MaxTrialsCallback`` counts). A launcher grants a ticket only while

    finished in the storage + its own trials holding a ticket or running  <  N

so on one launcher the target is met exactly, and with several launchers the overshoot is at
most the trials the other launchers were running when the target was reached.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from optuna.trial import TrialState

from optuna_guard._logging import get_logger

_log = get_logger(__name__)

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
_FINISHED_NAMES = frozenset(state.name for state in FINISHED_STATES)


def finished_trial_ids(storage: Any, study_id: int) -> set[int]:
    """Ids of the study's COMPLETE and PRUNED trials, read from the storage."""
    trials = storage.get_all_trials(study_id, deepcopy=False, states=FINISHED_STATES)
    return {trial._trial_id for trial in trials}


class StudyTarget:
    """Decides whether one more trial may start toward ``target`` finished trials of the study.

    Reaching the target is final (finished trials never un-finish), so once reached the
    storage is not read again.
    """

    def __init__(self, target: int, storage: Any, study_id: int | None) -> None:
        if isinstance(target, bool) or not isinstance(target, int) or target < 1:
            raise ValueError(f"--study-trials must be an integer >= 1 but got {target!r}.")
        self.target = target
        self.storage = storage
        self.study_id = study_id  # None until the study exists
        self.finished = 0  # at the last count
        self.reached = False

    def count(self, own_finished: Mapping[int, str] | None = None) -> int:
        """Finished trials of the study: the storage's, plus this launch's own trials that
        ended COMPLETE/PRUNED but whose end the supervisor is still writing."""
        ids = set() if self.study_id is None else finished_trial_ids(self.storage, self.study_id)
        if own_finished:
            ids.update(
                trial_id for trial_id, state in own_finished.items() if state in _FINISHED_NAMES
            )
        self.finished = len(ids)
        if self.finished >= self.target:
            self.reached = True
        return self.finished

    def deny_reason(
        self, in_flight: int, own_finished: Mapping[int, str] | None = None
    ) -> str | None:
        """None when one more trial may start, else the sentence that says why not.

        ``in_flight``: this launcher's trials holding a ticket or running (other launchers'
        running trials are not known here; they are the bounded overshoot).
        """
        if not self.reached:
            self.count(own_finished)
            if self.reached:
                _log.info(
                    "Study target reached: %d of --study-trials %d trials finished; no new trials start.",
                    self.finished,
                    self.target,
                )
        if self.reached:
            return f"study target reached: {self.finished} of --study-trials {self.target} trials finished"
        if self.finished + in_flight >= self.target:
            return (
                f"study target: {self.finished} finished + {in_flight} running = --study-trials "
                f"{self.target}"
            )
        return None

    def describe(self) -> str:
        return f"study target --study-trials {self.target} ({self.finished} finished so far)"
