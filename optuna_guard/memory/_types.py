"""Readings returned by the memory probes: frozen, in bytes, with GB conveniences."""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

from optuna_guard._units import GB


@dataclasses.dataclass(frozen=True)
class SystemMemory:
    """RAM and swap as the current process can use them.

    Inside a cgroup whose limit is below the host's RAM, ``total_bytes`` is the cgroup limit and
    ``available_bytes`` its headroom (limit minus usage, page cache not counted as used).
    ``source`` says where the numbers came from: "host", "cgroup v1" or "cgroup v2".
    PSI values are the ``avg10`` percentages of /proc/pressure/memory, ``None`` where absent.
    """

    total_bytes: int
    available_bytes: int
    used_bytes: int
    percent: float
    swap_total_bytes: int = 0
    swap_used_bytes: int = 0
    swap_percent: float = 0.0
    psi_some_avg10: float | None = None
    psi_full_avg10: float | None = None
    source: str = "host"

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GB

    @property
    def available_gb(self) -> float:
        return self.available_bytes / GB

    @property
    def used_gb(self) -> float:
        return self.used_bytes / GB


@dataclasses.dataclass(frozen=True)
class GpuMemory:
    """Memory of one GPU device, device-wide (all processes)."""

    index: int
    name: str
    total_bytes: int
    used_bytes: int

    @property
    def free_bytes(self) -> int:
        return max(self.total_bytes - self.used_bytes, 0)

    @property
    def percent(self) -> float:
        return 100.0 * self.used_bytes / self.total_bytes if self.total_bytes else 0.0

    @property
    def used_gb(self) -> float:
        return self.used_bytes / GB


@runtime_checkable
class MemoryProbe(Protocol):
    """What the guard, the pruner, the supervisor and the replay buffer ask about memory.

    Tests inject fakes that implement these three methods.
    """

    def system(self) -> SystemMemory:
        """Current RAM/swap/PSI reading (cgroup aware)."""

    def process_tree_rss(self, pid: int) -> int:
        """RSS in bytes of ``pid`` plus all its descendants; 0 if the process is gone."""

    def gpus(self) -> list[GpuMemory]:
        """One reading per visible GPU; an empty list when there is no GPU, driver or NVML."""
