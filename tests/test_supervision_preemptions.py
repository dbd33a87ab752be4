"""Issue 9: preemptions are not failures. A chain preempted 5 times, each time after saving a
newer checkpoint, completes with --retry 1 (was: FAIL retries_exhausted at the second
preemption); --max-preemptions bounds the free retries."""

from __future__ import annotations

import pytest
from optuna.trial import TrialState
from supervisor_helpers import FAST, assert_nothing_running, objective_spec, trials_of

from optuna_guard import tags
from optuna_guard.retries import FREE_RETRIES, RetryPolicy
from optuna_guard.supervisor import launch


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_trial_preempted_five_times_with_progress_completes_with_retry_1(
    backend, request, tmp_path, unique_study_name, monkeypatch, quiet_optuna
):
    url = request.getfixturevalue(f"{backend}_url")
    monkeypatch.setenv("SUPERVISION_CKPT_DIR", str(tmp_path / "ckpt"))
    summary = launch(
        objective_spec("supervision_objs", "preempted_five_times"),
        study_name=unique_study_name,
        storage=url,
        workers=1,
        n_trials=6,
        retry=1,
        log_dir=str(tmp_path / "logs"),
        **FAST,
    )
    trials = trials_of(url, unique_study_name)
    assert [t.state for t in trials] == [TrialState.FAIL] * 5 + [TrialState.COMPLETE], [
        (t.number, t.state, t.user_attrs) for t in trials
    ]
    assert all(t.user_attrs[tags.PREEMPTED] is True for t in trials[:5])
    assert not any(t.user_attrs.get(tags.RETRIES_EXHAUSTED) for t in trials)
    assert trials[-1].user_attrs[tags.RESUMED_FROM_STEP] == 5
    assert trials[-1].system_attrs[FREE_RETRIES] == 5
    assert abs(trials[-1].value - 8 * trials[0].params["x"] ** 2) < 1e-9  # as if never interrupted
    assert summary.exit_code == 0
    assert_nothing_running(trials)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_max_preemptions_bounds_the_free_retries(
    sqlite_url, tmp_path, unique_study_name, monkeypatch, quiet_optuna
):
    monkeypatch.setenv("SUPERVISION_CKPT_DIR", str(tmp_path / "ckpt"))
    launch(
        objective_spec("supervision_objs", "preempted_five_times"),
        study_name=unique_study_name,
        storage=sqlite_url,
        workers=1,
        n_trials=4,
        retry=1,
        max_preemptions=2,
        log_dir=str(tmp_path / "logs"),
        **FAST,
    )
    trials = trials_of(sqlite_url, unique_study_name)
    # 2 free retries, then the one --retry, then the chain is over
    assert [t.state for t in trials] == [TrialState.FAIL] * 4
    assert trials[-1].user_attrs[tags.RETRIES_EXHAUSTED] is True


@pytest.mark.parametrize(
    ("user_attrs", "system_attrs", "free"),
    [
        (
            {tags.PREEMPTED: True},
            {"optuna_guard:checkpoint_step": 3},
            True,
        ),  # first attempt saved step 3
        (
            {tags.PREEMPTED: True, tags.RESUMED_FROM_STEP: 3},
            {"optuna_guard:checkpoint_step": 4},
            True,
        ),
        (
            {tags.PREEMPTED: True, tags.RESUMED_FROM_STEP: 3},
            {"optuna_guard:checkpoint_step": 3},
            False,
        ),  # no progress
        ({tags.PREEMPTED: True}, {}, False),  # no checkpoints at all
        (
            {tags.WORKER_CRASHED: True},
            {"optuna_guard:checkpoint_step": 9},
            False,
        ),  # a crash is not a preemption
        (
            {tags.PREEMPTED: True},
            {"optuna_guard:checkpoint_step": 3, FREE_RETRIES: 20},
            False,
        ),  # bound reached
    ],
)
def test_free_preemption_rule(user_attrs, system_attrs, free):
    assert RetryPolicy(max_retries=1).is_free_preemption(user_attrs, system_attrs) is free
