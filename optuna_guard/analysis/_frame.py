"""trials_frame: one row per trial with its params and every optuna-guard tag as a column.

Like Optuna's ``Study.trials_dataframe`` (same ``value``/``values_*``/``params_*`` names), plus
the guard's tags, ``end_state`` and the retry origin. The tag columns are always present, so
code that filters on them works on a study that was never guarded (the columns are just empty).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial

from optuna_guard import tags
from optuna_guard.analysis._classify import end_state, retry_history, retry_origin
from optuna_guard.oom_aware.constraints import memory_constraint

if TYPE_CHECKING:  # pragma: no cover
    import pandas

# Flags: a missing tag means False (the guard only writes them when they are true), which is
# also how ``is_killed`` reads them.
FLAG_COLUMNS = (
    tags.EMERGENCY_KILLED,
    tags.WORKER_CRASHED,
    tags.PREEMPTED,
    tags.DIVERGED,
    tags.RETRY_SHRUNK,
    tags.RETRIES_EXHAUSTED,
)
FLOAT_COLUMNS = (
    tags.AVAILABLE_GB_AT_KILL,
    tags.PEAK_RSS_GB,
    tags.LOWEST_AVAILABLE_GB,
    tags.MIN_AVAILABLE_GB,
    tags.PEAK_GPU_GB,
    tags.PREDICTED_PEAK_GB,
)
INT_COLUMNS = (
    tags.WORKER_ID,
    tags.WORKER_PID,
    tags.RESUMED_FROM_STEP,
    "objective_version",
    "cached_from",
)
TEXT_COLUMNS = (tags.KILL_REASON, tags.KILL_LIMIT, tags.HOSTNAME)

# Column order of the guard part of the frame (after number/state/values/times/params).
TAG_COLUMNS = (
    tags.EMERGENCY_KILLED,
    tags.KILL_REASON,
    tags.KILL_LIMIT,
    tags.AVAILABLE_GB_AT_KILL,
    tags.PEAK_RSS_GB,
    tags.LOWEST_AVAILABLE_GB,
    tags.MIN_AVAILABLE_GB,
    tags.PEAK_GPU_GB,
    tags.PREDICTED_PEAK_GB,
    tags.WORKER_ID,
    tags.WORKER_PID,
    tags.HOSTNAME,
    tags.WORKER_CRASHED,
    tags.PREEMPTED,
    tags.DIVERGED,
    tags.RETRY_OF,
    "retry_history",
    tags.RETRY_SHRUNK,
    tags.RETRIES_EXHAUSTED,
    tags.RESUMED_FROM_STEP,
    "constraint_memory",
    "objective_version",
    "cached_from",
)


def import_pandas() -> Any:
    """pandas, or an ImportError that says which extra to install."""
    try:
        import pandas
    except ImportError as exc:  # pragma: no cover - pandas is installed in the test venv
        raise ImportError(
            "optuna_guard.analysis.trials_frame needs pandas; install the analysis extra: "
            "pip install 'optuna-guard[analysis]'"
        ) from exc
    return pandas


def value_columns(study: optuna.Study) -> list[str]:
    """``value`` for one objective; ``values_<name>`` or ``values_<i>`` for several (as Optuna)."""
    if len(study.directions) == 1:
        return ["value"]
    names = study.metric_names
    if names:
        return [f"values_{name}" for name in names]
    return [f"values_{i}" for i in range(len(study.directions))]


def trials_frame(
    study: optuna.Study, *, user_attrs: bool = True, objective_version: int | str | None = None
) -> pandas.DataFrame:
    """A pandas DataFrame with one row per trial (all states), ordered by trial number.

    Columns: ``number``, ``state`` (Optuna's), ``end_state`` (killed/crashed/preempted/diverged
    or the state), ``value`` or ``values_*``, ``datetime_start``, ``datetime_complete``,
    ``duration`` (Timedelta) and ``duration_s`` (float seconds), ``params_<name>``, then the
    guard tags (see ``TAG_COLUMNS``; ``retry_of`` comes from our tag or Optuna's ``failed_trial``
    system attribute), ``constraint_memory``, ``objective_version`` and ``cached_from`` (the
    result cache), and other user attributes as ``user_attrs_<key>``. ``objective_version``
    ("current" or a number) keeps one objective version's trials.

    Args:
        study: The study to read the trials from.
        user_attrs: Add the user attributes that are not guard tags as ``user_attrs_<key>``
            columns (the tag columns are always there).
        objective_version: ``"current"``, ``"all"`` or a version number >= 1; None keeps the
            trials of every version.

    Returns:
        The DataFrame (empty, with all columns, for a study without trials).

    Raises:
        ImportError: pandas is not installed (the ``analysis`` extra).
        ConfigError: ``objective_version`` is not ``"current"``, ``"all"`` or a number >= 1.
    """
    pd = import_pandas()
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    if objective_version is not None:
        from optuna_guard.resume import filter_version, resolve_version_filter

        trials = filter_version(trials, resolve_version_filter(study, objective_version))
    value_cols = value_columns(study)
    param_names = _param_names(trials)
    extra_attr_names = _extra_user_attrs(trials) if user_attrs else []

    rows = [_row(t, value_cols, param_names, extra_attr_names) for t in trials]
    columns = (
        [
            "number",
            "state",
            "end_state",
            *value_cols,
            "datetime_start",
            "datetime_complete",
            "duration",
            "duration_s",
        ]
        + [f"params_{name}" for name in param_names]
        + list(TAG_COLUMNS)
        + [f"user_attrs_{key}" for key in extra_attr_names]
    )
    frame = pd.DataFrame(rows, columns=columns)
    frame["number"] = frame["number"].astype("int64")
    for col in value_cols:
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")
    frame["datetime_start"] = pd.to_datetime(frame["datetime_start"])
    frame["datetime_complete"] = pd.to_datetime(frame["datetime_complete"])
    frame["duration"] = pd.to_timedelta(frame["duration"])
    frame["duration_s"] = frame["duration_s"].astype("float64")
    for col in FLAG_COLUMNS:
        frame[col] = frame[col].astype(bool)
    for col in (*FLOAT_COLUMNS, "constraint_memory"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")
    for col in (*INT_COLUMNS, tags.RETRY_OF):
        frame[col] = pd.array(frame[col].tolist(), dtype="Int64")
    for col in TEXT_COLUMNS:
        frame[col] = frame[col].astype(object)
    return frame


def _row(
    trial: FrozenTrial, value_cols: list[str], param_names: list[str], extra: list[str]
) -> dict[str, Any]:
    attrs = trial.user_attrs
    row: dict[str, Any] = {
        "number": trial.number,
        "state": trial.state.name,
        "end_state": end_state(trial),
        "datetime_start": trial.datetime_start,
        "datetime_complete": trial.datetime_complete,
    }
    values = trial.values or []
    for i, col in enumerate(value_cols):
        row[col] = values[i] if i < len(values) else math.nan
    duration = trial.duration
    row["duration"] = duration
    row["duration_s"] = duration.total_seconds() if duration is not None else math.nan
    for name in param_names:
        row[f"params_{name}"] = trial.params.get(name)
    for col in FLAG_COLUMNS:
        row[col] = bool(attrs.get(col, False))
    for col in (*FLOAT_COLUMNS, *INT_COLUMNS, *TEXT_COLUMNS):
        row[col] = _number_or_none(attrs.get(col)) if col in FLOAT_COLUMNS else attrs.get(col)
    row[tags.RETRY_OF] = retry_origin(trial)
    history = retry_history(trial)
    row["retry_history"] = history or None
    row["constraint_memory"] = memory_constraint(trial)
    for key in extra:
        row[f"user_attrs_{key}"] = attrs.get(key)
    return row


def _number_or_none(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _param_names(trials: list[FrozenTrial]) -> list[str]:
    """Every param seen in the study, in first-seen order (conditional params included)."""
    names: dict[str, None] = {}
    for trial in trials:
        for name in trial.params:
            names.setdefault(name, None)
    return list(names)


def _extra_user_attrs(trials: list[FrozenTrial]) -> list[str]:
    known = set(TAG_COLUMNS)
    names: dict[str, None] = {}
    for trial in trials:
        for key in trial.user_attrs:
            if key not in known:
                names.setdefault(key, None)
    return list(names)
