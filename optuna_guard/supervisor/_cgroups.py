"""One memory cgroup per worker, where the machine lets us create them.

Why: a process tree misses descendants that daemonise (``setsid sh -c '... &'``), counts shared
pages twice, and a supervisor that reads it 4 times a second cannot stop a worker that faults in
gigabytes within a second. A cgroup of its own per worker fixes all three: the kernel counts
every process in it (daemonised or not, shared pages once), enforces ``--max-worker-rss-gb`` as a
hard limit (an OOM kill inside the cgroup, never the machine's), and a kill reaches every process
in it.

Modes (logged at start, see ``optuna-guard run --help``):

- ``cgroup v1``: root on a v1 memory controller. ``<own cgroup>/optuna_guard_<launch>/w<N>``
  with ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes`` where swap accounting is
  on) = the limit; kills go to every pid in ``cgroup.procs``.
- ``cgroup v2``: a delegated subtree (the launcher's cgroup is writable and has the memory
  controller available). The launcher first moves itself into a leaf ``supervisor`` child (v2
  allows processes only in leaves once controllers are enabled), then ``memory.max`` = the limit,
  ``memory.high`` = 95 % of it (allocation slows before the kill); kills write ``cgroup.kill``.
- ``process tree``: nothing writable. Memory is the tree RSS; every descendant carries the
  launch's ``OPTUNA_GUARD_LAUNCH_ID`` environment marker and is found in ``/proc/*/environ``
  for kills, so nothing outlives the launch either way.

Reading lives in :mod:`optuna_guard.memory` (the only OS reader); this module only creates,
fills, limits and removes the directories.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

from optuna_guard._logging import get_logger
from optuna_guard.memory import _tree
from optuna_guard.memory._cgroup import (
    cgroup_oom_kills,
    cgroup_peak,
    cgroup_working_set,
    own_memory_cgroup,
)

_log = get_logger(__name__)

TREE_MODE = "process tree"
PARENT_PREFIX = "optuna_guard_"  # + <launch id[:12]>_<supervisor pid>_<its start time in ticks>
ENV_SWITCH = "OPTUNA_GUARD_WORKER_CGROUPS"  # "0" forces the process-tree mode
HIGH_FRACTION = 0.95  # v2 memory.high as a fraction of memory.max


@dataclasses.dataclass
class WorkerCgroup:
    version: int
    directory: str
    oom_kills_at_start: int = 0

    def working_set(self) -> int:
        return cgroup_working_set(self.version, self.directory)

    def peak(self) -> int | None:
        return cgroup_peak(self.version, self.directory)

    def oom_killed(self) -> bool:
        return cgroup_oom_kills(self.version, self.directory) > self.oom_kills_at_start

    def pids(self) -> list[int]:
        try:
            with open(os.path.join(self.directory, "cgroup.procs"), "rb") as handle:
                return [int(token) for token in handle.read().split()]
        except (OSError, ValueError):
            return []

    def kill_all(self) -> None:
        """SIGKILL every process in the cgroup (v2: cgroup.kill, atomic against forks)."""
        if self.version == 2 and _write(os.path.join(self.directory, "cgroup.kill"), "1"):
            return
        for _round in range(3):  # a process may fork while we kill: look again
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


class WorkerCgroups:
    """Creates a memory cgroup per worker under the launcher's own cgroup, or reports the
    process-tree fallback (``mode``). ``limit_bytes`` None: the cgroups only count and kill."""

    def __init__(
        self,
        launch_id: str,
        limit_bytes: int | None,
        *,
        enabled: bool = True,
        proc_root: str = "/proc",
        cgroup_root: str = "/sys/fs/cgroup",
    ) -> None:
        self.limit_bytes = limit_bytes
        self.mode = TREE_MODE
        self.why_not = ""
        self.version: int | None = None
        self.parent: str | None = None
        self.by_pid: dict[int, WorkerCgroup] = {}
        self.last_peaks: list[int | None] = []  # peak usage of each released worker cgroup (bytes)
        if not enabled:
            self.why_not = "switched off"
            return
        own = own_memory_cgroup(proc_root, cgroup_root)
        if own is None:
            self.why_not = "no memory cgroup filesystem"
            return
        version, directory = own
        _remove_stale_launch_cgroups(directory)
        pid = os.getpid()
        parent = os.path.join(
            directory, f"{PARENT_PREFIX}{launch_id[:12]}_{pid}_{_tree.start_time_ticks(pid)}"
        )
        try:
            if version == 2:
                _prepare_v2(directory)
            os.mkdir(parent)
            if version == 2:
                _write_or_raise(os.path.join(parent, "cgroup.subtree_control"), "+memory")
        except OSError as exc:
            self.why_not = f"{directory} is not writable ({exc.strerror or exc})"
            _rmdir(parent)
            return
        self.version, self.parent = version, parent
        self.mode = f"cgroup v{version}"

    @property
    def active(self) -> bool:
        return self.parent is not None

    def describe(self) -> str:
        if self.active:
            limit = (
                "no limit"
                if self.limit_bytes is None
                else f"hard limit {self.limit_bytes / 2**30:.2f} GB"
            )
            return f"one memory cgroup per worker ({self.mode}, {limit}) under {self.parent}"
        return (
            f"process-tree memory and a per-launch environment marker ({self.why_not}; "
            "run as root or in a delegated cgroup v2 subtree for per-worker cgroups)"
        )

    def directory_for(self, spawn_index: int) -> str | None:
        """Where :meth:`attach` puts worker ``spawn_index`` (None in process-tree mode); told to
        the worker so its guard's probe skips its own cgroup (``ENV_SKIP_CGROUP``)."""
        if self.parent is None:
            return None
        return os.path.join(self.parent, f"w{spawn_index}")

    def attach(self, pid: int, spawn_index: int) -> WorkerCgroup | None:
        """Put a freshly started worker into a new cgroup of its own (None in tree mode or if it
        fails: that worker is then watched by its process tree)."""
        if self.parent is None or self.version is None:
            return None
        directory = os.path.join(self.parent, f"w{spawn_index}")
        try:
            os.mkdir(directory)
            if self.limit_bytes is not None:
                self._limit(directory)
            _write_or_raise(os.path.join(directory, "cgroup.procs"), str(pid))
        except OSError as exc:
            _log.warning(
                "Could not put worker pid %d in its own cgroup %s (%s); its process tree is "
                "watched "
                "instead.",
                pid,
                directory,
                exc,
            )
            _rmdir(directory)
            return None
        cgroup = WorkerCgroup(self.version, directory, cgroup_oom_kills(self.version, directory))
        self.by_pid[pid] = cgroup
        return cgroup

    def _limit(self, directory: str) -> None:
        limit = int(self.limit_bytes or 0)
        if self.version == 1:
            _write_or_raise(os.path.join(directory, "memory.limit_in_bytes"), str(limit))
            _write(
                os.path.join(directory, "memory.memsw.limit_in_bytes"), str(limit)
            )  # only with swap accounting
        else:
            _write_or_raise(os.path.join(directory, "memory.max"), str(limit))
            _write(os.path.join(directory, "memory.high"), str(int(limit * HIGH_FRACTION)))

    def of(self, pid: int) -> WorkerCgroup | None:
        return self.by_pid.get(pid)

    def release(self, pid: int) -> None:
        """The worker is gone: kill whatever it left in its cgroup (a daemonised helper), then
        remove the cgroup."""
        cgroup = self.by_pid.pop(pid, None)
        if cgroup is None:
            return
        leftovers = cgroup.pids()
        cgroup.kill_all()
        peak = cgroup.peak()
        ooms = cgroup_oom_kills(cgroup.version, cgroup.directory) - cgroup.oom_kills_at_start
        _log.info(
            "Worker pid %d's cgroup %s removed: peak %s, %d OOM kill(s)%s.",
            pid,
            os.path.basename(cgroup.directory),
            "unknown" if peak is None else f"{peak / 2**30:.3f} GB",
            ooms,
            f", {len(leftovers)} leftover process(es) killed" if leftovers else "",
        )
        self.last_peaks.append(peak)
        _rmdir(cgroup.directory, wait_s=2.0)

    def close(self) -> None:
        """Release every worker cgroup and remove the launch's parent cgroup."""
        for pid in list(self.by_pid):
            self.release(pid)
        if self.parent is not None:
            if self.version == 2:
                leftovers = [os.path.join(self.parent, name) for name in _subdirs(self.parent)]
                for directory in leftovers:
                    WorkerCgroup(2, directory).kill_all()
                    _rmdir(directory, wait_s=2.0)
            else:
                for name in _subdirs(self.parent):
                    directory = os.path.join(self.parent, name)
                    WorkerCgroup(1, directory).kill_all()
                    _rmdir(directory, wait_s=2.0)
            _rmdir(self.parent, wait_s=2.0)
            self.parent = None


def _remove_stale_launch_cgroups(directory: str) -> None:
    """Remove the cgroups a launcher killed with SIGKILL left behind (it could not remove them):
    those whose supervisor (pid + start time in the name) is gone and that hold no process."""
    for name in _subdirs(directory):
        parts = name[len(PARENT_PREFIX) :].split("_") if name.startswith(PARENT_PREFIX) else []
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            continue
        if _tree.is_same_process(int(parts[1]), int(parts[2])):
            continue
        parent = os.path.join(directory, name)
        children = [os.path.join(parent, child) for child in _subdirs(parent)]
        if any(WorkerCgroup(1, child).pids() for child in children):
            continue  # processes left: not ours to touch
        for child in children:
            _rmdir(child)
        if _rmdir(parent):
            _log.info("Removed the cgroup %s of a launcher that is gone.", parent)


def _prepare_v2(directory: str) -> None:
    """cgroup v2: processes may only sit in leaves once a controller is enabled for children.
    Move the launcher into a leaf ``supervisor`` child and enable the memory controller."""
    with open(os.path.join(directory, "cgroup.controllers"), encoding="ascii") as handle:
        if "memory" not in handle.read().split():
            raise PermissionError(0, "the memory controller is not delegated to this cgroup")
    with open(os.path.join(directory, "cgroup.subtree_control"), encoding="ascii") as handle:
        if "memory" in handle.read().split():
            return
    leaf = os.path.join(directory, "supervisor")
    os.makedirs(leaf, exist_ok=True)
    with open(os.path.join(directory, "cgroup.procs"), encoding="ascii") as handle:
        pids = handle.read().split()
    for pid in pids:
        _write(os.path.join(leaf, "cgroup.procs"), pid)
    _write_or_raise(os.path.join(directory, "cgroup.subtree_control"), "+memory")


def _subdirs(directory: str) -> list[str]:
    try:
        return [
            name for name in os.listdir(directory) if os.path.isdir(os.path.join(directory, name))
        ]
    except OSError:
        return []


def _write_or_raise(path: str, value: str) -> None:
    with open(path, "w", encoding="ascii") as handle:
        handle.write(value)


def _write(path: str, value: str) -> bool:
    try:
        _write_or_raise(path, value)
        return True
    except OSError:
        return False


def _rmdir(directory: str, wait_s: float = 0.0) -> bool:
    """rmdir a cgroup; it may be busy for a moment while its last processes exit."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.rmdir(directory)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
