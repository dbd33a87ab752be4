"""Launcher tests: importable by the supervisor's spec check, but every worker dies while
importing it (a broken CUDA init, a missing shared library...)."""

import os
import sys

if os.environ.get("OPTUNA_GUARD_WORKER_ID"):
    print(
        "launcher_bootcrash: cannot initialise the fake accelerator", file=sys.stderr, flush=True
    )
    os._exit(17)


def objective(trial):
    return 0.0
