"""Async+Batched under load: one send that waited for the GIL or the CPU must not end inline sending.

A send's weight in the running average is capped, and a free send slot is used even while the
engine worker waits for one (both failed before ``_batched_state`` did so).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from threaddispatch import AsyncDispatcher, BatchedDispatcher, _batched_state

pytestmark = pytest.mark.timeout(30)


class _Threads:
    """A quick send_batch that records the thread each batch ran on."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.names: list[str] = []

    def __call__(self, _target: str, messages: list[Any]) -> list[str]:
        with self.lock:
            self.names.append(threading.current_thread().name)
        return ["id"] * len(messages)


def test_one_slow_send_does_not_make_the_sends_after_it_slow() -> None:
    """A single send of 50 ms (a quick one that waited for the GIL) leaves the average under the quick bound."""
    with BatchedDispatcher(_Threads(), max_batch_size=10, name="spike") as bd:
        state = bd._state
        state._timed(time.perf_counter() - 0.05, 10, None, "q")
        assert state.quick()


def test_a_free_slot_is_used_inline_while_the_worker_waits_for_one() -> None:
    """With the engine worker waiting for a slot (not woken yet) and slots free, a hand-off is still sent inline."""
    sends = _Threads()
    with BatchedDispatcher(sends, max_batch_size=10, flush_interval=60.0, name="waiting") as bd:
        state = bd._state
        with state.mutex:
            state.slot_waiters += 1  # as while the worker waits on slot_free
        try:
            ad: AsyncDispatcher[Any] = AsyncDispatcher(bd, "q")
            sender = ad.setup(100)
            for i in range(30):
                sender.put(i)
            ad.start()
            assert ad.stop(10) is True
        finally:
            with state.mutex:
                state.slot_waiters -= 1
        assert sends.names == ["threaddispatch-async-q"] * 3


class _FirstSlow(_Threads):
    """The first send takes over ``_SLOW_BATCH`` itself; the rest are quick."""

    def __call__(self, target: str, messages: list[Any]) -> list[str]:
        with self.lock:
            first = not self.names
        if first:
            time.sleep(_batched_state._SLOW_BATCH * 1.5)  # the send itself is slow (not a wait for a state)
        return super().__call__(target, messages)


def test_a_batch_slow_by_itself_sends_the_rest_of_its_hand_off_on_the_send_threads() -> None:
    """An inline batch that took over ``_SLOW_BATCH``: what is left of that hand-off goes to the send threads."""
    sends = _FirstSlow()
    with BatchedDispatcher(sends, max_batch_size=10, flush_interval=60.0, name="slow-first") as bd:
        ad: AsyncDispatcher[Any] = AsyncDispatcher(bd, "q")
        sender = ad.setup(100)
        for i in range(30):
            sender.put(i)
        ad.start()
        assert ad.stop(10) is True
    assert len(sends.names) == 3
    assert sends.names[0] == "threaddispatch-async-q"
    assert "threaddispatch-async-q" not in sends.names[1:]
