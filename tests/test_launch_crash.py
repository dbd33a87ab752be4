"""Real launches where workers die by themselves: a SIGKILL under a trial (what the kernel OOM
killer does) and workers that cannot even start (crash loop -> exit 3 quoting the log)."""

from __future__ import annotations

import time

import pytest
from optuna.trial import TrialState
from supervisor_helpers import (
    FAST,
    assert_nothing_running,
    cli,
    objective_spec,
    read_events,
    trials_of,
)

from optuna_guard import events, tags
from optuna_guard.exceptions import CrashLoopError
from optuna_guard.supervisor import launch


def test_self_sigkilled_trials_fail_tagged_worker_crashed(
    postgres_url, tmp_path, unique_study_name, monkeypatch, quiet_optuna
):
    monkeypatch.setenv("LAUNCHER_TEST_KILL_TRIALS", "1,3")
    summary = launch(
        objective_spec("launcher_selfkill"),
        study_name=unique_study_name,
        storage=postgres_url,
        workers=2,
        n_trials=6,
        log_dir=str(tmp_path / "logs"),
        **FAST,
    )
    trials = trials_of(postgres_url, unique_study_name)
    assert len(trials) == 6 and summary.finished == 6
    for trial in trials:
        if trial.number in (1, 3):
            assert trial.state == TrialState.FAIL
            assert trial.user_attrs[tags.WORKER_CRASHED] is True
            # with a memory cgroup of its own the launcher knows it was no OOM kill; without, it may be
            assert trial.user_attrs[tags.KILL_REASON] in (
                "worker exited with SIGKILL — perhaps the kernel OOM killer",
                "worker exited with SIGKILL — not the kernel OOM killer "
                "(its memory cgroup recorded no OOM kill)",
            )
            assert isinstance(trial.user_attrs[tags.WORKER_PID], int)
        else:
            assert trial.state == TrialState.COMPLETE, trial.number
            assert tags.WORKER_CRASHED not in trial.user_attrs
    assert summary.crashes == 2 and summary.kills == 0
    crashed = [
        e
        for e in read_events(str(tmp_path / "logs" / "events.jsonl"))
        if e["event"] == events.WORKER_CRASHED
    ]
    assert sorted(e["trial_number"] for e in crashed) == [1, 3]
    assert all(e["exit_code"] == -9 for e in crashed)
    assert_nothing_running(trials)


def test_workers_dying_at_boot_stop_the_launch_with_exit_3(tmp_path, unique_study_name):
    started = time.monotonic()
    result = cli(
        "run",
        objective_spec("launcher_bootcrash"),
        "--study-name",
        unique_study_name,
        "--storage",
        f"sqlite:///{tmp_path / 'study.db'}",
        "--workers",
        "1",
        "--n-trials",
        "5",
        "--log-dir",
        str(tmp_path / "logs"),
        "--check-interval",
        "0.05",
        "--display",
        "off",
        cwd=str(tmp_path),
    )
    assert result.returncode == 3, result.stderr
    error_lines = [
        line for line in result.stderr.splitlines() if line.startswith("optuna-guard run: error:")
    ]
    assert len(error_lines) == 1
    assert "died before their first trial 3 times in a row" in error_lines[0]
    assert "worker exited with code 17" in error_lines[0]
    assert "cannot initialise the fake accelerator" in error_lines[0]  # quoted from the worker log
    assert time.monotonic() - started < 60
    assert trials_of(f"sqlite:///{tmp_path / 'study.db'}", unique_study_name) == []


def test_crash_loop_error_from_the_python_api(sqlite_url, tmp_path, unique_study_name):
    with pytest.raises(CrashLoopError, match="fake accelerator"):
        launch(
            objective_spec("launcher_bootcrash"),
            study_name=unique_study_name,
            storage=sqlite_url,
            workers=1,
            n_trials=2,
            log_dir=str(tmp_path / "logs"),
            **FAST,
        )
