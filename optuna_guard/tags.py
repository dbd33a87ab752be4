"""Names of the user attributes optuna-guard writes on trials.

Users filter on these (and optuna-dashboard shows each as a ``UserAttribute <name>`` column),
so they are constants in one place and listed in the README.
"""

from __future__ import annotations

from typing import Any

from optuna_guard._units import to_gb

# Why a trial was stopped.
EMERGENCY_KILLED = "emergency_killed"  # bool: a memory limit stopped this trial
KILL_REASON = "kill_reason"  # str: human sentence, e.g. "OOM prevention [Trial #3 split 2/5]"
KILL_LIMIT = "kill_limit"  # str: which limit tripped: min_available_gb, max_trial_rss_gb, ...
AVAILABLE_GB_AT_KILL = "available_gb_at_kill"  # float: available RAM (GB, 2 decimals) at the kill

# Memory seen during the trial (written on every guarded trial, whatever its end state).
PEAK_RSS_GB = "peak_rss_gb"  # float: peak process-tree RSS of the trial (GB)
LOWEST_AVAILABLE_GB = "lowest_available_gb"  # float: lowest available RAM seen (GB)
# Deprecated (written beside LOWEST_AVAILABLE_GB for one release): the same value under the name
# of the limit ``min_available_gb``, which it is not.
MIN_AVAILABLE_GB = "min_available_gb"
PEAK_GPU_GB = "peak_gpu_gb"  # float: peak GPU memory used (GB), only when a GPU is seen
# float: the pre-flight check's estimate of the peak RSS (GB)
PREDICTED_PEAK_GB = "predicted_peak_gb"

# Where the trial ran (written by the launcher's workers).
WORKER_ID = "worker_id"  # int
WORKER_PID = "worker_pid"  # int
HOSTNAME = "hostname"  # str
LAUNCH_ID = "launch_id"  # str: uuid of the `optuna-guard run` that started the trial

# Other ways a trial can end early.
WORKER_CRASHED = "worker_crashed"  # bool: the worker process died under the trial
PREEMPTED = "preempted"  # bool: stopped by SIGTERM/SIGINT or the time budget
DIVERGED = "diverged"  # bool: a NaN/Inf or exploding intermediate value
# bool: its launch (host, launcher) stopped beating; ended from outside
WORKER_LOST = "worker_lost"
TIMED_OUT = "timed_out"  # bool: ran longer than --trial-timeout

# Retries (the retry chain itself is kept in Optuna's system attrs ``failed_trial`` and
# ``retry_history`` so ``optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number``
# works on our retries too).
RETRY_OF = "retry_of"  # int: number of the trial this one retries
RETRY_SHRUNK = "retry_shrunk"  # bool: params were changed by a shrink hook
RETRIES_EXHAUSTED = "retries_exhausted"  # bool: last allowed retry, will not be retried again
RESUMED_FROM_STEP = "resumed_from_step"  # int: checkpoint step a retried trial resumed from

# The boolean tags that say a trial was stopped early: its value, if any, is not a valid result
# (best trials, the result cache) and each is an end a retry can be asked for (RetryPolicy).
STOP_TAGS = (EMERGENCY_KILLED, WORKER_CRASHED, PREEMPTED, DIVERGED, WORKER_LOST, TIMED_OUT)

ALL_TAGS = (
    EMERGENCY_KILLED,
    KILL_REASON,
    KILL_LIMIT,
    AVAILABLE_GB_AT_KILL,
    PEAK_RSS_GB,
    LOWEST_AVAILABLE_GB,
    MIN_AVAILABLE_GB,
    PEAK_GPU_GB,
    PREDICTED_PEAK_GB,
    WORKER_ID,
    WORKER_PID,
    HOSTNAME,
    LAUNCH_ID,
    WORKER_CRASHED,
    PREEMPTED,
    DIVERGED,
    WORKER_LOST,
    TIMED_OUT,
    RETRY_OF,
    RETRY_SHRUNK,
    RETRIES_EXHAUSTED,
    RESUMED_FROM_STEP,
)


# -- builders: one shape per way a trial stops, so every writer tags the same keys -------------


def killed(
    reason: str,
    *,
    limit: str | None = None,
    available_gb: float | None = None,
    peak_rss_gb: float | None = None,
    pid: int | None = None,
) -> dict[str, Any]:
    """Tags of a trial stopped by a memory limit (in-process stop or the launcher's kill)."""
    attrs: dict[str, Any] = {EMERGENCY_KILLED: True, KILL_REASON: reason}
    if limit is not None:
        attrs[KILL_LIMIT] = limit
    if available_gb is not None:
        attrs[AVAILABLE_GB_AT_KILL] = available_gb
    if peak_rss_gb is not None:
        attrs[PEAK_RSS_GB] = peak_rss_gb
    if pid is not None:
        attrs[WORKER_PID] = pid
    return attrs


def preempted(reason: str, *, pid: int | None = None) -> dict[str, Any]:
    """Tags of a trial stopped by a stop request (signal, time budget, lost supervisor).
    ``reason`` is the cause ("SIGTERM"); ``kill_reason`` reads "preempted: SIGTERM"."""
    text = reason if reason.startswith("preempted") else f"preempted: {reason}"
    attrs: dict[str, Any] = {PREEMPTED: True, KILL_REASON: text}
    if pid is not None:
        attrs[WORKER_PID] = pid
    return attrs


def crashed(reason: str, *, pid: int | None = None) -> dict[str, Any]:
    """Tags of a trial whose worker process died under it."""
    attrs: dict[str, Any] = {WORKER_CRASHED: True, KILL_REASON: reason}
    if pid is not None:
        attrs[WORKER_PID] = pid
    return attrs


def timed_out(reason: str, *, pid: int | None = None) -> dict[str, Any]:
    """Tags of a trial stopped by ``--trial-timeout``."""
    attrs: dict[str, Any] = {TIMED_OUT: True, KILL_REASON: reason}
    if pid is not None:
        attrs[WORKER_PID] = pid
    return attrs


def lost(reason: str) -> dict[str, Any]:
    """Tags of a trial whose launch (supervisor and workers) is gone: no lease, no heartbeat."""
    return {WORKER_LOST: True, KILL_REASON: reason}


def diverged(reason: str) -> dict[str, Any]:
    """Tags of a trial pruned because its values diverged ("NaN at step 12")."""
    return {DIVERGED: True, KILL_REASON: reason}


def memory_seen(
    peak_rss_bytes: int, lowest_available_bytes: int | None, peak_gpu_bytes: int | None
) -> dict[str, Any]:
    """The memory tags written on every guarded trial (GB, 2 decimals), with the deprecated
    ``min_available_gb`` key beside ``lowest_available_gb`` for one release."""
    attrs: dict[str, Any] = {PEAK_RSS_GB: to_gb(peak_rss_bytes)}
    if lowest_available_bytes is not None:
        attrs[LOWEST_AVAILABLE_GB] = attrs[MIN_AVAILABLE_GB] = to_gb(lowest_available_bytes)
    if peak_gpu_bytes is not None:
        attrs[PEAK_GPU_GB] = to_gb(peak_gpu_bytes)
    return attrs
