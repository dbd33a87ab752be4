"""The in-trial sampler: one background thread per process watching every running guarded trial.

Why one thread for the whole process rather than one per trial: with ``study.optimize(n_jobs=2)``
two trials share one process, so a process-level reading (tree RSS, available RAM) trips both
at once; one thread sees both and stops one victim at a time (the trial whose thread touched
the most new memory since it started, by its minor page faults), like the launcher does for
workers. It also keeps the per-trial cost to a list append, and the thread sleeps on an Event
(no CPU) while no guarded trial runs.

How a trial is stopped mid-split: the sampler raises ``_GuardInterrupt`` inside the trial's
thread with ``PyThreadState_SetAsyncExc``. It is delivered at the next Python bytecode of that
thread (a long native call - a big matmul, ``time.sleep`` - finishes first). The exception is
only injected while the trial's own code runs (not inside optuna, SQLAlchemy, logging,
threading or optuna-guard code, where an exception could leave a lock or a transaction half
done; the sampler retries every few milliseconds), at most once per trial, and under the
watch's lock: the guard wrapper takes the same lock to mark the trial finished and makes an
exception that was not delivered yet go off inside its own ``try``, so it can never leak into
Optuna or the next trial.
"""

from __future__ import annotations

import collections
import ctypes
import os
import sys
import threading
import time
from typing import Sequence

from optuna_guard import preemption
from optuna_guard._logging import get_logger
from optuna_guard._trips import Trip, below_warning, find_trip, headroom_and_rate
from optuna_guard._units import GB
from optuna_guard.limits import MemoryLimits
from optuna_guard.memory import GpuMemory, MemoryProbe, SystemMemory

try:
    import resource
except ImportError:  # pragma: no cover - not on Windows
    resource = None  # type: ignore[assignment]

_log = get_logger(__name__)

# Fastest sampling when a limit is about to be reached, and while an interrupt waits for a
# safe point.
MIN_INTERVAL_S = 0.005
# An interrupt not delivered after this long means the trial is stuck in native code.
STUCK_WARNING_S = 2.0

_UNSAFE_MODULES = ("optuna", "sqlalchemy", "logging", "threading", "importlib", "concurrent", "contextlib", "queue")

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)
_set_async_exc.restype = ctypes.c_int

_delivered = threading.local()

INTERRUPT_TRIP = "trip"
INTERRUPT_PREEMPT = "preempt"


class _GuardInterrupt(BaseException):
    """Raised inside a trial's thread by the sampler. A BaseException, so that an objective's
    ``except Exception`` does not swallow it; the guard wrapper turns it into TrialPruned, a
    FAIL or TrialPreempted before Optuna sees it."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        _delivered.value = True  # runs in the interrupted thread: it was delivered


def take_delivered() -> bool:
    """Whether an interrupt was delivered to this thread since the last call (and reset)."""
    value = getattr(_delivered, "value", False)
    _delivered.value = False
    return value


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
        take_delivered()
        return True
    return False


class TrialWatch:
    """What the sampler knows about one running guarded trial; created in the trial's thread."""

    def __init__(self, *, number: int, limits: MemoryLimits, probe: MemoryProbe, frame_id: int) -> None:
        self.number = number
        self.limits = limits
        self.probe = probe
        self.frame_id = frame_id  # id() of the guard wrapper's frame: frames above it are the objective's
        self.thread_id = threading.get_ident()
        self.native_id = threading.get_native_id()
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.active = True
        self.interrupt: tuple[str, Trip | None] | None = None  # decided: (kind, trip)
        self.injected_at: float | None = None
        self.absorbed = False  # injected, but the trial's code had finished: its result stands
        self.stuck_warned = False
        self.warned = False
        self.peak_rss_bytes = 0
        self.min_available_bytes: int | None = None
        self.available_at_trip: int | None = None
        self.peak_gpu_bytes: int | None = None
        # page faults when a second trial joined the process (see Sampler.register)
        self.fault_base: int | None = None
        self.unregistered = False

    def observe(self, system: SystemMemory | None, rss_bytes: int | None, gpus: Sequence[GpuMemory] = ()) -> None:
        if rss_bytes is not None and rss_bytes > self.peak_rss_bytes:
            self.peak_rss_bytes = rss_bytes
        if system is not None and (self.min_available_bytes is None or system.available_bytes < self.min_available_bytes):
            self.min_available_bytes = system.available_bytes
        if gpus:
            used = max(g.used_bytes for g in gpus)
            if self.peak_gpu_bytes is None or used > self.peak_gpu_bytes:
                self.peak_gpu_bytes = used

    @property
    def injected(self) -> bool:
        return self.injected_at is not None

    @property
    def stopped(self) -> bool:
        """The interrupt reached the trial's code (the trial is stopped, not finished)."""
        return self.injected_at is not None and not self.absorbed

    def finish(self) -> None:
        """Mark the trial's code finished (idempotent). After this no interrupt can arrive.

        An interrupt injected but not yet delivered goes off inside this method (the trial's
        code had finished: its result stands). If it goes off before the ``try`` that absorbs
        it, it propagates from here; the guard wrapper calls this inside the ``try`` that
        catches it and calls it again.
        """
        if self.unregistered:
            return
        with self.lock:
            was_active = self.active
            self.active = False
        if was_active and self.injected_at is not None and _absorb_pending_interrupt():
            self.absorbed = True
        SAMPLER.unregister(self)
        self.unregistered = True

    def try_inject(self, kind: str, trip: Trip | None) -> bool:
        """Called by the sampler: decide to stop this trial, and inject now if it is safe."""
        with self.lock:
            if not self.active or self.injected_at is not None:
                return False
            if self.interrupt is None:
                self.interrupt = (kind, trip)
            if not _at_safe_point(self.thread_id, self.frame_id):
                return False
            if _set_async_exc(self.thread_id, ctypes.py_object(_GuardInterrupt)) != 1:
                return False  # 0: no such thread (it cannot be: the trial is active), nothing set
            self.injected_at = time.monotonic()
            return True


def _at_safe_point(thread_id: int, frame_id: int) -> bool:
    """True when the trial's thread runs the objective's own code (not library internals).

    The guard wrapper's frame must be on the stack but not on top: between registering the
    trial and calling the objective, the wrapper is outside the ``try`` that catches the
    interrupt, so an interrupt there would escape into Optuna.
    """
    frame = sys._current_frames().get(thread_id)
    if frame is None or id(frame) == frame_id:
        return False
    while frame is not None:
        if id(frame) == frame_id:
            return True
        module = frame.f_globals.get("__name__", "")
        root = module.partition(".")[0]
        if root in _UNSAFE_MODULES or root == "optuna_guard":
            return False
        frame = frame.f_back
    return False  # the guard wrapper is not on the stack: the trial is not running there


def _own_minor_faults() -> int:
    """Minor page faults of the calling thread so far (same counter as its /proc stat)."""
    try:
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt  # type: ignore[union-attr]
    except (AttributeError, OSError, ValueError):  # RUSAGE_THREAD is Linux-only
        return 0


def _minor_faults(native_id: int) -> int:
    """Minor page faults of one thread: new pages it touched (a proxy for memory it grew)."""
    try:
        with open(f"/proc/self/task/{native_id}/stat", "rb") as handle:
            stat = handle.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[7])
    except (OSError, ValueError, IndexError):
        return 0


class Sampler:
    """The process-wide sampler thread (started on the first guarded trial).

    A trial is first sampled one ``interval`` after it started (the guard reads memory itself
    at the start and the end of every trial, so a trial shorter than that costs the sampler
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
        self._probe_errors: set[int] = set()

    def register(self, watch: TrialWatch) -> None:
        """Called in the trial's thread. With other trials running (``n_jobs > 1``), page-fault
        baselines are taken now for all of them: "grew the most" is then measured from the
        moment they started sharing the process (with one trial nobody needs it, nor pays)."""
        with self._lock:
            if self._watches:
                watch.fault_base = _own_minor_faults()
                for other in self._watches:
                    if other.fault_base is None:
                        other.fault_base = _minor_faults(other.native_id)
            self._watches.append(watch)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="optuna-guard-sampler", daemon=True)
                self._thread.start()
            if self._blocked:
                self._blocked = False
                self._wake.set()

    def unregister(self, watch: TrialWatch) -> None:
        with self._lock:
            try:
                self._watches.remove(watch)
            except ValueError:
                pass

    def active_count(self) -> int:
        with self._lock:
            return len(self._watches)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._watches = []
        self._thread = None
        self._blocked = False
        self._history = {}

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
                wait = max(min(w.started + w.limits.interval for w in watches) - now, MIN_INTERVAL_S)
            else:
                try:  # a reading is taken for the due trials, but applies to all of them
                    wait = self.tick(watches)
                except Exception:  # the sampler must outlive any bug or probe failure
                    _log.exception("The optuna-guard sampler failed to take a reading; retrying.")
                    wait = poll
            self._sleep(wait)

    def _sleep(self, timeout: float | None) -> None:
        """Wait ``timeout`` seconds (None: until a trial registers); a wake-up is consumed."""
        if self._wake.wait(timeout):
            self._wake.clear()

    def tick(self, watches: list[TrialWatch]) -> float:
        """One reading per probe, applied to every running trial; returns seconds to wait."""
        now = time.monotonic()
        wait = min(w.limits.interval for w in watches)
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
                    _log.error("Memory probe %r failed (%s); trials using it are not watched until it recovers.", probe, exc)
                continue
            self._probe_errors.discard(key)
            # Growth is bursty (an allocation, then compute), so the rate is taken over the last
            # ~2 intervals, not between the last two (possibly 5 ms apart) readings.
            history = self._history.setdefault(key, collections.deque())
            window = 2 * min(w.limits.interval for w in group)
            while history and now - history[0][0] > window:
                history.popleft()
            previous = history[0] if history else None
            history.append((now, system, rss))
            candidates: list[tuple[TrialWatch, Trip]] = []
            busy = False
            for watch in group:
                watch.observe(system, rss, gpus)
                if watch.interrupt is not None and watch.active:
                    busy = True
                    self._retry_or_warn(watch, now)
                    wait = MIN_INTERVAL_S if not watch.injected else wait
                    continue
                if stop:
                    watch.available_at_trip = system.available_bytes
                    if not watch.try_inject(INTERRUPT_PREEMPT, None):
                        wait = MIN_INTERVAL_S
                    continue
                trip = find_trip(watch.limits, system, rss, gpus)
                if trip is not None:
                    candidates.append((watch, trip))
                    continue
                if below_warning(watch.limits, system) and not watch.warned:
                    watch.warned = True
                    _log.warning(
                        "Low memory: Trial #%d mid-trial: available %.2f GB < %.2f GB warning level.",
                        watch.number,
                        system.available_bytes / GB,
                        watch.limits.warn_available_gb,
                    )
                eta = headroom_and_rate(watch.limits, system, rss, previous, now)
                if eta is not None:
                    wait = min(wait, max(MIN_INTERVAL_S, eta / 2))
            if candidates and not busy and not stop:
                victim, trip = self._choose_victim(candidates)
                victim.available_at_trip = system.available_bytes
                _log.debug("Trial #%d tripped %s (%s); interrupting its thread.", victim.number, trip.limit, trip.detail)
                if not victim.try_inject(INTERRUPT_TRIP, trip):
                    wait = MIN_INTERVAL_S
                elif len(candidates) > 1:
                    wait = MIN_INTERVAL_S
        return wait

    @staticmethod
    def _choose_victim(candidates: list[tuple[TrialWatch, Trip]]) -> tuple[TrialWatch, Trip]:
        if len(candidates) == 1:
            return candidates[0]

        def grown(item: tuple[TrialWatch, Trip]) -> tuple[int, float]:
            watch = item[0]  # ties: the older trial (it had longer to grow)
            return (_minor_faults(watch.native_id) - (watch.fault_base or 0), -watch.started)

        return max(candidates, key=grown)

    @staticmethod
    def _retry_or_warn(watch: TrialWatch, now: float) -> None:
        if not watch.injected:
            assert watch.interrupt is not None
            watch.try_inject(*watch.interrupt)
        elif not watch.stuck_warned and now - (watch.injected_at or now) > STUCK_WARNING_S:
            watch.stuck_warned = True
            _log.warning(
                "Trial #%d is over its memory limit but has not returned to Python code for %.0f s "
                "(a long native call); it stops as soon as that call returns.",
                watch.number,
                now - (watch.injected_at or now),
            )


SAMPLER = Sampler()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=SAMPLER._after_fork)
