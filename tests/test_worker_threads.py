"""Each worker's thread pools get cores // workers threads (at least 1), unless the user set the
variables: N workers do not oversubscribe the machine N times (issue 16 item 6)."""

from __future__ import annotations

import pytest
from supervisor_helpers import FAST, objective_spec, trials_of

from optuna_guard.supervisor import _threads, launch


@pytest.mark.parametrize(
    ("workers", "cores", "expected"),
    [(1, 8, "8"), (2, 8, "4"), (3, 8, "2"), (4, 2, "1"), (2, 1, "1")],
)
def test_threads_per_worker(workers, cores, expected):
    env = _threads.thread_env(workers, {}, cores=cores)
    assert (
        env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == expected
    )


def test_the_users_setting_is_kept():
    env = _threads.thread_env(2, {"OMP_NUM_THREADS": "3"}, cores=8)
    assert "OMP_NUM_THREADS" not in env and env["MKL_NUM_THREADS"] == "4"


def test_torch_in_each_worker_gets_its_share(
    sqlite_url, tmp_path, unique_study_name, quiet_optuna, monkeypatch
):
    pytest.importorskip("torch")
    for name in _threads.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    expected = _threads.threads_per_worker(2)
    launch(
        objective_spec("worker_threads_torch"),
        study_name=unique_study_name,
        storage=sqlite_url,
        workers=2,
        n_trials=2,
        log_dir=str(tmp_path / "logs"),
        **FAST,
    )
    trials = trials_of(sqlite_url, unique_study_name)
    assert [t.user_attrs.get("torch_threads") for t in trials] == [expected, expected]
