"""The supervisor loop (after gunicorn's arbiter): a few named steps, each testable alone.

Every ``check_interval`` the loop runs :meth:`Arbiter.tick`:
``reap`` dead workers (what becomes of their trial: :func:`._exits.decide`) -> ``advance_kills``
(SIGTERM -> wait -> SIGKILL) -> ``check_memory`` (hard kills, one victim at a time) ->
``check_cgroup_ooms`` (kernel kills in a worker's own cgroup, :mod:`._cgroups`) ->
``check_trial_timeouts`` (:mod:`._hung`) -> ``check_stop`` (grace period) -> ``reconcile``
(start workers up to the target) -> ``report`` (status lines, memory samples, live display).
The launch's identity (``launch_id``), lease and heartbeats live on their own thread
(:mod:`._heartbeat`, :mod:`._lease`); workers watch the supervisor (:mod:`._lifeline`).
Between ticks it waits on the workers' sockets and the signal wake-up fd, so ticket requests
are answered at once and a signal interrupts the wait. Signal handlers only enqueue.

Side effects sit in small methods (``_spawn_process``, ``_send_signal``) so tests replace them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import queue
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from optuna_guard import events, tags
from optuna_guard._logging import get_logger
from optuna_guard._units import GB, to_gb
from optuna_guard.exceptions import (
    EXIT_OK,
    EXIT_STOPPED,
    CrashLoopError,
    MemoryStallError,
    StorageUnavailableError,
)
from optuna_guard.memory import MemoryProbe, SystemMemory, _tree, default_probe
from optuna_guard.memory._cgroup import ENV_SKIP_CGROUP
from optuna_guard.storage import end_trial_from_outside
from optuna_guard.supervisor import (
    _cgroups,
    _exits,
    _hung,
    _lifeline,
    _memory_policy,
    _policies,
    _protocol,
    _shutdown,
    _threads,
)
from optuna_guard.supervisor._config import LaunchConfig, WorkerSettings
from optuna_guard.supervisor._status import NullDisplay, Progress, RichDisplay, worker_status_line

_log = get_logger(__name__)

LOG_TAIL_LINES = 15

EXIT_WORKER_STORAGE_UNAVAILABLE = (
    75  # _worker.EXIT_STORAGE_UNAVAILABLE (the worker module is not imported here)
)

GUARD_CHANCE_S = (
    0.25  # the in-trial guard samples every 0.1 s: this long over its limit and it could not act
)

MEMORY_KILL = _exits.MEMORY_KILL
PREEMPT_KILL = _exits.PREEMPT_KILL


@dataclasses.dataclass
class KillOrder:
    """A worker being stopped by the supervisor: SIGTERM sent at ``started_at``, SIGKILL due at
    ``sigkill_at``; ``tags`` are written on its trial (then PRUNED/FAIL) once it is gone."""

    kind: str
    reason: str
    tags: dict[str, Any]
    started_at: float
    sigkill_at: float
    sigkill_sent: bool = False
    limit: str | None = None
    trial_number: int | None = None


@dataclasses.dataclass
class WorkerHandle:
    """The supervisor's view of one worker process (``worker_id`` is the slot 1..N; a
    replacement takes the slot of the worker it replaces)."""

    worker_id: int
    spawn_index: int
    proc: Any  # subprocess.Popen or a test double with pid/poll()/wait()
    channel: _protocol.Channel
    log_path: str
    started_at: float
    age_limit: float | None
    ready: bool = False
    ticket: bool = False
    trial_id: int | None = None
    trial_number: int | None = None
    trial_started_at: float | None = None
    trials_started: int = 0
    trials_finished: int = 0
    rss_bytes: int = 0
    trial_peak_rss: int = 0
    deny_reason: str | None = None
    denied_at: float | None = None  # when it was told to exit (its bounded exit wait starts)
    recycled: bool = False
    kill: KillOrder | None = None
    stop_sent: bool = False
    fatal_error: str | None = None
    registered: bool = False
    cpu_ticks: int | None = None  # last CPU reading, and when it last changed (hung-worker health)
    cpu_changed_at: float | None = None

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    @property
    def busy(self) -> bool:
        """Holds a ticket or runs a trial (counts toward the T in flight)."""
        return self.ticket or self.trial_id is not None


WORKER_EXIT_WAIT_S = (
    10.0  # a worker told to exit gets this long for its normal interpreter exit, then SIGKILL
)
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
        self.launch_id = (
            uuid.uuid4().hex
        )  # tagged on every trial; sweeps match it, never a bare pid
        self.heartbeat: Any = None  # _heartbeat.SupervisorHeartbeat while running
        self.cgroups: _cgroups.WorkerCgroups | None = (
            None  # one memory cgroup per worker, where writable
        )

        self.workers: list[WorkerHandle] = []
        self.all_pids: set[int] = set()
        self.selector = selectors.DefaultSelector()
        self.signal_queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._wakeup_r: socket.socket | None = None
        self._wakeup_w: socket.socket | None = None
        self._old_handlers: dict[int, Any] = {}
        self._old_wakeup_fd: int | None = None

        self.finished_states: dict[int, str] = {}  # trial_id -> end state, trials of this launch
        self.started_trials: dict[int, int] = {}  # trial_id -> number
        self.durations: list[float] = []
        self.kills = 0
        self.crashes = 0
        self.recycles = 0
        self.preempted = 0
        self.retries = 0
        self.skipped_for_time = 0
        self.worker_starts = 0
        self.boot_failures = 0
        self.storage_boot_failures = (
            0  # workers in a row that found the storage unreachable at start
        )
        self._counter_lock = threading.Lock()
        self._storage_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._storage_jobs: list[concurrent.futures.Future[None]] = []
        self._late_finished: collections.deque[tuple[int, str]] = collections.deque()
        self._rss_recycle_after_one = 0
        self._warned_recycle_loop = False
        self._next_spawn_index = 0
        self._free_slots: list[int] = list(range(config.workers, 0, -1))

        self.stopping = False
        self.out_of_time = False
        self.stop_reason: str | None = None
        self.stop_deadline: float | None = None
        self.exit_deadline: float | None = (
            None  # set at the first stop: grace + bounded storage allowance
        )
        self.skip_storage = False  # a second signal: no more storage work at exit
        self.storage_abandoned = (
            False  # the exit left storage work undone (the summary must not wait for it)
        )
        self._pending_job_trials: set[int] = set()
        self.exit_code = EXIT_OK
        self.system: SystemMemory | None = None
        self._memory_hold_logged = False
        self.start_gate = _memory_policy.StartGate()
        self._stall = _memory_policy.StallClock()
        self._over_guard_since: dict[
            int, float
        ] = {}  # pid -> first reading over the guard's limit
        self._memory_elsewhere_logged_at: float | None = None
        self._last_warning_at: float | None = None
        self._started = clock()
        self._next_check = self._started
        self._next_status = self._started + config.status_interval
        self._next_sample = self._started
        self._reap_now = False

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        """Run until T trials finished or a stop; returns the exit code. Leaves nothing RUNNING."""
        self._install_signal_handlers()
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
            self.heartbeat = self._start_heartbeat()
            self.cgroups = self._make_cgroups()
            self.tick(self.clock())
            while not self.done():
                self.wait_for_io()
                self.handle_signals()
                now = self.clock()
                if now >= self._next_check or self._reap_now:
                    self._reap_now = False
                    self.tick(now)
                    self._next_check = now + self.config.check_interval
        except BaseException as exc:
            self.shutdown(reason=f"launcher error: {type(exc).__name__}: {exc}")
            raise
        else:
            self.shutdown(reason=self.stop_reason or "launch finished")
        finally:
            self.display.stop()
            self._restore_signal_handlers()
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

    # ------------------------------------------------------------------ I/O
    def wait_for_io(self) -> None:
        timeout = max(0.0, self._next_check - self.clock())
        try:
            ready = self.selector.select(timeout)
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for safety
            return
        for key, _mask in ready:
            if key.data is None:
                self._drain_wakeup()
                continue
            self.read_messages(key.data)

    def read_messages(self, worker: WorkerHandle) -> None:
        try:
            messages, closed = worker.channel.feed()
        except _protocol.ProtocolError as exc:
            _log.error(
                "Worker %d (pid %d) broke the protocol: %s; killing it.",
                worker.worker_id,
                worker.pid,
                exc,
            )
            messages, closed = [], True
            self._send_signal(worker, signal.SIGKILL, tree=True)
        for message in messages:
            self._handle_safely(worker, message)
        if closed:
            self._unregister(worker)
            self._reap_now = True
            try:  # the socket closes a moment before the process becomes reapable
                worker.proc.wait(timeout=0.1)
            except (subprocess.TimeoutExpired, AttributeError, TypeError):
                pass

    def _handle_safely(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        """A malformed message from one worker must not take the launch down."""
        try:
            self.handle_message(worker, message)
        except (KeyError, TypeError, ValueError) as exc:
            _log.error(
                "Worker %d (pid %d) sent a message the supervisor cannot use (%r: %s); ignored.",
                worker.worker_id,
                worker.pid,
                message,
                exc,
            )

    def handle_message(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        op = message.get("op")
        now = self.clock()
        if op == _protocol.HELLO:
            worker.ready = True
            self.start_gate.record_boot(
                self._tree_rss(worker.pid)
            )  # the expected footprint of the next worker
        elif op == _protocol.TICKET:
            granted, reason = self.decide_ticket(worker, now)
            if granted:
                worker.ticket = True
                worker.channel.send(_protocol.GRANT)
            else:
                worker.deny_reason = reason
                worker.denied_at = now
                worker.channel.send(_protocol.DENY, reason=reason)
        elif op == _protocol.STARTED:
            self.on_trial_started(worker, int(message["trial_id"]), int(message["number"]), now)
        elif op == _protocol.FINISHED:
            self.on_trial_finished(
                worker,
                int(message["trial_id"]),
                int(message["number"]),
                str(message.get("state")),
                message.get("duration"),
            )
        elif op == _protocol.RETRIED:
            self.retries += 1
            self.emit(
                events.TRIAL_RETRIED,
                worker_id=worker.worker_id,
                pid=worker.pid,
                trial_number=message.get("number"),
                retry_number=message.get("retry_number"),
                reason="re-queued by the worker after the in-trial guard stopped it",
            )
        elif op == _protocol.OUTAGE:
            self.emit(
                events.STORAGE_OUTAGE,
                worker_id=worker.worker_id,
                pid=worker.pid,
                outage=message.get("outage"),
                seconds=message.get("seconds"),
                reason=f"storage outage {message.get('outage')} ({message.get('what')})",
                source="worker",
            )
        elif op == _protocol.FATAL:
            worker.fatal_error = str(message.get("error"))
        elif op == _protocol.LOST:
            reason = (
                f"trial {message.get('number')} was ended {message.get('state')} from outside while worker "
                f"{worker.worker_id} ran it; its result {message.get('value')} is lost"
            )
            _log.warning("%s.", reason[:1].upper() + reason[1:])
            self.emit(
                events.TRIAL_LOST,
                worker_id=worker.worker_id,
                pid=worker.pid,
                trial_number=message.get("number"),
                state=message.get("state"),
                value=message.get("value"),
                reason=reason,
            )
        else:
            _log.warning(
                "Worker %d (pid %d) sent an unknown message %r; ignored.",
                worker.worker_id,
                worker.pid,
                op,
            )

    # ------------------------------------------------------------------ tickets and trials
    def decide_ticket(self, worker: WorkerHandle, now: float) -> tuple[bool, str]:
        """Grant one more trial, or say why not (the worker exits on a denial)."""
        if worker.kill is not None:
            return False, f"being stopped: {worker.kill.reason}"
        if self.stopping:
            return False, f"stopping: {self.stop_reason}"
        if self.config.recycle_worker_rss_gb is not None:  # else the tick's reading will do
            worker.rss_bytes = self._tree_rss(worker.pid)
        reason = _policies.recycle_reason(
            age_s=now - worker.started_at,
            age_limit_s=worker.age_limit,
            trials_finished=worker.trials_finished,
            max_trials=self.config.max_trials_per_worker,
            tree_rss_bytes=worker.rss_bytes,
            recycle_rss_gb=self.config.recycle_worker_rss_gb,
        )
        if reason is not None:
            self.on_recycle(worker, reason)
            return False, f"recycle: {reason}"
        target = self.config.n_trials
        in_flight = sum(1 for w in self.workers if w.busy)
        if target is not None and len(self.finished_states) + in_flight >= target:
            return False, f"done: {target} trials finished or running"
        if self.study_target is not None:
            denial = self.study_target.deny_reason(in_flight, self.finished_states)
            if denial is not None:
                return False, f"done: {denial}"
        if self.out_of_time or (
            self.time_budget is not None and not self.time_budget.allows_new_trial(self.durations)
        ):
            self.on_out_of_time()
            self.skipped_for_time += 1  # tickets refused (the count reported when there is no T)
            return False, f"time budget: {self.stop_reason}"
        return True, ""

    def on_out_of_time(self) -> None:
        """The budget cannot fit another trial: no more tickets, no more workers; the launch ends
        when the running trials finish (exit 99, so a job script can requeue)."""
        if self.out_of_time:
            return
        self.out_of_time = True
        budget = self.time_budget
        typical = statistics.median(self.durations) if self.durations else 0.0
        self.stop_reason = (
            f"time budget: {budget.remaining():.0f}s left, less than a typical trial "
            f"({typical:.0f}s) plus the {budget.grace_period:.0f}s grace period"
        )
        self.exit_code = EXIT_STOPPED
        _log.warning("No new trials: %s.", self.stop_reason)
        self.emit(events.SIGNAL, reason=self.stop_reason)

    @property
    def skipped_for_time_count(self) -> int:
        """Trials of the target T that were not started because of the time budget."""
        if not self.out_of_time and not (
            self.stopping and self.stop_reason == "time budget expired"
        ):
            return 0
        if self.config.n_trials is None:
            return self.skipped_for_time
        return max(self.config.n_trials - len(self.finished_states), 0)

    def on_recycle(self, worker: WorkerHandle, reason: str) -> None:
        worker.recycled = True
        self.recycles += 1
        _log.info(
            "Worker %d (pid %d) is recycled: %s; a fresh worker replaces it.",
            worker.worker_id,
            worker.pid,
            reason,
        )
        self.emit(
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
                    self.config.recycle_worker_rss_gb,
                    self._rss_recycle_after_one,
                )
        else:
            self._rss_recycle_after_one = 0

    def on_trial_started(
        self, worker: WorkerHandle, trial_id: int, number: int, now: float
    ) -> None:
        worker.ticket = False
        worker.trial_id, worker.trial_number, worker.trial_started_at = trial_id, number, now
        worker.trials_started += 1
        worker.trial_peak_rss = 0
        self.started_trials[trial_id] = number
        if self.heartbeat is not None:
            self.heartbeat.trial_started(trial_id)
        self.boot_failures = 0
        self.storage_boot_failures = 0
        self.emit(
            events.TRIAL_STARTED, worker_id=worker.worker_id, pid=worker.pid, trial_number=number
        )

    def on_trial_finished(
        self, worker: WorkerHandle, trial_id: int, number: int, state: str, duration: Any
    ) -> None:
        if worker.trial_id == trial_id:
            worker.trial_id = worker.trial_number = worker.trial_started_at = None
        worker.trials_finished += 1
        self.finished_states.setdefault(trial_id, state)
        if isinstance(duration, (int, float)) and state in ("COMPLETE", "PRUNED"):
            self.durations.append(float(duration))
        self.emit(
            events.TRIAL_FINISHED,
            worker_id=worker.worker_id,
            pid=worker.pid,
            trial_number=number,
            state=state,
            duration_s=duration,
        )
        if (
            worker.kill is not None
            and worker.kill.kind == MEMORY_KILL
            and worker.kill.trial_number == number
        ):
            # the worker stopped the trial itself after the kill notice, with the kill's tags
            self.emit(
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
        worker.trial_id = worker.trial_number = worker.trial_started_at = None
        worker.trials_finished += 1
        self.finished_states[trial_id] = (
            state.name
        )  # corrected by the job if the worker won the race
        self._pending_job_trials.add(trial_id)
        self.submit_storage_job(
            self._end_trial_tracked, trial_id, number, worker.worker_id, state, dict(user_attrs)
        )
        return state.name

    def _end_trial_job(
        self,
        trial_id: int,
        number: int | None,
        worker_id: int,
        state: TrialState,
        user_attrs: dict[str, Any],
    ) -> None:
        frozen = self.storage.get_trial(trial_id)
        if frozen.state != TrialState.RUNNING:
            self.finished_states[trial_id] = frozen.state.name
            if self.retry_policy is not None and frozen.state in (
                TrialState.FAIL,
                TrialState.PRUNED,
            ):
                # the worker ended its trial but died before queueing the retry (enqueue_retry
                # finds an existing retry and does nothing when the worker did queue it)
                self.retry_trial(trial_id, number, worker_id)
            return
        policy = self.retry_policy
        if policy is not None:
            merged = {**frozen.user_attrs, **user_attrs}
            user_attrs.update(
                policy.final_tags(
                    merged,
                    policy.attempt(frozen),
                    free=policy.is_free_preemption(merged, frozen.system_attrs),
                )
            )
        if not end_trial_from_outside(self.storage, trial_id, state, user_attrs=user_attrs):
            self.finished_states[trial_id] = self.storage.get_trial(trial_id).state.name
            return
        if policy is not None:
            self.retry_trial(trial_id, number, worker_id)

    def _sweep_dead_worker_job(
        self, pid: int, worker_id: int, reason: str, preempted: bool
    ) -> None:
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if (
                trial.user_attrs.get(tags.WORKER_PID) != pid
                or trial.user_attrs.get(tags.LAUNCH_ID) != self.launch_id
                or trial._trial_id in self.started_trials
            ):
                continue
            attrs = {
                tags.KILL_REASON: reason,
                (tags.PREEMPTED if preempted else tags.WORKER_CRASHED): True,
            }
            if end_trial_from_outside(
                self.storage, trial._trial_id, TrialState.FAIL, user_attrs=attrs
            ):
                self._late_finished.append((trial._trial_id, "FAIL"))
                _log.warning(
                    "Trial %d of worker %d (pid %d) ended FAIL: %s.",
                    trial.number,
                    worker_id,
                    pid,
                    reason,
                )
                if self.retry_policy is not None:
                    self.retry_trial(trial._trial_id, trial.number, worker_id)

    def merge_late_finished(self) -> None:
        """Trials the storage thread found and ended count toward T (merged on the loop thread)."""
        while self._late_finished:
            trial_id, state = self._late_finished.popleft()
            self.finished_states.setdefault(trial_id, state)

    def retry_trial(self, trial_id: int, number: int | None, worker_id: int | None) -> int | None:
        """Queue a retry of a trial the supervisor ended, if the retry policy wants one."""
        from optuna_guard.retries import enqueue_retry

        assert self.retry_policy is not None
        retry_number = enqueue_retry(
            self.study, self.storage.get_trial(trial_id), self.retry_policy
        )
        if retry_number is not None:
            with self._counter_lock:
                self.retries += 1
            self.emit(
                events.TRIAL_RETRIED,
                worker_id=worker_id,
                trial_number=number,
                retry_number=retry_number,
                reason=f"trial {number} re-queued as trial {retry_number}",
            )
        return retry_number

    def submit_storage_job(self, fn: Callable[..., Any], *args: Any) -> None:
        """Each job on its own daemon thread: end-of-trial writes run concurrently (one outage
        costs one deadline, not one per trial) and an abandoned retry never blocks the exit."""
        self._storage_jobs = [f for f in self._storage_jobs if not f.done()]
        self._storage_jobs.append(_shutdown.run_in_daemon(self._run_storage_job, fn, *args))

    def _end_trial_tracked(self, trial_id: int, *args: Any) -> None:
        self._pending_job_trials.add(trial_id)
        try:
            self._end_trial_job(trial_id, *args)
        finally:
            self._pending_job_trials.discard(trial_id)

    def _run_storage_job(self, fn: Callable[..., Any], *args: Any) -> None:
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

    def wait_for_storage(self, timeout: float | None = None) -> bool:
        """Wait until every queued storage write is done; False if some are still pending."""
        pending = [f for f in self._storage_jobs if not f.done()]
        if pending:
            _done, not_done = concurrent.futures.wait(pending, timeout=timeout)
            if not_done:
                return False
        self._storage_jobs = [f for f in self._storage_jobs if not f.done()]
        return True

    # ------------------------------------------------------------------ reaping
    def reap(self, now: float) -> None:
        """Collect workers that exited and act on how they ended."""
        for worker in list(self.workers):
            code = worker.proc.poll()
            if code is None:
                continue
            if worker.registered or not worker.channel.closed:
                try:
                    messages, _closed = worker.channel.feed()
                except _protocol.ProtocolError:
                    messages = []
                for message in messages:
                    self._handle_safely(worker, message)
                self._unregister(worker)
            worker.channel.close()
            self.workers.remove(worker)
            try:
                self.handle_exit(worker, int(code), now)
            finally:
                if self.cgroups is not None and self.cgroups.of(worker.pid) is not None:
                    self.cgroups.release(
                        worker.pid
                    )  # kills what the worker left in its cgroup, removes it
                else:
                    self._kill_worker_leftovers(worker)

    def exit_record(self, worker: WorkerHandle, code: int) -> _exits.ExitRecord:
        """What the supervisor knows about a reaped worker (see :mod:`._exits`)."""
        kill = worker.kill
        return _exits.ExitRecord(
            code=code,
            pid=worker.pid,
            in_trial=worker.trial_id is not None,
            ticket_without_trial=worker.ticket and worker.trial_id is None,
            kill_kind=kill.kind if kill else None,
            kill_reason=kill.reason if kill else None,
            kill_tags=dict(kill.tags) if kill else {},
            stopping=self.stopping,
            stop_reason=self.stop_reason,
            fatal_error=worker.fatal_error,
            trials_started=worker.trials_started,
            deny_reason=worker.deny_reason,
            on_kill=self.config.on_kill,
            oom_killed=self._oom_killed(worker),
            memory_limit_gb=self.config.max_worker_rss_gb,
            own_cgroup=self.cgroups is not None and self.cgroups.of(worker.pid) is not None,
            worker_id=worker.worker_id,
            available_gb=self.system.available_bytes / GB if self.system is not None else None,
            peak_rss_gb=max(worker.trial_peak_rss, worker.rss_bytes) / GB
            if worker.trial_id is not None
            else None,
        )

    def _oom_killed(self, worker: WorkerHandle) -> bool:
        """Whether the kernel OOM-killed inside the worker's own memory cgroup (False without one)."""
        cgroup = self.cgroups.of(worker.pid) if self.cgroups is not None else None
        return cgroup is not None and cgroup.oom_killed()

    def check_cgroup_ooms(self, now: float) -> None:
        """The kernel OOM-killed a process inside a live worker's cgroup (a helper, a data loader):
        its trial is over as a memory stop; the worker and everything in its cgroup go."""
        if self.cgroups is None:
            return
        for worker in self.workers:
            if worker.kill is None and self._oom_killed(worker):
                reason = (
                    f"out of memory: the kernel killed a process in worker {worker.worker_id}'s memory cgroup "
                    f"(hard limit --max-worker-rss-gb {self.config.max_worker_rss_gb:.2f} GB)"
                )
                available = self.system.available_bytes if self.system is not None else None
                self.kill_for_memory(worker, reason, "max_worker_rss_gb", available, now)

    def handle_exit(self, worker: WorkerHandle, code: int, now: float) -> None:
        """Act on how the worker ended; the decision itself is :func:`._exits.decide`."""
        decision = _exits.decide(self.exit_record(worker, code))
        outcome, reason, number = decision.outcome, decision.reason, worker.trial_number
        age = now - worker.started_at
        if decision.sweep_unreported:
            # Granted a ticket but never reported its trial: it may have died between Optuna
            # creating the trial and the objective starting. New trials carry the worker's pid
            # and launch id from their creating insert, so look for one in the storage.
            why = _policies.describe_exit(code) + " before its objective started"
            if self.stopping:
                why = f"preempted: {self.stop_reason}; {why}"
            self.submit_storage_job(
                self._sweep_dead_worker_job, worker.pid, worker.worker_id, why, self.stopping
            )
        final = None
        if decision.trial_state is not None:
            final = self.end_trial(
                worker, TrialState[decision.trial_state], dict(decision.trial_tags)
            )
        if outcome in (_exits.KILLED_FOR_MEMORY, _exits.OOM_KILLED):
            if final is not None:
                self.emit(
                    events.TRIAL_KILLED,
                    worker_id=worker.worker_id,
                    pid=worker.pid,
                    trial_number=number,
                    reason=reason,
                    state=final,
                )
            if outcome == _exits.OOM_KILLED:
                self.kills += 1
                # the same kill record as the launcher's own memory kills (event log, report)
                self.emit(
                    events.WORKER_KILLED,
                    worker_id=worker.worker_id,
                    pid=worker.pid,
                    trial_number=number,
                    reason=reason,
                    rss_gb=to_gb(worker.rss_bytes),
                    available_gb=None
                    if self.system is None
                    else to_gb(self.system.available_bytes),
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
                    self._boot_strike(worker, reason)
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
                    self.preempted += 1
                _log.info(
                    "Trial %s of worker %d ended FAIL tagged %s: %s.",
                    number,
                    worker.worker_id,
                    "preempted" if outcome == _exits.PREEMPTED else "timed_out",
                    reason,
                )
            self.emit(
                events.WORKER_EXITED,
                worker_id=worker.worker_id,
                pid=worker.pid,
                reason=reason,
                exit_code=code,
            )
        elif outcome == _exits.CRASHED_IN_TRIAL:
            self.crashes += 1
            _log.error(
                "Worker %d (pid %d) crashed under trial %s: %s; trial %s marked worker_crashed (FAIL). %s",
                worker.worker_id,
                worker.pid,
                number,
                reason,
                number,
                self._log_hint(worker),
            )
            self.emit(
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
            self.emit(
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
            self.emit(
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
            self.crashes += 1
            self.emit(
                events.WORKER_CRASHED,
                worker_id=worker.worker_id,
                pid=worker.pid,
                reason=reason,
                exit_code=code,
                age_s=round(age, 1),
            )
            if outcome == _exits.BOOT_FAILURE:
                self._boot_strike(worker, reason)
            else:
                _log.error(
                    "Worker %d (pid %d) died between trials: %s. %s",
                    worker.worker_id,
                    worker.pid,
                    reason,
                    self._log_hint(worker),
                )
        else:
            self.emit(
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

    def _boot_strike(self, worker: WorkerHandle, reason: str) -> None:
        """A worker died before its first trial by its own fault: count toward --crash-loop-limit."""
        self.boot_failures += 1
        _log.error(
            "Worker %d (pid %d) died before its first trial (%s), %d time(s) in a row. %s",
            worker.worker_id,
            worker.pid,
            reason,
            self.boot_failures,
            self._log_hint(worker),
        )
        if self.boot_failures >= self.config.crash_loop_limit:
            raise CrashLoopError(self._crash_loop_message(worker, reason))

    def on_worker_storage_unavailable(self, worker: WorkerHandle) -> None:
        """A worker that could not reach the storage within --storage-deadline at start: not a
        crash-loop strike (the database, not the worker, is at fault); a replacement retries.
        Only an outage that outlasts several deadlines in a row stops the launch."""
        self.storage_boot_failures += 1
        _log.warning(
            "Worker %d (pid %d) could not reach the storage within --storage-deadline %.0fs (%d in a row); "
            "a new worker will try again.",
            worker.worker_id,
            worker.pid,
            self.config.storage_deadline or 0,
            self.storage_boot_failures,
        )
        self.emit(
            events.WORKER_EXITED,
            worker_id=worker.worker_id,
            pid=worker.pid,
            exit_code=EXIT_WORKER_STORAGE_UNAVAILABLE,
            reason="storage unreachable at worker start",
        )
        if self.storage_boot_failures >= 2 * self.config.crash_loop_limit:
            raise StorageUnavailableError(
                f"workers could not reach the storage {self.storage_boot_failures} times in a row, "
                f"each for --storage-deadline {self.config.storage_deadline or 0:.0f}s; stopping."
            )

    def _log_hint(self, worker: WorkerHandle) -> str:
        return f"See {worker.log_path}."

    def _crash_loop_message(self, worker: WorkerHandle, reason: str) -> str:
        tail = read_log_tail(worker.log_path, LOG_TAIL_LINES)
        quoted = " | ".join(line.strip() for line in tail if line.strip())[-1500:]
        return (
            f"workers died before their first trial {self.boot_failures} times in a row (last: worker "
            f"{worker.worker_id}, {reason}); stopping instead of restarting forever. End of {worker.log_path}: {quoted}"
        )

    # ------------------------------------------------------------------ kills
    def start_kill(
        self,
        worker: WorkerHandle,
        kind: str,
        reason: str,
        user_attrs: dict[str, Any],
        now: float,
        *,
        limit: str | None = None,
        wait: float | None = None,
    ) -> None:
        """SIGTERM now (the worker is told why first), SIGKILL of the whole tree after ``wait``."""
        wait = self.config.kill_wait if wait is None else wait
        worker.kill = KillOrder(
            kind=kind,
            reason=reason,
            tags=dict(user_attrs),
            started_at=now,
            sigkill_at=now + wait,
            limit=limit,
            trial_number=worker.trial_number,
        )
        if kind == MEMORY_KILL:
            worker.channel.send(_protocol.KILL, reason=reason, tags=user_attrs)
        if wait <= 0:
            self._send_signal(worker, signal.SIGKILL, tree=True)
            worker.kill.sigkill_sent = True
        else:
            self._send_signal(worker, signal.SIGTERM, tree=True)

    def advance_kills(self, now: float) -> None:
        for worker in self.workers:
            order = worker.kill
            if (
                order is None
                and worker.denied_at is not None
                and now - worker.denied_at >= WORKER_EXIT_WAIT_S
            ):
                _log.warning(
                    "Worker %d (pid %d) has not exited %.0fs after it was told to (a non-daemon thread or "
                    "a hanging atexit handler?); killing its process tree.",
                    worker.worker_id,
                    worker.pid,
                    now - worker.denied_at,
                )
                self.start_kill(
                    worker,
                    _exits.EXIT_KILL,
                    f"did not exit within {WORKER_EXIT_WAIT_S:.0f}s after its last ticket",
                    {},
                    now,
                    wait=0,
                )
                continue
            if order is not None and not order.sigkill_sent and now >= order.sigkill_at:
                order.sigkill_sent = True
                _log.info(
                    "Worker %d (pid %d) still alive %.1fs after SIGTERM; sending SIGKILL to its process tree.",
                    worker.worker_id,
                    worker.pid,
                    now - order.started_at,
                )
                self._send_signal(worker, signal.SIGKILL, tree=True)

    def check_memory(self, now: float) -> None:
        """Measure every worker tree and the system; hard-kill at most one victim at a time."""
        self.system = self._system()
        candidates = []
        for worker in self.workers:
            worker.rss_bytes = self._tree_rss(worker.pid)
            if worker.trial_id is not None:
                worker.trial_peak_rss = max(worker.trial_peak_rss, worker.rss_bytes)
            if worker.kill is None:
                candidates.append(
                    _policies.VictimCandidate(
                        worker_id=worker.worker_id,
                        tree_rss_bytes=worker.rss_bytes,
                        in_trial=worker.trial_id is not None,
                        trial_started_at=worker.trial_started_at,
                        pid=worker.pid,
                    )
                )
        available = self.system.available_bytes if self.system else None
        self._maybe_warn(now, available)
        self._track_over_guard(candidates, now)
        if any(w.kill is not None and w.kill.kind == MEMORY_KILL for w in self.workers):
            return  # one victim at a time: wait until it is gone
        limit_gb = self.config.max_worker_rss_gb
        victim = self._guard_had_its_chance(_policies.over_limit(candidates, limit_gb), now)
        if victim is not None:
            worker = self._worker_by_pid(victim.pid)
            reason = (
                f"worker memory limit: worker {worker.worker_id} tree RSS {worker.rss_bytes / GB:.2f} GB > "
                f"{limit_gb:.2f} GB"
            )
            self.kill_for_memory(worker, reason, "max_worker_rss_gb", available, now)
            return
        min_gb = self.config.min_available_gb
        if min_gb is not None and available is not None and available < min_gb * GB:
            deficit = int(min_gb * GB) - available
            choice = _policies.choose_victim(candidates, deficit_bytes=deficit)
            if choice is None:
                self._log_memory_elsewhere(now, available, deficit)
                return
            worker = self._worker_by_pid(choice.pid)
            reason = (
                f"system memory low: {available / GB:.2f} GB available < {min_gb:.2f} GB; worker "
                f"{worker.worker_id} used the most memory (tree RSS {worker.rss_bytes / GB:.2f} GB)"
            )
            self.kill_for_memory(worker, reason, "min_available_gb", available, now)

    def _track_over_guard(self, candidates: list[_policies.VictimCandidate], now: float) -> None:
        """Since when each worker is over the in-trial guard's limit (GUARD_LIMIT_FRACTION)."""
        guard_limit = self.config.guard_trial_limit_gb
        over_guard = {
            c.pid
            for c in candidates
            if guard_limit is not None and c.tree_rss_bytes > guard_limit * GB
        }
        for pid in list(self._over_guard_since):
            if pid not in over_guard:
                del self._over_guard_since[pid]
        for pid in over_guard:
            self._over_guard_since.setdefault(pid, now)

    def _guard_had_its_chance(
        self, victim: _policies.VictimCandidate | None, now: float
    ) -> _policies.VictimCandidate | None:
        """The over-limit victim, once the in-trial guard (which stops trials at
        GUARD_LIMIT_FRACTION of the limit) had one sampling interval to stop it softly; a worker
        outside a trial has no guard to wait for."""
        if victim is None or not victim.in_trial or not self.config.guard:
            return victim
        if now - self._over_guard_since.get(victim.pid, now) >= GUARD_CHANCE_S:
            return victim
        return None

    def _log_memory_elsewhere(self, now: float, available: int, deficit: int) -> None:
        """Low memory that no worker's trial can explain: say so (every 30 s), kill nobody."""
        if (
            self._memory_elsewhere_logged_at is not None
            and now - self._memory_elsewhere_logged_at < 30.0
        ):
            return
        self._memory_elsewhere_logged_at = now
        outside = _memory_policy.describe_outside(
            _memory_policy.biggest_outside(self._launch_pids())
        )
        _log.warning(
            "System memory low (%.2f GB available, %.2f GB short of --min-available-gb) but no running "
            "trial holds a meaningful part of it; no worker is killed. Largest other processes: %s.",
            available / GB,
            deficit / GB,
            outside,
        )

    def _launch_pids(self) -> set[int]:
        pids = set()
        for worker in self.workers:
            pids.add(worker.pid)
            pids.update(_tree.descendants(worker.pid))
        return pids

    def kill_for_memory(
        self, worker: WorkerHandle, reason: str, limit: str, available: int | None, now: float
    ) -> None:
        number = worker.trial_number
        attrs = {
            tags.EMERGENCY_KILLED: True,
            tags.KILL_REASON: reason,
            tags.KILL_LIMIT: limit,
            tags.WORKER_PID: worker.pid,
            tags.PEAK_RSS_GB: to_gb(max(worker.trial_peak_rss, worker.rss_bytes)),
        }
        if available is not None:
            attrs[tags.AVAILABLE_GB_AT_KILL] = to_gb(available)
        self.kills += 1
        self.start_kill(worker, MEMORY_KILL, reason, attrs, now, limit=limit)
        trial_text = (
            f"trial {number} marked emergency_killed" if number is not None else "it ran no trial"
        )
        _log.warning(
            "Worker %d (pid %d) was killed: %s; %s.",
            worker.worker_id,
            worker.pid,
            reason,
            trial_text,
        )
        self.emit(
            events.WORKER_KILLED,
            worker_id=worker.worker_id,
            pid=worker.pid,
            trial_number=number,
            reason=reason,
            rss_gb=to_gb(worker.rss_bytes),
            available_gb=None if available is None else to_gb(available),
            limit=limit,
        )

    def _maybe_warn(self, now: float, available: int | None) -> None:
        warn_gb = self.config.warn_available_gb
        if warn_gb is None or available is None or available >= warn_gb * GB:
            self._last_warning_at = None
            return
        if self._last_warning_at is not None and now - self._last_warning_at < 30.0:
            return
        self._last_warning_at = now
        biggest = max(self.workers, key=lambda w: w.rss_bytes, default=None)
        detail = (
            f", largest worker {biggest.worker_id}: {biggest.rss_bytes / GB:.2f}GB"
            if biggest
            else ""
        )
        _log.warning(
            "System memory available %.2fGB is below the warning level %.2fGB%s.",
            available / GB,
            warn_gb,
            detail,
        )
        self.emit(
            events.MEMORY_WARNING,
            available_gb=to_gb(available),
            reason=f"available < {warn_gb:.2f} GB",
            worker_id=biggest.worker_id if biggest else None,
            rss_gb=to_gb(biggest.rss_bytes) if biggest else None,
        )

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
                self._send_signal(worker, signal.SIGTERM, tree=False)

    def check_stop(self, now: float) -> None:
        if not self.stopping or self.stop_deadline is None or now < self.stop_deadline:
            return
        for worker in self.workers:
            if worker.kill is None:
                reason = (
                    f"preempted: {self.stop_reason}; worker killed after the "
                    f"{self.config.grace_period:.0f}s grace period"
                )
                self.start_kill(
                    worker,
                    PREEMPT_KILL,
                    reason,
                    {tags.PREEMPTED: True, tags.KILL_REASON: reason, tags.WORKER_PID: worker.pid},
                    now,
                    wait=0,
                )

    def check_time_budget(self, now: float) -> None:
        if self.time_budget is None or self.stopping:
            return
        if self.time_budget.expired():
            self.begin_stop("time budget expired", now)

    # ------------------------------------------------------------------ workers
    def reconcile(self, now: float) -> None:
        """Start workers until the target count is reached (or no more trials need one)."""
        if self.stopping or self.out_of_time:
            return
        counted = [w for w in self.workers if not self._replaceable(w)]
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
            if self._memory_hold():
                self._check_memory_stall(now)
                return
            self._stall.update(now, False)
            self.spawn(now)
            return  # one worker per tick: the next start sees memory re-read (issue 10, D8)

    def _replaceable(self, worker: WorkerHandle) -> bool:
        """A worker on its way out no longer holds its slot: told to exit, or being killed for its
        own RSS while the system still has room for a replacement (which then boots during the kill)."""
        if worker.deny_reason is not None:
            return True
        if (
            worker.kill is not None
            and worker.kill.kind == MEMORY_KILL
            and worker.kill.limit == "max_worker_rss_gb"
        ):
            return not self._memory_hold()
        return False

    def _memory_hold(self) -> bool:
        """Do not start a worker unless available memory covers --min-available-gb plus a
        worker's expected footprint (and what booting workers still have to allocate)."""
        min_gb = self.config.min_available_gb
        system = self.system
        if min_gb is None or system is None:
            return False
        booting = [w.rss_bytes for w in self.workers if not w.ready and w.kill is None]
        low = not self.start_gate.may_start(system.available_bytes, int(min_gb * GB), booting)
        if low and not self._memory_hold_logged:
            _log.warning(
                "Not starting a worker: available memory %.2f GB does not cover --min-available-gb %.2f GB "
                "plus a worker's footprint %.2f GB%s.",
                system.available_bytes / GB,
                min_gb,
                self.start_gate.footprint / GB,
                f" and {len(booting)} booting worker(s)" if booting else "",
            )
        self._memory_hold_logged = low
        return low

    def _check_memory_stall(self, now: float) -> None:
        """No trial runs, no worker boots and none may start: after --memory-stall-timeout the
        memory is held outside the study; stop with exit code 4 and say by what."""
        progressing = any(w.busy or not w.ready for w in self.workers if w.kill is None)
        stalled_for = self._stall.update(now, not progressing)
        timeout = self.config.memory_stall_timeout
        if timeout is None or stalled_for < timeout:
            return
        available = self.system.available_bytes / GB if self.system else float("nan")
        outside = _memory_policy.describe_outside(
            _memory_policy.biggest_outside(self._launch_pids())
        )
        raise MemoryStallError(
            f"memory held outside the study: for {stalled_for:.0f}s no worker could start (available {available:.2f} GB, "
            f"needed --min-available-gb {self.config.min_available_gb:.2f} GB + a worker's "
            f"{self.start_gate.footprint / GB:.2f} GB); largest other processes: {outside}"
        )

    def spawn(self, now: float) -> WorkerHandle:
        slot = self._take_slot()
        spawn_index = self._next_spawn_index
        self._next_spawn_index += 1
        parent_sock, child_sock = _protocol.socket_pair()
        settings = WorkerSettings(
            worker_id=slot,
            spawn_index=spawn_index,
            objective=self.config.objective,
            study_name=self.config.study_name,
            storage=self.storage_url,
            sampler=self.config.sampler,
            pruner=self.config.pruner,
            seed=self.config.seed,
            heartbeat_interval=self.config.heartbeat_interval,
            heartbeat_grace=self.config.heartbeat_grace,
            connect_timeout=self.config.connect_timeout,
            guard=self.config.guard,
            gc_after_trial=self.config.gc_after_trial,
            on_kill=self.config.on_kill,
            retry=self.config.retry,
            retry_on=self.config.retry_on,
            retry_shrink=self.config.retry_shrink,
            storage_deadline=self.config.storage_deadline,
            launch_id=self.launch_id,
            supervisor_pid=os.getpid(),
            grace_period=self.config.grace_period,
            max_preemptions=self.config.max_preemptions,
        )
        env = self.config.python_env()
        env.update(
            _threads.thread_env(self.config.workers, env)
        )  # cores // workers, unless the user set them
        env.update(self.config.guard_env())
        own_cgroup = self.cgroups.directory_for(spawn_index) if self.cgroups is not None else None
        if own_cgroup is not None:
            # The worker's own cgroup (limit --max-worker-rss-gb) is not "system memory": its
            # guard's probe skips it and reads the ancestors and the host (issue 10 chaos finding).
            env[ENV_SKIP_CGROUP] = own_cgroup
        env.update(settings.to_env())
        env[_protocol.ENV_FD] = str(child_sock.fileno())
        env["PYTHONUNBUFFERED"] = "1"
        env[_lifeline.ENV_LAUNCH_ID] = (
            self.launch_id
        )  # inherited by every descendant: found in /proc/*/environ
        env[_lifeline.ENV_WORKER_MARK] = f"{self.launch_id}/{spawn_index}"
        log_path = os.path.join(self.config.log_dir, f"worker_{slot}.log")
        try:
            proc = self._spawn_process(env, log_path, child_sock.fileno(), slot, spawn_index)
        finally:
            child_sock.close()
        channel = _protocol.Channel(parent_sock)
        worker = WorkerHandle(
            worker_id=slot,
            spawn_index=spawn_index,
            proc=proc,
            channel=channel,
            log_path=log_path,
            started_at=now,
            age_limit=_policies.jittered_age_limit(
                self.config.max_worker_age, self.config.max_worker_age_jitter
            ),
        )
        self.workers.append(worker)
        self.all_pids.add(worker.pid)
        if self.cgroups is not None:
            self.cgroups.attach(worker.pid, spawn_index)
        self.selector.register(parent_sock, selectors.EVENT_READ, worker)
        worker.registered = True
        self.worker_starts += 1
        self.emit(events.WORKER_STARTED, worker_id=slot, pid=worker.pid, spawn_index=spawn_index)
        _log.info("Worker %d started (pid %d, log %s).", slot, worker.pid, log_path)
        return worker

    def _take_slot(self) -> int:
        used = {w.worker_id for w in self.workers if not self._replaceable(w)}
        for slot in range(1, self.config.workers + 1):
            if slot not in used:
                return slot
        return self.config.workers + 1  # pragma: no cover - reconcile never asks for more

    def _make_cgroups(self) -> _cgroups.WorkerCgroups | None:
        """Per-worker memory cgroups where writable, else the process-tree fallback; the mode is
        logged and emitted. None when a test probe stands in for the OS."""
        if self.probe is not None:
            return None
        limit = self.config.max_worker_rss_gb
        cgroups = _cgroups.WorkerCgroups(
            self.launch_id,
            None if limit is None else int(limit * GB),
            enabled=os.environ.get(_cgroups.ENV_SWITCH, "1") != "0",
        )
        _log.info("Worker memory: %s.", cgroups.describe())
        return cgroups

    def _start_heartbeat(self) -> Any:
        """The supervisor's heartbeat thread (lease, Optuna heartbeats, lost-trial sweep) on a
        storage of its own; None when heartbeats are off."""
        from optuna_guard.supervisor._heartbeat import SupervisorHeartbeat
        from optuna_guard.supervisor._study import open_checked_storage

        interval = self.config.heartbeat_interval
        if interval is None:
            return None
        storage = open_checked_storage(
            self.storage_url,
            connect_timeout=self.config.connect_timeout,
            heartbeat_interval=self.config.heartbeat_interval,
            heartbeat_grace=self.config.heartbeat_grace,
            skip_setup=True,
            deadline_s=self.config.storage_deadline,
        )

        def count_retry() -> None:
            with self._counter_lock:
                self.retries += 1

        def start() -> SupervisorHeartbeat:
            return SupervisorHeartbeat(
                storage,
                self.config.study_name,
                self.launch_id,
                interval,
                self.config.heartbeat_grace or 2 * interval,
                retry_policy=self.retry_policy,
                emit=self.emit,
                on_retried=count_retry,
            ).start()

        if self.config.storage_deadline is None:
            return start()
        from optuna_guard.resilience import RetrySettings, call_with_retry

        # load_study and the first beat query the database: a dropped connection at start-up is
        # ridden out like every other storage call (issue 10)
        return call_with_retry(
            start,
            settings=RetrySettings(deadline_s=self.config.storage_deadline),
            what="starting the supervisor heartbeat",
        )

    def _spawn_process(
        self, env: dict[str, str], log_path: str, child_fd: int, slot: int, spawn_index: int
    ) -> Any:
        """The one place that starts a process (own session, so its whole tree can be signalled)."""
        with open(log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(
                f"===== optuna-guard worker {slot} (start #{spawn_index}) at {stamp} =====\n".encode()
            )
            log.flush()
            return subprocess.Popen(
                [sys.executable, "-m", "optuna_guard.supervisor._worker"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(child_fd,),
                start_new_session=True,
                close_fds=True,
            )

    def _send_signal(self, worker: WorkerHandle, sig: int, *, tree: bool) -> None:
        """Signal the worker, or its whole process tree (its process group plus any descendant
        that left the group)."""
        pid = worker.pid
        if not tree:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            return
        descendants = _tree.descendants(pid)
        marked = _tree.pids_with_env(
            f"{_lifeline.ENV_WORKER_MARK}={self.launch_id}/{worker.spawn_index}".encode()
        )
        descendants.extend(
            p for p in marked if p not in descendants
        )  # daemonised ones left the tree
        cgroup = self.cgroups.of(pid) if self.cgroups is not None else None
        if cgroup is not None:
            descendants.extend(p for p in cgroup.pids() if p not in descendants and p != pid)
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for child in descendants:
            try:
                if os.getpgid(child) != pid:
                    os.kill(child, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _unregister(self, worker: WorkerHandle) -> None:
        if worker.registered:
            try:
                self.selector.unregister(worker.channel.sock)
            except (KeyError, ValueError):
                pass
            worker.registered = False

    def _worker_by_pid(self, pid: int) -> WorkerHandle:
        for worker in self.workers:
            if worker.pid == pid:
                return worker
        raise KeyError(pid)

    def _tree_rss(self, pid: int) -> int:
        if self.probe is not None:
            return int(self.probe.process_tree_rss(pid))
        cgroup = self.cgroups.of(pid) if self.cgroups is not None else None
        if cgroup is not None:  # every process in the worker's cgroup, daemonised or not
            return cgroup.working_set()
        return _tree.tree_rss_bytes(pid)

    def _system(self) -> SystemMemory | None:
        try:
            return (self.probe or default_probe()).system()
        except Exception as exc:  # pragma: no cover - a probe failure must not stop the launch
            _log.debug("memory probe failed: %s", exc)
            return None

    # ------------------------------------------------------------------ reporting
    def progress(self, now: float) -> Progress:
        states = list(self.finished_states.values())
        finished = len(states)
        elapsed = now - self._started
        eta = None
        target = self.config.n_trials
        if target is not None and finished and elapsed > 0:
            eta = (target - finished) * elapsed / finished
        return Progress(
            target=target,
            finished=finished,
            running=sum(1 for w in self.workers if w.trial_id is not None),
            complete=states.count("COMPLETE"),
            pruned=states.count("PRUNED"),
            failed=states.count("FAIL"),
            killed=self.kills,
            crashed=self.crashes,
            recycles=self.recycles,
            workers=len(self.workers),
            available_gb=None if self.system is None else self.system.available_bytes / GB,
            eta_s=eta,
        )

    def report(self, now: float) -> None:
        self.display.update(self.progress(now))
        if now >= self._next_sample:
            self._next_sample = now + self.config.memory_sample_interval
            self.emit_memory_sample()
        if now >= self._next_status:
            self._next_status = now + self.config.status_interval
            self.log_status(now)

    def emit_memory_sample(self) -> None:
        system = self.system
        self.emit(
            events.MEMORY_SAMPLE,
            available_gb=None if system is None else to_gb(system.available_bytes),
            total_gb=None if system is None else to_gb(system.total_bytes),
            used_percent=None if system is None else round(system.percent, 1),
            workers=[
                {
                    "worker_id": w.worker_id,
                    "pid": w.pid,
                    "rss_gb": to_gb(w.rss_bytes),
                    "trial_number": w.trial_number,
                }
                for w in self.workers
            ],
        )

    def status_lines(self, now: float) -> list[str]:
        lines = []
        for worker in sorted(self.workers, key=lambda w: (w.worker_id, w.spawn_index)):
            lines.append(
                worker_status_line(
                    worker.worker_id,
                    worker.pid,
                    self._health(worker),
                    now - worker.started_at,
                    worker.age_limit,
                    worker.rss_bytes,
                )
            )
        lines.append(self.progress(now).line())
        return lines

    def log_status(self, now: float) -> None:
        for line in self.status_lines(now):
            _log.info("%s", line)
        self.emit(
            events.STATUS,
            reason=self.progress(now).line(),
            available_gb=None if self.system is None else to_gb(self.system.available_bytes),
            workers=[
                {
                    "worker_id": w.worker_id,
                    "pid": w.pid,
                    "health": self._health(w),
                    "rss_gb": to_gb(w.rss_bytes),
                    "age_s": round(now - w.started_at, 1),
                    "trial_number": w.trial_number,
                }
                for w in self.workers
            ],
        )

    def check_trial_timeouts(self, now: float) -> None:
        """--trial-timeout: tell the worker to stop its trial (tags first, FAIL), SIGKILL its tree
        after the grace period if it did not (a stopped or deadlocked worker cannot answer)."""
        timeout = self.config.trial_timeout
        if timeout is None:
            return
        for worker in self.workers:
            started = worker.trial_started_at
            if (
                started is None
                or worker.kill is not None
                or not _hung.is_overdue(started, now, timeout)
            ):
                continue
            reason, attrs = _hung.timeout_tags(
                worker.trial_number,
                now - started,
                timeout,
                _tree.process_state(worker.pid),
                worker.pid,
            )
            worker.kill = KillOrder(
                kind=_exits.TIMEOUT_KILL,
                reason=reason,
                tags=attrs,
                started_at=now,
                sigkill_at=now + self.config.grace_period,
                trial_number=worker.trial_number,
            )
            worker.channel.send(_protocol.KILL, reason=reason, tags=attrs, state="FAIL")
            _log.warning(
                "Worker %d (pid %d): %s; it gets %.0fs to stop the trial before it is killed.",
                worker.worker_id,
                worker.pid,
                reason,
                self.config.grace_period,
            )
            self.emit(
                events.TRIAL_KILLED,
                worker_id=worker.worker_id,
                pid=worker.pid,
                trial_number=worker.trial_number,
                reason=reason,
                state="FAIL",
            )

    def _hang_note(self, worker: WorkerHandle, now: float) -> str | None:
        cpu = _tree.cpu_ticks(worker.pid)
        if cpu != worker.cpu_ticks or worker.cpu_changed_at is None:
            worker.cpu_ticks, worker.cpu_changed_at = cpu, now
        idle = now - worker.cpu_changed_at if cpu is not None else None
        return _hung.health_note(
            _tree.process_state(worker.pid), idle, worker.trial_id is not None
        )

    def _health(self, worker: WorkerHandle) -> str:
        note = self._hang_note(worker, self.clock()) if self.probe is None else None
        if note is not None:
            return note
        if worker.kill is not None:
            return "killing"
        if self.stopping:
            return "stopping"
        if worker.deny_reason is not None:
            return "recycling" if worker.recycled else "exiting"
        if not worker.ready:
            return "starting"
        recycle = self.config.recycle_worker_rss_gb
        if recycle is not None and worker.rss_bytes > recycle * GB:
            return "high-memory"
        return "healthy"

    def emit(self, event: str, **fields: Any) -> None:
        if self.event_log is not None:
            try:
                self.event_log.emit(event, **fields)
            except (OSError, ValueError) as exc:  # a full disk must not stop the launch
                _log.debug("event log write failed: %s", exc)

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            _log.debug(
                "launch() runs outside the main thread; signals are not handled by the launcher."
            )
            return
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, None)
        self._old_wakeup_fd = signal.set_wakeup_fd(
            self._wakeup_w.fileno(), warn_on_full_buffer=False
        )
        for signum in (
            signal.SIGINT,
            signal.SIGTERM,
            signal.SIGHUP,
            signal.SIGUSR1,
        ):  # SIGHUP: ssh disconnect
            self._old_handlers[signum] = signal.signal(signum, self._enqueue_signal)

    def _enqueue_signal(self, signum: int, _frame: Any) -> None:
        self.signal_queue.put_nowait(signum)  # only enqueue: logging here can deadlock

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers.clear()
        if self._wakeup_w is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd if self._old_wakeup_fd is not None else -1)
            self._wakeup_w.close()
            if self._wakeup_r is not None:
                self._wakeup_r.close()
            self._wakeup_r = self._wakeup_w = None

    def _drain_wakeup(self) -> None:
        try:
            while self._wakeup_r is not None and self._wakeup_r.recv(512):
                pass
        except (BlockingIOError, OSError):
            pass

    def handle_signals(self) -> None:
        """Act on queued signals in the loop (never inside the handler)."""
        while True:
            try:
                signum = self.signal_queue.get_nowait()
            except queue.Empty:
                return
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
                self.skip_storage = True
                self.stop_deadline = now
                self.check_stop(now)

    # ------------------------------------------------------------------ shutdown
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
                        tags={tags.PREEMPTED: True, tags.KILL_REASON: why},
                        started_at=self.clock(),
                        sigkill_at=self.clock(),
                    )
                self._send_signal(worker, signal.SIGKILL, tree=True)
            while self.workers and self.clock() < deadline:
                try:
                    self.reap(self.clock())
                except CrashLoopError:
                    pass
                if self.workers:
                    time.sleep(0.02)
        self._kill_launch_leftovers()
        if self.cgroups is not None:
            self.cgroups.close()
        self.finish_storage_work(reason)
        self.merge_late_finished()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.emit(
            events.LAUNCH_FINISHED,
            reason=reason,
            exit_code=self.exit_code,
            finished=len(self.finished_states),
        )

    def _kill_worker_leftovers(self, worker: WorkerHandle) -> None:
        """Process-tree mode: SIGKILL what a reaped worker left behind (a loky/multiprocessing
        pool it did not shut down, a daemonised helper), found by the worker's env marker."""
        marker = f"{_lifeline.ENV_WORKER_MARK}={self.launch_id}/{worker.spawn_index}".encode()
        left = _tree.pids_with_env(marker)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if left:
            _log.info(
                "Worker %d (pid %d) left %d process(es) behind; killed: %s.",
                worker.worker_id,
                worker.pid,
                len(left),
                ", ".join(map(str, left)),
            )

    def _kill_launch_leftovers(self) -> None:
        """SIGKILL any process still carrying this launch's marker (a daemonised grandchild)."""
        for pid in _tree.pids_with_env(f"{_lifeline.ENV_LAUNCH_ID}={self.launch_id}".encode()):
            try:
                os.kill(pid, signal.SIGKILL)
                _log.warning(
                    "Process %d of this launch outlived its worker (daemonised?); killed.", pid
                )
            except (ProcessLookupError, PermissionError):
                pass

    def storage_deadline_at_exit(self) -> float:
        """The clock time by which the exit's storage work must be done (one overall deadline)."""
        if self.exit_deadline is not None:
            return max(self.exit_deadline - _shutdown.EXIT_SLACK_S, self.clock() + 1.0)
        return self.clock() + _shutdown.storage_allowance(self.config.storage_deadline)

    def storage_interrupted(self) -> bool:
        """A further SIGTERM/SIGINT during the exit (or one already seen) skips the storage work."""
        while not self.skip_storage:
            try:
                signum = self.signal_queue.get_nowait()
            except queue.Empty:
                break
            if signum in (signal.SIGTERM, signal.SIGINT):
                _log.warning(
                    "%s during the exit: skipping the remaining storage writes.",
                    signal.Signals(signum).name,
                )
                self.skip_storage = True
        return self.skip_storage

    def finish_storage_work(self, reason: str) -> None:
        """End-of-trial writes and the RUNNING sweep, within the exit deadline; whatever cannot
        be done is named (those trials stay RUNNING for the next launch or the heartbeat)."""
        deadline = self.storage_deadline_at_exit()
        done = _shutdown.wait_until(
            self._storage_jobs, deadline, self.storage_interrupted, self.clock
        )
        if done:
            done, _ = _shutdown.bounded_call(
                lambda: self.sweep_running(reason), deadline, self.storage_interrupted, self.clock
            )
        if done:
            return
        self.storage_abandoned = True
        maybe_running = sorted(
            number
            for trial_id, number in self.started_trials.items()
            if trial_id not in self.finished_states or trial_id in self._pending_job_trials
        )
        why = "a second signal" if self.skip_storage else "the exit deadline"
        _log.error(
            "Storage work skipped (%s): trial(s) %s may stay RUNNING until the next launch or Optuna's "
            "heartbeat check ends them.",
            why,
            ", ".join(map(str, maybe_running)) or "none known",
        )
        self.emit(
            events.STORAGE_OUTAGE,
            outage="abandoned",
            source="supervisor",
            trials=maybe_running,
            reason=f"storage work at exit skipped ({why})",
        )

    def sweep_running(self, reason: str) -> None:
        """A last look in the storage: RUNNING trials of this launch's workers get FAIL."""
        try:
            running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except Exception as exc:
            _log.error("Could not check the storage for RUNNING trials at exit: %s", exc)
            return
        for trial in running:
            ours = (
                trial._trial_id in self.started_trials
                or trial.user_attrs.get(tags.LAUNCH_ID) == self.launch_id
            )
            if not ours:
                continue
            why = f"launcher stopped: {reason}"
            attrs: dict[str, Any] = {tags.KILL_REASON: why}
            if self.stopping:
                attrs[tags.PREEMPTED] = True
            else:
                attrs[tags.WORKER_CRASHED] = True
            try:
                if end_trial_from_outside(
                    self.storage, trial._trial_id, TrialState.FAIL, user_attrs=attrs
                ):
                    self.finished_states.setdefault(trial._trial_id, "FAIL")
                    _log.warning(
                        "Trial %d was still RUNNING at exit; ended FAIL (%s).", trial.number, why
                    )
            except Exception as exc:
                _log.error("Could not end trial %d: %s", trial.number, exc)

    # ------------------------------------------------------------------ summary data
    def median_duration(self) -> float | None:
        return statistics.median(self.durations) if self.durations else None


def read_log_tail(path: str, lines: int) -> list[str]:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(size - 16384, 0))
            data = handle.read().decode("utf-8", "replace")
    except OSError:
        return []
    return data.splitlines()[-lines:]
