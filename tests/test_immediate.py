"""threaddispatch.testing.immediate(): every batching face runs its work on the caller's thread (issue 15).

Inside the block (or a function it decorates) BackgroundDispatcher, its logging handler,
BatchedDispatcher and AsyncDispatcher send each entry before the call that gave it
returns, with the same retries (their delay skipped), hooks and results; entries pending
when the block opens go first, in order; outside it every face is back to normal.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

from threaddispatch import AsyncDispatcher, BackgroundDispatcher, BatchedDispatcher
from threaddispatch._immediate import active
from threaddispatch.background import FailedBatch
from threaddispatch.backoff import Constant, RetryPolicy
from threaddispatch.buffered import FailedMessage
from threaddispatch.errors import Cancel, DispatcherClosedError, DispatchTimeoutError
from threaddispatch.logging import BatchingHandler
from threaddispatch.testing import immediate, wait_for

pytestmark = pytest.mark.timeout(30)

LONG = 600_000  # ms: a window that never closes during a test


class Calls:
    """A send function recording each call's entries and thread; fails an entry ``fail[entry]`` more times."""

    def __init__(self, fail: dict[Any, int] | None = None) -> None:
        self.lock = threading.Lock()
        self.calls: list[list[Any]] = []
        self.threads: list[int] = []
        self.fail = dict(fail or {})

    def send(self, entries: list[Any]) -> None:
        with self.lock:
            self.calls.append(list(entries))
            self.threads.append(threading.get_ident())
            failing = [e for e in entries if self.fail.get(e, 0) > 0]
            for entry in failing:
                self.fail[entry] -= 1
        if failing:
            raise RuntimeError(f"failing {failing}")

    def flat(self) -> list[Any]:
        with self.lock:
            return [entry for call in self.calls for entry in call]


def test_background_entries_go_before_enqueue_returns_on_the_callers_thread() -> None:
    """Inside the block enqueue sends at once, on this thread; submit's Future is done when it returns."""
    calls = Calls()
    with immediate(), BackgroundDispatcher(calls.send, ms_delay=LONG) as dispatcher:
        dispatcher.enqueue("a")
        assert calls.calls == [["a"]]
        future = dispatcher.submit("b")
        assert future.done() and future.result(0) is None
        assert calls.calls == [["a"], ["b"]]
        assert calls.threads == [threading.get_ident()] * 2
        stats = dispatcher.stats()
        assert (stats["enqueued"], stats["sent"], stats["pending"], stats["calls"]) == (2, 2, 0, 2)


def test_background_retries_at_once_and_reports_inline() -> None:
    """A failed send is retried at once (the 60 s backoff skipped); a final failure reaches on_error before enqueue
    returns, and submit's Future carries it."""
    calls = Calls(fail={"flaky": 2, "bad": 99})
    failed: list[FailedBatch[str]] = []
    retry = RetryPolicy(max_attempts=3, backoff=Constant(60.0))
    with immediate(), BackgroundDispatcher(calls.send, ms_delay=LONG, retry=retry, on_error=failed.append) as d:
        d.enqueue("flaky")
        assert calls.calls == [["flaky"]] * 3 and failed == []
        future = d.submit("bad")
        assert [f.entries for f in failed] == [["bad"]] and failed[0].attempts == 3
        assert isinstance(future.exception(0), RuntimeError)
        assert d.stats()["retries"] == 4


def test_background_cancel_is_final_in_immediate_mode() -> None:
    """Cancel from send_batch ends the entry at once, with attempts left."""
    failed: list[FailedBatch[str]] = []

    def cancel(_entries: list[str]) -> None:
        raise Cancel("no")

    retry = RetryPolicy(max_attempts=5, backoff=Constant(60.0))
    with immediate(), BackgroundDispatcher(cancel, ms_delay=LONG, retry=retry, on_error=failed.append) as d:
        d.enqueue("x")
        assert len(failed) == 1 and failed[0].attempts == 1


def test_background_entries_pending_when_the_block_opens_go_first_in_order() -> None:
    """A dispatcher made before the block holds entries in its window: the first immediate enqueue sends them first."""
    calls = Calls()
    with BackgroundDispatcher(calls.send, ms_delay=LONG) as dispatcher:
        dispatcher.enqueue("early-1")
        dispatcher.enqueue("early-2")
        assert calls.calls == []
        with immediate():
            dispatcher.enqueue("now")
            assert calls.flat() == ["early-1", "early-2", "now"]
            assert calls.calls[-1] == ["now"]
        dispatcher.enqueue("after")  # back to the window: not sent yet
        assert calls.flat() == ["early-1", "early-2", "now"]
        assert dispatcher.flush(10)
        assert calls.flat()[-1] == "after"


def test_background_a_send_past_send_timeout_fails_when_it_returns() -> None:
    """The caller's thread cannot be interrupted: a send that ran past send_timeout fails once it returns."""
    failed: list[FailedBatch[str]] = []

    def slow(_entries: list[str]) -> None:
        time.sleep(0.05)

    with immediate(), BackgroundDispatcher(slow, ms_delay=LONG, send_timeout=0.001, on_error=failed.append) as d:
        d.enqueue("slow")
        assert len(failed) == 1 and isinstance(failed[0].error, DispatchTimeoutError)
        assert d.stats()["sent"] == 0


def test_enqueue_after_close_still_raises_in_immediate_mode() -> None:
    """The block changes when work runs, not what is accepted."""
    with immediate():
        dispatcher = BackgroundDispatcher[str](lambda _b: None, ms_delay=LONG)
        dispatcher.close()
        with pytest.raises(DispatcherClosedError):
            dispatcher.enqueue("late")
        with pytest.raises(DispatcherClosedError):
            dispatcher.submit("late")


def test_immediate_as_a_decorator_and_nested() -> None:
    """immediate() decorates a function; nested blocks keep the switch on until the outermost closes."""
    calls = Calls()
    dispatcher = BackgroundDispatcher(calls.send, ms_delay=LONG)

    @immediate()
    def produce() -> None:
        assert active()
        with immediate():
            dispatcher.enqueue(1)
        assert active()
        dispatcher.enqueue(2)

    produce()
    assert not active()
    assert calls.calls == [[1], [2]]
    dispatcher.close()


def test_logging_handler_ships_the_record_inside_the_logging_call() -> None:
    """BatchingHandler is a BackgroundDispatcher: in the block a log call sends its record before it returns."""
    shipped: list[str] = []
    logger = logging.getLogger("threaddispatch.test.immediate")
    logger.propagate = False
    with immediate():
        handler = BatchingHandler(lambda records: shipped.extend(r.getMessage() for r in records), ms_delay=LONG)
        logger.addHandler(handler)
        try:
            logger.warning("hello %s", "world")
            assert shipped == ["hello world"]
        finally:
            logger.removeHandler(handler)
            handler.close()


def test_batched_submit_is_sent_before_it_returns() -> None:
    """BatchedDispatcher: submit runs send_batch on this thread; each Future has its own outcome; dispatch returns."""
    threads: list[int] = []

    def send_batch(target: str, messages: list[str]) -> list[Any]:
        threads.append(threading.get_ident())
        return [RuntimeError(m) if m == "bad" else f"{target}:{m}" for m in messages]

    with immediate(), BatchedDispatcher(send_batch, flush_interval=600.0) as bd:
        good = bd.submit("good", "q")
        bad = bd.submit("bad", "q")
        assert good.result(0) == "q:good"
        assert isinstance(bad.exception(0), RuntimeError)
        assert bd.dispatch("direct", "q", timeout=0) == "q:direct"
        assert threads == [threading.get_ident()] * 3
        assert bd.stats()["sent"] == 2 and bd.stats()["failed"] == 1


def test_batched_queued_messages_go_first_and_held_delays_are_not_waited_for() -> None:
    """Messages queued before the block go first (in their batch, in order); a hold_delays delay is not waited for."""
    calls: list[list[str]] = []

    def send_batch(_target: str, messages: list[str]) -> list[None]:
        calls.append(list(messages))
        return [None] * len(messages)

    with BatchedDispatcher(send_batch, max_batch_size=100, flush_interval=600.0, hold_delays=True) as bd:
        early = [bd.submit(m, "q") for m in ("e1", "e2")]
        with immediate():
            late = bd.submit("delayed", "q", delay_seconds=600)
            assert calls == [["e1", "e2"], ["delayed"]]
            assert all(f.done() for f in [*early, late])


def test_async_put_dispatches_on_the_callers_thread_with_retries_and_the_error_handler() -> None:
    """AsyncDispatcher: put dispatches before it returns (retries at once), and a final failure reaches the error
    handler on this thread; the buffer stays empty."""
    attempts: dict[str, int] = {}
    threads: set[int] = set()
    failed: list[FailedMessage[str]] = []

    class Target:
        def dispatch(self, message: str, target: str, *, delay_seconds: int | None = None) -> str:
            threads.add(threading.get_ident())
            attempts[message] = attempts.get(message, 0) + 1
            if message == "bad" or (message == "flaky" and attempts[message] < 3):
                raise RuntimeError(message)
            return f"id-{message}"

    def handler(fm: FailedMessage[str]) -> None:
        threads.add(threading.get_ident())
        failed.append(fm)

    with immediate():
        ad: AsyncDispatcher[str] = AsyncDispatcher(
            Target(), "q", handler, retry=RetryPolicy(max_attempts=3, backoff=Constant(60.0))
        )
        sender = ad.setup(10)
        sender.put("ok")
        sender.put("flaky")
        assert sender.try_put("bad")
        assert attempts == {"ok": 1, "flaky": 3, "bad": 3}
        assert [fm.message for fm in failed] == ["bad"] and failed[0].attempts == 3
        assert threads == {threading.get_ident()}
        stats = ad.stats()
        assert (stats["sent"], stats["failed"], stats["retried"], stats["waiting"]) == (2, 1, 4, 0)
        assert ad.stop(10)


def test_async_buffered_messages_go_first_in_order() -> None:
    """Messages buffered before the block (loops not started) are dispatched first, in order, by the first put."""
    seen: list[str] = []

    class Target:
        def dispatch(self, message: str, target: str, *, delay_seconds: int | None = None) -> None:
            seen.append(message)

    ad: AsyncDispatcher[str] = AsyncDispatcher(Target(), "q")
    sender = ad.setup(10)
    sender.put("b1")
    sender.put("b2")
    with immediate():
        sender.put("now")
        assert seen == ["b1", "b2", "now"]
    assert ad.stop(10)


def test_async_over_batched_in_immediate_mode() -> None:
    """AsyncDispatcher feeding a BatchedDispatcher: both immediate, the message is sent before put returns."""
    sent: list[str] = []

    def send_batch(_target: str, messages: list[str]) -> list[None]:
        sent.extend(messages)
        return [None] * len(messages)

    with immediate(), BatchedDispatcher(send_batch, flush_interval=600.0) as bd:
        ad: AsyncDispatcher[str] = AsyncDispatcher(bd, "q")
        sender = ad.setup(10)
        ad.start()
        sender.put("m")
        assert sent == ["m"]
        assert ad.stop(10)


def test_leaving_the_block_restores_the_normal_path() -> None:
    """After the block entries wait for the window and go on the worker thread again."""
    calls = Calls()
    with immediate():
        dispatcher = BackgroundDispatcher(calls.send, ms_delay=1)
    dispatcher.enqueue("later")
    wait_for(lambda: calls.calls == [["later"]], 10, message="sent by the worker")
    assert calls.threads != [threading.get_ident()]
    dispatcher.close()
