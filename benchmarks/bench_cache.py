"""Benchmark: how often TPE repeats a configuration, and what the result cache saves.

TPE on 3 categorical params of 4 values each (64 configurations), a 0.2 s objective, 200 trials,
2 launcher workers, per seed with and without ``--cache``. Prints the fraction of duplicate
proposals (a trial whose params an earlier trial already had), wall time, the number of
objective runs and the best value (which must be equal in both modes: the cache changes no
result), then the cost of a cache lookup at 10,000 COMPLETE trials.

    .venv/bin/python benchmarks/bench_cache.py                 # defaults of issue 13 (~4 min)
    .venv/bin/python benchmarks/bench_cache.py --seeds 0 1 --trials 100
    .venv/bin/python benchmarks/bench_cache.py --lookup-only
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHOICES = {"a": [0, 1, 2, 3], "b": ["relu", "gelu", "tanh", "silu"], "c": [16, 32, 64, 128]}
_B_COST = {"relu": 0.3, "gelu": 0.0, "tanh": 0.9, "silu": 0.1}


def objective(trial) -> float:  # the benchmarked objective (workers import this file)
    a = trial.suggest_categorical("a", CHOICES["a"])
    b = trial.suggest_categorical("b", CHOICES["b"])
    c = trial.suggest_categorical("c", CHOICES["c"])
    time.sleep(float(os.environ.get("BENCH_CACHE_SLEEP", "0.2")))
    return (a - 2) ** 2 + _B_COST[b] + abs(c - 64) / 64


def _run(seed: int, trials: int, workers: int, cache: bool, sleep: float, tmp: str) -> dict:
    import optuna

    url = f"sqlite:///{os.path.join(tmp, f'bench_{seed}_{int(cache)}.db')}"
    name = f"bench-cache-{seed}-{int(cache)}"
    args = [
        sys.executable,
        "-m",
        "optuna_guard.cli",
        "run",
        f"{os.path.abspath(__file__)}:objective",
        "--study-name",
        name,
        "--storage",
        url,
        "--workers",
        str(workers),
        "--n-trials",
        str(trials),
        "--sampler",
        "tpe",
        "--seed",
        str(seed),
        "--display",
        "off",
        "--max-worker-age",
        "off",
        "--log-dir",
        os.path.join(tmp, f"logs_{seed}_{int(cache)}"),
    ] + (["--cache"] if cache else [])
    started = time.perf_counter()
    result = subprocess.run(
        args, capture_output=True, text=True, env={**os.environ, "BENCH_CACHE_SLEEP": str(sleep)}
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"launch failed (exit {result.returncode}): {result.stderr[-1500:]}")
    study = optuna.load_study(study_name=name, storage=url)
    ordered = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    seen: set[tuple] = set()
    duplicates = 0
    for trial in ordered:
        key = tuple(sorted(trial.params.items()))
        duplicates += key in seen
        seen.add(key)
    served = sum(t.user_attrs.get("cached_from") is not None for t in ordered)
    return {
        "wall_s": wall,
        "duplicates": duplicates / len(ordered),
        "runs": len(ordered) - served,
        "served": served,
        "best": study.best_value,
        "distinct": len(seen),
    }


def _bulk_sqlite_trials(
    path: str, study_id: int, first_number: int, n_trials: int, dists: dict
) -> None:
    """Insert COMPLETE trials straight into Optuna's schema (Optuna writes one trial per
    transaction: 10,000 trials would take minutes)."""
    import datetime
    import sqlite3

    from optuna.distributions import distribution_to_json

    now = datetime.datetime.now().isoformat(sep=" ")
    a_json, b_json = distribution_to_json(dists["a"]), distribution_to_json(dists["b"])
    with sqlite3.connect(path) as db:
        base = db.execute("SELECT COALESCE(MAX(trial_id), 0) FROM trials").fetchone()[0] + 1
        ids = range(base, base + n_trials)
        db.executemany(
            "INSERT INTO trials (trial_id, number, study_id, state, datetime_start, datetime_complete) "
            "VALUES (?, ?, ?, 'COMPLETE', ?, ?)",
            [(tid, first_number + i, study_id, now, now) for i, tid in enumerate(ids)],
        )
        db.executemany(
            "INSERT INTO trial_params (trial_id, param_name, param_value, distribution_json) VALUES (?, ?, ?, ?)",
            [
                row
                for i, tid in enumerate(ids)
                for row in (
                    (tid, "a", float(first_number + i), a_json),
                    (tid, "b", float((first_number + i) % 4), b_json),
                )
            ],
        )
        db.executemany(
            "INSERT INTO trial_values (trial_id, objective, value, value_type) VALUES (?, 0, ?, 'FINITE')",
            [(tid, float(first_number + i)) for i, tid in enumerate(ids)],
        )
        db.executemany(
            "INSERT INTO trial_user_attributes (trial_id, key, value_json) VALUES (?, 'objective_version', '1')",
            [(tid,) for tid in ids],
        )


def lookup_cost(n_trials: int = 10_000) -> None:
    """Index build and per-trial lookup (incremental refresh + key + dict lookup) at n_trials."""
    import optuna
    from optuna.distributions import CategoricalDistribution, IntDistribution
    from optuna.trial import TrialState, create_trial

    from optuna_guard.result_cache import ResultCache

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {"a": IntDistribution(0, 10**6), "b": CategoricalDistribution(CHOICES["b"])}
    for label in ("in-memory", "SQLite (Optuna's cached storage)"):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "lookup.db")
            if label == "in-memory":
                study = optuna.create_study()
                study.add_trials(
                    [
                        create_trial(
                            params={"a": i, "b": CHOICES["b"][i % 4]},
                            distributions=dists,
                            value=float(i),
                            state=TrialState.COMPLETE,
                            user_attrs={"objective_version": 1},
                        )
                        for i in range(n_trials)
                    ]
                )
            else:
                created = optuna.create_study(study_name="lookup", storage=f"sqlite:///{path}")
                _bulk_sqlite_trials(path, created._study_id, 0, n_trials, dists)
                study = optuna.load_study(study_name="lookup", storage=f"sqlite:///{path}")
            cache = ResultCache(study._study_id, version=1, digest="d" * 64)
            build = time.perf_counter()
            cache.refresh(study._storage)
            build = time.perf_counter() - build
            samples = []
            for i in range(50):
                study.add_trial(
                    create_trial(
                        params={"a": n_trials + i, "b": "relu"},
                        distributions=dists,
                        value=1.0,
                        state=TrialState.COMPLETE,
                        user_attrs={"objective_version": 1},
                    )
                )
                study._thread_local.cached_all_trials = (
                    None  # what ask() does: one storage sync per trial
                )
                started = time.perf_counter()
                cache.refresh(
                    study._storage,
                    study._get_trials(
                        deepcopy=False, states=(TrialState.COMPLETE,), use_cache=True
                    ),
                )
                hit = cache.lookup({"a": i * 7, "b": CHOICES["b"][(i * 7) % 4]})
                samples.append(time.perf_counter() - started)
                assert hit is not None
            index_only = []
            for i in range(50):
                started = time.perf_counter()
                cache.refresh(
                    study._storage,
                    study._get_trials(
                        deepcopy=False, states=(TrialState.COMPLETE,), use_cache=True
                    ),
                )
                cache.lookup({"a": i * 7, "b": CHOICES["b"][(i * 7) % 4]})
                index_only.append(time.perf_counter() - started)
            print(
                f"lookup at {n_trials} trials, {label}: first index build {build * 1000:.1f} ms; per trial, "
                f"storage sync + refresh + lookup median {statistics.median(samples) * 1000:.2f} ms "
                f"(max {max(samples) * 1000:.2f} ms), of which the cache's own refresh + lookup "
                f"{statistics.median(index_only) * 1000:.2f} ms (the sync is shared with the sampler); "
                f"{len(cache)} configurations indexed"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--sleep", type=float, default=0.2, help="objective duration in seconds (default 0.2)"
    )
    parser.add_argument("--lookup-trials", type=int, default=10_000)
    parser.add_argument("--lookup-only", action="store_true")
    args = parser.parse_args()
    if not args.lookup_only:
        print(
            f"TPE, 3 categorical params x 4 values (64 configurations), {args.trials} trials, "
            f"{args.workers} workers, {args.sleep} s objective"
        )
        print(
            f"{'seed':>4} {'mode':>8} {'wall s':>7} {'dup frac':>8} {'runs':>5} {'served':>6} {'distinct':>8} {'best':>8}"
        )
        ratios, fractions, equal = [], [], True
        with tempfile.TemporaryDirectory() as tmp:
            for seed in args.seeds:
                rows = {}
                for cache in (False, True):
                    row = _run(seed, args.trials, args.workers, cache, args.sleep, tmp)
                    rows[cache] = row
                    print(
                        f"{seed:>4} {'cache' if cache else 'no cache':>8} {row['wall_s']:>7.1f} {row['duplicates']:>8.2f} "
                        f"{row['runs']:>5} {row['served']:>6} {row['distinct']:>8} {row['best']:>8.4f}",
                        flush=True,
                    )
                ratios.append(rows[True]["wall_s"] / rows[False]["wall_s"])
                fractions.append(rows[False]["duplicates"])
                equal &= rows[True]["best"] == rows[False]["best"]
        print(
            f"duplicate proposals without cache: mean {statistics.mean(fractions):.2f} of trials; "
            f"wall time with/without cache: mean ratio {statistics.mean(ratios):.2f}; "
            f"best values equal in every seed: {equal}"
        )
    lookup_cost(args.lookup_trials)


if __name__ == "__main__":
    main()
