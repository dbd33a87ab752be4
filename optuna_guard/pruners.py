"""MemoryGuardPruner: the memory check at every ``trial.should_prune()`` the user already calls.

``trial.report(score, split); if trial.should_prune(): raise optuna.TrialPruned()`` at each CV
split is how people write pruned objectives; with this pruner that same line also stops a
trial when memory runs short, and otherwise asks the wrapped pruner (e.g. ``MedianPruner``).
"""

from __future__ import annotations

import gc
import os
from typing import Any

import optuna
from optuna.pruners import BasePruner
from optuna.trial import FrozenTrial

from optuna_guard import preemption, tags
from optuna_guard._logging import get_logger
from optuna_guard._trips import below_warning, find_trip, needs_gpu, needs_rss
from optuna_guard._units import GB
from optuna_guard._wrapping import class_for
from optuna_guard.exceptions import ConfigError
from optuna_guard.limits import FOLLOW_STOP, MemoryLimits
from optuna_guard.memory import MemoryProbe, default_probe
from optuna_guard.trial_guard import kill_tags, write_user_attrs

_log = get_logger(__name__)


class MemoryGuardPruner(BasePruner):
    """Prune when a memory limit trips (after tagging the trial), else defer to ``wrapped``.

    Args:
        wrapped: the pruner that decides when memory is fine (``None``: never prune then).
        min_available_gb, warn_available_gb, max_ram_percent, max_swap_percent,
        max_gpu_percent, max_trial_rss_gb: as in :class:`MemoryLimits` (``None`` = off; the
            warning level follows a stop level set alone at 4 GB or more: stop + 2 GB).
        limits: a whole :class:`MemoryLimits` instead of the individual arguments.
        probe: where readings come from (tests inject a fake).

    Raises:
        ConfigError: ``wrapped`` is not an Optuna pruner, ``limits`` not a
            :class:`MemoryLimits`, or a limit is out of its range.

    A pruned trial gets the same tags as ``check_memory`` (``emergency_killed``, ``kill_reason``,
    ``kill_limit``, ``available_gb_at_kill``). A stop requested by a signal raises
    ``TrialPreempted`` from ``should_prune`` (the trial ends FAIL tagged ``preempted``).
    Wrapping a ``HyperbandPruner`` keeps its brackets: the wrapper is then also a
    ``HyperbandPruner`` to Optuna (``optuna.pruners._filter_study`` keeps filtering by bracket).
    """

    def __new__(
        cls, wrapped: BasePruner | None = None, *args: Any, **kwargs: Any
    ) -> MemoryGuardPruner:
        return super().__new__(class_for(cls, wrapped))

    def __init__(
        self,
        wrapped: BasePruner | None = None,
        *,
        min_available_gb: float | None = 2.0,
        warn_available_gb: float | None = FOLLOW_STOP,
        max_ram_percent: float | None = None,
        max_swap_percent: float | None = None,
        max_gpu_percent: float | None = None,
        max_trial_rss_gb: float | None = None,
        limits: MemoryLimits | None = None,
        probe: MemoryProbe | None = None,
    ) -> None:
        if wrapped is not None and not isinstance(wrapped, BasePruner):
            raise ConfigError(
                f"wrapped must be an optuna pruner (BasePruner) or None but got {wrapped!r}."
            )
        if limits is None:
            limits = MemoryLimits(
                min_available_gb=min_available_gb,
                warn_available_gb=warn_available_gb,
                max_ram_percent=max_ram_percent,
                max_swap_percent=max_swap_percent,
                max_gpu_percent=max_gpu_percent,
                max_trial_rss_gb=max_trial_rss_gb,
            )
        elif not isinstance(limits, MemoryLimits):
            raise ConfigError(f"limits must be a MemoryLimits but got {limits!r}.")
        self._wrapped = wrapped
        self._limits = limits
        self._probe = probe
        self._warned: set[tuple[int, object]] = set()

    @property
    def limits(self) -> MemoryLimits:
        return self._limits

    @property
    def wrapped(self) -> BasePruner | None:
        return self._wrapped

    def __repr__(self) -> str:
        return f"MemoryGuardPruner(wrapped={self._wrapped!r}, limits={self._limits!r})"

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        storage = study._storage
        if preemption.stop_requested():
            attrs = preemption.stop_tags()
            write_user_attrs(trial, attrs, storage)
            raise preemption.TrialPreempted(f"Trial #{trial.number} {attrs[tags.KILL_REASON]}")
        limits = self._limits
        probe = self._probe or default_probe()
        system = probe.system()
        rss = probe.process_tree_rss(os.getpid()) if needs_rss(limits) else None
        gpus = probe.gpus() if needs_gpu(limits) else ()
        trip = find_trip(limits, system, rss, gpus)
        step = trial.last_step
        context = (
            f"Trial #{trial.number} step {step}" if step is not None else f"Trial #{trial.number}"
        )
        if trip is not None:
            write_user_attrs(trial, kill_tags(trip, context, trial), storage)
            _log.error(
                "EMERGENCY BRAKE: %s: %s (%s); "
                "trial pruned before the machine runs out of memory.",
                context,
                trip.detail,
                trip.limit,
            )
            gc.collect()
            return True
        if below_warning(limits, system):
            key = (trial._trial_id, trial.datetime_start)  # unique across studies and storages
            if key not in self._warned:
                if len(self._warned) > 4096:
                    self._warned.clear()
                self._warned.add(key)
                _log.warning(
                    "Low memory: %s: available %.2f GB < %.2f GB warning level.",
                    context,
                    system.available_bytes / GB,
                    limits.warn_available_gb,
                )
        if self._wrapped is None:
            return False
        return self._wrapped.prune(study, trial)


__all__ = ["MemoryGuardPruner"]
