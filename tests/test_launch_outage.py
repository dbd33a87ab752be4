"""A PostgreSQL restart in the middle of a launch: workers and the supervisor retry through
the outage (ResilientStorage), the study completes, no trial is lost or left RUNNING."""

from __future__ import annotations

import os
import subprocess
import threading

import pytest
import sqlalchemy
from optuna.trial import TrialState
from supervisor_helpers import (
    FAST,
    assert_nothing_running,
    objective_spec,
    read_events,
    trials_of,
    wait_for,
)

from optuna_guard import events
from optuna_guard.supervisor import launch


def _pg_version() -> str:
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions:
        pytest.fail("no PostgreSQL cluster in /etc/postgresql; the CI machine must provide one")
    return versions[-1]


def _postmaster_start(url: str) -> object:
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            return connection.execute(
                sqlalchemy.text("SELECT pg_postmaster_start_time()")
            ).scalar()
    finally:
        engine.dispose()


def _server_up() -> bool:
    return (
        subprocess.run(
            ["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-t", "2"], capture_output=True
        ).returncode
        == 0
    )


def test_postgres_restart_mid_launch_loses_nothing(
    postgres_url, tmp_path, unique_study_name, monkeypatch, quiet_optuna
):
    version = _pg_version()
    monkeypatch.setenv("LAUNCHER_TEST_SLEEP", "0.1")
    before = _postmaster_start(postgres_url)
    logs = tmp_path / "logs"
    restart: dict[str, object] = {}

    def restart_when_running() -> None:
        try:
            events_path = str(logs / "events.jsonl")
            wait_for(
                lambda: (
                    os.path.exists(events_path)
                    and sum(e["event"] == events.TRIAL_FINISHED for e in read_events(events_path))
                    >= 3
                ),
                timeout=90,
                what="three finished trials",
            )
            restart["result"] = subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
                capture_output=True,
                text=True,
                timeout=120,
            )
        except BaseException as exc:  # reported by the test body
            restart["error"] = exc

    thread = threading.Thread(target=restart_when_running, daemon=True)
    thread.start()
    try:
        summary = launch(
            objective_spec("launcher_quick"),
            study_name=unique_study_name,
            storage=postgres_url,
            workers=2,
            n_trials=24,
            log_dir=str(logs),
            **dict(FAST, storage_deadline=120.0),
        )
    finally:
        thread.join(timeout=150)
        wait_for(_server_up, timeout=60, what="PostgreSQL back up")  # leave the server running
    assert "error" not in restart, restart.get("error")
    result = restart["result"]
    assert result.returncode == 0, result.stderr
    assert (
        _postmaster_start(postgres_url) != before
    )  # the server really restarted during the launch
    trials = trials_of(postgres_url, unique_study_name)
    assert_nothing_running(trials)
    assert summary.exit_code == 0 and summary.finished == 24
    assert len(trials) == 24 and all(t.state == TrialState.COMPLETE for t in trials)
    assert summary.crashes == 0 and summary.kills == 0
    outages = [
        e for e in read_events(str(logs / "events.jsonl")) if e["event"] == events.STORAGE_OUTAGE
    ]
    # the restart hit live calls, which were retried through instead of failing
    assert any(e["outage"] == "began" for e in outages) and any(
        e["outage"] == "ended" for e in outages
    )
