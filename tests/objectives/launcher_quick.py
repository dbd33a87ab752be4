"""Launcher tests: a short objective (sleep LAUNCHER_TEST_SLEEP seconds, default 0.02)."""

import os
import time


def objective(trial):
    x = trial.suggest_float("x", -1.0, 1.0)
    time.sleep(float(os.environ.get("LAUNCHER_TEST_SLEEP", "0.02")))
    return x * x


def maximize_me(trial):
    return trial.suggest_float("y", 0.0, 1.0)


NOT_CALLABLE = 42
