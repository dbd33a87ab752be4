"""Optuna's own storage contract (``optuna.testing.pytest_storages.StorageTestCase``, shipped in
the optuna wheel) run against :class:`ResilientStorage` around every storage Optuna has.

Every backend gets a fresh, empty storage per test (the contract counts studies): SQLite and
journal files in tmp_path, a gRPC proxy over a fresh SQLite file on a free loopback port, a unique Redis key prefix (deleted afterwards), and one PostgreSQL
database made for this module whose tables are emptied between tests and dropped at the end.
No test of the contract is excluded: none asserts the storage's concrete class.
"""

from __future__ import annotations

import copy
import os
import pickle
import uuid
from collections.abc import Iterator
from typing import Any

import optuna
import pytest
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages.journal import JournalFileBackend
from optuna.testing.pytest_storages import StorageTestCase

from optuna_guard.resilience import ResilientStorage, StorageRetrySettings

optuna.logging.set_verbosity(optuna.logging.ERROR)
pytestmark = [
    pytest.mark.optuna_contract,
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
]

REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
BACKENDS = [
    "inmemory",
    "sqlite",
    "cached_sqlite",
    "journal_file",
    "journal_redis",
    "grpc_proxy",
    "postgres",
]
FAST_FAIL = StorageRetrySettings(deadline_s=5.0, initial_backoff_s=0.05, max_backoff_s=0.5)


@pytest.fixture(scope="module")
def postgres_contract_url() -> Iterator[str]:
    """A database of its own on the shared server, tables created once, dropped at the end."""
    import sqlalchemy

    name = f"og_contract_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(f"{POSTGRES_SERVER}/test", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        url = f"{POSTGRES_SERVER}/{name}"
        RDBStorage(url).engine.dispose()  # creates the tables
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _empty_postgres(url: str) -> RDBStorage:
    storage = RDBStorage(url, skip_compatibility_check=True, skip_table_creation=True)
    import sqlalchemy

    with storage.engine.begin() as conn:
        tables = [
            t for t in storage.engine.dialect.get_table_names(conn) if t != "alembic_version"
        ]
        conn.execute(
            sqlalchemy.text(
                "TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " RESTART IDENTITY CASCADE"
            )
        )
    return storage


def _redis_backend(prefix: str) -> Any:
    redis = pytest.importorskip("redis")
    from optuna.storages.journal import JournalRedisBackend

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.fail(f"Redis at {REDIS_URL} is not running (the CI machine runs it)")
    return JournalRedisBackend(REDIS_URL, prefix=prefix)


def _delete_redis_keys(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


def _grpc_proxy(tmp_path: Any, request: pytest.FixtureRequest) -> BaseStorage:
    """Optuna's gRPC proxy in front of a fresh SQLite file, on a free loopback port, stopped
    after the test."""
    grpc = pytest.importorskip("grpc")
    from concurrent.futures import ThreadPoolExecutor

    from optuna.storages import GrpcStorageProxy
    from optuna.storages._grpc.auto_generated import api_pb2_grpc
    from optuna.storages._grpc.servicer import OptunaStorageProxyService

    backend = RDBStorage(f"sqlite:///{tmp_path / 'behind_proxy.db'}")
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    api_pb2_grpc.add_StorageServiceServicer_to_server(OptunaStorageProxyService(backend), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    proxy = GrpcStorageProxy(host="127.0.0.1", port=port)

    def stop() -> None:
        proxy.close()
        server.stop(5).wait()
        backend.engine.dispose()

    request.addfinalizer(stop)
    proxy.wait_server_ready(timeout=30)
    return proxy


def make_backend(kind: str, tmp_path: Any, request: pytest.FixtureRequest) -> BaseStorage:
    if kind == "inmemory":
        return optuna.storages.InMemoryStorage()
    if kind == "sqlite":
        return RDBStorage(f"sqlite:///{tmp_path / 'contract.db'}")
    if kind == "cached_sqlite":
        return _CachedStorage(RDBStorage(f"sqlite:///{tmp_path / 'contract.db'}"))
    if kind == "journal_file":
        return JournalStorage(JournalFileBackend(str(tmp_path / "contract.log")))
    if kind == "journal_redis":
        prefix = f"og_contract_{uuid.uuid4().hex}"
        request.addfinalizer(lambda: _delete_redis_keys(prefix))
        return JournalStorage(_redis_backend(prefix))
    if kind == "grpc_proxy":
        return _grpc_proxy(tmp_path, request)
    if kind == "postgres":
        return _empty_postgres(request.getfixturevalue("postgres_contract_url"))
    raise AssertionError(kind)


@pytest.fixture()
def fast_dir(tmp_path: Any) -> Iterator[Any]:
    """A directory in memory (/dev/shm) when there is one: ~440 tests of SQLite and journal
    commits are fsync-bound on a shared disk, and durability is not what they test."""
    import pathlib
    import shutil
    import tempfile

    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    directory = pathlib.Path(tempfile.mkdtemp(prefix="og_contract_", dir="/dev/shm"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, fast_dir: Any) -> Iterator[BaseStorage]:
    backend = make_backend(request.param, fast_dir, request)
    wrapper = ResilientStorage(backend, FAST_FAIL)
    try:
        yield wrapper
    finally:
        rdb = getattr(backend, "_backend", backend)
        if isinstance(rdb, RDBStorage):
            rdb.engine.dispose()


# Not the wrapper's doing: the plain GrpcStorageProxy fails this too (params travel in a protobuf
# map, which does not keep insertion order), depending on the names' hash order.
_PROXY_LOSES_PARAM_ORDER = (
    "Optuna's GrpcStorageProxy does not keep param order (protobuf map); plain proxy fails too"
)


@pytest.fixture(autouse=True)
def _known_proxy_limits(request: pytest.FixtureRequest) -> None:
    callspec = getattr(request.node, "callspec", None)
    if (
        callspec is not None
        and callspec.params.get("storage") == "grpc_proxy"
        and request.node.originalname == "test_get_all_trials_params_order"
    ):
        request.node.add_marker(pytest.mark.xfail(reason=_PROXY_LOSES_PARAM_ORDER, strict=False))


class TestResilientStorageContract(StorageTestCase):
    """All of Optuna's storage tests, unchanged."""


class TestBeyondTheContract:
    """What Optuna's study code also needs from a storage (issue 16, item 4)."""

    def test_deepcopy_keeps_the_data(self, storage: BaseStorage) -> None:
        study_id = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "copied")
        storage.set_study_user_attr(study_id, "k", 1)
        clone = copy.deepcopy(storage)
        assert isinstance(clone, ResilientStorage)
        if not isinstance(
            storage.wrapped, optuna.storages.InMemoryStorage
        ):  # in-memory copies its data
            clone.set_study_user_attr(study_id, "k2", 2)
            assert storage.get_study_user_attrs(study_id) == {"k": 1, "k2": 2}
        assert clone.get_study_user_attrs(study_id)["k"] == 1

    def test_pickle_round_trip_keeps_type_and_settings(self, storage: BaseStorage) -> None:
        restored = pickle.loads(pickle.dumps(storage))
        assert type(restored) is type(storage)
        assert restored.settings == storage.settings

    def test_no_create_token_visible(self, storage: BaseStorage) -> None:
        study = optuna.create_study(storage=storage)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
        study.enqueue_trial({"x": 0.5})
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
        for trial in study.get_trials():
            assert not any(key.startswith("optuna_guard:") for key in trial.system_attrs), (
                trial.system_attrs
            )
            assert not any(
                key.startswith("optuna_guard:")
                for key in storage.get_trial_system_attrs(trial._trial_id)
            )
        pandas = pytest.importorskip("pandas")
        frame: pandas.DataFrame = study.trials_dataframe(attrs=("number", "system_attrs"))
        assert not [c for c in frame.columns if "optuna_guard" in c], list(frame.columns)

    def test_retried_create_finds_the_first_trial(self, storage: BaseStorage) -> None:
        """The first attempt committed, its reply was lost: the retry must adopt that trial,
        not leave it RUNNING forever next to a second one (and without a visible token)."""
        import sqlalchemy.exc as sa_exc

        study = optuna.create_study(storage=storage)
        inner = storage.wrapped
        original = inner.create_new_trial
        calls = {"n": 0}

        def commit_then_drop(*args: Any, **kwargs: Any) -> int:
            calls["n"] += 1
            trial_id = original(*args, **kwargs)
            if calls["n"] == 1:
                raise sa_exc.OperationalError(
                    "COMMIT", {}, ConnectionResetError("server closed the connection")
                )
            return trial_id

        inner.create_new_trial = commit_then_drop  # type: ignore[method-assign]
        trial = study.ask()
        study.tell(trial, 1.0)
        assert calls["n"] == 1
        assert [(t.number, t.state) for t in study.get_trials()] == [
            (0, optuna.trial.TrialState.COMPLETE)
        ]
        assert study.get_trials()[0].system_attrs == {}
