"""Multi-host test objective: MH_STEPS steps of MH_STEP_S seconds, a checkpoint after each step.

Checkpoints go through ``TrialCheckpointer`` with a root private to the simulated host
(MH_CKPT_ROOT); when the checkpointer has an artifact store (OPTUNA_GUARD_CHECKPOINT_STORE set by
the test to a shared FileSystemArtifactStore directory), a retry on another host resumes from it.
Each step is reported as an intermediate value, so the test sees how far a trial got.
"""

import os
import socket
import time

from optuna_guard.checkpoint import TrialCheckpointer


def objective(trial):
    steps = int(os.environ.get("MH_STEPS", "8"))
    step_s = float(os.environ.get("MH_STEP_S", "0.3"))
    x = trial.suggest_float("x", -1.0, 1.0)
    checkpointer = TrialCheckpointer(
        trial, root=os.environ["MH_CKPT_ROOT"], keep_last=2, format="pickle"
    )
    loaded = checkpointer.load()
    state, start = ({"total": 0.0}, 0) if loaded is None else loaded
    for step in range(start + 1, steps + 1):
        time.sleep(step_s)
        state["total"] += x * x
        checkpointer.save(state, step)
        trial.report(state["total"], step)
    trial.set_user_attr("started_at_step", start)
    trial.set_user_attr("ran_on", socket.gethostname())
    checkpointer.finalize()
    return state["total"]
