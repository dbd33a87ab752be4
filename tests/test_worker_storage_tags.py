"""The launcher worker's storage writes the launcher's tags without transactions of their own:
worker tags in the trial's creating insert, the guard's end-of-trial tags in the tell's
transaction. What a user sees in the storage must not change; what can go wrong at the tell
(a trial ended from outside, a database error) must leave no half-written trial."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from optuna_guard import tags
from optuna_guard.resilience import ResilientStorage, StorageRetrySettings
from optuna_guard.storage import open_storage
from optuna_guard.supervisor._worker import _tagging
from optuna_guard.trial_guard import guard

WORKER_TAGS = {tags.WORKER_ID: 3, tags.WORKER_PID: 4242, tags.HOSTNAME: "host-a"}


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each database the tell's transaction must work on (row locks, executemany)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture()
def name() -> str:
    return f"tags-{uuid.uuid4().hex[:12]}"  # the servers' databases are shared


def _backend(url: str) -> RDBStorage:
    storage = open_storage(url)
    assert isinstance(storage, RDBStorage)
    return storage


def _fresh_view(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url))


def _count_commits(storage: RDBStorage) -> list[int]:
    commits = [0]

    def on_commit(_conn: Any) -> None:
        commits[0] += 1

    sqlalchemy.event.listen(storage.engine, "commit", on_commit)
    return commits


@guard()
def _objective(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 0.0, 1.0)


def test_a_guarded_trial_has_worker_and_memory_tags_with_one_commit_fewer(
    url: str, name: str
) -> None:
    backend = _backend(url)
    chain = ResilientStorage(_tagging(backend, WORKER_TAGS))
    study = optuna.create_study(
        study_name=name, storage=chain, sampler=optuna.samplers.RandomSampler(seed=0)
    )
    commits = _count_commits(backend)
    study.optimize(_objective, n_trials=1)
    tagged_commits = commits[0]

    plain_backend = _backend(url)
    plain = optuna.create_study(
        study_name=f"{name}-plain",
        storage=plain_backend,
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    plain_commits = _count_commits(plain_backend)
    plain.optimize(_objective, n_trials=1)

    trial = _fresh_view(url, name).trials[0]
    assert trial.state == TrialState.COMPLETE
    for key, value in WORKER_TAGS.items():
        assert trial.user_attrs[key] == value
    for key in tags.memory_seen(1, 1, None):
        assert key in trial.user_attrs, key
    assert trial.user_attrs[tags.PEAK_RSS_GB] > 0
    # the guard's tags rode in the tell's commit (the plain storage gave them one of their own)
    # and Trial's read-back of the new trial came from the cache (a read transaction on SQLite)
    assert tagged_commits == plain_commits[0] - 2


def test_held_tags_are_visible_before_the_tell_and_written_with_it(url: str, name: str) -> None:
    backend = _backend(url)
    chain = _tagging(backend, WORKER_TAGS)
    study = optuna.create_study(study_name=name, storage=chain)
    trial = study.ask()
    assert chain.hold_user_attrs_for_tell(trial._trial_id, {"a": 1, "b": "two"})
    assert chain.get_trial(trial._trial_id).user_attrs["b"] == "two"
    assert "a" not in _fresh_view(url, name).trials[0].user_attrs  # not written yet
    study.tell(trial, 0.5)
    stored = _fresh_view(url, name).trials[0]
    assert stored.state == TrialState.COMPLETE
    assert stored.user_attrs["a"] == 1 and stored.user_attrs["b"] == "two"
    assert stored.user_attrs[tags.WORKER_PID] == 4242


def test_held_tags_update_keys_the_trial_already_has(url: str, name: str) -> None:
    backend = _backend(url)
    chain = _tagging(backend, WORKER_TAGS)
    study = optuna.create_study(study_name=name, storage=chain)
    trial = study.ask()
    trial.set_user_attr("a", "old")
    chain.hold_user_attrs_for_tell(trial._trial_id, {"a": "new", "c": 3})
    study.tell(trial, 1.0)
    stored = _fresh_view(url, name).trials[0]
    assert stored.user_attrs["a"] == "new" and stored.user_attrs["c"] == 3


def test_a_trial_ended_from_outside_gets_neither_state_nor_held_tags(url: str, name: str) -> None:
    backend = _backend(url)
    chain = _tagging(backend, WORKER_TAGS)
    study = optuna.create_study(study_name=name, storage=chain)
    trial = study.ask()
    chain.hold_user_attrs_for_tell(trial._trial_id, {"a": 1, "b": 2})
    outside = open_storage(url)
    outside.set_trial_user_attr(trial._trial_id, "ended_by", "supervisor")
    outside.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    with pytest.raises(UpdateFinishedTrialError):
        chain.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [1.0])
    stored = _fresh_view(url, name).trials[0]
    assert stored.state == TrialState.FAIL and stored.value is None
    assert stored.user_attrs["ended_by"] == "supervisor"
    assert "a" not in stored.user_attrs
    assert chain._held == {}


def test_a_database_error_at_the_tell_rolls_back_the_tags_and_the_retry_writes_both(
    url: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = _backend(url)
    chain = ResilientStorage(
        _tagging(backend, WORKER_TAGS),
        settings=StorageRetrySettings(deadline_s=10.0, initial_backoff_s=0.01, max_backoff_s=0.01),
    )
    study = optuna.create_study(study_name=name, storage=chain)
    trial = study.ask()
    assert chain.hold_user_attrs_for_tell(trial._trial_id, {"a": 1})
    real = RDBStorage._set_trial_value_without_commit
    calls: list[bool] = []

    def flaky(self: RDBStorage, *args: Any, **kwargs: Any) -> None:
        # inside Optuna's own transaction, after the held tags went into it
        calls.append(True)
        if len(calls) == 1:
            raise sqlalchemy.exc.OperationalError(
                "UPDATE trial_values", {}, Exception("server closed the connection unexpectedly")
            )
        real(self, *args, **kwargs)

    monkeypatch.setattr(RDBStorage, "_set_trial_value_without_commit", flaky)
    study.tell(trial, 2.0)
    assert len(calls) == 2
    stored = _fresh_view(url, name).trials[0]
    assert stored.state == TrialState.COMPLETE and stored.value == 2.0
    assert stored.user_attrs["a"] == 1


def test_a_failed_tell_commits_neither_the_tags_nor_the_state(
    url: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = _backend(url)
    chain = _tagging(backend, WORKER_TAGS)
    study = optuna.create_study(study_name=name, storage=chain)
    trial = study.ask()
    chain.hold_user_attrs_for_tell(trial._trial_id, {"a": 1})

    def broken(self: RDBStorage, *args: Any, **kwargs: Any) -> None:
        raise sqlalchemy.exc.OperationalError(
            "UPDATE trial_values", {}, Exception("disk I/O error")
        )

    with monkeypatch.context() as patch:
        patch.setattr(RDBStorage, "_set_trial_value_without_commit", broken)
        with pytest.raises(optuna.exceptions.StorageInternalError):
            chain.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [3.0])
    stored = _fresh_view(url, name).trials[0]
    assert stored.state == TrialState.RUNNING and "a" not in stored.user_attrs
    assert chain.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [3.0])
    stored = _fresh_view(url, name).trials[0]
    assert stored.state == TrialState.COMPLETE and stored.user_attrs["a"] == 1


def test_the_read_back_of_a_new_trial_matches_the_database_and_later_reads_see_others_writes(
    url: str, name: str
) -> None:
    backend = _backend(url)
    chain = _tagging(backend, WORKER_TAGS)
    study = optuna.create_study(study_name=name, storage=chain)
    trial_id = chain.create_new_trial(study._study_id)
    first = chain.get_trial(trial_id)  # served from the cache
    stored = _fresh_view(url, name).trials[0]
    assert (first.number, first.state, first.user_attrs, first.params) == (
        stored.number,
        stored.state,
        stored.user_attrs,
        stored.params,
    )
    first.user_attrs["mutated"] = True  # a copy: the cache is not changed through it
    outside = open_storage(url)
    outside.set_trial_state_values(trial_id, TrialState.FAIL)
    again = chain.get_trial(trial_id)  # from the database: sees the trial ended from outside
    assert again.state == TrialState.FAIL and "mutated" not in again.user_attrs
