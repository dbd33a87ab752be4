"""The guard's watcher reads memory less often while a trial is far from every limit (earlyoom's
adaptive poll: the headroom over 6 GB/s, between ``interval`` and 10 intervals / 1 s) and at the
full pace near a limit; the trial's peak RSS still counts spikes between readings (the kernel's
high-water mark). Limits are fake (FakeProbe) or relative to what this process uses now."""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import optuna
import pytest
from fakes import FakeProbe, current_rss_gb
from optuna.trial import TrialState

from optuna_guard import guard, tags
from optuna_guard._trips import FILL_RATE_BYTES_PER_S, relaxed_interval
from optuna_guard._units import GB
from optuna_guard.limits import MemoryLimits


@pytest.fixture(autouse=True)
def _quiet(quiet_optuna):
    yield


def test_relaxed_interval_follows_the_headroom_between_interval_and_its_cap() -> None:
    limits = MemoryLimits(min_available_gb=1.0, interval=0.1)
    assert relaxed_interval(limits, 100 * GB) == 1.0  # capped at 10 intervals / 1 s
    assert relaxed_interval(limits, 0.3 * GB) == 0.1  # near a limit: the full pace
    assert relaxed_interval(limits, -1.0) == 0.1  # over it
    assert relaxed_interval(limits, 3 * FILL_RATE_BYTES_PER_S / 10) == pytest.approx(0.3)
    assert relaxed_interval(MemoryLimits(interval=0.01), 100 * GB) == pytest.approx(0.1)
    assert relaxed_interval(MemoryLimits(interval=2.0), 100 * GB) == 2.0  # never below interval


def _sleeping(seconds: float, probe: FakeProbe, **limits: float):
    @guard(probe=probe, interval=0.1, **limits)
    def objective(trial: optuna.Trial) -> float:
        time.sleep(seconds)
        return 0.0

    return objective


def test_a_quiet_trial_is_read_less_often_and_one_near_its_limit_at_full_pace() -> None:
    far = FakeProbe(total_gb=64.0, available_gb=60.0, rss_gb=0.5)
    study = optuna.create_study()
    study.optimize(_sleeping(2.0, far, min_available_gb=1.0), n_trials=1)
    near = FakeProbe(total_gb=64.0, available_gb=1.2, rss_gb=0.5)
    study.optimize(_sleeping(2.0, near, min_available_gb=1.0), n_trials=1)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    # 2 s at 0.1 s would be ~20 readings; far from the limit at most one a second (+ the
    # guard's own start reading); 0.2 GB from it, every interval
    assert far.calls <= 5, far.calls
    assert near.calls >= 12, near.calls


def test_a_trial_that_starts_growing_far_from_its_limit_is_still_stopped_near_it() -> None:
    """RSS grows 2 GB/s from 8 GB below the limit: the relaxed readings shorten as the
    headroom shrinks and the growth rate shows, so the trial is stopped close to it, not a
    relaxed second (2 GB) later."""
    probe = FakeProbe(total_gb=64.0, available_gb=60.0, rss_gb=1.0)
    grown: list[float] = []

    @guard(probe=probe, max_trial_rss_gb=9.0, interval=0.1)
    def objective(trial: optuna.Trial) -> float:
        time.sleep(1.5)  # quiet: relaxed readings
        start = time.monotonic()
        while True:
            rss = 1.0 + 2.0 * (time.monotonic() - start)
            probe.set(rss_gb=rss)
            grown.append(rss)
            if rss > 20.0:
                return -1.0  # never stopped
            time.sleep(0.005)

    study = optuna.create_study()
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == TrialState.PRUNED, trial.user_attrs
    assert trial.user_attrs[tags.KILL_LIMIT] == "max_trial_rss_gb"
    # at the full pace it overshoots by ~0.2 GB (0.1 s of growth); a relaxed second would be 2 GB
    assert grown[-1] < 9.0 + 1.0, grown[-1]


def test_a_spike_between_two_readings_is_in_the_peak_and_not_in_the_next_trials() -> None:
    gc.collect()
    baseline = current_rss_gb()
    done = threading.Event()

    @guard  # the default (real) probe, far from every limit: relaxed readings
    def objective(trial: optuna.Trial) -> float:
        if trial.number == 0:  # after the first reading (at 0.1 s), freed before the next
            time.sleep(0.3)  # the first reading is due at 0.1 s: some slack for a busy machine
            spike = np.ones(int(0.25 * GB) // 8)  # touched: resident
            del spike
        time.sleep(0.1)
        done.set()
        return 0.0

    study = optuna.create_study()
    study.optimize(objective, n_trials=2)
    assert done.is_set()
    first, second = (t.user_attrs[tags.PEAK_RSS_GB] for t in study.trials)
    assert first >= baseline + 0.2, (first, baseline)
    assert second < baseline + 0.15, (second, baseline)
