"""The public surface: sorted __all__, every name importable, no heavy imports at import time."""

from __future__ import annotations

import subprocess
import sys

import optuna_guard


def test_all_is_sorted_and_complete() -> None:
    names = [n for n in optuna_guard.__all__ if n != "__version__"]
    assert names == sorted(names)
    for name in names:
        assert getattr(optuna_guard, name) is not None, name


def test_import_is_light_and_side_effect_free() -> None:
    code = (
        "import sys, logging, optuna_guard;"
        "heavy = [m for m in ('torch', 'pandas', 'plotly', 'pynvml') if m in sys.modules];"
        "print(','.join(heavy));"
        "print(sum(not isinstance(h, logging.NullHandler) for h in logging.getLogger('optuna_guard').handlers))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy, handlers = out.stdout.split("\n")[:2]
    assert heavy == ""
    assert handlers == "0"  # the library never configures logging


def test_cli_help_lists_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "optuna_guard.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for command in ("monitor", "run", "status", "report"):
        assert command in out.stdout


def test_unknown_command_is_one_line_and_exit_2() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "optuna_guard.cli", "frobnicate"], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1
    assert "frobnicate" in out.stderr
