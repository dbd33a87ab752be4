"""Benchmark of the supervised launcher (issue 3). Prints three tables:

1. Throughput: trials/s for N short trials with 1, 2 and 4 workers on SQLite and PostgreSQL,
   ``optuna-guard run`` vs. the same number of plain processes each running
   ``study.optimize(objective, n_trials=N/workers)`` on the same storage (opened the same way,
   WAL + busy timeout for SQLite). Wall time from starting the processes to the last exit, so
   both sides pay interpreter start-up. Target: ratio >= 0.95. The launcher is measured with
   the in-trial guard off (the launcher's own cost) and with its default (@guard on).
2. Time from a hard kill (worker over --max-worker-rss-gb) to the replacement worker running a
   trial, from the event log. Target: <= 2 s.
3. Supervisor CPU with 8 idle-ish workers (trials sleeping 1 s), default 0.25 s watchdog, as
   a percentage of one core. Target: <= 1 % (issue 15).
4. ``--only marginal``: CPU per trial with the fixed costs removed (all processes' CPU at 210
   trials minus at 10, / 200; 1 worker, SQLite), plain / launcher / ``--baseline`` interleaved.

    .venv/bin/python benchmarks/bench_launcher.py [--trials 400] [--pairs 3] [--workers 1,2,4]
        [--trial-ms 20] [--kind cpu|sleep] [--guard on|off|both] [--skip-postgres]
        [--only throughput|kill|cpu|marginal] [--baseline DIR] [--cpu-window 30]

The machine is shared: run it when nothing else is busy; each pair is measured interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

import psutil

PYTHON = sys.executable
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

OBJECTIVE = textwrap.dedent(
    """
    import os, time

    _TRIAL_S = float(os.environ.get("BENCH_TRIAL_S", "0.02"))
    _BUSY = os.environ.get("BENCH_KIND", "cpu") == "cpu"

    def objective(trial):
        x = trial.suggest_float("x", -1.0, 1.0)
        if _BUSY:  # CPU-bound, as real training is: a busy loop for the trial's CPU time
            end = time.thread_time() + _TRIAL_S
            while time.thread_time() < end:
                pass
        else:
            time.sleep(_TRIAL_S)
        return x * x

    def hog(trial):
        # trials listed in BENCH_HOG_TRIALS allocate until the supervisor kills the worker
        x = trial.suggest_float("x", -1.0, 1.0)
        if trial.number in {int(n) for n in os.environ.get("BENCH_HOG_TRIALS", "").split(",") if n}:
            hoard = []
            for _ in range(40):
                hoard.append(b"\\x01" * (25 * 1024 * 1024))
                time.sleep(0.02)
            time.sleep(5)
        return x * x
    """
)

PLAIN_WORKER = textwrap.dedent(
    """
    import sys, optuna
    sys.path.insert(0, sys.argv[1])
    from bench_objective import objective
    from optuna_guard.storage import open_storage
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=sys.argv[2], storage=open_storage(sys.argv[3]))
    study.optimize(objective, n_trials=int(sys.argv[4]))
    """
)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def _create_study(url: str) -> str:
    import optuna

    from optuna_guard.storage import open_storage

    name = f"bench-{uuid.uuid4().hex[:10]}"
    optuna.create_study(study_name=name, storage=open_storage(url))
    return name


def _steady_seconds(url: str, name: str) -> float:
    """First trial start to last trial end, from the storage: throughput without start-up."""
    import optuna

    from optuna_guard.storage import open_storage

    trials = optuna.load_study(study_name=name, storage=open_storage(url)).get_trials(
        deepcopy=False
    )
    return (
        max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)
    ).total_seconds()


def _count(url: str, name: str) -> int:
    import optuna

    from optuna_guard.storage import open_storage

    return len(optuna.load_study(study_name=name, storage=open_storage(url)).trials)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_plain(workdir: str, url: str, workers: int, trials: int) -> tuple[float, float, float]:
    name = _create_study(url)
    cpu0 = _children_cpu()
    per_worker = [trials // workers + (1 if i < trials % workers else 0) for i in range(workers)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [PYTHON, "-c", PLAIN_WORKER, workdir, name, url, str(n)],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for n in per_worker
    ]
    failed = [proc for proc in procs if proc.wait() != 0]
    if failed:  # e.g. another test restarted the shared PostgreSQL server: measure again
        print(
            f"   (a plain worker failed on {url.split(':')[0]}; measuring this run again)",
            flush=True,
        )
        return run_plain(workdir, url, workers, trials)
    elapsed = time.perf_counter() - started
    cpu = _children_cpu() - cpu0
    assert _count(url, name) == trials
    return elapsed, _steady_seconds(url, name), cpu


def launcher_command(workdir: str, url: str, name: str, workers: int, trials: int) -> list[str]:
    """``optuna-guard run`` on ``workdir/bench_objective.py:objective`` (logs under workdir)."""
    return [
        PYTHON,
        "-m",
        "optuna_guard.cli",
        "run",
        f"{workdir}/bench_objective.py:objective",
        "--study-name",
        name,
        "--storage",
        url,
        "--workers",
        str(workers),
        "--n-trials",
        str(trials),
        "--display",
        "off",
        "--log-dir",
        os.path.join(workdir, "logs", name),
    ]


def run_launcher(
    workdir: str, url: str, workers: int, trials: int, guard: bool, code: str | None = None
) -> tuple[float, float, float, float]:
    """(e2e s, steady s, CPU s of all processes, CPU s of the supervisor process alone).
    ``code``: a directory holding another ``optuna_guard`` (e.g. ``git archive`` of an older
    commit) to run instead of this checkout, for before/after pairs."""
    name = _create_study(url)
    cpu0 = _children_cpu()
    args = launcher_command(workdir, url, name, workers, trials)
    if not guard:
        args.append("--no-guard")
    started = time.perf_counter()
    env = (
        _env()
        if code is None
        else _env(PYTHONPATH=os.pathsep.join(filter(None, [code, os.environ.get("PYTHONPATH")])))
    )
    proc = subprocess.Popen(
        args, env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    own = _OwnCpu(proc.pid)
    _, stderr = proc.communicate()
    elapsed = time.perf_counter() - started
    own.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"launcher failed: {stderr[-500:]}")
    cpu = _children_cpu() - cpu0
    assert _count(url, name) == trials
    return elapsed, _steady_seconds(url, name), cpu, own.seconds


class _OwnCpu:
    """The supervisor's own CPU (user + system, not its workers'), sampled every 50 ms until it
    exits: the last sample misses at most its final 50 ms."""

    def __init__(self, pid: int) -> None:
        import threading

        self.seconds = 0.0
        self._done = threading.Event()
        self._process = psutil.Process(pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                times = self._process.cpu_times()
                self.seconds = times.user + times.system
            except psutil.Error:
                return
            self._done.wait(0.05)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def bench_throughput(
    workdir: str,
    urls: dict[str, str],
    trials: int,
    pairs: int,
    trial_ms: float,
    worker_counts: tuple[int, ...],
    kind: str,
    guard_modes: tuple[bool, ...],
    baseline: str | None = None,
) -> None:
    print(
        f"\n1) {trials} {kind}-bound trials of {trial_ms:g} ms; {pairs} interleaved runs of plain / launcher "
        "(medians). 'thr' = launcher throughput / plain, end to end (e2e, incl. start-up) and steady (first trial "
        "start to last end, from the storage); 'CPU/trial' = CPU ms per trial of all processes; 'extra' = launcher "
        "minus plain CPU per trial; 'sup %' = the supervisor process's own CPU as % of one core",
        flush=True,
    )
    header = (
        f"{'storage':<9}{'workers':>7} {'guard':>6} | {'thr e2e':>7} {'steady':>7} | {'CPU/trial plain':>15} "
        f"{'launcher':>9} {'extra ms':>9} | {'sup ms/trial':>12} {'sup %':>6}"
    )
    print(header)
    print("-" * len(header))
    for label, url in urls.items():
        for workers in worker_counts:
            plain: list[tuple[float, float, float]] = []
            variants = [(g, None) for g in guard_modes] + (
                [(g, baseline) for g in guard_modes] if baseline else []
            )
            launched: dict[tuple[bool, str | None], list[tuple[float, float, float, float]]] = {
                v: [] for v in variants
            }
            for _ in range(pairs):  # interleaved, so drifting load hits all sides alike
                plain.append(run_plain(workdir, url, workers, trials))
                for guard, code in variants:
                    launched[(guard, code)].append(
                        run_launcher(workdir, url, workers, trials, guard, code)
                    )
            med = statistics.median
            for (guard, code), runs in launched.items():
                e2e = med(p[0] for p in plain) / med(r[0] for r in runs)
                steady = med(p[1] for p in plain) / med(r[1] for r in runs)
                cpu_plain = 1000 * med(p[2] for p in plain) / trials
                cpu_launcher = 1000 * med(r[2] for r in runs) / trials
                extra = 1000 * med((r[2] - p[2]) / trials for r, p in zip(runs, plain))
                sup = 1000 * med(r[3] for r in runs) / trials
                sup_pct = 100 * med(r[3] / r[0] for r in runs)
                print(
                    f"{label:<9}{workers:>7} {'on' if guard else 'off':>6}{' (baseline)' if code else ''} | {e2e:>7.3f} {steady:>7.3f} | "
                    f"{cpu_plain:>15.1f} {cpu_launcher:>9.1f} {extra:>9.1f} | {sup:>12.2f} {sup_pct:>6.2f}",
                    flush=True,
                )


def bench_kill_to_replacement(workdir: str, kills: int = 3) -> None:
    print(
        f"\n2) Hard kill -> replacement worker running a trial (SQLite, 1 worker, {kills} kills, --kill-wait 1)"
    )
    idle = _idle_rss_gb(workdir)
    url = f"sqlite:///{workdir}/kill.db"
    name = _create_study(url)
    log_dir = os.path.join(workdir, "logs", name)
    hog_trials = ",".join(str(2 * i) for i in range(kills))
    args = [
        PYTHON,
        "-m",
        "optuna_guard.cli",
        "run",
        f"{workdir}/bench_objective.py:hog",
        "--study-name",
        name,
        "--storage",
        url,
        "--workers",
        "1",
        "--n-trials",
        str(2 * kills),
        "--display",
        "off",
        "--no-guard",
        "--max-worker-rss-gb",
        f"{idle + 0.3:.3f}",
        "--log-dir",
        log_dir,
    ]
    subprocess.run(
        args,
        env=_env(BENCH_HOG_TRIALS=hog_trials),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    with open(os.path.join(log_dir, "events.jsonl")) as log:
        events = [json.loads(line) for line in log]
    gaps = []
    for index, event in enumerate(events):
        if event["event"] != "worker_killed":
            continue
        later = [
            e
            for e in events[index + 1 :]
            if e["event"] == "trial_started" and e["pid"] != event["pid"]
        ]
        if later:
            gaps.append(later[0]["ts"] - event["ts"])
    print(
        f"kills: {len(gaps)}   kill -> replacement running a trial: median {statistics.median(gaps):.2f}s, "
        f"max {max(gaps):.2f}s  (each: {', '.join(f'{g:.2f}' for g in gaps)})"
    )


def _idle_rss_gb(workdir: str) -> float:
    script = (
        "import os, optuna, optuna_guard.supervisor._worker\n"
        "from optuna_guard.memory._tree import tree_rss_bytes\n"
        "print(tree_rss_bytes(os.getpid()) / 2**30)"
    )
    return float(
        subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, check=True).stdout
    )


def bench_supervisor_cpu(
    workdir: str,
    workers: int = 8,
    window: float = 30.0,
    pairs: int = 1,
    baseline: str | None = None,
) -> None:
    print(
        f"\n3) Supervisor CPU with {workers} idle-ish workers (trials sleep 1 s; default 0.25 s watchdog), "
        f"{window:.0f} s window, {pairs} run(s){' interleaved with the baseline' if baseline else ''}"
    )
    results: dict[str | None, list[float]] = {None: [], baseline: []} if baseline else {None: []}
    main: dict[str | None, list[float]] = {code: [] for code in results}
    for index in range(pairs):
        for code in results:
            pct, threads, finished, exit_code = _supervisor_cpu_once(
                workdir, workers, window, code, index
            )
            results[code].append(pct)
            main[code].append(threads[0] if threads else float("nan"))
            split = ", ".join(f"{t:.2f}" for t in threads)
            print(
                f"  {'baseline' if code else 'now':>8}: {pct:.2f} % of one core "
                f"(per thread, main first: {split}; {finished} trials by {workers} workers; "
                f"exit code {exit_code})",
                flush=True,
            )
    for code, runs in results.items():
        print(
            f"supervisor CPU ({'baseline' if code else 'now'}): median {statistics.median(runs):.2f} % "
            f"of one core (each: {', '.join(f'{r:.2f}' for r in runs)}); main thread median "
            f"{statistics.median(main[code]):.2f} %"
        )


def _thread_ticks(pid: int) -> dict[int, int]:
    """User + system CPU of each thread of ``pid`` in clock ticks (/proc/<pid>/task/*/stat)."""
    ticks: dict[int, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as handle:
                data = handle.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2 :].split()
        ticks[int(tid)] = int(fields[11]) + int(fields[12])
    return ticks


def _supervisor_cpu_once(
    workdir: str, workers: int, window: float, code: str | None, index: int
) -> tuple[float, list[float], int, int | None]:
    """(% of a core over the window, % of each thread that used CPU in it: the main thread
    first, then the others from the most; trials; exit code)."""
    url = f"sqlite:///{workdir}/cpu-{index}-{'base' if code else 'now'}.db"
    name = _create_study(url)
    args = [
        PYTHON,
        "-m",
        "optuna_guard.cli",
        "run",
        f"{workdir}/bench_objective.py:objective",
        "--study-name",
        name,
        "--storage",
        url,
        "--workers",
        str(workers),
        "--display",
        "off",
        "--log-dir",
        os.path.join(workdir, "logs", name),
    ]
    extra = {"BENCH_TRIAL_S": "1.0", "BENCH_KIND": "sleep"}
    if code is not None:
        extra["PYTHONPATH"] = os.pathsep.join(filter(None, [code, os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        args, env=_env(**extra), cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        supervisor = psutil.Process(proc.pid)
        deadline = time.monotonic() + 90
        while _count_running(url, name) < workers and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3.0)  # all workers past start-up
        cpu0, wall0 = sum(supervisor.cpu_times()[:2]), time.monotonic()
        ticks0 = _thread_ticks(proc.pid)
        time.sleep(window)
        ticks1 = _thread_ticks(proc.pid)
        cpu1, wall1 = sum(supervisor.cpu_times()[:2]), time.monotonic()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    wall = wall1 - wall0
    hertz = os.sysconf("SC_CLK_TCK")
    used = {tid: t - ticks0.get(tid, 0) for tid, t in ticks1.items()}
    others = sorted((t for tid, t in used.items() if tid != proc.pid and t > 0), reverse=True)
    threads = [100 * t / hertz / wall for t in [used.get(proc.pid, 0), *others]]
    return 100 * (cpu1 - cpu0) / wall, threads, _count(url, name), proc.returncode


def bench_marginal(
    workdir: str, pairs: int, trial_ms: float, kind: str, baseline: str | None, small: int = 10
) -> None:
    """CPU per trial with the fixed costs removed: all processes' CPU at ``small + 200`` trials
    minus at ``small`` trials, / 200 (1 worker, SQLite, guard on), plain / launcher / baseline
    interleaved."""
    big = small + 200
    print(
        f"\n4) Marginal CPU per trial (1 worker, SQLite, {kind}-bound {trial_ms:g} ms trials, guard on): "
        f"(CPU at {big} trials - CPU at {small}) / 200, {pairs} interleaved rounds"
    )
    sides: dict[str, list[float]] = {"plain": [], "launcher": []}
    if baseline:
        sides["baseline"] = []
    for index in range(pairs):
        for side in sides:
            cpu = {}
            for n in (small, big):
                url = f"sqlite:///{workdir}/marginal-{index}-{side}-{n}.db"
                if side == "plain":
                    cpu[n] = run_plain(workdir, url, 1, n)[2]
                else:
                    code = baseline if side == "baseline" else None
                    cpu[n] = run_launcher(workdir, url, 1, n, True, code)[2]
            sides[side].append(1000 * (cpu[big] - cpu[small]) / 200)
        print(
            "  round "
            + str(index + 1)
            + ": "
            + ", ".join(f"{side} {runs[-1]:.1f} ms" for side, runs in sides.items()),
            flush=True,
        )
    plain = statistics.median(sides["plain"])
    for side, runs in sides.items():
        med = statistics.median(runs)
        extra = "" if side == "plain" else f"  extra over plain {med - plain:+.1f} ms"
        print(f"{side:>9}: median {med:.1f} ms CPU per trial{extra}")


def _count_running(url: str, name: str) -> int:
    import optuna
    from optuna.trial import TrialState

    from optuna_guard.storage import open_storage

    study = optuna.load_study(study_name=name, storage=open_storage(url))
    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=400)
    parser.add_argument(
        "--pairs", type=int, default=3, help="interleaved plain/launcher runs per cell (median)"
    )
    parser.add_argument(
        "--workers", default="1,2,4", help="worker counts, comma-separated (default 1,2,4)"
    )
    parser.add_argument(
        "--kind",
        choices=("cpu", "sleep"),
        default="cpu",
        help="trials busy-loop their length in CPU time (default) or sleep it",
    )
    parser.add_argument(
        "--guard",
        choices=("on", "off", "both"),
        default="on",
        help="launcher with its default @guard (on), --no-guard (off) or both",
    )
    parser.add_argument(
        "--trial-ms", type=float, default=20.0, help="length of a short trial (default 20 ms)"
    )
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also run the launcher from DIR/optuna_guard (e.g. "
        "`git archive <commit> optuna_guard | tar -x -C DIR`), interleaved: before/after in one run",
    )
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument("--only", choices=("throughput", "kill", "cpu", "marginal"), default=None)
    parser.add_argument(
        "--cpu-window", type=float, default=30.0, help="seconds the supervisor CPU is measured"
    )
    args = parser.parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench_launcher_") as workdir:
        with open(os.path.join(workdir, "bench_objective.py"), "w") as handle:
            handle.write(OBJECTIVE)
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
        if args.only in (None, "throughput"):
            urls = {} if args.skip_sqlite else {"sqlite": f"sqlite:///{workdir}/throughput.db"}
            if not args.skip_postgres:
                urls["postgres"] = POSTGRES_URL
            os.environ["BENCH_TRIAL_S"] = str(args.trial_ms / 1000.0)
            os.environ["BENCH_KIND"] = args.kind
            guard_modes = {"on": (True,), "off": (False,), "both": (False, True)}[args.guard]
            bench_throughput(
                workdir,
                urls,
                args.trials,
                args.pairs,
                args.trial_ms,
                tuple(int(n) for n in args.workers.split(",")),
                args.kind,
                guard_modes,
                args.baseline,
            )
            os.environ.pop("BENCH_TRIAL_S")
            os.environ.pop("BENCH_KIND")
        if args.only in (None, "kill"):
            bench_kill_to_replacement(workdir)
        if args.only in (None, "cpu"):
            bench_supervisor_cpu(
                workdir, window=args.cpu_window, pairs=args.pairs, baseline=args.baseline
            )
        if args.only == "marginal":
            os.environ["BENCH_TRIAL_S"] = str(args.trial_ms / 1000.0)
            os.environ["BENCH_KIND"] = args.kind
            bench_marginal(workdir, args.pairs, args.trial_ms, args.kind, args.baseline)
        print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
