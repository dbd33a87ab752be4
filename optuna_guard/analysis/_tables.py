"""The report's tables and sentences as data, in the order they are shown.

``report_blocks`` turns ``build_report``'s dict into ``Table`` and ``Note`` objects holding plain,
unescaped text; the text renderer draws them as rich tables, the HTML renderer as ``<table>``
and ``<p>``. Both therefore show the same rows, columns, numbers and sentences, and a change to
a table is made once, here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from optuna_guard import tags

# A cell is one line of text, or several lines (a tuple) drawn one under the other.
Cell = str | tuple[str, ...]

STOP_TITLES = {
    tags.EMERGENCY_KILLED: "killed (memory)",
    tags.WORKER_CRASHED: "worker crashed",
    tags.PREEMPTED: "preempted",
    tags.DIVERGED: "diverged",
}


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    numeric: bool = False  # right-aligned


@dataclasses.dataclass(frozen=True)
class Table:
    """A titled table; ``empty`` is said instead of the table when it has no rows."""

    title: str
    columns: tuple[Column, ...]
    rows: Sequence[Sequence[Cell]]
    empty: str | None = None


@dataclasses.dataclass(frozen=True)
class Note:
    """A sentence between the tables; ``warn`` ones are highlighted."""

    text: str
    kind: Literal["plain", "note", "warn"] = "plain"


Block = Table | Note


def fmt(value: Any) -> str:
    """A cell value: ``-`` for None, floats to 4 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def params_text(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={fmt(v)}" for k, v in params.items()) or "-"


def _columns(*names: str, numeric: tuple[str, ...] = ()) -> tuple[Column, ...]:
    return tuple(Column(name, name in numeric) for name in names)


def report_blocks(report: Mapping[str, Any]) -> list[Block]:
    """Every table and sentence of the report (below its title line), in order."""
    blocks: list[Block] = [states_table(report), stopped_table(report)]
    best = best_table(report)
    if best is not None:
        blocks.append(best)
    blocks += best_notes(report)
    blocks.append(top_memory_table(report))
    if report["workers"] is not None:
        blocks.append(workers_table(report))
    objective = report.get("objective") or {}
    if objective.get("fingerprinted") or len(objective.get("versions", [])) > 1:
        blocks.append(versions_table(objective))
    blocks += other_notes(report)
    return blocks


def states_table(report: Mapping[str, Any]) -> Table:
    """Optuna's states beside the end states (the stop tags folded in)."""
    states = [(k, v) for k, v in report["trials_by_state"].items() if v]
    ends = [(k, v) for k, v in report["end_states"].items() if v]
    rows: list[tuple[Cell, ...]] = []
    for i in range(max(len(states), len(ends), 1)):
        s = states[i] if i < len(states) else ("", "")
        e = ends[i] if i < len(ends) else ("", "")
        rows.append((str(s[0]), str(s[1]), str(e[0]), str(e[1])))
    columns = (
        Column("Optuna state"),
        Column("trials", True),
        Column("end state"),
        Column("trials", True),
    )
    return Table("Trials by state", columns, rows)


def stopped_table(report: Mapping[str, Any]) -> Table:
    rows: list[tuple[Cell, ...]] = []
    for kind, info in report["stopped"].items():
        limits = [f"  {limit}: {n}" for limit, n in info["by_limit"].items()]
        why = (STOP_TITLES.get(kind, kind), *limits)
        reasons = tuple(f"{r['count']} x {r['reason']}" for r in info["top_reasons"]) or ("-",)
        rows.append((why, str(info["count"]), reasons))
    columns = _columns("why", "trials", "top reasons (numbers shown as N)", numeric=("trials",))
    return Table("Trials stopped early", columns, rows)


def best_table(report: Mapping[str, Any]) -> Table | None:
    """The best valid trial, or the Pareto front; None when there is none (a note says so)."""
    trials = report["best"]["trials"]
    if not trials:
        return None
    title = (
        "Best valid trial"
        if len(trials) == 1
        else f"Best valid trials (Pareto front, {len(trials)})"
    )
    rows: list[tuple[Cell, ...]] = [
        (
            str(t["number"]),
            ", ".join(fmt(v) for v in (t["values"] or [])),
            fmt(t["peak_rss_gb"]),
            params_text(t["params"]),
        )
        for t in trials
    ]
    columns = _columns("trial", "value(s)", "peak GB", "params", numeric=("trial", "peak GB"))
    return Table(title, columns, rows)


def best_notes(report: Mapping[str, Any]) -> list[Note]:
    """Why there is no best valid trial; stopped trials that had reported better values."""
    best = report["best"]
    notes = []
    if not best["trials"]:
        why = "no COMPLETE trial that was not stopped early"
        if best["constrained"] and best["valid_complete"]:
            why = "no valid COMPLETE trial within the constraints"
        notes.append(Note(f"Best valid trial: none ({why}).", "note"))
    for item in best["killed_with_better_intermediate"]:
        reason = f" - {item['kill_reason']}" if item["kill_reason"] else ""
        notes.append(
            Note(
                f"Trial {item['number']} ({item['end_state']}) reported "
                f"{fmt(item['intermediate_value'])} at step {item['step']}, better than the best "
                f"valid value {fmt(item['best_valid_value'])}{reason}",
                "warn",
            )
        )
    if best["trials"] and not best["killed_with_better_intermediate"]:
        notes.append(
            Note(
                "No killed, crashed or preempted trial reported a better intermediate value "
                "than the best valid trial.",
                "note",
            )
        )
    return notes


def top_memory_table(report: Mapping[str, Any]) -> Table:
    rows: list[tuple[Cell, ...]] = [
        (str(t["number"]), t["end_state"], fmt(t["peak_rss_gb"]), params_text(t["params"]))
        for t in report["top_memory"]
    ]
    columns = _columns("trial", "end state", "peak GB", "params", numeric=("trial", "peak GB"))
    return Table(
        f"Highest peak memory (top {len(rows)})",
        columns,
        rows,
        empty="no trial has a peak_rss_gb tag (was the objective guarded?)",
    )


def workers_table(report: Mapping[str, Any]) -> Table:
    rows: list[tuple[Cell, ...]] = [
        (
            str(w["worker_id"]),
            ", ".join(str(p) for p in w["pids"]),
            str(w["trials_started"]),
            str(w["kills"]),
            str(w["recycles"]),
            str(w["crashes"]),
            fmt(w["peak_rss_gb"]),
            fmt(w["mean_rss_gb"]),
        )
        for w in report["workers"] or []
    ]
    numbers = ("trials", "kills", "recycles", "crashes", "peak RSS GB", "mean RSS GB")
    columns = _columns("worker", "pids", *numbers, numeric=numbers)
    return Table("Memory per worker (event log)", columns, rows, empty="no worker events")


def versions_table(objective: Mapping[str, Any]) -> Table:
    """Objective versions with the best valid trial of each."""
    current = objective.get("current_version")
    title = "Objective versions" + (f" (current: {current})" if current is not None else "")
    if objective.get("filter") is not None:
        title += f" - report limited to version {objective['filter']}"
    elif objective.get("best_from_version") is not None:
        title += f" - best valid trial above is from version {objective['best_from_version']}"
    rows: list[tuple[Cell, ...]] = []
    for row in objective.get("versions", []):
        best = row.get("best") or {}
        rows.append(
            (
                str(row["version"]),
                (row.get("digest") or "-")[:12],
                fmt(row.get("recorded_at")),
                str(row["n_trials"]),
                str(row["complete"]),
                str(row["cached"]),
                fmt(best.get("number")),
                fmt(best.get("value")),
            )
        )
    numbers = ("version", "trials", "complete", "cached", "best trial", "best value")
    columns = _columns(
        "version",
        "fingerprint",
        "recorded",
        "trials",
        "complete",
        "cached",
        "best trial",
        "best value",
        numeric=numbers,
    )
    return Table(title, columns, rows)


def other_notes(report: Mapping[str, Any]) -> list[Note]:
    """Memory constraint, result cache and retries, each when it applies."""
    notes = []
    constraint = report["memory_constraint"]
    if constraint["trials_with_constraint"]:
        notes.append(
            Note(
                f"Memory constraint: {constraint['trials_with_constraint']} trials carry one, "
                f"{constraint['infeasible']} over the budget."
            )
        )
    cache = report.get("cache") or {}
    if cache.get("served"):
        notes.append(
            Note(
                f"Result cache: {cache['served']} trials served from earlier results, "
                f"{fmt(cache['saved_s'])} s of compute saved."
            )
        )
    if cache.get("duplicates_computed"):
        notes.append(
            Note(
                f"{cache['duplicates_computed']} configurations were computed more than once "
                "(proposed again before the first run finished, or without --cache)."
            )
        )
    retries = report["retries"]
    if retries["count"]:
        notes.append(
            Note(
                f"Retries: {retries['count']} trials retry an earlier one ({retries['shrunk']} "
                f"with shrunk params, {retries['exhausted']} retry chains exhausted)."
            )
        )
    return notes
