"""Device resolution shared by both buffers: one clear error when CUDA is asked for but absent."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from optuna_guard.exceptions import ConfigError
from optuna_guard.replay_buffer._torch import import_torch

if TYPE_CHECKING:
    import torch
    from torch import device as TorchDevice


def resolve_device(device: Any, *, what: str) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device`` -> a concrete ``torch.device``.

    A CUDA device without an index gets the current one, so the memory check and the allocation
    look at the same GPU.
    """
    torch = import_torch()
    try:
        resolved: TorchDevice = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"{what}: device={device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'."
        ) from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{what}: device={device!r} but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}); use device='cpu'."
            )
        index = torch.cuda.current_device() if resolved.index is None else resolved.index
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"{what}: device={device!r} but only {torch.cuda.device_count()} CUDA device(s) "
                f"are visible; use an index below {torch.cuda.device_count()}."
            )
        resolved = torch.device("cuda", index)
    elif resolved.type != "cpu":
        raise ConfigError(f"{what}: device={device!r} is not supported; use 'cpu' or 'cuda[:N]'.")
    return resolved
