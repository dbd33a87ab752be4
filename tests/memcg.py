"""A memory cgroup (v1) of the test's own, sized relative to what the test needs: processes are
started inside it through a wrapper (``echo $$ > cgroup.procs; exec ...``); on exit every
process still in it is SIGKILLed by pid and the cgroup removed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence

ROOT = "/sys/fs/cgroup/memory"


class MemoryCgroup:
    def __init__(self, path: str) -> None:
        self.path = path

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this cgroup."""
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *argv]

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.wrap(argv), **kwargs)

    def read(self, name: str) -> str:
        with open(os.path.join(self.path, name)) as handle:
            return handle.read()

    @property
    def oom_kills(self) -> int:
        for line in self.read("memory.oom_control").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    @property
    def peak_bytes(self) -> int:
        return int(self.read("memory.max_usage_in_bytes"))

    def pids(self) -> list[int]:
        return [int(line) for line in self.read("cgroup.procs").split()]


def available() -> bool:
    return os.path.isdir(ROOT) and os.access(ROOT, os.W_OK)


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int) -> Iterator[MemoryCgroup]:
    path = os.path.join(ROOT, f"og-test-{uuid.uuid4().hex[:12]}")
    os.mkdir(path)
    group = MemoryCgroup(path)
    try:
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as handle:
            handle.write(str(int(limit_bytes)))
        yield group
    finally:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                pids = group.pids()
            except OSError:
                break
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        for _ in range(50):
            try:
                os.rmdir(path)
                break
            except OSError:
                time.sleep(0.1)


HOLDER = r"""
import sys, time
block = bytearray(int(sys.argv[1]))
for i in range(0, len(block), 4096):
    block[i] = 1
print("ready", flush=True)
time.sleep(3600)
"""


def hold_memory(group: MemoryCgroup, nbytes: int) -> subprocess.Popen:
    """An unrelated process inside ``group`` that holds ``nbytes`` (touched) until killed."""
    proc = group.popen(
        [sys.executable, "-c", HOLDER, str(int(nbytes))], stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError("the memory holder did not start")
    return proc
