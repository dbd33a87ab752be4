"""scripts/slurm/*.sbatch on a real one-node SLURM cluster, against PostgreSQL.

The five scenarios run side by side (each takes one to three minutes of mostly waiting for
SLURM's time limits and requeue delays): a module fixture submits them all at once, each in
its own thread that drives its job (scancel, scontrol suspend/resume) and returns what it saw;
each test then asserts on its scenario. Every job is cancelled at the end, the database dropped.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from slurm_helpers import (
    EXTRA_ARGS,
    OBJECTIVE,
    OPTUNA_GUARD_BIN,
    SlurmJobs,
    read,
    trials,
    wait_for,
    wait_job_done,
)

from optuna_guard.retries import FREE_RETRIES, RetryPolicy, original_trial_number

pytestmark = [pytest.mark.slurm, pytest.mark.postgres]

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
KEEP_DIR = os.environ.get("SLURM_TEST_KEEP_DIR")  # set it to keep a copy of every job's output
SCENARIO_TIMEOUT_S = 480


class Scenario:
    """One study, one tmp dir, the environment its jobs share."""

    def __init__(
        self, name: str, root: str, storage: optuna.storages.RDBStorage, jobs: SlurmJobs
    ) -> None:
        self.name = name
        self.study = f"{name}-{uuid.uuid4().hex[:6]}"
        self.dir = os.path.join(root, name)
        os.makedirs(self.dir)
        self.storage = storage
        url = storage.url
        self.jobs = jobs
        self.env = {
            "OPTUNA_GUARD_STORAGE": url,
            "OPTUNA_GUARD_OBJECTIVE": OBJECTIVE,
            "OPTUNA_GUARD_STUDY": self.study,
            "OPTUNA_GUARD_WORKERS": "1",
            "OPTUNA_GUARD_RETRY": "5",
            "OPTUNA_GUARD_GRACE_PERIOD": "20",
            "OPTUNA_GUARD_SIGNAL_LEAD": "60",
            "OPTUNA_GUARD_EXTRA_ARGS": EXTRA_ARGS,
            "SLURM_TEST_CKPT_DIR": os.path.join(self.dir, "ckpt"),
        }

    def submit(self, script: str, *args: str, output: str = "job-%j.out", **env: str) -> str:
        return self.jobs.submit(
            script,
            "--cpus-per-task=1",
            "--mem=1G",
            f"--output={self.dir}/{output}",
            f"--job-name={self.name}",
            *args,
            env={**self.env, **env},
            cwd=self.dir,
        )

    def output(self, job_id: str) -> str:
        text = read(os.path.join(self.dir, f"job-{job_id}.out"))
        if KEEP_DIR:  # docs/slurm.md's transcript comes from here
            with open(os.path.join(KEEP_DIR, f"{self.name}-job-{job_id}.out"), "w") as handle:
                handle.write(text)
        return text

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return trials(self.storage, self.study)

    def count(self, *states: TrialState) -> int:
        return sum(t.state in states for t in self.trials())

    def resumed_steps(self) -> list[int]:
        return sorted(
            t.user_attrs["resumed_from_step"]
            for t in self.trials()
            if t.state == TrialState.COMPLETE and t.user_attrs.get("resumed_from_step")
        )

    def preempted_with_checkpoint(self) -> int:
        """Preempted attempts that had saved a checkpoint (their retries must resume from it)."""
        return sum(
            t.state == TrialState.FAIL
            and bool(t.user_attrs.get("preempted"))
            and int(t.system_attrs.get("optuna_guard:checkpoint_step", 0)) >= 1
            for t in self.trials()
        )

    def running_step(self) -> int:
        """Highest checkpointed step of a RUNNING trial (0 when none runs)."""
        steps = [
            max(t.intermediate_values, default=0)
            for t in self.trials()
            if t.state == TrialState.RUNNING
        ]
        return int(max(steps, default=0))


# ------------------------------------------------------------------------- the five scenarios
def requeue_at_time_limit(s: Scenario) -> dict[str, Any]:
    """(1) --time=2 --signal=TERM@60: stopped, requeued, resumed until 4 trials finished."""
    started = time.monotonic()
    job = s.submit(
        "optuna_guard.sbatch",
        "--time=2",
        "--signal=B:TERM@60",
        OPTUNA_GUARD_STUDY_TRIALS="4",
        OPTUNA_GUARD_WORKERS="2",
        SLURM_TEST_STEPS="30",
    )
    info = wait_job_done(job, timeout=SCENARIO_TIMEOUT_S)
    return {
        "job": job,
        "info": info,
        "out": s.output(job),
        "wall_s": time.monotonic() - started,
        "finished": s.count(*FINISHED),
        "running": s.count(TrialState.RUNNING),
        "resumed": s.resumed_steps(),
        "preempted_with_checkpoint": s.preempted_with_checkpoint(),
    }


def array_shared_target(s: Scenario) -> dict[str, Any]:
    """(2) three array tasks share --study-trials 6."""
    started = time.monotonic()
    job = s.submit(
        "array.sbatch",
        "--array=0-2",
        "--time=5",
        output="job-%A_%a.out",
        OPTUNA_GUARD_STUDY_TRIALS="6",
        SLURM_TEST_STEPS="10",
        SLURM_TEST_STEP_S="0.5",
    )
    infos = [wait_job_done(f"{job}_{task}", timeout=SCENARIO_TIMEOUT_S) for task in range(3)]
    return {
        "job": job,
        "infos": infos,
        "wall_s": time.monotonic() - started,
        "finished": s.count(*FINISHED),
        "running": s.count(TrialState.RUNNING),
        "task_outputs": [s.output(f"{job}_{task}") for task in range(3)],
    }


def scancel_term_full(s: Scenario) -> dict[str, Any]:
    """(3) scancel --signal=TERM --full mid-trial: exit 99, requeue, resume."""
    started = time.monotonic()
    job = s.submit(
        "optuna_guard.sbatch", "--time=6", OPTUNA_GUARD_STUDY_TRIALS="2", SLURM_TEST_STEPS="25"
    )
    wait_for(lambda: s.running_step() >= 4, timeout=180, what="a trial past step 4")
    stopped_at = s.running_step()
    subprocess.run(["scancel", "--signal=TERM", "--full", job], check=True, timeout=30)
    info = wait_job_done(job, timeout=SCENARIO_TIMEOUT_S)
    return {
        "job": job,
        "info": info,
        "out": s.output(job),
        "wall_s": time.monotonic() - started,
        "stopped_at": stopped_at,
        "finished": s.count(*FINISHED),
        "running": s.count(TrialState.RUNNING),
        "resumed": s.resumed_steps(),
    }


def suspend_past_heartbeat_grace(s: Scenario) -> dict[str, Any]:
    """(4) scontrol suspend A past --heartbeat-grace while job B works on the same study."""
    started = time.monotonic()
    beat = {"OPTUNA_GUARD_EXTRA_ARGS": EXTRA_ARGS + " --heartbeat-interval 2 --heartbeat-grace 6"}
    job_a = s.submit(
        "optuna_guard.sbatch",
        "--time=6",
        OPTUNA_GUARD_STUDY_TRIALS="3",
        SLURM_TEST_STEPS="16",
        **beat,
    )
    wait_for(lambda: s.running_step() >= 3, timeout=180, what="job A's trial past step 3")
    subprocess.run(["scontrol", "suspend", job_a], check=True, timeout=30)
    suspended_at = time.monotonic()
    job_b = s.submit(
        "optuna_guard.sbatch",
        "--time=6",
        OPTUNA_GUARD_STUDY_TRIALS="3",
        SLURM_TEST_STEPS="16",
        **beat,
    )
    # B's workers find A's trial stale (no heartbeat for 6 s) and fail it; wait for that.
    wait_for(lambda: s.count(TrialState.FAIL) >= 1, timeout=120, what="A's trial failed as stale")
    time.sleep(max(0.0, 12 - (time.monotonic() - suspended_at)))
    subprocess.run(["scontrol", "resume", job_a], check=True, timeout=30)
    suspended_s = time.monotonic() - suspended_at
    info_a = wait_job_done(job_a, timeout=SCENARIO_TIMEOUT_S)
    info_b = wait_job_done(job_b, timeout=SCENARIO_TIMEOUT_S)
    logs = {
        job: "".join(
            read(path)
            for path in sorted(glob.glob(os.path.join(s.dir, "optuna_guard_logs", job, "*.log")))
        )
        for job in (job_a, job_b)
    }
    return {
        "jobs": (job_a, job_b),
        "info_a": info_a,
        "info_b": info_b,
        "out_a": s.output(job_a),
        "out_b": s.output(job_b),
        "worker_log_a": logs[job_a],
        "suspended_s": suspended_s,
        "wall_s": time.monotonic() - started,
        "trials": s.trials(),
        "finished": s.count(*FINISHED),
        "running": s.count(TrialState.RUNNING),
    }


def max_requeues_reached(s: Scenario) -> dict[str, Any]:
    """(5) OPTUNA_GUARD_MAX_REQUEUES=1: the second stop is not requeued."""
    started = time.monotonic()
    job = s.submit(
        "optuna_guard.sbatch",
        "--time=2",
        "--signal=B:TERM@60",
        OPTUNA_GUARD_STUDY_TRIALS="50",
        OPTUNA_GUARD_MAX_REQUEUES="1",
        SLURM_TEST_STEPS="200",
    )
    info = wait_job_done(job, timeout=SCENARIO_TIMEOUT_S)
    return {
        "job": job,
        "info": info,
        "out": s.output(job),
        "wall_s": time.monotonic() - started,
        "running": s.count(TrialState.RUNNING),
    }


def has_max_preemptions() -> bool:
    """The --max-preemptions option (issue 9, engineer "supervision") is in `optuna-guard run`."""
    proc = subprocess.run(
        [OPTUNA_GUARD_BIN, "run", "--help"], capture_output=True, text=True, timeout=60
    )
    return "--max-preemptions" in proc.stdout


def retries_know_preemptions() -> bool:
    """The retry policy has the preemption budget behind that option (else a chain still pays
    every preemption with --retry, and scenario 6 cannot pass: it is not run)."""
    return "max_preemptions" in {field.name for field in dataclasses.fields(RetryPolicy)}


def preempted_at_every_job_end(s: Scenario) -> dict[str, Any]:
    """(6) one trial longer than a job run, --retry 1: finishes after several requeues because
    each preemption made checkpoint progress (the --max-preemptions budget, not --retry, pays)."""
    started = time.monotonic()
    job = s.submit(
        "optuna_guard.sbatch",
        "--time=2",
        "--signal=B:TERM@60",
        OPTUNA_GUARD_STUDY_TRIALS="1",
        OPTUNA_GUARD_RETRY="1",
        OPTUNA_GUARD_MAX_REQUEUES="6",
        OPTUNA_GUARD_EXTRA_ARGS=EXTRA_ARGS + " --max-preemptions 10",
        SLURM_TEST_STEPS="75",
    )
    info = wait_job_done(job, timeout=SCENARIO_TIMEOUT_S)
    return {
        "job": job,
        "info": info,
        "out": s.output(job),
        "wall_s": time.monotonic() - started,
        "trials": s.trials(),
    }


def preempted_without_progress(s: Scenario) -> dict[str, Any]:
    """(7) the same without checkpoints: a chain that makes no progress between preemptions
    uses up --retry 1 and ends FAIL."""
    started = time.monotonic()
    job = s.submit(
        "optuna_guard.sbatch",
        "--time=2",
        "--signal=B:TERM@60",
        OPTUNA_GUARD_STUDY_TRIALS="1",
        OPTUNA_GUARD_RETRY="1",
        OPTUNA_GUARD_MAX_REQUEUES="1",
        OPTUNA_GUARD_EXTRA_ARGS=EXTRA_ARGS + " --max-preemptions 10",
        SLURM_TEST_STEPS="500",
        SLURM_TEST_CHECKPOINT="0",
    )
    info = wait_job_done(job, timeout=SCENARIO_TIMEOUT_S)
    return {
        "job": job,
        "info": info,
        "out": s.output(job),
        "wall_s": time.monotonic() - started,
        "trials": s.trials(),
    }


SCENARIOS: dict[str, Callable[[Scenario], dict[str, Any]]] = {
    "requeue": requeue_at_time_limit,
    "array": array_shared_target,
    "scancel": scancel_term_full,
    "suspend": suspend_past_heartbeat_grace,
    "maxrequeue": max_requeues_reached,
    "chain": preempted_at_every_job_end,
    "noprogress": preempted_without_progress,
}


@pytest.fixture(scope="module")
def results(request, slurm_jobs: SlurmJobs, slurm_pg_url: str) -> Iterator[dict[str, Any]]:
    # Only the scenarios of the selected tests (-k) run.
    wanted = {
        TEST_SCENARIO[item.function.__name__]
        for item in request.session.items
        if item.module is request.module and item.function.__name__ in TEST_SCENARIO
    }
    if not has_max_preemptions():
        wanted -= {"chain", "noprogress"}
    if not retries_know_preemptions():
        wanted -= {"chain"}
    # Our own directory: jobs write into it for minutes, pytest's basetemp rotation must not remove it.
    root = tempfile.mkdtemp(prefix="optuna-guard-slurm-")
    storage = optuna.storages.RDBStorage(
        slurm_pg_url
    )  # the schema once, one storage for every thread
    pool = concurrent.futures.ThreadPoolExecutor(
        len(SCENARIOS), thread_name_prefix="slurm-scenario"
    )
    futures = {
        name: pool.submit(fn, Scenario(name, root, storage, slurm_jobs))
        for name, fn in SCENARIOS.items()
        if name in wanted
    }
    try:
        yield futures
    finally:
        slurm_jobs.cancel_all()  # also ends scenarios still polling: their jobs are gone
        pool.shutdown(wait=False, cancel_futures=True)
        storage.remove_session()
        storage.engine.dispose()
        shutil.rmtree(root, ignore_errors=True)


TEST_SCENARIO = {
    "test_time_limit_stop_requeues_and_resumes_to_exactly_the_study_target": "requeue",
    "test_array_tasks_share_the_study_target": "array",
    "test_scancel_signal_term_full_exits_99_requeues_and_resumes": "scancel",
    "test_suspend_past_heartbeat_grace_loses_and_doubles_nothing": "suspend",
    "test_max_requeues_stops_requeueing_and_says_why": "maxrequeue",
    "test_trial_preempted_at_every_job_end_with_progress_finishes": "chain",
    "test_chain_without_progress_between_preemptions_fails": "noprogress",
}


def result(results: dict[str, Any], name: str) -> dict[str, Any]:
    return results[name].result(timeout=SCENARIO_TIMEOUT_S + 120)


def restarts(info: dict[str, str]) -> int:
    return int(info.get("Restarts", "0"))


def figures(name: str, **values: Any) -> None:
    print(f"SLURM {name}: " + ", ".join(f"{key} {value}" for key, value in values.items()))


# ------------------------------------------------------------------------- the tests
def test_time_limit_stop_requeues_and_resumes_to_exactly_the_study_target(results):
    r = result(results, "requeue")
    out = r["out"]
    figures(
        "requeue",
        requeues=restarts(r["info"]),
        stops=out.count("(exit 99)"),
        resumed_steps=r["resumed"],
        preempted_with_checkpoint=r["preempted_with_checkpoint"],
        finished=f"{r['finished']}/4",
        wall_s=round(r["wall_s"]),
    )
    assert r["info"]["JobState"] == "COMPLETED", out[-3000:]
    assert restarts(r["info"]) >= 1 and "requeueing job" in out
    assert "Stopping: launcher received SIGTERM" in out
    # SLURM delivers the signal up to a minute early: it may land before the stopped trials saved
    # their first step; when one had saved, its retry must resume from the checkpoint
    assert r["resumed"] or r["preempted_with_checkpoint"] == 0, (
        "no preempted trial resumed from a checkpoint:\n" + out[-3000:]
    )
    assert r["finished"] == 4  # exact: one launcher counts its own running trials
    assert r["running"] == 0
    assert "Second SIGTERM" not in out


def test_array_tasks_share_the_study_target(results):
    r = result(results, "array")
    tasks, workers, target = 3, 1, 6
    figures(
        "array",
        finished=f"{r['finished']}/{target}",
        overshoot_bound=tasks * workers,
        states=[i["JobState"] for i in r["infos"]],
        wall_s=round(r["wall_s"]),
    )
    assert [i["JobState"] for i in r["infos"]] == ["COMPLETED"] * 3, r["task_outputs"]
    assert target <= r["finished"] <= target + tasks * workers
    assert r["running"] == 0


def test_scancel_signal_term_full_exits_99_requeues_and_resumes(results):
    r = result(results, "scancel")
    out = r["out"]
    figures(
        "scancel",
        stopped_at_step=r["stopped_at"],
        requeues=restarts(r["info"]),
        resumed_steps=r["resumed"],
        finished=f"{r['finished']}/2",
        wall_s=round(r["wall_s"]),
    )
    assert "launcher received SIGTERM" in out and "(exit 99)" in out, out[-3000:]
    assert restarts(r["info"]) >= 1 and r["info"]["JobState"] == "COMPLETED"
    assert "Second SIGTERM" not in out  # the batch shell's forwarded copy is the same stop
    assert r["resumed"] and max(r["resumed"]) >= r["stopped_at"]
    assert r["finished"] == 2 and r["running"] == 0


def test_suspend_past_heartbeat_grace_loses_and_doubles_nothing(results):
    r = result(results, "suspend")
    stale = [t for t in r["trials"] if t.state == TrialState.FAIL]
    done = [t for t in r["trials"] if t.state in FINISHED]
    chains = [original_trial_number(t) for t in done]
    figures(
        "suspend",
        suspended_s=round(r["suspended_s"]),
        failed_as_stale=len(stale),
        finished=f"{r['finished']}/3",
        jobs=[r["info_a"]["JobState"], r["info_b"]["JobState"]],
        wall_s=round(r["wall_s"]),
    )
    assert r["info_a"]["JobState"] == "COMPLETED", r["out_a"][
        -3000:
    ]  # the woken launcher ends cleanly
    assert r["info_b"]["JobState"] == "COMPLETED", r["out_b"][-3000:]
    assert (
        "crashed under" not in r["out_a"] and "stops: an error escaped" not in r["worker_log_a"]
    ), r["worker_log_a"][-4000:]
    assert "from outside while it ran" in r["worker_log_a"]  # the woken worker says what happened
    assert stale, "no trial of the suspended job was failed as stale"
    assert len(chains) == len(set(chains)), "a retry chain finished twice"  # not doubled
    for trial in stale:  # not lost: every stale trial's chain finished
        assert original_trial_number(trial) in chains, (trial.number, chains)
    assert 3 <= r["finished"] <= 3 + 1 and r["running"] == 0


def test_max_requeues_stops_requeueing_and_says_why(results):
    r = result(results, "maxrequeue")
    out = r["out"]
    figures(
        "maxrequeue",
        requeues=restarts(r["info"]),
        state=r["info"]["JobState"],
        wall_s=round(r["wall_s"]),
    )
    assert restarts(r["info"]) == 1
    assert out.count("(exit 99)") >= 2, out[-3000:]
    assert re.search(
        r"already requeued 1 times \(OPTUNA_GUARD_MAX_REQUEUES=1\); not requeueing again", out
    ), out[-3000:]
    assert r["info"]["JobState"] == "FAILED" and r["info"]["ExitCode"].startswith("99")
    assert r["running"] == 0


needs_max_preemptions = pytest.mark.skipif(
    not has_max_preemptions(),
    reason="`optuna-guard run --max-preemptions` (issue 9) has not landed yet",
)


@needs_max_preemptions
@pytest.mark.xfail(
    not retries_know_preemptions(),
    run=False,
    strict=True,
    reason="the preemption budget of issue 9 is not in RetryPolicy yet: every preemption uses --retry",
)
def test_trial_preempted_at_every_job_end_with_progress_finishes(results):
    r = result(results, "chain")
    done = [t for t in r["trials"] if t.state == TrialState.COMPLETE]
    preemptions = [
        t for t in r["trials"] if t.state == TrialState.FAIL and t.user_attrs.get("preempted")
    ]
    figures(
        "chain",
        requeues=restarts(r["info"]),
        preemptions=len(preemptions),
        resumed_steps=sorted(t.user_attrs.get("resumed_from_step", 0) for t in r["trials"]),
        wall_s=round(r["wall_s"]),
    )
    assert r["info"]["JobState"] == "COMPLETED", r["out"][-3000:]
    # How many job runs the 75 s trial needs depends on when SLURM delivers --signal (it checks
    # about once a minute) and on the machine's speed: 2 to 4 here. Every preemption with
    # progress must have been free (the --max-preemptions budget, not --retry 1, paid for it);
    # tests/test_supervision_preemptions.py proves 5 preemptions under --retry 1 deterministically.
    assert len(done) == 1 and len(preemptions) >= 1
    assert 1 <= done[0].system_attrs.get(FREE_RETRIES, 0) <= len(preemptions)
    assert {original_trial_number(t) for t in r["trials"]} == {0}  # one chain, never given up
    assert not any(t.state == TrialState.RUNNING for t in r["trials"])


@needs_max_preemptions
def test_chain_without_progress_between_preemptions_fails(results):
    r = result(results, "noprogress")
    chain = [t for t in r["trials"] if original_trial_number(t) == 0]
    figures(
        "noprogress",
        requeues=restarts(r["info"]),
        chain=[t.state.name for t in chain],
        wall_s=round(r["wall_s"]),
    )
    assert len(chain) == 2, [
        t.state.name for t in chain
    ]  # the first attempt and one retry (--retry 1)
    assert all(
        t.state == TrialState.FAIL for t in chain
    )  # no progress: the retry budget pays, then it fails
    assert not any(t.state == TrialState.RUNNING for t in r["trials"])
