"""Futures that cost what they must (issue 14): no Condition per entry until someone waits, and no
Future at all per message when an AsyncDispatcher hands messages to a BatchedDispatcher."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import pytest

from threaddispatch import AsyncDispatcher, BackgroundDispatcher, BatchedDispatcher
from threaddispatch.backoff import Constant, RetryPolicy
from threaddispatch.errors import DispatcherClosedError
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(30)


def _no_condition_yet(future: Future[Any]) -> bool:
    """Whether ``future`` has not built its Condition (a LazyFuture nobody waited on)."""
    return "_cond" not in vars(future) and "_condition" not in vars(future)


def test_background_submit_futures_make_no_condition_until_waited() -> None:
    """BackgroundDispatcher.submit's Future settles without building a Condition; result() still waits."""
    with BackgroundDispatcher[object](lambda _batch: None, ms_delay=1) as dispatcher:
        futures = [dispatcher.submit(i) for i in range(50)]
        assert dispatcher.flush(10)
        assert all(future.done() and _no_condition_yet(future) for future in futures)
        late = dispatcher.submit("late")
        assert late.result(10) is None


def test_batched_submit_futures_make_no_condition_until_waited() -> None:
    """BatchedDispatcher.submit's Future settles without building a Condition; dispatch() still waits."""
    with BatchedDispatcher(lambda _t, ms: [f"id-{m}" for m in ms], flush_interval=0.001) as bd:
        futures = [bd.submit(i, "q") for i in range(30)]
        assert bd.flush(10)
        assert [future.result(0) for future in futures] == [f"id-{i}" for i in range(30)]
        assert all(_no_condition_yet(future) for future in futures)
        assert bd.dispatch("waited", "q", timeout=10) == "id-waited"


def test_async_hands_messages_to_batched_without_a_future_per_message() -> None:
    """AsyncDispatcher feeding a BatchedDispatcher never calls its public submit (no Future per message),
    and successes, failures and retries still settle as before."""
    failing = {"bad", "flaky"}
    attempts: dict[str, int] = {}

    def send_batch(_target: str, messages: list[str]) -> list[Any]:
        results: list[Any] = []
        for message in messages:
            attempts[message] = attempts.get(message, 0) + 1
            if message in failing and not (message == "flaky" and attempts[message] > 1):
                results.append(RuntimeError(message))
            else:
                results.append(f"id-{message}")
        return results

    failed: list[str] = []
    with BatchedDispatcher(send_batch, max_batch_size=5, flush_interval=0.001) as bd:
        submits = 0
        real_submit = bd.submit

        def counting_submit(*args: Any, **kwargs: Any) -> Future[str | None]:
            nonlocal submits
            submits += 1
            return real_submit(*args, **kwargs)

        bd.submit = counting_submit  # type: ignore[method-assign]
        ad: AsyncDispatcher[str] = AsyncDispatcher(
            bd,
            "q",
            lambda fm: failed.append(fm.message),
            retry=RetryPolicy(max_attempts=2, backoff=Constant(0.001)),
        )
        sender = ad.setup(100)
        ad.start()
        for message in ["a", "bad", "b", "flaky", "c"]:
            sender.put(message, timeout=5)
        wait_for(lambda: failed == ["bad"] and ad.stats()["sent"] == 4, 10, message="all settled")
        assert ad.stop(10)
        assert submits == 0
        assert ad.stats()["sent"] == 4 and failed == ["bad"]
        assert attempts == {"a": 1, "bad": 2, "b": 1, "flaky": 2, "c": 1}
        assert bd.stats()["sent"] == 4


def test_a_handed_message_in_a_batch_whose_send_raises_is_retried_then_reported() -> None:
    """A send_batch that raises fails every handed message of the batch; each is retried, then reported."""
    calls: list[list[str]] = []

    def send_batch(_target: str, messages: list[str]) -> list[Any]:
        calls.append(list(messages))
        raise RuntimeError("down")

    failed: list[str] = []
    with BatchedDispatcher(send_batch, max_batch_size=10, flush_interval=0.001) as bd:
        ad: AsyncDispatcher[str] = AsyncDispatcher(
            bd, "q", lambda fm: failed.append(fm.message), retry=RetryPolicy(max_attempts=2, backoff=Constant(0))
        )
        sender = ad.setup(10)
        ad.start()
        sender.put("x", timeout=5)
        wait_for(lambda: failed == ["x"], 10, message="x reported")
        assert ad.stop(10)
        assert sum(batch.count("x") for batch in calls) == 2


def test_a_message_handed_to_a_closed_batched_dispatcher_fails_and_the_rest_still_settle() -> None:
    """A hand-off the BatchedDispatcher refuses (it is closed) fails that message only: it reaches the error
    handler with DispatcherClosedError, and the AsyncDispatcher still stops cleanly."""
    failed: list[Any] = []
    bd: BatchedDispatcher[str] = BatchedDispatcher(lambda _t, ms: [None] * len(ms), flush_interval=0.001)
    assert bd.close(10)
    ad: AsyncDispatcher[str] = AsyncDispatcher(bd, "q", lambda fm: failed.append((fm.message, type(fm.error))))
    sender = ad.setup(10)
    ad.start()
    for message in ("a", "b"):
        sender.put(message, timeout=5)
    wait_for(lambda: len(failed) == 2, 10, message="both reported")
    assert failed == [("a", DispatcherClosedError), ("b", DispatcherClosedError)]
    assert ad.stop(10)


def test_a_batched_submit_future_is_its_own_entry_and_holds_no_cycle() -> None:
    """The Future submit returns is also the message's entry (its ``future`` is itself, through a
    property, not a reference a collection would have to break); sending and cancelling are as before."""
    import gc

    sent: list[int] = []

    def send_batch(_target: str, messages: list[int]) -> list[str]:
        sent.extend(messages)
        return [f"id-{m}" for m in messages]

    with BatchedDispatcher(send_batch, max_batch_size=10, flush_interval=60.0) as dispatcher:
        kept: Any = dispatcher.submit(1, "t")
        cancelled = dispatcher.submit(2, "t")
        assert cancelled.cancel()
        assert kept.future is kept
        assert kept not in gc.get_referents(kept)
        assert dispatcher.flush(10)
        assert kept.result(0) == "id-1"
        assert sent == [1]
