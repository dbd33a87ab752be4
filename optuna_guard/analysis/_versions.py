"""Objective versions and result-cache figures for reports and ``optuna-guard status``.

A study whose objective changed (``--allow-changed-objective``) holds trials of several
versions; their values measure different things, so reports show them per version with the
best trial of each, and the cache section says how many trials were served and the compute
time saved (the durations of the trials whose results were served).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from optuna_guard._best import best_valid
from optuna_guard.fingerprint import CURRENT_ATTR, VERSIONS_ATTR, trial_version
from optuna_guard.result_cache import CACHED_FROM, canonical_params


def study_versions(study: optuna.Study) -> tuple[int | None, list[dict[str, Any]]]:
    """(current version, version entries) from the study's system attrs."""
    attrs = study._storage.get_study_system_attrs(study._study_id)
    current = attrs.get(CURRENT_ATTR)
    return (None if current is None else int(current)), list(attrs.get(VERSIONS_ATTR) or [])


def objective_section(study: optuna.Study, trials: Sequence[FrozenTrial]) -> dict[str, Any]:
    """The fingerprint and, per objective version, trial counts and the best valid trial."""
    current, entries = study_versions(study)
    by_version: dict[int, list[FrozenTrial]] = defaultdict(list)
    for trial in trials:
        by_version[trial_version(trial)].append(trial)
    recorded = {int(e["version"]): e for e in entries}
    rows = []
    for version in sorted(set(by_version) | set(recorded)):
        members = by_version.get(version, [])
        entry = recorded.get(version, {})
        fingerprint = entry.get("fingerprint") or {}
        rows.append(
            {
                "version": version,
                "digest": fingerprint.get("digest"),
                "recorded_at": entry.get("recorded_at"),
                "n_trials": len(members),
                "complete": sum(t.state == TrialState.COMPLETE for t in members),
                "cached": sum(t.user_attrs.get(CACHED_FROM) is not None for t in members),
                "best": best_brief(study, members),
            }
        )
    return {"fingerprinted": bool(entries), "current_version": current, "versions": rows}


def best_brief(study: optuna.Study, trials: Sequence[FrozenTrial]) -> dict[str, Any] | None:
    """The best valid trial among ``trials`` (single objective; the rule of
    :mod:`optuna_guard._best`) as ``{number, value, params}``, or None."""
    if len(study.directions) != 1:
        return None
    top = best_valid(trials, study.directions).single
    if top is None:
        return None
    return {"number": top.number, "value": top.value, "params": dict(top.params)}


def cache_section(trials: Sequence[FrozenTrial]) -> dict[str, Any]:
    """Trials served from the cache, the compute time that saved, and configurations computed
    more than once (two workers proposing the same new configuration at the same time)."""
    by_number = {t.number: t for t in trials}
    served = [t for t in trials if t.user_attrs.get(CACHED_FROM) is not None]
    saved = 0.0
    for trial in served:
        origin = by_number.get(int(trial.user_attrs[CACHED_FROM]))
        if origin is not None and origin.duration is not None:
            saved += origin.duration.total_seconds()
    computed: dict[tuple[int, str], int] = defaultdict(int)
    for trial in trials:
        if trial.state == TrialState.COMPLETE and trial.user_attrs.get(CACHED_FROM) is None:
            computed[(trial_version(trial), canonical_params(trial.params))] += 1
    return {
        "served": len(served),
        "served_trials": [t.number for t in served][:100],
        "saved_s": round(saved, 3),
        "duplicates_computed": sum(n - 1 for n in computed.values()),
    }


def filter_trials(trials: Sequence[FrozenTrial], version: int | None) -> list[FrozenTrial]:
    """The trials of one objective version (all when ``version`` is None)."""
    return list(trials) if version is None else [t for t in trials if trial_version(t) == version]


def best_scope(section: dict[str, Any]) -> int | None:
    """The objective version the best valid trial is taken from: the one shown, else the
    current one when the study has several (their values measure different things), else all."""
    if section.get("filter") is not None:
        return int(section["filter"])
    if len(section["versions"]) > 1:
        current = section["current_version"]
        return None if current is None else int(current)
    return None


def status_section(
    study: optuna.Study, trials: Sequence[FrozenTrial], objective_version: int | str | None
) -> tuple[dict[str, Any], list[FrozenTrial]]:
    """``optuna-guard status``: the fingerprint, per-version counts and best, cache figures;
    and the trials the rest of the status shows (one version with ``--objective-version``)."""
    from optuna_guard.resume import resolve_version_filter

    section = objective_section(study, trials)
    version = resolve_version_filter(study, objective_version)
    shown = filter_trials(trials, version)
    current = next(
        (v for v in section["versions"] if v["version"] == section["current_version"]), None
    )
    section.update(
        filter=version, digest=current["digest"] if current else None, cache=cache_section(shown)
    )
    return section, shown


def status_lines(section: dict[str, Any] | None) -> list[str]:
    """The status lines of :func:`status_section`."""
    if not section or not (section["fingerprinted"] or len(section["versions"]) > 1):
        return []
    lines = [
        f"Objective version {section['current_version']} (fingerprint {(section['digest'] or '-')[:12]})"
        + (f"; showing version {section['filter']} only" if section["filter"] is not None else "")
    ]
    for row in section["versions"]:
        best = row["best"]
        best_text = f", best trial {best['number']} value {best['value']:.6g}" if best else ""
        lines.append(
            f"  version {row['version']}: {row['n_trials']} trials, {row['complete']} complete, "
            f"{row['cached']} from the cache{best_text}"
        )
    cache = section["cache"]
    if cache["served"] or cache["duplicates_computed"]:
        lines.append(
            f"Result cache: {cache['served']} trials served, {cache['saved_s']:.1f} s of compute saved, "
            f"{cache['duplicates_computed']} configurations computed twice"
        )
    return lines
