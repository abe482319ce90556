"""Cron schedules for the job engine: 5-field expressions, macros and ``@every``.

:func:`parse` turns an expression into a :class:`CronSchedule`, whose ticks are
points in time (float epoch seconds). Every process computes the same ticks for the
same expression, which is what lets the engine fire each tick once across processes
(the store records the last tick fired). Accepted forms:

- five fields ``minute hour day-of-month month day-of-week`` with ``*``, ``a``,
  ``a-b``, ``*/n``, ``a-b/n``, ``a/n`` and lists ``a,b``; month and weekday names
  (``jan``, ``mon``); weekday 0 or 7 is Sunday. When both day fields are restricted a
  day matches either (as in Vixie cron). Evaluated in UTC unless a ``tz`` is given.
- ``@yearly`` (``@annually``), ``@monthly``, ``@weekly``, ``@daily`` (``@midnight``),
  ``@hourly``.
- ``@every <duration>``: ``30s``, ``5m``, ``1h30m``, ``500ms``, ``1.5s``, ``2d``; ticks
  are the multiples of the duration since the Unix epoch.

An invalid expression raises ConfigurationError naming it. Everything here is pure
and thread-safe.
"""

from __future__ import annotations

import calendar
import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo

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
_MONTHS = {name: index for index, name in enumerate(calendar.month_abbr) if name}
_MONTHS = {name.lower(): index for name, index in _MONTHS.items()}
_DAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
# A schedule that does not fire within this many years never will (e.g. "0 0 30 2 *").
_SEARCH_YEARS = 8


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


def _parse_field(expression: str, text: str, low: int, high: int, names: dict[str, int]) -> frozenset[int]:
    values: set[int] = set()

    def number(token: str) -> int:
        token = token.lower()
        if token in names:
            return names[token]
        if not token.isdigit():
            raise ConfigurationError(f"invalid cron expression {expression!r}: bad value {token!r} in {text!r}")
        return int(token)

    for item in text.split(","):
        step = 1
        part = item
        if "/" in item:
            part, step_text = item.split("/", 1)
            if not step_text.isdigit() or int(step_text) < 1:
                raise ConfigurationError(f"invalid cron expression {expression!r}: bad step in {text!r}")
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
            raise ConfigurationError(
                f"invalid cron expression {expression!r}: {part!r} is outside {low}-{high} in {text!r}"
            )
        values.update(range(start, end + 1, step))
    return frozenset(values)


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
    days_restricted: bool = field(default=False, repr=False)
    weekdays_restricted: bool = field(default=False, repr=False)
    tz: tzinfo = field(default=timezone.utc, repr=False)

    def _day_matches(self, moment: datetime) -> bool:
        weekday = (moment.weekday() + 1) % 7  # Python: Monday 0; cron: Sunday 0
        if self.days_restricted and self.weekdays_restricted:
            return moment.day in self.days or weekday in self.weekdays
        return moment.day in self.days and weekday in self.weekdays

    def next_after(self, when: float | None = None) -> float:
        """The first tick strictly after ``when`` (epoch seconds; default: now)."""
        now = time.time() if when is None else float(when)
        if self.interval is not None:
            return (math.floor(now / self.interval) + 1) * self.interval
        moment = datetime.fromtimestamp(now, self.tz).replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit = moment.year + _SEARCH_YEARS
        while moment.year <= limit:
            if moment.month not in self.months:
                year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
                moment = moment.replace(year=year, month=month, day=1, hour=0, minute=0)
                continue
            if not self._day_matches(moment):
                moment = (moment + timedelta(days=1)).replace(hour=0, minute=0)
                continue
            if moment.hour not in self.hours:
                moment = (moment + timedelta(hours=1)).replace(minute=0)
                continue
            if moment.minute not in self.minutes:
                moment += timedelta(minutes=1)
                continue
            return moment.timestamp()
        raise ConfigurationError(f"invalid cron expression {self.expression!r}: it never fires")

    def last_at(self, when: float | None = None) -> float:
        """The latest tick at or before ``when`` (epoch seconds; default: now)."""
        now = time.time() if when is None else float(when)
        if self.interval is not None:
            return math.floor(now / self.interval) * self.interval
        # Step back in growing windows until a tick is found, then walk forward to the last one.
        window = 3600.0
        while True:
            tick = self.next_after(now - window)
            if tick <= now:
                following = self.next_after(tick)
                while following <= now:
                    tick, following = following, self.next_after(following)
                return tick
            window *= 4
            if window > 86400.0 * 366 * _SEARCH_YEARS:
                raise ConfigurationError(f"invalid cron expression {self.expression!r}: it never fires")


def parse(expression: str, *, tz: tzinfo | None = None) -> CronSchedule:
    """Parse a cron expression (see the module docstring); ConfigurationError names a bad one.

    ``tz`` is the zone the five fields are read in (default UTC); ``@every`` ignores it.
    """
    if not isinstance(expression, str):
        raise ConfigurationError(f"cron expression must be a str, got {expression!r}")
    text = " ".join(expression.split()).lower()
    if text.startswith("@every"):
        rest = text[len("@every") :].strip()
        if not rest:
            raise ConfigurationError(f"invalid cron expression {expression!r}: '@every' needs a duration")
        try:
            interval = parse_duration(rest)
        except ConfigurationError as error:
            raise ConfigurationError(f"invalid cron expression {expression!r}: {error}") from None
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
    schedule = CronSchedule(
        expression,
        minutes=_parse_field(expression, minute, 0, 59, {}),
        hours=_parse_field(expression, hour, 0, 23, {}),
        days=_parse_field(expression, day, 1, 31, {}),
        months=_parse_field(expression, month, 1, 12, _MONTHS),
        # Day of week 7 is Sunday as well as 0.
        weekdays=frozenset(value % 7 for value in _parse_field(expression, weekday, 0, 7, _DAYS)),
        days_restricted=day != "*",
        weekdays_restricted=weekday != "*",
        tz=timezone.utc if tz is None else tz,
    )
    schedule.next_after(0.0)  # refuses a schedule that never fires
    return schedule
