"""TrialCheckpointer throughput vs plain torch.save / pickle.dump + fsync, and the retry time it saves.

Prints, for a 100 MB and a 1 GB state, as ratios measured in one interleaved run (plain, ours,
and with ``--baseline DIR`` the checkpointer of an older tree, in turn; median over rounds and
the min-max spread, since other processes on a shared machine move single runs):
  * save: TrialCheckpointer.save (temp file, hash in the same pass, fsync, rename, manifest,
    one directory fsync, rotation) vs torch.save / pickle.dump to a new file + flush + fsync;
  * load: TrialCheckpointer.load (hash in the same pass as the read, then the check) vs
    torch.load / pickle.load of the same file (warm page cache for both);
  * the CPU time of each (all threads of this process);
then SHA-256 and XXH3-128 throughput in memory, and, for a simulated trial of S steps killed at
step k, the wall time of the retry with and without checkpoints.

    python benchmarks/bench_checkpoint.py [--sizes 100,1024] [--rounds 3] [--dir DIR]
        [--verify xxh3|fast|sha256] [--baseline DIR]   # DIR/optuna_guard/checkpoint.py

``--baseline``: ``git archive <commit> optuna_guard | tar -x -C DIR``; its checkpoint module is
loaded next to the current package (it imports the current package's other modules).

Memory: at most ~3x the largest state is alive at once (state, a loaded copy, serializer
buffers); each size is freed before the next. Files are written under a temp dir that is
removed at the end.
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import shutil
import statistics
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


def _interleaved(
    candidates: dict[str, Callable[[], Any]], rounds: int
) -> dict[str, tuple[list[float], list[float]]]:
    """Seconds and CPU seconds of each candidate per round, run in turn (A B C A B C ...)."""
    out: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            gc.collect()
            started = time.perf_counter()
            cpu_started = time.process_time()  # all threads of this process (the hash thread too)
            result = fn()
            out[name][0].append(time.perf_counter() - started)
            out[name][1].append(time.process_time() - cpu_started)
            del result
    return out


def _ratios(
    times: dict[str, tuple[list[float], list[float]]], base: str, other: str
) -> list[float]:
    """Per-round throughput ratio other/base (= base seconds / other seconds)."""
    return [b / o for b, o in zip(times[base][0], times[other][0], strict=True)]


def _load_baseline(directory: str) -> Any:
    """The checkpoint module of an older tree, importable next to the current package."""
    import importlib.util
    import sys

    path = Path(directory) / "optuna_guard" / "checkpoint.py"
    spec = importlib.util.spec_from_file_location("optuna_guard._checkpoint_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _bench_size(
    size_mb: int,
    fmt: str,
    rounds: int,
    workdir: Path,
    study: optuna.Study,
    store: str | None = None,
    verify: str = "xxh3",
    baseline: Any = None,
) -> dict[str, tuple[list[float], list[float]]]:
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
        verify=verify,  # type: ignore[arg-type]
    )
    old = (
        baseline.TrialCheckpointer(trial, root=workdir / "ckpt-baseline", keep_last=1, format=fmt)
        if baseline is not None and store is None
        else None
    )
    step = iter(range(1, 10**6))
    written: list[Path] = []

    def plain() -> None:
        # a new file each time, like the checkpointer (and like checkpoint-{step}.pt scripts);
        # the previous one is removed like the checkpointer's rotation removes its old one
        path = workdir / f"plain-{uuid.uuid4().hex[:8]}.bin"
        _plain_save(dump, state, path, fsync=True)  # noqa: F821 (runs before the del below)
        written.append(path)
        while len(written) > 1:
            written.pop(0).unlink()

    saves: dict[str, Callable[[], Any]] = {
        "save_plain": plain,
        "save_ours": lambda: ckpt.save(state, next(step)),  # noqa: F821 (as above)
    }
    if old is not None:
        saves["save_baseline"] = lambda: old.save(state, next(step))  # noqa: F821 (as above)
    save = _interleaved(saves, rounds)
    del state
    gc.collect()
    last_plain = written[-1]
    loads: dict[str, Callable[[], Any]] = {
        "load_plain": lambda: plain_load(last_plain),
        "load_ours": ckpt.load,
    }
    if old is not None:
        loads["load_baseline"] = old.load
    load = _interleaved(loads, rounds)
    ckpt.finalize()
    if old is not None:
        old.finalize()
    study.tell(trial, 0.0)
    last_plain.unlink()
    gc.collect()
    return {**save, **load}


def _hash_rates(mb: int = 256, runs: int = 5) -> dict[str, list[float]]:
    """GB/s of SHA-256 and XXH3-128 over ``mb`` MB in memory (8 MB updates, as the checkpointer)."""
    import hashlib

    import xxhash

    buffer = os.urandom(MB) * mb
    view = memoryview(buffer)
    rates: dict[str, list[float]] = {"SHA-256": [], "XXH3-128": []}
    for _ in range(runs):
        for name, make in (("SHA-256", hashlib.sha256), ("XXH3-128", xxhash.xxh3_128)):
            digest = make()
            started = time.perf_counter()
            for offset in range(0, len(buffer), 8 * MB):
                digest.update(view[offset : offset + 8 * MB])
            digest.hexdigest()
            rates[name].append(mb / 1024 / (time.perf_counter() - started))
    view.release()
    return rates


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


def _spread(values: list[float], fmt: str = ".2f") -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1024", help="state sizes in MB (default 100,1024)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--dir", default=None, help="where to write (default: a temp dir on /tmp's disk)"
    )
    parser.add_argument("--formats", default="torch,pickle")
    parser.add_argument(
        "--verify",
        default="xxh3",
        choices=["xxh3", "fast", "sha256"],
        help="TrialCheckpointer(verify=...): hashes written and checked (default xxh3)",
    )
    parser.add_argument(
        "--baseline", default=None, help="DIR with an older optuna_guard/ to compare with"
    )
    parser.add_argument(
        "--store",
        default=None,
        help="also measure TrialCheckpointer(store=URL), e.g. file:///shared/dir (the rows marked 'store')",
    )
    parser.add_argument("--skip-retry", action="store_true", help="skip the retry scenario")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import warnings

    warnings.simplefilter("ignore")
    baseline = _load_baseline(args.baseline) if args.baseline else None
    workdir = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    try:
        # in-memory study: the throughput figures are about the files, not the database write of
        # the resumed_from_step tag (the retry scenario below uses SQLite)
        study = optuna.create_study(study_name="bench")
        print(
            f"TrialCheckpointer(verify={args.verify!r}) vs plain serializers + fsync, files in "
            f"{workdir}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
            f"{args.rounds} interleaved rounds: median [min-max] of the per-round ratios"
            + (f"; baseline = {args.baseline} (its default verify)" if baseline else "")
        )
        header = f"{'format':8} {'size':>6} | {'save ratio ours':>20}"
        header += f" {'baseline':>18}" if baseline else ""
        header += f" | {'load ratio ours':>20}"
        header += f" {'baseline':>18}" if baseline else ""
        header += " | plain MB/s save, load"
        print(header)
        cpu_rows: list[str] = []
        for fmt in args.formats.split(","):
            for size in (int(s) for s in args.sizes.split(",")):
                for store in [None, args.store] if args.store else [None]:
                    r = _bench_size(
                        size, fmt, args.rounds, workdir, study, store, args.verify, baseline
                    )
                    label = fmt if store is None else f"{fmt[:1]}+store"
                    with_baseline = "save_baseline" in r
                    row = f"{label:8} {size:>4}MB | {_spread(_ratios(r, 'save_plain', 'save_ours')):>20}"
                    if baseline:
                        row += f" {_spread(_ratios(r, 'save_plain', 'save_baseline')) if with_baseline else '-':>18}"
                    row += f" | {_spread(_ratios(r, 'load_plain', 'load_ours')):>20}"
                    if baseline:
                        row += f" {_spread(_ratios(r, 'load_plain', 'load_baseline')) if with_baseline else '-':>18}"
                    row += (
                        f" | {size / statistics.median(r['save_plain'][0]):.0f}, "
                        f"{size / statistics.median(r['load_plain'][0]):.0f}"
                    )
                    print(row, flush=True)
                    cpu = {name: 1000 * statistics.median(v[1]) for name, v in r.items()}
                    cpu_rows.append(
                        f"{label:8} {size:>4}MB | save plain {cpu['save_plain']:.0f}, ours "
                        f"{cpu['save_ours']:.0f}"
                        + (f", baseline {cpu['save_baseline']:.0f}" if with_baseline else "")
                        + f" | load plain {cpu['load_plain']:.0f}, ours {cpu['load_ours']:.0f}"
                        + (f", baseline {cpu['load_baseline']:.0f}" if with_baseline else "")
                    )
        print("\nCPU time of this process (all threads), median of rounds, ms:")
        print("\n".join(cpu_rows))
        print(f"load average now {os.getloadavg()[0]:.1f}")
        rates = _hash_rates()
        print(
            "Hash throughput in memory (256 MB, 8 MB updates, median [min-max] of 5, GB/s): "
            + ", ".join(f"{name} {_spread(values)}" for name, values in rates.items())
        )
        if args.skip_retry:
            return 0
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
