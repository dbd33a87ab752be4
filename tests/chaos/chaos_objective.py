"""The chaos suite's workload: every trial checkpoints each step (TrialCheckpointer) and its
value is a pure function of its params (``expected_value``), so a resumed or retried trial
must end with exactly the value a clean run computes.

Kinds: normal; leak (keeps 30 MB per step alive in the worker, so workers get recycled); hog
(grows past --max-worker-rss-gb, stopped by the guard or killed); crash (SIGKILLs its own
worker at step 3 unless it resumed from a checkpoint); native (one long native call)."""

import os
import signal
import time

from optuna_guard import TrialCheckpointer

KINDS = ("normal", "leak", "hog", "crash", "native")
STEPS = 6
STEP_S = 0.2
_LEAKED = []


def expected_value(params):
    return (params["x"] - 0.25) ** 2 + KINDS.index(params["kind"]) + sum(range(STEPS)) / 1000.0


def _touch(block):
    for i in range(0, len(block), 4096):
        block[i] = 1


def objective(trial):
    x = trial.suggest_float("x", -1.0, 1.0)
    kind = trial.suggest_categorical("kind", KINDS)
    checkpointer = TrialCheckpointer(trial, root=os.environ["CHAOS_CKPT_DIR"], keep_last=2)
    resumed = checkpointer.load()
    state, first = (resumed[0], resumed[1] + 1) if resumed else ({"acc": 0}, 0)
    for step in range(first, STEPS):
        if kind == "crash" and step == 3 and resumed is None:
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hog":
            hog = []
            while True:  # past --max-worker-rss-gb: the guard stops it (or the supervisor kills)
                hog.append(bytearray(50 * 2**20))
                _touch(hog[-1])
                time.sleep(0.05)
        if kind == "leak":
            _LEAKED.append(bytearray(30 * 2**20))
            _touch(_LEAKED[-1])
        if kind == "native" and step == 2:
            time.sleep(2.0)  # one call the in-trial guard cannot interrupt
        time.sleep(STEP_S)
        state["acc"] += step
        checkpointer.save(state, step)
    checkpointer.finalize()
    return (x - 0.25) ** 2 + KINDS.index(kind) + state["acc"] / 1000.0
