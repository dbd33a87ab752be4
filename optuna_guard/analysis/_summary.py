"""The content of ``optuna-guard report`` as plain data: one dict that all renderers draw.

Text, JSON and HTML show the same facts because they all render what ``build_report`` returns.
The dict is JSON-ready (numbers, strings, lists, None); its schema is ``REPORT_SCHEMA`` below and
docs/analysis.md, and ``REPORT_VERSION`` changes when a key changes meaning or goes away.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from optuna_guard import __version__, tags
from optuna_guard._best import best_valid
from optuna_guard.analysis import _classify, _timeline, _versions
from optuna_guard.oom_aware._peak_model import observed_peak
from optuna_guard.oom_aware.constraints import memory_constraint

REPORT_SCHEMA = "optuna-guard-report"
REPORT_VERSION = 1
TOP_MEMORY = 5
TOP_REASONS = 3

# Top-level keys of a report, in order (a test checks them; docs/analysis.md describes each).
REPORT_KEYS = (
    "schema",
    "version",
    "generated_at",
    "optuna_guard_version",
    "study",
    "trials_by_state",
    "end_states",
    "stopped",
    "retries",
    "memory_constraint",
    "best",
    "top_memory",
    "workers",
    "event_log",
    "plots",
    "objective",
    "cache",
)
STOP_KINDS = (tags.EMERGENCY_KILLED, tags.WORKER_CRASHED, tags.PREEMPTED, tags.DIVERGED)
_STOPPED_EARLY = (_classify.KILLED, _classify.CRASHED, _classify.PREEMPTED)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def build_report(
    study: optuna.Study,
    *,
    events: Sequence[Mapping[str, Any]] | None = None,
    event_log_path: str | None = None,
    objective_version: int | str | None = None,
) -> dict[str, Any]:
    """Everything a report shows about ``study`` (and the launcher's ``events`` when given).

    ``objective_version`` (a number or "current") limits the report to one objective version;
    by default every version is shown, with the best trial of each in ``objective``, and
    ``best`` is taken from the current version when the study has several.
    """
    from optuna_guard.resume import resolve_version_filter

    all_trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    version = resolve_version_filter(study, objective_version)
    trials = _versions.filter_trials(all_trials, version)
    objective = _versions.objective_section(study, all_trials)
    objective["filter"] = version
    best_version = _versions.best_scope(objective)
    objective["best_from_version"] = best_version
    by_number = {t.number: t for t in trials}
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "version": REPORT_VERSION,
        "generated_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "optuna_guard_version": __version__,
        "study": _study_info(study, trials),
        "trials_by_state": _count_states(trials),
        "end_states": _count_end_states(trials),
        "stopped": {kind: _stopped(trials, kind) for kind in STOP_KINDS},
        "retries": _retries(trials),
        "memory_constraint": _constraints(trials),
        "best": _best(study, _versions.filter_trials(trials, best_version)),
        "top_memory": _top_memory(trials),
        "workers": _timeline.worker_memory(events) if events is not None else None,
        "event_log": _event_log_info(events, event_log_path),
        "plots": _plots(trials, by_number, events),
        "objective": objective,
        "cache": _versions.cache_section(trials),
    }
    plain: dict[str, Any] = _jsonable(report)
    return plain


def _study_info(study: optuna.Study, trials: Sequence[FrozenTrial]) -> dict[str, Any]:
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    ends = [t.datetime_complete for t in trials if t.datetime_complete is not None]
    return {
        "name": study.study_name,
        "directions": [d.name.lower() for d in study.directions],
        "metric_names": study.metric_names,
        "n_trials": len(trials),
        "first_start": min(starts).astimezone().isoformat(timespec="seconds") if starts else None,
        "last_complete": max(ends).astimezone().isoformat(timespec="seconds") if ends else None,
    }


def _count_states(trials: Iterable[FrozenTrial]) -> dict[str, int]:
    counts = {state.name: 0 for state in TrialState}
    for trial in trials:
        counts[trial.state.name] += 1
    return counts


def _count_end_states(trials: Iterable[FrozenTrial]) -> dict[str, int]:
    counts = {state: 0 for state in _classify.END_STATES}
    for trial in trials:
        counts[_classify.end_state(trial)] += 1
    return counts


def reason_pattern(reason: str) -> str:
    """A kill reason with its numbers replaced by N, so similar reasons group together."""
    return _NUMBER.sub("N", reason.strip())


def _stopped(trials: Sequence[FrozenTrial], tag: str) -> dict[str, Any]:
    hit = [t for t in trials if t.user_attrs.get(tag)]
    patterns: Counter[str] = Counter()
    example: dict[str, tuple[str, int]] = {}
    by_limit: Counter[str] = Counter()
    for trial in hit:
        reason = str(trial.user_attrs.get(tags.KILL_REASON) or "(no reason recorded)")
        pattern = reason_pattern(reason)
        patterns[pattern] += 1
        example.setdefault(pattern, (reason, trial.number))
        if tag == tags.EMERGENCY_KILLED:
            by_limit[str(trial.user_attrs.get(tags.KILL_LIMIT) or "unknown")] += 1
    return {
        "count": len(hit),
        "trials": [t.number for t in hit],
        "by_state": dict(Counter(t.state.name for t in hit)),
        "by_limit": dict(by_limit.most_common()),
        "top_reasons": [
            {
                "reason": pattern,
                "count": count,
                "example": example[pattern][0],
                "example_trial": example[pattern][1],
            }
            for pattern, count in patterns.most_common(TOP_REASONS)
        ],
    }


def _retries(trials: Sequence[FrozenTrial]) -> dict[str, Any]:
    retried = [t for t in trials if _classify.retry_origin(t) is not None]
    return {
        "count": len(retried),
        "trials": [{"number": t.number, "retry_of": _classify.retry_origin(t)} for t in retried],
        "shrunk": sum(bool(t.user_attrs.get(tags.RETRY_SHRUNK)) for t in trials),
        "exhausted": sum(bool(t.user_attrs.get(tags.RETRIES_EXHAUSTED)) for t in trials),
    }


def _constraints(trials: Sequence[FrozenTrial]) -> dict[str, Any]:
    values = [(t, memory_constraint(t)) for t in trials]
    with_value = [(t, v) for t, v in values if v is not None]
    return {
        "trials_with_constraint": len(with_value),
        "infeasible": sum(v > 0 for _, v in with_value),
        "infeasible_trials": [t.number for t, v in with_value if v > 0],
    }


def _best(study: optuna.Study, trials: Sequence[FrozenTrial]) -> dict[str, Any]:
    """Best valid trial(s), by the one rule in :mod:`optuna_guard._best`."""
    directions = list(study.directions)
    found = best_valid(trials, directions)
    return {
        "valid_complete": found.valid,
        "constrained": found.constrained,
        "feasible_complete": found.feasible,
        "trials": [_trial_brief(t) for t in found.trials],
        "killed_with_better_intermediate": _stopped_with_better_intermediate(
            trials, found.trials, directions
        ),
    }


def _stopped_with_better_intermediate(
    trials: Sequence[FrozenTrial],
    best: Sequence[FrozenTrial],
    directions: Sequence[StudyDirection],
) -> list[dict[str, Any]]:
    """Killed/crashed/preempted trials whose best reported value beat the best valid value."""
    if len(directions) != 1 or not best:
        return []
    minimize = directions[0] == StudyDirection.MINIMIZE
    target = cast(float, best[0].value)  # a valid COMPLETE single-objective trial has one
    found = []
    for trial in trials:
        if _classify.end_state(trial) not in _STOPPED_EARLY or not trial.intermediate_values:
            continue
        finite = [(step, v) for step, v in trial.intermediate_values.items() if math.isfinite(v)]
        if not finite:
            continue
        step, value = (min if minimize else max)(finite, key=lambda item: item[1])
        if (value < target) if minimize else (value > target):
            found.append(
                {
                    "number": trial.number,
                    "end_state": _classify.end_state(trial),
                    "step": step,
                    "intermediate_value": value,
                    "best_valid_value": target,
                    "kill_reason": trial.user_attrs.get(tags.KILL_REASON),
                }
            )
    return found


def _trial_brief(trial: FrozenTrial) -> dict[str, Any]:
    return {
        "number": trial.number,
        "values": list(trial.values) if trial.values is not None else None,
        "params": dict(trial.params),
        "peak_rss_gb": trial.user_attrs.get(tags.PEAK_RSS_GB),
        "duration_s": trial.duration.total_seconds() if trial.duration is not None else None,
        "constraint_memory": memory_constraint(trial),
    }


def _top_memory(trials: Sequence[FrozenTrial]) -> list[dict[str, Any]]:
    with_peak = [(t, _peak(t)) for t in trials]
    ranked = sorted(
        ((t, p) for t, p in with_peak if p is not None),
        key=lambda item: (-item[1], item[0].number),
    )
    return [
        {
            "number": t.number,
            "state": t.state.name,
            "end_state": _classify.end_state(t),
            "peak_rss_gb": p,
            "kill_reason": t.user_attrs.get(tags.KILL_REASON),
            "params": dict(t.params),
        }
        for t, p in ranked[:TOP_MEMORY]
    ]


def _peak(trial: FrozenTrial) -> float | None:
    """The measured peak; None for trials the pre-flight check pruned (they never ran)."""
    return observed_peak(trial)


def _event_log_info(
    events: Sequence[Mapping[str, Any]] | None, path: str | None
) -> dict[str, Any] | None:
    if events is None:
        return None
    return {
        "path": path,
        "events": len(events),
        "first_ts": events[0]["ts"] if events else None,
        "last_ts": events[-1]["ts"] if events else None,
        "by_event": _timeline.count_events(events),
    }


def _plots(
    trials: Sequence[FrozenTrial],
    by_number: Mapping[int, FrozenTrial],
    events: Sequence[Mapping[str, Any]] | None,
) -> dict[str, Any]:
    """The data the HTML plots draw (also useful to JSON consumers)."""
    numeric: dict[str, bool] = {}  # param name -> log scale
    categorical: list[str] = []
    for trial in trials:
        for name, dist in trial.distributions.items():
            if isinstance(dist, (FloatDistribution, IntDistribution)):
                numeric[name] = numeric.get(name, False) or bool(dist.log)
            elif isinstance(dist, CategoricalDistribution) and name not in categorical:
                categorical.append(name)
    points = [
        {
            "number": t.number,
            "end_state": _classify.end_state(t),
            "peak_rss_gb": p,
            "params": dict(t.params),
        }
        for t in trials
        if (p := _peak(t)) is not None
    ]
    has_trial_events = events is not None and any(e["event"] == "trial_started" for e in events)
    segments = (
        _timeline.event_segments(events, by_number)
        if events is not None and has_trial_events
        else _timeline.storage_segments(trials)
    )
    return {
        "numeric_params": [{"name": name, "log": log} for name, log in numeric.items()],
        "categorical_params": categorical,
        "memory_points": points,
        "timeline_source": "event_log" if has_trial_events else "storage",
        "timeline": segments,
        "markers": _timeline.markers(events) if events is not None else [],
        "memory_samples": _timeline.memory_samples(events) if events is not None else [],
    }


def _jsonable(value: Any) -> Any:
    """Plain JSON types only: NaN/inf become None, tuples lists, numpy scalars Python numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):  # numpy scalar
        return _jsonable(value.item())
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    return str(value)
