"""Objectives for the supervision tests (lifelines, launch identity, heartbeats, timeouts)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time


def slow(trial):
    """SLOW_S seconds of interruptible Python (a guarded trial stops at its next boundary)."""
    x = trial.suggest_float("x", -10, 10)
    end = time.monotonic() + float(os.environ.get("SLOW_S", "20"))
    while time.monotonic() < end:
        time.sleep(0.1)
    return x * x


def sleep_through(trial):
    """One uninterruptible SLEEP_S sleep: the guard cannot stop it before it returns."""
    x = trial.suggest_float("x", -10, 10)
    time.sleep(float(os.environ.get("SLEEP_S", "30")))
    return x * x


def _first_to_claim(flag: str) -> bool:
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def regex_hold(trial):
    """The first trial (the one that claims REGEX_ONCE_FLAG, else trial 0) holds the GIL in one
    C call (catastrophic backtracking) for REGEX_N-dependent seconds; the others sleep 0.5 s."""
    x = trial.suggest_float("x", -10, 10)
    flag = os.environ.get("REGEX_ONCE_FLAG")
    if (flag and _first_to_claim(flag)) or (not flag and trial.number == 0):
        trial.set_user_attr("held_gil", True)
        re.match(r"(a+)+$", "a" * int(os.environ.get("REGEX_N", "26")) + "b")
    else:
        time.sleep(0.5)
    return x * x


ALLOC_CHILD = (
    "import sys, time\n"
    "n = int(sys.argv[1]); b = bytearray(n)\n"
    "for i in range(0, n, 4096): b[i] = 1\n"
    "open(sys.argv[2], 'w').write('ready')\n"
    "time.sleep(600)\n"
)


def grandchild_daemon(trial):
    """A helper that daemonises (setsid + '&') and holds GRAND_GB; the trial then waits."""
    x = trial.suggest_float("x", -10, 10)
    size = int(float(os.environ.get("GRAND_GB", "0.3")) * 2**30)
    flag = os.path.join(os.environ["SUPERVISION_TMP"], f"daemon-{trial.number}.ready")
    script = os.path.join(os.environ["SUPERVISION_TMP"], "alloc_child.py")
    with open(script, "w") as handle:
        handle.write(ALLOC_CHILD)
    subprocess.run(
        ["setsid", "sh", "-c", f"{sys.executable} {script} {size} {flag} &"], check=True
    )
    end = time.monotonic() + float(os.environ.get("SLOW_S", "20"))
    while time.monotonic() < end:
        time.sleep(0.1)
    return x * x


def quick(trial):
    x = trial.suggest_float("x", -10, 10)
    time.sleep(0.3)
    return x * x


def numpy_burst(trial):
    """One numpy call that faults in ALLOC_GB as fast as this machine can."""
    import numpy as np

    x = trial.suggest_float("x", -10, 10)
    block = np.ones(int(float(os.environ.get("ALLOC_GB", "2.0")) * 2**30 / 8))
    time.sleep(1.0)
    return x * x + float(block[0]) - 1.0


def ignore_stop(trial):
    """Swallows every interrupt (a catch-all training loop) for SLOW_S seconds."""
    x = trial.suggest_float("x", -10, 10)
    end = time.monotonic() + float(os.environ.get("SLOW_S", "60"))
    while time.monotonic() < end:
        try:
            time.sleep(0.1)
        except BaseException:
            pass
    return x * x


def preempted_five_times(trial):
    """8 checkpointed steps; each of the first PREEMPTIONS attempts saves one new step and is then
    preempted (SIGTERM to its own worker, as a SLURM time limit would); the last one finishes."""
    import signal

    from optuna_guard.checkpoint import TrialCheckpointer

    x = trial.suggest_float("x", -1.0, 1.0)
    checkpointer = TrialCheckpointer(
        trial, root=os.environ["SUPERVISION_CKPT_DIR"], keep_last=2, format="pickle"
    )
    loaded = checkpointer.load()
    total, start = (0.0, 0) if loaded is None else loaded
    attempt = len(checkpointer.retry_history)
    for step in range(start + 1, 9):
        time.sleep(0.05)
        total += x * x
        if attempt < int(os.environ.get("PREEMPTIONS", "5")) and step == start + 1:
            os.kill(
                os.getpid(), signal.SIGTERM
            )  # the next save is the boundary: saved, then preempted
        checkpointer.save(total, step)
    checkpointer.finalize()
    return total
