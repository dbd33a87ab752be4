"""Process-wide stop and checkpoint requests, set by signal handlers and read at trial boundaries.

Signal handlers only set these flags (logging or I/O inside a handler can deadlock); the work
happens at the next boundary: ``check_memory``, the guard's sampler, ``trial.report`` through
the pruners, or ``TrialCheckpointer.save``.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from optuna_guard import tags
from optuna_guard.exceptions import GuardError

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


class TrialPreempted(GuardError):
    """Raised inside a trial asked to stop (SIGTERM, SIGINT, time budget).

    The trial ends FAIL (samplers learn nothing from it: the config was not at fault), tagged
    ``preempted=True`` with a ``kill_reason``, and the launcher may retry it later.
    """


def raise_if_stop_requested(trial: Any) -> None:
    """At a trial boundary: if a stop was requested, tag the trial and raise TrialPreempted."""
    if not _stop.is_set():
        return
    reason = f"preempted: {stop_reason()}"
    try:
        trial.set_user_attr(tags.PREEMPTED, True)
        trial.set_user_attr(tags.KILL_REASON, reason)
    except Exception:  # the trial may already be finished; stopping matters more than the tag
        pass
    raise TrialPreempted(f"Trial #{getattr(trial, 'number', '?')} {reason}")


def _on_stop_signal(signum: int, _frame: Any) -> None:
    request_stop(signal.Signals(signum).name)


def _on_checkpoint_signal(_signum: int, _frame: Any) -> None:
    request_checkpoint()


def install_signal_handlers(
    stop_signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
    checkpoint_signals: tuple[int, ...] = (signal.SIGUSR1,),
) -> None:
    """In a worker's main thread: SIGTERM/SIGINT request a stop, SIGUSR1 a checkpoint."""
    for signum in stop_signals:
        signal.signal(signum, _on_stop_signal)
    for signum in checkpoint_signals:
        signal.signal(signum, _on_checkpoint_signal)
