"""Storage URLs beyond databases: ``journal:///file``, ``redis://host:port/db``, ``grpc://host:port``
(issue 12), opened by ``open_storage`` and used by ``run``, ``status`` and ``report``; and
``optuna-guard storage-proxy`` serving Optuna's gRPC proxy in front of a database.

Real storages only: journal files in tmp_path, the machine's Redis with a key prefix of the
test's own (deleted afterwards), and proxies started by the tests on free loopback ports
(stopped by PID with SIGTERM, which is itself checked).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import optuna
import pytest
from optuna.trial import TrialState
from supervisor_helpers import assert_nothing_running, cli, objective_spec

from optuna_guard import tags
from optuna_guard._storage_urls import normalize_url, url_kind
from optuna_guard.exceptions import ConfigError
from optuna_guard.resilience import ResilientStorage, StorageRetrySettings
from optuna_guard.storage import open_storage

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
optuna.logging.set_verbosity(optuna.logging.WARNING)
pytest.importorskip("redis")
pytest.importorskip("grpc")

REDIS = "redis://127.0.0.1:6379/0"


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture()
def redis_url() -> Iterator[str]:
    """A Redis journal URL with a key prefix of this test's own; its keys are deleted after."""
    import redis

    prefix = f"og_test_{uuid.uuid4().hex[:12]}_"
    client = redis.Redis.from_url(REDIS, socket_connect_timeout=5)
    client.ping()  # the CI machine runs Redis: fail, do not skip
    try:
        yield f"{REDIS}?prefix={prefix}"
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


def _start_proxy(storage_url: str, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "optuna_guard.cli",
            "storage-proxy",
            "--storage",
            storage_url,
            "--port",
            "0",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line.startswith("listening on "):
                return proc, line.split()[-1]
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"storage proxy did not start: {proc.communicate(timeout=10)}")


def _stop(proc: subprocess.Popen) -> int:
    """SIGTERM by PID; the proxy must exit by itself within its stop grace."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture()
def grpc_url(tmp_path) -> Iterator[str]:
    """A storage proxy in front of a SQLite file, started for this test; its exit is checked."""
    proc, url = _start_proxy(f"sqlite:///{tmp_path / 'behind_proxy.db'}")
    try:
        yield url
    finally:
        assert _stop(proc) == 0


@pytest.fixture(params=["journal", "redis", "grpc"])
def any_url(request, tmp_path) -> str:
    if request.param == "journal":
        return f"journal:///{tmp_path / 'study.log'}".replace(":////", ":///")
    return request.getfixturevalue(f"{request.param}_url")


# -- URL parsing --------------------------------------------------------------------------------


def test_url_kinds_and_normalisation(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert [
        url_kind(u)
        for u in (
            "journal:///a.log",
            "redis://h:1/0",
            "rediss://h/0",
            "grpc://h:1",
            "sqlite:///x.db",
            "postgresql+psycopg://h/db",
        )
    ] == ["journal", "redis", "redis", "grpc", "rdb", "rdb"]
    assert normalize_url("journal://rel/study.log") == f"journal://{tmp_path}/rel/study.log"
    assert normalize_url("journal:///abs/study.log") == "journal:///abs/study.log"
    assert normalize_url("redis://h:1/0") == "redis://h:1/0"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("journal:///no/such/dir/study.log", "does not exist; create it first"),
        ("journal://", "names no journal file"),
        ("grpc://", "not a gRPC proxy address"),
        ("grpc://host:notaport", "not a gRPC proxy address"),
        ("redis://127.0.0.1:6379/zero", "must be a number"),
    ],
)
def test_bad_urls_are_one_line_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_storage(url)


# -- each URL runs a real study -----------------------------------------------------------------


def test_a_study_runs_on_each_url(any_url: str) -> None:
    storage = ResilientStorage(open_storage(any_url), StorageRetrySettings(deadline_s=10))
    study = optuna.create_study(storage=storage, study_name=f"urls-{uuid.uuid4().hex[:8]}")
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=4)
    again = optuna.load_study(study_name=study.study_name, storage=open_storage(any_url))
    assert [t.state for t in again.get_trials()] == [TrialState.COMPLETE] * 4
    assert again.best_value == study.best_value


def test_redis_prefix_keeps_journals_apart(redis_url: str) -> None:
    other = redis_url.replace("prefix=og_test_", "prefix=og_test_other_")
    try:
        optuna.create_study(storage=open_storage(redis_url), study_name="only-here")
        assert [s.study_name for s in optuna.get_all_study_summaries(open_storage(other))] == []
    finally:
        import redis

        client = redis.Redis.from_url(REDIS)
        keys = list(client.scan_iter(match=other.split("prefix=")[1] + "*"))
        if keys:
            client.delete(*keys)


# -- the storage proxy command ------------------------------------------------------------------


def test_proxy_stops_cleanly_on_sigterm_and_frees_its_port(tmp_path) -> None:
    proc, url = _start_proxy(f"sqlite:///{tmp_path / 'p.db'}")
    port = int(url.rsplit(":", 1)[1])
    try:
        storage = open_storage(url)
        optuna.create_study(storage=storage, study_name="served").optimize(
            lambda t: t.suggest_float("x", 0, 1), n_trials=2
        )
        storage.close()
    finally:
        started = time.monotonic()
        code = _stop(proc)
    assert code == 0 and time.monotonic() - started < 15
    stderr = proc.stderr.read()
    assert "listening on 127.0.0.1" in stderr and "Storage proxy stopped." in stderr, stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # nothing holds it any more
    # the trials went to the database behind the proxy
    behind = optuna.load_study(study_name="served", storage=f"sqlite:///{tmp_path / 'p.db'}")
    assert len(behind.get_trials(states=(TrialState.COMPLETE,))) == 2


def test_proxy_bad_inputs_exit_2(tmp_path) -> None:
    journal = cli(
        "storage-proxy", "--storage", f"journal:///{tmp_path}/x.log", "--port", "0", timeout=60
    )
    assert journal.returncode == 2 and "does not support journal" in journal.stderr
    assert len(journal.stderr.strip().splitlines()) == 1, journal.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = cli(
            "storage-proxy",
            "--storage",
            f"sqlite:///{tmp_path}/y.db",
            "--port",
            str(port),
            timeout=60,
        )
    assert busy.returncode == 2 and "cannot listen on 127.0.0.1" in busy.stderr, busy.stderr
    bad_port = cli(
        "storage-proxy", "--storage", f"sqlite:///{tmp_path}/y.db", "--port", "70000", timeout=60
    )
    assert bad_port.returncode == 2 and "--port must be between" in bad_port.stderr


# -- run, status and report on each URL ---------------------------------------------------------


def test_run_status_report_on_each_url(any_url: str, tmp_path, unique_study_name: str) -> None:
    logs = str(tmp_path / "logs")
    run = cli(
        "run",
        "--study-name",
        unique_study_name,
        "--storage",
        any_url,
        "--log-dir",
        logs,
        "--display",
        "off",
        "--workers",
        "2",
        "--n-trials",
        "6",
        objective_spec("launcher_quick"),
        cwd=str(tmp_path),
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    trials = optuna.load_study(
        study_name=unique_study_name, storage=open_storage(any_url)
    ).get_trials()
    assert_nothing_running(trials)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    assert {t.user_attrs[tags.WORKER_ID] for t in trials} <= {1, 2}
    assert all(t.user_attrs[tags.WORKER_PID] > 0 for t in trials)
    assert all(not any(k.startswith("optuna_guard:") for k in t.system_attrs) for t in trials)
    status = cli(
        "status", "--study-name", unique_study_name, "--storage", any_url, "--json", timeout=60
    )
    assert status.returncode == 0, status.stderr
    assert '"COMPLETE": 6' in status.stdout
    report = cli(
        "report",
        "--study-name",
        unique_study_name,
        "--storage",
        any_url,
        "--format",
        "json",
        "-o",
        str(tmp_path / "report.json"),
        timeout=60,
    )
    assert report.returncode == 0, report.stderr
    assert unique_study_name in (tmp_path / "report.json").read_text()


def test_status_on_a_missing_journal_file_exits_2(tmp_path) -> None:
    missing = f"journal://{tmp_path}/missing.log"
    for command in ("status", "report"):
        result = cli(command, "--study-name", "s", "--storage", missing, timeout=60)
        assert result.returncode == 2 and "does not exist" in result.stderr, result.stderr
    assert not os.path.exists(tmp_path / "missing.log")  # reading never creates a journal


def test_a_frozen_proxy_is_an_outage_not_a_hang(tmp_path) -> None:
    """A proxy that stops answering (here SIGSTOP; on a partition the packets are lost) must
    turn into a retried error within seconds, not a call that waits for TCP's ~15 minutes;
    once it answers again the call goes through and the trial completes."""
    import threading

    from supervisor_helpers import wait_for

    proc, url = _start_proxy(f"sqlite:///{tmp_path / 'frozen.db'}")
    try:
        storage = ResilientStorage(
            open_storage(url),
            StorageRetrySettings(deadline_s=120, initial_backoff_s=0.2, max_backoff_s=1.0),
        )
        study = optuna.create_study(storage=storage, study_name="frozen")
        os.kill(proc.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        worker = threading.Thread(
            target=study.optimize,
            args=(lambda t: t.suggest_float("x", 0, 1),),
            kwargs={"n_trials": 1},
            daemon=True,
        )
        worker.start()
        wait_for(lambda: storage.outages == 1, timeout=45, what="the dead connection noticed")
        assert time.monotonic() - frozen_at < 45
        os.kill(proc.pid, signal.SIGCONT)
        worker.join(timeout=90)
        assert not worker.is_alive()
        assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
        assert _stop(proc) == 0


@pytest.mark.postgres
def test_proxy_rides_out_a_database_outage() -> None:
    """The proxy's database (a private cluster, never the shared server) refuses connections
    for a few seconds: clients wait, nothing fails, the proxy logs the outage and its end."""
    import threading

    from pg_cluster import private_cluster

    with private_cluster() as cluster:
        proc, url = _start_proxy(cluster.url, "--storage-deadline", "120")
        try:
            storage = ResilientStorage(open_storage(url), StorageRetrySettings(deadline_s=120))
            study = optuna.create_study(storage=storage, study_name="outage")
            study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
            cluster.block()
            worker = threading.Thread(
                target=study.optimize,
                args=(lambda t: t.suggest_float("x", 0, 1),),
                kwargs={"n_trials": 3},
                daemon=True,
            )
            worker.start()
            time.sleep(4)
            assert worker.is_alive()  # waiting on the proxy, not failed
            cluster.unblock()
            worker.join(timeout=120)
            assert not worker.is_alive()
            states = [
                t.state
                for t in optuna.load_study(study_name="outage", storage=cluster.url).get_trials()
            ]
            assert states == [TrialState.COMPLETE] * 5
        finally:
            code = _stop(proc)
        stderr = proc.stderr.read()
        assert code == 0
        assert "Storage outage began" in stderr and "Storage back after" in stderr, stderr[-2000:]
