"""Starting workers: slots, the worker's environment, its own session (and memory cgroup where
writable), its socket registered with the arbiter's selector.

The one call that starts a process is :meth:`Spawner.spawn_process` (tests replace it).
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any, Protocol

from optuna_guard import events
from optuna_guard._logging import get_logger
from optuna_guard._units import GB
from optuna_guard.memory._cgroup import ENV_SKIP_CGROUP
from optuna_guard.supervisor import _cgroups, _lifeline, _policies, _protocol, _threads
from optuna_guard.supervisor._config import LaunchConfig, WorkerSettings
from optuna_guard.supervisor._worker_handle import WorkerHandle

if TYPE_CHECKING:
    from optuna_guard.memory import MemoryProbe

_log = get_logger(__name__)


class SpawnerHost(Protocol):
    """What the spawner needs from the arbiter."""

    config: LaunchConfig
    launch_id: str
    storage_url: str
    probe: MemoryProbe | None
    selector: selectors.BaseSelector
    workers: list[WorkerHandle]
    worker_starts: int

    def replaceable(self, worker: WorkerHandle) -> bool: ...

    def emit(self, event: str, **fields: Any) -> None: ...


class Spawner:
    """Starts one worker at a time into a free slot; owns the launch's worker cgroups."""

    def __init__(self, arbiter: SpawnerHost) -> None:
        self._a = arbiter
        self.cgroups: _cgroups.WorkerCgroups | None = None  # one memory cgroup per worker
        self._next_spawn_index = 0

    def make_cgroups(self) -> _cgroups.WorkerCgroups | None:
        """Per-worker memory cgroups where writable, else the process-tree fallback; the mode is
        logged and emitted. None when a test probe stands in for the OS."""
        a = self._a
        if a.probe is not None:
            return None
        limit = a.config.max_worker_rss_gb
        self.cgroups = _cgroups.WorkerCgroups(
            a.launch_id,
            None if limit is None else int(limit * GB),
            enabled=os.environ.get(_cgroups.ENV_SWITCH, "1") != "0",
        )
        _log.info("Worker memory: %s.", self.cgroups.describe())
        return self.cgroups

    def spawn(self, now: float) -> WorkerHandle:
        a = self._a
        config = a.config
        slot = self._take_slot()
        spawn_index = self._next_spawn_index
        self._next_spawn_index += 1
        parent_sock, child_sock = _protocol.socket_pair()
        settings = WorkerSettings(
            worker_id=slot,
            spawn_index=spawn_index,
            launch_id=a.launch_id,
            supervisor_pid=os.getpid(),
            storage=a.storage_url,
            **config.worker_options(),
        )
        env = config.python_env()
        env.update(
            _threads.thread_env(config.workers, env)
        )  # cores // workers, unless the user set them
        env.update(config.guard_env())
        own_cgroup = self.cgroups.directory_for(spawn_index) if self.cgroups is not None else None
        if own_cgroup is not None:
            # The worker's own cgroup (limit --max-worker-rss-gb) is not "system memory": its
            # guard's probe skips it and reads the ancestors and the host (issue 10 chaos finding).
            env[ENV_SKIP_CGROUP] = own_cgroup
        env.update(settings.to_env())
        env[_protocol.ENV_FD] = str(child_sock.fileno())
        env["PYTHONUNBUFFERED"] = "1"
        env[_lifeline.ENV_LAUNCH_ID] = (
            a.launch_id
        )  # inherited by every descendant: found in /proc/*/environ
        env[_lifeline.ENV_WORKER_MARK] = f"{a.launch_id}/{spawn_index}"
        log_path = os.path.join(config.log_dir, f"worker_{slot}.log")
        try:
            proc = self.spawn_process(env, log_path, child_sock.fileno(), slot, spawn_index)
        finally:
            child_sock.close()
        channel = _protocol.Channel(parent_sock)
        worker = WorkerHandle(
            worker_id=slot,
            spawn_index=spawn_index,
            proc=proc,
            channel=channel,
            log_path=log_path,
            started_at=now,
            age_limit=_policies.jittered_age_limit(
                config.max_worker_age, config.max_worker_age_jitter
            ),
        )
        a.workers.append(worker)
        if self.cgroups is not None:
            self.cgroups.attach(worker.pid, spawn_index)
        a.selector.register(parent_sock, selectors.EVENT_READ, worker)
        worker.registered = True
        a.worker_starts += 1
        a.emit(events.WORKER_STARTED, worker_id=slot, pid=worker.pid, spawn_index=spawn_index)
        _log.info("Worker %d started (pid %d, log %s).", slot, worker.pid, log_path)
        return worker

    def _take_slot(self) -> int:
        a = self._a
        used = {w.worker_id for w in a.workers if not a.replaceable(w)}
        for slot in range(1, a.config.workers + 1):
            if slot not in used:
                return slot
        return a.config.workers + 1  # pragma: no cover - reconcile never asks for more

    def unregister(self, worker: WorkerHandle) -> None:
        """Stop watching the worker's socket."""
        if worker.registered:
            try:
                self._a.selector.unregister(worker.channel.sock)
            except (KeyError, ValueError):
                pass
            worker.registered = False

    def spawn_process(
        self, env: dict[str, str], log_path: str, child_fd: int, slot: int, spawn_index: int
    ) -> Any:
        """The one place that starts a process (own session, so its whole tree can be signalled)."""
        with open(log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(
                f"===== optuna-guard worker {slot} (start #{spawn_index}) at {stamp} =====\n".encode()
            )
            log.flush()
            return subprocess.Popen(
                [sys.executable, "-m", "optuna_guard.supervisor._worker"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(child_fd,),
                start_new_session=True,
                close_fds=True,
            )
