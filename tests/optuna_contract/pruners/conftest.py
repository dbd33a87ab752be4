"""Optuna's own pruner tests (copied unchanged beside this file) run three times: with the bare
pruner, wrapped in ``DivergencePruner`` and wrapped in ``MemoryGuardPruner``.

The wrapping happens where every one of those tests hands its pruner to Optuna:
``optuna.create_study(pruner=...)`` is replaced for the test by a version that wraps the pruner
first. Tests that call ``pruner.prune(...)`` directly on the object they built still run (and
pass trivially for the wrapper).

Excluded, by design, only under ``DivergencePruner`` (listed in ``NAN_FIRST`` with the reason):
tests that report NaN/Inf and expect the wrapped pruner's own handling of it ("not pruned", a
warning), while ``DivergencePruner`` prunes NaN/Inf at once, which is its purpose. Tests that
need scipy or cmaes (not dependencies of this project) are skipped when those are missing.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import optuna
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))

from fakes import FakeProbe

from optuna_guard import DivergencePruner, MemoryGuardPruner

WRAPPERS: dict[str, Callable[[Any], Any] | None] = {
    "bare": None,
    "divergence": lambda pruner: DivergencePruner(pruner),
    # plenty of memory (a fake reading): the wrapper must then decide exactly as its pruner
    "memory": lambda pruner: MemoryGuardPruner(pruner, probe=FakeProbe()),
}

# test function name (or a regular expression for the test id) -> why it cannot hold under
# DivergencePruner
NAN_FIRST = {
    "test_median_pruner_intermediate_values_nan": "reports NaN first and expects MedianPruner's 'not pruned'",
    "test_patient_pruner_intermediate_values_nan": "reports NaN and expects PatientPruner's 'not pruned'",
    "test_25_percentile_pruner_intermediate_values_nan": "reports NaN first and expects PercentilePruner's 'not pruned'",
    "test_successive_halving_pruner_with_nan": "reports NaN and expects SuccessiveHalvingPruner's 'not pruned'",
    r"test_wilcoxon_pruner_warn_bad_best_trial\[divergence-.*-intermediate_values1\]": "the trial reports NaN and "
    "expects WilcoxonPruner's warning, which is never reached",
    r"test_wilcoxon_pruner_warn_bad_best_trial\[divergence-.*-intermediate_values3\]": "the trial reports Inf and "
    "expects WilcoxonPruner's warning, which is never reached",
}

# Optional libraries some of Optuna's tests need and this project does not install: a test
# that fails importing one is skipped (WilcoxonPruner needs scipy); the CMA-ES case of the
# Hyperband filter test catches the import error inside the trial, so it is named here.
OPTIONAL_MODULES = ("scipy", "cmaes")
NEEDS_CMAES = "test_hyperband_filter_study[{}-<lambda>3]"


def _missing_module(request) -> str | None:
    if (
        request.node.name == NEEDS_CMAES.format(request.param)
        and importlib.util.find_spec("cmaes") is None
    ):
        return "cmaes"
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    outcome = yield
    error = outcome.excinfo[1] if outcome.excinfo else None
    if (
        isinstance(error, ModuleNotFoundError)
        and (error.name or "").partition(".")[0] in OPTIONAL_MODULES
    ):
        outcome.force_exception(
            pytest.skip.Exception(
                f"needs {error.name}, which is not installed here", _use_item_location=True
            )
        )


@pytest.fixture(autouse=True, params=list(WRAPPERS))
def wrapped_pruner(request, monkeypatch) -> str:
    wrap = WRAPPERS[request.param]
    missing = _missing_module(request)
    if missing is not None:
        pytest.skip(f"needs {missing}, which is not installed here")
    if request.param == "divergence":
        for pattern, why in NAN_FIRST.items():
            if re.fullmatch(pattern, request.node.name) or pattern == request.function.__name__:
                pytest.skip(f"NaN/Inf first, by design: {why}")
    if wrap is not None:
        real = optuna.study.create_study

        def create_study(*args: Any, pruner: Any = None, **kwargs: Any) -> optuna.Study:
            return real(*args, pruner=None if pruner is None else wrap(pruner), **kwargs)

        monkeypatch.setattr(optuna, "create_study", create_study)
        monkeypatch.setattr(optuna.study, "create_study", create_study)
    return request.param
