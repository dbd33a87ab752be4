"""Names of the user attributes optuna-guard writes on trials.

Users filter on these (and optuna-dashboard shows each as a ``UserAttribute <name>`` column),
so they are constants in one place and listed in the README.
"""

from __future__ import annotations

# Why a trial was stopped.
EMERGENCY_KILLED = "emergency_killed"  # bool: a memory limit stopped this trial
KILL_REASON = "kill_reason"  # str: human sentence, e.g. "OOM prevention [Trial #3 split 2/5]"
KILL_LIMIT = "kill_limit"  # str: which limit tripped: min_available_gb, max_trial_rss_gb, ...
AVAILABLE_GB_AT_KILL = "available_gb_at_kill"  # float: available RAM (GB, 2 decimals) at the kill

# Memory seen during the trial (written on every guarded trial, whatever its end state).
PEAK_RSS_GB = "peak_rss_gb"  # float: peak process-tree RSS of the trial (GB)
MIN_AVAILABLE_GB = "min_available_gb"  # float: lowest available RAM seen (GB)
PEAK_GPU_GB = "peak_gpu_gb"  # float: peak GPU memory used (GB), only when a GPU is seen
PREDICTED_PEAK_GB = "predicted_peak_gb"  # float: the pre-flight check's estimate of the peak RSS (GB)

# Where the trial ran (written by the launcher's workers).
WORKER_ID = "worker_id"  # int
WORKER_PID = "worker_pid"  # int
HOSTNAME = "hostname"  # str

# Other ways a trial can end early.
WORKER_CRASHED = "worker_crashed"  # bool: the worker process died under the trial
PREEMPTED = "preempted"  # bool: stopped by SIGTERM/SIGINT or the time budget
DIVERGED = "diverged"  # bool: a NaN/Inf or exploding intermediate value

# Retries (the retry chain itself is kept in Optuna's system attrs ``failed_trial`` and
# ``retry_history`` so ``optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number``
# works on our retries too).
RETRY_OF = "retry_of"  # int: number of the trial this one retries
RETRY_SHRUNK = "retry_shrunk"  # bool: params were changed by a shrink hook
RETRIES_EXHAUSTED = "retries_exhausted"  # bool: last allowed retry, will not be retried again
RESUMED_FROM_STEP = "resumed_from_step"  # int: checkpoint step a retried trial resumed from

ALL_TAGS = (
    EMERGENCY_KILLED,
    KILL_REASON,
    KILL_LIMIT,
    AVAILABLE_GB_AT_KILL,
    PEAK_RSS_GB,
    MIN_AVAILABLE_GB,
    PEAK_GPU_GB,
    PREDICTED_PEAK_GB,
    WORKER_ID,
    WORKER_PID,
    HOSTNAME,
    WORKER_CRASHED,
    PREEMPTED,
    DIVERGED,
    RETRY_OF,
    RETRY_SHRUNK,
    RETRIES_EXHAUSTED,
    RESUMED_FROM_STEP,
)
