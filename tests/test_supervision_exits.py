"""How a worker ended and what happens to its trial (``_exits.decide``), and which trials of
other launches are lost (``_lease.lost_trials``): pure functions, tested as tables."""

from __future__ import annotations

import types

import pytest

from optuna_guard import tags
from optuna_guard.supervisor import _exits, _lease
from optuna_guard.supervisor._exits import ExitRecord

SIGKILLED = "worker exited with SIGKILL — perhaps the kernel OOM killer"
MEM_TAGS = {tags.EMERGENCY_KILLED: True, tags.KILL_REASON: "worker memory limit"}


@pytest.mark.parametrize(
    ("record", "outcome", "state", "tag_keys", "crash", "strike"),
    [
        # our memory kill: the kill's tags, PRUNED (or FAIL with --on-kill fail), not a crash
        (
            ExitRecord(code=-9, pid=1, in_trial=True, kill_kind="memory", kill_tags=MEM_TAGS),
            _exits.KILLED_FOR_MEMORY,
            "PRUNED",
            {tags.EMERGENCY_KILLED, tags.KILL_REASON},
            False,
            False,
        ),
        (
            ExitRecord(
                code=-9,
                pid=1,
                in_trial=True,
                kill_kind="memory",
                kill_tags=MEM_TAGS,
                on_kill="fail",
            ),
            _exits.KILLED_FOR_MEMORY,
            "FAIL",
            {tags.EMERGENCY_KILLED, tags.KILL_REASON},
            False,
            False,
        ),
        (
            ExitRecord(code=-9, pid=1, in_trial=False, kill_kind="memory", kill_tags=MEM_TAGS),
            _exits.KILLED_FOR_MEMORY,
            None,
            set(),
            False,
            False,
        ),
        # the kernel killed inside the worker's own cgroup: a memory stop, tagged, not a crash
        (
            ExitRecord(code=-9, pid=1, in_trial=True, oom_killed=True, memory_limit_gb=1.0),
            _exits.OOM_KILLED,
            "PRUNED",
            {tags.EMERGENCY_KILLED, tags.KILL_REASON, tags.KILL_LIMIT, tags.WORKER_PID},
            False,
            False,
        ),
        # --trial-timeout
        (
            ExitRecord(
                code=-9,
                pid=1,
                in_trial=True,
                kill_kind="timeout",
                kill_tags={tags.TIMED_OUT: True, tags.KILL_REASON: "trial timeout"},
            ),
            _exits.TIMED_OUT,
            "FAIL",
            {tags.TIMED_OUT, tags.KILL_REASON, tags.WORKER_PID},
            False,
            False,
        ),
        # stopping (signal / time budget) or the grace-period kill under a trial
        (
            ExitRecord(
                code=-9,
                pid=1,
                in_trial=True,
                stopping=True,
                stop_reason="launcher received SIGTERM",
            ),
            _exits.PREEMPTED,
            "FAIL",
            {tags.PREEMPTED, tags.KILL_REASON, tags.WORKER_PID},
            False,
            False,
        ),
        (
            ExitRecord(
                code=-9,
                pid=1,
                in_trial=True,
                kill_kind="preempt",
                kill_reason="preempted: grace over",
            ),
            _exits.PREEMPTED,
            "FAIL",
            {tags.PREEMPTED, tags.KILL_REASON, tags.WORKER_PID},
            False,
            False,
        ),
        # died by itself under a trial
        (
            ExitRecord(code=-9, pid=1, in_trial=True),
            _exits.CRASHED_IN_TRIAL,
            "FAIL",
            {tags.WORKER_CRASHED, tags.KILL_REASON, tags.WORKER_PID},
            True,
            False,
        ),
        (
            ExitRecord(code=1, pid=1, in_trial=True),
            _exits.CRASHED_IN_TRIAL,
            "FAIL",
            {tags.WORKER_CRASHED, tags.KILL_REASON, tags.WORKER_PID},
            True,
            False,
        ),
        # no trial
        (
            ExitRecord(
                code=-9, pid=1, in_trial=False, kill_kind="preempt", kill_reason="shutdown"
            ),
            _exits.KILLED_IDLE,
            None,
            set(),
            False,
            False,
        ),
        (
            ExitRecord(code=75, pid=1, in_trial=False),
            _exits.STORAGE_UNAVAILABLE,
            None,
            set(),
            False,
            False,
        ),
        (ExitRecord(code=17, pid=1, in_trial=False), _exits.BOOT_FAILURE, None, set(), True, True),
        (
            ExitRecord(code=17, pid=1, in_trial=False, stopping=True),
            _exits.DIED_BETWEEN_TRIALS,
            None,
            set(),
            True,
            False,
        ),
        (
            ExitRecord(code=1, pid=1, in_trial=False, trials_started=3),
            _exits.DIED_BETWEEN_TRIALS,
            None,
            set(),
            True,
            False,
        ),
        (
            ExitRecord(code=0, pid=1, in_trial=False, fatal_error="objective spec broken"),
            _exits.BOOT_FAILURE,
            None,
            set(),
            True,
            True,
        ),
        (
            ExitRecord(
                code=0, pid=1, in_trial=False, trials_started=2, deny_reason="recycle: age"
            ),
            _exits.EXITED,
            None,
            set(),
            False,
            False,
        ),
    ],
)
def test_exit_decisions(record, outcome, state, tag_keys, crash, strike):
    decision = _exits.decide(record)
    assert (
        decision.outcome,
        decision.trial_state,
        set(decision.trial_tags),
        decision.crash,
        decision.boot_strike,
    ) == (outcome, state, tag_keys, crash, strike)


def test_crash_reason_names_the_signal_and_a_worker_dying_before_its_trial_is_swept():
    decision = _exits.decide(
        ExitRecord(code=-9, pid=7, in_trial=False, ticket_without_trial=True, trials_started=1)
    )
    assert decision.sweep_unreported and not decision.sweep_as_preempted
    crashed = _exits.decide(ExitRecord(code=-9, pid=7, in_trial=True))
    assert crashed.reason == SIGKILLED and crashed.trial_tags[tags.KILL_REASON] == SIGKILLED


def _trial(launch_id, host):
    return types.SimpleNamespace(
        user_attrs={tags.LAUNCH_ID: launch_id, tags.HOSTNAME: host} if launch_id else {}
    )


NOW = 1_000_000.0


@pytest.mark.parametrize(
    ("trial", "lease", "alive_here", "lost_reason"),
    [
        (
            _trial("mine", "here"),
            None,
            False,
            None,
        ),  # our own trials: the arbiter sees our workers
        (_trial(None, "here"), None, False, None),  # no launch id: Optuna's heartbeat decides
        (_trial("other", "here"), None, True, None),  # same host, its processes live
        (
            _trial("other", "here"),
            None,
            False,
            "worker lost: launch other on host here has no process left",
        ),
        (_trial("other", "far"), None, False, None),  # no lease yet: never judged
        (
            _trial("other", "far"),
            _lease.make_lease("other", "far", 1, 1, 300, [], now=NOW - 100),
            False,
            None,
        ),
        (
            _trial("other", "far"),
            _lease.make_lease("other", "far", 1, 1, 300, [], now=NOW - 301),
            False,
            "worker lost: the lease of launch other on host far expired (last renewed 301s ago)",
        ),
        (
            _trial("other", "far"),
            _lease.make_lease("other", "far", 1, 1, 300, [], now=NOW - 5, ended=True),
            False,
            "worker lost: the lease of launch other on host far expired (ended)",
        ),
    ],
)
def test_lost_trials(trial, lease, alive_here, lost_reason):
    leases = {lease.launch_id: lease} if lease else {}
    lost = _lease.lost_trials(
        [trial],
        leases,
        own_launch_id="mine",
        own_host="here",
        now=NOW,
        launch_alive_here=lambda launch_id, lease: alive_here,
    )
    assert [reason for _trial_, reason in lost] == ([lost_reason] if lost_reason else [])


def test_lease_round_trips_through_a_system_attr():
    lease = _lease.make_lease("abc", "host", 42, 777, 300, [3, 1], now=NOW)
    assert _lease.leases_from_system_attrs(
        {_lease.lease_key("abc"): lease.to_attr(), "other": 1}
    ) == {"abc": lease}
    assert lease.trials == (1, 3) and lease.expires == NOW + 300
