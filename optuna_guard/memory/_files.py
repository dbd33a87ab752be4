"""Cheap repeated reads of small kernel files (/proc, /sys/fs/cgroup).

The guard reads the same handful of files ten times a second and ``check_memory`` must cost
well under 50 µs, so a file is opened once and re-read with ``os.pread(fd, n, 0)``: procfs and
cgroupfs regenerate their content on every read at offset 0 (this is what ``top`` does with
/proc/meminfo). Opening a file costs more than reading it on the machines we measured.
"""

from __future__ import annotations

import os
import threading

_READ_SIZE = 64 * 1024


class CachedFile:
    """A kernel file kept open and re-read from offset 0. Raises OSError like ``open`` would."""

    __slots__ = ("_fd", "_lock", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()

    def read(self) -> bytes:
        fd = self._fd
        if fd is not None:
            try:
                data = os.pread(fd, _READ_SIZE, 0)
                if len(data) < _READ_SIZE:
                    return data
                return self._read_long(fd, data)
            except OSError:
                self.close()  # the file went away (cgroup removed): reopen once below
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            fd = self._fd
        data = os.pread(fd, _READ_SIZE, 0)
        return data if len(data) < _READ_SIZE else self._read_long(fd, data)

    @staticmethod
    def _read_long(fd: int, head: bytes) -> bytes:
        parts = [head]
        offset = len(head)
        while True:
            chunk = os.pread(fd, _READ_SIZE, offset)
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)
            offset += len(chunk)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass


def read_text(path: str) -> str:
    """One-off read of a small text file (discovery only, not on the hot path)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def field_int(data: bytes, key: bytes) -> int | None:
    """The integer after ``key`` in a ``key value`` / ``key: value kB`` style file, else None.

    ``key`` must match at the start of a line (``b"inactive_file"`` does not match
    ``total_inactive_file``).
    """
    start = 0
    while True:
        index = data.find(key, start)
        if index < 0:
            return None
        if index == 0 or data[index - 1 : index] == b"\n":
            end = index + len(key)
            following = data[end : end + 1]
            if following in (b" ", b":", b"\t"):
                line_end = data.find(b"\n", end)
                tokens = data[end : line_end if line_end >= 0 else len(data)].split()
                for token in tokens:
                    token = token.strip(b":")
                    if token.isdigit():
                        return int(token)
                return None
        start = index + 1
