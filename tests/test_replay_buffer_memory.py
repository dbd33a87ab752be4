"""Memory stays flat over thousands of buffer updates — and the same measurement sees a leak.

Each case runs in a fresh interpreter (this file is also a script): memory that one case frees
stays in glibc's heap for reuse, and would hide the growth of the next case measured in the same
process. RSS is read after ``gc.collect()`` at the end of a warm-up (every size seen once) and
after the last cycle. Our buffers must stay within ``TOLERANCE_MB``; two naive buffers written
here, fed the very same rollouts, must grow by at least ``MIN_LEAK_MB`` — so the check can fail.
"""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

pytest.importorskip("torch")

CYCLES = 2_000
WARMUP = 200
OBS_DIM = 4
STEADY = [2048]
VARYING = [512, 4096, 1024, 3072, 2048, 256]  # all seen during warm-up
TOLERANCE_MB = 4.0
MIN_LEAK_MB = 20.0  # the naive buffers leak ~40 KB per cycle: ~70 MB over the measured cycles

RING_CAPACITY = 100_000
RING_EXTENDS = 10_000
RING_BATCH = 64


# ------------------------------------------------------------------ the measured process
def _rss_mb() -> float:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def _rollout_maker():
    """Rollouts the way a careless agent makes them: critic values computed with grad enabled,
    rewards scaled by the std of the PREVIOUS buffer contents (a running normaliser)."""
    import torch

    torch.manual_seed(0)
    critic = torch.nn.Linear(OBS_DIM, 1)

    def rollout(buffer: list, rows: int, n_traj: int = 4) -> list:
        scale = buffer[1].std() + 1e-6 if len(buffer) else torch.tensor(1.0)
        trajectories = []
        for _ in range(n_traj):
            n = rows // n_traj
            states = torch.randn(n, OBS_DIM)
            values = critic(states).squeeze(-1)  # forgot torch.no_grad(): requires grad
            rewards = (torch.randn(n) + 0.99 * values) / scale
            trajectories.append(
                (states, rewards, torch.ones(n), torch.randn(n, 2), torch.randn(n))
            )
        return trajectories

    return rollout


def _naive_buffers():
    import torch

    class NaiveKeepsReferences(list):
        """ElegantRL's update, plus a history 'for reward statistics' that is never trimmed."""

        def __init__(self) -> None:
            super().__init__()
            self.history: list = []

        def update_buffer(self, traj_list):
            self[:] = [torch.cat(list(f), dim=0).detach() for f in zip(*traj_list)]
            self.history.append((self[0], self[1]))
            return self[1].shape[0], self[1].mean().item()

    class NaiveKeepsGraph(list):
        """ElegantRL's update (list(map(...)) version) without detach: each generation's graph
        holds the previous generation through the std() of the reward normaliser."""

        def update_buffer(self, traj_list):
            self[:] = [torch.cat(list(f), dim=0) for f in zip(*traj_list)]
            return self[1].shape[0], self[1].mean().item()

    return NaiveKeepsReferences, NaiveKeepsGraph


def _measure_list(case: str, sizes: list[int]) -> dict:
    from optuna_guard.replay_buffer import ReplayBufferList

    refs, graph = _naive_buffers()
    buffer = {"ours": ReplayBufferList, "naive_refs": refs, "naive_graph": graph}[case]()
    rollout = _rollout_maker()
    for i in range(WARMUP):
        buffer.update_buffer(rollout(buffer, sizes[i % len(sizes)]))
    after_warmup = _rss_mb()
    for i in range(WARMUP, CYCLES):
        steps, mean_reward = buffer.update_buffer(rollout(buffer, sizes[i % len(sizes)]))
        assert steps == sizes[i % len(sizes)] // 4 * 4 and math.isfinite(mean_reward)
    return {"after_warmup_mb": after_warmup, "end_mb": _rss_mb()}


def _measure_ring(case: str) -> dict:
    import torch

    from optuna_guard.replay_buffer import ReplayBuffer

    fields = {
        "obs": ((8,), torch.float32),
        "next_obs": ((8,), torch.float32),
        "action": ((), torch.int64),
        "reward": ((), torch.float32),
        "done": ((), torch.bool),
        "step": ((), torch.int64),
    }
    if case == "ours":
        buffer = ReplayBuffer(RING_CAPACITY, fields)
        extend = buffer.extend
    else:  # a list of batches that is never trimmed
        kept: list = []

        def extend(**batch):
            kept.append({k: v.detach().clone() for k, v in batch.items()})

    def batch(i: int) -> dict:
        n = RING_BATCH
        return {
            "obs": torch.randn(n, 8),
            "next_obs": torch.randn(n, 8),
            "action": torch.randint(0, 4, (n,)),
            "reward": torch.randn(n),
            "done": torch.zeros(n, dtype=torch.bool),
            "step": torch.arange(i * n, (i + 1) * n),
        }

    warmup = math.ceil(RING_CAPACITY / RING_BATCH)  # first full pass commits every page
    for i in range(warmup):
        extend(**batch(i))
    after_warmup = _rss_mb()
    for i in range(warmup, RING_EXTENDS):
        extend(**batch(i))
    return {"after_warmup_mb": after_warmup, "end_mb": _rss_mb()}


def _run_case(kind: str, case: str, sizes: list[int] | None = None) -> float:
    """Growth in MB of one case, measured in a fresh interpreter."""
    out = subprocess.run(
        [sys.executable, __file__, kind, case, json.dumps(sizes or [])],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["end_mb"] - result["after_warmup_mb"]


CASES = {
    "ours_steady": ("list", "ours", STEADY),
    "ours_varying": ("list", "ours", VARYING),
    "naive_refs": ("list", "naive_refs", STEADY),
    "naive_graph": ("list", "naive_graph", VARYING),
    "ring_ours": ("ring", "ours", None),
    "ring_naive": ("ring", "naive", None),
}


@pytest.fixture(scope="module")
def growth() -> Iterator[dict[str, Future]]:
    """Every case started at once, two interpreters at a time (the machine has two cores)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {name: pool.submit(_run_case, *args) for name, args in CASES.items()}


# ---------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("case", ["ours_steady", "ours_varying"])
def test_update_buffer_keeps_rss_flat_over_2000_cycles(growth: dict, case: str) -> None:
    grown = growth[case].result()
    assert grown < TOLERANCE_MB, f"RSS grew {grown:.1f} MB over {CYCLES - WARMUP} updates"


def test_same_measurement_sees_a_buffer_that_keeps_references(growth: dict) -> None:
    grown = growth["naive_refs"].result()
    assert grown > MIN_LEAK_MB, f"the leaking buffer only grew {grown:.1f} MB"


def test_same_measurement_sees_a_buffer_that_keeps_the_autograd_graph(growth: dict) -> None:
    grown = growth["naive_graph"].result()
    assert grown > MIN_LEAK_MB, f"the graph-keeping buffer only grew {grown:.1f} MB"


def test_ring_buffer_rss_flat_over_10000_extends_past_capacity(growth: dict) -> None:
    grown = growth["ring_ours"].result()
    assert grown < TOLERANCE_MB, f"RSS grew {grown:.1f} MB over {RING_EXTENDS} extends"


def test_same_measurement_sees_an_unbounded_list_of_batches(growth: dict) -> None:
    grown = growth["ring_naive"].result()
    assert grown > MIN_LEAK_MB, f"the unbounded buffer only grew {grown:.1f} MB"


if __name__ == "__main__":
    kind, case, sizes_json = sys.argv[1:4]
    if kind == "list":
        print(json.dumps(_measure_list(case, json.loads(sizes_json))))
    else:
        print(json.dumps(_measure_ring(case)))
