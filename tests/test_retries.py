"""RetryPolicy tables, shrink hooks, and enqueue_retry against a real SQLite study: the retry is
a WAITING trial that ask() pops, that suggest_* answers with the stored params, and that
Optuna's own RetryHeartbeatStaleTrialCallback helpers understand."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from optuna_guard import retries, tags
from optuna_guard.exceptions import ConfigError, ObjectiveSpecError
from optuna_guard.retries import RetryPolicy, enqueue_retry, load_shrink_hook
from optuna_guard.storage import end_trial_from_outside, open_storage

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def halve_batch(params: dict[str, Any]) -> dict[str, Any]:
    return {**params, "batch": params["batch"] // 2}


@pytest.fixture(scope="module")
def _storage(tmp_path_factory: pytest.TempPathFactory) -> optuna.storages.RDBStorage:
    # one database file per module: creating the schema costs a second or two, a study does not
    return open_storage(f"sqlite:///{tmp_path_factory.mktemp('db') / 'retries.db'}")


@pytest.fixture()
def study(_storage: optuna.storages.RDBStorage) -> optuna.Study:
    return optuna.create_study(storage=_storage, study_name=f"retries-{uuid.uuid4().hex[:8]}")


def _killed_trial(
    study: optuna.Study,
    *,
    end: str = tags.EMERGENCY_KILLED,
    batch: int = 64,
    state: TrialState = TrialState.PRUNED,
) -> optuna.trial.FrozenTrial:
    """A trial that suggested params, was tagged by the guard/launcher and ended from outside."""
    study.enqueue_trial({"batch": batch})
    trial = study.ask()
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    assert trial.suggest_int("batch", 16, 256, step=16) == batch
    trial.suggest_categorical("opt", ["adam", "sgd"])
    trial.set_user_attr("note", "user's own attr")
    study._storage.set_trial_system_attr(trial._trial_id, "constraints:memory", 3.5)
    end_trial_from_outside(
        study._storage,
        trial._trial_id,
        state,
        user_attrs={
            end: True,
            tags.KILL_REASON: "OOM prevention",
            tags.PEAK_RSS_GB: 7.9,
            tags.WORKER_ID: 1,
        },
    )
    return study._storage.get_trial(trial._trial_id)


def _retry_of(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, policy: RetryPolicy
) -> optuna.trial.FrozenTrial:
    number = enqueue_retry(study, trial, policy)
    assert number is not None
    return study.trials[number]


# -- policy tables -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_retries", "attrs", "attempt", "wants", "final"),
    [
        (2, {"emergency_killed": True}, 0, True, {}),
        (2, {"emergency_killed": True}, 1, True, {}),
        (2, {"emergency_killed": True}, 2, False, {"retries_exhausted": True}),
        (2, {"worker_crashed": True}, 0, True, {}),
        (2, {"preempted": True}, 1, True, {}),
        (2, {"diverged": True}, 0, False, {}),  # not in the default retry_on
        (2, {}, 0, False, {}),  # an ordinary failure or prune
        (2, {"emergency_killed": False}, 0, False, {}),
        (0, {"emergency_killed": True}, 0, False, {}),  # retries off: nothing is "exhausted"
        (1, {"preempted": True, "emergency_killed": True}, 1, False, {"retries_exhausted": True}),
    ],
)
def test_policy_table(
    max_retries: int, attrs: dict[str, Any], attempt: int, wants: bool, final: dict[str, Any]
) -> None:
    policy = RetryPolicy(max_retries=max_retries)
    assert policy.wants_retry(attrs, attempt) is wants
    assert policy.final_tags(attrs, attempt) == final


def test_retry_on_is_configurable() -> None:
    policy = RetryPolicy(max_retries=1, retry_on={"diverged"})
    assert policy.wants_retry({"diverged": True}, 0)
    assert not policy.wants_retry({"emergency_killed": True}, 0)
    assert RetryPolicy(max_retries=1, retry_on="preempted").retry_on == frozenset({"preempted"})


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": 1.5}, "max_retries"),
        ({"max_retries": True}, "max_retries"),
        ({"retry_on": {"oom"}}, "'oom'"),
        ({"shrink_on": {"killed"}}, "'killed'"),
        ({"shrink": 42}, "shrink"),
    ],
)
def test_policy_validation(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        RetryPolicy(**kwargs)


def test_attempt_counts_the_retry_history(study: optuna.Study) -> None:
    policy = RetryPolicy(max_retries=3)
    original = _killed_trial(study)
    assert policy.attempt(original) == 0
    number = enqueue_retry(study, original, policy)
    retry = study.trials[number]
    assert policy.attempt(retry) == 1


# -- shrink hooks ------------------------------------------------------------------------------


def test_load_shrink_hook_from_module_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "myhooks.py").write_text(
        "def halve(p):\n    return {**p, 'batch': p['batch'] // 2}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_shrink_hook("myhooks:halve")({"batch": 64}) == {"batch": 32}
    script = tmp_path / "shrink_file.py"
    script.write_text("def quarter(p):\n    return {'batch': p['batch'] // 4}\n")
    assert load_shrink_hook(f"{script}:quarter")({"batch": 64}) == {"batch": 16}
    sys.modules.pop("myhooks", None)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nocolon", "has no ':function' part"),  # the objective's loader and its messages
        (":f", "is incomplete"),
        ("mod:", "is incomplete"),
        ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
        ("os:no_such_function", "has no attribute 'no_such_function'"),
        ("/nonexistent/file.py:f", "does not exist"),
    ],
)
def test_bad_shrink_specs(spec: str, needle: str) -> None:
    with pytest.raises(ObjectiveSpecError, match=needle) as info:
        load_shrink_hook(spec)
    assert "\n" not in str(info.value)


def test_shrink_spec_string_in_policy(tmp_path: Path) -> None:
    script = tmp_path / "hooks.py"
    script.write_text("def halve(p):\n    return {'batch': p['batch'] // 2}\n")
    policy = RetryPolicy(max_retries=1, shrink=f"{script}:halve")
    assert callable(policy.shrink)


# -- enqueue_retry on a real storage -----------------------------------------------------------


def test_retry_is_a_waiting_copy_that_ask_pops_with_the_same_params(study: optuna.Study) -> None:
    original = _killed_trial(study, end=tags.WORKER_CRASHED, state=TrialState.FAIL)
    number = enqueue_retry(study, original, RetryPolicy(max_retries=2))
    assert number == 1
    retry = study.trials[1]
    assert retry.state == TrialState.WAITING
    assert retry.params == original.params
    # Optuna's own helpers read our chain.
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 0
    assert RetryHeartbeatStaleTrialCallback.retry_history(retry) == [0]
    # The user's attrs travel; our kill tags and the dead trial's constraint do not.
    assert retry.user_attrs == {"note": "user's own attr", tags.RETRY_OF: 0}
    assert "constraints:memory" not in retry.system_attrs
    assert tags.RETRY_SHRUNK not in retry.user_attrs  # no shrink hook: same params

    trial = study.ask()
    assert trial.number == 1  # the WAITING retry is popped first
    assert trial.suggest_float("lr", 1e-4, 1e-1, log=True) == original.params["lr"]
    assert trial.suggest_int("batch", 16, 256, step=16) == original.params["batch"]
    assert trial.suggest_categorical("opt", ["adam", "sgd"]) == original.params["opt"]
    study.tell(trial, 0.5)
    assert study.trials[1].state == TrialState.COMPLETE


def test_shrink_applies_only_to_shrink_on_ends(study: optuna.Study) -> None:
    policy = RetryPolicy(max_retries=2, shrink=halve_batch)
    killed = _killed_trial(study, end=tags.EMERGENCY_KILLED, batch=128)
    preempted = _killed_trial(study, end=tags.PREEMPTED, batch=128, state=TrialState.FAIL)
    shrunk = _retry_of(study, killed, policy)
    same = _retry_of(study, preempted, policy)
    assert shrunk.params["batch"] == 64
    assert shrunk.system_attrs["fixed_params"] == {
        "batch": 64
    }  # enqueue_trial's fixed params follow
    assert shrunk.user_attrs[tags.RETRY_SHRUNK] is True
    assert {k: v for k, v in shrunk.params.items() if k != "batch"} == {
        k: v for k, v in killed.params.items() if k != "batch"
    }
    assert same.params == preempted.params
    assert tags.RETRY_SHRUNK not in same.user_attrs

    trial = study.ask()
    assert trial.number == shrunk.number
    assert trial.suggest_int("batch", 16, 256, step=16) == 64


def test_shrunk_params_are_clipped_into_their_distribution(study: optuna.Study) -> None:
    killed = _killed_trial(study, batch=32)
    killed2 = _killed_trial(study, batch=64)
    retry = _retry_of(
        study, killed, RetryPolicy(max_retries=1, shrink=lambda p: {"batch": 3, "lr": 10.0})
    )
    assert retry.params["batch"] == 16  # below low=16 -> 16
    assert retry.params["lr"] == pytest.approx(1e-1)  # above high -> high
    retry2 = _retry_of(study, killed2, RetryPolicy(max_retries=1, shrink=lambda p: {"batch": 40}))
    assert retry2.params["batch"] == 32  # onto the step-16 grid, rounding down
    assert retry2.user_attrs[tags.RETRY_SHRUNK] is True


@pytest.mark.parametrize(
    ("hook", "needle"),
    [
        (lambda p: {"opt": "lion"}, "not one of its choices"),
        (lambda p: {"depth": 3}, "does not have"),
        (lambda p: {"batch": "big"}, "expected a finite number"),
        (lambda p: None, "must return a dict"),
    ],
)
def test_bad_shrink_results_are_config_errors(study: optuna.Study, hook: Any, needle: str) -> None:
    killed = _killed_trial(study)
    with pytest.raises(ConfigError, match=needle):
        enqueue_retry(study, killed, RetryPolicy(max_retries=1, shrink=hook))
    assert len(study.trials) == 1  # nothing was queued


def test_retry_chain_ends_after_max_retries(study: optuna.Study) -> None:
    policy = RetryPolicy(max_retries=2)
    first = _killed_trial(study)
    n1 = enqueue_retry(study, first, policy)
    t1 = study.ask()
    assert t1.number == n1
    end_trial_from_outside(
        study._storage, t1._trial_id, TrialState.PRUNED, user_attrs={tags.EMERGENCY_KILLED: True}
    )
    n2 = enqueue_retry(study, study.trials[n1], policy)
    second_retry = study.trials[n2]
    assert second_retry.system_attrs["failed_trial"] == 0  # the chain's original
    assert second_retry.system_attrs["retry_history"] == [0, n1]
    assert second_retry.user_attrs[tags.RETRY_OF] == n1
    t2 = study.ask()
    assert policy.final_tags({tags.EMERGENCY_KILLED: True}, policy.attempt(study.trials[n2])) == {
        tags.RETRIES_EXHAUSTED: True
    }
    end_trial_from_outside(
        study._storage,
        t2._trial_id,
        TrialState.PRUNED,
        user_attrs={tags.EMERGENCY_KILLED: True, tags.RETRIES_EXHAUSTED: True},
    )
    assert enqueue_retry(study, study.trials[n2], policy) is None
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 3


def test_no_retry_for_other_ends_and_no_duplicates(study: optuna.Study) -> None:
    policy = RetryPolicy(max_retries=3)
    plain = study.ask()
    plain.suggest_float("lr", 1e-4, 1e-1, log=True)
    study.tell(plain, state=TrialState.PRUNED)
    assert enqueue_retry(study, study.trials[0], policy) is None
    killed = _killed_trial(study)
    first = enqueue_retry(study, killed, policy)
    again = enqueue_retry(study, killed, policy)
    assert first == again
    assert sum(t.state == TrialState.WAITING for t in study.trials) == 1


def test_running_trial_cannot_be_retried(study: optuna.Study) -> None:
    trial = study.ask()
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    study._storage.set_trial_user_attr(trial._trial_id, tags.EMERGENCY_KILLED, True)
    with pytest.raises(ValueError, match="RUNNING"):
        enqueue_retry(study, study.trials[0], RetryPolicy(max_retries=1))


def test_end_reasons_and_original_number(study: optuna.Study) -> None:
    killed = _killed_trial(study)
    assert retries.end_reasons(killed.user_attrs) == {tags.EMERGENCY_KILLED}
    assert retries.original_trial_number(killed) == 0
    retry = _retry_of(study, killed, RetryPolicy(max_retries=1))
    assert retries.original_trial_number(retry) == 0
    assert retries.retry_history(retry) == [0]
