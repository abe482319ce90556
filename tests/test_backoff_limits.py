"""Backoffs at their limits: huge parameters, factors and attempt numbers give finite delays capped at
MAX_DELAY (never inf, never an OverflowError in a worker), and bad parameters raise at construction."""

from __future__ import annotations

import math
import random
import time
from typing import Any

import pytest

from threaddispatch import (
    BackgroundDispatcher,
    ConfigurationError,
    Constant,
    Exponential,
    ExponentialJitter,
    Linear,
    Retry,
    RetryPolicy,
)
from threaddispatch.backoff import MAX_DELAY, Backoff
from threaddispatch.jobs import JobEngine
from threaddispatch.stores import MemoryStore
from threaddispatch.stores.base import JobState
from threaddispatch.testing import wait_for

HUGE = 1e308
ATTEMPTS = [1, 2, 64, 1025, 10_000, 10**30, 10**400]


@pytest.mark.parametrize(
    "backoff",
    [
        Constant(HUGE),
        Linear(initial=HUGE, step=HUGE, max=HUGE),
        Linear(initial=0.0, step=HUGE, max=HUGE),
        Linear(initial=1.0, step=0.0, max=HUGE),
        Exponential(initial=1.0, factor=HUGE, max=HUGE),
        Exponential(initial=HUGE, factor=1.0, max=HUGE),
        Exponential(initial=1e-300, factor=10, max=HUGE),  # an int factor: no huge int is built
        ExponentialJitter(initial=1.0, factor=HUGE, max=HUGE, jitter=0.0),
        ExponentialJitter(initial=HUGE, factor=HUGE, max=HUGE, jitter=1.0, rng=random.Random(3)),
    ],
    ids=repr,
)
def test_every_delay_is_finite_and_capped_at_any_attempt(backoff: Backoff) -> None:
    """No parameter or attempt number gives inf, NaN, a negative delay, more than MAX_DELAY, or an exception."""
    for attempt in ATTEMPTS:
        delay = backoff(attempt)
        assert type(delay) is float
        assert 0.0 <= delay <= MAX_DELAY, (attempt, delay)


def test_a_zero_initial_delay_stays_zero_however_large_the_factor() -> None:
    """Exponential(initial=0): 0 * factor ** n is 0, not the cap, even where factor ** n overflows."""
    assert [Exponential(initial=0.0, factor=HUGE, max=60.0)(n) for n in (1, 2, 3, 10_000)] == [0.0] * 4
    assert Exponential(initial=0, factor=10, max=60.0)(1000) == 0.0


def test_linear_past_float_range_gives_its_max() -> None:
    """Linear with an attempt number too large for a float: its max, not an OverflowError."""
    assert Linear(initial=1.0, step=HUGE, max=60.0)(10**400) == 60.0
    assert Linear(initial=5.0, step=0.0, max=60.0)(10**400) == 5.0


def test_the_cap_is_below_every_platforms_wait_limit() -> None:
    """MAX_DELAY is a few weeks: waitable on every platform (Windows' TIMEOUT_MAX is 49.7 days)."""
    assert 86400.0 <= MAX_DELAY < 4294967.0


@pytest.mark.parametrize(
    ("factor", "shown"),
    [(10**400, "int of 1329 bits"), (math.inf, "inf"), (math.nan, "nan"), (0.999, "0.999"), (True, "True"),
     ("2", "'2'")],
    ids=["int-past-float", "inf", "nan", "below-1", "bool", "str"],
)  # fmt: skip
def test_a_bad_factor_raises_configuration_error_naming_it(factor: Any, shown: str) -> None:
    """A factor past float range, not finite, below 1, not a number: ConfigurationError naming it (no OverflowError)."""
    for make in (Exponential, ExponentialJitter):
        with pytest.raises(ConfigurationError, match="factor") as raised:
            make(factor=factor)
        assert shown in str(raised.value)


@pytest.mark.parametrize("jitter", [-0.01, 1.01, math.nan, math.inf, True, "0.5", None], ids=repr)
def test_a_bad_jitter_raises_naming_it(jitter: Any) -> None:
    """jitter outside [0, 1] or not a number is refused at construction."""
    with pytest.raises(ConfigurationError, match="jitter"):
        ExponentialJitter(jitter=jitter)


def test_jitter_edges_stay_in_their_band() -> None:
    """jitter=0 gives the ceiling exactly; jitter=1 spans [0, ceiling]; max=0 gives 0."""
    assert [ExponentialJitter(1.0, 2.0, max=10.0, jitter=0.0)(n) for n in (1, 2, 5)] == [1.0, 2.0, 10.0]
    full = ExponentialJitter(8.0, max=8.0, jitter=1.0, rng=random.Random(5))
    assert all(0.0 <= full(n) <= 8.0 for n in range(1, 200))
    assert ExponentialJitter(1.0, max=0.0, jitter=1.0)(3) == 0.0


class _Broken(random.Random):
    """A generator whose random() returns a fixed, out-of-range value."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize("value", [1.5, -3.0, math.nan, math.inf], ids=repr)
def test_a_generator_outside_zero_one_cannot_push_the_delay_out_of_its_band(value: float) -> None:
    """An rng whose random() leaves [0, 1] gives the ceiling: never negative, NaN or above it."""
    backoff = ExponentialJitter(4.0, max=4.0, jitter=1.0, rng=_Broken(value))
    assert backoff(1) == 4.0


def test_an_rng_without_random_is_refused_at_construction() -> None:
    """rng must have random(): anything else raises ConfigurationError naming it, not AttributeError in a worker."""
    with pytest.raises(ConfigurationError, match=r"rng.*'not a generator'"):
        ExponentialJitter(rng="not a generator")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("returned", "expected"),
    [(HUGE, MAX_DELAY), (math.inf, MAX_DELAY), (10**400, MAX_DELAY), (-(10**400), 0.0), (math.nan, 0.0), (5, 5.0)],
    ids=["1e308", "inf", "int-past-float", "minus-int-past-float", "nan", "int"],
)
def test_a_user_backoffs_value_is_cut_to_the_cap(returned: float, expected: float) -> None:
    """RetryPolicy takes any callable's value into [0, MAX_DELAY]: a huge one retries after the cap, not never."""
    policy = RetryPolicy(max_attempts=3, backoff=lambda _attempt: returned)
    assert policy.delay(1) == expected
    assert policy.next_delay(1, RuntimeError("down")) == expected


def test_a_huge_retry_delay_is_cut_to_the_cap() -> None:
    """Retry(delay=1e308) from user code retries after MAX_DELAY."""
    assert RetryPolicy(max_attempts=3).next_delay(1, Retry(delay=HUGE)) == MAX_DELAY


@pytest.mark.timeout(60)
def test_a_job_with_a_huge_backoff_is_due_within_the_cap() -> None:
    """A JobEngine whose backoff says 1e308 s schedules the retry at most MAX_DELAY ahead (a real date)."""
    engine = JobEngine(MemoryStore(), poll_interval=0.01, max_poll_interval=0.05, backoff=Constant(HUGE))
    engine.register("fails", lambda ctx, payload: 1 / 0, max_retries=2, timeout=None)
    try:
        engine.start()
        before = time.time()
        job_id = engine.enqueue("fails", None)
        wait_for(lambda: engine.get_job(job_id).state is JobState.RETRYING, timeout=30)
        run_at = engine.get_job(job_id).run_at
        assert before + MAX_DELAY - 60 <= run_at <= time.time() + MAX_DELAY
    finally:
        engine.stop(5.0)


@pytest.mark.timeout(60)
def test_a_dispatcher_retrying_after_the_cap_still_closes_within_its_timeout() -> None:
    """A batch waiting a huge retry delay does not hang or kill the worker: close() returns, reports the loss."""
    failed: list[object] = []

    def send(batch: list[int]) -> None:
        raise RuntimeError("sink down")

    dispatcher = BackgroundDispatcher(
        send, ms_delay=1, retry=RetryPolicy(max_attempts=3, backoff=Constant(HUGE)), on_error=failed.append
    )
    try:
        future = dispatcher.submit(1)
        wait_for(lambda: dispatcher.stats()["retries"] >= 1, timeout=30)
    finally:
        assert dispatcher.close(timeout=2.0) is False
    assert future.done() and isinstance(future.exception(), RuntimeError)
    assert len(failed) == 1


@pytest.mark.parametrize("kind", [KeyboardInterrupt, SystemExit, GeneratorExit])
def test_a_base_exception_from_the_backoff_or_predicate_makes_the_failure_final(kind: type[BaseException]) -> None:
    """next_delay never raises: a BaseException from user code in it gives None (final), as an Exception does."""

    def broken(_value: object) -> bool:
        raise kind("user code")

    assert RetryPolicy(backoff=broken).next_delay(1, TimeoutError()) is None
    assert RetryPolicy(retry_on=broken).next_delay(1, TimeoutError()) is None
    assert not RetryPolicy(retry_on=broken).should_retry(1, TimeoutError())
