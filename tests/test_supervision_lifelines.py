"""Issue 9, fault 1: when the launcher dies (SIGKILL, OOM) or its terminal hangs up (SIGHUP),
no process of its launch outlives it for long and no trial stays RUNNING."""

from __future__ import annotations

import signal

import pytest
from supervision_helpers import (
    launch_id_of,
    launch_pids,
    launcher,
    running_trials,
    wait_until_gone,
)
from supervisor_helpers import trials_of, wait_for

from optuna_guard import tags

GRACE_S = 3.0
POLL_SLACK_S = 0.5  # the test's own polling and a loaded machine's scheduling


def _start_two_slow_trials(url, name, log_dir, *extra):
    return launcher(
        "supervision_objs:slow",
        url,
        name,
        log_dir,
        "--workers",
        "2",
        "--n-trials",
        "4",
        "--grace-period",
        str(GRACE_S),
        *extra,
        env={"SLOW_S": "60"},
    )


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_launcher_sigkill_leaves_no_worker_and_no_running_trial(
    backend, request, tmp_path, unique_study_name
):
    url = request.getfixturevalue(f"{backend}_url")
    log_dir = str(tmp_path / "logs")
    with _start_two_slow_trials(url, unique_study_name, log_dir) as proc:
        launch_id = launch_id_of(log_dir)
        wait_for(
            lambda: len(running_trials(url, unique_study_name)) == 2, 90, what="two RUNNING trials"
        )
        pids = launch_pids(launch_id)
        assert len(pids) >= 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        gone_after = wait_until_gone(pids, GRACE_S + 2.0 + POLL_SLACK_S)
        assert launch_pids(launch_id) == []
    trials = trials_of(url, unique_study_name)
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    for trial in trials:
        assert trial.user_attrs[tags.PREEMPTED] is True
        assert "supervisor lost" in trial.user_attrs[tags.KILL_REASON]
        assert trial.user_attrs[tags.LAUNCH_ID] == launch_id
    print(f"launcher SIGKILL: every worker gone {gone_after:.2f}s after the kill")


def test_launcher_sighup_stops_like_sigterm_with_exit_99(sqlite_url, tmp_path, unique_study_name):
    log_dir = str(tmp_path / "logs")
    with _start_two_slow_trials(sqlite_url, unique_study_name, log_dir) as proc:
        launch_id = launch_id_of(log_dir)
        wait_for(
            lambda: len(running_trials(sqlite_url, unique_study_name)) == 2,
            90,
            what="two RUNNING trials",
        )
        pids = launch_pids(launch_id)
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=GRACE_S + 30) == 99
        assert "launcher received SIGHUP" in proc.stderr.read()
        wait_until_gone(pids, 2.0)
        assert launch_pids(launch_id) == []
    trials = trials_of(sqlite_url, unique_study_name)
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    assert all(t.user_attrs[tags.PREEMPTED] is True for t in trials), [
        t.user_attrs for t in trials
    ]


def test_worker_whose_trial_ignores_the_stop_is_ended_and_killed_after_the_grace_period(
    sqlite_url, tmp_path, unique_study_name
):
    """A trial with no boundary at all (unguarded, never checks for a stop): the lifeline ends
    the trial itself, kills the worker's tree and exits once the grace period is over."""
    log_dir = str(tmp_path / "logs")
    with launcher(
        "supervision_objs:ignore_stop",
        sqlite_url,
        unique_study_name,
        log_dir,
        "--workers",
        "1",
        "--n-trials",
        "1",
        "--grace-period",
        str(GRACE_S),
        "--no-guard",
        env={"SLOW_S": "120"},
    ) as proc:
        launch_id = launch_id_of(log_dir)
        wait_for(
            lambda: len(running_trials(sqlite_url, unique_study_name)) == 1,
            90,
            what="a RUNNING trial",
        )
        pids = launch_pids(launch_id)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        wait_until_gone(pids, GRACE_S + 2.0 + POLL_SLACK_S)
    [trial] = trials_of(sqlite_url, unique_study_name)
    assert trial.state.name == "FAIL" and trial.user_attrs[tags.PREEMPTED] is True
    assert "did not stop within the 3s grace period" in trial.user_attrs[tags.KILL_REASON]
