"""launch(): check everything that can be checked before a worker starts, run the arbiter,
and summarise what happened from the storage."""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import optuna

from optuna_guard import events, tags
from optuna_guard._logging import get_logger
from optuna_guard.exceptions import ConfigError
from optuna_guard.memory import MemoryProbe
from optuna_guard.supervisor import _objective_spec
from optuna_guard.supervisor._arbiter import Arbiter
from optuna_guard.supervisor._config import (
    LaunchConfig,
    LaunchOptions,
    launch_option_names,
    normalize_directions,
    retry_policy,
)
from optuna_guard.supervisor._status import make_display
from optuna_guard.supervisor._study import (
    check_study_name,
    check_writable_dir,
    create_or_check_study,
    mask_url,
    open_checked_storage,
    probe_connection,
    resolve_storage_url,
)
from optuna_guard.supervisor._study_target import StudyTarget
from optuna_guard.supervisor._summary import LaunchSummary, best_of

if TYPE_CHECKING:
    import sys

    if sys.version_info >= (3, 11):
        from typing import Unpack
    else:
        from typing_extensions import Unpack

_log = get_logger(__name__)


def launch(
    objective: str | Callable[..., Any],
    *,
    study_name: str,
    probe: MemoryProbe | None = None,
    **options: Unpack[LaunchOptions],
) -> LaunchSummary:
    """Run ``objective`` in ``workers`` supervised processes until ``n_trials`` trials finished.

    Args:
        objective: a spec (``package.module:function`` / ``path/to/file.py:function``) or a
            module-level function (turned into its spec; workers import it fresh).
        study_name: the study, created if missing.
        probe: the memory probe of the supervisor (tests pass a fake).
        **options: any :class:`LaunchConfig` option by its field name, with the defaults
            declared there (the ``optuna-guard run`` flags, see docs/launcher.md);
            ``direction="maximize"`` is an alias of ``directions``, and ``time_budget`` /
            ``trial_timeout`` also take durations such as ``"2h"``.

    Returns:
        A :class:`LaunchSummary` whose ``exit_code`` is 0 (done) or 99 (stopped by a signal
        or the time budget).

    Raises:
        ConfigError, ObjectiveSpecError, StorageUnavailableError: before any worker starts.
        CrashLoopError: when workers keep dying before their first trial.
    """
    return run_launch(config_from_options(objective, study_name, dict(options)), probe=probe)


def config_from_options(
    objective: str | Callable[..., Any], study_name: str, options: dict[str, Any]
) -> LaunchConfig:
    """``launch()``'s Python values -> a LaunchConfig: a function objective becomes its spec
    (its import root goes in front of the workers' PYTHONPATH), duration strings become
    seconds, ``direction`` joins ``directions``; unknown options are a one-line ConfigError."""
    unknown = sorted(set(options) - launch_option_names())
    if unknown:
        raise ConfigError(
            f"launch(): unknown option(s) {', '.join(unknown)}; see LaunchConfig for the "
            "accepted options."
        )
    python_path: tuple[str, ...] = tuple(options.pop("python_path", ()))
    if isinstance(objective, str):
        spec = objective
    else:
        spec = _objective_spec.spec_from_callable(objective)
        root = _objective_spec.import_root(objective)
        if root is not None:
            python_path = (root, *python_path)
    for name in ("time_budget", "trial_timeout"):
        if isinstance(options.get(name), str):
            options[name] = _parse_duration(options[name])
    directions = normalize_directions(
        options.pop("direction", None), options.pop("directions", None)
    )
    return LaunchConfig(
        objective=spec,
        study_name=study_name,
        directions=directions,
        python_path=python_path,
        **options,
    )


def resolve(config: LaunchConfig) -> LaunchConfig:
    """The config as every process must see it, in one pass: the objective spec with an
    absolute file path, ``--sampler``/``--pruner`` factory files looked for next to the
    objective, the storage URL (the default SQLite file, journal paths made absolute), an
    absolute ``--log-dir`` and ``--retry-shrink`` spec. Raises ConfigError /
    ObjectiveSpecError on a malformed spec; loads no user code."""
    spec, sampler, pruner = _objective_spec.resolve_specs(
        config.objective, config.sampler, config.pruner
    )
    return config.replace(
        objective=spec,
        sampler=sampler,
        pruner=pruner,
        storage=resolve_storage_url(config.storage),
        log_dir=os.path.abspath(config.log_dir),
        retry_shrink=(
            _objective_spec.normalize_spec(config.retry_shrink) if config.retry_shrink else None
        ),
    )


def run_launch(
    config: LaunchConfig,
    *,
    probe: MemoryProbe | None = None,
    spec_check: _objective_spec.SpecCheck | None = None,
) -> LaunchSummary:
    """The body of :func:`launch` for an already validated config (the CLI calls this, with
    the spec check it started before importing this module)."""
    started = time.monotonic()
    try:
        config = resolve(config)
    except BaseException:
        if spec_check is not None:
            spec_check.cancel()
        raise
    url = config.storage or ""
    # --sampler/--pruner factories are built once in the check process (exit 2 on any
    # problem), never in the supervisor, before the storage is touched.
    if spec_check is None or spec_check.key != (
        config.objective,
        config.sampler,
        config.pruner,
        config.seed,
    ):
        if spec_check is not None:
            spec_check.cancel()
        spec_check = _objective_spec.SpecCheck.for_config(config)
    spec_check.result()
    budget = _time_budget(config)  # the wall clock starts now
    if config.retry <= 0 and (config.retry_shrink or config.retry_on):
        _log.warning("--retry-on/--retry-shrink have no effect without --retry N (N >= 1).")
    policy = retry_policy(config)
    # Every input is checked before anything is written to the storage (no empty study left
    # behind by a bad --sampler or --log-dir).
    check_study_name(config.study_name)
    check_writable_dir(config.log_dir, "--log-dir")
    check_writable_dir(os.path.dirname(os.path.abspath(config.event_log_path)), "--event-log")
    from optuna_guard.resume import launch_fingerprint, prepare_launch  # issue 13

    fingerprint = launch_fingerprint(config)
    # Transient storage errors are ridden out up to --storage-deadline; exit 2 only for
    # errors that retrying cannot fix.
    probe_connection(url, config.connect_timeout, config.storage_deadline)
    storage = open_checked_storage(
        url, connect_timeout=config.connect_timeout, deadline_s=config.storage_deadline
    )
    relay = OutageRelay()
    storage = _resilient(storage, config, relay)
    study_target = _study_target(config, storage)
    if study_target is not None and study_target.reached:
        return _nothing_to_run(config, study_target, time.monotonic() - started)
    study = create_or_check_study(storage, config.study_name, config.directions)
    config = prepare_launch(
        config, study, fingerprint
    )  # a changed objective: exit 2, no worker started
    if study_target is not None:
        study_target.study_id = study._study_id
    try:
        os.makedirs(config.log_dir, exist_ok=True)
        event_log = events.EventLog(config.event_log_path)
    except OSError as exc:
        raise ConfigError(
            f"--log-dir/--event-log {config.log_dir!r} is not writable: {exc.strerror}."
        ) from None
    _log.info(
        "Launching %d worker(s) on study %r (%s), %s; logs in %s.",
        config.workers,
        config.study_name,
        mask_url(url),
        ", ".join(
            filter(
                None,
                (
                    f"{config.n_trials} trials" if config.n_trials else "",
                    study_target.describe() if study_target is not None else "",
                ),
            )
        )
        or "until stopped",
        config.log_dir,
    )
    arbiter = Arbiter(
        config,
        study,
        url,
        probe=probe,
        event_log=event_log,
        display=make_display(config.display),
        retry_policy=policy,
        time_budget=budget,
        study_target=study_target,
    )
    relay.arbiter = arbiter
    try:
        exit_code = arbiter.run()
    finally:
        event_log.close()
    summary = summarize(arbiter, study, config, exit_code, time.monotonic() - started)
    _log.info("%s", summary)
    return summary


def summarize(
    arbiter: Arbiter, study: optuna.Study, config: LaunchConfig, exit_code: int, duration: float
) -> LaunchSummary:
    ids = set(arbiter.finished_states)
    states: collections.Counter[str] = collections.Counter()
    emergency = preempted = 0
    best: float | None = None
    best_trials: tuple[int, ...] = ()
    try:
        trials = _final_trials(arbiter, study)  # bounded by the exit deadline (issue 10)
        for trial in trials:
            if trial._trial_id not in ids:
                continue
            states[trial.state.name] += 1
            emergency += bool(trial.user_attrs.get(tags.EMERGENCY_KILLED))
            preempted += bool(trial.user_attrs.get(tags.PREEMPTED))
        best, best_trials = best_of(trials, study.directions)
    except Exception as exc:  # storage gone at the very end: fall back to what the loop saw
        _log.error("Could not read the final trial states from the storage: %s", exc)
        states = collections.Counter(arbiter.finished_states.values())
        preempted = arbiter.preempted
    return LaunchSummary(
        study_name=config.study_name,
        storage=mask_url(config.storage or ""),
        exit_code=exit_code,
        n_trials=config.n_trials,
        finished=len(ids),
        states=dict(states),
        emergency_killed=emergency,
        kills=arbiter.kills,
        crashes=arbiter.crashes,
        recycles=arbiter.recycles,
        preempted=preempted,
        retries=arbiter.retries,
        skipped_for_time=arbiter.skipped_for_time_count,
        worker_starts=arbiter.worker_starts,
        stop_reason=arbiter.stop_reason,
        duration_s=round(duration, 3),
        best_value=best,
        best_trials=best_trials,
        event_log=config.event_log_path,
    )


def _final_trials(arbiter: Arbiter, study: optuna.Study) -> list[Any]:
    """The study's trials for the summary, unless the exit's storage time is used up or a
    second signal asked to skip storage work (then the loop's own counts are reported)."""
    from optuna_guard.exceptions import StorageUnavailableError
    from optuna_guard.supervisor import _shutdown

    if arbiter.storage_abandoned:
        raise StorageUnavailableError("storage work at exit was skipped")
    done, trials = _shutdown.bounded_call(
        lambda: study.get_trials(deepcopy=False),
        arbiter.storage_deadline_at_exit(),
        arbiter.storage_interrupted,
    )
    if not done:
        raise StorageUnavailableError("no answer before the exit deadline")
    return list(trials)


# ---------------------------------------------------------------------- issue 4: crash-safe trials
def _parse_duration(text: str) -> float:
    from optuna_guard.time_budget import parse_duration

    return parse_duration(text)


class OutageRelay:
    """ResilientStorage's outage callback for the supervisor's own storage; forwards to the
    arbiter's event log once it exists."""

    def __init__(self) -> None:
        self.arbiter: Arbiter | None = None

    def __call__(self, event: str, seconds: float, what: str) -> None:
        if self.arbiter is not None:
            self.arbiter.emit(
                events.STORAGE_OUTAGE,
                reason=f"outage {event} ({what})",
                outage=event,
                seconds=round(seconds, 1),
                source="supervisor",
            )


def _resilient(storage: Any, config: LaunchConfig, relay: OutageRelay | None = None) -> Any:
    """Retry transient database errors (a PostgreSQL restart, dropped connections) for up to
    ``storage_deadline`` seconds instead of failing; None switches it off."""
    if config.storage_deadline is None:
        return storage
    from optuna_guard.resilience import ResilientStorage, StorageRetrySettings

    return ResilientStorage(
        storage, StorageRetrySettings(deadline_s=config.storage_deadline), on_outage=relay
    )


def _study_target(config: LaunchConfig, storage: Any) -> StudyTarget | None:
    """The ``--study-trials`` target, counted once before the study is loaded (a study that has
    it already runs nothing and prints one line)."""
    if config.study_trials is None:
        return None
    try:
        study_id = storage.get_study_id_from_name(config.study_name)
    except KeyError:  # a new study: nothing finished yet
        return StudyTarget(config.study_trials, storage, None)
    target = StudyTarget(config.study_trials, storage, study_id)
    target.count()
    return target


def _nothing_to_run(config: LaunchConfig, target: StudyTarget, duration: float) -> LaunchSummary:
    """The one-line result of a launch on a study that already reached ``--study-trials``
    (a requeued SLURM job after the last trial finished): exit 0, no worker started."""
    return LaunchSummary(
        study_name=config.study_name,
        storage=mask_url(config.storage or ""),
        exit_code=0,
        n_trials=config.n_trials,
        finished=0,
        states={},
        stop_reason=(
            f"nothing to run, the study already has {target.finished} finished trials "
            f"(--study-trials {target.target})"
        ),
        duration_s=round(duration, 3),
        event_log=None,
    )


def _time_budget(config: LaunchConfig) -> Any:
    if config.time_budget is None:
        return None
    from optuna_guard.time_budget import TimeBudget

    return TimeBudget(config.time_budget, grace_period=config.grace_period)
