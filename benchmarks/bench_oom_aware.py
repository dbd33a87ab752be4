"""OOM-aware search: does a memory constraint (+ the pre-flight check) keep TPE out of the
configurations that run out of memory, without losing the best valid value?

A synthetic objective with SIMULATED memory (nothing is allocated; safe and fast):

* params: batch_size 32..512 and width 128..2048 (both log), lr 1e-4..1e-1 (log), optimizer
  sgd/adam;
* peak memory = 0.8 GB + 40 GB x (batch/512) x (width/2048), x1.3 with adam (optimizer state),
  x(1 +- 5 %) noise per trial;
* the machine has 12 GB available and the guard stops a trial when less than 2 GB would be
  left, so a trial needing more than 10 GB is killed (about 1 in 6 random configurations);
* loss falls with model size (log2 of batch x width), has an optimum in lr and a small optimizer
  effect, so the best valid value lies right at the memory limit;
* a trial lasts 60 s x (1 + 8 x batch/512 x width/2048) simulated seconds; a killed trial is
  stopped when its memory crosses the limit, after (limit / need) x half its duration. Those are
  the "wasted seconds".

The guard is simulated the way ``@guard`` behaves: every trial gets ``peak_rss_gb``; a killed
trial is tagged (``emergency_killed``, ``kill_reason``, ``kill_limit``, ...) and ends PRUNED (or
FAIL for the naive baseline); with a budget it writes ``memory = peak - budget`` (killed:
clearly violated) through ``optuna_guard.oom_aware.constraints.set_memory_constraint``. The
pre-flight check is the real ``optuna_guard.oom_aware.preflight.preflight_check`` with a probe
that reports the simulated 12 GB.

Variants (each: TPESampler(seed) with Optuna 5 defaults, 100 trials, 5 seeds):
  naive FAIL            killed trials end FAIL (what a bare try/except or an OOM-killed worker
                        gives): TPE never sees them
  PRUNED                killed trials end PRUNED (the guard's default), no constraint
  constraint            PRUNED + memory constraint (budget 10 GB)
  constraint (budget 9 GB)   PRUNED + constraint with a budget 1 GB under the kill point
  constraint+preflight  PRUNED + constraint (10 GB) + pre-flight check (default method
                        "auto": the base + power-law fit while it fits, else nearest neighbours)
  constraint+preflight(knn)  the same with method="knn" (nearest neighbours only)
  ..., 100 ran          the pre-flight rows again, stopping after 100 trials that actually ran
                        (a pre-flight prune costs ~0 s, so it need not use up the trial budget)

Run: .venv/bin/python benchmarks/bench_oom_aware.py [--seeds 5] [--trials 100]
(--seeds 20 for a check that the best-value comparison is not seed luck).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import optuna

from optuna_guard import tags
from optuna_guard._units import GB
from optuna_guard.memory import SystemMemory
from optuna_guard.oom_aware.constraints import set_memory_constraint
from optuna_guard.oom_aware.preflight import preflight_check

AVAILABLE_GB = 12.0  # what the machine has free for the trial
MIN_AVAILABLE_GB = 2.0  # the guard's limit: stop before less than this is left
KILL_AT_GB = AVAILABLE_GB - MIN_AVAILABLE_GB  # a trial needing more than this is killed
BUDGET_GB = KILL_AT_GB  # the memory budget written as the constraint
_FINISHED = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.FAIL,
)


def peak_memory_gb(batch: int, width: int, optimizer: str) -> float:
    return (0.8 + 40.0 * (batch / 512) * (width / 2048)) * (1.3 if optimizer == "adam" else 1.0)


def duration_s(batch: int, width: int) -> float:
    return 60.0 * (1.0 + 8.0 * (batch / 512) * (width / 2048))


def loss(batch: int, width: int, lr: float, optimizer: str) -> float:
    size = (math.log2(batch / 32) + math.log2(width / 128)) / 4.0  # 0 .. 2
    return (
        0.3
        - 0.1 * size
        + 0.02 * (math.log10(lr) + 2.5) ** 2
        + (0.0 if optimizer == "adam" else 0.01)
    )


class SimulatedMachine:
    """A MemoryProbe for the pre-flight check: 12 GB available, the worker holds nothing."""

    def system(self) -> SystemMemory:
        return SystemMemory(
            total_bytes=int(16 * GB),
            available_bytes=int(AVAILABLE_GB * GB),
            used_bytes=int((16 - AVAILABLE_GB) * GB),
            percent=100 * (16 - AVAILABLE_GB) / 16,
        )

    def process_tree_rss(self, pid: int) -> int:
        return 0

    def gpus(self) -> list:
        return []


class SimulatedOOM(Exception):
    """How a killed trial ends in the naive baseline (caught by optimize -> FAIL)."""


@dataclass(frozen=True)
class Variant:
    name: str
    killed_state: str  # "fail" or "pruned"
    budget_gb: float | None  # memory constraint budget, None: no constraint
    preflight: str | None  # None, or the pre-flight method: "auto", "regression", "knn"
    free_preflight: bool = False  # pre-flight prunes do not count towards the trial budget


VARIANTS = (
    Variant("naive FAIL", "fail", None, None),
    Variant("PRUNED", "pruned", None, None),
    Variant("constraint", "pruned", BUDGET_GB, None),
    Variant("constraint (budget 9 GB)", "pruned", 9.0, None),
    Variant("constraint+preflight", "pruned", BUDGET_GB, "auto"),
    Variant("constraint+preflight(knn)", "pruned", BUDGET_GB, "knn"),
    Variant("c+preflight, 100 ran", "pruned", BUDGET_GB, "auto", free_preflight=True),
    Variant("c+preflight(knn), 100 ran", "pruned", BUDGET_GB, "knn", free_preflight=True),
)
OURS = "constraint+preflight"


@dataclass
class Outcome:
    trials: int = 0
    kills: int = 0
    preflight_prunes: int = 0
    wasted_s: float = 0.0
    total_s: float = 0.0
    best_valid: float = math.inf
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def run(variant: Variant, seed: int, n_trials: int) -> Outcome:
    outcome = Outcome()
    probe = SimulatedMachine()

    def objective(trial: optuna.Trial) -> float:
        if variant.preflight:
            preflight_check(
                trial,
                probe=probe,
                margin_gb=MIN_AVAILABLE_GB,
                method=variant.preflight,
                budget_gb=variant.budget_gb,
                max_trial_rss_gb=None,
            )
        batch = trial.suggest_int("batch_size", 32, 512, log=True)
        width = trial.suggest_int("width", 128, 2048, log=True)
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        optimizer = trial.suggest_categorical("optimizer", ["sgd", "adam"])
        noise = 1.0 + 0.05 * math.sin(
            1000.0 * (seed + 1) + 7.0 * trial.number
        )  # deterministic +-5 %
        need = peak_memory_gb(batch, width, optimizer) * noise
        length = duration_s(batch, width)
        if need > KILL_AT_GB:
            wasted = 0.5 * length * KILL_AT_GB / need
            outcome.kills += 1
            outcome.wasted_s += wasted
            outcome.total_s += wasted
            peak = round(KILL_AT_GB, 2)  # what the guard measured when it stopped the trial
            for key, value in (
                (tags.EMERGENCY_KILLED, True),
                (
                    tags.KILL_REASON,
                    f"OOM prevention [Trial #{trial.number}]: available 1.9 GB < 2.0 GB",
                ),
                (tags.KILL_LIMIT, "min_available_gb"),
                (tags.AVAILABLE_GB_AT_KILL, 1.9),
                (tags.PEAK_RSS_GB, peak),
            ):
                trial.set_user_attr(key, value)
            if variant.budget_gb is not None:
                set_memory_constraint(trial, peak, variant.budget_gb, killed=True)
            if variant.killed_state == "fail":
                raise SimulatedOOM(f"trial {trial.number} needed {need:.1f} GB")
            raise optuna.TrialPruned(f"killed at {peak} GB")
        outcome.total_s += length
        trial.set_user_attr(tags.PEAK_RSS_GB, round(need, 2))
        if variant.budget_gb is not None:
            set_memory_constraint(trial, round(need, 2), variant.budget_gb)
        value = loss(batch, width, lr, optimizer)
        outcome.best_valid = min(outcome.best_valid, value)
        return value

    sampler = optuna.samplers.TPESampler(seed=seed)
    study = optuna.create_study(sampler=sampler)
    callbacks = []
    if (
        variant.free_preflight
    ):  # stop when n_trials trials actually ran (pre-flight prunes cost ~0 s)

        def stop_after_n_ran(study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
            finished = study.get_trials(deepcopy=False, states=_FINISHED)
            if sum(t.user_attrs.get(tags.KILL_LIMIT) != "preflight" for t in finished) >= n_trials:
                study.stop()

        callbacks.append(stop_after_n_ran)
    started = time.perf_counter()
    study.optimize(
        objective,
        n_trials=3 * n_trials if variant.free_preflight else n_trials,
        catch=(SimulatedOOM,),
        callbacks=callbacks,
    )
    outcome.seconds = time.perf_counter() - started
    outcome.preflight_prunes = sum(
        t.user_attrs.get(tags.KILL_LIMIT) == "preflight" for t in study.trials
    )
    outcome.trials = len(study.trials)
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=100)
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    import logging

    logging.getLogger("optuna_guard").setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    seeds = list(range(args.seeds))
    results: dict[str, list[Outcome]] = {}
    for variant in VARIANTS:
        results[variant.name] = [run(variant, seed, args.trials) for seed in seeds]

    print(
        f"OOM-aware search: {args.trials} trials x {len(seeds)} seeds, TPE (Optuna {optuna.__version__} defaults),"
    )
    print(
        f"simulated machine {AVAILABLE_GB:.0f} GB available, kill above {KILL_AT_GB:.0f} GB, budget {BUDGET_GB:.0f} GB\n"
    )
    header = (
        f"{'variant':<27} {'trials':>6} {'kills/seed':>10} {'kills total':>11} {'vs naive':>9} {'pre-flight':>10} "
        f"{'wasted s':>9} {'study s':>8} {'best valid':>10}  {'best valid per seed':<{7 * len(seeds)}} {'cpu s':>6}"
    )
    print(header)
    print("-" * len(header))
    naive_kills = sum(o.kills for o in results[VARIANTS[0].name])
    for name, outcomes in results.items():
        kills = [o.kills for o in outcomes]
        total = sum(kills)
        per_seed_best = " ".join(f"{o.best_valid:.4f}" for o in outcomes)
        print(
            f"{name:<27} {statistics.median(o.trials for o in outcomes):>6.0f} {statistics.median(kills):>10.1f} {total:>11d} "
            f"{(total / naive_kills - 1) * 100 if naive_kills else 0:>+8.0f}% "
            f"{statistics.median(o.preflight_prunes for o in outcomes):>10.1f} "
            f"{statistics.median(o.wasted_s for o in outcomes):>9.0f} "
            f"{statistics.median(o.total_s for o in outcomes):>8.0f} "
            f"{statistics.median(o.best_valid for o in outcomes):>10.4f}  {per_seed_best:<{7 * len(seeds)}} "
            f"{sum(o.seconds for o in outcomes):>6.1f}"
        )
    print()
    print(
        "trials = trials in the study (median); kills = trials the (simulated) guard stopped mid-run;"
    )
    print(
        "pre-flight = trials pruned before they started (tagged emergency_killed, kill_limit=preflight,"
    )
    print(
        "0 s wasted); wasted s / study s / best valid = medians over seeds (simulated seconds; loss,"
    )
    print(
        "lower is better); 'vs naive' = change in total kills against 'naive FAIL'; '100 ran' rows stop"
    )
    print(
        "after 100 trials that ran (pre-flight prunes are free); cpu s = real time of the variant here."
    )
    naive_best = statistics.median(o.best_valid for o in results[VARIANTS[0].name])
    ours = results[OURS]
    ours_kills = sum(o.kills for o in ours)
    ours_best = statistics.median(o.best_valid for o in ours)
    print()
    print(
        f"target ({OURS} vs naive FAIL): >= 50 % fewer kills -> "
        f"{(1 - ours_kills / naive_kills) * 100 if naive_kills else 0:.0f} % fewer; median best valid "
        f"{ours_best:.4f} vs {naive_best:.4f} ({'equal or better' if ours_best <= naive_best else 'WORSE'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
