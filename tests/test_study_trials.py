"""``optuna-guard run --study-trials N``: a study-wide target counted in the storage.

Unit tests drive StudyTarget on a real storage; launcher tests run the CLI as a user would, on
SQLite and PostgreSQL, one and two launchers on one study.
"""

from __future__ import annotations

import os

import optuna
import pytest
from optuna.trial import TrialState
from supervisor_helpers import assert_nothing_running, cli, objective_spec, start_cli, trials_of

from optuna_guard.exceptions import ConfigError
from optuna_guard.supervisor._config import LaunchConfig
from optuna_guard.supervisor._study_target import StudyTarget

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _study_with(url: str, name: str, states: list[TrialState]) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=url)
    for state in states:
        trial = study.ask()
        if state == TrialState.RUNNING:
            continue
        study.tell(trial, 1.0 if state == TrialState.COMPLETE else None, state=state)
    return study


def _target(study: optuna.Study, n: int) -> StudyTarget:
    return StudyTarget(n, study._storage, study._study_id)


# ------------------------------------------------------------------------- unit
def test_counts_complete_and_pruned_only(sqlite_url, unique_study_name):
    study = _study_with(
        sqlite_url,
        unique_study_name,
        [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING],
    )
    study.enqueue_trial({})  # a WAITING retry does not count either
    assert _target(study, 10).count() == 2


@pytest.mark.parametrize(
    "finished,in_flight,target,granted",
    [
        (0, 0, 1, True),
        (2, 1, 4, True),
        (2, 2, 4, False),  # the running trials will make the target: exact on one launcher
        (4, 0, 4, False),  # reached
        (5, 0, 4, False),  # already past it (other launchers' overshoot)
    ],
)
def test_deny_reason_table(sqlite_url, unique_study_name, finished, in_flight, target, granted):
    study = _study_with(sqlite_url, unique_study_name, [TrialState.COMPLETE] * finished)
    reason = _target(study, target).deny_reason(in_flight)
    assert (reason is None) == granted, reason


def test_reached_is_final_and_says_so(sqlite_url, unique_study_name):
    study = _study_with(sqlite_url, unique_study_name, [TrialState.COMPLETE] * 3)
    target = _target(study, 3)
    assert target.deny_reason(0) == "study target reached: 3 of --study-trials 3 trials finished"
    assert target.reached
    optuna.delete_study(
        study_name=unique_study_name, storage=sqlite_url
    )  # no second read after reaching it
    assert target.deny_reason(0) is not None


def test_own_trials_still_being_written_count(sqlite_url, unique_study_name):
    """A trial this launch ended PRUNED whose storage write is still queued counts once."""
    study = _study_with(sqlite_url, unique_study_name, [TrialState.COMPLETE, TrialState.RUNNING])
    running_id = study.trials[1]._trial_id
    complete_id = study.trials[0]._trial_id
    target = _target(study, 5)
    assert target.count({running_id: "PRUNED", complete_id: "COMPLETE"}) == 2
    assert target.count({running_id: "FAIL"}) == 1


def test_new_study_has_nothing_finished():
    target = StudyTarget(3, optuna.storages.InMemoryStorage(), None)
    assert target.count() == 0 and target.deny_reason(2) is None


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_config_rejects_bad_study_trials(bad):
    with pytest.raises(ConfigError, match="--study-trials"):
        LaunchConfig(objective="m:f", study_name="s", study_trials=bad)


# ------------------------------------------------------------------------- launcher
def _run(url: str, study: str, tmp_path, *extra: str) -> list[str]:
    return [
        "run",
        objective_spec("launcher_quick"),
        "--study-name",
        study,
        "--storage",
        url,
        "--log-dir",
        str(tmp_path / "logs"),
        "--check-interval",
        "0.05",
        "--display",
        "off",
        "--min-available-gb",
        "0.25",
        "--warn-available-gb",
        "0.5",
        *extra,
    ]


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("postgres_url")


def test_one_launcher_reaches_the_target_exactly_and_a_relaunch_ends_at_once(
    url, tmp_path, unique_study_name
):
    _study_with(url, unique_study_name, [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED])
    result = cli(
        *_run(url, unique_study_name, tmp_path, "--workers", "3", "--study-trials", "7"),
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    trials = trials_of(url, unique_study_name)
    assert (
        sum(t.state in FINISHED for t in trials) == 7
    )  # 2 before + 5 now, no overshoot with 3 workers
    assert_nothing_running(trials)
    assert "Study target reached: 7 of --study-trials 7" in result.stderr

    again = cli(
        *_run(url, unique_study_name, tmp_path, "--workers", "3", "--study-trials", "7"),
        cwd=str(tmp_path),
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.strip().count("\n") == 0  # one line
    assert (
        "nothing to run, the study already has 7 finished trials (--study-trials 7)"
        in again.stdout
    )
    assert "Worker 1 started" not in again.stderr
    assert len(trials_of(url, unique_study_name)) == len(trials)


def test_n_trials_keeps_its_per_launch_meaning(tmp_path, unique_study_name):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    result = cli(
        *_run(
            url,
            unique_study_name,
            tmp_path,
            "--workers",
            "2",
            "--n-trials",
            "3",
            "--study-trials",
            "50",
        ),
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(trials_of(url, unique_study_name)) == 3


@pytest.mark.postgres
def test_two_launchers_overshoot_at_most_their_running_trials(
    postgres_url, tmp_path, unique_study_name
):
    env = {**os.environ, "LAUNCHER_TEST_SLEEP": "0.3"}
    optuna.create_study(study_name=unique_study_name, storage=postgres_url)
    procs = [
        start_cli(
            *_run(
                postgres_url,
                unique_study_name,
                tmp_path / f"l{i}",
                "--workers",
                "2",
                "--study-trials",
                "12",
            ),
            cwd=str(tmp_path),
            env=env,
        )
        for i in range(2)
    ]
    for proc in procs:
        _out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
    trials = trials_of(postgres_url, unique_study_name)
    finished = sum(t.state in FINISHED for t in trials)
    assert 12 <= finished <= 12 + 2, finished  # the other launcher's 2 workers at most
    assert_nothing_running(trials)


def test_cli_rejects_zero_with_exit_2(tmp_path, unique_study_name):
    result = cli(
        *_run(
            f"sqlite:///{tmp_path / 's.db'}", unique_study_name, tmp_path, "--study-trials", "0"
        ),
        cwd=str(tmp_path),
    )
    assert result.returncode == 2
    assert "--study-trials" in result.stderr and result.stderr.strip().count("\n") <= 2
