"""MemoryLimits validation and environment overrides; bad settings in every entry point."""

from __future__ import annotations

import dataclasses
import math

import pytest
from fakes import FakeProbe

from optuna_guard import check_memory, guard
from optuna_guard.exceptions import ConfigError
from optuna_guard.limits import ENV_VARS, MemoryLimits
from optuna_guard.pruners import MemoryGuardPruner


def test_defaults_match_the_documented_values() -> None:
    limits = MemoryLimits()
    assert (
        limits.min_available_gb,
        limits.warn_available_gb,
        limits.interval,
        limits.on_trip,
    ) == (2.0, 4.0, 0.1, "prune")
    assert (
        limits.max_ram_percent
        is limits.max_swap_percent
        is limits.max_gpu_percent
        is limits.max_trial_rss_gb
        is None
    )


@pytest.mark.parametrize(
    "kwargs, field, value",
    [
        ({"min_available_gb": -1.0}, "min_available_gb", "-1.0"),
        ({"min_available_gb": math.nan}, "min_available_gb", "nan"),
        ({"warn_available_gb": math.inf}, "warn_available_gb", "inf"),
        ({"max_trial_rss_gb": 0}, "max_trial_rss_gb", "0"),
        ({"max_trial_rss_gb": -2.5}, "max_trial_rss_gb", "-2.5"),
        ({"max_ram_percent": 0}, "max_ram_percent", "0"),
        ({"max_ram_percent": 100.5}, "max_ram_percent", "100.5"),
        ({"max_swap_percent": -5}, "max_swap_percent", "-5"),
        ({"max_gpu_percent": 250}, "max_gpu_percent", "250"),
        ({"interval": 0}, "interval", "0"),
        ({"interval": -0.1}, "interval", "-0.1"),
        ({"min_available_gb": "2"}, "min_available_gb", "'2'"),
        ({"min_available_gb": True}, "min_available_gb", "True"),
        ({"on_trip": "kill"}, "on_trip", "'kill'"),
        ({"min_available_gb": 3.0, "warn_available_gb": 2.0}, "warn_available_gb", "2.0"),
    ],
)
def test_bad_values_raise_config_error_naming_field_and_value(kwargs, field, value) -> None:
    with pytest.raises(ConfigError) as info:
        MemoryLimits(**kwargs)
    message = str(info.value)
    assert field in message and value in message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


def test_limits_are_frozen_and_keyword_only() -> None:
    limits = MemoryLimits()
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.min_available_gb = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        MemoryLimits(1.0)  # type: ignore[misc]
    assert limits.replace(min_available_gb=1.0).min_available_gb == 1.0
    with pytest.raises(ConfigError):
        limits.replace(interval=0)


def test_env_overrides_then_explicit_overrides() -> None:
    environ = {
        "OPTUNA_GUARD_MIN_AVAILABLE_GB": "1.5",
        "OPTUNA_GUARD_WARN_AVAILABLE_GB": "3",
        "OPTUNA_GUARD_MAX_TRIAL_RSS_GB": "6.5",
        "OPTUNA_GUARD_MAX_RAM_PERCENT": "90",
        "OPTUNA_GUARD_INTERVAL": "0.05",
        "OPTUNA_GUARD_ON_TRIP": "FAIL",
    }
    limits = MemoryLimits.from_env(environ)
    assert (limits.min_available_gb, limits.warn_available_gb, limits.max_trial_rss_gb) == (
        1.5,
        3.0,
        6.5,
    )
    assert (limits.max_ram_percent, limits.interval, limits.on_trip) == (90.0, 0.05, "fail")
    assert MemoryLimits.from_env(environ, max_trial_rss_gb=None).max_trial_rss_gb is None
    assert (
        MemoryLimits.from_env(
            {"OPTUNA_GUARD_MIN_AVAILABLE_GB": "none", "OPTUNA_GUARD_WARN_AVAILABLE_GB": ""}
        ).min_available_gb
        is None
    )


def test_every_field_has_an_env_var() -> None:
    assert set(ENV_VARS) == {f.name for f in dataclasses.fields(MemoryLimits)}
    assert all(var.startswith("OPTUNA_GUARD_") for var in ENV_VARS.values())


@pytest.mark.parametrize(
    "environ, needle",
    [
        ({"OPTUNA_GUARD_MIN_AVAILABLE_GB": "lots"}, "OPTUNA_GUARD_MIN_AVAILABLE_GB"),
        ({"OPTUNA_GUARD_MAX_RAM_PERCENT": "120"}, "max_ram_percent"),
        ({"OPTUNA_GUARD_ON_TRIP": "explode"}, "on_trip"),
    ],
)
def test_bad_env_values_are_one_line_config_errors(environ, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        MemoryLimits.from_env(environ)


def test_unknown_override_is_rejected() -> None:
    with pytest.raises(ConfigError, match="max_rss_gb"):
        MemoryLimits.from_env({}, max_rss_gb=3)


def test_guard_validates_at_decoration_time(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="max_trial_rss_gb"):
        guard(max_trial_rss_gb=-1)
    with pytest.raises(ConfigError, match="on_trip"):
        guard(on_trip="explode")
    with pytest.raises(ConfigError, match="memory_budget_gb"):
        guard(memory_budget_gb=0)
    monkeypatch.setenv("OPTUNA_GUARD_MEMORY_BUDGET_GB", "plenty")
    with pytest.raises(ConfigError, match="OPTUNA_GUARD_MEMORY_BUDGET_GB"):
        guard(lambda trial: 0.0)
    monkeypatch.setenv("OPTUNA_GUARD_MIN_AVAILABLE_GB", "-3")
    monkeypatch.delenv("OPTUNA_GUARD_MEMORY_BUDGET_GB")
    with pytest.raises(ConfigError, match="min_available_gb"):
        guard(lambda trial: 0.0)


def test_guard_defaults_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("OPTUNA_GUARD_MAX_TRIAL_RSS_GB", "7")
    monkeypatch.setenv("OPTUNA_GUARD_ON_TRIP", "fail")

    @guard
    def objective(trial):
        return 0.0

    assert objective.__optuna_guard__.max_trial_rss_gb == 7.0
    assert objective.__optuna_guard__.on_trip == "fail"

    @guard(on_trip="prune")
    def other(trial):
        return 0.0

    assert other.__optuna_guard__.on_trip == "prune"  # explicit arguments beat the environment
    assert other.__optuna_guard__.max_trial_rss_gb == 7.0


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"safe_threshold_gb": -1}, "safe_threshold_gb"),
        ({"safe_threshold_gb": math.nan}, "safe_threshold_gb"),
        ({"warning_threshold_gb": "4"}, "warning_threshold_gb"),
        ({"safe_threshold_gb": 3.0, "warning_threshold_gb": 1.0}, "warning_threshold_gb"),
    ],
)
def test_check_memory_validates_its_thresholds(kwargs, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        check_memory(object(), "split 1/5", probe=FakeProbe(), **kwargs)


def test_pruner_validates_its_settings() -> None:
    with pytest.raises(ConfigError, match="max_gpu_percent"):
        MemoryGuardPruner(max_gpu_percent=0)
    with pytest.raises(ConfigError, match="wrapped"):
        MemoryGuardPruner("median")  # type: ignore[arg-type]


# -- the warning level follows a stop level set alone (issue 14 item 4) --------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: MemoryLimits(min_available_gb=8),
        lambda: guard(min_available_gb=8)(lambda trial: 0.0).__optuna_guard__,
        lambda: MemoryGuardPruner(min_available_gb=8).limits,
        lambda: MemoryLimits.from_env({"OPTUNA_GUARD_MIN_AVAILABLE_GB": "8"}),
    ],
)
def test_a_stop_level_set_alone_above_the_default_warning_moves_the_warning(make) -> None:
    limits = make()
    assert (limits.min_available_gb, limits.warn_available_gb) == (8, 10.0)
    assert limits.replace(min_available_gb=12).warn_available_gb == 14.0  # keeps following
    assert MemoryLimits(min_available_gb=3).warn_available_gb == 4.0
    assert MemoryLimits(min_available_gb=None).warn_available_gb == 4.0


def test_an_explicit_warning_below_the_stop_is_still_refused() -> None:
    with pytest.raises(ConfigError, match="warn_available_gb"):
        MemoryLimits(min_available_gb=8, warn_available_gb=4.0)
    with pytest.raises(ConfigError, match="warning_threshold_gb"):
        check_memory(object(), "x", 8.0, 4.0, probe=FakeProbe())


def test_check_memory_names_and_the_seed_aliases(caplog) -> None:
    import optuna

    study = optuna.create_study()
    trial = study.ask()
    check_memory(
        trial, "seed", 8.0, probe=FakeProbe(available_gb=9.0)
    )  # warns below 10 GB, no error
    assert any("< 10.00 GB warning level" in r.getMessage() for r in caplog.records)
    with pytest.raises(optuna.TrialPruned):
        check_memory(trial, "split", min_available_gb=8.0, probe=FakeProbe(available_gb=7.0))
    frozen = study._storage.get_trial(trial._trial_id)
    assert frozen.user_attrs["kill_limit"] == "min_available_gb"
    trial2 = study.ask()
    with pytest.raises(optuna.TrialPruned):
        check_memory(trial2, "split", safe_threshold_gb=8.0, probe=FakeProbe(available_gb=7.0))
    assert (
        study._storage.get_trial(trial2._trial_id).user_attrs["kill_limit"] == "safe_threshold_gb"
    )
