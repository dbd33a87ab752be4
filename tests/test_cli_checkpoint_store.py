"""`run --checkpoint-store URL`: every worker's checkpointers write to the shared store."""

from __future__ import annotations

import os

import optuna
from optuna.trial import TrialState
from supervisor_helpers import assert_nothing_running, cli, trials_of

from optuna_guard._checkpoint_store import CHECKPOINTS_ATTR

OBJECTIVE = os.path.join(os.path.dirname(__file__), "objectives", "launcher_store.py:objective")


def test_checkpoint_store_reaches_the_workers_checkpointers(tmp_path, unique_study_name) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    shared = tmp_path / "shared"
    result = cli(
        "run",
        OBJECTIVE,
        "--study-name",
        unique_study_name,
        "--storage",
        url,
        "--workers",
        "2",
        "--n-trials",
        "3",
        "--log-dir",
        str(tmp_path / "logs"),
        "--display",
        "off",
        "--checkpoint-store",
        f"file://{shared}",
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    trials = trials_of(url, unique_study_name)
    assert_nothing_running(trials)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    listed = [t.system_attrs[CHECKPOINTS_ATTR] for t in trials]
    assert all(len(items) == 1 and items[0]["step"] == 1 for items in listed)
    assert sorted(p.name for p in shared.iterdir()) == sorted(items[0]["id"] for items in listed)
    assert not (tmp_path / "local-checkpoints").exists()  # nothing went to the local root


def test_bad_checkpoint_store_url_is_one_line_exit_2(tmp_path, unique_study_name) -> None:
    result = cli(
        "run",
        OBJECTIVE,
        "--study-name",
        unique_study_name,
        "--storage",
        f"sqlite:///{tmp_path / 'study.db'}",
        "--checkpoint-store",
        "ftp://host/x",
        cwd=str(tmp_path),
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "checkpoint store" in result.stderr
    db = tmp_path / "study.db"
    assert not db.exists() or unique_study_name not in optuna.get_all_study_names(
        f"sqlite:///{db}"
    )
