"""Launch leases: which launches are alive, and which RUNNING trials lost theirs.

Every launch keeps one lease as a study system attr ``optuna_guard:lease:<launch_id>`` =
``{"launch_id", "host", "pid", "pid_start", "renewed", "expires", "trials"}`` (unix times),
renewed every heartbeat interval through the ordinary storage API, so it works on every storage
(RDB, journal, gRPC proxy). A RUNNING trial tagged with another launch's id is lost when

- that launch ran on this host and none of its processes is left (supervisor pid + start time
  gone, no process carrying its ``OPTUNA_GUARD_LAUNCH_ID`` marker): at once, no waiting; or
- its lease has expired (``expires`` = last renewal + heartbeat grace) on any host.

Trials without a ``launch_id`` (plain Optuna workers, older versions) are left to Optuna's own
heartbeat. The decision is a pure function of the trials, the leases and a liveness check.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from optuna_guard import tags

LEASE_PREFIX = "optuna_guard:lease:"


@dataclasses.dataclass(frozen=True)
class Lease:
    launch_id: str
    host: str
    pid: int
    pid_start: int | None
    renewed: float
    expires: float
    trials: tuple[int, ...] = ()
    ended: bool = False

    def to_attr(self) -> dict[str, Any]:
        return {
            "launch_id": self.launch_id,
            "host": self.host,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "renewed": round(self.renewed, 3),
            "expires": round(self.expires, 3),
            "trials": list(self.trials),
            "ended": self.ended,
        }

    @classmethod
    def from_attr(cls, value: Any) -> Lease | None:
        if not isinstance(value, dict):
            return None
        try:
            return cls(
                launch_id=str(value["launch_id"]),
                host=str(value["host"]),
                pid=int(value["pid"]),
                pid_start=None if value.get("pid_start") is None else int(value["pid_start"]),
                renewed=float(value["renewed"]),
                expires=float(value["expires"]),
                trials=tuple(int(t) for t in value.get("trials") or ()),
                ended=bool(value.get("ended")),
            )
        except (KeyError, TypeError, ValueError):
            return None


def lease_key(launch_id: str) -> str:
    return LEASE_PREFIX + launch_id


def leases_from_system_attrs(system_attrs: Mapping[str, Any]) -> dict[str, Lease]:
    leases = {}
    for key, value in system_attrs.items():
        if key.startswith(LEASE_PREFIX):
            lease = Lease.from_attr(value)
            if lease is not None:
                leases[lease.launch_id] = lease
    return leases


def make_lease(
    launch_id: str,
    host: str,
    pid: int,
    pid_start: int | None,
    grace_s: float,
    trials: Iterable[int],
    *,
    now: float | None = None,
    ended: bool = False,
) -> Lease:
    now = time.time() if now is None else now
    return Lease(
        launch_id=launch_id,
        host=host,
        pid=pid,
        pid_start=pid_start,
        renewed=now,
        expires=now + grace_s,
        trials=tuple(sorted(trials)),
        ended=ended,
    )


def lost_trials(
    running: Iterable[Any],
    leases: Mapping[str, Lease],
    *,
    own_launch_id: str,
    own_host: str,
    now: float,
    launch_alive_here: Callable[[str, Lease | None], bool],
) -> list[tuple[Any, str]]:
    """RUNNING trials (FrozenTrial-like: ``user_attrs``) of other launches that are gone,
    each with the reason written on it. ``launch_alive_here(launch_id, lease)`` answers for
    launches on this host (a process check); it is asked once per launch."""
    lost: list[tuple[Any, str]] = []
    alive_cache: dict[str, bool] = {}
    for trial in running:
        launch_id = trial.user_attrs.get(tags.LAUNCH_ID)
        if not launch_id or launch_id == own_launch_id:
            continue
        host = trial.user_attrs.get(tags.HOSTNAME)
        lease = leases.get(launch_id)
        if host == own_host:
            if launch_id not in alive_cache:
                alive_cache[launch_id] = launch_alive_here(launch_id, lease)
            if not alive_cache[launch_id]:
                lost.append(
                    (trial, f"worker lost: launch {launch_id} on host {host} has no process left")
                )
            continue
        if lease is not None and (lease.ended or now > lease.expires):
            age = now - lease.renewed
            why = "ended" if lease.ended else f"last renewed {age:.0f}s ago"
            lost.append(
                (
                    trial,
                    f"worker lost: the lease of launch {launch_id} on host {host} expired ({why})",
                )
            )
    return lost
