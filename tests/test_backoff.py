"""Backoff schedules and RetryPolicy."""

from __future__ import annotations

import math
import random

import pytest

from threaddispatch import (
    Cancel,
    ConfigurationError,
    Constant,
    Exponential,
    ExponentialJitter,
    Linear,
    Retry,
    RetryPolicy,
)


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


class TestNextDelay:
    """RetryPolicy.next_delay: the one retry decision every face asks."""

    policy = RetryPolicy(max_attempts=3, backoff=Constant(2.0), retry_on=lambda e: not isinstance(e, KeyError))

    def test_an_ordinary_error_retries_after_the_backoff_until_the_limit(self) -> None:
        """Attempts 1 and 2 of 3 retry after the backoff; the third is final."""
        assert self.policy.next_delay(1, TimeoutError()) == 2.0
        assert self.policy.next_delay(2, TimeoutError()) == 2.0
        assert self.policy.next_delay(3, TimeoutError()) is None

    def test_retry_on_saying_no_is_final(self) -> None:
        """An error the predicate refuses is final at once."""
        assert self.policy.next_delay(1, KeyError("x")) is None

    def test_cancel_is_final_at_once(self) -> None:
        """Cancel ends the work whatever the attempts left."""
        assert self.policy.next_delay(1, Cancel()) is None

    def test_retry_overrides_the_backoff_and_the_predicate_within_the_limit(self) -> None:
        """Retry(delay) sets the delay, Retry() takes the backoff; neither passes the attempt limit."""
        strict = RetryPolicy(max_attempts=3, backoff=Constant(2.0), retry_on=lambda e: False)
        assert strict.next_delay(1, Retry(delay=0.25)) == 0.25
        assert strict.next_delay(1, Retry()) == 2.0
        assert strict.next_delay(3, Retry(delay=0.25)) is None

    @pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, "soon", True])
    def test_a_retry_whose_delay_went_bad_is_final(self, bad: object) -> None:
        """A Retry whose delay was changed after construction to a bad value makes the failure final."""
        signal = Retry(delay=1.0)
        signal.delay = bad  # type: ignore[assignment]
        assert self.policy.next_delay(1, signal) is None

    def test_a_jobs_own_limit_replaces_the_policys(self) -> None:
        """max_attempts= overrides the policy's limit, higher or lower."""
        assert self.policy.next_delay(3, TimeoutError(), max_attempts=5) == 2.0
        assert self.policy.next_delay(1, TimeoutError(), max_attempts=1) is None

    def test_a_raising_backoff_or_predicate_makes_the_failure_final(self) -> None:
        """next_delay never raises: a broken backoff or predicate gives None."""

        def broken(_: object) -> float:
            raise RuntimeError("bug")

        assert RetryPolicy(backoff=broken).next_delay(1, TimeoutError()) is None
        assert RetryPolicy(retry_on=broken).next_delay(1, TimeoutError()) is None  # type: ignore[arg-type]
