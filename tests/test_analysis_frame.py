"""trials_frame and the killed-trial filters on studies with known tags, no tags, two objectives."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from optuna_guard import tags
from optuna_guard.analysis import (
    END_STATES,
    end_state,
    is_killed,
    killed_trials,
    retry_origin,
    trials_frame,
    valid_trials,
)
from optuna_guard.analysis._frame import TAG_COLUMNS

sys.path.insert(0, os.path.dirname(__file__))
from analysis_study import EXPECTED, build_known_study

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(params=["memory", "sqlite"])
def known_study(request, tmp_path) -> optuna.Study:
    storage = (
        optuna.storages.InMemoryStorage()
        if request.param == "memory"
        else f"sqlite:///{tmp_path / 'k.db'}"
    )
    return build_known_study(storage, f"known-{uuid.uuid4().hex[:8]}")


def test_frame_of_a_tagged_study(known_study: optuna.Study) -> None:
    df = trials_frame(known_study)
    assert len(df) == EXPECTED["n_trials"]
    assert list(df["number"]) == list(range(EXPECTED["n_trials"]))
    for column in (
        "number",
        "state",
        "end_state",
        "value",
        "duration",
        "duration_s",
        "params_batch_size",
        "params_width",
        "params_lr",
        "params_optimizer",
        *TAG_COLUMNS,
    ):
        assert column in df.columns, column

    assert df["state"].value_counts().to_dict() == {
        k: v for k, v in EXPECTED["states"].items() if v
    }
    assert df["end_state"].value_counts().to_dict() == {
        k: v for k, v in EXPECTED["end_states"].items() if v
    }
    assert sorted(df.loc[df[tags.EMERGENCY_KILLED], "number"]) == EXPECTED["killed"]
    assert sorted(df.loc[df[tags.WORKER_CRASHED], "number"]) == EXPECTED["crashed"]
    assert sorted(df.loc[df[tags.PREEMPTED], "number"]) == EXPECTED["preempted"]
    assert sorted(df.loc[df[tags.DIVERGED], "number"]) == EXPECTED["diverged"]
    assert df[tags.KILL_LIMIT].value_counts().to_dict() == EXPECTED["killed_by_limit"]
    assert int(df[tags.PEAK_RSS_GB].notna().sum()) == EXPECTED["peak_rss_count"]

    row6 = df.set_index("number").loc[6]
    assert row6[tags.AVAILABLE_GB_AT_KILL] == pytest.approx(1.4)
    assert row6[tags.PEAK_RSS_GB] == pytest.approx(9.5)
    assert row6[tags.KILL_REASON].startswith("OOM prevention [Trial #6")
    assert row6[tags.WORKER_ID] == 0
    assert row6["duration_s"] == pytest.approx(30.0)

    # retry origin from our tag (14 -> 10) or from Optuna's failed_trial system attr only (15 -> 7)
    retries = (
        df.dropna(subset=[tags.RETRY_OF]).set_index("number")[tags.RETRY_OF].astype(int).to_dict()
    )
    assert retries == EXPECTED["retry_of"]
    assert df.set_index("number").loc[15, "retry_history"] == [7]
    assert bool(df.set_index("number").loc[15, tags.RETRY_SHRUNK]) is True

    best = df[(df["end_state"] == "complete")].sort_values("value").iloc[0]
    assert best["number"] == EXPECTED["best_number"] and best["value"] == pytest.approx(
        EXPECTED["best_value"]
    )


def test_filters_agree_with_the_frame(known_study: optuna.Study) -> None:
    assert [t.number for t in killed_trials(known_study)] == EXPECTED["killed"]
    valid = valid_trials(known_study)
    assert len(valid) == EXPECTED["n_trials"] - len(EXPECTED["killed"])
    assert not any(is_killed(t) for t in valid)
    assert len(valid_trials(known_study, complete_only=True)) == EXPECTED["valid_complete"]
    assert {t.number for t in valid_trials(known_study, states=(TrialState.FAIL,))} == {10, 11, 16}
    by_number = {t.number: t for t in known_study.trials}
    assert end_state(by_number[9]) == "killed" and end_state(by_number[13]) == "pruned"
    assert retry_origin(by_number[15]) == 7 and retry_origin(by_number[0]) is None


def test_frame_of_a_study_without_tags() -> None:
    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=4)
    trial = study.ask()
    study.tell(trial, state=TrialState.FAIL)
    df = trials_frame(study)
    assert len(df) == 5
    for column in TAG_COLUMNS:
        assert column in df.columns, column
    for flag in (
        tags.EMERGENCY_KILLED,
        tags.WORKER_CRASHED,
        tags.PREEMPTED,
        tags.DIVERGED,
        tags.RETRY_SHRUNK,
    ):
        assert not df[flag].any()
    for numeric in (
        tags.PEAK_RSS_GB,
        tags.AVAILABLE_GB_AT_KILL,
        tags.PEAK_GPU_GB,
        tags.WORKER_ID,
        tags.RETRY_OF,
        "constraint_memory",
    ):
        assert df[numeric].isna().all(), numeric
    for text in (tags.KILL_REASON, tags.KILL_LIMIT, tags.HOSTNAME):
        assert df[text].isna().all(), text
    assert list(df["end_state"]) == ["complete"] * 4 + ["failed"]
    assert killed_trials(study) == []


def test_frame_of_a_multi_objective_study() -> None:
    study = optuna.create_study(directions=["minimize", "maximize"])

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        x = trial.suggest_float("x", 0, 1)
        trial.set_user_attr(tags.PEAK_RSS_GB, 1.0 + x)
        return x, 1 - x

    study.optimize(objective, n_trials=3)
    killed = study.ask()
    killed.suggest_float("x", 0, 1)
    killed.set_user_attr(tags.EMERGENCY_KILLED, True)
    study.tell(killed, state=TrialState.PRUNED)
    df = trials_frame(study)
    assert "value" not in df.columns
    assert df["values_0"].notna().sum() == 3 and df["values_1"].notna().sum() == 3
    assert df[tags.EMERGENCY_KILLED].tolist() == [False, False, False, True]
    assert df["end_state"].tolist() == ["complete"] * 3 + ["killed"]

    study.set_metric_names(["loss", "accuracy"])
    assert {"values_loss", "values_accuracy"} <= set(trials_frame(study).columns)


def test_user_attrs_that_are_not_tags_become_columns() -> None:
    study = optuna.create_study()
    trial = study.ask()
    trial.set_user_attr("fold_scores", [0.1, 0.2])
    study.tell(trial, 1.0)
    assert trials_frame(study).loc[0, "user_attrs_fold_scores"] == [0.1, 0.2]
    assert "user_attrs_fold_scores" not in trials_frame(study, user_attrs=False).columns


def test_end_states_are_the_documented_ones() -> None:
    assert set(END_STATES) == {
        "complete",
        "pruned",
        "failed",
        "killed",
        "crashed",
        "preempted",
        "diverged",
        "running",
        "waiting",
    }


def test_missing_pandas_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)  # "import pandas" now raises ImportError
    with pytest.raises(ImportError, match=r"optuna-guard\[analysis\]"):
        trials_frame(optuna.create_study())


def test_importing_the_package_does_not_import_pandas_or_plotly() -> None:
    code = (
        "import sys, optuna_guard, optuna_guard.analysis, optuna_guard.oom_aware.preflight;"
        "print(sorted(m for m in ('pandas', 'plotly', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
