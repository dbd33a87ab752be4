"""Helpers for the launcher tests (supervisor, launch, CLI run/status).

Memory limits in these tests are relative to the measured RSS of an idle worker
(:func:`idle_worker_rss_gb`), never absolute amounts of the machine's RAM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import TrialState

from optuna_guard._units import GB

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
OBJECTIVES = os.path.join(TESTS_DIR, "objectives")

# Fast settings for real launches: quick watchdog, short waits, no age recycling.
FAST = dict(
    check_interval=0.05,
    status_interval=30.0,
    kill_wait=0.3,
    grace_period=5.0,
    min_available_gb=0.25,
    warn_available_gb=0.5,
    max_worker_age=None,
    display="off",
)


def objective_spec(module: str, function: str = "objective") -> str:
    return f"{os.path.join(OBJECTIVES, module)}.py:{function}"


_IDLE_RSS: list[float] = []

_IDLE_SCRIPT = r"""
import os, sys, optuna
import optuna_guard.supervisor._worker, optuna_guard.trial_guard
from optuna_guard.supervisor._study import open_checked_storage
from optuna_guard.memory._tree import tree_rss_bytes
storage = open_checked_storage("sqlite:///" + sys.argv[1], heartbeat_interval=30, heartbeat_grace=300)
study = optuna.create_study(storage=storage)
study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
print(tree_rss_bytes(os.getpid()))
"""


def idle_worker_rss_gb(tmp_dir: str) -> float:
    """RSS of a process that imported and did what a worker does before its first trial (cached)."""
    if not _IDLE_RSS:
        out = subprocess.run(
            [sys.executable, "-c", _IDLE_SCRIPT, os.path.join(tmp_dir, "idle.db")],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        _IDLE_RSS.append(int(out.stdout.strip().splitlines()[-1]) / GB)
    return _IDLE_RSS[0]


def trials_of(storage_url: str, study_name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    return study.get_trials(deepcopy=False)


def assert_nothing_running(trials: Sequence[optuna.trial.FrozenTrial]) -> None:
    running = [t.number for t in trials if t.state == TrialState.RUNNING]
    assert running == [], f"trials left RUNNING: {running}"


def read_events(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def cli(
    *args: str, cwd: str | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run ``optuna-guard`` as a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "optuna_guard.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def start_cli(
    *args: str, cwd: str | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "optuna_guard.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=env,
    )


def wait_for(
    predicate: Any, timeout: float, interval: float = 0.1, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class FakeProc:
    """A worker process double for arbiter unit tests: ``poll()`` returns what the test scripts."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            raise subprocess.TimeoutExpired("fake", timeout or 0)
        return self.returncode


class PerPidProbe:
    """A memory probe whose system reading and per-pid tree RSS the test sets (GB)."""

    def __init__(self, *, available_gb: float = 12.0, total_gb: float = 16.0) -> None:
        self.available_gb = available_gb
        self.total_gb = total_gb
        self.rss_gb: dict[int, float] = {}

    def system(self) -> Any:
        from optuna_guard.memory import SystemMemory

        total, available = int(self.total_gb * GB), int(self.available_gb * GB)
        return SystemMemory(
            total_bytes=total,
            available_bytes=available,
            used_bytes=total - available,
            percent=100.0 * (total - available) / total,
        )

    def process_tree_rss(self, pid: int) -> int:
        return int(self.rss_gb.get(pid, 0.1) * GB)

    def gpus(self) -> list:
        return []
