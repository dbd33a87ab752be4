"""What the launcher takes from a long trial while it runs (issue 15: at most 0.25 % of a core
per worker for the sampler, heartbeat and watchdog together).

Starts ``optuna-guard run`` with W workers whose trials busy-loop for a long time, waits until
every worker is inside its trial, then reads over a window (``/proc/<pid>/task/*/stat``):

* each worker's threads other than its main thread (the trial runs there): the guard's watcher,
  the lifeline, the inbox, anything else the launcher started;
* the supervisor process (its loop, its heartbeat thread), shared by the W workers.

A plain ``study.optimize`` process has no such threads and no supervisor, so these figures are
the whole background cost. /proc counts in 10 ms ticks: use a window of 20 s or more.

    .venv/bin/python benchmarks/bench_background.py [--workers 1,2,4] [--window 20] [--rounds 2] \
        [--baseline DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_launcher

TICK = os.sysconf("SC_CLK_TCK")

OBJECTIVE = textwrap.dedent(
    """
    import time

    def objective(trial):
        x = trial.suggest_float("x", -1.0, 1.0)
        end = time.thread_time() + 600.0  # ended by the benchmark long before
        while time.thread_time() < end:
            pass
        return x * x
    """
)


def _thread_ticks(pid: int) -> dict[int, int]:
    ticks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks[int(tid)] = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks


def _count_running(url: str, name: str) -> int:
    import optuna

    from optuna_guard.storage import open_storage

    study = optuna.load_study(study_name=name, storage=open_storage(url))
    return sum(
        t.state == optuna.trial.TrialState.RUNNING for t in study.get_trials(deepcopy=False)
    )


def measure(
    workdir: str, workers: int, window: float, code: str | None = None
) -> tuple[list[float], float]:
    """(background % of a core of each worker, supervisor % of a core) over ``window``;
    ``code``: a directory holding another ``optuna_guard`` to run instead (before/after)."""
    import optuna

    from optuna_guard.storage import open_storage

    url = f"sqlite:///{workdir}/background-{uuid.uuid4().hex[:8]}.db"
    name = "background"
    optuna.create_study(study_name=name, storage=open_storage(url))
    proc = subprocess.Popen(
        bench_launcher.launcher_command(workdir, url, name, workers, workers),
        cwd=workdir,
        env=dict(os.environ, PYTHONPATH=code) if code else None,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while _count_running(url, name) < workers:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the workers did not start their trials")
            time.sleep(0.5)
        time.sleep(2.0)  # past the trials' first seconds (first heartbeat, guard start)
        supervisor = psutil.Process(proc.pid)
        worker_pids = [
            child.pid
            for child in supervisor.children()
            if "optuna_guard.supervisor._worker" in " ".join(child.cmdline())
        ]
        assert len(worker_pids) == workers, worker_pids
        before = {pid: _thread_ticks(pid) for pid in [proc.pid, *worker_pids]}
        time.sleep(window)
        after = {pid: _thread_ticks(pid) for pid in [proc.pid, *worker_pids]}
    finally:
        proc.terminate()  # the workers stop their trials (preempted) and exit
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()

    def percent(ticks: int) -> float:
        return 100.0 * ticks / TICK / window

    background = []
    for pid in worker_pids:
        ticks = sum(after[pid][tid] - before[pid].get(tid, 0) for tid in after[pid] if tid != pid)
        background.append(percent(ticks))
    sup = sum(after[proc.pid][tid] - before[proc.pid].get(tid, 0) for tid in after[proc.pid])
    return background, percent(sup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--baseline",
        default=None,
        help="also run the launcher from DIR/optuna_guard (git archive of an older commit), "
        "interleaved",
    )
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    print(
        f"Background CPU while W long CPU-bound trials run (SQLite, guard on, {args.window:g} s "
        f"window, {args.rounds} rounds, median; target <= 0.25 % of a core per worker)"
    )
    with tempfile.TemporaryDirectory(prefix="bench-background-") as workdir:
        with open(os.path.join(workdir, "bench_objective.py"), "w") as handle:
            handle.write(OBJECTIVE)
        print("| workers | code | worker threads % (each) | supervisor % | per worker % |")
        print("|---|---|---|---|---|")
        sides = {"now": None, "baseline": args.baseline} if args.baseline else {"now": None}
        for workers in (int(w) for w in args.workers.split(",")):
            runs: dict[str, tuple[list[float], list[float], list[float]]] = {
                side: ([], [], []) for side in sides
            }
            for _ in range(args.rounds):
                for side, code in sides.items():
                    background, sup = measure(workdir, workers, args.window, code)
                    threads, sups, per_worker = runs[side]
                    threads.extend(background)
                    sups.append(sup)
                    per_worker.append(statistics.mean(background) + sup / workers)
            for side, (threads, sups, per_worker) in runs.items():
                print(
                    f"| {workers} | {side} | {statistics.median(threads):.2f} "
                    f"(max {max(threads):.2f}) | {statistics.median(sups):.2f} | "
                    f"{statistics.median(per_worker):.2f} |",
                    flush=True,
                )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
