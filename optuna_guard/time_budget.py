"""Wall-clock budgets for a whole launch (Colab sessions, SLURM ``--time`` limits).

A budget that simply runs out kills whatever trial is running; the launcher instead stops
*starting* trials once the time left is shorter than a typical trial plus the grace period,
and preempts (checkpoint + ``preempted`` tag) only what is still running when it expires.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable, Sequence

from optuna_guard.exceptions import ConfigError

__all__ = ["TimeBudget", "format_duration", "parse_duration"]

_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_NUMBER = r"\d+(?:\.\d*)?|\.\d+"
# "2h15m30s", "11h30m", "90m", "1.5h", "1d12h": units in decreasing order, each at most once.
_UNITS_RE = re.compile(rf"^(?:({_NUMBER})d)?(?:({_NUMBER})h)?(?:({_NUMBER})m)?(?:({_NUMBER})s)?$")
# SLURM style "H:MM:SS" or "D-H:MM:SS" (what `squeue -o %L` prints for long jobs).
_CLOCK_RE = re.compile(r"^(?:(\d+)-)?(\d+):([0-5]?\d):([0-5]?\d)$")

_HELP = "use e.g. 11h30m, 90m, 45s, 2h15m30s, 3600 (seconds) or 1-02:00:00"


def parse_duration(text: str | float | int) -> float:
    """Seconds in a duration such as "11h30m", "90m", "45s", "3600" or "2:15:30".

    A bare number is seconds. Raises :class:`ConfigError` naming the value for anything else,
    and for zero or negative durations (a budget of nothing is a typo, not a request).
    """
    if isinstance(text, bool):
        raise ConfigError(f"time budget must be a duration but got {text!r}; {_HELP}")
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        cleaned = str(text).strip().lower().replace(" ", "")
        seconds = _parse_text(cleaned, text)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"time budget must be a positive duration but got {text!r}; {_HELP}")
    return seconds


def _parse_text(cleaned: str, original: object) -> float:
    if not cleaned:
        raise ConfigError(f"time budget is empty; {_HELP}")
    if re.fullmatch(_NUMBER, cleaned):
        return float(cleaned)
    clock = _CLOCK_RE.match(cleaned)
    if clock:
        days, hours, minutes, secs = (int(g) if g else 0 for g in clock.groups())
        return days * 86400.0 + hours * 3600.0 + minutes * 60.0 + secs
    units = _UNITS_RE.match(cleaned)
    if units and any(units.groups()):
        return sum(
            float(group) * _UNIT_SECONDS[unit]
            for group, unit in zip(units.groups(), "dhms")
            if group is not None
        )
    raise ConfigError(f"time budget {original!r} is not a duration; {_HELP}")


def format_duration(seconds: float) -> str:
    """The inverse for log lines: 41400 -> "11h30m0s", 45.2 -> "45.2s"."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class TimeBudget:
    """A wall-clock budget started at construction, with the "is there time for one more
    trial?" rule the launcher applies before starting each trial.

    Example:
        .. code-block:: python

            budget = TimeBudget(8 * 3600, grace_period=120)
            while budget.allows_new_trial(durations):
                durations.append(run_one_trial())

    Args:
        seconds: The budget in seconds; ``> 0``. Use :func:`parse_duration` for ``"8h"``.
        grace_period: Seconds kept free at the end (to stop workers and write results);
            ``>= 0``.
        clock: Monotonic clock in seconds (for tests).

    Raises:
        ConfigError: ``seconds`` is not a positive number or ``grace_period`` is negative.
    """

    def __init__(
        self,
        seconds: float,
        *,
        grace_period: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
            raise ConfigError(
                f"time budget must be a positive number of seconds but got {seconds!r}."
            )
        if (
            not isinstance(grace_period, (int, float))
            or not math.isfinite(grace_period)
            or grace_period < 0
        ):
            raise ConfigError(f"grace_period cannot be negative but got {grace_period!r}.")
        self.seconds = float(seconds)
        self.grace_period = float(grace_period)
        self._clock = clock
        self._started = clock()

    def __repr__(self) -> str:
        return (
            f"TimeBudget(seconds={self.seconds:g}, grace_period={self.grace_period:g}, "
            f"remaining={self.remaining():.1f})"
        )

    def elapsed(self) -> float:
        return self._clock() - self._started

    def remaining(self) -> float:
        """Seconds left (negative once the budget is overrun)."""
        return self.seconds - self.elapsed()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def typical_trial_seconds(self, finished_durations: Sequence[float]) -> float | None:
        """The median of finished trials' durations (robust to a few very long or killed ones)."""
        durations = [
            float(d) for d in finished_durations if d is not None and math.isfinite(d) and d >= 0
        ]
        return statistics.median(durations) if durations else None

    def allows_new_trial(self, finished_durations: Sequence[float]) -> bool:
        """True when the time left exceeds a typical trial (median of ``finished_durations``)
        plus the grace period; with no history yet, when it exceeds the grace period."""
        typical = self.typical_trial_seconds(finished_durations) or 0.0
        return self.remaining() > typical + self.grace_period
