"""Worker-exit tests: an objective that runs a joblib (loky) pool of 2 processes and registers
an atexit handler writing ``atexit_<pid>`` into $WORKER_EXIT_DIR (proof the worker ran its
interpreter's normal exit)."""

import atexit
import math
import os

import joblib


def _mark_exit() -> None:
    with open(os.path.join(os.environ["WORKER_EXIT_DIR"], f"atexit_{os.getpid()}"), "w") as handle:
        handle.write("ok\n")


atexit.register(_mark_exit)


def objective(trial):
    x = trial.suggest_float("x", -1.0, 1.0)
    # math.pow, a builtin: the loky workers need not import this file
    results = joblib.Parallel(n_jobs=2, backend="loky")(
        joblib.delayed(math.pow)(x + i, 2) for i in range(4)
    )
    return float(sum(results))
