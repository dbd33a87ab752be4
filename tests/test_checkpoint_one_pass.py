"""One-pass hashing of checkpoints: the hash is computed while the payload is written and while
it is read back, and what the manifest says is the hash of the bytes on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import xxhash

from optuna_guard import checkpoint
from optuna_guard.checkpoint import TrialCheckpointer, _HashingReader

MB = 2**20
BIG = 20 * MB  # more than two of the reader's pieces: the pipelined path


@pytest.fixture()
def study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study()


def _manifest(payload: Path) -> dict[str, Any]:
    return dict(json.loads(payload.with_suffix(".json").read_text()))


def _formats() -> list[str]:
    try:
        import torch  # noqa: F401
    except ImportError:
        return ["pickle"]
    return ["pickle", "torch"]


def _state(fmt: str, nbytes: int, seed: int) -> Any:
    data = random.Random(seed).randbytes(nbytes)
    if fmt == "torch":
        import torch

        return {"w": torch.frombuffer(bytearray(data), dtype=torch.uint8), "small": [seed] * 10}
    return {"w": data, "small": [seed] * 10}


@pytest.mark.parametrize("fmt", _formats())
@pytest.mark.parametrize("verify", ["xxh3", "sha256"])
def test_the_hash_written_is_the_hash_of_the_bytes_on_disk(
    study: optuna.Study, tmp_path: Path, fmt: str, verify: str
) -> None:
    ckpt = TrialCheckpointer(study.ask(), root=tmp_path, format=fmt, verify=verify)  # type: ignore[arg-type]
    for step, size in ((1, 100), (2, 3 * MB), (3, BIG)):
        payload = ckpt.save(_state(fmt, size, step), step)
        assert isinstance(payload, Path)
        data = payload.read_bytes()
        record = _manifest(payload)
        assert record["size"] == len(data)
        assert record["xxh3_128"] == xxhash.xxh3_128(data).hexdigest()
        if verify == "sha256":
            assert record["sha256"] == hashlib.sha256(data).hexdigest()
        else:
            assert "sha256" not in record
    loaded = TrialCheckpointer(study.trials[-1], root=tmp_path, study=study).load()
    assert loaded is not None and loaded[1] == 3


@pytest.mark.parametrize("fmt", _formats())
def test_the_reader_hashes_every_byte_once_whatever_the_deserializer_reads(
    tmp_path: Path, fmt: str
) -> None:
    path = tmp_path / "payload"
    with open(path, "wb") as f:
        checkpoint._serializer({"state": _state(fmt, BIG, 7), "step": 1}, fmt)(f)
    data = path.read_bytes()
    with open(path, "rb") as raw:
        reader = _HashingReader(raw, xxhash.xxh3_128())
        payload = checkpoint._deserialize(reader, fmt, None)
        assert reader.hexdigest() == xxhash.xxh3_128(data).hexdigest()
    assert payload["step"] == 1


def test_the_reader_digest_is_right_for_random_seeks_and_reads(tmp_path: Path) -> None:
    rng = random.Random(3)
    data = rng.randbytes(40 * MB + 123)
    path = tmp_path / "blob"
    path.write_bytes(data)
    for _ in range(5):
        with open(path, "rb") as raw:
            reader = _HashingReader(raw, hashlib.sha256())
            for _ in range(30):
                reader.seek(rng.randrange(len(data)))
                kind = rng.randrange(3)
                n = rng.choice([1, 100, 5000, 2 * MB, 17 * MB])
                if kind == 0:
                    got = reader.read(n)
                elif kind == 1:
                    start = reader.tell()
                    buffer = bytearray(n)
                    got = bytes(buffer[: reader.readinto(buffer)])
                    assert got == data[start : start + n]
                else:
                    got = reader.readline(n)
                assert got  # reads at random offsets return something
            assert reader.hexdigest() == hashlib.sha256(data).hexdigest()


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("fmt", _formats())
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_a_corrupt_payload_is_skipped_wherever_the_damage_is(
    study: optuna.Study, tmp_path: Path, caplog: pytest.LogCaptureFixture, fmt: str, where: str
) -> None:
    """Start: headers read out of order; middle: the big tensor read in pipelined pieces; end:
    the zip directory (read first, hashed last)."""
    trial = study.ask()
    ckpt = TrialCheckpointer(trial, root=tmp_path, keep_last=2, format=fmt)  # type: ignore[arg-type]
    ckpt.save(_state(fmt, BIG, 1), 1)
    payload = ckpt.save(_state(fmt, BIG, 2), 2)
    assert isinstance(payload, Path)
    size = payload.stat().st_size
    _flip(payload, {"start": 40, "middle": size // 2, "end": size - 30}[where])
    with caplog.at_level(logging.WARNING, logger="optuna_guard"):
        loaded = TrialCheckpointer(trial, root=tmp_path, format=fmt).load()  # type: ignore[arg-type]
    assert loaded is not None and loaded[1] == 1
    assert any("checkpoint step 2" in r.getMessage() for r in caplog.records)
    assert payload.with_suffix(".json.corrupt").exists()


def test_a_torn_payload_is_never_taken_for_good(
    study: optuna.Study, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A payload cut short (a crash after the manifest but before its data reached the disk)
    and one that was renamed but never got a manifest are both skipped."""
    trial = study.ask()
    ckpt = TrialCheckpointer(trial, root=tmp_path, keep_last=3, format="pickle")
    ckpt.save(_state("pickle", 3 * MB, 1), 1)
    torn = ckpt.save(_state("pickle", 3 * MB, 2), 2)
    assert isinstance(torn, Path)
    with open(torn, "r+b") as f:  # same size, the second half zeros (unwritten blocks)
        f.seek(torn.stat().st_size // 2)
        f.write(bytes(torn.stat().st_size - torn.stat().st_size // 2))
    # a step-3 payload whose manifest never got written
    (torn.parent / "step-0000000003-00000000.ckpt").write_bytes(
        pickle.dumps({"state": "half", "step": 3})
    )
    with caplog.at_level(logging.WARNING, logger="optuna_guard"):
        loaded = TrialCheckpointer(trial, root=tmp_path, format="pickle").load()
    assert loaded is not None and loaded[1] == 1
    assert any("does not match its manifest" in r.getMessage() for r in caplog.records)


def test_an_old_manifest_with_only_a_sha256_still_loads_and_is_verified(
    study: optuna.Study, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint written before XXH3-128 (version 1 manifest with ``sha256`` only)."""
    trial = study.ask()
    directory = TrialCheckpointer(trial, root=tmp_path).directory
    directory.mkdir(parents=True)
    for step in (1, 2):
        payload = directory / f"step-{step:010d}-0000000{step}.ckpt"
        data = pickle.dumps({"state": {"at": step, "blob": os.urandom(BIG)}, "step": step})
        payload.write_bytes(data)
        record = {
            "version": 1,
            "step": step,
            "payload": payload.name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "format": "pickle",
            "rng": False,
            "trial_number": 0,
            "original_trial_number": 0,
            "study_name": study.study_name,
            "saved_at": time.time(),
            "saved_ns": time.time_ns(),
        }
        payload.with_suffix(".json").write_text(json.dumps(record, indent=1))
    loaded = TrialCheckpointer(trial, root=tmp_path).load()
    assert loaded is not None and loaded[0]["at"] == 2 and loaded[1] == 2
    _flip(directory / "step-0000000002-00000002.ckpt", BIG // 2)
    with caplog.at_level(logging.WARNING, logger="optuna_guard"):
        loaded = TrialCheckpointer(trial, root=tmp_path).load()
    assert loaded is not None and loaded[0]["at"] == 1
    assert any("(SHA-256 does not match" in r.getMessage() for r in caplog.records)


def test_the_directory_is_fsynced_after_both_renames(
    study: optuna.Study, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One directory fsync per save, when payload and manifest both have their final names."""
    seen: list[list[str]] = []
    real = checkpoint._fsync_directory

    def record(path: Path) -> None:
        seen.append(sorted(p.name for p in path.iterdir()))
        real(path)

    ckpt = TrialCheckpointer(study.ask(), root=tmp_path, format="pickle")
    ckpt.save({"a": 1}, 1)  # creates the directories (their parents are fsynced)
    monkeypatch.setattr(checkpoint, "_fsync_directory", record)
    payload = ckpt.save({"a": 2}, 2)
    assert isinstance(payload, Path)
    [names] = seen
    assert payload.name in names and payload.with_suffix(".json").name in names
    assert not [n for n in names if n.startswith(".tmp-")]


def test_the_reader_is_a_file_object_for_pickle(tmp_path: Path) -> None:
    data = pickle.dumps({"x": list(range(1000)), "b": b"y" * (3 * MB)}, protocol=5)
    path = tmp_path / "p"
    path.write_bytes(data)
    with open(path, "rb") as raw:
        reader = _HashingReader(raw, xxhash.xxh3_128())
        assert pickle.load(reader)["b"] == b"y" * (3 * MB)  # type: ignore[arg-type]
        assert reader.hexdigest() == xxhash.xxh3_128(data).hexdigest()
