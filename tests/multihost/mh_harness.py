"""Helpers of the multi-host tests: launch ``optuna-guard run`` on a simulated host, read the study
from outside the simulated network, and check what every test must end with."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from mh_netns import SimulatedHosts
from optuna.trial import FrozenTrial, TrialState

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
OBJECTIVE = f"{HERE / 'objectives' / 'mh_steps.py'}:objective"
PYTHON = sys.executable

# Liveness settings of every launch in these tests (the same on all hosts, as the docs require).
HEARTBEAT_INTERVAL = 1
HEARTBEAT_GRACE = 6

# Tags that say why a trial did not COMPLETE (one of them must be on every such trial).
END_TAGS = (
    "worker_lost",
    "worker_crashed",
    "emergency_killed",
    "preempted",
    "diverged",
    "timed_out",
    "kill_reason",
)

FIGURES_ENV = "MULTIHOST_FIGURES"  # file to append measured figures to (JSON lines), optional


def report_figure(test: str, **values: Any) -> None:
    """Print a measured figure (visible with -s or on failure) and append it to $MULTIHOST_FIGURES."""
    line = json.dumps({"test": test, **values}, default=str)
    print(f"MULTIHOST-FIGURE {line}")
    path = os.environ.get(FIGURES_ENV)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def checkpoint_store_supported() -> bool:
    """Whether TrialCheckpointer takes an artifact store (engineer "checkpoints"' piece has landed)."""
    import inspect

    from optuna_guard.checkpoint import TrialCheckpointer

    return "store" in inspect.signature(TrialCheckpointer.__init__).parameters


@dataclass
class Launch:
    """One ``optuna-guard run`` on one simulated host."""

    host: int
    hostname: str
    proc: subprocess.Popen
    log_dir: Path
    console: Path

    @property
    def events_path(self) -> Path:
        return self.log_dir / "events.jsonl"

    def events(self) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        out = []
        for line in self.events_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out

    def text(self) -> str:
        """Console output plus every worker log (what a user would read)."""
        parts = [self.console.read_text(errors="replace") if self.console.exists() else ""]
        parts += [p.read_text(errors="replace") for p in sorted(self.log_dir.glob("worker_*.log"))]
        return "\n".join(parts)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"launcher on host {self.host} still running after {timeout:.0f}s; "
                f"end of its output:\n{self.text()[-3000:]}"
            ) from None


@dataclass
class MultiHostRun:
    """A study run on several simulated hosts against the harness' PostgreSQL cluster."""

    hosts: SimulatedHosts
    storage_url: str  # as the hosts see it
    local_url: str  # as the test sees it
    study_name: str
    work_dir: Path
    shared_store: Path  # shared artifact-store directory (or shared checkpoint root)
    launches: list[Launch] = field(default_factory=list)
    killed_hosts: set[int] = field(default_factory=set)  # hosts the test killed on purpose

    def kill_host(self, host: int) -> None:
        """Host loss: every process of the host SIGKILLed."""
        self.killed_hosts.add(host)
        self.hosts.kill_host(host)

    def env(self, host: int) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        env["MH_STEPS"] = env.get("MH_STEPS", "8")
        env["MH_STEP_S"] = env.get("MH_STEP_S", "0.3")
        if checkpoint_store_supported():
            private = self.work_dir / f"host{host}-local-ckpt"  # each host's local root is its own
            private.mkdir(exist_ok=True)
            env["MH_CKPT_ROOT"] = str(private)
            env["OPTUNA_GUARD_CHECKPOINT_STORE"] = f"file://{self.shared_store}"
        else:
            env["MH_CKPT_ROOT"] = str(
                self.shared_store
            )  # fallback: a shared local directory as root
        return env

    def launch(
        self,
        host: int,
        *,
        n_trials: int,
        workers: int = 2,
        retry: int = 1,
        extra: Sequence[str] = (),
    ) -> Launch:
        log_dir = self.work_dir / f"host{host}-launch{len(self.launches)}"
        log_dir.mkdir()
        console = log_dir / "console.log"
        argv = [
            PYTHON,
            "-m",
            "optuna_guard.cli",
            "run",
            OBJECTIVE,
            "--study-name",
            self.study_name,
            "--storage",
            self.storage_url,
            "--workers",
            str(workers),
            "--n-trials",
            str(n_trials),
            "--heartbeat-interval",
            str(HEARTBEAT_INTERVAL),
            "--heartbeat-grace",
            str(HEARTBEAT_GRACE),
            "--retry",
            str(retry),
            "--log-dir",
            str(log_dir),
            "--display",
            "plain",
            "--no-guard",
            "--min-available-gb",
            "0.1",
            "--warn-available-gb",
            "0.2",
            "--max-worker-age",
            "off",
            "--check-interval",
            "0.1",
            "--status-interval",
            "5",
            "--kill-wait",
            "0.3",
            "--grace-period",
            "5",
            "--storage-deadline",
            "120",
            *extra,
        ]
        proc = self.hosts.spawn(
            host, argv, env=self.env(host), log_path=console, cwd=self.work_dir
        )
        launch = Launch(host, self.hosts.hostname(host), proc, log_dir, console)
        self.launches.append(launch)
        return launch

    # -- reading the study (over the Unix socket, outside the simulated network) ---------------
    def trials(self) -> list[FrozenTrial]:
        last: Exception | None = None
        for _ in range(60):  # the cluster may be restarting
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    storage = optuna.storages.RDBStorage(
                        self.local_url,
                        engine_kwargs={"pool_pre_ping": True},
                        skip_compatibility_check=True,
                        skip_table_creation=True,
                    )
                    try:
                        study = optuna.load_study(study_name=self.study_name, storage=storage)
                        return study.get_trials(deepcopy=False)
                    finally:
                        storage.remove_session()
                        storage.engine.dispose()
            except Exception as exc:
                last = exc
                time.sleep(0.5)
        raise AssertionError(f"cannot read the study: {last}")

    def system_attrs(self, trial: FrozenTrial) -> dict[str, Any]:
        return dict(trial.system_attrs)

    def wait_for(
        self,
        what: str,
        predicate: Callable[[list[FrozenTrial]], Any],
        timeout: float,
        poll: float = 0.2,
    ) -> Any:
        """Poll the study until ``predicate(trials)`` is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            for launch in self.launches:
                code = launch.proc.poll()
                if code not in (None, 0) and launch.host not in self.killed_hosts:
                    raise AssertionError(
                        f"launcher on host {launch.host} exited {code} while waiting for {what}; "
                        f"end of its output:\n{launch.text()[-3000:]}"
                    )
            trials = self.trials()
            value = predicate(trials)
            if value:
                return value
            if time.monotonic() > deadline:
                states = sorted(
                    (t.number, t.state.name, t.user_attrs.get("hostname")) for t in trials
                )
                raise AssertionError(
                    f"timed out after {timeout:.0f}s waiting for {what}; trials: {states}"
                )
            time.sleep(poll)

    def wait_all(self, timeout: float) -> dict[int, int]:
        """Wait for every launch; returns host -> exit code."""
        deadline = time.monotonic() + timeout
        return {
            launch.host: launch.wait(max(1.0, deadline - time.monotonic()))
            for launch in self.launches
        }


def running_on(
    trials: Iterable[FrozenTrial], hostname: str, min_step: int = 0
) -> list[FrozenTrial]:
    """RUNNING trials of a host that reported at least ``min_step`` steps."""
    return [
        t
        for t in trials
        if t.state == TrialState.RUNNING
        and t.user_attrs.get("hostname") == hostname
        and len(t.intermediate_values) >= min_step
    ]


def chain_of(trial: FrozenTrial) -> int:
    """The number of the original trial of the retry chain a trial belongs to."""
    original = trial.system_attrs.get("failed_trial")
    return int(original) if original is not None else trial.number


def retries_of(trials: Iterable[FrozenTrial], number: int) -> list[FrozenTrial]:
    return [t for t in trials if t.number != number and chain_of(t) == number]


def local_time(dt: datetime.datetime | None) -> float | None:
    """A FrozenTrial datetime (naive local time) as a Unix timestamp."""
    return None if dt is None else dt.timestamp()


def assert_end_invariants(run: MultiHostRun, trials: list[FrozenTrial]) -> None:
    """What every multi-host test ends with (the issue's list)."""
    running = [t.number for t in trials if t.state == TrialState.RUNNING]
    assert running == [], f"trials left RUNNING: {running}"
    complete_per_chain: dict[int, list[int]] = {}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            complete_per_chain.setdefault(chain_of(t), []).append(t.number)
    doubles = {chain: numbers for chain, numbers in complete_per_chain.items() if len(numbers) > 1}
    assert doubles == {}, f"retry chains with more than one COMPLETE trial: {doubles}"
    untagged = [
        t.number
        for t in trials
        if t.state in (TrialState.FAIL, TrialState.PRUNED)
        and not any(t.user_attrs.get(tag) for tag in END_TAGS)
    ]
    assert untagged == [], f"trials that did not COMPLETE and carry no reason tag: {untagged}"
    waiting = [
        t.number
        for t in trials
        if t.state == TrialState.WAITING and "failed_trial" not in t.system_attrs
    ]
    assert waiting == [], f"WAITING trials that are not retries: {waiting}"
    for launch in run.launches:
        assert launch.proc.poll() is not None, f"launcher on host {launch.host} still running"
        leftovers = [line for line in launch.text().splitlines() if line.startswith("LEFTOVER")]
        assert leftovers == [], (
            f"processes of the launch on host {launch.host} outlived it: {leftovers}"
        )
    for n in range(1, run.hosts.n_hosts + 1):
        pids = run.hosts.namespace_pids(run.hosts.ns(n))
        assert pids == [], f"processes left on host {n}: {pids}"
