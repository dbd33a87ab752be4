"""Host memory (/proc/meminfo), memory pressure (/proc/pressure/memory) and process-tree RSS.

Read straight from procfs (through an injectable root) rather than psutil: psutil's
``virtual_memory() + swap_memory()`` costs ~200 µs and ``children(recursive=True)`` scans every
process on the machine (milliseconds), while the guard samples ten times a second.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

from optuna_guard.memory._files import CachedFile

# Thread lists are re-read at most this often (a subprocess started by a brand-new thread is
# counted from the next listing on).
TASKS_CACHE_S = 0.5
_PRUNE_EVERY = 64  # calls after which files of vanished processes are closed

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclasses.dataclass(frozen=True)
class HostMemory:
    total_bytes: int
    available_bytes: int
    swap_total_bytes: int
    swap_free_bytes: int


def _kb(data: bytes, key: bytes) -> int | None:
    """The value of ``key`` (``b"\nSwapFree:"``-style, unique in the file) in kB, or None."""
    start = data.find(key)
    if start < 0:
        return None
    start += len(key)
    end = data.find(b"\n", start)
    return int(data[start : end if end >= 0 else len(data)].rstrip(b"kB \t"))


def parse_meminfo(data: bytes) -> HostMemory:
    """/proc/meminfo (values in kB). Kernels before 3.14 lack MemAvailable: estimate it.

    Hand-rolled lookups rather than a dict of every line: this runs in ``check_memory``.
    """
    data = b"\n" + data if not data.startswith(b"\n") else data
    total = _kb(data, b"\nMemTotal:")
    if total is None:
        raise ValueError("/proc/meminfo has no MemTotal line")
    available = _kb(data, b"\nMemAvailable:")
    if available is None:
        available = sum(
            _kb(data, key) or 0 for key in (b"\nMemFree:", b"\nBuffers:", b"\nCached:")
        )
    return HostMemory(
        total_bytes=total * 1024,
        available_bytes=min(available, total) * 1024,
        swap_total_bytes=(_kb(data, b"\nSwapTotal:") or 0) * 1024,
        swap_free_bytes=(_kb(data, b"\nSwapFree:") or 0) * 1024,
    )


def parse_psi(data: bytes) -> tuple[float | None, float | None]:
    """``some``/``full`` avg10 percentages from a PSI file (``full`` is absent on old kernels)."""
    some = full = None
    for line in data.splitlines():
        kind, _, rest = line.partition(b" ")
        for token in rest.split():
            if token.startswith(b"avg10="):
                value = float(token[6:])
                if kind == b"some":
                    some = value
                elif kind == b"full":
                    full = value
                break
    return some, full


class ProcessTree:
    """RSS of a process plus all its descendants (DataLoader workers, subprocesses).

    Children come from ``/proc/<pid>/task/<tid>/children`` (every thread's own children); on
    kernels built without CONFIG_PROC_CHILDREN we fall back to scanning ``/proc/*/stat``.
    Shared pages of forked children are counted in each (as ``ps`` and psutil do).
    """

    def __init__(self, proc_root: str) -> None:
        self.proc_root = proc_root
        self._lock = threading.Lock()
        self._files: dict[str, CachedFile] = {}
        self._last_used: dict[str, int] = {}
        self._calls = 0
        self._children_supported: bool | None = None
        self._tasks: dict[int, tuple[float, list[str]]] = {}  # pid -> (listed at, children files)

    def rss(self, pid: int) -> int:
        with self._lock:
            used: set[str] = set()
            parents: dict[int, list[int]] | None = None

            def children(of: int) -> list[int]:
                nonlocal parents
                if self._children_supported is not False:
                    found = self._children(of, used)
                    # _children() may have found the kernel lacks /proc/*/children (mypy cannot see it)
                    if self._children_supported is not False:  # type: ignore[comparison-overlap]
                        return found
                if parents is None:
                    parents = self._scan_parents()
                return list(parents.get(of, ()))

            try:
                own = self._rss_of(pid, used)
                if own is None:
                    return 0
                total = own
                stack = children(pid)
                seen = {pid}
                while stack:
                    child = stack.pop()
                    if child in seen:
                        continue
                    seen.add(child)
                    rss = self._rss_of(child, used)
                    if rss is None:
                        continue
                    total += rss
                    stack.extend(children(child))
                return total
            finally:
                self._forget_unused(used)

    def _file(self, path: str, used: set[str]) -> CachedFile:
        handle = self._files.get(path)
        if handle is None:
            handle = self._files[path] = CachedFile(path)
        used.add(path)
        return handle

    def _rss_of(self, pid: int, used: set[str]) -> int | None:
        try:
            data = self._file(f"{self.proc_root}/{pid}/statm", used).read()
            return int(data.split()[1]) * PAGE_SIZE
        except (OSError, ValueError, IndexError):
            return None

    def _children_files(self, pid: int) -> list[str]:
        """``task/<tid>/children`` paths of ``pid``'s threads, listed at most every
        TASKS_CACHE_S (threads come and go rarely; a vanished one is skipped on read)."""
        now = time.monotonic()
        cached = self._tasks.get(pid)
        if cached is not None and now - cached[0] < TASKS_CACHE_S:
            return cached[1]
        task_dir = f"{self.proc_root}/{pid}/task"
        paths = [f"{task_dir}/{tid}/children" for tid in os.listdir(task_dir)]
        if len(self._tasks) > 256:
            self._tasks.clear()
        self._tasks[pid] = (now, paths)
        return paths

    def _children(self, pid: int, used: set[str]) -> list[int]:
        try:
            paths = self._children_files(pid)
        except OSError:
            return []
        children: list[int] = []
        for path in paths:
            try:
                data = self._file(path, used).read()
            except FileNotFoundError:
                if self._children_supported is None and os.path.isdir(os.path.dirname(path)):
                    self._children_supported = False  # kernel without CONFIG_PROC_CHILDREN
                    return []
                self._tasks.pop(pid, None)  # the thread ended: list them again next time
                continue
            except OSError:
                self._tasks.pop(pid, None)
                continue
            self._children_supported = True
            if data:
                children.extend(int(token) for token in data.split())
        return children

    def _scan_parents(self) -> dict[int, list[int]]:
        children_of: dict[int, list[int]] = {}
        try:
            names = os.listdir(self.proc_root)
        except OSError:
            return children_of
        for name in names:
            if not name.isdigit():
                continue
            try:
                with open(os.path.join(self.proc_root, name, "stat"), "rb") as handle:
                    stat = handle.read()
                # the command name may contain spaces and parentheses: split after the last ")"
                ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children_of.setdefault(ppid, []).append(int(name))
        return children_of

    def _forget_unused(self, used: set[str]) -> None:
        """Close files of processes/threads not seen for a while (they exited)."""
        self._calls += 1
        for path in used:
            self._last_used[path] = self._calls
        if self._calls % _PRUNE_EVERY:
            return
        for path in [
            p for p, stamp in self._last_used.items() if stamp <= self._calls - _PRUNE_EVERY
        ]:
            del self._last_used[path]
            self._files.pop(path).close()

    def close(self) -> None:
        with self._lock:
            for handle in self._files.values():
                handle.close()
            self._files.clear()
            self._last_used.clear()
