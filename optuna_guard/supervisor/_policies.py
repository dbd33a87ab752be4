"""Decisions of the watchdog as pure functions: which worker to kill, when to recycle one,
how to describe the way a process ended. Pure so the tests can table-drive them.

Victim policy when the *system* runs low (``--min-available-gb``), documented in
docs/launcher.md: only workers that run a trial (an idle or starting worker is never killed for
system memory: its memory is rarely the problem and killing it starts a kill/respawn loop), and
only one whose tree holds at least ``VICTIM_MIN_SHARE`` of the deficit (otherwise the memory is
held elsewhere and a kill would only lose work); among them the largest process-tree RSS; on a
tie the trial that started last (the least work lost). One victim at a time: no new victim is
chosen while an earlier one is still alive.
"""

from __future__ import annotations

import dataclasses
import random
import signal
from collections.abc import Sequence

from optuna_guard._units import GB

# Why a worker ended, as it appears in kill_reason and the log.
_SIGNAL_HINTS = {
    signal.SIGKILL: "perhaps the kernel OOM killer",
    signal.SIGSEGV: "segmentation fault in native code",
    signal.SIGBUS: "bus error in native code",
    signal.SIGABRT: "aborted (assertion in native code?)",
    signal.SIGFPE: "floating-point exception in native code",
    signal.SIGILL: "illegal instruction",
    signal.SIGTERM: "terminated by someone else",
}


_NOT_OOM = "not the kernel OOM killer (its memory cgroup recorded no OOM kill)"


def describe_exit(returncode: int, *, oom_ruled_out: bool = False) -> str:
    """``-9`` -> "worker exited with SIGKILL — perhaps the kernel OOM killer".

    ``oom_ruled_out``: the worker had a memory cgroup of its own whose OOM-kill counter did not
    move, so a SIGKILL came from a user, a scheduler or a script, and we say so.
    """
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
        except ValueError:
            return f"worker exited with signal {-returncode}"
        hint = _SIGNAL_HINTS.get(sig)
        if sig == signal.SIGKILL and oom_ruled_out:
            hint = _NOT_OOM
        return f"worker exited with {sig.name}" + (f" — {hint}" if hint else "")
    if returncode > 128 and returncode - 128 in signal.Signals._value2member_map_:
        return describe_exit(-(returncode - 128), oom_ruled_out=oom_ruled_out)
    return f"worker exited with code {returncode}"


@dataclasses.dataclass(frozen=True)
class VictimCandidate:
    """What the victim policy needs to know about one worker."""

    worker_id: int
    tree_rss_bytes: int
    in_trial: bool
    trial_started_at: float | None = None
    pid: int = 0  # identifies the process (a slot id is shared with a replacement for a moment)


VICTIM_MIN_SHARE = 0.5  # a low-memory victim must hold at least half of the deficit


def choose_victim(
    candidates: Sequence[VictimCandidate], deficit_bytes: int | None = None
) -> VictimCandidate | None:
    """The worker to kill when the system is ``deficit_bytes`` short of ``--min-available-gb``
    (see the module docstring); None when no worker in a trial could make a difference."""
    eligible = [c for c in candidates if c.in_trial]
    if deficit_bytes is not None:
        eligible = [c for c in eligible if c.tree_rss_bytes >= VICTIM_MIN_SHARE * deficit_bytes]
    if not eligible:
        return None
    return max(
        eligible,
        key=lambda c: (
            c.in_trial,
            c.tree_rss_bytes,
            c.trial_started_at if c.trial_started_at is not None else float("-inf"),
        ),
    )


def over_limit(
    candidates: Sequence[VictimCandidate], limit_gb: float | None
) -> VictimCandidate | None:
    """The largest worker over the per-worker hard limit, if any."""
    if limit_gb is None:
        return None
    limit = limit_gb * GB
    over = [c for c in candidates if c.tree_rss_bytes > limit]
    return max(over, key=lambda c: c.tree_rss_bytes) if over else None


def jittered_age_limit(
    max_age: float | None, jitter: float, rng: random.Random | None = None
) -> float | None:
    """Each worker's own age limit, drawn in ``[max_age * (1 - jitter), max_age]`` so workers
    started together do not all restart together and ``max_age`` stays a true maximum."""
    if max_age is None:
        return None
    uniform = rng.uniform if rng is not None else random.uniform
    return max_age * (1.0 - uniform(0.0, jitter))


def recycle_reason(
    *,
    age_s: float,
    age_limit_s: float | None,
    trials_finished: int,
    max_trials: int | None,
    tree_rss_bytes: int,
    recycle_rss_gb: float | None,
) -> str | None:
    """Why a worker that just finished a trial should exit instead of taking another, or None.

    Checked when the worker asks for its next ticket, i.e. between trials: no trial is lost.
    The RSS rule only applies after a trial (a fresh worker is never recycled for its baseline).
    """
    if age_limit_s is not None and age_s >= age_limit_s:
        return f"age {age_s:.0f}s >= {age_limit_s:.0f}s"
    if max_trials is not None and trials_finished >= max_trials:
        return f"{trials_finished} trials >= --max-trials-per-worker {max_trials}"
    if recycle_rss_gb is not None and trials_finished > 0 and tree_rss_bytes > recycle_rss_gb * GB:
        return f"tree RSS {tree_rss_bytes / GB:.2f} GB after a trial > {recycle_rss_gb:.2f} GB"
    return None
