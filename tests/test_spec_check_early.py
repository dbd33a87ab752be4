"""The objective check's interpreter is started by the CLI before the supervisor imports
Optuna and waited for before anything is written; a check started for other settings is
replaced, so what is checked is always the launch's own resolved spec."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from optuna_guard.exceptions import ObjectiveSpecError
from optuna_guard.supervisor._config import LaunchConfig
from optuna_guard.supervisor._launch import run_launch
from optuna_guard.supervisor._objective_spec import SpecCheck, resolve_specs


def _module(tmp_path: Path) -> Path:
    path = tmp_path / "objectives.py"
    path.write_text("def good(trial):\n    return 0.0\n")
    return path


def test_a_check_reports_a_missing_function_in_one_line(tmp_path: Path) -> None:
    spec, _, _ = resolve_specs(f"{_module(tmp_path)}:missing", None, None)
    with pytest.raises(ObjectiveSpecError) as info:
        SpecCheck(spec).result()
    assert "missing" in str(info.value) and "\n" not in str(info.value)
    SpecCheck(resolve_specs(f"{_module(tmp_path)}:good", None, None)[0]).result()  # no error


def test_a_check_started_for_another_spec_is_replaced_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    module = _module(tmp_path)
    early = SpecCheck(resolve_specs(f"{module}:good", None, None)[0])
    config = LaunchConfig(
        objective=f"{module}:missing",
        study_name="s",
        storage=f"sqlite:///{tmp_path / 'study.db'}",
        log_dir=str(tmp_path / "logs"),
    )
    with pytest.raises(ObjectiveSpecError, match="missing"):
        run_launch(config, spec_check=early)
    assert not (tmp_path / "study.db").exists()


def test_the_cli_exits_2_on_a_bad_objective_without_touching_the_storage(tmp_path: Path) -> None:
    module = _module(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "optuna_guard.cli",
            "run",
            f"{module}:missing",
            "--study-name",
            "s",
            "--storage",
            f"sqlite:///{tmp_path / 'study.db'}",
            "--log-dir",
            str(tmp_path / "logs"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "missing" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "study.db").exists()
