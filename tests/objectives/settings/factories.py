"""--sampler/--pruner factories next to the objective file (found relative to it)."""

import optuna

from optuna_guard import DivergencePruner, MemoryGuardPruner


def make_sampler(seed=None):
    sampler = optuna.samplers.QMCSampler(seed=seed)
    sampler.seed_given = seed
    return sampler


def make_pruner():
    return MemoryGuardPruner(optuna.pruners.MedianPruner(n_startup_trials=5), min_available_gb=0.1)


def make_divergence_pruner():
    return DivergencePruner(optuna.pruners.MedianPruner(n_startup_trials=7))


def not_a_pruner():
    return "median"


def broken():
    raise RuntimeError("no such dataset")


SAMPLER = optuna.samplers.RandomSampler(seed=3)


def plain_sampler():
    return optuna.samplers.RandomSampler()
