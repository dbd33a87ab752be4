"""The one place that imports torch, so a missing install gives one helpful error."""

from __future__ import annotations

from types import ModuleType

TORCH_EXTRA_HINT = (
    "optuna_guard.replay_buffer needs PyTorch, which is not installed: install the `torch` extra "
    "with pip install 'optuna-guard[torch]' (the CPU wheel used on our machines is "
    "torch==2.13.0; a bare `pip install torch` may pull a multi-GB CUDA build)."
)


def import_torch() -> ModuleType:
    """Return the torch module, or raise ImportError naming the `torch` extra."""
    try:
        import torch
    except ImportError as exc:
        raise ImportError(TORCH_EXTRA_HINT, name="torch") from exc
    return torch
