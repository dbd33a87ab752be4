"""parse_duration tables and the TimeBudget "time for one more trial?" rule, on a fake clock."""

from __future__ import annotations

import pytest

from optuna_guard.exceptions import ConfigError
from optuna_guard.time_budget import TimeBudget, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("11h30m", 41400.0),
        ("1h", 3600.0),
        ("90m", 5400.0),
        ("45s", 45.0),
        ("3600", 3600.0),
        ("2h15m30s", 8130.0),
        ("1d12h", 129600.0),
        ("1.5h", 5400.0),
        (" 2H ", 7200.0),
        ("0.5", 0.5),
        ("2:15:30", 8130.0),
        ("1-02:00:00", 93600.0),
        (90, 90.0),
        (1.5, 1.5),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "abc",
        "11x",
        "h",
        "30m11h",
        "1h1h",
        "-5",
        "-1h",
        "0",
        "0s",
        "0h0m",
        "1:2",
        "1:61:00",
        "nan",
        "inf",
        True,
        -3,
        0.0,
    ],
)
def test_parse_duration_rejects_with_the_value_named(text: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(text)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    assert "time budget" in message
    if str(text).strip():
        assert repr(text) in message or str(text) in message


def test_format_duration() -> None:
    assert format_duration(41400) == "11h30m00s"
    assert format_duration(45.24) == "45.2s"
    assert format_duration(125) == "2m05s"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_remaining_and_expired_follow_the_clock() -> None:
    clock = FakeClock()
    budget = TimeBudget(600, grace_period=60, clock=clock)
    assert budget.remaining() == 600
    assert not budget.expired()
    clock.now += 599.5
    assert budget.remaining() == pytest.approx(0.5)
    assert not budget.expired()
    clock.now += 1
    assert budget.expired()
    assert budget.remaining() == pytest.approx(-0.5)


@pytest.mark.parametrize(
    ("elapsed", "durations", "allowed"),
    [
        (0, [], True),  # no history: remaining 600 > grace 60
        (539, [], True),  # 61 s left > 60 s grace
        (541, [], False),  # 59 s left
        (0, [100, 200, 300], True),  # median 200 + 60 = 260 < 600
        (341, [100, 200, 300], False),  # 259 s left < 260
        (339, [100, 200, 300], True),  # 261 s left
        (300, [10, 10, 10, 1000], True),  # median 10: one long trial does not stop the launch
        (300, [250, 260, 5], False),  # median 250 + 60 > 300 left
    ],
)
def test_allows_new_trial(elapsed: float, durations: list[float], allowed: bool) -> None:
    clock = FakeClock()
    budget = TimeBudget(600, grace_period=60, clock=clock)
    clock.now += elapsed
    assert budget.allows_new_trial(durations) is allowed


@pytest.mark.parametrize(("seconds", "grace"), [(0, 10), (-1, 10), (float("nan"), 1), (60, -1)])
def test_bad_budget_settings(seconds: float, grace: float) -> None:
    with pytest.raises(ConfigError):
        TimeBudget(seconds, grace_period=grace)
