"""The public surface: sorted __all__, every name importable, no heavy imports at import time."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def _type_checking_imports() -> dict[str, str]:
    """name -> module of the ``if TYPE_CHECKING:`` imports in optuna_guard/__init__.py."""
    tree = ast.parse(Path(optuna_guard.__file__).read_text(encoding="utf-8"))
    block = next(
        node
        for node in tree.body
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
    )
    found: dict[str, str] = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.module, ast.unparse(node)
        for alias in node.names:
            assert alias.asname == alias.name, f"{alias.name} is not re-exported as itself"
            found[alias.name] = node.module
    return found


def test_type_checking_imports_match_the_lazy_exports() -> None:
    """Type checkers see the same names, from the same objects, that __getattr__ serves."""
    static = _type_checking_imports()
    assert set(static) == set(optuna_guard._EXPORTS)
    for name, module in static.items():
        assert module.startswith(optuna_guard._EXPORTS[name]), (name, module)
        assert getattr(importlib.import_module(module), name) is getattr(optuna_guard, name)


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
def test_mypy_resolves_every_public_name_and_rejects_a_misspelt_one(tmp_path: Path) -> None:
    names = sorted(optuna_guard._EXPORTS)
    snippet = tmp_path / "use_optuna_guard.py"
    snippet.write_text(
        "import optuna_guard\n"
        + "".join(f"reveal_type(optuna_guard.{name})\n" for name in names)
        + "optuna_guard.gaurd\n",
        encoding="utf-8",
    )
    repo = Path(optuna_guard.__file__).parent.parent
    command = [sys.executable, "-m", "mypy", "--config-file", str(repo / "pyproject.toml")]
    # the package's own findings are the job of the mypy run in .ci/run; here only the snippet's
    command += ["--follow-imports", "silent", "--cache-dir", str(tmp_path / "cache")]
    out = subprocess.run(
        [*command, "--no-error-summary", str(snippet)],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    revealed = re.findall(r":(\d+): note: Revealed type is \"(.*)\"", out.stdout)
    assert len(revealed) == len(names), out.stdout + out.stderr
    for (line, kind), name in zip(revealed, names):
        assert int(line) == names.index(name) + 2
        assert kind != "Any", f"mypy sees optuna_guard.{name} as Any"
    # the misspelt name is an error: no module __getattr__ turns it into Any
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and 'no attribute "gaurd"' in errors[0], out.stdout


# Exported names whose docstrings do not have their Google ``Args:`` section yet (issue 14);
# the list may only shrink.
_WITHOUT_ARGS_SECTION: set[str] = set()


def _takes_arguments(obj: object) -> bool:
    if isinstance(obj, type) and issubclass(obj, BaseException) and "__init__" not in vars(obj):
        return False  # an exception raised with a message only
    try:
        return bool(inspect.signature(obj).parameters)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return True


@pytest.mark.parametrize("name", sorted(optuna_guard._EXPORTS))
def test_exported_name_has_a_google_docstring(name: str) -> None:
    obj = getattr(optuna_guard, name)
    doc = inspect.getdoc(obj) or ""
    assert doc, f"optuna_guard.{name} has no docstring"
    documented = "Args:" in doc or not _takes_arguments(obj)
    if name in _WITHOUT_ARGS_SECTION:
        assert not documented, f"optuna_guard.{name} has its Args: now; drop it from the list"
    else:
        assert documented, f"optuna_guard.{name} takes arguments but has no Args: section"
