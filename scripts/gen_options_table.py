"""Paste the option table of ``optuna-guard run`` / ``launch()`` into docs/launcher.md.

The table is generated from LaunchConfig's field metadata (the one place each option is
declared) and replaces what lies between the two markers. ``--check`` changes nothing and exits
1 when the docs are out of date (tests/test_options_declared_once.py checks the same).

    python scripts/gen_options_table.py [--check] [docs/launcher.md]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from optuna_guard.supervisor._config import LaunchConfig
from optuna_guard.supervisor._options import BEGIN_MARKER, END_MARKER, markdown_table

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "launcher.md"


def spliced(text: str, table: str) -> str:
    """``text`` with the part between the markers replaced by ``table``."""
    head, begin, rest = text.partition(BEGIN_MARKER)
    _, end, tail = rest.partition(END_MARKER)
    if not begin or not end:
        raise SystemExit(f"the markers {BEGIN_MARKER!r} / {END_MARKER!r} are missing")
    return f"{head}{BEGIN_MARKER}\n{table}\n{END_MARKER}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the docs are stale")
    parser.add_argument("docs", nargs="?", default=str(DOCS))
    args = parser.parse_args(argv)
    path = pathlib.Path(args.docs)
    text = path.read_text(encoding="utf-8")
    new = spliced(text, markdown_table(LaunchConfig))
    if new == text:
        return 0
    if args.check:
        print(f"{path} is out of date: run python scripts/gen_options_table.py", file=sys.stderr)
        return 1
    path.write_text(new, encoding="utf-8")
    print(f"{path}: option table updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
