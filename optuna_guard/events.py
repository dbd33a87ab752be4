"""The launcher's event log: one JSON object per line, appended, read back by reports.

Schema of a line (keys beyond these may appear; readers must ignore unknown keys):
    ts          float, Unix time of the event
    time        str, ISO 8601 local time with offset
    event       one of the names below (WORKER_STARTED, ..., LAUNCH_FINISHED)
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
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from optuna_guard.exceptions import ConfigError

T = TypeVar("T")

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


def read_json_lines(
    path: str | os.PathLike[str],
    parse: Callable[[str], T],
    *,
    what: str,
    unreadable_hint: str,
    bad_line: str,
) -> list[T]:
    """Parse each non-blank line of a JSON-lines file that a killed writer may have left torn.

    Shared by the event log and the monitor log, which are both appended a line at a time.

    Args:
        path: The file.
        parse: Turns one stripped line into a record; raises ValueError (``json.loads`` does),
            KeyError or TypeError when the line is not one.
        what: The file's kind for messages, e.g. ``"event log"``.
        unreadable_hint: What to do when the file cannot be read, e.g. ``"pass an existing
            file."``.
        bad_line: What a bad line is and what to check, e.g. ``"not JSON; is it an
            optuna-guard event log?"``.

    Returns:
        The records, in file order. A bad last line is skipped (the writer was killed
        mid-write).

    Raises:
        ConfigError: The file cannot be read, or a line before the last one is bad.
    """
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as handle:
            lines = handle.readlines()
    except OSError as exc:
        raise ConfigError(
            f"cannot read {what} {name!r}: {exc.strerror}; {unreadable_hint}"
        ) from None
    records = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            records.append(parse(line))
        except (ValueError, KeyError, TypeError):
            if number == len(lines):
                continue
            raise ConfigError(f"{what} {name!r} line {number} is {bad_line}") from None
    return records


def read_events(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Yield the events of a log; a torn last line (the writer was killed) is skipped.

    Args:
        path: An event log written by :class:`EventLog` (``--event-log``).

    Returns:
        The events in file order; JSON lines that are not events are passed over.

    Raises:
        ConfigError: (while iterating) The file cannot be read or a line in the middle is not
            JSON.
    """
    records = read_json_lines(
        path,
        json.loads,
        what="event log",
        unreadable_hint="pass an existing file.",
        bad_line="not JSON; is it an optuna-guard event log?",
    )
    yield from (r for r in records if isinstance(r, dict) and "event" in r)
