"""Estimating a trial's peak memory from finished trials with similar params.

Two estimators over the trials that carry a ``peak_rss_gb`` tag; ``auto`` (the default) uses the
regression while it fits the history well (typical relative error <= ``AUTO_MAX_FIT_ERROR``)
and knn otherwise (memory that is no power law of the params, or too few trials for the fit):

- ``regression``: ``peak = base + exp(a + sum_i b_i * f_i)``, a fixed part (the
  interpreter, framework, data) plus a power law in the params. Each numeric param enters as
  ``log(x)`` when its range is positive (else ``x``) scaled to [0, 1] by its distribution, each
  categorical one-hot, so ``exp(...)`` is a product of sizes (batch x width x sequence length)
  times a factor per category (e.g. Adam's optimizer state). ``base`` is chosen among fractions
  of the smallest observed peak by the smallest relative error; ``a, b`` by (lightly ridged)
  least squares on ``log(peak - base)``. Such a fit extrapolates to bigger configurations
  nobody has tried yet. Fitted on trials that were *not* killed: a killed trial's peak is only
  what it reached before the kill (a lower bound), which would pull the fit down.
- ``knn``: the inverse-distance weighted mean of the ``k`` nearest trials (same scaled
  params; a categorical counts 1 when it differs; each param weighted by how much it moves
  memory in the history, see ``relevance``), killed ones included. It never extrapolates and
  abstains when even the nearest trial is farther than ``max_distance``.

A killed trial was still growing when it was stopped, so its need is counted as its peak times
``KILLED_GROWTH``. The estimate is raised to that need when a killed trial is nearly the same:
for the regression, within ``KILLED_FLOOR_DISTANCE`` and ranked by the fit at most as big as
this trial (the fit underestimates there); for knn, practically identical params.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial

from optuna_guard import tags

METHODS = ("auto", "regression", "knn")
AUTO_MAX_FIT_ERROR = (
    0.15  # "auto" uses the regression while its typical relative error is below this
)
KILLED_FLOOR_DISTANCE = 0.1
SAME_PARAMS_DISTANCE = 0.02
KILLED_GROWTH = 1.1
PREFLIGHT_LIMIT = "preflight"  # kill_limit of trials the pre-flight check pruned
_RIDGE = 1e-4
# The fixed part of a trial's memory (interpreter, framework, data) is tried at these fractions
# of the smallest observed peak; the one whose fit has the smallest relative error is kept.
_BASE_FRACTIONS = np.linspace(0.0, 0.95, 20)
_EPS_DISTANCE = 0.05
_MIN_RELEVANCE = 0.1  # below this a param's correlation with memory counts as none

# (a finished trial, its memory need in GB: the peak, times KILLED_GROWTH if it was killed)
Observations = Sequence[tuple[FrozenTrial, float]]


def is_killed(trial: FrozenTrial) -> bool:
    """True when a memory limit stopped this trial: its peak is a lower bound, not the need."""
    return bool(trial.user_attrs.get(tags.EMERGENCY_KILLED, False))


@dataclasses.dataclass(frozen=True)
class PeakEstimate:
    """A predicted peak process-tree RSS and what it was based on."""

    peak_gb: float
    method: str
    n_trials: int  # trials the estimate was computed from
    nearest: tuple[int, ...] = ()  # numbers of the nearest trials (knn), or the killed floor
    detail: str = ""  # a short sentence for logs and the kill reason
    error: float = (
        0.0  # typical relative error: the fit's (regression) or the neighbours' spread (knn)
    )


@dataclasses.dataclass(frozen=True)
class Abstention:
    """Why no estimate was made (too little history, nothing similar)."""

    reason: str


def observed_peak(trial: FrozenTrial) -> float | None:
    """The trial's ``peak_rss_gb`` tag if it is a usable observation, else None.

    Trials the pre-flight check pruned never ran, so their (tiny) peak says nothing.
    """
    if trial.user_attrs.get(tags.KILL_LIMIT) == PREFLIGHT_LIMIT:
        return None
    value = trial.user_attrs.get(tags.PEAK_RSS_GB)
    if value is None or isinstance(value, bool):
        return None
    try:
        peak = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(peak) or peak <= 0:
        return None
    return peak


def estimate_peak(
    params: Mapping[str, Any],
    distributions: Mapping[str, BaseDistribution],
    history: Sequence[FrozenTrial],
    *,
    method: str = "auto",
    min_history: int = 8,
    k: int = 5,
    max_distance: float = 0.35,
) -> PeakEstimate | Abstention:
    """Estimate the peak RSS (GB) of a trial with ``params`` from ``history`` (finished trials)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} but got {method!r}.")
    names = [n for n in params if n in distributions]
    observations: list[tuple[FrozenTrial, float]] = []
    for trial in history:
        peak = observed_peak(trial)
        if peak is None or not _has_params(trial, names, distributions):
            continue
        observations.append((trial, peak * KILLED_GROWTH if is_killed(trial) else peak))
    weights = relevance(names, distributions, observations)
    predict: Callable[[Mapping[str, Any]], float] | None = None
    result: PeakEstimate | Abstention
    fit = (
        _fit_regression(names, distributions, observations, min_history)
        if method != "knn"
        else None
    )
    if method == "regression" and isinstance(fit, Abstention):
        return fit
    if isinstance(fit, _Fit) and (method == "regression" or fit.error <= AUTO_MAX_FIT_ERROR):
        predict = fit.predict
        result = fit.estimate(params)
    else:  # knn, or auto when the fit is poor or not possible yet
        result = _knn(
            params, names, distributions, observations, min_history, k, max_distance, weights
        )
        if isinstance(fit, _Fit) and not isinstance(result, Abstention):
            result = dataclasses.replace(
                result,
                detail=f"{result.detail}; the fit's typical error {100 * fit.error:.0f}% was too large",
            )
    if isinstance(result, Abstention):
        return result
    return _apply_killed_floor(
        result, params, names, distributions, observations, predict, weights
    )


# -- features -------------------------------------------------------------------------------


def _has_params(
    trial: FrozenTrial, names: Sequence[str], distributions: Mapping[str, BaseDistribution]
) -> bool:
    for name in names:
        if name not in trial.params:
            return False
        if type(trial.distributions.get(name)) is not type(distributions[name]):
            return False
    return True


def _scale(value: Any, dist: BaseDistribution) -> float:
    """A numeric param on [0, 1] over its range (log scale for positive ranges)."""
    assert isinstance(dist, (FloatDistribution, IntDistribution))
    low, high, x = float(dist.low), float(dist.high), float(value)
    if low > 0:
        low, high, x = math.log(low), math.log(high), math.log(max(x, 1e-300))
    if high == low:
        return 0.0
    return (x - low) / (high - low)


def _features(
    params: Mapping[str, Any], names: Sequence[str], distributions: Mapping[str, BaseDistribution]
) -> list[float]:
    """Numeric params scaled, categoricals one-hot (first choice dropped): the regression's x."""
    row: list[float] = []
    for name in names:
        dist = distributions[name]
        if isinstance(dist, CategoricalDistribution):
            row.extend(1.0 if params[name] == choice else 0.0 for choice in dist.choices[1:])
        else:
            row.append(_scale(params[name], dist))
    return row


def _distance(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    names: Sequence[str],
    distributions: Mapping[str, BaseDistribution],
    weights: Mapping[str, float] | None = None,
) -> float:
    """Weighted root mean square difference of the scaled params (a differing categorical
    counts 1); ``weights`` default to 1 for every param."""
    if not names:
        return 0.0
    total = 0.0
    weight_sum = 0.0
    for name in names:
        dist = distributions[name]
        weight = 1.0 if weights is None else weights.get(name, 0.0)
        if isinstance(dist, CategoricalDistribution):
            diff = 0.0 if a[name] == b[name] else 1.0
        else:
            diff = (_scale(a[name], dist) - _scale(b[name], dist)) ** 2
        total += weight * diff
        weight_sum += weight
    return math.sqrt(total / weight_sum) if weight_sum > 0 else 0.0


def relevance(
    names: Sequence[str],
    distributions: Mapping[str, BaseDistribution],
    observations: Observations,
) -> dict[str, float]:
    """How much each param moves memory: |correlation| of its scaled value with log(need) for a
    numeric param, the correlation ratio for a categorical one (0..1).

    Nearest neighbours are found with these weights, so params that do not change memory
    (learning rate, dropout, ...) do not decide which trials count as "similar". When no param
    shows any effect, all weigh the same.
    """
    if len(observations) < 3:
        return {name: 1.0 for name in names}
    y = np.log(np.array([need for _, need in observations]))
    weights: dict[str, float] = {}
    for name in names:
        dist = distributions[name]
        values = [t.params[name] for t, _ in observations]
        if isinstance(dist, CategoricalDistribution):
            total = float(np.sum((y - y.mean()) ** 2))
            between = 0.0
            for choice in set(values):
                group = y[[v == choice for v in values]]
                between += len(group) * float(group.mean() - y.mean()) ** 2
            weights[name] = math.sqrt(between / total) if total > 0 else 0.0
        else:
            x = np.array([_scale(v, dist) for v in values])
            if x.std() == 0 or y.std() == 0:
                weights[name] = 0.0
            else:
                weights[name] = abs(float(np.corrcoef(x, y)[0, 1]))
    if not any(w > _MIN_RELEVANCE for w in weights.values()):
        return {name: 1.0 for name in names}
    return {name: (w if w > _MIN_RELEVANCE else 0.0) for name, w in weights.items()}


# -- estimators -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Fit:
    """``peak = base + exp(coef . [1, features])`` fitted on trials that were not killed."""

    names: tuple[str, ...]
    distributions: Mapping[str, BaseDistribution]
    base: float
    coef: np.ndarray
    error: float
    n_trials: int

    def predict(self, params: Mapping[str, Any]) -> float:
        x = np.array([1.0, *_features(params, self.names, self.distributions)])
        return float(self.base + math.exp(min(float(x @ self.coef), 30.0)))

    def estimate(self, params: Mapping[str, Any]) -> PeakEstimate:
        return PeakEstimate(
            peak_gb=self.predict(params),
            method="regression",
            n_trials=self.n_trials,
            detail=(
                f"fit on {self.n_trials} finished trials: {self.base:.1f} GB base + power law, "
                f"typical error {100 * self.error:.0f}%"
            ),
            error=self.error,
        )


def _fit_regression(
    names: Sequence[str],
    distributions: Mapping[str, BaseDistribution],
    observations: Observations,
    min_history: int,
) -> _Fit | Abstention:
    usable = [(t, peak) for t, peak in observations if not is_killed(t)]
    n_features = 1 + len(
        _features({n: _any_value(distributions[n]) for n in names}, names, distributions)
    )
    needed = max(min_history, n_features + 1)
    if len(usable) < needed:
        return Abstention(
            f"only {len(usable)} finished trial(s) with a peak_rss_gb tag and these params; "
            f"the regression needs {needed}"
        )
    x = np.array([[1.0, *_features(t.params, names, distributions)] for t, _ in usable])
    peaks = np.array([peak for _, peak in usable])
    best: tuple[float, float, np.ndarray] | None = None
    for base in _BASE_FRACTIONS * peaks.min():
        # weights (excess / peak)^2 make the log-space fit minimise the relative error of the
        # peak: a trial barely above the base says little about the power law
        weights = ((peaks - base) / peaks) ** 2
        coef = _ridge(x, np.log(peaks - base), weights)
        fitted = base + np.exp(np.minimum(x @ coef, 30.0))
        error = float(np.sqrt(np.mean((fitted / peaks - 1.0) ** 2)))
        if best is None or error < best[0]:
            best = (error, float(base), coef)
    assert best is not None  # _BASE_FRACTIONS is not empty
    error, base, coef = best
    return _Fit(tuple(names), distributions, base, coef, error, len(usable))


def _any_value(dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[0]
    return dist.low  # type: ignore[attr-defined]  # Float/IntDistribution, Optuna's numeric kinds


def _ridge(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    penalty = _RIDGE * float(weights.sum()) * np.eye(x.shape[1])
    penalty[0, 0] = 0.0  # the intercept is not shrunk
    xw = x * weights[:, None]
    return np.linalg.solve(xw.T @ x + penalty, xw.T @ y)


def _knn(
    params: Mapping[str, Any],
    names: Sequence[str],
    distributions: Mapping[str, BaseDistribution],
    observations: Observations,
    min_history: int,
    k: int,
    max_distance: float,
    weights: Mapping[str, float],
) -> PeakEstimate | Abstention:
    if len(observations) < min_history:
        return Abstention(
            f"only {len(observations)} finished trial(s) with a peak_rss_gb tag and these params; need {min_history}"
        )
    ranked = sorted(
        (
            (_distance(params, t.params, names, distributions, weights), t, peak)
            for t, peak in observations
        ),
        key=lambda item: (item[0], -item[1].number),
    )[:k]
    if ranked[0][0] > max_distance:
        return Abstention(
            f"no finished trial with similar params (nearest at distance {ranked[0][0]:.2f} > {max_distance})"
        )
    closeness = [1.0 / (d + _EPS_DISTANCE) for d, _, _ in ranked]
    peak = sum(w * p for w, (_, _, p) in zip(closeness, ranked)) / sum(closeness)
    spread = math.sqrt(
        sum(w * (p - peak) ** 2 for w, (_, _, p) in zip(closeness, ranked)) / sum(closeness)
    )
    return PeakEstimate(
        peak_gb=peak,
        method="knn",
        n_trials=len(ranked),
        nearest=tuple(t.number for _, t, _ in ranked),
        detail=f"{len(ranked)} nearest trials "
        + ", ".join(f"#{t.number} {p:.1f} GB" for _, t, p in ranked),
        error=spread / peak if peak > 0 else 0.0,
    )


def _apply_killed_floor(
    estimate: PeakEstimate,
    params: Mapping[str, Any],
    names: Sequence[str],
    distributions: Mapping[str, BaseDistribution],
    observations: Observations,
    predict: Callable[[Mapping[str, Any]], float] | None,
    weights: Mapping[str, float],
) -> PeakEstimate:
    """Raise the estimate to the need of a killed trial with nearly the same params.

    With the regression, only when the fit ranks this trial at least as big as the killed one
    (then the fit demonstrably underestimates there); a slightly smaller configuration next to
    a killed one is left to the fit, because the best valid trials often sit right there. With
    knn (which already averages killed neighbours in), only for practically the same params.
    """
    floor_trials = []
    for trial, need in observations:
        if not is_killed(trial) or need <= estimate.peak_gb:
            continue
        distance = _distance(params, trial.params, names, distributions, weights)
        if predict is not None:
            if distance > KILLED_FLOOR_DISTANCE or predict(trial.params) > estimate.peak_gb + 1e-9:
                continue
        elif distance > SAME_PARAMS_DISTANCE:
            continue
        floor_trials.append((trial, need))
    if not floor_trials:
        return estimate
    trial, need = max(floor_trials, key=lambda item: item[1])
    return dataclasses.replace(
        estimate,
        peak_gb=need,
        nearest=(trial.number,),
        detail=f"trial #{trial.number} with nearly the same params was killed at {need / KILLED_GROWTH:.1f} GB ({estimate.detail})",
    )
