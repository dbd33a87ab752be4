"""``optuna-guard storage-proxy``: Optuna's gRPC storage proxy in front of a database.

    optuna-guard storage-proxy --storage URL [--host H] [--port P] [--threads N]

Many workers (``--storage grpc://H:P``) then share the proxy's few database connections instead
of each holding its own (PostgreSQL allows 100 by default). The proxy is Optuna's own server
(what ``optuna.storages.run_grpc_proxy_server`` runs, assembled here from the same parts so that
it can be stopped and report the port it bound): the database behind it is wrapped in ResilientStorage, so a database restart is
ridden out for up to ``--storage-deadline`` seconds while clients wait, instead of every
client seeing errors. SIGTERM or SIGINT stop it cleanly: no new calls, calls in flight get
``--stop-grace`` seconds, exit 0. It prints ``listening on grpc://HOST:PORT`` once it serves
(``--port 0`` picks a free port). Exit codes: 0 stopped by a signal, 1 storage unreachable
past the deadline, 2 bad input (not a database URL, port taken, grpcio missing).
"""

from __future__ import annotations

import argparse
import signal
import threading
import warnings
from typing import Any

from optuna_guard._logging import get_logger
from optuna_guard.exceptions import ConfigError

_log = get_logger(__name__)

DEFAULT_PORT = 13000


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "storage-proxy",
        help="serve Optuna's gRPC storage proxy in front of a database (for many workers)",
        description="Serve Optuna's gRPC storage proxy in front of a database URL; workers use --storage grpc://HOST:PORT.",
    )
    parser.add_argument(
        "--storage",
        required=True,
        metavar="URL",
        help="database URL behind the proxy (postgresql+psycopg://..., mysql+pymysql://..., sqlite:///...)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        metavar="H",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for other hosts)",
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        metavar="P",
        help=f"port (default {DEFAULT_PORT}; 0 picks a free one)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=10,
        metavar="N",
        help="calls served at once (default 10, Optuna's default)",
    )
    parser.add_argument(
        "--storage-deadline",
        type=float,
        default=300.0,
        metavar="S",
        help="seconds a database outage is ridden out before calls fail (default 300)",
    )
    parser.add_argument(
        "--stop-grace",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds calls in flight get to finish on SIGTERM (default 5)",
    )
    parser.set_defaults(func=run)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--port must be a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"--port must be between 0 and 65535, got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"--threads must be a positive whole number, got {text!r}"
        )
    return value


def _open_backend(url: str, deadline_s: float) -> Any:
    from optuna_guard._storage_urls import is_rdb_url
    from optuna_guard.resilience import ResilientStorage, StorageRetrySettings
    from optuna_guard.supervisor._study import mask_url, open_checked_storage, probe_connection

    if not is_rdb_url(url):
        raise ConfigError(
            f"--storage {mask_url(url)}: the proxy serves a database (postgresql, mysql, sqlite URL); "
            "Optuna's proxy does not support journal storages (optuna issue #6084)."
        )
    probe_connection(url, 5.0, deadline_s)
    storage = open_checked_storage(url, deadline_s=deadline_s)
    return ResilientStorage(storage, StorageRetrySettings(deadline_s=deadline_s))


def run(args: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from optuna_guard.supervisor._study import mask_url

    if args.storage_deadline < 0 or args.stop_grace < 0:
        raise ConfigError("--storage-deadline and --stop-grace must be >= 0 seconds.")
    try:
        import grpc
        from optuna.storages._grpc.auto_generated import api_pb2_grpc
        from optuna.storages._grpc.servicer import OptunaStorageProxyService
    except ImportError:
        raise ConfigError(
            "storage-proxy needs grpcio and protobuf; pip install 'optuna-guard[grpc]'."
        ) from None
    backend = _open_backend(args.storage, args.storage_deadline)
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        from optuna_guard._storage_urls import GRPC_SERVER_OPTIONS

        # accepts the clients' keepalive pings (they detect a dead connection in seconds)
        server = grpc.server(
            ThreadPoolExecutor(max_workers=args.threads), options=list(GRPC_SERVER_OPTIONS)
        )
        # generated by grpc_tools without annotations
        api_pb2_grpc.add_StorageServiceServicer_to_server(  # type: ignore[no-untyped-call]
            OptunaStorageProxyService(backend), server
        )
    try:
        port = server.add_insecure_port(f"{args.host}:{args.port}")
    except RuntimeError as exc:  # grpc: "Failed to bind to address"
        port = 0
        _log.debug("bind failed: %s", exc)
    if not port:
        _close(backend)
        raise ConfigError(
            f"cannot listen on {args.host}:{args.port}; is the port taken or the address not local?"
        )
    stopping = threading.Event()

    def stop(signum: int, _frame: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            _log.info(
                "Signal %d: stopping the storage proxy (calls in flight get %.0f s).",
                signum,
                args.stop_grace,
            )
            threading.Thread(target=server.stop, args=(args.stop_grace,), daemon=True).start()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        _log.info(
            "Storage proxy for %s listening on %s:%d.", mask_url(args.storage), args.host, port
        )
        print(f"listening on grpc://{args.host}:{port}", flush=True)
        server.wait_for_termination()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _close(backend)
    _log.info("Storage proxy stopped.")
    return 0


def _close(backend: Any) -> None:
    rdb = getattr(backend, "_rdb", None)
    engine = getattr(rdb, "engine", None)
    if engine is not None:
        engine.dispose()
