"""The launcher's signal inbox: handlers only enqueue (logging inside a handler can deadlock);
the arbiter's loop acts on the queue. A wake-up socket interrupts the loop's ``select``."""

from __future__ import annotations

import queue
import selectors
import signal
import socket
import threading
from typing import Any

from optuna_guard._logging import get_logger

_log = get_logger(__name__)

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)  # SIGHUP: ssh disconnect


class SignalInbox:
    """Queued signal numbers, and the handlers and wake-up fd that fill the queue."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._wakeup_r: socket.socket | None = None
        self._wakeup_w: socket.socket | None = None
        self._old_handlers: dict[int, Any] = {}
        self._old_wakeup_fd: int | None = None

    def install(self, selector: selectors.BaseSelector) -> None:
        """Handle the launcher's signals; the wake-up socket is registered with ``data=None``."""
        if threading.current_thread() is not threading.main_thread():
            _log.debug(
                "launch() runs outside the main thread; signals are not handled by the launcher."
            )
            return
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)
        selector.register(self._wakeup_r, selectors.EVENT_READ, None)
        self._old_wakeup_fd = signal.set_wakeup_fd(
            self._wakeup_w.fileno(), warn_on_full_buffer=False
        )
        for signum in HANDLED:
            self._old_handlers[signum] = signal.signal(signum, self._enqueue)

    def _enqueue(self, signum: int, _frame: Any) -> None:
        self.queue.put_nowait(signum)  # only enqueue: logging here can deadlock

    def restore(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers.clear()
        if self._wakeup_w is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd if self._old_wakeup_fd is not None else -1)
            self._wakeup_w.close()
            if self._wakeup_r is not None:
                self._wakeup_r.close()
            self._wakeup_r = self._wakeup_w = None

    def drain_wakeup(self) -> None:
        try:
            while self._wakeup_r is not None and self._wakeup_r.recv(512):
                pass
        except (BlockingIOError, OSError):
            pass

    def pop(self) -> int | None:
        """The next queued signal, or None."""
        try:
            return self.queue.get_nowait()
        except queue.Empty:
            return None
