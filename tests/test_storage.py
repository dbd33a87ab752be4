"""open_storage makes SQLite safe for several processes; end_trial_from_outside never loses data."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from optuna_guard import tags
from optuna_guard.exceptions import ConfigError
from optuna_guard.storage import (
    default_storage_url,
    end_trial_from_outside,
    mask_url,
    open_for_reading,
    open_storage,
)


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


# -- the read path of status and report ---------------------------------------------------------


def test_reading_loads_the_study(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    written = _study(tmp_path, "present")
    written.tell(written.ask(), 1.0)
    study = open_for_reading(url, "present")
    assert study.study_name == "present" and [t.value for t in study.trials] == [1.0]
    assert optuna.get_all_study_names(storage=url) == ["present"]


@pytest.mark.parametrize(
    ("url", "study", "needle"),
    [
        ("study.db", "s", "is not a database URL"),
        ("sqlite:///{tmp}/missing.db", "s", "storage file '{tmp}/missing.db' does not exist"),
        ("journal://{tmp}/missing.log", "s", "journal file '{tmp}/missing.log' does not exist"),
        ("sqlite:///:memory:", "s", "in-memory SQLite database"),
        ("nosuchdb://host/x", "s", "is not usable"),
        ("sqlite:///{tmp}/garbage.db", "s", "cannot read storage"),
        ("sqlite:///{tmp}/empty.db", "s", "cannot read storage"),
        ("postgresql+psycopg://u:secret@127.0.0.1:1/x", "s", "cannot reach storage"),
        ("sqlite:///{tmp}/db.sqlite3", "absent", "study 'absent' not found in sqlite:///"),
    ],
)
def test_reading_errors_are_one_line_and_create_nothing(tmp_path, url, study, needle) -> None:
    _study(tmp_path, "present")
    (tmp_path / "garbage.db").write_text("this is not sqlite")
    (tmp_path / "empty.db").touch()
    files = _files(tmp_path)
    url, needle = url.format(tmp=tmp_path), needle.format(tmp=tmp_path)
    with pytest.raises(ConfigError) as info:
        open_for_reading(url, study)
    message = str(info.value)
    assert needle in message and "\n" not in message and "secret" not in message, message
    assert info.value.exit_code == 2
    assert _files(tmp_path) == files  # no file created
    assert (tmp_path / "empty.db").stat().st_size == 0  # no table created
    if study == "absent":
        assert message.endswith("studies there: present. Check --study-name and --storage.")


def _files(directory) -> list[str]:
    """The files in ``directory``, without SQLite's WAL side files (they come and go)."""
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(("-wal", "-shm")))


def test_mask_url_hides_passwords() -> None:
    assert mask_url("postgresql+psycopg://user:s3cret@db:5432/x") == (
        "postgresql+psycopg://user:***@db:5432/x"
    )
    assert mask_url("sqlite:///a.db") == "sqlite:///a.db"
