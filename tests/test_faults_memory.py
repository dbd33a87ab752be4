"""The memory policy under real pressure, in memory cgroups the tests create (issue 10, D7/D8):
memory held outside the study ends in exit 4 without a kill loop; 16 workers in a small cgroup
start paced, with no kernel OOM kill and no trial tagged emergency_killed."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from memcg import available, hold_memory, memory_cgroup
from optuna.trial import TrialState
from supervisor_helpers import objective_spec, read_events, trials_of

from optuna_guard import events, tags
from optuna_guard._units import GB

pytestmark = pytest.mark.skipif(
    not available(), reason="needs a writable cgroup v1 memory controller"
)


def _launch_argv(name: str, url: str, logs: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "optuna_guard.cli",
        "run",
        objective_spec("launcher_quick"),
        "--study-name",
        name,
        "--storage",
        url,
        "--log-dir",
        logs,
        "--display",
        "off",
        "--check-interval",
        "0.1",
        "--max-worker-age",
        "off",
        *extra,
    ]


def _finish(proc, timeout: float) -> tuple[int, str]:
    try:
        _out, err = proc.communicate(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, err


def test_memory_held_outside_the_study_exits_4_without_killing(tmp_path):
    """D7. Before: 13 kills of 0.07 GB workers in 46 s, 1/6 trials (PRUNED emergency_killed),
    only a signal ended it. After: no worker killed, exit 4 naming the holder."""
    url = f"sqlite:///{tmp_path / 'held.db'}"
    logs = tmp_path / "logs"
    with memory_cgroup(int(1.2 * GB)) as group:
        holder = hold_memory(group, int(0.8 * GB))  # leaves ~0.25 GB once the launcher is in
        started = time.monotonic()
        proc = group.popen(
            _launch_argv(
                "held",
                url,
                str(logs),
                "--workers",
                "2",
                "--n-trials",
                "6",
                "--min-available-gb",
                "0.25",
                "--warn-available-gb",
                "0.3",
                "--memory-stall-timeout",
                "5",
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "LAUNCHER_TEST_SLEEP": "0.2"},
        )
        code, err = _finish(proc, 120)
        took = time.monotonic() - started
        oom = group.oom_kills
    last = err.strip().splitlines()[-1]
    print(f"\nmemory held outside: exit {code} after {took:.1f}s; last line: {last[:200]}")
    assert code == 4, err[-2000:]
    assert last.startswith("optuna-guard run: error: memory held outside the study")
    assert f"pid {holder.pid}" in last  # names the process that holds the memory
    assert oom == 0
    log = read_events(str(logs / "events.jsonl"))
    assert not [e for e in log if e["event"] == events.WORKER_KILLED]
    for trial in trials_of(url, "held"):
        assert not trial.user_attrs.get(tags.EMERGENCY_KILLED)
        assert trial.state != TrialState.RUNNING


def test_sixteen_workers_in_a_small_cgroup_start_paced(tmp_path):
    """D8. Before: 2 kernel OOM kills, 5 launcher kills, 13/16 trials PRUNED emergency_killed,
    exit 0. After: 0 OOM kills, 0 kills, 16/16 COMPLETE."""
    url = f"sqlite:///{tmp_path / 'burst.db'}"
    logs = tmp_path / "logs"
    with memory_cgroup(1 * GB) as group:
        started = time.monotonic()
        proc = group.popen(
            _launch_argv(
                "burst",
                url,
                str(logs),
                "--workers",
                "16",
                "--n-trials",
                "16",
                "--min-available-gb",
                "0.2",
                "--warn-available-gb",
                "0.3",
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "LAUNCHER_TEST_SLEEP": "0.3"},
        )
        code, err = _finish(proc, 240)
        took = time.monotonic() - started
        oom, peak = group.oom_kills, group.peak_bytes
    trials = trials_of(url, "burst")
    log = read_events(str(logs / "events.jsonl"))
    starts = sum(e["event"] == events.WORKER_STARTED for e in log)
    kills = [e for e in log if e["event"] == events.WORKER_KILLED]
    print(
        f"\n16 workers in 1 GB: exit {code} in {took:.1f}s, {starts} worker starts, {len(kills)} kills, "
        f"{oom} OOM kills, cgroup peak {peak / GB:.2f} GB, "
        f"{sum(t.state == TrialState.COMPLETE for t in trials)}/16 COMPLETE"
    )
    assert code == 0, err[-2000:]
    assert oom == 0
    assert kills == []
    assert len(trials) == 16 and all(t.state == TrialState.COMPLETE for t in trials)
    assert not any(t.user_attrs.get(tags.EMERGENCY_KILLED) for t in trials)


def test_the_guard_stops_hogs_before_the_supervisor_needs_to(tmp_path, monkeypatch, quiet_optuna):
    """Issue 16 item 2. Before: guard and supervisor shared one limit, 7 of 8 hog trials were
    hard-killed with two different kill records. After: the guard's limit is 90 % of
    --max-worker-rss-gb and the supervisor waits for its chance: soft stops, one record each."""
    from supervisor_helpers import FAST, idle_worker_rss_gb

    from optuna_guard.supervisor import launch

    idle = idle_worker_rss_gb(str(tmp_path))
    limit = round(idle + 0.4, 2)
    monkeypatch.setenv("LAUNCHER_TEST_ALLOC_TRIALS", "0,1,2,3")
    monkeypatch.setenv(
        "LAUNCHER_TEST_ALLOC_MAX_MB", str(int((limit + 0.5) * 1024))
    )  # bounded past the limit
    url = f"sqlite:///{tmp_path / 'hog.db'}"
    logs = tmp_path / "logs"
    summary = launch(
        objective_spec("launcher_alloc"),
        study_name="hog",
        storage=url,
        workers=2,
        n_trials=4,
        log_dir=str(logs),
        **dict(FAST, max_worker_rss_gb=limit, recycle_worker_rss_gb=None, kill_wait=0.0),
    )
    trials = trials_of(url, "hog")
    log = read_events(str(logs / "events.jsonl"))
    hard = [e for e in log if e["event"] == events.WORKER_KILLED]
    soft = [t for t in trials if t.user_attrs.get(tags.KILL_LIMIT) == "max_trial_rss_gb"]
    print(
        f"\nhog trials: {len(soft)} soft stops by the guard, {len(hard)} hard kills (limit {limit} GB)"
    )
    assert summary.exit_code == 0
    assert all(
        t.state == TrialState.PRUNED and t.user_attrs.get(tags.EMERGENCY_KILLED) for t in trials
    )
    assert len(soft) >= 3 and len(hard) <= 1
    for (
        trial
    ) in trials:  # one kill record per trial: the limit named in storage matches the event log
        killed = [e for e in hard if e.get("trial_number") == trial.number]
        if killed:
            assert trial.user_attrs[tags.KILL_LIMIT] == killed[0]["limit"]
