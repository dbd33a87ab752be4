"""A pytest plugin that runs Optuna's own test suites with every storage they make wrapped in
ResilientStorage (``optuna.testing.storages.StorageSupplier`` hands out the wrapper).

Optuna's tests are not shipped in the wheel; with a checkout of optuna's ``tests/``::

    cd optuna-checkout && python -m pytest -p no:cacheprovider \\
        -p resilient_storage_plugin tests/study_tests tests/trial_tests

with this directory on ``PYTHONPATH`` (Optuna's suites need ``fakeredis`` and ``lupa``). Run once without
``-p resilient_storage_plugin`` for the baseline counts.
"""

from __future__ import annotations

from typing import Any

import optuna.testing.storages as _storages

from optuna_guard.resilience import ResilientStorage, StorageRetrySettings

_original_enter = _storages.StorageSupplier.__enter__


def _enter_resilient(self: Any) -> Any:
    return ResilientStorage(
        _original_enter(self), StorageRetrySettings(deadline_s=5.0, initial_backoff_s=0.05)
    )


_storages.StorageSupplier.__enter__ = _enter_resilient  # type: ignore[method-assign]
