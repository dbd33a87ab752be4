"""Optuna's RDB heartbeat for a worker's running trial, without Optuna's per-trial cost.

Optuna's ``study.optimize`` on a heartbeat-enabled storage runs, *for every trial*, a stale-trial
query (``fail_stale_trials``) and a heartbeat thread whose first beat is another transaction:
about 15 ms of CPU per trial here, more than the launcher's whole bookkeeping. A worker runs one
trial per ``optimize`` call, so instead it opens its trial storage without a heartbeat and keeps
the same database rows itself:

- a beat for the running trial when it starts (written on the worker's tag thread, alongside
  the objective) and then every ``interval`` seconds from one long-lived thread;
- ``fail_stale_trials`` at most once per ``interval`` (before the worker's next trial), not
  before every trial.

The rows and the stale rule are Optuna's own (``trial_heartbeats``, ``grace_period``), so
launchers on other hosts and plain Optuna workers with a heartbeat fail our stale trials and we
fail theirs, exactly as with ``optimize``'s heartbeat. The heartbeat storage is a second
RDBStorage on the same URL (with ``heartbeat_interval`` set), wrapped for outages like the
trial storage, so stale checks pause right after a database outage.
"""

from __future__ import annotations

import threading
import time
import warnings
from typing import Any

from optuna_guard._logging import get_logger

_log = get_logger(__name__)


class TrialHeartbeat:
    """Beats for the worker's current trial; ``begin``/``end`` bracket each trial."""

    def __init__(self, storage: Any, study_name: str, interval: float, *, clock: Any = time.monotonic) -> None:
        import optuna

        self._storage = storage
        self._interval = float(interval)
        self._clock = clock
        self._current: int | None = None
        self._stop = threading.Event()
        self._last_stale_check: float | None = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._study = optuna.load_study(study_name=study_name, storage=storage)
        self._thread = threading.Thread(target=self._run, name="optuna-guard-heartbeat", daemon=True)
        self._thread.start()

    def begin(self, trial_id: int) -> None:
        self._current = trial_id

    def end(self) -> None:
        self._current = None

    def beat(self, trial_id: int) -> None:
        """Record a heartbeat now (failures are logged: a missed beat is not worth a trial)."""
        try:
            self._storage.record_heartbeat(trial_id)
        except Exception as exc:
            _log.warning("Heartbeat of trial id %d not recorded: %s: %s", trial_id, type(exc).__name__, exc)

    def fail_stale_trials_if_due(self) -> None:
        """Optuna's ``fail_stale_trials`` (trials of dead launchers anywhere), once per interval."""
        now = self._clock()
        if self._last_stale_check is not None and now - self._last_stale_check < self._interval:
            return
        self._last_stale_check = now
        import optuna

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self._study)
        except Exception as exc:
            _log.warning("Stale-trial check failed: %s: %s", type(exc).__name__, exc)

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            trial_id = self._current
            if trial_id is not None:
                self.beat(trial_id)
