"""Many workers on one study: direct PostgreSQL vs. the gRPC storage proxy vs. the Redis journal.

W workers (``optuna-guard run`` launchers of --per-launcher workers each, plain processes on
loopback) run 0.5 s sleeping trials against a PostgreSQL cluster this script starts for itself
(initdb + pg_ctl into a temporary directory, ``max_connections`` 50 by default), directly, through
``optuna-guard storage-proxy`` (one proxy process), or against Redis (``redis://``, the journal
with a prefix of its own, deleted afterwards). Each cell: boot the workers, measure a window of
--duration seconds, SIGTERM the launchers.

Per cell it prints: trials/s in the window (ideal is W / 0.5 s), efficiency against the ideal,
connection errors (log lines naming a refused/failed connection, storage outages, worker crashes),
p50/p99 of the time a worker waits between the end of one trial and the start of its next, the peak
number of PostgreSQL connections, and RSS per worker (MB).

    .venv/bin/python benchmarks/bench_many_workers.py                       # W = 32, 64
    .venv/bin/python benchmarks/bench_many_workers.py --workers 32,64,128,256 --duration 30

The machine may be shared: the launch prints the load average before each cell, and W is capped
by available memory (a worker needs ~--mb-per-worker MB).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import itertools
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import optuna
import psutil

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TRIAL_S = 0.5
REDIS_BASE = "redis://127.0.0.1:6379/0"

OBJECTIVE_SRC = f"""
import time
def objective(trial):
    trial.suggest_float("x", 0.0, 1.0)
    time.sleep({TRIAL_S})
    return 0.0
"""

CONNECTION_ERROR = re.compile(
    r"too many clients|remaining connection slots|connection to server .* failed|could not connect|"
    r"Connection refused|StatusCode\.UNAVAILABLE|ConnectionError|OperationalError",
    re.IGNORECASE,
)


# -- the benchmark's own PostgreSQL cluster -------------------------------------------------------
class LoopbackPostgres:
    def __init__(self, root: Path, max_connections: int) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            raise SystemExit("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
        self.bin = Path(found[-1]).parent
        self.root = root / "pg"
        self.data = self.root / "data"
        self.port = _free_port()
        self.max_connections = max_connections

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *argv: str) -> None:
        done = subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True, timeout=180
        )
        if done.returncode != 0:
            raise SystemExit(f"{argv[0]} failed: {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> None:
        self.root.mkdir(parents=True)
        os.chmod(self.root.parent, 0o755)
        shutil.chown(self.root, "postgres", "postgres")
        self._as_postgres(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
        )
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.root}'\n"
                f"max_connections = {self.max_connections}\nfsync = off\nsynchronous_commit = off\n"
            )
        self._as_postgres(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._as_postgres(
                str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-m", "immediate", "stop"
            )

    def connections(self) -> int | None:
        import psycopg

        try:
            with psycopg.connect(
                host=str(self.root),
                port=self.port,
                user="postgres",
                dbname="postgres",
                connect_timeout=3,
            ) as conn:
                return int(
                    conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                    ).fetchone()[0]
                )
        except Exception:
            return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- one cell ---------------------------------------------------------------------------------------
class Proxy:
    """``optuna-guard storage-proxy`` in front of the cluster; stopped with SIGTERM."""

    def __init__(self, storage: str, work: Path) -> None:
        port = _free_port()
        self.log = work / "proxy.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    PYTHON,
                    "-m",
                    "optuna_guard.cli",
                    "storage-proxy",
                    "--storage",
                    storage,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_env(),
                start_new_session=True,
            )
        self.url = f"grpc://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while "listening on" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"storage-proxy did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        _stop([self.proc], timeout=30)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def _stop(procs: list[subprocess.Popen], timeout: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for child in _descendants(p.pid):
                child.kill()
            p.kill()
            p.wait()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _reader(backend: str, url: str, pg: LoopbackPostgres) -> Any:
    """A storage for the benchmark's own reads (never through the proxy under test)."""
    if backend == "redis":
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalRedisBackend

        base, prefix = url.split("?prefix=")
        return JournalStorage(JournalRedisBackend(base, prefix=prefix))
    return optuna.storages.RDBStorage(pg.url)


def run_cell(
    backend: str, workers: int, args: argparse.Namespace, pg: LoopbackPostgres, work: Path
) -> dict[str, Any]:
    cell_dir = work / f"{backend}-{workers}"
    cell_dir.mkdir()
    study = f"bench-{backend}-{workers}-{uuid.uuid4().hex[:8]}"
    proxy = None
    if backend == "direct":
        url = pg.url
    elif backend == "grpc":
        proxy = Proxy(pg.url, cell_dir)
        url = proxy.url
    else:
        url = f"{REDIS_BASE}?prefix=og-bench-{uuid.uuid4().hex[:8]}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = _reader(backend, url, pg)
        optuna.create_study(study_name=study, storage=reader)
    objective = cell_dir / "bench_objective.py"
    objective.write_text(OBJECTIVE_SRC)
    launchers: list[subprocess.Popen] = []
    sizes = [args.per_launcher] * (workers // args.per_launcher)
    if workers % args.per_launcher:
        sizes.append(workers % args.per_launcher)
    t_boot = time.time()
    for i, size in enumerate(sizes):
        log_dir = cell_dir / f"launch{i}"
        log_dir.mkdir()
        argv = [
            PYTHON,
            "-m",
            "optuna_guard.cli",
            "run",
            f"{objective}:objective",
            "--study-name",
            study,
            "--storage",
            url,
            "--workers",
            str(size),
            "--no-guard",
            "--display",
            "off",
            "--log-dir",
            str(log_dir),
            "--min-available-gb",
            "0.1",
            "--warn-available-gb",
            "0.2",
            "--max-worker-age",
            "off",
            "--status-interval",
            "600",
            "--grace-period",
            "5",
            "--kill-wait",
            "0.5",
            "--storage-deadline",
            "60",
            "--heartbeat-interval",
            "10",
            "--heartbeat-grace",
            "60",
        ]
        with open(log_dir / "console.log", "ab") as out:
            launchers.append(
                subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
                )
            )
    # Boot: until W distinct workers have started a trial, or the boot timeout.
    t0 = None
    deadline = time.monotonic() + args.boot_timeout
    while time.monotonic() < deadline:
        try:
            started = len(
                {
                    _worker_key(t)
                    for t in reader.get_all_trials(
                        reader.get_study_id_from_name(study), deepcopy=False
                    )
                }
            )
        except Exception:  # a full database refuses us too; retry
            started = 0
        if started >= workers:
            t0 = time.time()
            break
        if all(p.poll() is not None for p in launchers):
            break
        time.sleep(0.5)
    booted = t0 is not None
    t0 = t0 or time.time()
    boot_s = t0 - t_boot
    peak_conn: int | str = 0
    rss: list[float] = []
    while time.time() < t0 + args.duration:
        if backend != "redis" and peak_conn != "full":
            conn = pg.connections()  # None: even the superuser slots are taken
            peak_conn = "full" if conn is None else max(int(peak_conn), conn)
        if not rss and time.time() > t0 + args.duration / 2:
            for p in launchers:
                arbiter = psutil.Process(p.pid) if p.poll() is None else None
                for child in arbiter.children() if arbiter else []:
                    try:
                        rss.append(child.memory_info().rss / 2**20)
                    except psutil.NoSuchProcess:
                        pass
        time.sleep(1.0)
    t1 = time.time()
    codes = []
    _stop(launchers, timeout=60)
    codes = [p.returncode for p in launchers]
    trials = reader.get_all_trials(reader.get_study_id_from_name(study), deepcopy=False)
    if proxy:
        proxy.stop()
    result = _measure(trials, t0, t1, workers, cell_dir)
    result.update(
        backend=backend,
        workers=workers,
        booted=booted,
        boot_s=round(boot_s, 1),
        window_s=round(t1 - t0, 1),
        peak_pg_connections=peak_conn if backend != "redis" else None,
        rss_mb_per_worker=round(statistics.mean(rss), 1) if rss else None,
        exit_codes=sorted(set(codes)),
    )
    if backend == "redis":
        _delete_redis_prefix(url.split("?prefix=")[1])
    return result


def _measure(
    trials: list[Any], t0: float, t1: float, workers: int, cell_dir: Path
) -> dict[str, Any]:
    def ts(dt: datetime.datetime | None) -> float | None:
        return None if dt is None else dt.timestamp()

    done = [
        t
        for t in trials
        if t.state.name == "COMPLETE" and t0 <= (ts(t.datetime_complete) or 0) <= t1
    ]
    by_worker: dict[tuple[Any, ...], list[Any]] = {}
    for t in trials:
        by_worker.setdefault(_worker_key(t), []).append(t)
    active = len({_worker_key(t) for t in done})
    waits = []
    for ts_list in by_worker.values():
        ts_list.sort(key=lambda t: t.datetime_start or datetime.datetime.max)
        for prev, nxt in itertools.pairwise(ts_list):
            end, start = ts(prev.datetime_complete), ts(nxt.datetime_start)
            if end is not None and start is not None and t0 <= start <= t1:
                waits.append(max(0.0, start - end))
    waits.sort()
    errors = 0
    outages = crashes = 0
    for log in cell_dir.glob("launch*/*.log"):
        errors += sum(
            1
            for line in log.read_text(errors="replace").splitlines()
            if CONNECTION_ERROR.search(line)
        )
    for ev in cell_dir.glob("launch*/events.jsonl"):
        for line in ev.read_text(errors="replace").splitlines():
            outages += '"storage_outage"' in line
            crashes += '"worker_crashed"' in line
    rate = len(done) / max(1e-9, t1 - t0)

    def pct(q: float) -> float | None:
        return round(waits[min(len(waits) - 1, int(q * len(waits)))] * 1000, 1) if waits else None

    return dict(
        trials_per_s=round(rate, 2),
        efficiency=round(rate / (workers / TRIAL_S), 3),
        connection_error_lines=errors,
        storage_outages=outages,
        worker_crashes=crashes,
        wait_p50_ms=pct(0.50),
        wait_p99_ms=pct(0.99),
        complete_in_window=len(done),
        workers_completing=active,
    )


def _worker_key(trial: Any) -> tuple[Any, ...]:
    """Which worker ran a trial (the launcher's tags)."""
    return (
        trial.user_attrs.get("launch_id"),
        trial.user_attrs.get("hostname"),
        trial.user_attrs.get("worker_pid"),
    )


def _delete_redis_prefix(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_BASE)
    keys = list(client.scan_iter(f"{prefix}*"))
    if keys:
        client.delete(*keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workers", default="32,64", help="comma-separated W values (default 32,64)"
    )
    parser.add_argument("--backends", default="direct,grpc,redis", help="direct,grpc,redis")
    parser.add_argument(
        "--duration", type=float, default=25.0, help="measured window per cell (s)"
    )
    parser.add_argument(
        "--boot-timeout", type=float, default=120.0, help="max seconds for W workers to start"
    )
    parser.add_argument(
        "--per-launcher", type=int, default=8, help="workers per optuna-guard run (a 'host')"
    )
    parser.add_argument(
        "--max-connections", type=int, default=50, help="PostgreSQL max_connections"
    )
    parser.add_argument(
        "--mb-per-worker", type=float, default=150.0, help="memory a worker needs (caps W)"
    )
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (the PostgreSQL cluster is started as user postgres)")
    work = Path(tempfile.mkdtemp(prefix="og-bench-many-"))
    pg = LoopbackPostgres(work, args.max_connections)
    results = []
    try:
        pg.start()
        for w in [int(x) for x in args.workers.split(",")]:
            available_mb = psutil.virtual_memory().available / 2**20
            if w * args.mb_per_worker > available_mb * 0.6:
                print(
                    f"W={w}: skipped, needs ~{w * args.mb_per_worker:.0f} MB, {available_mb:.0f} MB available"
                )
                continue
            for backend in args.backends.split(","):
                print(
                    f"W={w} {backend}: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
                    flush=True,
                )
                res = run_cell(backend, w, args, pg, work)
                print(json.dumps(res), flush=True)
                results.append(res)
    finally:
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    header = (
        "backend",
        "W",
        "trials/s",
        "eff",
        "workers completing",
        "conn err",
        "outages",
        "crashes",
        "wait p50 ms",
        "wait p99 ms",
        "pg conns",
        "RSS MB/worker",
        "boot s",
    )
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in results:
        row = (
            r["backend"],
            r["workers"],
            r["trials_per_s"],
            r["efficiency"],
            r["workers_completing"],
            r["connection_error_lines"],
            r["storage_outages"],
            r["worker_crashes"],
            r["wait_p50_ms"],
            r["wait_p99_ms"],
            r["peak_pg_connections"],
            r["rss_mb_per_worker"],
            r["boot_s"] if r["booted"] else f"{r['boot_s']} (not all up)",
        )
        print("| " + " | ".join(str(x) for x in row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
