"""`optuna-guard` command line: a thin layer of argument parsing over the library.

Each sub-command lives in its own module ``optuna_guard.cli._<name>`` exposing
``add_parser(subparsers)``; the parser it adds sets ``func(args) -> int`` (the exit code).

Exit codes: 0 done, 1 error (also: storage unreachable past --storage-deadline), 2 bad input,
3 crash loop, 4 memory held outside the study (no worker could start for --memory-stall-timeout),
99 stopped by a signal or time budget.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from optuna_guard.exceptions import (  # noqa: F401  (the exit codes are re-exported here)
    EXIT_BAD_INPUT,
    EXIT_CRASH_LOOP,
    EXIT_ERROR,
    EXIT_MEMORY_STALL,
    EXIT_OK,
    EXIT_STOPPED,
    GuardError,
)

_COMMAND_MODULES = ("_monitor", "_run", "_status", "_report", "_storage_proxy")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we print one line that names the problem."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="optuna-guard",
        description="Keep long Optuna studies alive: memory guards, supervised workers, reports.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=OneLineErrorParser
    )
    for name in _COMMAND_MODULES:
        importlib.import_module(f"optuna_guard.cli.{name}").add_parser(subparsers)
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        logging.getLogger("optuna").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    _configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except GuardError as exc:  # each error carries its exit code (2 bad input, 3, 4, else 1)
        print(f"optuna-guard {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_STOPPED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
