"""optuna_guard.replay_buffer: behaviour of both buffers through their public API.

The RSS measurements over thousands of updates live in test_replay_buffer_memory.py.
"""

from __future__ import annotations

import gc
import io
import subprocess
import sys
import warnings
import weakref

import psutil
import pytest

torch = pytest.importorskip("torch")

from optuna_guard._units import GB, MB  # noqa: E402
from optuna_guard.exceptions import ConfigError, InsufficientMemoryError  # noqa: E402
from optuna_guard.memory import GpuMemory, SystemMemory  # noqa: E402
from optuna_guard.replay_buffer import (  # noqa: E402
    Field,
    InsufficientMemoryWarning,
    ReplayBuffer,
    ReplayBufferList,
)

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device (torch.cuda.is_available() is False)",
)

FIELDS = {
    "obs": ((3,), torch.float32),
    "action": ((), torch.int64),
    "reward": ((), torch.float32),
    "done": ((), torch.bool),
}


class FakeProbe:
    """A MemoryProbe with a fixed amount of available RAM (and optionally GPUs)."""

    def __init__(self, available_bytes: int, gpus: list[GpuMemory] | None = None) -> None:
        self.available_bytes = available_bytes
        self._gpus = gpus or []
        self.calls = 0

    def system(self) -> SystemMemory:
        self.calls += 1
        return SystemMemory(
            total_bytes=4 * self.available_bytes,
            available_bytes=self.available_bytes,
            used_bytes=3 * self.available_bytes,
            percent=75.0,
            source="cgroup v2",
        )

    def process_tree_rss(self, pid: int) -> int:
        return 0

    def gpus(self) -> list[GpuMemory]:
        return self._gpus


def batch(start: int, n: int) -> dict:
    """n transitions whose action is their global step number (so order can be checked)."""
    steps = torch.arange(start, start + n)
    return {
        "obs": steps.float().unsqueeze(1).repeat(1, 3),
        "action": steps,
        "reward": steps.float() / 10,
        "done": steps % 7 == 0,
    }


def trajectory(n: int, value: float = 1.0, obs_dim: int = 4) -> tuple:
    return (
        torch.full((n, obs_dim), value),
        torch.full((n,), value),
        torch.ones(n),
        torch.full((n, 2), value),
    )


# ------------------------------------------------------------------------- import surface
def test_import_optuna_guard_does_not_load_torch() -> None:
    code = (
        "import sys, optuna_guard, optuna_guard.memory, optuna_guard.exceptions;"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_import_without_torch_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"  # makes `import torch` raise ImportError
        "try:\n"
        "    import optuna_guard.replay_buffer\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'optuna-guard[torch]'" in out.stdout
    assert "torch==2.13.0" in out.stdout


# ------------------------------------------------------------------------ ReplayBufferList
def test_update_buffer_concatenates_fields_like_elegantrl() -> None:
    trajs = [trajectory(3, 1.0), trajectory(5, 2.0)]
    buffer = ReplayBufferList()
    steps, mean_reward = buffer.update_buffer(trajs)
    assert steps == 8
    assert mean_reward == pytest.approx((3 * 1.0 + 5 * 2.0) / 8)
    # the list(map(...)) version ElegantRL had before commit c2dcece, which worked
    expected = [torch.cat(f, dim=0) for f in map(list, zip(*trajs))]
    assert len(buffer) == len(expected) == 4
    for got, want in zip(buffer, expected):
        assert torch.equal(got, want)


def test_upstream_one_iterator_version_fails_where_ours_works() -> None:
    trajs = [trajectory(3), trajectory(2)]
    cur_items = [map(list, zip(*trajs))]  # ElegantRL since c2dcece: ONE map object in a list
    with pytest.raises(TypeError):
        [torch.cat(item, dim=0) for item in cur_items]
    assert ReplayBufferList().update_buffer(trajs)[0] == 5


def test_update_buffer_replaces_contents_and_returns_plain_numbers() -> None:
    buffer = ReplayBufferList()
    buffer.update_buffer([trajectory(10, 1.0)])
    steps, mean_reward = buffer.update_buffer([trajectory(4, 3.0)])
    assert (steps, mean_reward) == (4, 3.0)
    assert type(steps) is int and type(mean_reward) is float
    assert [t.shape[0] for t in buffer] == [4, 4, 4, 4]


def test_stored_tensors_are_detached_copies_on_the_buffer_device() -> None:
    weight = torch.ones(4, requires_grad=True)
    states = torch.randn(6, 4) * weight  # part of an autograd graph
    rewards = torch.randn(6, dtype=torch.float64)
    buffer = ReplayBufferList()
    buffer.update_buffer([(states, rewards, torch.ones(6))])
    for tensor in buffer:
        assert not tensor.requires_grad and tensor.grad_fn is None
        assert tensor.device == torch.device("cpu")
    assert buffer[1].dtype == torch.float64
    assert buffer[0].untyped_storage().data_ptr() != states.untyped_storage().data_ptr()
    states.data.add_(1)  # the caller reusing its rollout tensors must not change the buffer
    assert not torch.equal(buffer[0], states.detach())


def test_previous_generation_is_freed_before_the_next_is_allocated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    buffer = ReplayBufferList()
    buffer.update_buffer([trajectory(50)])
    old_refs = [weakref.ref(t) for t in buffer]
    alive_at_allocation: list[bool] = []
    real_cat = torch.cat

    def watched_cat(*args, **kwargs):  # torch.cat allocates each new field
        alive_at_allocation.append(any(ref() is not None for ref in old_refs))
        return real_cat(*args, **kwargs)

    monkeypatch.setattr(torch, "cat", watched_cat)
    gc.disable()  # freed by reference counting alone: no cycle needs the collector
    try:
        buffer.update_buffer([trajectory(40), trajectory(2)])
    finally:
        gc.enable()
    assert alive_at_allocation == [False] * 4
    assert all(ref() is None for ref in old_refs)


def test_an_outside_reference_keeps_only_its_own_tensor() -> None:
    buffer = ReplayBufferList()
    buffer.update_buffer([trajectory(8)])
    states = buffer[0]  # user code holding on to a field
    others = [weakref.ref(t) for t in buffer[1:]]
    buffer.update_buffer([trajectory(8)])
    assert states.shape == (8, 4)
    assert all(ref() is None for ref in others)


def test_bad_traj_list_leaves_old_contents() -> None:
    buffer = ReplayBufferList()
    buffer.update_buffer([trajectory(5, 2.0)])
    with pytest.raises(ConfigError, match="trajectory 1 has 3 fields but trajectory 0 has 4"):
        buffer.update_buffer([trajectory(3), trajectory(3)[:3]])
    assert buffer[0].shape == (5, 4) and float(buffer[1].mean()) == 2.0


def test_failed_allocation_leaves_an_empty_buffer_not_a_half_built_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    buffer = ReplayBufferList()
    buffer.update_buffer([trajectory(5)])
    calls = []
    real_cat = torch.cat

    def failing_cat(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real_cat(*args, **kwargs)

    monkeypatch.setattr(torch, "cat", failing_cat)
    with pytest.raises(RuntimeError, match="allocate"):
        buffer.update_buffer([trajectory(5)])
    assert len(buffer) == 0


def test_parts_with_mixed_dtypes_are_promoted_like_torch_cat() -> None:
    buffer = ReplayBufferList()
    a = (torch.ones(2, 3), torch.ones(2, dtype=torch.float16), torch.ones(2, dtype=torch.int32))
    b = (torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1), torch.zeros(1, dtype=torch.int64))
    buffer.update_buffer([a, b])
    expected = [torch.cat(f, dim=0) for f in map(list, zip(a, b))]
    assert [t.dtype for t in buffer] == [torch.float64, torch.float32, torch.int64]
    assert all(torch.equal(got, want) for got, want in zip(buffer, expected))


@pytest.mark.parametrize(
    ("traj_list", "message"),
    [
        ([], "traj_list is empty"),
        (trajectory(3), "wrap a single trajectory in a list"),
        ([(torch.ones(3), "x")], "field 1 of trajectory 0 is a str"),
        ([(torch.ones(3), torch.tensor(1.0))], "0-d tensor"),
        ([trajectory(3, obs_dim=4), trajectory(3, obs_dim=5)], "only dim 0"),
        ([(torch.ones(3),)], "reward_index=1 but trajectories have only 1 fields"),
        (torch.ones(3, 3), "list of trajectories"),
    ],
)
def test_update_buffer_rejects_bad_input(traj_list, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ReplayBufferList().update_buffer(traj_list)


def test_release_memory_runs_the_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    collected: list[int] = []
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(1) or 0)
    ReplayBufferList(release_memory=True).update_buffer([trajectory(3)])
    ReplayBufferList().update_buffer([trajectory(3)])
    assert collected == [1]


def test_list_state_dict_round_trip_through_torch_save() -> None:
    buffer = ReplayBufferList()
    buffer.update_buffer([trajectory(7, 1.5), trajectory(2, 0.5)])
    blob = io.BytesIO()
    torch.save({"buffer": buffer.state_dict(), "step": 3}, blob)
    blob.seek(0)
    state = torch.load(blob, weights_only=True)  # plain containers + tensors only
    restored = ReplayBufferList()
    restored.load_state_dict(state["buffer"])
    assert len(restored) == len(buffer)
    for got, want in zip(restored, buffer):
        assert torch.equal(got, want) and got.dtype == want.dtype
    assert restored.update_buffer([trajectory(1)])[0] == 1


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.update(format="other"), "missing format marker"),
        (lambda s: s.update(version=99), "version 99"),
        (lambda s: s.update(fields="x"), "list of tensors"),
        (lambda s: s["fields"].pop(), "has 3 fields but this buffer holds 4"),
        (lambda s: s["fields"].__setitem__(0, torch.ones(3, 5)), "field 0 is"),
        (lambda s: s["fields"].__setitem__(1, torch.ones(3, dtype=torch.int64)), "int64"),
    ],
)
def test_list_load_state_dict_refuses_mismatches(mutate, message: str) -> None:
    buffer = ReplayBufferList()
    buffer.update_buffer([trajectory(3)])
    state = buffer.state_dict()
    state["fields"] = list(state["fields"])
    mutate(state)
    with pytest.raises(ConfigError, match=message):
        buffer.load_state_dict(state)
    assert len(buffer) == 4  # unchanged


# ---------------------------------------------------------------------------- ReplayBuffer
def test_fields_are_preallocated_once_with_the_spec() -> None:
    buffer = ReplayBuffer(1000, FIELDS)
    assert buffer.capacity == 1000 and len(buffer) == 0 and buffer.position == 0
    assert buffer.fields["obs"] == Field((3,), torch.float32)
    assert buffer.nbytes == 1000 * (3 * 4 + 8 + 4 + 1)
    assert buffer.nbytes == ReplayBuffer.estimate_nbytes(1000, FIELDS)
    pointers = {n: t.data_ptr() for n, t in buffer._storage.items()}
    for i in range(30):
        buffer.extend(batch(i * 97, 97))
    assert {n: t.data_ptr() for n, t in buffer._storage.items()} == pointers


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (((4,), torch.float32), Field((4,), torch.float32)),
        ((4, 3), Field((4, 3), torch.float32)),
        (5, Field((5,), torch.float32)),
        ((), Field((), torch.float32)),
        (torch.int64, Field((), torch.int64)),
        (Field((2,), torch.uint8), Field((2,), torch.uint8)),
        (([2, 2], torch.float16), Field((2, 2), torch.float16)),
    ],
)
def test_field_spec_forms(spec, expected: Field) -> None:
    assert ReplayBuffer(4, {"x": spec}).fields["x"] == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"capacity": 0}, "capacity must be a positive int but got 0"),
        ({"capacity": 2.5}, "capacity must be a positive int"),
        ({"fields": {}}, "fields must be a non-empty mapping"),
        ({"fields": {"x": "big"}}, "field 'x': shape must be a tuple"),
        ({"fields": {"x": ((-1,), torch.float32)}}, "non-negative"),
        ({"device": "tpu"}, "device='tpu'"),
        ({"on_insufficient": "shrug"}, "on_insufficient must be one of raise, warn, ignore"),
        ({"safety_margin": -0.1}, "safety_margin"),
    ],
)
def test_ring_constructor_rejects_bad_settings(kwargs: dict, message: str) -> None:
    args = {"capacity": 10, "fields": FIELDS} | kwargs
    with pytest.raises(ConfigError, match=message):
        ReplayBuffer(args.pop("capacity"), args.pop("fields"), **args)


def test_extend_wraps_around_and_overwrites_oldest_in_order() -> None:
    capacity, n = 1000, 37
    buffer = ReplayBuffer(capacity, FIELDS)
    total = 0
    for _ in range(10_000):
        buffer.extend(batch(total, n))
        total += n
    assert len(buffer) == capacity and buffer.full
    assert buffer.position == total % capacity
    contents = buffer.contents()
    assert torch.equal(contents["action"], torch.arange(total - capacity, total))
    assert torch.equal(contents["obs"][:, 2], contents["action"].float())
    assert torch.equal(contents["done"], contents["action"] % 7 == 0)


def test_extend_larger_than_capacity_keeps_the_newest_rows() -> None:
    buffer = ReplayBuffer(10, FIELDS)
    buffer.extend(batch(0, 3))
    buffer.extend(batch(3, 25))
    assert buffer.position == 28 % 10
    assert torch.equal(buffer.contents()["action"], torch.arange(18, 28))


def test_add_single_transitions_accepts_python_and_numpy_values() -> None:
    np = pytest.importorskip("numpy")
    buffer = ReplayBuffer(3, FIELDS)
    for i in range(4):
        buffer.add(obs=np.full(3, i, dtype=np.float32), action=i, reward=float(i), done=False)
    assert torch.equal(buffer.contents()["action"], torch.tensor([1, 2, 3]))
    buffer.add({"obs": torch.zeros(3), "action": 9, "reward": 0.0, "done": True})
    assert buffer.contents()["action"].tolist() == [2, 3, 9]


def test_writes_detach_from_the_autograd_graph() -> None:
    weight = torch.ones(1, requires_grad=True)
    data = batch(0, 5)
    data["reward"] = data["reward"] * weight
    data["obs"] = data["obs"] * weight
    buffer = ReplayBuffer(8, FIELDS)
    buffer.extend(data)
    for tensor in buffer._storage.values():
        assert not tensor.requires_grad and tensor.grad_fn is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"obs": torch.zeros(5, 4)}, r"field 'obs': expected shape \('N', 3\)"),
        ({"action": torch.zeros(5)}, "cannot store float32 values in a int64 field"),
        ({"reward": torch.zeros(4)}, "field 'reward' has 4 rows but the other fields have 5"),
        ({"bonus": torch.zeros(5)}, "unknown: bonus"),
        ({"done": None}, "missing: done"),
    ],
)
def test_bad_extend_is_refused_and_writes_nothing(change: dict, message: str) -> None:
    buffer = ReplayBuffer(20, FIELDS)
    buffer.extend(batch(0, 3))
    before = buffer.contents()
    data = batch(100, 5) | change
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        buffer.extend(data)
    assert len(buffer) == 3 and buffer.position == 3
    assert all(torch.equal(buffer.contents()[k], v) for k, v in before.items())


def test_safe_dtype_casts_are_allowed() -> None:
    buffer = ReplayBuffer(4, FIELDS)
    data = batch(0, 2)
    data["reward"] = data["reward"].double()
    data["action"] = data["action"].int()
    buffer.extend(data)
    assert buffer.contents()["reward"].dtype == torch.float32


def test_sample_returns_only_valid_rows_with_field_shapes() -> None:
    buffer = ReplayBuffer(100, FIELDS)
    buffer.extend(batch(0, 37))
    out = buffer.sample(5000, generator=torch.Generator().manual_seed(1))
    assert set(out) == set(FIELDS)
    assert out["obs"].shape == (5000, 3) and out["obs"].dtype == torch.float32
    assert out["action"].shape == (5000,) and out["action"].dtype == torch.int64
    assert out["done"].dtype == torch.bool
    assert set(out["action"].tolist()) == set(range(37))  # valid rows only, every one reachable
    assert torch.equal(out["obs"][:, 0], out["action"].float())  # rows stay aligned


def test_sample_after_wrap_covers_the_whole_ring() -> None:
    buffer = ReplayBuffer(50, FIELDS)
    buffer.extend(batch(0, 130))
    out = buffer.sample(4000, generator=torch.Generator().manual_seed(2))
    assert set(out["action"].tolist()) == set(range(80, 130))


def test_seeded_generator_gives_reproducible_batches() -> None:
    buffer = ReplayBuffer(500, FIELDS)
    buffer.extend(batch(0, 500))
    a = buffer.sample(64, generator=torch.Generator().manual_seed(7))
    b = buffer.sample(64, generator=torch.Generator().manual_seed(7))
    c = buffer.sample(64, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a[k], b[k]) for k in FIELDS)
    assert not torch.equal(a["action"], c["action"])


def test_sample_refuses_empty_buffer_and_bad_batch_size() -> None:
    buffer = ReplayBuffer(5, FIELDS)
    with pytest.raises(ConfigError, match="empty ReplayBuffer"):
        buffer.sample(2)
    buffer.extend(batch(0, 2))
    with pytest.raises(ConfigError, match="batch_size must be a positive int but got 0"):
        buffer.sample(0)


@pytest.mark.parametrize(
    "rows", [0, 13, 40, 97], ids=["empty", "partial", "exactly-full", "wrapped"]
)
def test_ring_state_dict_round_trip_through_torch_save(rows: int) -> None:
    buffer = ReplayBuffer(40, FIELDS)
    if rows:
        buffer.extend(batch(0, rows))
    blob = io.BytesIO()
    torch.save({"buffer": buffer.state_dict()}, blob)
    blob.seek(0)
    restored = ReplayBuffer(40, FIELDS)
    restored.extend(batch(1000, 5))  # whatever was there is replaced
    restored.load_state_dict(torch.load(blob, weights_only=True)["buffer"])
    assert (len(restored), restored.position, restored.full) == (
        len(buffer),
        buffer.position,
        buffer.full,
    )
    for name, tensor in buffer.contents().items():
        assert torch.equal(restored.contents()[name], tensor)
    buffer.extend(batch(500, 11))  # both continue identically
    restored.extend(batch(500, 11))
    assert buffer.position == restored.position
    assert torch.equal(restored.contents()["action"], buffer.contents()["action"])
    a = buffer.sample(16, generator=torch.Generator().manual_seed(3))
    b = restored.sample(16, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a[k], b[k]) for k in FIELDS)


def test_compact_state_dict_saves_only_the_valid_rows() -> None:
    buffer = ReplayBuffer(100_000, {"x": ((16,), torch.float32)})
    buffer.extend(x=torch.ones(10, 16))
    full, compact = io.BytesIO(), io.BytesIO()
    torch.save(buffer.state_dict(), full)
    torch.save(buffer.state_dict(compact=True), compact)
    assert len(compact.getvalue()) < 20_000 < 6 * MB < len(full.getvalue())
    compact.seek(0)
    restored = ReplayBuffer(100_000, {"x": ((16,), torch.float32)})
    restored.load_state_dict(torch.load(compact, weights_only=True))
    assert torch.equal(restored.contents()["x"], torch.ones(10, 16))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.update(format=None), "missing format marker"),
        (
            lambda s: s.update(capacity=41),
            "saved with capacity 41 but this buffer has capacity 40",
        ),
        (lambda s: s.update(position=3), "position 3 does not match size 13"),
        (lambda s: s.update(size=41), "size 41 is outside"),
        (lambda s: s.update(full=True), "contradicts size 13"),
        (lambda s: s["storage"].pop("done"), "its fields are obs, action, reward"),
        (
            lambda s: s["storage"].update(obs=torch.zeros(13, 4)),
            r"field 'obs' has shape \(13, 4\)",
        ),
        (
            lambda s: s["storage"].update(action=torch.zeros(13, dtype=torch.int32)),
            "field 'action' is int32 but this buffer stores int64",
        ),
    ],
)
def test_ring_load_state_dict_refuses_mismatches(mutate, message: str) -> None:
    buffer = ReplayBuffer(40, FIELDS)
    buffer.extend(batch(0, 13))
    state = buffer.state_dict(compact=True)
    state["storage"] = dict(state["storage"])
    mutate(state)
    target = ReplayBuffer(40, FIELDS)
    target.extend(batch(100, 2))
    with pytest.raises(ConfigError, match=message):
        target.load_state_dict(state)
    assert len(target) == 2 and target.contents()["action"].tolist() == [100, 101]


def test_state_dict_saved_by_the_trial_checkpointer(tmp_path) -> None:
    checkpoint = pytest.importorskip("optuna_guard.checkpoint")
    optuna = pytest.importorskip("optuna")
    study = optuna.create_study()
    trial = study.ask()
    ring = ReplayBuffer(30, FIELDS)
    ring.extend(batch(0, 45))
    onpolicy = ReplayBufferList()
    onpolicy.update_buffer([trajectory(6, 2.0)])
    saver = checkpoint.TrialCheckpointer(trial, root=str(tmp_path))
    saver.save({"ring": ring.state_dict(), "onpolicy": onpolicy.state_dict()}, step=4)
    state, step = checkpoint.TrialCheckpointer(trial, root=str(tmp_path)).load()
    ring2, onpolicy2 = ReplayBuffer(30, FIELDS), ReplayBufferList()
    ring2.load_state_dict(state["ring"])
    onpolicy2.load_state_dict(state["onpolicy"])
    assert step == 4 and ring2.position == ring.position
    assert torch.equal(ring2.contents()["action"], torch.arange(15, 45))
    assert torch.equal(onpolicy2[1], onpolicy[1])


# ------------------------------------------------------------------ up-front memory check
def test_buffer_larger_than_available_memory_raises_and_allocates_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    allocations: list[tuple] = []
    real_empty = torch.empty
    monkeypatch.setattr(
        torch, "empty", lambda *a, **k: allocations.append(a) or real_empty(*a, **k)
    )
    probe = FakeProbe(available_bytes=100 * MB)
    rss_before = psutil.Process().memory_info().rss
    with pytest.raises(InsufficientMemoryError) as info:
        # 200 MB; prefault would have committed every page had the check let it through
        ReplayBuffer(200 * MB // 4, {"x": ((), torch.float32)}, probe=probe, prefault=True)
    assert psutil.Process().memory_info().rss - rss_before < 50 * MB
    assert allocations == [] and probe.calls == 1
    message = str(info.value)
    assert "\n" not in message
    assert "needs 0.20 GB + 0.25 GB safety margin = 0.45 GB > 0.10 GB of RAM available" in message
    assert "(cgroup v2)" in message and "free memory first" in message
    assert isinstance(info.value, MemoryError)


def _suggested_capacity(error: Exception) -> int:
    return int(str(error).split("use capacity <= ")[1].split(", smaller")[0].replace(",", ""))


def test_error_suggests_a_capacity_that_fits() -> None:
    probe = FakeProbe(available_bytes=16 * GB)
    fields = {"obs": ((84, 84), torch.uint8)}  # an Atari frame: 7 KB per row
    with pytest.raises(InsufficientMemoryError, match=r"use capacity <= [\d,]+") as info:
        ReplayBuffer(10_000_000, fields, probe=probe)
    suggested = _suggested_capacity(info.value)
    assert 1_000_000 < suggested < 10_000_000
    probe.available_bytes = ReplayBuffer.estimate_nbytes(suggested, fields)  # only the estimate
    with pytest.raises(InsufficientMemoryError):  # the margin still counts
        ReplayBuffer(suggested, fields, probe=probe, on_insufficient="raise")


def test_suggested_capacity_is_accepted_by_the_same_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = FakeProbe(available_bytes=2 * GB)
    fields = {"obs": ((1024,), torch.float32)}  # 4 KB per row
    with pytest.raises(InsufficientMemoryError) as info:
        ReplayBuffer(1_000_000, fields, probe=probe)
    suggested = _suggested_capacity(info.value)
    allocations: list[tuple] = []
    real_empty = torch.empty

    def meta_empty(*args, **kwargs):  # shapes and dtypes, no memory
        allocations.append(args[0])
        return real_empty(*args, **{**kwargs, "device": "meta"})

    monkeypatch.setattr(torch, "empty", meta_empty)
    ReplayBuffer(suggested, fields, probe=probe)  # fits now (not really allocated: 1.8 GB)
    assert allocations == [(suggested, 1024)]
    with pytest.raises(InsufficientMemoryError):
        ReplayBuffer(suggested + 1, fields, probe=probe)


def test_warn_mode_warns_and_allocates(caplog: pytest.LogCaptureFixture) -> None:
    probe = FakeProbe(available_bytes=100 * MB)
    with pytest.warns(InsufficientMemoryWarning, match="0.10 GB of RAM available"):
        buffer = ReplayBuffer(1000, FIELDS, probe=probe, on_insufficient="warn")
    assert buffer.nbytes == 1000 * 25 and len(buffer) == 0
    assert "Allocating anyway" in caplog.text


def test_ignore_mode_is_silent() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ReplayBuffer(10, FIELDS, probe=FakeProbe(1 * MB), on_insufficient="ignore")


def test_default_probe_is_used_when_none_is_given() -> None:
    from optuna_guard.memory import default_probe, set_default_probe

    previous = default_probe()
    set_default_probe(FakeProbe(available_bytes=10 * MB))
    try:
        with pytest.raises(InsufficientMemoryError, match="RAM available"):
            ReplayBuffer(10, FIELDS)
    finally:
        set_default_probe(previous)
    assert len(ReplayBuffer(10, FIELDS)) == 0  # the real machine has room for 250 bytes


def test_safety_margin_scales_with_the_buffer() -> None:
    fields = {"x": ((1024,), torch.uint8)}  # 1 KB per row
    capacity = 4 * GB // 1024  # 4 GB buffer: margin 10 % = 0.4 GB
    probe = FakeProbe(available_bytes=int(4.3 * GB))
    with pytest.raises(InsufficientMemoryError, match=r"4.00 GB \+ 0.40 GB safety margin"):
        ReplayBuffer(capacity, fields, probe=probe)
    with pytest.raises(InsufficientMemoryError, match=r"4.00 GB \+ 0.80 GB safety margin"):
        ReplayBuffer(capacity, fields, probe=probe, safety_margin=0.2)


# --------------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize(
    "make",
    [
        lambda: ReplayBuffer(10, FIELDS, device="cuda"),
        lambda: ReplayBuffer(10, FIELDS, pin_memory=True),
        lambda: ReplayBufferList(pin_to_gpu=True),
        lambda: ReplayBufferList("cuda:0"),
    ],
    ids=["ring-cuda", "ring-pinned", "list-pin_to_gpu", "list-cuda"],
)
def test_cuda_requests_without_cuda_are_clear_errors(make) -> None:
    with pytest.raises(ConfigError, match=r"torch.cuda.is_available\(\) is False"):
        make()


def test_pin_to_gpu_with_a_cpu_device_is_refused() -> None:
    with pytest.raises(ConfigError, match="pin_to_gpu=True keeps the buffer on a GPU"):
        ReplayBufferList("cpu", pin_to_gpu=True)


@needs_cuda
def test_cuda_ring_buffer_writes_samples_and_round_trips() -> None:
    buffer = ReplayBuffer(64, FIELDS, device="cuda")
    buffer.extend(batch(0, 100))  # CPU input, copied to the GPU
    assert all(t.is_cuda for t in buffer._storage.values())
    out = buffer.sample(32, generator=torch.Generator().manual_seed(0))
    assert out["action"].is_cuda and out["action"].min() >= 36
    state = buffer.state_dict()
    cpu_copy = ReplayBuffer(64, FIELDS)
    cpu_copy.load_state_dict(state)
    assert torch.equal(cpu_copy.contents()["action"], buffer.contents()["action"].cpu())


@needs_cuda
def test_cuda_buffer_is_checked_against_the_gpu_not_ram() -> None:
    index = torch.cuda.current_device()
    probe = FakeProbe(
        available_bytes=1000 * GB,
        gpus=[GpuMemory(index=index, name="fake", total_bytes=GB, used_bytes=GB - 10 * MB)],
    )
    with pytest.raises(InsufficientMemoryError, match="GPU memory free on cuda"):
        ReplayBuffer(1_000_000, FIELDS, device="cuda", probe=probe)


@needs_cuda
def test_pinned_ring_buffer_is_page_locked() -> None:
    buffer = ReplayBuffer(16, FIELDS, pin_memory=True)
    assert all(t.is_pinned() for t in buffer._storage.values())


@needs_cuda
def test_pin_to_gpu_list_buffer_lives_on_the_gpu_and_releases_cache() -> None:
    buffer = ReplayBufferList(pin_to_gpu=True, release_memory=True)
    for n in (1000, 3000, 500):
        buffer.update_buffer([trajectory(n)])
        assert all(t.is_cuda and not t.requires_grad for t in buffer)
    torch.cuda.synchronize()
    # only segments that still hold the live fields may stay reserved
    assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() < 8 * MB
