"""TrialCheckpointer under faults: an edited manifest (D15) and a full disk (D16, on a real
5 MB tmpfs mounted by the test)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from optuna_guard import tags
from optuna_guard.checkpoint import TrialCheckpointer
from optuna_guard.exceptions import ConfigError

optuna.logging.set_verbosity(optuna.logging.WARNING)

MB = 2**20


@pytest.fixture()
def study() -> optuna.Study:
    return optuna.create_study(study_name=f"faults-{uuid.uuid4().hex[:8]}")


# -- D15: a manifest whose step was edited --------------------------------------------------------


def _edit_manifest(ckpt: TrialCheckpointer, of_step: int, **changes: Any) -> Path:
    [info] = [i for i in ckpt.checkpoints() if i.step == of_step]
    record = json.loads(info.manifest.read_text())
    record.update(changes)
    info.manifest.write_text(json.dumps(record))
    return info.manifest


def test_edited_manifest_step_is_not_trusted(
    study: optuna.Study, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trial = study.ask()
    ckpt = TrialCheckpointer(trial, root=tmp_path, keep_last=3, format="pickle")
    for step in (1, 2, 3):
        ckpt.save({"at": step}, step)
    manifest = _edit_manifest(ckpt, 3, step=9)
    with caplog.at_level(logging.WARNING, logger="optuna_guard"):
        loaded = TrialCheckpointer(trial, root=tmp_path, format="pickle").load()
    assert loaded == ({"at": 2}, 2)  # not ({"at": 3}, 9)
    assert study._storage.get_trial(trial._trial_id).user_attrs[tags.RESUMED_FROM_STEP] == 2
    assert any("says step 9" in r.getMessage() for r in caplog.records)
    assert manifest.with_name(
        manifest.name + ".corrupt"
    ).exists()  # quarantined like any corrupt one


def test_manifest_pointing_at_another_steps_payload_is_not_trusted(
    study: optuna.Study, tmp_path: Path
) -> None:
    """Step and payload name edited together (they agree with each other): the payload's own
    step, checked after the SHA-256, still gives it away."""
    trial = study.ask()
    ckpt = TrialCheckpointer(trial, root=tmp_path, keep_last=3, format="pickle")
    for step in (1, 2, 3):
        ckpt.save({"at": step}, step)
    [three] = [i for i in ckpt.checkpoints() if i.step == 3]
    renamed = three.payload.with_name(three.payload.name.replace("0000000003", "0000000009"))
    os.replace(three.payload, renamed)
    _edit_manifest(ckpt, 3, step=9, payload=renamed.name)
    assert TrialCheckpointer(trial, root=tmp_path, format="pickle").load() == ({"at": 2}, 2)


# -- D16: a full disk ----------------------------------------------------------------------------


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 5 MB tmpfs, unmounted afterwards even when the test fails."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def _state(mb: float, tag: int) -> dict[str, Any]:
    return {"blob": bytes([tag]) * int(mb * MB), "tag": tag}


def test_full_disk_rotates_first_and_retries(
    study: optuna.Study, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Room for two 1.9 MB checkpoints: before the fix every save after the second failed."""
    trial = study.ask()
    ckpt = TrialCheckpointer(trial, root=small_disk, keep_last=2, format="pickle")
    with caplog.at_level(logging.WARNING, logger="optuna_guard"):
        paths = [ckpt.save(_state(1.9, step), step) for step in range(1, 6)]
    assert all(path is not None and path.exists() for path in paths[-2:])
    assert [info.step for info in ckpt.checkpoints()] == [5, 4]
    state, step = TrialCheckpointer(trial, root=small_disk, format="pickle").load()  # type: ignore[misc]
    assert step == 5 and state["tag"] == 5
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # nothing was lost
    assert not [p for p in ckpt.directory.iterdir() if p.name.startswith(".tmp-")]


def test_checkpoint_that_never_fits_warns_once_and_the_trial_goes_on(
    study: optuna.Study, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trial = study.ask()
    ckpt = TrialCheckpointer(trial, root=small_disk, keep_last=2, format="pickle")
    assert ckpt.save(_state(1.0, 1), 1) is not None
    with caplog.at_level(logging.WARNING, logger="optuna_guard"):
        assert ckpt.save(_state(6.0, 2), 2) is None  # larger than the whole disk
        assert ckpt.save(_state(6.0, 3), 3) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "step 2" in warnings[0] and "No space left" in warnings[0] and "goes on" in warnings[0]
    # the last good checkpoint (keep_last=2 allowed keeping it) is still there and loadable;
    # no half-written file holds the space
    assert [
        p.name for p in ckpt.directory.iterdir() if not p.name.startswith("step-0000000001-")
    ] == []
    assert TrialCheckpointer(trial, root=small_disk, format="pickle").load() == (_state(1.0, 1), 1)
    study.tell(trial, 1.0)  # the trial was never failed by the checkpointer
    assert study._storage.get_trial(trial._trial_id).state == TrialState.COMPLETE


def test_keep_last_1_never_removes_the_only_checkpoint(
    study: optuna.Study, small_disk: Path
) -> None:
    trial = study.ask()
    ckpt = TrialCheckpointer(trial, root=small_disk, keep_last=1, format="pickle")
    assert ckpt.save(_state(3.0, 1), 1) is not None
    assert ckpt.save(_state(3.0, 2), 2) is None  # would need the only checkpoint's space
    assert TrialCheckpointer(trial, root=small_disk, format="pickle").load() == (_state(3.0, 1), 1)


# -- load-time verification: XXH3-128 (fast) or SHA-256 -----------------------------------------


def _flip_middle_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_sha256_manifest_carries_both_hashes_of_the_payload(
    study: optuna.Study, tmp_path: Path
) -> None:
    xxhash = pytest.importorskip("xxhash")
    ckpt = TrialCheckpointer(study.ask(), root=tmp_path, format="pickle", verify="sha256")
    payload = ckpt.save({"blob": os.urandom(3 * MB)}, 1)  # large enough for the hash thread
    assert isinstance(payload, Path)
    record = json.loads(payload.with_suffix(".json").read_text())
    data = payload.read_bytes()
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["xxh3_128"] == xxhash.xxh3_128(data).hexdigest()


@pytest.mark.parametrize(
    ("verify", "drop_fast_hash", "algorithm"),
    [("fast", False, "XXH3-128"), ("sha256", False, "SHA-256"), ("fast", True, "SHA-256")],
    ids=["fast", "sha256", "manifest-without-xxh3"],
)
def test_a_flipped_bit_is_caught_by_either_hash(
    study: optuna.Study,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    verify: str,
    drop_fast_hash: bool,
    algorithm: str,
) -> None:
    pytest.importorskip("xxhash")
    trial = study.ask()
    # verify="fast" writes both hashes, so either can be checked
    ckpt = TrialCheckpointer(trial, root=tmp_path, keep_last=2, format="pickle", verify="fast")
    ckpt.save({"at": 1, "blob": os.urandom(2 * MB)}, 1)
    ckpt.save({"at": 2, "blob": os.urandom(2 * MB)}, 2)
    [newest, _] = ckpt.checkpoints()
    if drop_fast_hash:  # a manifest written before XXH3 was added, or without xxhash
        _edit_manifest(ckpt, 2, xxh3_128=None)
    _flip_middle_bit(newest.payload)
    with caplog.at_level(logging.WARNING, logger="optuna_guard"):
        loaded = TrialCheckpointer(trial, root=tmp_path, format="pickle", verify=verify).load()  # type: ignore[arg-type]
    assert loaded is not None and loaded[1] == 1
    assert any(f"({algorithm} does not match" in r.getMessage() for r in caplog.records)


def test_verify_must_be_fast_or_sha256(study: optuna.Study, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="verify"):
        TrialCheckpointer(study.ask(), root=tmp_path, verify="md5")  # type: ignore[arg-type]


def test_xxh3_only_checkpoints_skip_the_sha256_and_still_catch_damage(
    study: optuna.Study, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("xxhash")
    trial = study.ask()
    ckpt = TrialCheckpointer(trial, root=tmp_path, keep_last=2, format="pickle", verify="xxh3")
    ckpt.save({"at": 1, "blob": os.urandom(2 * MB)}, 1)
    payload = ckpt.save({"at": 2, "blob": os.urandom(2 * MB)}, 2)
    assert isinstance(payload, Path)
    record = json.loads(payload.with_suffix(".json").read_text())
    assert "sha256" not in record and record["xxh3_128"]
    # any checkpointer of the chain can load it, whatever its own verify setting
    assert TrialCheckpointer(trial, root=tmp_path, format="pickle", verify="sha256").load()[1] == 2  # type: ignore[index]
    _flip_middle_bit(payload)
    with caplog.at_level(logging.WARNING, logger="optuna_guard"):
        loaded = TrialCheckpointer(trial, root=tmp_path, format="pickle").load()
    assert loaded is not None and loaded[1] == 1
    assert any("(XXH3-128 does not match" in r.getMessage() for r in caplog.records)
