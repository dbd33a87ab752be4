"""A study with known guard tags (and a matching event log) for the analysis and report tests.

Every count the tests assert on is written down here, next to the trials that make it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from optuna_guard import tags

DISTRIBUTIONS = {
    "batch_size": IntDistribution(16, 512, log=True),
    "width": IntDistribution(64, 1024, log=True),
    "lr": FloatDistribution(1e-5, 1e-1, log=True),
    "optimizer": CategoricalDistribution(["sgd", "adam"]),
}
T0 = dt.datetime(2026, 5, 4, 9, 0, 0)


def _params(batch: int, width: int, lr: float = 1e-3, optimizer: str = "adam") -> dict[str, Any]:
    return {"batch_size": batch, "width": width, "lr": lr, "optimizer": optimizer}


# (state, value, params, user_attrs, system_attrs, intermediate_values, start offset s, duration s)
def _trial_specs() -> list[tuple]:
    killed_avail = {tags.EMERGENCY_KILLED: True, tags.KILL_LIMIT: "min_available_gb"}
    return [
        # 0-5: six COMPLETE trials on workers 0 and 1; trial 4 is the best (0.20)
        (
            TrialState.COMPLETE,
            0.50,
            _params(16, 64),
            {tags.PEAK_RSS_GB: 1.1, tags.WORKER_ID: 0, tags.HOSTNAME: "node1"},
            {},
            {0: 0.9, 1: 0.5},
            0,
            50,
        ),
        (
            TrialState.COMPLETE,
            0.40,
            _params(32, 128),
            {tags.PEAK_RSS_GB: 1.6, tags.WORKER_ID: 1, tags.HOSTNAME: "node1"},
            {},
            {0: 0.8, 1: 0.4},
            0,
            55,
        ),
        (
            TrialState.COMPLETE,
            0.30,
            _params(64, 128),
            {tags.PEAK_RSS_GB: 2.4, tags.WORKER_ID: 0, tags.HOSTNAME: "node1"},
            {},
            {},
            60,
            50,
        ),
        (
            TrialState.COMPLETE,
            0.35,
            _params(32, 256),
            {tags.PEAK_RSS_GB: 2.2, tags.WORKER_ID: 1, tags.HOSTNAME: "node1"},
            {},
            {},
            60,
            50,
        ),
        (
            TrialState.COMPLETE,
            0.20,
            _params(128, 256),
            {tags.PEAK_RSS_GB: 4.8, tags.WORKER_ID: 0, tags.HOSTNAME: "node1"},
            {},
            {0: 0.6, 1: 0.2},
            120,
            60,
        ),
        (
            TrialState.COMPLETE,
            0.45,
            _params(16, 512, optimizer="sgd"),
            {tags.PEAK_RSS_GB: 2.9, tags.WORKER_ID: 1, tags.HOSTNAME: "node1"},
            {},
            {},
            120,
            40,
        ),
        # 6-8: three memory kills (PRUNED); trial 6 reported 0.15 < best 0.20 before it was killed
        (
            TrialState.PRUNED,
            0.15,
            _params(512, 1024),
            {
                **killed_avail,
                tags.KILL_REASON: "OOM prevention [Trial #6 split 2/5]: available 1.4 GB < 2.0 GB",
                tags.AVAILABLE_GB_AT_KILL: 1.4,
                tags.PEAK_RSS_GB: 9.5,
                tags.WORKER_ID: 0,
            },
            {},
            {0: 0.5, 1: 0.15},
            200,
            30,
        ),
        (
            TrialState.PRUNED,
            None,
            _params(256, 1024),
            {
                **killed_avail,
                tags.KILL_REASON: "OOM prevention [Trial #7 split 1/5]: available 1.1 GB < 2.0 GB",
                tags.AVAILABLE_GB_AT_KILL: 1.1,
                tags.PEAK_RSS_GB: 8.7,
                tags.WORKER_ID: 1,
            },
            {},
            {},
            200,
            20,
        ),
        (
            TrialState.PRUNED,
            None,
            _params(512, 512),
            {
                tags.EMERGENCY_KILLED: True,
                tags.KILL_LIMIT: "max_trial_rss_gb",
                tags.KILL_REASON: "trial RSS 7.3 GB > 7.0 GB",
                tags.AVAILABLE_GB_AT_KILL: 3.0,
                tags.PEAK_RSS_GB: 7.3,
                tags.WORKER_ID: 0,
            },
            {},
            {},
            240,
            25,
        ),
        # 9: pruned by the pre-flight check (counts as emergency_killed, limit "preflight")
        (
            TrialState.PRUNED,
            None,
            _params(512, 1024, optimizer="sgd"),
            {
                tags.EMERGENCY_KILLED: True,
                tags.KILL_LIMIT: "preflight",
                tags.KILL_REASON: "predicted OOM: ~9.9 GB needed, 6.0 GB available",
                tags.AVAILABLE_GB_AT_KILL: 6.0,
                tags.PREDICTED_PEAK_GB: 10.4,
                tags.WORKER_ID: 1,
            },
            {},
            {},
            270,
            1,
        ),
        # 10: worker crashed under it (FAIL)
        (
            TrialState.FAIL,
            None,
            _params(64, 256),
            {
                tags.WORKER_CRASHED: True,
                tags.KILL_REASON: "worker 1 died with signal 11",
                tags.WORKER_ID: 1,
            },
            {},
            {0: 0.7},
            280,
            15,
        ),
        # 11: preempted (FAIL)
        (
            TrialState.FAIL,
            None,
            _params(32, 64),
            {
                tags.PREEMPTED: True,
                tags.KILL_REASON: "SIGTERM",
                tags.WORKER_ID: 0,
                tags.PEAK_RSS_GB: 1.0,
            },
            {},
            {},
            290,
            10,
        ),
        # 12: diverged (PRUNED)
        (
            TrialState.PRUNED,
            None,
            _params(16, 128, lr=0.09),
            {
                tags.DIVERGED: True,
                tags.KILL_REASON: "NaN at step 3",
                tags.WORKER_ID: 0,
                tags.PEAK_RSS_GB: 1.3,
            },
            {},
            {0: 0.9},
            310,
            12,
        ),
        # 13: an ordinary pruned trial
        (
            TrialState.PRUNED,
            0.8,
            _params(16, 64, lr=1e-5),
            {tags.WORKER_ID: 1, tags.PEAK_RSS_GB: 1.0},
            {},
            {0: 0.8},
            300,
            10,
        ),
        # 14: retry of the crashed trial 10 (COMPLETE), recorded both ways
        (
            TrialState.COMPLETE,
            0.33,
            _params(64, 256),
            {tags.RETRY_OF: 10, tags.WORKER_ID: 1, tags.PEAK_RSS_GB: 3.1},
            {"failed_trial": 10, "retry_history": [10]},
            {},
            320,
            40,
        ),
        # 15: retry of kill 7 with shrunk params, recorded only in Optuna's system attrs
        (
            TrialState.COMPLETE,
            0.25,
            _params(128, 1024),
            {tags.RETRY_SHRUNK: True, tags.WORKER_ID: 0, tags.PEAK_RSS_GB: 6.1},
            {"failed_trial": 7, "retry_history": [7]},
            {},
            330,
            45,
        ),
        # 16: a plain FAIL (an exception in the objective)
        (TrialState.FAIL, None, _params(16, 256), {tags.WORKER_ID: 1}, {}, {}, 380, 2),
    ]


# What the tests expect of the study above.
EXPECTED = {
    "n_trials": 17,
    "states": {"COMPLETE": 8, "PRUNED": 6, "FAIL": 3, "RUNNING": 0, "WAITING": 0},
    "end_states": {
        "complete": 8,
        "pruned": 1,
        "failed": 1,
        "killed": 4,
        "crashed": 1,
        "preempted": 1,
        "diverged": 1,
        "running": 0,
        "waiting": 0,
    },
    "killed": [6, 7, 8, 9],
    "killed_by_limit": {"min_available_gb": 2, "max_trial_rss_gb": 1, "preflight": 1},
    "crashed": [10],
    "preempted": [11],
    "diverged": [12],
    "best_number": 4,
    "best_value": 0.20,
    "better_intermediate": [6],
    "top_memory": [6, 7, 8, 15, 4],
    "retry_of": {14: 10, 15: 7},
    "peak_rss_count": 14,
    "valid_complete": 8,
}


def build_known_study(storage: Any, name: str) -> optuna.Study:
    """Create study ``name`` in ``storage`` and add the trials above (numbers 0..16)."""
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
    for (
        state,
        value,
        params,
        user_attrs,
        system_attrs,
        intermediate,
        start,
        duration,
    ) in _trial_specs():
        begin = T0 + dt.timedelta(seconds=start)
        study.add_trial(
            FrozenTrial(
                number=0,
                trial_id=0,
                state=state,
                value=value
                if state == TrialState.COMPLETE
                or (state == TrialState.PRUNED and value is not None)
                else None,
                values=None,
                datetime_start=begin,
                datetime_complete=begin + dt.timedelta(seconds=duration),
                params=params,
                distributions=DISTRIBUTIONS,
                user_attrs=user_attrs,
                system_attrs=system_attrs,
                intermediate_values=intermediate,
            )
        )
    return study


def write_event_log(path: str | os.PathLike[str]) -> str:
    """An event log of two workers that ran the trials above, with kills, a recycle and a crash."""
    base = T0.timestamp()
    lines: list[dict[str, Any]] = []

    def emit(offset: float, event: str, **fields: Any) -> None:
        ts = base + offset
        lines.append(
            {
                "ts": ts,
                "time": dt.datetime.fromtimestamp(ts).astimezone().isoformat(),
                "event": event,
                **fields,
            }
        )

    emit(-5, "launch_started", worker_id=None, pid=100)
    emit(-2, "worker_started", worker_id=0, pid=1000)
    emit(-2, "worker_started", worker_id=1, pid=1001)
    runs = [  # worker, pid, trial, start, end, how
        (0, 1000, 0, 0, 50, "trial_finished"),
        (1, 1001, 1, 0, 55, "trial_finished"),
        (0, 1000, 2, 60, 110, "trial_finished"),
        (1, 1001, 3, 60, 110, "trial_finished"),
        (0, 1000, 4, 120, 180, "trial_finished"),
        (1, 1001, 5, 120, 160, "trial_finished"),
        (0, 1000, 6, 200, 230, "trial_killed"),
        (1, 1001, 7, 200, 220, "trial_killed"),
        (0, 1002, 8, 240, 265, "trial_killed"),
        (1, 1003, 9, 270, 271, "trial_finished"),
        (1, 1003, 10, 280, 295, None),
        (0, 1004, 11, 290, 300, "trial_finished"),
        (1, 1005, 13, 300, 310, "trial_finished"),
        (0, 1004, 12, 310, 322, "trial_finished"),
        (1, 1005, 14, 320, 360, "trial_finished"),
        (0, 1006, 15, 330, 375, "trial_finished"),
        (1, 1005, 16, 380, 382, "trial_finished"),
    ]
    for worker, pid, trial, start, end, how in runs:
        emit(start, "trial_started", worker_id=worker, pid=pid, trial_number=trial)
        if how == "trial_killed":
            # as the launcher does: worker_killed when it decides, trial_killed when it reaped
            # the worker and ended the trial (seconds later)
            emit(
                end,
                "worker_killed",
                worker_id=worker,
                pid=pid,
                trial_number=trial,
                reason="tree RSS over the limit",
                rss_gb=9.0,
                available_gb=1.2,
                limit="max_worker_rss_gb",
            )
            emit(
                end + 7,
                "trial_killed",
                worker_id=worker,
                pid=pid,
                trial_number=trial,
                reason="tree RSS over the limit",
                state="PRUNED",
            )
            emit(end + 8, "worker_started", worker_id=worker, pid=pid + 2)
        elif how is None:
            emit(
                end,
                "worker_crashed",
                worker_id=worker,
                pid=pid,
                trial_number=trial,
                reason="signal 11",
            )
            emit(end + 1, "worker_started", worker_id=worker, pid=pid + 2)
        else:
            emit(end, how, worker_id=worker, pid=pid, trial_number=trial)
    emit(326, "worker_recycled", worker_id=0, pid=1004, reason="RSS 3.1 GB over the recycle limit")
    emit(327, "worker_started", worker_id=0, pid=1006)
    for second in range(
        0, 390, 10
    ):  # the launcher's format: one reading of the system and all workers
        available = 20.0 - (16.5 if 200 <= second < 270 else 0.0) - second / 100.0
        emit(
            second + 0.5,
            "memory_sample",
            available_gb=round(available, 2),
            total_gb=24.0,
            used_percent=50.0,
            workers=[
                {
                    "worker_id": 0,
                    "pid": 1000,
                    "rss_gb": round(1.0 + (second % 60) / 20.0, 2),
                    "trial_number": None,
                },
                {
                    "worker_id": 1,
                    "pid": 1001,
                    "rss_gb": round(0.8 + (second % 50) / 25.0, 2),
                    "trial_number": None,
                },
            ],
        )
    emit(395, "launch_finished", worker_id=None, pid=100)
    lines.sort(key=lambda r: r["ts"])
    with open(path, "w", encoding="utf-8") as handle:
        for record in lines:
            handle.write(json.dumps(record) + "\n")
    return os.fspath(path)


# Per-worker figures the event log above gives.
EXPECTED_WORKERS = {
    0: {"trials_started": 8, "kills": 2, "recycles": 1, "crashes": 0, "peak_rss_gb": 9.0},
    1: {"trials_started": 9, "kills": 1, "recycles": 0, "crashes": 1, "peak_rss_gb": 9.0},
}


class FakeProbe:
    """A memory probe that reports fixed numbers (GB), so tests never need real memory pressure."""

    def __init__(self, available_gb: float, held_gb: float = 0.5, total_gb: float = 32.0) -> None:
        self.available_gb = available_gb
        self.held_gb = held_gb
        self.total_gb = total_gb

    def system(self):
        from optuna_guard._units import GB
        from optuna_guard.memory import SystemMemory

        return SystemMemory(
            total_bytes=int(self.total_gb * GB),
            available_bytes=int(self.available_gb * GB),
            used_bytes=int((self.total_gb - self.available_gb) * GB),
            percent=100.0 * (1 - self.available_gb / self.total_gb),
        )

    def process_tree_rss(self, pid: int) -> int:
        from optuna_guard._units import GB

        return int(self.held_gb * GB)

    def gpus(self) -> list:
        return []
