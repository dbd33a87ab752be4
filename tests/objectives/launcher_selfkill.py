"""Launcher tests: trials whose number is in LAUNCHER_TEST_KILL_TRIALS SIGKILL their own worker
(what the kernel OOM killer does), the others finish normally."""

import os
import signal
import time


def objective(trial):
    x = trial.suggest_float("x", -1.0, 1.0)
    numbers = {int(n) for n in os.environ.get("LAUNCHER_TEST_KILL_TRIALS", "1").split(",") if n}
    if trial.number in numbers:
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.02)
    return x * x
