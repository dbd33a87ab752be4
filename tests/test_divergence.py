"""DivergencePruner: NaN/Inf and explosions prune at once with tags in the storage; otherwise
the wrapped pruner decides; it composes with MemoryGuardPruner in both orders; it is a
preemption boundary."""

from __future__ import annotations

import math
import uuid
from typing import Any

import optuna
import pytest
from fakes import FakeProbe
from optuna.pruners import BasePruner, MedianPruner
from optuna.trial import TrialState

from optuna_guard import preemption, tags
from optuna_guard.divergence import DivergencePruner
from optuna_guard.exceptions import ConfigError
from optuna_guard.pruners import MemoryGuardPruner

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> optuna.storages.RDBStorage:
    from optuna_guard.storage import open_storage

    return open_storage(f"sqlite:///{tmp_path_factory.mktemp('db') / 'divergence.db'}")


def _study(storage: Any, pruner: BasePruner, direction: str = "minimize") -> optuna.Study:
    return optuna.create_study(
        storage=storage,
        pruner=pruner,
        direction=direction,
        study_name=f"div-{uuid.uuid4().hex[:8]}",
    )


def _run(study: optuna.Study, values: list[float]) -> tuple[optuna.trial.FrozenTrial, int | None]:
    """One trial reporting ``values`` at steps 0, 1, ...; returns it and the step it was pruned at."""
    pruned_at: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        for step, value in enumerate(values):
            trial.report(value, step)
            if trial.should_prune():
                pruned_at.append(step)
                raise optuna.TrialPruned()
        return values[-1]

    study.optimize(objective, n_trials=1)
    frozen = study.trials[-1]
    return frozen, (pruned_at[0] if pruned_at else None)


@pytest.mark.parametrize(
    ("values", "direction", "pruned_at", "reason"),
    [
        ([1.0, 0.9, math.nan, 0.5], "minimize", 2, "NaN at step 2"),
        ([1.0, math.inf], "minimize", 1, "+Inf at step 1"),
        ([0.5, -math.inf], "maximize", 1, "-Inf at step 1"),
        ([1.0, 0.5, 0.4, 4.5], "minimize", 3, "exploded at step 3"),  # > 10x the best 0.4
        ([1.0, 0.5, 0.4, 3.9], "minimize", None, None),  # < 10x: fine
        ([-2.0, -3.0, 31.0], "minimize", 2, "exploded at step 2"),  # |31| > 10 * |-3|
        ([-2.0, -3.0, 30.0], "minimize", None, None),  # crossing zero, not more than 10x
        ([0.8, 0.9, -9.1], "maximize", 2, "exploded at step 2"),  # |-9.1| > 10 * 0.9
        ([0.8, 0.9, -8.2], "maximize", None, None),
        # issue 16 item 5: no explosion without a scale, and crossing zero is not an explosion
        ([0.0, 1e-6], "minimize", None, None),
        ([0.0, 0.0, 1e-3], "minimize", None, None),
        ([-0.1, 1.0], "minimize", None, None),
        ([0.1, -1.0], "maximize", None, None),
        (
            [1e-3, 0.0, 5.0],
            "minimize",
            2,
            "exploded at step 2",
        ),  # best 0: scale from the values (5e-4)
        ([0.8, 0.9, 0.1], "maximize", None, None),  # an accuracy drop is not divergence
        ([5.0, 100.0], "minimize", 1, "exploded at step 1"),
    ],
)
def test_divergence_table(
    storage: Any, values: list[float], direction: str, pruned_at: int | None, reason: str | None
) -> None:
    study = _study(storage, DivergencePruner(), direction)
    trial, step = _run(study, values)
    assert step == pruned_at
    if reason is None:
        assert trial.state == TrialState.COMPLETE
        assert tags.DIVERGED not in trial.user_attrs
    else:
        assert trial.state == TrialState.PRUNED
        assert trial.user_attrs[tags.DIVERGED] is True
        assert trial.user_attrs[tags.KILL_REASON].startswith(reason)


def test_warmup_delays_explosion_checks_but_not_nan(storage: Any) -> None:
    study = _study(storage, DivergencePruner(warmup_steps=3))
    trial, step = _run(study, [1.0, 50.0, 60.0, 0.5])
    assert step is None and trial.state == TrialState.COMPLETE
    trial, step = _run(study, [1.0, math.nan])
    assert step == 1 and trial.user_attrs[tags.KILL_REASON] == "NaN at step 1"


@pytest.mark.parametrize(
    "wrapped",
    [
        MedianPruner(n_warmup_steps=3),
        optuna.pruners.PercentilePruner(50.0, n_warmup_steps=3),
        optuna.pruners.ThresholdPruner(upper=1e9, n_warmup_steps=3),
        optuna.pruners.PatientPruner(MedianPruner(n_warmup_steps=3), patience=5),
    ],
)
def test_the_wrapped_pruners_warmup_delays_explosion_checks(storage: Any, wrapped) -> None:
    study = _study(storage, DivergencePruner(wrapped))
    trial, step = _run(study, [1.0, 50.0, 60.0, 0.5])
    assert step is None and trial.state == TrialState.COMPLETE
    trial, step = _run(study, [1.0, 1.0, 1.0, 100.0])
    assert step == 3 and trial.user_attrs[tags.KILL_REASON].startswith("exploded at step 3")
    trial, step = _run(study, [1.0, math.nan])
    assert step == 1  # NaN is never warmed up


@pytest.mark.parametrize(
    "make",
    [
        lambda p: DivergencePruner(p),
        lambda p: MemoryGuardPruner(p),
        lambda p: MemoryGuardPruner(DivergencePruner(p)),
    ],
)
def test_wrapping_hyperband_keeps_its_brackets(make) -> None:
    import copy
    import pickle

    hyperband = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=9, reduction_factor=3)
    pruner = make(hyperband)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner) and type(pruner).__name__ in repr(
        pruner
    )
    study = optuna.create_study(pruner=pruner, sampler=optuna.samplers.RandomSampler(seed=0))
    ids = {}
    for _ in range(12):
        trial = study.ask()
        filtered = optuna.pruners._filter_study(study, study._storage.get_trial(trial._trial_id))
        assert filtered is not study  # a bracket study, as with the bare HyperbandPruner
        ids[trial.number] = hyperband._get_bracket_id(study, trial)
        assert pruner._get_bracket_id(study, trial) == ids[trial.number]
        trial.report(1.0, 1)
        trial.should_prune()
        study.tell(trial, 1.0)
    assert len(set(ids.values())) > 1
    assert pruner._n_brackets == hyperband._n_brackets  # other attributes read through
    for clone in (pickle.loads(pickle.dumps(pruner)), copy.deepcopy(pruner)):
        assert type(clone) is type(pruner) and isinstance(clone, optuna.pruners.HyperbandPruner)
    assert not isinstance(DivergencePruner(MedianPruner()), optuna.pruners.HyperbandPruner)


def test_explode_factor_none_checks_only_nan(storage: Any) -> None:
    study = _study(storage, DivergencePruner(explode_factor=None))
    assert _run(study, [1.0, 1e9])[1] is None
    assert _run(study, [1.0, math.nan])[1] == 1


def test_defers_to_the_wrapped_pruner(storage: Any) -> None:
    study = _study(storage, DivergencePruner(MedianPruner(n_startup_trials=1, n_warmup_steps=0)))
    first, _ = _run(study, [1.0, 1.0, 1.0])
    second, step = _run(study, [5.0, 5.0, 5.0])  # worse than the median, finite: Median prunes
    assert first.state == TrialState.COMPLETE
    assert second.state == TrialState.PRUNED and step == 0
    assert tags.DIVERGED not in second.user_attrs  # not a divergence


def test_without_a_wrapped_pruner_finite_values_never_prune(storage: Any) -> None:
    study = _study(storage, DivergencePruner())
    _run(study, [1.0, 1.0])
    assert _run(study, [5.0, 5.0])[1] is None


@pytest.mark.parametrize("outer", ["divergence", "memory"])
def test_composes_with_memory_guard_pruner(storage: Any, outer: str) -> None:
    probe = FakeProbe(available_gb=12.0)
    if outer == "divergence":
        pruner: BasePruner = DivergencePruner(
            MemoryGuardPruner(MedianPruner(), min_available_gb=2.0, probe=probe)
        )
    else:
        pruner = MemoryGuardPruner(
            DivergencePruner(MedianPruner()), min_available_gb=2.0, probe=probe
        )
    study = _study(storage, pruner)

    nan_trial, step = _run(study, [1.0, math.nan])  # divergence decides, memory is fine
    assert step == 1 and nan_trial.user_attrs[tags.DIVERGED] is True
    assert tags.EMERGENCY_KILLED not in nan_trial.user_attrs

    probe.set(available_gb=1.0)  # memory decides on a healthy curve
    mem_trial, step = _run(study, [1.0, 0.9])
    assert step == 0 and mem_trial.state == TrialState.PRUNED
    assert mem_trial.user_attrs[tags.EMERGENCY_KILLED] is True
    assert tags.DIVERGED not in mem_trial.user_attrs

    probe.set(available_gb=12.0)
    ok_trial, step = _run(study, [1.0, 0.9])
    assert step is None and ok_trial.state == TrialState.COMPLETE


def test_should_prune_is_a_preemption_boundary(storage: Any) -> None:
    study = _study(storage, DivergencePruner())

    def objective(trial: optuna.Trial) -> float:
        trial.report(1.0, 0)
        preemption.request_stop("SIGTERM")
        trial.report(0.9, 1)
        trial.should_prune()
        return 0.0

    with pytest.raises(preemption.TrialPreempted):
        study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs[tags.PREEMPTED] is True
    assert trial.user_attrs[tags.KILL_REASON] == "preempted: SIGTERM"


def test_boundary_can_be_switched_off(storage: Any) -> None:
    study = _study(storage, DivergencePruner(stop_boundary=False))
    preemption.request_stop("SIGTERM")
    assert _run(study, [1.0, 0.9])[0].state == TrialState.COMPLETE


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"explode_factor": 1.0}, "explode_factor"),
        ({"explode_factor": math.nan}, "explode_factor"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"min_scale": 0}, "min_scale"),
    ],
)
def test_validation(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        DivergencePruner(**kwargs)
    with pytest.raises(ConfigError, match="wrapped"):
        DivergencePruner("median")  # type: ignore[arg-type]
