"""Pure parts of the launcher: policies, status lines, config validation, objective specs, protocol."""

from __future__ import annotations

import os
import random
import signal
import socket

import pytest
from supervisor_helpers import OBJECTIVES, objective_spec

from optuna_guard._units import GB
from optuna_guard.exceptions import ConfigError, ObjectiveSpecError
from optuna_guard.supervisor import _objective_spec, _policies, _protocol
from optuna_guard.supervisor._config import LaunchConfig, WorkerSettings
from optuna_guard.supervisor._status import Progress, worker_status_line
from optuna_guard.supervisor._study import mask_url


@pytest.mark.parametrize(
    "code,expected",
    [
        (-9, "worker exited with SIGKILL — perhaps the kernel OOM killer"),
        (-11, "worker exited with SIGSEGV — segmentation fault in native code"),
        (-15, "worker exited with SIGTERM — terminated by someone else"),
        (-signal.SIGHUP, "worker exited with SIGHUP"),
        (137, "worker exited with SIGKILL — perhaps the kernel OOM killer"),  # a shell's 128+9
        (1, "worker exited with code 1"),
        (70, "worker exited with code 70"),
    ],
)
def test_describe_exit(code, expected):
    assert _policies.describe_exit(code) == expected


def test_a_sigkill_is_not_blamed_on_the_oom_killer_when_the_cgroup_saw_none():
    said = _policies.describe_exit(-9, oom_ruled_out=True)
    assert "perhaps the kernel OOM killer" not in said and "recorded no OOM kill" in said
    assert _policies.describe_exit(-11, oom_ruled_out=True).endswith(
        "segmentation fault in native code"
    )


def test_a_crash_in_a_trial_with_its_own_cgroup_names_an_outside_sigkill():
    from optuna_guard import tags
    from optuna_guard.supervisor import _exits

    record = _exits.ExitRecord(code=-9, pid=7, in_trial=True, trials_started=1, own_cgroup=True)
    decision = _exits.decide(record)
    assert decision.trial_tags[tags.KILL_REASON].startswith(
        "worker exited with SIGKILL — not the kernel OOM killer"
    )


def _c(worker_id, rss_gb, in_trial=True, started=None):
    return _policies.VictimCandidate(
        worker_id=worker_id,
        tree_rss_bytes=int(rss_gb * GB),
        in_trial=in_trial,
        trial_started_at=started,
    )


@pytest.mark.parametrize(
    "candidates,expected",
    [
        ([], None),
        ([_c(1, 2.0), _c(2, 5.0), _c(3, 3.0)], 2),  # largest tree
        (
            [_c(1, 2.0), _c(2, 9.0, in_trial=False)],
            1,
        ),  # a worker running a trial before an idle one
        (
            [_c(1, 4.0, started=10.0), _c(2, 4.0, started=50.0)],
            2,
        ),  # tie: the newer trial loses least work
        (
            [_c(1, 1.0, in_trial=False), _c(2, 2.0, in_trial=False)],
            None,
        ),  # idle workers are never victims (issue 10)
    ],
)
def test_choose_victim(candidates, expected):
    victim = _policies.choose_victim(candidates)
    assert (victim.worker_id if victim else None) == expected


def test_over_limit_picks_the_largest_worker_over_the_limit():
    assert _policies.over_limit([_c(1, 7.9), _c(2, 8.5), _c(3, 9.1)], 8.0).worker_id == 3
    assert _policies.over_limit([_c(1, 7.9)], 8.0) is None
    assert _policies.over_limit([_c(1, 100.0)], None) is None


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        (
            dict(
                age_s=3601,
                age_limit_s=3600,
                trials_finished=3,
                max_trials=None,
                tree_rss_bytes=0,
                recycle_rss_gb=6.0,
            ),
            "age 3601s >= 3600s",
        ),
        (
            dict(
                age_s=10,
                age_limit_s=None,
                trials_finished=5,
                max_trials=5,
                tree_rss_bytes=0,
                recycle_rss_gb=6.0,
            ),
            "5 trials >= --max-trials-per-worker 5",
        ),
        (
            dict(
                age_s=10,
                age_limit_s=3600,
                trials_finished=1,
                max_trials=None,
                tree_rss_bytes=int(6.5 * GB),
                recycle_rss_gb=6.0,
            ),
            "tree RSS 6.50 GB after a trial > 6.00 GB",
        ),
        # a fresh worker is never recycled for its baseline RSS
        (
            dict(
                age_s=10,
                age_limit_s=3600,
                trials_finished=0,
                max_trials=None,
                tree_rss_bytes=int(6.5 * GB),
                recycle_rss_gb=6.0,
            ),
            None,
        ),
        (
            dict(
                age_s=10,
                age_limit_s=3600,
                trials_finished=4,
                max_trials=5,
                tree_rss_bytes=int(1 * GB),
                recycle_rss_gb=6.0,
            ),
            None,
        ),
    ],
)
def test_recycle_reason(kwargs, expected):
    assert _policies.recycle_reason(**kwargs) == expected


def test_age_jitter_stays_below_the_maximum_and_spreads_workers():
    rng = random.Random(3)
    limits = [_policies.jittered_age_limit(3600.0, 0.1, rng) for _ in range(200)]
    assert all(3240.0 <= limit <= 3600.0 for limit in limits)
    assert max(limits) - min(limits) > 200
    assert _policies.jittered_age_limit(None, 0.1) is None


def test_status_line_has_the_shape_people_grep_for():
    line = worker_status_line(1, 17650, "healthy", 74.2, 3600.0, int(2.27 * GB))
    assert line == "Worker 1 PID 17650 healthy (age: 74s/3600s, mem: 2.27GB, restart in 3526s)"
    assert (
        worker_status_line(2, 5, "recycling", 10, None, 0)
        == "Worker 2 PID 5 recycling (age: 10s/off, mem: 0.00GB, restart in never)"
    )


def test_progress_line():
    progress = Progress(
        target=400,
        finished=37,
        running=3,
        complete=30,
        pruned=4,
        failed=3,
        killed=2,
        crashed=1,
        recycles=5,
        workers=3,
        available_gb=17.25,
        eta_s=312,
    )
    assert progress.line() == (
        "Trials 37/400 finished (running 3, complete 30, pruned 4, failed 3, killed 2, crashed 1, "
        "recycled 5), 3 workers, available 17.25GB, ETA 5m12s"
    )


@pytest.mark.parametrize(
    "changes,needle",
    [
        (dict(workers=0), "--workers must be >= 1 but got 0"),
        (dict(n_trials=0), "--n-trials must be >= 1"),
        (dict(max_worker_rss_gb=-1.0), "--max-worker-rss-gb must be > 0 but got -1.0"),
        (dict(min_available_gb=-0.5), "--min-available-gb cannot be negative"),
        (
            dict(max_worker_rss_gb=4.0, recycle_worker_rss_gb=5.0),
            "cannot exceed --max-worker-rss-gb",
        ),
        (dict(min_available_gb=3.0, warn_available_gb=2.0), "cannot be below --min-available-gb"),
        (dict(check_interval=0.0), "--check-interval must be > 0"),
        (dict(grace_period=-1.0), "--grace-period cannot be negative"),
        (dict(directions=("up",)), "--direction must be 'minimize' or 'maximize'"),
        (dict(sampler="magic"), "--sampler 'magic' is unknown"),
        (dict(on_kill="explode"), "--on-kill must be 'prune' or 'fail'"),
        (dict(heartbeat_interval=60, heartbeat_grace=90), "at least twice heartbeat_interval"),
        (dict(max_worker_age=float("nan")), "finite"),
        (dict(workers=True), "must be an integer"),
    ],
)
def test_launch_config_rejects_bad_values_with_one_line(changes, needle):
    with pytest.raises(ConfigError) as info:
        LaunchConfig(objective="m:f", study_name="s", **changes)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_launch_config_defaults():
    config = LaunchConfig(objective="m:f", study_name="s")
    assert config.recycle_worker_rss_gb == 6.0  # 75 % of the 8 GB hard limit
    assert (
        config.check_interval == 0.25
        and config.grace_period == 120
        and config.status_interval == 60
    )
    assert config.event_log_path == os.path.join("optuna_guard_logs", "events.jsonl")
    assert (
        config.guard_env()["OPTUNA_GUARD_MAX_TRIAL_RSS_GB"] == "7.2"
    )  # 90 % of the worker limit (issue 16)
    off = LaunchConfig(objective="m:f", study_name="s", max_worker_rss_gb=None)
    assert (
        off.recycle_worker_rss_gb is None
        and off.guard_env()["OPTUNA_GUARD_MAX_TRIAL_RSS_GB"] == "none"
    )


def test_worker_settings_round_trip_through_env():
    settings = WorkerSettings(
        worker_id=3,
        spawn_index=7,
        objective="/x/y.py:f",
        study_name="s",
        storage="sqlite:///a.db",
        seed=None,
        heartbeat_interval=30,
        heartbeat_grace=300,
        guard=False,
        retry=2,
        retry_on=("emergency_killed", "preempted"),
        storage_deadline=12.5,
    )
    env = settings.to_env()
    assert env["OPTUNA_GUARD_WORKER_ID"] == "3" and env["OPTUNA_GUARD_WORKER_STUDY_NAME"] == "s"
    assert WorkerSettings.from_env(env) == settings


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("nocolon", "has no ':function' part"),
        ("mod:", "is incomplete"),
        ("mod:not-a-name", "is not a Python name"),
        ("/no/such/file.py:f", "does not exist"),
        ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
        ("os.path:no_such_function", "has no attribute 'no_such_function'"),
        (objective_spec("launcher_quick", "NOT_CALLABLE"), "names a int, not a function"),
    ],
)
def test_bad_objective_specs(spec, needle):
    with pytest.raises(ObjectiveSpecError, match=needle.replace("(", r"\(")):
        _objective_spec.load_objective(spec)


def test_objective_specs_that_load(tmp_path):
    assert callable(_objective_spec.load_objective(objective_spec("launcher_quick")))
    assert _objective_spec.load_objective("os.path:join") is os.path.join
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    with pytest.raises(ObjectiveSpecError, match=r"SyntaxError: .* \(line 1\)"):
        _objective_spec.load_objective(f"{broken}:f")
    raising = tmp_path / "raising.py"
    raising.write_text("raise RuntimeError('no GPU here')\n")
    with pytest.raises(ObjectiveSpecError, match="RuntimeError: no GPU here"):
        _objective_spec.check_spec_in_subprocess(f"{raising}:f")
    _objective_spec.check_spec_in_subprocess(objective_spec("launcher_quick"))


def test_spec_from_callable():
    assert _objective_spec.spec_from_callable(os.path.join) == "posixpath:join"
    with pytest.raises(ObjectiveSpecError, match="lambda, closure or local function"):
        _objective_spec.spec_from_callable(lambda trial: 0.0)
    loaded = _objective_spec.load_objective(objective_spec("launcher_quick"))
    assert (
        _objective_spec.spec_from_callable(loaded)
        == f"{os.path.join(OBJECTIVES, 'launcher_quick.py')}:objective"
    )


def test_protocol_channel_frames_messages_across_partial_reads():
    left, right = socket.socketpair()
    sender, receiver = _protocol.Channel(left), _protocol.Channel(right)
    assert sender.send(_protocol.TICKET)
    left.sendall(b'{"op": "started", "number": 7, "tri')
    assert receiver.feed() == ([{"op": "ticket"}], False)
    left.sendall(b'al_id": 8}\n')
    assert receiver.feed() == ([{"op": "started", "number": 7, "trial_id": 8}], False)
    sender.close()
    assert receiver.feed() == ([], True)
    assert not sender.send(_protocol.TICKET)
    left2, right2 = socket.socketpair()
    left2.sendall(b"not json\n")
    with pytest.raises(_protocol.ProtocolError):
        _protocol.Channel(right2).recv()


def test_mask_url_hides_passwords():
    assert (
        mask_url("postgresql+psycopg://user:s3cret@db:5432/x")
        == "postgresql+psycopg://user:***@db:5432/x"
    )
    assert mask_url("sqlite:///a.db") == "sqlite:///a.db"
