"""The supervisor loop (after gunicorn's arbiter): a few named steps, each testable alone.

Every ``check_interval`` the loop runs :meth:`Arbiter.tick`:
``reap`` dead workers (:mod:`._reaper`; what becomes of their trial: :func:`._exits.decide`) ->
``advance_kills`` (SIGTERM -> wait -> SIGKILL, :mod:`._kills`) -> ``check_memory`` (hard kills,
one victim at a time, :mod:`._memory_watch`) -> ``check_cgroup_ooms`` (kernel kills in a worker's
own cgroup) -> ``check_trial_timeouts`` (:mod:`._hung`) -> ``check_stop`` (grace period) ->
``reconcile`` (start workers up to the target, :mod:`._spawner`) -> ``report`` (status lines,
memory samples, live display, :mod:`._reporting`).
Tickets and trial ends are the ledger's (:mod:`._trial_ledger`); storage writes run off the loop
(:mod:`._storage_writes`). The launch's identity (``launch_id``), lease and heartbeats live on
their own thread (:mod:`._heartbeat`, :mod:`._lease`); workers watch the supervisor
(:mod:`._lifeline`). Between ticks it waits on the workers' sockets and the signal wake-up fd
(:mod:`._signals`), so ticket requests are answered at once and a signal interrupts the wait.

The Arbiter owns the loop state every step shares (workers, stop state, exit code, the tallies
of the summary); each component owns its own state and gets the Arbiter as its host.
"""

from __future__ import annotations

import os
import queue
import selectors
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import optuna

from optuna_guard import events, tags
from optuna_guard._logging import get_logger
from optuna_guard.exceptions import EXIT_OK, EXIT_STOPPED, CrashLoopError
from optuna_guard.memory import MemoryProbe
from optuna_guard.supervisor import _cgroups, _exits, _shutdown
from optuna_guard.supervisor._config import LaunchConfig
from optuna_guard.supervisor._heartbeat_start import start_heartbeat
from optuna_guard.supervisor._kills import Killer
from optuna_guard.supervisor._memory_watch import MemoryWatchdog
from optuna_guard.supervisor._reaper import Reaper
from optuna_guard.supervisor._reporting import Reporter
from optuna_guard.supervisor._signals import SignalInbox
from optuna_guard.supervisor._spawner import Spawner
from optuna_guard.supervisor._status import NullDisplay, RichDisplay
from optuna_guard.supervisor._storage_writes import StorageWriter
from optuna_guard.supervisor._trial_ledger import TrialLedger
from optuna_guard.supervisor._worker_handle import KillOrder, WorkerHandle
from optuna_guard.supervisor._worker_io import WorkerIO

__all__ = ["Arbiter"]

_log = get_logger(__name__)

MEMORY_KILL = _exits.MEMORY_KILL
PREEMPT_KILL = _exits.PREEMPT_KILL
DUPLICATE_SIGTERM_WINDOW_S = 2.0  # a second SIGTERM this soon is the same request, not "kill now"


class Arbiter:
    """Runs one launch. Use :func:`optuna_guard.supervisor.launch` rather than this class."""

    def __init__(
        self,
        config: LaunchConfig,
        study: optuna.Study,
        storage_url: str,
        *,
        probe: MemoryProbe | None = None,
        event_log: events.EventLog | None = None,
        display: NullDisplay | RichDisplay | None = None,
        clock: Callable[[], float] = time.monotonic,
        retry_policy: Any = None,
        time_budget: Any = None,
        study_target: Any = None,
    ) -> None:
        self.config = config
        self.study = study
        self.storage = study._storage
        self.storage_url = storage_url
        self.probe = probe
        self.event_log = event_log
        self.display = display or NullDisplay()
        self.clock = clock
        self.retry_policy = retry_policy
        self.time_budget = time_budget
        self.study_target = study_target  # _study_target.StudyTarget of --study-trials, or None
        self._stop_signal_at: float | None = None  # when the signal that began the stop arrived
        self.hostname = socket.gethostname()
        # tagged on every trial; sweeps match it, never a bare pid
        self.launch_id = uuid.uuid4().hex
        self.heartbeat: Any = None  # _heartbeat.SupervisorHeartbeat while running

        self.workers: list[WorkerHandle] = []
        self.selector: selectors.BaseSelector = selectors.DefaultSelector()

        # the launch's tallies (LaunchSummary); retries are also counted on other threads
        self.kills = 0
        self.crashes = 0
        self.recycles = 0
        self.preempted = 0
        self.retries = 0
        self.skipped_for_time = 0
        self.worker_starts = 0
        self.boot_failures = 0
        self.storage_boot_failures = 0  # workers in a row that found the storage unreachable
        self._counter_lock = threading.Lock()

        self.stopping = False
        self.out_of_time = False
        self.stop_reason: str | None = None
        self.stop_deadline: float | None = None
        # set at the first stop: grace + bounded storage allowance
        self.exit_deadline: float | None = None
        self.exit_code = EXIT_OK
        self._started = clock()
        self._next_check = self._started

        # the components, each with one job (see the module docstring)
        self.signals = SignalInbox()
        self.ledger = TrialLedger(self)
        self.storage_writes = StorageWriter(self)
        self.spawner = Spawner(self)
        self.killer = Killer(self)
        self.memory = MemoryWatchdog(self)
        self.reaper = Reaper(self)
        self.reporter = Reporter(self, self._started)
        self.io = WorkerIO(self)

    # ------------------------------------------------------------------ shared state
    @property
    def signal_queue(self) -> queue.SimpleQueue[int]:
        """Queued signal numbers (handlers only enqueue)."""
        return self.signals.queue

    @property
    def cgroups(self) -> _cgroups.WorkerCgroups | None:
        return self.spawner.cgroups

    @property
    def finished_states(self) -> dict[int, str]:
        return self.ledger.finished_states

    @property
    def skipped_for_time_count(self) -> int:
        """Trials of the target T that were not started because of the time budget."""
        return self.ledger.skipped_for_time_count()

    @property
    def storage_abandoned(self) -> bool:
        """The exit left storage work undone (the summary must not wait for it)."""
        return self.storage_writes.abandoned

    def count_retry(self) -> None:
        with self._counter_lock:
            self.retries += 1

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        """Run until T trials finished or a stop; returns the exit code. Leaves nothing RUNNING."""
        self.signals.install(self.selector)
        self.display.start()
        self.emit(
            events.LAUNCH_STARTED,
            reason=f"study {self.config.study_name!r}",
            workers=self.config.workers,
            n_trials=self.config.n_trials,
            hostname=self.hostname,
            supervisor_pid=os.getpid(),
            launch_id=self.launch_id,
        )
        _log.info(
            "Launch %s on host %s (supervisor pid %d).", self.launch_id, self.hostname, os.getpid()
        )
        try:
            self.heartbeat = start_heartbeat(
                self.config,
                self.storage_url,
                self.launch_id,
                retry_policy=self.retry_policy,
                emit=self.emit,
                on_retried=self.count_retry,
            )
            self.spawner.make_cgroups()
            self.tick(self.clock())
            while not self.done():
                self.io.wait(self._next_check)
                self.handle_signals()
                now = self.clock()
                if now >= self._next_check or self.io.reap_now:
                    self.io.reap_now = False
                    self.tick(now)
                    self._next_check = now + self.config.check_interval
        except BaseException as exc:
            self.shutdown(reason=f"launcher error: {type(exc).__name__}: {exc}")
            raise
        else:
            self.shutdown(reason=self.stop_reason or "launch finished")
        finally:
            self.display.stop()
            self.signals.restore()
            self.selector.close()
        return self.exit_code

    def done(self) -> bool:
        if self.live_workers():
            return False
        if self.stopping or self.out_of_time:
            return True
        if self.study_target is not None and self.study_target.reached:
            return True
        target = self.config.n_trials
        return target is not None and len(self.finished_states) >= target

    def tick(self, now: float) -> None:
        """One pass of the watchdog (each step is a method of its own)."""
        if self.heartbeat is not None:  # the heartbeat thread beats for the trials of live workers
            self.heartbeat.live_trials = frozenset(
                w.trial_id for w in self.workers if w.trial_id is not None
            )
        self.reap(now)
        self.merge_late_finished()
        self.advance_kills(now)
        self.check_memory(now)
        self.check_cgroup_ooms(now)
        self.check_trial_timeouts(now)
        self.check_time_budget(now)
        self.check_stop(now)
        self.reconcile(now)
        self.report(now)

    def live_workers(self) -> list[WorkerHandle]:
        return list(self.workers)

    # ------------------------------------------------------------------ the steps
    def reap(self, now: float) -> None:
        self.reaper.reap(now)

    def merge_late_finished(self) -> None:
        self.ledger.merge_late_finished()

    def advance_kills(self, now: float) -> None:
        self.killer.advance_kills(now)

    def check_memory(self, now: float) -> None:
        self.memory.check_memory(now)

    def check_cgroup_ooms(self, now: float) -> None:
        self.memory.check_cgroup_ooms(now)

    def check_trial_timeouts(self, now: float) -> None:
        self.killer.check_trial_timeouts(now)

    def check_time_budget(self, now: float) -> None:
        if self.time_budget is None or self.stopping:
            return
        if self.time_budget.expired():
            self.begin_stop("time budget expired", now)

    def check_stop(self, now: float) -> None:
        """Past the grace period: kill every worker not already being killed (preempted)."""
        if not self.stopping or self.stop_deadline is None or now < self.stop_deadline:
            return
        for worker in self.workers:
            if worker.kill is None:
                reason = (
                    f"preempted: {self.stop_reason}; worker killed after the "
                    f"{self.config.grace_period:.0f}s grace period"
                )
                self.killer.start_kill(
                    worker,
                    PREEMPT_KILL,
                    reason,
                    tags.preempted(reason, pid=worker.pid),
                    now,
                    wait=0,
                )

    def reconcile(self, now: float) -> None:
        """Start workers until the target count is reached (or no more trials need one)."""
        if self.stopping or self.out_of_time:
            return
        counted = [w for w in self.workers if not self.replaceable(w)]
        target = self.config.n_trials
        waiting = sum(1 for w in counted if not w.busy)
        while len(counted) < self.config.workers:
            if target is not None:
                need = target - len(self.finished_states) - sum(1 for w in self.workers if w.busy)
                if need <= waiting:
                    return
            if self.study_target is not None:  # its count is refreshed at every ticket request
                if self.study_target.reached:
                    return
                need = (
                    self.study_target.target
                    - self.study_target.finished
                    - sum(1 for w in self.workers if w.busy)
                )
                if need <= waiting:
                    return
            if self.memory.hold():
                self.memory.check_stall(now)
                return
            self.memory.no_stall(now)
            self.spawn(now)
            return  # one worker per tick: the next start sees memory re-read (issue 10, D8)

    def replaceable(self, worker: WorkerHandle) -> bool:
        """A worker on its way out no longer holds its slot: told to exit, or being killed for its
        own RSS while the system still has room for a replacement (which then boots during the kill)."""
        if worker.deny_reason is not None:
            return True
        if (
            worker.kill is not None
            and worker.kill.kind == MEMORY_KILL
            and worker.kill.limit == "max_worker_rss_gb"
        ):
            return not self.memory.hold()
        return False

    def spawn(self, now: float) -> WorkerHandle:
        return self.spawner.spawn(now)

    def report(self, now: float) -> None:
        self.reporter.report(now)

    # ------------------------------------------------------------------ stopping
    def begin_stop(self, reason: str, now: float, exit_code: int = EXIT_STOPPED) -> None:
        """No new tickets; workers get SIGTERM (their trials stop at the next boundary) and
        ``grace_period`` seconds before they are killed."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_reason = reason
        self.exit_code = exit_code
        self.stop_deadline = now + self.config.grace_period
        budget = _shutdown.exit_budget(self.config.grace_period, self.config.storage_deadline)
        self.exit_deadline = now + budget
        _log.warning(
            "Stopping: %s. No new trials; %d worker(s) get %.0fs to finish or stop their trial; the launcher "
            "exits within %.0fs (grace period + %.0fs for storage writes; a second signal skips those).",
            reason,
            len(self.workers),
            self.config.grace_period,
            budget,
            _shutdown.storage_allowance(self.config.storage_deadline),
        )
        for worker in self.workers:
            if worker.kill is None and not worker.stop_sent:
                worker.stop_sent = True
                self.killer.send_signal(worker, signal.SIGTERM, tree=False)

    def handle_signals(self) -> None:
        """Act on queued signals in the loop (never inside the handler)."""
        while (signum := self.signals.pop()) is not None:
            name = signal.Signals(signum).name
            now = self.clock()
            self.emit(events.SIGNAL, reason=name)
            if signum == signal.SIGUSR1:
                _log.info("SIGUSR1: status snapshot of %d worker(s).", len(self.workers))
                self.log_status(now)
            elif not self.stopping:
                self._stop_signal_at = now
                self.begin_stop(f"launcher received {name}", now)
            elif (
                signum == signal.SIGTERM
                and self._stop_signal_at is not None
                and now - self._stop_signal_at < DUPLICATE_SIGTERM_WINDOW_S
            ):
                # SLURM (scancel --full, time limit, preemption) signals the batch shell and the job
                # step; the sbatch script forwards its copy. One stop, one grace period.
                _log.info(
                    "SIGTERM again %.1fs after the first: the same stop; the grace period stands.",
                    now - self._stop_signal_at,
                )
            else:
                _log.warning(
                    "Second %s: killing all workers now; storage writes are skipped.", name
                )
                self.storage_writes.skip_storage = True
                self.stop_deadline = now
                self.check_stop(now)

    def shutdown(self, reason: str) -> None:
        """Kill whatever still runs, reap it, and end every trial this launch started that is
        still RUNNING (never leave one RUNNING, whatever path brought us here)."""
        deadline = self.clock() + 5.0
        if self.workers:
            for worker in self.workers:
                if worker.kill is None:
                    why = f"preempted: {self.stop_reason or reason}"
                    worker.kill = KillOrder(
                        kind=PREEMPT_KILL,
                        reason=why,
                        tags=tags.preempted(why),
                        started_at=self.clock(),
                        sigkill_at=self.clock(),
                    )
                self.killer.send_signal(worker, signal.SIGKILL, tree=True)
            while self.workers and self.clock() < deadline:
                try:
                    self.reap(self.clock())
                except CrashLoopError:
                    pass
                if self.workers:
                    time.sleep(0.02)
        self.killer.kill_launch_leftovers()
        if self.cgroups is not None:
            self.cgroups.close()
        self.storage_writes.finish(reason)
        self.merge_late_finished()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.emit(
            events.LAUNCH_FINISHED,
            reason=reason,
            exit_code=self.exit_code,
            finished=len(self.finished_states),
        )

    # ------------------------------------------------------------------ storage at exit
    def wait_for_storage(self, timeout: float | None = None) -> bool:
        """Wait until every queued storage write is done; False if some are still pending."""
        return self.storage_writes.wait(timeout)

    def storage_deadline_at_exit(self) -> float:
        """The clock time by which the exit's storage work must be done (one overall deadline)."""
        return self.storage_writes.deadline_at_exit()

    def storage_interrupted(self) -> bool:
        """A further SIGTERM/SIGINT during the exit (or one already seen) skips the storage work."""
        return self.storage_writes.interrupted()

    # ------------------------------------------------------------------ reporting
    def emit(self, event: str, **fields: Any) -> None:
        if self.event_log is not None:
            try:
                self.event_log.emit(event, **fields)
            except (OSError, ValueError) as exc:  # a full disk must not stop the launch
                _log.debug("event log write failed: %s", exc)

    def log_status(self, now: float) -> None:
        self.reporter.log_status(now)
