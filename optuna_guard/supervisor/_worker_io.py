"""The arbiter's I/O between ticks: wait on the workers' sockets (and the signal wake-up fd),
read their messages (:mod:`._protocol`) and act on each: boot, ticket, trial started/finished,
retry, storage outage, fatal error, a result lost to an outside end."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any

from optuna_guard import events
from optuna_guard._logging import get_logger
from optuna_guard.supervisor import _protocol
from optuna_guard.supervisor._worker_handle import WorkerHandle

if TYPE_CHECKING:
    from optuna_guard.supervisor._arbiter import Arbiter

_log = get_logger(__name__)


class WorkerIO:
    """Messages from workers, answered at once (tickets never wait for the next tick)."""

    def __init__(self, arbiter: Arbiter) -> None:
        self._a = arbiter
        self.reap_now = False  # a worker's socket closed: reap without waiting for the tick

    def wait(self, until: float) -> None:
        """Wait for messages or a signal until the clock time ``until``."""
        a = self._a
        timeout = max(0.0, until - a.clock())
        try:
            ready = a.selector.select(timeout)
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for safety
            return
        for key, _mask in ready:
            if key.data is None:
                a.signals.drain_wakeup()
                continue
            self.read_messages(key.data)

    def read_messages(self, worker: WorkerHandle) -> None:
        a = self._a
        try:
            messages, closed = worker.channel.feed()
        except _protocol.ProtocolError as exc:
            _log.error(
                "Worker %d (pid %d) broke the protocol: %s; killing it.",
                worker.worker_id,
                worker.pid,
                exc,
            )
            messages, closed = [], True
            a.killer.send_signal(worker, signal.SIGKILL, tree=True)
        for message in messages:
            self.handle_safely(worker, message)
        if closed:
            a.spawner.unregister(worker)
            self.reap_now = True
            a.reaper.wait_briefly(worker)

    def handle_safely(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        """A malformed message from one worker must not take the launch down."""
        try:
            self.handle_message(worker, message)
        except (KeyError, TypeError, ValueError) as exc:
            _log.error(
                "Worker %d (pid %d) sent a message the supervisor cannot use (%r: %s); ignored.",
                worker.worker_id,
                worker.pid,
                message,
                exc,
            )

    def handle_message(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        a = self._a
        op = message.get("op")
        now = a.clock()
        if op == _protocol.HELLO:
            worker.ready = True
            # the expected footprint of the next worker
            a.memory.start_gate.record_boot(a.memory.tree_rss(worker.pid))
        elif op == _protocol.TICKET:
            granted, reason = a.ledger.decide_ticket(worker, now)
            if granted:
                worker.ticket = True
                worker.channel.send(_protocol.GRANT)
            else:
                worker.deny_reason = reason
                worker.denied_at = now
                worker.channel.send(_protocol.DENY, reason=reason)
        elif op == _protocol.STARTED:
            a.ledger.on_trial_started(
                worker, int(message["trial_id"]), int(message["number"]), now
            )
        elif op == _protocol.FINISHED:
            a.ledger.on_trial_finished(
                worker,
                int(message["trial_id"]),
                int(message["number"]),
                str(message.get("state")),
                message.get("duration"),
            )
        elif op == _protocol.RETRIED:
            a.count_retry()
            a.emit(
                events.TRIAL_RETRIED,
                worker_id=worker.worker_id,
                pid=worker.pid,
                trial_number=message.get("number"),
                retry_number=message.get("retry_number"),
                reason="re-queued by the worker after the in-trial guard stopped it",
            )
        elif op == _protocol.OUTAGE:
            a.emit(
                events.STORAGE_OUTAGE,
                worker_id=worker.worker_id,
                pid=worker.pid,
                outage=message.get("outage"),
                seconds=message.get("seconds"),
                reason=f"storage outage {message.get('outage')} ({message.get('what')})",
                source="worker",
            )
        elif op == _protocol.FATAL:
            worker.fatal_error = str(message.get("error"))
        elif op == _protocol.LOST:
            reason = (
                f"trial {message.get('number')} was ended {message.get('state')} from outside while worker "
                f"{worker.worker_id} ran it; its result {message.get('value')} is lost"
            )
            _log.warning("%s.", reason[:1].upper() + reason[1:])
            a.emit(
                events.TRIAL_LOST,
                worker_id=worker.worker_id,
                pid=worker.pid,
                trial_number=message.get("number"),
                state=message.get("state"),
                value=message.get("value"),
                reason=reason,
            )
        else:
            _log.warning(
                "Worker %d (pid %d) sent an unknown message %r; ignored.",
                worker.worker_id,
                worker.pid,
                op,
            )
