"""The pre-flight check: prunes a trial predicted not to fit in the memory available now,
abstains with too little history, and leaves the objective's params as it drew them."""

from __future__ import annotations

import os
import sys

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from optuna_guard import tags
from optuna_guard.exceptions import ConfigError
from optuna_guard.oom_aware.preflight import preflight_check

sys.path.insert(0, os.path.dirname(__file__))
from analysis_study import FakeProbe

optuna.logging.set_verbosity(optuna.logging.WARNING)

DISTS = {
    "batch": IntDistribution(16, 512, log=True),
    "width": IntDistribution(64, 2048, log=True),
    "opt": CategoricalDistribution(["sgd", "adam"]),
}


BIG_NEIGHBOUR = {"batch": 500, "width": 2000, "opt": "adam"}  # ~12.2 GB


def true_peak_gb(batch: int, width: int, opt: str = "sgd") -> float:
    """The memory model of the fake trials: a base plus activations ~ batch x width."""
    return (0.6 + 9.0 * (batch / 512) * (width / 2048)) * (1.3 if opt == "adam" else 1.0)


def study_with_history(
    n: int, *, seed: int = 0, killed: list[dict] | None = None, big: list[dict] | None = None
) -> optuna.Study:
    """A study with ``n`` random COMPLETE trials that carry peak_rss_gb, plus COMPLETE trials
    at the ``big`` params and killed (PRUNED, 3 GB at the kill) trials at the ``killed`` params."""
    study = optuna.create_study()
    sampler = optuna.samplers.RandomSampler(seed=seed)
    space = optuna.create_study(sampler=sampler)
    for _ in range(n):
        t = space.ask(DISTS)
        params = t.params
        space.tell(t, 0.0)
        study.add_trial(
            create_trial(
                value=1.0,
                params=params,
                distributions=DISTS,
                user_attrs={tags.PEAK_RSS_GB: round(true_peak_gb(**params), 2)},
            )
        )
    for params in big or []:
        study.add_trial(
            create_trial(
                value=1.0,
                params=params,
                distributions=DISTS,
                user_attrs={tags.PEAK_RSS_GB: round(true_peak_gb(**params), 2)},
            )
        )
    for params in killed or []:
        study.add_trial(
            create_trial(
                state=TrialState.PRUNED,
                params=params,
                distributions=DISTS,
                user_attrs={
                    tags.EMERGENCY_KILLED: True,
                    tags.PEAK_RSS_GB: 3.0,
                    tags.KILL_LIMIT: "min_available_gb",
                },
            )
        )
    return study


def ask_with(study: optuna.Study, **params) -> optuna.Trial:
    study.enqueue_trial(params)
    return study.ask()


@pytest.mark.parametrize("method", ["regression", "knn"])
def test_prunes_a_trial_predicted_to_exceed_available_memory(method: str) -> None:
    # knn does not extrapolate: it needs a finished trial next to the big corner
    study = study_with_history(30, big=[BIG_NEIGHBOUR] if method == "knn" else None)
    # 512 x 2048 with adam needs ~12.5 GB; 6 GB are available, this worker holds 0.5 GB
    trial = ask_with(study, batch=512, width=2048, opt="adam")
    with pytest.raises(
        optuna.TrialPruned, match=r"predicted OOM: ~\d+\.\d+ GB needed, 6\.00 GB available"
    ):
        preflight_check(
            trial, probe=FakeProbe(available_gb=6.0, held_gb=0.5), method=method, margin_gb=1.0
        )
    study.tell(trial, state=TrialState.PRUNED)

    frozen = study.trials[trial.number]
    attrs = frozen.user_attrs
    assert frozen.state == TrialState.PRUNED
    assert attrs[tags.EMERGENCY_KILLED] is True
    assert attrs[tags.KILL_LIMIT] == "preflight"
    assert attrs[tags.KILL_REASON].startswith("predicted OOM: ~")
    assert attrs[tags.AVAILABLE_GB_AT_KILL] == pytest.approx(6.0)
    if method == "regression":  # an extrapolation close to the truth (12.5 GB), not just "big"
        assert attrs[tags.PREDICTED_PEAK_GB] == pytest.approx(
            true_peak_gb(512, 2048, "adam"), rel=0.25
        )
    else:  # a weighted mean of neighbours, pulled towards the one right next to it
        assert 6.5 < attrs[tags.PREDICTED_PEAK_GB] < 12.5


def test_lets_a_small_trial_run_and_records_its_prediction() -> None:
    study = study_with_history(30)
    trial = ask_with(study, batch=32, width=128, opt="sgd")
    result = preflight_check(trial, probe=FakeProbe(available_gb=6.0), margin_gb=1.0)
    assert not result.prune and not result.abstained
    assert result.estimate.peak_gb == pytest.approx(true_peak_gb(32, 128), rel=0.25)
    assert result.available_gb == pytest.approx(6.0)
    study.tell(trial, 1.0)
    frozen = study.trials[trial.number]
    assert frozen.state == TrialState.COMPLETE
    assert tags.EMERGENCY_KILLED not in frozen.user_attrs
    assert frozen.user_attrs[tags.PREDICTED_PEAK_GB] == pytest.approx(
        result.estimate.peak_gb, abs=0.01
    )


def test_the_same_trial_runs_when_enough_memory_is_available() -> None:
    study = study_with_history(30)
    trial = ask_with(study, batch=512, width=2048, opt="adam")
    result = preflight_check(trial, probe=FakeProbe(available_gb=20.0), margin_gb=1.0)
    assert not result.prune


def test_abstains_with_too_little_history() -> None:
    study = study_with_history(3)
    trial = study.ask()
    result = preflight_check(
        trial, probe=FakeProbe(available_gb=0.1), margin_gb=1.0
    )  # would prune anything
    assert result.abstained and not result.prune
    assert "only 3 finished trial(s)" in result.reason and "need 8" in result.reason
    assert trial.params == {}  # nothing drawn early when it abstains
    study.tell(trial, 1.0)
    assert tags.EMERGENCY_KILLED not in study.trials[trial.number].user_attrs


def test_trials_it_pruned_do_not_count_as_history() -> None:
    study = study_with_history(5)
    for _ in range(5):  # five pre-flight prunes: no real peak reading in them
        study.add_trial(
            create_trial(
                state=TrialState.PRUNED,
                params={"batch": 512, "width": 2048, "opt": "sgd"},
                distributions=DISTS,
                user_attrs={
                    tags.EMERGENCY_KILLED: True,
                    tags.KILL_LIMIT: "preflight",
                    tags.PEAK_RSS_GB: 0.3,
                },
            )
        )
    result = preflight_check(study.ask(), probe=FakeProbe(available_gb=0.1), margin_gb=1.0)
    assert result.abstained and "only 5" in result.reason


def test_a_killed_trial_with_nearly_the_same_params_sets_a_floor() -> None:
    # the regression (fitted on complete trials) says ~0.9 GB; the same config was killed at 3 GB
    probe = FakeProbe(available_gb=3.0, held_gb=0.5)
    study = study_with_history(20)
    assert not preflight_check(
        ask_with(study, batch=64, width=512, opt="sgd"), probe=probe, margin_gb=1.0
    ).prune
    study = study_with_history(20, killed=[{"batch": 64, "width": 512, "opt": "sgd"}])
    trial = ask_with(study, batch=64, width=512, opt="sgd")
    with pytest.raises(optuna.TrialPruned, match=r"killed at 3\.0 GB"):
        preflight_check(trial, probe=probe, margin_gb=1.0)


def test_max_trial_rss_limit_is_predicted_too() -> None:
    study = study_with_history(30)
    trial = ask_with(study, batch=512, width=2048, opt="sgd")
    with pytest.raises(optuna.TrialPruned, match=r"over the max_trial_rss_gb limit of 5\.00 GB"):
        preflight_check(
            trial,
            probe=FakeProbe(available_gb=100.0),
            margin_gb=1.0,
            max_trial_rss_gb=5.0,
            method="regression",
        )


def test_a_pruned_trial_gets_a_violated_memory_constraint_when_a_budget_is_known() -> None:
    study = study_with_history(30)
    trial = ask_with(study, batch=512, width=2048, opt="adam")
    with pytest.raises(optuna.TrialPruned):
        preflight_check(
            trial,
            probe=FakeProbe(available_gb=6.0),
            margin_gb=1.0,
            budget_gb=8.0,
            method="regression",
        )
    study.tell(trial, state=TrialState.PRUNED)
    frozen = study.trials[trial.number]
    predicted = frozen.user_attrs[tags.PREDICTED_PEAK_GB]
    assert frozen.constraints["memory"] == pytest.approx(max(predicted - 8.0, 0) + 8.0, abs=0.02)


def test_margin_defaults_to_the_guards_min_available_gb(monkeypatch) -> None:
    study = study_with_history(30)
    need = true_peak_gb(256, 1024) - 0.5  # ~2.4 GB beyond what the worker holds
    monkeypatch.setenv("OPTUNA_GUARD_MIN_AVAILABLE_GB", "0.5")
    monkeypatch.setenv("OPTUNA_GUARD_WARN_AVAILABLE_GB", "1.0")
    probe = FakeProbe(available_gb=need + 1.0)
    assert not preflight_check(
        ask_with(study, batch=256, width=1024, opt="sgd"), probe=probe, method="regression"
    ).prune
    monkeypatch.setenv("OPTUNA_GUARD_MIN_AVAILABLE_GB", "2.0")
    monkeypatch.setenv("OPTUNA_GUARD_WARN_AVAILABLE_GB", "4.0")
    with pytest.raises(optuna.TrialPruned):
        preflight_check(
            ask_with(study, batch=256, width=1024, opt="sgd"), probe=probe, method="regression"
        )


def test_params_drawn_early_are_the_ones_the_objective_gets() -> None:
    study = study_with_history(12)
    seen = {}

    def objective(trial: optuna.Trial) -> float:
        result = preflight_check(trial, probe=FakeProbe(available_gb=100.0), margin_gb=1.0)
        drawn = dict(trial.params)
        seen[trial.number] = (
            drawn,
            {
                "batch": trial.suggest_int("batch", 16, 512, log=True),
                "width": trial.suggest_int("width", 64, 2048, log=True),
                "opt": trial.suggest_categorical("opt", ["sgd", "adam"]),
            },
            result,
        )
        return 1.0

    study.optimize(objective, n_trials=3)
    for drawn, suggested, result in seen.values():
        assert set(drawn) == {
            "batch",
            "width",
            "opt",
        }  # drawn before the objective's suggest calls
        assert drawn == suggested
        assert not result.abstained


def test_knn_does_not_extrapolate_but_the_regression_and_auto_do() -> None:
    study = study_with_history(30)  # nothing near 512 x 2048 yet
    probe = FakeProbe(available_gb=6.0)
    result = preflight_check(
        ask_with(study, batch=512, width=2048, opt="adam"),
        probe=probe,
        margin_gb=1.0,
        method="knn",
    )
    assert not result.prune  # knn: abstains (nothing similar) or averages smaller neighbours
    for method in ("regression", "auto"):  # the power law fits this history: auto uses it
        with pytest.raises(optuna.TrialPruned, match="base \\+ power law"):
            preflight_check(
                ask_with(study, batch=512, width=2048, opt="adam"),
                probe=probe,
                margin_gb=1.0,
                method=method,
            )


def test_auto_falls_back_to_neighbours_when_memory_is_no_power_law() -> None:
    # memory jumps at batch 128 (e.g. a different kernel kicks in): no base + power law fits
    study = optuna.create_study()
    for batch in (16, 24, 32, 48, 64, 96, 120, 128, 136, 192, 256, 384, 512, 40, 200, 300):
        for width, opt in ((64, "sgd"), (1024, "adam")):
            study.add_trial(
                create_trial(
                    value=1.0,
                    params={"batch": batch, "width": width, "opt": opt},
                    distributions=DISTS,
                    user_attrs={tags.PEAK_RSS_GB: 1.0 if batch < 128 else 5.0},
                )
            )
    result = preflight_check(
        ask_with(study, batch=170, width=512, opt="sgd"),
        probe=FakeProbe(available_gb=20.0),
        margin_gb=1.0,
    )
    assert result.estimate.method == "knn" and "too large" in result.estimate.detail
    assert result.estimate.peak_gb == pytest.approx(5.0, rel=0.1)


def test_params_that_do_not_move_memory_do_not_pick_the_neighbours() -> None:
    # Memory depends on batch only; x1..x3 (think lr, dropout, weight decay) do not move it.
    # The candidate matches small-batch trials exactly in x1..x3, so by plain distance those
    # are its neighbours (~1 GB); weighted by how much each param moves memory, the big-batch
    # trials are (~5.4 GB).
    dists = {
        "batch": IntDistribution(16, 512, log=True),
        **{f"x{i}": FloatDistribution(0.0, 1.0) for i in (1, 2, 3)},
    }
    study = optuna.create_study()

    def add(batch: int, x: float) -> None:
        study.add_trial(
            create_trial(
                value=1.0,
                params={"batch": batch, "x1": x, "x2": x, "x3": x},
                distributions=dists,
                user_attrs={tags.PEAK_RSS_GB: 0.5 + batch / 100},
            )
        )

    for batch in (16, 24, 32, 40, 48):
        for x in (0.0, 0.25, 0.5, 0.75, 1.0):
            add(batch, x)
    for batch in (480, 500, 512):
        add(batch, 0.5)
    result = preflight_check(
        ask_with(study, batch=490, x1=0.0, x2=0.0, x3=0.0),
        probe=FakeProbe(available_gb=20.0),
        margin_gb=1.0,
        method="knn",
    )
    assert result.estimate.peak_gb == pytest.approx(0.5 + 490 / 100, rel=0.15)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_history": 1}, "min_history"),
        ({"k": 0}, "k must be"),
        ({"margin_gb": -1.0}, "margin_gb"),
    ],
)
def test_bad_settings_are_config_errors(kwargs, match) -> None:
    study = study_with_history(10)
    with pytest.raises(ConfigError, match=match):
        preflight_check(study.ask(), probe=FakeProbe(available_gb=10.0), **kwargs)


def test_through_guard_the_objective_never_runs_when_pruned() -> None:
    trial_guard = pytest.importorskip(
        "optuna_guard.trial_guard", reason="the guard is not built yet"
    )
    study = study_with_history(19, big=[BIG_NEIGHBOUR])  # the default knn prunes next to it
    ran = []

    @trial_guard.guard(
        preflight=True,
        memory_budget_gb=8.0,
        min_available_gb=1.0,
        warn_available_gb=1.5,
        probe=FakeProbe(available_gb=6.0, held_gb=0.5),
    )
    def objective(trial: optuna.Trial) -> float:
        ran.append(trial.number)
        trial.suggest_int("batch", 16, 512, log=True)
        trial.suggest_int("width", 64, 2048, log=True)
        trial.suggest_categorical("opt", ["sgd", "adam"])
        return 1.0

    study.enqueue_trial({"batch": 512, "width": 2048, "opt": "adam"})  # ~12.5 GB: predicted OOM
    study.enqueue_trial({"batch": 16, "width": 64, "opt": "sgd"})  # ~0.6 GB: runs
    study.optimize(objective, n_trials=2)
    big, small = study.trials[20], study.trials[21]
    assert big.state == TrialState.PRUNED and big.number not in ran
    assert big.user_attrs[tags.KILL_LIMIT] == "preflight"
    assert big.constraints["memory"] > 0  # teaches TPE to stay away
    assert small.state == TrialState.COMPLETE and small.number in ran
    assert small.constraints["memory"] < 0
