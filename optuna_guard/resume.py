"""Resume safety at trial start: the objective-version tag, the standalone fingerprint check,
the result-cache lookup, and a sampler that learns only from the current version.

Under ``optuna-guard run`` the launcher checks the fingerprint once, before any worker starts
(:func:`prepare_launch`), and hands the version to the workers in ``OPTUNA_GUARD_OBJECTIVE_*``
variables (:func:`install_in_worker`). The standalone ``@guard(fingerprint=True, cache=True)``
builds a :class:`ResumeHook` that checks the fingerprint on the first trial of each study.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from optuna_guard import fingerprint as _fp
from optuna_guard._logging import get_logger
from optuna_guard.exceptions import ConfigError
from optuna_guard.result_cache import CACHED_FROM, CachedResult, ResultCache

_log = get_logger(__name__)

ENV_VERSION = "OPTUNA_GUARD_OBJECTIVE_VERSION"
ENV_DIGEST = "OPTUNA_GUARD_OBJECTIVE_DIGEST"
ENV_CACHE = "OPTUNA_GUARD_CACHE"
ENV_SAMPLER_HISTORY = "OPTUNA_GUARD_SAMPLER_HISTORY"
SAMPLER_HISTORIES = ("all", "current")
ON_CHANGED = ("warn", "raise")


def launcher_env(
    version: int, digest: str, *, cache: bool, sampler_history: str
) -> dict[str, str]:
    """The worker environment that carries the launcher's version decision."""
    return {
        ENV_VERSION: str(version),
        ENV_DIGEST: digest,
        ENV_CACHE: "1" if cache else "0",
        ENV_SAMPLER_HISTORY: sampler_history,
    }


def under_launcher(environ: Mapping[str, str] | None = None) -> bool:
    """True in a launcher worker: the launcher already checked the fingerprint."""
    return bool((environ if environ is not None else os.environ).get(ENV_VERSION))


# ---------------------------------------------------------------------------------- the hook
class _StudyState:
    __slots__ = ("cache", "digest", "version")

    def __init__(self, version: int, digest: str, cache: ResultCache | None) -> None:
        self.version = version
        self.digest = digest
        self.cache = cache


class ResumeHook:
    """Runs at the start of every trial (``start_trial``); returns the cached result to serve,
    or None to run the objective.

    Launcher mode: ``version``/``digest`` are given (already checked). Standalone mode: the
    fingerprint of ``objective`` is checked against each study's on its first trial, with
    ``on_changed="warn"`` (log, record a new version, go on) or ``"raise"``.
    """

    def __init__(
        self,
        *,
        cache: bool = False,
        version: int | None = None,
        digest: str | None = None,
        on_changed: str = "warn",
        extra: Sequence[str] = (),
    ) -> None:
        if on_changed not in ON_CHANGED:
            raise ConfigError(
                f"on_changed_objective must be 'warn' or 'raise' but got {on_changed!r}."
            )
        self.cache_enabled = bool(cache)
        self.on_changed = on_changed
        self.extra = tuple(extra)
        _fp.hash_extra(self.extra)  # bad extra inputs fail at decoration time
        self._fixed = (version, digest or "") if version is not None else None
        self._studies: dict[tuple[int, int, str], _StudyState] = {}
        self._lock = threading.Lock()

    def start_trial(
        self, trial: Any, objective: Callable[..., Any] | None = None
    ) -> CachedResult | None:
        if not isinstance(trial, optuna.trial.Trial):
            return None  # FixedTrial, FrozenTrial: nothing to tag or look up
        state = self._state(trial, objective)
        if trial.user_attrs.get(_fp.OBJECTIVE_VERSION) != state.version:
            trial.set_user_attr(_fp.OBJECTIVE_VERSION, state.version)
        if state.cache is None:
            return None
        return serve_from_cache(trial, state.cache)

    def _state(self, trial: Any, objective: Callable[..., Any] | None) -> _StudyState:
        study = trial.study
        key = (id(study._storage), study._study_id, study.study_name)
        state = self._studies.get(key)
        if state is not None:
            return state
        with self._lock:
            state = self._studies.get(key)
            if state is None:
                if self._fixed is not None:
                    version, digest = self._fixed
                else:
                    if objective is None:
                        raise ConfigError("the objective is needed to fingerprint it.")
                    decision = _fp.resolve_version(
                        study,
                        _fp.fingerprint_callable(objective, extra=self.extra),
                        allow_changed=self.on_changed == "warn",
                        how_to_allow="use @guard(on_changed_objective='warn')",
                    )
                    version, digest = decision.version, decision.digest
                cache = (
                    ResultCache(study._study_id, version, digest) if self.cache_enabled else None
                )
                state = _StudyState(version, digest, cache)
                self._studies[key] = state
        return state


def serve_from_cache(trial: optuna.trial.Trial, cache: ResultCache) -> CachedResult | None:
    """Draw the params every earlier trial had (before the objective runs, so no work is done
    for a repeat), then look the configuration up. On a hit the trial gets the cached trial's
    exact params and ``cached_from``; the caller returns the cached value(s)."""
    cache.refresh(trial.study._storage, _complete_trials(trial.study))
    for name, distribution in cache.search_space.items():
        _suggest(trial, name, distribution)
    candidate = {**(getattr(trial, "_fixed_params", None) or {}), **trial.params}
    hit = cache.lookup(candidate)
    if hit is None:
        return None
    for name, distribution in hit.distributions.items():
        _suggest(trial, name, distribution)
    if trial.params != hit.params:
        return None
    trial.set_user_attr(CACHED_FROM, hit.number)
    _log.info(
        "Trial #%d served from the cache: same params as trial #%d (value %s).",
        trial.number,
        hit.number,
        ", ".join(f"{v:.6g}" for v in hit.values),
    )
    return hit


def _complete_trials(study: optuna.Study) -> list[FrozenTrial] | None:
    """COMPLETE trials from the study's per-trial snapshot (synced at ``ask``, shared with the
    sampler), or None to read the storage."""
    try:
        return study._get_trials(deepcopy=False, states=(TrialState.COMPLETE,), use_cache=True)
    except (AttributeError, TypeError):  # another Optuna version
        return None


def cached_value(hit: CachedResult) -> Any:
    """What the objective returns for a hit: the value, or the list of values."""
    return hit.values[0] if len(hit.values) == 1 else list(hit.values)


def _suggest(trial: optuna.trial.Trial, name: str, distribution: BaseDistribution) -> None:
    """Suggest through the public API (a param already set keeps its value; enqueued fixed
    params take precedence, as in any suggest call)."""
    if isinstance(distribution, CategoricalDistribution):
        trial.suggest_categorical(name, distribution.choices)
    elif isinstance(distribution, IntDistribution):
        trial.suggest_int(
            name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
        )
    elif isinstance(distribution, FloatDistribution):
        trial.suggest_float(
            name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
        )


def wrap_objective(objective: Callable[..., Any], hook: ResumeHook) -> Callable[..., Any]:
    """``objective`` with the hook in front: a cache hit returns without calling it."""

    @functools.wraps(objective)
    def resumed(trial: Any, *args: Any, **kwargs: Any) -> Any:
        hit = hook.start_trial(trial, objective)
        if hit is not None:
            return cached_value(hit)
        return objective(trial, *args, **kwargs)

    return resumed


# ------------------------------------------------------------------------- the launcher path
def launch_fingerprint(config: Any) -> _fp.Fingerprint:
    """The fingerprint of the launch's objective (source found without importing it); a bad
    ``--fingerprint-extra`` is a ConfigError here, before anything is written."""
    search = [
        *config.python_path,
        *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p],
    ]
    return _fp.fingerprint_spec(
        config.objective, extra=config.fingerprint_extra, search_path=search
    )


def prepare_launch(
    config: Any, study: optuna.Study, fingerprint: _fp.Fingerprint | None = None
) -> Any:
    """Check the objective's fingerprint against the study before any worker starts; the
    returned config carries the version for the workers. Raises ObjectiveChangedError (exit 2)."""
    started = time.perf_counter()
    fingerprint = fingerprint or launch_fingerprint(config)
    decision = _fp.resolve_version(
        study,
        fingerprint,
        allow_changed=config.allow_changed_objective,
        how_to_allow="rerun with --allow-changed-objective",
    )
    _log.info(
        "Objective fingerprint %s (%s version %d, %.0f ms).",
        decision.digest[:12],
        "recorded as" if decision.recorded else "matches",
        decision.version,
        (time.perf_counter() - started) * 1000,
    )
    return config.replace(objective_version=decision.version, objective_digest=decision.digest)


def install_in_worker(
    study: optuna.Study, objective: Callable[..., Any], environ: Mapping[str, str]
) -> Callable[..., Any]:
    """In a launcher worker: tag trials with the version, serve cache hits, and (with
    ``--sampler-history current``) hide older versions from the sampler."""
    raw = environ.get(ENV_VERSION)
    if not raw:
        return objective
    version = int(raw)
    if environ.get(ENV_SAMPLER_HISTORY, "all") == "current":
        study.sampler = CurrentVersionSampler(study.sampler, version=version)
    hook = ResumeHook(
        cache=environ.get(ENV_CACHE) == "1", version=version, digest=environ.get(ENV_DIGEST, "")
    )
    return wrap_objective(objective, hook)


def worker_tags(environ: Mapping[str, str]) -> dict[str, Any]:
    """Tags a launcher worker writes in the same insert that creates a trial."""
    raw = environ.get(ENV_VERSION)
    return {_fp.OBJECTIVE_VERSION: int(raw)} if raw else {}


# ------------------------------------------------------------------------- sampler history
class _VersionStudy(optuna.Study):
    """A view of a study that shows only one objective version's trials (to a sampler)."""

    _og_version: int

    def _get_trials(
        self,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
        use_cache: bool = False,
    ) -> list[FrozenTrial]:
        trials = optuna.Study._get_trials(
            self, deepcopy=deepcopy, states=states, use_cache=use_cache
        )
        return [t for t in trials if _fp.trial_version(t) == self._og_version]

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states, use_cache=False)


def version_view(study: optuna.Study, version: int) -> optuna.Study:
    """``study`` seen through :class:`_VersionStudy` (shares its storage and per-thread cache)."""
    view = object.__new__(_VersionStudy)
    view.__dict__.update(study.__dict__)
    view._og_version = version
    return view


class CurrentVersionSampler(BaseSampler):
    """Wraps any sampler so it learns only from trials of the current objective version.

    Trade-off: after a change the sampler starts cold (its startup trials are random again)
    instead of being misled by values of an objective that no longer exists; keep the default
    (all versions) when the change cannot move the values (a logging fix). The launcher installs
    it with ``--sampler-history current``.

    Example:
        .. code-block:: python

            sampler = CurrentVersionSampler(optuna.samplers.TPESampler(seed=0))
            study = optuna.create_study(sampler=sampler, storage=url, study_name="s")
            study.optimize(guard(fingerprint=True)(objective), n_trials=100)

    Args:
        sampler: The sampler that does the work; it sees the study with only the trials of one
            objective version. Defaults to ``TPESampler()``.
        version: The objective version to learn from. Defaults to the study's current version
            (as recorded by the fingerprint, read once per study; 1 when none was recorded).
    """

    def __init__(self, sampler: BaseSampler | None = None, *, version: int | None = None) -> None:
        self._sampler = sampler or optuna.samplers.TPESampler()
        self._fixed_version = version
        self._versions: dict[int, int] = {}  # study id -> version read from the study

    def _view(self, study: optuna.Study) -> optuna.Study:
        version = self._fixed_version
        if version is None:
            version = self._versions.get(study._study_id)
            if version is None:
                version = _fp.current_version(study) or 1
                self._versions[study._study_id] = version
        return version_view(study, version)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._sampler.infer_relative_search_space(self._view(study), trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._sampler.sample_relative(self._view(study), trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._sampler.sample_independent(
            self._view(study), trial, param_name, param_distribution
        )

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self._fixed_version is None:
            self._versions.pop(study._study_id, None)  # re-read the version once per trial
        self._sampler.before_trial(study, trial)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._sampler.reseed_rng()

    def __repr__(self) -> str:
        return f"CurrentVersionSampler({self._sampler!r}, version={self._fixed_version})"


def filter_version(trials: Iterable[FrozenTrial], version: int | None) -> list[FrozenTrial]:
    """The trials of one objective version (all when ``version`` is None)."""
    if version is None:
        return list(trials)
    return [t for t in trials if _fp.trial_version(t) == version]


def resolve_version_filter(study: optuna.Study, objective_version: int | str | None) -> int | None:
    """``None``/"all" -> None, "current" -> the study's current version, an int -> itself."""
    if objective_version is None or objective_version == "all":
        return None
    if objective_version == "current":
        return _fp.current_version(study) or 1
    if (
        isinstance(objective_version, bool)
        or not isinstance(objective_version, int)
        or objective_version < 1
    ):
        raise ConfigError(
            f"objective_version must be 'current', 'all' or a version number >= 1 but got {objective_version!r}."
        )
    return objective_version


def guard_hook(fingerprint: Any, cache: Any, on_changed: Any) -> ResumeHook | None:
    """The hook of ``@guard(fingerprint=..., cache=..., on_changed_objective=...)``, or None.

    ``fingerprint=None`` (the default) means on when ``cache=True``. In a launcher worker the
    launcher already checked the fingerprint and tags the version; the guard then only adds the
    cache when the launch itself runs without ``--cache``."""
    if fingerprint not in (None, True, False):
        raise ConfigError(f"fingerprint must be True, False or None but got {fingerprint!r}.")
    if cache not in (True, False):
        raise ConfigError(f"cache must be True or False but got {cache!r}.")
    if on_changed not in ON_CHANGED:
        raise ConfigError(
            f"on_changed_objective must be 'warn' or 'raise' but got {on_changed!r}."
        )
    if cache and fingerprint is False:
        raise ConfigError(
            "cache=True needs the objective fingerprint (it keys the cache); drop fingerprint=False."
        )
    if under_launcher():
        if cache and os.environ.get(ENV_CACHE) != "1":
            return ResumeHook(
                cache=True,
                version=int(os.environ[ENV_VERSION]),
                digest=os.environ.get(ENV_DIGEST, ""),
            )
        return None
    if not (cache or fingerprint):
        return None
    return ResumeHook(cache=bool(cache), on_changed=on_changed)


def version_option(text: str) -> int | str | None:
    """``--objective-version current|all|N`` for report/status (argparse type)."""
    import argparse

    value = text.strip().lower()
    if value == "all":
        return None
    if value == "current":
        return "current"
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise argparse.ArgumentTypeError(
        f"expected 'current', 'all' or a version number >= 1, got {text!r}"
    )
