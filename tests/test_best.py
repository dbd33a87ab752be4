"""One definition of "best valid trial" (optuna_guard._best), and status, report and the launch
summary naming the same trial with it."""

from __future__ import annotations

import json
import math
import random

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState, create_trial

from optuna_guard import retries, tags
from optuna_guard._best import STOP_TAGS, best_valid, best_valid_trials, is_feasible, is_valid
from optuna_guard.cli import main
from optuna_guard.supervisor._summary import best_of

optuna.logging.set_verbosity(optuna.logging.WARNING)

MIN = [StudyDirection.MINIMIZE]
MAX = [StudyDirection.MAXIMIZE]
MIN2 = [StudyDirection.MINIMIZE, StudyDirection.MINIMIZE]


def _trial(
    number: int,
    values: list[float] | None,
    *,
    state: TrialState = TrialState.COMPLETE,
    attrs: dict[str, object] | None = None,
    constraints: list[float] | dict[str, float] | None = None,
) -> FrozenTrial:
    system: dict[str, object] = {}
    if isinstance(constraints, list):  # the format Optuna's samplers write (constraints_func)
        system["constraints"] = constraints
    elif constraints is not None:  # Trial.set_constraint's format
        system.update({f"constraints:{k}": v for k, v in constraints.items()})
    trial = create_trial(
        state=state,
        values=values if state == TrialState.COMPLETE else None,
        params={"x": float(number)},
        distributions={"x": FloatDistribution(-1e9, 1e9)},
        user_attrs=dict(attrs or {}),
        system_attrs=system,
    )
    trial.number = number
    return trial


# -- validity: one row per way a trial can end -------------------------------------------------


@pytest.mark.parametrize(
    ("trial", "valid"),
    [
        (_trial(0, [1.0]), True),
        (_trial(0, [1.0], attrs={tags.RETRY_OF: 3, tags.PEAK_RSS_GB: 2.0}), True),
        (_trial(0, None, state=TrialState.PRUNED), False),
        (_trial(0, None, state=TrialState.FAIL), False),
        (_trial(0, None, state=TrialState.RUNNING), False),
        (_trial(0, None, state=TrialState.WAITING), False),
        *[(_trial(0, [1.0], attrs={tag: True}), False) for tag in STOP_TAGS],
        (_trial(0, [1.0], attrs={tags.EMERGENCY_KILLED: False}), True),
    ],
    ids=lambda p: repr(p) if isinstance(p, bool) else None,
)
def test_valid_means_complete_and_not_stopped_early(trial: FrozenTrial, valid: bool) -> None:
    assert is_valid(trial) is valid


def test_the_stop_tags_are_every_end_a_retry_can_be_asked_for() -> None:
    assert set(STOP_TAGS) == retries.RETRYABLE_ENDS


@pytest.mark.parametrize(
    ("constraints", "feasible"),
    [
        (None, True),
        ([], True),
        ([0.0], True),
        ([-1.0, 0.0], True),
        ([-1.0, 0.5], False),
        ([math.nan], False),
        ({"memory": -0.1}, True),
        ({"memory": 2.0}, False),
    ],
)
def test_feasible_is_optunas_rule(constraints, feasible: bool) -> None:
    assert is_feasible(_trial(0, [1.0], constraints=constraints)) is feasible


# -- the best among trials: one row per situation ----------------------------------------------


@pytest.mark.parametrize(
    ("trials", "directions", "best", "valid", "feasible", "constrained"),
    [
        ([], MIN, [], 0, 0, False),
        ([_trial(0, [3.0]), _trial(1, [1.0]), _trial(2, [2.0])], MIN, [1], 3, 3, False),
        ([_trial(0, [3.0]), _trial(1, [1.0]), _trial(2, [2.0])], MAX, [0], 3, 3, False),
        # ties go to the earliest trial, whichever the direction
        ([_trial(0, [2.0]), _trial(1, [1.0]), _trial(2, [1.0])], MIN, [1], 3, 3, False),
        ([_trial(0, [2.0]), _trial(1, [2.0]), _trial(2, [1.0])], MAX, [0], 3, 3, False),
        # a killed trial that still completed (the objective swallowed the stop) does not count
        (
            [_trial(0, [0.1], attrs={tags.EMERGENCY_KILLED: True}), _trial(1, [0.5])],
            MIN,
            [1],
            1,
            1,
            False,
        ),
        (
            [_trial(0, [0.1], attrs={tags.PREEMPTED: True}), _trial(1, [0.5])],
            MIN,
            [1],
            1,
            1,
            False,
        ),
        # an infeasible trial with the best value is skipped; constraint formats both read
        (
            [
                _trial(0, [0.1], constraints=[2.0]),
                _trial(1, [0.3], constraints=[-1.0]),
                _trial(2, [0.2], constraints={"memory": 0.5}),
                _trial(3, [0.4], constraints={"memory": -0.5}),
            ],
            MIN,
            [1],
            4,
            2,
            True,
        ),
        # no feasible trial: no best, the counts say why
        ([_trial(0, [0.1], constraints=[1.0])], MIN, [], 1, 0, True),
        # only killed trials: no best
        ([_trial(0, [0.1], attrs={tags.WORKER_LOST: True})], MIN, [], 0, 0, False),
        # infinities are values like any other
        ([_trial(0, [-math.inf]), _trial(1, [0.0])], MIN, [0], 2, 2, False),
        # several objectives: the Pareto front of the valid, feasible trials, by number
        (
            [
                _trial(0, [1.0, 3.0]),
                _trial(1, [2.0, 2.0]),
                _trial(2, [3.0, 3.0]),
                _trial(3, [0.5, 0.5], attrs={tags.EMERGENCY_KILLED: True}),
                _trial(4, [0.1, 0.1], constraints=[1.0]),
                _trial(5, [3.0, 1.0]),
            ],
            MIN2,
            [0, 1, 5],
            5,
            4,
            True,
        ),
    ],
)
def test_best_valid(trials, directions, best, valid, feasible, constrained) -> None:
    found = best_valid(trials, directions)
    assert [t.number for t in found.trials] == best
    assert (found.valid, found.feasible, found.constrained) == (valid, feasible, constrained)
    assert [t.number for t in best_valid_trials(trials, directions)] == best


def test_without_stop_tags_it_is_what_optuna_calls_best() -> None:
    """On studies optuna-guard never tagged, the rule is Optuna's best_trial / best_trials."""
    rng = random.Random(7)
    for directions in (["minimize"], ["maximize"], ["minimize", "maximize"]):
        study = optuna.create_study(directions=directions)
        for _ in range(40):
            trial = study.ask()
            if rng.random() < 0.3:
                trial.set_constraint("memory", rng.uniform(-1, 1))
            if rng.random() < 0.2:
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, [round(rng.uniform(0, 1), 1) for _ in directions])
        mine = best_valid_trials(study.get_trials(), study.directions)
        if len(directions) == 1:
            assert mine[0].value == study.best_value
        else:
            assert {t.number for t in mine} == {t.number for t in study.best_trials}


# -- status, report and the launch summary name the same trial ---------------------------------


def _constrained_study(url: str, name: str) -> optuna.Study:
    """Trials 0-5, minimised; the constraints come from TPESampler's constraints_func (system
    attr "constraints"). 0: infeasible with the lowest value; 1: killed by a memory limit but
    COMPLETE (the objective returned after the stop); 2: preempted, COMPLETE; 3: the best valid
    trial (0.30); 4, 5: worse valid trials."""
    values = {0: 0.05, 1: 0.10, 2: 0.20, 3: 0.30, 4: 0.40, 5: 0.50}
    stopped = {1: tags.killed("trial RSS 7.3 GB > 7.0 GB"), 2: tags.preempted("SIGTERM")}

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_int("x", 0, 5)
        for key, value in stopped.get(x, {}).items():
            trial.set_user_attr(key, value)
        return values[x]

    sampler = optuna.samplers.TPESampler(
        seed=0, constraints_func=lambda t: [1.0 if t.params["x"] == 0 else -1.0]
    )
    study = optuna.create_study(study_name=name, storage=url, sampler=sampler)
    for x in values:
        study.enqueue_trial({"x": x})
    study.optimize(objective, n_trials=len(values))
    return study


# Optuna 5 deprecates constraints_func in favour of set_constraint; studies made with it remain.
@pytest.mark.filterwarnings("ignore:`constraints_func` has been deprecated:FutureWarning")
def test_status_report_and_summary_name_the_same_best_trial(tmp_path, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'constrained.db'}"
    study = _constrained_study(url, "constrained")
    trials = study.get_trials()
    assert trials[0].system_attrs["constraints"] == [1.0]  # Optuna stored it, not us
    assert study.best_trial.number == 1  # Optuna knows constraints, not our stop tags

    assert [t.number for t in best_valid_trials(trials, study.directions)] == [3]

    assert main(["status", "--study-name", "constrained", "--storage", url, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["best"]["number"] == 3 and status["best"]["value"] == pytest.approx(0.3)
    assert [t["number"] for t in status["best_trials"]] == [3]

    assert main(["status", "--study-name", "constrained", "--storage", url]) == 0
    assert "Best valid trial 3: value 0.3," in capsys.readouterr().out

    args = ["report", "--study-name", "constrained", "--storage", url, "--format", "json"]
    assert main(args) == 0
    best = json.loads(capsys.readouterr().out)["best"]
    assert [t["number"] for t in best["trials"]] == [3]
    # valid: 0, 3, 4, 5 (1 and 2 were stopped early); feasible: 3, 4, 5
    assert (best["valid_complete"], best["feasible_complete"], best["constrained"]) == (4, 3, True)

    assert best_of(trials, study.directions) == (pytest.approx(0.3), (3,))


def test_status_shows_the_pareto_front(tmp_path, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'mo.db'}"
    study = optuna.create_study(study_name="mo", storage=url, directions=["minimize"] * 2)
    for values in ([1.0, 3.0], [2.0, 2.0], [3.0, 3.0]):
        study.tell(study.ask(), values)
    assert main(["status", "--study-name", "mo", "--storage", url, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["best"] is None and [t["number"] for t in status["best_trials"]] == [0, 1]
    assert status["best_trials"][1]["values"] == [2.0, 2.0]
    assert main(["status", "--study-name", "mo", "--storage", url]) == 0
    assert "Best valid trials (Pareto front): 0, 1" in capsys.readouterr().out
    assert best_of(study.get_trials(), study.directions) == (None, (0, 1))


def test_with_several_objective_versions_both_take_the_best_of_the_current_one(
    tmp_path, capsys
) -> None:
    """Values of different objective versions measure different things: status and report
    both take the best from the current version (before, status took it over all versions)."""
    from optuna_guard.fingerprint import CURRENT_ATTR, OBJECTIVE_VERSION, VERSIONS_ATTR

    url = f"sqlite:///{tmp_path / 'versions.db'}"
    study = optuna.create_study(study_name="v", storage=url)
    for version, value in ((1, 0.1), (1, 0.5), (2, 0.4), (2, 0.3)):
        trial = study.ask()
        trial.set_user_attr(OBJECTIVE_VERSION, version)
        study.tell(trial, value)
    study._storage.set_study_system_attr(study._study_id, CURRENT_ATTR, 2)
    study._storage.set_study_system_attr(
        study._study_id, VERSIONS_ATTR, [{"version": 1}, {"version": 2}]
    )
    assert main(["status", "--study-name", "v", "--storage", url, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["best"]["number"] == 3 and status["best_from_version"] == 2
    assert main(["report", "--study-name", "v", "--storage", url, "--format", "json"]) == 0
    assert [t["number"] for t in json.loads(capsys.readouterr().out)["best"]["trials"]] == [3]
    assert main(["status", "--study-name", "v", "--storage", url]) == 0
    assert "Best valid trial 3 (objective version 2): value 0.3" in capsys.readouterr().out
    args = ["status", "--study-name", "v", "--storage", url, "--json", "--objective-version", "1"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["best"]["number"] == 0
