"""Helpers for the supervision tests: real launchers started as a user would, and the
processes of a launch found by its environment marker (so each test kills what it made)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import optuna
from optuna.trial import TrialState
from supervisor_helpers import objective_spec, wait_for

from optuna_guard.memory import _tree
from optuna_guard.memory._cgroup import own_memory_cgroup
from optuna_guard.supervisor._lifeline import ENV_LAUNCH_ID

COMMON = (
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
)


def launch_pids(launch_id: str) -> list[int]:
    """Every live process of a launch (workers and their descendants, daemonised or not)."""
    return _tree.pids_with_env(f"{ENV_LAUNCH_ID}={launch_id}".encode())


def launch_id_of(log_dir: str, timeout: float = 60) -> str:
    path = os.path.join(log_dir, "events.jsonl")

    def find() -> str | None:
        try:
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    event = json.loads(line)
                    if event.get("event") == "launch_started":
                        return event["launch_id"]
        except (OSError, ValueError):
            return None
        return None

    return wait_for(find, timeout, what="the launch_started event")


def running_trials(url: str, study_name: str) -> list[optuna.trial.FrozenTrial]:
    try:
        study = optuna.load_study(study_name=study_name, storage=url)
    except KeyError:
        return []
    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


@contextlib.contextmanager
def launcher(
    objective: str,
    url: str,
    study_name: str,
    log_dir: str,
    *args: str,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen]:
    """``optuna-guard run`` as a subprocess; on the way out its process and every process of
    its launch are SIGKILLed by pid (also when the test failed)."""
    module, _, function = objective.partition(":")
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "optuna_guard.cli",
            "run",
            objective_spec(module, function),
            "--study-name",
            study_name,
            "--storage",
            url,
            "--log-dir",
            log_dir,
            *COMMON,
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )
    launch_id: list[str] = []
    try:
        yield proc
    finally:
        try:
            launch_id.append(launch_id_of(log_dir, timeout=1))
        except AssertionError:
            pass
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
        for lid in launch_id:
            for pid in launch_pids(lid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            remove_launch_cgroups(lid)


def remove_launch_cgroups(launch_id: str) -> None:
    """rmdir the (empty) per-worker cgroups a SIGKILLed launcher could not remove."""
    own = own_memory_cgroup()
    if own is None:
        return
    for parent in glob.glob(os.path.join(own[1], f"optuna_guard_{launch_id[:12]}_*")):
        for child in glob.glob(os.path.join(parent, "w*")):
            with contextlib.suppress(OSError):
                os.rmdir(child)
        with contextlib.suppress(OSError):
            os.rmdir(parent)


def wait_until_gone(pids: list[int], timeout: float) -> float:
    """Seconds until none of ``pids`` is alive (zombies count as gone); raises on timeout."""
    started = time.monotonic()
    starts = {pid: _tree.start_time_ticks(pid) for pid in pids}
    wait_for(
        lambda: not any(_tree.is_same_process(pid, ticks) for pid, ticks in starts.items()),
        timeout,
        interval=0.05,
        what=f"processes {pids} to exit",
    )
    return time.monotonic() - started
