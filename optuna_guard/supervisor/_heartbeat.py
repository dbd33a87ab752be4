"""Liveness beaten by the supervisor, not by a thread inside the worker.

A heartbeat thread inside the worker stops when the trial holds the GIL (a long ``re``/``sort``/
C-extension call) or the worker is SIGSTOPped, and a sibling then fails a live trial and its
result is lost. The supervisor sees its workers as processes, so it beats for them: every
``interval`` this thread

1. renews the launch's lease (:mod:`._lease`, a study system attr; any storage);
2. on RDB storages also writes Optuna's heartbeat rows (``trial_heartbeats``, what
   ``record_heartbeat(trial_id)`` writes) for every trial of a live worker, so plain
   ``study.optimize`` workers with a heartbeat on the same study never fail our live trials.
   All rows of a tick go in one transaction (:func:`record_heartbeats`); a trial's first row
   is written within ``first_beat_delay`` of its start, together with those of the trials that
   started meanwhile (one transaction per trial was most of the supervisor's CPU);
3. ends the RUNNING trials of lost launches (lease expired, or on this host with no process
   left) and the trials Optuna's own stale rule finds (no heartbeat row beaten for the grace
   period: a dead host), tags first (``worker_lost`` + ``kill_reason``), then FAIL, and
   re-queues them under ``--retry``.

After a storage error the thread judges nobody for one grace period: others could not renew
their leases either.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Collection
from typing import Any

import sqlalchemy
from optuna.storages import RDBStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._rdb.models import TrialHeartbeatModel
from optuna.storages._rdb.storage import _create_scoped_session

from optuna_guard import events, tags
from optuna_guard._logging import get_logger
from optuna_guard.memory import _tree
from optuna_guard.supervisor import _lease
from optuna_guard.supervisor._lifeline import ENV_LAUNCH_ID

_log = get_logger(__name__)


def launch_alive_here(launch_id: str, lease: _lease.Lease | None) -> bool:
    """A launch on this host lives while its supervisor (pid + start time) or any process
    carrying its marker does (orphaned workers wind down by themselves)."""
    if lease is not None and _tree.is_same_process(lease.pid, lease.pid_start):
        return True
    return bool(_tree.pids_with_env(f"{ENV_LAUNCH_ID}={launch_id}".encode()))


def record_heartbeats(storage: Any, trial_ids: Collection[int]) -> None:
    """Optuna's heartbeat rows of several trials in one transaction: what
    ``RDBStorage.record_heartbeat`` does for one (the row's time is the database's ``now()``;
    a new row takes the column default), with one lookup, one UPDATE and the new rows' INSERTs
    for all of them. Other storages (or a lost race on a new row's unique key) take Optuna's
    own per-trial path."""
    ids = sorted(set(trial_ids))
    if not ids:
        return
    rdb = storage._backend if isinstance(storage, _CachedStorage) else storage
    if isinstance(rdb, RDBStorage):
        try:
            _record_heartbeats_rdb(rdb, ids)
            return
        except sqlalchemy.exc.IntegrityError as exc:  # a row inserted meanwhile by another
            _log.debug("Heartbeat rows not written at once (%s); one by one.", exc)
    record = getattr(storage, "record_heartbeat", None)
    if record is None:  # journal / gRPC: Optuna keeps no heartbeat there
        return
    for trial_id in ids:
        record(trial_id)


def _record_heartbeats_rdb(storage: RDBStorage, ids: list[int]) -> None:
    # SQL statements on the table, not ORM objects: the same rows at a third of the CPU (the
    # ORM's unit of work, ~0.4 ms a transaction, was most of it)
    table = TrialHeartbeatModel.__table__
    with _create_scoped_session(storage.scoped_session) as session:
        beaten = set(
            session.execute(
                sqlalchemy.select(table.c.trial_id)
                .where(table.c.trial_id.in_(ids))
                .with_for_update()  # as record_heartbeat re-reads the row it updates
            ).scalars()
        )
        if beaten:
            now = session.execute(sqlalchemy.func.now()).scalar()
            session.execute(
                sqlalchemy.update(table).where(table.c.trial_id.in_(beaten)).values(heartbeat=now)
            )
        new = [{"trial_id": trial_id} for trial_id in ids if trial_id not in beaten]
        if new:  # the heartbeat column's default: the database's CURRENT_TIMESTAMP
            session.execute(sqlalchemy.insert(table), new)


class SupervisorHeartbeat:
    """The launch's lease, Optuna heartbeats for live trials, and the lost-trial sweep.

    ``storage`` is a storage of the thread's own (an RDBStorage opened with
    ``heartbeat_interval``/``grace_period`` enables Optuna's stale rule); ``live_trials`` is a
    frozenset the arbiter replaces each tick. ``retry_policy`` re-queues lost trials.
    ``first_beat_delay`` (default a quarter interval, at most 1 s): how long a started trial
    waits for its first row so that trials starting together share one transaction.
    """

    def __init__(
        self,
        storage: Any,
        study_name: str,
        launch_id: str,
        interval: float,
        grace: float,
        *,
        retry_policy: Any = None,
        emit: Callable[..., None] | None = None,
        on_retried: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
        alive_here: Callable[[str, _lease.Lease | None], bool] = launch_alive_here,
        first_beat_delay: float | None = None,
    ) -> None:
        import optuna

        self.storage = storage
        self.launch_id = launch_id
        self.interval = float(interval)
        self.grace = float(grace)
        self.first_beat_delay = (
            min(1.0, self.interval / 4) if first_beat_delay is None else float(first_beat_delay)
        )
        self.retry_policy = retry_policy
        self._emit = emit or (lambda *a, **k: None)
        self._on_retried = on_retried or (lambda: None)
        self._clock = clock
        self._alive_here = alive_here
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.pid_start = _tree.start_time_ticks(self.pid)
        self.live_trials: frozenset[int] = frozenset()
        self.lost_count = 0
        self._blind_until = 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.study = optuna.load_study(study_name=study_name, storage=storage)
        self._stop = threading.Event()
        self._wake = threading.Event()  # a trial started: give it its first Optuna heartbeat now
        self._first_beats: set[int] = set()
        self._first_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> SupervisorHeartbeat:
        """Write the lease and sweep once (synchronously, before any worker starts), then beat
        on a thread."""
        self.beat_once()
        self._thread = threading.Thread(
            target=self._run, name="optuna-guard-heartbeat", daemon=True
        )
        self._thread.start()
        return self

    def trial_started(self, trial_id: int) -> None:
        """A worker started this trial: record its first heartbeat row soon (Optuna's stale
        rule ignores trials without one), on the thread, not the watchdog loop."""
        with self._first_lock:
            self._first_beats.add(trial_id)
        self._wake.set()

    def stop(self) -> None:
        """Stop beating and mark the lease ended (this launch leaves nothing RUNNING)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5.0)
        try:
            self._write_lease(ended=True)
        except Exception as exc:
            _log.debug("could not mark the lease ended: %s", exc)

    def _run(self) -> None:
        next_beat = time.monotonic() + self.interval
        while not self._stop.is_set():
            self._wake.wait(max(0.0, next_beat - time.monotonic()))
            if time.monotonic() < next_beat:  # a trial started: let the ones with it join
                self._stop.wait(min(self.first_beat_delay, next_beat - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                return
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.interval
                self.beat_once()
            else:
                self._record_first_beats()

    def _take_first_beats(self) -> set[int]:
        with self._first_lock:
            pending, self._first_beats = self._first_beats, set()
        return pending

    def _record_first_beats(self) -> None:
        """One tick for the trials started since the last: their first rows, one transaction."""
        pending = self._take_first_beats()
        try:
            record_heartbeats(self.storage, pending)
        except Exception as exc:  # a missed first beat only delays the row to the next beat
            _log.debug("First heartbeats of trial ids %s not recorded: %s", sorted(pending), exc)

    # ------------------------------------------------------------------ one beat
    def beat_once(self) -> None:
        now = self._clock()
        try:
            self._write_lease()
            self._record_optuna_heartbeats()
        except Exception as exc:
            self._blind_until = now + self.grace
            _log.warning("Heartbeat not recorded: %s: %s", type(exc).__name__, exc)
            return
        if now < self._blind_until:
            return
        try:
            self.sweep_lost(now)
        except Exception as exc:
            self._blind_until = now + self.grace
            _log.warning("Lost-trial check failed: %s: %s", type(exc).__name__, exc)

    def _write_lease(self, ended: bool = False) -> None:
        lease = _lease.make_lease(
            self.launch_id,
            self.host,
            self.pid,
            self.pid_start,
            self.grace,
            self.live_trials,
            now=self._clock(),
            ended=ended,
        )
        self.storage.set_study_system_attr(
            self.study._study_id, _lease.lease_key(self.launch_id), lease.to_attr()
        )

    def _record_optuna_heartbeats(self) -> None:
        """The periodic beat: every live trial and the pending first beats, one transaction."""
        record_heartbeats(self.storage, self._take_first_beats() | self.live_trials)

    def sweep_lost(self, now: float) -> int:
        """End (and retry) the RUNNING trials of lost launches and Optuna-stale trials."""
        from optuna.trial import TrialState

        # the RUNNING trials straight from the storage (a filtered query on databases): Optuna's
        # cache (study.get_trials) would first load every trial finished since the last sweep
        # (~0.1 s of CPU per 30 s beat at 8 trials/s), none of which a sweep needs
        storage = self.storage
        if isinstance(storage, _CachedStorage):
            storage = storage._backend
        running = storage.get_all_trials(
            self.study._study_id, deepcopy=False, states=(TrialState.RUNNING,)
        )
        if not running:
            return 0
        leases = _lease.leases_from_system_attrs(
            self.storage.get_study_system_attrs(self.study._study_id)
        )
        found = _lease.lost_trials(
            running,
            leases,
            own_launch_id=self.launch_id,
            own_host=self.host,
            now=now,
            launch_alive_here=self._alive_here,
        )
        seen = {trial._trial_id for trial, _ in found}
        for trial_id in self._optuna_stale_ids():
            if trial_id in seen or trial_id in self.live_trials:
                continue
            trial = self.storage.get_trial(trial_id)
            if trial.user_attrs.get(tags.LAUNCH_ID) == self.launch_id:
                continue  # ours: the arbiter sees our workers
            attrs = trial.user_attrs
            where = f"host {attrs.get(tags.HOSTNAME, '?')}, pid {attrs.get(tags.WORKER_PID, '?')}"
            found.append(
                (trial, f"worker lost: no heartbeat for over {self.grace:.0f}s ({where})")
            )
        for trial, reason in found:
            self.end_lost(trial, reason)
        return len(found)

    def _optuna_stale_ids(self) -> list[int]:
        from optuna.storages._heartbeat import is_heartbeat_enabled

        if not hasattr(self.storage, "_get_stale_trial_ids") or not is_heartbeat_enabled(
            self.storage
        ):
            return []
        return list(self.storage._get_stale_trial_ids(self.study._study_id))

    def end_lost(self, trial: Any, reason: str) -> bool:
        from optuna.trial import TrialState

        from optuna_guard.retries import enqueue_retry
        from optuna_guard.storage import end_trial_from_outside

        attrs = tags.lost(reason)
        policy = self.retry_policy
        if policy is not None:
            attrs.update(policy.final_tags({**trial.user_attrs, **attrs}, policy.attempt(trial)))
        if not end_trial_from_outside(
            self.storage, trial._trial_id, TrialState.FAIL, user_attrs=attrs
        ):
            return False
        self.lost_count += 1
        _log.warning("Trial %d ended FAIL tagged worker_lost: %s.", trial.number, reason)
        self._emit(events.TRIAL_LOST, trial_number=trial.number, reason=reason, state="FAIL")
        if policy is not None:
            retry_number = enqueue_retry(
                self.study, self.storage.get_trial(trial._trial_id), policy
            )
            if retry_number is not None:
                self._on_retried()
                self._emit(
                    events.TRIAL_RETRIED,
                    trial_number=trial.number,
                    retry_number=retry_number,
                    reason=f"trial {trial.number} re-queued as trial {retry_number}",
                )
        return True
