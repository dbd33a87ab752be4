"""SystemProbe: the one place that reads /proc, /sys/fs/cgroup and NVML.

A reading takes whichever constraint is tighter: the host (``MemAvailable``) or any cgroup
level above this process whose limit is below the host's RAM (headroom = limit - working set).
Static facts (the cgroup chain and its limits, NVML handles, open file descriptors) are
cached, so one ``system()`` call costs a couple of ``pread``s.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any

from optuna_guard.memory._cgroup import ENV_SKIP_CGROUP, CgroupLevel, discover_levels
from optuna_guard.memory._files import CachedFile
from optuna_guard.memory._gpu import GpuReader
from optuna_guard.memory._procfs import ProcessTree, parse_meminfo, parse_psi
from optuna_guard.memory._types import GpuMemory, MemoryProbe, SystemMemory

# cgroup limits rarely change (``docker update``, systemd ``set-property``); re-discover the
# chain now and then rather than on every sample.
CGROUP_REFRESH_S = 30.0
# The kernel recomputes PSI averages every 2 s; reading them more often only costs time.
PSI_CACHE_S = 1.0

_probes: weakref.WeakSet[SystemProbe] = weakref.WeakSet()


class SystemProbe:
    """Reads the real machine. ``proc_root`` and ``cgroup_root`` let tests point at fake trees.

    ``nvml`` injects a pynvml-like module (a fake in tests; ``None`` imports ``pynvml`` lazily);
    ``torch_fallback`` allows ``torch.cuda.mem_get_info`` when NVML is unusable.
    """

    def __init__(
        self,
        *,
        proc_root: str = "/proc",
        cgroup_root: str = "/sys/fs/cgroup",
        nvml: Any = None,
        torch_fallback: bool = True,
    ) -> None:
        self.proc_root = proc_root
        self.cgroup_root = cgroup_root
        self._meminfo = CachedFile(os.path.join(proc_root, "meminfo"))
        self._psi = CachedFile(os.path.join(proc_root, "pressure", "memory"))
        self._psi_missing = False
        self._psi_cache: tuple[float, tuple[float | None, float | None]] | None = None
        self._levels: list[CgroupLevel] = []
        self._levels_at = -float("inf")
        self._levels_lock = threading.Lock()
        self._tree = ProcessTree(proc_root)
        self._gpu = GpuReader(nvml, torch_fallback=torch_fallback)
        _probes.add(self)

    def __repr__(self) -> str:
        return f"SystemProbe(proc_root={self.proc_root!r}, cgroup_root={self.cgroup_root!r})"

    # -- RAM, swap, PSI -------------------------------------------------------------------------

    def system(self) -> SystemMemory:
        host = parse_meminfo(self._meminfo.read())
        total, available, source = host.total_bytes, host.available_bytes, "host"
        swap_total = host.swap_total_bytes
        swap_used = max(host.swap_total_bytes - host.swap_free_bytes, 0)
        for level in self._cgroup_levels(host.total_bytes, host.swap_total_bytes):
            try:
                used = level.read_used()
            except (OSError, ValueError, IndexError):
                self._levels_at = -float("inf")  # the cgroup moved or vanished: rediscover
                continue
            headroom = max(level.limit_bytes - used, 0)
            if headroom < available:
                total, available, source = level.limit_bytes, headroom, level.source
                if level.swap_limit_bytes is not None:
                    cgroup_swap = level.read_swap_used()
                    if cgroup_swap is not None:
                        swap_total, swap_used = level.swap_limit_bytes, cgroup_swap
        some, full = self._read_psi()
        used_bytes = max(total - available, 0)
        return SystemMemory(
            total_bytes=total,
            available_bytes=available,
            used_bytes=used_bytes,
            percent=round(100.0 * used_bytes / total, 1) if total else 0.0,
            swap_total_bytes=swap_total,
            swap_used_bytes=swap_used,
            swap_percent=round(100.0 * swap_used / swap_total, 1) if swap_total else 0.0,
            psi_some_avg10=some,
            psi_full_avg10=full,
            source=source,
        )

    def _cgroup_levels(self, host_total: int, host_swap: int) -> list[CgroupLevel]:
        now = time.monotonic()
        if now - self._levels_at < CGROUP_REFRESH_S:
            return self._levels
        with self._levels_lock:
            if now - self._levels_at >= CGROUP_REFRESH_S:
                old = self._levels
                self._levels = discover_levels(
                    self.proc_root,
                    self.cgroup_root,
                    host_total,
                    host_swap,
                    skip_directory=os.environ.get(ENV_SKIP_CGROUP),
                )
                self._levels_at = now
                for level in old:
                    level.close()
        return self._levels

    def _read_psi(self) -> tuple[float | None, float | None]:
        """PSI avg10, re-read at most every PSI_CACHE_S (the kernel updates it every 2 s)."""
        if self._psi_missing:
            return None, None
        now = time.monotonic()
        cached = self._psi_cache
        if cached is not None and now - cached[0] < PSI_CACHE_S:
            return cached[1]
        try:
            values = parse_psi(self._psi.read())
        except (OSError, ValueError):
            # no PSI in this kernel (or disabled with psi=0): do not try again every sample
            self._psi_missing = True
            return None, None
        self._psi_cache = (now, values)
        return values

    # -- processes and GPUs ---------------------------------------------------------------------

    def process_tree_rss(self, pid: int) -> int:
        return self._tree.rss(pid)

    def gpus(self) -> list[GpuMemory]:
        return self._gpu.read()

    def cgroup_sources(self) -> list[tuple[str, str, int]]:
        """(source, directory, limit bytes) of every effective cgroup limit; for diagnostics."""
        host = parse_meminfo(self._meminfo.read())
        return [
            (lv.source, lv.directory, lv.limit_bytes)
            for lv in self._cgroup_levels(host.total_bytes, host.swap_total_bytes)
        ]

    def _after_fork(self) -> None:
        self._levels_lock = threading.Lock()
        self._levels_at = -float("inf")
        self._tree = ProcessTree(self.proc_root)
        self._gpu.reset()


def _reset_after_fork() -> None:
    for probe in list(_probes):
        probe._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


_default: MemoryProbe | None = None
_lock = threading.Lock()


def default_probe() -> MemoryProbe:
    """The process-wide probe (a :class:`SystemProbe` unless a test or user set another)."""
    global _default
    probe = _default
    if probe is None:
        with _lock:
            if _default is None:
                _default = SystemProbe()
            probe = _default
    return probe


def set_default_probe(probe: MemoryProbe | None) -> None:
    """Replace the process-wide probe (``None`` restores the real one). Used by tests."""
    global _default
    with _lock:
        _default = probe
