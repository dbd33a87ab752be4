"""When the launcher may start a worker, when low system memory justifies a kill, and when to
give up because the memory is held outside the study. Pure bookkeeping, no /proc reads.

Without these rules a study in a tight cgroup thrashed (issue 10, D7/D8): workers were started
as soon as available memory touched ``--min-available-gb`` (their own start pushed it below
again), all missing workers were started from one reading, and the low-memory rule killed the
largest worker even when it held a few MB of a GB-sized deficit — a kill/respawn loop that
tagged innocent trials ``emergency_killed``.

* **Start gate.** A worker starts only when available memory covers ``--min-available-gb`` plus
  the expected footprint of a worker (the largest boot footprint this launch measured, a
  conservative default before the first) plus what still-booting workers have yet to allocate.
  At most one worker starts per watchdog tick, so memory is re-read between starts.
* **Victims.** For low system memory only a worker that runs a trial and whose tree holds a
  meaningful share (``VICTIM_MIN_SHARE``) of the deficit is killed; idle and starting workers
  never are (see :func:`optuna_guard.supervisor._policies.choose_victim`).
* **Stall.** When no worker runs a trial and none may start for ``--memory-stall-timeout``, the
  memory is held by something else: the launch stops with exit code 4 naming the biggest
  processes that are not part of the launch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

from optuna_guard._units import GB

DEFAULT_WORKER_FOOTPRINT_BYTES = int(0.3 * GB)  # before any worker of this launch was measured
GUARD_LIMIT_FRACTION = 0.9  # the in-trial guard stops a trial at 90 % of --max-worker-rss-gb


@dataclasses.dataclass
class StartGate:
    """Decides whether one more worker fits; learns the footprint from this launch's workers."""

    measured_footprint: int | None = None

    @property
    def footprint(self) -> int:
        return (
            self.measured_footprint
            if self.measured_footprint is not None
            else DEFAULT_WORKER_FOOTPRINT_BYTES
        )

    def record_boot(self, tree_rss_bytes: int) -> None:
        """A worker finished booting (imports, storage) with this tree RSS."""
        if tree_rss_bytes > 0:
            self.measured_footprint = max(self.measured_footprint or 0, int(tree_rss_bytes))

    def headroom(self, available: int, min_available: int, booting_rss: Iterable[int]) -> int:
        """Bytes left above the stop threshold after the booting workers and one more worker
        reached the footprint (negative: a new worker does not fit)."""
        still_to_come = sum(max(0, self.footprint - rss) for rss in booting_rss)
        return available - still_to_come - min_available - self.footprint

    def may_start(
        self, available: int | None, min_available: int | None, booting_rss: Iterable[int]
    ) -> bool:
        if available is None or min_available is None:
            return True
        return self.headroom(available, min_available, booting_rss) >= 0


@dataclasses.dataclass
class StallClock:
    """Since when no worker could start while none runs a trial (``None``: not stalled)."""

    since: float | None = None

    def update(self, now: float, stalled: bool) -> float:
        """Seconds stalled so far (0 when not stalled)."""
        if not stalled:
            self.since = None
            return 0.0
        if self.since is None:
            self.since = now
        return now - self.since


def biggest_outside(
    launch_pids: set[int], limit: int = 3, proc: str = "/proc"
) -> list[tuple[int, str, int]]:
    """``(pid, name, rss_bytes)`` of the largest processes in our memory cgroup (or on the host
    when the cgroup cannot be read) that are not this launcher or its workers' trees."""
    own = os.getpid()
    ours = _cgroup_of(own, proc)
    page = os.sysconf("SC_PAGE_SIZE")
    found: list[tuple[int, str, int]] = []
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid == own or pid in launch_pids:
            continue
        try:
            if ours is not None and _cgroup_of(pid, proc) != ours:
                continue
            with open(f"{proc}/{pid}/statm") as handle:
                rss = int(handle.read().split()[1]) * page
            with open(f"{proc}/{pid}/comm") as handle:
                name = handle.read().strip()
        except (OSError, ValueError, IndexError):
            continue
        if rss >= 16 * 2**20:  # smaller ones cannot explain a memory shortage
            found.append((pid, name, rss))
    found.sort(key=lambda item: item[2], reverse=True)
    return found[:limit]


def describe_outside(processes: list[tuple[int, str, int]]) -> str:
    if not processes:
        return "no single large process found"
    return ", ".join(f"{name} (pid {pid}, {rss / GB:.2f} GB)" for pid, name, rss in processes)


def _cgroup_of(pid: int, proc: str) -> str | None:
    """The memory cgroup path of ``pid`` (v1 ``memory`` line, or the v2 ``0::`` line)."""
    try:
        with open(f"{proc}/{pid}/cgroup") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and ("memory" in parts[1].split(",") or parts[0] == "0"):
            return parts[2]
    return None
