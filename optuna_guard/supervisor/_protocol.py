"""Supervisor <-> worker messages: line-delimited JSON over an inherited Unix socket pair.

Why a ticket protocol: the launch must end after exactly T trials across all workers, and the
supervisor must know which trial each worker runs so a kill or crash ends exactly that trial.
A worker asks for a ticket before each trial; the supervisor grants it or denies it (done,
stopping, or "recycle": finish and exit).

Worker -> supervisor:
    {"op": "hello", "pid": 4711}                          worker is up, storage opened
    {"op": "ticket"}                                       may I run one more trial?
    {"op": "started", "number": 7, "trial_id": 8}          first thing inside the trial
    {"op": "finished", "number": 7, "trial_id": 8, "state": "COMPLETE", "duration": 1.5}
    {"op": "retried", "number": 7, "retry_number": 12}     (retries) the worker re-queued a trial
    {"op": "outage", "outage": "began"|"ended", "seconds": 12.5, "what": "..."}  storage outage
    {"op": "fatal", "error": "one line"}                   worker cannot run (e.g. objective spec)
    {"op": "lost", "number": 7, "trial_id": 8, "state": "FAIL", "value": "0.25"}  the trial was
                                                           ended from outside; its result is lost
Supervisor -> worker:
    {"op": "grant"}                                        run exactly one trial
    {"op": "deny", "reason": "recycle: age 3601s >= 3600s"}  exit after this
    {"op": "kill", "reason": "...", "tags": {...}}         stop the running trial now, it was killed
"""

from __future__ import annotations

import json
import os
import socket
import threading
from typing import Any

HELLO = "hello"
TICKET = "ticket"
STARTED = "started"
FINISHED = "finished"
RETRIED = "retried"
OUTAGE = "outage"
FATAL = "fatal"
LOST = "lost"
GRANT = "grant"
DENY = "deny"
KILL = "kill"

ENV_FD = "OPTUNA_GUARD_WORKER_FD"

_MAX_LINE = 1 << 20


class ProtocolError(RuntimeError):
    """A peer sent something that is not a protocol message."""


class Channel:
    """One end of the pair. ``send`` is blocking and atomic per message; reading is either
    blocking (:meth:`recv`, used by the worker's reader thread) or incremental
    (:meth:`feed`, used by the supervisor's selector loop)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""
        self.closed = False
        self._send_lock = threading.Lock()  # the worker sends from its main and heartbeat threads

    @classmethod
    def from_fd(cls, fd: int) -> Channel:
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, op: str, **fields: Any) -> bool:
        """Send one message; False when the peer is gone (its process died)."""
        if self.closed:
            return False
        data = json.dumps({"op": op, **fields}, default=str).encode() + b"\n"
        try:
            with self._send_lock:
                self.sock.sendall(data)
            return True
        except OSError:
            return False

    def recv(self) -> dict[str, Any] | None:
        """Block for the next message; None at end of stream."""
        while b"\n" not in self._buffer:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                self.closed = True
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return _decode(line)

    def feed(self) -> tuple[list[dict[str, Any]], bool]:
        """Read what is available without blocking; returns (messages, peer_closed)."""
        closed = False
        while True:
            try:
                chunk = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                closed = True
                break
            self._buffer += chunk
            if len(self._buffer) > _MAX_LINE and b"\n" not in self._buffer:
                raise ProtocolError("worker sent an over-long line without a newline")
        messages = []
        while b"\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition(b"\n")
            if line.strip():
                messages.append(_decode(line))
        if closed:
            self.closed = True
        return messages, closed

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


def _decode(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError:
        raise ProtocolError(f"not a protocol message: {line[:80]!r}") from None
    if not isinstance(message, dict) or "op" not in message:
        raise ProtocolError(f"not a protocol message: {line[:80]!r}")
    return message


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """(supervisor end, worker end); the worker end is inheritable for ``pass_fds``."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    os.set_inheritable(child.fileno(), True)
    return parent, child
