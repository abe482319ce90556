"""Cron expression parsing and tick maths (pure functions; freezegun for 'now' on this thread)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo, available_timezones

import pytest
from freezegun import freeze_time
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from threaddispatch.cron import CronSchedule, parse, parse_duration
from threaddispatch.errors import ConfigurationError


def ts(text: str) -> float:
    """Epoch seconds of an ISO UTC time (a trailing Z allowed: Python 3.10's fromisoformat refuses it)."""
    return datetime.fromisoformat(text.removesuffix("Z")).replace(tzinfo=timezone.utc).timestamp()


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
        "@every 0.5ms",
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


# -- day-of-month and day-of-week (Vixie: AND when either field starts with "*") ------------------


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        # 2024-01-01 is a Monday.
        ("0 0 */2 * 1", "2024-01-01 00:00", ["2024-01-15 00:00", "2024-01-29 00:00", "2024-02-05 00:00"]),
        # "*/5" in day-of-week is Sunday (0) and Friday (5).
        ("0 0 13 * */5", "2024-01-01 00:00", ["2024-09-13 00:00", "2024-10-13 00:00", "2024-12-13 00:00"]),
        ("0 0 * * 1", "2024-01-01 00:00", ["2024-01-08 00:00", "2024-01-15 00:00", "2024-01-22 00:00"]),
        ("0 0 */10 * *", "2024-01-01 00:00", ["2024-01-11 00:00", "2024-01-21 00:00", "2024-01-31 00:00"]),
        # Both restricted (not starting with "*"): either matches.
        ("0 0 1-31/2 * 1", "2024-01-01 00:00", ["2024-01-03 00:00", "2024-01-05 00:00", "2024-01-07 00:00"]),
        ("0 0 13 * fri", "2024-01-01 00:00", ["2024-01-05 00:00", "2024-01-12 00:00", "2024-01-13 00:00"]),
        ("0 0 1,*/2 * 1", "2024-01-01 00:00", ["2024-01-03 00:00", "2024-01-05 00:00", "2024-01-07 00:00"]),
        # A date that falls on the weekday only every few years (Feb 29 on a Sunday).
        ("0 0 29 2 */7", "2024-01-01 00:00", ["2032-02-29 00:00", "2060-02-29 00:00", "2088-02-29 00:00"]),
        ("0 0 29 2 *", "2096-03-01 00:00", ["2104-02-29 00:00", "2108-02-29 00:00", "2112-02-29 00:00"]),
    ],
)
def test_day_fields_combine_as_in_vixie_cron(expression: str, after: str, expected: list[str]) -> None:
    """A day field starting with '*' (like '*/2', '*/5') makes both day fields required (AND); else either."""
    schedule = parse(expression)
    ticks, tick = [], ts(after)
    for _ in expected:
        tick = schedule.next_after(tick)
        ticks.append(iso(tick))
    assert ticks == expected


# -- ASCII digits only; every bad expression names itself and its field ------------------------------


@pytest.mark.parametrize(
    ("expression", "field"),
    [
        ("\u00b3 * * * *", "minute"),  # superscript three: isdigit() but not int()
        ("\u0663 * * * *", "minute"),  # Arabic-Indic three: int() reads it as 3
        ("*/\u0663 * * * *", "minute"),
        ("0 \uff11 * * *", "hour"),  # fullwidth one
        ("0 0 \u0661-\u0663 * *", "day-of-month"),
        ("0 0 * \u0661 *", "month"),
        ("0 0 * * \u0661", "day-of-week"),
        ("61 * * * *", "minute"),
        ("* 24 * * *", "hour"),
        ("* * 0 * *", "day-of-month"),
        ("* * * 13 *", "month"),
        ("* * * * 8", "day-of-week"),
        ("*/0 * * * *", "minute"),
        ("5-1 * * * *", "minute"),
        ("x * * * *", "minute"),
        ("1,,2 * * * *", "minute"),
        pytest.param("0 0 " + "9" * 5000 + " * *", "day-of-month", id="5000-digit-number"),
    ],
)
def test_bad_fields_raise_configuration_error_naming_expression_and_field(expression: str, field: str) -> None:
    """Non-ASCII digits and bad values raise ConfigurationError naming the expression and the field."""
    with pytest.raises(ConfigurationError) as info:
        parse(expression)
    assert repr(expression) in str(info.value)
    assert f"{field} field" in str(info.value)


@pytest.mark.parametrize("expression", ["@every \u0663s", "@every \u00b3m", "@every 1\u0663s"])
def test_every_accepts_ascii_digits_only(expression: str) -> None:
    """@every durations are ASCII digits too."""
    with pytest.raises(ConfigurationError) as info:
        parse(expression)
    assert repr(expression) in str(info.value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=40) | st.lists(st.sampled_from(["*", "*/3", "1-5", "7", ",", "/", "-", "x", "\u0663"]),
                                       min_size=5, max_size=5).map(" ".join))  # fmt: skip
def test_any_text_parses_or_raises_configuration_error(expression: str) -> None:
    """parse() never raises anything but ConfigurationError, whatever the text."""
    try:
        parse(expression)
    except ConfigurationError as error:
        assert repr(expression) in str(error)


# -- time zones and DST ---------------------------------------------------------------------------


def zoned(text: str, zone: str, fold: int = 0) -> float:
    """Epoch seconds of a wall-clock time in ``zone``."""
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone), fold=fold).timestamp()


def local(seconds: float, zone: str) -> str:
    """Wall-clock text with UTC offset of epoch seconds in ``zone``."""
    return datetime.fromtimestamp(seconds, ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M%z")


def chain(schedule: CronSchedule, after: float, count: int) -> list[float]:
    """The ``count`` ticks following ``after``."""
    ticks = []
    for _ in range(count):
        after = schedule.next_after(after)
        ticks.append(after)
    return ticks


def test_tz_accepts_a_zone_name_and_refuses_unknown_ones() -> None:
    """tz may be an IANA name; an unknown one (or a non-zone) raises ConfigurationError naming it."""
    assert parse("0 9 * * *", tz="Europe/Berlin").next_after(ts("2024-01-01 00:00")) == ts("2024-01-01 08:00")
    for bad in ("Mars/Olympus_Mons", "../etc/passwd", ""):
        with pytest.raises(ConfigurationError, match="time zone"):
            parse("* * * * *", tz=bad)
    with pytest.raises(ConfigurationError, match="tz must be"):
        parse("* * * * *", tz=5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("zone", "first", "second"),
    # A time inside the hour that occurs twice: once in summer time, then again in winter time.
    [("Europe/Berlin", "2024-10-27 02:30", "2024-10-27 02:30"), ("America/New_York", "2024-11-03 01:30", "")],
)
def test_next_after_inside_a_repeated_hour_is_in_the_future(zone: str, first: str, second: str) -> None:
    """The issue's bug: inside the repeated hour next_after went back in time (the cron loop then spun)."""
    for expression in ("*/5 * * * *", "30 2 * * *", "15 * * * *", "0 3 * * *"):
        schedule = parse(expression, tz=zone)
        for fold in (0, 1):
            now = zoned(first, zone, fold)
            assert schedule.next_after(now) > now, (expression, fold)
            assert schedule.last_at(now) <= now, (expression, fold)


@pytest.mark.parametrize(
    ("zone", "expression", "after", "expected"),
    [
        # Fall-back (Berlin 2024-10-27 03:00 CEST -> 02:00 CET): a fixed time fires once, at its first occurrence.
        ("Europe/Berlin", "30 2 * * *", "2024-10-26 12:00",
         ["2024-10-27 02:30+0200", "2024-10-28 02:30+0100"]),
        ("Europe/Berlin", "0,30 2 * * *", "2024-10-27 01:00",
         ["2024-10-27 02:00+0200", "2024-10-27 02:30+0200", "2024-10-28 02:00+0100"]),
        # New York 2024-11-03 02:00 EDT -> 01:00 EST.
        ("America/New_York", "30 1 * * *", "2024-11-02 12:00",
         ["2024-11-03 01:30-0400", "2024-11-04 01:30-0500"]),
        # A wildcard expression (minute or hour starts with '*') follows the real clock: both passes.
        ("Europe/Berlin", "*/20 * * * *", "2024-10-27 01:50",
         ["2024-10-27 02:00+0200", "2024-10-27 02:20+0200", "2024-10-27 02:40+0200",
          "2024-10-27 02:00+0100", "2024-10-27 02:20+0100", "2024-10-27 02:40+0100", "2024-10-27 03:00+0100"]),
        ("Europe/Berlin", "15 * * * *", "2024-10-27 01:50",
         ["2024-10-27 02:15+0200", "2024-10-27 02:15+0100", "2024-10-27 03:15+0100"]),
        ("America/New_York", "*/30 1 * * *", "2024-11-03 00:50",
         ["2024-11-03 01:00-0400", "2024-11-03 01:30-0400", "2024-11-03 01:00-0500", "2024-11-03 01:30-0500",
          "2024-11-04 01:00-0500"]),
        # Spring-forward (Berlin 2024-03-31 02:00 CET -> 03:00 CEST): a fixed time inside the gap fires at its end.
        ("Europe/Berlin", "30 2 * * *", "2024-03-30 12:00",
         ["2024-03-31 03:00+0200", "2024-04-01 02:30+0200"]),
        ("Europe/Berlin", "0,30 2-3 * * *", "2024-03-31 01:00",
         ["2024-03-31 03:00+0200", "2024-03-31 03:30+0200", "2024-04-01 02:00+0200"]),
        # New York 2024-03-10 02:00 EST -> 03:00 EDT.
        ("America/New_York", "15 2 * * *", "2024-03-09 12:00",
         ["2024-03-10 03:00-0400", "2024-03-11 02:15-0400"]),
        # A wildcard expression skips the wall-clock times that do not exist.
        ("Europe/Berlin", "*/20 * * * *", "2024-03-31 01:30",
         ["2024-03-31 01:40+0100", "2024-03-31 03:00+0200", "2024-03-31 03:20+0200"]),
        ("America/New_York", "10 * * * *", "2024-03-10 01:00",
         ["2024-03-10 01:10-0500", "2024-03-10 03:10-0400"]),
    ],
)  # fmt: skip
def test_dst_edges(zone: str, expression: str, after: str, expected: list[str]) -> None:
    """Both DST edges in two zones: fixed times fire once (first pass, or gap's end); wildcards follow the clock."""
    schedule = parse(expression, tz=zone)
    ticks = chain(schedule, zoned(after, zone), len(expected))
    assert [local(tick, zone) for tick in ticks] == expected
    for tick in ticks:
        assert schedule.last_at(tick) == tick
        assert schedule.last_at(tick + 59) == tick


def vixie_ticks(schedule: CronSchedule, zone: str, start: float, end: float) -> Iterator[float]:
    """The firings of a minute-by-minute cron daemon on a clock in ``zone`` (Vixie's rules), in [start, end).

    Wildcard expressions run whenever the wall clock matches (both passes of a repeated
    hour, nothing for skipped minutes); fixed-time ones run for each wall-clock minute
    reached for the first time, including every minute a forward jump skipped.
    """
    tz = ZoneInfo(zone)
    wildcard = schedule.wildcard

    def matches(wall: datetime) -> bool:
        weekday = (wall.weekday() + 1) % 7
        if schedule.days_restricted and schedule.weekdays_restricted:
            day = wall.day in schedule.days or weekday in schedule.weekdays
        else:
            day = wall.day in schedule.days and weekday in schedule.weekdays
        return wall.minute in schedule.minutes and wall.hour in schedule.hours and wall.month in schedule.months and day

    highest = datetime.fromtimestamp(start - 60, tz).replace(tzinfo=None)
    instant = start
    while instant < end:
        wall = datetime.fromtimestamp(instant, tz).replace(tzinfo=None)
        if wildcard:
            if matches(wall):
                yield instant
        elif wall > highest:
            missed = highest + timedelta(minutes=1)
            while missed <= wall and not matches(missed):
                missed += timedelta(minutes=1)
            if missed <= wall:
                yield instant
            highest = wall
        instant += 60


@pytest.mark.parametrize(
    ("zone", "day"),
    [
        ("Europe/Berlin", "2024-03-31"), ("Europe/Berlin", "2024-10-27"),
        ("America/New_York", "2024-03-10"), ("America/New_York", "2024-11-03"),
        ("Australia/Lord_Howe", "2024-04-06"), ("Australia/Lord_Howe", "2024-10-05"),  # 30-minute shifts
        ("America/Sao_Paulo", "2018-11-04"), ("America/Sao_Paulo", "2019-02-17"),  # at midnight
        ("Pacific/Apia", "2011-12-30"),  # the whole of 30 December 2011 was skipped
    ],
)  # fmt: skip
def test_ticks_match_a_simulated_vixie_daemon_across_transitions(zone: str, day: str) -> None:
    """Around real transitions, the ticks are exactly what a minute-by-minute Vixie-rule daemon would fire."""
    start = ts(f"{day} 00:00") - 86400
    end = start + 3 * 86400
    expressions = ["*/20 * * * *", "15 * * * *", "0 */2 * * *", "*/10 2 * * *", "30 2 * * *", "0 0 * * *",
                   "45 23 * * *", "0,30 0-3 * * *", "0 12 * * *", "30 1 * * *"]  # fmt: skip
    for expression in expressions:
        schedule = parse(expression, tz=zone)
        expected = list(vixie_ticks(schedule, zone, start, end))
        got, tick = [], schedule.next_after(start - 1)
        while tick < end:
            got.append(tick)
            tick = schedule.next_after(tick)
        assert [local(t, zone) for t in got] == [local(t, zone) for t in expected], expression


_ZONES = sorted(available_timezones())
_EXPRESSIONS = ["* * * * *", "*/7 * * * *", "30 2 * * *", "15 * * * *", "0 */3 * * *", "*/10 1-3 * * *",
                "0 0 * * *", "59 23 * * *", "0 2 * * 0", "0 0 1 * *", "0 0 29 2 *", "0,30 0-3 * * *",
                "0 0 13 * fri", "0 0 */2 * 1", "@hourly", "@daily",
                "@every 7m", "@every 1.5s", "@every 1ms"]  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    expression=st.sampled_from(_EXPRESSIONS),
    zone=st.sampled_from(_ZONES),
    when=st.floats(min_value=ts("1900-01-01 00:00"), max_value=ts("2100-01-01 00:00"), allow_nan=False),
)
def test_next_after_is_always_strictly_later_in_every_zone(expression: str, zone: str, when: float) -> None:
    """next_after(t) > t and last_at(t) <= t for any zone and time, and the two agree on the ticks."""
    schedule = parse(expression, tz=zone)
    following = schedule.next_after(when)
    previous = schedule.last_at(when)
    assert previous <= when < following
    assert schedule.next_after(previous) == following  # no tick in (previous, following) but those
    assert schedule.last_at(following) == following
    assert schedule.next_after(following) > following


def test_times_must_be_finite() -> None:
    """next_after/last_at refuse NaN and infinities with ConfigurationError."""
    for schedule in (parse("* * * * *"), parse("@every 5s")):
        for bad in (float("nan"), float("inf"), -float("inf")):
            with pytest.raises(ConfigurationError, match="finite"):
                schedule.next_after(bad)
            with pytest.raises(ConfigurationError, match="finite"):
                schedule.last_at(bad)


def test_a_cron_tz_prefix_names_the_zone() -> None:
    """``CRON_TZ=<zone> <expression>`` (as in Vixie cron and robfig/cron) reads the fields in that zone."""
    prefixed = parse("CRON_TZ=Europe/Berlin 30 2 * * *")
    plain = parse("30 2 * * *", tz="Europe/Berlin")
    assert prefixed.tz == plain.tz and prefixed.expression == "CRON_TZ=Europe/Berlin 30 2 * * *"
    for when in (0.0, ts("2024-03-31T00:00:00Z"), ts("2024-10-27T00:00:00Z")):
        assert prefixed.next_after(when) == plain.next_after(when)
    assert parse("TZ=UTC @hourly").next_after(0.0) == 3600.0
    assert parse("CRON_TZ=Europe/Berlin 0 * * * *", tz=ZoneInfo("Europe/Berlin")).tz == ZoneInfo("Europe/Berlin")
    with pytest.raises(ConfigurationError, match="Mars/Base"):
        parse("CRON_TZ=Mars/Base 0 * * * *")
    with pytest.raises(ConfigurationError, match="CRON_TZ"):
        parse("CRON_TZ=Europe/Berlin 0 * * * *", tz="UTC")
    with pytest.raises(ConfigurationError, match="expected 5 fields"):
        parse("CRON_TZ=UTC")
