"""SystemProbe: the one place that reads psutil, /proc, /sys/fs/cgroup and NVML.

TODO(guard helper): cgroup v1/v2 chain, PSI, GPU via _cgroup.py / _psi.py / _gpu.py.
This first version reads psutil only so the rest of the package can be built against it.
"""

from __future__ import annotations

import threading

import psutil

from optuna_guard.memory._types import GpuMemory, MemoryProbe, SystemMemory


class SystemProbe:
    """Reads the real machine. ``proc_root`` and ``cgroup_root`` let tests point at fake trees."""

    def __init__(self, *, proc_root: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> None:
        self.proc_root = proc_root
        self.cgroup_root = cgroup_root

    def system(self) -> SystemMemory:
        vm = psutil.virtual_memory()
        sw = psutil.swap_memory()
        return SystemMemory(
            total_bytes=int(vm.total),
            available_bytes=int(vm.available),
            used_bytes=int(vm.total - vm.available),
            percent=float(vm.percent),
            swap_total_bytes=int(sw.total),
            swap_used_bytes=int(sw.used),
            swap_percent=float(sw.percent),
        )

    def process_tree_rss(self, pid: int) -> int:
        try:
            proc = psutil.Process(pid)
            total = proc.memory_info().rss
            for child in proc.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            return int(total)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return 0

    def gpus(self) -> list[GpuMemory]:
        return []


_default: MemoryProbe | None = None
_lock = threading.Lock()


def default_probe() -> MemoryProbe:
    """The process-wide probe (a :class:`SystemProbe` unless a test or user set another)."""
    global _default
    if _default is None:
        with _lock:
            if _default is None:
                _default = SystemProbe()
    return _default


def set_default_probe(probe: MemoryProbe | None) -> None:
    """Replace the process-wide probe (``None`` restores the real one). Used by tests."""
    global _default
    with _lock:
        _default = probe
