"""Field specs of the ring buffer: what one transition holds, parsed and validated once."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from optuna_guard.exceptions import ConfigError
from optuna_guard.replay_buffer._torch import import_torch

if TYPE_CHECKING:
    import torch


class Field(NamedTuple):
    """Shape of ONE transition's value (without the leading capacity axis) and its dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def bytes_per_row(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


_EXAMPLE = "e.g. {'obs': ((4,), torch.float32), 'action': ((), torch.int64), 'reward': ()}"


def _shape(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if (
        isinstance(value, Sequence)
        and not isinstance(value, (str, bytes))
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)
    ):
        return tuple(int(d) for d in value)
    raise ConfigError(
        f"field {name!r}: shape must be a tuple of non-negative ints but got {value!r}; {_EXAMPLE}."
    )


def parse_field(name: str, value: Any) -> Field:
    """Accept ``Field``, ``(shape, dtype)``, a bare shape (float32) or a bare dtype (scalar)."""
    torch = import_torch()
    if isinstance(value, torch.dtype):
        return Field((), value)
    if (
        isinstance(value, Sequence)
        and not isinstance(value, (str, bytes))
        and len(value) == 2
        and isinstance(value[1], torch.dtype)
    ):
        return Field(_shape(name, value[0]), value[1])
    return Field(_shape(name, value), torch.float32)


def parse_fields(fields: Mapping[str, Any]) -> dict[str, Field]:
    if not isinstance(fields, Mapping) or not fields:
        raise ConfigError(
            f"fields must be a non-empty mapping of name -> (shape, dtype) but got {fields!r}; "
            f"{_EXAMPLE}."
        )
    parsed: dict[str, Field] = {}
    for name, value in fields.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"field names must be non-empty strings but got {name!r}.")
        parsed[name] = parse_field(name, value)
    return parsed


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (what state dicts store, so they pickle without torch)."""
    return str(dtype).removeprefix("torch.")
