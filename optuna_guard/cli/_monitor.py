"""``optuna-guard monitor``: watch RAM / swap / PSI / GPUs, log JSON lines, analyze a log.

    optuna-guard monitor [--interval SECONDS] [--log FILE] [--no-log] [--analyze FILE] [--once]
                         [--warn-available-gb GB]

Exit codes: 0 (also after Ctrl-C or SIGTERM, the normal way to stop it), 2 bad arguments or
an unreadable log.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
from typing import Any

from optuna_guard import monitor
from optuna_guard.exceptions import ConfigError


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text!r}")
    return value


def _non_negative_gb(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GB, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 GB, got {text!r}")
    return value


def _default_warn_gb() -> float:
    from optuna_guard.limits import MemoryLimits

    try:
        value = MemoryLimits.from_env().warn_available_gb
    except ConfigError:
        value = None
    return 4.0 if value is None else value


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "monitor",
        help="print and log memory use (RAM, swap, PSI, GPUs), or analyze a log",
        description=(
            "Print one line per interval with RAM (cgroup aware), swap, PSI and GPU memory, and "
            "append each sample as a JSON line to a log; or summarize such a log with --analyze."
        ),
    )
    parser.add_argument(
        "--interval",
        type=_positive_seconds,
        default=1.0,
        metavar="SECONDS",
        help="seconds between samples (default 1)",
    )
    logging = parser.add_mutually_exclusive_group()
    logging.add_argument(
        "--log",
        metavar="FILE",
        default=None,
        help=f"JSON-lines log to append to (default ./{monitor.DEFAULT_LOG_FILE})",
    )
    logging.add_argument("--no-log", action="store_true", help="print only, write no log")
    parser.add_argument(
        "--analyze", metavar="FILE", default=None, help="summarize a monitor log and exit"
    )
    parser.add_argument("--once", action="store_true", help="print one sample and exit")
    parser.add_argument(
        "--warn-available-gb",
        type=_non_negative_gb,
        default=None,
        metavar="GB",
        help="warning level for --analyze (default: OPTUNA_GUARD_WARN_AVAILABLE_GB or 4.0)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    warn = args.warn_available_gb if args.warn_available_gb is not None else _default_warn_gb()
    if args.analyze is not None:
        if args.once or args.log is not None or args.no_log:
            raise ConfigError(
                "--analyze reads an existing log; it cannot be combined with --once, --log or --no-log."
            )
        print(monitor.format_summary(monitor.analyze_log(args.analyze, warn_available_gb=warn)))
        return 0
    log_path = None if args.no_log else (args.log or monitor.DEFAULT_LOG_FILE)
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        monitor.run_monitor(
            interval=args.interval,
            log_path=log_path,
            once=args.once,
            out=lambda line: print(line, flush=True),
            stop=stop,
        )
    except KeyboardInterrupt:
        print("", file=sys.stderr)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0
