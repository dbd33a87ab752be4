"""The result cache: a repeated COMPLETE configuration is served without calling the objective.

Standalone ``@guard(cache=True)`` on SQLite (and PostgreSQL), with ``n_jobs=2``, and under the
launcher with 2 workers; PRUNED, FAIL and killed results are never served; multi-objective
values are served whole.
"""

from __future__ import annotations

import os
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState
from supervisor_helpers import FAST, cli

from optuna_guard import guard, tags
from optuna_guard.fingerprint import OBJECTIVE_VERSION
from optuna_guard.result_cache import CACHED_FROM, ResultCache, cache_key, canonical_params

OBJECTIVE_FILE = """
import os, time

def objective(trial):
    x = trial.suggest_categorical("x", [0, 1, 2])
    y = trial.suggest_categorical("y", ["a", "b"])
    with open(os.environ["CALLS_FILE"], "a") as handle:
        handle.write(f"{trial.number} {x} {y}\\n")
    time.sleep(0.05)
    return x + (0.5 if y == "a" else 0.0)
"""


@pytest.fixture(params=["sqlite", "postgres"])
def storage_url(request, tmp_path, unique_study_name):
    """A storage URL; on PostgreSQL the test's study is deleted afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cache.db'}"
        return
    url = request.getfixturevalue("postgres_url")
    yield url
    try:
        optuna.delete_study(study_name=unique_study_name, storage=url)
    except KeyError:
        pass


def test_canonical_key_sorts_keys_and_writes_floats_exactly():
    assert canonical_params({"b": 0.1, "a": 1}) == '{"a":1,"b":0.1}'
    assert cache_key({"a": 1, "b": 0.1}, "d") == cache_key({"b": 0.1, "a": 1}, "d")
    assert cache_key({"a": 0.1}, "d") != cache_key({"a": 0.1 + 1e-12}, "d")
    assert cache_key({"a": 1}, "d") != cache_key({"a": 1.0}, "d")  # int and float params differ
    assert cache_key({"a": 1}, "d1") != cache_key(
        {"a": 1}, "d2"
    )  # the fingerprint is part of the key


def _counting_objective(calls: list[int], *, cache: bool = True, prune_first: bool = False):
    pruned: set[tuple] = set()

    @guard(cache=cache)
    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_int("x", 0, 3)
        y = trial.suggest_float("y", 0.0, 1.0, step=0.5)
        calls.append(trial.number)
        if prune_first and (x, y) not in pruned:
            pruned.add((x, y))
            raise optuna.TrialPruned()
        return x * 10 + y

    return objective


def test_repeated_configuration_is_served_without_calling_the_objective(
    storage_url, unique_study_name, quiet_optuna
):
    study = optuna.create_study(study_name=unique_study_name, storage=storage_url)
    calls: list[int] = []
    objective = _counting_objective(calls)
    for _ in range(3):
        study.enqueue_trial({"x": 2, "y": 0.5})
    study.enqueue_trial({"x": 1, "y": 0.0})
    study.optimize(objective, n_trials=4)

    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert calls == [0, 3]  # trials 1 and 2 repeat trial 0: no objective call
    assert [t.user_attrs.get(CACHED_FROM) for t in trials] == [None, 0, 0, None]
    assert [t.value for t in trials] == [20.5, 20.5, 20.5, 10.0]
    assert all(t.params == trials[0].params for t in trials[:3])
    assert all(t.user_attrs[OBJECTIVE_VERSION] == 1 for t in trials)
    assert trials[1].intermediate_values == {}


def test_sampled_repeat_is_served_before_the_objective_runs(tmp_path, quiet_optuna):
    """Params are drawn before the objective runs (the space every earlier trial had), so a
    sampler's repeat costs no objective call at all."""
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 's.db'}", sampler=optuna.samplers.RandomSampler(seed=1)
    )
    calls: list[int] = []
    study.optimize(_counting_objective(calls), n_trials=40)
    trials = study.get_trials()
    configs = {(t.params["x"], t.params["y"]) for t in trials}
    cached = [t for t in trials if t.user_attrs.get(CACHED_FROM) is not None]
    assert len(configs) <= 12 and len(cached) >= 20
    assert len(calls) == len(configs) == 40 - len(cached)  # every distinct config ran exactly once
    by_number = {t.number: t for t in trials}
    for trial in cached:
        origin = by_number[trial.user_attrs[CACHED_FROM]]
        assert origin.params == trial.params and origin.value == trial.value
        assert origin.user_attrs.get(CACHED_FROM) is None


def test_n_jobs_2_serves_repeats_and_counts_races(tmp_path, quiet_optuna):
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 's.db'}", sampler=optuna.samplers.RandomSampler(seed=3)
    )
    calls: list[int] = []
    lock = threading.Lock()

    @guard(cache=True)
    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_categorical("x", [0, 1, 2])
        with lock:
            calls.append(trial.number)
        time.sleep(0.02)
        return float(x)

    study.optimize(objective, n_trials=30, n_jobs=2)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    cached = [t for t in trials if t.user_attrs.get(CACHED_FROM) is not None]
    assert len(trials) == 30
    assert len(calls) + len(cached) == 30
    # at most one simultaneous duplicate per configuration and thread
    assert 3 <= len(calls) <= 3 * 2
    assert all(t.value == t.params["x"] for t in trials)


def test_pruned_failed_and_killed_results_are_recomputed(tmp_path, quiet_optuna):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    calls: list[int] = []
    objective = _counting_objective(calls, prune_first=True)
    for _ in range(2):
        study.enqueue_trial({"x": 3, "y": 1.0})
    study.optimize(objective, n_trials=2)
    assert [t.state for t in study.get_trials()] == [TrialState.PRUNED, TrialState.COMPLETE]
    assert calls == [0, 1]  # the PRUNED configuration ran again


@pytest.mark.parametrize(
    ("state", "attrs"),
    [
        (TrialState.COMPLETE, {tags.EMERGENCY_KILLED: True}),  # a kill that raced the trial's end
        (TrialState.PRUNED, {tags.EMERGENCY_KILLED: True}),  # killed by the launcher
        (TrialState.FAIL, {tags.WORKER_CRASHED: True}),
        (TrialState.COMPLETE, {tags.PREEMPTED: True}),
        (TrialState.COMPLETE, {tags.WORKER_LOST: True}),  # ended from outside: result suspect
        (TrialState.COMPLETE, {tags.TIMED_OUT: True}),
        (TrialState.COMPLETE, {tags.DIVERGED: True}),
    ],
)
def test_killed_crashed_and_failed_results_are_not_served(tmp_path, quiet_optuna, state, attrs):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    dist = {
        "x": optuna.distributions.IntDistribution(0, 3),
        "y": optuna.distributions.FloatDistribution(0, 1, step=0.5),
    }
    study.add_trial(
        optuna.trial.create_trial(
            params={"x": 3, "y": 1.0},
            distributions=dist,
            value=99.0 if state == TrialState.COMPLETE else None,
            state=state,
            user_attrs={**attrs, OBJECTIVE_VERSION: 1},
        )
    )
    calls: list[int] = []
    study.enqueue_trial({"x": 3, "y": 1.0})
    study.optimize(_counting_objective(calls), n_trials=1)
    new = study.get_trials()[-1]
    assert calls == [new.number]
    assert new.value == 31.0 and CACHED_FROM not in new.user_attrs


def test_multi_objective_values_are_served_whole(tmp_path, quiet_optuna):
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 's.db'}", directions=["minimize", "maximize"]
    )
    calls: list[int] = []

    @guard(cache=True)
    def objective(trial: optuna.Trial) -> tuple[float, float]:
        x = trial.suggest_categorical("x", ["p", "q"])
        calls.append(trial.number)
        return (1.25, -7.5) if x == "p" else (3.0, 4.0)

    for x in ("p", "q", "p"):
        study.enqueue_trial({"x": x})
    study.optimize(objective, n_trials=3)
    trials = study.get_trials()
    assert calls == [0, 1]
    assert trials[2].values == [1.25, -7.5] and trials[2].user_attrs[CACHED_FROM] == 0
    assert trials[2].state == TrialState.COMPLETE


def test_index_is_incremental_and_only_indexes_the_current_version():
    study = optuna.create_study()
    dist = {"x": optuna.distributions.IntDistribution(0, 100)}

    def add(x: int, version: int, state: TrialState = TrialState.COMPLETE) -> None:
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": x},
                distributions=dist,
                value=float(x) if state == TrialState.COMPLETE else None,
                state=state,
                user_attrs={OBJECTIVE_VERSION: version},
            )
        )

    for x, version in ((0, 1), (1, 1), (2, 1), (3, 2), (4, 2)):
        add(x, version)
    add(7, 2, TrialState.FAIL)
    cache = ResultCache(study._study_id, version=2, digest="d")
    cache.refresh(study._storage)
    assert (
        len(cache) == 2 and cache.lookup({"x": 3}).number == 3 and cache.lookup({"x": 0}) is None
    )
    assert cache.lookup({"x": 7}) is None
    add(5, 2)
    cache.refresh(study._storage)
    assert len(cache) == 3 and cache.lookup({"x": 5}).values == (5.0,)
    assert cache.search_space == dist


def _write_objective(tmp_path) -> str:
    path = tmp_path / "obj.py"
    path.write_text(OBJECTIVE_FILE)
    return str(path)


def test_launcher_with_two_workers_serves_repeats(tmp_path, storage_url, unique_study_name):
    spec = f"{_write_objective(tmp_path)}:objective"
    calls_file = tmp_path / "calls.txt"
    env = {**os.environ, "CALLS_FILE": str(calls_file)}
    result = cli(
        "run",
        spec,
        "--study-name",
        unique_study_name,
        "--storage",
        storage_url,
        "--workers",
        "2",
        "--n-trials",
        "16",
        "--cache",
        "--sampler",
        "random",
        "--seed",
        "0",
        "--log-dir",
        str(tmp_path / "logs"),
        "--display",
        "off",
        "--check-interval",
        str(FAST["check_interval"]),
        "--max-worker-age",
        "off",
        cwd=str(tmp_path),
        env=env,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    study = optuna.load_study(study_name=unique_study_name, storage=storage_url)
    trials = study.get_trials()
    assert len(trials) == 16 and all(t.state == TrialState.COMPLETE for t in trials)
    calls = calls_file.read_text().splitlines()
    cached = [t for t in trials if t.user_attrs.get(CACHED_FROM) is not None]
    assert len(calls) + len(cached) == 16
    # each configuration ran at least once and at most twice (both workers proposing it before
    # either finished)
    distinct = len({(t.params["x"], t.params["y"]) for t in trials})
    assert distinct <= len(calls) <= 2 * distinct
    assert cached, "16 trials on 6 configurations must serve repeats"
    assert {t.user_attrs.get(tags.WORKER_ID) for t in cached} <= {1, 2}
    by_number = {t.number: t for t in trials}
    for trial in cached:
        origin = by_number[trial.user_attrs[CACHED_FROM]]
        assert origin.params == trial.params and origin.value == trial.value
    assert all(t.user_attrs[OBJECTIVE_VERSION] == 1 for t in trials)
