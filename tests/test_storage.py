"""open_storage makes SQLite safe for several processes; end_trial_from_outside never loses data."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from optuna_guard import tags
from optuna_guard.exceptions import ConfigError
from optuna_guard.storage import default_storage_url, end_trial_from_outside, open_storage


def _study(tmp_path, name="s"):
    storage = open_storage(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    return optuna.create_study(study_name=name, storage=storage, direction="minimize")


def test_sqlite_gets_wal_and_busy_timeout(tmp_path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    with storage.engine.connect() as conn:
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
        timeout = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
    assert mode == "wal"
    assert timeout >= 30_000


def test_default_url_is_a_sqlite_file_in_cwd(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_storage_url() == f"sqlite:///{tmp_path / 'optuna_guard.db'}"


@pytest.mark.parametrize("url", ["study.db", "not a url"])
def test_bad_url_is_a_config_error(url) -> None:
    with pytest.raises(ConfigError, match="not a database URL"):
        open_storage(url)


def test_end_running_trial_writes_tags_then_state(tmp_path) -> None:
    study = _study(tmp_path)
    trial = study.ask()
    trial.report(0.5, step=1)
    ended = end_trial_from_outside(
        study._storage,
        trial._trial_id,
        TrialState.PRUNED,
        {tags.EMERGENCY_KILLED: True, tags.KILL_REASON: "test"},
    )
    frozen = study.trials[0]
    assert ended is True
    assert frozen.state == TrialState.PRUNED
    assert frozen.value == 0.5  # like Optuna: the last intermediate value
    assert frozen.user_attrs == {tags.EMERGENCY_KILLED: True, tags.KILL_REASON: "test"}


def test_finished_trial_is_left_alone(tmp_path) -> None:
    study = _study(tmp_path)
    trial = study.ask()
    study.tell(trial, 1.25)
    ended = end_trial_from_outside(
        study._storage, trial._trial_id, TrialState.FAIL, {tags.WORKER_CRASHED: True}
    )
    frozen = study.trials[0]
    assert ended is False
    assert frozen.state == TrialState.COMPLETE and frozen.value == 1.25
    assert tags.WORKER_CRASHED not in frozen.user_attrs


def test_only_prune_or_fail(tmp_path) -> None:
    study = _study(tmp_path)
    trial = study.ask()
    with pytest.raises(ValueError, match="PRUNED or FAIL"):
        end_trial_from_outside(study._storage, trial._trial_id, TrialState.COMPLETE)
