"""LaunchSummary: what a launch did, returned by :func:`launch` and printed by the CLI."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from optuna.study import StudyDirection
from optuna.trial import FrozenTrial

from optuna_guard._best import best_valid_trials


@dataclasses.dataclass(frozen=True, kw_only=True)
class LaunchSummary:
    """Counts are over the trials this launch's workers ran (other hosts' trials not included).

    The launcher builds it; each argument below is also a read-only attribute, and ``complete``,
    ``pruned`` and ``failed`` read their counts from ``states``.

    Args:
        study_name: the study the launch ran.
        storage: the storage URL, password masked.
        exit_code: 0 done, 99 stopped by a signal or the time budget (the CLI exits with it).
        n_trials: the target T (None: run until stopped).
        finished: trials that reached a terminal state (== T on a normal finish).
        states: end-state name -> count, e.g. {"COMPLETE": 37, "PRUNED": 2, "FAIL": 1}.
        emergency_killed: trials tagged emergency_killed (by the supervisor or the in-trial guard).
        kills: hard kills of workers by the supervisor (memory).
        crashes: workers that died by themselves (under a trial or not).
        recycles: workers told to exit between trials (age, trial count, RSS after a trial).
        preempted: trials ended ``preempted`` (signal or time budget).
        retries: retry trials enqueued for killed/crashed/preempted trials.
        skipped_for_time: trials of T not started because the time budget could not fit them
            (without T: tickets refused for time).
        worker_starts: worker processes started (replacements included).
        stop_reason: why the launch stopped early, or None.
        duration_s: wall time of the launch.
        best_value: the value of the study's best valid trial at the end (single objective;
            the rule of :mod:`optuna_guard._best`, as ``status`` and ``report``), or None.
        best_trials: the number of that trial, or the Pareto front's (several objectives).
        event_log: the path of the launch's event log (JSON lines), or None when no worker
            was started.
    """

    study_name: str
    storage: str
    exit_code: int
    n_trials: int | None
    finished: int
    states: dict[str, int]
    emergency_killed: int = 0
    kills: int = 0
    crashes: int = 0
    recycles: int = 0
    preempted: int = 0
    retries: int = 0
    skipped_for_time: int = 0
    worker_starts: int = 0
    stop_reason: str | None = None
    duration_s: float = 0.0
    best_value: float | None = None
    best_trials: tuple[int, ...] = ()
    event_log: str | None = None

    @property
    def complete(self) -> int:
        return self.states.get("COMPLETE", 0)

    @property
    def pruned(self) -> int:
        return self.states.get("PRUNED", 0)

    @property
    def failed(self) -> int:
        return self.states.get("FAIL", 0)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        states = (
            ", ".join(f"{name.lower()} {count}" for name, count in sorted(self.states.items()))
            or "none"
        )
        target = "" if self.n_trials is None else f"/{self.n_trials}"
        text = (
            f"Study {self.study_name!r}: {self.finished}{target} trials finished ({states}); "
            f"emergency-killed {self.emergency_killed}, worker kills {self.kills}, crashes {self.crashes}, "
            f"recycles {self.recycles}, preempted {self.preempted}, retries {self.retries}, "
            f"skipped for time {self.skipped_for_time}; {self.worker_starts} worker starts in "
            f"{self.duration_s:.1f}s; exit code {self.exit_code}"
        )
        if self.best_value is not None:
            text += f"; best value {self.best_value:.6g}"
            if self.best_trials:
                text += f" (trial {self.best_trials[0]})"
        elif self.best_trials:
            text += f"; Pareto front: trials {', '.join(map(str, self.best_trials))}"
        if self.stop_reason:
            text += f"; stopped: {self.stop_reason}"
        return text + "."


def best_of(
    trials: Iterable[FrozenTrial], directions: Sequence[StudyDirection]
) -> tuple[float | None, tuple[int, ...]]:
    """``(best_value, best_trials)`` for a summary: the study's best valid trial(s)."""
    best = best_valid_trials(trials, directions)
    value = best[0].value if len(directions) == 1 and best else None
    return value, tuple(t.number for t in best)
