"""Issue 9, faults 4 and 5 (D6/D11): one memory cgroup per worker. A daemonised grandchild over
the worker limit is counted and killed, nothing outlives the launch, and the kernel keeps the
worker at its hard limit however fast it allocates. Without writable cgroups the environment
marker still finds the daemon at the end of the launch."""

from __future__ import annotations

import glob
import logging
import os
import re
import subprocess
import sys

import pytest
from optuna.trial import TrialState
from supervision_helpers import launch_id_of, launch_pids
from supervisor_helpers import (
    FAST,
    assert_nothing_running,
    idle_worker_rss_gb,
    objective_spec,
    trials_of,
)

from optuna_guard import tags
from optuna_guard.memory._cgroup import own_memory_cgroup
from optuna_guard.supervisor import _cgroups, launch


def _cgroups_writable() -> bool:
    own = own_memory_cgroup()
    return own is not None and os.access(own[1], os.W_OK)


needs_cgroups = pytest.mark.skipif(
    not _cgroups_writable(), reason="needs a writable memory cgroup (root on v1)"
)


def _parent_dirs(launch_id: str) -> list[str]:
    return glob.glob(os.path.join(own_memory_cgroup()[1], f"optuna_guard_{launch_id[:12]}_*"))


@needs_cgroups
def test_daemonised_grandchild_over_the_worker_limit_is_killed_and_nothing_outlives_the_launch(
    sqlite_url, tmp_path, unique_study_name, monkeypatch, caplog, quiet_optuna
):
    limit_gb = round(idle_worker_rss_gb(str(tmp_path)) + 0.3, 2)
    monkeypatch.setenv("SUPERVISION_TMP", str(tmp_path))
    monkeypatch.setenv("GRAND_GB", "0.6")  # the helper alone is over the limit
    monkeypatch.setenv("SLOW_S", "60")
    log_dir = str(tmp_path / "logs")
    with caplog.at_level(logging.INFO, logger="optuna_guard"):
        summary = launch(
            objective_spec("supervision_objs", "grandchild_daemon"),
            study_name=unique_study_name,
            storage=sqlite_url,
            workers=1,
            n_trials=1,
            log_dir=log_dir,
            max_worker_rss_gb=limit_gb,
            recycle_worker_rss_gb=limit_gb,
            **FAST,
        )
    launch_id = launch_id_of(log_dir)
    assert launch_pids(launch_id) == []
    assert _parent_dirs(launch_id) == []
    assert any("one memory cgroup per worker (cgroup v" in m for m in caplog.messages)
    [trial] = trials_of(sqlite_url, unique_study_name)
    assert trial.state == TrialState.PRUNED and trial.user_attrs[tags.EMERGENCY_KILLED] is True, (
        trial.user_attrs
    )
    assert summary.duration_s < 50  # killed, not waited out (SLOW_S 60)
    assert not os.path.exists(tmp_path / "daemon-0.ready")  # the helper never got its 0.6 GB
    assert_nothing_running([trial])


@needs_cgroups
def test_fastest_allocation_stays_at_the_hard_limit(
    sqlite_url, tmp_path, unique_study_name, monkeypatch, caplog, quiet_optuna
):
    """One numpy call faulting in 2 GB as fast as it can under a limit of idle + 0.5 GB: the
    worker cgroup's peak is the limit (was: 1.57 GB for a 1 GB limit: SIGTERM, 1 s, SIGKILL)."""
    limit_gb = round(idle_worker_rss_gb(str(tmp_path)) + 0.5, 2)
    monkeypatch.setenv("ALLOC_GB", "2.0")
    with caplog.at_level(logging.INFO, logger="optuna_guard"):
        summary = launch(
            objective_spec("supervision_objs", "numpy_burst"),
            study_name=unique_study_name,
            storage=sqlite_url,
            workers=1,
            n_trials=1,
            log_dir=str(tmp_path / "logs"),
            max_worker_rss_gb=limit_gb,
            recycle_worker_rss_gb=limit_gb,
            **FAST,
        )
    peaks = [
        float(m)
        for line in caplog.messages
        for m in re.findall(r"removed: peak ([0-9.]+) GB", line)
    ]
    assert peaks, caplog.messages
    overshoot = max(peaks) - limit_gb
    print(
        f"fastest allocation: worker cgroup peak {max(peaks):.3f} GB for --max-worker-rss-gb "
        f"{limit_gb:.2f} "
        f"(overshoot {overshoot * 1024:.0f} MB)"
    )
    assert overshoot <= 0.01
    [trial] = trials_of(sqlite_url, unique_study_name)
    assert trial.state == TrialState.PRUNED and trial.user_attrs[tags.EMERGENCY_KILLED] is True
    assert summary.exit_code == 0


def test_without_cgroups_the_environment_marker_finds_the_daemon(
    sqlite_url, tmp_path, unique_study_name, monkeypatch, caplog, quiet_optuna
):
    monkeypatch.setenv(_cgroups.ENV_SWITCH, "0")
    monkeypatch.setenv("SUPERVISION_TMP", str(tmp_path))
    monkeypatch.setenv("GRAND_GB", "0.02")
    monkeypatch.setenv("SLOW_S", "1")
    log_dir = str(tmp_path / "logs")
    with caplog.at_level(logging.INFO, logger="optuna_guard"):
        summary = launch(
            objective_spec("supervision_objs", "grandchild_daemon"),
            study_name=unique_study_name,
            storage=sqlite_url,
            workers=1,
            n_trials=1,
            log_dir=log_dir,
            **FAST,
        )
    launch_id = launch_id_of(log_dir)
    assert any(
        "process-tree memory and a per-launch environment marker" in m for m in caplog.messages
    )
    # killed when its worker is reaped (worker marker) or, at the latest, at the launch's end
    assert any(
        "outlived its worker" in m or re.search(r"left \d+ process\(es\) behind; killed", m)
        for m in caplog.messages
    ), caplog.messages
    assert launch_pids(launch_id) == []
    assert summary.complete == 1


@needs_cgroups
def test_cgroups_left_by_a_sigkilled_launcher_are_removed_by_the_next_one(
    sqlite_url, tmp_path, unique_study_name, quiet_optuna
):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)  # gone now; any start time cannot match a live process
    stale = os.path.join(own_memory_cgroup()[1], f"optuna_guard_deadbeef0000_{dead_pid}_1")
    os.makedirs(os.path.join(stale, "w0"))
    try:
        launch(
            objective_spec("supervision_objs", "quick"),
            study_name=unique_study_name,
            storage=sqlite_url,
            workers=1,
            n_trials=1,
            log_dir=str(tmp_path / "logs"),
            **FAST,
        )
        assert not os.path.exists(stale)
    finally:
        for directory in (os.path.join(stale, "w0"), stale):
            if os.path.isdir(directory):
                os.rmdir(directory)
