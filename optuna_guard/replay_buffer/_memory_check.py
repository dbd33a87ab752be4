"""Up-front memory check for a preallocated buffer: refuse (or warn) BEFORE allocating.

``torch.empty`` (like ``np.zeros``) only reserves address space; the pages are committed as the
buffer fills, so an oversized buffer does not fail at construction but hours later, mid-trial,
as an OOM kill (SB3#37, pytorch/rl#2065). Checking the size against what is available now
(cgroup aware, through the guard's memory probe; free GPU memory for a CUDA buffer) turns that
into an immediate, explained error.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING

from optuna_guard._logging import get_logger
from optuna_guard._units import GB, MB
from optuna_guard.exceptions import ConfigError, InsufficientMemoryError
from optuna_guard.memory import MemoryProbe, default_probe
from optuna_guard.replay_buffer._torch import import_torch

if TYPE_CHECKING:
    import torch

_log = get_logger(__name__)

ON_INSUFFICIENT = ("raise", "warn", "ignore")

# The margin is max(safety_margin * nbytes, MIN_MARGIN_BYTES): the rest of the trial (model,
# optimizer state, sampled batches, allocator slack) needs memory too, and a buffer that leaves
# nothing would only move the OOM kill from the buffer to the next allocation.
DEFAULT_SAFETY_MARGIN = 0.10
MIN_MARGIN_BYTES = 256 * MB


class InsufficientMemoryWarning(RuntimeWarning):
    """Emitted instead of :class:`InsufficientMemoryError` when ``on_insufficient="warn"``."""


@dataclasses.dataclass(frozen=True)
class MemoryCheck:
    """The numbers behind one check, in bytes; ``where`` names the memory that was asked."""

    needed_bytes: int
    margin_bytes: int
    available_bytes: int
    where: str

    @property
    def fits(self) -> bool:
        return self.needed_bytes + self.margin_bytes <= self.available_bytes


def validate_on_insufficient(value: str) -> str:
    if value not in ON_INSUFFICIENT:
        raise ConfigError(
            f"on_insufficient must be one of {', '.join(ON_INSUFFICIENT)} but got {value!r}."
        )
    return value


def validate_safety_margin(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 10:
        raise ConfigError(
            f"safety_margin is a fraction of the buffer size between 0 and 10 but got {value!r}."
        )
    return float(value)


def margin_bytes(nbytes: int, safety_margin: float) -> int:
    return int(max(nbytes * safety_margin, MIN_MARGIN_BYTES))


def available_memory(device: torch.device, probe: MemoryProbe | None) -> tuple[int, str]:
    """Bytes a new allocation on ``device`` can use now, and a description for messages.

    CPU (also pinned): the probe's ``available_bytes`` (cgroup headroom inside a container).
    CUDA: without an explicit probe, ``torch.cuda.mem_get_info`` (driver-wide free memory, so
    other processes count) plus what this process's caching allocator holds but does not use;
    with an explicit probe, the free memory of the probe's GPU with the CUDA index (tests).
    """
    if device.type == "cuda":
        if probe is not None:
            for gpu in probe.gpus():
                if gpu.index == device.index:
                    return gpu.free_bytes, f"GPU memory free on {device}"
            return 0, f"GPU memory free on {device} (the probe reports no such GPU)"
        torch = import_torch()
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0)), f"GPU memory free on {device}"
    reading = (probe if probe is not None else default_probe()).system()
    return reading.available_bytes, f"RAM available ({reading.source})"


def max_rows_that_fit(available: int, bytes_per_row: int, safety_margin: float) -> int:
    """Largest capacity whose buffer plus margin fits in ``available`` bytes."""
    # needed + margin = max(rows * row * (1 + f), rows * row + MIN): both must fit.
    by_fraction = available / (bytes_per_row * (1 + safety_margin))
    by_floor = (available - MIN_MARGIN_BYTES) / bytes_per_row
    return max(int(min(by_fraction, by_floor)), 0)


def check_fits(
    nbytes: int,
    *,
    device: torch.device,
    probe: MemoryProbe | None,
    safety_margin: float,
    on_insufficient: str,
    what: str,
    bytes_per_row: int,
) -> MemoryCheck:
    """Compare ``nbytes`` (+ margin) with the available memory; raise, warn or pass."""
    available, where = available_memory(device, probe)
    check = MemoryCheck(
        needed_bytes=nbytes,
        margin_bytes=margin_bytes(nbytes, safety_margin),
        available_bytes=available,
        where=where,
    )
    if check.fits or on_insufficient == "ignore":
        return check
    max_rows = max_rows_that_fit(available, bytes_per_row, safety_margin)
    message = (
        f"{what} needs {nbytes / GB:.2f} GB + {check.margin_bytes / GB:.2f} GB safety margin = "
        f"{(nbytes + check.margin_bytes) / GB:.2f} GB > {available / GB:.2f} GB of {where}; "
        + (
            f"use capacity <= {max_rows:,}, smaller field dtypes, or free memory first."
            if max_rows
            else "free memory first (not even one row fits next to the minimum margin)."
        )
    )
    if on_insufficient == "raise":
        raise InsufficientMemoryError(message)
    _log.warning("%s Allocating anyway (on_insufficient='warn').", message)
    warnings.warn(message, InsufficientMemoryWarning, stacklevel=3)
    return check
