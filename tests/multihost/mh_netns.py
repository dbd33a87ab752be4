"""Simulated hosts for the multi-host tests: network namespaces on a private bridge, a PostgreSQL
cluster of their own, and ``optuna-guard run`` started "on" a host.

Layout (everything exists only while a test runs; nothing is added to the machine's own network):

- ``og-<id>-sw``: a switch namespace holding the bridge ``br0``; one veth pair per host, its
  switch end ``<host>`` on the bridge, its host end ``eth0`` in the host's namespace.
- ``og-<id>-db``: the database host, 10.213.X.2, running its own PostgreSQL cluster (initdb +
  pg_ctl as user ``postgres`` into a temporary directory, trust auth for the subnet only).
- ``og-<id>-hN``: worker hosts, 10.213.X.(10+N). A process "on" a host runs in its network
  namespace and in a fresh UTS (own hostname) + PID + mount namespace (``unshare --pid
  --mount-proc``), so ``socket.gethostname()`` and ``/proc`` are the host's own, and killing the
  namespace's PID 1 kills every process of the host.

The test process itself reaches the cluster through its Unix socket in the temporary directory
(Unix sockets do not belong to a network namespace), so assertions never cross the simulated
network. Everything is torn down by :meth:`SimulatedHosts.close` (idempotent, safe after a
partial start).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

PG_BIN_GLOB = "/usr/lib/postgresql"
NETNS_DIR = Path("/run/netns")


# PID 1 of a simulated host: sets the hostname, runs the command, then waits (up to 10 s) for the
# rest of the host's processes to end and names any that are left ("LEFTOVER ..." lines), because
# when PID 1 exits the kernel kills whatever is left and a leak would go unseen.
HOST_INIT = r"""
hostname "$0" || exit 97
"$@" &
child=$!
trap 'kill -TERM $child 2>/dev/null' TERM INT
while :; do
  wait $child; rc=$?
  kill -0 $child 2>/dev/null || break
done
i=0
while [ $i -lt 50 ]; do
  n=0; for p in /proc/[0-9]*; do n=$((n+1)); done
  [ $n -le 1 ] && break
  sleep 0.2; i=$((i+1))
done
for p in /proc/[0-9]*; do
  [ "${p#/proc/}" = "$$" ] || echo "LEFTOVER pid ${p#/proc/}: $(tr '\0' ' ' < $p/cmdline 2>/dev/null)"
done
echo "HOST-INIT launcher exit code $rc"
exit $rc
"""


def skip_reason() -> str | None:
    """Why the harness cannot run here (None when it can): root, ip, unshare, PostgreSQL binaries."""
    if os.geteuid() != 0:
        return "multi-host tests need root (network namespaces)"
    for tool in ("ip", "unshare", "nsenter", "runuser"):
        if shutil.which(tool) is None:
            return f"multi-host tests need the {tool!r} command"
    if pg_bin_dir() is None:
        return f"multi-host tests need PostgreSQL server binaries under {PG_BIN_GLOB}/*/bin"
    name = f"og-probe-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def pg_bin_dir() -> Path | None:
    """The newest PostgreSQL server bin directory on this machine."""
    root = Path(PG_BIN_GLOB)
    if not root.is_dir():
        return None
    candidates = sorted(
        (p / "bin" for p in root.iterdir() if (p / "bin" / "pg_ctl").exists()),
        key=lambda p: p.parent.name,
    )
    return candidates[-1] if candidates else None


def _run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
        )
    return done


def _free_subnet() -> int:
    """A third octet X such that 10.213.X.0/24 is not routed anywhere on this machine."""
    used = _run(["ip", "-4", "route", "show", "table", "all"], check=False).stdout
    for _ in range(50):
        x = random.randint(1, 254)
        if f"10.213.{x}." not in used:
            return x
    raise RuntimeError("no free 10.213.X.0/24 subnet for the simulated hosts")


class SimulatedHosts:
    """K worker hosts and one database host on a private bridge (see the module docstring)."""

    def __init__(self, n_hosts: int, *, base_dir: Path | None = None) -> None:
        self.id = uuid.uuid4().hex[:6]
        self.n_hosts = n_hosts
        self.subnet = _free_subnet()
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix=f"og-{self.id}-"))
        os.chmod(self.base_dir, 0o755)  # the postgres user must reach its cluster directory
        self.switch = f"og-{self.id}-sw"
        self.db_ns = f"og-{self.id}-db"
        self.hosts = [f"og-{self.id}-h{n}" for n in range(1, n_hosts + 1)]
        self._made: list[str] = []
        self._procs: list[subprocess.Popen] = []

    # -- addresses and names --------------------------------------------------------------------
    @property
    def db_ip(self) -> str:
        return f"10.213.{self.subnet}.2"

    def host_ip(self, n: int) -> str:
        return f"10.213.{self.subnet}.{10 + n}"

    def hostname(self, n: int) -> str:
        """The hostname processes on host n see (what the launcher tags trials with)."""
        return f"mh{self.id}-host{n}"

    def ns(self, n: int) -> str:
        return self.hosts[n - 1]

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> SimulatedHosts:
        _run(["ip", "netns", "add", self.switch])
        self._made.append(self.switch)
        _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
        self._add_host(self.db_ns, "db", self.db_ip)
        for n, name in enumerate(self.hosts, start=1):
            self._add_host(name, f"h{n}", self.host_ip(n))
        return self

    def _add_host(self, ns: str, port_name: str, ip: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._made.append(ns)
        _run(
            [
                "ip",
                "-n",
                self.switch,
                "link",
                "add",
                port_name,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            ]
        )
        _run(["ip", "-n", self.switch, "link", "set", port_name, "master", "br0", "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def close(self) -> None:
        """Kill every process of every namespace we made, delete the namespaces and the temp dir."""
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
        for ns in reversed(self._made):
            self.kill_namespace_processes(ns)
        for ns in reversed(self._made):
            _run(["ip", "netns", "del", ns], check=False)
        self._made.clear()
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.base_dir, ignore_errors=True)

    # -- processes ------------------------------------------------------------------------------
    def namespace_pids(self, ns: str) -> list[int]:
        """Pids (as this process sees them) of every process in network namespace ``ns``."""
        if not (NETNS_DIR / ns).exists():
            return []
        out = _run(["ip", "netns", "pids", ns], check=False).stdout
        return [int(p) for p in out.split()]

    def kill_namespace_processes(self, ns: str, sig: int = signal.SIGKILL) -> list[int]:
        """Signal every process of the namespace, by pid; returns the pids signalled."""
        pids = self.namespace_pids(ns)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def kill_host(self, n: int, *, timeout: float = 15.0) -> list[int]:
        """Host loss: SIGKILL every process on host n, and wait until none is left."""
        pids = self.kill_namespace_processes(self.ns(n))
        deadline = time.monotonic() + timeout
        while self.namespace_pids(self.ns(n)) and time.monotonic() < deadline:
            self.kill_namespace_processes(self.ns(n))
            time.sleep(0.1)
        return pids

    def spawn(
        self,
        n: int,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen:
        """Start ``argv`` on host n: its netns, own hostname, own PID and mount (/proc) namespace."""
        wrapper = [
            "nsenter",
            f"--net={NETNS_DIR / self.ns(n)}",
            "unshare",
            "--uts",
            "--pid",
            "--kill-child",
            "--mount-proc",
            "sh",
            "-c",
            HOST_INIT,
            self.hostname(n),
            *argv,
        ]
        # closed in the finally below once the child holds its own copy
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                wrapper,
                env=dict(env) if env is not None else None,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
            )
        finally:
            if log_path:
                out.close()
        self._procs.append(proc)
        return proc

    def exec_in(
        self, ns: str, argv: Sequence[str], *, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Run a short command in namespace ``ns`` (network only) and wait for it."""
        return _run(["ip", "netns", "exec", ns, *argv], check=check, timeout=timeout)

    # -- faults -----------------------------------------------------------------------------------
    def partition(self, n: int) -> None:
        """Cut host n off the network (its switch port down: packets are dropped, like a cable cut)."""
        _run(["ip", "-n", self.switch, "link", "set", f"h{n}", "down"])

    def heal(self, n: int) -> None:
        _run(["ip", "-n", self.switch, "link", "set", f"h{n}", "up"])


class PostgresCluster:
    """A PostgreSQL cluster of the test's own, run as user postgres in a namespace."""

    def __init__(self, hosts: SimulatedHosts, *, max_connections: int = 100) -> None:
        bin_dir = pg_bin_dir()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL server binaries")
        self.bin = bin_dir
        self.hosts = hosts
        self.ns = hosts.db_ns
        self.listen_ip = hosts.db_ip
        self.dir = hosts.base_dir / "pg"
        self.data = self.dir / "data"
        self.socket_dir = self.dir / "sock"
        self.log = self.dir / "postgres.log"
        self.port = 5432
        self.max_connections = max_connections

    @property
    def url(self) -> str:
        """The URL worker hosts use (over the simulated network)."""
        return f"postgresql+psycopg://postgres@{self.listen_ip}:{self.port}/postgres"

    @property
    def local_url(self) -> str:
        """The URL the test process uses (Unix socket, outside the simulated network)."""
        return f"postgresql+psycopg://postgres@/postgres?host={self.socket_dir}&port={self.port}"

    def _as_postgres(
        self, argv: Sequence[str], *, in_ns: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        cmd = ["runuser", "-u", "postgres", "--", *argv]
        if in_ns:
            cmd = ["nsenter", f"--net={NETNS_DIR / self.ns}", *cmd]
        return _run(cmd, timeout=timeout)

    def start(self) -> PostgresCluster:
        self.socket_dir.mkdir(parents=True)
        shutil.chown(self.dir, "postgres", "postgres")
        shutil.chown(self.socket_dir, "postgres", "postgres")
        self._as_postgres(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            in_ns=False,
        )
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"listen_addresses = '{self.listen_ip}'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.socket_dir}'\nmax_connections = {self.max_connections}\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nshared_buffers = 32MB\n"
            )
        with open(self.data / "pg_hba.conf", "w") as hba:
            hba.write(f"local all all trust\nhost all all 10.213.{self.hosts.subnet}.0/24 trust\n")
        self._pg_ctl("start")
        return self

    def _pg_ctl(self, action: str) -> None:
        argv = [
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            action,
        ]
        if action == "stop" or action == "restart":
            argv += ["-m", "fast"]
        self._as_postgres(argv)

    def restart(self) -> None:
        self._pg_ctl("restart")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._pg_ctl("stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass  # the namespace teardown kills what is left
