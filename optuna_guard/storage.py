"""Opening study storages safely, and ending a trial from outside the process that runs it.

SQLite is the embedded default: it gets WAL mode and a busy timeout so N local workers do not
die on "database is locked". PostgreSQL and MySQL URLs are passed through to Optuna's RDBStorage.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from optuna_guard._logging import get_logger
from optuna_guard.exceptions import ConfigError

_log = get_logger(__name__)

DEFAULT_SQLITE_FILE = "optuna_guard.db"
SQLITE_BUSY_TIMEOUT_S = 60.0


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
    apply to databases only). ``url`` defaults to :func:`default_storage_url`. Raises
    :class:`ConfigError` for a URL that names no storage. ``skip_setup=True`` skips table
    creation and the schema version check (about a second per process): for worker processes
    of a launcher that already opened the same storage normally.
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
