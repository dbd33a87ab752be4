"""Process-wide stop and checkpoint requests, set by signal handlers and read at trial boundaries.

Signal handlers only set these flags (logging or I/O inside a handler can deadlock); the work
happens at the next boundary: ``check_memory``, the guard's sampler, ``trial.report`` through
the pruners, or ``TrialCheckpointer.save``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from optuna_guard import tags
from optuna_guard._logging import get_logger
from optuna_guard.exceptions import GuardError

_log = get_logger(__name__)

_stop = threading.Event()
_checkpoint = threading.Event()
_stop_reason: list[str] = ["stop requested"]
_stop_is_preemption: list[bool] = [True]


def request_stop(reason: str = "stop requested", *, preempted: bool = True) -> None:
    """Ask the running trial to stop at its next boundary (safe to call from a signal handler).

    ``preempted=False``: the supervisor is killing the trial (memory, timeout) and sends its own
    tags; the boundary then writes only the reason, never ``preempted``.
    """
    if preempted and _stop.is_set() and not _stop_is_preemption[0]:
        return  # the supervisor's kill came first; its SIGTERM is part of that kill
    _stop_reason[0] = reason
    _stop_is_preemption[0] = preempted
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def stop_reason() -> str:
    return _stop_reason[0]


def stop_tags() -> dict[str, Any]:
    """The tags a boundary writes for the requested stop: ``preempted`` + reason for a
    preemption (signal, time budget, lost supervisor), only the reason for a kill."""
    if _stop_is_preemption[0]:
        return tags.preempted(stop_reason())
    return {tags.KILL_REASON: stop_reason()}


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
    _stop_is_preemption[0] = True


class TrialPreempted(GuardError):
    """Raised inside a trial asked to stop (SIGTERM, SIGINT, time budget).

    The trial ends FAIL (samplers learn nothing from it: the config was not at fault), tagged
    ``preempted=True`` with a ``kill_reason``, and the launcher may retry it later.
    """


def raise_if_stop_requested(trial: Any) -> None:
    """At a trial boundary: if a stop was requested, tag the trial and raise TrialPreempted."""
    if not _stop.is_set():
        return
    attrs = stop_tags()
    try:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
    except Exception:  # the trial may already be finished; stopping matters more than the tag
        pass
    raise TrialPreempted(f"Trial #{getattr(trial, 'number', '?')} {attrs[tags.KILL_REASON]}")


def raise_if_stop_requested_in_pruner(study: Any, frozen_trial: Any) -> None:
    """The same boundary for code that holds a FrozenTrial (a pruner's ``prune``): tags go to
    the storage directly, since a FrozenTrial cannot write them."""
    if not _stop.is_set():
        return
    attrs = stop_tags()
    try:
        for key, value in attrs.items():
            study._storage.set_trial_user_attr(frozen_trial._trial_id, key, value)
    except Exception:  # the trial may already be finished; stopping matters more than the tag
        pass
    raise TrialPreempted(f"Trial #{frozen_trial.number} {attrs[tags.KILL_REASON]}")


def stop_study_if_requested(study: Any, _trial: Any = None) -> None:
    """A ``study.optimize`` callback: after a trial, stop the loop if a stop was requested.

    Needed when ``catch`` swallows TrialPreempted (e.g. ``catch=(Exception,)``): otherwise the
    loop would start trial after trial, each preempted at its first boundary.
    """
    if _stop.is_set():
        study.stop()


@contextlib.contextmanager
def exit_on_preemption(
    exit_code: int = 99, *, exit: Callable[[int], Any] | None = None
) -> Iterator[None]:
    """Around a worker's ``study.optimize``: a TrialPreempted (or a stop request seen after the
    loop) ends the process with ``exit_code`` (99, "requeue me"), after the trial was tagged."""
    do_exit = exit if exit is not None else _exit
    try:
        yield
    except TrialPreempted as exc:
        _log.warning("%s; exiting with code %d so the job can be requeued.", exc, exit_code)
        do_exit(exit_code)
        return
    if _stop.is_set():
        _log.warning(
            "Stopped (%s); exiting with code %d so the job can be requeued.",
            stop_reason(),
            exit_code,
        )
        do_exit(exit_code)


def _exit(code: int) -> None:
    raise SystemExit(code)


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


@contextlib.contextmanager
def handling_signals(
    stop_signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
    checkpoint_signals: tuple[int, ...] = (signal.SIGUSR1,),
) -> Iterator[None]:
    """``install_signal_handlers`` for the duration of a block, then the previous handlers are
    put back (the flags stay as they are: the caller decides what a stop means afterwards)."""
    previous = {
        signum: signal.getsignal(signum) for signum in (*stop_signals, *checkpoint_signals)
    }
    install_signal_handlers(stop_signals, checkpoint_signals)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
