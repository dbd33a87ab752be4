"""Pure rules of issue 10: the start gate, the stall clock, the low-memory victim rule, the
exit budget and the bounded waits."""

from __future__ import annotations

import threading
import time

import pytest

from optuna_guard._units import GB
from optuna_guard.supervisor import _memory_policy, _policies, _shutdown


def _c(worker_id, rss_gb, in_trial=True):
    return _policies.VictimCandidate(
        worker_id=worker_id, tree_rss_bytes=int(rss_gb * GB), in_trial=in_trial, pid=worker_id
    )


@pytest.mark.parametrize(
    "candidates,deficit_gb,expected",
    [
        ([_c(1, 0.07), _c(2, 0.05)], 1.0, None),  # D7: tiny workers cannot cover a 1 GB deficit
        ([_c(1, 0.6), _c(2, 0.05)], 1.0, 1),  # one holds more than half: it goes
        ([_c(1, 3.0, in_trial=False), _c(2, 0.6)], 1.0, 2),  # idle workers are never victims
        ([_c(1, 3.0, in_trial=False)], 0.1, None),
        ([_c(1, 0.2), _c(2, 0.3)], None, 2),  # without a deficit: the largest in a trial
    ],
)
def test_low_memory_victim_must_cover_the_deficit(candidates, deficit_gb, expected):
    deficit = None if deficit_gb is None else int(deficit_gb * GB)
    victim = _policies.choose_victim(candidates, deficit_bytes=deficit)
    assert (victim.worker_id if victim else None) == expected


def test_start_gate_uses_the_measured_footprint_and_booting_workers():
    gate = _memory_policy.StartGate()
    min_available = int(0.2 * GB)
    assert gate.footprint == _memory_policy.DEFAULT_WORKER_FOOTPRINT_BYTES
    assert not gate.may_start(int(0.45 * GB), min_available, [])  # 0.2 + 0.3 default > 0.45
    gate.record_boot(int(0.1 * GB))
    assert gate.may_start(int(0.45 * GB), min_available, [])  # 0.2 + 0.1 measured
    # a worker still booting at 0.02 GB will take 0.08 GB more: with two of them no room is left
    assert not gate.may_start(int(0.45 * GB), min_available, [int(0.02 * GB), int(0.02 * GB)])
    gate.record_boot(int(0.05 * GB))  # the footprint is the largest seen, not the last
    assert gate.footprint == int(0.1 * GB)
    assert gate.may_start(None, min_available, [])


def test_stall_clock_counts_only_continuous_stalls():
    clock = _memory_policy.StallClock()
    assert clock.update(10.0, True) == 0.0
    assert clock.update(14.0, True) == 4.0
    assert clock.update(15.0, False) == 0.0
    assert clock.update(16.0, True) == 0.0


def test_biggest_outside_skips_the_launch_and_small_processes():
    big = _memory_policy.biggest_outside(set(), limit=50)
    assert all(rss >= 16 * 2**20 for _pid, _name, rss in big)
    assert "no single large process" in _memory_policy.describe_outside([])


def test_exit_budget_is_grace_plus_bounded_storage_allowance():
    assert (
        _shutdown.exit_budget(120.0, 300.0)
        == 120.0 + _shutdown.REAP_SLACK_S + 60.0 + _shutdown.EXIT_SLACK_S
    )
    assert _shutdown.storage_allowance(20.0) == 20.0
    assert _shutdown.storage_allowance(None) == 10.0


def test_wait_until_returns_at_the_deadline_or_at_an_interruption():
    release = threading.Event()
    future = _shutdown.run_in_daemon(release.wait, 30)
    started = time.monotonic()
    assert not _shutdown.wait_until([future], time.monotonic() + 0.3, lambda: False)
    assert 0.25 <= time.monotonic() - started < 2.0
    started = time.monotonic()
    assert not _shutdown.wait_until([future], time.monotonic() + 30, lambda: True)
    assert time.monotonic() - started < 0.5
    release.set()
    assert _shutdown.wait_until([future], time.monotonic() + 5, lambda: False)
    done, value = _shutdown.bounded_call(lambda: 42, time.monotonic() + 5, lambda: False)
    assert done and value == 42
    with pytest.raises(ZeroDivisionError):
        _shutdown.bounded_call(lambda: 1 / 0, time.monotonic() + 5, lambda: False)
