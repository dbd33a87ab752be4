"""The event log is JSON lines that survive a writer killed mid-line."""

from __future__ import annotations

import json

import pytest

from optuna_guard import events
from optuna_guard.exceptions import ConfigError


def test_emit_and_read_back(tmp_path) -> None:
    path = tmp_path / "logs" / "events.jsonl"
    with events.EventLog(path) as log:
        log.emit(events.WORKER_STARTED, worker_id=1, pid=42)
        log.emit(
            events.TRIAL_KILLED,
            worker_id=1,
            pid=42,
            trial_number=3,
            reason="tree RSS 8.21 GB > 8.00 GB",
        )
    records = list(events.read_events(path))
    assert [r["event"] for r in records] == ["worker_started", "trial_killed"]
    assert records[1]["trial_number"] == 3 and records[1]["ts"] > 0
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_torn_last_line_is_skipped(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "worker_started", "ts": 1}\n{"event": "worker_ki')
    assert [r["event"] for r in events.read_events(path)] == ["worker_started"]


def test_garbage_in_the_middle_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('not json\n{"event": "worker_started", "ts": 1}\n')
    with pytest.raises(ConfigError, match="line 1 is not JSON"):
        list(events.read_events(path))


def test_missing_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read event log"):
        list(events.read_events(tmp_path / "nope.jsonl"))
