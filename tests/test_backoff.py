"""Backoff schedules and RetryPolicy."""

from __future__ import annotations

import math
import random

import pytest

from threaddispatch import ConfigurationError, Constant, Exponential, ExponentialJitter, Linear, RetryPolicy


def test_constant_linear_exponential_schedules() -> None:
    """Each schedule gives the documented delay per attempt, capped at max."""
    assert [Constant(0.5)(n) for n in (1, 2, 9)] == [0.5, 0.5, 0.5]
    assert [Linear(1.0, 2.0, max=6.0)(n) for n in (1, 2, 3, 4)] == [1.0, 3.0, 5.0, 6.0]
    assert [Exponential(1.0, 2.0, max=10.0)(n) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 8.0, 10.0]


def test_exponential_never_overflows() -> None:
    """A huge attempt number is capped, not an OverflowError."""
    assert Exponential(1.0, 10.0, max=60.0)(10_000) == 60.0


def test_jitter_stays_within_its_band() -> None:
    """ExponentialJitter(jitter=0.5) stays in [d/2, d]; jitter=1 in [0, d]; seeded rng repeats."""
    equal = ExponentialJitter(1.0, 2.0, max=100.0, jitter=0.5, rng=random.Random(7))
    for attempt in range(1, 8):
        d = 2.0 ** (attempt - 1)
        assert d / 2 <= equal(attempt) <= d
    full = ExponentialJitter(4.0, jitter=1.0, rng=random.Random(1))
    assert all(0.0 <= full(1) <= 4.0 for _ in range(100))


def test_seeded_jitter_is_reproducible() -> None:
    """Two schedules with equally seeded generators give the same delays."""
    a = ExponentialJitter(1.0, rng=random.Random(42))
    b = ExponentialJitter(1.0, rng=random.Random(42))
    assert [a(n) for n in range(1, 6)] == [b(n) for n in range(1, 6)]


@pytest.mark.parametrize(
    "make",
    [
        lambda: Constant(-1),
        lambda: Constant(math.nan),
        lambda: Linear(step="1"),  # type: ignore[arg-type]
        lambda: Exponential(factor=0.5),
        lambda: Exponential(max=math.inf),
        lambda: ExponentialJitter(jitter=1.5),
        lambda: RetryPolicy(max_attempts=0),
        lambda: RetryPolicy(backoff=3),  # type: ignore[arg-type]
        lambda: RetryPolicy(retry_on="yes"),  # type: ignore[arg-type]
    ],
)
def test_bad_parameters_raise_configuration_errors(make: object) -> None:
    """Invalid schedule or policy parameters are refused at construction."""
    with pytest.raises(ConfigurationError):
        make()  # type: ignore[operator]


def test_attempt_must_be_a_positive_int() -> None:
    """Calling a schedule with attempt 0 is an error naming the value."""
    with pytest.raises(ConfigurationError, match="0"):
        Constant(1.0)(0)


def test_retry_policy_counts_attempts_and_asks_the_predicate() -> None:
    """should_retry is false at max_attempts, false when retry_on says no, and when retry_on raises."""
    policy = RetryPolicy(max_attempts=3, backoff=Constant(0.1), retry_on=lambda e: not isinstance(e, KeyError))
    assert policy.should_retry(1, TimeoutError())
    assert policy.should_retry(2, TimeoutError())
    assert not policy.should_retry(3, TimeoutError())
    assert not policy.should_retry(1, KeyError())

    def broken(_e: BaseException) -> bool:
        raise RuntimeError("predicate bug")

    assert not RetryPolicy(retry_on=broken).should_retry(1, TimeoutError())
    assert policy.delay(1) == 0.1


def test_retry_policy_clamps_bad_backoff_results() -> None:
    """A user backoff returning a negative or NaN delay is clamped to 0."""
    assert RetryPolicy(backoff=lambda n: -5.0).delay(1) == 0.0
    assert RetryPolicy(backoff=lambda n: math.nan).delay(1) == 0.0


@pytest.mark.parametrize("delay", [10**400, -(10**400)], ids=["huge", "minus-huge"])
def test_an_int_too_large_for_a_float_is_a_configuration_error(delay: int) -> None:
    """Seconds given as an int past float range raise ConfigurationError naming the argument, not OverflowError."""
    with pytest.raises(ConfigurationError, match="delay"):
        Constant(delay)
