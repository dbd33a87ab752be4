"""MemoryGuardPruner: prunes and tags when a limit trips, otherwise the wrapped pruner decides."""

from __future__ import annotations

import logging

import optuna
import pytest
from fakes import FakeProbe
from optuna.pruners import MedianPruner
from optuna.trial import TrialState

from optuna_guard import preemption, tags
from optuna_guard._units import GB
from optuna_guard.memory import GpuMemory
from optuna_guard.pruners import MemoryGuardPruner


@pytest.fixture(autouse=True)
def _quiet(quiet_optuna):
    yield


def _cv_objective(scores, on_step=None):
    """The user's existing code: report the score of each split, prune when told."""

    def objective(trial):
        for step, score in enumerate(scores(trial.number)):
            if on_step is not None:
                on_step(trial.number, step)
            trial.report(score, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return scores(trial.number)[-1]

    return objective


def _median_scores(number):
    return [10.0, 10.0, 10.0] if number == 3 else [1.0, 1.0, 1.0]


def test_impossible_threshold_prunes_and_tags_with_the_real_probe() -> None:
    pruner = MemoryGuardPruner(
        MedianPruner(), min_available_gb=100_000.0, warn_available_gb=100_000.0
    )
    study = optuna.create_study(pruner=pruner)
    study.optimize(_cv_objective(lambda n: [1.0, 2.0, 3.0]), n_trials=2)
    for trial in study.trials:
        assert trial.state == TrialState.PRUNED
        assert list(trial.intermediate_values) == [0]  # stopped at the first split
        assert trial.user_attrs[tags.EMERGENCY_KILLED] is True
        assert trial.user_attrs[tags.KILL_LIMIT] == "min_available_gb"
        assert trial.user_attrs[tags.KILL_REASON].startswith(
            f"OOM prevention [Trial #{trial.number} step 0]: available"
        )
        assert trial.user_attrs[tags.AVAILABLE_GB_AT_KILL] > 0


def test_defers_to_the_wrapped_pruner_when_memory_is_fine() -> None:
    def run(pruner):
        study = optuna.create_study(pruner=pruner, sampler=optuna.samplers.RandomSampler(seed=0))
        study.optimize(_cv_objective(_median_scores), n_trials=5)
        return study

    bare = run(MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    wrapped = run(
        MemoryGuardPruner(
            MedianPruner(n_startup_trials=2, n_warmup_steps=0),
            min_available_gb=0.001,
            warn_available_gb=0.002,
        )
    )
    states = [t.state for t in wrapped.trials]
    assert states == [t.state for t in bare.trials]
    assert states[3] == TrialState.PRUNED  # the median pruner's decision, not memory's
    assert all(tags.EMERGENCY_KILLED not in t.user_attrs for t in wrapped.trials)


def test_without_a_wrapped_pruner_it_never_prunes_when_memory_is_fine() -> None:
    study = optuna.create_study(pruner=MemoryGuardPruner(probe=FakeProbe(available_gb=10.0)))
    study.optimize(_cv_objective(_median_scores), n_trials=5)
    assert all(t.state == TrialState.COMPLETE for t in study.trials)


def test_prunes_at_the_split_where_memory_runs_short(caplog) -> None:
    caplog.set_level(logging.ERROR, logger="optuna_guard")
    probe = FakeProbe(available_gb=10.0)

    def on_step(number, step):
        probe.set(available_gb=1.5 if (number, step) == (0, 3) else 10.0)

    pruner = MemoryGuardPruner(MedianPruner(), probe=probe)
    study = optuna.create_study(pruner=pruner)
    study.optimize(_cv_objective(lambda n: [1.0] * 5, on_step=on_step), n_trials=2)
    first, second = study.trials
    assert first.state == TrialState.PRUNED
    assert sorted(first.intermediate_values) == [0, 1, 2, 3]
    assert (
        first.user_attrs[tags.KILL_REASON]
        == "OOM prevention [Trial #0 step 3]: available 1.50 GB < 2.00 GB"
    )
    assert first.user_attrs[tags.AVAILABLE_GB_AT_KILL] == 1.5
    assert second.state == TrialState.COMPLETE
    assert any("EMERGENCY BRAKE: Trial #0 step 3" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "probe_kwargs, pruner_kwargs, limit, detail",
    [
        (
            {"rss_gb": 3.5},
            {"max_trial_rss_gb": 3.0},
            "max_trial_rss_gb",
            "process tree RSS 3.50 GB > 3.00 GB",
        ),
        (
            {"total_gb": 10.0, "available_gb": 4.5},
            {"max_ram_percent": 50, "min_available_gb": 1.0, "warn_available_gb": 1.0},
            "max_ram_percent",
            "RAM 55.0% used > 50%",
        ),
        (
            {"swap_total_gb": 4.0, "swap_used_gb": 3.0},
            {"max_swap_percent": 60},
            "max_swap_percent",
            "swap 75.0% used > 60%",
        ),
        (
            {"gpus": [GpuMemory(1, "Fake", 16 * GB, 15 * GB)]},
            {"max_gpu_percent": 90},
            "max_gpu_percent",
            "GPU 1 memory 93.8% used > 90%",
        ),
    ],
)
def test_every_limit_names_itself(probe_kwargs, pruner_kwargs, limit, detail) -> None:
    study = optuna.create_study(
        pruner=MemoryGuardPruner(probe=FakeProbe(**probe_kwargs), **pruner_kwargs)
    )
    study.optimize(_cv_objective(lambda n: [1.0, 1.0]), n_trials=1)
    trial = study.trials[0]
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs[tags.KILL_LIMIT] == limit
    assert trial.user_attrs[tags.KILL_REASON].endswith(detail)


def test_warns_once_per_trial(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="optuna_guard")
    study = optuna.create_study(pruner=MemoryGuardPruner(probe=FakeProbe(available_gb=3.0)))
    study.optimize(_cv_objective(lambda n: [1.0] * 6), n_trials=2)
    warnings = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "Low memory" in r.getMessage()
    ]
    assert len(warnings) == 2
    assert all(t.state == TrialState.COMPLETE for t in study.trials)


def test_should_prune_is_a_preemption_boundary() -> None:
    def on_step(number, step):
        if step == 1:
            preemption.request_stop("SIGTERM")

    study = optuna.create_study(pruner=MemoryGuardPruner(MedianPruner(), probe=FakeProbe()))
    with pytest.raises(preemption.TrialPreempted):
        study.optimize(_cv_objective(lambda n: [1.0] * 4, on_step=on_step), n_trials=2)
    [trial] = study.trials
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs[tags.PREEMPTED] is True
    assert trial.user_attrs[tags.KILL_REASON] == "preempted: SIGTERM"


def test_properties_and_repr() -> None:
    inner = MedianPruner()
    pruner = MemoryGuardPruner(inner, min_available_gb=1.0, warn_available_gb=1.5)
    assert pruner.wrapped is inner
    assert pruner.limits.min_available_gb == 1.0
    assert "MedianPruner" in repr(pruner)


@pytest.mark.parametrize("url_fixture", ["postgres_url", "mysql_url"])
def test_tags_reach_server_storages(request, url_fixture, unique_study_name) -> None:
    """The pruner tags a FrozenTrial through study._storage (Optuna's cached RDB storage)."""
    url = request.getfixturevalue(url_fixture)
    probe = FakeProbe(available_gb=10.0)

    def on_step(number, step):
        probe.set(available_gb=1.0 if step == 1 else 10.0)

    study = optuna.create_study(
        storage=url, study_name=unique_study_name, pruner=MemoryGuardPruner(probe=probe)
    )
    try:
        study.optimize(_cv_objective(lambda n: [1.0, 1.0, 1.0], on_step=on_step), n_trials=1)
        [trial] = optuna.load_study(study_name=unique_study_name, storage=url).trials
        assert trial.state == TrialState.PRUNED
        assert trial.user_attrs[tags.EMERGENCY_KILLED] is True
        assert (
            trial.user_attrs[tags.KILL_REASON]
            == "OOM prevention [Trial #0 step 1]: available 1.00 GB < 2.00 GB"
        )
    finally:
        optuna.delete_study(study_name=unique_study_name, storage=url)
