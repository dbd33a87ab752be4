"""The worker process: ``python -m optuna_guard.supervisor._worker``.

Started fresh by the supervisor (never forked from a parent that may hold CUDA or big state),
configured by ``OPTUNA_GUARD_WORKER_*`` environment variables and talking to the supervisor over
the inherited socket in ``OPTUNA_GUARD_WORKER_FD`` (see :mod:`._protocol`).

Per ticket it runs exactly one trial with ``study.optimize(objective, n_trials=1,
catch=(Exception,))`` so Optuna's own machinery stays in charge (value checks, tell, logging).
The worker runs no heartbeat thread (the GIL or a SIGSTOP would freeze it): the supervisor
beats for the trials of its live workers (:mod:`._heartbeat`). The worker watches its
supervisor instead (:mod:`._lifeline`) and winds down when it is gone.
The objective is wrapped so the supervisor learns the trial number first thing, the trial gets
``worker_id``/``worker_pid``/``hostname``, and unguarded objectives get ``@guard``.

SIGTERM/SIGINT only set the preemption flag (guarded code stops at its next boundary and the
trial ends ``preempted``); the worker then asks for no more tickets and exits 0.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from typing import Any

EXIT_OK = 0
EXIT_TRIAL_ERROR = 1  # an exception escaped study.optimize (storage error, "Cannot tell ...")
EXIT_FATAL = 70  # cannot start at all: objective or storage unusable (EX_SOFTWARE)
EXIT_STORAGE_UNAVAILABLE = (
    75  # storage unreachable past --storage-deadline at start (EX_TEMPFAIL): no crash-loop strike
)


class _Inbox:
    """Reads supervisor messages on a thread: replies go to a queue, a KILL notice is applied
    at once (the main thread is busy in the trial and would not read it)."""

    def __init__(self, channel: Any) -> None:
        from optuna_guard.supervisor import _protocol

        self._protocol = _protocol
        self._channel = channel
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.kill_notice: dict[str, Any] | None = None
        self.on_eof: Callable[[str], None] | None = None  # the lifeline: the supervisor is gone
        self._thread = threading.Thread(target=self._run, name="optuna-guard-inbox", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from optuna_guard import preemption

        while True:
            try:
                message = self._channel.recv()
            except self._protocol.ProtocolError:
                message = None
            if message is None:
                if self.on_eof is not None:
                    self.on_eof("ticket socket closed")
                self._replies.put(None)
                return
            if message.get("op") == self._protocol.KILL:
                self.kill_notice = message
                preemption.request_stop(
                    str(message.get("reason", "killed by the launcher")), preempted=False
                )
            else:
                self._replies.put(message)

    def next_reply(self) -> dict[str, Any] | None:
        return self._replies.get()


class WorkerLoop:
    """Ticket -> one trial -> report, until denied or the supervisor is gone."""

    def __init__(
        self, settings: Any, channel: Any, inbox: _Inbox, study: Any, objective: Callable[..., Any]
    ) -> None:
        from optuna_guard.supervisor import _protocol

        self.settings = settings
        self.channel = channel
        self.inbox = inbox
        self.study = study
        self.objective = objective
        self.protocol = _protocol
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        self._started_at = 0.0
        self.retry_hook: Callable[[Any, Any], None] | None = None
        self._outcome: tuple[int, int, str] | None = (
            None  # (number, trial id, state) of the last trial
        )
        self.retries: _WorkerRetries | None = None
        self.current: tuple[Any, int] | None = None  # (storage, trial id) while a trial runs
        self._last_value: Any = None

    def run(self) -> int:
        from optuna_guard import preemption

        while True:
            if preemption.stop_requested():
                return EXIT_OK
            if not self.channel.send(self.protocol.TICKET):
                return EXIT_OK  # supervisor gone
            reply = self.inbox.next_reply()
            if reply is None or reply.get("op") != self.protocol.GRANT:
                return EXIT_OK
            if preemption.stop_requested():
                return EXIT_OK  # the ticket is returned when the supervisor sees us exit
            self.run_one_trial()

    def run_one_trial(self) -> None:
        """One trial through ``study.optimize``, then report it. Without retries the end state
        is taken from how the objective ended (Optuna's callback would re-read the trial from
        the storage: a query per trial); with retries the callback's FrozenTrial is needed."""
        from optuna.exceptions import UpdateFinishedTrialError

        self._outcome = None
        self._last_value = None
        try:
            self.study.optimize(
                self._run_objective,
                n_trials=1,
                catch=(Exception,),
                callbacks=[self._after_trial] if self.retry_hook is not None else None,
                gc_after_trial=self.settings.gc_after_trial,
            )
        except (UpdateFinishedTrialError, ValueError) as exc:
            # ValueError: Optuna's "Cannot tell a FAIL trial." when the objective itself met the
            # ended trial first (trial.report after `scontrol suspend` past the heartbeat grace).
            if isinstance(exc, ValueError) and not str(exc).startswith("Cannot tell a"):
                raise
            self._report_lost_result(exc)
            return
        finally:
            self.current = None  # only now: Optuna's tell has stored how the trial ended
        if self.retry_hook is None and self._outcome is not None:
            number, trial_id, state = self._outcome
            self._report_finished(number, trial_id, state)

    def _report_lost_result(self, exc: Exception) -> None:
        """The trial was ended from outside while it ran (a supervisor or another host judged it
        lost): its value cannot be stored. Say so, report the state the storage holds, and go
        on with the next ticket instead of crashing."""
        if self._outcome is None:
            raise exc
        number, trial_id, _state = self._outcome
        try:
            state = self.study._storage.get_trial(trial_id).state.name
        except Exception:
            state = "FAIL"
        logging.getLogger("optuna_guard.supervisor.worker").warning(
            "Trial %d was ended %s from outside while it ran; its result %r is lost (%s).",
            number,
            state,
            self._last_value,
            exc,
        )
        self.channel.send(
            self.protocol.LOST,
            number=number,
            trial_id=trial_id,
            state=state,
            value=repr(self._last_value)[:200],
        )
        self._report_finished(number, trial_id, state)

    def _after_trial(self, study: Any, frozen: Any) -> None:
        # Queue the retry before reporting the end: a worker killed in between is then still
        # "under its trial" for the supervisor, which queues the retry itself (idempotently).
        if self.retry_hook is not None:
            self.retry_hook(study, frozen)
        self._report_finished(frozen.number, frozen._trial_id, frozen.state.name)

    def _run_objective(self, trial: Any) -> Any:
        import optuna

        from optuna_guard import preemption, tags

        self.channel.send(self.protocol.STARTED, number=trial.number, trial_id=trial._trial_id)
        self._started_at = time.monotonic()
        # New trials are created with the worker tags (see _tagging); a popped WAITING trial is
        # tagged here, on a thread while the objective starts
        # (joined before the trial can end).
        tagged = trial.user_attrs.get(tags.WORKER_PID) == self.pid
        tagger = threading.Thread(
            target=self._write_worker_tags,
            args=(trial._trial_id, tagged),
            name="optuna-guard-tags",
            daemon=True,
        )
        tagger.start()
        self._outcome = (trial.number, trial._trial_id, "FAIL")
        self.current = (self.study._storage, trial._trial_id)
        try:
            try:
                preemption.raise_if_stop_requested(trial)
                value = self.objective(trial)
                self._last_value = value
            finally:
                tagger.join()
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
            for key, value in (notice.get("tags") or {}).items():
                trial.set_user_attr(key, value)
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

    def _write_worker_tags(self, trial_id: int, tagged: bool) -> None:

        storage = self.study._storage
        try:
            if not tagged:  # a WAITING trial we popped (enqueued or a retry): tag it now
                for key, value in _worker_tags(self.settings).items():
                    storage.set_trial_user_attr(trial_id, key, value)
        except Exception as exc:  # e.g. the storage gone past its deadline; the trial goes on
            logging.getLogger("optuna_guard.supervisor.worker").error(
                "Could not tag trial id %d: %s", trial_id, exc
            )

    def _tag_final_attempt(self, trial: Any) -> None:
        if self.retries is None:
            return
        try:
            self.retries.tag_final_attempt(trial)
        except Exception as exc:  # tagging must never change how the trial ends
            logging.getLogger("optuna_guard.supervisor.worker").error(
                "Could not tag trial %d: %s", trial.number, exc
            )

    def _report_finished(self, number: int, trial_id: int, state: str) -> None:
        duration = time.monotonic() - self._started_at if self._started_at else None
        logging.getLogger("optuna_guard.supervisor.worker").info(
            "Trial %d finished %s in %.3fs (value %r).",
            number,
            state,
            duration or 0.0,
            self._last_value,
        )
        self.channel.send(
            self.protocol.FINISHED,
            number=number,
            trial_id=trial_id,
            state=state,
            duration=None if duration is None else round(duration, 3),
        )


def _is_finite_value(value: Any, n_objectives: int = 1) -> bool:
    """Whether Optuna will accept ``value`` as a COMPLETE result (finite, one per objective)."""
    import math

    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) != n_objectives:
        return False
    try:
        return all(
            v is not None and not isinstance(v, bool) and math.isfinite(float(v)) for v in values
        )
    except (TypeError, ValueError):
        return False


def _guarded(objective: Callable[..., Any], enabled: bool) -> Callable[..., Any]:
    """Wrap with ``@guard`` (defaults from the OPTUNA_GUARD_* env the supervisor set) unless the
    objective is already guarded or guarding is switched off."""
    if not enabled or hasattr(objective, "__optuna_guard__"):
        return objective
    try:
        from optuna_guard.trial_guard import guard
    except ImportError as exc:
        logging.getLogger("optuna_guard.supervisor.worker").warning(
            "optuna_guard.trial_guard is not importable (%s); running the objective without the in-trial guard.",
            exc,
        )
        return objective
    return guard(objective)


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    warnings.simplefilter("ignore", category=FutureWarning)


def main() -> int:
    from optuna_guard import preemption
    from optuna_guard.supervisor import _protocol
    from optuna_guard.supervisor._config import WorkerSettings

    preemption.reset()
    preemption.install_signal_handlers()
    settings = WorkerSettings.from_env(os.environ)
    channel = _protocol.Channel.from_fd(int(os.environ[_protocol.ENV_FD]))
    _configure_logging()
    log = logging.getLogger("optuna_guard.supervisor.worker")
    log.info(
        "Worker %d (pid %d) starting: study %r, objective %s.",
        settings.worker_id,
        os.getpid(),
        settings.study_name,
        settings.objective,
    )
    inbox = _Inbox(channel)
    holder: list[Any] = []  # the loop, once it exists (the lifeline asks it for the running trial)
    lifeline = _start_lifeline(settings, inbox, lambda: holder[0].current if holder else None)
    try:
        study, objective = _prepare(settings, channel)
    except _storage_unavailable_error() as exc:
        log.error("Worker %d cannot reach the storage: %s", settings.worker_id, exc)
        return EXIT_STORAGE_UNAVAILABLE
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.error("Worker %d cannot start: %s", settings.worker_id, message)
        traceback.print_exc()
        channel.send(_protocol.FATAL, error=message)
        return EXIT_FATAL
    loop = WorkerLoop(settings, channel, inbox, study, objective)
    holder.append(loop)
    _install_retries(loop, settings, study)
    channel.send(_protocol.HELLO, pid=os.getpid())
    try:
        code = loop.run()
    except Exception:
        log.error("Worker %d stops: an error escaped the trial loop.", settings.worker_id)
        traceback.print_exc()
        return EXIT_TRIAL_ERROR
    if lifeline is not None and lifeline.lost:
        from optuna_guard.supervisor._lifeline import EXIT_SUPERVISOR_LOST, kill_own_tree

        kill_own_tree()
        log.warning(
            "Worker %d (pid %d) exits: %s.", settings.worker_id, os.getpid(), lifeline.reason
        )
        return EXIT_SUPERVISOR_LOST
    log.info("Worker %d (pid %d) exits.", settings.worker_id, os.getpid())
    return code


def _start_lifeline(settings: Any, inbox: _Inbox, current_trial: Callable[[], Any]) -> Any:
    """Watch the supervisor (parent-death signal, socket EOF, parent pid); None when the
    supervisor did not say who it is (a worker started by hand)."""
    if not settings.supervisor_pid:
        return None
    from optuna_guard import preemption
    from optuna_guard.supervisor._lifeline import Lifeline

    lifeline = Lifeline(
        settings.supervisor_pid,
        settings.grace_period,
        current_trial=current_trial,
        on_lost=preemption.request_stop,
    )
    inbox.on_eof = lifeline.supervisor_gone
    return lifeline.start()


def _prepare(settings: Any, channel: Any = None) -> tuple[Any, Callable[..., Any]]:
    from optuna_guard.supervisor._objective_spec import load_objective

    objective = load_objective(settings.objective)  # first: a module that cannot load fails fast
    import optuna

    from optuna_guard.supervisor._study import make_pruner, make_sampler, open_checked_storage

    warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Optuna's per-trial INFO line reads the best trial and the metric names from the storage
    # (two queries a trial); the worker logs its own line instead (WorkerLoop._report_finished).
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    objective = _guarded(objective, settings.guard)
    # The trial storage has no heartbeat of its own: the supervisor keeps Optuna's heartbeat
    # rows for the running trial on a second storage, without Optuna's per-trial cost.
    storage: Any = (
        open_checked_storage(  # RDBStorage() queries the database: retried up to the deadline
            settings.storage,
            connect_timeout=settings.connect_timeout,
            skip_setup=True,  # tables exist
            deadline_s=settings.storage_deadline,
        )
    )
    _OPEN_STORAGES.append(storage)
    from optuna_guard import resume  # issue 13: objective version, result cache, sampler history

    storage = _tagging(storage, {**_worker_tags(settings), **resume.worker_tags(os.environ)})
    storage = _maybe_resilient(storage, settings, channel)
    seed = None if settings.seed is None else settings.seed + settings.spawn_index
    study = optuna.load_study(
        study_name=settings.study_name,
        storage=storage,
        sampler=make_sampler(settings.sampler, seed),
        pruner=make_pruner(settings.pruner),
    )
    objective = resume.install_in_worker(study, objective, os.environ)
    return study, objective


def _storage_unavailable_error() -> type[BaseException]:
    from optuna_guard.exceptions import StorageUnavailableError

    return StorageUnavailableError


def _worker_tags(settings: Any) -> dict[str, Any]:
    from optuna_guard import tags

    worker_tags = {
        tags.WORKER_ID: settings.worker_id,
        tags.WORKER_PID: os.getpid(),
        tags.HOSTNAME: socket.gethostname(),
    }
    if settings.launch_id:
        worker_tags[tags.LAUNCH_ID] = settings.launch_id
    return worker_tags


def _tagging(storage: Any, worker_tags: dict[str, Any]) -> Any:
    """The RDB storage behind Optuna's cache, creating every new RUNNING trial with the worker
    tags in the same insert (three separate attribute writes cost more than a short trial's
    bookkeeping). Falls back to the plain storage if Optuna's cache class is not available;
    the worker then writes the tags itself."""
    try:
        from optuna.storages._cached_storage import _CachedStorage
    except ImportError:  # pragma: no cover - another Optuna layout
        return storage
    from optuna.storages import RDBStorage

    if not isinstance(storage, RDBStorage):  # journal/gRPC: no cache, tags written apart
        return storage
    _insert_user_attrs_in_bulk(storage)
    import copy
    import datetime

    from optuna.trial import FrozenTrial, TrialState

    from optuna_guard import _attrs

    class _TaggingCachedStorage(_CachedStorage):
        def create_new_trial(
            self, study_id: int, template_trial: FrozenTrial | None = None
        ) -> int:
            if template_trial is None:
                template_trial = FrozenTrial(
                    number=-1,
                    state=TrialState.RUNNING,
                    value=None,
                    datetime_start=datetime.datetime.now(),
                    datetime_complete=None,
                    params={},
                    distributions={},
                    user_attrs=dict(worker_tags),
                    system_attrs={},
                    intermediate_values={},
                    trial_id=-1,
                )
            elif (
                template_trial.state == TrialState.RUNNING
            ):  # not enqueued WAITING trials or retries
                template_trial = copy.copy(template_trial)
                template_trial.user_attrs = {**worker_tags, **template_trial.user_attrs}
            return super().create_new_trial(study_id, template_trial)

        def set_trial_user_attrs(self, trial_id: int, attrs: Mapping[str, Any]) -> None:
            """The guard's end-of-trial tags in one transaction (see ``optuna_guard._attrs``);
            Optuna's cache forwards user attrs to the database unchanged, so this does too."""
            _attrs.set_user_attrs(self._backend, trial_id, attrs)

    return _TaggingCachedStorage(storage)


def _insert_user_attrs_in_bulk(storage: Any) -> None:
    """A new trial's user attrs (the worker tags) as plain INSERTs in the creating transaction.
    Optuna writes each with a trial lookup and an upsert (two statements and a statement build
    per key, ~1 ms of CPU for the five tags); a trial made in this transaction has no rows to
    conflict with and is RUNNING, so the lookups and upserts decide nothing."""
    import copy
    import json

    from optuna.storages._rdb import models

    prepare = storage._get_prepared_new_trial

    def prepared_new_trial(study_id: int, template_trial: Any, session: Any) -> Any:
        if template_trial is None or not template_trial.user_attrs:
            return prepare(study_id, template_trial, session)
        user_attrs = template_trial.user_attrs
        bare = copy.copy(template_trial)
        bare.user_attrs = {}
        trial = prepare(study_id, bare, session)
        session.add_all(
            [
                models.TrialUserAttributeModel(
                    trial_id=trial.trial_id, key=key, value_json=json.dumps(value)
                )
                for key, value in user_attrs.items()
            ]
        )
        return trial

    storage._get_prepared_new_trial = prepared_new_trial


def _maybe_resilient(storage: Any, settings: Any, channel: Any = None) -> Any:
    """Retry transient database errors (a PostgreSQL restart) for up to ``storage_deadline``
    seconds instead of crashing the worker and losing the trial's result; the outage is logged
    here and reported to the supervisor's event log."""
    if settings.storage_deadline is None:
        return storage
    from optuna_guard.resilience import ResilientStorage, RetrySettings
    from optuna_guard.supervisor import _protocol

    def on_outage(event: str, seconds: float, what: str) -> None:
        if channel is not None:
            channel.send(_protocol.OUTAGE, outage=event, seconds=round(seconds, 1), what=what)

    return ResilientStorage(
        storage, RetrySettings(deadline_s=settings.storage_deadline), on_outage=on_outage
    )


class _WorkerRetries:
    """Retries of trials that ended inside the worker (the in-trial guard pruned them for
    memory, a SIGTERM preempted them, a pruner marked them diverged): tag the last allowed
    attempt ``retries_exhausted`` while it is still RUNNING, and queue the retry once Optuna
    has ended it. Trials ended by the supervisor (kills, crashes) are retried there."""

    def __init__(self, policy: Any, study: Any, channel: Any) -> None:
        self.policy = policy
        self.study = study
        self.channel = channel

    def tag_final_attempt(self, trial: Any) -> None:
        from optuna_guard.retries import FREE_RETRIES, RETRY_HISTORY

        storage = self.study._storage
        attrs = storage.get_trial_user_attrs(trial._trial_id)
        if not self.policy.is_retryable(attrs):
            return
        system_attrs = storage.get_trial_system_attrs(trial._trial_id)
        attempt = len(system_attrs.get(RETRY_HISTORY, [])) - int(system_attrs.get(FREE_RETRIES, 0))
        free = self.policy.is_free_preemption(attrs, system_attrs)
        for key, value in self.policy.final_tags(attrs, attempt, free=free).items():
            trial.set_user_attr(key, value)

    def after_trial(self, study: Any, frozen: Any) -> None:
        from optuna.trial import TrialState

        from optuna_guard.retries import enqueue_retry
        from optuna_guard.supervisor import _protocol

        if frozen.state not in (
            TrialState.PRUNED,
            TrialState.FAIL,
        ) or not self.policy.is_retryable(frozen.user_attrs):
            return
        try:
            number = enqueue_retry(study, frozen, self.policy)
        except Exception as exc:  # a broken shrink hook must not take the worker down
            logging.getLogger("optuna_guard.supervisor.worker").error(
                "Could not queue a retry of trial %d: %s: %s",
                frozen.number,
                type(exc).__name__,
                exc,
            )
            return
        if number is not None:
            self.channel.send(_protocol.RETRIED, number=frozen.number, retry_number=number)


def _install_retries(loop: WorkerLoop, settings: Any, study: Any) -> None:
    if settings.retry <= 0:
        return
    from optuna_guard.retries import RetryPolicy

    kwargs: dict[str, Any] = {
        "max_retries": settings.retry,
        "max_preemptions": settings.max_preemptions,
    }
    if settings.retry_on:
        kwargs["retry_on"] = frozenset(settings.retry_on)
    if settings.retry_shrink:
        kwargs["shrink"] = settings.retry_shrink
    retries = _WorkerRetries(RetryPolicy(**kwargs), study, loop.channel)
    loop.retries = retries
    loop.retry_hook = retries.after_trial


def _exit_normally(code: int) -> None:
    """Leave like a normal Python program (``sys.exit``): atexit handlers run, loggers flush,
    multiprocessing pools are terminated and executors shut down (issue 16: ``os._exit`` left
    every recycled joblib worker's loky pool alive for minutes). joblib's reusable loky
    executor outlives its users on purpose, so it is shut down here. The supervisor waits a
    bounded time for this exit and kills whatever the worker leaves behind."""
    _shut_down_loky()
    for storage in _OPEN_STORAGES:
        try:
            engine = getattr(storage, "engine", None)
            if engine is not None:
                engine.dispose()
        except Exception:
            pass
    sys.exit(code)


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
            logging.getLogger("optuna_guard.supervisor.worker").warning(
                "Could not shut down the loky executor: %s", exc
            )


_OPEN_STORAGES: list[Any] = []


if __name__ == "__main__":
    _exit_normally(main())
