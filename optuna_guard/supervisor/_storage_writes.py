"""The supervisor's storage writes, off the loop thread: ending trials of dead workers,
sweeping trials a worker created but never reported, and the exit's bounded storage work.

Every job runs on a daemon thread of its own, so a database outage (ridden out by
``ResilientStorage`` for minutes) never stalls the memory watchdog, and an abandoned job never
blocks the exit (:mod:`._shutdown`).
"""

from __future__ import annotations

import concurrent.futures
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from optuna.trial import TrialState

from optuna_guard import events, tags
from optuna_guard._logging import get_logger
from optuna_guard.storage import end_trial_from_outside
from optuna_guard.supervisor import _shutdown

if TYPE_CHECKING:
    from optuna_guard.supervisor._arbiter import Arbiter

_log = get_logger(__name__)


class StorageWriter:
    """Storage jobs of the launch and the exit's storage deadline."""

    def __init__(self, arbiter: Arbiter) -> None:
        self._a = arbiter
        self.jobs: list[concurrent.futures.Future[None]] = []
        self.pending_trials: set[int] = set()  # trials a job is still ending
        self.skip_storage = False  # a second signal: no more storage work at exit
        self.abandoned = False  # the exit left storage work undone (the summary must not wait)

    # ------------------------------------------------------------------ jobs
    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Each job on its own daemon thread: end-of-trial writes run concurrently (one outage
        costs one deadline, not one per trial) and an abandoned retry never blocks the exit."""
        self.jobs = [f for f in self.jobs if not f.done()]
        self.jobs.append(_shutdown.run_in_daemon(self._run_job, fn, *args))

    def end_trial(
        self,
        trial_id: int,
        number: int | None,
        worker_id: int,
        state: TrialState,
        user_attrs: dict[str, Any],
    ) -> None:
        """End a dead worker's trial from outside (tags first, then state) on a job thread."""
        self.pending_trials.add(trial_id)
        self.submit(self._end_trial_tracked, trial_id, number, worker_id, state, dict(user_attrs))

    def sweep_dead_worker(self, pid: int, worker_id: int, reason: str, preempted: bool) -> None:
        """Look for a trial a dead worker created but never reported (on a job thread)."""
        self.submit(self._sweep_dead_worker_job, pid, worker_id, reason, preempted)

    def _end_trial_tracked(self, trial_id: int, *args: Any) -> None:
        self.pending_trials.add(trial_id)
        try:
            self._end_trial_job(trial_id, *args)
        finally:
            self.pending_trials.discard(trial_id)

    def _end_trial_job(
        self,
        trial_id: int,
        number: int | None,
        worker_id: int,
        state: TrialState,
        user_attrs: dict[str, Any],
    ) -> None:
        a, ledger = self._a, self._a.ledger
        frozen = a.storage.get_trial(trial_id)
        if frozen.state != TrialState.RUNNING:
            ledger.finished_states[trial_id] = frozen.state.name
            if a.retry_policy is not None and frozen.state in (
                TrialState.FAIL,
                TrialState.PRUNED,
            ):
                # the worker ended its trial but died before queueing the retry (enqueue_retry
                # finds an existing retry and does nothing when the worker did queue it)
                ledger.retry_trial(trial_id, number, worker_id)
            return
        policy = a.retry_policy
        if policy is not None:
            merged = {**frozen.user_attrs, **user_attrs}
            user_attrs.update(
                policy.final_tags(
                    merged,
                    policy.attempt(frozen),
                    free=policy.is_free_preemption(merged, frozen.system_attrs),
                )
            )
        if not end_trial_from_outside(a.storage, trial_id, state, user_attrs=user_attrs):
            ledger.finished_states[trial_id] = a.storage.get_trial(trial_id).state.name
            return
        if policy is not None:
            ledger.retry_trial(trial_id, number, worker_id)

    def _sweep_dead_worker_job(
        self, pid: int, worker_id: int, reason: str, preempted: bool
    ) -> None:
        a, ledger = self._a, self._a.ledger
        for trial in a.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if (
                trial.user_attrs.get(tags.WORKER_PID) != pid
                or trial.user_attrs.get(tags.LAUNCH_ID) != a.launch_id
                or trial._trial_id in ledger.started_trials
            ):
                continue
            attrs = {
                tags.KILL_REASON: reason,
                (tags.PREEMPTED if preempted else tags.WORKER_CRASHED): True,
            }
            if end_trial_from_outside(
                a.storage, trial._trial_id, TrialState.FAIL, user_attrs=attrs
            ):
                ledger.late_finished.append((trial._trial_id, "FAIL"))
                _log.warning(
                    "Trial %d of worker %d (pid %d) ended FAIL: %s.",
                    trial.number,
                    worker_id,
                    pid,
                    reason,
                )
                if a.retry_policy is not None:
                    ledger.retry_trial(trial._trial_id, trial.number, worker_id)

    def _run_job(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except (
            Exception
        ) as exc:  # storage gone past the deadline: surviving workers' heartbeat fails it
            _log.error(
                "Could not update trial %s in the storage: %s: %s",
                args[1] if len(args) > 1 else "?",
                type(exc).__name__,
                exc,
            )

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every queued storage write is done; False if some are still pending."""
        pending = [f for f in self.jobs if not f.done()]
        if pending:
            _done, not_done = concurrent.futures.wait(pending, timeout=timeout)
            if not_done:
                return False
        self.jobs = [f for f in self.jobs if not f.done()]
        return True

    # ------------------------------------------------------------------ exit
    def deadline_at_exit(self) -> float:
        """The clock time by which the exit's storage work must be done (one overall deadline)."""
        a = self._a
        if a.exit_deadline is not None:
            return max(a.exit_deadline - _shutdown.EXIT_SLACK_S, a.clock() + 1.0)
        return a.clock() + _shutdown.storage_allowance(a.config.storage_deadline)

    def interrupted(self) -> bool:
        """A further SIGTERM/SIGINT during the exit (or one already seen) skips the storage work."""
        while not self.skip_storage:
            signum = self._a.signals.pop()
            if signum is None:
                break
            if signum in (signal.SIGTERM, signal.SIGINT):
                _log.warning(
                    "%s during the exit: skipping the remaining storage writes.",
                    signal.Signals(signum).name,
                )
                self.skip_storage = True
        return self.skip_storage

    def finish(self, reason: str) -> None:
        """End-of-trial writes and the RUNNING sweep, within the exit deadline; whatever cannot
        be done is named (those trials stay RUNNING for the next launch or the heartbeat)."""
        a, ledger = self._a, self._a.ledger
        deadline = self.deadline_at_exit()
        done = _shutdown.wait_until(self.jobs, deadline, self.interrupted, a.clock)
        if done:
            done, _ = _shutdown.bounded_call(
                lambda: self.sweep_running(reason), deadline, self.interrupted, a.clock
            )
        if done:
            return
        self.abandoned = True
        maybe_running = sorted(
            number
            for trial_id, number in ledger.started_trials.items()
            if trial_id not in ledger.finished_states or trial_id in self.pending_trials
        )
        why = "a second signal" if self.skip_storage else "the exit deadline"
        _log.error(
            "Storage work skipped (%s): trial(s) %s may stay RUNNING until the next launch or Optuna's "
            "heartbeat check ends them.",
            why,
            ", ".join(map(str, maybe_running)) or "none known",
        )
        a.emit(
            events.STORAGE_OUTAGE,
            outage="abandoned",
            source="supervisor",
            trials=maybe_running,
            reason=f"storage work at exit skipped ({why})",
        )

    def sweep_running(self, reason: str) -> None:
        """A last look in the storage: RUNNING trials of this launch's workers get FAIL."""
        a, ledger = self._a, self._a.ledger
        try:
            running = a.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except Exception as exc:
            _log.error("Could not check the storage for RUNNING trials at exit: %s", exc)
            return
        for trial in running:
            ours = (
                trial._trial_id in ledger.started_trials
                or trial.user_attrs.get(tags.LAUNCH_ID) == a.launch_id
            )
            if not ours:
                continue
            why = f"launcher stopped: {reason}"
            attrs: dict[str, Any] = {tags.KILL_REASON: why}
            if a.stopping:
                attrs[tags.PREEMPTED] = True
            else:
                attrs[tags.WORKER_CRASHED] = True
            try:
                if end_trial_from_outside(
                    a.storage, trial._trial_id, TrialState.FAIL, user_attrs=attrs
                ):
                    ledger.finished_states.setdefault(trial._trial_id, "FAIL")
                    _log.warning(
                        "Trial %d was still RUNNING at exit; ended FAIL (%s).", trial.number, why
                    )
            except Exception as exc:
                _log.error("Could not end trial %d: %s", trial.number, exc)
