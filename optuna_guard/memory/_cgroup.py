"""cgroup v1/v2 memory limits along this process's cgroup path and its ancestors.

Why: ``psutil.virtual_memory()`` reports the host, so inside a Docker/Kubernetes/SLURM cgroup
with an 8 GB limit on a 256 GB host it says "plenty available" until the kernel's cgroup OOM
killer strikes. We read the process's own cgroup from ``/proc/self/cgroup``, walk from it up
to the root of the hierarchy, and keep every level whose limit is below the host's RAM. Used
memory is the kubelet/cAdvisor "working set": usage minus ``inactive_file`` (page cache the
kernel can drop before it OOM-kills), so page cache does not count as used.

Discovery (which directories, which limits) is cached; only usage files are read per sample.
"""

from __future__ import annotations

import dataclasses
import os

from optuna_guard.memory._files import CachedFile, field_int, read_text

# A worker of ``optuna-guard run`` sits in a memory cgroup of its own whose limit is
# --max-worker-rss-gb (enforced by the supervisor and the kernel, and by the guard's
# max_trial_rss at 90 % of it). Its headroom is not "system memory available": the supervisor
# names that directory here so the worker's probe skips it and keeps the ancestors (the
# launcher's, the job's cgroup, the host).
ENV_SKIP_CGROUP = "OPTUNA_GUARD_PROBE_SKIP_CGROUP"

# cgroup v1 writes this (PAGE_COUNTER_MAX rounded to the page size) for "no limit"; anything at
# or above the host's MemTotal is treated as "no limit" anyway.
_V1_UNLIMITED_MIN = 1 << 62


@dataclasses.dataclass(frozen=True)
class CgroupPaths:
    """Where this process sits: the v1 memory controller path and the v2 (unified) path."""

    v1_memory: str | None
    v2: str | None


def parse_proc_cgroup(text: str) -> CgroupPaths:
    """Parse ``/proc/<pid>/cgroup`` lines ``hierarchy-id:controllers:path``.

    The v2 line is ``0::/path``; the v1 memory line lists ``memory`` among its controllers
    (``4:memory:/process_api/ab12`` or ``7:memory,hugetlb:/docker/...``).
    """
    v1 = v2 = None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path or "/"
        elif "memory" in controllers.split(","):
            v1 = path or "/"
    return CgroupPaths(v1_memory=v1, v2=v2)


@dataclasses.dataclass
class CgroupLevel:
    """One cgroup directory with a memory limit; ``read_used()`` is the per-sample read."""

    version: int
    directory: str
    limit_bytes: int
    swap_limit_bytes: int | None = None  # v2 memory.swap.max when it is a real limit

    def __post_init__(self) -> None:
        usage_name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        self._usage = CachedFile(os.path.join(self.directory, usage_name))
        self._stat = CachedFile(os.path.join(self.directory, "memory.stat"))
        self._swap = CachedFile(os.path.join(self.directory, "memory.swap.current"))
        self._inactive_key = b"total_inactive_file" if self.version == 1 else b"inactive_file"

    @property
    def source(self) -> str:
        return f"cgroup v{self.version}"

    def read_used(self) -> int:
        """Working set in bytes: usage minus inactive page cache, never below 0."""
        usage = _parse_int(self._usage.read())
        stat = self._stat.read()
        inactive = field_int(stat, self._inactive_key)
        if inactive is None and self.version == 1:
            inactive = field_int(stat, b"inactive_file")
        return max(usage - (inactive or 0), 0)

    def read_swap_used(self) -> int | None:
        if self.swap_limit_bytes is None:
            return None
        try:
            return _parse_int(self._swap.read())
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        for handle in (self._usage, self._stat, self._swap):
            handle.close()


def _parse_int(data: bytes) -> int:
    return int(data.split()[0])


def _parse_limit(text: str) -> int | None:
    """``max`` (v2) or a huge v1 value means unlimited (None)."""
    text = text.strip()
    if not text or text == "max":
        return None
    value = int(text)
    return None if value >= _V1_UNLIMITED_MIN else value


def _resolve(mount: str, path: str) -> str:
    """The directory of ``path`` under ``mount``.

    Without a cgroup namespace a container sees its host path (``/docker/<id>``) in
    /proc/self/cgroup, but only its own subtree is mounted at /sys/fs/cgroup; so leading
    components are dropped until the directory exists (the mount root at worst).
    """
    parts = [p for p in path.strip("/").split("/") if p]
    for start in range(len(parts) + 1):
        candidate = os.path.join(mount, *parts[start:])
        if os.path.isdir(candidate):
            return candidate
    return mount


def _chain(mount: str, leaf: str) -> list[str]:
    """``leaf`` and its ancestors up to and including ``mount``."""
    mount = os.path.normpath(mount)
    current = os.path.normpath(leaf)
    chain = [current]
    while current != mount and current.startswith(mount + os.sep):
        current = os.path.dirname(current)
        chain.append(current)
    return chain


def _v1_mount(cgroup_root: str) -> str | None:
    direct = os.path.join(cgroup_root, "memory")
    if os.path.isdir(direct):
        return direct
    try:
        names = os.listdir(cgroup_root)
    except OSError:
        return None
    for name in names:  # co-mounted controllers, e.g. "memory,hugetlb"
        if "memory" in name.split(",") and os.path.isdir(os.path.join(cgroup_root, name)):
            return os.path.join(cgroup_root, name)
    return None


def _v2_mount(cgroup_root: str) -> str | None:
    for candidate in (cgroup_root, os.path.join(cgroup_root, "unified")):
        if os.path.isfile(os.path.join(candidate, "cgroup.controllers")):
            return candidate
    return None


def discover_levels(
    proc_root: str,
    cgroup_root: str,
    host_total_bytes: int,
    host_swap_bytes: int = 0,
    skip_directory: str | None = None,
) -> list[CgroupLevel]:
    """Every cgroup level above this process whose memory limit is below the host's RAM.

    An empty list means "no effective cgroup limit: use the host numbers". Missing files
    (no cgroup filesystem, a controller not enabled) are simply skipped. ``skip_directory``
    (see ENV_SKIP_CGROUP) is left out; its ancestors are kept.
    """
    skip = os.path.normpath(skip_directory) if skip_directory else None
    try:
        paths = parse_proc_cgroup(read_text(os.path.join(proc_root, "self", "cgroup")))
    except OSError:
        return []
    levels: list[CgroupLevel] = []
    if paths.v1_memory is not None:
        mount = _v1_mount(cgroup_root)
        if mount is not None:
            for directory in _chain(mount, _resolve(mount, paths.v1_memory)):
                if directory == skip:
                    continue
                limit = _read_limit(os.path.join(directory, "memory.limit_in_bytes"))
                if limit is not None and limit < host_total_bytes:
                    levels.append(CgroupLevel(1, directory, limit))
    if paths.v2 is not None:
        mount = _v2_mount(cgroup_root)
        if mount is not None:
            for directory in _chain(mount, _resolve(mount, paths.v2)):
                if directory == skip:
                    continue
                limit = _read_limit(os.path.join(directory, "memory.max"))
                if limit is not None and limit < host_total_bytes:
                    swap_limit = _read_limit(os.path.join(directory, "memory.swap.max"))
                    if (
                        swap_limit is not None
                        and host_swap_bytes
                        and swap_limit >= host_swap_bytes
                    ):
                        swap_limit = None
                    levels.append(CgroupLevel(2, directory, limit, swap_limit))
    return levels


def _read_limit(path: str) -> int | None:
    try:
        return _parse_limit(read_text(path))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------- one worker's own cgroup
def own_memory_cgroup(
    proc_root: str = "/proc", cgroup_root: str = "/sys/fs/cgroup"
) -> tuple[int, str] | None:
    """(version, directory) of this process's memory cgroup: the v1 memory controller when it
    is mounted, else the v2 unified path; None without a cgroup filesystem."""
    try:
        paths = parse_proc_cgroup(read_text(os.path.join(proc_root, "self", "cgroup")))
    except OSError:
        return None
    if paths.v1_memory is not None:
        mount = _v1_mount(cgroup_root)
        if mount is not None:
            return 1, _resolve(mount, paths.v1_memory)
    if paths.v2 is not None:
        mount = _v2_mount(cgroup_root)
        if mount is not None:
            return 2, _resolve(mount, paths.v2)
    return None


def cgroup_working_set(version: int, directory: str) -> int:
    """Working set of one cgroup in bytes (every process in it, shared pages once): usage minus
    inactive page cache; 0 if the cgroup is gone."""
    level = CgroupLevel(version, directory, 0)
    try:
        return level.read_used()
    except (OSError, ValueError, IndexError):
        return 0
    finally:
        level.close()


class CgroupReader:
    """One cgroup's working set and OOM-kill count, re-read many times: its files stay open and
    are re-read with ``pread`` (:class:`CachedFile`), where :func:`cgroup_working_set` and
    :func:`cgroup_oom_kills` open and close them on every call. Same values; 0 once the cgroup
    is gone. :meth:`close` when done with it."""

    def __init__(self, version: int, directory: str) -> None:
        self.version = version
        self.directory = directory
        self._level = CgroupLevel(version, directory, 0)
        name = "memory.oom_control" if version == 1 else "memory.events"
        self._events = CachedFile(os.path.join(directory, name))

    def working_set(self) -> int:
        try:
            return self._level.read_used()
        except (OSError, ValueError, IndexError):
            return 0

    def oom_kills(self) -> int:
        try:
            return field_int(self._events.read(), b"oom_kill") or 0
        except OSError:
            return 0

    def close(self) -> None:
        self._level.close()
        self._events.close()


def cgroup_oom_kills(version: int, directory: str) -> int:
    """How many processes the kernel OOM-killed in this cgroup (v1 ``memory.oom_control``
    ``oom_kill``, v2 ``memory.events`` ``oom_kill``); 0 if unknown."""
    name = "memory.oom_control" if version == 1 else "memory.events"
    try:
        with open(os.path.join(directory, name), "rb") as handle:
            return field_int(handle.read(), b"oom_kill") or 0
    except OSError:
        return 0


def cgroup_peak(version: int, directory: str) -> int | None:
    """Highest usage the cgroup reached, in bytes (v1 ``memory.max_usage_in_bytes``, v2
    ``memory.peak`` on kernels >= 5.19); None if unknown."""
    name = "memory.max_usage_in_bytes" if version == 1 else "memory.peak"
    try:
        with open(os.path.join(directory, name), "rb") as handle:
            return _parse_int(handle.read())
    except (OSError, ValueError, IndexError):
        return None
