"""`optuna-guard run` as a user runs it: exit codes, one-line errors, signals."""

from __future__ import annotations

import os
import signal
import time

import pytest
from optuna.trial import TrialState
from supervisor_helpers import (
    assert_nothing_running,
    cli,
    objective_spec,
    read_events,
    start_cli,
    trials_of,
    wait_for,
)

from optuna_guard import events, tags


def _run_args(study: str, url: str, logs: str, *extra: str) -> list[str]:
    return [
        "run",
        "--study-name",
        study,
        "--storage",
        url,
        "--log-dir",
        logs,
        "--check-interval",
        "0.05",
        "--display",
        "off",
        *extra,
    ]


@pytest.mark.parametrize(
    "objective,extra,expected",
    [
        # guarded (default): the in-trial guard stops the trial within moments of the SIGTERM
        ("launcher_slow.py:objective", [], "preempted: SIGTERM"),
        # unguarded native sleep: nothing stops it, so it is killed when the grace period ends
        ("launcher_slow.py:stubborn", ["--no-guard"], "worker killed after the 2s grace period"),
    ],
)
def test_sigterm_mid_trial_exits_99_within_grace_and_leaves_nothing_running(
    objective, extra, expected, tmp_path, unique_study_name
):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    logs = str(tmp_path / "logs")
    spec = os.path.join(os.path.dirname(__file__), "objectives", objective)
    env = dict(os.environ, LAUNCHER_TEST_TRIAL_S="60")
    proc = start_cli(
        *_run_args(
            unique_study_name,
            url,
            logs,
            spec,
            "--workers",
            "2",
            "--n-trials",
            "10",
            "--grace-period",
            "2",
            "--status-interval",
            "600",
            *extra,
        ),
        cwd=str(tmp_path),
        env=env,
    )
    try:
        events_path = os.path.join(logs, "events.jsonl")
        wait_for(
            lambda: (
                os.path.exists(events_path)
                and sum(e["event"] == events.TRIAL_STARTED for e in read_events(events_path)) == 2
            ),
            timeout=60,
            what="both workers running a trial",
        )
        proc.send_signal(signal.SIGUSR1)  # status snapshot now, the launch goes on
        wait_for(
            lambda: any(e["event"] == events.STATUS for e in read_events(events_path)),
            timeout=10,
            what="status",
        )
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 99, stderr
    assert elapsed < 2 + 4.0  # grace period plus kill and bookkeeping
    assert "PID" in stderr and "healthy (age:" in stderr  # the SIGUSR1 snapshot
    trials = trials_of(url, unique_study_name)
    assert_nothing_running(trials)
    assert len(trials) == 2
    for trial in trials:
        assert trial.state == TrialState.FAIL
        assert trial.user_attrs[tags.PREEMPTED] is True
        assert expected in trial.user_attrs[tags.KILL_REASON]
    assert "exit code 99" in stdout and "stopped: launcher received SIGTERM" in stdout
    log = read_events(events_path)
    assert any(e["event"] == events.SIGNAL and e["reason"] == "SIGTERM" for e in log)


def test_bad_inputs_exit_2_with_one_line(tmp_path, unique_study_name):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    logs = str(tmp_path / "logs")
    quick = objective_spec("launcher_quick")
    cases = {
        "no file": (
            _run_args(unique_study_name, url, logs, str(tmp_path / "missing.py:objective")),
            "does not exist",
        ),
        "no module": (
            _run_args(unique_study_name, url, logs, "no_such_package.objectives:objective"),
            "no_such_package",
        ),
        "no function": (
            _run_args(unique_study_name, url, logs, objective_spec("launcher_quick", "nope")),
            "has no attribute 'nope'",
        ),
        "not callable": (
            _run_args(
                unique_study_name, url, logs, objective_spec("launcher_quick", "NOT_CALLABLE")
            ),
            "not a function",
        ),
        "no colon": (
            _run_args(unique_study_name, url, logs, "launcher_quick"),
            "no ':function' part",
        ),
        "workers 0": (
            _run_args(unique_study_name, url, logs, quick, "--workers", "0"),
            "--workers",
        ),
        "negative rss": (
            _run_args(unique_study_name, url, logs, quick, "--max-worker-rss-gb", "-1"),
            "--max-worker-rss-gb",
        ),
        "negative available": (
            _run_args(unique_study_name, url, logs, quick, "--min-available-gb", "-2"),
            "--min-available-gb",
        ),
        "negative age": (
            _run_args(unique_study_name, url, logs, quick, "--max-worker-age", "-5"),
            "--max-worker-age",
        ),
        "recycle over kill": (
            _run_args(
                unique_study_name,
                url,
                logs,
                quick,
                "--max-worker-rss-gb",
                "2",
                "--recycle-worker-rss-gb",
                "3",
            ),
            "--recycle-worker-rss-gb",
        ),
        "not a url": (
            _run_args(unique_study_name, "study.db", logs, quick),
            "is not a database URL",
        ),
        "bad time budget": (
            _run_args(unique_study_name, url, logs, quick, "--time-budget", "soon"),
            "--time-budget",
        ),
        "bad retry-on": (
            _run_args(unique_study_name, url, logs, quick, "--retry", "1", "--retry-on", "bored"),
            "retry_on",
        ),
        "bad shrink hook": (
            _run_args(
                unique_study_name,
                url,
                logs,
                quick,
                "--retry",
                "1",
                "--retry-shrink",
                str(tmp_path / "nope.py:halve"),
            ),
            "does not exist",
        ),
    }
    procs = {
        name: (start_cli(*args, cwd=str(tmp_path)), needle)
        for name, (args, needle) in cases.items()
    }
    for name, (proc, needle) in procs.items():
        _stdout, stderr = proc.communicate(timeout=60)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, stderr)
        assert len(lines) == 1, (name, stderr)
        assert lines[0].startswith("optuna-guard run: error:") and needle in lines[0], (
            name,
            lines[0],
        )
    assert not os.path.exists(logs)  # no worker ever started


@pytest.mark.parametrize(
    "url",
    ["postgresql+psycopg://postgres@127.0.0.1:1/test", "mysql+pymysql://root@127.0.0.1:1/test"],
)
def test_unreachable_storage_is_a_one_line_error_within_10s(url, tmp_path, unique_study_name):
    # "connection refused" may be a restarting server: retried up to --storage-deadline, then
    # exit 1 (not 2: the input may be right); see tests/test_faults_storage.py (issue 10)
    started = time.monotonic()
    result = cli(
        *_run_args(
            unique_study_name,
            url,
            str(tmp_path / "logs"),
            objective_spec("launcher_quick"),
            "--storage-deadline",
            "2",
        ),
        cwd=str(tmp_path),
    )
    assert time.monotonic() - started < 10
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert lines[-1].startswith(f"optuna-guard run: error: cannot reach storage {url}:")


def test_unknown_direction_and_sampler_exit_2(tmp_path, unique_study_name):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    quick = objective_spec("launcher_quick")
    for extra, needle in (
        (["--direction", "sideways"], "--direction"),
        (["--sampler", "magic"], "--sampler"),
    ):
        result = cli(
            *_run_args(unique_study_name, url, str(tmp_path / "logs"), quick, *extra),
            cwd=str(tmp_path),
        )
        assert result.returncode == 2 and needle in result.stderr.strip().splitlines()[-1]


def test_run_completes_and_prints_summary(tmp_path, unique_study_name):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    result = cli(
        *_run_args(
            unique_study_name,
            url,
            str(tmp_path / "logs"),
            objective_spec("launcher_quick"),
            "--workers",
            "2",
            "--n-trials",
            "4",
            "--seed",
            "7",
            "--sampler",
            "random",
        ),
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert f"Study '{unique_study_name}': 4/4 trials finished (complete 4)" in result.stdout
    trials = trials_of(url, unique_study_name)
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.params["x"] for t in trials}) == 4  # workers got different seeds
    assert os.path.exists(tmp_path / "logs" / "worker_1.log") and os.path.exists(
        tmp_path / "logs" / "worker_2.log"
    )
