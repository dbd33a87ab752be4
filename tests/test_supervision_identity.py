"""Issue 9, fault 2: launch identity. Two launchers on one study and host; launcher B's worker
gets (forced through ``ns_last_pid``) the pid launcher A's first worker had. A's exit sweep must
not touch B's live trial, and neither launcher loses a result."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from optuna.trial import TrialState
from supervisor_helpers import (
    FAST,
    assert_nothing_running,
    objective_spec,
    read_events,
    trials_of,
    wait_for,
)

from optuna_guard import tags
from optuna_guard.supervisor import _spawner, launch

NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"


def _can_force_pids() -> bool:
    return os.geteuid() == 0 and os.access(NS_LAST_PID, os.W_OK)


@pytest.mark.skipif(
    not _can_force_pids(), reason="forcing a pid needs root (writes /proc/sys/kernel/ns_last_pid)"
)
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_pid_reuse_across_two_launchers_loses_no_result(
    backend, request, tmp_path, unique_study_name, monkeypatch, quiet_optuna
):
    url = request.getfixturevalue(f"{backend}_url")
    logs_a = tmp_path / "a"
    # Launcher A: two short trials, one worker per trial, so its first worker's pid is free again.
    proc_a = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "optuna_guard.cli",
            "run",
            objective_spec("supervision_objs", "slow"),
            "--study-name",
            unique_study_name,
            "--storage",
            url,
            "--workers",
            "1",
            "--n-trials",
            "2",
            "--max-trials-per-worker",
            "1",
            "--log-dir",
            str(logs_a),
            "--display",
            "off",
            "--min-available-gb",
            "0.25",
            "--warn-available-gb",
            "0.5",
            "--check-interval",
            "0.05",
            "--max-worker-age",
            "off",
        ],
        env=dict(os.environ, SLOW_S="3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def first_worker_gone() -> int | None:
            try:
                log = read_events(str(logs_a / "events.jsonl"))
            except OSError:
                return None
            starts = [e for e in log if e["event"] == "worker_started"]
            return (
                starts[0]["pid"] if len(starts) >= 2 else None
            )  # the second start replaces the first

        reused_pid = wait_for(
            first_worker_gone, 120, what="launcher A's first worker to be replaced"
        )
        wait_for(
            lambda: not os.path.exists(f"/proc/{reused_pid}"),
            30,
            what=f"pid {reused_pid} to be free",
        )

        spawn = _spawner.Spawner.spawn_process
        spawned: list[int] = []

        def spawn_with_reused_pid(self, env, log_path, child_fd, slot, spawn_index):
            with open(NS_LAST_PID, "w") as handle:
                handle.write(str(reused_pid - 1))
            proc = spawn(self, env, log_path, child_fd, slot, spawn_index)
            spawned.append(proc.pid)
            return proc

        monkeypatch.setattr(_spawner.Spawner, "spawn_process", spawn_with_reused_pid)
        monkeypatch.setenv("SLOW_S", "12")  # B's trial outlives launcher A
        summary_b = launch(
            objective_spec("supervision_objs", "slow"),
            study_name=unique_study_name,
            storage=url,
            workers=1,
            n_trials=1,
            log_dir=str(tmp_path / "b"),
            **FAST,
        )
        out_a, err_a = proc_a.communicate(timeout=120)
    finally:
        if proc_a.poll() is None:
            proc_a.kill()
            proc_a.communicate(timeout=30)
    if spawned[0] != reused_pid:
        pytest.skip(f"another process took pid {reused_pid} first; pid reuse could not be forced")
    assert proc_a.returncode == 0, err_a[-2000:]
    assert "2/2 trials finished (complete 2)" in out_a, (
        out_a
    )  # the D3 bug said "3/2" (it swept B's trial)
    assert summary_b.exit_code == 0 and summary_b.finished == 1
    trials = trials_of(url, unique_study_name)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3, [
        (t.number, t.state, t.user_attrs) for t in trials
    ]
    b_trial = [t for t in trials if t.user_attrs[tags.WORKER_PID] == reused_pid]
    assert len(b_trial) == 2  # A's first trial and B's trial ran under the same pid
    assert len({t.user_attrs[tags.LAUNCH_ID] for t in b_trial}) == 2
    assert_nothing_running(trials)
