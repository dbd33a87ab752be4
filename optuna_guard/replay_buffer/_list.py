"""ReplayBufferList: the on-policy buffer of ElegantRL-style agents, without the memory growth.

``update_buffer(traj_list)`` replaces the contents with the concatenation of each field over the
trajectories. Four things made the original grow a worker from 2 GB to 7 GB+ (see
docs/replay_buffer.md); each has its counter-measure here:

1. stored tensors still attached to an autograd graph keep the graph (and whatever it saved,
   possibly the previous buffer) alive -> every field is copied under ``torch.no_grad()`` into
   a fresh tensor, detached by construction;
2. ``self[:] = [torch.cat(...)]`` builds the new generation while the old one is still held,
   so the peak is two generations -> the old tensors are released first, and each field is
   copied straight into its final tensor on the buffer's device (no ``cat`` then ``.to()``);
3. the CUDA caching allocator keeps blocks of every size it has seen -> optional
   ``release_memory`` returns them after an update;
4. references outside the buffer -> only the list holds the tensors; the return value is plain
   Python numbers, and nothing in here forms a reference cycle.
"""

from __future__ import annotations

import functools
import gc
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# torch is importable here: the package __init__ checked it and gave the install hint.
import torch

from optuna_guard.exceptions import ConfigError
from optuna_guard.replay_buffer._device import resolve_device
from optuna_guard.replay_buffer._fields import dtype_name

STATE_FORMAT = "optuna_guard.ReplayBufferList"
STATE_VERSION = 1


class ReplayBufferList(list[torch.Tensor]):
    """On-policy buffer: a list of field tensors (ElegantRL order: states, rewards, masks, ...).

    Args:
        device: where the stored tensors live; default ``"cpu"``, or ``"cuda"`` with
            ``pin_to_gpu``.
        pin_to_gpu: keep the buffer on the GPU (the ElegantRL flag); needs a CUDA device.
        release_memory: after each update, run ``gc.collect()`` and, on CUDA,
            ``torch.cuda.empty_cache()``. Not needed for correctness (the buffer holds no cycles);
            it only hands cached blocks back, at a cost in speed.
        reward_index: which field holds the rewards for the returned mean (1 in ElegantRL).
    """

    def __init__(
        self,
        device: Any = None,
        *,
        pin_to_gpu: bool = False,
        release_memory: bool = False,
        reward_index: int = 1,
    ) -> None:
        super().__init__()
        if device is None:
            device = "cuda" if pin_to_gpu else "cpu"
        self.device = resolve_device(device, what="ReplayBufferList")
        if pin_to_gpu and self.device.type != "cuda":
            raise ConfigError(
                f"pin_to_gpu=True keeps the buffer on a GPU but device is {self.device}; "
                "pass device='cuda' or pin_to_gpu=False."
            )
        if isinstance(reward_index, bool) or not isinstance(reward_index, int) or reward_index < 0:
            raise ConfigError(f"reward_index must be a non-negative int but got {reward_index!r}.")
        self.pin_to_gpu = bool(pin_to_gpu)
        self.release_memory = bool(release_memory)
        self.reward_index = reward_index

    # lists compare by contents; a buffer is a resource, compared by identity like any object
    __eq__ = object.__eq__
    __ne__ = object.__ne__
    __hash__ = object.__hash__  # type: ignore[assignment]  # list sets __hash__ = None

    def __repr__(self) -> str:
        shapes = ", ".join(f"{tuple(t.shape)}:{dtype_name(t.dtype)}" for t in self)
        return f"ReplayBufferList(device={self.device}, fields=[{shapes}])"

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for t in self)

    def update_buffer(self, traj_list: Iterable[Sequence[torch.Tensor]]) -> tuple[int, float]:
        """Replace the contents with each field concatenated over ``traj_list``.

        Returns ``(steps, mean_reward)``: the rows of the reward field and their mean (NaN when
        there are no rows). Input is validated before anything is released, so a bad
        ``traj_list`` leaves the old contents in place; if building the new contents fails
        (out of memory), the buffer is left empty rather than half-built.
        """
        fields = self._fields_of(traj_list)
        self.clear()  # release the previous generation BEFORE allocating the next
        try:
            with torch.no_grad():
                for parts in fields:
                    self.append(self._concatenate(parts))
        except BaseException:
            self.clear()
            raise
        del fields  # our views of the caller's tensors; the caller still owns them
        rewards = self[self.reward_index]
        steps = int(rewards.shape[0])
        mean_reward = float(rewards.float().mean().item()) if rewards.numel() else math.nan
        if self.release_memory:
            self.free_cached_memory()
        return steps, mean_reward

    def free_cached_memory(self) -> None:
        """``gc.collect()`` and, for a CUDA buffer, hand cached CUDA blocks back to the driver."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _fields_of(self, traj_list: Iterable[Sequence[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """Transpose trajectories into lists of per-field parts; ConfigError on bad input."""
        if isinstance(traj_list, torch.Tensor) or not isinstance(traj_list, Iterable):
            raise ConfigError(
                "traj_list must be a list of trajectories (tuples of tensors) but got "
                f"{type(traj_list).__name__}."
            )
        trajectories = list(traj_list)
        if not trajectories:
            raise ConfigError("traj_list is empty; pass at least one trajectory.")
        if isinstance(trajectories[0], torch.Tensor):
            raise ConfigError(
                "traj_list must be a list of trajectories (tuples of tensors), not a tuple of "
                "tensors; wrap a single trajectory in a list: update_buffer([traj])."
            )
        width = 0
        for i, traj in enumerate(trajectories):
            if not isinstance(traj, Sequence) or isinstance(traj, (str, bytes)):
                raise ConfigError(
                    f"trajectory {i} is a {type(traj).__name__}; each must be a tuple of tensors."
                )
            width = len(traj) if i == 0 else width
            if len(traj) != width:
                raise ConfigError(
                    f"trajectory {i} has {len(traj)} fields but trajectory 0 has {width}; "
                    "every trajectory needs the same fields in the same order."
                )
        if self.reward_index >= width:
            raise ConfigError(
                f"reward_index={self.reward_index} but trajectories have only {width} fields."
            )
        fields = [list(parts) for parts in zip(*trajectories)]
        for f, parts in enumerate(fields):
            trailing = None
            for i, part in enumerate(parts):
                if not isinstance(part, torch.Tensor):
                    raise ConfigError(
                        f"field {f} of trajectory {i} is a {type(part).__name__}, not a tensor."
                    )
                if part.dim() == 0:
                    raise ConfigError(
                        f"field {f} of trajectory {i} is a 0-d tensor; fields are concatenated "
                        "along dim 0, so give them a leading steps axis."
                    )
                if trailing is None:
                    trailing = part.shape[1:]
                elif part.shape[1:] != trailing:
                    raise ConfigError(
                        f"field {f} of trajectory {i} has shape {tuple(part.shape)} but "
                        f"trajectory 0 has {tuple(parts[0].shape)}; only dim 0 (steps) may differ."
                    )
        return fields

    def _concatenate(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """``torch.cat(parts)`` into one new tensor on the buffer's device (the one allocation).

        Called under ``no_grad``: the new tensor never joins the parts' autograd graph, which is
        what ``detach()`` would give, without keeping a view of the caller's storage. Parts on
        another device or with other dtypes are copied straight into the result (no ``cat``
        on the rollout device followed by ``.to()``: that would be two copies).
        """
        first = parts[0]
        dtype, device = first.dtype, self.device
        if all(p.dtype == dtype and p.device == device for p in parts):
            return torch.cat(parts, dim=0)  # plain cat: faster than cat(out=...) for small parts
        dtype = functools.reduce(torch.promote_types, [p.dtype for p in parts])
        rows = sum(p.shape[0] for p in parts)
        out = torch.empty((rows, *first.shape[1:]), dtype=dtype, device=device)
        offset = 0
        for part in parts:  # copy_ converts dtype and device while it copies
            out[offset : offset + part.shape[0]].copy_(part)
            offset += part.shape[0]
        return out

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The field tensors (not copies) for ``torch.save`` / ``TrialCheckpointer``."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "reward_index": self.reward_index,
            "fields": list(self),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the contents with a :meth:`state_dict`'s fields, moved to this device.

        When the buffer already holds data, the saved fields must match it in number, trailing
        shape and dtype (a checkpoint of another agent is refused, not silently loaded).
        """

        def bad(reason: str) -> ConfigError:
            return ConfigError(f"cannot load ReplayBufferList state: {reason}.")

        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise bad("not a ReplayBufferList.state_dict() (missing format marker)")
        if state.get("version") != STATE_VERSION:
            raise bad(f"version {state.get('version')!r} is not {STATE_VERSION}")
        fields = state.get("fields")
        if not isinstance(fields, list) or not all(isinstance(t, torch.Tensor) for t in fields):
            raise bad("'fields' must be a list of tensors")
        if any(t.dim() == 0 for t in fields):
            raise bad("a field is a 0-d tensor; fields have a leading steps axis")
        if fields and self.reward_index >= len(fields):
            raise bad(f"it has {len(fields)} fields but reward_index is {self.reward_index}")
        if len(self):
            if len(fields) != len(self):
                raise bad(f"it has {len(fields)} fields but this buffer holds {len(self)}")
            for i, (new, old) in enumerate(zip(fields, self)):
                if new.shape[1:] != old.shape[1:] or new.dtype != old.dtype:
                    raise bad(
                        f"field {i} is {tuple(new.shape)}:{dtype_name(new.dtype)} but this "
                        f"buffer holds {tuple(old.shape)}:{dtype_name(old.dtype)}"
                    )
        self.clear()
        with torch.no_grad():
            for tensor in fields:
                self.append(self._concatenate([tensor]))


__all__ = ["ReplayBufferList"]
