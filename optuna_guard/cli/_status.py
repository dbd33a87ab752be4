"""``optuna-guard status``: what a study looks like now, from the storage alone.

    optuna-guard status --study-name NAME [--storage URL] [--json]

Trials by state; emergency-killed, crashed and preempted counts with their reasons; the
running trials with worker, pid and host (so a stuck or zombie trial is easy to spot).
Exit codes: 0, 2 (unknown study, unreachable storage).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
from typing import Any


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "status",
        help="trials by state, kills/crashes with reasons, running trials with worker and host",
        description="Show a study's trials by state, killed/crashed/preempted trials with reasons, and running trials.",
    )
    parser.add_argument("--study-name", required=True, metavar="NAME")
    parser.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="storage URL: database, journal:///file.log, redis://host:port/db or grpc://host:port "
        "(default: SQLite file optuna_guard.db in the current directory)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of tables"
    )
    parser.add_argument(
        "--objective-version",
        type=_version_option,
        default=None,
        metavar="current|all|N",
        help="count only one objective version's trials (default all)",
    )
    parser.set_defaults(func=run)


def _version_option(text: str) -> Any:
    from optuna_guard.resume import version_option

    return version_option(text)


def collect_status(study: Any, objective_version: Any = None) -> dict[str, Any]:
    """The status of a study as plain data (what --json prints; the tables show the same)."""
    from optuna.trial import TrialState

    from optuna_guard import tags
    from optuna_guard._best import best_valid
    from optuna_guard.analysis import _versions

    trials = study.get_trials(deepcopy=False)
    objective, trials = _versions.status_section(study, trials, objective_version)
    by_state = collections.Counter(t.state.name for t in trials)
    killed = [t for t in trials if t.user_attrs.get(tags.EMERGENCY_KILLED)]
    crashed = [t for t in trials if t.user_attrs.get(tags.WORKER_CRASHED)]
    preempted = [t for t in trials if t.user_attrs.get(tags.PREEMPTED)]
    now = dt.datetime.now()
    running = []
    for t in trials:
        if t.state != TrialState.RUNNING:
            continue
        started = t.datetime_start
        running.append(
            {
                "number": t.number,
                "worker_id": t.user_attrs.get(tags.WORKER_ID),
                "worker_pid": t.user_attrs.get(tags.WORKER_PID),
                "hostname": t.user_attrs.get(tags.HOSTNAME),
                "started": started.isoformat(timespec="seconds") if started else None,
                "running_s": round((now - started).total_seconds(), 1) if started else None,
            }
        )
    best_from_version = _versions.best_scope(objective)
    found = best_valid(_versions.filter_trials(trials, best_from_version), study.directions)
    return {
        "study_name": study.study_name,
        "directions": [d.name.lower() for d in study.directions],
        "n_trials": len(trials),
        "states": dict(sorted(by_state.items())),
        "best": _brief(found.single, values=False) if len(study.directions) == 1 else None,
        "best_trials": [_brief(t, values=True) for t in found.trials],
        "best_from_version": best_from_version,
        "emergency_killed": len(killed),
        "killed_by_limit": _reasons(killed, by_limit=True),
        "crashed": len(crashed),
        "crash_reasons": _reasons(crashed, by_limit=False),
        "preempted": len(preempted),
        "running": running,
        "objective": objective,
    }


def _brief(trial: Any, *, values: bool) -> dict[str, Any] | None:
    if trial is None:
        return None
    value: dict[str, Any] = {"values": list(trial.values)} if values else {"value": trial.value}
    return {"number": trial.number, **value, "params": dict(trial.params)}


def _reasons(trials: list[Any], *, by_limit: bool) -> list[dict[str, Any]]:
    from optuna_guard import tags

    groups: dict[str, list[Any]] = collections.defaultdict(list)
    for t in trials:
        reason = str(t.user_attrs.get(tags.KILL_REASON, "no reason recorded"))
        key = (
            str(t.user_attrs.get(tags.KILL_LIMIT) or reason.split(":")[0]) if by_limit else reason
        )
        groups[key].append(t)
    rows = []
    for key, members in sorted(groups.items(), key=lambda item: -len(item[1])):
        last = max(members, key=lambda t: t.number)
        rows.append(
            {
                "reason": key,
                "count": len(members),
                "example": str(last.user_attrs.get(tags.KILL_REASON, "")),
                "trials": sorted(t.number for t in members)[-10:],
            }
        )
    return rows


def run(args: argparse.Namespace) -> int:
    from optuna_guard.storage import mask_url, open_for_reading, resolve_url

    url = resolve_url(args.storage)
    study = open_for_reading(url, args.study_name)
    status = collect_status(study, getattr(args, "objective_version", None))
    status["storage"] = mask_url(url)
    if args.json:
        print(json.dumps(status, default=str))
    else:
        _print_tables(status)
    return 0


def _best_lines(status: dict[str, Any]) -> list[str]:
    """The best valid trial (or Pareto front), by the rule of :mod:`optuna_guard._best`."""
    scope = status["best_from_version"]
    where = f" (objective version {scope})" if scope is not None else ""
    best, front = status["best"], status["best_trials"]
    if best:
        return [
            f"Best valid trial {best['number']}{where}: value {best['value']:.6g}, "
            f"params {best['params']}"
        ]
    if front:
        numbers = ", ".join(str(t["number"]) for t in front)
        return [f"Best valid trials (Pareto front){where}: {numbers}"]
    return [f"Best valid trial{where}: none (no COMPLETE, untagged, feasible trial)"]


def _print_tables(status: dict[str, Any]) -> None:
    import sys

    from rich.console import Console

    from optuna_guard.analysis._render_text import rich_table

    # Not a terminal (a pipe, a log file): wide enough that reasons are not cut or wrapped.
    # Plain lines (markup=False): a study name or a reason may contain "[...]".
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
    states = (
        ", ".join(f"{name} {count}" for name, count in status["states"].items()) or "no trials"
    )
    console.print(
        f"Study {status['study_name']!r} ({','.join(status['directions'])}) in {status['storage']}: "
        f"{status['n_trials']} trials - {states}",
        markup=False,
    )
    for line in _best_lines(status):
        console.print(line, markup=False)
    from optuna_guard.analysis._versions import status_lines

    for line in status_lines(status.get("objective")):
        console.print(line, markup=False)
    console.print(
        f"Emergency-killed: {status['emergency_killed']}   Crashed: {status['crashed']}   "
        f"Preempted: {status['preempted']}"
    )
    for table in _tables(status):
        console.print(rich_table(table))
    if not status["running"]:
        console.print("Running trials: none", markup=False)


def _tables(status: dict[str, Any]) -> list[Any]:
    """Kills and crashes by reason, running trials: as the report's tables (``analysis._tables``)."""
    from optuna_guard.analysis._tables import Column, Table

    tables = []
    columns = (Column("reason"), Column("count", True), Column("last trials"), Column("example"))
    for title, rows in (
        ("Killed trials by limit", status["killed_by_limit"]),
        ("Crashed trials by reason", status["crash_reasons"]),
    ):
        if rows:
            cells = [
                (r["reason"], str(r["count"]), " ".join(map(str, r["trials"])), r["example"])
                for r in rows
            ]
            tables.append(Table(title, columns, cells))
    if status["running"]:
        names = ("trial", "worker", "pid", "host", "started", "running for")
        running = [
            (
                str(r["number"]),
                str(r["worker_id"]),
                str(r["worker_pid"]),
                str(r["hostname"]),
                str(r["started"]),
                f"{r['running_s']:.0f}s" if r["running_s"] is not None else "?",
            )
            for r in status["running"]
        ]
        tables.append(Table("Running trials", tuple(Column(n) for n in names), running))
    return tables
