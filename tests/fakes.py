"""Test doubles shared by the whole suite: a scriptable memory probe, a fake NVML, RSS helpers.

Import them as ``from fakes import FakeProbe, FakeNvml, current_rss_gb`` (pytest puts the
tests directory on ``sys.path``).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

from optuna_guard.testing import FakeProbe, current_rss_gb  # noqa: F401  (public API now)


class FakeNvmlError(Exception):
    pass


class FakeNvml:
    """The slice of the ``pynvml`` API the GPU probe uses, over a list of (name, total, used) bytes.

    ``fail_init=True`` behaves like a machine without a driver (``nvmlInit`` raises);
    ``uuids`` gives each device a UUID (for CUDA_VISIBLE_DEVICES=GPU-... filtering).
    """

    NVMLError = FakeNvmlError

    def __init__(
        self,
        devices: Sequence[tuple[str, int, int]] = (),
        *,
        fail_init: bool = False,
        uuids: Sequence[str] | None = None,
    ) -> None:
        self.devices = [list(d) for d in devices]
        self.fail_init = fail_init
        self.uuids = (
            list(uuids)
            if uuids is not None
            else [f"GPU-fake-{i}" for i in range(len(self.devices))]
        )
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
