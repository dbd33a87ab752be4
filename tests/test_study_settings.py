"""The user's study settings reach the study (issue 16, item 3): ``--sampler``/``--pruner``
names, ``module:factory`` and ``file.py:factory`` (the objective's loader, relative files
next to the objective), wrapped pruners, everything checked before the storage is touched,
and a new study saying which way it optimizes."""

from __future__ import annotations

import logging
import os
import sys

import optuna
import pytest
from supervisor_helpers import assert_nothing_running, cli, trials_of

import optuna_guard
from optuna_guard import DivergencePruner, MemoryGuardPruner
from optuna_guard.exceptions import ConfigError
from optuna_guard.supervisor._objective_spec import resolve_next_to_objective
from optuna_guard.supervisor._study import (
    create_or_check_study,
    describe_directions,
    make_pruner,
    make_sampler,
)

SETTINGS = os.path.join(os.path.dirname(__file__), "objectives", "settings")
OBJECTIVE = os.path.join(SETTINGS, "objective.py")
FACTORIES = os.path.join(SETTINGS, "factories.py")


@pytest.fixture(autouse=True)
def _forget_loaded_files():
    """The loader caches file modules by name; tests must not see each other's imports.

    Only the user modules a test loaded are forgotten: forgetting a library module that was
    first imported during the test (a SQLAlchemy dialect) would leave two copies of its classes
    and break later tests in the same process."""
    before = set(sys.modules)
    path = list(sys.path)
    yield
    for name in set(sys.modules) - before:
        if _is_user_module(sys.modules[name]):
            del sys.modules[name]
    sys.path[:] = path


def _is_user_module(module: object) -> bool:
    path = getattr(module, "__file__", None) or ""
    libraries = (sys.prefix, sys.base_prefix, os.path.dirname(optuna_guard.__file__))
    return bool(path) and not path.startswith(libraries)


# -- building samplers and pruners --------------------------------------------------------------


def test_names_still_work() -> None:
    assert isinstance(make_sampler("random", 1), optuna.samplers.RandomSampler)
    assert isinstance(make_pruner("median"), optuna.pruners.MedianPruner)
    assert make_sampler(None, None) is None and make_pruner(None) is None


def test_file_factories_with_seed_and_wrapped_pruners() -> None:
    sampler = make_sampler(f"{FACTORIES}:make_sampler", 7)
    assert isinstance(sampler, optuna.samplers.QMCSampler) and sampler.seed_given == 7
    pruner = make_pruner(f"{FACTORIES}:make_pruner")
    assert isinstance(pruner, MemoryGuardPruner)
    assert (
        isinstance(pruner._wrapped, optuna.pruners.MedianPruner)
        and pruner._wrapped._n_startup_trials == 5
    )
    assert isinstance(make_pruner(f"{FACTORIES}:make_divergence_pruner"), DivergencePruner)
    assert isinstance(
        make_sampler(f"{FACTORIES}:SAMPLER", None), optuna.samplers.RandomSampler
    )  # an instance


def test_module_factories_and_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(SETTINGS)
    assert make_sampler("objective:make_study_sampler", 4).seed_given == 4
    assert isinstance(
        make_sampler("optuna.samplers:RandomSampler", 1), optuna.samplers.RandomSampler
    )
    pruner = make_pruner("optuna.pruners:MedianPruner")
    assert isinstance(pruner, optuna.pruners.MedianPruner)


def test_seed_not_taken_is_said(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="optuna_guard"):
        assert isinstance(
            make_sampler(f"{FACTORIES}:plain_sampler", None), optuna.samplers.RandomSampler
        )
        assert not caplog.records  # no seed asked for: nothing to say
        assert isinstance(
            make_sampler(f"{FACTORIES}:plain_sampler", 3), optuna.samplers.RandomSampler
        )
    assert [r.getMessage() for r in caplog.records] == [
        f"--sampler: {FACTORIES}:plain_sampler takes no seed argument; --seed is not passed to it."
    ]


@pytest.mark.parametrize(
    ("option", "spec", "needle"),
    [
        ("sampler", f"{FACTORIES}:nope", "has no attribute 'nope'"),
        ("sampler", "/no/such/file.py:f", "does not exist"),
        ("sampler", "no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
        ("sampler", "nonsense", "is unknown"),
        ("pruner", f"{FACTORIES}:not_a_pruner", "returned str, not an Optuna pruner"),
        ("pruner", f"{FACTORIES}:make_sampler", "returned QMCSampler, not an Optuna pruner"),
        ("pruner", f"{FACTORIES}:broken", "calling it failed: RuntimeError: no such dataset"),
        ("pruner", "threshold", "needs bounds"),
    ],
)
def test_bad_factories_are_one_line_config_errors(option: str, spec: str, needle: str) -> None:
    build = make_sampler if option == "sampler" else make_pruner
    args = (spec, None) if option == "sampler" else (spec,)
    with pytest.raises(ConfigError, match=needle) as info:
        build(*args)
    assert "\n" not in str(info.value) and f"--{option}" in str(info.value)


def test_relative_factory_file_is_found_next_to_the_objective(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    objective = f"{OBJECTIVE}:objective"
    assert (
        resolve_next_to_objective("factories.py:make_pruner", objective)
        == f"{FACTORIES}:make_pruner"
    )
    (tmp_path / "mine.py").write_text("x = 1\n")
    assert (
        resolve_next_to_objective("mine.py:f", objective) == f"{tmp_path / 'mine.py'}:f"
    )  # else the cwd
    assert resolve_next_to_objective("pkg.mod:f", objective) == "pkg.mod:f"


# -- direction ----------------------------------------------------------------------------------


def test_a_new_study_says_its_direction(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    with caplog.at_level(logging.INFO, logger="optuna_guard"):
        create_or_check_study(storage, "fresh", ["minimize"])
        create_or_check_study(storage, "fresh", ["minimize"])  # existing: said once only
    said = [r.getMessage() for r in caplog.records if "New study" in r.getMessage()]
    assert said == [
        "New study 'fresh': minimizing; pass --direction maximize if your objective is a score."
    ]
    assert describe_directions(["maximize"]).startswith("maximizing; pass --direction minimize")
    assert describe_directions(["minimize", "maximize"]).startswith(
        "minimizing, maximizing (2 objectives"
    )


# -- through optuna-guard run -------------------------------------------------------------------


def test_run_uses_factories_next_to_the_objective(tmp_path, unique_study_name) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = cli(
        "run",
        f"{OBJECTIVE}:objective",
        "--study-name",
        unique_study_name,
        "--storage",
        url,
        "--log-dir",
        str(tmp_path / "logs"),
        "--display",
        "off",
        "--workers",
        "2",
        "--n-trials",
        "4",
        "--seed",
        "10",
        "--sampler",
        "factories.py:make_sampler",
        "--pruner",
        "factories.py:make_pruner",
        cwd=str(elsewhere),
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    trials = trials_of(url, unique_study_name)
    assert_nothing_running(trials)
    assert len(trials) == 4
    for trial in trials:
        assert trial.user_attrs["sampler"] == "QMCSampler"
        assert (
            10 <= trial.user_attrs["sampler_seed_given"] < 20
        )  # each worker start gets S + its index
        assert trial.user_attrs["pruner"] == "MemoryGuardPruner"
        assert (
            trial.user_attrs["wrapped_pruner"] == "MedianPruner"
            and trial.user_attrs["n_startup_trials"] == 5
        )
    first_lines = result.stderr.splitlines()[:6]
    assert any(
        "minimizing; pass --direction maximize if your objective is a score" in line
        for line in first_lines
    ), first_lines


def test_run_refuses_bad_factories_before_touching_the_storage(
    tmp_path, unique_study_name
) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    cases = {
        "missing factory": ("--sampler", "factories.py:nope", "has no attribute 'nope'"),
        "wrong type": ("--pruner", "factories.py:not_a_pruner", "not an Optuna pruner"),
        "raises": ("--pruner", "factories.py:broken", "RuntimeError: no such dataset"),
        "unknown name": ("--pruner", "bogus", "is unknown"),
    }
    for name, (option, value, needle) in cases.items():
        result = cli(
            "run",
            f"{OBJECTIVE}:objective",
            "--study-name",
            unique_study_name,
            "--storage",
            url,
            "--log-dir",
            str(tmp_path / "logs"),
            "--display",
            "off",
            "--n-trials",
            "1",
            option,
            value,
            cwd=str(tmp_path),
            timeout=120,
        )
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, (name, result.stderr)
        assert len(lines) == 1 and needle in lines[0], (name, lines)
    assert not os.path.exists(tmp_path / "study.db")  # no empty study, not even the file
    assert not os.path.exists(tmp_path / "logs")
