"""Test doubles for users' own tests: exercise a guarded objective without allocating memory.

A :class:`FakeProbe` stands in for the real memory probe; install it with
:func:`optuna_guard.memory.set_default_probe` (or pass ``probe=`` where an API takes one) and
script what the guard sees::

    import optuna
    from optuna_guard import guard, tags
    from optuna_guard.memory import set_default_probe
    from optuna_guard.testing import FakeProbe

    def test_low_memory_prunes_the_trial():
        probe = FakeProbe(available_gb=1.0)          # below the default 2 GB stop threshold
        set_default_probe(probe)
        try:
            study = optuna.create_study()
            study.optimize(guard(lambda t: t.suggest_float("x", 0, 1)), n_trials=1)
        finally:
            set_default_probe(None)
        trial = study.trials[0]
        assert trial.state == optuna.trial.TrialState.PRUNED
        assert trial.user_attrs[tags.EMERGENCY_KILLED]
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import Any

from optuna_guard._units import GB
from optuna_guard.memory import GpuMemory, SystemMemory

__all__ = ["FakeProbe", "current_rss_gb"]


def current_rss_gb() -> float:
    """RSS of this process and its children now, in GB (what limits are made relative to)."""
    from optuna_guard.memory import SystemProbe

    return SystemProbe().process_tree_rss(os.getpid()) / GB


class FakeProbe:
    """A :class:`optuna_guard.memory.MemoryProbe` whose readings the test sets.

    >>> probe = FakeProbe(available_gb=10.0)
    >>> probe.set(available_gb=1.5)     # from now on the guard sees 1.5 GB available

    ``rss_gb=None`` reports the real RSS of this process tree (useful with real allocations
    while the system figures stay fake). ``calls`` counts ``system()`` calls.
    """

    def __init__(
        self,
        *,
        total_gb: float = 16.0,
        available_gb: float = 12.0,
        rss_gb: float | None = 0.5,
        swap_total_gb: float = 0.0,
        swap_used_gb: float = 0.0,
        psi_some: float | None = None,
        psi_full: float | None = None,
        gpus: Iterable[GpuMemory] = (),
        source: str = "fake",
    ) -> None:
        self._lock = threading.Lock()
        self.total_gb = total_gb
        self.available_gb = available_gb
        self.rss_gb = rss_gb
        self.swap_total_gb = swap_total_gb
        self.swap_used_gb = swap_used_gb
        self.psi_some = psi_some
        self.psi_full = psi_full
        self.gpu_list: list[GpuMemory] = list(gpus)
        self.source = source
        self.calls = 0

    def set(self, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                if name == "gpus":
                    name, value = "gpu_list", list(value)
                if not hasattr(self, name):
                    raise AttributeError(f"FakeProbe has no reading {name!r}")
                setattr(self, name, value)

    def system(self) -> SystemMemory:
        with self._lock:
            self.calls += 1
            total = int(self.total_gb * GB)
            available = int(self.available_gb * GB)
            swap_total = int(self.swap_total_gb * GB)
            swap_used = int(self.swap_used_gb * GB)
            return SystemMemory(
                total_bytes=total,
                available_bytes=available,
                used_bytes=max(total - available, 0),
                percent=round(100.0 * (total - available) / total, 1) if total else 0.0,
                swap_total_bytes=swap_total,
                swap_used_bytes=swap_used,
                swap_percent=round(100.0 * swap_used / swap_total, 1) if swap_total else 0.0,
                psi_some_avg10=self.psi_some,
                psi_full_avg10=self.psi_full,
                source=self.source,
            )

    def process_tree_rss(self, pid: int) -> int:
        if self.rss_gb is None:
            return int(current_rss_gb() * GB)
        return int(self.rss_gb * GB)

    def gpus(self) -> list[GpuMemory]:
        with self._lock:
            return list(self.gpu_list)
