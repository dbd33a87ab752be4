"""Write several user attributes of a running trial in one storage operation where possible.

Why: the guard writes its memory tags on every trial, and Optuna's storage API sets one
attribute per call - one lock + trial copy (in memory) or one transaction (RDB) each. For
Optuna's own storages we do the same work once for all keys, through the same internals the
one-key methods use; any other storage (wrappers such as ``ResilientStorage``, journal
storages, user classes) gets the public one-key calls, so behaviour is never different, only
slower.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, cast

from optuna.storages import BaseStorage, InMemoryStorage, RDBStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.trial import FrozenTrial, TrialState


def set_user_attrs(storage: BaseStorage, trial_id: int, attrs: Mapping[str, Any]) -> None:
    """``storage.set_trial_user_attr`` for every item, batched for Optuna's own storages.
    Raises what the one-key call raises (e.g. ``UpdateFinishedTrialError``)."""
    if not attrs:
        return
    if len(attrs) > 1:
        batched = getattr(type(storage), "set_trial_user_attrs", None)  # ResilientStorage
        if batched is not None:
            batched(storage, trial_id, attrs)
            return
        backend = storage._backend if type(storage) is _CachedStorage else storage
        if type(backend) is InMemoryStorage:
            return _in_memory(backend, trial_id, attrs)
        if type(backend) is RDBStorage:
            return _rdb(backend, trial_id, attrs)
    for key, value in attrs.items():
        storage.set_trial_user_attr(trial_id, key, value)


def _in_memory(storage: InMemoryStorage, trial_id: int, attrs: Mapping[str, Any]) -> None:
    with storage._lock:
        trial = storage._get_trial(trial_id)
        storage.check_trial_is_updatable(trial_id, trial.state)
        trial = _shallow_copy(trial)
        trial.user_attrs = {**trial.user_attrs, **attrs}
        storage._set_trial(trial_id, trial)


def _shallow_copy(trial: FrozenTrial) -> FrozenTrial:
    """``copy.copy`` for a plain FrozenTrial, without the copy module's generic machinery: it
    is the same ``__dict__`` copy, but right after a trial's work (cold caches) ``copy.copy``
    costs ~50 us here, most of the guard's per-trial cost."""
    if type(trial) is not FrozenTrial:
        return copy.copy(trial)
    clone = object.__new__(FrozenTrial)
    clone.__dict__.update(trial.__dict__)
    return clone


def _rdb(storage: RDBStorage, trial_id: int, attrs: Mapping[str, Any]) -> None:
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(storage.scoped_session, True) as session:
        write_in_session(storage, session, trial_id, attrs)


def hold_for_tell(storage: BaseStorage, trial_id: int, attrs: Mapping[str, Any]) -> bool:
    """Hand a running trial's last tags to a storage that writes them in the transaction that
    ends the trial (the launcher's workers: one transaction less per trial). False when the
    storage cannot: the caller writes them now."""
    hold = getattr(storage, "hold_user_attrs_for_tell", None)
    return bool(hold is not None and hold(trial_id, attrs))


def write_in_session(
    storage: RDBStorage, session: Any, trial_id: int, attrs: Mapping[str, Any]
) -> None:
    """Upsert user attrs of a running trial inside ``session`` (no commit): the trial row is
    locked first, as Optuna's writes do, and checked to be unfinished; then one SELECT of the
    keys already there, one INSERT of the new ones and an UPDATE per existing key. Optuna's
    per-key path costs a trial lookup, a SELECT and an upsert per key."""
    import json

    from optuna.storages._rdb import models
    from sqlalchemy import insert, select, update

    trial = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
    storage.check_trial_is_updatable(trial_id, cast(TrialState, trial.state))
    table = models.TrialUserAttributeModel.__table__
    with session.no_autoflush:  # nothing of the ORM's is pending here; its flush check costs
        existing = set(
            session.execute(
                select(table.c.key).where(
                    table.c.trial_id == trial_id, table.c.key.in_(list(attrs))
                )
            ).scalars()
        )
        new = [
            {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
            for key, value in attrs.items()
            if key not in existing
        ]
        if new:
            session.execute(insert(table), new)
        for key in existing:
            session.execute(
                update(table)
                .where(table.c.trial_id == trial_id, table.c.key == key)
                .values(value_json=json.dumps(attrs[key]))
            )
