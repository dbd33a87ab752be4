"""A trial that checkpoints once with a default TrialCheckpointer (no store= argument)."""

from optuna_guard import TrialCheckpointer


def objective(trial):
    x = trial.suggest_float("x", -1.0, 1.0)
    TrialCheckpointer(trial, root="local-checkpoints", format="pickle").save({"x": x}, 1)
    return x * x
