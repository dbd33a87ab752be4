"""Deciding whether a memory reading trips a limit, and saying which and why in a sentence.

Shared by ``check_memory``, the guard's watcher thread and ``MemoryGuardPruner`` so that all
three stop a trial for the same reasons and tag it the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from optuna_guard._units import GB
from optuna_guard.limits import MemoryLimits
from optuna_guard.memory import GpuMemory, SystemMemory


@dataclasses.dataclass(frozen=True)
class Trip:
    """A limit that tripped: ``limit`` is the MemoryLimits field name (the ``kill_limit`` tag),
    ``detail`` a short sentence ("available 1.80 GB < 2.00 GB")."""

    limit: str
    detail: str
    available_bytes: int


def _gb_pair(value_bytes: float, limit_gb: float) -> tuple[str, str]:
    """Both numbers in GB with 2 decimals, or 3 when 2 would print them equal."""
    value, limit = f"{value_bytes / GB:.2f}", f"{limit_gb:.2f}"
    if value == limit:
        value, limit = f"{value_bytes / GB:.3f}", f"{limit_gb:.3f}"
    return value, limit


def needs_rss(limits: MemoryLimits) -> bool:
    return limits.max_trial_rss_gb is not None


def needs_gpu(limits: MemoryLimits) -> bool:
    return limits.max_gpu_percent is not None


def find_trip(
    limits: MemoryLimits,
    system: SystemMemory,
    rss_bytes: int | None = None,
    gpus: Sequence[GpuMemory] = (),
    *,
    available_name: str = "min_available_gb",
) -> Trip | None:
    """The first limit the reading violates, in a fixed order, or None.

    ``available_name`` names the available-memory limit in the tag (``check_memory`` calls it
    ``safe_threshold_gb``, after its argument).
    """
    available = system.available_bytes
    if limits.min_available_gb is not None and available < limits.min_available_gb * GB:
        value, limit = _gb_pair(available, limits.min_available_gb)
        return Trip(available_name, f"available {value} GB < {limit} GB", available)
    if limits.max_ram_percent is not None and system.percent > limits.max_ram_percent:
        return Trip(
            "max_ram_percent",
            f"RAM {system.percent:.1f}% used > {limits.max_ram_percent:g}%",
            available,
        )
    if (
        limits.max_swap_percent is not None
        and system.swap_total_bytes
        and system.swap_percent > limits.max_swap_percent
    ):
        return Trip(
            "max_swap_percent",
            f"swap {system.swap_percent:.1f}% used > {limits.max_swap_percent:g}%",
            available,
        )
    if (
        limits.max_trial_rss_gb is not None
        and rss_bytes is not None
        and rss_bytes > limits.max_trial_rss_gb * GB
    ):
        value, limit = _gb_pair(rss_bytes, limits.max_trial_rss_gb)
        return Trip("max_trial_rss_gb", f"process tree RSS {value} GB > {limit} GB", available)
    if limits.max_gpu_percent is not None:
        for gpu in gpus:
            if gpu.percent > limits.max_gpu_percent:
                return Trip(
                    "max_gpu_percent",
                    f"GPU {gpu.index} memory {gpu.percent:.1f}% used > "
                    f"{limits.max_gpu_percent:g}%",
                    available,
                )
    return None


def below_warning(limits: MemoryLimits, system: SystemMemory) -> bool:
    return (
        limits.warn_available_gb is not None
        and system.available_bytes < limits.warn_available_gb * GB
    )


def headroom_and_rate(
    limits: MemoryLimits,
    system: SystemMemory,
    rss_bytes: int | None,
    previous: tuple[float, SystemMemory, int | None] | None,
    now: float,
) -> float | None:
    """Seconds until the nearest limit is reached at the current growth rate (None: not
    approaching any). The watcher uses it to sample faster when a runaway allocation nears a
    limit, so it overshoots by milliseconds of growth instead of a whole sampling period."""
    if previous is None:
        return None
    then, old, old_rss = previous
    elapsed = now - then
    if elapsed <= 0:
        return None
    eta: float | None = None

    def consider(headroom: float, growth: float) -> None:
        nonlocal eta
        if growth <= 0:
            return
        seconds = max(headroom, 0.0) / (growth / elapsed)
        eta = seconds if eta is None else min(eta, seconds)

    if limits.min_available_gb is not None:
        consider(
            system.available_bytes - limits.min_available_gb * GB,
            old.available_bytes - system.available_bytes,
        )
    if limits.max_ram_percent is not None:
        consider(
            limits.max_ram_percent / 100.0 * system.total_bytes - system.used_bytes,
            system.used_bytes - old.used_bytes,
        )
    if limits.max_swap_percent is not None and system.swap_total_bytes:
        consider(
            limits.max_swap_percent / 100.0 * system.swap_total_bytes - system.swap_used_bytes,
            system.swap_used_bytes - old.swap_used_bytes,
        )
    if limits.max_trial_rss_gb is not None and rss_bytes is not None and old_rss is not None:
        consider(limits.max_trial_rss_gb * GB - rss_bytes, rss_bytes - old_rss)
    return eta


# earlyoom's assumed fastest fill rate of RAM (6,000 KiB per ms): how fast a runaway allocation
# can plausibly eat the headroom between two readings.
FILL_RATE_BYTES_PER_S = 6000 * 1024 * 1000
RELAXED_INTERVAL_CAP_S = 1.0  # earlyoom's longest sleep


def headroom_bytes(
    limits: MemoryLimits,
    system: SystemMemory,
    rss_bytes: int | None = None,
    gpus: Sequence[GpuMemory] = (),
) -> float | None:
    """Bytes between the reading and the nearest limit (None: no limit applies)."""
    rooms: list[float] = []
    if limits.min_available_gb is not None:
        rooms.append(system.available_bytes - limits.min_available_gb * GB)
    if limits.max_ram_percent is not None:
        rooms.append(limits.max_ram_percent / 100.0 * system.total_bytes - system.used_bytes)
    if limits.max_swap_percent is not None and system.swap_total_bytes:
        rooms.append(
            limits.max_swap_percent / 100.0 * system.swap_total_bytes - system.swap_used_bytes
        )
    if limits.max_trial_rss_gb is not None and rss_bytes is not None:
        rooms.append(limits.max_trial_rss_gb * GB - rss_bytes)
    if limits.max_gpu_percent is not None:
        rooms.extend(
            limits.max_gpu_percent / 100.0 * gpu.total_bytes - gpu.used_bytes for gpu in gpus
        )
    return min(rooms) if rooms else None


def relaxed_interval(limits: MemoryLimits, headroom: float | None) -> float:
    """The watcher's next reading, earlyoom-style: every ``interval`` near a limit, less often
    (up to 10 intervals, at most 1 s) while the headroom could not be eaten sooner at
    :data:`FILL_RATE_BYTES_PER_S`. A week of 0.1 s readings of a quiet trial is ~0.3 % of a
    core taken from it; a trial that nears a limit is read at the full pace again."""
    interval = limits.interval
    longest = max(interval, min(10 * interval, RELAXED_INTERVAL_CAP_S))
    if headroom is None:
        return longest
    return min(max(headroom / FILL_RATE_BYTES_PER_S, interval), longest)
