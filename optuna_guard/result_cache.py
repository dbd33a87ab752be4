"""The result cache: never train the same configuration of the same objective version twice.

The key of a configuration is the SHA-256 of its params as JSON (sorted keys; floats written
as ``repr``, so 0.1 and 0.1000000001 differ) plus the objective fingerprint's digest. The index
maps keys to COMPLETE trials of the current objective version. Each worker keeps its own index
and adds only trials it has not seen. It reads the study's per-trial snapshot of all trials
(``Study._get_trials(use_cache=True)``, synced once per trial at ``ask`` and shared with the
sampler; Optuna's cached storage reads only new finished trials from the database), so a lookup
adds a scan of that in-memory list and a dict lookup.

Only clean COMPLETE trials are served: not PRUNED, FAIL or RUNNING, no stop tag (killed,
crashed, preempted, diverged), finite values. Two workers that propose the same new
configuration at the same moment both run it (neither has finished when the other looks);
``optuna-guard report`` counts those as ``duplicates_computed``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
from collections.abc import Mapping
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from optuna_guard import tags
from optuna_guard.fingerprint import trial_version

CACHED_FROM = "cached_from"  # user attr: int, the number of the trial whose result was served


def canonical_params(params: Mapping[str, Any]) -> str:
    """Params as JSON with sorted keys; json writes floats with ``repr`` (round-trip exact)."""
    return json.dumps(
        dict(params), sort_keys=True, separators=(",", ":"), default=repr, allow_nan=True
    )


def cache_key(params: Mapping[str, Any], digest: str) -> str:
    """The cache key of a configuration under an objective fingerprint digest."""
    return hashlib.sha256(f"{digest}\n{canonical_params(params)}".encode()).hexdigest()


def servable(trial: FrozenTrial) -> bool:
    """Whether a trial's result may be served: COMPLETE, no stop tag, finite values."""
    if trial.state != TrialState.COMPLETE or trial.values is None:
        return False
    if any(trial.user_attrs.get(tag) for tag in tags.STOP_TAGS):
        return False
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in trial.values)


@dataclasses.dataclass(frozen=True)
class CachedResult:
    """A finished trial whose result can be served for the same configuration."""

    number: int
    values: tuple[float, ...]
    params: dict[str, Any]
    distributions: dict[str, BaseDistribution]


class ResultCache:
    """The index of one study and objective version, updated incrementally; thread-safe
    (``n_jobs > 1`` trials of one process share it)."""

    def __init__(self, study_id: int, version: int, digest: str) -> None:
        self.study_id = study_id
        self.version = version
        self.digest = digest
        self._index: dict[str, CachedResult] = {}
        self._seen: set[int] = set()
        self._space: dict[str, BaseDistribution] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._index)

    def refresh(self, storage: Any, trials: Any = None) -> None:
        """Index the COMPLETE trials finished since the last refresh (``trials``: a list the
        caller already read, e.g. the study's per-trial snapshot that the sampler also uses)."""
        if trials is None:
            trials = storage.get_all_trials(
                self.study_id, deepcopy=False, states=(TrialState.COMPLETE,)
            )
        with self._lock:
            self.add_trials(trials)

    def add_trials(self, trials: Any) -> None:
        seen = self._seen
        for trial in trials:
            trial_id = trial._trial_id
            if trial_id in seen:
                continue
            seen.add(trial_id)
            if trial_version(trial) != self.version or not servable(trial):
                continue
            self._index.setdefault(
                cache_key(trial.params, self.digest),
                CachedResult(
                    trial.number,
                    tuple(trial.values),
                    dict(trial.params),
                    dict(trial.distributions),
                ),
            )
            self._update_space(trial.distributions)

    def _update_space(self, distributions: Mapping[str, BaseDistribution]) -> None:
        if self._space is None:
            self._space = dict(distributions)
            return
        for name in [n for n, d in self._space.items() if distributions.get(n) != d]:
            del self._space[name]

    @property
    def search_space(self) -> dict[str, BaseDistribution]:
        """The params (with their distributions) every indexed trial has: the part of a new
        trial's configuration that can be drawn before its objective runs."""
        return dict(self._space or {})

    def lookup(self, params: Mapping[str, Any]) -> CachedResult | None:
        return self._index.get(cache_key(params, self.digest))
