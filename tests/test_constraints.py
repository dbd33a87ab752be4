"""Memory constraints: the value, where Optuna 5 stores it, and the flow through @guard."""

from __future__ import annotations

import math
import os
import sys
import warnings

import optuna
import pytest
from optuna.trial import TrialState

from optuna_guard import tags
from optuna_guard.exceptions import ConfigError
from optuna_guard.oom_aware import constraints as c
from optuna_guard.storage import end_trial_from_outside

sys.path.insert(0, os.path.dirname(__file__))
from analysis_study import FakeProbe

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize(
    ("peak", "budget", "killed", "expected"),
    [
        (3.0, 8.0, False, -5.0),  # under budget: feasible
        (10.0, 8.0, False, 2.0),  # over budget: infeasible by the excess
        (8.0, 8.0, False, 0.0),  # exactly at the budget: feasible (Optuna: <= 0)
        (3.0, 8.0, True, 8.0),  # killed under budget: still clearly violated
        (10.0, 8.0, True, 10.0),  # killed over budget: excess + budget
        (0.2, 0.5, True, 1.0),  # small budget: at least 1.0 GB of violation
        (None, 8.0, True, 8.0),  # killed without a reading
        (None, 8.0, False, -8.0),
    ],
)
def test_memory_constraint_value(peak, budget, killed, expected) -> None:
    assert c.memory_constraint_value(peak, budget, killed) == pytest.approx(expected)


@pytest.mark.parametrize("budget", [0, -1.0, math.nan, math.inf, True, "8"])
def test_bad_budget_is_a_config_error(budget) -> None:
    with pytest.raises(ConfigError, match="budget"):
        c.memory_constraint_value(1.0, budget, False)


def test_negative_peak_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="peak_rss_gb cannot be negative"):
        c.memory_constraint_value(-1.0, 8.0, False)


def test_budget_from_env() -> None:
    assert c.budget_from_env({}) is None
    assert c.budget_from_env({c.BUDGET_ENV_VAR: " 6.5 "}) == 6.5
    assert c.budget_from_env({c.BUDGET_ENV_VAR: "none"}) is None
    with pytest.raises(ConfigError, match=c.BUDGET_ENV_VAR):
        c.budget_from_env({c.BUDGET_ENV_VAR: "lots"})
    with pytest.raises(ConfigError, match="> 0"):
        c.budget_from_env({c.BUDGET_ENV_VAR: "-2"})


def test_set_memory_constraint_is_stored_as_optuna5_constraint() -> None:
    study = optuna.create_study()
    trial = study.ask()
    assert c.set_memory_constraint(trial, 5.0, 4.0) == pytest.approx(1.0)
    # a second write is refused without Optuna's "already set" warning; the first value stays
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert c.set_memory_constraint(trial, 1.0, 4.0) is None
    study.tell(trial, 0.5)
    frozen = study.trials[0]
    assert frozen.system_attrs[c.MEMORY_CONSTRAINT_ATTR] == pytest.approx(1.0)
    assert frozen.constraints == {"memory": pytest.approx(1.0)}  # what TPE/NSGA-II read
    assert c.memory_constraint(frozen) == pytest.approx(1.0)
    assert c.is_memory_feasible(frozen) is False


def test_a_trial_tagged_killed_gets_a_violated_value_even_when_called_as_not_killed() -> None:
    study = optuna.create_study()
    trial = study.ask()
    trial.set_user_attr(tags.EMERGENCY_KILLED, True)
    assert c.set_memory_constraint(trial, 0.3, 4.0, killed=False) == pytest.approx(4.0)


def test_a_preflight_pruned_trial_is_counted_with_its_predicted_peak() -> None:
    study = optuna.create_study()
    trial = study.ask()
    trial.set_user_attr(tags.EMERGENCY_KILLED, True)
    trial.set_user_attr(tags.KILL_LIMIT, "preflight")
    trial.set_user_attr(tags.PREDICTED_PEAK_GB, 9.0)
    # the guard measured only the idle worker (0.3 GB); the prediction says 9 GB
    assert c.set_memory_constraint(trial, 0.3, 4.0) == pytest.approx(5.0 + 4.0)


def test_constraint_written_from_outside_before_the_kill(tmp_path) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    ended = end_trial_from_outside(
        storage,
        trial._trial_id,
        TrialState.PRUNED,
        user_attrs={tags.EMERGENCY_KILLED: True, tags.PEAK_RSS_GB: 6.0},
        system_attrs=c.memory_constraint_system_attrs(6.0, 4.0, killed=True),
    )
    assert ended
    frozen = optuna.load_study(study_name=study.study_name, storage=storage).trials[0]
    assert frozen.state == TrialState.PRUNED
    assert frozen.constraints == {"memory": pytest.approx(2.0 + 4.0)}


# -- end to end through @guard -------------------------------------------------------------


def _guard():
    trial_guard = pytest.importorskip(
        "optuna_guard.trial_guard", reason="the guard is not built yet"
    )
    return trial_guard.guard


def test_guard_writes_the_constraint_for_a_complete_trial() -> None:
    guard = _guard()
    probe = FakeProbe(available_gb=20.0, held_gb=1.5)

    @guard(memory_budget_gb=4.0, min_available_gb=2.0, warn_available_gb=3.0, probe=probe)
    def objective(trial: optuna.Trial) -> float:
        return trial.suggest_float("x", 0, 1)

    study = optuna.create_study()
    study.optimize(objective, n_trials=2)
    for frozen in study.trials:
        assert frozen.state == TrialState.COMPLETE
        peak = frozen.user_attrs[tags.PEAK_RSS_GB]
        assert peak == pytest.approx(1.5)
        assert frozen.constraints["memory"] == pytest.approx(peak - 4.0)


def test_guard_writes_a_violated_constraint_for_a_killed_trial() -> None:
    guard = _guard()
    probe = FakeProbe(available_gb=1.0, held_gb=1.5)  # below min_available_gb at the start

    @guard(memory_budget_gb=4.0, min_available_gb=2.0, warn_available_gb=3.0, probe=probe)
    def objective(trial: optuna.Trial) -> float:
        return trial.suggest_float("x", 0, 1)

    study = optuna.create_study()
    study.optimize(objective, n_trials=1)
    frozen = study.trials[0]
    assert frozen.state == TrialState.PRUNED  # samplers learn from PRUNED, not from FAIL
    assert frozen.user_attrs[tags.EMERGENCY_KILLED] is True
    assert frozen.constraints["memory"] == pytest.approx(max(1.5 - 4.0, 0) + 4.0)
