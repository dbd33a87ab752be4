"""Analysis of guarded studies: killed-trial filters, data frames, reports, OOM-aware search."""

from __future__ import annotations

from optuna_guard.analysis._filters import is_killed, killed_trials, valid_trials

__all__ = ["is_killed", "killed_trials", "valid_trials"]
