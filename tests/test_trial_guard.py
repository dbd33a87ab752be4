"""check_memory and @guard on real Optuna studies: states and tags in the storage, log lines,
the sampler stopping runaway allocations mid-split (main thread and n_jobs=2), preemption,
memory constraints, pre-flight, garbage collection. All limits are relative to current use."""

from __future__ import annotations

import gc
import inspect
import logging
import math
import sys
import threading
import time
import types

import numpy as np
import optuna
import pytest
from fakes import FakeProbe, current_rss_gb
from optuna.trial import TrialState

from optuna_guard import check_memory, guard, preemption, tags, trial_guard
from optuna_guard._units import GB
from optuna_guard.limits import MemoryLimits
from optuna_guard.memory import GpuMemory, system_memory
from optuna_guard.trial_guard import MemoryLimitPruned

CHUNK_BYTES = 40 * 1024**2


@pytest.fixture(autouse=True)
def _quiet(quiet_optuna):
    yield


def _study(storage=None, **kwargs):
    return optuna.create_study(storage=storage, **kwargs)


def _attrs(study, number):
    return study.trials[number].user_attrs


# -- check_memory -------------------------------------------------------------------------------


def test_check_memory_below_safe_threshold_prunes_tags_and_logs(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="optuna_guard")
    probe = FakeProbe(available_gb=1.8)
    study = _study()

    def objective(trial):
        for split in range(1, 6):
            if trial.number == 42:
                check_memory(trial, f"split {split}/5", probe=probe) if split == 3 else None
        return 1.0

    study.optimize(objective, n_trials=43)
    trial = study.trials[42]
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs[tags.EMERGENCY_KILLED] is True
    assert trial.user_attrs[tags.KILL_REASON].startswith("OOM prevention [split 3/5]")
    assert trial.user_attrs[tags.AVAILABLE_GB_AT_KILL] == 1.8
    assert trial.user_attrs[tags.KILL_LIMIT] == "safe_threshold_gb"
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "EMERGENCY BRAKE" in error and "Trial #42" in error and "split 3/5" in error
    assert "available 1.80 GB < 2.00 GB" in error
    assert all(t.state == TrialState.COMPLETE for t in study.trials[:42])


def test_check_memory_with_the_real_probe_impossible_and_tiny_thresholds() -> None:
    study = _study()

    def objective(trial):
        check_memory(trial, "start", safe_threshold_gb=0.001, warning_threshold_gb=0.002)
        if trial.number == 1:
            check_memory(
                trial, "split 1/3", safe_threshold_gb=100_000.0, warning_threshold_gb=100_000.0
            )
        return 0.0

    study.optimize(objective, n_trials=2)
    assert study.trials[0].state == TrialState.COMPLETE
    assert tags.EMERGENCY_KILLED not in study.trials[0].user_attrs
    assert study.trials[1].state == TrialState.PRUNED
    attrs = study.trials[1].user_attrs
    assert attrs[tags.EMERGENCY_KILLED] is True
    assert 0 < attrs[tags.AVAILABLE_GB_AT_KILL] <= system_memory().total_gb + 0.01


def test_warnings_once_per_trial_and_context(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="optuna_guard")
    probe = FakeProbe(available_gb=3.0)
    study = _study()

    def objective(trial):
        for _ in range(5):
            check_memory(trial, "split 1/2", probe=probe)
        for _ in range(5):
            check_memory(trial, "split 2/2", probe=probe)
        return 0.0

    study.optimize(objective, n_trials=2)
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name.startswith("optuna_guard")
    ]
    assert len(warnings) == 4  # 2 trials x 2 contexts
    assert "Trial #0 at split 1/2" in warnings[0] and "available 3.00 GB < 4.00 GB" in warnings[0]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)


def test_check_memory_runs_gc_before_raising(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(trial_guard.gc, "collect", lambda *a: calls.append(a) or 0)
    study = _study()
    trial = study.ask()
    with pytest.raises(MemoryLimitPruned):
        check_memory(trial, "x", probe=FakeProbe(available_gb=0.5))
    assert () in calls  # a full collection
    assert isinstance(MemoryLimitPruned("m", None), optuna.TrialPruned)  # type: ignore[arg-type]


def test_check_memory_with_limits_names_the_field() -> None:
    study = _study()
    trial = study.ask()
    limits = MemoryLimits(min_available_gb=1.0, max_trial_rss_gb=0.25)
    with pytest.raises(optuna.TrialPruned):
        check_memory(trial, "split 2/4", limits=limits, probe=FakeProbe(rss_gb=0.5))
    frozen = study._storage.get_trial(trial._trial_id)
    assert frozen.user_attrs[tags.KILL_LIMIT] == "max_trial_rss_gb"
    assert "process tree RSS 0.50 GB > 0.25 GB" in frozen.user_attrs[tags.KILL_REASON]


# -- the decorator ------------------------------------------------------------------------------


def test_guard_bare_and_with_arguments_keeps_name_and_signature() -> None:
    def objective(trial, scale: float = 2.0) -> float:
        """Doc."""
        return trial.suggest_float("x", 0, 1) * scale

    bare = guard(objective)
    configured = guard(min_available_gb=1.0, interval=0.05)(objective)
    for wrapped in (bare, configured):
        assert wrapped.__name__ == "objective" and wrapped.__doc__ == "Doc."
        assert inspect.signature(wrapped) == inspect.signature(objective)
        assert wrapped.__wrapped__ is objective
        assert isinstance(wrapped.__optuna_guard__, MemoryLimits)
    assert configured.__optuna_guard__.min_available_gb == 1.0
    assert configured.__optuna_guard__.interval == 0.05

    @guard
    def decorated_bare(trial):
        return 1.0

    study = _study()
    study.optimize(lambda t: configured(t, scale=3.0), n_trials=2)
    study.optimize(decorated_bare, n_trials=1)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert study.trials[0].value == pytest.approx(study.trials[0].params["x"] * 3.0)


def test_guard_on_a_class_based_objective() -> None:
    class Objective:
        def __init__(self, scale):
            self.scale = scale

        @guard(probe=FakeProbe(rss_gb=0.75))
        def __call__(self, trial):
            return trial.suggest_float("x", 0, 1) * self.scale

    study = _study()
    study.optimize(Objective(2.0), n_trials=2)
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert all(t.user_attrs[tags.PEAK_RSS_GB] == 0.75 for t in study.trials)


def test_start_check_prunes_before_the_objective_runs() -> None:
    ran = []
    probe = FakeProbe(available_gb=1.0)

    @guard(min_available_gb=2.0, warn_available_gb=3.0, probe=probe)
    def objective(trial):
        ran.append(trial.number)
        return 0.0

    study = _study()
    study.optimize(objective, n_trials=2)
    assert ran == []
    for trial in study.trials:
        assert trial.state == TrialState.PRUNED
        assert (
            trial.user_attrs[tags.KILL_REASON]
            == f"OOM prevention [Trial #{trial.number} start]: available 1.00 GB < 2.00 GB"
        )
        assert trial.user_attrs[tags.KILL_LIMIT] == "min_available_gb"


def test_memory_tags_on_every_trial_whatever_its_end() -> None:
    probe = FakeProbe(
        available_gb=10.0, rss_gb=1.25, gpus=[GpuMemory(0, "Fake GPU", 16 * GB, 6 * GB)]
    )

    @guard(probe=probe)
    def objective(trial):
        if trial.number == 1:
            raise optuna.TrialPruned()
        if trial.number == 2:
            raise ValueError("boom")
        return 0.0

    study = _study()
    study.optimize(objective, n_trials=3, catch=(ValueError,))
    assert [t.state for t in study.trials] == [
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.FAIL,
    ]
    for trial in study.trials:
        assert trial.user_attrs[tags.PEAK_RSS_GB] == 1.25
        assert trial.user_attrs[tags.LOWEST_AVAILABLE_GB] == 10.0
        assert trial.user_attrs[tags.MIN_AVAILABLE_GB] == 10.0  # deprecated alias, still written
        assert trial.user_attrs[tags.PEAK_GPU_GB] == 6.0
        assert tags.EMERGENCY_KILLED not in trial.user_attrs


def test_no_gpu_tag_without_a_gpu_and_real_peak_rss_is_plausible() -> None:
    @guard
    def objective(trial):
        return 0.0

    study = _study()
    study.optimize(objective, n_trials=1)
    attrs = study.trials[0].user_attrs
    assert tags.PEAK_GPU_GB not in attrs
    assert 0.01 < attrs[tags.PEAK_RSS_GB] < current_rss_gb() + 0.5
    assert 0 < attrs[tags.MIN_AVAILABLE_GB] <= system_memory().total_gb


# -- stopping runaway allocations mid-split -----------------------------------------------------


def _allocating_objective(limit_gb: float, cap_gb: float, log: dict):
    """Trial 0 (or every trial in ``log['allocate']``) allocates 40 MB chunks until stopped or
    until ``cap_gb`` (then it returns a value: the guard failed to stop it). Others sleep."""

    @guard(max_trial_rss_gb=limit_gb, min_available_gb=0.5, warn_available_gb=1.0, interval=0.05)
    def objective(trial):
        if trial.number in log["allocate"]:
            chunks = []
            while len(chunks) * CHUNK_BYTES < cap_gb * GB:
                chunks.append(np.ones(CHUNK_BYTES // 8))
                log["chunks"][trial.number] = len(chunks)
                time.sleep(0.02)  # ~2 GB/s
            return -1.0  # not stopped
        time.sleep(0.3)
        return float(trial.number)

    return objective


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_runaway_allocation_is_stopped_mid_split_and_the_next_trial_completes(
    n_jobs, sqlite_url
) -> None:
    gc.collect()
    limit = round(current_rss_gb() + 0.3, 3)
    log = {"allocate": {0}, "chunks": {}}
    storage = sqlite_url if n_jobs == 2 else optuna.storages.InMemoryStorage()
    study = _study(storage, study_name="alloc")
    study.optimize(
        _allocating_objective(limit, cap_gb=0.75, log=log),
        n_trials=3 if n_jobs == 1 else 4,
        n_jobs=n_jobs,
    )

    trials = optuna.load_study(study_name="alloc", storage=storage).trials
    killed = trials[0]
    assert killed.state == TrialState.PRUNED, killed.user_attrs
    assert log["chunks"][0] * CHUNK_BYTES < 0.75 * GB  # stopped before the cap: mid-split
    attrs = killed.user_attrs
    assert attrs[tags.EMERGENCY_KILLED] is True
    assert attrs[tags.KILL_LIMIT] == "max_trial_rss_gb"
    assert attrs[tags.KILL_REASON].startswith(
        "OOM prevention [Trial #0 mid-trial]: process tree RSS"
    )
    assert 0 < attrs[tags.AVAILABLE_GB_AT_KILL] <= system_memory().total_gb + 0.01
    assert limit - 0.01 <= attrs[tags.PEAK_RSS_GB] <= limit + 0.3
    for trial in trials[1:]:
        assert trial.state == TrialState.COMPLETE, (trial.number, trial.user_attrs)
        assert tags.EMERGENCY_KILLED not in trial.user_attrs
    # the killed trial's arrays were freed: the next trial (sequential) and the process now
    # are well under the limit
    if n_jobs == 1:
        assert trials[1].user_attrs[tags.PEAK_RSS_GB] < limit - 0.1
    assert current_rss_gb() < limit - 0.1


@pytest.mark.parametrize("allocating", [0, 1])
def test_with_n_jobs_2_the_trial_that_grows_is_the_victim(allocating) -> None:
    """Both running trials see the same (fake) process RSS over the limit; the one whose thread
    is growing is stopped, the sleeping one completes once memory is back."""
    probe = FakeProbe(rss_gb=0.5)
    started = threading.Barrier(2, timeout=10)

    @guard(max_trial_rss_gb=1.0, interval=0.05, probe=probe)
    def objective(trial):
        started.wait()
        deadline = time.monotonic() + 3.0
        if trial.number != allocating:
            while time.monotonic() < deadline:
                time.sleep(0.01)
            return 0.0
        probe.set(rss_gb=5.0)
        chunks = []
        try:
            while time.monotonic() < deadline:
                if len(chunks) < 25:  # grows by 8 MB steps, 200 MB at most
                    chunks.append(np.ones(8 * 1024**2 // 8))
                time.sleep(0.005)
        finally:
            probe.set(rss_gb=0.5)  # the trial's memory goes when its frames unwind
        return 0.0

    study = _study()
    study.optimize(objective, n_trials=2, n_jobs=2)
    states = {t.number: t.state for t in study.trials}
    assert states[allocating] == TrialState.PRUNED
    assert states[1 - allocating] == TrialState.COMPLETE
    assert study.trials[allocating].user_attrs[tags.KILL_LIMIT] == "max_trial_rss_gb"


def test_a_trial_starting_while_others_run_over_a_shared_limit_is_not_blamed(caplog) -> None:
    """With other guarded trials running in the process, a limit already exceeded at start is
    theirs: the new trial starts, and the sampler picks the victim by growth."""
    from optuna_guard._watcher import WATCHER, TrialWatch

    caplog.set_level(logging.WARNING, logger="optuna_guard")
    other = TrialWatch(
        number=99,
        limits=MemoryLimits(min_available_gb=None, warn_available_gb=None),
        probe=FakeProbe(),
    )
    WATCHER.register(other)
    ran = []
    try:

        @guard(max_trial_rss_gb=1.0, interval=0.05, probe=FakeProbe(rss_gb=5.0))
        def objective(trial):
            ran.append(trial.number)
            for _ in range(200):
                time.sleep(0.01)
            return 0.0

        study = _study()
        study.optimize(objective, n_trials=1)
    finally:
        other.finish()
    trial = study.trials[0]
    assert ran == [0]
    assert trial.state == TrialState.PRUNED
    assert (
        "mid-trial" in trial.user_attrs[tags.KILL_REASON]
    )  # stopped by the sampler, not at start
    assert any("1 other guarded trial(s) running" in r.getMessage() for r in caplog.records)


def test_on_trip_fail_ends_the_trial_fail_and_the_study_goes_on() -> None:
    gc.collect()
    limit = round(current_rss_gb() + 0.3, 3)
    log = {"allocate": {0}, "chunks": {}}
    objective = _allocating_objective(limit, cap_gb=0.75, log=log)
    failing = guard(
        max_trial_rss_gb=limit,
        on_trip="fail",
        interval=0.05,
        min_available_gb=0.5,
        warn_available_gb=1.0,
    )(objective.__wrapped__)
    study = _study()
    study.optimize(failing, n_trials=2)
    assert study.trials[0].state == TrialState.FAIL
    assert study.trials[0].user_attrs[tags.EMERGENCY_KILLED] is True
    assert study.trials[0].user_attrs[tags.KILL_LIMIT] == "max_trial_rss_gb"
    assert study.trials[1].state == TrialState.COMPLETE


def test_sampler_stops_a_trial_when_available_memory_drops_mid_split() -> None:
    probe = FakeProbe(available_gb=10.0)
    progress = {"flipped_at": None, "iterations_after": 0}

    @guard(min_available_gb=2.0, warn_available_gb=4.0, interval=0.05, probe=probe)
    def objective(trial):
        for step in range(400):  # ~4 s if never stopped
            if step == 10:
                probe.set(available_gb=1.5)
                progress["flipped_at"] = step
            if progress["flipped_at"] is not None:
                progress["iterations_after"] += 1
            time.sleep(0.01)
        return 0.0

    study = _study(directions=["minimize", "maximize"])
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs[tags.KILL_LIMIT] == "min_available_gb"
    assert trial.user_attrs[tags.AVAILABLE_GB_AT_KILL] == 1.5
    assert trial.user_attrs[tags.MIN_AVAILABLE_GB] == 1.5
    assert progress["iterations_after"] < 100  # stopped within ~1 s, not at the end


def test_multi_objective_fail_value() -> None:
    probe = FakeProbe(available_gb=1.0)

    @guard(on_trip="fail", probe=probe)
    def objective(trial):
        return 0.0, 1.0

    study = _study(directions=["minimize", "maximize"])
    study.optimize(objective, n_trials=1)
    assert study.trials[0].state == TrialState.FAIL
    assert study.trials[0].user_attrs[tags.EMERGENCY_KILLED] is True


def test_interrupts_never_leak_out_of_a_trial(monkeypatch) -> None:
    """Flip the fake reading on and off while hundreds of short trials run: every interrupt
    must be turned into a PRUNED trial inside its own trial, never escape into Optuna or the
    next trial, and COMPLETE trials must carry no kill tags."""
    probe = FakeProbe(available_gb=10.0)
    done = threading.Event()

    def flipper():
        low = False
        while not done.is_set():
            low = not low
            probe.set(available_gb=1.0 if low else 10.0)
            time.sleep(0.003 if low else 0.011)

    @guard(min_available_gb=2.0, warn_available_gb=2.0, interval=0.005, probe=probe)
    def objective(trial):
        end = time.perf_counter() + 0.001 * (1 + trial.number % 12)  # 1-12 ms around the interval
        total = 0
        while time.perf_counter() < end:
            total += 1
        return float(total)

    monkeypatch.setattr(
        trial_guard, "_collect_garbage", lambda **_: None
    )  # speed: not under test here
    thread = threading.Thread(target=flipper, daemon=True)
    thread.start()
    try:
        study = _study()
        study.optimize(objective, n_trials=150, n_jobs=2)
    finally:
        done.set()
        thread.join()
    probe.set(available_gb=10.0)
    states = {t.state for t in study.trials}
    assert states <= {TrialState.COMPLETE, TrialState.PRUNED}
    for trial in study.trials:
        assert (trial.state == TrialState.PRUNED) == bool(
            trial.user_attrs.get(tags.EMERGENCY_KILLED)
        )
    reasons = [t.user_attrs.get(tags.KILL_REASON, "") for t in study.trials]
    assert any(
        "mid-trial" in r for r in reasons
    )  # the sampler's interrupts, not only start checks
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) > 0
    time.sleep(0.05)  # a stray exception injected after its trial ended would surface here
    from optuna_guard._watcher import WATCHER

    assert WATCHER.active_count() == 0  # every trial unregistered: nothing left to interrupt


# -- preemption ---------------------------------------------------------------------------------


def test_check_memory_is_a_preemption_boundary() -> None:
    study = _study()

    def objective(trial):
        preemption.request_stop("SIGTERM")
        check_memory(trial, "split 1/5", probe=FakeProbe())
        return 0.0

    with pytest.raises(preemption.TrialPreempted):
        study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs[tags.PREEMPTED] is True
    assert "SIGTERM" in trial.user_attrs[tags.KILL_REASON]


def test_sampler_stops_a_trial_when_a_stop_is_requested() -> None:
    started = threading.Event()

    @guard(interval=0.05, probe=FakeProbe())
    def objective(trial):
        started.set()
        for _ in range(400):
            time.sleep(0.01)
        return 0.0

    threading.Timer(0.3, preemption.request_stop, args=("SIGTERM",)).start()
    study = _study()
    begun = time.monotonic()
    with pytest.raises(preemption.TrialPreempted):
        study.optimize(objective, n_trials=3)
    assert time.monotonic() - begun < 2.0
    assert len(study.trials) == 1
    trial = study.trials[0]
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs[tags.PREEMPTED] is True
    assert tags.EMERGENCY_KILLED not in trial.user_attrs
    assert tags.PEAK_RSS_GB in trial.user_attrs


# -- constraints, pre-flight, gc ----------------------------------------------------------------


def test_memory_budget_writes_the_constraint_for_complete_and_killed_trials() -> None:
    probe = FakeProbe(available_gb=10.0, rss_gb=3.0)

    @guard(memory_budget_gb=2.0, probe=probe)
    def objective(trial):
        if trial.number == 1:
            check_memory(
                trial, "split 1/2", safe_threshold_gb=20.0, warning_threshold_gb=20.0, probe=probe
            )
        return 0.0

    study = _study()
    study.optimize(objective, n_trials=2)
    assert study.trials[0].state == TrialState.COMPLETE
    assert study.trials[0].system_attrs["constraints:memory"] == pytest.approx(1.0)
    assert study.trials[1].state == TrialState.PRUNED
    assert study.trials[1].system_attrs["constraints:memory"] == pytest.approx(
        3.0
    )  # (3-2) + max(2, 1)


@pytest.mark.parametrize("setting", ["memory_budget_gb", "max_trial_rss_gb"])
def test_a_budget_below_the_interpreters_own_rss_warns_once(setting, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="optuna_guard")

    @guard(probe=FakeProbe(rss_gb=1.0), **{setting: 0.5})
    def objective(trial):
        return 0.0

    study = _study()
    study.optimize(objective, n_trials=3)
    warnings = [
        r.getMessage() for r in caplog.records if "below this process's own RSS" in r.getMessage()
    ]
    assert len(warnings) == 1 and warnings[0].startswith(f"{setting}=0.50 GB")


def test_no_budget_warning_when_the_budget_fits() -> None:
    settings = guard(memory_budget_gb=4.0, probe=FakeProbe(rss_gb=1.0))(
        lambda trial: 0.0
    ).__optuna_guard_settings__
    trial_guard._warn_if_budget_below_rss(settings, int(1.0 * 2**30))
    assert settings.budget_warned is False


def test_memory_budget_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("OPTUNA_GUARD_MEMORY_BUDGET_GB", "4")

    @guard(probe=FakeProbe(rss_gb=1.0))
    def objective(trial):
        return 0.0

    study = _study()
    study.optimize(objective, n_trials=1)
    assert study.trials[0].system_attrs["constraints:memory"] == pytest.approx(-3.0)


@pytest.mark.parametrize("via_env", [False, True])
def test_preflight_runs_before_the_objective(monkeypatch, via_env) -> None:
    seen = []

    def preflight_check(trial, *, probe=None, **_settings):
        seen.append((trial.number, probe))
        if trial.number == 0:
            trial.set_user_attr(
                tags.KILL_REASON, "predicted OOM: ~9.0 GB needed, 1.0 GB available"
            )
            raise optuna.TrialPruned("predicted OOM")

    fake_module = types.ModuleType("optuna_guard.oom_aware.preflight")
    fake_module.preflight_check = preflight_check
    monkeypatch.setitem(sys.modules, "optuna_guard.oom_aware.preflight", fake_module)
    probe = FakeProbe()
    ran = []
    if via_env:
        monkeypatch.setenv("OPTUNA_GUARD_PREFLIGHT", "1")
        decorate = guard(probe=probe)
    else:
        decorate = guard(preflight=True, probe=probe)

    @decorate
    def objective(trial):
        ran.append(trial.number)
        return 0.0

    study = _study()
    study.optimize(objective, n_trials=2)
    assert [n for n, _ in seen] == [0, 1] and all(p is probe for _, p in seen)
    assert ran == [1]
    assert study.trials[0].state == TrialState.PRUNED
    assert study.trials[0].user_attrs[tags.KILL_REASON].startswith("predicted OOM")
    assert tags.PEAK_RSS_GB in study.trials[0].user_attrs
    assert study.trials[1].state == TrialState.COMPLETE


def test_preflight_with_the_real_check_prunes_a_config_predicted_not_to_fit() -> None:
    from optuna.distributions import IntDistribution
    from optuna.trial import create_trial

    study = _study()
    for width in range(1, 11):  # history: peak grows with width (0.5 GB + 0.5 GB per unit)
        study.add_trial(
            create_trial(
                params={"width": width},
                distributions={"width": IntDistribution(1, 100)},
                value=float(width),
                user_attrs={tags.PEAK_RSS_GB: 0.5 + 0.5 * width},
            )
        )
    study.enqueue_trial({"width": 100})  # ~50 GB predicted, 4 GB available
    study.enqueue_trial({"width": 2})
    ran = []

    @guard(
        preflight=True,
        min_available_gb=1.0,
        warn_available_gb=1.0,
        probe=FakeProbe(available_gb=4.0, rss_gb=0.5),
    )
    def objective(trial):
        ran.append(trial.suggest_int("width", 1, 100))
        return 0.0

    study.optimize(objective, n_trials=2)
    wide, narrow = study.trials[10:]
    assert ran == [2]
    assert wide.state == TrialState.PRUNED
    assert wide.user_attrs[tags.EMERGENCY_KILLED] is True
    assert wide.user_attrs[tags.KILL_REASON].startswith("predicted OOM")
    assert narrow.state == TrialState.COMPLETE


def test_garbage_is_collected_after_each_trial(monkeypatch) -> None:
    calls = []
    real_collect = gc.collect
    monkeypatch.setattr(trial_guard.gc, "collect", lambda *a: calls.append(a) or real_collect(*a))
    budget = trial_guard._GcBudget()
    monkeypatch.setattr(trial_guard, "_gc_budget", budget)

    @guard(probe=FakeProbe())
    def objective(trial):
        return 0.0

    study = _study()
    budget.last_full -= 60.0  # the last full collection was a minute ago
    study.optimize(objective, n_trials=3)
    assert calls == [()]  # due: one full collection; then none (full ones would be too frequent)
    assert budget.last_cost > 0  # measured
    calls.clear()
    trial_guard._collect_garbage(force=True)
    assert calls == [()]  # a stopped trial always gets a full collection


def test_cuda_cache_emptied_when_torch_has_cuda(monkeypatch) -> None:
    emptied = []
    cuda = types.SimpleNamespace(
        is_initialized=lambda: True, empty_cache=lambda: emptied.append(1)
    )
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    trial_guard._collect_garbage(force=False)
    assert emptied == [1]
    cuda.is_initialized = lambda: False
    trial_guard._collect_garbage(force=False)
    assert emptied == [1]


def test_fail_value_is_nan_for_each_objective() -> None:
    study = _study(directions=["minimize", "minimize", "maximize"])
    value = trial_guard._fail_value(study.ask())
    assert len(value) == 3 and all(math.isnan(v) for v in value)
    assert math.isnan(trial_guard._fail_value(_study().ask()))
