"""Launcher tests (crash-safe trials): 10 training steps with a TrialCheckpointer under
LAUNCHER_TEST_CKPT_DIR. The first attempt of a trial SIGKILLs its own worker after saving step
LAUNCHER_TEST_DIE_AT_STEP (0 = never); a retry resumes from the chain's last checkpoint.
Each step sleeps LAUNCHER_TEST_STEP_S seconds."""

import os
import signal
import time

from optuna_guard.checkpoint import TrialCheckpointer

STEPS = 10


def objective(trial):
    x = trial.suggest_float("x", -1.0, 1.0)
    die_at = int(os.environ.get("LAUNCHER_TEST_DIE_AT_STEP", "0"))
    step_s = float(os.environ.get("LAUNCHER_TEST_STEP_S", "0.02"))
    checkpointer = TrialCheckpointer(
        trial, root=os.environ["LAUNCHER_TEST_CKPT_DIR"], keep_last=2, format="pickle"
    )
    loaded = checkpointer.load()
    state, start = ({"total": 0.0, "steps_run": []}, 0) if loaded is None else loaded
    is_retry = checkpointer.retry_history != []
    for step in range(start + 1, STEPS + 1):
        time.sleep(step_s)
        state["total"] += x * x
        state["steps_run"].append(step)
        checkpointer.save(state, step)
        if not is_retry and step == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
    trial.set_user_attr("steps_run_here", state["steps_run"][-(STEPS - start) :])
    trial.set_user_attr("started_at_step", start)
    checkpointer.finalize()
    return state["total"]
