"""Cron expression parsing and tick maths (pure functions; freezegun for 'now' on this thread)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from freezegun import freeze_time

from threaddispatch.cron import parse, parse_duration
from threaddispatch.errors import ConfigurationError


def ts(text: str) -> float:
    """Epoch seconds of an ISO UTC time."""
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def iso(seconds: float) -> str:
    """ISO UTC text of epoch seconds (minutes precision)."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M")


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        ("*/5 * * * *", "2024-01-01 12:03", "2024-01-01 12:05"),
        ("*/5 * * * *", "2024-01-01 12:05", "2024-01-01 12:10"),
        ("0 9 * * mon-fri", "2024-01-05 10:00", "2024-01-08 09:00"),  # Friday 10:00 -> Monday
        ("30 2 1 * *", "2024-01-15 00:00", "2024-02-01 02:30"),
        ("0 0 29 2 *", "2023-03-01 00:00", "2024-02-29 00:00"),
        ("0 0 * * 7", "2024-01-01 00:00", "2024-01-07 00:00"),  # 7 is Sunday
        ("0 0 13 * fri", "2024-01-01 00:00", "2024-01-05 00:00"),  # day OR weekday when both restricted
        ("15,45 1-3/2 * jan *", "2024-01-01 01:20", "2024-01-01 01:45"),
        ("@hourly", "2024-01-01 12:03", "2024-01-01 13:00"),
        ("@daily", "2024-01-01 12:03", "2024-01-02 00:00"),
        ("@weekly", "2024-01-01 12:03", "2024-01-07 00:00"),
        ("@monthly", "2024-01-31 12:03", "2024-02-01 00:00"),
        ("@yearly", "2024-06-01 00:00", "2025-01-01 00:00"),
    ],
)
def test_next_after(expression: str, after: str, expected: str) -> None:
    """next_after gives the first tick strictly after a time, for fields, lists, ranges, steps, names, macros."""
    assert iso(parse(expression).next_after(ts(after))) == expected


def test_last_at_is_the_latest_tick_at_or_before() -> None:
    """last_at includes an exact tick and otherwise steps back to the previous one."""
    schedule = parse("*/15 * * * *")
    assert iso(schedule.last_at(ts("2024-01-01 12:14"))) == "2024-01-01 12:00"
    assert iso(schedule.last_at(ts("2024-01-01 12:15"))) == "2024-01-01 12:15"
    assert iso(parse("0 0 1 1 *").last_at(ts("2024-06-01 00:00"))) == "2024-01-01 00:00"


def test_every_ticks_are_multiples_of_the_interval_since_epoch() -> None:
    """@every ticks are aligned, so every process computes the same ones."""
    schedule = parse("@every 30s")
    assert schedule.interval == 30.0
    assert schedule.next_after(100.0) == 120.0
    assert schedule.last_at(100.0) == 90.0
    assert schedule.last_at(120.0) == 120.0
    assert parse("@every 1h30m").interval == 5400.0
    assert parse("@every 500ms").interval == 0.5


@freeze_time("2024-03-10 08:07:30", tz_offset=0)
def test_default_now_is_the_wall_clock() -> None:
    """Without an argument the schedule uses time.time() (frozen here)."""
    assert iso(parse("*/10 * * * *").next_after()) == "2024-03-10 08:10"
    assert iso(parse("*/10 * * * *").last_at()) == "2024-03-10 08:00"


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("1d", 86400.0), ("1.5s", 1.5)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    """Durations in ms/s/m/h/d, combined and fractional."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "expression",
    [
        "* * *",
        "* * * * * *",
        "61 * * * *",
        "* 24 * * *",
        "* * 0 * *",
        "* * * 13 *",
        "* * * * 8",
        "*/0 * * * *",
        "5-1 * * * *",
        "x * * * *",
        "0 0 30 2 *",
        "@fortnightly",
        "@every",
        "@every 0s",
        "@every 10 parsecs",
    ],
)
def test_invalid_expressions_raise_naming_the_expression(expression: str) -> None:
    """A bad expression raises ConfigurationError whose message contains it."""
    with pytest.raises(ConfigurationError) as info:
        parse(expression)
    assert repr(expression) in str(info.value)


def test_non_string_expression_is_refused() -> None:
    """Only strings parse."""
    with pytest.raises(ConfigurationError):
        parse(5)  # type: ignore[arg-type]
