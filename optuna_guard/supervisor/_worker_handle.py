"""What the supervisor knows about one worker process, and the kill order it may be under.

State lives with the worker: every step of the arbiter reads and updates a :class:`WorkerHandle`
instead of keeping per-pid dictionaries of its own.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from optuna_guard.supervisor import _protocol

LOG_TAIL_LINES = 15  # lines of a worker's log quoted when workers crash-loop


@dataclasses.dataclass
class KillOrder:
    """A worker being stopped by the supervisor: SIGTERM sent at ``started_at``, SIGKILL due at
    ``sigkill_at``; ``tags`` are written on its trial (then PRUNED/FAIL) once it is gone."""

    kind: str
    reason: str
    tags: dict[str, Any]
    started_at: float
    sigkill_at: float
    sigkill_sent: bool = False
    limit: str | None = None
    trial_number: int | None = None


@dataclasses.dataclass
class WorkerHandle:
    """The supervisor's view of one worker process (``worker_id`` is the slot 1..N; a
    replacement takes the slot of the worker it replaces)."""

    worker_id: int
    spawn_index: int
    proc: Any  # subprocess.Popen or a test double with pid/poll()/wait()
    channel: _protocol.Channel
    log_path: str
    started_at: float
    age_limit: float | None
    ready: bool = False
    ticket: bool = False
    trial_id: int | None = None
    trial_number: int | None = None
    trial_started_at: float | None = None
    trials_started: int = 0
    trials_finished: int = 0
    rss_bytes: int = 0
    trial_peak_rss: int = 0
    deny_reason: str | None = None
    denied_at: float | None = None  # when it was told to exit (its bounded exit wait starts)
    recycled: bool = False
    kill: KillOrder | None = None
    stop_sent: bool = False
    fatal_error: str | None = None
    registered: bool = False
    cpu_ticks: int | None = None  # last CPU reading, and when it last changed (hung-worker health)
    cpu_changed_at: float | None = None

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    @property
    def busy(self) -> bool:
        """Holds a ticket or runs a trial (counts toward the T in flight)."""
        return self.ticket or self.trial_id is not None

    def clear_trial(self) -> None:
        """The worker no longer runs a trial."""
        self.trial_id = self.trial_number = self.trial_started_at = None

    def log_hint(self) -> str:
        return f"See {self.log_path}."

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        """The last lines of the worker's log (for a crash-loop error)."""
        return read_log_tail(self.log_path, lines)


def read_log_tail(path: str, lines: int) -> list[str]:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(size - 16384, 0))
            data = handle.read().decode("utf-8", "replace")
    except OSError:
        return []
    return data.splitlines()[-lines:]
