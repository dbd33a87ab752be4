"""Process-wide stop and checkpoint requests, set by signal handlers and read at trial boundaries.

Signal handlers only set these flags (logging or I/O inside a handler can deadlock); the work
happens at the next boundary: ``check_memory``, the guard's sampler, ``trial.report`` through
the pruners, or ``TrialCheckpointer.save``.
"""

from __future__ import annotations

import threading

_stop = threading.Event()
_checkpoint = threading.Event()
_stop_reason: list[str] = ["stop requested"]


def request_stop(reason: str = "stop requested") -> None:
    """Ask the running trial to stop at its next boundary (safe to call from a signal handler)."""
    _stop_reason[0] = reason
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def stop_reason() -> str:
    return _stop_reason[0]


def request_checkpoint() -> None:
    """Ask the running trial to save a checkpoint at its next boundary and go on."""
    _checkpoint.set()


def checkpoint_requested() -> bool:
    return _checkpoint.is_set()


def consume_checkpoint_request() -> bool:
    """True once per request: the caller saves a checkpoint now."""
    if _checkpoint.is_set():
        _checkpoint.clear()
        return True
    return False


def reset() -> None:
    """Clear both flags (a new worker, or tests)."""
    _stop.clear()
    _checkpoint.clear()
    _stop_reason[0] = "stop requested"
