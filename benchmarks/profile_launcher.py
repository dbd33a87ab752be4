"""Where a trial's CPU goes in a plain ``study.optimize`` process and in a launcher worker:
cProfile (timer ``time.thread_time``) in every process, started from a ``sitecustomize.py`` put on
``PYTHONPATH`` and dumped at exit, then a table of per-trial entries (ms per trial *under the
profiler*, about twice the real cost; calls per trial in brackets).

    .venv/bin/python benchmarks/profile_launcher.py [--trials 300] [--baseline DIR]

1 worker, SQLite, 20 ms CPU-bound trials, guard on (the objective of bench_launcher.py).
``--baseline DIR`` also profiles the launcher from ``DIR/optuna_guard`` (``git archive``).
"""

from __future__ import annotations

import argparse
import glob
import os
import pstats
import sys
import tempfile
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_launcher

SITECUSTOMIZE = textwrap.dedent(
    """
    import atexit, cProfile, os, time
    _role = "worker" if os.environ.get("OPTUNA_GUARD_WORKER_FD") else os.environ.get("PROF_ROLE")
    if _role and os.environ.get("PROF_DIR"):
        _profile = cProfile.Profile(time.thread_time)
        _profile.enable()

        def _dump():
            _profile.disable()
            _profile.dump_stats(
                os.path.join(os.environ["PROF_DIR"], f"{_role}-{os.getpid()}.prof")
            )

        atexit.register(_dump)
    """
)

ROWS = [
    ("Study.ask", "optuna/study/study.py:ask"),
    ("Optuna's tell (_tell_with_warning)", "optuna/study/_tell.py:_tell_with_warning"),
    ("RDBStorage.get_trial", "optuna/storages/_rdb/storage.py:get_trial"),
    ("RDBStorage._create_new_trial", "optuna/storages/_rdb/storage.py:_create_new_trial"),
    ("guard _finish_trial", "optuna_guard/trial_guard.py:_finish_trial"),
    ("SQLAlchemy Session.commit", "sqlalchemy/orm/session.py:commit"),
    ("SQLAlchemy Session.execute", "sqlalchemy/orm/session.py:execute"),
]


def _entries(path: str) -> tuple[dict[str, tuple[int, float]], float]:
    stats = pstats.Stats(path)
    out: dict[str, tuple[int, float]] = {}
    for (file, _line, name), (_cc, calls, _tt, cumulative, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        key = f"{file.split('site-packages/')[-1]}:{name}"
        old_calls, old_cum = out.get(key, (0, 0.0))
        out[key] = (old_calls + calls, old_cum + cumulative)
    return out, stats.total_tt  # type: ignore[attr-defined]


def _find(entries: dict[str, tuple[int, float]], suffix: str) -> tuple[int, float]:
    for key, value in entries.items():
        if key.endswith(suffix):
            return value
    return 0, 0.0


def _profile(workdir: str, side: str, code: str | None, trials: int) -> str:
    out = os.path.join(workdir, side)
    os.makedirs(out)
    site = os.path.join(workdir, "site")
    os.environ["PROF_DIR"] = out
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [code, site]))
    url = f"sqlite:///{workdir}/{side}.db"
    if side == "plain":
        os.environ["PROF_ROLE"] = "plain"
        bench_launcher.run_plain(workdir, url, 1, trials)
        return glob.glob(os.path.join(out, "plain-*.prof"))[0]
    os.environ["PROF_ROLE"] = "supervisor"
    bench_launcher.run_launcher(workdir, url, 1, trials, True)
    return glob.glob(os.path.join(out, "worker-*.prof"))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--baseline", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="profile-launcher-") as workdir:
        os.makedirs(os.path.join(workdir, "site"))
        with open(os.path.join(workdir, "site", "sitecustomize.py"), "w") as handle:
            handle.write(SITECUSTOMIZE)
        with open(os.path.join(workdir, "bench_objective.py"), "w") as handle:
            handle.write(bench_launcher.OBJECTIVE)
        sides = {"plain": None, "launcher": None}
        if args.baseline:
            sides["baseline"] = args.baseline
        profiles = {
            side: _entries(_profile(workdir, side, code, args.trials))
            for side, code in sides.items()
        }
    n = args.trials
    print(f"1 worker, SQLite, {n} trials of 20 ms CPU; ms per trial under the profiler (calls)")
    print("| entry | " + " | ".join(profiles) + " |")
    print("|---|" + "---|" * len(profiles))
    cells = []
    for entries, total in profiles.values():
        objective = _find(entries, "bench_objective.py:objective")[1]
        cells.append(f"{1000 * (total - objective) / n:.1f}")
    print("| everything but the objective | " + " | ".join(cells) + " |")
    for label, suffix in ROWS:
        cells = []
        for entries, _total in profiles.values():
            calls, cumulative = _find(entries, suffix)
            cells.append(f"{1000 * cumulative / n:.1f} ({calls / n:.2f})")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
