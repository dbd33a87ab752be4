"""Leak-fixed replay buffers for RL objectives (needs the `torch` extra).

- :class:`ReplayBufferList`: the on-policy, ElegantRL-style list buffer; ``update_buffer``
  releases the old tensors before building the new ones and stores them detached.
- :class:`ReplayBuffer`: the off-policy ring buffer, preallocated once (CPU, pinned or CUDA)
  after checking that it fits in the available memory.

Both have ``state_dict()`` / ``load_state_dict()`` for ``TrialCheckpointer``. Importing this
module without torch raises an ImportError that names the extra to install.
"""

from __future__ import annotations

from optuna_guard.replay_buffer._torch import import_torch

import_torch()  # fail here, with the install hint, rather than deep inside a method

from optuna_guard.replay_buffer._fields import Field  # noqa: E402
from optuna_guard.replay_buffer._list import ReplayBufferList  # noqa: E402
from optuna_guard.replay_buffer._memory_check import (  # noqa: E402
    InsufficientMemoryWarning,
    MemoryCheck,
)
from optuna_guard.replay_buffer._ring import ReplayBuffer  # noqa: E402

__all__ = [
    "Field",
    "InsufficientMemoryWarning",
    "MemoryCheck",
    "ReplayBuffer",
    "ReplayBufferList",
]
