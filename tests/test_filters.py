"""killed_trials / valid_trials keep emergency-killed trials out of analysis."""

from __future__ import annotations

import optuna
import pytest
from fakes import FakeProbe
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from optuna_guard import check_memory, guard, killed_trials, tags, valid_trials
from optuna_guard.analysis import is_killed

KILL = {
    tags.EMERGENCY_KILLED: True,
    tags.KILL_REASON: "OOM prevention [split 2/5]: available 1.80 GB < 2.00 GB",
}


def _trial(state, value=None, attrs=None):
    return create_trial(
        state=state,
        value=value if state == TrialState.COMPLETE else None,
        params={"x": 0.5},
        distributions={"x": FloatDistribution(0, 1)},
        user_attrs=attrs or {},
        intermediate_values={0: 1.0} if state == TrialState.PRUNED else {},
    )


@pytest.fixture()
def study(sqlite_url):
    study = optuna.create_study(storage=sqlite_url, study_name="filters")
    for trial in [
        _trial(TrialState.COMPLETE, 1.0),  # 0
        _trial(TrialState.PRUNED, attrs=KILL),  # 1 killed, pruned
        _trial(TrialState.PRUNED),  # 2 pruned by the median pruner
        _trial(TrialState.FAIL, attrs=KILL),  # 3 killed with on_trip="fail"
        _trial(TrialState.FAIL),  # 4 an ordinary error
        _trial(
            TrialState.COMPLETE, 0.5, attrs={tags.EMERGENCY_KILLED: False, tags.PEAK_RSS_GB: 1.2}
        ),  # 5
    ]:
        study.add_trial(trial)
    return study


def test_killed_trials(study) -> None:
    assert [t.number for t in killed_trials(study)] == [1, 3]
    assert all(is_killed(t) for t in killed_trials(study))


def test_valid_trials_excludes_killed_ones(study) -> None:
    assert [t.number for t in valid_trials(study)] == [0, 2, 4, 5]
    assert [t.number for t in valid_trials(study, complete_only=True)] == [0, 5]
    assert [t.number for t in valid_trials(study, states=(TrialState.PRUNED,))] == [2]
    assert [
        t.number for t in valid_trials(study, states=[TrialState.PRUNED, TrialState.FAIL])
    ] == [2, 4]


def test_filters_on_a_study_without_any_tags() -> None:
    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    assert killed_trials(study) == []
    assert len(valid_trials(study, complete_only=True)) == 3


def test_filters_see_what_the_guard_wrote(quiet_optuna) -> None:
    probe = FakeProbe(available_gb=10.0)

    @guard(probe=probe)
    def objective(trial):
        if trial.number == 1:
            probe.set(available_gb=1.0)

        check_memory(trial, "split 1/1", probe=probe)
        return float(trial.number)

    study = optuna.create_study()
    study.optimize(objective, n_trials=3, callbacks=[lambda *_: probe.set(available_gb=10.0)])
    assert [t.number for t in killed_trials(study)] == [1]
    assert [t.number for t in valid_trials(study)] == [0, 2]
    best = min(valid_trials(study, complete_only=True), key=lambda t: t.value)
    assert best.number == 0
