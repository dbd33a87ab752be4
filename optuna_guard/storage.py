"""Opening study storages safely, and ending a trial from outside the process that runs it.

SQLite is the embedded default: it gets WAL mode and a busy timeout so N local workers do not
die on "database is locked". PostgreSQL and MySQL URLs are passed through to Optuna's RDBStorage.
Read-only commands (``status``, ``report``) load their study through :func:`open_for_reading`,
which never creates a file, table or study and turns every failure into one line.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from optuna_guard._logging import get_logger
from optuna_guard.exceptions import ConfigError

_log = get_logger(__name__)

DEFAULT_SQLITE_FILE = "optuna_guard.db"
SQLITE_BUSY_TIMEOUT_S = 60.0
READ_CONNECT_TIMEOUT_S = 10.0


def default_storage_url(directory: str | os.PathLike[str] | None = None) -> str:
    """The embedded default: a SQLite file in ``directory`` (the current directory by default)."""
    path = os.path.abspath(os.path.join(os.fspath(directory or os.getcwd()), DEFAULT_SQLITE_FILE))
    return f"sqlite:///{path}"


def _enable_sqlite_wal(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    finally:
        cursor.close()


def open_storage(
    url: str | None = None,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    heartbeat_stale_trial_callback: Any = None,
    engine_kwargs: Mapping[str, Any] | None = None,
    skip_setup: bool = False,
) -> optuna.storages.BaseStorage:
    """Open the storage a URL names, made safe for several worker processes.

    Database URLs give an RDBStorage; ``journal:///path/file.log``, ``redis://host:port/db``
    and ``grpc://host:port`` give Optuna's JournalStorage (file or Redis backend) and
    GrpcStorageProxy (see :mod:`optuna_guard._storage_urls`; the heartbeat and engine options
    apply to databases only). SQLite gets WAL mode and a 60 s busy timeout; other databases
    get ``pool_pre_ping``.

    Args:
        url: The storage URL; :func:`default_storage_url` (a SQLite file in the current
            directory) when not given.
        heartbeat_interval: Seconds between trial heartbeats (databases only), None for none.
        grace_period: Seconds without a heartbeat after which a running trial is stale
            (databases only).
        heartbeat_stale_trial_callback: Called by Optuna for each stale trial it fails
            (databases only).
        engine_kwargs: Extra SQLAlchemy ``create_engine`` arguments; for the other URLs only
            ``connect_args["connect_timeout"]`` is read (5 s by default).
        skip_setup: Skip table creation and the schema version check (about a second per
            process): for worker processes of a launcher that already opened the same storage
            normally. Optuna's schema manager (alembic) is then built only if something asks
            for a schema version (:func:`schema_manager_on_demand`).

    Returns:
        An ``RDBStorage``, a ``JournalStorage`` or a ``GrpcStorageProxy``.

    Raises:
        ConfigError: The URL names no storage, is an in-memory SQLite database (which
            worker processes cannot share), or needs a package that is not installed
            (``redis``, ``grpcio``).
    """
    from optuna_guard import _storage_urls

    url = url or default_storage_url()
    if "://" not in url:
        raise ConfigError(
            f"storage URL {url!r} is not a database URL (nor journal, Redis or gRPC); use e.g. sqlite:///study.db, "
            "postgresql+psycopg://user@host/db, journal:///path/study.log, redis://host:6379/0 or grpc://host:13000"
        )
    if not _storage_urls.is_rdb_url(url):
        timeout = dict(dict(engine_kwargs or {}).get("connect_args", {})).get(
            "connect_timeout", 5.0
        )
        return _storage_urls.open_url_storage(
            _storage_urls.normalize_url(url), connect_timeout=float(timeout)
        )
    _check_not_in_memory(url)
    kwargs: dict[str, Any] = dict(engine_kwargs or {})
    is_sqlite = url.startswith("sqlite")
    if is_sqlite:
        connect_args = dict(kwargs.get("connect_args", {}))
        connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_S)
        kwargs["connect_args"] = connect_args
    else:
        kwargs.setdefault("pool_pre_ping", True)
    with schema_manager_on_demand() if skip_setup else contextlib.nullcontext():
        storage = RDBStorage(
            url,
            engine_kwargs=kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=heartbeat_stale_trial_callback,
            skip_compatibility_check=skip_setup,
            skip_table_creation=skip_setup,
        )
    if is_sqlite:
        import sqlalchemy

        sqlalchemy.event.listen(storage.engine, "connect", _enable_sqlite_wal)
        storage.engine.dispose()  # reconnect so every pooled connection gets the pragmas
    return storage


class _OnDemandVersionManager:
    """Optuna's ``_VersionManager``, built on first use. ``RDBStorage()`` builds it even with
    ``skip_compatibility_check`` (it imports alembic, which imports mako and pygments, and reads
    the schema's revision: ~0.2 s of CPU in a fresh process). A storage opened with
    ``skip_setup`` neither upgrades the schema nor asks its version; whatever does
    (``get_current_version``, ``upgrade``, ...) builds the real one then."""

    def __init__(self, eager: Callable[..., Any], *args: Any) -> None:
        self._build: Callable[[], Any] = functools.partial(eager, *args)
        self._manager: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._manager is None:
            self._manager = self._build()
        return getattr(self._manager, name)


_SCHEMA_PATCH_LOCK = threading.RLock()


@contextlib.contextmanager
def schema_manager_on_demand() -> Iterator[None]:
    """While it is open, ``RDBStorage()`` builds Optuna's schema manager only when first used
    (see :class:`_OnDemandVersionManager`). For storages whose tables exist and are checked by
    another open (``skip_compatibility_check`` and ``skip_table_creation``): a storage that
    creates its tables or checks its schema uses the manager at once anyway. The switch is
    Optuna's module attribute: a lock keeps two such opens apart, and a storage another thread
    opens meanwhile with its schema check builds the manager at once as usual."""
    from optuna.storages._rdb import storage as rdb_storage

    with _SCHEMA_PATCH_LOCK:
        eager = rdb_storage._VersionManager
        rdb_storage._VersionManager = functools.partial(_OnDemandVersionManager, eager)  # type: ignore[misc,assignment]
        try:
            yield
        finally:
            rdb_storage._VersionManager = eager  # type: ignore[misc]


def _check_not_in_memory(url: str) -> None:
    """An in-memory SQLite database lives in one connection of one process: workers (and the
    pool's next connection) would each see an empty database of their own."""
    if not url.startswith("sqlite"):
        return
    path = url.split("://", 1)[1].lstrip("/").split("?", 1)[0]
    if path in ("", ":memory:") or path.startswith("file::memory:") or "mode=memory" in url:
        raise ConfigError(
            f"storage URL {url!r} is an in-memory SQLite database, which worker processes can never share; "
            "use a file, e.g. sqlite:///study.db"
        )


def mask_url(url: str) -> str:
    """The storage URL with any password replaced by ``***``, for logs and error messages."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def resolve_url(url: str | None) -> str:
    """The URL as every process must see it: the default SQLite file when none is given, a
    journal path made absolute."""
    from optuna_guard._storage_urls import normalize_url

    return normalize_url(url) if url else default_storage_url()


def first_line(exc: BaseException) -> str:
    """The most specific message in an exception chain (Optuna wraps the driver's error)."""
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_for_reading(
    url: str | None, study_name: str, *, connect_timeout: float = READ_CONNECT_TIMEOUT_S
) -> optuna.Study:
    """Load ``study_name`` for a read-only command: no heartbeat, no table, file or study created.

    ``url`` is any URL :func:`open_storage` takes (default: :func:`default_storage_url`).
    Raises a one-line :class:`ConfigError` (exit code 2) that names the URL (password masked)
    and what to check, for: a URL that names no storage, a missing SQLite or journal file, a
    server that cannot be reached within ``connect_timeout`` seconds, a storage that cannot
    be read, and a study that is not there (the studies that are, listed).
    """
    url = resolve_url(url)
    storage = _open_reader(url, connect_timeout)
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        pass
    except Exception as exc:
        raise _reading_error(url, exc) from None
    try:
        names = sorted(s.study_name for s in storage.get_all_studies())
    except Exception as exc:
        raise _reading_error(url, exc) from None
    known = (", ".join(names[:10]) + (" ..." if len(names) > 10 else "")) if names else "none"
    raise ConfigError(
        f"study {study_name!r} not found in {mask_url(url)}; studies there: {known}. "
        "Check --study-name and --storage."
    )


def _open_reader(url: str, connect_timeout: float) -> optuna.storages.BaseStorage:
    from optuna_guard import _storage_urls

    if "://" not in url:
        raise ConfigError(
            f"storage URL {url!r} is not a database URL (nor journal, Redis or gRPC); use e.g. "
            "sqlite:///study.db, postgresql+psycopg://user@host/db, journal:///path/study.log, "
            "redis://host:6379/0 or grpc://host:13000."
        )
    _check_file_exists(url)
    try:
        if not _storage_urls.is_rdb_url(url):
            storage = _storage_urls.open_url_storage(url, connect_timeout=connect_timeout)
            if isinstance(storage, optuna.storages.GrpcStorageProxy):
                storage.wait_server_ready(timeout=connect_timeout)
            return storage
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
        elif url.startswith(("postgresql", "mysql")):
            kwargs["connect_args"] = {"connect_timeout": max(1, round(connect_timeout))}
        return RDBStorage(url, engine_kwargs=kwargs, skip_table_creation=True)
    except ConfigError:
        raise
    except Exception as exc:
        raise _reading_error(url, exc) from None


def _check_file_exists(url: str) -> None:
    """Reading must not create the file a mistyped path names (SQLite and journals would)."""
    from optuna_guard._storage_urls import url_kind

    if url.startswith("sqlite"):
        path = url.split("://", 1)[1].split("?", 1)[0]
        path = path[1:] if path.startswith("/") else path
        if path in ("", ":memory:") or path.startswith("file::memory:") or "mode=memory" in url:
            raise ConfigError(
                f"storage URL {url!r} is an in-memory SQLite database, which holds no study to "
                "read; pass --storage with the URL the study was run on."
            )
        kind, path = "storage file", path
    elif url_kind(url) == "journal":
        kind, path = "journal file", url.split("://", 1)[1]
    else:
        return
    if not os.path.isfile(path):
        raise ConfigError(
            f"{kind} {path!r} does not exist; pass --storage with the URL the study was run on."
        )


def _reading_error(url: str, exc: BaseException) -> ConfigError:
    """One line for a storage that failed to open or answer: unusable URL, unreachable, unreadable."""
    import sqlalchemy.exc

    from optuna_guard.resilience import is_transient_db_error

    where = mask_url(url)
    if isinstance(exc, ConfigError):
        return exc
    if isinstance(
        exc, (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ImportError)
    ) or (isinstance(exc, ValueError) and not isinstance(exc, sqlalchemy.exc.SQLAlchemyError)):
        return ConfigError(
            f"storage URL {where} is not usable: {first_line(exc)}; check --storage."
        )
    if is_transient_db_error(exc) or isinstance(exc, (TimeoutError, ConnectionError)):
        return ConfigError(
            f"cannot reach storage {where}: {first_line(exc)}; is the server up? check --storage."
        )
    return ConfigError(f"cannot read storage {where}: {first_line(exc)}; check --storage.")


def end_trial_from_outside(
    storage: optuna.storages.BaseStorage,
    trial_id: int,
    state: TrialState,
    user_attrs: Mapping[str, Any] | None = None,
    system_attrs: Mapping[str, Any] | None = None,
) -> bool:
    """Tag a trial and end it in ``state`` if it is still RUNNING; return whether we ended it.

    Tags are written first because Optuna refuses attributes on finished trials. A trial that
    finished meanwhile (the worker won the race) is left as it is: no completed value is lost.
    """
    if state not in (TrialState.PRUNED, TrialState.FAIL):
        raise ValueError(f"state must be PRUNED or FAIL but got {state!r}.")
    try:
        if storage.get_trial(trial_id).state != TrialState.RUNNING:
            return False
        for key, value in (user_attrs or {}).items():
            storage.set_trial_user_attr(trial_id, key, value)
        for key, value in (system_attrs or {}).items():
            storage.set_trial_system_attr(trial_id, key, value)
        values = None
        if state == TrialState.PRUNED:
            values = _last_intermediate_value(storage, trial_id)
        return bool(storage.set_trial_state_values(trial_id, state, values))
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    except RuntimeError as exc:  # older Optuna raised RuntimeError for finished trials
        if "finished" in str(exc).lower():
            return False
        raise


def _last_intermediate_value(
    storage: optuna.storages.BaseStorage, trial_id: int
) -> list[float] | None:
    """Optuna stores a pruned trial's last intermediate value as its value; do the same.

    Only single-objective trials can report intermediate values, so this never applies to
    multi-objective studies.
    """
    frozen = storage.get_trial(trial_id)
    if not frozen.intermediate_values:
        return None
    last = frozen.intermediate_values[max(frozen.intermediate_values)]
    if last is None or (isinstance(last, float) and math.isnan(last)):
        return None
    return [float(last)]
