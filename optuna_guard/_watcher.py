"""The memory watcher: one background thread per process watching every running guarded trial.

Why one thread for the whole process rather than one per trial: with ``study.optimize(n_jobs=2)``
two trials share one process, so a process-level reading (tree RSS, available RAM) trips both
at once; one thread sees both and stops one victim at a time (the trial whose thread touched
the most new memory since it started, by its minor page faults), like the launcher does for
workers. It also keeps the per-trial cost to a list append, and the thread sleeps on an Event
(no CPU) while no guarded trial runs.

The guard uses it through one context manager, as Optuna uses its heartbeat thread::

    with WATCHER.watch(trial, limits, probe) as watch:
        value = watch.run(objective, *args, **kwargs)
    if watch.stopped: ...   # the watcher stopped the objective: end the trial as a memory stop

How a trial is stopped mid-split: the watcher raises an internal exception inside the trial's
thread with ``PyThreadState_SetAsyncExc``. It is delivered at the next Python bytecode of that
thread (a long native call - a big matmul, ``time.sleep`` - finishes first). It is only injected
while the trial's own code runs (not inside optuna, SQLAlchemy, logging, threading or
optuna-guard code, where an exception could leave a lock or a transaction half done; the
watcher retries every few milliseconds), and under the watch's lock: ``watch.run`` takes the
same lock to mark the trial finished and makes an exception that was not delivered yet go off
inside its own ``try``, so it can never leak into Optuna or the next trial.

It keeps trying: an objective that catches the interrupt and goes on while still over the
limit is interrupted again, one interval after each delivery. A trial that stays over its limit
for ``stuck_after`` seconds without stopping (it swallows every interrupt, its thread waits on a
Future/Queue/Event, or sits in one long native call) is handed to ``on_stuck``: ``"exit"`` tags
the trial, ends it FAIL in the storage and leaves the process with ``os._exit`` (a live machine
is worth more than this process), ``"warn"`` logs and lets it run (the launcher's hard kill is
the backstop).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from optuna_guard import preemption, tags
from optuna_guard._logging import get_logger
from optuna_guard._peak import reset_own_peak
from optuna_guard._trips import (
    Trip,
    below_warning,
    find_trip,
    headroom_and_rate,
    headroom_bytes,
    relaxed_interval,
)
from optuna_guard._units import GB, to_gb
from optuna_guard.limits import MemoryLimits
from optuna_guard.memory import GpuMemory, MemoryProbe, SystemMemory
from optuna_guard.memory._tree import minor_faults, own_minor_faults

_log = get_logger(__name__)

OnStuck = Literal["exit", "warn"]

# Fastest sampling when a limit is about to be reached, and while an interrupt waits for a
# safe point.
MIN_INTERVAL_S = 0.005
# Default seconds over the limit with no effect before ``on_stuck`` decides.
STUCK_AFTER_S = 5.0
# Exit status of a process that the guard ended because a trial could not be stopped
# (EX_SOFTWARE + 1; the launcher's workers use 0, 1, 70 and 99).
EXIT_STUCK = 71
# Environment variables that mark a process as a worker of ``optuna-guard run``.
LAUNCHER_ENV_VARS = ("OPTUNA_GUARD_LAUNCH_ID", "OPTUNA_GUARD_WORKER_FD")

_UNSAFE_MODULES = (
    "optuna",
    "sqlalchemy",
    "logging",
    "threading",
    "importlib",
    "concurrent",
    "contextlib",
    "queue",
)
# Modules where a trial thread that cannot be interrupted is waiting for another thread.
_WAIT_MODULES = ("threading", "concurrent", "queue", "multiprocessing", "asyncio")

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)
_set_async_exc.restype = ctypes.c_int

_local = threading.local()  # .watch: the TrialWatch whose objective this thread runs

INTERRUPT_TRIP = "trip"
INTERRUPT_PREEMPT = "preempt"


def under_launcher(environ: Any = None) -> bool:
    """Whether this process is a worker of ``optuna-guard run`` (whose supervisor kills it)."""
    environ = os.environ if environ is None else environ
    return any(environ.get(name) for name in LAUNCHER_ENV_VARS)


def default_on_stuck() -> OnStuck:
    """``"warn"`` under the launcher (it replaces a worker it kills), else ``"exit"``."""
    return "warn" if under_launcher() else "exit"


class _GuardInterrupt(BaseException):
    """Raised inside a trial's thread by the watcher. A BaseException, so that an objective's
    ``except Exception`` does not swallow it; the guard turns it into TrialPruned, a FAIL or
    TrialPreempted before Optuna sees it."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        watch = getattr(_local, "watch", None)  # runs in the interrupted thread
        if watch is not None:
            watch.deliveries += 1
            watch.delivered_at = time.monotonic()


def interrupt_in_chain(exc: BaseException | None) -> bool:
    """Whether ``exc`` is the guard's interrupt or wraps it (``raise X from exc`` or raised
    while handling it), as training frameworks do with errors from the loop they run."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, _GuardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _absorb_pending_interrupt() -> bool:
    """Let an injected but not yet delivered interrupt go off here, harmlessly.

    ``PyThreadState_SetAsyncExc(id, NULL)`` would drop it, but on CPython 3.11 it leaves the
    interpreter's "async exception pending" flag set for good, so every thread would take the
    eval loop's slow path from then on (and a profiled thread can spin forever). Instead we run
    a few bytecodes: the interpreter checks for pending asynchronous exceptions on backward
    jumps, so a pending interrupt is raised inside this ``try``.
    """
    try:
        for _ in range(16):
            pass
    except _GuardInterrupt:
        return True
    return False


class TrialWatch:
    """What the watcher knows about one running guarded trial; created in the trial's thread.

    A context manager: entering registers it with the watcher, leaving unregisters it; the
    objective runs inside :meth:`run`, the only place an interrupt can arrive.
    """

    def __init__(
        self,
        *,
        number: int,
        limits: MemoryLimits,
        probe: MemoryProbe,
        trial: Any = None,
        on_stuck: OnStuck | None = None,
        stuck_after: float = STUCK_AFTER_S,
        watcher: MemoryWatcher | None = None,
        frame_id: int | None = None,
    ) -> None:
        self.number = number
        self.limits = limits
        self.probe = probe
        self.trial = trial
        self.on_stuck: OnStuck = on_stuck or default_on_stuck()
        self.stuck_after = stuck_after
        self._watcher = watcher if watcher is not None else WATCHER
        self.frame_id = frame_id  # id() of run()'s frame: frames above it are the objective's
        self.thread_id = threading.get_ident()
        self.native_id = threading.get_native_id()
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.active = True
        self.peak_rss_bytes = 0

    # The rest of the state starts at these class-level defaults and is set on the instance
    # only when it changes (most trials never change it: less work per trial).
    interrupt: tuple[str, Trip | None] | None = None  # decided: (kind, trip)
    # Alone in its process with real readings: the watcher resets the process's high-water mark
    # at its first reading of the trial (see optuna_guard._peak), so trials shorter than one
    # interval pay nothing for it.
    own_peak_wanted = False
    own_peak_reset = False
    injections = 0
    injected_at: float | None = None
    deliveries = 0  # counted in the trial's thread when an interrupt goes off
    delivered_at: float | None = None
    ended_by_interrupt = False  # run() caught the interrupt as it left the objective
    absorbed = False  # injected, but the trial's code had finished: its result stands
    over_since: float | None = None  # over the limit since (while an interrupt is decided)
    stuck_handled = False
    helpers_interrupted: frozenset[int] | set[int] = frozenset()  # pool threads interrupted for it
    pending_warned = False
    caught_warned = False
    warned = False
    min_available_bytes: int | None = None
    available_at_trip: int | None = None
    peak_gpu_bytes: int | None = None
    fault_base: int | None = None  # page faults when a second trial joined (see register)
    registered = False

    # -- in the trial's thread ----------------------------------------------------------------

    def __enter__(self) -> TrialWatch:
        self._watcher.register(self)
        return self

    def __exit__(self, *_exc_info: object) -> None:
        self.finish()

    def others(self) -> int:
        """Other guarded trials running in this process now."""
        return self._watcher.active_count() - (1 if self.registered else 0)

    def run(self, objective: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call the objective; an interrupt that reaches it (directly) returns None with
        :attr:`stopped` set. Other exceptions propagate (see :meth:`stopped_by`)."""
        self.frame_id = id(sys._getframe())
        _local.watch = self
        try:
            try:
                return objective(*args, **kwargs)
            finally:
                self.finish()
        except _GuardInterrupt as exc:
            self.finish()
            self.ended_by_interrupt = True
            self.deliveries = max(self.deliveries, 1)  # it may have come through a pool's Future
            _release_frames(exc)
            return None
        finally:
            _local.watch = None

    def finish(self) -> None:
        """Mark the trial's code finished (idempotent). After this no interrupt can arrive.

        An interrupt injected but not yet delivered goes off inside this method (the trial's
        code had finished: its result stands). If it goes off before the ``try`` that absorbs
        it, it propagates from here; :meth:`run` calls this inside the ``try`` that catches it
        and calls it again.
        """
        if not self.active and not self.registered:
            return
        with self.lock:
            was_active = self.active
            self.active = False
        if was_active and self.injections > self.deliveries and _absorb_pending_interrupt():
            self.deliveries -= 1  # counted by the exception itself
            self.absorbed = True
        if self.registered:
            self._watcher.unregister(self)
            self.registered = False

    @property
    def stopped(self) -> bool:
        """An interrupt reached the trial's code (the trial is stopped, not finished)."""
        return self.deliveries > 0

    @property
    def stopped_for_memory(self) -> bool:
        return (
            self.stopped and self.interrupt is not None and self.interrupt[0] != INTERRUPT_PREEMPT
        )

    def stopped_by(self, exc: BaseException) -> bool:
        """Whether an exception that left the objective is (or wraps) the watcher's interrupt."""
        return self.interrupt is not None and (interrupt_in_chain(exc) or self.stopped)

    # -- in the watcher's thread --------------------------------------------------------------

    @property
    def injected(self) -> bool:
        return self.injections > 0

    @property
    def pending(self) -> bool:
        """An interrupt was injected and has not gone off yet."""
        return self.injections > self.deliveries

    def observe(
        self, system: SystemMemory | None, rss_bytes: int | None, gpus: Sequence[GpuMemory] = ()
    ) -> None:
        if rss_bytes is not None and rss_bytes > self.peak_rss_bytes:
            self.peak_rss_bytes = rss_bytes
        if system is not None and (
            self.min_available_bytes is None or system.available_bytes < self.min_available_bytes
        ):
            self.min_available_bytes = system.available_bytes
        if gpus:
            used = max(g.used_bytes for g in gpus)
            if self.peak_gpu_bytes is None or used > self.peak_gpu_bytes:
                self.peak_gpu_bytes = used

    def try_inject(self, kind: str, trip: Trip | None) -> bool:
        """Decide to stop this trial, and inject now if it is safe and none is pending."""
        with self.lock:
            if not self.active or self.pending:
                return False
            if self.interrupt is None:
                self.interrupt = (kind, trip)
            if self.frame_id is None or not _at_safe_point(self.thread_id, self.frame_id):
                return False
            if _set_async_exc(self.thread_id, ctypes.py_object(_GuardInterrupt)) != 1:
                return False  # 0: no such thread (it cannot be: the trial is active), nothing set
            self.injections += 1
            self.injected_at = time.monotonic()
            return True


def _release_frames(exc: BaseException) -> None:
    """Free the locals of the objective's finished frames now (the big arrays of a stopped
    trial), instead of when a full collection breaks the frame/exception cycle."""
    import traceback

    traceback.clear_frames(exc.__traceback__)


def _top_frames(thread_id: int, frame_id: int | None) -> list[Any]:
    """The trial thread's frames from the top down to (excluding) run()'s frame."""
    frame = sys._current_frames().get(thread_id)
    frames = []
    while frame is not None and id(frame) != frame_id:
        frames.append(frame)
        frame = frame.f_back
    return frames


def _module_root(frame: Any) -> str:
    return str(frame.f_globals.get("__name__", "")).partition(".")[0]


def _at_safe_point(thread_id: int, frame_id: int) -> bool:
    """True when the trial's thread runs the objective's own code (not library internals).

    run()'s frame must be on the stack but not on top: there it is outside the ``try`` that
    catches the interrupt, so an interrupt there would escape into Optuna.
    """
    frame = sys._current_frames().get(thread_id)
    if frame is None or id(frame) == frame_id:
        return False
    while frame is not None:
        if id(frame) == frame_id:
            return True
        root = _module_root(frame)
        if root in _UNSAFE_MODULES or root == "optuna_guard":
            return False
        frame = frame.f_back
    return False  # run() is not on the stack: the trial is not running there


def _code_name(frame: Any) -> str:
    return str(getattr(frame.f_code, "co_qualname", frame.f_code.co_name))


def _where_blocked(watch: TrialWatch) -> str:
    """Why an interrupt has no effect, in words, from the trial thread's top frames."""
    frames = _top_frames(watch.thread_id, watch.frame_id)
    if not frames:
        return "it is not running Python code"
    top = frames[0]
    for frame in frames:
        root = _module_root(frame)
        if root in _WAIT_MODULES:
            return (
                f"its thread waits in {frame.f_globals.get('__name__', root)}."
                f"{_code_name(frame)}() for another "
                "thread (a thread pool's Future, a Queue or an Event), which cannot be interrupted"
            )
    if watch.deliveries:
        return f"it caught the interrupt {watch.deliveries} time(s) and went on"
    return f"it has not returned to Python code since {top.f_code.co_name}() called native code"


def _interrupt_pool_helpers(watch: TrialWatch) -> bool:
    """The trial's thread waits for a thread pool (``pool.submit(f).result()``) and cannot be
    interrupted; interrupt the pool threads that run user code instead. Their work item ends
    with the interrupt, the Future hands it to the trial's thread, and the trial ends as a
    memory stop. Only while this is the process's one guarded trial (the pool is then its),
    and only threads whose user code was called by ``concurrent.futures`` (its work items
    catch every exception into their Future). Returns whether one was interrupted."""
    if not _top_frames(watch.thread_id, watch.frame_id) or not _waits_for_another_thread(watch):
        return False
    hit = False
    own = {watch.thread_id, threading.get_ident()}
    for ident, frame in sys._current_frames().items():
        if ident in own or ident in watch.helpers_interrupted or not _runs_pool_work_item(frame):
            continue
        if _set_async_exc(ident, ctypes.py_object(_GuardInterrupt)) == 1:
            watch.helpers_interrupted = {*watch.helpers_interrupted, ident}
            hit = True
            _log.warning(
                "Trial #%d waits for a thread pool; "
                "interrupting the pool thread %d that runs its work.",
                watch.number,
                ident,
            )
    return hit


def _waits_for_another_thread(watch: TrialWatch) -> bool:
    return any(
        _module_root(f) in _WAIT_MODULES for f in _top_frames(watch.thread_id, watch.frame_id)
    )


def _runs_pool_work_item(frame: Any) -> bool:
    """User code on top, called by ``concurrent.futures.thread``'s work item ``run``."""
    if frame is None:
        return False
    first = True
    while frame is not None:
        root = _module_root(frame)
        if root in _UNSAFE_MODULES or root == "optuna_guard":
            name = frame.f_globals.get("__name__", "")
            return (
                not first and name == "concurrent.futures.thread" and frame.f_code.co_name == "run"
            )
        first = False
        frame = frame.f_back
    return False


class MemoryWatcher:
    """The process-wide watcher thread (started on the first guarded trial).

    A trial is first sampled one ``interval`` after it started (the guard reads memory itself
    at the start and the end of every trial, so a trial shorter than that costs the watcher
    nothing). Between trials the thread polls its list every ``interval``; after
    ``IDLE_BLOCK_S`` without any trial it blocks on an Event until the next one registers, so
    short back-to-back trials never pay for waking it up.
    """

    IDLE_BLOCK_S = 5.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._watches: list[TrialWatch] = []
        self._thread: threading.Thread | None = None
        self._blocked = False
        # recent readings per probe, to estimate how fast memory grows (see tick)
        self._history: dict[int, collections.deque[tuple[float, SystemMemory, int | None]]] = {}
        self._last_wait = 0.0  # the last tick's wait: the growth-rate window spans it
        self._sleep_until = 0.0  # when the current sleep ends (monotonic)
        self._probe_errors: set[int] = set()
        self.exit: Callable[[int], Any] = os._exit  # tests replace it

    def watch(
        self,
        trial: Any,
        limits: MemoryLimits,
        probe: MemoryProbe,
        *,
        on_stuck: OnStuck | None = None,
        stuck_after: float = STUCK_AFTER_S,
    ) -> TrialWatch:
        """A watch for ``trial``, to be entered in the trial's thread (see the module doc)."""
        return TrialWatch(
            number=getattr(trial, "number", -1),
            limits=limits,
            probe=probe,
            trial=trial,
            on_stuck=on_stuck,
            stuck_after=stuck_after,
            watcher=self,
        )

    def register(self, watch: TrialWatch) -> None:
        """Called in the trial's thread. With other trials running (``n_jobs > 1``), page-fault
        baselines are taken now for all of them: "grew the most" is then measured from the
        moment they started sharing the process (with one trial nobody needs it, nor pays)."""
        with self._lock:
            if self._watches:
                watch.fault_base = own_minor_faults()
                for other in self._watches:
                    if other.fault_base is None:
                        other.fault_base = minor_faults(other.native_id)
            self._watches.append(watch)
            watch.registered = True
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="optuna-guard-watcher", daemon=True
                )
                self._thread.start()
            if self._blocked:
                self._blocked = False
                self._wake.set()
            elif self._sleep_until > time.monotonic() + watch.limits.interval:
                self._wake.set()  # a relaxed sleep would read the new trial late

    def unregister(self, watch: TrialWatch) -> None:
        with self._lock:
            try:
                self._watches.remove(watch)
            except ValueError:
                pass

    def active_count(self) -> int:
        with self._lock:
            return len(self._watches)

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._watches = []
        self._thread = None
        self._blocked = False
        self._history = {}
        self._last_wait = 0.0
        self._sleep_until = 0.0

    def _run(self) -> None:
        idle_since: float | None = None
        poll = 0.1
        while True:
            now = time.monotonic()
            with self._lock:
                watches = list(self._watches)
                if not watches:
                    idle_since = idle_since if idle_since is not None else now
                    if now - idle_since >= self.IDLE_BLOCK_S:
                        self._wake.clear()
                        self._blocked = True
                        self._history.clear()
            if not watches:
                self._sleep(None if self._blocked else poll)
                continue
            idle_since = None
            due = [w for w in watches if now - w.started >= w.limits.interval]
            poll = min(w.limits.interval for w in watches)
            if not due:
                wait = max(
                    min(w.started + w.limits.interval for w in watches) - now, MIN_INTERVAL_S
                )
            else:
                try:  # a reading is taken for the due trials, but applies to all of them
                    wait = self.tick(watches)
                except Exception:  # the watcher must outlive any bug or probe failure
                    _log.exception(
                        "The optuna-guard memory watcher failed to take a reading; retrying."
                    )
                    wait = poll
            self._sleep(wait)

    def _sleep(self, timeout: float | None) -> None:
        """Wait ``timeout`` seconds (None: until a trial registers); a wake-up is consumed."""
        self._sleep_until = math.inf if timeout is None else time.monotonic() + timeout
        if self._wake.wait(timeout):
            self._wake.clear()

    def tick(self, watches: list[TrialWatch]) -> float:
        """One reading per probe, applied to every running trial; returns seconds to wait."""
        now = time.monotonic()
        wait = min(w.limits.interval for w in watches)
        relaxed: float | None = None  # the longest wait every quiet trial allows
        all_quiet = True  # no trial stopping, stopped, tripping or unread
        stop = preemption.stop_requested()
        by_probe: dict[int, list[TrialWatch]] = {}
        for watch in watches:
            by_probe.setdefault(id(watch.probe), []).append(watch)
        for key, group in by_probe.items():
            probe = group[0].probe
            try:
                system = probe.system()
                rss = probe.process_tree_rss(os.getpid())
                gpus = probe.gpus()
            except Exception as exc:
                if key not in self._probe_errors:
                    self._probe_errors.add(key)
                    _log.error(
                        "Memory probe %r failed (%s); "
                        "trials using it are not watched until it recovers.",
                        probe,
                        exc,
                    )
                all_quiet = False
                continue
            self._probe_errors.discard(key)
            # Growth is bursty (an allocation, then compute), so the rate is taken over the last
            # ~2 intervals, not between the last two (possibly 5 ms apart) readings.
            history = self._history.setdefault(key, collections.deque())
            window = 2 * max(min(w.limits.interval for w in group), self._last_wait)
            while history and now - history[0][0] > window:
                history.popleft()
            previous = history[0] if history else None
            history.append((now, system, rss))
            candidates: list[tuple[TrialWatch, Trip]] = []
            busy = False
            for watch in group:
                watch.observe(system, rss, gpus)
                if watch.own_peak_wanted and not watch.own_peak_reset and len(watches) == 1:
                    watch.own_peak_reset = reset_own_peak()
                if watch.interrupt is not None and watch.active:
                    busy, all_quiet = True, False
                    trip = (
                        find_trip(watch.limits, system, rss, gpus)
                        if watch.interrupt[0] == INTERRUPT_TRIP
                        else None
                    )
                    still = stop if watch.interrupt[0] == INTERRUPT_PREEMPT else trip is not None
                    wait = min(wait, self._keep_trying(watch, still, trip, system, now))
                    continue
                if stop:
                    all_quiet = False
                    watch.available_at_trip = system.available_bytes
                    if not watch.try_inject(INTERRUPT_PREEMPT, None):
                        wait = MIN_INTERVAL_S
                    continue
                trip = find_trip(watch.limits, system, rss, gpus)
                if trip is not None:
                    all_quiet = False
                    candidates.append((watch, trip))
                    continue
                if below_warning(watch.limits, system) and not watch.warned:
                    watch.warned = True
                    _log.warning(
                        "Low memory: Trial #%d mid-trial: "
                        "available %.2f GB < %.2f GB warning level.",
                        watch.number,
                        system.available_bytes / GB,
                        watch.limits.warn_available_gb,
                    )
                quiet = relaxed_interval(
                    watch.limits, headroom_bytes(watch.limits, system, rss, gpus)
                )
                relaxed = quiet if relaxed is None else min(relaxed, quiet)
                eta = headroom_and_rate(watch.limits, system, rss, previous, now)
                if eta is not None:
                    wait = min(wait, max(MIN_INTERVAL_S, eta / 2))
                    relaxed = min(relaxed, wait)  # approaching a limit: no relaxing
            if candidates and not busy and not stop:
                victim, trip = self._choose_victim(candidates)
                victim.available_at_trip = system.available_bytes
                victim.over_since = now
                _log.debug(
                    "Trial #%d tripped %s (%s); interrupting its thread.",
                    victim.number,
                    trip.limit,
                    trip.detail,
                )
                if not victim.try_inject(INTERRUPT_TRIP, trip) or len(candidates) > 1:
                    wait = MIN_INTERVAL_S
        # Every trial far from its limits and none being stopped: read less often.
        if relaxed is not None and all_quiet:
            wait = max(wait, relaxed)
        self._last_wait = wait
        return wait

    @staticmethod
    def _choose_victim(candidates: list[tuple[TrialWatch, Trip]]) -> tuple[TrialWatch, Trip]:
        if len(candidates) == 1:
            return candidates[0]

        def grown(item: tuple[TrialWatch, Trip]) -> tuple[int, float]:
            watch = item[0]  # ties: the older trial (it had longer to grow)
            return (minor_faults(watch.native_id) - (watch.fault_base or 0), -watch.started)

        return max(candidates, key=grown)

    def _keep_trying(
        self, watch: TrialWatch, still: bool, trip: Trip | None, system: SystemMemory, now: float
    ) -> float:
        """A trial the watcher decided to stop is still running: inject again where the last
        interrupt went off (or was never injected), and hand a trial that stays over its limit
        for ``stuck_after`` seconds to ``on_stuck``. Returns seconds to wait."""
        interval = watch.limits.interval
        if not still:
            watch.over_since = None  # back under the limit: the guard ends it when it returns
            return interval
        if watch.over_since is None:
            watch.over_since = now
        if trip is not None:  # the latest numbers, for the tags
            watch.interrupt = (INTERRUPT_TRIP, trip)
            watch.available_at_trip = system.available_bytes
        if watch.pending:
            wait = interval
        elif watch.injected and now - (watch.delivered_at or now) < interval:
            wait = max(MIN_INTERVAL_S, interval - (now - (watch.delivered_at or now)))
        else:
            assert watch.interrupt is not None
            if watch.deliveries and not watch.caught_warned:
                watch.caught_warned = True
                _log.warning(
                    "Trial #%d caught the guard's interrupt and went on while still over its "
                    "limit; interrupting it again.",
                    watch.number,
                )
            injected = watch.try_inject(*watch.interrupt)
            if not injected and watch.interrupt[0] == INTERRUPT_TRIP and len(self._watches) == 1:
                injected = _interrupt_pool_helpers(watch)
            # not at a safe point: retry fast for a second, then at the normal pace
            wait = interval if injected or now - watch.over_since > 1.0 else MIN_INTERVAL_S
        over = now - watch.over_since
        if not watch.pending_warned and over >= min(2.0, watch.stuck_after / 2):
            watch.pending_warned = True
            _log.warning(
                "Trial #%d has been over its memory limit for %.1f s and has not stopped: %s; "
                "on_stuck=%r acts after %g s.",
                watch.number,
                over,
                _where_blocked(watch),
                watch.on_stuck,
                watch.stuck_after,
            )
        if over >= watch.stuck_after and not watch.stuck_handled and trip is not None:
            watch.stuck_handled = True
            self._handle_stuck(watch, trip, over)
        return wait

    def _handle_stuck(self, watch: TrialWatch, trip: Trip, over: float) -> None:
        why = _where_blocked(watch)
        if watch.on_stuck == "warn":
            _log.error(
                "Trial #%d is still over its memory limit after %.0f s (%s): %s; "
                "on_stuck='warn' leaves it running.",
                watch.number,
                over,
                trip.detail,
                why,
            )
            return
        message = (
            f"EMERGENCY EXIT: Trial #{watch.number} is still over its memory limit after "
            f"{over:.1f} s ({trip.detail}): {why}. Ending it FAIL and exiting the process "
            f"(status {EXIT_STUCK}) before "
            "the machine runs out of memory (on_stuck='exit')."
        )
        _log.critical(message)
        try:  # also straight to stderr: the package logger may have no handler, and we vanish
            sys.stderr.write(f"optuna-guard: {message}\n")
            sys.stderr.flush()
        except Exception:
            pass
        _end_trial_failed(watch, trip, f"{why}; process exited after {over:.0f} s over the limit")
        logging.shutdown()  # flush the handlers: os._exit skips atexit
        self.exit(EXIT_STUCK)


def _end_trial_failed(watch: TrialWatch, trip: Trip, how: str) -> None:
    """Tag the trial as a memory stop and end it FAIL, from the watcher's thread (the trial's
    thread does not respond). Failures are logged: exiting matters more than the tags."""
    trial = watch.trial
    study = getattr(trial, "study", None)
    storage = getattr(study, "_storage", None)
    trial_id = getattr(trial, "_trial_id", None)
    if storage is None or trial_id is None:
        return
    attrs = tags.killed(
        reason=f"OOM prevention [Trial #{watch.number} mid-trial]: {trip.detail}; {how}",
        limit=trip.limit,
        available_gb=to_gb(
            watch.available_at_trip
            if watch.available_at_trip is not None
            else trip.available_bytes
        ),
    )
    attrs.update(
        tags.memory_seen(watch.peak_rss_bytes, watch.min_available_bytes, watch.peak_gpu_bytes)
    )
    try:
        from optuna.trial import TrialState

        for key, value in attrs.items():
            storage.set_trial_user_attr(trial_id, key, value)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except Exception as exc:
        _log.error("Could not end Trial #%d FAIL before exiting: %s", watch.number, exc)


WATCHER = MemoryWatcher()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=WATCHER._after_fork)
