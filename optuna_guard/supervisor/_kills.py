"""Stopping workers from outside: signals to a worker or its whole tree, kill orders escalated
SIGTERM -> wait -> SIGKILL, ``--trial-timeout``, the bounded wait of a worker told to exit, and
killing what a worker or the launch left behind.

The one call that signals a worker is :meth:`Killer.send_signal` (tests replace it).
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING, Any, Protocol

from optuna_guard import events
from optuna_guard._logging import get_logger
from optuna_guard.memory import _tree
from optuna_guard.supervisor import _exits, _hung, _lifeline, _protocol
from optuna_guard.supervisor._worker_handle import KillOrder, WorkerHandle

if TYPE_CHECKING:
    from optuna_guard.supervisor._cgroups import WorkerCgroups
    from optuna_guard.supervisor._config import LaunchConfig

_log = get_logger(__name__)

WORKER_EXIT_WAIT_S = (
    10.0  # a worker told to exit gets this long for its normal interpreter exit, then SIGKILL
)


class KillerHost(Protocol):
    """What the killer needs from the arbiter."""

    config: LaunchConfig
    launch_id: str
    workers: list[WorkerHandle]

    @property
    def cgroups(self) -> WorkerCgroups | None: ...

    def emit(self, event: str, **fields: Any) -> None: ...


class Killer:
    """Kill orders and signals of the launch's workers."""

    def __init__(self, arbiter: KillerHost) -> None:
        self._a = arbiter

    def start_kill(
        self,
        worker: WorkerHandle,
        kind: str,
        reason: str,
        user_attrs: dict[str, Any],
        now: float,
        *,
        limit: str | None = None,
        wait: float | None = None,
    ) -> None:
        """SIGTERM now (the worker is told why first), SIGKILL of the whole tree after ``wait``."""
        wait = self._a.config.kill_wait if wait is None else wait
        worker.kill = KillOrder(
            kind=kind,
            reason=reason,
            tags=dict(user_attrs),
            started_at=now,
            sigkill_at=now + wait,
            limit=limit,
            trial_number=worker.trial_number,
        )
        if kind == _exits.MEMORY_KILL:
            worker.channel.send(_protocol.KILL, reason=reason, tags=user_attrs)
        if wait <= 0:
            self.send_signal(worker, signal.SIGKILL, tree=True)
            worker.kill.sigkill_sent = True
        else:
            self.send_signal(worker, signal.SIGTERM, tree=True)

    def advance_kills(self, now: float) -> None:
        """SIGKILL what outlived its SIGTERM, and a worker still alive WORKER_EXIT_WAIT_S after it
        was told to exit."""
        for worker in self._a.workers:
            order = worker.kill
            if (
                order is None
                and worker.denied_at is not None
                and now - worker.denied_at >= WORKER_EXIT_WAIT_S
            ):
                _log.warning(
                    "Worker %d (pid %d) has not exited %.0fs after it was told to (a non-daemon thread or "
                    "a hanging atexit handler?); killing its process tree.",
                    worker.worker_id,
                    worker.pid,
                    now - worker.denied_at,
                )
                self.start_kill(
                    worker,
                    _exits.EXIT_KILL,
                    f"did not exit within {WORKER_EXIT_WAIT_S:.0f}s after its last ticket",
                    {},
                    now,
                    wait=0,
                )
                continue
            if order is not None and not order.sigkill_sent and now >= order.sigkill_at:
                order.sigkill_sent = True
                _log.info(
                    "Worker %d (pid %d) still alive %.1fs after SIGTERM; sending SIGKILL to its process tree.",
                    worker.worker_id,
                    worker.pid,
                    now - order.started_at,
                )
                self.send_signal(worker, signal.SIGKILL, tree=True)

    def check_trial_timeouts(self, now: float) -> None:
        """--trial-timeout: tell the worker to stop its trial (tags first, FAIL), SIGKILL its tree
        after the grace period if it did not (a stopped or deadlocked worker cannot answer)."""
        a = self._a
        timeout = a.config.trial_timeout
        if timeout is None:
            return
        for worker in a.workers:
            started = worker.trial_started_at
            if (
                started is None
                or worker.kill is not None
                or not _hung.is_overdue(started, now, timeout)
            ):
                continue
            reason, attrs = _hung.timeout_tags(
                worker.trial_number,
                now - started,
                timeout,
                _tree.process_state(worker.pid),
                worker.pid,
            )
            worker.kill = KillOrder(
                kind=_exits.TIMEOUT_KILL,
                reason=reason,
                tags=attrs,
                started_at=now,
                sigkill_at=now + a.config.grace_period,
                trial_number=worker.trial_number,
            )
            worker.channel.send(_protocol.KILL, reason=reason, tags=attrs, state="FAIL")
            _log.warning(
                "Worker %d (pid %d): %s; it gets %.0fs to stop the trial before it is killed.",
                worker.worker_id,
                worker.pid,
                reason,
                a.config.grace_period,
            )
            a.emit(
                events.TRIAL_KILLED,
                worker_id=worker.worker_id,
                pid=worker.pid,
                trial_number=worker.trial_number,
                reason=reason,
                state="FAIL",
            )

    def send_signal(self, worker: WorkerHandle, sig: int, *, tree: bool) -> None:
        """Signal the worker, or its whole process tree (its process group plus any descendant
        that left the group)."""
        a = self._a
        pid = worker.pid
        if not tree:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            return
        descendants = _tree.descendants(pid)
        marked = _tree.pids_with_env(
            f"{_lifeline.ENV_WORKER_MARK}={a.launch_id}/{worker.spawn_index}".encode()
        )
        descendants.extend(
            p for p in marked if p not in descendants
        )  # daemonised ones left the tree
        cgroup = a.cgroups.of(pid) if a.cgroups is not None else None
        if cgroup is not None:
            descendants.extend(p for p in cgroup.pids() if p not in descendants and p != pid)
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for child in descendants:
            try:
                if os.getpgid(child) != pid:
                    os.kill(child, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def release(self, worker: WorkerHandle) -> None:
        """A reaped worker: kill what it left in its cgroup and remove it, or (process-tree
        mode) kill what carries its env marker."""
        cgroups = self._a.cgroups
        if cgroups is not None and cgroups.of(worker.pid) is not None:
            cgroups.release(worker.pid)  # kills what the worker left in its cgroup, removes it
        else:
            self.kill_worker_leftovers(worker)

    def kill_worker_leftovers(self, worker: WorkerHandle) -> None:
        """Process-tree mode: SIGKILL what a reaped worker left behind (a loky/multiprocessing
        pool it did not shut down, a daemonised helper), found by the worker's env marker."""
        marker = f"{_lifeline.ENV_WORKER_MARK}={self._a.launch_id}/{worker.spawn_index}".encode()
        left = _tree.pids_with_env(marker)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if left:
            _log.info(
                "Worker %d (pid %d) left %d process(es) behind; killed: %s.",
                worker.worker_id,
                worker.pid,
                len(left),
                ", ".join(map(str, left)),
            )

    def kill_launch_leftovers(self) -> None:
        """SIGKILL any process still carrying this launch's marker (a daemonised grandchild)."""
        for pid in _tree.pids_with_env(f"{_lifeline.ENV_LAUNCH_ID}={self._a.launch_id}".encode()):
            try:
                os.kill(pid, signal.SIGKILL)
                _log.warning(
                    "Process %d of this launch outlived its worker (daemonised?); killed.", pid
                )
            except (ProcessLookupError, PermissionError):
                pass
