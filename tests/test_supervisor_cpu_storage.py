"""The supervisor's cheaper storage work (issue 15): a storage opened with ``skip_setup`` builds
Optuna's schema manager only when asked, the heartbeat rows are still Optuna's rows, and the
lost-trial sweep still finds what it found when it reads only the RUNNING trials."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import TrialState

from optuna_guard import tags
from optuna_guard.storage import open_storage
from optuna_guard.supervisor import _lease
from optuna_guard.supervisor._heartbeat import SupervisorHeartbeat, record_heartbeats

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning"),
]


def test_skip_setup_opens_without_alembic_and_still_answers_the_schema_version(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    optuna.create_study(study_name="s", storage=open_storage(url))  # tables set up once
    script = textwrap.dedent(
        f"""
        import sys, optuna
        from optuna_guard.storage import open_storage
        storage = open_storage({url!r}, skip_setup=True)
        study = optuna.load_study(study_name="s", storage=storage)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
        print("alembic imported:", "alembic" in sys.modules)
        print("version:", storage.get_current_version() == storage.get_head_version())
        print("alembic imported:", "alembic" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == ["alembic imported: False", "version: True", "alembic imported: True"]


def test_a_normal_open_still_checks_the_schema_at_once(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    assert isinstance(storage, RDBStorage)
    assert type(storage._version_manager).__name__ == "_VersionManager"
    assert storage.get_current_version() == storage.get_head_version()


def _heartbeat_storage(tmp_path):
    return open_storage(
        f"sqlite:///{tmp_path / 'db.sqlite3'}", heartbeat_interval=60, grace_period=120
    )


def test_heartbeat_rows_are_optunas_rows(tmp_path, quiet_optuna):
    """Rows written in one statement per kind are read by Optuna's stale rule as its own: a
    beaten trial is not stale, and a row left to age makes the trial stale."""
    storage = _heartbeat_storage(tmp_path)
    study = optuna.create_study(study_name="s", storage=storage)
    assert is_heartbeat_enabled(storage)
    fresh, aged = study.ask(), study.ask()
    record_heartbeats(storage, [fresh._trial_id, aged._trial_id])  # first rows (INSERT)
    record_heartbeats(storage, [fresh._trial_id])  # an existing row (UPDATE)
    with storage.engine.begin() as conn:  # the other row's beat lies far in the past
        conn.exec_driver_sql(
            "UPDATE trial_heartbeats SET heartbeat = '2000-01-01 00:00:00' WHERE trial_id = ?",
            (aged._trial_id,),
        )
    assert storage._get_stale_trial_ids(study._study_id) == [aged._trial_id]


def test_sweep_still_ends_running_trials_of_a_lost_launch(tmp_path, quiet_optuna):
    """The sweep reads the RUNNING trials straight from the storage: finished trials stay
    untouched, the lost launch's running trial is ended FAIL worker_lost, ours is left."""
    storage = _heartbeat_storage(tmp_path)
    study = optuna.create_study(study_name="s", storage=storage)
    for _ in range(3):
        study.tell(study.ask(), 1.0)
    lost = study.ask()
    ours = study.ask()
    for trial, launch in ((lost, "gone-launch"), (ours, "our-launch")):
        storage.set_trial_user_attr(trial._trial_id, tags.LAUNCH_ID, launch)
    now = time.time()
    gone = _lease.make_lease(
        "gone-launch", "other-host", 1, 1, 120.0, {lost._trial_id}, now=now - 1000
    )
    storage.set_study_system_attr(study._study_id, _lease.lease_key("gone-launch"), gone.to_attr())
    heartbeat = SupervisorHeartbeat(storage, "s", "our-launch", 60, 120)
    heartbeat.live_trials = frozenset({ours._trial_id})
    assert heartbeat.sweep_lost(now) == 1
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.COMPLETE] * 3 + [TrialState.FAIL, TrialState.RUNNING]
    assert storage.get_trial(lost._trial_id).user_attrs[tags.WORKER_LOST] is True
