"""Crash-loop strikes (``_exits.decide``): only a worker's own failure before its first trial
strikes; a signal someone else sent does not (issue 16 follow-up)."""

from __future__ import annotations

import pytest

from optuna_guard.supervisor import _exits
from optuna_guard.supervisor._exits import ExitRecord

BOOT = dict(pid=1, in_trial=False, trials_started=0)


@pytest.mark.parametrize(
    ("record", "outcome", "crash", "strike"),
    [
        (ExitRecord(code=1, **BOOT), _exits.BOOT_FAILURE, True, True),
        (
            ExitRecord(code=70, fatal_error="No module named 'x'", **BOOT),
            _exits.BOOT_FAILURE,
            True,
            True,
        ),
        # without a cgroup of its own a SIGKILL may be the kernel OOM killer: today's strike
        (ExitRecord(code=-9, **BOOT), _exits.BOOT_FAILURE, True, True),
        # with one, the kernel's OOM kill is recorded: an unrecorded SIGKILL came from outside
        (ExitRecord(code=-9, own_cgroup=True, **BOOT), _exits.KILLED_AT_BOOT, False, False),
        (
            ExitRecord(code=-9, own_cgroup=True, oom_killed=True, **BOOT),
            _exits.OOM_KILLED,
            False,
            True,
        ),
        (ExitRecord(code=-15, **BOOT), _exits.KILLED_AT_BOOT, False, False),
        (ExitRecord(code=-15, own_cgroup=True, **BOOT), _exits.KILLED_AT_BOOT, False, False),
        (ExitRecord(code=-2, **BOOT), _exits.KILLED_AT_BOOT, False, False),
        (ExitRecord(code=-1, **BOOT), _exits.KILLED_AT_BOOT, False, False),
        # the process's own faults stay strikes
        (ExitRecord(code=-11, **BOOT), _exits.BOOT_FAILURE, True, True),
        (ExitRecord(code=-6, own_cgroup=True, **BOOT), _exits.BOOT_FAILURE, True, True),
        # after a trial: never a strike
        (
            ExitRecord(code=-15, pid=1, in_trial=False, trials_started=2),
            _exits.DIED_BETWEEN_TRIALS,
            True,
            False,
        ),
        (
            ExitRecord(
                code=-9, pid=1, in_trial=True, trials_started=1, oom_killed=True, own_cgroup=True
            ),
            _exits.OOM_KILLED,
            False,
            False,
        ),
        # the storage, not the worker, is at fault
        (
            ExitRecord(code=_exits.EXIT_STORAGE_UNAVAILABLE, **BOOT),
            _exits.STORAGE_UNAVAILABLE,
            False,
            False,
        ),
        # told to exit and killed after the bounded exit wait
        (
            ExitRecord(code=-9, kill_kind=_exits.EXIT_KILL, kill_reason="did not exit", **BOOT),
            _exits.KILLED_IDLE,
            False,
            False,
        ),
    ],
    ids=lambda value: None if isinstance(value, ExitRecord) else str(value),
)
def test_boot_exit_strikes(record, outcome, crash, strike):
    decision = _exits.decide(record)
    assert (decision.outcome, decision.crash, decision.boot_strike) == (outcome, crash, strike), (
        decision.reason
    )
