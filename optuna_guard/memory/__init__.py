"""Memory probes: system RAM (cgroup v1/v2 aware), swap, PSI, process-tree RSS and GPU memory.

Everything else in optuna-guard asks these through the :class:`MemoryProbe` interface, so tests
can inject fakes (fake /proc and /sys/fs/cgroup roots, a fake NVML).
"""

from __future__ import annotations

from optuna_guard.memory._probe import SystemProbe, default_probe, set_default_probe
from optuna_guard.memory._types import GpuMemory, MemoryProbe, SystemMemory


def system_memory() -> SystemMemory:
    """The default probe's current system reading."""
    return default_probe().system()


def process_tree_rss(pid: int | None = None) -> int:
    """RSS in bytes of ``pid`` (this process by default) and all its children."""
    import os

    return default_probe().process_tree_rss(os.getpid() if pid is None else pid)


def gpu_memory() -> list[GpuMemory]:
    """One reading per GPU; empty without a GPU."""
    return default_probe().gpus()


__all__ = [
    "GpuMemory",
    "MemoryProbe",
    "SystemMemory",
    "SystemProbe",
    "default_probe",
    "gpu_memory",
    "process_tree_rss",
    "set_default_probe",
    "system_memory",
]
