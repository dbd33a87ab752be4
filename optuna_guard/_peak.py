"""The process's own peak RSS over a trial, from the kernel's high-water mark.

Why: the guard's watcher samples memory (less often while a trial is far from its limits), so
a short spike between two readings would be missing from ``peak_rss_gb``, which the OOM-aware
sampler learns from. Linux keeps the exact peak (``VmHWM`` in ``/proc/self/status``) and lets a
process reset it to its current RSS (``echo 5 > /proc/self/clear_refs``, Linux 4.0+). It covers
this process only; children (data loaders) are still sampled.
"""

from __future__ import annotations

from optuna_guard._logging import get_logger

_log = get_logger("optuna_guard.peak")
_usable: bool | None = None  # None: not tried yet


def reset_own_peak() -> bool:
    """Set the high-water mark to the RSS now; False where the kernel does not allow it."""
    global _usable
    if _usable is False:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError as exc:
        if _usable is None:
            _log.debug("No resettable peak RSS here (%s); the guard's samples give the peak.", exc)
        _usable = False
        return False
    _usable = True
    return True


def own_peak_bytes() -> int | None:
    """The process's peak RSS since the last reset (or its start), in bytes."""
    try:
        with open("/proc/self/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
