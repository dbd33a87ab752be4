"""check_memory and @guard: stop a trial before it runs the machine out of memory.

``check_memory(trial, "split 3/5")`` is the explicit boundary users put before each CV split;
``@guard`` checks at trial start, watches the trial from the process-wide watcher thread (see
``optuna_guard._watcher``) so a runaway allocation in the middle of a split is stopped within
about one sampling period, records ``peak_rss_gb`` / ``lowest_available_gb`` (``peak_gpu_gb``) on
every trial, and collects garbage afterwards. A stopped trial is tagged (``emergency_killed``,
``kill_reason``, ``kill_limit``, ``available_gb_at_kill``) while it is still RUNNING - Optuna
refuses attributes on finished trials - and then ends PRUNED (``on_trip="prune"``: samplers
learn from it) or FAIL (``on_trip="fail"``); the process lives on and runs the next trial.
"""

from __future__ import annotations

import collections
import functools
import gc
import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

import optuna

from optuna_guard import preemption, tags
from optuna_guard._attrs import hold_for_tell, set_user_attrs
from optuna_guard._logging import get_logger
from optuna_guard._peak import own_peak_bytes
from optuna_guard._trips import Trip, below_warning, find_trip, needs_gpu, needs_rss
from optuna_guard._units import GB, to_gb
from optuna_guard._watcher import STUCK_AFTER_S, WATCHER, OnStuck, TrialWatch, default_on_stuck
from optuna_guard.exceptions import ConfigError
from optuna_guard.limits import MemoryLimits, warn_level_for
from optuna_guard.memory import GpuMemory, MemoryProbe, SystemMemory, default_probe

_log = get_logger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

BUDGET_ENV_VAR = "OPTUNA_GUARD_MEMORY_BUDGET_GB"
PREFLIGHT_ENV_VAR = "OPTUNA_GUARD_PREFLIGHT"

# Full garbage collections after trials are rate-limited to this share of wall time (a full
# collection in a process with optuna + numpy loaded costs tens of ms, more than a short trial;
# 0.2 % keeps the guard's whole cost on 10 ms trials within 1 %).
GC_TIME_SHARE = 0.002


class MemoryLimitPruned(optuna.TrialPruned):
    """The trial was stopped by a memory limit (already tagged). Optuna ends it PRUNED; under
    ``@guard(on_trip="fail")`` the guard turns it into a FAIL instead."""

    def __init__(self, message: str, trip: Trip) -> None:
        super().__init__(message)
        self.trip = trip


# -- check_memory -------------------------------------------------------------------------------

_threshold_limits: dict[tuple[float, float], MemoryLimits] = {}
_warned: collections.OrderedDict[tuple[Any, ...], None] = collections.OrderedDict()
_warned_lock = threading.Lock()
_WARNED_MAX = 4096


def _limits_for(safe_threshold_gb: Any, warning_threshold_gb: Any) -> MemoryLimits:
    key = (safe_threshold_gb, warning_threshold_gb)
    limits = _threshold_limits.get(key)  # type: ignore[arg-type]
    if limits is None:
        for name, value in (
            ("safe_threshold_gb", safe_threshold_gb),
            ("warning_threshold_gb", warning_threshold_gb),
        ):
            if value is None and name == "warning_threshold_gb":
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or math.isnan(value)
                or math.isinf(value)
            ):
                raise ConfigError(f"{name} must be a finite number of GB but got {value!r}.")
            if value < 0:
                raise ConfigError(
                    f"{name} cannot be negative but got {value}; use 0 to switch it off."
                )
        if warning_threshold_gb is None:
            warning_threshold_gb = warn_level_for(safe_threshold_gb)
        if warning_threshold_gb < safe_threshold_gb:
            raise ConfigError(
                f"warning_threshold_gb ({warning_threshold_gb}) cannot be below safe_threshold_gb "
                f"({safe_threshold_gb}); the warning must come before the stop."
            )
        limits = MemoryLimits(
            min_available_gb=float(safe_threshold_gb),
            warn_available_gb=float(warning_threshold_gb),
        )
        if len(_threshold_limits) < 256:
            _threshold_limits[key] = limits  # type: ignore[index]
    return limits


def check_memory(
    trial: Any,
    context: str = "",
    safe_threshold_gb: float = 2.0,
    warning_threshold_gb: float | None = None,
    *,
    min_available_gb: float | None = None,
    warn_available_gb: float | None = None,
    limits: MemoryLimits | None = None,
    probe: MemoryProbe | None = None,
) -> SystemMemory:
    """Stop the trial now if memory is short; call it at trial start and before each CV split.

    Below the warning level of available memory (cgroup aware) it logs a warning, once per
    trial and context. Below the stop level it tags the trial (``emergency_killed``,
    ``kill_reason="OOM prevention [<context>]: ..."``, ``available_gb_at_kill``, ``kill_limit``),
    logs an EMERGENCY BRAKE error, collects garbage and raises :class:`MemoryLimitPruned` (an
    ``optuna.TrialPruned``).

    Levels: ``min_available_gb`` / ``warn_available_gb`` (the names used everywhere else;
    ``kill_limit="min_available_gb"``), or the seed's positional aliases ``safe_threshold_gb``
    (default 2.0) / ``warning_threshold_gb`` (``kill_limit="safe_threshold_gb"``). The warning
    level defaults to 4 GB, or stop + 2 GB when the stop level is 4 GB or more. ``limits``
    checks a whole :class:`MemoryLimits` instead (the levels are then ignored). A stop
    requested by a signal (see ``optuna_guard.preemption``) raises ``TrialPreempted`` here.

    Args:
        trial: The running ``optuna.Trial`` (tagged when stopped; anything with
            ``set_user_attr`` and ``number`` works).
        context: Where in the objective the check runs (``"fold 3"``); it goes into the warning,
            the error and ``kill_reason``.
        safe_threshold_gb: The stop level in GB of available memory (seed alias of
            ``min_available_gb``); 0 switches the stop off.
        warning_threshold_gb: The warning level in GB (seed alias of ``warn_available_gb``).
        min_available_gb: The stop level in GB. Giving it or ``warn_available_gb`` ignores both
            aliases (the stop level then defaults to 2.0).
        warn_available_gb: The warning level in GB.
        limits: A whole :class:`MemoryLimits` to check (RAM, swap, GPU, process tree RSS).
        probe: The memory probe to read from; the default one (cgroup aware) if not given.

    Returns:
        The system memory reading the check was made on.

    Raises:
        MemoryLimitPruned: A limit is crossed; the trial was tagged ``emergency_killed``.
        TrialPreempted: A stop was requested by a signal; the trial was tagged with its
            ``kill_reason`` (and ``preempted`` for a preemption).
        ConfigError: A level is not a finite number >= 0, or the warning level is below the
            stop level.
    """
    preemption.raise_if_stop_requested(trial)
    available_name = "min_available_gb"
    if limits is None:
        if min_available_gb is not None or warn_available_gb is not None:
            limits = _limits_for(
                2.0 if min_available_gb is None else min_available_gb, warn_available_gb
            )
        else:
            limits = _limits_for(safe_threshold_gb, warning_threshold_gb)
            available_name = "safe_threshold_gb"
    probe = probe or default_probe()
    system = probe.system()
    rss = probe.process_tree_rss(os.getpid()) if needs_rss(limits) else None
    gpus = probe.gpus() if needs_gpu(limits) else ()
    trip = find_trip(limits, system, rss, gpus, available_name=available_name)
    if trip is not None:
        _emergency_stop(trial, trip, context, action="pruned")
    if below_warning(limits, system):
        _warn_once(trial, context, system, limits)
    return system


def _where(trial: Any, context: str) -> str:
    number = getattr(trial, "number", "?")
    if context.startswith("Trial #"):
        return context
    return f"Trial #{number} at {context}" if context else f"Trial #{number}"


def _warn_once(trial: Any, context: str, system: SystemMemory, limits: MemoryLimits) -> None:
    # the start time tells trials apart across studies and storages (ids of freed objects repeat)
    key = (getattr(trial, "_trial_id", id(trial)), getattr(trial, "datetime_start", None), context)
    with _warned_lock:
        if key in _warned:
            return
        _warned[key] = None
        while len(_warned) > _WARNED_MAX:
            _warned.popitem(last=False)
    stop = (
        f"; stopping below {limits.min_available_gb:.2f} GB"
        if limits.min_available_gb is not None
        else ""
    )
    _log.warning(
        "Low memory: %s: available %.2f GB < %.2f GB warning level%s.",
        _where(trial, context),
        system.available_bytes / GB,
        limits.warn_available_gb,
        stop,
    )


def kill_tags(trip: Trip, context: str, trial: Any) -> dict[str, Any]:
    """The user attributes of a trial stopped by a memory limit."""
    label = context or f"Trial #{getattr(trial, 'number', '?')}"
    return tags.killed(
        f"OOM prevention [{label}]: {trip.detail}",
        limit=trip.limit,
        available_gb=to_gb(trip.available_bytes),
    )


def write_user_attrs(
    trial: Any, attrs: Mapping[str, Any], storage: Any = None, *, last: bool = False
) -> None:
    """Write tags on a running trial; a failure is logged, never raised (stopping the trial
    matters more than its tags). ``storage`` is for a FrozenTrial (pruners). Optuna's own
    storages get all keys in one operation (see ``optuna_guard._attrs``). ``last``: the
    trial's tell follows (the guard's end); a launcher worker writes them in its transaction."""
    if storage is None and len(attrs) > 1 and isinstance(trial, optuna.Trial):
        try:
            if not (last and hold_for_tell(trial.storage, trial._trial_id, attrs)):
                set_user_attrs(trial.storage, trial._trial_id, attrs)
            trial._cached_frozen_trial.user_attrs.update(attrs)  # as Trial.set_user_attr does
            return
        except Exception:
            pass  # one key at a time below, each failure logged with its key
    elif storage is not None and len(attrs) > 1:
        try:
            set_user_attrs(storage, trial._trial_id, attrs)
            return
        except Exception:
            pass
    for key, value in attrs.items():
        try:
            if storage is not None:
                storage.set_trial_user_attr(trial._trial_id, key, value)
            else:
                trial.set_user_attr(key, value)
        except Exception as exc:
            _log.error(
                "Could not write tag %s=%r on Trial #%s: %s",
                key,
                value,
                getattr(trial, "number", "?"),
                exc,
            )


_inside_guard = threading.local()


def _emergency_stop(
    trial: Any, trip: Trip, context: str, *, action: str, storage: Any = None
) -> None:
    """Tag, log, collect garbage and raise MemoryLimitPruned.

    Inside a guarded trial the collection is left to the guard: it first frees the stopped
    objective's frames, so its collection actually returns the trial's memory.
    """
    write_user_attrs(trial, kill_tags(trip, context, trial), storage)
    message = (
        f"EMERGENCY BRAKE: {_where(trial, context)}: {trip.detail} ({trip.limit}); "
        f"trial {action} before the machine runs out of memory."
    )
    _log.error(message)
    if not getattr(_inside_guard, "depth", 0):
        gc.collect()
    raise MemoryLimitPruned(message, trip)


# -- @guard -------------------------------------------------------------------------------------


class _Unset:
    def __repr__(self) -> str:
        return "<from environment>"


_UNSET: Any = _Unset()


def _env_budget(environ: Mapping[str, str]) -> float | None:
    raw = environ.get(BUDGET_ENV_VAR, "").strip()
    if not raw or raw.lower() in ("none", "off"):
        return None
    try:
        return _check_budget(float(raw))
    except ValueError:
        raise ConfigError(
            f"environment variable {BUDGET_ENV_VAR}={raw!r} is not a number of GB; "
            "set it to e.g. 6.0 or 'none'."
        ) from None


def _check_budget(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or math.isinf(value)
        or value <= 0
    ):
        raise ConfigError(f"memory_budget_gb must be a positive number of GB but got {value!r}.")
    return float(value)


@overload
def guard(func: F) -> F: ...


@overload
def guard(
    func: None = None,
    *,
    min_available_gb: float | None = ...,
    warn_available_gb: float | None = ...,
    max_ram_percent: float | None = ...,
    max_swap_percent: float | None = ...,
    max_gpu_percent: float | None = ...,
    max_trial_rss_gb: float | None = ...,
    interval: float = ...,
    on_trip: str = ...,
    memory_budget_gb: float | None = ...,
    preflight: bool = ...,
    on_stuck: OnStuck | None = ...,
    stuck_after: float = ...,
    probe: MemoryProbe | None = ...,
    fingerprint: bool | None = ...,
    cache: bool = ...,
    on_changed_objective: str = ...,
) -> Callable[[F], F]: ...


def guard(
    func: Callable[..., Any] | None = None,
    *,
    min_available_gb: Any = _UNSET,
    warn_available_gb: Any = _UNSET,
    max_ram_percent: Any = _UNSET,
    max_swap_percent: Any = _UNSET,
    max_gpu_percent: Any = _UNSET,
    max_trial_rss_gb: Any = _UNSET,
    interval: Any = _UNSET,
    on_trip: Any = _UNSET,
    memory_budget_gb: Any = _UNSET,
    preflight: Any = _UNSET,
    on_stuck: Any = None,
    stuck_after: Any = STUCK_AFTER_S,
    probe: MemoryProbe | None = None,
    fingerprint: Any = None,
    cache: Any = False,
    on_changed_objective: Any = "warn",
) -> Any:
    """Guard an Optuna objective against running the machine out of memory.

    Use bare (``@guard``) or with limits (``@guard(max_trial_rss_gb=6, on_trip="fail")``).
    Limits not given come from :meth:`MemoryLimits.from_env` (``OPTUNA_GUARD_*`` variables,
    read when the function is decorated), so the launcher configures guards in its workers.
    ``None`` switches a limit off. ``memory_budget_gb`` (env ``OPTUNA_GUARD_MEMORY_BUDGET_GB``)
    writes the Optuna constraint ``memory = peak_rss_gb - budget`` on every trial;
    ``preflight=True`` (env ``OPTUNA_GUARD_PREFLIGHT=1``) runs
    ``optuna_guard.oom_aware.preflight.preflight_check`` before the objective. The wrapper keeps
    the function's name and signature and carries its limits as ``__optuna_guard__``.
    ``fingerprint=True`` records the objective's fingerprint on the study and tags trials
    ``objective_version`` (a changed objective warns, or raises with
    ``on_changed_objective="raise"``); ``cache=True`` completes a trial whose params already
    COMPLETEd in this version with that result, without calling the objective (see
    docs/resume_and_cache.md).

    Args:
        func: The objective, when used bare (``@guard``); None with ``@guard(...)``.
        min_available_gb: Stop the trial when available RAM (cgroup aware) falls below this.
        warn_available_gb: Log a warning (once per trial and context) below this.
        max_ram_percent: Stop when used RAM exceeds this percent of the (cgroup) total.
        max_swap_percent: Stop when swap use exceeds this percent.
        max_gpu_percent: Stop when any GPU's memory use exceeds this percent.
        max_trial_rss_gb: Stop when the trial's process tree RSS exceeds this.
        interval: Sampling period of the in-trial watcher thread, seconds.
        on_trip: ``"prune"`` ends a stopped trial PRUNED, ``"fail"`` ends it FAIL.
        memory_budget_gb: The per-trial memory budget of the ``memory`` constraint, GB.
        preflight: Run the preflight check before the objective.
        on_stuck: What to do with a trial over its limit that does not stop for
            ``stuck_after`` seconds: ``"exit"`` ends it FAIL and leaves the process (exit status
            71), ``"warn"`` logs and lets it run. Default: ``"warn"`` under the launcher, else
            ``"exit"``.
        stuck_after: Seconds over the limit without effect before ``on_stuck`` acts.
        probe: The memory probe to read from; the default one (cgroup aware) if not given.
        fingerprint: Record the objective's fingerprint; None means on when ``cache=True``.
        cache: Reuse the result of a COMPLETE trial with the same params and objective version.
        on_changed_objective: ``"warn"`` or ``"raise"`` when the objective changed since the
            fingerprint the study holds.

    Returns:
        The guarded objective (bare use), or a decorator that returns it (``@guard(...)``).

    Raises:
        ConfigError: ``func`` is not callable, or an option or an ``OPTUNA_GUARD_*`` variable
            has an invalid value (see :class:`MemoryLimits`).
    """
    overrides = {
        name: value
        for name, value in (
            ("min_available_gb", min_available_gb),
            ("warn_available_gb", warn_available_gb),
            ("max_ram_percent", max_ram_percent),
            ("max_swap_percent", max_swap_percent),
            ("max_gpu_percent", max_gpu_percent),
            ("max_trial_rss_gb", max_trial_rss_gb),
            ("interval", interval),
            ("on_trip", on_trip),
        )
        if value is not _UNSET
    }
    if func is not None and not callable(func):
        raise ConfigError(
            f"@guard decorates an objective function but got {func!r}; use @guard or @guard(...)."
        )
    limits = MemoryLimits.from_env(**overrides)
    budget = (
        _env_budget(os.environ)
        if memory_budget_gb is _UNSET
        else (None if memory_budget_gb is None else _check_budget(memory_budget_gb))
    )
    if preflight is _UNSET:
        preflight = os.environ.get(PREFLIGHT_ENV_VAR, "").strip().lower() in (
            "1",
            "true",
            "yes",
            "on",
        )
    settings = _GuardSettings(
        limits=limits,
        budget_gb=budget,
        preflight=bool(preflight),
        probe=probe,
        on_stuck=_check_on_stuck(on_stuck),
        stuck_after=_check_stuck_after(stuck_after),
    )

    from optuna_guard.resume import cached_value, guard_hook

    resume_hook = guard_hook(fingerprint, cache, on_changed_objective)

    def decorate(objective: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(objective)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            trial = _find_trial(args, kwargs)
            if (
                resume_hook is not None
                and (hit := resume_hook.start_trial(trial, objective)) is not None
            ):
                return cached_value(hit)  # issue 13: a repeat of a COMPLETE configuration
            return _run_guarded(objective, settings, trial, args, kwargs)

        guarded.__optuna_guard__ = limits  # type: ignore[attr-defined]
        guarded.__optuna_guard_settings__ = settings  # type: ignore[attr-defined]
        return guarded

    return decorate(func) if func is not None else decorate


def _check_on_stuck(value: Any) -> OnStuck:
    if value is None:
        return default_on_stuck()
    if value not in ("exit", "warn"):
        raise ConfigError(f"on_stuck must be 'exit' or 'warn' but got {value!r}.")
    return value  # type: ignore[no-any-return]


def _check_stuck_after(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"stuck_after must be a positive number of seconds but got {value!r}.")
    return float(value)


class _GuardSettings:
    """Everything one ``@guard(...)`` decided, validated once at decoration time. New options
    are keyword-only fields here and keyword arguments of ``guard``."""

    __slots__ = (
        "budget_gb",
        "budget_warned",
        "limits",
        "on_stuck",
        "preflight",
        "probe",
        "stuck_after",
    )

    def __init__(
        self,
        *,
        limits: MemoryLimits,
        budget_gb: float | None,
        preflight: bool,
        probe: MemoryProbe | None,
        on_stuck: OnStuck = "exit",
        stuck_after: float = STUCK_AFTER_S,
    ) -> None:
        self.limits = limits
        self.budget_gb = budget_gb
        self.preflight = preflight
        self.probe = probe
        self.on_stuck = on_stuck
        self.stuck_after = stuck_after
        self.budget_warned = False

    def __repr__(self) -> str:
        return (
            f"GuardSettings(limits={self.limits!r}, budget_gb={self.budget_gb}, "
            f"preflight={self.preflight}, "
            f"on_stuck={self.on_stuck!r}, stuck_after={self.stuck_after})"
        )


def _find_trial(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The trial among the arguments: the first Optuna trial (so methods and class-based
    objectives work: ``def __call__(self, trial)``), else a ``trial=`` keyword, else the first."""
    for value in args:
        if isinstance(value, optuna.trial.BaseTrial):
            return value
    if "trial" in kwargs:
        return kwargs["trial"]
    if not args:
        raise TypeError("a guarded objective needs the trial as an argument")
    return args[0]


class _RecentReadings:
    """The guard's start and end readings, shared between trials for up to one sampling
    interval (at most ``FRESH_S``).

    Why: a reading is a few kernel file reads (the tree RSS one per thread), and right after a
    trial (cold caches) that costs ~100 us here; with 10 ms trials, reading at every start and
    end would be most of the guard's cost. A reading at most one interval old is as fresh as
    the watcher's own sampling; a trial shorter than an interval thus costs a reading only
    every interval, and its ``peak_rss_gb`` is the RSS seen within the last interval. After a
    trial stopped for memory the cache is dropped (its memory is freed only then). The cache
    holds the probe itself (an ``is`` check; no id reuse); ``check_memory`` and the watcher
    always read afresh. GPU readings are shared the same way (an NVML query per GPU costs
    more than the /proc reads).
    """

    FRESH_S = 0.1

    def __init__(self) -> None:
        self._system: tuple[Any, float, SystemMemory] | None = None
        self._rss: tuple[Any, int, float, int] | None = None
        self._gpus: tuple[Any, float, list[GpuMemory]] | None = None

    def clear(self) -> None:
        self._system = self._rss = self._gpus = None

    def gpus(self, probe: MemoryProbe, interval: float) -> list[GpuMemory]:
        now = time.monotonic()
        cached = self._gpus
        if (
            cached is not None
            and cached[0] is probe
            and now - cached[1] < min(self.FRESH_S, interval)
        ):
            return cached[2]
        reading = list(probe.gpus())
        self._gpus = (probe, now, reading)
        return reading

    def system(self, probe: MemoryProbe, interval: float) -> SystemMemory:
        now = time.monotonic()
        cached = self._system
        if (
            cached is not None
            and cached[0] is probe
            and now - cached[1] < min(self.FRESH_S, interval)
        ):
            return cached[2]
        reading = probe.system()
        self._system = (probe, now, reading)
        return reading

    def tree_rss(self, probe: MemoryProbe, interval: float) -> int:
        now = time.monotonic()
        pid = os.getpid()
        cached = self._rss
        if (
            cached is not None
            and cached[0] is probe
            and cached[1] == pid
            and now - cached[2] < min(self.FRESH_S, interval)
        ):
            return cached[3]
        rss = probe.process_tree_rss(pid)
        self._rss = (probe, pid, now, rss)
        return rss


_READINGS = _RecentReadings()


def _run_guarded(
    objective: Callable[..., Any],
    settings: _GuardSettings,
    trial: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    limits = settings.limits
    probe = settings.probe or default_probe()
    preemption.raise_if_stop_requested(trial)
    number = getattr(trial, "number", -1)
    killed = False
    watch = WATCHER.watch(
        trial, limits, probe, on_stuck=settings.on_stuck, stuck_after=settings.stuck_after
    )
    _inside_guard.depth = getattr(_inside_guard, "depth", 0) + 1
    try:
        with watch:
            _check_at_start(trial, watch, probe, settings)
            try:
                value = watch.run(objective, *args, **kwargs)
            except BaseException as exc:
                if not watch.stopped_by(exc) or isinstance(exc, MemoryLimitPruned):
                    raise
                _log.warning(
                    "Trial #%d wrapped the guard's interrupt in %s; it is ended as a memory stop.",
                    number,
                    type(exc).__name__,
                )
                _release_frames(exc)
                value = None
        if watch.stopped:
            if not watch.ended_by_interrupt:
                _log.warning(
                    "Trial #%d caught the guard's interrupt and went on; it is stopped anyway.",
                    number,
                )
            return _stopped_by_watcher(trial, watch, limits)
        if watch.interrupt is not None:
            kind, trip = watch.interrupt
            _log.info(
                "Trial #%d finished before the guard could stop it (%s); its result is kept.",
                number,
                trip.detail if trip else kind,
            )
        return value
    except MemoryLimitPruned as exc:
        killed = True
        _release_frames(exc)
        if limits.on_trip == "fail":
            return _fail_value(trial)
        raise
    finally:
        _inside_guard.depth -= 1
        _finish_trial(
            trial,
            watch,
            probe,
            settings,
            killed=killed or watch.stopped_for_memory,
        )


def _check_at_start(
    trial: Any, watch: TrialWatch, probe: MemoryProbe, settings: _GuardSettings
) -> None:
    """The start check: limits (shared readings), the warning level, the budget, pre-flight."""
    limits = settings.limits
    number = watch.number
    # real readings, alone in the process: its own peak is the trial's (see _peak)
    watch.own_peak_wanted = settings.probe is None and not watch.others()
    system = _READINGS.system(probe, limits.interval)
    rss = (
        _READINGS.tree_rss(probe, limits.interval)
        if needs_rss(limits) or settings.budget_gb is not None
        else None
    )
    gpus = _READINGS.gpus(probe, limits.interval)
    watch.observe(system, rss, gpus)
    if rss is not None:
        _warn_if_budget_below_rss(settings, rss)
    trip = find_trip(limits, system, rss if needs_rss(limits) else None, gpus)
    if trip is not None:
        others = watch.others()
        if not others:
            _emergency_stop(trial, trip, f"Trial #{number} start", action=_action(limits))
        # With n_jobs > 1 the memory belongs to the trials already running: this one has
        # not allocated anything yet. The watcher stops the one that grew.
        _log.warning(
            "Trial #%d starts while %s (%s), with %d other guarded trial(s) running in this "
            "process; the watcher stops the one that grew.",
            number,
            trip.detail,
            trip.limit,
            others,
        )
    if below_warning(limits, system):
        _warn_once(trial, f"Trial #{number} start", system, limits)
    if settings.preflight:
        _run_preflight(trial, probe, settings)


def _warn_if_budget_below_rss(settings: _GuardSettings, rss_bytes: int) -> None:
    """Once per guard: a budget under what the process holds before the trial allocates
    anything makes every trial infeasible (or stopped at start), which is rarely meant."""
    if settings.budget_warned:
        return
    for name, budget in (
        ("memory_budget_gb", settings.budget_gb),
        ("max_trial_rss_gb", settings.limits.max_trial_rss_gb),
    ):
        if budget is not None and rss_bytes >= budget * GB:
            settings.budget_warned = True
            _log.warning(
                "%s=%.2f GB is below this process's own RSS before the trial (%.2f GB): "
                "every trial will be %s. "
                "Raise it above the interpreter's baseline (RSS without a trial running).",
                name,
                budget,
                rss_bytes / GB,
                "infeasible" if name == "memory_budget_gb" else "stopped at start",
            )


def _release_frames(exc: BaseException) -> None:
    """Free the locals of the objective's finished frames now (the big arrays of a stopped
    trial). Otherwise the exception's traceback keeps them alive until Optuna drops the
    exception and a full garbage collection breaks the frame/exception cycle - after the next
    trial has started, which then sees the memory still in use."""
    traceback.clear_frames(exc.__traceback__)
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc:
        traceback.clear_frames(cause.__traceback__)


def _action(limits: MemoryLimits) -> str:
    return "failed" if limits.on_trip == "fail" else "pruned"


def _stopped_by_watcher(trial: Any, watch: TrialWatch, limits: MemoryLimits) -> Any:
    """The watcher interrupted the objective: tag and end the trial the configured way."""
    assert watch.interrupt is not None
    _kind, trip = watch.interrupt
    if not watch.stopped_for_memory or trip is None:
        preemption.raise_if_stop_requested(trial)
        write_user_attrs(trial, tags.preempted("stop requested"))
        raise preemption.TrialPreempted(f"Trial #{watch.number} preempted: stop requested")
    if watch.available_at_trip is not None:
        trip = Trip(trip.limit, trip.detail, watch.available_at_trip)
    try:
        _emergency_stop(trial, trip, f"Trial #{watch.number} mid-trial", action=_action(limits))
    except MemoryLimitPruned:
        if limits.on_trip == "fail":
            return _fail_value(trial)
        raise
    raise AssertionError("unreachable")  # pragma: no cover


def _fail_value(trial: Any) -> Any:
    """What the objective returns to make Optuna end the trial FAIL without stopping the study:
    NaN (Optuna fails a trial whose value is NaN and goes on; an exception would stop
    ``study.optimize`` unless the user lists it in ``catch``)."""
    study = getattr(trial, "study", None)
    directions = getattr(study, "directions", None) or [None]
    return float("nan") if len(directions) == 1 else [float("nan")] * len(directions)


def _run_preflight(trial: Any, probe: MemoryProbe, settings: _GuardSettings) -> None:
    """The analysis package's pre-flight check, with this guard's own limits (not the env's)."""
    try:
        from optuna_guard.oom_aware.preflight import preflight_check
    except ImportError as exc:
        raise ConfigError(
            "preflight=True needs optuna_guard.oom_aware.preflight, which cannot be imported: "
            f"{exc}."
        ) from None
    preflight_check(
        trial,
        probe=probe,
        margin_gb=settings.limits.min_available_gb or 0.0,
        max_trial_rss_gb=settings.limits.max_trial_rss_gb,
        budget_gb=settings.budget_gb,
    )


def _finish_trial(
    trial: Any,
    watch: TrialWatch,
    probe: MemoryProbe,
    settings: _GuardSettings,
    *,
    killed: bool,
) -> None:
    """Write the trial's memory tags (and constraint) while it is RUNNING, then collect garbage."""
    try:  # the tree RSS now, for trials shorter than one sampling period (the start reading
        # and the watcher cover the rest; available memory needs no second read here)
        watch.observe(None, _READINGS.tree_rss(probe, settings.limits.interval), ())
    except Exception as exc:
        _log.debug("Final memory reading of Trial #%d failed: %s", watch.number, exc)
    if watch.own_peak_reset and not watch.others():  # a spike between two readings
        watch.observe(None, own_peak_bytes(), ())
    write_user_attrs(
        trial,
        tags.memory_seen(watch.peak_rss_bytes, watch.min_available_bytes, watch.peak_gpu_bytes),
        last=True,
    )
    if settings.budget_gb is not None:
        _write_constraint(trial, to_gb(watch.peak_rss_bytes), settings.budget_gb, killed)
    _collect_garbage(force=killed)
    if killed:
        _READINGS.clear()  # the stopped trial's memory is freed only now: read afresh next time


def _write_constraint(trial: Any, peak_gb: float, budget_gb: float, killed: bool) -> None:
    if not hasattr(trial, "set_constraint"):
        return
    try:
        from optuna_guard.oom_aware.constraints import set_memory_constraint

        set_memory_constraint(trial, peak_gb, budget_gb, killed=killed)
    except ImportError:
        value = (
            max(peak_gb - budget_gb, 0.0) + max(budget_gb, 1.0) if killed else peak_gb - budget_gb
        )
        try:
            trial.set_constraint("memory", value)
        except Exception as exc:
            _log.error(
                "Could not write the memory constraint of Trial #%s: %s",
                getattr(trial, "number", "?"),
                exc,
            )
    except Exception as exc:
        _log.error(
            "Could not write the memory constraint of Trial #%s: %s",
            getattr(trial, "number", "?"),
            exc,
        )


class _GcBudget:
    """Full collections after trials, at most ``GC_TIME_SHARE`` of wall time unless forced.

    The clock starts when the guard is first used, with an assumed cost of 50 ms until the
    first full collection is measured: a worker running 10 ms trials gets its first full
    collection after ~25 s, one running minute-long trials after every trial.
    """

    ASSUMED_COST_S = 0.05

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_full = time.perf_counter()
        self.last_cost = self.ASSUMED_COST_S


_gc_budget = _GcBudget()


def _collect_garbage(*, force: bool) -> None:
    """After a trial: a full ``gc.collect()`` when the trial was stopped by a limit or when it
    fits the time share (always, for trials longer than ~500x a collection); in between the
    interpreter's own young-generation collections do (an explicit one measured as pure cost).
    Then empty the CUDA cache if torch has CUDA initialised."""
    now = time.perf_counter()
    due = force or now - _gc_budget.last_full >= _gc_budget.last_cost / GC_TIME_SHARE
    if due:
        with _gc_budget.lock:  # claim it, so concurrent trials do not all collect
            due = force or now - _gc_budget.last_full >= _gc_budget.last_cost / GC_TIME_SHARE
            if due:
                _gc_budget.last_full = now
    if due:
        gc.collect()
        _gc_budget.last_cost = time.perf_counter() - now
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        except Exception:
            pass
