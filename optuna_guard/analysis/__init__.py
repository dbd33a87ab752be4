"""Analysis of guarded studies: killed-trial filters, data frames, reports, OOM-aware search.

pandas and plotly (the ``analysis`` extra) are imported only by the functions that need them.
"""

from __future__ import annotations

from optuna_guard._best import best_valid_trials
from optuna_guard.analysis._classify import END_STATES, end_state, retry_origin
from optuna_guard.analysis._filters import is_killed, killed_trials, valid_trials
from optuna_guard.analysis._frame import trials_frame
from optuna_guard.analysis._render_html import render_html
from optuna_guard.analysis._render_json import render_json
from optuna_guard.analysis._render_text import render_text
from optuna_guard.analysis._summary import REPORT_KEYS, REPORT_SCHEMA, REPORT_VERSION, build_report
from optuna_guard.oom_aware.constraints import (
    is_memory_feasible,
    memory_constraint,
    memory_constraint_value,
    set_memory_constraint,
)
from optuna_guard.oom_aware.preflight import PreflightResult, preflight_check

__all__ = [
    "END_STATES",
    "REPORT_KEYS",
    "REPORT_SCHEMA",
    "REPORT_VERSION",
    "PreflightResult",
    "best_valid_trials",
    "build_report",
    "end_state",
    "is_killed",
    "is_memory_feasible",
    "killed_trials",
    "memory_constraint",
    "memory_constraint_value",
    "preflight_check",
    "render_html",
    "render_json",
    "render_text",
    "retry_origin",
    "set_memory_constraint",
    "trials_frame",
    "valid_trials",
]
