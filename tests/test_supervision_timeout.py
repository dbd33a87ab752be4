"""Issue 9, fault 6 (D12): hung workers. A SIGSTOPped worker under --trial-timeout is killed after
the grace period, its trial ends FAIL tagged timed_out and is retried, and the launch finishes
(was: shown "healthy" and waited for forever). A trial that overruns but can stop does so at its
next boundary."""

from __future__ import annotations

import os
import signal
import time

import pytest
from optuna.trial import TrialState
from supervision_helpers import launch_id_of, launcher, running_trials
from supervisor_helpers import assert_nothing_running, read_events, trials_of, wait_for

from optuna_guard import tags
from optuna_guard.supervisor import _hung


def test_sigstopped_worker_with_a_trial_timeout_lets_the_launch_finish(
    sqlite_url, tmp_path, unique_study_name
):
    log_dir = str(tmp_path / "logs")
    with launcher(
        "supervision_objs:slow",
        sqlite_url,
        unique_study_name,
        log_dir,
        "--workers",
        "1",
        "--n-trials",
        "2",
        "--trial-timeout",
        "4s",
        "--grace-period",
        "2",
        "--retry",
        "1",
        "--status-interval",
        "1",
        env={"SLOW_S": "1.5"},
    ) as proc:
        launch_id_of(log_dir)
        wait_for(
            lambda: len(running_trials(sqlite_url, unique_study_name)) == 1,
            90,
            what="a RUNNING trial",
        )
        [first] = running_trials(sqlite_url, unique_study_name)
        pid = first.user_attrs[tags.WORKER_PID]
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        _out, err = proc.communicate(timeout=120)
        finished_after = time.monotonic() - stopped_at
    assert proc.returncode == 0, err[-3000:]
    trials = trials_of(sqlite_url, unique_study_name)
    timed_out = trials[first.number]
    assert timed_out.state == TrialState.FAIL and timed_out.user_attrs[tags.TIMED_OUT] is True
    assert (
        "> --trial-timeout 4s (the worker is stopped, state T)"
        in timed_out.user_attrs[tags.KILL_REASON]
    )
    retry = [t for t in trials if t.user_attrs.get(tags.RETRY_OF) == first.number]
    assert [t.state for t in retry] == [TrialState.COMPLETE]
    assert_nothing_running(trials)
    status = [
        e for e in read_events(os.path.join(log_dir, "events.jsonl")) if e["event"] == "status"
    ]
    assert any(w["health"] == "stopped (state T)" for e in status for w in e["workers"]), status[
        -3:
    ]
    print(
        f"SIGSTOPped worker: launch finished {finished_after:.1f}s after the stop "
        "(timeout 4s + grace 2s)"
    )


def test_an_overrunning_trial_stops_at_its_boundary_tagged_timed_out(
    sqlite_url, tmp_path, unique_study_name
):
    log_dir = str(tmp_path / "logs")
    with launcher(
        "supervision_objs:slow",
        sqlite_url,
        unique_study_name,
        log_dir,
        "--workers",
        "1",
        "--n-trials",
        "1",
        "--trial-timeout",
        "2",
        "--grace-period",
        "30",
        env={"SLOW_S": "60"},
    ) as proc:
        started = time.monotonic()
        _out, err = proc.communicate(timeout=120)
        elapsed = time.monotonic() - started
    assert proc.returncode == 0, err[-3000:]
    [trial] = trials_of(sqlite_url, unique_study_name)
    assert trial.state == TrialState.FAIL and trial.user_attrs[tags.TIMED_OUT] is True
    assert trial.user_attrs.get(tags.PREEMPTED) is not True
    assert elapsed < 25  # stopped at a boundary, long before the 30 s grace kill


@pytest.mark.parametrize(
    ("state", "idle", "in_trial", "note"),
    [
        ("T", None, False, "stopped (state T)"),
        ("S", 75.0, True, "no progress (no CPU for 75s)"),
        ("S", 75.0, False, None),
        ("R", 1.0, True, None),
    ],
)
def test_health_notes(state, idle, in_trial, note):
    assert _hung.health_note(state, idle, in_trial) == note
