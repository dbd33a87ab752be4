"""Submit, watch and cancel SLURM jobs from tests; read the study a job worked on."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import optuna

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(REPO, "scripts", "slurm")
OBJECTIVE = (
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "steps_objective.py") + ":objective"
)
OPTUNA_GUARD_BIN = os.path.join(os.path.dirname(sys.executable), "optuna-guard")
# Small workers for a 2-core machine; short heartbeats so a suspended job's trials go stale fast.
EXTRA_ARGS = (
    "--display off --max-worker-rss-gb 2 --min-available-gb 0.3 --warn-available-gb 0.5 "
    "--check-interval 0.5 --status-interval 30"
)


def job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (empty when SLURM no longer knows the job)."""
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
    )
    if proc.returncode != 0:
        return {}
    info: dict[str, str] = {}
    for line in proc.stdout.splitlines():  # an array job: one line per task; keep the first
        for item in line.split():
            key, _, value = item.partition("=")
            info.setdefault(key, value)
        break
    return info


def array_task_states(array_id: str) -> dict[str, str]:
    """Task id -> state of every task of an array job (as squeue shows them)."""
    proc = subprocess.run(
        ["squeue", "-h", "-r", "-j", array_id, "-o", "%i %T"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return dict(line.split() for line in proc.stdout.splitlines() if line.strip())


class SlurmJobs:
    """Every job a test module submits, cancelled at the end whatever happened."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._lock = threading.Lock()

    def submit(self, script: str, *sbatch_args: str, env: dict[str, str], cwd: str) -> str:
        full_env = {**os.environ, "OPTUNA_GUARD_BIN": OPTUNA_GUARD_BIN, **env}
        proc = subprocess.run(
            [
                "sbatch",
                "--parsable",
                f"--chdir={cwd}",
                *sbatch_args,
                os.path.join(SCRIPTS, script),
            ],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=60,
        )
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
        job_id = proc.stdout.strip().split(";")[0]
        with self._lock:
            self.ids.append(job_id)
        return job_id

    def cancel_all(self) -> None:
        for job_id in self.ids:
            subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
        deadline = (
            time.monotonic() + 60
        )  # wait until their processes are gone (they use the database)
        while time.monotonic() < deadline:
            live = [
                j
                for j in self.ids
                if job_info(j).get("JobState")
                in ("RUNNING", "PENDING", "COMPLETING", "SUSPENDED", "REQUEUED")
            ]
            if not live:
                return
            time.sleep(1)


def wait_for(
    predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 1.0
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_job_done(job_id: str, *, timeout: float) -> dict[str, str]:
    """Poll until the job reached a final state (a requeued job passes PENDING on its way)."""
    final = (
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
    )
    return wait_for(
        lambda: (info := job_info(job_id)).get("JobState") in final and info,
        timeout=timeout,
        what=f"job {job_id} to end",
        interval=2.0,
    )


def trials(storage: optuna.storages.BaseStorage, study: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials, or [] before the job created it."""
    try:
        study_id = storage.get_study_id_from_name(study)
    except KeyError:
        return []
    return storage.get_all_trials(study_id, deepcopy=False)


def read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except FileNotFoundError:
        return ""
