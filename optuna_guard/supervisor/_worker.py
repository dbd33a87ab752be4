"""The worker process: ``python -m optuna_guard.supervisor._worker``.

Started fresh by the supervisor (never forked from a parent that may hold CUDA or big state),
configured by ``OPTUNA_GUARD_WORKER_*`` environment variables and talking to the supervisor over
the inherited socket in ``OPTUNA_GUARD_WORKER_FD`` (see :mod:`._protocol`).

Per ticket it runs exactly one trial with ``study.optimize(objective, n_trials=1,
catch=(Exception,))`` so Optuna's own machinery stays in charge: the RDB heartbeat thread,
``fail_stale_trials`` of dead launchers before each ask, invalid-value handling and logging.
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
from typing import Any, Callable

EXIT_OK = 0
EXIT_TRIAL_ERROR = 1  # an exception escaped study.optimize (storage error, "Cannot tell ...")
EXIT_FATAL = 70  # cannot start at all: objective or storage unusable (EX_SOFTWARE)


class _Inbox:
    """Reads supervisor messages on a thread: replies go to a queue, a KILL notice is applied
    at once (the main thread is busy in the trial and would not read it)."""

    def __init__(self, channel: Any) -> None:
        from optuna_guard.supervisor import _protocol

        self._protocol = _protocol
        self._channel = channel
        self._replies: "queue.Queue[dict[str, Any] | None]" = queue.Queue()
        self.kill_notice: dict[str, Any] | None = None
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
                self._replies.put(None)
                return
            if message.get("op") == self._protocol.KILL:
                self.kill_notice = message
                preemption.request_stop(str(message.get("reason", "killed by the launcher")))
            else:
                self._replies.put(message)

    def next_reply(self) -> dict[str, Any] | None:
        return self._replies.get()


class WorkerLoop:
    """Ticket -> one trial -> report, until denied or the supervisor is gone."""

    def __init__(self, settings: Any, channel: Any, inbox: _Inbox, study: Any, objective: Callable[..., Any]) -> None:
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
        self.callbacks: list[Callable[[Any, Any], None]] = [self._report_finished]
        self.retry_hook: Callable[[Any, Any], None] | None = None

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
        self.study.optimize(
            self._run_objective,
            n_trials=1,
            catch=(Exception,),
            callbacks=self.callbacks,
            gc_after_trial=self.settings.gc_after_trial,
        )

    def _run_objective(self, trial: Any) -> Any:
        import optuna

        from optuna_guard import preemption, tags

        self.channel.send(self.protocol.STARTED, number=trial.number, trial_id=trial._trial_id)
        self._started_at = time.monotonic()
        trial.set_user_attr(tags.WORKER_ID, self.settings.worker_id)
        trial.set_user_attr(tags.WORKER_PID, self.pid)
        trial.set_user_attr(tags.HOSTNAME, self.hostname)
        try:
            preemption.raise_if_stop_requested(trial)
            return self.objective(trial)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            notice = self.inbox.kill_notice
            if notice is None:
                raise
            # The supervisor is killing us for memory; the trial stopped at a boundary in time,
            # so end it the way a hard kill would (tags, then PRUNED or FAIL).
            reason = str(notice.get("reason", "killed by the launcher"))
            if isinstance(exc, preemption.TrialPreempted):
                trial.set_user_attr(tags.PREEMPTED, False)  # the stop was a kill, not a preemption
            for key, value in (notice.get("tags") or {}).items():
                trial.set_user_attr(key, value)
            if self.settings.on_kill == "fail":
                raise RuntimeError(reason) from exc
            raise optuna.TrialPruned(reason) from exc

    def _report_finished(self, study: Any, frozen: Any) -> None:
        duration = time.monotonic() - self._started_at if self._started_at else None
        self.channel.send(
            self.protocol.FINISHED,
            number=frozen.number,
            trial_id=frozen._trial_id,
            state=frozen.state.name,
            duration=None if duration is None else round(duration, 3),
        )
        if self.retry_hook is not None:
            self.retry_hook(study, frozen)


def _guarded(objective: Callable[..., Any], enabled: bool) -> Callable[..., Any]:
    """Wrap with ``@guard`` (defaults from the OPTUNA_GUARD_* env the supervisor set) unless the
    objective is already guarded or guarding is switched off."""
    if not enabled or hasattr(objective, "__optuna_guard__"):
        return objective
    try:
        from optuna_guard.trial_guard import guard
    except ImportError as exc:
        logging.getLogger("optuna_guard.supervisor.worker").warning(
            "optuna_guard.trial_guard is not importable (%s); running the objective without the in-trial guard.", exc
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
    import optuna

    warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)


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
    log.info("Worker %d (pid %d) starting: study %r, objective %s.", settings.worker_id, os.getpid(), settings.study_name, settings.objective)
    inbox = _Inbox(channel)
    try:
        study, objective = _prepare(settings)
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.error("Worker %d cannot start: %s", settings.worker_id, message)
        traceback.print_exc()
        channel.send(_protocol.FATAL, error=message)
        return EXIT_FATAL
    loop = WorkerLoop(settings, channel, inbox, study, objective)
    _install_retries(loop, settings, study)
    channel.send(_protocol.HELLO, pid=os.getpid())
    try:
        code = loop.run()
    except Exception:
        log.error("Worker %d stops: an error escaped the trial loop.", settings.worker_id)
        traceback.print_exc()
        return EXIT_TRIAL_ERROR
    log.info("Worker %d (pid %d) exits.", settings.worker_id, os.getpid())
    return code


def _prepare(settings: Any) -> tuple[Any, Callable[..., Any]]:
    import optuna

    from optuna_guard.supervisor._objective_spec import load_objective
    from optuna_guard.supervisor._study import make_pruner, make_sampler, open_checked_storage

    objective = _guarded(load_objective(settings.objective), settings.guard)
    storage: Any = open_checked_storage(
        settings.storage,
        connect_timeout=settings.connect_timeout,
        heartbeat_interval=settings.heartbeat_interval,
        heartbeat_grace=settings.heartbeat_grace,
        skip_setup=True,  # the supervisor created the tables and checked the schema
    )
    _OPEN_STORAGES.append(storage)
    storage = _maybe_resilient(storage, settings)
    seed = None if settings.seed is None else settings.seed + settings.spawn_index
    study = optuna.load_study(
        study_name=settings.study_name,
        storage=storage,
        sampler=make_sampler(settings.sampler, seed),
        pruner=make_pruner(settings.pruner),
    )
    return study, objective


def _maybe_resilient(storage: Any, settings: Any) -> Any:
    """Phase 2 hook: wrap the storage so DB outages are retried (see docs/launcher.md)."""
    return storage


def _install_retries(loop: WorkerLoop, settings: Any, study: Any) -> None:
    """Phase 2 hook: re-queue trials the in-trial guard pruned/preempted (see docs/launcher.md)."""


def _exit_now(code: int) -> None:
    """Leave without the interpreter's slow teardown (~0.5 s of module finalisation): the
    launcher waits for this exit to start a replacement. Logs are flushed and database
    connections closed first; nothing else needs finalising."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    for storage in _OPEN_STORAGES:
        try:
            engine = getattr(storage, "engine", None)
            if engine is not None:
                engine.dispose()
        except Exception:
            pass
    os._exit(code)


_OPEN_STORAGES: list[Any] = []


if __name__ == "__main__":
    _exit_now(main())
