"""TrialCheckpointer: atomic files, verification on load, rotation, the retry chain, RNG state,
preemption boundaries, cleanup; plus a real SIGKILL in the middle of a save and a real worker
SIGKILLed at step 5 whose retry resumes at step 5."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
import xxhash
from optuna.trial import TrialState

from optuna_guard import preemption, tags
from optuna_guard.checkpoint import CheckpointCleanupCallback, TrialCheckpointer, chain_directory
from optuna_guard.exceptions import CheckpointError, ConfigError
from optuna_guard.retries import RetryPolicy, enqueue_retry
from optuna_guard.storage import end_trial_from_outside, open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


@pytest.fixture(autouse=True)
def _clean_flags() -> Any:
    preemption.reset()
    yield
    preemption.reset()


@pytest.fixture(scope="module")
def _storage(tmp_path_factory: pytest.TempPathFactory) -> optuna.storages.RDBStorage:
    # one database file per module: creating the schema costs a second or two, a study does not
    return open_storage(f"sqlite:///{tmp_path_factory.mktemp('db') / 'ckpt.db'}")


@pytest.fixture()
def study(_storage: optuna.storages.RDBStorage) -> optuna.Study:
    return optuna.create_study(storage=_storage, study_name=f"ckpt-{uuid.uuid4().hex[:8]}")


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints"


def _stored_user_attrs(study: optuna.Study, trial: Any) -> dict[str, Any]:
    return study._storage.get_trial(trial._trial_id).user_attrs


def _save_steps(ckpt: TrialCheckpointer, steps: range) -> None:
    for step in steps:
        ckpt.save({"weights": [step] * 100, "step": step}, step)


# -- files on disk ------------------------------------------------------------------------------


def test_save_writes_payload_and_manifest_last(study: optuna.Study, root: Path) -> None:
    trial = study.ask()
    ckpt = TrialCheckpointer(trial, root=root)
    payload = ckpt.save({"a": 1}, 3)
    assert ckpt.directory == chain_directory(root, study.study_name, 0)
    manifest = json.loads(payload.with_suffix(".json").read_text())
    data = payload.read_bytes()
    assert manifest["step"] == 3
    assert manifest["size"] == len(data)
    # the default hash is XXH3-128 alone (verify="sha256" adds a SHA-256)
    assert manifest["xxh3_128"] == xxhash.xxh3_128(data).hexdigest()
    assert "sha256" not in manifest
    assert manifest["format"] == ("torch" if "torch" in sys.modules else "pickle")
    assert manifest["payload"] == payload.name
    assert not [p for p in ckpt.directory.iterdir() if p.name.startswith(".tmp-")]
    assert ckpt.load() == ({"a": 1}, 3)


def test_rotation_keeps_the_last_n(study: optuna.Study, root: Path) -> None:
    ckpt = TrialCheckpointer(study.ask(), root=root, keep_last=3)
    _save_steps(ckpt, range(1, 8))
    assert [info.step for info in ckpt.checkpoints()] == [7, 6, 5]
    assert len(list(ckpt.directory.glob("*.ckpt"))) == 3
    assert len(list(ckpt.directory.glob("*.json"))) == 3


def test_same_step_saved_twice_keeps_the_newer(study: optuna.Study, root: Path) -> None:
    ckpt = TrialCheckpointer(study.ask(), root=root)
    ckpt.save("first", 4)
    ckpt.save("second", 4)
    assert ckpt.load() == ("second", 4)


# -- damaged checkpoints --------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _drop_manifest(path: Path) -> None:
    path.with_suffix(".json").unlink()  # as if killed between payload rename and manifest


@pytest.mark.parametrize(
    ("damage", "message"),
    [(_truncate, "truncated"), (_flip_bit, "does not match its manifest"), (_drop_manifest, None)],
    ids=["truncated", "bit-flipped", "missing-manifest"],
)
def test_damaged_latest_checkpoint_falls_back_to_the_previous(
    study: optuna.Study,
    root: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Any,
    message: str | None,
) -> None:
    trial = study.ask()
    ckpt = TrialCheckpointer(trial, root=root, keep_last=3)
    _save_steps(ckpt, range(1, 4))
    latest = ckpt.checkpoints()[0].payload
    damage(latest)
    with caplog.at_level(logging.WARNING, logger="optuna_guard"):
        loaded = TrialCheckpointer(trial, root=root).load()
    assert loaded is not None
    state, step = loaded
    assert step == 2 and state == {"weights": [2] * 100, "step": 2}
    assert _stored_user_attrs(study, trial)[tags.RESUMED_FROM_STEP] == 2
    if message is not None:
        assert any(
            message in r.getMessage() and "step 3" in r.getMessage() for r in caplog.records
        )
        # the bad one no longer counts as a checkpoint, and is kept for inspection
        assert [info.step for info in ckpt.checkpoints()] == [2, 1]
        assert list(ckpt.directory.glob("*.json.corrupt"))


def test_every_checkpoint_damaged_means_none(study: optuna.Study, root: Path) -> None:
    trial = study.ask()
    ckpt = TrialCheckpointer(trial, root=root)
    _save_steps(ckpt, range(1, 3))
    for info in ckpt.checkpoints():
        _flip_bit(info.payload)
    assert ckpt.load() is None
    assert tags.RESUMED_FROM_STEP not in _stored_user_attrs(study, trial)


def test_failed_write_leaves_previous_checkpoint_and_no_temp(
    study: optuna.Study, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = TrialCheckpointer(study.ask(), root=root)
    ckpt.save("good", 1)

    def io_error(*_a: Any, **_k: Any) -> None:
        raise OSError(
            5, "Input/output error"
        )  # a full disk is not an error: see test_checkpoint_faults

    monkeypatch.setattr(os, "fsync", io_error)
    with pytest.raises(CheckpointError, match="Input/output error"):
        ckpt.save("never", 2)
    monkeypatch.undo()
    assert sorted(p.name.split("-")[1] for p in ckpt.directory.iterdir()) == [
        "0000000001",
        "0000000001",
    ]
    assert ckpt.load() == ("good", 1)


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(root: Path) -> None:
    """A real process killed while writing a ~200 MB checkpoint: only the old one is loadable."""
    study_name = f"kill-{uuid.uuid4().hex[:6]}"
    child = textwrap.dedent(
        f"""
        import optuna, sys, os
        from optuna_guard.checkpoint import TrialCheckpointer
        study = optuna.create_study(study_name={study_name!r})
        trial = study.ask()
        ckpt = TrialCheckpointer(trial, root={str(root)!r}, format="pickle")
        ckpt.save(b"small", 1)
        print("saving", flush=True)
        ckpt.save(os.urandom(1) * (200 * 2**20), 2)
        print("saved", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "saving"
    directory = chain_directory(root, study_name, 0)
    deadline = time.monotonic() + 30
    while not any(p.name.startswith(".tmp-") for p in directory.iterdir()):  # the write has begun
        assert time.monotonic() < deadline and proc.poll() is None, (
            "the child never started writing"
        )
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    study = optuna.create_study(study_name=study_name)  # the same name, as a tool would load it
    study.ask()
    loaded = TrialCheckpointer(study.trials[0], root=root, study=study).load()
    assert loaded == (b"small", 1)
    # the next save of the chain cleans the half-written leftovers of older saves up
    assert len(list(directory.glob("*.json"))) == 1


# -- the retry chain --------------------------------------------------------------------------


def test_retry_loads_the_original_trials_checkpoint(study: optuna.Study, root: Path) -> None:
    original = study.ask()
    x = original.suggest_float("x", 0, 1)
    _save_steps(TrialCheckpointer(original, root=root), range(1, 6))
    end_trial_from_outside(
        study._storage, original._trial_id, TrialState.FAIL, user_attrs={tags.WORKER_CRASHED: True}
    )
    number = enqueue_retry(study, study.trials[0], RetryPolicy(max_retries=2))

    retry = study.ask()
    assert retry.number == number
    assert retry.suggest_float("x", 0, 1) == x
    ckpt = TrialCheckpointer(retry, root=root)
    assert ckpt.original_number == 0 and ckpt.retry_history == [0]
    loaded = ckpt.load()
    assert loaded is not None and loaded[1] == 5
    assert loaded[0]["weights"] == [5] * 100
    assert _stored_user_attrs(study, retry)[tags.RESUMED_FROM_STEP] == 5
    ckpt.save({"weights": [6] * 100}, 6)  # the retry writes into the chain's directory
    assert ckpt.directory.name == "trial-0"
    assert [info.step for info in ckpt.checkpoints()] == [6, 5]
    assert {info.trial_number for info in ckpt.checkpoints()} == {0, number}


def test_fresh_trial_loads_nothing(study: optuna.Study, root: Path) -> None:
    _save_steps(TrialCheckpointer(study.ask(), root=root), range(1, 3))
    other = study.ask()
    assert TrialCheckpointer(other, root=root).load() is None
    assert tags.RESUMED_FROM_STEP not in _stored_user_attrs(study, other)


def test_studies_sharing_a_root_do_not_mix(root: Path) -> None:
    a = optuna.create_study(study_name="a/b")
    b = optuna.create_study(study_name="a_b")
    TrialCheckpointer(a.ask(), root=root).save("from a", 1)
    assert TrialCheckpointer(b.ask(), root=root).load() is None


# -- formats and RNG --------------------------------------------------------------------------


def test_torch_state_dicts_round_trip(study: optuna.Study, root: Path) -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(8, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    trial = study.ask()
    ckpt = TrialCheckpointer(trial, root=root)
    payload = ckpt.save({"model": model.state_dict(), "optim": opt.state_dict()}, 7)
    assert json.loads(payload.with_suffix(".json").read_text())["format"] == "torch"
    state, step = ckpt.load()  # type: ignore[misc]
    fresh = torch.nn.Linear(8, 3)
    fresh.load_state_dict(state["model"])
    assert step == 7
    assert torch.equal(fresh.weight, model.weight)
    assert state["optim"]["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_auto_format_does_not_import_torch(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys, optuna
        from optuna_guard.checkpoint import TrialCheckpointer
        study = optuna.create_study()
        ckpt = TrialCheckpointer(study.ask(), root={str(tmp_path / "ck")!r})
        ckpt.save({{"a": [1, 2]}}, 1)
        assert ckpt.load() == ({{"a": [1, 2]}}, 1)
        print("torch" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_rng_states_are_restored(study: optuna.Study, root: Path) -> None:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    ckpt = TrialCheckpointer(study.ask(), root=root, capture_rng=True)
    ckpt.save({"w": 1}, 1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert ckpt.load() == ({"w": 1}, 1)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_rng_not_restored_without_capture(study: optuna.Study, root: Path) -> None:
    ckpt = TrialCheckpointer(study.ask(), root=root)
    random.seed(1)
    ckpt.save("s", 1)
    first = random.random()
    random.seed(5)
    ckpt.load()
    assert random.random() != first


# -- preemption boundaries ----------------------------------------------------------------------


def test_save_is_a_preemption_boundary(study: optuna.Study, root: Path) -> None:
    trial = study.ask()
    ckpt = TrialCheckpointer(trial, root=root)
    ckpt.save("step 1", 1)
    preemption.request_stop("SIGTERM")
    assert ckpt.should_save(2, every=100)  # a stop makes any step a save point
    with pytest.raises(preemption.TrialPreempted):
        ckpt.save("step 2", 2)
    attrs = _stored_user_attrs(study, trial)
    assert attrs[tags.PREEMPTED] is True
    assert attrs[tags.KILL_REASON] == "preempted: SIGTERM"
    preemption.reset()
    assert TrialCheckpointer(trial, root=root).load() == ("step 2", 2)  # saved before raising


def test_sigusr1_asks_for_one_extra_checkpoint(study: optuna.Study, root: Path) -> None:
    ckpt = TrialCheckpointer(study.ask(), root=root)
    with preemption.handling_signals():
        assert [s for s in range(1, 11) if ckpt.should_save(s, every=5)] == [5, 10]
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not preemption.checkpoint_requested() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ckpt.should_save(7, every=5)  # off-cadence, because SIGUSR1 asked
        assert not ckpt.should_save(8, every=5)  # once per request
        os.kill(os.getpid(), signal.SIGUSR1)
        while not preemption.checkpoint_requested() and time.monotonic() < deadline:
            time.sleep(0.01)
        ckpt.save("state", 8)  # a save satisfies a pending request
        assert not preemption.checkpoint_requested()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handlers restored


def test_should_save_every_seconds(study: optuna.Study, root: Path) -> None:
    ckpt = TrialCheckpointer(study.ask(), root=root)
    assert not ckpt.should_save(1, every_seconds=3600)
    assert ckpt.should_save(1, every_seconds=0)


# -- cleanup ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("keep", "removed"), [(False, True), (True, False)])
def test_finalize(study: optuna.Study, root: Path, keep: bool, removed: bool) -> None:
    ckpt = TrialCheckpointer(study.ask(), root=root, keep_on_complete=keep)
    ckpt.save("s", 1)
    assert ckpt.finalize() is removed
    assert ckpt.directory.exists() is not removed


def test_finalize_best_keeps_only_a_best_value(study: optuna.Study, root: Path) -> None:
    first = study.ask()
    TrialCheckpointer(first, root=root).save("s", 1)
    study.tell(first, 1.0)
    better = TrialCheckpointer(study.ask(), root=root, keep_on_complete="best")
    better.save("s", 1)
    assert better.finalize(0.5) is False and better.directory.exists()
    worse = TrialCheckpointer(study.ask(), root=root, keep_on_complete="best")
    worse.save("s", 1)
    assert worse.finalize(2.0) is True and not worse.directory.exists()


def test_context_manager_keeps_checkpoints_when_the_trial_fails(
    study: optuna.Study, root: Path
) -> None:
    with pytest.raises(optuna.TrialPruned), TrialCheckpointer(study.ask(), root=root) as ckpt:
        ckpt.save("s", 1)
        raise optuna.TrialPruned()
    assert ckpt.directory.exists()
    with TrialCheckpointer(study.ask(), root=root) as done:
        done.save("s", 1)
    assert not done.directory.exists()


def test_cleanup_callback_removes_finished_chains_and_keeps_the_best(
    study: optuna.Study, root: Path
) -> None:
    values = {0: 3.0, 1: 1.0, 2: 2.0}

    def objective(trial: optuna.Trial) -> float:
        TrialCheckpointer(trial, root=root).save("s", 1)
        if trial.number == 3:
            trial.set_user_attr(tags.EMERGENCY_KILLED, True)  # may be retried: keep
            raise optuna.TrialPruned()
        if trial.number == 4:
            raise optuna.TrialPruned()  # pruned by a pruner: nothing will retry it
        return values[trial.number]

    study.optimize(
        objective, n_trials=5, callbacks=[CheckpointCleanupCallback(root, keep_best=True)]
    )
    left = sorted(p.name for p in (root / study.study_name).iterdir())
    assert left == ["trial-1", "trial-3"]  # the best (1.0) and the killed one


def test_constructor_validation(study: optuna.Study, root: Path) -> None:
    trial = study.ask()
    with pytest.raises(ConfigError, match="keep_last"):
        TrialCheckpointer(trial, root=root, keep_last=0)
    with pytest.raises(ConfigError, match="keep_on_complete"):
        TrialCheckpointer(trial, root=root, keep_on_complete="all")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="format"):
        TrialCheckpointer(trial, root=root, format="json")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="step"):
        TrialCheckpointer(trial, root=root).save("s", -1)


# -- a worker killed at step 5 of 10 ------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import os, signal, sys
    import optuna
    from optuna_guard.checkpoint import TrialCheckpointer
    from optuna_guard.storage import open_storage

    url, study_name, root = sys.argv[1:4]
    study = optuna.load_study(study_name=study_name, storage=open_storage(url))

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        ckpt = TrialCheckpointer(trial, root=root)
        loaded = ckpt.load()
        state, start = loaded if loaded else ({"total": 0.0, "steps": []}, 0)
        for step in range(start + 1, 11):
            state["total"] += x
            state["steps"].append(step)
            trial.report(state["total"], step)
            ckpt.save(state, step)
            if step == 5 and not trial.number:   # the original trial dies hard at step 5
                os.kill(os.getpid(), signal.SIGKILL)
        trial.set_user_attr("steps_run_here", [s for s in state["steps"] if s > start])
        return state["total"]

    study.optimize(objective, n_trials=1)
    """
)


def test_worker_sigkilled_at_step_5_is_retried_and_resumes_there(
    tmp_path: Path, root: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'worker.db'}"
    study = optuna.create_study(storage=open_storage(url), study_name=f"w-{uuid.uuid4().hex[:6]}")
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    first = subprocess.run(
        [sys.executable, str(script), url, study.study_name, str(root)], timeout=60
    )
    assert first.returncode == -signal.SIGKILL
    [dead] = study.get_trials()
    assert dead.state == TrialState.RUNNING and max(dead.intermediate_values) == 5
    # what the launcher does when it reaps a worker that died under a trial
    assert end_trial_from_outside(
        study._storage, dead._trial_id, TrialState.FAIL, user_attrs={tags.WORKER_CRASHED: True}
    )
    assert (
        enqueue_retry(study, study._storage.get_trial(dead._trial_id), RetryPolicy(max_retries=1))
        == 1
    )

    second = subprocess.run(
        [sys.executable, str(script), url, study.study_name, str(root)], timeout=60
    )
    assert second.returncode == 0
    original, retry = optuna.load_study(
        study_name=study.study_name, storage=open_storage(url)
    ).get_trials()
    assert original.state == TrialState.FAIL and original.user_attrs[tags.WORKER_CRASHED] is True
    assert retry.state == TrialState.COMPLETE
    assert retry.params == original.params
    assert retry.system_attrs["retry_history"] == [0] and retry.user_attrs[tags.RETRY_OF] == 0
    assert retry.user_attrs[tags.RESUMED_FROM_STEP] == 5
    assert retry.user_attrs["steps_run_here"] == [6, 7, 8, 9, 10]  # steps 1-5 were not redone
    assert sorted(retry.intermediate_values) == [6, 7, 8, 9, 10]
    assert retry.value == pytest.approx(10 * original.params["x"])
