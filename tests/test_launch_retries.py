"""Crash-safe trials through the launcher (issue 4): retries with the retry chain in the
storage, checkpoint resume after a SIGKILL and after a SIGTERM to the launcher, shrink hooks,
exhausted retries."""

from __future__ import annotations

import os
import signal
import time

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from supervisor_helpers import (
    FAST,
    assert_nothing_running,
    idle_worker_rss_gb,
    objective_spec,
    read_events,
    start_cli,
    trials_of,
    wait_for,
)

from optuna_guard import events, tags
from optuna_guard.supervisor import launch


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_worker_sigkilled_at_step_5_is_retried_and_resumes_from_the_step_5_checkpoint(
    sqlite_url, tmp_path, unique_study_name, monkeypatch, quiet_optuna
):
    monkeypatch.setenv("LAUNCHER_TEST_CKPT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("LAUNCHER_TEST_DIE_AT_STEP", "5")
    summary = launch(
        objective_spec("launcher_resume"),
        study_name=unique_study_name,
        storage=sqlite_url,
        workers=1,
        n_trials=2,
        retry=1,
        log_dir=str(tmp_path / "logs"),
        **FAST,
    )
    original, retry = trials_of(sqlite_url, unique_study_name)
    assert original.state == TrialState.FAIL and original.user_attrs[tags.WORKER_CRASHED] is True
    assert "SIGKILL" in original.user_attrs[tags.KILL_REASON]
    assert tags.RETRIES_EXHAUSTED not in original.user_attrs  # one retry was left
    assert retry.state == TrialState.COMPLETE
    assert retry.params == original.params
    assert retry.user_attrs[tags.RETRY_OF] == original.number
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == original.number
    assert RetryHeartbeatStaleTrialCallback.retry_history(retry) == [original.number]
    assert retry.user_attrs[tags.RESUMED_FROM_STEP] == 5
    assert retry.user_attrs["steps_run_here"] == [6, 7, 8, 9, 10]
    assert (
        abs(retry.value - 10 * original.params["x"] ** 2) < 1e-9
    )  # same result as an unbroken run
    assert summary.finished == 2 and summary.retries == 1 and summary.crashes == 1
    retried = [
        e
        for e in read_events(str(tmp_path / "logs" / "events.jsonl"))
        if e["event"] == events.TRIAL_RETRIED
    ]
    assert [(e["trial_number"], e["retry_number"]) for e in retried] == [(0, 1)]
    assert_nothing_running([original, retry])


def test_sigterm_preempts_then_the_same_command_resumes_from_checkpoints(
    tmp_path, unique_study_name
):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    # first attempts take 5 s, so both are still running when SIGTERM comes even if one worker
    # starts late; the retries run fast
    env = dict(
        os.environ, LAUNCHER_TEST_CKPT_DIR=str(tmp_path / "ckpt"), LAUNCHER_TEST_STEP_S="0.5"
    )
    command = [
        "run",
        objective_spec("launcher_resume"),
        "--study-name",
        unique_study_name,
        "--storage",
        url,
        "--workers",
        "2",
        "--n-trials",
        "2",
        "--retry",
        "1",
        "--grace-period",
        "10",
        "--check-interval",
        "0.05",
        "--log-dir",
        str(tmp_path / "logs"),
        "--display",
        "off",
    ]
    first = start_cli(*command, cwd=str(tmp_path), env=env)
    try:

        def both_checkpointed() -> bool:
            # keep_last=2 prunes old steps, so "past step 2" is any step >= 2 in each chain
            root = tmp_path / "ckpt"
            chains = (
                {p.parent for p in root.rglob("step-*") if int(p.name.split("-")[1]) >= 2}
                if root.exists()
                else set()
            )
            return len(chains) >= 2

        wait_for(both_checkpointed, timeout=60, what="both trials past step 2")
        first.send_signal(signal.SIGTERM)
        _out, err = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 99, err
    trials = trials_of(url, unique_study_name)
    preempted = [t for t in trials if t.state == TrialState.FAIL]
    assert len(preempted) == 2 and all(t.user_attrs[tags.PREEMPTED] is True for t in preempted)
    assert [t.state for t in trials if t.number >= 2] == [
        TrialState.WAITING,
        TrialState.WAITING,
    ]  # queued retries
    assert_nothing_running(trials)

    second = start_cli(*command, cwd=str(tmp_path), env=dict(env, LAUNCHER_TEST_STEP_S="0.1"))
    _out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    trials = trials_of(url, unique_study_name)
    assert len(trials) == 4
    retries = [t for t in trials if t.number >= 2]
    assert [t.state for t in retries] == [TrialState.COMPLETE] * 2, (
        [(t.number, t.state, t.user_attrs) for t in retries],
        err,
    )
    assert sorted(t.user_attrs[tags.RETRY_OF] for t in retries) == [0, 1]
    for retry in retries:
        assert retry.user_attrs[tags.RESUMED_FROM_STEP] >= 2
        assert retry.user_attrs["started_at_step"] == retry.user_attrs[tags.RESUMED_FROM_STEP]
    assert_nothing_running(trials)


def test_shrink_hook_changes_the_params_of_a_memory_killed_trials_retry(
    sqlite_url, tmp_path, unique_study_name, monkeypatch, quiet_optuna
):
    idle = idle_worker_rss_gb(str(tmp_path))
    study = optuna.create_study(study_name=unique_study_name, storage=sqlite_url)
    study.enqueue_trial({"batch": 128, "lr": 0.01})
    summary = launch(
        objective_spec("launcher_shrink"),
        study_name=unique_study_name,
        storage=sqlite_url,
        workers=1,
        n_trials=2,
        retry=2,
        retry_shrink=objective_spec("launcher_shrink", "halve_batch"),
        log_dir=str(tmp_path / "logs"),
        **dict(
            FAST, guard=False, max_worker_rss_gb=idle + 0.25, recycle_worker_rss_gb=idle + 0.25
        ),
    )
    original, retry = trials_of(sqlite_url, unique_study_name)
    assert (
        original.state == TrialState.PRUNED and original.user_attrs[tags.EMERGENCY_KILLED] is True
    )
    assert retry.state == TrialState.COMPLETE
    assert retry.params == {"batch": 64, "lr": 0.01}
    assert retry.user_attrs[tags.RETRY_SHRUNK] is True and retry.user_attrs[tags.RETRY_OF] == 0
    assert summary.kills == 1 and summary.retries == 1


def test_last_failing_retry_is_tagged_retries_exhausted_and_not_retried_again(
    postgres_url, tmp_path, unique_study_name, quiet_optuna
):
    summary = launch(
        objective_spec("launcher_shrink", "always_crash"),
        study_name=unique_study_name,
        storage=postgres_url,
        workers=1,
        n_trials=3,
        retry=1,
        log_dir=str(tmp_path / "logs"),
        **FAST,
    )
    trials = trials_of(postgres_url, unique_study_name)
    assert [t.state for t in trials] == [TrialState.FAIL] * 3 + [TrialState.WAITING]
    first, its_retry, fresh, waiting = trials
    assert its_retry.user_attrs[tags.RETRY_OF] == first.number
    assert tags.RETRIES_EXHAUSTED not in first.user_attrs
    assert its_retry.user_attrs[tags.RETRIES_EXHAUSTED] is True
    # trial 2 is a new trial (the exhausted chain was not retried again); its own retry waits
    assert tags.RETRY_OF not in fresh.user_attrs
    assert waiting.user_attrs[tags.RETRY_OF] == fresh.number
    assert summary.finished == 3 and summary.retries == 2


def test_time_budget_stops_starting_trials_and_exits_99(
    sqlite_url, tmp_path, unique_study_name, monkeypatch, quiet_optuna
):
    monkeypatch.setenv("LAUNCHER_TEST_SLEEP", "1.0")
    started = time.monotonic()
    summary = launch(
        objective_spec("launcher_quick"),
        study_name=unique_study_name,
        storage=sqlite_url,
        workers=1,
        n_trials=50,
        time_budget="8s",
        log_dir=str(tmp_path / "logs"),
        **dict(FAST, grace_period=1.0),
    )
    elapsed = time.monotonic() - started
    trials = trials_of(sqlite_url, unique_study_name)
    assert summary.exit_code == 99
    assert 1 <= len(trials) < 8
    assert summary.skipped_for_time == 50 - len(trials)
    assert_nothing_running(trials)
    if summary.stop_reason.startswith(
        "time budget:"
    ):  # the normal case: it stopped granting in time
        assert all(t.state == TrialState.COMPLETE for t in trials)
    else:  # a very slow machine: the first trial only started near the end and was preempted
        assert (
            summary.stop_reason == "time budget expired"
            and trials[-1].user_attrs[tags.PREEMPTED] is True
        )
    assert elapsed < 8 + 1 + 3


def test_time_budget_expiry_preempts_the_running_trial(
    sqlite_url, tmp_path, unique_study_name, monkeypatch, quiet_optuna
):
    monkeypatch.setenv("LAUNCHER_TEST_TRIAL_S", "60")
    summary = launch(
        objective_spec("launcher_slow"),
        study_name=unique_study_name,
        storage=sqlite_url,
        workers=1,
        n_trials=5,
        time_budget=7.0,
        log_dir=str(tmp_path / "logs"),
        **dict(FAST, grace_period=0.5),
    )
    trials = trials_of(sqlite_url, unique_study_name)
    assert summary.exit_code == 99 and summary.stop_reason == "time budget expired"
    assert (
        len(trials) == 1
        and trials[0].state == TrialState.FAIL
        and trials[0].user_attrs[tags.PREEMPTED] is True
    )
    assert summary.skipped_for_time == 4
    assert_nothing_running(trials)
