"""TrialCheckpointer throughput vs plain torch.save / pickle.dump, and the retry time it saves.

Prints, for a 100 MB and a 1 GB state:
  * save MB/s of TrialCheckpointer.save (temp file, SHA-256, fsync, rename, dir fsync, manifest,
    rotation) vs torch.save / pickle.dump to the same disk, both WITHOUT fsync (what most
    training scripts do) and WITH flush + fsync (the fair durable baseline);
  * load MB/s of TrialCheckpointer.load (SHA-256 verification + torch.load) vs torch.load /
    pickle.load of the same file (warm page cache for both);
and, for a simulated trial of S steps killed at step k, the wall time of the retry with and
without checkpoints.

    python benchmarks/bench_checkpoint.py [--sizes 100,1024] [--repeats 3] [--dir DIR]

Memory: at most ~3x the largest state is alive at once (state, a loaded copy, serializer
buffers); each size is freed before the next.
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from optuna_guard import tags
from optuna_guard.checkpoint import TrialCheckpointer
from optuna_guard.retries import RetryPolicy, enqueue_retry
from optuna_guard.storage import end_trial_from_outside, open_storage

MB = 2**20


def _plain_save(save: Callable[[Any, Any], None], state: Any, path: Path, fsync: bool) -> None:
    with open(path, "wb") as f:
        save(state, f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def _interleaved(candidates: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Best seconds of each candidate, run in turn (A B C A B C ...). Other processes on a
    shared machine only ever add time, so the minimum is the fairest estimate of each cost."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    cpu: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            gc.collect()
            started = time.perf_counter()
            cpu_started = time.process_time()  # all threads of this process (the hash thread too)
            result = fn()
            times[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - cpu_started)
            del result
    best = {name: min(values) for name, values in times.items()}
    best.update({f"cpu_{name}": min(values) for name, values in cpu.items()})
    return best


def _bench_size(
    size_mb: int,
    fmt: str,
    repeats: int,
    workdir: Path,
    study: optuna.Study,
    store: str | None = None,
    verify: str = "fast",
) -> dict[str, float]:
    import torch

    nbytes = size_mb * MB
    if fmt == "torch":
        state: Any = {"weights": torch.randn(nbytes // 4)}
        dump: Callable[[Any, Any], None] = torch.save

        def plain_load(path: Path) -> Any:
            return torch.load(path, weights_only=False)
    else:
        import numpy as np

        state = {"weights": np.random.default_rng(0).standard_normal(nbytes // 8)}

        def dump(obj: Any, f: Any) -> None:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)

        def plain_load(path: Path) -> Any:
            with open(path, "rb") as f:
                return pickle.load(f)

    trial = study.ask()
    ckpt = TrialCheckpointer(
        trial,
        root=workdir / "ckpt",
        keep_last=1,
        format=fmt,  # type: ignore[arg-type]
        store=store,
        verify=verify,
    )  # type: ignore[arg-type]
    step = iter(range(1, 10**6))
    written: list[Path] = []

    def plain(fsync: bool) -> None:
        # a new file each time, like the checkpointer (and like checkpoint-{step}.pt scripts);
        # the previous one is removed like the checkpointer's rotation removes its old one
        path = workdir / f"plain-{uuid.uuid4().hex[:8]}.bin"
        _plain_save(dump, state, path, fsync=fsync)  # noqa: F821 (runs before the del below)
        written.append(path)
        while len(written) > 1:
            written.pop(0).unlink()

    save = _interleaved(
        {
            "save_plain": lambda: plain(False),
            "save_plain_fsync": lambda: plain(True),
            "save_ours": lambda: ckpt.save(state, next(step)),  # noqa: F821 (as above)
        },
        repeats,
    )
    del state
    gc.collect()
    last_plain = written[-1]
    load = _interleaved(
        {"load_plain": lambda: plain_load(last_plain), "load_ours": ckpt.load}, repeats
    )
    ckpt.finalize()
    study.tell(trial, 0.0)
    last_plain.unlink()
    gc.collect()
    # MB/s, and for the cpu_* keys CPU milliseconds of this process
    return {
        key: (1000 * seconds if key.startswith("cpu_") else size_mb / seconds)
        for key, seconds in {**save, **load}.items()
    }


def _sha256_seconds(buffer: bytes) -> float:
    import hashlib

    started = time.perf_counter()
    hashlib.sha256(buffer).hexdigest()
    return time.perf_counter() - started


def _retry_scenario(
    workdir: Path, steps: int, kill_at: int, step_s: float, state_mb: int, save_every: int
) -> dict[str, float]:
    """One trial of ``steps`` steps killed at ``kill_at``, retried; seconds spent in the retry."""
    import torch

    storage = open_storage(f"sqlite:///{workdir / 'retry.db'}")
    out: dict[str, float] = {}
    for use_checkpoints in (False, True):
        study = optuna.create_study(storage=storage, study_name=f"retry-{uuid.uuid4().hex[:6]}")
        weights = torch.zeros(state_mb * MB // 4)

        def run(trial: optuna.Trial, stop_at: int | None) -> float:
            ckpt = (
                TrialCheckpointer(trial, root=workdir / "retry-ckpt")
                if use_checkpoints  # noqa: B023 (run() is called within this iteration)
                else None
            )
            loaded = ckpt.load() if ckpt else None
            state, start = (
                loaded if loaded else ({"weights": weights.clone(), "loss": 1.0}, 0)  # noqa: B023 (as above)
            )
            started = time.perf_counter()
            for step in range(start + 1, steps + 1):
                time.sleep(step_s)  # the training step
                state["weights"].add_(1.0)
                state["loss"] *= 0.99
                if ckpt is not None and ckpt.should_save(step, every=save_every):
                    ckpt.save(state, step)
                if step == stop_at:
                    break
            return time.perf_counter() - started

        first = study.ask()
        first.suggest_float("lr", 1e-4, 1e-1, log=True)
        out[f"first_{use_checkpoints}"] = run(first, kill_at)
        end_trial_from_outside(
            study._storage,
            first._trial_id,
            optuna.trial.TrialState.FAIL,
            user_attrs={tags.WORKER_CRASHED: True},
        )
        enqueue_retry(study, study._storage.get_trial(first._trial_id), RetryPolicy(max_retries=1))
        retry = study.ask()
        retry.suggest_float("lr", 1e-4, 1e-1, log=True)
        out[f"retry_{use_checkpoints}"] = run(retry, None)
        study.tell(retry, 0.0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1024", help="state sizes in MB (default 100,1024)")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument(
        "--dir", default=None, help="where to write (default: a temp dir on /tmp's disk)"
    )
    parser.add_argument("--formats", default="torch,pickle")
    parser.add_argument(
        "--verify",
        default="fast",
        choices=["fast", "sha256", "xxh3"],
        help="TrialCheckpointer(verify=...): hashes written and checked (default fast)",
    )
    parser.add_argument(
        "--store",
        default=None,
        help="also measure TrialCheckpointer(store=URL), e.g. file:///shared/dir (the rows marked 'store')",
    )
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import warnings

    warnings.simplefilter("ignore")
    workdir = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    try:
        # in-memory study: the throughput figures are about the files, not the database write of
        # the resumed_from_step tag (the retry scenario below uses SQLite)
        study = optuna.create_study(study_name="bench")
        print(
            f"TrialCheckpointer(verify={args.verify!r}) vs plain serializers, files in {workdir}; load average {os.getloadavg()[0]:.1f} "
            f"on {os.cpu_count()} CPUs (shared machine: best of interleaved runs)"
        )
        print(
            f"{'format':7} {'size':>6} | {'save MB/s: plain':>16} {'plain+fsync':>11} {'ours':>7} "
            f"{'ours/plain':>10} {'ours/plain+fsync':>16} | {'load MB/s: plain':>16} {'ours':>7} {'ratio':>6}"
        )
        cpu_rows: list[str] = []
        for fmt in args.formats.split(","):
            for size in (int(s) for s in args.sizes.split(",")):
                repeats = args.repeats if size < 512 else max(2, args.repeats // 2)
                for store in [None, args.store] if args.store else [None]:
                    r = _bench_size(size, fmt, repeats, workdir, study, store, args.verify)
                    label = fmt if store is None else f"{fmt[:1]}+store"
                    print(
                        f"{label:7} {size:>4}MB | {r['save_plain']:>16.0f} {r['save_plain_fsync']:>11.0f} "
                        f"{r['save_ours']:>7.0f} {r['save_ours'] / r['save_plain']:>10.2f} "
                        f"{r['save_ours'] / r['save_plain_fsync']:>16.2f} | {r['load_plain']:>16.0f} "
                        f"{r['load_ours']:>7.0f} {r['load_ours'] / r['load_plain']:>6.2f}",
                        flush=True,
                    )
                    cpu_rows.append(
                        f"{label:7} {size:>4}MB | {r['cpu_save_plain_fsync']:>11.0f} {r['cpu_save_ours']:>7.0f} "
                        f"{r['cpu_save_plain_fsync'] / r['cpu_save_ours']:>6.2f} | {r['cpu_load_plain']:>10.0f} "
                        f"{r['cpu_load_ours']:>7.0f} {r['cpu_load_plain'] / r['cpu_load_ours']:>6.2f}"
                    )
        print(
            "\nCPU time of this process (all threads), best run, ms; ratio = plain / ours. On a shared machine\n"
            "the wall-time ratios above follow the scheduler; these show what each variant costs itself:"
        )
        print(
            f"{'format':7} {'size':>6} | {'save: plain+fsync':>11} {'ours':>7} {'ratio':>6} | {'load: plain':>10} "
            f"{'ours':>7} {'ratio':>6}"
        )
        print("\n".join(cpu_rows))
        print(f"load average now {os.getloadavg()[0]:.1f}")
        buffer = os.urandom(64) * (100 * MB // 64)
        sha = min(_sha256_seconds(buffer) for _ in range(5))
        del buffer
        print(
            f"SHA-256 of 100 MB in memory on this machine now: {100 / sha:.0f} MB/s (what bounds a verified "
            f"load and the hash thread of a save)"
        )
        steps, kill_at, step_s, state_mb, every = 100, 72, 0.05, 50, 10
        s = _retry_scenario(workdir, steps, kill_at, step_s, state_mb, every)
        print(
            f"\nA trial of {steps} steps ({step_s * 1000:.0f} ms each, {state_mb} MB state, checkpoint every {every} "
            f"steps) killed at step {kill_at}, then retried:"
        )
        print(
            f"  first attempt until the kill: {s['first_False']:.2f} s plain, {s['first_True']:.2f} s with checkpoints "
            f"(overhead {100 * (s['first_True'] / s['first_False'] - 1):.0f} %)"
        )
        resumed = kill_at // every * every
        print(
            f"  retry: {s['retry_False']:.2f} s from step 0 vs {s['retry_True']:.2f} s resuming at step {resumed} "
            f"-> {s['retry_False'] - s['retry_True']:.2f} s saved ({100 * (1 - s['retry_True'] / s['retry_False']):.0f} % of the retry)"
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
