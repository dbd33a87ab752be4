"""A throw-away PostgreSQL cluster for fault tests (never the shared server): initdb + pg_ctl in a
temporary directory, run as user postgres, on a free loopback port. Outages are made with
``ALTER DATABASE ... ALLOW_CONNECTIONS false`` plus ``pg_terminate_backend`` on its own database."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

DB = "faults"


def _bindir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    return os.path.dirname(found[-1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", *args], capture_output=True, text=True, timeout=timeout
    )


class Cluster:
    """A running private cluster; ``url`` points at its database ``faults``."""

    def __init__(self, root: str, port: int) -> None:
        self.root = root
        self.port = port
        self.data = os.path.join(root, "data")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/{DB}"

    def sql(self, statement: str, database: str = "postgres") -> str:
        result = subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-At",
                "-c",
                statement,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def block(self) -> None:
        """Refuse new connections to the study database and drop the existing ones."""
        self.sql(f"ALTER DATABASE {DB} ALLOW_CONNECTIONS false")
        self.drop_connections()

    def drop_connections(self) -> int:
        return len(
            self.sql(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname='{DB}' "
                "AND pid <> pg_backend_pid()"
            ).splitlines()
        )

    def unblock(self) -> None:
        self.sql(f"ALTER DATABASE {DB} ALLOW_CONNECTIONS true")


@contextlib.contextmanager
def private_cluster() -> Iterator[Cluster]:
    """Start a cluster (a few seconds), yield it, and always stop it and remove its files."""
    bindir = _bindir()
    root = tempfile.mkdtemp(prefix="og-pg-")
    os.chmod(root, 0o755)
    shutil.chown(root, "postgres", "postgres")
    port = _free_port()
    cluster = Cluster(root, port)
    started = False
    try:
        init = _as_postgres(
            os.path.join(bindir, "initdb"),
            "-D",
            cluster.data,
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr}")
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=100 -c fsync=off"
        start = _as_postgres(
            os.path.join(bindir, "pg_ctl"),
            "-D",
            cluster.data,
            "-l",
            os.path.join(root, "log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        started = True
        if start.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {start.stderr} {start.stdout}")
        cluster.sql(f"CREATE DATABASE {DB}")
        yield cluster
    finally:
        if started:
            _as_postgres(
                os.path.join(bindir, "pg_ctl"), "-D", cluster.data, "-m", "immediate", "-w", "stop"
            )
            deadline = time.monotonic() + 30
            pid_file = os.path.join(cluster.data, "postmaster.pid")
            while os.path.exists(pid_file) and time.monotonic() < deadline:
                time.sleep(0.1)
        shutil.rmtree(root, ignore_errors=True)
