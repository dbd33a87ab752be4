"""Optuna's heartbeat table holds a row for every live trial of the launcher while it runs (the
supervisor beats for its workers), so a plain ``study.optimize`` worker with a heartbeat on the
same study sees our trials as alive from their start."""

from __future__ import annotations

import threading

import optuna
import sqlalchemy
from optuna.trial import TrialState
from supervisor_helpers import FAST, objective_spec, trials_of, wait_for

from optuna_guard.supervisor import launch


def test_running_trials_have_heartbeat_rows(
    sqlite_url, tmp_path, unique_study_name, quiet_optuna, monkeypatch
):
    monkeypatch.setenv("LAUNCHER_TEST_SLEEP", "2.0")
    done = threading.Event()
    result: list[object] = []

    def run() -> None:
        try:
            result.append(
                launch(
                    objective_spec("launcher_quick"),
                    study_name=unique_study_name,
                    storage=sqlite_url,
                    workers=1,
                    n_trials=2,
                    log_dir=str(tmp_path / "logs"),
                    **FAST,
                )
            )
        finally:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    # the study (and its tables) first: the polling below must not race the launch's schema setup
    optuna.create_study(study_name=unique_study_name, storage=sqlite_url)
    thread.start()
    engine = sqlalchemy.create_engine(sqlite_url)
    checked: set[int] = set()
    try:

        def a_running_trial_with_its_row() -> bool:
            try:
                running = [
                    t
                    for t in trials_of(sqlite_url, unique_study_name)
                    if t.state == TrialState.RUNNING
                ]
            except Exception:  # the study is not created yet
                return False
            if not running:
                return False
            with engine.connect() as connection:
                rows = {
                    r[0]
                    for r in connection.execute(
                        sqlalchemy.text("SELECT trial_id FROM trial_heartbeats")
                    )
                }
            checked.update(t._trial_id for t in running if t._trial_id in rows)
            return bool(checked)

        wait_for(
            a_running_trial_with_its_row,
            timeout=60,
            interval=0.2,
            what="a RUNNING trial with a heartbeat row",
        )
        assert done.wait(120), "the launch did not finish"
        assert result and result[0].exit_code == 0
    finally:
        done.wait(120)
        engine.dispose()
