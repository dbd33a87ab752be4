"""The guard inside a worker's own memory cgroup: its probe skips that cgroup (the per-worker
limit is the supervisor's, the kernel's and max_trial_rss's job) and keeps the ancestors and the
host, so the in-trial min-available check sees real system memory (issue 10 chaos finding)."""

from __future__ import annotations

import os

import pytest
from optuna.trial import TrialState
from supervisor_helpers import FAST, idle_worker_rss_gb, objective_spec, trials_of
from test_memory_probes import GB, MB, make_proc, make_v2_root, v1_level, v2_level

from optuna_guard import tags
from optuna_guard.memory import SystemProbe
from optuna_guard.memory._cgroup import ENV_SKIP_CGROUP
from optuna_guard.supervisor import launch

WORKER_V1 = "4:memory:/job_9/optuna_guard_x/w3\n"


def _v1_worker_tree(tmp_path):
    root = tmp_path / "cgroup"
    v1_level(root, "")
    v1_level(root, "job_9", limit=6 * GB, usage=2 * GB)
    v1_level(root, "job_9/optuna_guard_x", usage=GB)  # the launcher's parent cgroup: no limit
    leaf = v1_level(root, "job_9/optuna_guard_x/w3", limit=GB, usage=900 * MB)
    return root, leaf


def test_v1_without_the_skip_the_worker_cgroup_headroom_is_what_the_guard_sees(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.delenv(ENV_SKIP_CGROUP, raising=False)
    root, _leaf = _v1_worker_tree(tmp_path)
    reading = SystemProbe(
        proc_root=make_proc(tmp_path, cgroup=WORKER_V1), cgroup_root=str(root)
    ).system()
    assert (reading.total_bytes, reading.available_bytes) == (GB, GB - 900 * MB)


def test_v1_skipping_the_worker_cgroup_keeps_the_job_limit(tmp_path, monkeypatch) -> None:
    root, leaf = _v1_worker_tree(tmp_path)
    monkeypatch.setenv(ENV_SKIP_CGROUP, str(leaf))
    reading = SystemProbe(
        proc_root=make_proc(tmp_path, cgroup=WORKER_V1), cgroup_root=str(root)
    ).system()
    assert reading.source == "cgroup v1"
    assert (reading.total_bytes, reading.available_bytes) == (6 * GB, 4 * GB)


def test_v2_skipping_the_worker_cgroup_falls_back_to_the_host(tmp_path, monkeypatch) -> None:
    root = make_v2_root(tmp_path)
    v2_level(root, "launcher")
    leaf = v2_level(root, "launcher/w1", limit=GB, current=GB - 50 * MB)
    monkeypatch.setenv(ENV_SKIP_CGROUP, str(leaf) + "/")  # normalised
    reading = SystemProbe(
        proc_root=make_proc(tmp_path, cgroup="0::/launcher/w1\n"), cgroup_root=str(root)
    ).system()
    assert reading.source == "host"
    assert reading.available_bytes == 60 * GB


def test_a_worker_left_in_the_launcher_cgroup_skips_nothing(tmp_path, monkeypatch) -> None:
    """attach() failed: the worker sits in the launcher's cgroup, whose limit still applies."""
    root = make_v2_root(tmp_path)
    v2_level(root, "launcher", limit=2 * GB, current=GB)
    monkeypatch.setenv(ENV_SKIP_CGROUP, str(root / "launcher" / "w1"))
    reading = SystemProbe(
        proc_root=make_proc(tmp_path, cgroup="0::/launcher\n"), cgroup_root=str(root)
    ).system()
    assert (reading.source, reading.available_bytes) == ("cgroup v2", GB)


def test_guard_in_a_real_worker_cgroup_reads_system_memory(
    sqlite_url, tmp_path, unique_study_name, quiet_optuna, monkeypatch
) -> None:
    """Per-worker cgroups with a tight limit (idle worker + 0.35 GB) and --min-available-gb 0.5:
    the cgroup's headroom is below 0.5 GB, the machine's is not, so no trial is pruned for low
    memory and the trials' lowest available memory is the system's."""
    if not os.access("/sys/fs/cgroup/memory", os.W_OK):
        pytest.skip("needs a writable cgroup v1 memory controller (root)")
    probe_available = SystemProbe().system().available_bytes / GB
    if probe_available < 3.0:
        pytest.skip(f"only {probe_available:.1f} GB available here")
    monkeypatch.setenv("OPTUNA_GUARD_WORKER_CGROUPS", "1")
    limit_gb = idle_worker_rss_gb(str(tmp_path)) + 0.35
    settings = {**FAST, "min_available_gb": 0.5, "warn_available_gb": 0.6}
    summary = launch(
        objective_spec("launcher_quick"),
        study_name=unique_study_name,
        storage=sqlite_url,
        workers=2,
        n_trials=6,
        max_worker_rss_gb=limit_gb,
        log_dir=str(tmp_path / "logs"),
        **settings,
    )
    trials = trials_of(sqlite_url, unique_study_name)
    assert summary.exit_code == 0
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6, [
        t.user_attrs.get(tags.KILL_REASON) for t in trials
    ]
    lowest = [t.user_attrs[tags.LOWEST_AVAILABLE_GB] for t in trials]
    assert min(lowest) > limit_gb, f"the guard read the worker cgroup's headroom: {lowest}"
