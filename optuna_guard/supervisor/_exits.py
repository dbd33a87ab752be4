"""How a worker ended, and what happens to its trial: a pure function of an exit record.

The arbiter collects an :class:`ExitRecord` when it reaps a worker (exit code, what the
supervisor knew about it: its trial, a kill it ordered, a stop in progress) and acts on the
:class:`ExitDecision` (end the trial in this state with these tags, count a crash, strike the
crash-loop counter, log and emit). Keeping the decision free of side effects lets a table of
cases test every path (tests/test_supervision_exits.py).
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Mapping
from typing import Any

from optuna_guard import tags
from optuna_guard.supervisor._policies import describe_exit

# What the supervisor was doing to the worker (KillOrder.kind).
MEMORY_KILL = "memory"
PREEMPT_KILL = "preempt"
TIMEOUT_KILL = "timeout"
EXIT_KILL = "exit"  # told to exit (denied a ticket) and still alive after the bounded exit wait

EXIT_STORAGE_UNAVAILABLE = 75  # the worker could not reach the storage at start (EX_TEMPFAIL)
EXIT_SUPERVISOR_LOST = (
    99  # the worker's lifeline saw no supervisor (cannot be reaped by us; listed for completeness)
)

# Outcomes (the arbiter logs, counts and emits by these).
KILLED_FOR_MEMORY = "killed_for_memory"  # our memory kill, with or without a trial
OOM_KILLED = "oom_killed"  # the kernel killed inside the worker's own memory cgroup
PREEMPTED = "preempted"  # stopping (signal, time budget, grace period over) under a trial
TIMED_OUT = "timed_out"  # --trial-timeout
CRASHED_IN_TRIAL = "crashed_in_trial"
KILLED_IDLE = "killed_idle"  # we killed it between trials: nothing to end, no strike
STORAGE_UNAVAILABLE = "storage_unavailable"
BOOT_FAILURE = "boot_failure"  # died before its first trial: a crash-loop strike
KILLED_AT_BOOT = "killed_at_boot"  # signalled from outside before its first trial: no strike
DIED_BETWEEN_TRIALS = "died_between_trials"
EXITED = "exited"  # a normal exit (denied a ticket, stop requested)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExitRecord:
    """What the supervisor knows when it reaps a worker."""

    code: int  # Popen returncode: >= 0 exit status, < 0 the signal that ended it
    pid: int
    in_trial: bool  # it had reported "started" and not "finished"
    ticket_without_trial: bool = False  # granted a ticket, never reported its trial
    kill_kind: str | None = (
        None  # a kill the supervisor ordered (MEMORY_KILL, PREEMPT_KILL, TIMEOUT_KILL)
    )
    kill_reason: str | None = None
    kill_tags: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    stopping: bool = False
    stop_reason: str | None = None
    fatal_error: str | None = None
    trials_started: int = 0
    deny_reason: str | None = None
    on_kill: str = "prune"
    oom_killed: bool = False  # the kernel OOM-killed a process in the worker's cgroup
    memory_limit_gb: float | None = None
    own_cgroup: bool = False  # it ran in a memory cgroup of its own (OOM kills there are recorded)
    worker_id: int | None = None  # names the worker in reasons, as the arbiter's own kills do
    available_gb: float | None = None  # available memory at the exit (the kill record's figure)
    peak_rss_gb: float | None = None  # the trial's peak as the supervisor measured it


@dataclasses.dataclass(frozen=True)
class ExitDecision:
    outcome: str
    reason: str
    trial_state: str | None = None  # "PRUNED" / "FAIL" for the worker's running trial, or None
    trial_tags: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    crash: bool = False  # counts in the summary's crashes
    boot_strike: bool = False  # counts toward --crash-loop-limit
    sweep_unreported: bool = False  # look for a trial it created but never reported
    sweep_as_preempted: bool = False


def decide(record: ExitRecord) -> ExitDecision:
    """The one place that says how a worker ended and what becomes of its trial."""
    description = describe_exit(
        record.code, oom_ruled_out=record.own_cgroup and not record.oom_killed
    )
    sweep = record.ticket_without_trial
    if record.oom_killed and record.kill_kind is None:
        whose = "the worker's own" if record.worker_id is None else f"worker {record.worker_id}'s"
        reason = f"out of memory: the kernel killed a process in {whose} memory cgroup"
        if record.memory_limit_gb is not None:
            reason += f" (hard limit --max-worker-rss-gb {record.memory_limit_gb:.2f} GB)"
        trial_tags = tags.killed(
            reason,
            limit="max_worker_rss_gb",
            available_gb=None if record.available_gb is None else round(record.available_gb, 2),
            peak_rss_gb=None if record.peak_rss_gb is None else round(record.peak_rss_gb, 2),
            pid=record.pid,
        )
        return ExitDecision(
            OOM_KILLED,
            reason,
            _memory_state(record) if record.in_trial else None,
            trial_tags if record.in_trial else {},
            # a module that allocates past the limit at import does so every time: a strike
            boot_strike=_booting(record),
            sweep_unreported=sweep,
        )
    if record.kill_kind == MEMORY_KILL:
        return ExitDecision(
            KILLED_FOR_MEMORY,
            record.kill_reason or description,
            _memory_state(record) if record.in_trial else None,
            dict(record.kill_tags) if record.in_trial else {},
            sweep_unreported=sweep,
        )
    if record.kill_kind == TIMEOUT_KILL:
        reason = record.kill_reason or description
        trial_tags = dict(record.kill_tags) or tags.timed_out(reason)
        trial_tags.setdefault(tags.WORKER_PID, record.pid)
        return ExitDecision(
            TIMED_OUT,
            reason,
            "FAIL" if record.in_trial else None,
            trial_tags if record.in_trial else {},
            sweep_unreported=sweep,
        )
    if record.in_trial and (record.stopping or record.kill_kind == PREEMPT_KILL):
        reason = record.kill_reason or f"preempted: {record.stop_reason}; {description}"
        return ExitDecision(
            PREEMPTED,
            reason,
            "FAIL",
            {tags.PREEMPTED: True, tags.KILL_REASON: reason, tags.WORKER_PID: record.pid},
            sweep_unreported=sweep,
            sweep_as_preempted=True,
        )
    if record.in_trial:
        return ExitDecision(
            CRASHED_IN_TRIAL,
            description,
            "FAIL",
            tags.crashed(description, pid=record.pid),
            crash=True,
            sweep_unreported=sweep,
        )
    sweep_reason_preempted = record.stopping
    if record.kill_kind is not None:
        return ExitDecision(
            KILLED_IDLE,
            f"killed by the launcher: {record.kill_reason}",
            sweep_unreported=sweep,
            sweep_as_preempted=sweep_reason_preempted,
        )
    if record.code == EXIT_STORAGE_UNAVAILABLE:
        return ExitDecision(
            STORAGE_UNAVAILABLE, "storage unreachable at worker start", sweep_unreported=sweep
        )
    if record.code != 0 or record.fatal_error:
        reason = record.fatal_error or description
        if _booting(record):
            if not record.fatal_error and _signalled_from_outside(record):
                return ExitDecision(
                    KILLED_AT_BOOT,
                    f"{reason} (from outside; not a crash-loop strike)",
                    sweep_unreported=sweep,
                )
            return ExitDecision(
                BOOT_FAILURE, reason, crash=True, boot_strike=True, sweep_unreported=sweep
            )
        return ExitDecision(
            DIED_BETWEEN_TRIALS,
            reason,
            crash=True,
            sweep_unreported=sweep,
            sweep_as_preempted=sweep_reason_preempted,
        )
    reason = record.deny_reason or ("stop requested" if record.stopping else "exited by itself")
    return ExitDecision(
        EXITED, reason, sweep_unreported=sweep, sweep_as_preempted=sweep_reason_preempted
    )


# Signals someone else sends (a user, a scheduler, a test); SIGSEGV/SIGABRT/SIGBUS/SIGFPE/SIGILL
# are the process's own faults and stay crash-loop strikes.
_OUTSIDE_SIGNALS = frozenset(
    {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2}
)


def _booting(record: ExitRecord) -> bool:
    return record.trials_started == 0 and not record.stopping and not record.in_trial


def _signalled_from_outside(record: ExitRecord) -> bool:
    """A signal exit that says nothing about the worker's code. SIGKILL counts as outside only
    when the worker had its own cgroup (an OOM kill there is recorded and handled before);
    without one a SIGKILL may be the kernel OOM killer, so it stays a strike."""
    if record.code >= 0:
        return False
    signum = -record.code
    if signum == signal.SIGKILL:
        return record.own_cgroup
    return signum in _OUTSIDE_SIGNALS


def _memory_state(record: ExitRecord) -> str:
    return "FAIL" if record.on_kill == "fail" else "PRUNED"
