"""Launcher tests: a long trial (LAUNCHER_TEST_TRIAL_S seconds, default 60) in short sleeps,
so the in-trial guard can stop it at a bytecode boundary when the worker is told to stop."""

import os
import time


def objective(trial):
    x = trial.suggest_float("x", -1.0, 1.0)
    deadline = time.monotonic() + float(os.environ.get("LAUNCHER_TEST_TRIAL_S", "60"))
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return x * x


def stubborn(trial):
    """One native sleep: nothing can stop it before it returns (only a kill)."""
    x = trial.suggest_float("x", -1.0, 1.0)
    time.sleep(float(os.environ.get("LAUNCHER_TEST_TRIAL_S", "60")))
    return x * x
