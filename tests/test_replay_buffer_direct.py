"""ReplayBuffer.extend's direct-copy path: the same rows as the general path for every kind of
input it takes, and every input it must not take (grad, strided, other dtype, negative view,
N > capacity) handled by the general path."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from optuna_guard.exceptions import ConfigError  # noqa: E402
from optuna_guard.replay_buffer import ReplayBuffer  # noqa: E402

FIELDS = {"obs": ((3,), torch.float32), "action": ((), torch.int64), "done": torch.bool}


def _batch(start: int, n: int) -> dict[str, Any]:
    rows = torch.arange(start, start + n)
    return {
        "obs": torch.stack([rows, rows + 1000, rows + 2000], dim=1).float(),
        "action": rows * 7,
        "done": rows % 3 == 0,
    }


def _expected(first: int, last: int) -> dict[str, Any]:
    return _batch(first, last - first)


def _assert_contents(buffer: ReplayBuffer, first: int, last: int) -> None:
    got = buffer.contents()
    want = _expected(first, last)
    for name in FIELDS:
        assert torch.equal(got[name], want[name]), name


def test_direct_path_is_taken_and_wraps_like_the_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = ReplayBuffer(10, FIELDS)
    calls = []
    monkeypatch.setattr(buffer, "_write", lambda data: calls.append(data))  # the general path
    total = 0
    for n in (4, 3, 5, 7, 1):  # wraps twice
        buffer.extend(_batch(total, n))
        total += n
    assert calls == []  # every call above took the direct path
    assert len(buffer) == 10 and buffer.position == total % 10
    _assert_contents(buffer, total - 10, total)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda b: {**b, "obs": b["obs"].double()}, id="float64-converted"),
        pytest.param(lambda b: {**b, "obs": b["obs"].t().contiguous().t()}, id="strided"),
        pytest.param(
            lambda b: {**b, "obs": b["obs"].clone().requires_grad_()}, id="requires-grad"
        ),
        pytest.param(lambda b: {**b, "action": b["action"].numpy()}, id="numpy"),
        pytest.param(lambda b: {**b, "action": b["action"].tolist()}, id="list"),
        pytest.param(lambda b: {**b, "obs": torch._neg_view(-b["obs"])}, id="negative-view"),
    ],
)
def test_inputs_the_direct_path_refuses_still_store_the_same_rows(make: Any) -> None:
    buffer = ReplayBuffer(6, FIELDS)
    buffer.extend(_batch(0, 4))
    buffer.extend(make(_batch(4, 5)))  # wraps
    _assert_contents(buffer, 3, 9)
    assert buffer.contents()["obs"].grad_fn is None


def test_more_rows_than_capacity_keep_the_newest() -> None:
    buffer = ReplayBuffer(5, FIELDS)
    buffer.extend(_batch(0, 2))
    buffer.extend(_batch(2, 12))
    assert buffer.position == 14 % 5
    _assert_contents(buffer, 9, 14)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({**_batch(0, 3), "bonus": torch.zeros(3)}, "unknown: bonus"),
        ({"obs": torch.zeros(3, 3), "action": torch.zeros(3, dtype=torch.int64)}, "missing: done"),
        ({**_batch(0, 3), "action": torch.zeros(2, dtype=torch.int64)}, "rows"),
        ({**_batch(0, 3), "obs": torch.zeros(3, 4)}, "expected shape"),
        ({**_batch(0, 3), "obs": torch.zeros(1, 3)}, "rows"),  # would broadcast in copy_
    ],
)
def test_bad_batches_are_refused_without_writing(batch: dict[str, Any], message: str) -> None:
    buffer = ReplayBuffer(8, FIELDS)
    buffer.extend(_batch(0, 2))
    with pytest.raises(ConfigError, match=message):
        buffer.extend(batch)
    assert len(buffer) == 2 and buffer.position == 2
    _assert_contents(buffer, 0, 2)


def test_source_aliasing_the_storage_is_copied_correctly() -> None:
    """A state_dict() view of the buffer itself, written back at another position."""
    buffer = ReplayBuffer(8, FIELDS)
    buffer.extend(_batch(0, 4))
    view = {name: t[1:3] for name, t in buffer.state_dict()["storage"].items()}
    buffer.extend(view)
    got = buffer.contents()
    want = _batch(0, 4)
    for name in FIELDS:
        assert torch.equal(got[name][4:6], want[name][1:3])
