"""The supervisor's memory watchdog: reads every worker tree and the system each tick, kills at
most one victim at a time (a worker over ``--max-worker-rss-gb`` once its in-trial guard had its
chance; for low system memory only a worker whose trial can cover the deficit), warns, holds
worker starts while memory is short and stops the launch when memory stays held outside it.

The rules themselves are pure (:mod:`._policies`, :mod:`._memory_policy`); this module applies
them to live workers.

Readings are adaptive (as earlyoom's): the host (one /proc/meminfo read) every tick, a worker's
tree only as often as it could reach a limit. Its next reading is due after the time it would
take to close its headroom (the smallest gap to ``--max-worker-rss-gb``, to the guard's limit,
and available memory's gap to ``--min-available-gb``) at GROWTH_RATE_BYTES_S, at most
MAX_READ_INTERVAL_S: a worker far below every limit is read about once a second, one within
``GROWTH_RATE_BYTES_S * check_interval`` of a limit (and every worker while available memory is
that close to its minimum, or while a worker is being killed for memory) every tick. The
kernel's OOM-kill counter of a worker's own cgroup is read with its tree (a kill there needs the
cgroup at its limit). Files stay open between readings (cgroup counters, the /proc files of
process trees).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol

from optuna_guard import events, tags
from optuna_guard._logging import get_logger
from optuna_guard._units import GB, to_gb
from optuna_guard.exceptions import MemoryStallError
from optuna_guard.memory import MemoryProbe, SystemMemory, _tree, default_probe
from optuna_guard.memory._cgroup import CgroupReader
from optuna_guard.memory._procfs import ProcessTree
from optuna_guard.supervisor import _exits, _memory_policy, _policies
from optuna_guard.supervisor._worker_handle import WorkerHandle

if TYPE_CHECKING:
    from optuna_guard.supervisor._cgroups import WorkerCgroups
    from optuna_guard.supervisor._config import LaunchConfig
    from optuna_guard.supervisor._kills import Killer

_log = get_logger(__name__)

GUARD_CHANCE_S = (
    0.25  # the in-trial guard samples every 0.1 s: this long over its limit and it could not act
)
LOG_EVERY_S = 30.0  # repeated memory warnings are logged at most this often
# The fastest growth a worker tree's memory is assumed capable of between two readings (page
# faults of a freshly allocated array run at ~2-5 GB/s per thread on current machines).
GROWTH_RATE_BYTES_S = 4 * GB
MAX_READ_INTERVAL_S = 1.0  # a worker's tree is read at least this often, however far below


class MemoryHost(Protocol):
    """What the memory watchdog needs from the arbiter."""

    config: LaunchConfig
    probe: MemoryProbe | None
    workers: list[WorkerHandle]
    killer: Killer
    kills: int

    @property
    def cgroups(self) -> WorkerCgroups | None: ...

    def emit(self, event: str, **fields: Any) -> None: ...


class MemoryWatchdog:
    """Memory readings of the launch and the kills, warnings and start holds they lead to."""

    def __init__(self, arbiter: MemoryHost) -> None:
        self._a = arbiter
        self.system: SystemMemory | None = None  # the last system reading (None: probe failed)
        self.start_gate = _memory_policy.StartGate()
        self._stall = _memory_policy.StallClock()
        self._over_guard_since: dict[
            int, float
        ] = {}  # pid -> first reading over the guard's limit
        self._hold_logged = False
        self._elsewhere_logged_at: float | None = None
        self._last_warning_at: float | None = None
        self._next_read: dict[int, float] = {}  # pid -> when its tree is to be read again
        self._read_this_tick: set[int] = set()  # pids whose tree check_memory just read
        self._readers: dict[int, CgroupReader] = {}  # pid -> its cgroup's open counter files
        self._trees: ProcessTree | None = None  # open /proc files of process trees

    # ------------------------------------------------------------------ readings
    def _reader(self, pid: int) -> CgroupReader | None:
        """The open counter files of the worker's own cgroup (None in process-tree mode)."""
        cgroups = self._a.cgroups
        cgroup = cgroups.of(pid) if cgroups is not None else None
        if cgroup is None:
            return None
        reader = self._readers.get(pid)
        if reader is None or reader.directory != cgroup.directory:
            if reader is not None:
                reader.close()
            reader = self._readers[pid] = CgroupReader(cgroup.version, cgroup.directory)
        return reader

    def _forget_gone(self) -> None:
        """Close the files of workers no longer in the launch."""
        live = {w.pid for w in self._a.workers}
        for pid in [p for p in self._readers if p not in live]:
            self._readers.pop(pid).close()
        for pid in [p for p in self._next_read if p not in live]:
            del self._next_read[pid]

    def read_interval(self, rss_bytes: int, available: int | None) -> float:
        """Seconds until a worker tree at ``rss_bytes`` could reach a limit at
        GROWTH_RATE_BYTES_S (0: read it every tick), at most MAX_READ_INTERVAL_S."""
        config = self._a.config
        headroom = math.inf
        for limit_gb in (config.max_worker_rss_gb, config.guard_trial_limit_gb):
            if limit_gb is not None:
                headroom = min(headroom, limit_gb * GB - rss_bytes)
        min_gb = config.min_available_gb
        if min_gb is not None:
            headroom = min(headroom, -math.inf if available is None else available - min_gb * GB)
        return max(0.0, min(headroom / GROWTH_RATE_BYTES_S, MAX_READ_INTERVAL_S))

    def tree_rss(self, pid: int) -> int:
        a = self._a
        if a.probe is not None:
            return int(a.probe.process_tree_rss(pid))
        reader = self._reader(pid)
        if reader is not None:  # every process in the worker's cgroup, daemonised or not
            return reader.working_set()
        if self._trees is None:
            self._trees = ProcessTree("/proc")
        return self._trees.rss(pid)

    def read_system(self) -> SystemMemory | None:
        try:
            return (self._a.probe or default_probe()).system()
        except Exception as exc:  # pragma: no cover - a probe failure must not stop the launch
            _log.debug("memory probe failed: %s", exc)
            return None

    def available_bytes(self) -> int | None:
        return self.system.available_bytes if self.system is not None else None

    # ------------------------------------------------------------------ kills
    def check_memory(self, now: float) -> None:
        """Measure the system and every worker tree that is due (see the module docstring);
        hard-kill at most one victim at a time."""
        a = self._a
        self.system = self.read_system()
        available = self.available_bytes()
        self._forget_gone()
        # every tree now: while a victim is being killed, or memory could run short within a
        # tick (a victim is chosen on this tick's readings)
        everyone = (
            self._memory_kill_under_way()
            or self.read_interval(0, available) < a.config.check_interval
        )
        candidates = []
        self._read_this_tick.clear()
        for worker in a.workers:
            pid = worker.pid
            if everyone or now >= self._next_read.get(pid, -math.inf):
                self._read_this_tick.add(pid)
                worker.rss_bytes = self.tree_rss(pid)
                # due again a tick early rather than late (``now`` of the ticks varies a little)
                wait = self.read_interval(worker.rss_bytes, available) - a.config.check_interval
                self._next_read[pid] = now + wait if wait > 0 else -math.inf
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
        self._maybe_warn(now, available)
        self._track_over_guard(candidates, now)
        if self._memory_kill_under_way():
            return  # one victim at a time: wait until it is gone
        limit_gb = a.config.max_worker_rss_gb
        victim = self._guard_had_its_chance(_policies.over_limit(candidates, limit_gb), now)
        if victim is not None:
            worker = self._worker_by_pid(victim.pid)
            reason = (
                f"worker memory limit: worker {worker.worker_id} tree RSS {worker.rss_bytes / GB:.2f} GB > "
                f"{limit_gb:.2f} GB"
            )
            self.kill_for_memory(worker, reason, "max_worker_rss_gb", available, now)
            return
        min_gb = a.config.min_available_gb
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

    def _memory_kill_under_way(self) -> bool:
        """A worker is being killed for memory: the next victim is chosen right after it is gone,
        so every tree is read every tick meanwhile."""
        return any(
            w.kill is not None and w.kill.kind == _exits.MEMORY_KILL for w in self._a.workers
        )

    def oom_killed(self, worker: WorkerHandle) -> bool:
        """Whether the kernel OOM-killed inside the worker's own memory cgroup (False without one)."""
        cgroups = self._a.cgroups
        cgroup = cgroups.of(worker.pid) if cgroups is not None else None
        reader = self._reader(worker.pid) if cgroup is not None else None
        return (
            cgroup is not None
            and reader is not None
            and reader.oom_kills() > cgroup.oom_kills_at_start
        )

    def check_cgroup_ooms(self, now: float) -> None:
        """The kernel OOM-killed a process inside a live worker's cgroup (a helper, a data loader):
        its trial is over as a memory stop; the worker and everything in its cgroup go. Asked for
        the workers whose tree :meth:`check_memory` read this tick (all of them near a limit)."""
        a = self._a
        if a.cgroups is None:
            return
        for worker in a.workers:
            due = worker.pid in self._read_this_tick or worker.pid not in self._next_read
            if due and worker.kill is None and self.oom_killed(worker):
                reason = (
                    f"out of memory: the kernel killed a process in worker {worker.worker_id}'s memory cgroup "
                    f"(hard limit --max-worker-rss-gb {a.config.max_worker_rss_gb:.2f} GB)"
                )
                self.kill_for_memory(
                    worker, reason, "max_worker_rss_gb", self.available_bytes(), now
                )

    def _track_over_guard(self, candidates: list[_policies.VictimCandidate], now: float) -> None:
        """Since when each worker is over the in-trial guard's limit (GUARD_LIMIT_FRACTION)."""
        guard_limit = self._a.config.guard_trial_limit_gb
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
        if victim is None or not victim.in_trial or not self._a.config.guard:
            return victim
        if now - self._over_guard_since.get(victim.pid, now) >= GUARD_CHANCE_S:
            return victim
        return None

    def kill_for_memory(
        self, worker: WorkerHandle, reason: str, limit: str, available: int | None, now: float
    ) -> None:
        a = self._a
        number = worker.trial_number
        attrs = tags.killed(
            reason,
            limit=limit,
            available_gb=None if available is None else to_gb(available),
            peak_rss_gb=to_gb(max(worker.trial_peak_rss, worker.rss_bytes)),
            pid=worker.pid,
        )
        a.kills += 1
        a.killer.start_kill(worker, _exits.MEMORY_KILL, reason, attrs, now, limit=limit)
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
        a.emit(
            events.WORKER_KILLED,
            worker_id=worker.worker_id,
            pid=worker.pid,
            trial_number=number,
            reason=reason,
            rss_gb=to_gb(worker.rss_bytes),
            available_gb=None if available is None else to_gb(available),
            limit=limit,
        )

    # ------------------------------------------------------------------ warnings
    def _log_memory_elsewhere(self, now: float, available: int, deficit: int) -> None:
        """Low memory that no worker's trial can explain: say so (every 30 s), kill nobody."""
        if self._elsewhere_logged_at is not None and now - self._elsewhere_logged_at < LOG_EVERY_S:
            return
        self._elsewhere_logged_at = now
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

    def _maybe_warn(self, now: float, available: int | None) -> None:
        a = self._a
        warn_gb = a.config.warn_available_gb
        if warn_gb is None or available is None or available >= warn_gb * GB:
            self._last_warning_at = None
            return
        if self._last_warning_at is not None and now - self._last_warning_at < LOG_EVERY_S:
            return
        self._last_warning_at = now
        biggest = max(a.workers, key=lambda w: w.rss_bytes, default=None)
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
        a.emit(
            events.MEMORY_WARNING,
            available_gb=to_gb(available),
            reason=f"available < {warn_gb:.2f} GB",
            worker_id=biggest.worker_id if biggest else None,
            rss_gb=to_gb(biggest.rss_bytes) if biggest else None,
        )

    # ------------------------------------------------------------------ starts
    def hold(self) -> bool:
        """Do not start a worker unless available memory covers --min-available-gb plus a
        worker's expected footprint (and what booting workers still have to allocate)."""
        a = self._a
        min_gb = a.config.min_available_gb
        system = self.system
        if min_gb is None or system is None:
            return False
        booting = [w.rss_bytes for w in a.workers if not w.ready and w.kill is None]
        low = not self.start_gate.may_start(system.available_bytes, int(min_gb * GB), booting)
        if low and not self._hold_logged:
            _log.warning(
                "Not starting a worker: available memory %.2f GB does not cover --min-available-gb %.2f GB "
                "plus a worker's footprint %.2f GB%s.",
                system.available_bytes / GB,
                min_gb,
                self.start_gate.footprint / GB,
                f" and {len(booting)} booting worker(s)" if booting else "",
            )
        self._hold_logged = low
        return low

    def no_stall(self, now: float) -> None:
        """A worker may start: the stall clock is reset."""
        self._stall.update(now, False)

    def check_stall(self, now: float) -> None:
        """No trial runs, no worker boots and none may start: after --memory-stall-timeout the
        memory is held outside the study; stop with exit code 4 and say by what."""
        a = self._a
        progressing = any(w.busy or not w.ready for w in a.workers if w.kill is None)
        stalled_for = self._stall.update(now, not progressing)
        timeout = a.config.memory_stall_timeout
        if timeout is None or stalled_for < timeout:
            return
        available = self.system.available_bytes / GB if self.system else float("nan")
        outside = _memory_policy.describe_outside(
            _memory_policy.biggest_outside(self._launch_pids())
        )
        raise MemoryStallError(
            f"memory held outside the study: for {stalled_for:.0f}s no worker could start (available {available:.2f} GB, "
            f"needed --min-available-gb {a.config.min_available_gb:.2f} GB + a worker's "
            f"{self.start_gate.footprint / GB:.2f} GB); largest other processes: {outside}"
        )

    # ------------------------------------------------------------------ helpers
    def _launch_pids(self) -> set[int]:
        pids = set()
        for worker in self._a.workers:
            pids.add(worker.pid)
            pids.update(_tree.descendants(worker.pid))
        return pids

    def _worker_by_pid(self, pid: int) -> WorkerHandle:
        for worker in self._a.workers:
            if worker.pid == pid:
                return worker
        raise KeyError(pid)
