"""Launcher tests: trials whose number is in LAUNCHER_TEST_ALLOC_TRIALS allocate
LAUNCHER_TEST_CHUNK_MB (default 25) MB every 20 ms, bounded by LAUNCHER_TEST_ALLOC_MAX_MB
(default 800), then linger; the others finish at once. Bounded so a broken watchdog can never
run the machine out of memory: the test fails instead."""

import os
import time


def objective(trial):
    x = trial.suggest_float("x", -1.0, 1.0)
    numbers = {int(n) for n in os.environ.get("LAUNCHER_TEST_ALLOC_TRIALS", "1").split(",") if n}
    if trial.number in numbers:
        chunk = int(os.environ.get("LAUNCHER_TEST_CHUNK_MB", "25")) * 1024 * 1024
        limit = int(os.environ.get("LAUNCHER_TEST_ALLOC_MAX_MB", "800")) * 1024 * 1024
        hoard = []
        while sum(map(len, hoard)) < limit:
            hoard.append(b"\x01" * chunk)
            time.sleep(0.02)
        time.sleep(3.0)
        trial.set_user_attr("allocation_finished", True)
    return x * x
