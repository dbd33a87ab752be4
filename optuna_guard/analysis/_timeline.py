"""What a report draws from the launcher's event log (and, without one, from the storage).

All functions take plain event dicts (``optuna_guard.events.read_events``) and return plain
lists of dicts with Unix timestamps, so the JSON report can carry them as they are.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from optuna.trial import FrozenTrial

from optuna_guard import events as ev
from optuna_guard import tags
from optuna_guard.analysis import _classify
from optuna_guard.exceptions import ConfigError

# Events drawn as markers on the worker timeline.
MARKER_EVENTS = (
    ev.WORKER_KILLED,
    ev.TRIAL_KILLED,
    ev.WORKER_RECYCLED,
    ev.WORKER_CRASHED,
    ev.MEMORY_WARNING,
)

_SAME_KILL_WINDOW_S = 5.0

# How a trial segment ends when the study does not know the trial (or the log has no number).
_END_EVENTS = {
    ev.TRIAL_FINISHED: None,  # the study says how
    ev.TRIAL_KILLED: _classify.KILLED,
    ev.WORKER_KILLED: _classify.KILLED,
    ev.WORKER_CRASHED: _classify.CRASHED,
    ev.WORKER_EXITED: None,
}


def load_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All events of a log sorted by time; ConfigError if it cannot be read or has no events."""
    if os.path.isdir(path):
        raise ConfigError(
            f"event log {os.fspath(path)!r} is a directory; pass the events.jsonl file."
        )
    events = list(ev.read_events(path))
    if not events:
        raise ConfigError(
            f"event log {os.fspath(path)!r} holds no events; is it an optuna-guard event log?"
        )
    for record in events:
        if not isinstance(record.get("ts"), (int, float)):
            raise ConfigError(
                f"event log {os.fspath(path)!r} has an event without a numeric 'ts'; is it an optuna-guard event log?"
            )
    return sorted(events, key=lambda e: e["ts"])


def count_events(events: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in events:
        counts[record["event"]] = counts.get(record["event"], 0) + 1
    return dict(sorted(counts.items()))


def worker_memory(events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per worker: pids, trials started/finished, kills, recycles, crashes, RSS peak/mean."""
    workers: dict[Any, dict[str, Any]] = {}
    rss: dict[Any, list[float]] = {}
    last_kill: dict[Any, Mapping[str, Any]] = {}
    for record in events:
        wid = record.get("worker_id")
        if wid is None:
            continue
        row = workers.setdefault(
            wid,
            {
                "worker_id": wid,
                "pids": [],
                "trials_started": 0,
                "trials_finished": 0,
                "kills": 0,
                "recycles": 0,
                "crashes": 0,
                "peak_rss_gb": None,
                "mean_rss_gb": None,
                "rss_samples": 0,
            },
        )
        pid = record.get("pid")
        if pid is not None and pid not in row["pids"]:
            row["pids"].append(pid)
        name = record["event"]
        if name == ev.TRIAL_STARTED:
            row["trials_started"] += 1
        elif name == ev.TRIAL_FINISHED:
            row["trials_finished"] += 1
        elif name in (ev.WORKER_KILLED, ev.TRIAL_KILLED):
            if not _same_kill(last_kill.get(wid), record):
                row["kills"] += 1
            last_kill[wid] = record
        elif name == ev.WORKER_RECYCLED:
            row["recycles"] += 1
        elif name == ev.WORKER_CRASHED:
            row["crashes"] += 1
        value = _number(record.get("rss_gb"))
        if value is not None:
            rss.setdefault(wid, []).append(value)
    for record in events:  # the launcher's periodic readings of every worker
        for reading in _worker_readings(record):
            known = workers.get(reading["worker_id"])
            if known is None:
                continue
            if reading.get("pid") is not None and reading["pid"] not in known["pids"]:
                known["pids"].append(reading["pid"])
            value = _number(reading.get("rss_gb"))
            if value is not None:
                rss.setdefault(reading["worker_id"], []).append(value)
    for wid, values in rss.items():
        workers[wid]["peak_rss_gb"] = round(max(values), 2)
        workers[wid]["mean_rss_gb"] = round(statistics.fmean(values), 2)
        workers[wid]["rss_samples"] = len(values)
    return sorted(workers.values(), key=lambda r: str(r["worker_id"]))


def event_segments(
    events: Sequence[Mapping[str, Any]], trials: Mapping[int, FrozenTrial]
) -> list[dict[str, Any]]:
    """Trial segments per worker: trial_started up to the event that ended it."""
    segments: list[dict[str, Any]] = []
    open_by_worker: dict[Any, dict[str, Any]] = {}
    last_ts = events[-1]["ts"] if events else None

    def close(seg: dict[str, Any], ts: float | None, how: str | None) -> None:
        seg["end_ts"] = ts
        seg["end_state"] = _segment_state(seg["trial_number"], trials, how)
        segments.append(seg)

    for record in events:
        wid = record.get("worker_id")
        name = record["event"]
        if wid is None:
            continue
        if name == ev.TRIAL_STARTED:
            if wid in open_by_worker:  # a start without an end: the worker moved on
                close(open_by_worker.pop(wid), record["ts"], None)
            open_by_worker[wid] = {
                "worker_id": wid,
                "trial_number": record.get("trial_number"),
                "start_ts": record["ts"],
                "source": "event_log",
            }
        elif name in _END_EVENTS and wid in open_by_worker:
            seg = open_by_worker[wid]
            number = record.get("trial_number")
            if (
                name in (ev.TRIAL_FINISHED, ev.TRIAL_KILLED)
                and number is not None
                and seg["trial_number"] not in (None, number)
            ):
                continue  # an end of another trial (should not happen; keep the open one)
            close(open_by_worker.pop(wid), record["ts"], _END_EVENTS[name])
    for seg in open_by_worker.values():
        close(seg, last_ts, None)
    return sorted(segments, key=lambda s: (s["start_ts"], str(s["worker_id"])))


def storage_segments(trials: Iterable[FrozenTrial]) -> list[dict[str, Any]]:
    """Trial segments from the storage (start/complete times and the ``worker_id`` tag)."""
    segments = []
    for trial in trials:
        if trial.datetime_start is None:
            continue
        end = trial.datetime_complete
        segments.append(
            {
                "worker_id": trial.user_attrs.get(tags.WORKER_ID),
                "trial_number": trial.number,
                "start_ts": trial.datetime_start.timestamp(),
                "end_ts": end.timestamp() if end is not None else None,
                "end_state": _classify.end_state(trial),
                "source": "storage",
            }
        )
    return sorted(segments, key=lambda s: (s["start_ts"], str(s["worker_id"])))


def markers(events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Kills, recycles, crashes and memory warnings as points in time per worker.

    A hard kill logged as both worker_killed and trial_killed gives one marker (worker_killed).
    """
    hard_kills = [e for e in events if e["event"] == ev.WORKER_KILLED]
    chosen = [
        e
        for e in events
        if e["event"] in MARKER_EVENTS
        and not (
            e["event"] == ev.TRIAL_KILLED
            and any(
                k.get("worker_id") == e.get("worker_id") and _same_kill(k, e) for k in hard_kills
            )
        )
    ]
    return [
        {
            "ts": record["ts"],
            "event": record["event"],
            "worker_id": record.get("worker_id"),
            "trial_number": record.get("trial_number"),
            "reason": record.get("reason"),
            "rss_gb": _number(record.get("rss_gb")),
            "available_gb": _number(record.get("available_gb")),
        }
        for record in chosen
    ]


def memory_samples(events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``memory_sample`` events as flat readings: the system's available memory (worker_id None)
    and each worker's RSS (from the event's ``workers`` list, or its own worker_id/rss_gb)."""
    samples = []
    for record in events:
        if record["event"] != ev.MEMORY_SAMPLE:
            continue
        samples.append(
            {
                "ts": record["ts"],
                "available_gb": _number(record.get("available_gb")),
                "worker_id": record.get("worker_id"),
                "rss_gb": _number(record.get("rss_gb")),
            }
        )
        for reading in _worker_readings(record):
            samples.append(
                {
                    "ts": record["ts"],
                    "available_gb": None,
                    "worker_id": reading["worker_id"],
                    "rss_gb": _number(reading.get("rss_gb")),
                }
            )
    return samples


def _worker_readings(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The per-worker readings that memory_sample and status events carry in ``workers``."""
    readings = record.get("workers")
    if not isinstance(readings, list):
        return []
    return [r for r in readings if isinstance(r, Mapping) and r.get("worker_id") is not None]


def _same_kill(previous: Mapping[str, Any] | None, record: Mapping[str, Any]) -> bool:
    """One hard kill may be logged twice (worker_killed and trial_killed): count it once."""
    if previous is None or previous["event"] == record["event"]:
        return False
    a, b = previous.get("trial_number"), record.get("trial_number")
    if a is not None and b is not None:
        return bool(a == b)  # worker_killed at the decision, trial_killed when it is reaped
    return bool(abs(record["ts"] - previous["ts"]) <= _SAME_KILL_WINDOW_S)


def _segment_state(number: int | None, trials: Mapping[int, FrozenTrial], how: str | None) -> str:
    if number is not None and number in trials:
        state = _classify.end_state(trials[number])
        if state not in (_classify.RUNNING, _classify.WAITING) or how is None:
            return state
    return how or "unknown"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
