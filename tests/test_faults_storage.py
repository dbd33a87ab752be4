"""Storage outages at every moment of a launch (issue 10, D2/D10/D14), on a private PostgreSQL
cluster: launcher start-up, worker (re)start, shutdown; permanent errors stay a one-line exit 2."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from optuna.trial import TrialState
from pg_cluster import private_cluster
from supervisor_helpers import (
    assert_nothing_running,
    cli,
    objective_spec,
    start_cli,
    trials_of,
    wait_for,
)

pytestmark = pytest.mark.postgres

COMMON = (
    "--display",
    "off",
    "--check-interval",
    "0.05",
    "--min-available-gb",
    "0.25",
    "--warn-available-gb",
    "0.5",
    "--max-worker-age",
    "off",
)


@pytest.fixture()
def cluster():
    with private_cluster() as running:
        yield running


def _run(study: str, url: str, logs: str, *extra: str) -> list[str]:
    return [
        "run",
        objective_spec("launcher_quick"),
        "--study-name",
        study,
        "--storage",
        url,
        "--log-dir",
        logs,
        *COMMON,
        *extra,
    ]


def _env(sleep: float) -> dict[str, str]:
    return {**os.environ, "LAUNCHER_TEST_SLEEP": str(sleep)}


def _finish(proc, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, out, err


def _unblock_after(cluster, seconds: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), cluster.unblock()), daemon=True)
    thread.start()
    return thread


def test_outage_during_launcher_start_is_ridden_out(cluster, tmp_path):
    """Before: exit 2 'cannot reach storage ... check --storage'. After: waits, then runs."""
    cluster.block()
    started = time.monotonic()
    proc = start_cli(
        *_run(
            "startup",
            cluster.url,
            str(tmp_path / "logs"),
            "--workers",
            "2",
            "--n-trials",
            "6",
            "--storage-deadline",
            "60",
        ),
        cwd=str(tmp_path),
        env=_env(0.05),
    )
    try:
        _unblock_after(cluster, 4.0).join()
        code, _out, err = _finish(proc, 120)
    finally:
        cluster.unblock()
    assert code == 0, err[-2000:]
    assert time.monotonic() - started >= 4.0
    assert "Storage outage began" in err and "Storage back after" in err
    trials = trials_of(cluster.url, "startup")
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)


def test_outage_while_workers_restart_is_not_a_crash_loop(cluster, tmp_path):
    """D2. Before: exit 3 after ~2 s, 27/30 trials never ran. After: every trial completes."""
    logs = tmp_path / "logs"
    proc = start_cli(
        *_run(
            "restarts",
            cluster.url,
            str(logs),
            "--workers",
            "3",
            "--n-trials",
            "15",
            "--max-trials-per-worker",
            "1",
            "--storage-deadline",
            "60",
        ),
        cwd=str(tmp_path),
        env=_env(0.3),
    )
    try:
        wait_for(
            lambda: (
                len([t for t in _safe_trials(cluster.url, "restarts") if t.state.is_finished()])
                >= 3
            ),
            timeout=90,
            what="three finished trials",
        )
        cluster.block()
        time.sleep(
            8.0
        )  # workers recycle after each trial, so replacements start during the outage
        cluster.unblock()
        code, _out, err = _finish(proc, 180)
    finally:
        cluster.unblock()
    assert code == 0, err[-3000:]
    assert "died before its first trial" not in err
    trials = trials_of(cluster.url, "restarts")
    assert_nothing_running(trials)
    assert len(trials) == 15 and all(t.state == TrialState.COMPLETE for t in trials), [
        (t.number, t.state.name, t.user_attrs, t.system_attrs.get("fail_reason"))
        for t in trials
        if t.state != TrialState.COMPLETE
    ]


def _safe_trials(url: str, name: str) -> list:
    try:
        return trials_of(url, name)
    except Exception:
        return []


@pytest.mark.parametrize(
    "kind", ["unknown host", "unknown role", "unknown database", "missing driver", "bad scheme"]
)
def test_permanent_storage_errors_are_one_line_exit_2(cluster, tmp_path, kind):
    url = {
        "unknown host": "postgresql+psycopg://postgres@no-such-host.invalid/faults",
        "unknown role": cluster.url.replace("postgres@", "nobody_here@"),
        "unknown database": cluster.url.rsplit("/", 1)[0] + "/no_such_db",
        "missing driver": cluster.url.replace("+psycopg", "+nosuchdriver"),
        "bad scheme": "foo://x/y",
    }[kind]
    started = time.monotonic()
    result = cli(
        *_run("perm", url, str(tmp_path / "logs"), "--n-trials", "1", "--storage-deadline", "300"),
        cwd=str(tmp_path),
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("optuna-guard run: error:"), result.stderr
    assert time.monotonic() - started < 30  # not retried for the deadline


def test_unreachable_past_the_deadline_is_not_bad_input(tmp_path):
    result = cli(
        *_run(
            "gone",
            "postgresql+psycopg://postgres@127.0.0.1:1/x",
            str(tmp_path / "logs"),
            "--n-trials",
            "1",
            "--storage-deadline",
            "2",
        ),
        cwd=str(tmp_path),
    )
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1, result.stderr
    assert (
        last.startswith("optuna-guard run: error: cannot reach storage")
        and "Traceback" not in result.stderr
    )


def _running(url: str, name: str) -> int:
    return sum(t.state == TrialState.RUNNING for t in _safe_trials(url, name))


def test_shutdown_during_outage_keeps_one_deadline_and_a_second_signal_exits_at_once(
    cluster, tmp_path
):
    """D10. Before: (N+2) x --storage-deadline (63 s for 4 workers at 10 s), later signals
    ignored. After: grace + a bounded storage allowance; a second signal ends it at once."""

    def launch(name: str):
        proc = start_cli(
            *_run(
                name,
                cluster.url,
                str(tmp_path / name),
                "--workers",
                "4",
                "--n-trials",
                "40",
                "--grace-period",
                "2",
                "--storage-deadline",
                "20",
            ),
            cwd=str(tmp_path),
            env=_env(30),
        )
        wait_for(lambda: _running(cluster.url, name) >= 4, timeout=90, what="four RUNNING trials")
        cluster.block()
        proc.send_signal(signal.SIGTERM)
        return proc, time.monotonic()

    try:
        proc, sent = launch("stop1")
        code, _out, err = _finish(proc, 120)
        took = time.monotonic() - sent
        assert code == 99, err[-2000:]
        assert "exits within" in err  # the overall deadline is printed at the SIGTERM
        print(
            f"\nshutdown during outage: exit {code} after {took:.1f}s (4 workers, grace 2s, deadline 20s)"
        )
        announced = float(err.split("exits within ")[1].split("s", 1)[0])
        assert announced == 2 + 5 + 20 + 3  # grace + reap + storage allowance + exit
        assert took < announced + 3, took  # a loaded machine's slack
        cluster.unblock()

        proc, sent = launch("stop2")
        time.sleep(4.0)  # past the grace period: the storage work has begun
        proc.send_signal(signal.SIGTERM)
        second = time.monotonic()
        code, _out, err = _finish(proc, 60)
        print(f"second SIGTERM during the exit: gone after {time.monotonic() - second:.1f}s")
        assert time.monotonic() - second < 5.0, err[-2000:]
        assert code == 99
        assert "stay RUNNING" in err
    finally:
        cluster.unblock()


def test_workers_that_cannot_reach_the_storage_are_no_crash_loop(cluster, tmp_path):
    """A worker that finds the storage unreachable past --storage-deadline at start exits 75:
    no crash-loop strike (before: exit 3 'died before their first trial'); an outage that
    outlasts several deadlines in a row ends the launch with exit 1."""
    proc = start_cli(
        *_run(
            "longout",
            cluster.url,
            str(tmp_path / "logs"),
            "--workers",
            "2",
            "--n-trials",
            "40",
            "--max-trials-per-worker",
            "1",
            "--storage-deadline",
            "3",
            "--grace-period",
            "2",
        ),
        cwd=str(tmp_path),
        env=_env(0.2),
    )
    try:
        wait_for(
            lambda: (
                len([t for t in _safe_trials(cluster.url, "longout") if t.state.is_finished()])
                >= 2
            ),
            timeout=90,
            what="two finished trials",
        )
        cluster.block()
        code, _out, err = _finish(proc, 150)
    finally:
        cluster.unblock()
    print(
        f"\nlong outage: exit {code}; storage exits: {err.count('could not reach the storage within')}"
    )
    assert code == 1, err[-3000:]
    assert "could not reach the storage within --storage-deadline" in err
    assert "died before its first trial" not in err and "crash loop" not in err.lower()
