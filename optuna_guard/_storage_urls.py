"""Storage URLs for Optuna's storages that are not databases: the journal (a file or Redis)
and the gRPC storage proxy.

=============================================  ==========================================
URL                                            storage
=============================================  ==========================================
``journal:///abs/path/study.log``              ``JournalStorage(JournalFileBackend(path))``
``redis://host:6379/0`` (``rediss://``)        ``JournalStorage(JournalRedisBackend(url))``
``grpc://host:13000``                          ``GrpcStorageProxy(host=..., port=...)``
=============================================  ==========================================

A ``prefix=NAME`` query parameter on a Redis URL keeps several journals in one Redis database.
Redis connections get connect and read timeouts (``socket_connect_timeout``/``socket_timeout``
in the URL override them) so a partitioned host sees errors that ResilientStorage retries
instead of a read that blocks forever. A relative journal path (``journal://study.log``) is
made absolute by :func:`normalize_url` before workers in other directories see it.

gRPC calls carry HTTP/2 keepalive pings (every ``GRPC_KEEPALIVE_MS``): Optuna's client sets no
deadline, so without them a call whose connection died silently (a partitioned host, a frozen
proxy) waits for the kernel's TCP timeout, about 15 minutes; with them it fails UNAVAILABLE
within seconds and ResilientStorage retries it. ``optuna-guard storage-proxy`` accepts the pings
(:data:`GRPC_SERVER_OPTIONS`); a plain Optuna proxy may answer a long call with "too many pings",
which is retried too.
"""

from __future__ import annotations

import os
import warnings
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import optuna
from optuna.storages import BaseStorage

from optuna_guard.exceptions import ConfigError

JOURNAL_SCHEME = "journal"
REDIS_SCHEMES = ("redis", "rediss")
GRPC_SCHEME = "grpc"
DEFAULT_GRPC_PORT = 13000
REDIS_READ_TIMEOUT_S = 60.0
GRPC_KEEPALIVE_MS = 5_000
GRPC_KEEPALIVE_TIMEOUT_MS = 5_000
GRPC_CLIENT_OPTIONS = (
    ("grpc.max_receive_message_length", -1),  # what Optuna's client sets
    ("grpc.keepalive_time_ms", GRPC_KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", GRPC_KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.ping_timeout_ms", GRPC_KEEPALIVE_TIMEOUT_MS),  # newer gRPC: else 60 s
    ("grpc.keepalive_permit_without_calls", 0),  # only while a call waits: idle workers stay quiet
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5_000),  # back within seconds of the proxy (default 120 s)
)
GRPC_SERVER_OPTIONS = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", GRPC_KEEPALIVE_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
)

__all__ = [
    "KeepaliveGrpcStorageProxy",
    "is_rdb_url",
    "normalize_url",
    "open_url_storage",
    "url_kind",
]


def url_kind(url: str) -> str:
    """``"journal"``, ``"redis"``, ``"grpc"`` or ``"rdb"`` (anything SQLAlchemy may open)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == JOURNAL_SCHEME:
        return "journal"
    if scheme in REDIS_SCHEMES:
        return "redis"
    if scheme == GRPC_SCHEME:
        return "grpc"
    return "rdb"


def is_rdb_url(url: str) -> bool:
    return url_kind(url) == "rdb"


def normalize_url(url: str) -> str:
    """The URL as every worker must see it: a journal file path made absolute."""
    if url_kind(url) != "journal":
        return url
    return f"{JOURNAL_SCHEME}://{os.path.abspath(_journal_path(url))}"


def _journal_path(url: str) -> str:
    path = url.split("://", 1)[1]
    if not path or path.endswith("/"):
        raise ConfigError(
            f"storage URL {url!r} names no journal file; use journal:///absolute/path/study.log"
        )
    return path


def _grpc_address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    try:
        port = parts.port or DEFAULT_GRPC_PORT
    except ValueError:
        port = -1
    if not parts.hostname or port <= 0 or parts.path not in ("", "/"):
        raise ConfigError(
            f"storage URL {url!r} is not a gRPC proxy address; use grpc://host:{DEFAULT_GRPC_PORT}"
        )
    return parts.hostname, port


def _redis_url(url: str, connect_timeout: float) -> tuple[str, str]:
    """The URL for redis-py (timeouts added unless given) and the journal key prefix."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    prefix = query.pop("prefix", "")
    query.setdefault("socket_connect_timeout", f"{connect_timeout:g}")
    query.setdefault("socket_timeout", f"{max(REDIS_READ_TIMEOUT_S, connect_timeout):g}")
    if parts.path not in ("", "/") and not parts.path.lstrip("/").isdigit():
        raise ConfigError(
            f"storage URL {url!r}: the Redis database must be a number, e.g. redis://host:6379/0"
        )
    return urlunsplit(parts._replace(query=urlencode(query))), prefix


def open_url_storage(url: str, *, connect_timeout: float = 5.0) -> BaseStorage:
    """The journal or gRPC storage a non-database URL names (see the module docstring).

    Optuna marks these storages experimental; the warning is silenced here because the user
    chose them by URL. A missing ``redis``/``grpcio`` package is a ConfigError naming the extra.
    """
    kind = url_kind(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if kind == "journal":
            from optuna.storages.journal import JournalFileBackend

            path = _journal_path(url)
            directory = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(directory):
                raise ConfigError(
                    f"storage URL {url!r}: directory {directory!r} does not exist; create it first."
                )
            return optuna.storages.JournalStorage(JournalFileBackend(path))
        if kind == "redis":
            _require("redis", "redis", url)
            from optuna.storages.journal import JournalRedisBackend

            redis_url, prefix = _redis_url(url, connect_timeout)
            return optuna.storages.JournalStorage(JournalRedisBackend(redis_url, prefix=prefix))
        if kind == "grpc":
            _require("grpc", "grpc", url)
            host, port = _grpc_address(url)
            return KeepaliveGrpcStorageProxy(host=host, port=port)
    raise ConfigError(f"storage URL {url!r} is a database URL; open it with open_storage().")


class KeepaliveGrpcStorageProxy(optuna.storages.GrpcStorageProxy):
    """Optuna's GrpcStorageProxy on a channel with keepalive pings: a call whose connection
    died silently fails UNAVAILABLE within seconds (retried by ResilientStorage)."""

    def _setup(self) -> None:
        import grpc
        from optuna.storages._grpc.auto_generated import api_pb2_grpc
        from optuna.storages._grpc.client import GrpcClientCache

        self._channel = grpc.insecure_channel(
            f"{self._host}:{self._port}", options=list(GRPC_CLIENT_OPTIONS)
        )
        # generated by grpc_tools without annotations
        self._stub = api_pb2_grpc.StorageServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._cache = GrpcClientCache(self._stub)


def _require(module: str, extra: str, url: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"storage URL {url.split('://', 1)[0]}://... needs the {module!r} package; "
            f"pip install 'optuna-guard[{extra}]'."
        ) from None
