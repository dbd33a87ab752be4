"""Reaping: collect workers that exited, decide what became of them and their trial
(:func:`._exits.decide`, pure) and act on it (end the trial, log, emit, count crash-loop strikes).
"""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

from optuna.trial import TrialState

from optuna_guard import events
from optuna_guard._logging import get_logger
from optuna_guard._units import GB, to_gb
from optuna_guard.exceptions import CrashLoopError, StorageUnavailableError
from optuna_guard.supervisor import _exits, _policies, _protocol
from optuna_guard.supervisor._worker_handle import WorkerHandle

if TYPE_CHECKING:
    from optuna_guard.supervisor._arbiter import Arbiter

_log = get_logger(__name__)

EXIT_WORKER_STORAGE_UNAVAILABLE = (
    75  # _worker.EXIT_STORAGE_UNAVAILABLE (the worker module is not imported here)
)


class Reaper:
    """Dead workers: how each ended and what happens to its trial."""

    def __init__(self, arbiter: Arbiter) -> None:
        self._a = arbiter

    def reap(self, now: float) -> None:
        """Collect workers that exited and act on how they ended."""
        a = self._a
        for worker in list(a.workers):
            code = worker.proc.poll()
            if code is None:
                continue
            if worker.registered or not worker.channel.closed:
                try:
                    messages, _closed = worker.channel.feed()
                except _protocol.ProtocolError:
                    messages = []
                for message in messages:
                    a.io.handle_safely(worker, message)
                a.spawner.unregister(worker)
            worker.channel.close()
            a.workers.remove(worker)
            try:
                self.handle_exit(worker, int(code), now)
            finally:
                a.killer.release(worker)

    @staticmethod
    def wait_briefly(worker: WorkerHandle) -> None:
        """The socket closes a moment before the process becomes reapable."""
        try:
            worker.proc.wait(timeout=0.1)
        except (subprocess.TimeoutExpired, AttributeError, TypeError):
            pass

    def exit_record(self, worker: WorkerHandle, code: int) -> _exits.ExitRecord:
        """What the supervisor knows about a reaped worker (see :mod:`._exits`)."""
        a = self._a
        kill = worker.kill
        system = a.memory.system
        return _exits.ExitRecord(
            code=code,
            pid=worker.pid,
            in_trial=worker.trial_id is not None,
            ticket_without_trial=worker.ticket and worker.trial_id is None,
            kill_kind=kill.kind if kill else None,
            kill_reason=kill.reason if kill else None,
            kill_tags=dict(kill.tags) if kill else {},
            stopping=a.stopping,
            stop_reason=a.stop_reason,
            fatal_error=worker.fatal_error,
            trials_started=worker.trials_started,
            deny_reason=worker.deny_reason,
            on_kill=a.config.on_kill,
            oom_killed=a.memory.oom_killed(worker),
            memory_limit_gb=a.config.max_worker_rss_gb,
            own_cgroup=a.cgroups is not None and a.cgroups.of(worker.pid) is not None,
            worker_id=worker.worker_id,
            available_gb=system.available_bytes / GB if system is not None else None,
            peak_rss_gb=max(worker.trial_peak_rss, worker.rss_bytes) / GB
            if worker.trial_id is not None
            else None,
        )

    def handle_exit(self, worker: WorkerHandle, code: int, now: float) -> None:
        """Act on how the worker ended; the decision itself is :func:`._exits.decide`."""
        a = self._a
        decision = _exits.decide(self.exit_record(worker, code))
        outcome, reason, number = decision.outcome, decision.reason, worker.trial_number
        age = now - worker.started_at
        if decision.sweep_unreported:
            # Granted a ticket but never reported its trial: it may have died between Optuna
            # creating the trial and the objective starting. New trials carry the worker's pid
            # and launch id from their creating insert, so look for one in the storage.
            why = _policies.describe_exit(code) + " before its objective started"
            if a.stopping:
                why = f"preempted: {a.stop_reason}; {why}"
            a.storage_writes.sweep_dead_worker(worker.pid, worker.worker_id, why, a.stopping)
        final = None
        if decision.trial_state is not None:
            final = a.ledger.end_trial(
                worker, TrialState[decision.trial_state], dict(decision.trial_tags)
            )
        if outcome in (_exits.KILLED_FOR_MEMORY, _exits.OOM_KILLED):
            if final is not None:
                a.emit(
                    events.TRIAL_KILLED,
                    worker_id=worker.worker_id,
                    pid=worker.pid,
                    trial_number=number,
                    reason=reason,
                    state=final,
                )
            if outcome == _exits.OOM_KILLED:
                a.kills += 1
                available = a.memory.available_bytes()
                # the same kill record as the launcher's own memory kills (event log, report)
                a.emit(
                    events.WORKER_KILLED,
                    worker_id=worker.worker_id,
                    pid=worker.pid,
                    trial_number=number,
                    reason=reason,
                    rss_gb=to_gb(worker.rss_bytes),
                    available_gb=None if available is None else to_gb(available),
                    limit="max_worker_rss_gb",
                )
                _log.warning(
                    "Worker %d (pid %d): %s; trial %s ended %s.",
                    worker.worker_id,
                    worker.pid,
                    reason,
                    number,
                    final,
                )
                if decision.boot_strike:
                    self.boot_strike(worker, reason)
            else:
                _log.info(
                    "Worker %d (pid %d) is gone (killed by the launcher: %s).",
                    worker.worker_id,
                    worker.pid,
                    reason,
                )
        elif outcome in (_exits.PREEMPTED, _exits.TIMED_OUT):
            if final is not None:
                if outcome == _exits.PREEMPTED:
                    a.preempted += 1
                _log.info(
                    "Trial %s of worker %d ended FAIL tagged %s: %s.",
                    number,
                    worker.worker_id,
                    "preempted" if outcome == _exits.PREEMPTED else "timed_out",
                    reason,
                )
            a.emit(
                events.WORKER_EXITED,
                worker_id=worker.worker_id,
                pid=worker.pid,
                reason=reason,
                exit_code=code,
            )
        elif outcome == _exits.CRASHED_IN_TRIAL:
            a.crashes += 1
            _log.error(
                "Worker %d (pid %d) crashed under trial %s: %s; trial %s marked worker_crashed (FAIL). %s",
                worker.worker_id,
                worker.pid,
                number,
                reason,
                number,
                worker.log_hint(),
            )
            a.emit(
                events.WORKER_CRASHED,
                worker_id=worker.worker_id,
                pid=worker.pid,
                trial_number=number,
                reason=reason,
                exit_code=code,
                age_s=round(age, 1),
            )
        elif (
            outcome == _exits.KILLED_AT_BOOT
        ):  # a user or scheduler signalled it: no crash, no strike
            a.emit(
                events.WORKER_EXITED,
                worker_id=worker.worker_id,
                pid=worker.pid,
                exit_code=code,
                reason=reason,
            )
            _log.warning(
                "Worker %d (pid %d) died before its first trial: %s.",
                worker.worker_id,
                worker.pid,
                reason,
            )
        elif (
            outcome == _exits.KILLED_IDLE
        ):  # the launcher killed it itself: no crash, no strike (D17)
            a.emit(
                events.WORKER_EXITED,
                worker_id=worker.worker_id,
                pid=worker.pid,
                exit_code=code,
                reason=reason,
            )
            _log.info("Worker %d (pid %d) is gone (%s).", worker.worker_id, worker.pid, reason)
        elif outcome == _exits.STORAGE_UNAVAILABLE:
            self.on_worker_storage_unavailable(worker)
        elif outcome in (_exits.BOOT_FAILURE, _exits.DIED_BETWEEN_TRIALS):
            a.crashes += 1
            a.emit(
                events.WORKER_CRASHED,
                worker_id=worker.worker_id,
                pid=worker.pid,
                reason=reason,
                exit_code=code,
                age_s=round(age, 1),
            )
            if outcome == _exits.BOOT_FAILURE:
                self.boot_strike(worker, reason)
            else:
                _log.error(
                    "Worker %d (pid %d) died between trials: %s. %s",
                    worker.worker_id,
                    worker.pid,
                    reason,
                    worker.log_hint(),
                )
        else:
            a.emit(
                events.WORKER_EXITED,
                worker_id=worker.worker_id,
                pid=worker.pid,
                reason=reason,
                exit_code=code,
                trials=worker.trials_finished,
            )
            _log.debug(
                "Worker %d (pid %d) exited after %d trials: %s.",
                worker.worker_id,
                worker.pid,
                worker.trials_finished,
                reason,
            )

    def boot_strike(self, worker: WorkerHandle, reason: str) -> None:
        """A worker died before its first trial by its own fault: count toward --crash-loop-limit."""
        a = self._a
        a.boot_failures += 1
        _log.error(
            "Worker %d (pid %d) died before its first trial (%s), %d time(s) in a row. %s",
            worker.worker_id,
            worker.pid,
            reason,
            a.boot_failures,
            worker.log_hint(),
        )
        if a.boot_failures >= a.config.crash_loop_limit:
            raise self.crash_loop_error(worker, reason)

    def crash_loop_error(self, worker: WorkerHandle, reason: str) -> CrashLoopError:
        """The error that stops a crash-looping launch; it names the last worker and quotes the
        end of its log."""
        tail = worker.log_tail()
        quoted = " | ".join(line.strip() for line in tail if line.strip())[-1500:]
        message = (
            f"workers died before their first trial {self._a.boot_failures} times in a row (last: worker "
            f"{worker.worker_id}, {reason}); stopping instead of restarting forever. End of {worker.log_path}: {quoted}"
        )
        return CrashLoopError(
            message, worker_id=worker.worker_id, log_path=worker.log_path, log_tail=tail
        )

    def on_worker_storage_unavailable(self, worker: WorkerHandle) -> None:
        """A worker that could not reach the storage within --storage-deadline at start: not a
        crash-loop strike (the database, not the worker, is at fault); a replacement retries.
        Only an outage that outlasts several deadlines in a row stops the launch."""
        a = self._a
        a.storage_boot_failures += 1
        _log.warning(
            "Worker %d (pid %d) could not reach the storage within --storage-deadline %.0fs (%d in a row); "
            "a new worker will try again.",
            worker.worker_id,
            worker.pid,
            a.config.storage_deadline or 0,
            a.storage_boot_failures,
        )
        a.emit(
            events.WORKER_EXITED,
            worker_id=worker.worker_id,
            pid=worker.pid,
            exit_code=EXIT_WORKER_STORAGE_UNAVAILABLE,
            reason="storage unreachable at worker start",
        )
        if a.storage_boot_failures >= 2 * a.config.crash_loop_limit:
            raise StorageUnavailableError(
                f"workers could not reach the storage {a.storage_boot_failures} times in a row, "
                f"each for --storage-deadline {a.config.storage_deadline or 0:.0f}s; stopping."
            )
