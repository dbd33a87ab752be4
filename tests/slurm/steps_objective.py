"""SLURM tests: a trial of SLURM_TEST_STEPS steps (default 40) of SLURM_TEST_STEP_S seconds
(default 1.0), checkpointed after every step under SLURM_TEST_CKPT_DIR (SLURM_TEST_CHECKPOINT=0:
never, so a retry makes no progress), so a preempted trial's retry resumes where it stopped.
Each trial writes where it started and the job run it finished in."""

import os
import time

from optuna_guard.checkpoint import TrialCheckpointer


def objective(trial):
    x = trial.suggest_float("x", -1.0, 1.0)
    steps = int(os.environ.get("SLURM_TEST_STEPS", "40"))
    step_s = float(os.environ.get("SLURM_TEST_STEP_S", "1.0"))
    save = os.environ.get("SLURM_TEST_CHECKPOINT", "1") != "0"
    checkpointer = TrialCheckpointer(
        trial, root=os.environ["SLURM_TEST_CKPT_DIR"], keep_last=2, format="pickle"
    )
    loaded = checkpointer.load()
    state, start = ({"total": 0.0}, 0) if loaded is None else loaded
    for step in range(start + 1, steps + 1):
        time.sleep(step_s)
        state["total"] += x * x
        if save:
            checkpointer.save(state, step)
        trial.report(state["total"], step)
    trial.set_user_attr("started_at_step", start)
    trial.set_user_attr("slurm_job", os.environ.get("SLURM_JOB_ID", ""))
    trial.set_user_attr("slurm_restart", int(os.environ.get("SLURM_RESTART_COUNT", "0")))
    checkpointer.finalize()
    return state["total"]
