"""BatchedDispatcher behind an AsyncDispatcher: quick sends run on the dispatch loop itself (issue 14).

While ``send_batch`` returns at once, a hand-off's whole batches are sent by the handing
thread in a send slot (no lane, no thread switch); slow sends go to the send threads, which
overlap them. Batches, flush, close and stats keep their meaning either way.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from threaddispatch import AsyncDispatcher, BatchedDispatcher
from threaddispatch.backoff import Constant, RetryPolicy
from threaddispatch.errors import QueueFullError
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(30)


class _Recorder:
    """A send_batch that records each batch and the thread it ran on; optionally blocks or fails."""

    def __init__(self, *, fail: Callable[[Any], bool] = lambda _m: False) -> None:
        self.lock = threading.Lock()
        self.batches: list[tuple[str, list[Any]]] = []
        self.fail = fail
        self.hold: threading.Event | None = None  # set: the next send waits on it
        self.holding = threading.Event()  # a held send is waiting
        self.slow_first = 0.0  # seconds the first send sleeps (a slow send, not a wait for the test)

    def __call__(self, _target: str, messages: list[Any]) -> list[Any]:
        with self.lock:
            first = not self.batches
            self.batches.append((threading.current_thread().name, list(messages)))
            hold, self.hold = self.hold, None
        if hold is not None:
            self.holding.set()
            hold.wait(20)
        if first and self.slow_first:
            time.sleep(self.slow_first)
        return [KeyError(m) if self.fail(m) else f"id-{m}" for m in messages]

    def threads(self) -> list[str]:
        with self.lock:
            return [name for name, _ in self.batches]

    def contents(self) -> list[list[Any]]:
        with self.lock:
            return [batch for _, batch in self.batches]


def _async(bd: BatchedDispatcher[Any], buffer_len: int = 100, **options: Any) -> tuple[AsyncDispatcher[Any], Any]:
    ad: AsyncDispatcher[Any] = AsyncDispatcher(bd, "q", **options)
    return ad, ad.setup(buffer_len)


def test_quick_sends_run_on_the_dispatch_loop_in_whole_batches() -> None:
    """30 messages handed at once to BatchedDispatcher(max_batch_size=10) go in 3 batches sent by the
    AsyncDispatcher's own loop; stats count them as the engine's batches would be counted."""
    recorder = _Recorder()
    with BatchedDispatcher(recorder, max_batch_size=10, flush_interval=60.0, name="inline") as bd:
        ad, sender = _async(bd)
        for i in range(30):
            sender.put(i)
        ad.start()
        assert ad.stop(10) is True
        assert recorder.contents() == [list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]
        assert set(recorder.threads()) == {"threaddispatch-async-q"}
        stats = bd.stats()
        assert (stats["submitted"], stats["sent"], stats["batches"], stats["calls"]) == (30, 30, 3, 3)
        assert (stats["pending"], stats["in_flight"], stats["sending"]) == (0, 0, 0)
        assert ad.sent == 30


def test_partial_failures_of_inline_batches_reach_the_error_handler() -> None:
    """A message an inline batch reports as failed reaches the handler; the others count as sent."""
    recorder = _Recorder(fail=lambda m: m % 7 == 3)
    failed: list[Any] = []
    with BatchedDispatcher(recorder, max_batch_size=10, flush_interval=60.0) as bd:
        ad, sender = _async(bd, error_handler=lambda f: failed.append((f.message, type(f.error))))
        for i in range(40):
            sender.put(i)
        ad.start()
        wait_for(lambda: ad.sent + ad.failed == 40 and len(failed) == ad.failed)
        assert ad.stop(10) is True
        expected = [i for i in range(40) if i % 7 == 3]
        assert sorted(failed) == [(i, KeyError) for i in expected]
        assert ad.sent == 40 - len(expected) and ad.failed == len(expected)
        assert bd.stats()["failed"] == len(expected)


def test_a_slow_inline_send_hands_the_rest_to_the_send_threads() -> None:
    """After a slow send the hand-off's other batches go through the lane to the send threads."""
    recorder = _Recorder()
    recorder.slow_first = 0.05
    with BatchedDispatcher(recorder, max_batch_size=10, flush_interval=60.0, name="slow") as bd:
        ad, sender = _async(bd)
        for i in range(30):
            sender.put(i)
        ad.start()
        assert ad.stop(10) is True
        threads = recorder.threads()
        assert threads[0] == "threaddispatch-async-q"
        assert len(threads) == 3 and all(name.startswith("threaddispatch-slow-send-") for name in threads[1:])
        assert sorted(m for batch in recorder.contents() for m in batch) == list(range(30))


def test_sends_known_to_be_slow_overlap_on_the_send_threads() -> None:
    """Once sends were slow, hand-offs go to the send threads: max_concurrent_sends of them run at once."""
    barrier = threading.Barrier(3, timeout=10)  # three sends at once, or the barrier breaks

    def send_batch(_target: str, messages: list[int]) -> list[str]:
        barrier.wait()
        return [f"id-{m}" for m in messages]

    with BatchedDispatcher(send_batch, max_batch_size=2, flush_interval=60.0, max_concurrent_sends=3) as bd:
        bd._state.send_seconds = 1.0  # as after sends of a second each
        ad, sender = _async(bd)
        for i in range(6):
            sender.put(i)
        ad.start()
        assert ad.stop(10) is True
        assert ad.sent == 6 and not barrier.broken


def test_a_partial_batch_in_the_lane_is_completed_first() -> None:
    """A hand-off after a partial batch waits in the lane takes that batch out, completes it and sends
    it with its own whole batches, on its thread: batches keep their order of arrival and their size."""
    recorder = _Recorder()
    settled: list[Any] = []

    def settle(tokens: list[Any], errors: list[BaseException | None] | None) -> None:
        settled.extend(tokens)
        assert errors is None

    tokens: list[Any] = [(i, None, None) for i in range(30)]
    with BatchedDispatcher(recorder, max_batch_size=10, flush_interval=60.0) as bd:
        assert bd._hand_off(tokens[:3], "t", settle) == []
        assert bd.stats()["pending"] == 3
        assert bd._hand_off(tokens[3:], "t", settle) == []
        assert bd.flush(10)
        assert recorder.contents() == [list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]
        assert set(recorder.threads()) == {threading.current_thread().name}  # the lane's three too
        # Each hand-off's own token comes back (an AsyncDispatcher's spooled entry is acknowledged by it).
        assert sorted(map(id, settled)) == sorted(map(id, tokens))
        stats = bd.stats()
        assert (stats["submitted"], stats["sent"], stats["batches"], stats["calls"]) == (30, 30, 3, 3)


def test_flush_and_close_wait_for_an_inline_send() -> None:
    """flush() and close() wait for a batch being sent on a hand-off's thread: within their timeout
    they say it is not done while it hangs, and True once it returned."""
    recorder = _Recorder()
    release = threading.Event()
    recorder.hold = release
    bd: BatchedDispatcher[int] = BatchedDispatcher(recorder, max_batch_size=5, flush_interval=60.0)
    handed = threading.Thread(
        target=bd._hand_off, args=([(i, None, None) for i in range(5)], "t", lambda _t, _e: None), daemon=True
    )
    try:
        handed.start()
        assert recorder.holding.wait(10)
        assert bd.stats()["in_flight"] == 1
        assert bd.flush(0.05) is False
        assert bd.close(0.05) is False
        release.set()
        handed.join(10)
        assert bd.flush(10) is True
        assert bd.close(10) is True
        assert recorder.contents() == [[0, 1, 2, 3, 4]]
    finally:
        release.set()
        bd.close(10)


def test_a_closed_batched_dispatcher_refuses_a_hand_off_it_would_send_inline() -> None:
    """After close() a hand-off is refused message by message, as before; nothing is sent."""
    recorder = _Recorder()
    bd: BatchedDispatcher[int] = BatchedDispatcher(recorder, max_batch_size=5, flush_interval=60.0)
    assert bd.close(10)
    refused = bd._hand_off([(i, None, None) for i in range(10)], "t", lambda _t, _e: None)
    assert [token[0] for token, _ in refused] == list(range(10))
    assert recorder.contents() == []


def test_inline_sends_with_envelopes_carry_each_messages_context() -> None:
    """With envelopes=True an inline batch still gets one Envelope per message, in its producer's context."""
    request: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="none")
    seen: list[tuple[Any, Any, str]] = []

    def send_batch(_target: str, envelopes: list[Any]) -> list[None]:
        seen.extend((e.message, e.delay_seconds, e.context.run(request.get)) for e in envelopes)
        return [None] * len(envelopes)

    with BatchedDispatcher(send_batch, max_batch_size=2, flush_interval=60.0, envelopes=True) as bd:
        ad, sender = _async(bd, carry_context=True)
        for i in range(4):
            request.set(f"r{i}")
            sender.put(i)
        ad.start()
        assert ad.stop(10) is True
    assert seen == [(i, None, f"r{i}") for i in range(4)]


@pytest.mark.parametrize("behind", ["dispatch", "send_batch"])
def test_a_put_from_the_dispatch_loop_on_a_full_buffer_raises_at_once(behind: str) -> None:
    """dispatch (or a send_batch the loop runs itself) putting into its own full buffer gets QueueFullError
    at once: only the loop it runs on could make room, so waiting would never end."""
    release = threading.Event()
    raised: list[BaseException] = []
    holder: list[Any] = []

    def reenter(message: Any) -> None:
        if message == "a":
            assert release.wait(10)
            try:
                holder[0].put("c")
            except Exception as error:  # what the put raised is the test's subject
                raised.append(error)

    class Reentrant:
        def dispatch(self, message: Any, _target: str) -> None:
            reenter(message)

    def send_batch(_target: str, messages: list[Any]) -> list[None]:
        for message in messages:
            reenter(message)
        return [None] * len(messages)

    bd: BatchedDispatcher[Any] | None = None
    dispatcher: Any = Reentrant()
    if behind == "send_batch":
        bd = dispatcher = BatchedDispatcher(send_batch, max_batch_size=1, flush_interval=60.0)
    ad: AsyncDispatcher[Any] = AsyncDispatcher(dispatcher, "q")
    sender = ad.setup(1)
    holder.append(sender)
    try:
        ad.start()
        sender.put("a")
        wait_for(lambda: len(sender) == 0)  # "a" is being dispatched
        sender.put("b")  # the buffer is full
        release.set()
        wait_for(lambda: raised)
        assert isinstance(raised[0], QueueFullError)
        assert "dispatch loop" in str(raised[0])
    finally:
        release.set()
        assert ad.stop(10)
        if bd is not None:
            bd.close(10)


@pytest.mark.parametrize(
    ("shape", "sent"),
    [
        ("list", True),  # the usual return value
        ("tuple", True),  # any iterable of one result per message
        ("short list", False),  # a result missing: the whole batch fails
        ("str", False),  # not a sequence of results
    ],
)
def test_inline_batches_check_send_batchs_results_as_the_send_threads_do(shape: str, sent: bool) -> None:
    """An inline send's return value is checked as a send thread's is: one result per message, or the batch fails."""
    threads: list[str] = []

    def send(_target: str, messages: list[Any]) -> object:
        threads.append(threading.current_thread().name)
        ids = [f"id-{m}" for m in messages]
        return {"list": ids, "tuple": tuple(ids), "short list": ids[:-1], "str": "id"}[shape]

    failed: list[Any] = []
    bad_shapes: Any = send  # send_batch's type says a sequence; this one returns anything
    with BatchedDispatcher[Any](bad_shapes, max_batch_size=10, flush_interval=60.0) as bd:
        ad, sender = _async(bd, error_handler=failed.append)
        for i in range(20):
            sender.put(i)
        ad.start()
        wait_for(lambda: ad.sent + ad.failed == 20 and len(failed) == ad.failed)
        assert ad.stop(10) is True
    assert set(threads) == {"threaddispatch-async-q"}  # both batches went inline
    if sent:
        assert (ad.sent, ad.failed, failed) == (20, 0, [])
    else:
        assert (ad.sent, ad.failed) == (0, 20)
        assert sorted(f.message for f in failed) == list(range(20))
        assert all("one result" in str(f.error) and "10 messages" in str(f.error) for f in failed)


def test_a_flush_or_close_from_an_inline_send_batch_does_not_wait_for_itself() -> None:
    """Inside send_batch run inline on the dispatch loop, flush() and close() return False at once
    (the batch they would wait for is the one running); the messages are still sent."""
    seen: list[tuple[bool, bool]] = []
    threads: list[str] = []
    bd: BatchedDispatcher[Any]

    def send(_target: str, messages: list[Any]) -> list[Any]:
        threads.append(threading.current_thread().name)
        if not seen:
            seen.append((bd.flush(5), bd.close(5)))
        return [None] * len(messages)

    bd = BatchedDispatcher(send, max_batch_size=10, flush_interval=60.0)
    try:
        ad, sender = _async(bd)
        for i in range(20):
            sender.put(i)
        ad.start()
        wait_for(lambda: bool(seen))
        assert seen == [(False, False)]
        ad.stop(10)
        assert threads and threads[0] == "threaddispatch-async-q"
        assert bd.stats()["sent"] >= 10  # the batch it ran in was sent
    finally:
        bd.close(10)


def test_retried_messages_keep_their_attempts_across_hand_offs() -> None:
    """A message that fails in an inline batch is retried through later hand-offs with its attempts
    counted on: one that keeps failing is reported after max_attempts, one that recovers is sent; once all
    settled, no retried message's count is left behind."""
    tries: dict[int, int] = {}

    def send(_target: str, messages: list[int]) -> list[Any]:
        results: list[Any] = []
        for m in messages:
            tries[m] = tries.get(m, 0) + 1
            failing = m == 7 or (m == 13 and tries[m] < 3)  # 7 always fails; 13 twice, then is sent
            results.append(KeyError(m) if failing else f"id-{m}")
        return results

    failed: list[Any] = []
    with BatchedDispatcher(send, max_batch_size=10, flush_interval=0.01) as bd:
        ad, sender = _async(bd, error_handler=failed.append, retry=RetryPolicy(max_attempts=4, backoff=Constant(0.001)))
        for i in range(40):
            sender.put(i)
        ad.start()
        wait_for(lambda: ad.sent == 39 and len(failed) == 1)
        assert ad.stop(10) is True
    assert [(f.message, f.attempts, type(f.error)) for f in failed] == [(7, 4, KeyError)]
    assert tries[7] == 4 and tries[13] == 3 and all(tries[m] == 1 for m in range(40) if m not in (7, 13))
    assert ad.stats()["retried"] == 3 + 2
    assert ad._state.handed_attempts == {}
