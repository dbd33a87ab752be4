"""`optuna-guard status`: trials by state, kills/crashes with reasons, running trials with worker."""

from __future__ import annotations

import json

import optuna
from optuna.trial import TrialState
from supervisor_helpers import cli

from optuna_guard import tags
from optuna_guard.storage import end_trial_from_outside


def _build_study(url: str, name: str) -> None:
    study = optuna.create_study(study_name=name, storage=url)
    for value in (3.0, 1.0, 2.0):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        study.tell(trial, value)
    storage = study._storage
    for number_reason in (
        "worker memory limit: worker 2 tree RSS 8.21 GB > 8.00 GB",
        "worker memory limit: worker 1 tree RSS 8.40 GB > 8.00 GB",
    ):
        trial = study.ask()
        end_trial_from_outside(
            storage,
            trial._trial_id,
            TrialState.PRUNED,
            {
                tags.EMERGENCY_KILLED: True,
                tags.KILL_REASON: number_reason,
                tags.KILL_LIMIT: "max_worker_rss_gb",
            },
        )
    trial = study.ask()
    end_trial_from_outside(
        storage,
        trial._trial_id,
        TrialState.FAIL,
        {
            tags.WORKER_CRASHED: True,
            tags.KILL_REASON: "worker exited with SIGKILL — perhaps the kernel OOM killer",
        },
    )
    trial = study.ask()
    end_trial_from_outside(
        storage,
        trial._trial_id,
        TrialState.FAIL,
        {tags.PREEMPTED: True, tags.KILL_REASON: "preempted: SIGTERM"},
    )
    running = study.ask()
    running.set_user_attr(tags.WORKER_ID, 2)
    running.set_user_attr(tags.WORKER_PID, 4711)
    running.set_user_attr(tags.HOSTNAME, "node-a")


def test_status_tables(postgres_url, unique_study_name):
    _build_study(postgres_url, unique_study_name)
    result = cli("status", "--study-name", unique_study_name, "--storage", postgres_url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "8 trials - COMPLETE 3, FAIL 2, PRUNED 2, RUNNING 1" in out
    assert "Best valid trial 1: value 1" in out
    assert "Emergency-killed: 2   Crashed: 1   Preempted: 1" in out
    assert "max_worker_rss_gb" in out and "perhaps the kernel OOM killer" in out
    assert "4711" in out and "node-a" in out


def test_status_json(sqlite_url, unique_study_name):
    _build_study(sqlite_url, unique_study_name)
    result = cli("status", "--study-name", unique_study_name, "--storage", sqlite_url, "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["states"] == {"COMPLETE": 3, "FAIL": 2, "PRUNED": 2, "RUNNING": 1}
    assert status["emergency_killed"] == 2 and status["crashed"] == 1 and status["preempted"] == 1
    assert (
        status["killed_by_limit"][0]["reason"] == "max_worker_rss_gb"
        and status["killed_by_limit"][0]["count"] == 2
    )
    assert status["killed_by_limit"][0]["trials"] == [3, 4]
    assert (
        status["crash_reasons"][0]["reason"]
        == "worker exited with SIGKILL — perhaps the kernel OOM killer"
    )
    assert [
        (r["number"], r["worker_id"], r["worker_pid"], r["hostname"]) for r in status["running"]
    ] == [(7, 2, 4711, "node-a")]
    assert status["best"]["number"] == 1 and status["best"]["value"] == 1.0


def test_status_errors_exit_2(sqlite_url, tmp_path, unique_study_name):
    optuna.create_study(study_name="present", storage=sqlite_url)
    unknown = cli("status", "--study-name", unique_study_name, "--storage", sqlite_url)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == [
        f"optuna-guard status: error: study {unique_study_name!r} not found in {sqlite_url}; studies there: present. "
        "Check --study-name and --storage."
    ]
    missing = cli("status", "--study-name", "x", cwd=str(tmp_path / ".."))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    down = cli(
        "status",
        "--study-name",
        "x",
        "--storage",
        "postgresql+psycopg://postgres@127.0.0.1:1/test",
    )
    assert (
        down.returncode == 2
        and "cannot reach storage" in down.stderr
        and len(down.stderr.strip().splitlines()) == 1
    )
