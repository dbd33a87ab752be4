"""Preemption in a worker: flag-only handlers, the pruner boundary, exit 99, a real SIGTERM to a
checkpointing worker whose retry resumes from the saved step; and the SLURM / Kubernetes
scripts (syntax, and the requeue-on-99 logic run against stub srun/scontrol/squeue)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from optuna_guard import preemption, tags
from optuna_guard.retries import RetryPolicy, enqueue_retry
from optuna_guard.storage import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "scripts" / "slurm" / "optuna_guard.sbatch"
ARRAY = REPO / "scripts" / "slurm" / "array.sbatch"
K8S_JOB = REPO / "scripts" / "k8s" / "optuna-guard-job.yaml"


# -- library helpers ---------------------------------------------------------------------------


def test_handlers_only_set_flags_and_are_restored() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    with preemption.handling_signals():
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not preemption.stop_requested() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert preemption.stop_requested() and preemption.stop_reason() == "SIGTERM"
        assert preemption.consume_checkpoint_request()
        assert not preemption.consume_checkpoint_request()
    assert {s: signal.getsignal(s) for s in before} == before


def test_pruner_boundary_tags_through_the_storage() -> None:
    study = optuna.create_study()
    trial = study.ask()
    frozen = study._storage.get_trial(trial._trial_id)
    preemption.raise_if_stop_requested_in_pruner(study, frozen)  # no stop: nothing happens
    preemption.request_stop("time budget")
    with pytest.raises(preemption.TrialPreempted, match="Trial #0 preempted: time budget"):
        preemption.raise_if_stop_requested_in_pruner(study, frozen)
    attrs = study._storage.get_trial_user_attrs(trial._trial_id)
    assert attrs == {tags.PREEMPTED: True, tags.KILL_REASON: "preempted: time budget"}


def test_stop_callback_ends_optimize_even_when_catch_swallows_the_preemption() -> None:
    study = optuna.create_study()

    def objective(trial: optuna.Trial) -> float:
        if trial.number == 1:
            preemption.request_stop("SIGTERM")
        preemption.raise_if_stop_requested(trial)
        return 1.0

    study.optimize(
        objective, n_trials=50, catch=(Exception,), callbacks=[preemption.stop_study_if_requested]
    )
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert study.trials[1].user_attrs[tags.PREEMPTED] is True


def test_exit_on_preemption_exits_99() -> None:
    codes: list[int] = []
    with preemption.exit_on_preemption(exit=codes.append):
        raise preemption.TrialPreempted("Trial #3 preempted: SIGTERM")
    assert codes == [99]
    with preemption.exit_on_preemption(exit=codes.append):
        pass
    assert codes == [99]  # no stop, no exit
    preemption.request_stop("SIGTERM")
    with preemption.exit_on_preemption(exit=codes.append):
        pass  # the loop ended between trials after the stop
    assert codes == [99, 99]
    with pytest.raises(SystemExit) as info, preemption.exit_on_preemption():
        raise preemption.TrialPreempted("x")
    assert info.value.code == 99


_WORKER = textwrap.dedent(
    """
    import sys, time
    import optuna
    from optuna_guard import preemption
    from optuna_guard.checkpoint import TrialCheckpointer
    from optuna_guard.storage import open_storage

    url, study_name, root = sys.argv[1:4]
    study = optuna.load_study(study_name=study_name, storage=open_storage(url))

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        ckpt = TrialCheckpointer(trial, root=root)
        loaded = ckpt.load()
        state, start = loaded if loaded else ({"total": 0.0}, 0)
        for step in range(start + 1, 61):
            time.sleep(0.02)                      # one "training step"
            state["total"] += x
            trial.report(state["total"], step)
            if ckpt.should_save(step, every=25):   # cadence, SIGUSR1, or a stop
                ckpt.save(state, step)             # raises TrialPreempted after saving if stopping
        return state["total"]

    with preemption.handling_signals(), preemption.exit_on_preemption():
        study.optimize(objective, n_trials=1)
    """
)


def test_sigterm_to_a_worker_saves_tags_and_exits_99_then_the_retry_resumes(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'preempt.db'}"
    study = optuna.create_study(
        storage=open_storage(url), study_name=f"pre-{uuid.uuid4().hex[:6]}"
    )
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    root = tmp_path / "ckpt"
    args = [sys.executable, str(script), url, study.study_name, str(root)]
    proc = subprocess.Popen(args)
    deadline = time.monotonic() + 60
    while True:  # wait until the trial is well into its steps
        trials = study.get_trials()
        if trials and len(trials[0].intermediate_values) >= 8:
            break
        assert proc.poll() is None and time.monotonic() < deadline, "worker never got going"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # an extra checkpoint, and go on
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 99

    [trial] = study.get_trials()
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs[tags.PREEMPTED] is True
    assert trial.user_attrs[tags.KILL_REASON] == "preempted: SIGTERM"
    stopped_at = max(trial.intermediate_values)
    assert 8 <= stopped_at < 60

    number = enqueue_retry(study, trial, RetryPolicy(max_retries=1))
    assert subprocess.run(args, timeout=60).returncode == 0
    retry = study.trials[number]
    assert retry.state == TrialState.COMPLETE
    assert (
        retry.user_attrs[tags.RESUMED_FROM_STEP] == stopped_at
    )  # saved at the stop, not at step 0
    assert min(retry.intermediate_values) == stopped_at + 1
    assert retry.value == pytest.approx(60 * trial.params["x"])


# -- SLURM scripts -----------------------------------------------------------------------------


@pytest.mark.parametrize("script", [SBATCH, ARRAY], ids=lambda p: p.name)
def test_sbatch_scripts_parse_and_declare_requeue(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert (
        "#SBATCH --signal=B:TERM@120" in text
    )  # B: the batch shell (the launcher) gets it, no srun step
    assert "#SBATCH --requeue" in text
    assert "scontrol requeue" in text


def _stub_bin(tmp_path: Path) -> Path:
    """srun that just runs its command, scontrol/squeue that log and answer, a fake launcher."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "srun").write_text(
        '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n'
    )
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "scontrol $*" >> {log}\n')
    (bin_dir / "squeue").write_text('#!/bin/bash\necho "${FAKE_TIME_LEFT:-1:00:00}"\n')
    (bin_dir / "fake-optuna-guard").write_text(
        textwrap.dedent(
            f"""\
            #!/bin/bash
            echo "launcher $*" >> {log}
            if [[ -n "${{FAKE_WAIT_FOR_TERM:-}}" ]]; then
                trap 'echo "launcher got TERM" >> {log}; exit 99' TERM
                touch {tmp_path}/launcher-started
                while true; do sleep 0.05; done
            fi
            exit "${{FAKE_RC:-0}}"
            """
        )
    )
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    return bin_dir


def _env(tmp_path: Path, bin_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OPTUNA_GUARD_"))}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        SLURM_JOB_ID="1234",
        OPTUNA_GUARD_BIN=str(bin_dir / "fake-optuna-guard"),
        OPTUNA_GUARD_STORAGE="postgresql+psycopg://postgres@db/optuna",
        OPTUNA_GUARD_OBJECTIVE="train.py:objective",
        OPTUNA_GUARD_STUDY="resnet",
    )
    env.update(extra)
    return env


def _calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize(
    ("rc", "restarts", "script_rc", "requeued"),
    [("99", "0", 0, True), ("0", "0", 0, False), ("1", "0", 1, False), ("99", "20", 99, False)],
)
def test_sbatch_requeues_on_exit_99(
    tmp_path: Path, rc: str, restarts: str, script_rc: int, requeued: bool
) -> None:
    bin_dir = _stub_bin(tmp_path)
    env = _env(tmp_path, bin_dir, FAKE_RC=rc, SLURM_RESTART_COUNT=restarts)
    done = subprocess.run(
        ["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == script_rc, done.stderr
    calls = _calls(tmp_path)
    launcher = [c for c in calls if c.startswith("launcher ")]
    assert launcher == [
        "launcher run train.py:objective --study-name resnet --storage postgresql+psycopg://postgres@db/optuna "
        "--workers 1 --retry 2 --grace-period 90 --log-dir optuna_guard_logs/1234 --time-budget 3480"
    ]
    assert ("scontrol requeue 1234" in calls) is requeued


def test_script_arguments_are_accepted_by_the_real_cli(tmp_path: Path) -> None:
    """The options the scripts pass are the ones `optuna-guard run` has."""
    import shlex

    from optuna_guard.cli import build_parser

    bin_dir = _stub_bin(tmp_path)
    env = _env(
        tmp_path,
        bin_dir,
        OPTUNA_GUARD_N_TRIALS="10",
        OPTUNA_GUARD_RETRY_SHRINK="hooks:halve",
        OPTUNA_GUARD_SEED="1",
        SLURM_ARRAY_JOB_ID="5",
        SLURM_ARRAY_TASK_ID="0",
    )
    for script in (SBATCH, ARRAY):
        subprocess.run(
            ["bash", str(script)], env=env, capture_output=True, text=True, timeout=30, check=True
        )
    k8s_job = next(d for d in yaml.safe_load_all(K8S_JOB.read_text()) if d["kind"] == "Job")
    k8s_args = k8s_job["spec"]["template"]["spec"]["containers"][0]["args"]
    launches = [shlex.split(c)[1:] for c in _calls(tmp_path) if c.startswith("launcher ")] + [
        k8s_args
    ]
    assert len(launches) == 3
    for args in launches:
        parsed = build_parser().parse_args(args)  # exits 2 on an unknown option
        assert parsed.command == "run" and parsed.retry == 2


def test_sbatch_study_wide_target_is_passed_as_study_trials(tmp_path: Path) -> None:
    """The target is the launcher's --study-trials (counted in the storage by the launcher
    itself: tests/test_study_trials.py); the script keeps OPTUNA_GUARD_STUDY_TRIALS as its
    interface and has no inline Python any more."""
    bin_dir = _stub_bin(tmp_path)
    env = _env(tmp_path, bin_dir, OPTUNA_GUARD_STUDY_TRIALS="5")
    done = subprocess.run(
        ["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    runs = [c for c in _calls(tmp_path) if c.startswith("launcher ")]
    assert len(runs) == 1 and "--study-trials 5 --time-budget 3480" in runs[0]
    assert "python" not in SBATCH.read_text().lower().replace("optuna_guard_python", "")


def test_sbatch_without_a_storage_fails_with_one_clear_line(tmp_path: Path) -> None:
    bin_dir = _stub_bin(tmp_path)
    env = _env(tmp_path, bin_dir)
    del env["OPTUNA_GUARD_STORAGE"]
    done = subprocess.run(
        ["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode != 0
    assert "OPTUNA_GUARD_STORAGE" in done.stderr
    assert _calls(tmp_path) == []


def test_sbatch_forwards_sigterm_and_requeues(tmp_path: Path) -> None:
    bin_dir = _stub_bin(tmp_path)
    env = _env(tmp_path, bin_dir, FAKE_WAIT_FOR_TERM="1")
    proc = subprocess.Popen(
        ["bash", str(SBATCH)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 20
    while not (tmp_path / "launcher-started").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # scancel / preemption signals the batch shell too
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    calls = _calls(tmp_path)
    assert "launcher got TERM" in calls
    assert "scontrol requeue 1234" in calls
    assert "forwarding" in out


def test_array_task_requeues_itself_with_its_own_seed(tmp_path: Path) -> None:
    bin_dir = _stub_bin(tmp_path)
    env = _env(
        tmp_path,
        bin_dir,
        FAKE_RC="99",
        SLURM_ARRAY_JOB_ID="77",
        SLURM_ARRAY_TASK_ID="3",
        SLURM_RESTART_COUNT="1",
        OPTUNA_GUARD_SEED="10",
        OPTUNA_GUARD_N_TRIALS="50",
    )
    done = subprocess.run(
        ["bash", str(ARRAY)], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    calls = _calls(tmp_path)
    [launcher] = [c for c in calls if c.startswith("launcher ")]
    assert "--study-name resnet" in launcher and "--n-trials 50" in launcher
    assert "--seed 3011" in launcher  # 10 + 1000 * task 3 + restart 1
    assert "scontrol requeue 77_3" in calls


# -- Kubernetes ----------------------------------------------------------------------------------


def test_k8s_job_runs_n_pods_on_one_study_and_replaces_stopped_ones() -> None:
    docs = list(yaml.safe_load_all(K8S_JOB.read_text()))
    [job] = [d for d in docs if d["kind"] == "Job"]
    spec = job["spec"]
    assert spec["parallelism"] >= 2
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    [container] = pod["containers"]
    assert container["command"] == ["optuna-guard"] and container["args"][0] == "run"
    args = " ".join(container["args"])
    assert "--storage=$(OPTUNA_STORAGE)" in args and "--study-name=" in args
    grace = int(
        next(a for a in container["args"] if a.startswith("--grace-period=")).split("=")[1]
    )
    assert pod["terminationGracePeriodSeconds"] > grace
    env = {e["name"]: e for e in container["env"]}
    assert env["OPTUNA_STORAGE"]["valueFrom"]["secretKeyRef"]["name"] == "optuna-db"
    rules = spec["podFailurePolicy"]["rules"]
    ignore_99 = [
        r
        for r in rules
        if r["action"] == "Ignore" and 99 in r.get("onExitCodes", {}).get("values", [])
    ]
    assert ignore_99, "exit 99 (stopped, retry me) must not count as a failure"
    assert any(
        r["action"] == "FailJob" and 2 in r.get("onExitCodes", {}).get("values", []) for r in rules
    )


def test_a_kill_request_is_not_turned_into_a_preemption_by_the_signal_that_follows() -> None:
    """The supervisor's kill notice, then its SIGTERM: the trial is a kill, never `preempted`."""
    preemption.request_stop("system memory low", preempted=False)
    preemption.request_stop("SIGTERM")
    assert preemption.stop_reason() == "system memory low"
    assert preemption.stop_tags() == {tags.KILL_REASON: "system memory low"}
    preemption.reset()
    preemption.request_stop("SIGTERM")
    assert preemption.stop_tags() == {tags.PREEMPTED: True, tags.KILL_REASON: "preempted: SIGTERM"}
