"""The launch's trial ledger: tickets, trials started and finished (their end states and
durations), retries, recycling at a ticket request, and running out of time.

The ledger owns what the launch counts toward ``--n-trials`` (``finished_states``); it reads the
arbiter's workers and stop state and asks the storage writer to end trials from outside.
"""

from __future__ import annotations

import collections
import statistics
from typing import TYPE_CHECKING, Any

from optuna.trial import TrialState

from optuna_guard import events
from optuna_guard._logging import get_logger
from optuna_guard._units import to_gb
from optuna_guard.exceptions import EXIT_STOPPED
from optuna_guard.supervisor import _exits, _policies
from optuna_guard.supervisor._worker_handle import WorkerHandle

if TYPE_CHECKING:
    from optuna_guard.supervisor._arbiter import Arbiter

_log = get_logger(__name__)


class TrialLedger:
    """Trials of this launch: who may start one, what became of each."""

    def __init__(self, arbiter: Arbiter) -> None:
        self._a = arbiter
        self.finished_states: dict[int, str] = {}  # trial_id -> end state, trials of this launch
        self.started_trials: dict[int, int] = {}  # trial_id -> number
        self.durations: list[float] = []
        # trials the storage thread found and ended, merged on the loop thread
        self.late_finished: collections.deque[tuple[int, str]] = collections.deque()
        self._rss_recycle_after_one = 0
        self._warned_recycle_loop = False

    def in_flight(self) -> int:
        return sum(1 for w in self._a.workers if w.busy)

    # ------------------------------------------------------------------ tickets
    def decide_ticket(self, worker: WorkerHandle, now: float) -> tuple[bool, str]:
        """Grant one more trial, or say why not (the worker exits on a denial)."""
        a = self._a
        if worker.kill is not None:
            return False, f"being stopped: {worker.kill.reason}"
        if a.stopping:
            return False, f"stopping: {a.stop_reason}"
        if a.config.recycle_worker_rss_gb is not None:  # else the tick's reading will do
            worker.rss_bytes = a.memory.tree_rss(worker.pid)
        reason = _policies.recycle_reason(
            age_s=now - worker.started_at,
            age_limit_s=worker.age_limit,
            trials_finished=worker.trials_finished,
            max_trials=a.config.max_trials_per_worker,
            tree_rss_bytes=worker.rss_bytes,
            recycle_rss_gb=a.config.recycle_worker_rss_gb,
        )
        if reason is not None:
            self.on_recycle(worker, reason)
            return False, f"recycle: {reason}"
        target = a.config.n_trials
        in_flight = self.in_flight()
        if target is not None and len(self.finished_states) + in_flight >= target:
            return False, f"done: {target} trials finished or running"
        if a.study_target is not None:
            denial = a.study_target.deny_reason(in_flight, self.finished_states)
            if denial is not None:
                return False, f"done: {denial}"
        if a.out_of_time or (
            a.time_budget is not None and not a.time_budget.allows_new_trial(self.durations)
        ):
            self.on_out_of_time()
            a.skipped_for_time += 1  # tickets refused (the count reported when there is no T)
            return False, f"time budget: {a.stop_reason}"
        return True, ""

    def on_out_of_time(self) -> None:
        """The budget cannot fit another trial: no more tickets, no more workers; the launch ends
        when the running trials finish (exit 99, so a job script can requeue)."""
        a = self._a
        if a.out_of_time:
            return
        a.out_of_time = True
        budget = a.time_budget
        typical = statistics.median(self.durations) if self.durations else 0.0
        a.stop_reason = (
            f"time budget: {budget.remaining():.0f}s left, less than a typical trial "
            f"({typical:.0f}s) plus the {budget.grace_period:.0f}s grace period"
        )
        a.exit_code = EXIT_STOPPED
        _log.warning("No new trials: %s.", a.stop_reason)
        a.emit(events.SIGNAL, reason=a.stop_reason)

    def skipped_for_time_count(self) -> int:
        """Trials of the target T that were not started because of the time budget."""
        a = self._a
        if not a.out_of_time and not (a.stopping and a.stop_reason == "time budget expired"):
            return 0
        if a.config.n_trials is None:
            return a.skipped_for_time
        return max(a.config.n_trials - len(self.finished_states), 0)

    def on_recycle(self, worker: WorkerHandle, reason: str) -> None:
        a = self._a
        worker.recycled = True
        a.recycles += 1
        _log.info(
            "Worker %d (pid %d) is recycled: %s; a fresh worker replaces it.",
            worker.worker_id,
            worker.pid,
            reason,
        )
        a.emit(
            events.WORKER_RECYCLED,
            worker_id=worker.worker_id,
            pid=worker.pid,
            reason=reason,
            rss_gb=to_gb(worker.rss_bytes),
        )
        if "tree RSS" in reason and worker.trials_finished == 1:
            self._rss_recycle_after_one += 1
            if self._rss_recycle_after_one >= 3 and not self._warned_recycle_loop:
                self._warned_recycle_loop = True
                _log.warning(
                    "Workers exceed --recycle-worker-rss-gb %.2f after a single trial (%d times in a row); every "
                    "worker is recycled after each trial. Raise --recycle-worker-rss-gb or find the leak.",
                    a.config.recycle_worker_rss_gb,
                    self._rss_recycle_after_one,
                )
        else:
            self._rss_recycle_after_one = 0

    # ------------------------------------------------------------------ trials
    def on_trial_started(
        self, worker: WorkerHandle, trial_id: int, number: int, now: float
    ) -> None:
        a = self._a
        worker.ticket = False
        worker.trial_id, worker.trial_number, worker.trial_started_at = trial_id, number, now
        worker.trials_started += 1
        worker.trial_peak_rss = 0
        self.started_trials[trial_id] = number
        if a.heartbeat is not None:
            a.heartbeat.trial_started(trial_id)
        a.boot_failures = 0
        a.storage_boot_failures = 0
        a.emit(
            events.TRIAL_STARTED, worker_id=worker.worker_id, pid=worker.pid, trial_number=number
        )

    def on_trial_finished(
        self, worker: WorkerHandle, trial_id: int, number: int, state: str, duration: Any
    ) -> None:
        a = self._a
        if worker.trial_id == trial_id:
            worker.clear_trial()
        worker.trials_finished += 1
        self.finished_states.setdefault(trial_id, state)
        if isinstance(duration, (int, float)) and state in ("COMPLETE", "PRUNED"):
            self.durations.append(float(duration))
        a.emit(
            events.TRIAL_FINISHED,
            worker_id=worker.worker_id,
            pid=worker.pid,
            trial_number=number,
            state=state,
            duration_s=duration,
        )
        if (
            worker.kill is not None
            and worker.kill.kind == _exits.MEMORY_KILL
            and worker.kill.trial_number == number
        ):
            # the worker stopped the trial itself after the kill notice, with the kill's tags
            a.emit(
                events.TRIAL_KILLED,
                worker_id=worker.worker_id,
                pid=worker.pid,
                trial_number=number,
                reason=worker.kill.reason,
                state=state,
            )

    def end_trial(
        self, worker: WorkerHandle, state: TrialState, user_attrs: dict[str, Any]
    ) -> str | None:
        """End the dead worker's trial from outside (tags first, then state), counted as finished.

        The storage writes run on the storage thread, so a database outage (retried by
        ResilientStorage for minutes) never stalls the memory watchdog. Returns the state the
        trial is being ended in; a trial the worker finished just before dying keeps its state.
        """
        trial_id, number = worker.trial_id, worker.trial_number
        if trial_id is None:
            return None
        worker.clear_trial()
        worker.trials_finished += 1
        self.finished_states[trial_id] = (
            state.name
        )  # corrected by the job if the worker won the race
        self._a.storage_writes.end_trial(trial_id, number, worker.worker_id, state, user_attrs)
        return state.name

    def merge_late_finished(self) -> None:
        """Trials the storage thread found and ended count toward T (merged on the loop thread)."""
        while self.late_finished:
            trial_id, state = self.late_finished.popleft()
            self.finished_states.setdefault(trial_id, state)

    def retry_trial(self, trial_id: int, number: int | None, worker_id: int | None) -> int | None:
        """Queue a retry of a trial the supervisor ended, if the retry policy wants one."""
        from optuna_guard.retries import enqueue_retry

        a = self._a
        assert a.retry_policy is not None
        retry_number = enqueue_retry(a.study, a.storage.get_trial(trial_id), a.retry_policy)
        if retry_number is not None:
            a.count_retry()
            a.emit(
                events.TRIAL_RETRIED,
                worker_id=worker_id,
                trial_number=number,
                retry_number=retry_number,
                reason=f"trial {number} re-queued as trial {retry_number}",
            )
        return retry_number
