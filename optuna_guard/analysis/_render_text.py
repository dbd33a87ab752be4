"""The text report: rich tables drawn from ``build_report``'s dict."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from optuna_guard import tags

_STOP_TITLES = {
    tags.EMERGENCY_KILLED: "killed (memory)",
    tags.WORKER_CRASHED: "worker crashed",
    tags.PREEMPTED: "preempted",
    tags.DIVERGED: "diverged",
}


def render_text(report: Mapping[str, Any], *, width: int = 110) -> str:
    """The report as plain text (no colour codes), e.g. for a file."""
    buffer = io.StringIO()
    console = Console(
        file=buffer, width=width, color_system=None, force_terminal=False, highlight=False
    )
    print_report(report, console)
    return buffer.getvalue()


def print_report(report: Mapping[str, Any], console: Console) -> None:
    """Print the report's tables on ``console`` (colours when it is a terminal)."""
    study = report["study"]
    directions = ", ".join(study["directions"])
    console.print(
        f"[bold]Study {escape(study['name'])}[/bold]: {study['n_trials']} trials ({directions})"
    )
    if study["first_start"]:
        console.print(f"from {study['first_start']} to {study['last_complete'] or 'now'}")
    console.print(_states_table(report))
    console.print(_stopped_table(report))
    for line in _best_lines(report):
        console.print(line)
    if report["best"]["trials"]:
        console.print(_best_table(report))
    console.print(_top_memory_table(report))
    if report["workers"] is not None:
        console.print(_workers_table(report))
    constraint = report["memory_constraint"]
    if constraint["trials_with_constraint"]:
        console.print(
            f"Memory constraint: {constraint['trials_with_constraint']} trials carry one, "
            f"{constraint['infeasible']} over the budget."
        )
    for line in _cache_lines(report):
        console.print(line)
    objective = report.get("objective") or {}
    if objective.get("fingerprinted") or len(objective.get("versions", [])) > 1:
        console.print(_versions_table(objective))
    retries = report["retries"]
    if retries["count"]:
        console.print(
            f"Retries: {retries['count']} trials retry an earlier one "
            f"({retries['shrunk']} with shrunk params, {retries['exhausted']} retry chains exhausted)."
        )


def _states_table(report: Mapping[str, Any]) -> Table:
    table = Table(title="Trials by state")
    table.add_column("Optuna state")
    table.add_column("trials", justify="right")
    table.add_column("end state")
    table.add_column("trials", justify="right")
    states = [(k, v) for k, v in report["trials_by_state"].items() if v]
    ends = [(k, v) for k, v in report["end_states"].items() if v]
    for i in range(max(len(states), len(ends), 1)):
        s = states[i] if i < len(states) else ("", "")
        e = ends[i] if i < len(ends) else ("", "")
        table.add_row(str(s[0]), str(s[1]), str(e[0]), str(e[1]))
    return table


def _stopped_table(report: Mapping[str, Any]) -> Table:
    table = Table(title="Trials stopped early")
    table.add_column("why")
    table.add_column("trials", justify="right")
    table.add_column("top reasons (numbers shown as N)")
    for kind, info in report["stopped"].items():
        reasons = (
            "\n".join(f"{r['count']} x {escape(r['reason'])}" for r in info["top_reasons"]) or "-"
        )
        title = _STOP_TITLES.get(kind, kind)
        if kind == tags.EMERGENCY_KILLED and info["by_limit"]:
            title += "".join(f"\n  {escape(limit)}: {n}" for limit, n in info["by_limit"].items())
        table.add_row(title, str(info["count"]), reasons)
    return table


def _best_lines(report: Mapping[str, Any]) -> list[str]:
    best = report["best"]
    lines = []
    if not best["trials"]:
        why = "no COMPLETE trial that was not killed"
        if best["constrained"] and best["valid_complete"]:
            why = "no valid COMPLETE trial within the memory constraint"
        lines.append(f"Best valid trial: none ({why}).")
    for item in best["killed_with_better_intermediate"]:
        lines.append(
            f"[yellow]Trial {item['number']} ({item['end_state']}) reported {_fmt(item['intermediate_value'])} "
            f"at step {item['step']}, better than the best valid value {_fmt(item['best_valid_value'])}[/yellow]"
            + (f" - {escape(str(item['kill_reason']))}" if item["kill_reason"] else "")
        )
    if best["trials"] and not best["killed_with_better_intermediate"]:
        lines.append(
            "No killed, crashed or preempted trial reported a better intermediate value than the best valid trial."
        )
    return lines


def _best_table(report: Mapping[str, Any]) -> Table:
    best = report["best"]
    title = (
        "Best valid trial"
        if len(best["trials"]) == 1
        else f"Best valid trials (Pareto front, {len(best['trials'])})"
    )
    table = Table(title=title)
    table.add_column("trial", justify="right")
    table.add_column("value(s)")
    table.add_column("peak GB", justify="right")
    table.add_column("params")
    for item in best["trials"]:
        values = ", ".join(_fmt(v) for v in (item["values"] or []))
        table.add_row(
            str(item["number"]), values, _fmt(item["peak_rss_gb"]), _params(item["params"])
        )
    return table


def _cache_lines(report: Mapping[str, Any]) -> list[str]:
    cache = report.get("cache") or {}
    lines = []
    if cache.get("served"):
        lines.append(
            f"Result cache: {cache['served']} trials served from earlier results, "
            f"{_fmt(cache['saved_s'])} s of compute saved."
        )
    if cache.get("duplicates_computed"):
        lines.append(
            f"{cache['duplicates_computed']} configurations were computed more than once "
            "(proposed again before the first run finished, or without --cache)."
        )
    return lines


def _versions_table(objective: Mapping[str, Any]) -> Table:
    current = objective.get("current_version")
    shown = objective.get("filter")
    title = "Objective versions" + (f" (current: {current})" if current is not None else "")
    if shown is not None:
        title += f" - report limited to version {shown}"
    elif objective.get("best_from_version") is not None:
        title += f" - best valid trial above is from version {objective['best_from_version']}"
    table = Table(title=title)
    for name in (
        "version",
        "fingerprint",
        "recorded",
        "trials",
        "complete",
        "cached",
        "best trial",
        "best value",
    ):
        table.add_column(
            name,
            justify="right"
            if name in ("version", "trials", "complete", "cached", "best trial")
            else "left",
        )
    for row in objective.get("versions", []):
        best = row.get("best") or {}
        table.add_row(
            str(row["version"]),
            (row.get("digest") or "-")[:12],
            escape(str(row.get("recorded_at") or "-")),
            str(row["n_trials"]),
            str(row["complete"]),
            str(row["cached"]),
            str(best.get("number", "-")),
            _fmt(best.get("value")),
        )
    return table


def _top_memory_table(report: Mapping[str, Any]) -> Table:
    table = Table(title=f"Highest peak memory (top {len(report['top_memory'])})")
    table.add_column("trial", justify="right")
    table.add_column("end state")
    table.add_column("peak GB", justify="right")
    table.add_column("params")
    if not report["top_memory"]:
        table.add_row("-", "no trial has a peak_rss_gb tag", "", "")
    for item in report["top_memory"]:
        table.add_row(
            str(item["number"]),
            item["end_state"],
            _fmt(item["peak_rss_gb"]),
            _params(item["params"]),
        )
    return table


def _workers_table(report: Mapping[str, Any]) -> Table:
    table = Table(title="Memory per worker (event log)")
    for name in (
        "worker",
        "pids",
        "trials",
        "kills",
        "recycles",
        "crashes",
        "peak RSS GB",
        "mean RSS GB",
    ):
        table.add_column(name, justify="left" if name in ("worker", "pids") else "right")
    if not report["workers"]:
        table.add_row("-", "no worker events", "", "", "", "", "", "")
    for w in report["workers"]:
        table.add_row(
            escape(str(w["worker_id"])),
            escape(", ".join(str(p) for p in w["pids"])),
            str(w["trials_started"]),
            str(w["kills"]),
            str(w["recycles"]),
            str(w["crashes"]),
            _fmt(w["peak_rss_gb"]),
            _fmt(w["mean_rss_gb"]),
        )
    return table


def _params(params: Mapping[str, Any]) -> str:
    return escape(", ".join(f"{k}={_fmt(v)}" for k, v in params.items())) or "-"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
