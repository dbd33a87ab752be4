"""Real launches: N worker processes share one study on SQLite, PostgreSQL and MariaDB and
finish exactly T trials in total, each tagged with the worker that ran it."""

from __future__ import annotations

import socket
import sys

import optuna
import pytest
from optuna.trial import TrialState
from supervisor_helpers import (
    FAST,
    OBJECTIVES,
    assert_nothing_running,
    objective_spec,
    read_events,
    trials_of,
)

from optuna_guard import events, tags
from optuna_guard.exceptions import ConfigError
from optuna_guard.supervisor import launch


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "mysql"])
def test_three_workers_finish_exactly_t_trials(
    backend, request, tmp_path, unique_study_name, quiet_optuna
):
    url = request.getfixturevalue(f"{backend}_url")
    summary = launch(
        objective_spec("launcher_quick"),
        study_name=unique_study_name,
        storage=url,
        workers=3,
        n_trials=10,
        log_dir=str(tmp_path / "logs"),
        **FAST,
    )
    trials = trials_of(url, unique_study_name)
    assert len(trials) == 10
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 10
    assert summary.exit_code == 0 and summary.finished == 10 and summary.complete == 10
    assert {t.user_attrs[tags.WORKER_ID] for t in trials} <= {1, 2, 3}
    assert len({t.user_attrs[tags.WORKER_PID] for t in trials}) >= 2  # the work was shared
    assert all(t.user_attrs[tags.HOSTNAME] == socket.gethostname() for t in trials)
    assert all(tags.PEAK_RSS_GB in t.user_attrs for t in trials)  # unguarded objective got @guard
    log = read_events(str(tmp_path / "logs" / "events.jsonl"))
    assert sum(e["event"] == events.TRIAL_STARTED for e in log) == 10
    assert sum(e["event"] == events.WORKER_STARTED for e in log) == 3
    assert log[0]["event"] == events.LAUNCH_STARTED and log[-1]["event"] == events.LAUNCH_FINISHED
    assert any(e["event"] == events.MEMORY_SAMPLE and e["available_gb"] > 0 for e in log)
    assert_nothing_running(trials)


def test_function_objective_and_existing_direction(
    sqlite_url, tmp_path, unique_study_name, quiet_optuna
):
    """A module-level function is launched by its spec; another direction is refused."""
    sys.path.insert(0, OBJECTIVES)
    try:
        from launcher_quick import maximize_me  # a function object: launch() turns it into a spec
    finally:
        sys.path.remove(OBJECTIVES)

    summary = launch(
        maximize_me,
        study_name=unique_study_name,
        storage=sqlite_url,
        direction="maximize",
        workers=2,
        n_trials=3,
        log_dir=str(tmp_path / "a"),
        **FAST,
    )
    assert summary.finished == 3 and summary.best_value is not None
    trials = trials_of(sqlite_url, unique_study_name)
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    assert summary.best_value == max(
        t.value for t in trials
    )  # the study was created with maximize
    with pytest.raises(ConfigError, match="already exists with direction maximize"):
        launch(
            objective_spec("launcher_quick"),
            study_name=unique_study_name,
            storage=sqlite_url,
            workers=1,
            n_trials=1,
            log_dir=str(tmp_path / "c"),
            **FAST,
        )
    assert len(trials_of(sqlite_url, unique_study_name)) == 3  # nothing ran


@pytest.mark.filterwarnings(
    "ignore::optuna.exceptions.ExperimentalWarning", "ignore:Heartbeat of storage:UserWarning"
)
def test_heartbeat_rows_and_stale_trials_of_a_dead_launcher_are_failed(
    sqlite_url, tmp_path, unique_study_name, quiet_optuna, monkeypatch
):
    """The supervisor keeps Optuna's heartbeat rows for its workers' trials (a row within
    ``first_beat_delay``, at most 1 s, of each trial's start, written with the rows of trials
    that started at the same time: plain ``optimize`` workers judge by these rows; a trial that
    ended sooner needs none), and fails RUNNING trials whose heartbeat stopped long ago (a
    launcher on another host that died)."""
    import sqlalchemy

    monkeypatch.setenv("LAUNCHER_TEST_SLEEP", "1.5")  # longer than the first beat's delay

    from optuna_guard.storage import open_storage

    hb_storage = open_storage(sqlite_url, heartbeat_interval=30, grace_period=300)
    study = optuna.create_study(study_name=unique_study_name, storage=hb_storage)
    zombie = study.ask()
    hb_storage.record_heartbeat(zombie._trial_id)
    with hb_storage.engine.begin() as connection:
        connection.execute(
            sqlalchemy.text(
                "UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-1 hour') WHERE trial_id = :id"
            ),
            {"id": zombie._trial_id},
        )
    launch(
        objective_spec("launcher_quick"),
        study_name=unique_study_name,
        storage=sqlite_url,
        workers=1,
        n_trials=2,
        log_dir=str(tmp_path / "logs"),
        **FAST,
    )
    trials = trials_of(sqlite_url, unique_study_name)
    assert trials[0].state == TrialState.FAIL  # failed as stale by the launcher's heartbeat sweep
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE] * 2
    with hb_storage.engine.connect() as connection:
        beats = {
            row[0]
            for row in connection.execute(sqlalchemy.text("SELECT trial_id FROM trial_heartbeats"))
        }
    assert {t._trial_id for t in trials[1:]} <= beats
