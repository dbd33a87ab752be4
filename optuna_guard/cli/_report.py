"""`optuna-guard report`: what happened in a study (text, JSON or self-contained HTML).

Reads only: the study is loaded, never created, and the storage is not written to.
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
CONNECT_TIMEOUT_S = 10


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

    if args.output is not None:
        directory = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(directory):
            raise ConfigError(
                f"output directory {directory!r} does not exist; create it or choose another -o FILE."
            )
    events = load_events(args.event_log) if args.event_log is not None else None
    study = load_study_readonly(args.study_name, args.storage)
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


def load_study_readonly(study_name: str, storage_url: str | None) -> Any:
    """``optuna.load_study`` with one-line errors; never creates a study, table or database file."""
    import optuna
    import sqlalchemy.exc
    from optuna.storages import RDBStorage

    from optuna_guard.storage import default_storage_url

    url = storage_url or default_storage_url()
    if "://" not in url:
        raise ConfigError(
            f"storage URL {url!r} is not a database URL; use e.g. sqlite:///study.db or postgresql+psycopg://user@host/db."
        )
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if path and path != ":memory:" and not os.path.isfile(path):
            raise ConfigError(
                f"storage {url!r}: database file {path!r} does not exist; check --storage."
            )
    engine_kwargs: dict[str, Any] = {}
    if url.startswith(("postgresql", "mysql")):
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
        engine_kwargs["pool_pre_ping"] = True
    from optuna_guard._storage_urls import is_rdb_url, open_url_storage, url_kind

    if url_kind(url) == "journal" and not os.path.isfile(url.split("://", 1)[1]):
        raise ConfigError(
            f"storage {url!r}: journal file {url.split('://', 1)[1]!r} does not exist; check --storage."
        )
    storage: optuna.storages.BaseStorage
    try:
        if is_rdb_url(url):
            storage = RDBStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=True)
        else:  # journal file, Redis journal, gRPC proxy
            storage = open_url_storage(url, connect_timeout=CONNECT_TIMEOUT_S)
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise ConfigError(
            f"study {study_name!r} not found in storage {_redact(url)}; list studies with "
            f"'optuna studies --storage URL' and check --study-name."
        ) from None
    except (
        sqlalchemy.exc.ArgumentError,
        sqlalchemy.exc.NoSuchModuleError,
        ValueError,
        ImportError,
    ) as exc:
        raise ConfigError(
            f"storage URL {_redact(url)} is not usable: {_first_line(exc)}; check --storage."
        ) from None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise ConfigError(
            f"cannot read storage {_redact(url)}: {_first_line(exc)}; check --storage."
        ) from None
    except Exception as exc:  # optuna/alembic wrap some storage errors in their own types
        if type(exc).__module__.startswith(("optuna", "alembic", "redis", "grpc")):
            raise ConfigError(
                f"cannot read storage {_redact(url)}: {_first_line(exc)}; check --storage."
            ) from None
        raise


def _first_line(exc: BaseException) -> str:
    """The most specific message in the exception chain (Optuna wraps the driver's error)."""
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _redact(url: str) -> str:
    """The URL without its password, for error messages."""
    try:
        from sqlalchemy.engine import make_url

        return repr(make_url(url).render_as_string(hide_password=True))
    except Exception:
        return repr(url.split("@")[-1]) if "@" in url else repr(url)
