"""A worker's lifelines to its supervisor: the worker must never outlive the launch.

Three independent signs that the supervisor is gone, any one is enough:

- the parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGHUP)``, Linux): the kernel sends SIGHUP
  when the supervisor dies, however it died (SIGKILL, OOM kill);
- end of stream on the ticket socket (the supervisor's end closed);
- the parent pid changed (re-parented to init or a subreaper), checked every half second.

Then the running trial is asked to stop at its next boundary (the preemption flag: a guarded
trial or ``TrialCheckpointer.save`` gets its chance to checkpoint), ending FAIL tagged
``preempted`` with the reason "supervisor lost"; the worker takes no more tickets. If the trial
has not stopped within the grace period, the lifeline ends it from here (tags, then FAIL), kills
every process of this worker (its process group, descendants and anything carrying its
environment marker), and exits. A kernel alarm (SIGALRM left at its default action, which
terminates), one second after the grace period, is the last resort for a worker whose main
thread holds the GIL.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from optuna_guard._logging import get_logger

_log = get_logger(__name__)

PR_SET_PDEATHSIG = 1
SUPERVISOR_LOST = "supervisor lost"
EXIT_SUPERVISOR_LOST = 99  # "requeue me", as for a preemption

ENV_LAUNCH_ID = "OPTUNA_GUARD_LAUNCH_ID"  # inherited by every descendant: the launch's marker
ENV_WORKER_MARK = "OPTUNA_GUARD_WORKER_MARK"  # "<launch id>/<spawn index>": one worker's marker


def set_parent_death_signal(signum: int = signal.SIGHUP) -> bool:
    """Ask the kernel to send ``signum`` when our parent dies; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


class Lifeline:
    """Watches the supervisor from inside a worker and winds the worker down when it is gone.

    ``current_trial`` returns the running trial's (storage, trial id), or None between trials;
    ``on_lost`` is called once (e.g. to request the trial stop). ``kill_tree`` kills this
    worker's descendants (injected so tests and other platforms can replace it).
    """

    def __init__(
        self,
        supervisor_pid: int,
        grace_period: float,
        *,
        current_trial: Callable[[], Any] = lambda: None,
        on_lost: Callable[[str], None] | None = None,
        kill_tree: Callable[[], None] | None = None,
        exit: Callable[[int], Any] = os._exit,
        poll_interval: float = 0.5,
    ) -> None:
        self.supervisor_pid = supervisor_pid
        self.grace_period = max(0.0, float(grace_period))
        self._current_trial = current_trial
        self._on_lost = on_lost
        self._kill_tree = kill_tree or kill_own_tree
        self._exit = exit
        self._poll_interval = poll_interval
        self._lost = threading.Event()
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def start(self) -> Lifeline:
        """Arm the parent-death signal and the watcher thread. If the supervisor died before
        the signal was armed, the parent pid has already changed and the watcher sees it."""
        signal.signal(signal.SIGHUP, self._on_sighup)
        if signal.getsignal(signal.SIGALRM) in (signal.SIG_IGN, None):
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
        set_parent_death_signal(signal.SIGHUP)
        self._thread = threading.Thread(
            target=self._run, name="optuna-guard-lifeline", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def supervisor_gone(self, how: str) -> None:
        """The supervisor is gone (``how`` names the lifeline). Safe in a signal handler."""
        if self._lost.is_set():
            return
        self.reason = f"{SUPERVISOR_LOST} ({how})"
        self._lost.set()
        if self._on_lost is not None:
            self._on_lost(self.reason)

    def _on_sighup(self, _signum: int, _frame: Any) -> None:
        self.supervisor_gone("parent-death signal")

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._lost.is_set() and os.getppid() != self.supervisor_pid:
                self.supervisor_gone(
                    f"parent pid changed from {self.supervisor_pid} to {os.getppid()}"
                )
            if self._lost.wait(self._poll_interval):
                break
        if self._stop.is_set():
            return
        self._wind_down()

    def _wind_down(self) -> None:
        """Give the trial the grace period to stop by itself, then end it and leave."""
        _log.warning(
            "Worker pid %d: %s; the running trial stops at its next boundary, %.0fs at most.",
            os.getpid(),
            self.reason,
            self.grace_period,
        )
        _arm_kernel_alarm(self.grace_period + 1.0)
        deadline = time.monotonic() + self.grace_period
        while time.monotonic() < deadline and self._current_trial() is not None:
            time.sleep(0.05)
        current = self._current_trial()
        if current is not None:
            self._end_trial(*current)
        self._kill_tree()
        _log.warning("Worker pid %d exits: %s.", os.getpid(), self.reason)
        _flush()
        self._exit(EXIT_SUPERVISOR_LOST)

    def _end_trial(self, storage: Any, trial_id: int) -> None:
        from optuna.trial import TrialState

        from optuna_guard import tags
        from optuna_guard.storage import end_trial_from_outside

        reason = (
            f"preempted: {self.reason}; the trial did not stop within the "
            f"{self.grace_period:.0f}s grace period"
        )
        try:
            end_trial_from_outside(
                storage,
                trial_id,
                TrialState.FAIL,
                user_attrs=tags.preempted(reason),
            )
        except Exception as exc:  # the storage may be what failed; leaving matters more
            _log.error("Could not end trial id %d: %s: %s", trial_id, type(exc).__name__, exc)


def _arm_kernel_alarm(seconds: float) -> None:
    """SIGALRM at its default action terminates the process in the kernel, GIL or not (the
    action is set to default in :meth:`Lifeline.start`, on the main thread)."""
    try:
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.1))
    except (ValueError, OSError):
        pass


def kill_own_tree() -> None:
    """SIGKILL every process of this worker but itself: descendants (even daemonised ones,
    through the environment marker) and the rest of its process group."""
    from optuna_guard.memory import _tree

    own = os.getpid()
    victims = set(_tree.descendants(own))
    mark = os.environ.get(ENV_WORKER_MARK)
    if mark:
        victims.update(_tree.pids_with_env(f"{ENV_WORKER_MARK}={mark}".encode()))
    victims.discard(own)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
