"""Re-queueing trials that ended for reasons that were not the config's fault.

A memory kill, a crashed worker or a preemption says nothing about how good the params are, so
such a trial is put back in the queue as a WAITING trial with the same params (or params made
smaller by a user "shrink" hook after a memory kill), at most ``max_retries`` times per original
trial. The retry chain is written the way Optuna's ``RetryHeartbeatStaleTrialCallback`` writes
it (system attrs ``failed_trial`` and ``retry_history``), so ``retried_trial_number`` and
``retry_history`` work on our retries, and ``TrialCheckpointer`` finds the chain's checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from optuna_guard import tags
from optuna_guard._logging import get_logger
from optuna_guard.exceptions import ConfigError

_log = get_logger(__name__)

__all__ = [
    "RETRYABLE_ENDS",
    "RetryPolicy",
    "ShrinkHook",
    "end_reasons",
    "enqueue_retry",
    "load_shrink_hook",
    "original_trial_number",
    "retry_history",
]

ShrinkHook = Callable[[dict[str, Any]], dict[str, Any]]

# The ends a retry can be asked for; each is the name of the boolean tag that marks it.
RETRYABLE_ENDS = frozenset(tags.STOP_TAGS)

# Optuna's own retry-chain system attrs (optuna/storages/_callbacks.py).
FAILED_TRIAL = "failed_trial"
RETRY_HISTORY = "retry_history"
# Ours: the last checkpoint step a trial saved (TrialCheckpointer), and how many retries of the
# chain were free (preemptions that made checkpoint progress do not use up max_retries).
CHECKPOINT_STEP = "optuna_guard:checkpoint_step"
FREE_RETRIES = "optuna_guard:free_retries"
# System attrs that describe the dead trial, not its params: never copied onto the retry.
# ("constraints:*" would make the retry look infeasible before it ran, and Optuna ignores a
# second set_constraint on the same key.)
_NOT_INHERITED_PREFIXES = ("constraints", "optuna_guard:")


def end_reasons(user_attrs: Mapping[str, Any]) -> frozenset[str]:
    """The retryable end tags set (truthy) on a trial, e.g. ``{"emergency_killed"}``."""
    return frozenset(name for name in RETRYABLE_ENDS if user_attrs.get(name))


def retry_history(trial: FrozenTrial) -> list[int]:
    """Numbers of the trials this one retries, oldest first (empty for an original trial)."""
    return list(trial.system_attrs.get(RETRY_HISTORY, []))


def original_trial_number(trial: FrozenTrial) -> int:
    """Number of the first trial of the retry chain (the trial itself if it is no retry)."""
    original = trial.system_attrs.get(FAILED_TRIAL)
    return int(original) if original is not None else trial.number


def _as_end_set(value: Iterable[str] | str, name: str) -> frozenset[str]:
    items = frozenset([value] if isinstance(value, str) else value)
    unknown = sorted(items - RETRYABLE_ENDS)
    if unknown:
        raise ConfigError(
            f"{name} contains {', '.join(map(repr, unknown))}; choose from {', '.join(sorted(RETRYABLE_ENDS))}."
        )
    return items


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Which ended trials are retried, how often, and with what params.

    A retry is a new trial enqueued with the failed trial's params (Optuna's ``failed_trial`` /
    ``retry_history`` system attrs link the chain). A preemption (SIGTERM, a SLURM time limit)
    after which the chain saved a newer checkpoint than it resumed from is retried without
    using up ``max_retries``, at most ``max_preemptions`` times per chain: a week-long trial
    under a 12 h limit can finish. Not to be confused with
    :class:`~optuna_guard.resilience.StorageRetrySettings` (one storage call retried).

    Example:
        .. code-block:: python

            policy = RetryPolicy(max_retries=2, shrink="hooks.py:halve_batch")
            number = enqueue_retry(study, finished_trial, policy)  # new trial number, or None

        The launcher builds one from ``--retry``, ``--retry-on`` and ``--retry-shrink``.

    Args:
        max_retries: Retries per original trial; 0 disables retries.
        max_preemptions: Free retries of a preempted chain that made checkpoint progress.
        retry_on: End tags whose trials are retried, from ``emergency_killed``,
            ``worker_crashed``, ``preempted``, ``diverged``, ``worker_lost``, ``timed_out``
            (one tag or an iterable). By default all but ``diverged``.
        shrink: A function ``params -> params`` (or a ``module:function`` /
            ``file.py:function`` spec) applied to the params of a retry whose trial ended in one
            of ``shrink_on``; its values are fitted into the params' distributions.
        shrink_on: End tags after which ``shrink`` is applied (``emergency_killed`` by default).

    Raises:
        ConfigError: A count is not an integer >= 0, an end tag is unknown, or ``shrink`` is
            neither a function nor a loadable spec.
    """

    max_retries: int = 0
    max_preemptions: int = 20
    retry_on: frozenset[str] = frozenset(
        {
            tags.EMERGENCY_KILLED,
            tags.WORKER_CRASHED,
            tags.PREEMPTED,
            tags.WORKER_LOST,
            tags.TIMED_OUT,
        }
    )
    shrink: ShrinkHook | None = None
    shrink_on: frozenset[str] = frozenset({tags.EMERGENCY_KILLED})

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_retries, bool)
            or not isinstance(self.max_retries, int)
            or self.max_retries < 0
        ):
            raise ConfigError(f"max_retries must be an integer >= 0 but got {self.max_retries!r}.")
        if (
            isinstance(self.max_preemptions, bool)
            or not isinstance(self.max_preemptions, int)
            or self.max_preemptions < 0
        ):
            raise ConfigError(
                f"max_preemptions must be an integer >= 0 but got {self.max_preemptions!r}."
            )
        object.__setattr__(self, "retry_on", _as_end_set(self.retry_on, "retry_on"))
        object.__setattr__(self, "shrink_on", _as_end_set(self.shrink_on, "shrink_on"))
        if isinstance(self.shrink, str):
            object.__setattr__(self, "shrink", load_shrink_hook(self.shrink))
        elif self.shrink is not None and not callable(self.shrink):
            raise ConfigError(
                f"shrink must be a function params -> params but got {self.shrink!r}."
            )

    def is_free_preemption(
        self, user_attrs: Mapping[str, Any], system_attrs: Mapping[str, Any]
    ) -> bool:
        """A preempted attempt that saved a checkpoint step beyond the one it resumed from,
        while the chain has free retries left: retried without using up ``max_retries``."""
        if (
            self.max_retries <= 0
            or not user_attrs.get(tags.PREEMPTED)
            or tags.PREEMPTED not in self.retry_on
        ):
            return False
        saved = system_attrs.get(CHECKPOINT_STEP)
        if not isinstance(saved, int):
            return False
        resumed = user_attrs.get(tags.RESUMED_FROM_STEP)
        progressed = not isinstance(resumed, int) or saved > resumed
        return progressed and int(system_attrs.get(FREE_RETRIES, 0)) < self.max_preemptions

    def attempt(self, frozen_trial: FrozenTrial) -> int:
        """0 for an original trial, k for the k-th retry of it that used up a retry (free
        retries after preemptions with progress are not counted)."""
        return len(retry_history(frozen_trial)) - int(
            frozen_trial.system_attrs.get(FREE_RETRIES, 0)
        )

    def is_retryable(self, user_attrs: Mapping[str, Any]) -> bool:
        return bool(end_reasons(user_attrs) & self.retry_on)

    def wants_retry(self, user_attrs: Mapping[str, Any], attempt: int) -> bool:
        """True when the trial ended in a retryable way and retries are left for its chain."""
        return self.is_retryable(user_attrs) and attempt < self.max_retries

    def wants_shrink(self, user_attrs: Mapping[str, Any]) -> bool:
        return self.shrink is not None and bool(end_reasons(user_attrs) & self.shrink_on)

    def final_tags(
        self, user_attrs: Mapping[str, Any], attempt: int, *, free: bool = False
    ) -> dict[str, Any]:
        """Tags to write before ending a trial for good: ``{"retries_exhausted": True}`` when
        it ended in a retryable way but its chain has used all retries, else ``{}``.

        With ``max_retries == 0`` retries are off, and nothing is "exhausted".
        """
        if free:  # a preemption with checkpoint progress: retried for free
            return {}
        if self.max_retries > 0 and self.is_retryable(user_attrs) and attempt >= self.max_retries:
            return {tags.RETRIES_EXHAUSTED: True}
        return {}


def load_shrink_hook(spec: str) -> ShrinkHook:
    """Import ``module:function`` or ``path/to/file.py:function`` and return the function
    (the objective's loader, so the same specs work for every option)."""
    from optuna_guard.supervisor._objective_spec import load_callable

    return load_callable(
        spec, label=f"shrink hook {spec!r}", what="a function taking and returning params"
    )


def _fit_to_distribution(name: str, value: Any, dist: BaseDistribution, trial_number: int) -> Any:
    """Clip a shrunk numeric value into its distribution (and onto its step grid); a value
    that cannot be fitted (a categorical outside its choices) is a ConfigError."""
    if isinstance(dist, CategoricalDistribution):
        if value not in dist.choices:
            raise ConfigError(
                f"shrink hook returned {name}={value!r} for trial {trial_number}, not one of "
                f"its choices {list(dist.choices)!r}"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(
            f"shrink hook returned {name}={value!r} for trial {trial_number}; expected a finite number"
        )
    assert isinstance(dist, (IntDistribution, FloatDistribution))
    fitted: float = min(max(value, dist.low), dist.high)
    if dist.step is not None:
        steps = math.floor((fitted - dist.low) / dist.step + 1e-9)
        fitted = dist.low + steps * dist.step
        if isinstance(dist, FloatDistribution):
            fitted = round(fitted, 12)
    if isinstance(dist, IntDistribution):
        fitted = int(fitted)
    if fitted != value:
        _log.warning(
            "Shrink hook returned %s=%r for trial %d, outside its distribution %r; using %r.",
            name,
            value,
            trial_number,
            dist,
            fitted,
        )
    return fitted


def shrink_params(policy: RetryPolicy, trial: FrozenTrial) -> dict[str, Any]:
    """Apply the policy's shrink hook to a trial's params, kept inside their distributions."""
    assert policy.shrink is not None
    proposed = policy.shrink(dict(trial.params))
    if not isinstance(proposed, Mapping):
        raise ConfigError(
            f"shrink hook must return a dict of params but returned {type(proposed).__name__} "
            f"for trial {trial.number}"
        )
    unknown = sorted(set(proposed) - set(trial.params))
    if unknown:
        raise ConfigError(
            f"shrink hook returned params {unknown} that trial {trial.number} does not have; "
            f"it has {sorted(trial.params)}"
        )
    params = dict(trial.params)
    for name, value in proposed.items():
        params[name] = _fit_to_distribution(name, value, trial.distributions[name], trial.number)
    return params


def _existing_retry(study: optuna.Study, trial_number: int) -> FrozenTrial | None:
    """A retry already queued for this trial (a second supervisor, or a repeated call)."""
    for other in study.get_trials(deepcopy=False):
        history = other.system_attrs.get(RETRY_HISTORY)
        if history and history[-1] == trial_number:
            return other
    return None


def enqueue_retry(
    study: optuna.Study, frozen_trial: FrozenTrial, policy: RetryPolicy
) -> int | None:
    """Queue a WAITING retry of a finished trial if the policy wants one; return its number.

    The retry carries the same params (or shrunk ones), the user's own user attrs (not our
    kill tags), ``retry_of`` (the trial it retries), ``retry_shrunk`` when the hook changed
    the params, and Optuna's ``failed_trial`` / ``retry_history`` system attrs. Returns None
    when no retry is due. Calling it twice for the same trial queues one retry.
    """
    trial = study._storage.get_trial(frozen_trial._trial_id)  # fresh tags written by others
    if not trial.state.is_finished():
        raise ValueError(
            f"trial {trial.number} is {trial.state.name}; end it (FAIL or PRUNED) before queueing a retry."
        )
    attempt = policy.attempt(trial)
    free = policy.is_free_preemption(trial.user_attrs, trial.system_attrs)
    if not free and not policy.wants_retry(trial.user_attrs, attempt):
        return None
    existing = _existing_retry(study, trial.number)
    if existing is not None:
        _log.info("Trial %d already has a retry queued (trial %d).", trial.number, existing.number)
        return existing.number

    params = dict(trial.params)
    shrunk = False
    if policy.wants_shrink(trial.user_attrs):
        params = shrink_params(policy, trial)
        shrunk = params != trial.params
        if not shrunk:
            _log.info("Shrink hook left the params of trial %d unchanged.", trial.number)

    system_attrs = {
        key: value
        for key, value in trial.system_attrs.items()
        if not key.startswith(_NOT_INHERITED_PREFIXES)
    }
    system_attrs.setdefault(FAILED_TRIAL, trial.number)
    system_attrs[RETRY_HISTORY] = [*retry_history(trial), trial.number]
    system_attrs[FREE_RETRIES] = int(trial.system_attrs.get(FREE_RETRIES, 0)) + int(free)
    if "fixed_params" in system_attrs:  # enqueue_trial's params not suggested before the kill
        system_attrs["fixed_params"] = {
            k: params.get(k, v) for k, v in system_attrs["fixed_params"].items()
        }
    user_attrs = {
        key: value for key, value in trial.user_attrs.items() if key not in tags.ALL_TAGS
    }
    user_attrs[tags.RETRY_OF] = trial.number
    if shrunk:
        user_attrs[tags.RETRY_SHRUNK] = True

    template = optuna.trial.create_trial(
        state=TrialState.WAITING,
        params=params,
        distributions=dict(trial.distributions),
        user_attrs=user_attrs,
        system_attrs=system_attrs,
    )
    new_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    new_number = study._storage.get_trial_number_from_id(new_id)
    reasons = ", ".join(sorted(end_reasons(trial.user_attrs) & policy.retry_on))
    if free:
        _log.info(
            "Trial %d (%s, with checkpoint progress) re-queued as trial %d; free retry %d of %d "
            "(--max-preemptions), --retry not used up.",
            trial.number,
            reasons,
            new_number,
            system_attrs[FREE_RETRIES],
            policy.max_preemptions,
        )
    else:
        _log.info(
            "Trial %d (%s) re-queued as trial %d, retry %d of %d%s.",
            trial.number,
            reasons,
            new_number,
            attempt + 1,
            policy.max_retries,
            f", with shrunk params {params}" if shrunk else "",
        )
    return new_number
