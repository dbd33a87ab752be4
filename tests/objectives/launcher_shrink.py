"""Launcher tests (retries): a trial whose batch is over LAUNCHER_TEST_MAX_BATCH (default 100)
allocates until the supervisor kills it; ``halve_batch`` is the shrink hook for its retry;
``always_crash`` SIGKILLs every attempt (to exhaust retries)."""

import os
import signal
import time


def objective(trial):
    batch = trial.suggest_int("batch", 8, 256, log=True)
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    if batch > int(os.environ.get("LAUNCHER_TEST_MAX_BATCH", "100")):
        hoard = []
        for _ in range(40):  # bounded: 1 GB at most, the kill comes long before
            hoard.append(b"\x01" * (25 * 1024 * 1024))
            time.sleep(0.02)
        time.sleep(5)
    return lr * batch


def halve_batch(params):
    return dict(params, batch=params["batch"] // 2)


def always_crash(trial):
    trial.suggest_float("x", 0.0, 1.0)
    time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)
