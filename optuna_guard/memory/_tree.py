"""Process trees and per-thread counters from /proc for the watchdog and the watcher: fast tree RSS
(walks /proc/<pid>/task/<tid>/children), process identity (start time), state, CPU, env markers.

Why not ``psutil.Process.children(recursive=True)``: it scans every process on the machine
(~3 ms each time here); the watchdog measures every worker 4 times a second, which would cost
~10 % of a core with 8 workers. Following the kernel's children lists is O(tree size).
Falls back to psutil where the kernel lacks ``/proc/<pid>/task/<tid>/children``.
When the caller injected a :class:`~optuna_guard.memory.MemoryProbe` (tests, custom setups)
the supervisor asks that probe instead of this module.
"""

from __future__ import annotations

import os

import psutil

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_HAS_CHILDREN_FILE: bool | None = None


def _children_supported() -> bool:
    global _HAS_CHILDREN_FILE
    if _HAS_CHILDREN_FILE is None:
        pid = os.getpid()
        _HAS_CHILDREN_FILE = os.path.exists(f"/proc/{pid}/task/{pid}/children")
    return _HAS_CHILDREN_FILE


def descendants(pid: int) -> list[int]:
    """All descendant pids of ``pid`` (not ``pid`` itself); empty if it is gone."""
    if not _children_supported():
        try:
            return [child.pid for child in psutil.Process(pid).children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return []
    found: list[int] = []
    stack = [pid]
    seen = {pid}
    while stack:
        current = stack.pop()
        try:
            tids = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{current}/task/{tid}/children", "rb") as handle:
                    data = handle.read()
            except OSError:
                continue
            for token in data.split():
                child = int(token)
                if child not in seen:
                    seen.add(child)
                    found.append(child)
                    stack.append(child)
    return found


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (from /proc/<pid>/statm); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as handle:
            return int(handle.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        try:
            return int(psutil.Process(pid).memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return 0


def tree_rss_bytes(pid: int) -> int:
    """RSS of ``pid`` plus all its descendants (RSS, not PSS: cheap, may double-count shared pages)."""
    own = rss_bytes(pid)
    if own == 0:
        return 0
    return own + sum(rss_bytes(child) for child in descendants(pid))


def start_time_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or None
    if it is gone. A pid plus this value names one process for good: a reused pid differs."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: split after the last ')'
        return int(data[data.rindex(b")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def is_same_process(pid: int, start_ticks: int | None) -> bool:
    """True while the process ``pid`` started at ``start_ticks`` is alive (a zombie counts as gone)."""
    if start_ticks is None:
        return False
    if start_time_ticks(pid) != start_ticks:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
        return data[data.rindex(b")") + 2 : data.rindex(b")") + 3] != b"Z"
    except (OSError, ValueError):
        return False


def process_state(pid: int) -> str | None:
    """One-letter kernel state of ``pid`` (R, S, D, T stopped, t traced, Z zombie), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
        return data[data.rindex(b")") + 2 : data.rindex(b")") + 3].decode()
    except (OSError, ValueError):
        return None


def pids_with_env(marker: bytes) -> list[int]:
    """Every pid whose environment holds ``marker`` (an exact ``NAME=value`` entry), found in
    /proc/*/environ. Finds descendants that left the process tree (setsid + double fork);
    processes of other users are skipped when unreadable."""
    found: list[int] = []
    own = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid == own:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                entries = handle.read().split(b"\0")
        except OSError:
            continue
        if marker in entries:
            found.append(pid)
    return found


def cpu_ticks(pid: int) -> int | None:
    """User + system CPU time of ``pid`` in clock ticks (/proc/<pid>/stat fields 14-15), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
        fields = data[data.rindex(b")") + 2 :].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


try:
    import resource
except ImportError:  # pragma: no cover - not on Windows
    resource = None  # type: ignore[assignment]


def own_minor_faults() -> int:
    """Minor page faults of the calling thread so far (same counter as its /proc stat)."""
    try:
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt  # type: ignore[union-attr]
    except (AttributeError, OSError, ValueError):  # RUSAGE_THREAD is Linux-only
        return 0


def minor_faults(native_id: int) -> int:
    """Minor page faults of one thread: new pages it touched (a proxy for memory it grew)."""
    try:
        with open(f"/proc/self/task/{native_id}/stat", "rb") as handle:
            stat = handle.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[7])
    except (OSError, ValueError, IndexError):
        return 0
