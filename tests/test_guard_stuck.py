"""The guard keeps trying: objectives that swallow the interrupt, wrap it, or wait on another
thread. In-process cases use a fake probe and ``on_stuck="warn"``; the machine-level cases run
a real process in a memory cgroup this test creates, and assert that the kernel OOM killer never
fires and the trial is ended and tagged in the SQLite storage."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import optuna
import pytest
from fakes import FakeProbe, current_rss_gb
from optuna.trial import TrialState

from optuna_guard import guard, tags
from optuna_guard._watcher import EXIT_STUCK, WATCHER, interrupt_in_chain, under_launcher

MEMCG_ROOT = "/sys/fs/cgroup/memory"


@pytest.fixture(autouse=True)
def _quiet(quiet_optuna):
    yield


def _attrs(study):
    return study.trials[0].user_attrs


def test_a_catch_all_objective_is_interrupted_again_and_ends_as_a_memory_stop(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="optuna_guard")
    probe = FakeProbe(rss_gb=0.5)
    caught = []

    @guard(max_trial_rss_gb=1.0, interval=0.02, on_stuck="warn", stuck_after=0.5, probe=probe)
    def objective(trial):
        probe.set(rss_gb=3.0)
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            try:
                time.sleep(0.005)
            except BaseException as exc:  # swallows everything, as some training loops do
                caught.append(type(exc).__name__)
        return 1.0

    study = optuna.create_study()
    study.optimize(objective, n_trials=1)
    probe.set(rss_gb=0.5)
    assert len(caught) >= 3, caught  # interrupted again and again, not once
    trial = study.trials[0]
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs[tags.EMERGENCY_KILLED] is True
    assert trial.user_attrs[tags.KILL_LIMIT] == "max_trial_rss_gb"
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "caught the guard's interrupt and went on while still over its limit" in m
        for m in messages
    )
    assert any(
        "on_stuck='warn' leaves it running" in m and "caught the interrupt" in m for m in messages
    )


@pytest.mark.parametrize("how", ["from", "during"])
def test_an_interrupt_wrapped_by_the_objective_keeps_its_tags(how) -> None:
    probe = FakeProbe(rss_gb=0.5)

    @guard(max_trial_rss_gb=1.0, interval=0.02, probe=probe)
    def objective(trial):
        probe.set(rss_gb=3.0)
        try:
            for _ in range(300):
                time.sleep(0.01)
        except BaseException as exc:  # a framework's training loop wrapping errors
            probe.set(rss_gb=0.5)
            if how == "from":
                raise RuntimeError(f"training loop failed: {exc!r}") from exc
            raise RuntimeError("training loop failed")  # noqa: B904 - the implicit __context__ case
        return 1.0

    study = optuna.create_study()
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs[tags.EMERGENCY_KILLED] is True
    assert trial.user_attrs[tags.KILL_REASON].startswith("OOM prevention [Trial #0 mid-trial]")


def test_a_plain_error_is_not_taken_for_a_memory_stop() -> None:
    @guard(probe=FakeProbe())
    def objective(trial):
        raise RuntimeError("boom")

    study = optuna.create_study()
    study.optimize(objective, n_trials=1, catch=(RuntimeError,))
    assert study.trials[0].state == TrialState.FAIL
    assert tags.EMERGENCY_KILLED not in study.trials[0].user_attrs
    assert not interrupt_in_chain(RuntimeError("x"))


def test_a_trial_waiting_on_a_future_is_reported_and_stopped_when_the_wait_ends(caplog) -> None:
    """The trial thread waits in concurrent.futures (not interruptible): the watcher says so,
    on_stuck='warn' lets it run, and the trial is stopped as soon as it is back in its code."""
    caplog.set_level(logging.WARNING, logger="optuna_guard")
    probe = FakeProbe(rss_gb=0.5)

    @guard(max_trial_rss_gb=1.0, interval=0.02, on_stuck="warn", stuck_after=0.4, probe=probe)
    def objective(trial):
        probe.set(rss_gb=3.0)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(time.sleep, 1.0).result()
        for _ in range(300):
            time.sleep(0.01)
        return 1.0

    study = optuna.create_study()
    study.optimize(objective, n_trials=1)
    probe.set(rss_gb=0.5)
    assert study.trials[0].state == TrialState.PRUNED
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "waits in threading.Condition.wait()" in m and "on_stuck='warn' leaves it running" in m
        for m in messages
    ), messages


def test_a_trial_waiting_for_a_thread_pool_is_stopped_through_the_pool_thread(caplog) -> None:
    """``pool.submit(work).result()``: the pool thread running the work is interrupted, the
    Future hands the interrupt to the trial, which ends as a memory stop; the process lives."""
    caplog.set_level(logging.WARNING, logger="optuna_guard")
    probe = FakeProbe(rss_gb=0.5)
    progress = {"iterations": 0}

    def work():
        probe.set(rss_gb=3.0)
        try:
            for _ in range(1000):  # ~10 s if never stopped
                progress["iterations"] += 1
                time.sleep(0.01)
        finally:
            probe.set(rss_gb=0.5)
        return 1.0

    @guard(max_trial_rss_gb=1.0, interval=0.02, on_stuck="warn", stuck_after=5.0, probe=probe)
    def objective(trial):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(work).result()

    study = optuna.create_study()
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == TrialState.PRUNED, trial.user_attrs
    assert trial.user_attrs[tags.EMERGENCY_KILLED] is True
    assert progress["iterations"] < 300  # stopped within ~1 s, long before stuck_after
    assert any("interrupting the pool thread" in r.getMessage() for r in caplog.records)


def test_on_stuck_exit_ends_the_trial_fail_tagged_then_exits(monkeypatch) -> None:
    """The exit path without leaving the test process: the watcher's exit is replaced."""
    exits = []
    released = threading.Event()

    def fake_exit(code):
        exits.append(code)
        released.set()

    monkeypatch.setattr(WATCHER, "exit", fake_exit)
    monkeypatch.setattr(logging, "shutdown", lambda: None)
    probe = FakeProbe(rss_gb=0.5)

    @guard(max_trial_rss_gb=1.0, interval=0.02, on_stuck="exit", stuck_after=0.3, probe=probe)
    def objective(trial):
        probe.set(rss_gb=3.0)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(released.wait, 10.0).result()
        probe.set(rss_gb=0.5)
        return 1.0

    study = optuna.create_study()
    objective(study.ask())  # returns once the fake exit released it (a real one never returns)
    assert exits == [EXIT_STUCK]
    trial = study.trials[0]
    assert trial.state == TrialState.FAIL  # ended by the watcher before the (fake) exit
    assert trial.user_attrs[tags.EMERGENCY_KILLED] is True
    assert "process exited after" in trial.user_attrs[tags.KILL_REASON]
    assert "waits in" in trial.user_attrs[tags.KILL_REASON]


def test_on_stuck_defaults_to_warn_under_the_launcher(monkeypatch) -> None:
    monkeypatch.delenv("OPTUNA_GUARD_LAUNCH_ID", raising=False)
    monkeypatch.delenv("OPTUNA_GUARD_WORKER_FD", raising=False)
    assert not under_launcher()
    assert guard(lambda t: 0.0).__optuna_guard_settings__.on_stuck == "exit"
    monkeypatch.setenv("OPTUNA_GUARD_LAUNCH_ID", "abc")
    assert guard(lambda t: 0.0).__optuna_guard_settings__.on_stuck == "warn"
    assert guard(on_stuck="exit")(lambda t: 0.0).__optuna_guard_settings__.on_stuck == "exit"


@pytest.mark.parametrize(
    "kwargs", [{"on_stuck": "kill"}, {"stuck_after": 0}, {"stuck_after": float("nan")}]
)
def test_bad_on_stuck_settings_are_refused(kwargs) -> None:
    from optuna_guard.exceptions import ConfigError

    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        guard(**kwargs)


# -- real processes in a memory cgroup --------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import concurrent.futures, os, sys, time
    import optuna
    from optuna_guard import guard
    from optuna_guard.memory import SystemProbe

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kind, url = sys.argv[1], sys.argv[2]
    limit = SystemProbe().process_tree_rss(os.getpid()) / 2**30 + 0.15

    def touch(chunk):
        for i in range(0, len(chunk), 4096):
            chunk[i] = 1

    def grow(seconds):  # 10 MB every 50 ms (~200 MB/s); far more than the cgroup holds
        chunks, end = [], time.monotonic() + seconds
        while time.monotonic() < end and len(chunks) < 150:
            chunks.append(bytearray(10 * 2**20)); touch(chunks[-1]); time.sleep(0.05)
        return len(chunks)

    def catch_all(trial):
        chunks, end = [], time.monotonic() + 15
        while time.monotonic() < end and len(chunks) < 150:
            try:
                chunks.append(bytearray(10 * 2**20)); touch(chunks[-1]); time.sleep(0.05)
            except BaseException:
                pass
        return 1.0

    def pool_alloc(trial):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return float(pool.submit(grow, 15.0).result())

    objective = guard(max_trial_rss_gb=limit, min_available_gb=None, warn_available_gb=None,
                      interval=0.05, stuck_after=1.0)({"catch_all": catch_all, "pool_alloc": pool_alloc}[kind])
    study = optuna.create_study(storage=url, study_name="stuck")
    study.optimize(objective, n_trials=1, catch=(Exception,))
    print("RETURNED", study.trials[0].state.name, flush=True)
    """
)


@pytest.fixture()
def memory_cgroup():
    """A v1 memory cgroup limited to this process's RSS + 600 MB; removed afterwards."""
    if not os.access(MEMCG_ROOT, os.W_OK) or not os.path.exists(
        os.path.join(MEMCG_ROOT, "memory.limit_in_bytes")
    ):
        pytest.skip("needs a writable cgroup v1 memory controller (root)")
    path = os.path.join(MEMCG_ROOT, f"og-test-{uuid.uuid4().hex[:12]}")
    os.mkdir(path)
    try:
        limit = int((current_rss_gb() + 0.6) * 2**30)
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as handle:
            handle.write(str(limit))
        yield path
    finally:
        _empty_cgroup(path)
        os.rmdir(path)


def _empty_cgroup(path: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(os.path.join(path, "cgroup.procs")) as handle:
            pids = [int(line) for line in handle if line.strip()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _oom_kills(path: str) -> int:
    with open(os.path.join(path, "memory.oom_control")) as handle:
        for line in handle:
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    raise AssertionError("memory.oom_control has no oom_kill counter on this kernel")


@pytest.mark.parametrize("kind", ["catch_all", "pool_alloc"])
def test_standalone_guard_in_a_memory_cgroup_never_meets_the_oom_killer(
    kind, memory_cgroup, tmp_path
) -> None:
    """Before: both filled the cgroup, were OOM-killed (oom_kill 1) and left the trial RUNNING."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OPTUNA_GUARD_LAUNCH_ID", "OPTUNA_GUARD_WORKER_FD")
    }
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    wrapper = f'echo $$ > {memory_cgroup}/cgroup.procs && exec "$@"'
    proc = subprocess.Popen(
        ["sh", "-c", wrapper, "sh", sys.executable, str(script), kind, url],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _oom_kills(memory_cgroup) == 0, err[-2000:]
    trial = optuna.load_study(study_name="stuck", storage=url).trials[0]
    assert trial.user_attrs[tags.EMERGENCY_KILLED] is True, (trial.state, err[-2000:])
    assert trial.user_attrs[tags.KILL_LIMIT] == "max_trial_rss_gb"
    if kind == "catch_all":  # swallows every interrupt: ended FAIL, then the process exits
        assert proc.returncode == EXIT_STUCK, (proc.returncode, err[-2000:])
        assert trial.state == TrialState.FAIL
        assert (
            "EMERGENCY EXIT" in err
            and "process exited after" in trial.user_attrs[tags.KILL_REASON]
        )
    else:  # stopped through the pool thread: the process lives on
        assert proc.returncode == 0, (proc.returncode, err[-2000:])
        assert trial.state == TrialState.PRUNED
        assert "RETURNED PRUNED" in out
