"""Backoff schedules and the retry policy every face shares.

A backoff is any callable ``attempt -> seconds``, where ``attempt`` is 1 for the
delay before the first retry, 2 before the second, and so on. The classes here are
such callables, immutable and thread-safe.

Every delay they compute, and every delay :meth:`RetryPolicy.next_delay` returns (a user
backoff's, a ``Retry(delay)``'s), is a finite float from 0 to :data:`MAX_DELAY`: a huge
parameter, factor or attempt number gives the cap, never ``inf`` or an OverflowError.
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
    "MAX_DELAY",
    "Backoff",
    "Constant",
    "Exponential",
    "ExponentialJitter",
    "Linear",
    "RetryPolicy",
    "check_seconds",
]

Backoff = Callable[[int], float]

#: The longest retry delay, in seconds (30 days): longer ones (and ``inf``) are cut to it. Below
#: ``threading.TIMEOUT_MAX`` on every platform (Windows: 49.7 days), so a wait on it never overflows,
#: and a job's ``run_at`` stays a date every store and ``datetime`` can hold.
MAX_DELAY = 30 * 86400.0

_log = logging.getLogger("threaddispatch")


def _retry_delay(delay: object) -> float | None:
    """A ``Retry``'s delay as seconds (at most MAX_DELAY), or None (final) when it is not a finite number >= 0."""
    try:
        return min(check_seconds("Retry delay", delay), MAX_DELAY)
    except ConfigurationError:
        _log.warning("Retry(delay=%s) is not a finite number of seconds >= 0; the failure is final", show(delay))
        return None


def _check_attempt(attempt: int) -> int:
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ConfigurationError(f"attempt must be an int >= 1, got {attempt!r}")
    return attempt


@dataclass(frozen=True)
class Constant:
    """The same ``delay`` before every retry (at most :data:`MAX_DELAY`)."""

    delay: float = 1.0

    def __post_init__(self) -> None:
        check_seconds("delay", self.delay)

    def __call__(self, attempt: int) -> float:
        _check_attempt(attempt)
        return min(float(self.delay), MAX_DELAY)


@dataclass(frozen=True)
class Linear:
    """``initial + step * (attempt - 1)`` seconds, capped at ``max`` (and :data:`MAX_DELAY`)."""

    initial: float = 1.0
    step: float = 1.0
    max: float = 60.0

    def __post_init__(self) -> None:
        check_seconds("initial", self.initial)
        check_seconds("step", self.step)
        check_seconds("max", self.max)

    def __call__(self, attempt: int) -> float:
        _check_attempt(attempt)
        try:
            raw = self.initial + self.step * (attempt - 1)
        except OverflowError:  # an attempt number too large for a float
            raw = math.inf if self.step else self.initial
        return min(float(self.max), float(raw), MAX_DELAY)


@dataclass(frozen=True)
class Exponential:
    """``initial * factor ** (attempt - 1)`` seconds, capped at ``max`` (and :data:`MAX_DELAY`)."""

    initial: float = 1.0
    factor: float = 2.0
    max: float = 60.0

    def __post_init__(self) -> None:
        check_seconds("initial", self.initial)
        check_seconds("max", self.max)
        factor = self.factor
        try:  # float(): an int past float range is not finite (math.isfinite would raise OverflowError)
            good = not isinstance(factor, bool) and isinstance(factor, (int, float)) and 1 <= float(factor) < math.inf
        except OverflowError:
            good = False
        if not good:
            raise ConfigurationError(f"factor must be a finite number >= 1, got {show(factor)}")

    def __call__(self, attempt: int) -> float:
        _check_attempt(attempt)
        if not self.initial:
            return 0.0  # 0 * factor ** n, whatever n: no overflow can make it the cap
        # Cap the exponent first so a large attempt cannot overflow a float; the factor as a float, so
        # an int factor cannot build a huge int; past float range the product is the cap.
        exponent = min(attempt - 1, 1024)
        try:
            raw = float(self.initial) * float(self.factor) ** exponent
        except OverflowError:
            raw = math.inf
        return min(float(self.max), raw, MAX_DELAY)


@dataclass(frozen=True)
class ExponentialJitter:
    """Exponential backoff with a random share ``jitter`` (0..1) taken off each delay.

    ``jitter=1`` is AWS's "full jitter" (uniform in ``[0, d]``); the default 0.5 is
    "equal jitter" (uniform in ``[d/2, d]``), which spreads retries without ever
    retrying at once. ``rng`` may be given for reproducible delays: an object whose ``random()``
    returns a float in ``[0, 1)`` (a value outside it is taken as 0, so a broken one gives the ceiling).
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
        if not callable(getattr(self.rng, "random", None)):
            raise ConfigurationError(f"rng must have a random() method (a random.Random), got {show(self.rng)}")

    def __call__(self, attempt: int) -> float:
        ceiling = Exponential(self.initial, self.factor, self.max)(attempt)
        share = self.rng.random()
        if not 0.0 <= share <= 1.0:  # NaN too: the delay stays within [0, ceiling]
            share = 0.0
        return float(ceiling * (1.0 - self.jitter * share))


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

        A predicate that raises (a BaseException too) is treated as "do not retry" (the original error stands).
        """
        return attempts_made < self.max_attempts and self._wants_retry(error)

    def _wants_retry(self, error: BaseException) -> bool:
        """``retry_on(error)``; a predicate that raises means "do not retry" (logged)."""
        # BaseException too (SystemExit, KeyboardInterrupt from user code): it must not escape into a worker.
        try:
            return bool(self.retry_on(error))
        except BaseException:  # noqa: BLE001 - a broken predicate must not hide the original error
            _log.exception("retry_on %r raised; the failure is final", self.retry_on)
            return False

    def next_delay(self, attempts_made: int, error: BaseException, *, max_attempts: int | None = None) -> float | None:
        """The one retry decision: seconds before the next attempt, or None to give up. Never raises.

        ``attempts_made`` tries ended in ``error``; ``max_attempts`` (a job's own limit)
        replaces the policy's when given. ``Cancel`` is final at once. ``Retry(delay)``
        retries whatever ``retry_on`` says, after ``delay`` seconds (the backoff when None),
        within the attempt limit; a bad delay (negative, NaN, infinite, not a number) makes
        the failure final. Any other error retries when ``retry_on`` says so, after the
        backoff. A backoff or predicate that raises (a BaseException too) makes the failure
        final (logged). The delay is at most MAX_DELAY.
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
        except BaseException:  # noqa: BLE001 - a broken backoff must not hide the original error (as retry_on)
            _log.exception("backoff %r raised; the failure is final", self.backoff)
            return None

    def delay(self, attempts_made: int) -> float:
        """Seconds to wait before the next attempt, after ``attempts_made`` tries: from 0 to MAX_DELAY.

        The backoff's value, with a negative one or NaN taken as 0 and one past MAX_DELAY (``inf``,
        an int too large for a float) as MAX_DELAY. Raises what the backoff raises.
        """
        value = self.backoff(attempts_made)
        try:
            seconds = float(value)
        except OverflowError:  # an int past float range
            seconds = math.inf if value > 0 else 0.0
        if not seconds > 0:  # negative, zero or NaN
            return 0.0
        return min(seconds, MAX_DELAY)
