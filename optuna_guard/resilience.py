"""Surviving a study database that goes away for a while (restart, failover, dropped links).

Optuna's RDBStorage turns a dropped connection into an exception, and an exception in a
worker's ``tell`` loses the trial's result. :class:`ResilientStorage` wraps the storage and
retries calls that failed for transient reasons (connection refused or reset, server shutting
down or starting up, SQLite busy) with exponential backoff and jitter until a deadline, logging
when the outage began and how long it lasted. Anything else (a finished trial, a bad value, a
missing study) is raised at once.

A write whose connection dropped may have committed before the reply was lost, so a retry must
not do it twice or fail because it already happened:

* ``set_trial_state_values`` to a finished state: if the retry finds the trial already in that
  state with the same values, that is success (the result is not lost, nothing is raised);
* ``create_new_trial`` (RUNNING): the trial is created with a start time to the microsecond
  chosen here, so a retry finds the trial its first attempt made (RUNNING, that start time, the
  same params, no intermediate values) instead of creating a second one that would stay RUNNING
  forever. Nothing extra is written to the trial. A storage that keeps start times to the second
  only (MySQL's DATETIME) matches only trials tagged with this process's pid and host (the
  launcher's workers create their trials so); otherwise the retry creates a new trial and logs
  that the first may stay RUNNING until a stale-trial check fails it;
* ``set_trial_state_values(RUNNING)`` (taking a WAITING trial): a retry that finds the trial
  already RUNNING cannot tell whether this process or another took it; it reports "not taken"
  and records one heartbeat for the trial, so if it was ours Optuna's stale-trial check fails
  it after the grace period instead of leaving it RUNNING;
* ``create_new_study`` / ``delete_study``: "already exists" / "not found" after a lost reply
  mean the first attempt worked.

Attribute, param, intermediate-value and heartbeat writes are upserts in RDBStorage, safe to
repeat as they are.

The wrapper behaves as the storage it wraps for Optuna: it pickles and deep-copies (a Study on it
can go to a ProcessPoolExecutor; the copy gets fresh outage bookkeeping and no ``on_outage``
listener, which may not pickle), and attribute writes such as ``storage.heartbeat_interval = 1``
land on the wrapped storage.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import errno
import math
import os
import random
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Container, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.study._frozen import FrozenStudy
from optuna.study._study_direction import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from optuna_guard._logging import get_logger
from optuna_guard.exceptions import ConfigError, StorageUnavailableError

_log = get_logger(__name__)

__all__ = [
    "ENV_DEADLINE",
    "ResilientStorage",
    "StorageRetrySettings",
    "call_with_retry",
    "is_permanent_storage_error",
    "is_transient_db_error",
]

T = TypeVar("T")

ENV_DEADLINE = "OPTUNA_GUARD_STORAGE_DEADLINE_S"


def _non_negative(name: str, value: Any, *, positive: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        kind = "a positive number" if positive else "a number >= 0"
        raise ConfigError(f"{name} must be {kind} of seconds but got {value!r}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StorageRetrySettings:
    """How long and how often a transient storage error is retried, with exponential backoff.

    These are the backoff settings of :class:`ResilientStorage` and :func:`call_with_retry`
    (one storage call retried), not :class:`optuna_guard.RetryPolicy` (a failed trial queued
    again). The k-th wait is ``min(max_backoff_s, initial_backoff_s * 2**(k-1))`` scaled by a
    random factor in [0.5, 1) (so workers that lost the database together do not reconnect in
    lock step), never past ``deadline_s`` after the first failure of the call.

    ``RetrySettings``, its earlier name, is a deprecated alias (a DeprecationWarning on
    import).

    Args:
        deadline_s: Seconds after a call's first failure past which it is not retried any more
            and :class:`~optuna_guard.StorageUnavailableError` is raised; ``>= 0``.
        initial_backoff_s: The first wait in seconds; ``> 0``.
        max_backoff_s: The longest wait in seconds; ``>= initial_backoff_s``.
        clock: Monotonic clock in seconds (for tests).
        sleep: Sleeps the given seconds (for tests).
        random: Returns a number in [0, 1) for the jitter (for tests).

    Raises:
        ConfigError: A value is not a finite number in its range.
    """

    deadline_s: float = 300.0
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 15.0
    clock: Callable[[], float] = dataclasses.field(
        default=time.monotonic, repr=False, compare=False
    )
    sleep: Callable[[float], None] = dataclasses.field(
        default=time.sleep, repr=False, compare=False
    )
    random: Callable[[], float] = dataclasses.field(
        default=random.random, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        _non_negative("deadline_s", self.deadline_s)
        _non_negative("initial_backoff_s", self.initial_backoff_s, positive=True)
        _non_negative("max_backoff_s", self.max_backoff_s, positive=True)
        if self.max_backoff_s < self.initial_backoff_s:
            raise ConfigError(
                f"max_backoff_s ({self.max_backoff_s!r}) must not be below initial_backoff_s ({self.initial_backoff_s!r})."
            )

    @classmethod
    def from_env(cls, **overrides: Any) -> StorageRetrySettings:
        """The defaults, then ``OPTUNA_GUARD_STORAGE_DEADLINE_S`` from the environment, then
        ``overrides``.

        The variable is for a user's own processes (the launcher passes its workers the
        deadline in their settings, not through it).

        Args:
            **overrides: Fields to set, as for the constructor; they win over the variable.

        Returns:
            The settings.

        Raises:
            ConfigError: The variable is not a number, or a value is out of range.
        """
        raw = os.environ.get(ENV_DEADLINE)
        if raw is not None and "deadline_s" not in overrides:
            try:
                overrides["deadline_s"] = float(raw)
            except ValueError:
                raise ConfigError(f"{ENV_DEADLINE}={raw!r} is not a number of seconds.") from None
        return cls(**overrides)

    def backoff(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th consecutive failure.

        Args:
            failures: Consecutive failures so far, 1-based.

        Returns:
            The wait in seconds, jittered.
        """
        base = min(self.max_backoff_s, self.initial_backoff_s * 2 ** min(failures - 1, 60))
        return float(base * (0.5 + 0.5 * self.random()))


if TYPE_CHECKING:
    RetrySettings = StorageRetrySettings  # deprecated alias (see __getattr__ below)
else:

    def __getattr__(name: str) -> Any:
        """``RetrySettings``: the deprecated name of :class:`StorageRetrySettings`."""
        if name == "RetrySettings":
            warnings.warn(
                "optuna_guard.resilience.RetrySettings is deprecated; use "
                "StorageRetrySettings (the same class).",
                DeprecationWarning,
                stacklevel=2,
            )
            return StorageRetrySettings
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- which errors are transient, which are permanent ------------------------------------------

_TRANSIENT_DBAPI_NAMES = {"OperationalError", "InterfaceError"}
_TRANSIENT_DBAPI_MODULES = (
    "psycopg",
    "psycopg2",
    "pymysql",
    "MySQLdb",
    "mysql",
    "asyncpg",
    "pg8000",
)
# SQLite reports most permanent problems as OperationalError too; only these pass with time.
_SQLITE_TRANSIENT = ("database is locked", "database table is locked", "busy", "disk i/o error")
# Messages of errors that waiting does not fix: a wrong schema, a wrong name, wrong credentials,
# a host name that does not resolve. Everything else an OperationalError says (connection
# refused/reset/terminated, too many clients, starting up, shutting down, lock wait timeout,
# deadlock) passes with time.
_PERMANENT_HINTS = (
    "no such table",
    "no such column",
    "syntax error",
    "does not exist",
    "permission denied",
    "password authentication failed",
    "no password supplied",
    "authentication failed",
    "unknown database",
    "access denied",
    "could not translate host name",
    "name or service not known",
    "nodename nor servname",
    "unknown mysql server host",
    "unknown host",
    "invalid dsn",
    "invalid connection option",
    "wrongpass",
    "noauth",
    "invalid password",
    "db index is out of range",
)
# A resolver that is down right now (EAI_AGAIN) is not the same as a name that does not exist.
_TRANSIENT_OVERRIDES = ("temporary failure in name resolution", "try again")
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNREFUSED",
        "ECONNRESET",
        "ECONNABORTED",
        "EPIPE",
        "ETIMEDOUT",
        "ENETUNREACH",
        "EHOSTUNREACH",
        "ENETDOWN",
        "EHOSTDOWN",
        "ENETRESET",
        "ENOTCONN",
    )
    if hasattr(errno, name)
)
_GRPC_TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED")
_GRPC_PERMANENT = ("UNAUTHENTICATED", "PERMISSION_DENIED", "UNIMPLEMENTED")
# What a storage proxy answers when its own database failed: UNKNOWN with the server's
# exception text; these words say the database, not the request, is the problem.
_GRPC_UNKNOWN_TRANSIENT = (
    "connection",
    "server closed",
    "starting up",
    "shutting down",
    "too many",
    "timeout",
    "timed out",
    "terminating",
    "database is locked",
    "could not connect",
    "lock wait",
    "deadlock",
    "storage unreachable",  # a proxy whose own ResilientStorage gave up (StorageUnavailableError)
)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 12:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _text(exc: BaseException) -> str:
    return " ".join(str(exc).split()).lower()


def _says_permanent(text: str) -> bool:
    return any(hint in text for hint in _PERMANENT_HINTS) and not any(
        hint in text for hint in _TRANSIENT_OVERRIDES
    )


def _grpc_code(exc: BaseException) -> str | None:
    """The status code name of a ``grpc.RpcError`` (None for anything else)."""
    if "grpc" not in sys.modules or not isinstance(exc, sys.modules["grpc"].RpcError):
        return None
    code = getattr(exc, "code", None)
    try:
        status = code() if callable(code) else None
    except Exception:
        return None
    return getattr(status, "name", None)


def _grpc_details(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    try:
        return " ".join(str(details() if callable(details) else "").split()).lower()
    except Exception:
        return ""


def _grpc_unresolvable(details: str) -> bool:
    """gRPC's own resolver: "DNS resolution failed" / "errors resolving host: ... Domain name not found"."""
    unresolved = "dns resolution failed" in details or "domain name not found" in details
    return unresolved and not any(hint in details for hint in _TRANSIENT_OVERRIDES)


def _redis_transient(exc: BaseException) -> bool | None:
    if "redis" not in sys.modules:
        return None
    r = sys.modules["redis"].exceptions
    if isinstance(
        exc,
        (
            r.AuthenticationError,
            getattr(r, "AuthorizationError", r.AuthenticationError),
            getattr(r, "NoPermissionError", r.AuthenticationError),
        ),
    ):
        return False
    if isinstance(exc, (r.ConnectionError, r.TimeoutError, r.BusyLoadingError)):
        return not _says_permanent(_text(exc))
    transient_responses = tuple(
        getattr(r, name)
        for name in ("ReadOnlyError", "TryAgainError", "ClusterDownError", "MasterDownError")
        if hasattr(r, name)
    )
    if isinstance(exc, transient_responses):
        return True
    if isinstance(exc, r.RedisError):
        return False
    return None


def _is_transient_one(exc: BaseException) -> bool | None:
    """True/False when this exception decides it, None to look further down the chain."""
    import sqlalchemy.exc as sa_exc

    if isinstance(
        exc, (optuna.exceptions.UpdateFinishedTrialError, optuna.exceptions.DuplicatedStudyError)
    ):
        return False
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, (sa_exc.DisconnectionError, sa_exc.TimeoutError)):
        return True
    if isinstance(
        exc,
        (
            sa_exc.IntegrityError,
            sa_exc.ProgrammingError,
            sa_exc.DataError,
            sa_exc.NotSupportedError,
        ),
    ):
        return False
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
        return _transient_by_message(exc, getattr(exc, "orig", None))
    module = type(exc).__module__.split(".")[0]
    if type(exc).__name__ in _TRANSIENT_DBAPI_NAMES and module in _TRANSIENT_DBAPI_MODULES:
        return _transient_by_message(exc, exc)
    if module == "sqlite3" and type(exc).__name__ == "OperationalError":
        return any(hint in str(exc).lower() for hint in _SQLITE_TRANSIENT)
    code = _grpc_code(exc)
    if code is not None:
        if code in _GRPC_TRANSIENT:
            details = _grpc_details(exc)
            return not (_says_permanent(details) or _grpc_unresolvable(details))
        if code == "UNKNOWN":
            details = _grpc_details(exc)
            return any(
                hint in details for hint in _GRPC_UNKNOWN_TRANSIENT
            ) and not _says_permanent(details)
        return False
    if module == "redis":
        decided = _redis_transient(exc)
        if decided is not None:
            return decided
    if isinstance(exc, socket.gaierror):
        return exc.errno == getattr(socket, "EAI_AGAIN", -3)
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    return None


def _transient_by_message(exc: BaseException, orig: Any) -> bool:
    text = _text(orig if orig is not None else exc)
    if type(orig).__module__.split(".")[0] == "sqlite3":
        return any(hint in text for hint in _SQLITE_TRANSIENT)
    return not _says_permanent(text)


def is_transient_db_error(exc: BaseException) -> bool:
    """True for errors that a working storage would not raise: lost, refused, reset or
    terminated connections, too many clients, a server shutting down or starting up, lock
    timeouts and deadlocks, SQLite busy, gRPC UNAVAILABLE/DEADLINE_EXCEEDED, Redis connection
    errors, timeouts and BusyLoading. Optuna wraps the driver's error in a StorageInternalError,
    so the cause chain is followed."""
    for link in _chain(exc):
        decided = _is_transient_one(link)
        if decided is not None:
            return decided
    return False


def _is_permanent_one(exc: BaseException) -> bool:
    import sqlalchemy.exc as sa_exc

    if isinstance(exc, ConfigError):
        return True
    if isinstance(exc, (ImportError, sa_exc.ArgumentError, sa_exc.NoSuchModuleError)):
        return True  # missing driver, unparseable URL, unknown dialect
    if isinstance(
        exc, (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)
    ):
        return True  # a journal file in a directory that is missing or not ours
    if isinstance(exc, socket.gaierror):
        return exc.errno != getattr(socket, "EAI_AGAIN", -3)
    code = _grpc_code(exc)
    if code is not None:
        return code in _GRPC_PERMANENT or (
            code == "UNAVAILABLE" and _grpc_unresolvable(_grpc_details(exc))
        )
    if type(exc).__module__.split(".")[0] == "redis":
        r = sys.modules["redis"].exceptions
        if isinstance(
            exc, (r.AuthenticationError, getattr(r, "AuthorizationError", r.AuthenticationError))
        ):
            return True
    if isinstance(
        exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.ProgrammingError)
    ) or (type(exc).__module__.split(".")[0] in (*_TRANSIENT_DBAPI_MODULES, "redis")):
        return _says_permanent(_text(exc))
    # e.g. redis: "Redis URL must specify one of the following schemes"
    return isinstance(exc, ValueError) and "url" in _text(exc)


def is_permanent_storage_error(exc: BaseException) -> bool:
    """True when opening or using the storage failed for a reason that waiting will not fix:
    a bad URL or scheme, a missing driver, a host name that does not resolve, failed
    authentication, a missing database. The launcher exits 2 on these instead of retrying.
    An error can be neither permanent nor transient (a bug, a full disk): callers decide."""
    return any(_is_permanent_one(link) for link in _chain(exc))


def _summary(exc: BaseException) -> str:
    # Optuna's StorageInternalError says "invalid data in the commit"; the driver's error
    # under it ("server closed the connection unexpectedly") is the informative one.
    for link in _chain(exc):
        text = " ".join(str(link).split())
        if text and not isinstance(link, optuna.exceptions.StorageInternalError):
            return f"{type(link).__name__}: {text[:200]}"
    return f"{type(exc).__name__}: {exc}"


# -- outage bookkeeping -----------------------------------------------------------------------

OutageListener = Callable[[str, float, str], None]  # (event "began"|"ended", seconds, what)


class _OutageTracker:
    """One outage at a time per storage: logged once when it begins and once when it ends,
    however many threads (trial, heartbeat) hit it."""

    def __init__(self, listener: OutageListener | None = None) -> None:
        self._lock = threading.Lock()
        self._started: float | None = None
        self._ended: float | None = None
        self.outages = 0
        self.listener = listener

    @property
    def in_outage(self) -> bool:
        return self._started is not None

    def seconds_since_end(self, clock: Callable[[], float]) -> float | None:
        return None if self._ended is None else clock() - self._ended

    def failed(self, what: str, exc: BaseException, settings: StorageRetrySettings) -> None:
        with self._lock:
            if self._started is not None:
                return
            self._started = settings.clock()
            self.outages += 1
        _log.warning(
            "Storage outage began: %s failed with %s; retrying with backoff for up to %.0f s.",
            what,
            _summary(exc),
            settings.deadline_s,
        )
        self._notify("began", 0.0, what)

    def recovered(self, what: str, settings: StorageRetrySettings) -> None:
        with self._lock:
            if self._started is None:
                return
            now = settings.clock()
            seconds = now - self._started
            self._started = None
            self._ended = now
        _log.warning("Storage back after %.1f s (%s succeeded).", seconds, what)
        self._notify("ended", seconds, what)

    def _notify(self, event: str, seconds: float, what: str) -> None:
        if self.listener is not None:
            try:
                self.listener(event, seconds, what)
            except Exception:  # a broken listener must not turn an outage into a crash
                _log.exception("Storage outage listener failed.")


_DEFAULT_TRACKER = _OutageTracker()
_RAISE = object()


class _Attempts:
    failures = 0


def _retry(
    call: Callable[[], T],
    settings: StorageRetrySettings,
    what: str,
    tracker: _OutageTracker,
    resolve: Callable[[BaseException], Any] | None = None,
    attempts: _Attempts | None = None,
) -> T:
    """Run ``call`` until it succeeds, retrying transient errors until the deadline.

    After a transient failure, a non-transient error may be the echo of the first attempt
    having committed; ``resolve(exc)`` may then turn it into a result (or return _RAISE)."""
    attempts = attempts or _Attempts()
    started = settings.clock()
    while True:
        try:
            result = call()
        except BaseException as exc:
            if not is_transient_db_error(exc):
                if attempts.failures and isinstance(exc, Exception):
                    tracker.recovered(what, settings)  # a real answer: the database is back
                    if resolve is not None:
                        outcome = resolve(exc)
                        if outcome is not _RAISE:
                            return cast(T, outcome)
                raise
            attempts.failures += 1
            tracker.failed(what, exc, settings)
            elapsed = settings.clock() - started
            remaining = settings.deadline_s - elapsed
            if remaining <= 0:
                raise StorageUnavailableError(
                    f"storage unreachable for {elapsed:.1f} s (deadline {settings.deadline_s:g} s, "
                    f"{ENV_DEADLINE}): {what} failed {attempts.failures} times; last error {_summary(exc)}"
                ) from exc
            delay = min(settings.backoff(attempts.failures), remaining)
            _log.debug(
                "%s failed (%s); retry %d in %.2f s.",
                what,
                _summary(exc),
                attempts.failures,
                delay,
            )
            settings.sleep(delay)
            continue
        if attempts.failures:
            tracker.recovered(what, settings)
        return result


def call_with_retry(
    fn: Callable[..., T],
    *args: Any,
    settings: StorageRetrySettings | None = None,
    what: str | None = None,
    **kwargs: Any,
) -> T:
    """``fn(*args, **kwargs)``, retrying transient database errors with exponential backoff and
    jitter until ``settings.deadline_s``; then StorageUnavailableError. Other errors are raised
    at once. Only for calls that are safe to repeat."""
    return _retry(
        lambda: fn(*args, **kwargs),
        settings or StorageRetrySettings.from_env(),
        what or str(getattr(fn, "__qualname__", "storage call")),
        _DEFAULT_TRACKER,
    )


# -- the storage wrapper ----------------------------------------------------------------------


def _same_values(stored: Sequence[float] | None, wanted: Sequence[float] | None) -> bool:
    if wanted is None:
        return True
    if stored is None or len(stored) != len(wanted):
        return False
    return all(
        a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(stored, map(float, wanted))
    )


class ResilientStorage(BaseStorage):
    """An Optuna storage that forwards every call to ``storage``, retrying transient database
    errors (see :func:`is_transient_db_error`) with backoff until ``settings.deadline_s``.

    When the wrapped storage supports heartbeats, so does the wrapper
    (``isinstance(..., BaseHeartbeat)``), so ``study.optimize`` keeps Optuna's heartbeat and
    stale-trial handling. Writes that may have committed before a lost reply are retried so that
    they neither happen twice nor fail (see the module docstring).

    Example:
        .. code-block:: python

            storage = ResilientStorage("postgresql://...", StorageRetrySettings(deadline_s=300))
            study = optuna.create_study(storage=storage, study_name="s", load_if_exists=True)

    Args:
        storage: An RDBStorage (wrapped in Optuna's cache like ``create_study`` would do),
            another BaseStorage, or a URL (opened with
            :func:`optuna_guard.storage.open_storage`). A ResilientStorage is unwrapped.
        settings: How long and how often to retry; by default
            :meth:`StorageRetrySettings.from_env`.
        idempotent_create: Make a retried ``create_new_trial`` find the trial its lost first
            attempt created instead of creating a second one.
        on_outage: Called as ``on_outage(event, seconds, what)`` with ``"began"`` when a call
            first fails and ``"ended"`` when calls succeed again.

    Raises:
        ConfigError: ``storage`` is neither an Optuna storage nor a storage URL.
        StorageUnavailableError: (from any call) the database stayed unreachable past
            ``settings.deadline_s``.
    """

    # The wrapper's own attributes; any other attribute write goes to the wrapped storage.
    _OWN_ATTRS = frozenset({"_storage", "_rdb", "settings", "idempotent_create", "_tracker"})

    def __new__(
        cls, storage: Any = None, settings: StorageRetrySettings | None = None, **_kwargs: Any
    ) -> ResilientStorage:
        # ``storage`` is optional so that pickle and copy can make an empty instance.
        if cls is ResilientStorage and _supports_heartbeat(storage):
            cls = _ResilientHeartbeatStorage
        return super().__new__(cls)

    def __init__(
        self,
        storage: BaseStorage | str,
        settings: StorageRetrySettings | None = None,
        *,
        idempotent_create: bool = True,
        on_outage: OutageListener | None = None,
    ) -> None:
        if isinstance(storage, str):
            from optuna_guard.storage import open_storage

            storage = open_storage(storage)
        if isinstance(storage, ResilientStorage):
            storage = storage._storage
        if not isinstance(storage, BaseStorage):
            raise ConfigError(f"ResilientStorage wraps an Optuna storage but got {storage!r}.")
        self._rdb: RDBStorage | None = None
        if isinstance(storage, RDBStorage):
            self._rdb = storage
            storage = _CachedStorage(storage)
        elif isinstance(storage, _CachedStorage):
            self._rdb = storage._backend
        self._storage: BaseStorage = storage
        self.settings = settings or StorageRetrySettings.from_env()
        self.idempotent_create = idempotent_create
        self._tracker = _OutageTracker(on_outage)

    def __repr__(self) -> str:
        return f"ResilientStorage({self._storage!r}, {self.settings!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_tracker"]  # a lock and a listener that may be a closure
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__["_tracker"] = _OutageTracker()

    def __setattr__(self, name: str, value: Any) -> None:
        """``storage.heartbeat_interval = 1`` must reach the storage that beats, not the wrapper."""
        if name not in self._OWN_ATTRS and "_storage" in self.__dict__:
            for target in (self.__dict__["_storage"], self.__dict__.get("_rdb")):
                if target is not None and hasattr(target, name):
                    setattr(target, name, value)
                    return
        object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        """Anything we do not wrap (``engine``, ``url``, ...) comes from the wrapped storage."""
        if name.startswith("__") or name in ("_storage", "_rdb"):
            raise AttributeError(name)
        try:
            return getattr(self.__dict__["_storage"], name)
        except (KeyError, AttributeError):
            rdb = self.__dict__.get("_rdb")
            if rdb is not None and hasattr(rdb, name):
                return getattr(rdb, name)
            raise AttributeError(
                f"{type(self).__name__!r} object has no attribute {name!r}"
            ) from None

    @property
    def wrapped(self) -> BaseStorage:
        return self._storage

    @property
    def outages(self) -> int:
        """How many outages this storage has seen (for status lines and tests)."""
        return self._tracker.outages

    def _call(
        self,
        what: str,
        fn: Callable[..., T],
        *args: Any,
        resolve: Any = None,
        attempts: _Attempts | None = None,
        **kwargs: Any,
    ) -> T:
        return _retry(
            lambda: fn(*args, **kwargs), self.settings, what, self._tracker, resolve, attempts
        )

    # -- studies --

    def create_new_study(
        self, directions: Sequence[StudyDirection], study_name: str | None = None
    ) -> int:
        def resolve(exc: BaseException) -> Any:
            if isinstance(exc, optuna.exceptions.DuplicatedStudyError) and study_name is not None:
                return self.get_study_id_from_name(study_name)  # our first attempt made it
            return _RAISE

        return self._call(
            f"create_new_study({study_name!r})",
            self._storage.create_new_study,
            directions,
            study_name,
            resolve=resolve,
        )

    def delete_study(self, study_id: int) -> None:
        def resolve(exc: BaseException) -> Any:
            return None if isinstance(exc, KeyError) else _RAISE

        self._call(
            f"delete_study({study_id})", self._storage.delete_study, study_id, resolve=resolve
        )

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._call("set_study_user_attr", self._storage.set_study_user_attr, study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._call(
            "set_study_system_attr", self._storage.set_study_system_attr, study_id, key, value
        )

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._call(
            "get_study_id_from_name", self._storage.get_study_id_from_name, study_name
        )

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._call("get_study_name_from_id", self._storage.get_study_name_from_id, study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._call("get_study_directions", self._storage.get_study_directions, study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._call("get_study_user_attrs", self._storage.get_study_user_attrs, study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._call("get_study_system_attrs", self._storage.get_study_system_attrs, study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        return self._call("get_all_studies", self._storage.get_all_studies)

    # -- trials: writes --

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        template = _with_exact_start(template_trial) if self.idempotent_create else template_trial
        if template is None:
            return self._call(
                "create_new_trial", self._storage.create_new_trial, study_id, template_trial
            )
        attempts = _Attempts()

        def attempt() -> int:
            if attempts.failures:
                found = self._find_created_trial(study_id, template)
                if found is not None:
                    return found
            return self._storage.create_new_trial(study_id, template)

        return _retry(attempt, self.settings, "create_new_trial", self._tracker, attempts=attempts)

    def _find_created_trial(self, study_id: int, template: FrozenTrial) -> int | None:
        """The RUNNING trial our first attempt made, recognised by its start time to the
        microsecond and its params; None (create again) when none or several match.

        A storage that keeps start times to the second (MySQL) matches only trials tagged
        with this process's pid and host (the launcher's workers create trials with those
        tags), so another process's new trial is never taken for ours."""
        running = self._storage.get_all_trials(
            study_id, deepcopy=False, states=(TrialState.RUNNING,)
        )
        fresh = [t for t in running if t.params == template.params and not t.intermediate_values]
        matches = [t for t in fresh if t.datetime_start == template.datetime_start]
        started = template.datetime_start
        lossy = (
            started is not None
            and not matches
            and any(
                t.datetime_start is not None
                and t.datetime_start.microsecond == 0
                and t.datetime_start == started.replace(microsecond=0)
                for t in fresh
            )
        )
        if lossy and started is not None:
            from optuna_guard import tags

            matches = [
                t
                for t in fresh
                if t.datetime_start == started.replace(microsecond=0)
                and t.user_attrs.get(tags.WORKER_PID) == os.getpid()
                and t.user_attrs.get(tags.HOSTNAME) == socket.gethostname()
            ]
        if len(matches) == 1:
            _log.info(
                "Trial %d was created before the connection dropped; using it.", matches[0].number
            )
            return matches[0]._trial_id
        if matches or lossy:
            _log.warning(
                "create_new_trial: cannot tell whether the attempt before the outage created a trial "
                "(%s); creating another. An extra RUNNING trial, if any, is failed by the stale-trial check.",
                "several candidates" if matches else "the storage keeps start times to the second",
            )
        return None

    def set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: optuna.distributions.BaseDistribution,
    ) -> None:
        self._call(
            "set_trial_param",
            self._storage.set_trial_param,
            trial_id,
            param_name,
            param_value_internal,
            distribution,
        )

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        what = f"set_trial_state_values(trial id {trial_id}, {state.name})"

        def resolve(exc: BaseException) -> Any:
            if (
                not isinstance(exc, optuna.exceptions.UpdateFinishedTrialError)
                or not state.is_finished()
            ):
                return _RAISE
            stored = self.get_trial(trial_id)
            if stored.state == state and _same_values(stored.values, values):
                _log.info(
                    "Trial %d was already %s with these values: the write before the outage committed.",
                    stored.number,
                    state.name,
                )
                return True
            return _RAISE

        attempts = _Attempts()
        done = self._call(
            what,
            self._storage.set_trial_state_values,
            trial_id,
            state,
            values,
            resolve=resolve,
            attempts=attempts,
        )
        if not done and state == TrialState.RUNNING and attempts.failures:
            self._orphan_guard(trial_id)
        return done

    def _orphan_guard(self, trial_id: int) -> None:
        """A WAITING trial we may have taken just before the connection dropped: give it one
        heartbeat so that, if nobody runs it, the stale-trial check fails it."""
        if isinstance(self, BaseHeartbeat) and self.get_heartbeat_interval() is not None:
            try:
                self.record_heartbeat(trial_id)
            except Exception:
                pass
            _log.warning(
                "Trial id %d was taken by this or another worker while the storage was away; if it was "
                "this one, the stale-trial check will fail it after the grace period.",
                trial_id,
            )
        else:
            _log.warning(
                "Trial id %d was taken by this or another worker while the storage was away; without "
                "a heartbeat it may stay RUNNING if it was this one.",
                trial_id,
            )

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        self._call(
            "set_trial_intermediate_value",
            self._storage.set_trial_intermediate_value,
            trial_id,
            step,
            intermediate_value,
        )

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._call("set_trial_user_attr", self._storage.set_trial_user_attr, trial_id, key, value)

    def set_trial_user_attrs(self, trial_id: int, attrs: Mapping[str, Any]) -> None:
        """Several user attrs in one retried operation (one transaction on RDB storages): the
        guard's end-of-trial tags would otherwise cost a transaction each."""
        from optuna_guard import _attrs

        self._call("set_trial_user_attrs", _attrs.set_user_attrs, self._storage, trial_id, attrs)

    def hold_user_attrs_for_tell(self, trial_id: int, attrs: Mapping[str, Any]) -> bool:
        """Forwarded (nothing is written yet): the wrapped storage writes them in the retried
        ``set_trial_state_values`` that ends the trial (see ``optuna_guard._attrs``)."""
        from optuna_guard import _attrs

        return _attrs.hold_for_tell(self._storage, trial_id, attrs)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._call(
            "set_trial_system_attr", self._storage.set_trial_system_attr, trial_id, key, value
        )

    # -- trials: reads --

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._call(
            "get_trial_id_from_study_id_trial_number",
            self._storage.get_trial_id_from_study_id_trial_number,
            study_id,
            trial_number,
        )

    def get_trial_number_from_id(self, trial_id: int) -> int:
        return self._call(
            "get_trial_number_from_id", self._storage.get_trial_number_from_id, trial_id
        )

    def get_trial_param(self, trial_id: int, param_name: str) -> float:
        return self._call("get_trial_param", self._storage.get_trial_param, trial_id, param_name)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._call("get_trial", self._storage.get_trial, trial_id)

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return self._call(
            "get_all_trials",
            self._storage.get_all_trials,
            study_id,
            deepcopy=deepcopy,
            states=states,
        )

    def get_n_trials(
        self, study_id: int, state: tuple[TrialState, ...] | TrialState | None = None
    ) -> int:
        return self._call("get_n_trials", self._storage.get_n_trials, study_id, state)

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self._call("get_best_trial", self._storage.get_best_trial, study_id)

    def get_trial_params(self, trial_id: int) -> dict[str, Any]:
        return self._call("get_trial_params", self._storage.get_trial_params, trial_id)

    def get_trial_user_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._call("get_trial_user_attrs", self._storage.get_trial_user_attrs, trial_id)

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._call("get_trial_system_attrs", self._storage.get_trial_system_attrs, trial_id)

    def remove_session(self) -> None:
        self._storage.remove_session()

    def check_trial_is_updatable(self, trial_id: int, trial_state: TrialState) -> None:
        self._storage.check_trial_is_updatable(trial_id, trial_state)


def _with_exact_start(template: FrozenTrial | None) -> FrozenTrial | None:
    """The template to create a RUNNING trial from, with a start time to the microsecond that
    a retry can recognise (None for WAITING templates: enqueued trials have no start time)."""
    if template is None:
        now = _unique_now()
        return FrozenTrial(
            number=-1,
            state=TrialState.RUNNING,
            value=None,
            datetime_start=now,
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={},
            system_attrs={},
            intermediate_values={},
            trial_id=-1,
        )
    if template.state != TrialState.RUNNING:
        return None
    if template.datetime_start is None:
        template = copy.copy(template)
        template.datetime_start = _unique_now()
    return template


_last_start = datetime.datetime.min
_start_lock = threading.Lock()


def _unique_now() -> datetime.datetime:
    """Now, but never the same instant twice in this process (threads creating trials
    together), and never on a whole second (so a storage that drops microseconds is noticed)."""
    global _last_start
    with _start_lock:
        now = datetime.datetime.now()
        if now <= _last_start:
            now = _last_start + datetime.timedelta(microseconds=1)
        if now.microsecond == 0:
            now += datetime.timedelta(microseconds=1)
        _last_start = now
        return now


def _supports_heartbeat(storage: Any) -> bool:
    if isinstance(storage, ResilientStorage):
        storage = storage._storage
    return isinstance(storage, BaseHeartbeat)


class _ResilientHeartbeatStorage(ResilientStorage, BaseHeartbeat):
    """The ResilientStorage of a storage with heartbeats (RDBStorage): heartbeats are retried
    too, and a heartbeat that still fails at the deadline is logged, not raised, so Optuna's
    heartbeat thread survives to beat again."""

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self._call(
                f"record_heartbeat(trial id {trial_id})",
                self._heartbeat().record_heartbeat,
                trial_id,
            )
        except StorageUnavailableError as exc:
            _log.error("Heartbeat of trial id %d not recorded: %s", trial_id, exc)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        # Right after an outage every live trial's heartbeat looks old: wait one grace period
        # so live workers beat again before anyone is failed as stale.
        since = self._tracker.seconds_since_end(self.settings.clock)
        if self._tracker.in_outage or (since is not None and since < self._stale_pause_s()):
            return []
        return self._call("_get_stale_trial_ids", self._heartbeat()._get_stale_trial_ids, study_id)

    def _stale_pause_s(self) -> float:
        interval = self.get_heartbeat_interval() or 0
        grace = getattr(self._rdb, "grace_period", None) or 2 * interval
        return float(grace + interval)

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat().get_heartbeat_interval()

    def get_heartbeat_stale_trial_callback(
        self,
    ) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._heartbeat().get_heartbeat_stale_trial_callback()

    def _heartbeat(self) -> BaseHeartbeat:
        storage = self._storage
        assert isinstance(storage, BaseHeartbeat)
        return storage
