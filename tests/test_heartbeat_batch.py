"""The supervisor's heartbeat thread writes the Optuna heartbeat rows of several trials in one
transaction per tick (issue 15): trials that start together get their first rows together, and
the periodic beat renews every live trial's row and adds the new ones at once."""

from __future__ import annotations

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState
from supervisor_helpers import wait_for

from optuna_guard.supervisor._heartbeat import SupervisorHeartbeat


class _HeartbeatTransactions:
    """Counts committed transactions that wrote ``trial_heartbeats`` (the lost-trial sweep
    reads it too)."""

    def __init__(self, engine: sqlalchemy.engine.Engine) -> None:
        self.count = 0
        self._touched = False
        sqlalchemy.event.listen(engine, "before_cursor_execute", self._on_statement)
        sqlalchemy.event.listen(engine, "commit", self._on_commit)

    def _on_statement(self, _conn, _cursor, statement, *_args) -> None:
        if "trial_heartbeats" in statement and statement.lstrip().startswith(("INSERT", "UPDATE")):
            self._touched = True

    def _on_commit(self, _conn) -> None:
        if self._touched:
            self.count += 1
        self._touched = False


def _rows(engine: sqlalchemy.engine.Engine, ids: list[int]) -> list[int]:
    with engine.connect() as connection:
        return sorted(
            row[0]
            for row in connection.execute(sqlalchemy.text("SELECT trial_id FROM trial_heartbeats"))
            if row[0] in ids
        )


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_one_tick_writes_the_heartbeat_rows_of_several_trials_in_one_transaction(
    backend, request, unique_study_name, quiet_optuna
):
    url = request.getfixturevalue(f"{backend}_url")
    study = optuna.create_study(study_name=unique_study_name, storage=url)
    ids = [study.ask()._trial_id for _ in range(5)]
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=120)
    transactions = _HeartbeatTransactions(storage.engine)
    beat = SupervisorHeartbeat(
        storage, unique_study_name, "launch-batch-test", 60, 120, first_beat_delay=5.0
    ).start()
    try:
        for trial_id in ids[:3]:  # three workers start their trials together
            beat.trial_started(trial_id)
        wait_for(lambda: _rows(storage.engine, ids) == ids[:3], 30, what="the first rows")
        assert transactions.count == 1
    finally:
        beat.stop()
    # the periodic beat: the three live trials renewed and two new trials' first rows
    beat.live_trials = frozenset(ids[:3])
    for trial_id in ids[3:]:
        beat.trial_started(trial_id)
    transactions.count = 0
    beat.beat_once()
    assert transactions.count == 1
    assert _rows(storage.engine, ids) == ids  # one row per trial, none duplicated
    assert storage._get_stale_trial_ids(study._study_id) == []  # Optuna sees them beaten
    for trial_id in ids:
        study._storage.set_trial_state_values(trial_id, TrialState.FAIL)
    storage.engine.dispose()
