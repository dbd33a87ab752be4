"""Checkpoints every host can read: TrialCheckpointer(..., store=...) on a shared directory
(two "hosts" with private roots) and on S3 (a local moto server over HTTP started here), with
the chain's list in the study storage, rotation, verification and fallback."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from optuna_guard import tags
from optuna_guard._checkpoint_store import CHECKPOINTS_ATTR, STORE_ENV, open_checkpoint_store
from optuna_guard.checkpoint import CheckpointCleanupCallback, TrialCheckpointer
from optuna_guard.exceptions import ConfigError
from optuna_guard.retries import RetryPolicy, enqueue_retry
from optuna_guard.storage import end_trial_from_outside, open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


@pytest.fixture(autouse=True)
def _no_store_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STORE_ENV, raising=False)


@pytest.fixture()
def study(tmp_path: Path) -> optuna.Study:
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    return optuna.create_study(storage=storage, study_name=f"store-{uuid.uuid4().hex[:6]}")


def _listed(study: optuna.Study, trial: Any) -> list[dict[str, Any]]:
    return study._storage.get_trial_system_attrs(trial._trial_id).get(CHECKPOINTS_ATTR, [])


def _kill_and_retry(study: optuna.Study, trial: Any) -> Any:
    """What the launcher does for a worker that died under ``trial``; returns the retry."""
    end_trial_from_outside(
        study._storage, trial._trial_id, TrialState.FAIL, user_attrs={tags.WORKER_CRASHED: True}
    )
    enqueue_retry(study, study._storage.get_trial(trial._trial_id), RetryPolicy(max_retries=2))
    return study.ask()


# -- a shared directory, two hosts ----------------------------------------------------------------

_HOST = textwrap.dedent(
    """
    import os, signal, sys
    import optuna
    from optuna_guard.checkpoint import TrialCheckpointer
    from optuna_guard.storage import open_storage

    url, study_name, root = sys.argv[1:4]
    study = optuna.load_study(study_name=study_name, storage=open_storage(url))

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        ckpt = TrialCheckpointer(trial, root=root, format="pickle")  # store from the environment
        loaded = ckpt.load()
        state, start = loaded if loaded else ({"steps": []}, 0)
        for step in range(start + 1, 7):
            state["steps"].append(step)
            ckpt.save(state, step)
            if step == 4 and os.environ.get("DIE_AT_4"):
                os.kill(os.getpid(), signal.SIGKILL)   # host A is lost mid-trial
        trial.set_user_attr("steps_run_here", [s for s in state["steps"] if s > start])
        return x

    study.optimize(objective, n_trials=1)
    """
)


def test_retry_on_another_host_resumes_from_the_shared_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=open_storage(url), study_name="two-hosts")
    script = tmp_path / "host.py"
    script.write_text(_HOST)
    shared = tmp_path / "shared"
    env = {**os.environ, STORE_ENV: f"file://{shared}"}
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"

    first = subprocess.run(
        [sys.executable, str(script), url, study.study_name, str(host_a)],
        env={**env, "DIE_AT_4": "1"},
        timeout=120,
    )
    assert first.returncode == -signal.SIGKILL
    [dead] = study.get_trials()
    assert [c["step"] for c in dead.system_attrs[CHECKPOINTS_ATTR]] == [
        4,
        3,
    ]  # keep_last=2, newest first
    assert end_trial_from_outside(
        study._storage, dead._trial_id, TrialState.FAIL, user_attrs={tags.WORKER_CRASHED: True}
    )
    enqueue_retry(study, study._storage.get_trial(dead._trial_id), RetryPolicy(max_retries=1))

    second = subprocess.run(
        [sys.executable, str(script), url, study.study_name, str(host_b)], env=env, timeout=120
    )
    assert second.returncode == 0
    _, retry = study.get_trials()
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs[tags.RESUMED_FROM_STEP] == 4
    assert retry.user_attrs["steps_run_here"] == [5, 6]
    # nothing went to either host's private root; the shared store holds the chain's last two
    assert not host_a.exists() and not host_b.exists()
    assert sorted(p.name.split(".step-")[1][:10] for p in shared.iterdir()) == [
        "0000000005",
        "0000000006",
    ]
    assert not [p for p in shared.iterdir() if p.name.startswith(".tmp-")]


def test_without_a_store_the_other_host_finds_nothing(study: optuna.Study, tmp_path: Path) -> None:
    """The problem the store solves: a private root on host A is invisible to host B."""
    first = study.ask()
    TrialCheckpointer(first, root=tmp_path / "host-a", format="pickle").save("state", 3)
    retry = _kill_and_retry(study, first)
    assert TrialCheckpointer(retry, root=tmp_path / "host-b", format="pickle").load() is None


def test_store_argument_rotates_lists_and_finalizes(study: optuna.Study, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    trial = study.ask()
    ckpt = TrialCheckpointer(
        trial, root=tmp_path / "a", keep_last=2, format="pickle", store=f"file://{shared}"
    )
    for step in range(1, 6):
        artifact_id = ckpt.save({"at": step}, step)
        assert isinstance(artifact_id, str) and (shared / artifact_id).exists()
    assert [c["step"] for c in _listed(study, trial)] == [5, 4]
    assert len(list(shared.iterdir())) == 2
    assert [c.step for c in ckpt.checkpoints()] == [5, 4]
    assert ckpt.finalize() is True
    assert list(shared.iterdir()) == [] and _listed(study, trial) == []


def test_save_on_a_trial_taken_over_from_outside_goes_on_and_keeps_nothing(
    study: optuna.Study, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A partitioned host comes back: its trial was ended by another launcher. Saving must not
    raise out of the objective, nor leave an unlisted artifact in the shared store."""
    shared = tmp_path / "shared"
    trial = study.ask()
    ckpt = TrialCheckpointer(trial, root=tmp_path / "a", format="pickle", store=f"file://{shared}")
    assert isinstance(ckpt.save({"at": 1}, 1), str)
    end_trial_from_outside(
        study._storage,
        trial._trial_id,
        TrialState.FAIL,
        user_attrs={tags.WORKER_LOST: True, tags.KILL_REASON: "host b lost"},
    )
    with caplog.at_level(logging.WARNING, logger="optuna_guard"):
        assert ckpt.save({"at": 2}, 2) is None
        assert ckpt.save({"at": 3}, 3) is None
    assert [c["step"] for c in _listed(study, trial)] == [1]
    assert len(list(shared.iterdir())) == 1  # step 1 only; steps 2 and 3 removed again
    assert sum("ended from outside" in r.getMessage() for r in caplog.records) == 1


def test_users_own_optuna_filesystem_store_works(study: optuna.Study, tmp_path: Path) -> None:
    store = optuna.artifacts.FileSystemArtifactStore(tmp_path)
    first = study.ask()
    TrialCheckpointer(first, root=tmp_path / "a", format="pickle", store=store).save({"at": 2}, 2)
    retry = _kill_and_retry(study, first)
    assert TrialCheckpointer(retry, root=tmp_path / "b", format="pickle", store=store).load() == (
        {"at": 2},
        2,
    )


# -- S3 through a local moto server --------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's standalone S3 server over HTTP on a free loopback port; stopped by PID."""
    pytest.importorskip("boto3")
    server = Path(sys.executable).with_name("moto_server")
    if not server.exists():
        pytest.skip("moto[server] is not installed (pip install 'moto[server]')")
    port = _free_port()
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"moto_server did not start on {endpoint} (exit code {proc.poll()})"
                    )
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture()
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    import boto3

    for key, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    name = f"ckpt-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=name)
    yield client, name
    for obj in client.list_objects_v2(Bucket=name).get("Contents", []):
        client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)


def _keys(client: Any, bucket: str) -> list[str]:
    return sorted(obj["Key"] for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def test_s3_store_from_the_environment_saves_rotates_and_resumes(
    study: optuna.Study, tmp_path: Path, bucket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, name = bucket
    monkeypatch.setenv(STORE_ENV, f"s3://{name}/runs/exp1")
    first = study.ask()
    ckpt = TrialCheckpointer(first, root=tmp_path / "a", keep_last=2, format="pickle")
    for step in range(1, 5):
        ckpt.save({"at": step, "blob": os.urandom(64 * 1024)}, step)
    keys = _keys(client, name)
    assert len(keys) == 2 and all(k.startswith("runs/exp1/") for k in keys)
    assert [c["step"] for c in _listed(study, first)] == [4, 3]

    retry = _kill_and_retry(study, first)
    resumed = TrialCheckpointer(retry, root=tmp_path / "b", keep_last=2, format="pickle")
    state, step = resumed.load()  # type: ignore[misc]
    assert step == 4 and state["at"] == 4
    assert study._storage.get_trial(retry._trial_id).user_attrs[tags.RESUMED_FROM_STEP] == 4
    resumed.save({"at": 5}, 5)  # rotation spans the chain: the original's step 3 goes
    assert [c.step for c in resumed.checkpoints()] == [5, 4]
    assert len(_keys(client, name)) == 2


def _damage_corrupt(client: Any, bucket: str, key: str) -> None:
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))


def _damage_partial(client: Any, bucket: str, key: str) -> None:
    data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=data[: len(data) // 3])


def _damage_missing(client: Any, bucket: str, key: str) -> None:
    client.delete_object(Bucket=bucket, Key=key)


@pytest.mark.parametrize(
    "damage",
    [_damage_corrupt, _damage_partial, _damage_missing],
    ids=["bit-flip", "partial", "missing"],
)
def test_s3_damaged_newest_checkpoint_falls_back(
    study: optuna.Study, tmp_path: Path, bucket: Any, damage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client, name = bucket
    first = study.ask()
    ckpt = TrialCheckpointer(
        first, root=tmp_path, keep_last=3, format="pickle", store=f"s3://{name}/p"
    )
    ids = [ckpt.save({"at": step}, step) for step in (1, 2, 3)]
    damage(client, name, f"p/{ids[-1]}")
    retry = _kill_and_retry(study, first)
    with caplog.at_level(logging.WARNING, logger="optuna_guard"):
        loaded = TrialCheckpointer(
            retry, root=tmp_path, format="pickle", store=f"s3://{name}/p"
        ).load()
    assert loaded == ({"at": 2}, 2)
    assert any("step 3" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


def test_upload_failure_warns_once_and_the_trial_goes_on(
    study: optuna.Study, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Flaky(optuna.artifacts.FileSystemArtifactStore):
        fail = False

        def write(self, artifact_id: str, content_body: Any) -> None:
            if self.fail:
                raise RuntimeError("503 Slow Down")
            super().write(artifact_id, content_body)

    store = Flaky(tmp_path)
    trial = study.ask()
    ckpt = TrialCheckpointer(trial, root=tmp_path / "a", format="pickle", store=store)
    assert ckpt.save("good", 1) is not None
    store.fail = True
    with caplog.at_level(logging.WARNING, logger="optuna_guard"):
        assert ckpt.save("lost", 2) is None
        assert ckpt.save("lost", 3) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "503 Slow Down" in warnings[0]
    assert [c["step"] for c in _listed(study, trial)] == [1]
    assert ckpt.load() == ("good", 1)


def test_cleanup_callback_removes_finished_chains_from_the_store(
    study: optuna.Study, tmp_path: Path
) -> None:
    store = f"file://{tmp_path / 'shared'}"

    def objective(trial: optuna.Trial) -> float:
        TrialCheckpointer(trial, root=tmp_path, format="pickle", store=store).save("s", 1)
        if trial.number == 1:
            trial.set_user_attr(tags.EMERGENCY_KILLED, True)  # may be retried: kept
            raise optuna.TrialPruned()
        return float(trial.number)

    study.optimize(objective, n_trials=3, callbacks=[CheckpointCleanupCallback(store=store)])
    left = sorted(p.name.split(".")[1] for p in (tmp_path / "shared").iterdir())
    assert left == ["trial-1"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://host/x", "unknown scheme"),
        ("file://relative/dir", "absolute path"),
        ("s3:///prefix", "no bucket"),
        ("shared/dir", "unknown scheme"),
    ],
)
def test_bad_store_urls_are_one_line_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        open_checkpoint_store(url)
    assert "\n" not in str(info.value)


def test_bad_store_url_in_the_environment_names_the_variable(
    study: optuna.Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(STORE_ENV, "nfs://x")
    with pytest.raises(ConfigError, match=STORE_ENV):
        TrialCheckpointer(study.ask())
