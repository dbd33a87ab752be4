"""LaunchConfig: every launch option in one frozen, validated, keyword-only object.

The CLI and the Python API both build one; validation messages name the option the user typed
(``--max-worker-rss-gb``) and the fix, because the CLI prints them as its one-line error.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any, Literal

from optuna_guard.exceptions import ConfigError

OnKill = Literal["prune", "fail"]
Display = Literal["auto", "rich", "plain", "off"]

DIRECTIONS = ("minimize", "maximize")
SAMPLERS = ("tpe", "random", "cmaes", "gp", "qmc", "nsgaii", "nsgaiii", "bruteforce")
PRUNERS = ("median", "nop", "none", "percentile", "hyperband", "successive-halving")
DEFAULT_LOG_DIR = "optuna_guard_logs"
DEFAULT_EVENT_LOG_NAME = "events.jsonl"
RECYCLE_FRACTION = 0.75  # --recycle-worker-rss-gb defaults to 75 % of --max-worker-rss-gb


@dataclasses.dataclass(frozen=True, kw_only=True)
class LaunchConfig:
    """The options of ``optuna-guard run`` / :func:`optuna_guard.supervisor.launch`.

    Memory values are GB (2**30 bytes); ``None`` switches a limit off. Times are seconds.
    ``max_worker_age_jitter`` is the fraction by which each worker's age limit is drawn *below*
    ``max_worker_age`` (so the option stays a true maximum and workers don't restart together).
    """

    objective: str
    study_name: str
    storage: str | None = None
    workers: int = 1
    n_trials: int | None = None
    directions: tuple[str, ...] = ("minimize",)
    sampler: str | None = None
    pruner: str | None = None
    seed: int | None = None
    max_worker_rss_gb: float | None = 8.0
    recycle_worker_rss_gb: float | None = None  # None -> 75 % of max_worker_rss_gb
    min_available_gb: float | None = 2.0
    warn_available_gb: float | None = 4.0
    max_worker_age: float | None = 3600.0
    max_worker_age_jitter: float = 0.1
    max_trials_per_worker: int | None = None
    grace_period: float = 120.0
    kill_wait: float = 0.0  # memory kills are decided: SIGKILL at once (issue 9, D11)
    check_interval: float = 0.25
    status_interval: float = 60.0
    memory_sample_interval: float = 5.0
    log_dir: str = DEFAULT_LOG_DIR
    event_log: str | None = None
    on_kill: OnKill = "prune"
    guard: bool = True
    memory_budget_gb: float | None = None
    preflight: bool = False
    gc_after_trial: bool = False
    heartbeat_interval: int | None = 30
    heartbeat_grace: int | None = 300
    connect_timeout: float = 5.0
    crash_loop_limit: int = 3
    display: Display = "auto"
    python_path: tuple[
        str, ...
    ] = ()  # prepended to workers' PYTHONPATH (objective passed as a function)
    # issue 4 (crash-safe trials)
    retry: int = 0
    retry_on: tuple[str, ...] | None = None
    retry_shrink: str | None = None
    time_budget: float | None = None
    storage_deadline: float | None = 300.0
    # issue 10: no worker can start for this long because memory is held outside the study -> exit 4
    memory_stall_timeout: float | None = 600.0
    # issue 11: a target over every launch of the study (counted in the storage)
    study_trials: int | None = None
    # issue 9: a trial running longer is stopped, then its worker killed after the grace period
    trial_timeout: float | None = None
    # issue 9: preemptions with checkpoint progress do not use up --retry; this bounds them
    max_preemptions: int = 20
    # issue 13: objective fingerprint and result cache (objective_version/digest are set by launch())
    cache: bool = False
    fingerprint_extra: tuple[str, ...] = ()
    allow_changed_objective: bool = False
    sampler_history: str = "all"
    objective_version: int | None = None
    objective_digest: str | None = None
    # issue 12: checkpoints every host can read (file:///shared/dir, s3://bucket/prefix, gs://...)
    checkpoint_store: str | None = None

    def __post_init__(self) -> None:
        _check_int("workers", self.workers, minimum=1, hint="start at least one worker")
        if self.n_trials is not None:
            _check_int(
                "n_trials", self.n_trials, minimum=1, hint="or leave it unset to run until stopped"
            )
        if not self.study_name or not isinstance(self.study_name, str):
            raise ConfigError("--study-name is required and cannot be empty.")
        if not self.objective or not isinstance(self.objective, str):
            raise ConfigError(
                "OBJECTIVE is required: package.module:function or path/to/file.py:function."
            )
        directions = tuple(d.lower() for d in self.directions)
        if not directions or any(d not in DIRECTIONS for d in directions):
            raise ConfigError(
                f"--direction must be 'minimize' or 'maximize' but got {','.join(self.directions)!r}."
            )
        object.__setattr__(self, "directions", directions)
        if (
            self.sampler is not None
            and self.sampler.lower() not in SAMPLERS
            and ":" not in self.sampler
        ):
            raise ConfigError(
                f"--sampler {self.sampler!r} is unknown; use one of {', '.join(SAMPLERS)}, module:factory or file.py:factory."
            )
        if (
            self.pruner is not None
            and self.pruner.lower() not in PRUNERS
            and ":" not in self.pruner
        ):
            raise ConfigError(
                f"--pruner {self.pruner!r} is unknown; use one of {', '.join(PRUNERS)}, module:factory or file.py:factory."
            )
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        for name in ("max_worker_rss_gb", "recycle_worker_rss_gb", "memory_budget_gb"):
            _check_number(name, getattr(self, name), positive=True, allow_none=True)
        for name in ("min_available_gb", "warn_available_gb"):
            _check_number(name, getattr(self, name), positive=False, allow_none=True)
        if self.recycle_worker_rss_gb is None and self.max_worker_rss_gb is not None:
            object.__setattr__(
                self, "recycle_worker_rss_gb", round(self.max_worker_rss_gb * RECYCLE_FRACTION, 3)
            )
        if (
            self.recycle_worker_rss_gb is not None
            and self.max_worker_rss_gb is not None
            and self.recycle_worker_rss_gb > self.max_worker_rss_gb
        ):
            raise ConfigError(
                f"--recycle-worker-rss-gb ({self.recycle_worker_rss_gb}) cannot exceed --max-worker-rss-gb "
                f"({self.max_worker_rss_gb}); a worker must be recycled before it is killed."
            )
        if (
            self.min_available_gb is not None
            and self.warn_available_gb is not None
            and self.warn_available_gb < self.min_available_gb
        ):
            raise ConfigError(
                f"--warn-available-gb ({self.warn_available_gb}) cannot be below --min-available-gb "
                f"({self.min_available_gb}); the warning must come before the kill."
            )
        _check_number("max_worker_age", self.max_worker_age, positive=True, allow_none=True)
        _check_number("max_worker_age_jitter", self.max_worker_age_jitter, positive=False)
        if self.max_worker_age_jitter >= 1:
            raise ConfigError(
                f"max_worker_age_jitter must be below 1 but got {self.max_worker_age_jitter}."
            )
        if self.max_trials_per_worker is not None:
            _check_int("max_trials_per_worker", self.max_trials_per_worker, minimum=1)
        _check_number("grace_period", self.grace_period, positive=False)
        _check_number("kill_wait", self.kill_wait, positive=False)
        for name in (
            "check_interval",
            "status_interval",
            "memory_sample_interval",
            "connect_timeout",
        ):
            _check_number(name, getattr(self, name), positive=True)
        if self.on_kill not in ("prune", "fail"):
            raise ConfigError(f"--on-kill must be 'prune' or 'fail' but got {self.on_kill!r}.")
        if self.display not in ("auto", "rich", "plain", "off"):
            raise ConfigError(
                f"display must be auto, rich, plain or off but got {self.display!r}."
            )
        for name in ("heartbeat_interval", "heartbeat_grace"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, minimum=1)
        if (
            self.heartbeat_interval is not None
            and self.heartbeat_grace is not None
            and self.heartbeat_grace < 2 * self.heartbeat_interval
        ):
            raise ConfigError(
                f"heartbeat_grace ({self.heartbeat_grace}) must be at least twice heartbeat_interval "
                f"({self.heartbeat_interval}) or live trials get failed as stale."
            )
        _check_int("crash_loop_limit", self.crash_loop_limit, minimum=1)
        _check_int("retry", self.retry, minimum=0, hint="0 switches retries off")
        if self.retry_on is not None:
            object.__setattr__(self, "retry_on", tuple(self.retry_on))
        _check_number("time_budget", self.time_budget, positive=True, allow_none=True)
        _check_number("storage_deadline", self.storage_deadline, positive=True, allow_none=True)
        _check_number(
            "memory_stall_timeout", self.memory_stall_timeout, positive=True, allow_none=True
        )
        if self.study_trials is not None:
            _check_int(
                "study_trials",
                self.study_trials,
                minimum=1,
                hint="or leave it unset for no study-wide target",
            )
        _check_number("trial_timeout", self.trial_timeout, positive=True, allow_none=True)
        _check_int(
            "max_preemptions",
            self.max_preemptions,
            minimum=0,
            hint="0 makes every preemption use up --retry",
        )
        object.__setattr__(self, "fingerprint_extra", tuple(self.fingerprint_extra))
        if self.sampler_history not in ("all", "current"):
            raise ConfigError(
                f"--sampler-history must be 'current' or 'all' but got {self.sampler_history!r}."
            )
        if self.checkpoint_store is not None:
            from optuna_guard._checkpoint_store import open_checkpoint_store

            open_checkpoint_store(self.checkpoint_store)  # a bad URL is a one-line ConfigError

    # ----------------------------------------------------------------- derived values
    @property
    def event_log_path(self) -> str:
        return self.event_log or os.path.join(self.log_dir, DEFAULT_EVENT_LOG_NAME)

    @property
    def guard_trial_limit_gb(self) -> float | None:
        """The in-trial guard's limit under the launcher: GUARD_LIMIT_FRACTION of --max-worker-rss-gb."""
        from optuna_guard.supervisor._memory_policy import GUARD_LIMIT_FRACTION

        if self.max_worker_rss_gb is None:
            return None
        return round(self.max_worker_rss_gb * GUARD_LIMIT_FRACTION, 4)

    def guard_env(self) -> dict[str, str]:
        """``OPTUNA_GUARD_*`` variables that configure ``@guard`` defaults inside workers.

        The in-trial guard stops a trial softly (at a boundary or from its sampler thread) at
        the same limits at which the supervisor kills hard, so the guard usually wins and the
        supervisor is the backstop for code that never yields.
        """
        env = {
            "OPTUNA_GUARD_MIN_AVAILABLE_GB": _fmt(self.min_available_gb),
            "OPTUNA_GUARD_WARN_AVAILABLE_GB": _fmt(self.warn_available_gb),
            # the guard stops a trial softly a margin under the supervisor's hard limit (issue 16)
            "OPTUNA_GUARD_MAX_TRIAL_RSS_GB": _fmt(self.guard_trial_limit_gb),
            "OPTUNA_GUARD_ON_TRIP": self.on_kill,
        }
        if self.memory_budget_gb is not None:
            env["OPTUNA_GUARD_MEMORY_BUDGET_GB"] = _fmt(self.memory_budget_gb)
        if self.preflight:
            env["OPTUNA_GUARD_PREFLIGHT"] = "1"
        if self.checkpoint_store is not None:
            from optuna_guard._checkpoint_store import STORE_ENV

            env[STORE_ENV] = self.checkpoint_store
        if self.objective_version is not None:  # issue 13: the launcher's fingerprint decision
            from optuna_guard.resume import launcher_env

            env.update(
                launcher_env(
                    self.objective_version,
                    self.objective_digest or "",
                    cache=self.cache,
                    sampler_history=self.sampler_history,
                )
            )
        return env

    def python_env(self, base: Any = None) -> dict[str, str]:
        """The environment for worker processes and the spec check: ``base`` (os.environ) plus
        ``python_path`` in front of PYTHONPATH."""
        env = dict(os.environ if base is None else base)
        if self.python_path:
            parts = list(self.python_path) + [
                p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p
            ]
            env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
        return env

    def replace(self, **changes: Any) -> LaunchConfig:
        return dataclasses.replace(self, **changes)


def _fmt(value: float | None) -> str:
    return "none" if value is None else repr(float(value))


_OPTION_NAMES = {
    "n_trials": "--n-trials",
    "workers": "--workers",
    "seed": "--seed",
    "max_worker_rss_gb": "--max-worker-rss-gb",
    "recycle_worker_rss_gb": "--recycle-worker-rss-gb",
    "min_available_gb": "--min-available-gb",
    "warn_available_gb": "--warn-available-gb",
    "memory_budget_gb": "--memory-budget-gb",
    "max_worker_age": "--max-worker-age",
    "max_trials_per_worker": "--max-trials-per-worker",
    "grace_period": "--grace-period",
    "check_interval": "--check-interval",
    "status_interval": "--status-interval",
    "retry": "--retry",
    "time_budget": "--time-budget",
    "study_trials": "--study-trials",
    "trial_timeout": "--trial-timeout",
    "max_preemptions": "--max-preemptions",
    "checkpoint_store": "--checkpoint-store",
}


def option_name(name: str) -> str:
    return _OPTION_NAMES.get(name, name)


def _check_int(name: str, value: Any, *, minimum: int, hint: str = "") -> None:
    label = option_name(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{label} must be an integer but got {value!r}.")
    if value < minimum:
        extra = f"; {hint}" if hint else ""
        raise ConfigError(f"{label} must be >= {minimum} but got {value}{extra}.")


def _check_number(name: str, value: Any, *, positive: bool, allow_none: bool = False) -> None:
    label = option_name(name)
    if value is None:
        if allow_none:
            return
        raise ConfigError(f"{label} is required.")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{label} must be a number but got {value!r}.")
    if math.isnan(value) or math.isinf(value):
        raise ConfigError(f"{label} must be a finite number but got {value}.")
    if positive and value <= 0:
        raise ConfigError(f"{label} must be > 0 but got {value}.")
    if value < 0:
        raise ConfigError(f"{label} cannot be negative but got {value}.")


def normalize_directions(
    direction: str | Sequence[str] | None, directions: Sequence[str] | None
) -> tuple[str, ...]:
    """``direction="maximize"`` or ``directions=[...]`` (or "minimize,maximize") -> a tuple."""
    if directions is not None and direction is not None:
        raise ConfigError("pass either direction or directions, not both.")
    raw: Sequence[str] | str = directions if directions is not None else (direction or "minimize")
    if isinstance(raw, str):
        raw = [part.strip() for part in raw.split(",") if part.strip()]
    return tuple(raw)


WORKER_ENV_PREFIX = "OPTUNA_GUARD_WORKER_"


def _env_key(field_name: str) -> str:
    """``worker_id`` -> ``OPTUNA_GUARD_WORKER_ID``, ``study_name`` -> ``OPTUNA_GUARD_WORKER_STUDY_NAME``."""
    name = field_name[len("worker_") :] if field_name.startswith("worker_") else field_name
    return WORKER_ENV_PREFIX + name.upper()


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """What one worker process needs, passed as ``OPTUNA_GUARD_WORKER_*`` environment variables
    (the submitit pattern: the child is ``python -m ...`` plus its environment, nothing pickled)."""

    worker_id: int
    spawn_index: int
    objective: str
    study_name: str
    storage: str
    sampler: str | None = None
    pruner: str | None = None
    seed: int | None = None
    heartbeat_interval: int | None = None
    heartbeat_grace: int | None = None
    connect_timeout: float = 5.0
    guard: bool = True
    gc_after_trial: bool = False
    on_kill: OnKill = "prune"
    retry: int = 0
    retry_on: tuple[str, ...] | None = None
    retry_shrink: str | None = None
    storage_deadline: float | None = None
    # issue 9 (supervision): whose worker this is, and how long it may take to stop
    launch_id: str = ""
    supervisor_pid: int | None = None
    grace_period: float = 120.0
    max_preemptions: int = 20

    def to_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            key = _env_key(field.name)
            if value is None:
                env[key] = ""
            elif isinstance(value, bool):
                env[key] = "1" if value else "0"
            elif isinstance(value, tuple):
                env[key] = ",".join(value)
            else:
                env[key] = str(value)
        return env

    @classmethod
    def from_env(cls, environ: Any) -> WorkerSettings:
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(_env_key(field.name))
            if raw is None:
                continue
            kind = str(field.type)
            if raw == "" and "None" in kind:
                values[field.name] = None
            elif kind.startswith("bool"):
                values[field.name] = raw == "1"
            elif kind.startswith("int"):
                values[field.name] = int(raw)
            elif kind.startswith("float"):
                values[field.name] = float(raw)
            elif kind.startswith("tuple"):
                values[field.name] = tuple(part for part in raw.split(",") if part)
            else:
                values[field.name] = raw
        return cls(**values)
