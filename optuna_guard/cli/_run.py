"""``optuna-guard run``: N supervised workers on one study (a thin layer over ``launch``).

    optuna-guard run OBJECTIVE --study-name NAME [--storage URL] [--workers N] [--n-trials T]
        [--study-trials N]
        [--direction minimize|maximize] [--sampler tpe|random|...] [--seed S]
        [--max-worker-rss-gb GB] [--recycle-worker-rss-gb GB] [--min-available-gb GB]
        [--warn-available-gb GB] [--max-worker-age SECONDS] [--max-trials-per-worker K]
        [--grace-period SECONDS] [--check-interval SECONDS] [--status-interval SECONDS]
        [--log-dir DIR] [--event-log FILE] [--on-kill prune|fail]
        [--retry N] [--retry-on TAGS] [--retry-shrink module:function] [--time-budget 11h30m]

Exit codes: 0 done, 1 error, 2 bad input, 3 crash loop, 99 stopped by a signal or the time
budget (a SLURM script requeues on 99).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from optuna_guard.exceptions import ConfigError


def _number(kind: str, *, positive: bool, allow_off: bool) -> Callable[[str], float | None]:
    def parse(text: str) -> float | None:
        if allow_off and text.strip().lower() in ("none", "off"):
            return None
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number of {kind}, got {text!r}"
            ) from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number of {kind}, got {text!r}")
        if positive and value <= 0:
            raise argparse.ArgumentTypeError(
                f"must be > 0 {kind}, got {text!r}"
                + (" (use 'off' to switch it off)" if allow_off else "")
            )
        if value < 0:
            raise argparse.ArgumentTypeError(f"cannot be negative, got {text!r}")
        return value

    return parse


def _integer(minimum: int, *, allow_off: bool = False) -> Callable[[str], int | None]:
    def parse(text: str) -> int | None:
        if allow_off and text.strip().lower() in ("none", "off"):
            return None
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _duration(text: str) -> float:
    from optuna_guard.time_budget import parse_duration

    try:
        return parse_duration(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a study with N supervised worker processes",
        description=(
            "Run OBJECTIVE (package.module:function or path/to/file.py:function) in N supervised "
            "worker processes on one study until T trials finished. Exit codes: 0 done, 1 error, "
            "2 bad input, 3 crash loop, 99 stopped by a signal or the time budget. Worker memory: "
            "each worker gets a memory cgroup of its own (kernel hard limit --max-worker-rss-gb, every "
            "descendant counted and killed) where the cgroup tree is writable (root on cgroup v1, a "
            "delegated cgroup v2 subtree); elsewhere process-tree RSS plus a per-launch environment "
            "marker, so no descendant outlives the launch. The mode is logged at start."
        ),
    )
    gb = _number("GB", positive=True, allow_off=True)
    gb0 = _number("GB", positive=False, allow_off=True)
    seconds = _number("seconds", positive=True, allow_off=False)
    parser.add_argument(
        "objective",
        metavar="OBJECTIVE",
        help="package.module:function or path/to/file.py:function",
    )
    parser.add_argument("--study-name", required=True, metavar="NAME")
    parser.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="RDB URL (default: SQLite file optuna_guard.db in the current directory)",
    )
    parser.add_argument(
        "--workers", type=_integer(1), default=1, metavar="N", help="worker processes (default 1)"
    )
    parser.add_argument(
        "--n-trials",
        type=_integer(1),
        default=None,
        metavar="T",
        help="trials in total across all workers (default: until stopped)",
    )
    parser.add_argument(
        "--study-trials",
        type=_integer(1),
        default=None,
        metavar="N",
        help="study-wide target: stop once the study has N finished (COMPLETE or PRUNED) "
        "trials, counted in the storage over every launch, host and requeue; a launch "
        "on a study that has them already exits 0 at once (default: none)",
    )
    parser.add_argument(
        "--direction",
        default="minimize",
        metavar="minimize|maximize",
        help="study direction; comma-separated for multi-objective (default minimize)",
    )
    parser.add_argument(
        "--sampler",
        default=None,
        metavar="NAME",
        help="tpe, random, cmaes, gp, qmc, nsgaii, nsgaiii, bruteforce, or module:factory / "
        "file.py:factory (called with seed= if it takes one; a relative file is looked for "
        "next to the objective)",
    )
    parser.add_argument(
        "--pruner",
        default=None,
        metavar="NAME",
        help="median, percentile, hyperband, successive-halving, none, or module:factory / "
        "file.py:factory for pruners with arguments or wrapped in MemoryGuardPruner/"
        "DivergencePruner (default: Optuna's)",
    )
    parser.add_argument(
        "--seed",
        type=_integer(0),
        default=None,
        metavar="S",
        help="sampler seed; worker k gets S + k",
    )
    parser.add_argument(
        "--max-worker-rss-gb",
        type=gb,
        default=8.0,
        metavar="GB",
        help="per-worker hard limit: its cgroup's kernel limit where cgroups are writable, else a "
        "kill when its process-tree RSS exceeds it (default 8; 'off')",
    )
    parser.add_argument(
        "--recycle-worker-rss-gb",
        type=gb,
        default=None,
        metavar="GB",
        help="recycle a worker whose tree RSS after a trial exceeds this (default 75%% of the hard limit)",
    )
    parser.add_argument(
        "--min-available-gb",
        type=gb0,
        default=2.0,
        metavar="GB",
        help="kill the largest worker when system available memory falls below this (default 2)",
    )
    parser.add_argument(
        "--warn-available-gb",
        type=gb0,
        default=4.0,
        metavar="GB",
        help="log a warning below this available memory (default 4)",
    )
    parser.add_argument(
        "--memory-budget-gb",
        type=gb,
        default=None,
        metavar="GB",
        help="write the Optuna constraint memory = peak_rss_gb - GB on every trial",
    )
    parser.add_argument(
        "--preflight",
        action="store_true",
        help="prune trials predicted to run out of memory before they start",
    )
    parser.add_argument(
        "--max-worker-age",
        type=_number("seconds", positive=True, allow_off=True),
        default=3600.0,
        metavar="SECONDS",
        help="recycle workers older than this, with jitter (default 3600; 'off')",
    )
    parser.add_argument(
        "--max-trials-per-worker",
        type=_integer(1, allow_off=True),
        default=None,
        metavar="K",
        help="recycle a worker after K trials (default: no limit)",
    )
    parser.add_argument(
        "--grace-period",
        type=_number("seconds", positive=False, allow_off=False),
        default=120.0,
        metavar="SECONDS",
        help="after SIGINT/SIGTERM, time for running trials to stop (default 120)",
    )
    parser.add_argument(
        "--kill-wait",
        type=_number("seconds", positive=False, allow_off=False),
        default=0.0,
        metavar="SECONDS",
        help="memory hard kill: wait between SIGTERM and SIGKILL (default 0: "
        "SIGKILL at once, the kill is decided)",
    )
    parser.add_argument(
        "--check-interval",
        type=seconds,
        default=0.25,
        metavar="SECONDS",
        help="watchdog period (default 0.25)",
    )
    parser.add_argument(
        "--status-interval",
        type=seconds,
        default=60.0,
        metavar="SECONDS",
        help="status lines period (default 60)",
    )
    parser.add_argument(
        "--log-dir",
        default="optuna_guard_logs",
        metavar="DIR",
        help="worker logs worker_<id>.log (default ./optuna_guard_logs)",
    )
    parser.add_argument(
        "--event-log",
        default=None,
        metavar="FILE",
        help="JSON-lines event log (default <log-dir>/events.jsonl)",
    )
    parser.add_argument(
        "--on-kill",
        choices=("prune", "fail"),
        default="prune",
        help="end state of killed trials (default prune: samplers learn from them)",
    )
    parser.add_argument(
        "--no-guard", action="store_true", help="do not wrap unguarded objectives with @guard"
    )
    parser.add_argument(
        "--gc-after-trial", action="store_true", help="gc.collect() after every trial"
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=_integer(1),
        default=30,
        metavar="SECONDS",
        help="the supervisor renews its launch lease and beats for its live trials this often "
        "(default 30)",
    )
    parser.add_argument(
        "--heartbeat-grace",
        type=_integer(1),
        default=300,
        metavar="SECONDS",
        help="a launch silent this long is lost: its RUNNING trials are ended worker_lost by "
        "other launchers (default 300)",
    )
    parser.add_argument(
        "--retry",
        type=_integer(0),
        default=0,
        metavar="N",
        help="re-queue killed/crashed/preempted trials up to N times each (default 0)",
    )
    parser.add_argument(
        "--retry-on",
        default=None,
        metavar="TAGS",
        help="comma-separated end tags to retry (default emergency_killed,worker_crashed,preempted,"
        "worker_lost,timed_out)",
    )
    parser.add_argument(
        "--retry-shrink",
        default=None,
        metavar="module:function",
        help="function(params) -> params applied to retries of memory-killed trials",
    )
    parser.add_argument(
        "--time-budget",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="wall-clock budget, e.g. 11h30m: no trial starts that cannot finish; exit 99 at the end",
    )
    parser.add_argument(
        "--trial-timeout",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="a trial running longer (e.g. 2h) is stopped at its next boundary, its worker killed "
        "after --grace-period; the trial ends FAIL tagged timed_out (retried under --retry)",
    )
    parser.add_argument(
        "--max-preemptions",
        type=_integer(0),
        default=20,
        metavar="N",
        help="preemptions of one retry chain that made checkpoint progress do not use up --retry; "
        "at most N of them (default 20)",
    )
    parser.add_argument(
        "--checkpoint-store",
        default=None,
        metavar="URL",
        help="where TrialCheckpointer keeps checkpoints so a retry on any host resumes: "
        "file:///shared/dir, s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL; extra s3) "
        "or gs://bucket/prefix (default: each host's local --root)",
    )
    parser.add_argument(
        "--storage-deadline",
        type=seconds,
        default=300.0,
        metavar="SECONDS",
        help="how long workers and the supervisor retry a storage outage (default 300)",
    )
    parser.add_argument(
        "--memory-stall-timeout",
        type=_number("seconds", positive=True, allow_off=True),
        default=600.0,
        metavar="SECONDS",
        help="exit 4 when memory held outside the study keeps every worker from starting "
        "this long (default 600; 'off' waits forever)",
    )
    parser.add_argument(
        "--display",
        choices=("auto", "rich", "plain", "off"),
        default="auto",
        help="live progress display (default: rich on a terminal)",
    )
    parser.add_argument(
        "--cache",
        action="store_true",
        help="serve a trial whose params already COMPLETEd (same objective version) from that result",
    )
    parser.add_argument(
        "--fingerprint-extra",
        action="append",
        default=[],
        metavar="PATH_OR_STRING",
        help="an input the objective depends on (config file, data-set version); repeatable",
    )
    parser.add_argument(
        "--allow-changed-objective",
        action="store_true",
        help="accept a changed objective fingerprint: record a new objective_version",
    )
    parser.add_argument(
        "--sampler-history",
        choices=("all", "current"),
        default="all",
        help="which objective versions the sampler learns from (default all)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from optuna_guard.supervisor._config import LaunchConfig, normalize_directions
    from optuna_guard.supervisor._launch import run_launch

    retry_on = None
    if args.retry_on:
        retry_on = tuple(part.strip() for part in args.retry_on.split(",") if part.strip())
    config = LaunchConfig(
        objective=args.objective,
        study_name=args.study_name,
        storage=args.storage,
        workers=args.workers,
        n_trials=args.n_trials,
        study_trials=args.study_trials,
        trial_timeout=args.trial_timeout,
        max_preemptions=args.max_preemptions,
        checkpoint_store=args.checkpoint_store,
        directions=normalize_directions(args.direction, None),
        sampler=args.sampler,
        pruner=args.pruner,
        seed=args.seed,
        max_worker_rss_gb=args.max_worker_rss_gb,
        recycle_worker_rss_gb=args.recycle_worker_rss_gb,
        min_available_gb=args.min_available_gb,
        warn_available_gb=args.warn_available_gb,
        memory_budget_gb=args.memory_budget_gb,
        preflight=args.preflight,
        max_worker_age=args.max_worker_age,
        max_trials_per_worker=args.max_trials_per_worker,
        grace_period=args.grace_period,
        kill_wait=args.kill_wait,
        check_interval=args.check_interval,
        status_interval=args.status_interval,
        log_dir=args.log_dir,
        event_log=args.event_log,
        on_kill=args.on_kill,
        guard=not args.no_guard,
        gc_after_trial=args.gc_after_trial,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_grace=args.heartbeat_grace,
        retry=args.retry,
        retry_on=retry_on,
        retry_shrink=args.retry_shrink,
        time_budget=args.time_budget,
        storage_deadline=args.storage_deadline,
        memory_stall_timeout=args.memory_stall_timeout,
        display=args.display,
        cache=args.cache,
        fingerprint_extra=tuple(args.fingerprint_extra),
        allow_changed_objective=args.allow_changed_objective,
        sampler_history=args.sampler_history,
    )
    summary = run_launch(config)
    print(summary)
    return summary.exit_code
