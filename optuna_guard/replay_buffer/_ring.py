"""ReplayBuffer: the off-policy ring buffer, preallocated once and written in place.

Memory is decided at construction: each field is one ``torch.empty((capacity, *shape))`` and
nothing is allocated by ``add``/``extend`` afterwards, so the footprint cannot creep up over a
long study. The size is checked against the available memory BEFORE allocating, because empty
tensors only commit their pages as they fill and an oversized buffer would otherwise be killed
hours later. Writes detach their input: copying a tensor that requires grad into a slice outside
``no_grad`` would hang the whole storage onto that autograd graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# torch is importable here: the package __init__ checked it and gave the install hint.
import torch

from optuna_guard._logging import get_logger
from optuna_guard._units import GB
from optuna_guard.exceptions import ConfigError, InsufficientMemoryError
from optuna_guard.memory import MemoryProbe
from optuna_guard.replay_buffer._device import resolve_device
from optuna_guard.replay_buffer._direct import direct_copy_plan, fast_extend
from optuna_guard.replay_buffer._fields import Field, dtype_name, parse_fields
from optuna_guard.replay_buffer._memory_check import (
    DEFAULT_SAFETY_MARGIN,
    check_fits,
    validate_on_insufficient,
    validate_safety_margin,
)

_log = get_logger(__name__)

STATE_FORMAT = "optuna_guard.ReplayBuffer"
STATE_VERSION = 1


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive int but got {value!r}.")
    return value


class ReplayBuffer:
    """Fixed-capacity ring buffer of transitions; the oldest rows are overwritten first.

    Args:
        capacity: number of transitions kept.
        fields: name -> ``(shape, dtype)`` of one transition's value, e.g.
            ``{"obs": ((4,), torch.float32), "action": ((), torch.int64), "reward": ()}``
            (a bare shape means float32, a bare dtype a scalar).
        device: ``"cpu"`` (default), ``"cuda"`` or ``"cuda:N"``.
        pin_memory: page-locked CPU storage for fast copies to a GPU (needs CUDA).
        on_insufficient: ``"raise"`` (default) :class:`InsufficientMemoryError`, ``"warn"``
            (:class:`InsufficientMemoryWarning` + log line, then allocate) or ``"ignore"`` when
            the buffer plus margin does not fit in the available memory.
        safety_margin: fraction of the buffer size that must stay free on top of it (at least
            256 MB) for the rest of the trial.
        prefault: write zeros into the whole buffer at construction so its pages are committed
            now (fail fast) instead of as it fills.
        probe: memory probe to ask (default: the process-wide cgroup-aware probe).
    """

    def __init__(
        self,
        capacity: int,
        fields: Mapping[str, Any],
        *,
        device: Any = "cpu",
        pin_memory: bool = False,
        on_insufficient: str = "raise",
        safety_margin: float = DEFAULT_SAFETY_MARGIN,
        prefault: bool = False,
        probe: MemoryProbe | None = None,
    ) -> None:
        self._capacity = _positive_int("capacity", capacity)
        self._fields = parse_fields(fields)
        self._device = resolve_device(device, what="ReplayBuffer")
        validate_on_insufficient(on_insufficient)
        validate_safety_margin(safety_margin)
        if pin_memory and self._device.type != "cpu":
            raise ConfigError(
                f"pin_memory=True applies to a CPU buffer but device is {self._device}; "
                "drop pin_memory or use device='cpu'."
            )
        if pin_memory and not torch.cuda.is_available():
            raise ConfigError(
                "pin_memory=True needs CUDA (page-locked memory only speeds up copies to a GPU) "
                "but torch.cuda.is_available() is False; use pin_memory=False."
            )
        self._pin_memory = bool(pin_memory)
        what = f"ReplayBuffer(capacity={self._capacity:,}) on {self._device}"
        check = check_fits(
            self.estimate_nbytes(self._capacity, self._fields),
            device=self._device,
            probe=probe,
            safety_margin=safety_margin,
            on_insufficient=on_insufficient,
            what=what,
            bytes_per_row=self.bytes_per_row,
        )
        self._storage: dict[str, torch.Tensor] = {}
        try:
            for name, field in self._fields.items():
                self._storage[name] = torch.empty(
                    (self._capacity, *field.shape),
                    dtype=field.dtype,
                    device=self._device,
                    pin_memory=self._pin_memory,
                )
                if prefault:
                    self._storage[name].zero_()
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            self._storage.clear()
            raise InsufficientMemoryError(
                f"{what} could not allocate {self.nbytes_needed / GB:.2f} GB: {exc}".splitlines()[
                    0
                ]
            ) from exc
        self._storage_list = list(self._storage.values())  # field order, for the write loop
        self._direct = direct_copy_plan(self._storage_list)
        self._fast_extend = fast_extend(
            list(self._fields), [f.shape for f in self._fields.values()], self._storage_list
        )
        self._position = 0
        self._size = 0
        _log.info(
            "%s allocated %.2f GB for fields %s; %.2f GB of %s before allocating.",
            what,
            self.nbytes / GB,
            ", ".join(self._fields),
            check.available_bytes / GB,
            check.where,
        )

    # ----------------------------------------------------------------- sizes
    @staticmethod
    def estimate_nbytes(capacity: int, fields: Mapping[str, Any]) -> int:
        """Bytes a buffer with this capacity and these fields allocates (no margin)."""
        parsed = parse_fields(fields)
        return _positive_int("capacity", capacity) * sum(f.bytes_per_row for f in parsed.values())

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def position(self) -> int:
        """Row the next transition is written to."""
        return self._position

    @property
    def full(self) -> bool:
        return self._size == self._capacity

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def fields(self) -> dict[str, Field]:
        return dict(self._fields)

    @property
    def bytes_per_row(self) -> int:
        return sum(f.bytes_per_row for f in self._fields.values())

    @property
    def nbytes_needed(self) -> int:
        return self._capacity * self.bytes_per_row

    @property
    def nbytes(self) -> int:
        """Bytes held by the preallocated storage (independent of how many rows are valid)."""
        return sum(t.element_size() * t.nelement() for t in self._storage.values())

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{n}={tuple(f.shape)}:{dtype_name(f.dtype)}" for n, f in self._fields.items()
        )
        return (
            f"ReplayBuffer(capacity={self._capacity}, size={self._size}, "
            f"position={self._position}, device={self._device}, nbytes={self.nbytes}, "
            f"fields=[{fields}])"
        )

    # ---------------------------------------------------------------- writing
    def add(self, transition: Mapping[str, Any] | None = None, /, **values: Any) -> None:
        """Write one transition (a value per field, shaped like the field spec)."""
        batch = self._collect(transition, values)
        self._write(self._coerce(batch, single=True))

    def extend(self, batch: Mapping[str, Any] | None = None, /, **values: Any) -> None:
        """Write N transitions (a ``(N, *shape)`` tensor or array per field) at ``position``.

        Wraps around; with N > capacity only the last ``capacity`` rows are kept. All inputs are
        validated before the first row is written, so a bad batch leaves the buffer unchanged.
        """
        if not values and self._fast_extend is not None and batch is not None:
            rows = self._fast_extend.rows_written(batch, self._position)
            if rows is not None:
                if rows:
                    self._position = (self._position + rows) % self._capacity
                    self._size = min(self._size + rows, self._capacity)
                return
        collected = self._collect(batch, values)
        self._write(self._coerce(collected, single=False))

    def clear(self) -> None:
        """Forget every transition (the storage stays allocated for reuse)."""
        self._position = 0
        self._size = 0

    def _collect(
        self, mapping: Mapping[str, Any] | None, values: dict[str, Any]
    ) -> Mapping[str, Any]:
        if not values and isinstance(mapping, Mapping) and mapping.keys() == self._fields.keys():
            return mapping  # the common case, checked in one comparison
        if mapping is not None and not isinstance(mapping, Mapping):
            raise ConfigError(
                f"expected a mapping of field -> values but got {type(mapping).__name__}."
            )
        merged = dict(mapping or {})
        merged.update(values)
        missing = [n for n in self._fields if n not in merged]
        extra = [n for n in merged if n not in self._fields]
        if missing or extra:
            raise ConfigError(
                f"ReplayBuffer fields are {', '.join(self._fields)}; "
                f"missing: {', '.join(missing) or '-'}, unknown: {', '.join(extra) or '-'}."
            )
        return merged

    def _coerce(self, batch: Mapping[str, Any], *, single: bool) -> list[torch.Tensor]:
        """Detached tensors of shape (N, *field.shape) in field order, or a ConfigError.

        Kept lean: it runs on every ``extend``, and small batches are dominated by Python time.
        """
        tensor_type = torch.Tensor
        out: list[torch.Tensor] = []
        rows = -1
        for name, (shape, dtype) in self._fields.items():
            value = batch[name]
            if isinstance(value, tensor_type):
                tensor = value.detach() if value.requires_grad else value
            else:
                tensor = torch.as_tensor(value)
            if single:
                if tensor.shape != shape:
                    self._bad_shape(name, tensor, single)
                tensor = tensor.unsqueeze(0)
            elif tensor.dim() != len(shape) + 1 or tensor.shape[1:] != shape:
                self._bad_shape(name, tensor, single)
            if tensor.dtype != dtype and not torch.can_cast(tensor.dtype, dtype):
                raise ConfigError(
                    f"field {name!r}: cannot store {dtype_name(tensor.dtype)} values in a "
                    f"{dtype_name(dtype)} field without losing data; convert them first."
                )
            if rows < 0:
                rows = tensor.shape[0]
            elif tensor.shape[0] != rows:
                raise ConfigError(
                    f"field {name!r} has {tensor.shape[0]} rows but the other fields have {rows}; "
                    "every field needs the same number of transitions."
                )
            out.append(tensor)
        return out

    def _bad_shape(self, name: str, tensor: torch.Tensor, single: bool) -> None:
        shape = self._fields[name].shape
        expected = tuple(shape) if single else ("N", *shape)
        raise ConfigError(
            f"field {name!r}: expected shape {expected} but got {tuple(tensor.shape)}."
        )

    def _write(self, data: list[torch.Tensor]) -> None:
        """Copy detached rows into place (no ``no_grad`` needed: neither side requires grad)."""
        n = data[0].shape[0]
        if n == 0:
            return
        cap = self._capacity
        start = self._position
        if n > cap:  # only the newest `cap` rows survive; they land where the ring would put them
            data = [t[n - cap :] for t in data]
            start = (start + n - cap) % cap
        rows = min(n, cap)
        first = min(rows, cap - start)
        direct = self._direct
        for i, (dst, src) in enumerate(zip(self._storage_list, data)):
            plan = direct[i]
            if (
                plan is not None
                and src.dtype is plan.dtype
                and src.is_cpu
                and src.is_contiguous()
                and not src.is_neg()
            ):
                # memmove straight into place: one C call per field instead of torch's
                # slice + copy_ dispatch, which dominates small batches (see _direct.py)
                plan.write(src.data_ptr(), start, rows, first)
            elif first == rows:
                dst[start : start + rows].copy_(src)
            else:
                dst[start:].copy_(src[:first])
                dst[: rows - first].copy_(src[first:])
        self._position = (self._position + n) % cap
        self._size = min(self._size + n, cap)

    # ---------------------------------------------------------------- reading
    def sample(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """``batch_size`` transitions drawn uniformly (with replacement) from the valid rows.

        A seeded ``torch.Generator`` gives reproducible batches; a CPU generator works for a CUDA
        buffer too (the indices are drawn on the generator's device and moved).
        """
        _positive_int("batch_size", batch_size)
        if self._size == 0:
            raise ConfigError("cannot sample from an empty ReplayBuffer; add transitions first.")
        if generator is None:
            idx = torch.randint(self._size, (batch_size,), device=self._device)
        else:
            idx = torch.randint(
                self._size, (batch_size,), generator=generator, device=generator.device
            ).to(self._device)
        return {name: t.index_select(0, idx) for name, t in self._storage.items()}

    def contents(self) -> dict[str, torch.Tensor]:
        """Copies of the valid rows, oldest first (for inspection and tests, not the hot path)."""
        if not self.full:
            return {name: t[: self._size].clone() for name, t in self._storage.items()}
        p = self._position
        return {name: torch.cat((t[p:], t[:p])) for name, t in self._storage.items()}

    # ------------------------------------------------------------- checkpoints
    def state_dict(self, *, compact: bool = False) -> dict[str, Any]:
        """Contents, position and fill level, for ``torch.save`` / ``TrialCheckpointer``.

        The field tensors are views of the storage (no copy, no memory spike). ``torch.save``
        writes a view's whole storage, so a partially filled buffer saves all ``capacity`` rows
        unless ``compact=True`` (copies just the valid rows first).
        """
        storage = {
            name: (t[: self._size].clone() if compact and not self.full else t[: self._size])
            for name, t in self._storage.items()
        }
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "capacity": self._capacity,
            "position": self._position,
            "size": self._size,
            "full": self.full,
            "fields": {
                n: {"shape": list(f.shape), "dtype": dtype_name(f.dtype)}
                for n, f in self._fields.items()
            },
            "storage": storage,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` into the preallocated storage (validated first)."""
        self._validate_state(state)
        size = state["size"]
        with torch.no_grad():
            for name, tensor in state["storage"].items():
                self._storage[name][:size].copy_(tensor)
        self._size = size
        self._position = state["position"]

    def _validate_state(self, state: Mapping[str, Any]) -> None:

        def bad(reason: str) -> ConfigError:
            return ConfigError(f"cannot load ReplayBuffer state: {reason}.")

        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise bad("not a ReplayBuffer.state_dict() (missing format marker)")
        if state.get("version") != STATE_VERSION:
            raise bad(f"version {state.get('version')!r} is not {STATE_VERSION}")
        if state.get("capacity") != self._capacity:
            raise bad(
                f"it was saved with capacity {state.get('capacity')!r} but this buffer has "
                f"capacity {self._capacity}; create the buffer with the saved capacity"
            )
        size, position = state.get("size"), state.get("position")
        if not isinstance(size, int) or not 0 <= size <= self._capacity:
            raise bad(f"size {size!r} is outside 0..{self._capacity}")
        if not isinstance(position, int) or not 0 <= position < self._capacity:
            raise bad(f"position {position!r} is outside 0..{self._capacity - 1}")
        if size < self._capacity and position != size:
            raise bad(f"position {position} does not match size {size} of a buffer not yet full")
        if bool(state.get("full")) != (size == self._capacity):
            raise bad(f"full={state.get('full')!r} contradicts size {size}")
        storage = state.get("storage")
        if not isinstance(storage, Mapping) or set(storage) != set(self._fields):
            got = ", ".join(storage) if isinstance(storage, Mapping) else repr(storage)
            raise bad(f"its fields are {got} but this buffer has {', '.join(self._fields)}")
        for name, field in self._fields.items():
            tensor = storage[name]
            if not isinstance(tensor, torch.Tensor):
                raise bad(f"field {name!r} is a {type(tensor).__name__}, not a tensor")
            if tuple(tensor.shape) != (size, *field.shape):
                raise bad(
                    f"field {name!r} has shape {tuple(tensor.shape)} but this buffer expects "
                    f"{(size, *field.shape)}"
                )
            if tensor.dtype != field.dtype:
                raise bad(
                    f"field {name!r} is {dtype_name(tensor.dtype)} but this buffer stores "
                    f"{dtype_name(field.dtype)}"
                )


__all__ = ["ReplayBuffer"]
