"""Launcher tests for --sampler/--pruner factories: the objective records what its study got."""

import optuna


def objective(trial):
    study = trial.study
    trial.set_user_attr("sampler", type(study.sampler).__name__)
    trial.set_user_attr("sampler_seed_given", getattr(study.sampler, "seed_given", None))
    pruner = study.pruner
    trial.set_user_attr("pruner", type(pruner).__name__)
    inner = getattr(pruner, "wrapped", None) or getattr(pruner, "_wrapped", None)
    trial.set_user_attr("wrapped_pruner", type(inner).__name__ if inner is not None else None)
    trial.set_user_attr("n_startup_trials", getattr(inner, "_n_startup_trials", None))
    x = trial.suggest_float("x", 0.0, 1.0)
    trial.report(x, step=0)
    return x


def maximize_score(trial):
    return trial.suggest_float("accuracy", 0.0, 1.0)


def make_study_sampler(seed=None):  # also importable as a module from this directory
    sampler = optuna.samplers.RandomSampler(seed=seed)
    sampler.seed_given = seed
    return sampler
