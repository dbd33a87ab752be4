"""A guarded k-fold cross-validation study: random-Fourier-feature ridge regression in numpy.

The ``width`` hyperparameter (number of random features) drives memory: every trial caches the
feature matrix of the whole data set and copies the training rows of each fold, so wide trials
need hundreds of MB. The guard stops them before they take the machine down:

* ``@guard(max_trial_rss_gb=...)``: a sampler thread stops a trial mid-split once the process
  tree grows past the limit (here: the RSS at start + 150 MB, so wide trials trip on any
  machine without pressuring it);
* ``check_memory(trial, "split k/K")`` before each split stops a trial when the machine (or its
  cgroup) runs short of available memory;
* ``MemoryGuardPruner(MedianPruner())`` does the same at each ``trial.should_prune()`` and
  otherwise prunes unpromising trials as usual;
* ``memory_budget_gb`` writes an Optuna constraint so TPE learns to stay out of wide configs.

Run from the repository root (twice in a row works: each run is a new study):

    .venv/bin/python examples/cv_objective.py [--trials 20] [--storage URL]
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import time

import numpy as np
import optuna
from rich.console import Console
from rich.table import Table

from optuna_guard import MemoryGuardPruner, check_memory, guard, killed_trials, tags, valid_trials
from optuna_guard._units import GB
from optuna_guard.memory import process_tree_rss, system_memory
from optuna_guard.storage import default_storage_url, open_storage

N_SAMPLES, N_INPUTS, N_FOLDS, BLOCK_ROWS = 8_000, 16, 5, 1_000


def make_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth nonlinear regression problem with noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N_SAMPLES, N_INPUTS))
    y = (
        np.sin(x[:, 0] * 1.5)
        + 0.5 * x[:, 1] * x[:, 2]
        + np.cos(x[:, 3])
        + 0.1 * rng.normal(size=N_SAMPLES)
    )
    return x, y


def random_features(x: np.ndarray, width: int, gamma: float, seed: int) -> np.ndarray:
    """cos(xW + b) feature cache, built block by block (as memory-conscious code does)."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(scale=np.sqrt(2 * gamma), size=(x.shape[1], width))
    offsets = rng.uniform(0, 2 * np.pi, size=width)
    features = np.empty((x.shape[0], width))
    for start in range(0, x.shape[0], BLOCK_ROWS):
        block = x[start : start + BLOCK_ROWS]
        features[start : start + BLOCK_ROWS] = np.sqrt(2.0 / width) * np.cos(
            block @ weights + offsets
        )
    return features


def take_rows(features: np.ndarray, rows: np.ndarray) -> np.ndarray:
    out = np.empty((len(rows), features.shape[1]))
    for start in range(0, len(rows), BLOCK_ROWS):
        out[start : start + BLOCK_ROWS] = features[rows[start : start + BLOCK_ROWS]]
    return out


def fit_ridge_sgd(
    z: np.ndarray, y: np.ndarray, alpha: float, lr: float, epochs: int = 2, batch: int = 512
) -> np.ndarray:
    rng = np.random.default_rng(0)
    w = np.zeros(z.shape[1])
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch):
            idx = order[start : start + batch]
            grad = z[idx].T @ (z[idx] @ w - y[idx]) / len(idx) + alpha * w
            w -= lr * grad
    return w


def build_objective(
    x: np.ndarray, y: np.ndarray, limit_gb: float, budget_gb: float, safe_gb: float
):
    folds = np.array_split(np.random.default_rng(1).permutation(len(y)), N_FOLDS)

    @guard(
        max_trial_rss_gb=limit_gb,
        min_available_gb=safe_gb,
        warn_available_gb=2 * safe_gb,
        memory_budget_gb=budget_gb,
    )
    def objective(trial: optuna.Trial) -> float:
        width = trial.suggest_int("width", 32, 4096, log=True)
        gamma = trial.suggest_float("gamma", 1e-2, 1.0, log=True)
        alpha = trial.suggest_float("alpha", 1e-6, 1e-2, log=True)
        lr = trial.suggest_float("lr", 0.05, 1.0, log=True)
        features = random_features(x, width, gamma, seed=trial.number)
        scores = []
        for k, val_rows in enumerate(folds, start=1):
            check_memory(
                trial,
                f"split {k}/{N_FOLDS}",
                safe_threshold_gb=safe_gb,
                warning_threshold_gb=2 * safe_gb,
            )
            train_rows = np.concatenate([f for j, f in enumerate(folds, start=1) if j != k])
            z_train = take_rows(features, train_rows)
            w = fit_ridge_sgd(z_train, y[train_rows], alpha, lr)
            del z_train
            rmse = float(np.sqrt(np.mean((features[val_rows] @ w - y[val_rows]) ** 2)))
            scores.append(rmse)
            trial.report(float(np.mean(scores)), k)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return float(np.mean(scores))

    return objective


def summary_table(study: optuna.Study) -> Table:
    table = Table(title=f"Study {study.study_name}")
    for column in ("#", "state", "width", "CV RMSE", "peak RSS GB", "stopped by the guard"):
        table.add_column(
            column,
            justify="right" if column in ("#", "width", "CV RMSE", "peak RSS GB") else "left",
        )
    for trial in study.trials:
        value = (
            f"{trial.value:.4f}"
            if trial.value is not None and trial.state.name == "COMPLETE"
            else ""
        )
        reason = ""
        if trial.user_attrs.get(
            tags.EMERGENCY_KILLED
        ):  # "OOM prevention [where]: detail" -> "where: detail"
            reason = (
                trial.user_attrs.get(tags.KILL_REASON, "")
                .replace("OOM prevention [", "")
                .replace("]", "", 1)
            )
        peak = trial.user_attrs.get(tags.PEAK_RSS_GB)
        table.add_row(
            str(trial.number),
            trial.state.name,
            str(trial.params.get("width", "")),
            value,
            "" if peak is None else f"{peak:.2f}",
            reason,
        )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Guarded k-fold CV study (random-feature ridge regression)."
    )
    parser.add_argument("--trials", type=int, default=20, help="number of trials (default 20)")
    parser.add_argument(
        "--storage",
        default=None,
        help="storage URL (default: optuna_guard.db in the current directory)",
    )
    parser.add_argument(
        "--headroom-mb",
        type=float,
        default=150.0,
        help="max_trial_rss_gb = RSS at start + this (default 150 MB)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error(f"--trials must be >= 1 but got {args.trials}")

    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    x, y = make_data(args.seed)
    safe_gb = round(max(0.25, min(2.0, system_memory().available_gb * 0.1)), 2)
    storage_url = args.storage or default_storage_url()
    study = optuna.create_study(
        study_name=f"cv-ridge-{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}",
        storage=open_storage(storage_url),
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=8),
        pruner=MemoryGuardPruner(
            optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
            min_available_gb=safe_gb,
            warn_available_gb=2 * safe_gb,
        ),
    )
    study.enqueue_trial(
        {"width": 4096, "gamma": 0.1, "alpha": 1e-4, "lr": 0.5}
    )  # last week's "just try it wide"
    fit_ridge_sgd(
        random_features(x[:BLOCK_ROWS], 32, 0.1, seed=0), y[:BLOCK_ROWS], 1e-4, 0.1
    )  # warm up numpy
    start_rss_gb = process_tree_rss() / GB  # measured once everything is loaded
    limit_gb = round(start_rss_gb + args.headroom_mb / 1024, 3)
    console = Console()
    console.print(
        f"RSS at start {start_rss_gb:.2f} GB -> max_trial_rss_gb {limit_gb:.2f} GB (also the memory budget); "
        f"check_memory stops below {safe_gb:.2f} GB available (now {system_memory().available_gb:.2f} GB)."
    )
    started = time.perf_counter()
    study.optimize(build_objective(x, y, limit_gb, limit_gb, safe_gb), n_trials=args.trials)
    elapsed = time.perf_counter() - started

    console.print(summary_table(study))
    killed = killed_trials(study)
    complete = valid_trials(study, complete_only=True)
    console.print(
        f"{len(study.trials)} trials in {elapsed:.1f} s on {storage_url}: {len(complete)} complete, "
        f"{len(killed)} stopped by the guard ({', '.join(f'#{t.number}' for t in killed) or 'none'}), "
        f"{sum(t.state.name == 'PRUNED' for t in study.trials) - sum(t.state.name == 'PRUNED' for t in killed)} pruned by the median rule."
    )
    if complete:
        best = min(complete, key=lambda t: t.value)
        console.print(
            f"Best valid trial #{best.number}: CV RMSE {best.value:.4f} with {best.params}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
