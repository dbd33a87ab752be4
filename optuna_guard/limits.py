"""MemoryLimits: the one validated settings object behind check_memory, @guard and the pruner."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any, Literal

from optuna_guard.exceptions import ConfigError

OnTrip = Literal["prune", "fail"]

# field name -> environment variable that overrides its default
ENV_VARS: dict[str, str] = {
    "min_available_gb": "OPTUNA_GUARD_MIN_AVAILABLE_GB",
    "warn_available_gb": "OPTUNA_GUARD_WARN_AVAILABLE_GB",
    "max_ram_percent": "OPTUNA_GUARD_MAX_RAM_PERCENT",
    "max_swap_percent": "OPTUNA_GUARD_MAX_SWAP_PERCENT",
    "max_gpu_percent": "OPTUNA_GUARD_MAX_GPU_PERCENT",
    "max_trial_rss_gb": "OPTUNA_GUARD_MAX_TRIAL_RSS_GB",
    "interval": "OPTUNA_GUARD_INTERVAL",
    "on_trip": "OPTUNA_GUARD_ON_TRIP",
}


# The warning level when none is given: 4 GB, or WARN_MARGIN_GB above a stop level set higher.
DEFAULT_WARN_AVAILABLE_GB = 4.0
WARN_MARGIN_GB = 2.0


class _DefaultWarn(float):
    """The default ``warn_available_gb`` (4.0), told apart from an explicit 4.0 by identity so
    that a stop level set alone above it moves the warning level with it."""

    def __repr__(self) -> str:
        return repr(float(self))


FOLLOW_STOP: float = _DefaultWarn(DEFAULT_WARN_AVAILABLE_GB)


def warn_level_for(min_available_gb: float | None) -> float:
    """The default warning level for a stop level: 4 GB, or stop + 2 GB when the stop is at or
    above 4 GB (so ``min_available_gb=8`` alone warns below 10 GB instead of being refused)."""
    if min_available_gb is not None and min_available_gb >= DEFAULT_WARN_AVAILABLE_GB:
        return float(min_available_gb) + WARN_MARGIN_GB
    return DEFAULT_WARN_AVAILABLE_GB


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryLimits:
    """Memory limits for one trial. ``None`` switches a limit off.

    All arguments are keyword-only and stay readable as attributes; :meth:`from_env` builds one
    from the ``OPTUNA_GUARD_*`` environment variables.

    Args:
        min_available_gb: stop the trial when available RAM (cgroup aware) falls below this.
        warn_available_gb: log a warning (once per trial and context) below this. Not given:
            4 GB, or ``min_available_gb`` + 2 GB when that is 4 GB or more.
        max_ram_percent: stop when used RAM exceeds this percent of the (cgroup) total.
        max_swap_percent: stop when swap use exceeds this percent.
        max_gpu_percent: stop when any GPU's memory use exceeds this percent.
        max_trial_rss_gb: stop when the trial's process tree RSS exceeds this.
        interval: sampling period of the in-trial watcher thread near a limit, seconds; far
            from every limit it reads less often (headroom / 6 GB/s, up to 10 intervals or 1 s).
        on_trip: "prune" ends a stopped trial PRUNED (samplers learn from it), "fail" ends it FAIL.

    Raises:
        ConfigError: A limit is not a finite number or is out of range (a GB level below 0,
            a percent outside (0, 100], ``max_trial_rss_gb`` or ``interval`` not > 0),
            ``warn_available_gb`` is below ``min_available_gb``, or ``on_trip`` is neither
            "prune" nor "fail".
    """

    min_available_gb: float | None = 2.0
    warn_available_gb: float | None = FOLLOW_STOP
    max_ram_percent: float | None = None
    max_swap_percent: float | None = None
    max_gpu_percent: float | None = None
    max_trial_rss_gb: float | None = None
    interval: float = 0.1
    on_trip: OnTrip = "prune"

    def __post_init__(self) -> None:
        if self.warn_available_gb is FOLLOW_STOP:
            if self.min_available_gb is not None:
                _require_number("min_available_gb", self.min_available_gb)
            object.__setattr__(self, "warn_available_gb", warn_level_for(self.min_available_gb))
            object.__setattr__(self, "_warn_follows_stop", True)
        for name in ("min_available_gb", "warn_available_gb", "max_trial_rss_gb"):
            value = getattr(self, name)
            if value is None:
                continue
            _require_number(name, value)
            if value < 0:
                raise ConfigError(
                    f"{name} cannot be negative but got {value}; "
                    "use a value >= 0 or None to switch it off."
                )
        if self.max_trial_rss_gb is not None and self.max_trial_rss_gb == 0:
            raise ConfigError("max_trial_rss_gb must be > 0 but got 0; use None to switch it off.")
        for name in ("max_ram_percent", "max_swap_percent", "max_gpu_percent"):
            value = getattr(self, name)
            if value is None:
                continue
            _require_number(name, value)
            if not 0 < value <= 100:
                raise ConfigError(f"{name} must be in (0, 100] but got {value}.")
        _require_number("interval", self.interval)
        if self.interval <= 0:
            raise ConfigError(f"interval must be > 0 seconds but got {self.interval}.")
        if (
            self.min_available_gb is not None
            and self.warn_available_gb is not None
            and self.warn_available_gb < self.min_available_gb
        ):
            raise ConfigError(
                f"warn_available_gb ({self.warn_available_gb}) cannot be below min_available_gb "
                f"({self.min_available_gb}); the warning must come before the stop."
            )
        if self.on_trip not in ("prune", "fail"):
            raise ConfigError(f"on_trip must be 'prune' or 'fail' but got {self.on_trip!r}.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> MemoryLimits:
        """Defaults, then ``OPTUNA_GUARD_*`` environment variables, then explicit ``overrides``."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, var in ENV_VARS.items():
            raw = environ.get(var)
            if raw is None or raw.strip() == "":
                continue
            values[name] = _parse_env(name, var, raw.strip())
        values.update({k: v for k, v in overrides.items()})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(
                f"unknown memory limit(s) {sorted(unknown)}; known: {sorted(ENV_VARS)}."
            )
        return cls(**values)

    def replace(self, **changes: Any) -> MemoryLimits:
        """A copy with some fields changed (validated again). A warning level that followed the
        stop level keeps following it."""
        if getattr(self, "_warn_follows_stop", False) and "warn_available_gb" not in changes:
            changes["warn_available_gb"] = FOLLOW_STOP
        return dataclasses.replace(self, **changes)


def _require_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number but got {value!r}.")
    if math.isnan(value) or math.isinf(value):
        raise ConfigError(f"{name} must be a finite number but got {value}.")


def _parse_env(name: str, var: str, raw: str) -> Any:
    if name == "on_trip":
        return raw.lower()
    if raw.lower() in ("none", "off"):
        return None
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(
            f"environment variable {var}={raw!r} is not a number; set it to e.g. 2.0 or 'none'."
        ) from None
