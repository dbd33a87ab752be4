"""The launcher's event log: one JSON object per line, appended, read back by reports.

Schema of a line (keys beyond these may appear; readers must ignore unknown keys):
    ts          float, Unix time of the event
    time        str, ISO 8601 local time with offset
    event       one of EVENT_NAMES
    worker_id   int | null
    pid         int | null      worker process id
    trial_number int | null     the trial concerned
    reason      str | null      a sentence, e.g. "tree RSS 8.21 GB > 8.00 GB"
    rss_gb      float | null    worker tree RSS at the event
    available_gb float | null   system available memory at the event
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from optuna_guard.exceptions import ConfigError

WORKER_STARTED = "worker_started"
WORKER_RECYCLED = "worker_recycled"  # asked to finish its trial and exit (age, trials, RSS)
WORKER_KILLED = "worker_killed"  # hard kill (memory)
WORKER_CRASHED = "worker_crashed"  # died by itself
WORKER_EXITED = "worker_exited"  # normal exit
TRIAL_STARTED = "trial_started"
TRIAL_FINISHED = "trial_finished"
TRIAL_KILLED = "trial_killed"
TRIAL_RETRIED = "trial_retried"
TRIAL_LOST = "trial_lost"  # ended from outside (its launch judged lost): result or trial lost
MEMORY_WARNING = "memory_warning"
MEMORY_SAMPLE = "memory_sample"  # periodic system reading (for the report's timeline)
SIGNAL = "signal"
STATUS = "status"
STORAGE_OUTAGE = "storage_outage"
LAUNCH_STARTED = "launch_started"
LAUNCH_FINISHED = "launch_finished"

EVENT_NAMES = (
    WORKER_STARTED,
    WORKER_RECYCLED,
    WORKER_KILLED,
    WORKER_CRASHED,
    WORKER_EXITED,
    TRIAL_STARTED,
    TRIAL_FINISHED,
    TRIAL_KILLED,
    TRIAL_RETRIED,
    TRIAL_LOST,
    MEMORY_WARNING,
    MEMORY_SAMPLE,
    SIGNAL,
    STATUS,
    STORAGE_OUTAGE,
    LAUNCH_STARTED,
    LAUNCH_FINISHED,
)


class EventLog:
    """Appends events as JSON lines; each line is written with one ``write`` and flushed."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._lock = threading.Lock()
        # held open for the log's lifetime (one write per event); closed by close()/__exit__
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        now = time.time()
        record: dict[str, Any] = {
            "ts": round(now, 3),
            "time": _dt.datetime.fromtimestamp(now)
            .astimezone()
            .isoformat(timespec="milliseconds"),
            "event": event,
        }
        record.update(fields)
        line = json.dumps(record, default=str) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
        return record

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_events(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Yield the events of a log; a torn last line (the writer was killed) is skipped.

    Raises ConfigError when the file cannot be read or a line in the middle is not JSON.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.readlines()
    except OSError as exc:
        raise ConfigError(
            f"cannot read event log {os.fspath(path)!r}: {exc.strerror}; pass an existing file."
        ) from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise ConfigError(
                f"event log {os.fspath(path)!r} line {number} is not JSON; is it an optuna-guard event log?"
            ) from None
        if isinstance(record, dict) and "event" in record:
            yield record
