"""Capture and restore the random number generators a training loop draws from.

Resuming at step k with fresh RNG streams gives a different run than never stopping would;
saving the streams with the checkpoint (like HuggingFace's ``rng_state.pth``) makes the resume
deterministic. Only libraries the process already imported are touched: capturing must not
import numpy or torch.
"""

from __future__ import annotations

import random
import sys
from typing import Any

from optuna_guard._logging import get_logger

_log = get_logger(__name__)

__all__ = ["capture_rng_state", "restore_rng_state"]


def capture_rng_state() -> dict[str, Any]:
    """The states of Python ``random``, NumPy's global RNG, torch CPU and torch CUDA (each only
    when already imported / initialised)."""
    state: dict[str, Any] = {"python": random.getstate()}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        state["numpy"] = numpy.random.get_state()
    torch = sys.modules.get("torch")
    if torch is not None:
        state["torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng_state` saved; a generator saved on a machine that had
    it (CUDA) but missing here is skipped with a warning instead of failing the resume."""
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])
    if "torch" in state or "torch_cuda" in state:
        import torch

        if "torch" in state:
            torch.set_rng_state(state["torch"])
        if "torch_cuda" in state:
            if torch.cuda.is_available() and torch.cuda.device_count() >= len(state["torch_cuda"]):
                torch.cuda.set_rng_state_all(state["torch_cuda"])
            else:
                _log.warning(
                    "Checkpoint has CUDA RNG states but this process sees no matching GPUs; not restored."
                )
