"""Faults of whole hosts on one study: host loss, long and short partitions, a database restart.

Three simulated hosts (network namespaces with their own hostname and PID namespace) each run
``optuna-guard run`` against the session's own PostgreSQL cluster on a fourth namespace. Trials
are 8 steps of 0.3 s with a checkpoint per step. Each test measures what a user would: the time
from the fault to the lost trials being ended and to the first retry running, and what was lost
(``MULTIHOST-FIGURE`` lines, also appended to $MULTIHOST_FIGURES when set).
"""

from __future__ import annotations

import time

import pytest
from mh_harness import (
    HEARTBEAT_GRACE,
    HEARTBEAT_INTERVAL,
    assert_end_invariants,
    local_time,
    report_figure,
    retries_of,
    running_on,
)
from optuna.trial import TrialState

# Detection must happen within grace + one interval; the machine running the tests is shared and
# loaded, so a few seconds of scheduling delay are tolerated (and the measured figure reported).
LOAD_SLACK_S = 5.0
DETECTION_LIMIT_S = HEARTBEAT_GRACE + HEARTBEAT_INTERVAL + LOAD_SLACK_S
STEPS = 8


def _ended_by_others(run, numbers: set[int], timeout: float):
    """Wait until none of ``numbers`` is RUNNING; return those trials."""

    def done(trials):
        mine = [t for t in trials if t.number in numbers]
        return mine if all(t.state != TrialState.RUNNING for t in mine) else None

    return run.wait_for(f"trials {sorted(numbers)} to be ended", done, timeout=timeout)


def _first_retry_started(run, numbers: set[int], timeout: float) -> float:
    """Wait until a retry of one of ``numbers`` has started; return its start time."""

    def started(trials):
        starts = [
            local_time(r.datetime_start)
            for n in numbers
            for r in retries_of(trials, n)
            if r.datetime_start is not None
        ]
        return min(starts) if starts else None

    return run.wait_for(f"a retry of {sorted(numbers)} to start", started, timeout=timeout)


def _assert_lost_trials_tagged(trials, hostname: str) -> None:
    for t in trials:
        assert t.state in (TrialState.FAIL, TrialState.PRUNED), (
            f"trial {t.number} is {t.state.name}"
        )
        assert t.user_attrs.get("worker_lost") is True, (
            f"trial {t.number} not tagged worker_lost: {t.user_attrs}"
        )
        reason = str(t.user_attrs.get("kill_reason", ""))
        assert hostname in reason, (
            f"kill_reason of trial {t.number} does not name host {hostname}: {reason!r}"
        )
        assert t.values is None, f"trial {t.number} got a value although it was ended as lost"


def test_host_loss_survivors_end_and_retry_its_trials_from_checkpoints(mh_run):
    run = mh_run
    victim, hostname = 3, run.hosts.hostname(3)
    for host in (1, 2):
        run.launch(host, n_trials=12)
    run.launch(victim, n_trials=12)
    run.wait_for(
        "host 3 to be 3 steps into a trial", lambda ts: running_on(ts, hostname, 3), timeout=180
    )

    run.kill_host(victim)
    t_fault = time.time()
    at_kill = {
        t.number: len(t.intermediate_values)
        for t in run.trials()
        if t.state == TrialState.RUNNING and t.user_attrs.get("hostname") == hostname
    }
    assert at_kill, "host 3 had no RUNNING trial when it was killed"

    ended = _ended_by_others(run, set(at_kill), timeout=DETECTION_LIMIT_S + 60)
    t_ended = max(local_time(t.datetime_complete) for t in ended)
    t_retry = _first_retry_started(run, set(at_kill), timeout=60)
    codes = run.wait_all(timeout=240)
    trials = run.trials()

    _assert_lost_trials_tagged([t for t in trials if t.number in at_kill], hostname)
    resumed = {}
    for number, steps in at_kill.items():
        retries = retries_of(trials, number)
        assert retries, f"lost trial {number} was not retried"
        done = [r for r in retries if r.state == TrialState.COMPLETE]
        assert done, (
            f"no retry of trial {number} completed: {[(r.number, r.state.name) for r in retries]}"
        )
        assert done[0].user_attrs.get("hostname") != hostname
        resumed[number] = done[0].user_attrs.get("started_at_step")
        assert resumed[number] is not None and resumed[number] >= steps, (
            f"retry of trial {number} started at step {resumed[number]}, but {steps} steps were checkpointed"
        )
    report_figure(
        "host_loss",
        fault_to_ended_s=round(t_ended - t_fault, 2),
        fault_to_first_retry_running_s=round(t_retry - t_fault, 2),
        lost_trials=sorted(at_kill),
        steps_done_at_kill=at_kill,
        retries_resumed_at_step=resumed,
        steps_per_trial=STEPS,
    )
    assert t_ended - t_fault <= DETECTION_LIMIT_S, (
        f"lost trials ended {t_ended - t_fault:.1f}s after the fault"
    )
    assert codes[1] == 0 and codes[2] == 0, f"survivor exit codes: {codes}"
    assert_end_invariants(run, trials)


def test_partition_longer_than_grace_trials_taken_over_host_goes_on(mh_run):
    run = mh_run
    victim, hostname = 2, run.hosts.hostname(2)
    for host in (1, 3):
        run.launch(host, n_trials=12)
    cut_off = run.launch(victim, n_trials=8)
    run.wait_for(
        "host 2 to be 2 steps into a trial", lambda ts: running_on(ts, hostname, 2), timeout=180
    )

    run.hosts.partition(victim)
    t_fault = time.time()
    at_cut = {
        t.number: len(t.intermediate_values)
        for t in run.trials()
        if t.state == TrialState.RUNNING and t.user_attrs.get("hostname") == hostname
    }
    try:
        ended = _ended_by_others(run, set(at_cut), timeout=DETECTION_LIMIT_S + 60)
        t_ended = max(local_time(t.datetime_complete) for t in ended)
        t_retry = _first_retry_started(run, set(at_cut), timeout=60)
        time.sleep(max(0.0, t_fault + HEARTBEAT_GRACE + 2 * HEARTBEAT_INTERVAL + 2 - time.time()))
    finally:
        run.hosts.heal(victim)
    t_heal = time.time()
    codes = run.wait_all(timeout=300)
    trials = run.trials()

    _assert_lost_trials_tagged([t for t in trials if t.number in at_cut], hostname)
    assert codes[victim] == 0, (
        f"the partitioned host's launcher exited {codes[victim]}:\n{cut_off.text()[-3000:]}"
    )
    assert all(code == 0 for code in codes.values()), f"exit codes: {codes}"
    later = [
        t
        for t in trials
        if t.user_attrs.get("hostname") == hostname
        and t.state == TrialState.COMPLETE
        and local_time(t.datetime_start) > t_heal
    ]
    assert later, "the partitioned host ran no new trial after it came back"
    text = cut_off.text()
    lost_events = [e for e in cut_off.events() if "lost" in str(e.get("event", e.get("type", "")))]
    for number in at_cut:
        assert any(e.get("trial_number") == number for e in lost_events), (
            f"no 'lost' event for trial {number} in host 2's event log; events: "
            f"{sorted({str(e.get('event', e.get('type'))) for e in cut_off.events()})}"
        )
        assert any(
            "lost" in line.lower() and f"{number}" in line and "WARNING" in line.upper()
            for line in text.splitlines()
        ), f"no warning about the lost result of trial {number}"
    crashes = [e for e in cut_off.events() if e.get("event") == "worker_crashed"]
    assert crashes == [], f"workers of the partitioned host crashed: {crashes}"
    resumed = {
        n: [
            r.user_attrs.get("started_at_step")
            for r in retries_of(trials, n)
            if r.state == TrialState.COMPLETE
        ]
        for n in at_cut
    }
    assert all(len(v) == 1 for v in resumed.values()), (
        f"completed retries per lost trial: {resumed}"
    )
    report_figure(
        "partition_long",
        fault_to_ended_s=round(t_ended - t_fault, 2),
        fault_to_first_retry_running_s=round(t_retry - t_fault, 2),
        partition_s=round(t_heal - t_fault, 1),
        lost_trials=sorted(at_cut),
        steps_done_at_cut=at_cut,
        retries_resumed_at_step=resumed,
        steps_per_trial=STEPS,
    )
    assert t_ended - t_fault <= DETECTION_LIMIT_S, (
        f"lost trials ended {t_ended - t_fault:.1f}s after the fault"
    )
    assert_end_invariants(run, trials)


def test_partition_shorter_than_grace_loses_nothing(mh_run):
    run = mh_run
    victim, hostname = 2, run.hosts.hostname(2)
    for host in (1, 2, 3):
        run.launch(host, n_trials=4)
    run.wait_for(
        "host 2 to be 2 steps into a trial", lambda ts: running_on(ts, hostname, 2), timeout=180
    )
    outage = HEARTBEAT_GRACE / 3
    run.hosts.partition(victim)
    try:
        time.sleep(outage)
    finally:
        run.hosts.heal(victim)
    codes = run.wait_all(timeout=240)
    trials = run.trials()
    assert codes == {1: 0, 2: 0, 3: 0}, f"exit codes: {codes}"
    not_complete = [
        (t.number, t.state.name, t.user_attrs.get("kill_reason"))
        for t in trials
        if t.state != TrialState.COMPLETE
    ]
    assert not_complete == [], (
        f"a {outage:.0f}s partition (grace {HEARTBEAT_GRACE}s) cost trials: {not_complete}"
    )
    assert len(trials) == 12
    report_figure("partition_short", partition_s=outage, trials_lost=0, trials=len(trials))
    assert_end_invariants(run, trials)


def test_database_host_restart_with_all_hosts_running_loses_nothing(mh_run, simulated_hosts):
    run = mh_run
    _, cluster = simulated_hosts
    for host in (1, 2, 3):
        run.launch(host, n_trials=4)
    run.wait_for(
        "every host to be in a trial",
        lambda ts: all(running_on(ts, run.hosts.hostname(n), 1) for n in (1, 2, 3)),
        timeout=180,
    )
    t0 = time.time()
    cluster.restart()
    restart_s = time.time() - t0
    codes = run.wait_all(timeout=240)
    trials = run.trials()
    assert codes == {1: 0, 2: 0, 3: 0}, f"exit codes: {codes}"
    not_complete = [
        (t.number, t.state.name, t.user_attrs.get("kill_reason"))
        for t in trials
        if t.state != TrialState.COMPLETE
    ]
    assert not_complete == [], f"the database restart cost trials: {not_complete}"
    assert len(trials) == 12
    report_figure(
        "database_restart", restart_s=round(restart_s, 2), trials_lost=0, trials=len(trials)
    )
    assert_end_invariants(run, trials)


@pytest.fixture(autouse=True)
def _show_launch_output_on_failure(request, mh_run):
    """On failure, print the end of every launch's output (the worker logs name the cause)."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for launch in mh_run.launches:
            print(f"===== host {launch.host} ({launch.hostname}) =====\n{launch.text()[-4000:]}")
