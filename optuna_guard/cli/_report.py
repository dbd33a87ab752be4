"""`optuna-guard report`: what happened in a study (text, JSON or self-contained HTML).

Reads only: the study is loaded through ``storage.open_for_reading`` (never created, the storage
is not written to).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from optuna_guard._logging import get_logger
from optuna_guard.exceptions import ConfigError

_log = get_logger(__name__)

FORMATS = ("text", "json", "html")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="report killed/crashed trials, best valid trial, memory per trial and worker",
        description=(
            "Summarise a study: trials by state, kills/crashes/preemptions and their reasons, "
            "the best valid trial, the trials with the highest peak memory, memory per worker "
            "(with --event-log). --format html writes one self-contained file with plots."
        ),
    )
    parser.add_argument("--study-name", required=True, help="name of the study to report on")
    parser.add_argument(
        "--storage",
        default=None,
        help="storage URL (default: sqlite file optuna_guard.db in the current directory)",
    )
    parser.add_argument(
        "--format", choices=FORMATS, default="text", help="output format (default: text)"
    )
    parser.add_argument(
        "-o", "--output", default=None, metavar="FILE", help="write to FILE instead of stdout"
    )
    parser.add_argument(
        "--event-log",
        default=None,
        metavar="FILE",
        help="the launcher's event log (events.jsonl): adds memory per worker and the worker timeline",
    )
    parser.add_argument(
        "--objective-version",
        type=_version_option,
        default=None,
        metavar="current|all|N",
        help="report one objective version only (default all, shown per version)",
    )
    parser.set_defaults(func=run)


def _version_option(text: str) -> Any:
    from optuna_guard.resume import version_option

    return version_option(text)


def run(args: argparse.Namespace) -> int:
    from optuna_guard.analysis import build_report, render_html, render_json
    from optuna_guard.analysis._render_text import print_report, render_text
    from optuna_guard.analysis._timeline import load_events
    from optuna_guard.storage import open_for_reading

    if args.output is not None:
        directory = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(directory):
            raise ConfigError(
                f"output directory {directory!r} does not exist; create it or choose another -o FILE."
            )
    events = load_events(args.event_log) if args.event_log is not None else None
    study = open_for_reading(args.storage, args.study_name)
    report = build_report(
        study,
        events=events,
        event_log_path=args.event_log,
        objective_version=getattr(args, "objective_version", None),
    )

    if args.format == "json":
        content = render_json(report)
    elif args.format == "html":
        content = render_html(report)
    elif args.output is not None:
        content = render_text(report)
    else:
        from rich.console import Console

        print_report(report, Console())
        return 0
    if args.output is None:
        sys.stdout.write(content)
    else:
        try:
            with open(args.output, "w", encoding="utf-8") as handle:
                handle.write(content)
        except OSError as exc:
            print(
                f"optuna-guard report: error: cannot write {args.output!r}: {exc.strerror or exc}.",
                file=sys.stderr,
            )
            return 1
        _log.info(
            "Report on study %r written to %s (%s).", args.study_name, args.output, args.format
        )
    return 0
