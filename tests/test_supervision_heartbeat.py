"""Issue 9, faults 3 and 5 (D4/D5): liveness is beaten by the supervisor. A live trial that holds
the GIL longer than the heartbeat grace completes; the trials of a dead launch on this host are
ended at once (worker_lost) and retried; an expired lease of another host and an Optuna-stale
trial (a plain worker that died) are ended worker_lost and retried."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState
from supervision_helpers import launch_id_of, launch_pids, launcher, running_trials
from supervisor_helpers import (
    FAST,
    assert_nothing_running,
    objective_spec,
    read_events,
    trials_of,
    wait_for,
)

from optuna_guard import tags
from optuna_guard.retries import RETRY_HISTORY
from optuna_guard.supervisor import _lease, launch

PLAIN_WORKER = r"""
import sys, time, optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
storage = optuna.storages.RDBStorage(sys.argv[1], heartbeat_interval=1, grace_period=3)
study = optuna.load_study(study_name=sys.argv[2], storage=storage)
def quick(trial):
    time.sleep(float(sys.argv[3]))
    return trial.suggest_float("y", 0, 1)
study.optimize(quick, n_trials=int(sys.argv[4]))
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_gil_holding_trial_longer_than_the_grace_completes(
    backend, request, tmp_path, unique_study_name, monkeypatch, quiet_optuna
):
    """Trial 0 holds the GIL in one C call for over twice --heartbeat-grace (was: failed as
    stale by a sibling, result lost, worker exit 1). A plain Optuna worker with a heartbeat on
    the same study runs its stale check meanwhile and must not fail it either."""
    url = request.getfixturevalue(f"{backend}_url")
    optuna.create_study(study_name=unique_study_name, storage=url)
    monkeypatch.setenv("REGEX_N", "28")
    monkeypatch.setenv("REGEX_ONCE_FLAG", str(tmp_path / "held"))
    plain = subprocess.Popen(
        [sys.executable, "-c", PLAIN_WORKER, url, unique_study_name, "1.0", "12"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        started = time.monotonic()
        summary = launch(
            objective_spec("supervision_objs", "regex_hold"),
            study_name=unique_study_name,
            storage=url,
            workers=2,
            n_trials=4,
            log_dir=str(tmp_path / "logs"),
            heartbeat_interval=1,
            heartbeat_grace=3,
            **FAST,
        )
        elapsed = time.monotonic() - started
        _out, err = plain.communicate(timeout=120)
    finally:
        if plain.poll() is None:
            plain.kill()
            plain.communicate(timeout=30)
    # (the plain worker's own trials follow Optuna's rule: on a loaded machine its heartbeat thread
    # may miss the 3 s grace and its trial be failed stale; ours must not be)
    assert "Traceback" not in err or "Cannot tell" in err, err[-2000:]
    trials = [t for t in trials_of(url, unique_study_name) if tags.LAUNCH_ID in t.user_attrs]
    [first] = [t for t in trials if t.user_attrs.get("held_gil")]
    held = (first.datetime_complete - first.datetime_start).total_seconds()
    assert held > 6.0, f"the GIL-holding trial took only {held:.1f}s; raise REGEX_N"
    assert first.state == TrialState.COMPLETE, first.user_attrs
    assert summary.exit_code == 0 and summary.complete == 4 and summary.crashes == 0
    assert all(t.state == TrialState.COMPLETE for t in trials_of(url, unique_study_name))
    print(f"GIL-holding trial of {held:.1f}s (grace 3s) COMPLETE; launch took {elapsed:.1f}s")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_relaunch_ends_and_retries_the_running_trials_of_a_dead_launch_at_once(
    backend, request, tmp_path, unique_study_name
):
    url = request.getfixturevalue(f"{backend}_url")
    log_dir = str(tmp_path / "dead")
    with launcher(
        "supervision_objs:slow",
        url,
        unique_study_name,
        log_dir,
        "--workers",
        "2",
        "--n-trials",
        "2",
        env={"SLOW_S": "120"},
    ) as proc:
        dead_launch = launch_id_of(log_dir)
        wait_for(
            lambda: len(running_trials(url, unique_study_name)) == 2, 90, what="two RUNNING trials"
        )
        # the whole launch dies at once (a node reboot): supervisor frozen first, nobody cleans up
        proc.send_signal(signal.SIGSTOP)
        for pid in launch_pids(dead_launch):
            os.kill(pid, signal.SIGKILL)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        wait_for(
            lambda: launch_pids(dead_launch) == [],
            10,
            what="the dead launch's processes to be gone",
        )
    assert len(running_trials(url, unique_study_name)) == 2
    started = time.monotonic()
    with launcher(
        "supervision_objs:slow",
        url,
        unique_study_name,
        str(tmp_path / "relaunch"),
        "--workers",
        "2",
        "--n-trials",
        "2",
        "--retry",
        "1",
        env={"SLOW_S": "0.5"},
    ) as proc:
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
    elapsed = time.monotonic() - started
    trials = trials_of(url, unique_study_name)
    dead = [t for t in trials if t.user_attrs.get(tags.LAUNCH_ID) == dead_launch and t.number < 2]
    assert len(dead) == 2
    for trial in dead:
        assert trial.state == TrialState.FAIL and trial.user_attrs[tags.WORKER_LOST] is True
        assert trial.user_attrs[tags.KILL_REASON] == (
            f"worker lost: launch {dead_launch} on host "
            f"{trial.user_attrs[tags.HOSTNAME]} has no process left"
        )
    retries = [t for t in trials if t.user_attrs.get(tags.RETRY_OF) is not None]
    assert sorted(t.user_attrs[tags.RETRY_OF] for t in retries) == [0, 1]
    assert all(t.state == TrialState.COMPLETE for t in retries)
    assert_nothing_running(trials)
    lost_events = [
        e
        for e in read_events(str(tmp_path / "relaunch" / "events.jsonl"))
        if e["event"] == "trial_lost"
    ]
    assert len(lost_events) == 2
    print(
        f"dead launch on this host: its 2 trials ended and retried; relaunch done in "
        f"{elapsed:.1f}s "
        "(was: RUNNING until --heartbeat-grace, 300 s by default, and never retried)"
    )


def _plant_running_trial(url: str, study_name: str, **user_attrs) -> int:
    study = optuna.load_study(study_name=study_name, storage=url)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(-10, 10)})
    for key, value in user_attrs.items():
        trial.set_user_attr(key, value)
    return trial.number


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_expired_lease_of_another_host_and_optuna_stale_trials_end_worker_lost_and_retried(
    backend, request, tmp_path, unique_study_name, quiet_optuna
):
    url = request.getfixturevalue(f"{backend}_url")
    study = optuna.create_study(study_name=unique_study_name, storage=url)
    # another host's launch whose lease expired a minute ago
    gone = _lease.make_lease(
        "launch-elsewhere", "host-that-died", 1234, 1, 10, [0], now=time.time() - 70
    )
    study._storage.set_study_system_attr(
        study._study_id, _lease.lease_key("launch-elsewhere"), gone.to_attr()
    )
    elsewhere = _plant_running_trial(
        url,
        unique_study_name,
        **{tags.LAUNCH_ID: "launch-elsewhere", tags.HOSTNAME: "host-that-died"},
    )
    # another host's launch whose lease is fresh: left alone
    alive = _lease.make_lease("launch-alive", "host-alive", 99, 1, 600, [1])
    study._storage.set_study_system_attr(
        study._study_id, _lease.lease_key("launch-alive"), alive.to_attr()
    )
    kept = _plant_running_trial(
        url, unique_study_name, **{tags.LAUNCH_ID: "launch-alive", tags.HOSTNAME: "host-alive"}
    )
    # a plain Optuna worker with a heartbeat that died under its trial (no launch id)
    plain = subprocess.Popen(
        [sys.executable, "-c", PLAIN_WORKER, url, unique_study_name, "600", "1"]
    )
    try:
        wait_for(
            lambda: len(running_trials(url, unique_study_name)) == 3,
            60,
            what="the plain worker's trial",
        )
        time.sleep(1.5)  # its first heartbeat is written
    finally:
        plain.kill()
        plain.wait(timeout=30)
    stale = max(t.number for t in running_trials(url, unique_study_name))
    time.sleep(3.5)  # over its grace
    summary = launch(
        objective_spec("supervision_objs", "slow"),
        study_name=unique_study_name,
        storage=url,
        workers=1,
        n_trials=2,
        log_dir=str(tmp_path / "logs"),
        heartbeat_interval=1,
        heartbeat_grace=3,
        retry=1,
        **dict(FAST, grace_period=1.0),
    )
    trials = {t.number: t for t in trials_of(url, unique_study_name)}
    assert trials[kept].state == TrialState.RUNNING
    for number, why in (
        (elsewhere, "the lease of launch launch-elsewhere on host host-that-died expired"),
        (stale, "no heartbeat for over 3s"),
    ):
        trial = trials[number]
        assert trial.state == TrialState.FAIL and trial.user_attrs[tags.WORKER_LOST] is True, (
            trial.user_attrs
        )
        assert why in trial.user_attrs[tags.KILL_REASON]
    retried = sorted(
        t.system_attrs[RETRY_HISTORY][-1]
        for t in trials.values()
        if RETRY_HISTORY in t.system_attrs
    )
    assert retried == sorted([elsewhere, stale])
    assert summary.exit_code == 0
    optuna.storages.RDBStorage(url)  # the study is left for the next test; end the planted trial
    study._storage.set_trial_state_values(trials[kept]._trial_id, TrialState.FAIL)
