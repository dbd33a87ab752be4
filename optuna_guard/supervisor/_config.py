"""LaunchConfig: every launch option in one frozen, validated, keyword-only object.

Each field is declared once, with its CLI flag, help, parser and meaning in the field's
metadata (:mod:`optuna_guard.supervisor._options`): the ``optuna-guard run`` parser,
``launch()``'s keyword options (:class:`LaunchOptions`), the workers' settings
(:meth:`LaunchConfig.worker_options`) and the option table of docs/launcher.md are built from
the fields. Validation messages name the option the user typed (``--max-worker-rss-gb``) and
the fix, because the CLI prints them as its one-line error.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypedDict

from optuna_guard.exceptions import ConfigError
from optuna_guard.supervisor._options import (
    comma_list,
    directions_arg,
    duration,
    integer,
    normalize_directions,
    number,
    opt,
    options_of,
    public_options,
)

if TYPE_CHECKING:
    from optuna_guard.retries import RetryPolicy

__all__ = [
    "LaunchConfig",
    "LaunchOptions",
    "WorkerSettings",
    "normalize_directions",
    "option_name",
    "retry_policy",
]

OnKill = Literal["prune", "fail"]
Display = Literal["auto", "rich", "plain", "off"]

DIRECTIONS = ("minimize", "maximize")
SAMPLERS = ("tpe", "random", "cmaes", "gp", "qmc", "nsgaii", "nsgaiii", "bruteforce")
PRUNERS = ("median", "nop", "none", "percentile", "hyperband", "successive-halving")
DEFAULT_LOG_DIR = "optuna_guard_logs"
DEFAULT_EVENT_LOG_NAME = "events.jsonl"
RECYCLE_FRACTION = 0.75  # --recycle-worker-rss-gb defaults to 75 % of --max-worker-rss-gb

_GB = number("GB", positive=True, allow_off=True)
_GB0 = number("GB", positive=False, allow_off=True)
_SECONDS = number("seconds", positive=True, allow_off=False)
_SECONDS0 = number("seconds", positive=False, allow_off=False)
_SECONDS_OR_OFF = number("seconds", positive=True, allow_off=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LaunchConfig:
    """The options of ``optuna-guard run`` / :func:`optuna_guard.supervisor.launch`.

    Each field is one option, declared here only: its default, and in its metadata
    (:class:`~optuna_guard.supervisor._options.Option`) the CLI flag, help, parser, meaning and
    whether workers need it. Memory values are GB (2**30 bytes); ``None`` switches a limit off.
    Times are seconds. ``max_worker_age_jitter`` is the fraction by which each worker's age
    limit is drawn *below* ``max_worker_age`` (so the option stays a true maximum and workers
    don't restart together).
    """

    objective: str = dataclasses.field(
        metadata=opt(
            flag="OBJECTIVE",
            positional=True,
            worker=True,
            help="package.module:function or path/to/file.py:function",
            doc="`package.module:function` or `path/to/file.py:function` (checked in a "
            "throw-away interpreter before any worker starts); `launch()` also takes a "
            "module-level function",
        )
    )
    study_name: str = dataclasses.field(
        metadata=opt(
            flag="--study-name",
            metavar="NAME",
            required=True,
            worker=True,
            help="",
            doc="created if missing; an existing study with another direction is an error "
            "(exit 2)",
        )
    )
    storage: str | None = dataclasses.field(
        default=None,
        metadata=opt(
            flag="--storage",
            metavar="URL",
            help="RDB URL (default: SQLite file optuna_guard.db in the current directory)",
            doc="any RDB URL (SQLite gets WAL + a 60 s busy timeout), `journal:///path/file.log`, "
            "`redis://host:port/db` or `grpc://host:port`: see [Storage URLs](#storage-urls)",
            doc_default="`sqlite:///./optuna_guard.db`",
        ),
    )
    workers: int = dataclasses.field(
        default=1,
        metadata=opt(
            flag="--workers", metavar="N", parse=integer(1), help="worker processes (default 1)"
        ),
    )
    n_trials: int | None = dataclasses.field(
        default=None,
        metadata=opt(
            flag="--n-trials",
            metavar="T",
            parse=integer(1),
            help="trials in total across all workers (default: until stopped)",
            doc="trials **in total** across workers (any end state; a retry counts)",
            doc_default="until stopped",
        ),
    )
    study_trials: int | None = dataclasses.field(
        default=None,
        metadata=opt(
            flag="--study-trials",
            metavar="N",
            parse=integer(1),
            help="study-wide target: stop once the study has N finished (COMPLETE or PRUNED) "
            "trials, counted in the storage over every launch, host and requeue; a launch "
            "on a study that has them already exits 0 at once (default: none)",
            doc="study-wide target over every launch, host and requeue: see "
            "[Study-wide target](#study-wide-target---study-trials)",
            doc_default="no study-wide target",
        ),
    )
    directions: tuple[str, ...] = dataclasses.field(
        default=("minimize",),
        metadata=opt(
            flag="--direction",
            metavar="minimize|maximize",
            parse=directions_arg,
            help="study direction; comma-separated for multi-objective (default minimize)",
            doc="comma-separated for multi-objective; `launch()` also takes `direction=`",
        ),
    )
    sampler: str | None = dataclasses.field(
        default=None,
        metadata=opt(
            flag="--sampler",
            metavar="NAME",
            worker=True,
            help="tpe, random, cmaes, gp, qmc, nsgaii, nsgaiii, bruteforce, or module:factory / "
            "file.py:factory (called with seed= if it takes one; a relative file is looked for "
            "next to the objective)",
            doc="`tpe random cmaes gp qmc nsgaii nsgaiii bruteforce`, or `module:factory` / "
            "`file.py:factory` (called with `seed=` if it takes one): see "
            "[Porting a script](#porting-a-script)",
            doc_default="Optuna's",
        ),
    )
    pruner: str | None = dataclasses.field(
        default=None,
        metadata=opt(
            flag="--pruner",
            metavar="NAME",
            worker=True,
            help="median, percentile, hyperband, successive-halving, none, or module:factory / "
            "file.py:factory for pruners with arguments or wrapped in MemoryGuardPruner/"
            "DivergencePruner (default: Optuna's)",
            doc="`median percentile hyperband successive-halving none`, or `module:factory` / "
            "`file.py:factory` for pruners with arguments or wrapped in `MemoryGuardPruner`/"
            "`DivergencePruner`",
            doc_default="Optuna's",
        ),
    )
    seed: int | None = dataclasses.field(
        default=None,
        metadata=opt(
            flag="--seed",
            metavar="S",
            parse=integer(0),
            worker=True,
            help="sampler seed; worker k gets S + k",
            doc_default="unseeded",
        ),
    )
    max_worker_rss_gb: float | None = dataclasses.field(
        default=8.0,
        metadata=opt(
            flag="--max-worker-rss-gb",
            metavar="GB",
            parse=_GB,
            help="per-worker hard limit: its cgroup's kernel limit where cgroups are writable, "
            "else a kill when its process-tree RSS exceeds it (default 8; 'off')",
            doc="hard limit per worker: the kernel's limit of the worker's own memory cgroup "
            "where cgroups are writable, else a kill when its process-tree RSS exceeds it (see "
            "[Per-worker memory cgroups](#per-worker-memory-cgroups); `off` to disable)",
        ),
    )
    recycle_worker_rss_gb: float | None = dataclasses.field(
        default=None,
        metadata=opt(
            flag="--recycle-worker-rss-gb",
            metavar="GB",
            parse=_GB,
            help="recycle a worker whose tree RSS after a trial exceeds this (default 75% of "
            "the hard limit)",
            doc="recycle a worker whose tree RSS *after a trial* exceeds it",
            doc_default="75 % of the hard limit",
        ),
    )
    min_available_gb: float | None = dataclasses.field(
        default=2.0,
        metadata=opt(
            flag="--min-available-gb",
            metavar="GB",
            parse=_GB0,
            env="OPTUNA_GUARD_MIN_AVAILABLE_GB",
            help="kill the largest worker when system available memory falls below this "
            "(default 2)",
            doc="kill one worker running a trial that holds a meaningful part of the shortfall "
            "when available memory (cgroup aware) is below it; a worker starts only when "
            "available ≥ this + a worker's footprint",
        ),
    )
    warn_available_gb: float | None = dataclasses.field(
        default=4.0,
        metadata=opt(
            flag="--warn-available-gb",
            metavar="GB",
            parse=_GB0,
            env="OPTUNA_GUARD_WARN_AVAILABLE_GB",
            help="log a warning below this available memory (default 4)",
            doc="log a warning (at most every 30 s) below it",
        ),
    )
    memory_budget_gb: float | None = dataclasses.field(
        default=None,
        metadata=opt(
            flag="--memory-budget-gb",
            metavar="GB",
            parse=_GB,
            env="OPTUNA_GUARD_MEMORY_BUDGET_GB",
            help="write the Optuna constraint memory = peak_rss_gb - GB on every trial",
            doc_default="off",
        ),
    )
    preflight: bool = dataclasses.field(
        default=False,
        metadata=opt(
            flag="--preflight",
            action="store_true",
            env="OPTUNA_GUARD_PREFLIGHT",
            help="prune trials predicted to run out of memory before they start",
        ),
    )
    max_worker_age: float | None = dataclasses.field(
        default=3600.0,
        metadata=opt(
            flag="--max-worker-age",
            metavar="SECONDS",
            parse=_SECONDS_OR_OFF,
            help="recycle workers older than this, with jitter (default 3600; 'off')",
            doc="recycle older workers (each worker's limit is drawn in [90 %, 100 %] of it)",
        ),
    )
    max_worker_age_jitter: float = dataclasses.field(
        default=0.1,
        metadata=opt(
            help="the fraction by which each worker's age limit is drawn below max_worker_age, "
            "so workers don't restart together",
        ),
    )
    max_trials_per_worker: int | None = dataclasses.field(
        default=None,
        metadata=opt(
            flag="--max-trials-per-worker",
            metavar="K",
            parse=integer(1, allow_off=True),
            help="recycle a worker after K trials (default: no limit)",
            doc_default="off",
        ),
    )
    grace_period: float = dataclasses.field(
        default=120.0,
        metadata=opt(
            flag="--grace-period",
            metavar="SECONDS",
            parse=_SECONDS0,
            worker=True,
            help="after SIGINT/SIGTERM, time for running trials to stop (default 120)",
            doc="after SIGINT/SIGTERM, seconds for running trials to stop by themselves",
        ),
    )
    kill_wait: float = dataclasses.field(
        default=0.0,  # memory kills are decided: SIGKILL at once
        metadata=opt(
            flag="--kill-wait",
            metavar="SECONDS",
            parse=_SECONDS0,
            help="memory hard kill: wait between SIGTERM and SIGKILL (default 0: "
            "SIGKILL at once, the kill is decided)",
            doc="memory hard kill: seconds between SIGTERM and SIGKILL (0: SIGKILL at once, "
            "the kill is decided)",
        ),
    )
    check_interval: float = dataclasses.field(
        default=0.25,
        metadata=opt(
            flag="--check-interval",
            metavar="SECONDS",
            parse=_SECONDS,
            help="watchdog period (default 0.25)",
        ),
    )
    status_interval: float = dataclasses.field(
        default=60.0,
        metadata=opt(
            flag="--status-interval",
            metavar="SECONDS",
            parse=_SECONDS,
            help="status lines period (default 60)",
        ),
    )
    memory_sample_interval: float = dataclasses.field(
        default=5.0,
        metadata=opt(help="seconds between the memory samples written to the event log"),
    )
    log_dir: str = dataclasses.field(
        default=DEFAULT_LOG_DIR,
        metadata=opt(
            flag="--log-dir",
            metavar="DIR",
            help="worker logs worker_<id>.log (default ./optuna_guard_logs)",
            doc="`worker_<id>.log` per worker slot",
        ),
    )
    event_log: str | None = dataclasses.field(
        default=None,
        metadata=opt(
            flag="--event-log",
            metavar="FILE",
            help="JSON-lines event log (default <log-dir>/events.jsonl)",
            doc="JSON-lines event log",
            doc_default="`<log-dir>/events.jsonl`",
        ),
    )
    on_kill: OnKill = dataclasses.field(
        default="prune",
        metadata=opt(
            flag="--on-kill",
            choices=("prune", "fail"),
            worker=True,
            env="OPTUNA_GUARD_ON_TRIP",
            help="end state of killed trials (default prune: samplers learn from them)",
            doc="end state of killed trials: `prune` (samplers learn from PRUNED) or `fail`",
        ),
    )
    guard: bool = dataclasses.field(
        default=True,
        metadata=opt(
            flag="--no-guard",
            action="store_false",
            worker=True,
            help="do not wrap unguarded objectives with @guard",
            doc="`False` (`--no-guard`): do not wrap unguarded objectives with `@guard`",
        ),
    )
    gc_after_trial: bool = dataclasses.field(
        default=False,
        metadata=opt(
            flag="--gc-after-trial",
            action="store_true",
            worker=True,
            help="gc.collect() after every trial",
        ),
    )
    heartbeat_interval: int | None = dataclasses.field(
        default=30,
        metadata=opt(
            flag="--heartbeat-interval",
            metavar="SECONDS",
            parse=integer(1),
            worker=True,
            help="the supervisor renews its launch lease and beats for its live trials this "
            "often (default 30)",
            doc="the supervisor's lease and heartbeats for its live trials (see "
            "[Heartbeat and several hosts](#heartbeat-and-several-hosts))",
        ),
    )
    heartbeat_grace: int | None = dataclasses.field(
        default=300,
        metadata=opt(
            flag="--heartbeat-grace",
            metavar="SECONDS",
            parse=integer(1),
            worker=True,
            help="a launch silent this long is lost: its RUNNING trials are ended worker_lost "
            "by other launchers (default 300)",
        ),
    )
    retry: int = dataclasses.field(
        default=0,
        metadata=opt(
            flag="--retry",
            metavar="N",
            parse=integer(0),
            worker=True,
            help="re-queue killed/crashed/preempted trials up to N times each (default 0)",
            doc="re-queue killed/crashed/preempted trials up to N times each (see "
            "[Crash-safe trials](#crash-safe-trials-issue-4))",
        ),
    )
    retry_on: tuple[str, ...] | None = dataclasses.field(
        default=None,
        metadata=opt(
            flag="--retry-on",
            metavar="TAGS",
            parse=comma_list,
            worker=True,
            help="comma-separated end tags to retry (default emergency_killed,worker_crashed,"
            "preempted,worker_lost,timed_out)",
            doc_default="`emergency_killed,worker_crashed,preempted,worker_lost,timed_out`",
        ),
    )
    retry_shrink: str | None = dataclasses.field(
        default=None,
        metadata=opt(
            flag="--retry-shrink",
            metavar="module:function",
            worker=True,
            help="function(params) -> params applied to retries of memory-killed trials",
            doc_default="off",
        ),
    )
    time_budget: float | None = dataclasses.field(
        default=None,
        metadata=opt(
            flag="--time-budget",
            metavar="DURATION",
            parse=duration,
            help="wall-clock budget, e.g. 11h30m: no trial starts that cannot finish; exit 99 "
            "at the end",
            doc="wall-clock budget, e.g. `11h30m`, `90m`, `3600`: no trial starts that cannot "
            "finish; exit 99 at the end",
            doc_default="off",
        ),
    )
    trial_timeout: float | None = dataclasses.field(
        default=None,
        metadata=opt(
            flag="--trial-timeout",
            metavar="DURATION",
            parse=duration,
            help="a trial running longer (e.g. 2h) is stopped at its next boundary, its worker "
            "killed after --grace-period; the trial ends FAIL tagged timed_out (retried under "
            "--retry)",
            doc="a trial running longer (`2h`, `90m`, seconds) is stopped at its next boundary, "
            "its worker killed after `--grace-period`; FAIL tagged `timed_out` (see "
            "[Hung workers](#hung-workers))",
            doc_default="off",
        ),
    )
    max_preemptions: int = dataclasses.field(
        default=20,
        metadata=opt(
            flag="--max-preemptions",
            metavar="N",
            parse=integer(0),
            worker=True,
            help="preemptions of one retry chain that made checkpoint progress do not use up "
            "--retry; at most N of them (default 20)",
        ),
    )
    checkpoint_store: str | None = dataclasses.field(
        default=None,
        metadata=opt(
            flag="--checkpoint-store",
            metavar="URL",
            env="OPTUNA_GUARD_CHECKPOINT_STORE",
            help="where TrialCheckpointer keeps checkpoints so a retry on any host resumes: "
            "file:///shared/dir, s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL; extra s3) "
            "or gs://bucket/prefix (default: each host's local --root)",
            doc="`file:///shared/dir`, `s3://bucket/prefix` (endpoint from `AWS_ENDPOINT_URL`, "
            "extra `s3`) or `gs://bucket/prefix`: every worker's `TrialCheckpointer` keeps its "
            "chain there, so a retry on any host resumes ([crash_safe.md](crash_safe.md))",
            doc_default="each host's local `root`",
        ),
    )
    storage_deadline: float | None = dataclasses.field(
        default=300.0,
        metadata=opt(
            flag="--storage-deadline",
            metavar="SECONDS",
            parse=_SECONDS,
            worker=True,
            help="how long workers and the supervisor retry a storage outage (default 300)",
            doc="how long a storage outage is retried before giving up (launcher start-up, "
            "worker start, trial ends, shutdown); `None` (Python only) does not retry",
        ),
    )
    memory_stall_timeout: float | None = dataclasses.field(
        default=600.0,
        metadata=opt(
            flag="--memory-stall-timeout",
            metavar="SECONDS",
            parse=_SECONDS_OR_OFF,
            help="exit 4 when memory held outside the study keeps every worker from starting "
            "this long (default 600; 'off' waits forever)",
            doc="exit 4 when memory held outside the study keeps every worker from starting "
            "this long (`off`: wait)",
        ),
    )
    display: Display = dataclasses.field(
        default="auto",
        metadata=opt(
            flag="--display",
            choices=("auto", "rich", "plain", "off"),
            help="live progress display (default: rich on a terminal)",
            doc="`auto`: rich live progress on a terminal, plain log lines otherwise; `rich`, "
            "`plain` or `off`",
        ),
    )
    cache: bool = dataclasses.field(
        default=False,
        metadata=opt(
            flag="--cache",
            action="store_true",
            help="serve a trial whose params already COMPLETEd (same objective version) from "
            "that result",
            doc="serve a trial whose params already COMPLETEd in this objective version from "
            "that result ([resume_and_cache.md](resume_and_cache.md))",
        ),
    )
    fingerprint_extra: tuple[str, ...] = dataclasses.field(
        default=(),
        metadata=opt(
            flag="--fingerprint-extra",
            metavar="PATH_OR_STRING",
            action="append",
            help="an input the objective depends on (config file, data-set version); repeatable",
            doc="repeatable: a file or string the objective depends on, part of the objective "
            "fingerprint",
        ),
    )
    allow_changed_objective: bool = dataclasses.field(
        default=False,
        metadata=opt(
            flag="--allow-changed-objective",
            action="store_true",
            help="accept a changed objective fingerprint: record a new objective_version",
            doc="a changed fingerprint records a new `objective_version` instead of exit 2",
        ),
    )
    sampler_history: str = dataclasses.field(
        default="all",
        metadata=opt(
            flag="--sampler-history",
            choices=("all", "current"),
            help="which objective versions the sampler learns from (default all)",
            doc="`current`: the sampler learns only from the current objective version",
        ),
    )
    connect_timeout: float = dataclasses.field(
        default=5.0,
        metadata=opt(worker=True, help="seconds each storage connect attempt may take"),
    )
    crash_loop_limit: int = dataclasses.field(
        default=3,
        metadata=opt(
            help="workers dying before their first trial this many times in a row stop the "
            "launch (exit 3)"
        ),
    )
    python_path: tuple[str, ...] = dataclasses.field(
        default=(),
        metadata=opt(
            help="directories put in front of the workers' PYTHONPATH (`launch()` adds the "
            "import root of an objective passed as a function)"
        ),
    )
    objective_version: int | None = dataclasses.field(
        default=None,
        metadata=opt(internal=True, help="set by the launch: the objective fingerprint's version"),
    )
    objective_digest: str | None = dataclasses.field(
        default=None,
        metadata=opt(internal=True, help="set by the launch: the objective fingerprint's digest"),
    )

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
            _ENV["min_available_gb"]: _fmt(self.min_available_gb),
            _ENV["warn_available_gb"]: _fmt(self.warn_available_gb),
            # the guard stops a trial softly a margin under the supervisor's hard limit (issue 16)
            "OPTUNA_GUARD_MAX_TRIAL_RSS_GB": _fmt(self.guard_trial_limit_gb),
            _ENV["on_kill"]: self.on_kill,
        }
        if self.memory_budget_gb is not None:
            env[_ENV["memory_budget_gb"]] = _fmt(self.memory_budget_gb)
        if self.preflight:
            env[_ENV["preflight"]] = "1"
        if self.checkpoint_store is not None:
            env[_ENV["checkpoint_store"]] = self.checkpoint_store
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

    def worker_options(self) -> dict[str, Any]:
        """The options a worker process needs (fields marked ``worker``), as
        ``WorkerSettings`` keywords; the arbiter adds the runtime ones (worker id, spawn index,
        launch id, supervisor pid, resolved storage URL)."""
        return {f.name: getattr(self, f.name) for f, o in options_of(type(self)) if o.worker}

    def replace(self, **changes: Any) -> LaunchConfig:
        return dataclasses.replace(self, **changes)


_ENV = {f.name: o.env for f, o in options_of(LaunchConfig) if o.env}


def _fmt(value: float | None) -> str:
    return "none" if value is None else repr(float(value))


@functools.cache
def _flags() -> dict[str, str]:
    return {f.name: o.flag for f, o in options_of(LaunchConfig) if o.flag and not o.positional}


def option_name(name: str) -> str:
    """The flag of a LaunchConfig field (``--n-trials``), else the field name."""
    return _flags().get(name, name)


class LaunchOptions(TypedDict, total=False):
    """The keyword options of ``launch()``: LaunchConfig's public fields minus ``objective`` and
    ``study_name`` (its own parameters), plus the ``direction`` alias. Types are the fields'
    own, widened where ``launch()`` converts (durations as ``"2h"``, sequences as lists).
    A test keeps the keys equal to the fields; the defaults live on LaunchConfig only."""

    storage: str | None
    workers: int
    n_trials: int | None
    study_trials: int | None
    direction: str
    directions: Sequence[str] | str
    sampler: str | None
    pruner: str | None
    seed: int | None
    max_worker_rss_gb: float | None
    recycle_worker_rss_gb: float | None
    min_available_gb: float | None
    warn_available_gb: float | None
    memory_budget_gb: float | None
    preflight: bool
    max_worker_age: float | None
    max_worker_age_jitter: float
    max_trials_per_worker: int | None
    grace_period: float
    kill_wait: float
    check_interval: float
    status_interval: float
    memory_sample_interval: float
    log_dir: str
    event_log: str | None
    on_kill: OnKill
    guard: bool
    gc_after_trial: bool
    heartbeat_interval: int | None
    heartbeat_grace: int | None
    retry: int
    retry_on: Sequence[str] | None
    retry_shrink: str | None
    time_budget: float | str | None
    trial_timeout: float | str | None
    max_preemptions: int
    checkpoint_store: str | None
    storage_deadline: float | None
    memory_stall_timeout: float | None
    display: Display
    cache: bool
    fingerprint_extra: Sequence[str]
    allow_changed_objective: bool
    sampler_history: str
    connect_timeout: float
    crash_loop_limit: int
    python_path: Sequence[str]


def launch_option_names() -> frozenset[str]:
    """What ``launch(objective, study_name=..., **options)`` accepts in ``options``."""
    names = {f.name for f, _ in public_options(LaunchConfig)} - {"objective", "study_name"}
    return frozenset(names | {"direction"})


class _RetryOptions(Protocol):
    @property
    def retry(self) -> int: ...
    @property
    def retry_on(self) -> tuple[str, ...] | None: ...
    @property
    def retry_shrink(self) -> str | None: ...
    @property
    def max_preemptions(self) -> int: ...


def retry_policy(options: _RetryOptions) -> RetryPolicy | None:
    """The one place a ``RetryPolicy`` is built from ``--retry``/``--retry-on``/
    ``--retry-shrink``/``--max-preemptions`` (a LaunchConfig in the launcher, WorkerSettings in
    a worker); None when retries are off. Loading the shrink hook here makes a bad
    ``--retry-shrink`` a one-line ConfigError."""
    if options.retry <= 0:
        return None
    from optuna_guard.retries import RetryPolicy

    kwargs: dict[str, Any] = {
        "max_retries": options.retry,
        "max_preemptions": options.max_preemptions,
    }
    if options.retry_on is not None:
        kwargs["retry_on"] = frozenset(options.retry_on)
    if options.retry_shrink:
        kwargs["shrink"] = options.retry_shrink
    return RetryPolicy(**kwargs)


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
