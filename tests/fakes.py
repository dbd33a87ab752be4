"""Test doubles shared by the whole suite: a scriptable memory probe, a fake NVML, RSS helpers.

Import them as ``from fakes import FakeProbe, FakeNvml, current_rss_gb`` (pytest puts the
tests directory on ``sys.path``).
"""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace
from typing import Any, Iterable, Sequence

from optuna_guard._units import GB
from optuna_guard.memory import GpuMemory, SystemMemory


def current_rss_gb() -> float:
    """RSS of this process and its children now, in GB (what limits are made relative to)."""
    from optuna_guard.memory import SystemProbe

    return SystemProbe().process_tree_rss(os.getpid()) / GB


class FakeProbe:
    """A :class:`optuna_guard.memory.MemoryProbe` whose readings the test sets.

    >>> probe = FakeProbe(available_gb=10.0)
    >>> probe.set(available_gb=1.5)     # from now on the guard sees 1.5 GB available

    ``rss_gb=None`` reports the real RSS of this process tree (useful with real allocations
    while the system figures stay fake). ``calls`` counts ``system()`` calls.
    """

    def __init__(
        self,
        *,
        total_gb: float = 16.0,
        available_gb: float = 12.0,
        rss_gb: float | None = 0.5,
        swap_total_gb: float = 0.0,
        swap_used_gb: float = 0.0,
        psi_some: float | None = None,
        psi_full: float | None = None,
        gpus: Iterable[GpuMemory] = (),
        source: str = "fake",
    ) -> None:
        self._lock = threading.Lock()
        self.total_gb = total_gb
        self.available_gb = available_gb
        self.rss_gb = rss_gb
        self.swap_total_gb = swap_total_gb
        self.swap_used_gb = swap_used_gb
        self.psi_some = psi_some
        self.psi_full = psi_full
        self.gpu_list: list[GpuMemory] = list(gpus)
        self.source = source
        self.calls = 0

    def set(self, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                if name == "gpus":
                    name, value = "gpu_list", list(value)
                if not hasattr(self, name):
                    raise AttributeError(f"FakeProbe has no reading {name!r}")
                setattr(self, name, value)

    def system(self) -> SystemMemory:
        with self._lock:
            self.calls += 1
            total = int(self.total_gb * GB)
            available = int(self.available_gb * GB)
            swap_total = int(self.swap_total_gb * GB)
            swap_used = int(self.swap_used_gb * GB)
            return SystemMemory(
                total_bytes=total,
                available_bytes=available,
                used_bytes=max(total - available, 0),
                percent=round(100.0 * (total - available) / total, 1) if total else 0.0,
                swap_total_bytes=swap_total,
                swap_used_bytes=swap_used,
                swap_percent=round(100.0 * swap_used / swap_total, 1) if swap_total else 0.0,
                psi_some_avg10=self.psi_some,
                psi_full_avg10=self.psi_full,
                source=self.source,
            )

    def process_tree_rss(self, pid: int) -> int:
        if self.rss_gb is None:
            return int(current_rss_gb() * GB)
        return int(self.rss_gb * GB)

    def gpus(self) -> list[GpuMemory]:
        with self._lock:
            return list(self.gpu_list)


class FakeNvmlError(Exception):
    pass


class FakeNvml:
    """The slice of the ``pynvml`` API the GPU probe uses, over a list of (name, total, used) bytes.

    ``fail_init=True`` behaves like a machine without a driver (``nvmlInit`` raises);
    ``uuids`` gives each device a UUID (for CUDA_VISIBLE_DEVICES=GPU-... filtering).
    """

    NVMLError = FakeNvmlError

    def __init__(self, devices: Sequence[tuple[str, int, int]] = (), *, fail_init: bool = False, uuids: Sequence[str] | None = None) -> None:
        self.devices = [list(d) for d in devices]
        self.fail_init = fail_init
        self.uuids = list(uuids) if uuids is not None else [f"GPU-fake-{i}" for i in range(len(self.devices))]
        self.init_calls = 0
        self.memory_calls = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.fail_init:
            raise FakeNvmlError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return self.devices[handle][0].encode()

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self.uuids[handle]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        self.memory_calls += 1
        _name, total, used = self.devices[handle]
        return SimpleNamespace(total=total, used=used, free=total - used)
