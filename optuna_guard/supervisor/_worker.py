"""The worker process: ``python -m optuna_guard.supervisor._worker``.

Started fresh by the supervisor (never forked from a parent that may hold CUDA or big state),
configured by ``OPTUNA_GUARD_WORKER_*`` environment variables (:class:`WorkerSettings`) and
talking to the supervisor over the inherited socket in ``OPTUNA_GUARD_WORKER_FD``
(:mod:`._protocol`). Read top to bottom like submitit's ``process_job``: :func:`main` opens the
channel, :func:`_prepare` loads the objective and the study, :class:`WorkerLoop` runs trials.

One ``study.optimize`` loop runs for the worker's whole life, so Optuna's own machinery stays in
charge (value checks, tell, logging, ``gc_after_trial``) and its per-call set-up is paid once.
The loop is fed by tickets: the study's ``ask`` first reports the trial Optuna has just told
(``finished``), then asks the supervisor for a ticket (``ticket`` -> ``grant``) and ends the
loop on a denial. The protocol and its order are the same as with one ``optimize`` per ticket.

The worker runs no heartbeat thread (the GIL or a SIGSTOP would freeze it): the supervisor
beats for the trials of its live workers (:mod:`._heartbeat`). The worker watches its
supervisor instead (:mod:`._lifeline`) and winds down when it is gone. The objective is
wrapped so the supervisor learns the trial number first thing, the trial gets
``worker_id``/``worker_pid``/``hostname``, and unguarded objectives get ``@guard``.

SIGTERM/SIGINT only set the preemption flag (guarded code stops at its next boundary and the
trial ends ``preempted``); the worker then asks for no more tickets and exits 0.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import math
import os
import queue
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
import sqlalchemy
from optuna.distributions import BaseDistribution
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState

from optuna_guard import _attrs, preemption, resume, tags
from optuna_guard._logging import get_logger
from optuna_guard.exceptions import StorageUnavailableError
from optuna_guard.resilience import ResilientStorage, StorageRetrySettings
from optuna_guard.retries import FREE_RETRIES, RETRY_HISTORY, RetryPolicy, enqueue_retry
from optuna_guard.supervisor import _protocol
from optuna_guard.supervisor._config import WorkerSettings, retry_policy
from optuna_guard.supervisor._lifeline import EXIT_SUPERVISOR_LOST, Lifeline, kill_own_tree
from optuna_guard.supervisor._objective_spec import load_objective
from optuna_guard.supervisor._protocol import Channel, ProtocolError
from optuna_guard.supervisor._study import make_pruner, make_sampler, open_checked_storage

EXIT_OK = 0
EXIT_TRIAL_ERROR = 1  # an exception escaped study.optimize (storage error, "Cannot tell ...")
EXIT_FATAL = 70  # cannot start at all: objective or storage unusable (EX_SOFTWARE)
EXIT_STORAGE_UNAVAILABLE = (
    75  # storage unreachable past --storage-deadline at start (EX_TEMPFAIL): no crash-loop strike
)

Objective = Callable[[optuna.Trial], Any]
Message = dict[str, Any]

_log = get_logger("optuna_guard.supervisor.worker")


class _NoTicket(Exception):
    """Raised from ``ask`` when the supervisor denied the next trial (or is gone, or a stop was
    requested): it ends the optimize loop before a trial is created."""


class TicketedStudy(optuna.Study):
    """An Optuna study whose ``ask`` first calls ``before_ask`` (set by :class:`WorkerLoop`):
    the one hook Optuna's optimize loop passes through after telling a trial and before
    creating the next, without the storage read its ``callbacks`` cost."""

    before_ask: Callable[[], None] | None = None

    def ask(self, fixed_distributions: dict[str, BaseDistribution] | None = None) -> optuna.Trial:
        if self.before_ask is not None:
            self.before_ask()
        return super().ask(fixed_distributions)


class _Inbox:
    """Reads supervisor messages on a thread: replies go to a queue, a KILL notice is applied
    at once (the main thread is busy in the trial and would not read it)."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._replies: queue.Queue[Message | None] = queue.Queue()
        self.kill_notice: Message | None = None
        self.on_eof: Callable[[str], None] | None = None  # the lifeline: the supervisor is gone
        self._thread = threading.Thread(target=self._run, name="optuna-guard-inbox", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                message = self._channel.recv()
            except ProtocolError:
                message = None
            if message is None:
                if self.on_eof is not None:
                    self.on_eof("ticket socket closed")
                self._replies.put(None)
                return
            if message.get("op") == _protocol.KILL:
                self.kill_notice = message
                preemption.request_stop(
                    str(message.get("reason", "killed by the launcher")), preempted=False
                )
            else:
                self._replies.put(message)

    def next_reply(self) -> Message | None:
        return self._replies.get()


class WorkerLoop:
    """Ticket -> one trial -> report, until denied or the supervisor is gone, inside one
    ``study.optimize``."""

    def __init__(
        self,
        settings: WorkerSettings,
        channel: Channel,
        inbox: _Inbox,
        study: TicketedStudy,
        objective: Objective,
    ) -> None:
        self.settings = settings
        self.channel = channel
        self.inbox = inbox
        self.study = study
        self.objective = objective
        self.pid = os.getpid()
        self.retries: _WorkerRetries | None = None
        self.current: tuple[BaseStorage, int] | None = None  # (storage, trial id) while it runs
        self._in_objective = False
        self._started_at = 0.0
        self._ended_at = 0.0
        self._last_value: Any = None
        # (number, trial id, state) of the trial being run; _unreported: its end not yet sent
        self._outcome: tuple[int, int, str] | None = None
        self._unreported = False
        study.before_ask = self._before_ask

    def run(self) -> int:
        """One ``optimize`` loop for all tickets. A trial ended from outside while it ran makes
        Optuna's tell raise out of the loop: that is reported and the loop is entered again."""
        while True:
            try:
                self.study.optimize(
                    self._run_objective,
                    catch=(Exception,),
                    # Without retries the end state is taken from how the objective ended;
                    # Optuna's callbacks would re-read the trial from the storage (a query).
                    callbacks=[self._after_trial] if self.retries is not None else None,
                    gc_after_trial=self.settings.gc_after_trial,
                )
            except _NoTicket:
                return EXIT_OK
            except (UpdateFinishedTrialError, ValueError) as exc:
                # ValueError: Optuna's "Cannot tell a FAIL trial." when the objective itself met
                # the ended trial first (trial.report after `scontrol suspend` past the grace).
                if isinstance(exc, ValueError) and not str(exc).startswith("Cannot tell a"):
                    raise
                self.current = None
                self._report_lost_result(exc)
            finally:
                self.current = None
            # optimize returned: the objective called study.stop(); the worker goes on

    def _before_ask(self) -> None:
        """Optuna is about to create a trial: report the last one (told by now) and take a
        ticket, or end the loop. An ``ask`` from inside the objective passes through."""
        if self._in_objective:
            return
        self.current = None  # Optuna's tell has stored how the last trial ended
        self._report_pending()
        self._outcome = None
        if not self._granted():
            raise _NoTicket

    def _granted(self) -> bool:
        if preemption.stop_requested():
            return False
        if not self.channel.send(_protocol.TICKET):
            return False  # supervisor gone
        reply = self.inbox.next_reply()
        if reply is None or reply.get("op") != _protocol.GRANT:
            return False
        # a stop after the grant: the ticket is returned when the supervisor sees us exit
        return not preemption.stop_requested()

    def _run_objective(self, trial: optuna.Trial) -> Any:
        self.channel.send(_protocol.STARTED, number=trial.number, trial_id=trial._trial_id)
        self._started_at = time.monotonic()
        self._in_objective = True
        # New trials are created with the worker tags (see _tagging); a popped WAITING trial is
        # tagged here, on a thread while the objective starts (joined before the trial ends).
        tagger = None
        if trial.user_attrs.get(tags.WORKER_PID) != self.pid:
            tagger = threading.Thread(
                target=self._write_worker_tags,
                args=(trial._trial_id,),
                name="optuna-guard-tags",
                daemon=True,
            )
            tagger.start()
        self._outcome = (trial.number, trial._trial_id, "FAIL")
        self._unreported = True
        self._last_value = None
        self.current = (self.study._storage, trial._trial_id)
        try:
            try:
                preemption.raise_if_stop_requested(trial)
                value = self.objective(trial)
                self._last_value = value
            finally:
                if tagger is not None:
                    tagger.join()
                self._in_objective = False
                self._ended_at = time.monotonic()
        except optuna.TrialPruned:
            self._outcome = (trial.number, trial._trial_id, "PRUNED")
            self._tag_final_attempt(trial)
            raise
        except Exception as exc:
            notice = self.inbox.kill_notice
            if notice is None:
                self._tag_final_attempt(trial)
                raise
            # The supervisor is killing us (memory, or --trial-timeout with state FAIL); the trial
            # stopped at a boundary in time, so end it the way a hard kill would (tags, then state).
            reason = str(notice.get("reason", "killed by the launcher"))
            for key, tag in (notice.get("tags") or {}).items():
                trial.set_user_attr(key, tag)
            self._tag_final_attempt(trial)
            if self.settings.on_kill == "fail" or notice.get("state") == "FAIL":
                raise RuntimeError(reason) from exc
            self._outcome = (trial.number, trial._trial_id, "PRUNED")
            raise optuna.TrialPruned(reason) from exc
        if _is_finite_value(value, len(self.study.directions)):
            self._outcome = (trial.number, trial._trial_id, "COMPLETE")
        elif self.retries is not None:
            self._tag_final_attempt(trial)  # e.g. @guard(on_trip="fail") returns NaN
        return value

    def _after_trial(self, study: optuna.Study, frozen: FrozenTrial) -> None:
        """With retries: queue the retry before reporting the end. A worker killed in between
        is then still "under its trial" for the supervisor, which queues the retry itself
        (idempotently)."""
        self.current = None
        if self.retries is not None:
            self.retries.after_trial(study, frozen)
        self._unreported = False
        self._report_finished(frozen.number, frozen._trial_id, frozen.state.name)

    def _report_pending(self) -> None:
        if self._unreported and self._outcome is not None:
            self._unreported = False
            self._report_finished(*self._outcome)

    def _report_lost_result(self, exc: Exception) -> None:
        """The trial was ended from outside while it ran (a supervisor or another host judged it
        lost): its value cannot be stored. Say so, report the state the storage holds, and go
        on with the next ticket instead of crashing."""
        if self._outcome is None:
            raise exc
        number, trial_id, _state = self._outcome
        self._unreported = False
        try:
            state = self.study._storage.get_trial(trial_id).state.name
        except Exception:
            state = "FAIL"
        _log.warning(
            "Trial %d was ended %s from outside while it ran; its result %r is lost (%s).",
            number,
            state,
            self._last_value,
            exc,
        )
        self.channel.send(
            _protocol.LOST,
            number=number,
            trial_id=trial_id,
            state=state,
            value=repr(self._last_value)[:200],
        )
        self._report_finished(number, trial_id, state)

    def _write_worker_tags(self, trial_id: int) -> None:
        storage = self.study._storage
        try:  # a WAITING trial we popped (enqueued or a retry): tag it now
            for key, value in _worker_tags(self.settings).items():
                storage.set_trial_user_attr(trial_id, key, value)
        except Exception as exc:  # e.g. the storage gone past its deadline; the trial goes on
            _log.error("Could not tag trial id %d: %s", trial_id, exc)

    def _tag_final_attempt(self, trial: optuna.Trial) -> None:
        if self.retries is None:
            return
        try:
            self.retries.tag_final_attempt(trial)
        except Exception as exc:  # tagging must never change how the trial ends
            _log.error("Could not tag trial %d: %s", trial.number, exc)

    def _report_finished(self, number: int, trial_id: int, state: str) -> None:
        duration = self._ended_at - self._started_at if self._started_at else None
        _log.info(
            "Trial %d finished %s in %.3fs (value %r).",
            number,
            state,
            duration or 0.0,
            self._last_value,
        )
        self.channel.send(
            _protocol.FINISHED,
            number=number,
            trial_id=trial_id,
            state=state,
            duration=None if duration is None else round(duration, 3),
        )


def _is_finite_value(value: Any, n_objectives: int = 1) -> bool:
    """Whether Optuna will accept ``value`` as a COMPLETE result (finite, one per objective)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) != n_objectives:
        return False
    try:
        return all(
            v is not None and not isinstance(v, bool) and math.isfinite(float(v)) for v in values
        )
    except (TypeError, ValueError):
        return False


def _guarded(objective: Objective, enabled: bool) -> Objective:
    """Wrap with ``@guard`` (defaults from the OPTUNA_GUARD_* env the supervisor set) unless the
    objective is already guarded or guarding is switched off. Imported here only: with
    ``--no-guard`` the worker does not load the guard and its memory watcher."""
    if not enabled or hasattr(objective, "__optuna_guard__"):
        return objective
    try:
        from optuna_guard.trial_guard import guard
    except ImportError as exc:
        _log.warning(
            "optuna_guard.trial_guard is not importable (%s); running the objective without "
            "the in-trial guard.",
            exc,
        )
        return objective
    guarded: Objective = guard(objective)
    return guarded


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    warnings.simplefilter("ignore", category=FutureWarning)


def main() -> int:
    preemption.reset()
    preemption.install_signal_handlers()
    settings = WorkerSettings.from_env(os.environ)
    channel = Channel.from_fd(int(os.environ[_protocol.ENV_FD]))
    _configure_logging()
    _log.info(
        "Worker %d (pid %d) starting: study %r, objective %s.",
        settings.worker_id,
        os.getpid(),
        settings.study_name,
        settings.objective,
    )
    inbox = _Inbox(channel)
    holder: list[WorkerLoop] = []  # the loop, once it exists (the lifeline asks for its trial)
    lifeline = _start_lifeline(settings, inbox, lambda: holder[0].current if holder else None)
    try:
        study, objective, storage = _prepare(settings, channel)
    except StorageUnavailableError as exc:
        _log.error("Worker %d cannot reach the storage: %s", settings.worker_id, exc)
        return EXIT_STORAGE_UNAVAILABLE
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        _log.error("Worker %d cannot start: %s", settings.worker_id, message)
        traceback.print_exc()
        channel.send(_protocol.FATAL, error=message)
        return EXIT_FATAL
    try:
        loop = WorkerLoop(settings, channel, inbox, study, objective)
        holder.append(loop)
        loop.retries = _make_retries(settings, study, channel)
        channel.send(_protocol.HELLO, pid=os.getpid())
        try:
            code = loop.run()
        except Exception:
            _log.error("Worker %d stops: an error escaped the trial loop.", settings.worker_id)
            traceback.print_exc()
            return EXIT_TRIAL_ERROR
        if lifeline is not None and lifeline.lost:
            kill_own_tree()
            _log.warning(
                "Worker %d (pid %d) exits: %s.", settings.worker_id, os.getpid(), lifeline.reason
            )
            return EXIT_SUPERVISOR_LOST
        _log.info("Worker %d (pid %d) exits.", settings.worker_id, os.getpid())
        return code
    finally:
        _release(storage)


def _start_lifeline(
    settings: WorkerSettings,
    inbox: _Inbox,
    current_trial: Callable[[], tuple[BaseStorage, int] | None],
) -> Lifeline | None:
    """Watch the supervisor (parent-death signal, socket EOF, parent pid); None when the
    supervisor did not say who it is (a worker started by hand)."""
    if not settings.supervisor_pid:
        return None
    lifeline = Lifeline(
        settings.supervisor_pid,
        settings.grace_period,
        current_trial=current_trial,
        on_lost=preemption.request_stop,
    )
    inbox.on_eof = lifeline.supervisor_gone
    return lifeline.start()


def _prepare(
    settings: WorkerSettings, channel: Channel | None = None
) -> tuple[TicketedStudy, Objective, BaseStorage]:
    """(study, wrapped objective, the opened storage to release at exit)."""
    objective = load_objective(settings.objective)  # first: a module that cannot load fails fast
    warnings.simplefilter("ignore", category=ExperimentalWarning)
    # Optuna's per-trial INFO line reads the best trial and the metric names from the storage
    # (two queries a trial); the worker logs its own line instead (WorkerLoop._report_finished).
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    objective = _guarded(objective, settings.guard)
    # The trial storage has no heartbeat of its own: the supervisor keeps Optuna's heartbeat
    # rows for the running trial on a second storage, without Optuna's per-trial cost.
    opened = open_checked_storage(  # RDBStorage() queries the database: retried
        settings.storage,
        connect_timeout=settings.connect_timeout,
        skip_setup=True,  # tables exist; Optuna's schema manager (alembic) is built on demand
        deadline_s=settings.storage_deadline,
    )
    # issue 13: objective version, result cache, sampler history
    storage = _tagging(opened, {**_worker_tags(settings), **resume.worker_tags(os.environ)})
    storage = _maybe_resilient(storage, settings, channel)
    seed = None if settings.seed is None else settings.seed + settings.spawn_index
    study = TicketedStudy(  # what optuna.load_study builds, with the ticket hook
        study_name=settings.study_name,
        storage=storage,
        sampler=make_sampler(settings.sampler, seed),
        pruner=make_pruner(settings.pruner),
    )
    objective = resume.install_in_worker(study, objective, os.environ)
    return study, objective, opened


def _worker_tags(settings: WorkerSettings) -> dict[str, Any]:
    worker_tags: dict[str, Any] = {
        tags.WORKER_ID: settings.worker_id,
        tags.WORKER_PID: os.getpid(),
        tags.HOSTNAME: socket.gethostname(),
    }
    if settings.launch_id:
        worker_tags[tags.LAUNCH_ID] = settings.launch_id
    return worker_tags


class _TaggingCachedStorage(_CachedStorage):
    """Optuna's cache over the RDB storage, writing the launcher's tags without transactions
    of their own: every new RUNNING trial is created with the worker tags in the same insert,
    and the guard's end-of-trial tags ride in the transaction that ends the trial (its tell).
    A short trial's bookkeeping is a handful of transactions; each one more is ~1 ms of CPU."""

    def __init__(self, backend: RDBStorage, worker_tags: Mapping[str, Any]) -> None:
        super().__init__(backend)
        self._worker_tags = dict(worker_tags)
        self._held: dict[int, dict[str, Any]] = {}  # trial id -> user attrs for its tell
        self._just_created: int | None = None  # a trial id not read back yet

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        if template_trial is None:
            template_trial = FrozenTrial(
                number=-1,
                state=TrialState.RUNNING,
                value=None,
                datetime_start=datetime.datetime.now(),
                datetime_complete=None,
                params={},
                distributions={},
                user_attrs=dict(self._worker_tags),
                system_attrs={},
                intermediate_values={},
                trial_id=-1,
            )
        elif template_trial.state == TrialState.RUNNING:  # not enqueued WAITING trials/retries
            template_trial = copy.copy(template_trial)
            template_trial.user_attrs = {**self._worker_tags, **template_trial.user_attrs}
        trial_id = super().create_new_trial(study_id, template_trial)
        self._just_created = trial_id
        return trial_id

    def set_trial_user_attrs(self, trial_id: int, attrs: Mapping[str, Any]) -> None:
        """Several tags in one transaction (see ``optuna_guard._attrs``); Optuna's cache
        forwards user attrs to the database unchanged, so this does too."""
        _attrs.set_user_attrs(self._backend, trial_id, attrs)

    def hold_user_attrs_for_tell(self, trial_id: int, attrs: Mapping[str, Any]) -> bool:
        """Keep the guard's end-of-trial tags until the trial's tell writes its state: Optuna
        tells right after the objective returns, and a worker killed in between has its trial
        ended (and tagged) by the supervisor anyway."""
        self._held.setdefault(trial_id, {}).update(attrs)
        return True

    def get_trial(self, trial_id: int) -> FrozenTrial:
        trial = self._read_back(trial_id) or super().get_trial(trial_id)
        held = self._held.get(trial_id)
        if held:  # reads between the guard's end and the tell see the tags too
            trial = copy.copy(trial)
            trial.user_attrs = {**trial.user_attrs, **held}
        return trial

    def _read_back(self, trial_id: int) -> FrozenTrial | None:
        """The first read of a trial this storage has just created (Optuna's ``Trial`` reads it
        back at once) comes from the cache, which holds what the insert wrote: Optuna's cache
        serves no RUNNING trial, so it costs a query of five tables otherwise. Later reads
        (tell's among them, which must see a trial ended from outside) go to the database."""
        if trial_id != self._just_created:
            return None
        self._just_created = None
        with self._lock:
            study_id, number = self._trial_id_to_study_id_and_number[trial_id]
            return copy.deepcopy(self._studies[study_id].trials[number])

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        held = self._held.get(trial_id)
        if not held or not state.is_finished():
            return super().set_trial_state_values(trial_id, state, values)
        # Optuna's write below opens the thread's scoped session, the one the tags go into
        # here: both commit together (or roll back together, and a retry writes both again).
        try:
            session = self._backend.scoped_session()
            try:
                _attrs.write_in_session(self._backend, session, trial_id, held)
            except BaseException:
                session.rollback()
                session.close()
                raise
            ended = super().set_trial_state_values(trial_id, state, values)
        except UpdateFinishedTrialError:
            self._held.pop(trial_id, None)  # ended from outside: its tags are the ender's
            raise
        self._held.pop(trial_id, None)
        return ended


def _tagging(storage: BaseStorage, worker_tags: Mapping[str, Any]) -> BaseStorage:
    """RDB storages get :class:`_TaggingCachedStorage`; journal/gRPC storages have no cache and
    the worker writes the tags itself."""
    if not isinstance(storage, RDBStorage):
        return storage
    _insert_user_attrs_in_bulk(storage)
    return _TaggingCachedStorage(storage, worker_tags)


def _insert_user_attrs_in_bulk(storage: RDBStorage) -> None:
    """A new trial's user attrs (the worker tags) as plain INSERTs in the creating transaction.
    Optuna writes each with a trial lookup and an upsert (two statements and a statement build
    per key, ~1 ms of CPU for the five tags); a trial made in this transaction has no rows to
    conflict with and is RUNNING, so the lookups and upserts decide nothing."""
    prepare = storage._get_prepared_new_trial

    def prepared_new_trial(study_id: int, template_trial: FrozenTrial | None, session: Any) -> Any:
        if template_trial is None or not template_trial.user_attrs:
            return prepare(study_id, template_trial, session)
        user_attrs = template_trial.user_attrs
        bare = copy.copy(template_trial)
        bare.user_attrs = {}
        trial = prepare(study_id, bare, session)
        with session.no_autoflush:  # ``prepare`` flushed the trial row the tags refer to
            session.execute(  # one executemany INSERT, without the ORM's unit of work
                sqlalchemy.insert(models.TrialUserAttributeModel.__table__),
                [
                    {"trial_id": trial.trial_id, "key": key, "value_json": json.dumps(value)}
                    for key, value in user_attrs.items()
                ],
            )
        return trial

    storage._get_prepared_new_trial = prepared_new_trial  # type: ignore[method-assign]


def _maybe_resilient(
    storage: BaseStorage, settings: WorkerSettings, channel: Channel | None = None
) -> BaseStorage:
    """Retry transient database errors (a PostgreSQL restart) for up to ``storage_deadline``
    seconds instead of crashing the worker and losing the trial's result; the outage is logged
    here and reported to the supervisor's event log."""
    if settings.storage_deadline is None:
        return storage

    def on_outage(event: str, seconds: float, what: str) -> None:
        if channel is not None:
            channel.send(_protocol.OUTAGE, outage=event, seconds=round(seconds, 1), what=what)

    return ResilientStorage(
        storage, StorageRetrySettings(deadline_s=settings.storage_deadline), on_outage=on_outage
    )


class _WorkerRetries:
    """Retries of trials that ended inside the worker (the in-trial guard pruned them for
    memory, a SIGTERM preempted them, a pruner marked them diverged): tag the last allowed
    attempt ``retries_exhausted`` while it is still RUNNING, and queue the retry once Optuna
    has ended it. Trials ended by the supervisor (kills, crashes) are retried there."""

    def __init__(self, policy: RetryPolicy, study: optuna.Study, channel: Channel) -> None:
        self.policy = policy
        self.study = study
        self.channel = channel

    def tag_final_attempt(self, trial: optuna.Trial) -> None:
        storage = self.study._storage
        attrs = storage.get_trial_user_attrs(trial._trial_id)
        if not self.policy.is_retryable(attrs):
            return
        system_attrs = storage.get_trial_system_attrs(trial._trial_id)
        attempt = len(system_attrs.get(RETRY_HISTORY, [])) - int(system_attrs.get(FREE_RETRIES, 0))
        free = self.policy.is_free_preemption(attrs, system_attrs)
        for key, value in self.policy.final_tags(attrs, attempt, free=free).items():
            trial.set_user_attr(key, value)

    def after_trial(self, study: optuna.Study, frozen: FrozenTrial) -> None:
        if frozen.state not in (
            TrialState.PRUNED,
            TrialState.FAIL,
        ) or not self.policy.is_retryable(frozen.user_attrs):
            return
        try:
            number = enqueue_retry(study, frozen, self.policy)
        except Exception as exc:  # a broken shrink hook must not take the worker down
            _log.error(
                "Could not queue a retry of trial %d: %s: %s",
                frozen.number,
                type(exc).__name__,
                exc,
            )
            return
        if number is not None:
            self.channel.send(_protocol.RETRIED, number=frozen.number, retry_number=number)


def _make_retries(
    settings: WorkerSettings, study: optuna.Study, channel: Channel
) -> _WorkerRetries | None:
    policy = retry_policy(settings)
    return None if policy is None else _WorkerRetries(policy, study, channel)


def _release(storage: BaseStorage) -> None:
    """Leave like a normal Python program (``sys.exit``): atexit handlers run, loggers flush,
    multiprocessing pools are terminated and executors shut down (issue 16: ``os._exit`` left
    every recycled joblib worker's loky pool alive for minutes). joblib's reusable loky
    executor outlives its users on purpose, so it is shut down here, then the storage's
    connections are closed. The supervisor waits a bounded time for this exit and kills
    whatever the worker leaves behind."""
    _shut_down_loky()
    engine = getattr(storage, "engine", None)
    if engine is not None:
        try:
            engine.dispose()
        except Exception as exc:
            _log.debug("Could not close the storage's connections: %s", exc)


def _shut_down_loky() -> None:
    """Stop joblib's reusable loky executor if the objective used one (only if joblib was
    imported: importing it here would cost the worker ~0.1 s for nothing)."""
    for name in ("joblib.externals.loky.reusable_executor", "loky.reusable_executor"):
        module = sys.modules.get(name)
        executor = getattr(module, "_executor", None) if module is not None else None
        if executor is None:
            continue
        try:
            executor.shutdown(wait=True, kill_workers=True)  # idle between trials: nothing is lost
        except Exception as exc:
            _log.warning("Could not shut down the loky executor: %s", exc)


if __name__ == "__main__":
    sys.exit(main())
