"""Estimating a trial's peak memory from finished trials with similar params.

Two estimators over the trials that carry a ``peak_rss_gb`` tag:

- ``regression`` (default): ``peak = base + exp(a + sum_i b_i * f_i)``, a fixed part (the
  interpreter, framework, data) plus a power law in the params. Each numeric param enters as
  ``log(x)`` when its range is positive (else ``x``) scaled to [0, 1] by its distribution, each
  categorical one-hot, so ``exp(...)`` is a product of sizes (batch x width x sequence length)
  times a factor per category (e.g. Adam's optimizer state). ``base`` is chosen among fractions
  of the smallest observed peak by the smallest relative error; ``a, b`` by (lightly ridged)
  least squares on ``log(peak - base)``. Such a fit extrapolates to bigger configurations
  nobody has tried yet. Fitted on trials that were *not* killed: a killed trial's peak is only
  what it reached before the kill (a lower bound), which would pull the fit down.
- ``knn``: the inverse-distance weighted mean of the ``k`` nearest trials (same scaled params;
  a categorical counts 1 when it differs), killed ones included. It never extrapolates and
  abstains when even the nearest trial is farther than ``max_distance``.

Both then raise the estimate to the need of any killed trial with nearly the same params
(distance <= ``KILLED_FLOOR_DISTANCE``). A killed trial was still growing when it was stopped,
so its need is counted as its peak times ``KILLED_GROWTH`` (in knn too).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial

from optuna_guard import tags
from optuna_guard.analysis._filters import is_killed

METHODS = ("regression", "knn")
KILLED_FLOOR_DISTANCE = 0.1
KILLED_GROWTH = 1.1
PREFLIGHT_LIMIT = "preflight"  # kill_limit of trials the pre-flight check pruned
_RIDGE = 1e-4
# The fixed part of a trial's memory (interpreter, framework, data) is tried at these fractions
# of the smallest observed peak; the one whose fit has the smallest relative error is kept.
_BASE_FRACTIONS = np.linspace(0.0, 0.95, 20)
_EPS_DISTANCE = 0.05


@dataclasses.dataclass(frozen=True)
class PeakEstimate:
    """A predicted peak process-tree RSS and what it was based on."""

    peak_gb: float
    method: str
    n_trials: int  # trials the estimate was computed from
    nearest: tuple[int, ...] = ()  # numbers of the nearest trials (knn), or the killed floor
    detail: str = ""  # a short sentence for logs and the kill reason


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
    method: str = "regression",
    min_history: int = 8,
    k: int = 5,
    max_distance: float = 0.35,
) -> PeakEstimate | Abstention:
    """Estimate the peak RSS (GB) of a trial with ``params`` from ``history`` (finished trials)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} but got {method!r}.")
    names = [n for n in params if n in distributions]
    observations = []  # (trial, its memory need in GB)
    for trial in history:
        peak = observed_peak(trial)
        if peak is None or not _has_params(trial, names, distributions):
            continue
        observations.append((trial, peak * KILLED_GROWTH if is_killed(trial) else peak))
    if method == "regression":
        result = _regression(params, names, distributions, observations, min_history)
    else:
        result = _knn(params, names, distributions, observations, min_history, k, max_distance)
    if isinstance(result, Abstention):
        return result
    return _apply_killed_floor(result, params, names, distributions, observations)


# -- features -------------------------------------------------------------------------------


def _has_params(trial: FrozenTrial, names: Sequence[str], distributions: Mapping[str, BaseDistribution]) -> bool:
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


def _features(params: Mapping[str, Any], names: Sequence[str], distributions: Mapping[str, BaseDistribution]) -> list[float]:
    """Numeric params scaled, categoricals one-hot (first choice dropped): the regression's x."""
    row: list[float] = []
    for name in names:
        dist = distributions[name]
        if isinstance(dist, CategoricalDistribution):
            row.extend(1.0 if params[name] == choice else 0.0 for choice in dist.choices[1:])
        else:
            row.append(_scale(params[name], dist))
    return row


def _distance(a: Mapping[str, Any], b: Mapping[str, Any], names: Sequence[str], distributions: Mapping[str, BaseDistribution]) -> float:
    """Root mean square difference of the scaled params; a differing categorical counts 1."""
    if not names:
        return 0.0
    total = 0.0
    for name in names:
        dist = distributions[name]
        if isinstance(dist, CategoricalDistribution):
            total += 0.0 if a[name] == b[name] else 1.0
        else:
            total += (_scale(a[name], dist) - _scale(b[name], dist)) ** 2
    return math.sqrt(total / len(names))


# -- estimators -----------------------------------------------------------------------------


def _regression(params, names, distributions, observations, min_history) -> PeakEstimate | Abstention:
    usable = [(t, peak) for t, peak in observations if not is_killed(t)]
    x_new = np.array([1.0, *_features(params, names, distributions)])
    needed = max(min_history, len(x_new) + 1)
    if len(usable) < needed:
        return Abstention(
            f"only {len(usable)} finished trial(s) with a peak_rss_gb tag and these params; "
            f"the regression needs {needed}"
        )
    x = np.array([[1.0, *_features(t.params, names, distributions)] for t, _ in usable])
    peaks = np.array([peak for _, peak in usable])
    best = None
    for base in _BASE_FRACTIONS * peaks.min():
        # weights (excess / peak)^2 make the log-space fit minimise the relative error of the
        # peak: a trial barely above the base says little about the power law
        weights = ((peaks - base) / peaks) ** 2
        coef = _ridge(x, np.log(peaks - base), weights)
        fitted = base + np.exp(np.minimum(x @ coef, 30.0))
        error = float(np.sqrt(np.mean((fitted / peaks - 1.0) ** 2)))
        if best is None or error < best[0]:
            best = (error, base, coef)
    error, base, coef = best
    peak = float(base + math.exp(min(float(x_new @ coef), 30.0)))
    return PeakEstimate(
        peak_gb=peak,
        method="regression",
        n_trials=len(usable),
        detail=f"fit on {len(usable)} finished trials: {base:.1f} GB base + power law, typical error {100 * error:.0f}%",
    )


def _ridge(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    penalty = _RIDGE * float(weights.sum()) * np.eye(x.shape[1])
    penalty[0, 0] = 0.0  # the intercept is not shrunk
    xw = x * weights[:, None]
    return np.linalg.solve(xw.T @ x + penalty, xw.T @ y)


def _knn(params, names, distributions, observations, min_history, k, max_distance) -> PeakEstimate | Abstention:
    if len(observations) < min_history:
        return Abstention(
            f"only {len(observations)} finished trial(s) with a peak_rss_gb tag and these params; need {min_history}"
        )
    ranked = sorted(
        ((_distance(params, t.params, names, distributions), t, peak) for t, peak in observations),
        key=lambda item: (item[0], -item[1].number),
    )[:k]
    if ranked[0][0] > max_distance:
        return Abstention(f"no finished trial with similar params (nearest at distance {ranked[0][0]:.2f} > {max_distance})")
    weights = [1.0 / (d + _EPS_DISTANCE) for d, _, _ in ranked]
    peak = sum(w * p for w, (_, _, p) in zip(weights, ranked)) / sum(weights)
    return PeakEstimate(
        peak_gb=peak,
        method="knn",
        n_trials=len(ranked),
        nearest=tuple(t.number for _, t, _ in ranked),
        detail=f"{len(ranked)} nearest trials " + ", ".join(f"#{t.number} {p:.1f} GB" for _, t, p in ranked),
    )


def _apply_killed_floor(estimate: PeakEstimate, params, names, distributions, observations) -> PeakEstimate:
    floor_trials = [
        (t, peak)
        for t, peak in observations
        if is_killed(t) and peak > estimate.peak_gb and _distance(params, t.params, names, distributions) <= KILLED_FLOOR_DISTANCE
    ]
    if not floor_trials:
        return estimate
    trial, peak = max(floor_trials, key=lambda item: item[1])
    return dataclasses.replace(
        estimate,
        peak_gb=peak,
        nearest=(trial.number,),
        detail=f"trial #{trial.number} with nearly the same params was killed at {peak / KILLED_GROWTH:.1f} GB ({estimate.detail})",
    )
