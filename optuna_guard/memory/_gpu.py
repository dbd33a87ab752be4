"""GPU memory through NVML (``nvidia-ml-py``, module ``pynvml``), else torch if already loaded.

No GPU, no driver, no NVML library or an NVML error all mean "no GPU data" (an empty list),
never an exception: the guard must run the same on a laptop and on a GPU node. NVML is
initialised once per process (the first call costs milliseconds; a reading costs microseconds).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from typing import Any

from optuna_guard._logging import get_logger
from optuna_guard.memory._types import GpuMemory

_log = get_logger(__name__)


def _decode(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _visible_filter(
    environ: dict[str, str] | os._Environ[str],
) -> tuple[set[int] | None, set[str] | None, bool]:
    """Which NVML devices this process may use, from CUDA_VISIBLE_DEVICES.

    Returns (indices, uuids, none_visible). NVML ignores the variable, so we apply it: integer
    entries are NVML indices (exact with CUDA_DEVICE_ORDER=PCI_BUS_ID, the usual cluster
    setting), ``GPU-...`` entries are UUIDs; MIG entries are not filtered.
    """
    raw = environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None, None, False
    entries = [e.strip() for e in raw.split(",") if e.strip()]
    if not entries or entries[0] == "-1" or raw.strip() == "":
        return None, None, True
    indices: set[int] = set()
    uuids: set[str] = set()
    for entry in entries:
        if entry.lstrip("-").isdigit():
            if int(entry) < 0:
                break  # CUDA stops at the first invalid entry
            indices.add(int(entry))
        elif entry.startswith("GPU-"):
            uuids.add(entry)
        else:
            return None, None, False  # MIG or something we do not understand: no filtering
    return (indices or None), (uuids or None), False


class GpuReader:
    """Device-wide memory of every visible GPU.

    ``nvml`` injects a module with the pynvml API (tests pass a fake); ``None`` imports
    ``pynvml`` on first use. ``torch_fallback`` reads ``torch.cuda.mem_get_info`` for the
    current device when NVML is unusable, but only if torch is already imported and CUDA
    already initialised (importing torch or creating a CUDA context here would cost seconds
    and hundreds of MB of GPU memory).
    """

    def __init__(
        self, nvml: Any = None, *, torch_fallback: bool = True, environ: Any = None
    ) -> None:
        self._nvml_module = nvml
        self._torch_fallback = torch_fallback
        self._environ = os.environ if environ is None else environ
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._devices: list[tuple[int, str, Any]] | None = None  # (index, name, handle)
        self._failed = False

    def reset(self) -> None:
        """Forget NVML state (after fork: NVML handles do not survive it, and another thread
        may have held the lock at the moment of the fork)."""
        self._lock = threading.Lock()
        self._nvml = None
        self._devices = None
        self._failed = False

    def read(self) -> list[GpuMemory]:
        devices = self._devices
        if devices is None and not self._failed:
            devices = self._init()
        if devices is not None:
            try:
                readings = []
                for index, name, handle in devices:
                    info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                    readings.append(
                        GpuMemory(
                            index=index,
                            name=name,
                            total_bytes=int(info.total),
                            used_bytes=int(info.used),
                        )
                    )
                return readings
            except Exception as exc:  # a GPU fell off the bus, the driver was reloaded...
                _log.warning(
                    "Reading GPU memory through NVML failed (%s); GPU limits are not checked from now on.",
                    exc,
                )
                self._devices = None
                self._failed = True
        return self._read_torch() if self._torch_fallback else []

    def _init(self) -> list[tuple[int, str, Any]] | None:
        with self._lock:
            if self._devices is not None or self._failed:
                return self._devices
            try:
                nvml = self._nvml_module or importlib.import_module("pynvml")
                nvml.nvmlInit()
                indices, uuids, none_visible = _visible_filter(self._environ)
                devices = []
                if not none_visible:
                    for index in range(int(nvml.nvmlDeviceGetCount())):
                        handle = nvml.nvmlDeviceGetHandleByIndex(index)
                        if indices is not None and index not in indices:
                            continue
                        if (
                            uuids is not None
                            and _decode(nvml.nvmlDeviceGetUUID(handle)) not in uuids
                        ):
                            continue
                        devices.append((index, _decode(nvml.nvmlDeviceGetName(handle)), handle))
            except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded...
                _log.debug(
                    "NVML is not usable (%s); GPU memory comes from torch if it is loaded, else none.",
                    exc,
                )
                self._failed = True
                return None
            self._nvml = nvml
            self._devices = devices
            return devices

    @staticmethod
    def _read_torch() -> list[GpuMemory]:
        torch = sys.modules.get("torch")
        if torch is None:
            return []
        try:
            cuda = torch.cuda
            if not cuda.is_initialized():
                return []
            index = cuda.current_device()
            free, total = cuda.mem_get_info(index)
            return [
                GpuMemory(
                    index=index,
                    name=str(cuda.get_device_name(index)),
                    total_bytes=int(total),
                    used_bytes=int(total - free),
                )
            ]
        except Exception:
            return []
