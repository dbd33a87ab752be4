"""Starting the supervisor's heartbeat thread (:mod:`._heartbeat`: lease, Optuna heartbeats,
lost-trial sweep) on a storage of its own, riding out a dropped connection at start-up."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from optuna_guard.supervisor._config import LaunchConfig


def start_heartbeat(
    config: LaunchConfig,
    storage_url: str,
    launch_id: str,
    *,
    retry_policy: Any,
    emit: Callable[..., None],
    on_retried: Callable[[], None],
) -> Any:
    """The running ``SupervisorHeartbeat``; None when heartbeats are off."""
    from optuna_guard.supervisor._heartbeat import SupervisorHeartbeat
    from optuna_guard.supervisor._study import open_checked_storage

    interval = config.heartbeat_interval
    if interval is None:
        return None
    storage = open_checked_storage(
        storage_url,
        connect_timeout=config.connect_timeout,
        heartbeat_interval=config.heartbeat_interval,
        heartbeat_grace=config.heartbeat_grace,
        skip_setup=True,
        deadline_s=config.storage_deadline,
    )

    def start() -> SupervisorHeartbeat:
        return SupervisorHeartbeat(
            storage,
            config.study_name,
            launch_id,
            interval,
            config.heartbeat_grace or 2 * interval,
            retry_policy=retry_policy,
            emit=emit,
            on_retried=on_retried,
        ).start()

    if config.storage_deadline is None:
        return start()
    from optuna_guard.resilience import StorageRetrySettings, call_with_retry

    # load_study and the first beat query the database: a dropped connection at start-up is
    # ridden out like every other storage call (issue 10)
    return call_with_retry(
        start,
        settings=StorageRetrySettings(deadline_s=config.storage_deadline),
        what="starting the supervisor heartbeat",
    )
