"""Cron schedules for the job engine: 5-field expressions, macros and ``@every``.

:func:`parse` turns an expression into a :class:`CronSchedule`, whose ticks are
points in time (float epoch seconds). Every process computes the same ticks for the
same expression, which is what lets the engine fire each tick once across processes
(the store records the last tick fired). Accepted forms:

- five fields ``minute hour day-of-month month day-of-week`` with ``*``, ``a``,
  ``a-b``, ``*/n``, ``a-b/n``, ``a/n`` and lists ``a,b``; numbers are ASCII digits;
  month and weekday names (``jan``, ``mon``); weekday 0 or 7 is Sunday.
- The two day fields combine as in Vixie cron: when either field starts with ``*``
  (``*``, ``*/2``) a day must match both; when both are restricted (``13``, ``1-7``,
  ``fri``) a day matching either fires (``0 0 13 * fri``: every 13th and every Friday).
- ``@yearly`` (``@annually``), ``@monthly``, ``@weekly``, ``@daily`` (``@midnight``),
  ``@hourly``.
- ``@every <duration>``: ``30s``, ``5m``, ``1h30m``, ``500ms``, ``1.5s``, ``2d`` (at least
  1 ms); ticks are the multiples of the duration since the Unix epoch.

The five fields are read in UTC unless a ``tz`` is given (a ``tzinfo`` such as
``zoneinfo.ZoneInfo``, or an IANA name like ``"Europe/Berlin"``) or the expression
starts with ``CRON_TZ=<IANA name>`` (``TZ=`` too), as in Vixie cron and robfig/cron:
``CRON_TZ=Europe/Berlin 30 2 * * *``. The job engine stores a cron's zone that way. Where that zone's
clock jumps, the ticks follow Vixie cron's rules, which depend on the expression:

- A *wildcard* expression (its minute or hour field starts with ``*``: ``*/5 * * * *``,
  ``15 * * * *``, ``@hourly``) follows the real clock. In an hour that occurs twice
  (fall-back) it fires in both passes; wall-clock times skipped by a spring-forward do
  not exist and do not fire.
- A *fixed-time* expression (``30 2 * * *``, ``@daily``) names wall-clock times, each
  fired exactly once: a time that occurs twice fires at its first occurrence only; a
  time that does not exist fires at the first instant after the gap (02:30 on the day
  Berlin jumps from 02:00 to 03:00 fires at 03:00 CEST), never skipped, whatever the
  gap's length.

Invariants: ``next_after(t) > t`` always and ``last_at(t) <= t``, for every zone and
time (years 1 to 9999), so a loop waiting for ``next_after(now)`` never spins. An
invalid expression raises ConfigurationError naming it and the bad field. Everything
here is pure and thread-safe.
"""

from __future__ import annotations

import bisect
import calendar
import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from functools import cached_property

from threaddispatch.errors import ConfigurationError

__all__ = ["CronSchedule", "parse", "parse_duration"]

_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTHS = {name.lower(): index for index, name in enumerate(calendar.month_abbr) if name}
_DAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_FIELD_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# ASCII only: str.isdigit() and \d accept "³" and "٣", which int() rejects or reads as 3.
_DIGITS = re.compile(r"[0-9]{1,9}")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)", re.ASCII)
_MIN_INTERVAL = 0.001
# A search that finds no tick within this many years stops (a bug guard: parse() refuses
# expressions that can never fire, and any day of the year falls on every weekday within
# one 400-year Gregorian cycle).
_SEARCH_YEARS = 401
# Days each month can have (February 29 in leap years).
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_MINUTE = timedelta(minutes=1)
_TZ_PREFIXES = ("CRON_TZ=", "TZ=")


def parse_duration(text: str) -> float:
    """Parse ``30s``, ``5m``, ``1h30m``, ``500ms``... into seconds (> 0); ConfigurationError otherwise."""
    cleaned = text.strip().lower().replace(" ", "")
    position = 0
    total = 0.0
    for match in _DURATION_PART.finditer(cleaned):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if not cleaned or position != len(cleaned) or not (math.isfinite(total) and total > 0):
        raise ConfigurationError(f"invalid duration {text!r}: expected e.g. '30s', '5m', '1h30m', '500ms'")
    return total


def _parse_field(
    expression: str, index: int, text: str, *, low: int, high: int, names: dict[str, int]
) -> frozenset[int]:
    where = f"invalid cron expression {expression!r}: {_FIELD_NAMES[index]} field {text!r}"
    values: set[int] = set()

    def number(token: str) -> int:
        if token in names:
            return names[token]
        if not _DIGITS.fullmatch(token):
            raise ConfigurationError(f"{where}: bad value {token!r} (expected {low}-{high} in ASCII digits)")
        return int(token)

    for item in text.split(","):
        step = 1
        part = item
        if "/" in item:
            part, step_text = item.split("/", 1)
            if not _DIGITS.fullmatch(step_text) or int(step_text) < 1:
                raise ConfigurationError(f"{where}: bad step {step_text!r} (expected a whole number >= 1)")
            step = int(step_text)
        if part == "*":
            start, end = low, high
        elif "-" in part:
            first, last = part.split("-", 1)
            start, end = number(first), number(last)
        else:
            start = number(part)
            end = high if step != 1 else start
        if not (low <= start <= high and low <= end <= high) or start > end:
            raise ConfigurationError(f"{where}: {part!r} is outside {low}-{high}")
        values.update(range(start, end + 1, step))
    return frozenset(values)


def _next_in(allowed: tuple[int, ...], value: int) -> int | None:
    """The smallest of the sorted ``allowed`` that is >= ``value``, or None."""
    index = bisect.bisect_left(allowed, value)
    return allowed[index] if index < len(allowed) else None


@dataclass(frozen=True)
class CronSchedule:
    """A parsed cron expression; :meth:`next_after` and :meth:`last_at` give its ticks. Immutable."""

    expression: str
    interval: float | None = None
    minutes: frozenset[int] = field(default=frozenset(), repr=False)
    hours: frozenset[int] = field(default=frozenset(), repr=False)
    days: frozenset[int] = field(default=frozenset(), repr=False)
    months: frozenset[int] = field(default=frozenset(), repr=False)
    weekdays: frozenset[int] = field(default=frozenset(), repr=False)
    # Vixie's DOM_STAR / DOW_STAR: the field starts with "*" (so "*/2" counts as a star).
    days_restricted: bool = field(default=False, repr=False)
    weekdays_restricted: bool = field(default=False, repr=False)
    # Vixie's MIN_STAR | HR_STAR: the schedule follows the real clock across DST changes.
    wildcard: bool = field(default=False, repr=False)
    tz: tzinfo = field(default=timezone.utc, repr=False)

    @cached_property
    def _sorted_minutes(self) -> tuple[int, ...]:
        return tuple(sorted(self.minutes))

    @cached_property
    def _sorted_hours(self) -> tuple[int, ...]:
        return tuple(sorted(self.hours))

    def _day_matches(self, moment: datetime) -> bool:
        weekday = (moment.weekday() + 1) % 7  # Python: Monday 0; cron: Sunday 0
        if self.days_restricted and self.weekdays_restricted:
            return moment.day in self.days or weekday in self.weekdays
        return moment.day in self.days and weekday in self.weekdays

    def _next_wall(self, wall: datetime, last_year: int) -> datetime | None:
        """The first naive wall-clock minute >= ``wall`` (minute-aligned) matching the fields, or None.

        Raises OverflowError past year 9999.
        """
        day = timedelta(days=1)
        while wall.year <= last_year:
            if wall.month not in self.months:
                year, month = (wall.year + 1, 1) if wall.month == 12 else (wall.year, wall.month + 1)
                wall = wall.replace(year=year, month=month, day=1, hour=0, minute=0)
                continue
            if not self._day_matches(wall):
                wall = wall.replace(hour=0, minute=0) + day
                continue
            hour = _next_in(self._sorted_hours, wall.hour)
            if hour is None:
                wall = wall.replace(hour=0, minute=0) + day
                continue
            if hour != wall.hour:
                wall = wall.replace(hour=hour, minute=0)
            minute = _next_in(self._sorted_minutes, wall.minute)
            if minute is None:
                wall = wall.replace(minute=0) + timedelta(hours=1)
                continue
            return wall.replace(minute=minute)
        return None

    def _instant(self, wall: datetime, fold: int) -> float | None:
        """The instant of naive ``wall`` read with ``fold`` (PEP 495), under this schedule's DST rules.

        None when ``wall`` does not exist (a spring-forward gap) and the schedule is a
        wildcard one; a fixed-time schedule gets the first instant after the gap instead.
        For both folds the mapping never decreases as ``wall`` grows: that is what lets
        :meth:`next_after` walk wall-clock minutes in order.
        """
        instant = wall.replace(tzinfo=self.tz, fold=fold).timestamp()
        if datetime.fromtimestamp(instant, self.tz).replace(tzinfo=None) == wall:
            return instant
        if self.wildcard:
            return None
        return self._gap_end(wall)

    def _gap_end(self, wall: datetime) -> float:
        """The first instant (whole second) whose wall-clock time is past the nonexistent ``wall``."""
        # fold=1 reads ``wall`` with the offset after the jump (an instant before it),
        # fold=0 with the offset before the jump (an instant after it).
        low = math.floor(wall.replace(tzinfo=self.tz, fold=1).timestamp())
        high = math.ceil(wall.replace(tzinfo=self.tz, fold=0).timestamp())
        while high - low > 1:  # invariant: local(low) <= wall < local(high)
            middle = (low + high) // 2
            if datetime.fromtimestamp(middle, self.tz).replace(tzinfo=None) > wall:
                high = middle
            else:
                low = middle
        return float(high)

    def _next_for_fold(self, now: float, fold: int) -> float | None:
        """The first tick after ``now`` among wall times read with ``fold``; None past year 9999."""
        try:
            aware = datetime.fromtimestamp(now, self.tz)
            local = aware.replace(tzinfo=None)
            # Start from the wall time ``now`` has under the smaller (later-pass) offset: no
            # wall time before it maps past ``now`` with either fold, so no tick is missed.
            later_offset = local.replace(tzinfo=self.tz, fold=1).utcoffset()
            offset = aware.utcoffset()
            start = local if later_offset is None or offset is None else local - offset + later_offset
            wall = self._next_wall(start.replace(second=0, microsecond=0), local.year + _SEARCH_YEARS)
            while wall is not None:
                instant = self._instant(wall, fold)
                if instant is not None and instant > now:
                    return instant
                wall = self._next_wall(wall + _MINUTE, local.year + _SEARCH_YEARS)
        except (OverflowError, ValueError, OSError):  # outside datetime's years 1-9999
            return None
        return None

    def next_after(self, when: float | None = None) -> float:
        """The first tick strictly after ``when`` (epoch seconds; default: now); always ``> when``.

        Across a DST change it follows the rules in the module docstring: a fixed-time
        expression fires a repeated wall-clock time once (first occurrence) and a
        nonexistent one at the end of the gap; a wildcard expression fires on the real
        clock (both passes of a repeated hour, nothing inside a gap). Pure, thread-safe;
        raises ConfigurationError when no tick exists before year 10000.
        """
        now = _moment(when)
        if self.interval is not None:
            return _interval_tick(self.interval, now, after=True)
        folds = (0, 1) if self.wildcard else (0,)
        ticks = [tick for tick in (self._next_for_fold(now, fold) for fold in folds) if tick is not None]
        if not ticks:
            raise ConfigurationError(f"invalid cron expression {self.expression!r}: no tick after {now!r}")
        return min(ticks)

    def last_at(self, when: float | None = None) -> float:
        """The latest tick at or before ``when`` (epoch seconds; default: now); always ``<= when``."""
        now = _moment(when)
        if self.interval is not None:
            return _interval_tick(self.interval, now, after=False)
        # Step back in growing windows until a tick is found, then walk forward to the last one.
        window = 120.0
        while window <= 86400.0 * 366 * _SEARCH_YEARS:
            try:
                tick = self.next_after(now - window)
            except (ConfigurationError, OverflowError, OSError, ValueError):  # before year 1
                break
            if tick <= now:
                following = self.next_after(tick)
                while following <= now:
                    tick, following = following, self.next_after(following)
                return tick
            window *= 4
        raise ConfigurationError(f"invalid cron expression {self.expression!r}: no tick at or before {now!r}")


def _moment(when: float | None) -> float:
    """``when`` as float epoch seconds (default: now); ConfigurationError unless finite."""
    now = time.time() if when is None else float(when)
    if not math.isfinite(now):
        raise ConfigurationError(f"a cron time must be finite epoch seconds, got {when!r}")
    return now


def _interval_tick(interval: float, now: float, *, after: bool) -> float:
    """The first multiple of ``interval`` > ``now`` (``after``), else the last one <= ``now``."""
    count = math.floor(now / interval)
    # Float rounding can put count * interval on either side of now: settle it exactly.
    while count * interval > now:
        count -= 1
    while (count + 1) * interval <= now:
        count += 1
    return (count + 1) * interval if after else count * interval


def _zone(tz: tzinfo | str | None) -> tzinfo:
    if tz is None:
        return timezone.utc
    if isinstance(tz, tzinfo):
        return tz
    if isinstance(tz, str):
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError  # here: a schedule in UTC never loads the tz database

        try:
            return ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigurationError(f"unknown time zone {tz!r}: expected an IANA name like 'Europe/Berlin'") from None
    raise ConfigurationError(f"tz must be a tzinfo, an IANA zone name or None, got {tz!r}")


def _can_fire(days: frozenset[int], months: frozenset[int]) -> bool:
    """Whether some month in ``months`` has some day in ``days`` (Feb 29 counts: leap years come)."""
    return any(day <= _MONTH_DAYS[month - 1] for month in months for day in days)


def parse(expression: str, *, tz: tzinfo | str | None = None) -> CronSchedule:
    """Parse a cron expression (see the module docstring); ConfigurationError names a bad one and its field.

    ``tz`` is the zone the five fields are read in: a ``tzinfo`` or an IANA name
    (default UTC); ``@every`` ignores it. A ``CRON_TZ=<IANA name>`` (or ``TZ=``) first
    word names the zone inside the expression (a ``tz`` naming another one is refused).
    """
    if not isinstance(expression, str):
        raise ConfigurationError(f"cron expression must be a str, got {expression!r}")
    words = expression.split()
    zone = _zone(tz)
    if words and words[0].upper().startswith(_TZ_PREFIXES):
        prefixed = _zone(words[0].split("=", 1)[1])
        if tz is not None and prefixed != zone:
            raise ConfigurationError(
                f"invalid cron expression {expression!r}: its CRON_TZ= prefix and tz={tz!r} name different zones"
            )
        zone, words = prefixed, words[1:]
    text = " ".join(words).lower()
    if text.startswith("@every"):
        rest = text[len("@every") :].strip()
        if not rest:
            raise ConfigurationError(f"invalid cron expression {expression!r}: '@every' needs a duration")
        try:
            interval = parse_duration(rest)
        except ConfigurationError as error:
            raise ConfigurationError(f"invalid cron expression {expression!r}: {error}") from None
        if interval < _MIN_INTERVAL:
            raise ConfigurationError(f"invalid cron expression {expression!r}: the interval must be at least 1ms")
        return CronSchedule(expression, interval=interval)
    if text.startswith("@"):
        if text not in _MACROS:
            known = ", ".join([*_MACROS, "@every <duration>"])
            raise ConfigurationError(f"invalid cron expression {expression!r}: unknown macro; known: {known}")
        text = _MACROS[text]
    fields = text.split(" ")
    if len(fields) != 5:
        raise ConfigurationError(
            f"invalid cron expression {expression!r}: expected 5 fields "
            f"(minute hour day-of-month month day-of-week), got {len(fields)}"
        )
    minute, hour, day, month, weekday = fields
    minutes = _parse_field(expression, 0, minute, low=0, high=59, names={})
    hours = _parse_field(expression, 1, hour, low=0, high=23, names={})
    days = _parse_field(expression, 2, day, low=1, high=31, names={})
    months = _parse_field(expression, 3, month, low=1, high=12, names=_MONTHS)
    # Day of week 7 is Sunday as well as 0.
    weekdays = frozenset(value % 7 for value in _parse_field(expression, 4, weekday, low=0, high=7, names=_DAYS))
    days_restricted = not day.startswith("*")
    weekdays_restricted = not weekday.startswith("*")
    # Both restricted: a matching weekday alone fires, so only the AND form can be empty.
    if not (days_restricted and weekdays_restricted) and not _can_fire(days, months):
        raise ConfigurationError(
            f"invalid cron expression {expression!r}: it never fires (no month in {month!r} has a day in {day!r})"
        )
    return CronSchedule(
        expression,
        minutes=minutes,
        hours=hours,
        days=days,
        months=months,
        weekdays=weekdays,
        days_restricted=days_restricted,
        weekdays_restricted=weekdays_restricted,
        wildcard=minute.startswith("*") or hour.startswith("*"),
        tz=zone,
    )
