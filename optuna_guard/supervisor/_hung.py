"""Hung workers: ``--trial-timeout`` and the "stopped" / "no progress" health of a worker.

A SIGSTOPped worker (state T: ``scontrol suspend``, a debugger, ``kill -STOP``) or a deadlocked
one (waiting on a lock forever, zero CPU) looks alive to every other check. The status line says
so, and ``--trial-timeout`` bounds how long any one trial may run: its worker is told to stop the
trial at the next boundary (the trial ends FAIL tagged ``timed_out``), and is killed when the
grace period is over.
"""

from __future__ import annotations

from typing import Any

from optuna_guard import tags

NO_PROGRESS_AFTER_S = 60.0  # in a trial with no CPU used for this long: "no progress"


def is_overdue(trial_started_at: float | None, now: float, timeout_s: float | None) -> bool:
    return (
        timeout_s is not None
        and trial_started_at is not None
        and now - trial_started_at > timeout_s
    )


def timeout_tags(
    trial_number: int | None, runtime_s: float, timeout_s: float, state: str | None, pid: int
) -> tuple[str, dict[str, Any]]:
    """The reason (a sentence) and the tags of a timed-out trial."""
    how = " (the worker is stopped, state T)" if state == "T" else ""
    reason = (
        f"trial timeout: trial {trial_number} ran {runtime_s:.0f}s > --trial-timeout "
        f"{timeout_s:.0f}s{how}"
    )
    return reason, tags.timed_out(reason, pid=pid)


def health_note(state: str | None, cpu_idle_s: float | None, in_trial: bool) -> str | None:
    """ "stopped (state T)" / "no progress (no CPU for 75s)" / None when the worker looks busy."""
    if state in ("T", "t"):
        return "stopped (state T)"
    if in_trial and cpu_idle_s is not None and cpu_idle_s >= NO_PROGRESS_AFTER_S:
        return f"no progress (no CPU for {cpu_idle_s:.0f}s)"
    return None
