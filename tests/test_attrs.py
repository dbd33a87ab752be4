"""Batched user-attribute writes: the same result as one-key writes on every storage kind,
and the same error for a finished trial."""

from __future__ import annotations

import optuna
import pytest
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from optuna_guard._attrs import set_user_attrs


@pytest.fixture(params=["memory", "sqlite", "sqlite-uncached", "journal"])
def storage(request, tmp_path):
    if request.param == "memory":
        return optuna.storages.InMemoryStorage()
    if request.param == "sqlite":
        return optuna.storages.get_storage(f"sqlite:///{tmp_path / 'a.db'}")  # cached RDB
    if request.param == "sqlite-uncached":
        return optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'b.db'}")
    return JournalStorage(JournalFileBackend(str(tmp_path / "journal.log")))


def test_all_keys_are_written_and_earlier_ones_kept(storage) -> None:
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    trial.set_user_attr("mine", "kept")
    set_user_attrs(
        storage, trial._trial_id, {"peak_rss_gb": 1.25, "lowest_available_gb": 3.5, "note": [1, 2]}
    )
    set_user_attrs(storage, trial._trial_id, {"peak_rss_gb": 1.5})  # overwrite one
    study.tell(trial, 1.0)
    attrs = optuna.load_study(study_name=study.study_name, storage=storage).trials[0].user_attrs
    assert attrs == {
        "mine": "kept",
        "peak_rss_gb": 1.5,
        "lowest_available_gb": 3.5,
        "note": [1, 2],
    }


def test_a_finished_trial_refuses_them_like_optuna_does(storage) -> None:
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    study.tell(trial, 1.0)
    with pytest.raises(UpdateFinishedTrialError):
        set_user_attrs(storage, trial._trial_id, {"a": 1, "b": 2})
    assert study.trials[0].user_attrs == {}


def test_the_in_memory_copy_is_a_real_shallow_copy() -> None:
    from optuna_guard._attrs import _shallow_copy

    study = optuna.create_study()
    trial = study.ask()
    trial.set_user_attr("a", 1)
    frozen = study._storage.get_trial(trial._trial_id)
    set_user_attrs(study._storage, trial._trial_id, {"b": 2, "c": 3})
    assert frozen.user_attrs == {"a": 1}  # a FrozenTrial handed out earlier is not changed
    clone = _shallow_copy(frozen)
    assert clone is not frozen and clone == frozen and clone.__dict__ == frozen.__dict__
