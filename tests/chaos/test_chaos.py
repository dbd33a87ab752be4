"""Chaos suite (issue 10): one supervised study on a private PostgreSQL cluster, inside a memory
cgroup of its own, with 4 workers and --retry 2, a mixed workload (normal, leaking, hogging,
self-crashing, long native calls; all checkpointing), while an injector SIGKILLs random workers
and drops every database connection every few seconds (from start-up on); the launcher is
SIGTERMed mid-run and relaunched. Everything is asserted from the storage, /proc and the
cgroup's memory.oom_control; the fault counts and figures are printed at the end.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import threading
import time

import optuna
import pytest
from memcg import available as memcg_available
from memcg import memory_cgroup
from optuna.trial import TrialState
from pg_cluster import private_cluster

from optuna_guard import tags
from optuna_guard._units import GB

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from chaos_objective import expected_value  # noqa: E402

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.skipif(
        not memcg_available(), reason="needs a writable cgroup v1 memory controller"
    ),
]

WORKERS = 4
MAX_WORKER_RSS_GB = 0.5
CGROUP_BYTES = int(
    (WORKERS * MAX_WORKER_RSS_GB + 0.6) * GB
)  # 4 workers' worth + launcher + margin (2.6 GB)
FIRST_TRIALS = 40
STOP_AFTER_FINISHED = 14
MIN_VICTIM_AGE_S = 4.0


def _workers(pid: int) -> list[int]:
    """The launcher's worker processes (not its objective-check process)."""
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(p) for p in handle.read().split()]
    except OSError:
        pass
    workers = []
    ticks, boot = os.sysconf("SC_CLK_TCK"), _boot_time()
    for child in found:
        try:
            with open(f"/proc/{child}/cmdline", "rb") as handle:
                if b"optuna_guard.supervisor._worker" not in handle.read():
                    continue
            with open(f"/proc/{child}/stat") as handle:
                started = int(handle.read().rsplit(")", 1)[1].split()[19]) / ticks
        except (OSError, ValueError, IndexError):
            continue
        # A worker SIGKILLed before its first trial is a crash-loop strike (3 in a row: exit 3),
        # so the injector spares workers that may still be booting.
        if time.time() - (boot + started) >= MIN_VICTIM_AGE_S:
            workers.append(child)
    return workers


def _boot_time() -> float:
    with open("/proc/stat") as handle:
        for line in handle:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


class Injector:
    """Every 1.5-3.5 s: SIGKILL a random worker, drop all connections, or (rarely) refuse
    connections for 2 s. Runs until stopped; counts what it did."""

    def __init__(self, cluster, seed: int) -> None:
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.launcher: subprocess.Popen | None = None
        self.counts: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-injector", daemon=True)
        self.errors: list[str] = []

    def start(self) -> Injector:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.cluster.unblock()

    def _run(self) -> None:
        while not self._stop.wait(self.rng.uniform(1.5, 3.5)):
            try:
                self._one()
            except Exception as exc:  # reported by the test
                self.errors.append(repr(exc))

    def _one(self) -> None:
        roll = self.rng.random()
        launcher = self.launcher
        if roll < 0.45 and launcher is not None and launcher.poll() is None:
            workers = _workers(launcher.pid)
            if workers:
                victim = self.rng.choice(workers)
                try:
                    os.kill(victim, signal.SIGKILL)
                    self.counts["worker SIGKILL"] += 1
                except ProcessLookupError:
                    pass
                return
        if roll < 0.9:
            self.counts["connections dropped"] += self.cluster.drop_connections() and 1
            self.counts["connection drop rounds"] += 1
            return
        self.cluster.block()
        self.counts["2 s refusals"] += 1
        time.sleep(2.0)
        self.cluster.unblock()


def _launch(group, cluster, tmp, name: str, n_trials: int) -> subprocess.Popen:
    argv = [
        sys.executable,
        "-m",
        "optuna_guard.cli",
        "run",
        os.path.join(HERE, "chaos_objective.py:objective"),
        "--study-name",
        name,
        "--storage",
        cluster.url,
        "--workers",
        str(WORKERS),
        "--n-trials",
        str(n_trials),
        "--retry",
        "2",
        "--sampler",
        "random",
        "--seed",
        "7",
        "--max-worker-rss-gb",
        str(MAX_WORKER_RSS_GB),
        "--min-available-gb",
        "0.3",
        "--warn-available-gb",
        "0.4",
        "--grace-period",
        "4",
        "--kill-wait",
        "0",
        "--storage-deadline",
        "60",
        "--check-interval",
        "0.1",
        "--heartbeat-interval",
        "2",
        "--heartbeat-grace",
        "30",
        "--max-worker-age",
        "off",
        "--log-dir",
        os.path.join(tmp, "logs"),
        "--display",
        "off",
    ]
    env = {**os.environ, "CHAOS_CKPT_DIR": os.path.join(tmp, "ckpt")}
    return group.popen(
        argv,
        env=env,
        stdout=open(os.path.join(tmp, f"{name}-{n_trials}.out"), "a"),
        stderr=open(os.path.join(tmp, f"{name}-{n_trials}.err"), "a"),
        cwd=tmp,
    )


def _trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    except Exception:
        return []


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def _root(trial: optuna.trial.FrozenTrial) -> int:
    history = trial.system_attrs.get("retry_history") or []
    return history[0] if history else trial.number


def test_chaos(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tmp = str(tmp_path)
    name = "chaos"
    started = time.monotonic()
    with private_cluster() as cluster, memory_cgroup(CGROUP_BYTES) as group:
        injector = Injector(cluster, seed=int(time.time())).start()  # faults from start-up on
        try:
            first = _launch(group, cluster, tmp, name, FIRST_TRIALS)
            injector.launcher = first
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and first.poll() is None:
                if (
                    sum(t.state.is_finished() for t in _trials(cluster.url, name))
                    >= STOP_AFTER_FINISHED
                ):
                    break
                time.sleep(0.5)
            first.send_signal(signal.SIGTERM)
            first_code = _wait(first, 120)
            finished_first = sum(t.state.is_finished() for t in _trials(cluster.url, name))
            second = _launch(group, cluster, tmp, name, FIRST_TRIALS - finished_first + 4)
            injector.launcher = second
            time.sleep(20)
        finally:
            injector.stop()  # the rest of the second launch runs clean, so late retries get run
        second_code = _wait(second, 300)
        drained = 0
        drain_code = 0
        # Retries queued after a launch's last ticket wait for the next launch; a drained retry
        # can itself be retried (a hog is killed again), so drain until none waits. --retry 2
        # bounds every chain at 3 attempts, so 3 rounds always suffice.
        for _round in range(3):
            waiting = sum(t.state == TrialState.WAITING for t in _trials(cluster.url, name))
            if not waiting or drain_code != 0:
                break
            drained += waiting
            drain_code = _wait(_launch(group, cluster, tmp, name, waiting), 300)
        left = group.pids()
        oom_kills, peak = group.oom_kills, group.peak_bytes
        trials = _trials(cluster.url, name)

    wall = time.monotonic() - started
    states = collections.Counter(t.state.name for t in trials)
    by_chain: dict[int, list[optuna.trial.FrozenTrial]] = collections.defaultdict(list)
    for trial in trials:
        by_chain[_root(trial)].append(trial)
    resumed = [t for t in trials if t.user_attrs.get(tags.RESUMED_FROM_STEP) is not None]
    kinds = collections.Counter(t.params.get("kind") for t in trials)
    print(
        f"\nchaos: faults injected {dict(injector.counts)}; launcher exits {first_code}, {second_code}"
        f"{f', drain {drain_code} ({drained} queued retries)' if drained else ''}; trials {len(trials)} {dict(states)}; "
        f"kinds {dict(kinds)}; retry chains {len(by_chain)}; resumed from a checkpoint {len(resumed)}; "
        f"kernel OOM kills {oom_kills}; cgroup peak {peak / GB:.2f} of {CGROUP_BYTES / GB:.2f} GB; "
        f"processes left {len(left)}; wall {wall:.0f}s"
    )

    outcomes = collections.Counter(
        (
            t.params.get("kind"),
            t.state.name,
            t.user_attrs.get(tags.KILL_LIMIT)
            or (
                "crashed"
                if t.user_attrs.get(tags.WORKER_CRASHED)
                else "preempted"
                if t.user_attrs.get(tags.PREEMPTED)
                else ""
            ),
        )
        for t in trials
    )
    print("chaos outcomes (kind, state, why):", dict(sorted(outcomes.items(), key=str)))
    assert not injector.errors, injector.errors
    assert first_code == 99 and second_code == 0 and drain_code == 0
    assert oom_kills == 0
    assert left == []
    assert states.get("RUNNING", 0) == 0 and states.get("WAITING", 0) == 0
    for trial in trials:
        if trial.state == TrialState.COMPLETE:
            assert trial.value == pytest.approx(expected_value(trial.params), abs=1e-12), (
                trial.number,
                trial.params,
            )
        if trial.state in (TrialState.FAIL, TrialState.PRUNED):
            assert trial.user_attrs.get(tags.KILL_REASON), (
                trial.number,
                trial.state,
                trial.user_attrs,
            )
    for root, chain in by_chain.items():
        chain.sort(key=lambda t: t.number)
        if chain[0].params.get("kind") == "hog":
            continue
        last = chain[-1]
        assert any(t.state == TrialState.COMPLETE for t in chain) or last.user_attrs.get(
            tags.RETRIES_EXHAUSTED
        ), (root, [(t.number, t.state.name, t.user_attrs) for t in chain])
    innocent = [
        (t.number, t.params.get("kind"), t.user_attrs.get(tags.KILL_REASON))
        for t in trials
        if t.params.get("kind") in ("normal", "native", "crash")
        and t.user_attrs.get(tags.EMERGENCY_KILLED)
    ]
    assert innocent == []  # no trial tagged emergency_killed that was not over a limit itself
    retried_with_checkpoint = [t for t in resumed if t.system_attrs.get("retry_history")]
    assert retried_with_checkpoint, "no retried trial resumed from a checkpoint"
    assert all(t.user_attrs[tags.RESUMED_FROM_STEP] >= 0 for t in retried_with_checkpoint)
    assert kinds["hog"] and kinds["crash"]  # the workload really mixed
