"""Objectives for the fault tests (issue 10)."""

import time


def stubborn(trial):
    """One long native call: SIGTERM's soft stop cannot land until it returns."""
    x = trial.suggest_float("x", -1.0, 1.0)
    time.sleep(60)
    return x * x
