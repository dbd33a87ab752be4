"""The launcher's exit path under a storage outage: one overall deadline, storage work that a
further signal abandons at once.

A stop (SIGTERM, time budget) gives workers ``--grace-period`` seconds, then the launcher needs
the storage once more to end the trials of killed workers, sweep what is still RUNNING and read
the summary. During an outage each of those calls retries up to ``--storage-deadline``; run one
after another they took (N+2) x the deadline. Here they share one bounded allowance, run on
daemon threads (an abandoned retry loop never keeps the interpreter alive), and the waits watch
for another signal.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

STORAGE_ALLOWANCE_CAP_S = (
    60.0  # at most this long for the exit's storage work, whatever --storage-deadline says
)
REAP_SLACK_S = 5.0  # SIGKILL + reap of the workers after the grace period
EXIT_SLACK_S = 3.0  # the summary line and the interpreter's own exit, after the storage work


def storage_allowance(storage_deadline: float | None) -> float:
    """Seconds the exit may spend on storage writes after the workers are gone."""
    if storage_deadline is None:
        return 10.0
    return min(float(storage_deadline), STORAGE_ALLOWANCE_CAP_S)


def exit_budget(grace_period: float, storage_deadline: float | None) -> float:
    """Seconds from the first stop signal to the launcher's exit, at the latest."""
    return grace_period + REAP_SLACK_S + storage_allowance(storage_deadline) + EXIT_SLACK_S


def run_in_daemon(fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
    """``fn(*args)`` on a daemon thread; its Future carries the result or the exception."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def body() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # handed to whoever waits on the future
            future.set_exception(exc)

    threading.Thread(target=body, name="optuna-guard-storage", daemon=True).start()
    return future


def wait_until(
    futures: Iterable[concurrent.futures.Future[Any]],
    deadline: float,
    interrupted: Callable[[], bool],
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Wait for ``futures`` until ``deadline`` (clock time) or until ``interrupted()``; True
    when all are done."""
    pending = [f for f in futures if not f.done()]
    while pending:
        if interrupted():
            return False
        remaining = deadline - clock()
        if remaining <= 0:
            return False
        concurrent.futures.wait(pending, timeout=min(0.05, remaining))
        pending = [f for f in pending if not f.done()]
    return True


def bounded_call(
    fn: Callable[[], Any],
    deadline: float,
    interrupted: Callable[[], bool],
    clock: Callable[[], float] = time.monotonic,
) -> tuple[bool, Any]:
    """``(True, fn())`` if it finishes before the deadline or an interruption, else ``(False, None)``;
    exceptions of ``fn`` are raised."""
    future = run_in_daemon(fn)
    if not wait_until([future], deadline, interrupted, clock):
        return False, None
    return True, future.result()
