"""Which storage errors are transient (retried) and which are permanent (launcher exit 2).

Real errors from real drivers where they can be produced cheaply (refused ports, unknown hosts
and databases, bad URLs), hand-made ones for server states a test cannot cause on the shared
servers (too many clients, starting up, lock timeouts)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import optuna
import pytest
import sqlalchemy.exc as sa_exc

from optuna_guard.exceptions import ConfigError, StorageUnavailableError
from optuna_guard.resilience import is_permanent_storage_error, is_transient_db_error

optuna.logging.set_verbosity(optuna.logging.ERROR)


def _raised(fn: Callable[[], Any]) -> BaseException:
    try:
        fn()
    except BaseException as exc:
        return exc
    raise AssertionError("expected an error")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wrapped(inner: BaseException) -> Exception:
    outer = optuna.exceptions.StorageInternalError("An exception is raised during the commit.")
    outer.__cause__ = inner
    return outer


def _op(message: str) -> sa_exc.OperationalError:
    class OperationalError(Exception):
        pass

    OperationalError.__module__ = "psycopg"
    return sa_exc.OperationalError("SELECT 1", {}, OperationalError(message))


def _classified(exc: BaseException) -> tuple[bool, bool]:
    return is_transient_db_error(exc), is_permanent_storage_error(exc)


TRANSIENT, PERMANENT, NEITHER = (True, False), (False, True), (False, False)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_wrapped(_op("FATAL: sorry, too many clients already")), TRANSIENT),
        (_wrapped(_op("(1040, 'Too many connections')")), TRANSIENT),
        (
            _op(
                "FATAL: remaining connection slots are reserved for roles with the SUPERUSER attribute"
            ),
            TRANSIENT,
        ),
        (_op("FATAL: the database system is starting up"), TRANSIENT),
        (_op("FATAL: the database system is shutting down"), TRANSIENT),
        (_op("FATAL: terminating connection due to administrator command"), TRANSIENT),
        (_op("server closed the connection unexpectedly"), TRANSIENT),
        (_op("consuming input failed: Connection reset by peer"), TRANSIENT),
        (_op("(1205, 'Lock wait timeout exceeded; try restarting transaction')"), TRANSIENT),
        (_op("canceling statement due to lock timeout"), TRANSIENT),
        (
            _op("(1213, 'Deadlock found when trying to get lock; try restarting transaction')"),
            TRANSIENT,
        ),
        (
            _op("failed to resolve host 'db': [Errno -3] Temporary failure in name resolution"),
            TRANSIENT,
        ),
        (_wrapped(_op('FATAL: password authentication failed for user "optuna"')), PERMANENT),
        (_op("failed to resolve host 'nohost': [Errno -2] Name or service not known"), PERMANENT),
        (_wrapped(ConnectionResetError("reset")), TRANSIENT),
        (OSError(113, "No route to host"), TRANSIENT),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), PERMANENT),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), TRANSIENT),
        (ModuleNotFoundError("No module named 'psycopg2'"), PERMANENT),
        (ConfigError("storage URL 'x' is not a database URL"), PERMANENT),
        (FileNotFoundError(2, "No such file or directory"), PERMANENT),
        (StorageUnavailableError("storage unreachable for 300 s"), NEITHER),
        (RuntimeError("boom"), NEITHER),
        (optuna.exceptions.UpdateFinishedTrialError("finished"), NEITHER),
    ],
)
def test_classification(error: BaseException, expected: tuple[bool, bool]) -> None:
    assert _classified(error) == expected


def test_redis_errors() -> None:
    redis = pytest.importorskip("redis")
    r = redis.exceptions
    assert (
        _classified(
            r.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        )
        == TRANSIENT
    )
    assert _classified(r.TimeoutError("Timeout reading from socket")) == TRANSIENT
    assert _classified(r.BusyLoadingError("Redis is loading the dataset in memory")) == TRANSIENT
    assert (
        _classified(r.ReadOnlyError("You can't write against a read only replica.")) == TRANSIENT
    )
    assert _classified(_wrapped(r.ConnectionError("Connection closed by server."))) == TRANSIENT
    assert _classified(r.AuthenticationError("invalid username-password pair")) == PERMANENT
    assert _classified(r.ResponseError("WRONGTYPE Operation against a key")) == NEITHER


class _FakeRpcError:
    """A grpc.RpcError as the client stub raises it (code() and details())."""

    @staticmethod
    def make(code_name: str, details: str) -> BaseException:
        grpc = pytest.importorskip("grpc")

        class Error(grpc.RpcError):
            def code(self) -> Any:
                return getattr(grpc.StatusCode, code_name)

            def details(self) -> str:
                return details

        return Error()


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (
            "UNAVAILABLE",
            "failed to connect to all addresses; last error: Connection refused",
            TRANSIENT,
        ),
        ("UNAVAILABLE", "Socket closed", TRANSIENT),
        ("DEADLINE_EXCEEDED", "Deadline Exceeded", TRANSIENT),
        ("RESOURCE_EXHAUSTED", "too many pings", TRANSIENT),
        ("UNKNOWN", "Exception calling application: storage unreachable for 300.0 s", TRANSIENT),
        ("UNKNOWN", "Exception calling application: division by zero", NEITHER),
        ("UNAUTHENTICATED", "bad token", PERMANENT),
        ("UNIMPLEMENTED", "Method not found!", PERMANENT),
        ("UNAVAILABLE", "DNS resolution failed for nohost:13000", PERMANENT),
        ("NOT_FOUND", "study 3", NEITHER),
    ],
)
def test_grpc_errors(code: str, details: str, expected: tuple[bool, bool]) -> None:
    assert _classified(_FakeRpcError.make(code, details)) == expected


def test_real_url_and_driver_errors() -> None:
    assert _classified(_raised(lambda: optuna.storages.RDBStorage("foo://x/y"))) == PERMANENT
    assert _classified(_raised(lambda: optuna.storages.RDBStorage("not a url"))) == PERMANENT
    assert (
        _classified(_raised(lambda: optuna.storages.RDBStorage("postgresql+nodriver://x/y")))
        == PERMANENT
    )


def test_real_redis_errors() -> None:
    pytest.importorskip("redis")
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalRedisBackend

    refused = _raised(
        lambda: JournalStorage(JournalRedisBackend(f"redis://127.0.0.1:{_closed_port()}/0"))
    )
    assert _classified(refused) == TRANSIENT
    unknown_host = _raised(
        lambda: JournalStorage(JournalRedisBackend("redis://nohost.invalid:6379/0"))
    )
    assert _classified(unknown_host) == PERMANENT
    bad_scheme = _raised(lambda: JournalStorage(JournalRedisBackend("redis2://127.0.0.1:6379/0")))
    assert _classified(bad_scheme) == PERMANENT


def test_real_grpc_errors() -> None:
    pytest.importorskip("grpc")
    from optuna.storages import GrpcStorageProxy

    refused = _raised(
        lambda: GrpcStorageProxy(host="127.0.0.1", port=_closed_port()).get_all_studies()
    )
    assert _classified(refused) == TRANSIENT
    unknown_host = _raised(
        lambda: GrpcStorageProxy(host="nohost.invalid", port=13000).get_all_studies()
    )
    assert _classified(unknown_host) == PERMANENT


@pytest.mark.postgres
def test_real_postgres_errors() -> None:
    def open_pg(url: str) -> Any:
        return optuna.storages.RDBStorage(url)

    assert (
        _classified(
            _raised(
                lambda: open_pg(f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/test")
            )
        )
        == TRANSIENT
    )
    assert (
        _classified(
            _raised(lambda: open_pg("postgresql+psycopg://postgres@127.0.0.1/no_such_db_x"))
        )
        == PERMANENT
    )
    assert (
        _classified(_raised(lambda: open_pg("postgresql+psycopg://no_such_role@127.0.0.1/test")))
        == PERMANENT
    )
    assert (
        _classified(_raised(lambda: open_pg("postgresql+psycopg://postgres@nohost.invalid/test")))
        == PERMANENT
    )


@pytest.mark.mysql
def test_real_mysql_errors() -> None:
    def open_my(url: str) -> Any:
        return optuna.storages.RDBStorage(url)

    assert (
        _classified(
            _raised(lambda: open_my(f"mysql+pymysql://root@127.0.0.1:{_closed_port()}/test"))
        )
        == TRANSIENT
    )
    assert (
        _classified(_raised(lambda: open_my("mysql+pymysql://root@127.0.0.1/no_such_db_x")))
        == PERMANENT
    )
    assert (
        _classified(_raised(lambda: open_my("mysql+pymysql://nobody:pw@127.0.0.1/test")))
        == PERMANENT
    )
