"""AsyncDispatcher's ``buffered`` counter: every message accepted since setup, once, whichever way it came in or left.

``buffered`` is not counted per put: it is what left the buffer plus what the buffer holds
(``_AsyncState.unbuffered``). These pin that each way in and out keeps it exact.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from threaddispatch import AsyncDispatcher, BatchedDispatcher
from threaddispatch.testing import RecordingDispatcher, immediate, wait_for

pytestmark = pytest.mark.timeout(30)


def test_buffered_counts_puts_and_accepted_try_puts_before_and_after_the_loop_took_them() -> None:
    sink: RecordingDispatcher[Any] = RecordingDispatcher()
    ad: AsyncDispatcher[Any] = AsyncDispatcher(sink, "q")
    sender = ad.setup(3)
    sender.put("a")
    assert sender.try_put("b") is True
    sender.put("c")
    assert sender.try_put("refused") is False  # full: not accepted, not counted
    assert (ad.buffered, ad.stats()["buffered"], ad.stats()["waiting"]) == (3, 3, 3)
    ad.start()
    wait_for(lambda: ad.sent == 3)
    sender.put("d")
    wait_for(lambda: ad.sent == 4)
    assert ad.stop(10) is True
    assert (ad.buffered, ad.stats()["buffered"], ad.stats()["waiting"]) == (4, 4, 0)


def test_buffered_counts_messages_taken_in_chunks_by_a_batched_hand_off() -> None:
    with BatchedDispatcher(lambda _t, messages: [None] * len(messages), max_batch_size=10) as bd:
        ad: AsyncDispatcher[Any] = AsyncDispatcher(bd, "q")
        sender = ad.setup(1000)
        for i in range(700):  # more than one chunk, and a partial batch
            sender.put(i)
        ad.start()
        for i in range(55):
            sender.put(i)
        assert ad.stop(10) is True
        assert (ad.buffered, ad.sent) == (755, 755)


def test_buffered_counts_immediate_puts_and_what_was_buffered_before_the_switch() -> None:
    sink: RecordingDispatcher[Any] = RecordingDispatcher()
    ad: AsyncDispatcher[Any] = AsyncDispatcher(sink, "q")
    sender = ad.setup(10)
    sender.put("before")  # buffered, not started: sent first by the immediate put
    with immediate():
        sender.put("now")
        assert sender.try_put("also") is True
        assert sink.messages() == ["before", "now", "also"]
        assert ad.buffered == 3
    sender.put("after")
    assert ad.buffered == 4
    assert ad.stop(10) is True
    assert ad.buffered == 4


def test_buffered_counts_what_a_dying_dispatch_loop_reported_failed() -> None:
    """A fault of the loop's own code fails what it held and what was buffered; they stay counted as accepted."""
    sink: RecordingDispatcher[Any] = RecordingDispatcher()
    failed: list[Any] = []
    ad: AsyncDispatcher[Any] = AsyncDispatcher(sink, "q", failed.append)
    sender = ad.setup(10)
    for i in range(4):
        sender.put(i)
    state = ad._state
    real_next_job = state._next_job
    calls = 0

    def broken_next_job(acks: bool = False) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("a bug in the loop")
        return real_next_job(acks)

    state._next_job = broken_next_job  # type: ignore[method-assign]
    died = threading.Event()
    real_hook = threading.excepthook
    threading.excepthook = lambda args: died.set()
    try:
        ad.start()
        assert died.wait(10)
        wait_for(lambda: len(failed) == 3)
    finally:
        threading.excepthook = real_hook
    assert (ad.sent, ad.failed, ad.buffered, ad.stats()["waiting"]) == (1, 3, 4, 0)
    ad.stop(1)
