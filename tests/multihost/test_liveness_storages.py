"""Dead-launcher detection on every storage: a launcher SIGKILLed with all its workers leaves a
RUNNING trial; a second launcher on the same study must end it (tagged ``worker_lost``) and, with
``--retry``, run the retry to completion. Plain processes on loopback (no namespaces needed), one
test per storage: SQLite, PostgreSQL, MariaDB, JournalStorage on a file and on Redis, and the gRPC
storage proxy in front of SQLite.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import psutil
import pytest
from mh_harness import END_TAGS, OBJECTIVE, REPO, retries_of
from optuna.trial import TrialState

INTERVAL, GRACE = 1, 4
PYTHON = sys.executable
DETECTION_LIMIT_S = GRACE + INTERVAL + 15  # generous: the machine is shared; the figure is printed


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(MH_STEPS="10", MH_STEP_S="0.5", MH_CKPT_ROOT=str(tmp / "ckpt"))
    return env


def _launch(url: str, study: str, tmp: Path, name: str, n_trials: int) -> subprocess.Popen:
    log_dir = tmp / name
    log_dir.mkdir()
    argv = [
        PYTHON,
        "-m",
        "optuna_guard.cli",
        "run",
        OBJECTIVE,
        "--study-name",
        study,
        "--storage",
        url,
        "--workers",
        "1",
        "--n-trials",
        str(n_trials),
        "--retry",
        "1",
        "--heartbeat-interval",
        str(INTERVAL),
        "--heartbeat-grace",
        str(GRACE),
        "--log-dir",
        str(log_dir),
        "--display",
        "plain",
        "--no-guard",
        "--min-available-gb",
        "0.1",
        "--warn-available-gb",
        "0.2",
        "--check-interval",
        "0.1",
        "--kill-wait",
        "0.3",
        "--grace-period",
        "5",
        "--max-worker-age",
        "off",
    ]
    with open(log_dir / "console.log", "ab") as out:
        return subprocess.Popen(
            argv, env=_env(tmp), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process it started, by pid (a whole launcher dying at once)."""
    try:
        victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        victims = []
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(victims, timeout=30)


def _trials(url_or_storage, study: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.load_study(study_name=study, storage=url_or_storage).get_trials(
            deepcopy=False
        )


def _wait(what: str, check: Callable[[], object], timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.3)


def _log_text(tmp: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(tmp.glob("*/*.log")))


def _check_detection(url: str, reader, tmp: Path) -> None:
    """Launcher A dies with a trial RUNNING; launcher B ends it as worker_lost and retries it."""
    study = f"liveness-{uuid.uuid4().hex[:10]}"
    (tmp / "ckpt").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.create_study(study_name=study, storage=reader)
    a = _launch(url, study, tmp, "a", n_trials=1)
    b = None
    try:

        def a_running():
            assert a.poll() is None, f"launcher A exited {a.returncode}:\n{_log_text(tmp)[-3000:]}"
            return [
                t
                for t in _trials(reader, study)
                if t.state == TrialState.RUNNING and len(t.intermediate_values) >= 2
            ]

        running = _wait("launcher A's trial to be 2 steps in", a_running, timeout=120)
        number = running[0].number
        _kill_tree(a)
        t_fault = time.time()
        b = _launch(url, study, tmp, "b", n_trials=2)
        ended = _wait(
            f"trial {number} to be ended by launcher B",
            lambda: [
                t
                for t in _trials(reader, study)
                if t.number == number and t.state != TrialState.RUNNING
            ],
            timeout=DETECTION_LIMIT_S + 60,
        )[0]
        t_ended = time.time()
        assert b.wait(timeout=180) == 0, f"launcher B failed:\n{_log_text(tmp)[-3000:]}"
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                _kill_tree(proc)
    trials = _trials(reader, study)
    assert ended.user_attrs.get("worker_lost") is True, (
        f"trial {number} ended without worker_lost: {ended.user_attrs}"
    )
    assert ended.state in (TrialState.FAIL, TrialState.PRUNED)
    assert socket.gethostname() in str(ended.user_attrs.get("kill_reason")), ended.user_attrs.get(
        "kill_reason"
    )
    retries = retries_of(trials, number)
    assert [r.state for r in retries] == [TrialState.COMPLETE], (
        f"retries of {number}: {[(r.number, r.state.name) for r in retries]}"
    )
    assert [t.number for t in trials if t.state == TrialState.RUNNING] == []
    assert all(
        any(t.user_attrs.get(tag) for tag in END_TAGS)
        for t in trials
        if t.state != TrialState.COMPLETE
    )
    print(
        f"MULTIHOST-FIGURE liveness {url.split(':')[0]}: trial ended {t_ended - t_fault:.1f}s after its launcher died "
        f"(interval {INTERVAL}s, grace {GRACE}s, includes launcher B's start)"
    )
    assert t_ended - t_fault <= DETECTION_LIMIT_S + 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_liveness_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    _check_detection(url, url, tmp_path)


@pytest.mark.postgres
def test_liveness_postgresql(tmp_path, postgres_url):
    _check_detection(postgres_url, postgres_url, tmp_path)


@pytest.mark.mysql
def test_liveness_mariadb(tmp_path, mysql_url):
    _check_detection(mysql_url, mysql_url, tmp_path)


def test_liveness_journal_file(tmp_path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = tmp_path / "study.log"
    _check_detection(f"journal:///{path}", JournalStorage(JournalFileBackend(str(path))), tmp_path)


@pytest.fixture()
def redis_url() -> Iterator[str]:
    """The machine's Redis with a journal prefix of the test's own; its keys are deleted after."""
    redis = pytest.importorskip("redis")
    prefix = f"og-liveness-{uuid.uuid4().hex[:10]}"
    yield f"redis://127.0.0.1:6379/0?prefix={prefix}"
    client = redis.Redis(host="127.0.0.1", port=6379, db=0)
    keys = list(client.scan_iter(f"{prefix}*"))
    if keys:
        client.delete(*keys)


def test_liveness_redis_journal(tmp_path, redis_url):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalRedisBackend

    prefix = redis_url.split("prefix=")[1]
    base = redis_url.split("?")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        reader = JournalStorage(JournalRedisBackend(base, prefix=prefix))
    _check_detection(redis_url, reader, tmp_path)


@pytest.fixture()
def grpc_proxy(tmp_path) -> Iterator[str]:
    """``optuna-guard storage-proxy`` in front of a SQLite file, stopped with SIGTERM afterwards."""
    pytest.importorskip("grpc")
    port = _free_port()
    log = open(tmp_path / "proxy.log", "ab")  # noqa: SIM115 (the proxy writes to it until the fixture ends)
    proc = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "optuna_guard.cli",
            "storage-proxy",
            "--storage",
            f"sqlite:///{tmp_path / 'behind-proxy.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=_env(tmp_path),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def listening() -> bool:
            assert proc.poll() is None, (
                f"storage-proxy exited {proc.returncode}: {(tmp_path / 'proxy.log').read_text()}"
            )
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        _wait("the storage proxy to listen", listening, timeout=60)
        yield f"grpc://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def test_liveness_grpc_proxy(tmp_path, grpc_proxy):
    from optuna.storages import GrpcStorageProxy

    host, port = grpc_proxy.removeprefix("grpc://").split(":")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = GrpcStorageProxy(host=host, port=int(port))
    _check_detection(grpc_proxy, reader, tmp_path)
