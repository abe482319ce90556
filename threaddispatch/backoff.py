"""Backoff schedules and the retry policy every face shares.

A backoff is any callable ``attempt -> seconds``, where ``attempt`` is 1 for the
delay before the first retry, 2 before the second, and so on. The classes here are
such callables, immutable and thread-safe.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from threaddispatch._validate import check_seconds, show
from threaddispatch.errors import Cancel, ConfigurationError, Retry

__all__ = [
    "Backoff",
    "Constant",
    "Exponential",
    "ExponentialJitter",
    "Linear",
    "RetryPolicy",
    "check_seconds",
]

Backoff = Callable[[int], float]

_log = logging.getLogger("threaddispatch")


def _retry_delay(delay: object) -> float | None:
    """A ``Retry``'s delay as seconds, or None (final) when it is not a finite number >= 0."""
    try:
        return check_seconds("Retry delay", delay)
    except ConfigurationError:
        _log.warning("Retry(delay=%s) is not a finite number of seconds >= 0; the failure is final", show(delay))
        return None


def _check_attempt(attempt: int) -> int:
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ConfigurationError(f"attempt must be an int >= 1, got {attempt!r}")
    return attempt


@dataclass(frozen=True)
class Constant:
    """The same ``delay`` before every retry."""

    delay: float = 1.0

    def __post_init__(self) -> None:
        check_seconds("delay", self.delay)

    def __call__(self, attempt: int) -> float:
        _check_attempt(attempt)
        return float(self.delay)


@dataclass(frozen=True)
class Linear:
    """``initial + step * (attempt - 1)`` seconds, capped at ``max``."""

    initial: float = 1.0
    step: float = 1.0
    max: float = 60.0

    def __post_init__(self) -> None:
        check_seconds("initial", self.initial)
        check_seconds("step", self.step)
        check_seconds("max", self.max)

    def __call__(self, attempt: int) -> float:
        _check_attempt(attempt)
        return float(min(self.max, self.initial + self.step * (attempt - 1)))


@dataclass(frozen=True)
class Exponential:
    """``initial * factor ** (attempt - 1)`` seconds, capped at ``max``."""

    initial: float = 1.0
    factor: float = 2.0
    max: float = 60.0

    def __post_init__(self) -> None:
        check_seconds("initial", self.initial)
        check_seconds("max", self.max)
        if (
            isinstance(self.factor, bool)
            or not isinstance(self.factor, (int, float))
            or not (math.isfinite(self.factor) and self.factor >= 1)
        ):
            raise ConfigurationError(f"factor must be a finite number >= 1, got {self.factor!r}")

    def __call__(self, attempt: int) -> float:
        _check_attempt(attempt)
        # Cap the exponent first so a large attempt cannot overflow a float.
        exponent = min(attempt - 1, 1024)
        try:
            raw = self.initial * self.factor**exponent
        except OverflowError:
            raw = math.inf
        return float(min(self.max, raw))


@dataclass(frozen=True)
class ExponentialJitter:
    """Exponential backoff with a random share ``jitter`` (0..1) taken off each delay.

    ``jitter=1`` is AWS's "full jitter" (uniform in ``[0, d]``); the default 0.5 is
    "equal jitter" (uniform in ``[d/2, d]``), which spreads retries without ever
    retrying at once. ``rng`` may be given for reproducible delays.
    """

    initial: float = 1.0
    factor: float = 2.0
    max: float = 60.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        Exponential(self.initial, self.factor, self.max)  # same validation
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, (int, float)) or not (0 <= self.jitter <= 1):
            raise ConfigurationError(f"jitter must be a number in [0, 1], got {self.jitter!r}")

    def __call__(self, attempt: int) -> float:
        ceiling = Exponential(self.initial, self.factor, self.max)(attempt)
        return float(ceiling * (1.0 - self.jitter * self.rng.random()))


def _always(_error: BaseException) -> bool:
    return True


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts a unit of work gets, how long to wait between them, and which errors retry.

    ``max_attempts`` counts every try, the first included (1 = no retry). ``retry_on``
    is a predicate on the exception; returning False makes the failure final at once.
    """

    max_attempts: int = 3
    backoff: Backoff = field(default_factory=lambda: Exponential(initial=1.0))
    retry_on: Callable[[BaseException], bool] = _always

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be an int >= 1, got {self.max_attempts!r}")
        if not callable(self.backoff):
            raise ConfigurationError(f"backoff must be callable attempt -> seconds, got {self.backoff!r}")
        if not callable(self.retry_on):
            raise ConfigurationError(f"retry_on must be callable exception -> bool, got {self.retry_on!r}")

    def should_retry(self, attempts_made: int, error: BaseException) -> bool:
        """Whether another attempt follows ``attempts_made`` tries that ended in ``error``.

        A predicate that raises is treated as "do not retry" (the original error stands).
        """
        return attempts_made < self.max_attempts and self._wants_retry(error)

    def _wants_retry(self, error: BaseException) -> bool:
        """``retry_on(error)``; a predicate that raises means "do not retry" (logged)."""
        try:
            return bool(self.retry_on(error))
        except Exception:  # noqa: BLE001 - a broken predicate must not hide the original error
            _log.exception("retry_on %r raised; the failure is final", self.retry_on)
            return False

    def next_delay(self, attempts_made: int, error: BaseException, *, max_attempts: int | None = None) -> float | None:
        """The one retry decision: seconds before the next attempt, or None to give up. Never raises.

        ``attempts_made`` tries ended in ``error``; ``max_attempts`` (a job's own limit)
        replaces the policy's when given. ``Cancel`` is final at once. ``Retry(delay)``
        retries whatever ``retry_on`` says, after ``delay`` seconds (the backoff when None),
        within the attempt limit; a bad delay (negative, NaN, infinite, not a number) makes
        the failure final. Any other error retries when ``retry_on`` says so, after the
        backoff. A backoff or predicate that raises makes the failure final (logged).
        """
        limit = self.max_attempts if max_attempts is None else max_attempts
        if isinstance(error, Cancel) or attempts_made >= limit:
            return None
        if isinstance(error, Retry):
            if error.delay is not None:
                return _retry_delay(error.delay)
        elif not self._wants_retry(error):
            return None
        try:
            return self.delay(attempts_made)
        except Exception:  # noqa: BLE001 - a broken backoff must not hide the original error
            _log.exception("backoff %r raised; the failure is final", self.backoff)
            return None

    def delay(self, attempts_made: int) -> float:
        """Seconds to wait before the next attempt, after ``attempts_made`` tries (>= 0, finite)."""
        seconds = float(self.backoff(attempts_made))
        if not math.isfinite(seconds) or seconds < 0:
            return 0.0 if seconds < 0 or math.isnan(seconds) else 3600.0 * 24
        return seconds
