"""AsyncDispatcher: the bounded buffer, the dispatch and failure loops, retries, stop, exit, fork, GC."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from threaddispatch.backoff import Constant, RetryPolicy
from threaddispatch.batched import BatchedDispatcher
from threaddispatch.buffered import AsyncDispatcher, Dispatcher, FailedMessage, Sender
from threaddispatch.errors import (
    CancelledError,
    ConfigurationError,
    DispatcherClosedError,
    DispatchTimeoutError,
    InvalidStateError,
    QueueFullError,
)
from threaddispatch.testing import RecordingDispatcher, live_dispatch_threads, wait_for

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent


class Gate:
    """A dispatcher whose dispatch blocks until released; records what it was given, in order."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.entered: list[Any] = []
        self.done: list[Any] = []

    def dispatch(self, message: Any, target: str, *, delay_seconds: int | None = None) -> str:
        with self.lock:
            self.entered.append(message)
        if not self.release.wait(30):
            raise AssertionError("Gate was never released")
        with self.lock:
            self.done.append(message)
        return f"id-{message}"


class ManualSubmitter:
    """A submitting dispatcher whose Futures the test resolves by hand."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.futures: list[tuple[Any, Future[str | None]]] = []
        self.flushes = 0

    def dispatch(self, message: Any, target: str, *, delay_seconds: int | None = None) -> str | None:
        raise AssertionError("dispatch must not be called when submit exists")

    def submit(self, message: Any, target: str) -> Future[str | None]:
        future: Future[str | None] = Future()
        with self.lock:
            self.futures.append((message, future))
        return future

    def count(self) -> int:
        with self.lock:
            return len(self.futures)

    def resolve_all(self, fail: Callable[[Any], bool] = lambda _m: False) -> None:
        with self.lock:
            pending = [(m, f) for m, f in self.futures if not f.done()]
        for message, future in pending:
            if fail(message):
                future.set_exception(ValueError(f"rejected {message}"))
            else:
                future.set_result(f"id-{message}")


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], object]]]:
    """Callables run at teardown in the order added (release gates first), before the thread check."""
    actions: list[Callable[[], object]] = []
    yield actions
    for action in actions:
        action()


def make(
    dispatcher: Any,
    cleanup: list[Callable[[], object]],
    *,
    buffer_len: int = 100,
    start: bool = True,
    target: str = "orders",
    **kwargs: Any,
) -> tuple[AsyncDispatcher[Any], Sender[Any], list[FailedMessage[Any]]]:
    failures: list[FailedMessage[Any]] = []
    kwargs.setdefault("error_handler", failures.append)
    ad: AsyncDispatcher[Any] = AsyncDispatcher(dispatcher, target, **kwargs)
    sender = ad.setup(buffer_len)
    if start:
        ad.start()
    cleanup.append(lambda: ad.stop(10))
    return ad, sender, failures


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"dispatcher": object()}, "dispatcher"),
        ({"target_queue": ""}, "target_queue"),
        ({"target_queue": 5}, "target_queue"),
        ({"error_handler": "log"}, "error_handler"),
        ({"retry": 3}, "retry"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"max_in_flight": True}, "max_in_flight"),
        ({"max_failures_pending": 0}, "max_failures_pending"),
        ({"max_failures_pending": 2.5}, "max_failures_pending"),
        ({"max_failures_pending": False}, "max_failures_pending"),
    ],
)
def test_bad_constructor_arguments_raise_configuration_error_naming_them(kwargs: dict[str, Any], bad: str) -> None:
    """Each bad constructor argument raises ConfigurationError naming the argument and its value."""
    args: dict[str, Any] = {"dispatcher": RecordingDispatcher(), "target_queue": "orders", **kwargs}
    with pytest.raises(ConfigurationError, match=bad):
        AsyncDispatcher(**args)


@pytest.mark.parametrize("buffer_len", [0, -1, True, 2.5, "10"])
def test_bad_buffer_len_raises_configuration_error(buffer_len: Any) -> None:
    """setup() refuses a buffer_len that is not an int >= 1, naming the value."""
    ad: AsyncDispatcher[Any] = AsyncDispatcher(RecordingDispatcher(), "orders")
    with pytest.raises(ConfigurationError, match="buffer_len"):
        ad.setup(buffer_len)


def test_setup_twice_and_start_before_setup_raise_invalid_state() -> None:
    """start() needs setup() first, and setup() can be called only once."""
    ad: AsyncDispatcher[Any] = AsyncDispatcher(RecordingDispatcher(), "orders")
    with pytest.raises(InvalidStateError, match="setup"):
        ad.start()
    ad.setup(4)
    with pytest.raises(InvalidStateError, match="already"):
        ad.setup(4)
    assert ad.stop(1) is True


@pytest.mark.parametrize("timeout", [-1, float("nan"), "1"])
def test_bad_put_timeout_raises_configuration_error(timeout: Any, cleanup: list[Callable[[], object]]) -> None:
    """put() refuses a negative, NaN or non-number timeout."""
    _ad, sender, _failures = make(RecordingDispatcher(), cleanup)
    with pytest.raises(ConfigurationError, match="timeout"):
        sender.put("m", timeout=timeout)


def test_recording_dispatcher_satisfies_the_dispatcher_protocol() -> None:
    """RecordingDispatcher type-checks as a Dispatcher and dispatch returns an id."""
    recorder: Dispatcher[str] = RecordingDispatcher()
    assert recorder.dispatch("m", "orders") == "msg-1"


# -- dispatching -----------------------------------------------------------------------------


def test_messages_are_dispatched_in_order_to_the_target(cleanup: list[Callable[[], object]]) -> None:
    """Every message put goes to dispatcher.dispatch(message, target_queue), in the order put."""
    recorder: RecordingDispatcher[int] = RecordingDispatcher()
    ad, sender, failures = make(recorder, cleanup)
    for i in range(50):
        sender.put(i)
    recorder.wait_for_count(50)
    assert recorder.messages("orders") == list(range(50))
    assert recorder.targets() == ["orders"]
    assert ad.stop(5) is True
    assert failures == []
    assert (ad.sent, ad.failed, ad.retried, ad.buffered) == (50, 0, 0, 50)


def test_exactly_two_named_daemon_threads_run(cleanup: list[Callable[[], object]]) -> None:
    """start() runs the dispatch loop and the failure loop, daemon threads named after the target."""
    before = set(live_dispatch_threads())
    ad, _sender, _failures = make(RecordingDispatcher(), cleanup, target="payments")
    threads = [t for t in live_dispatch_threads() if t not in before]
    assert sorted(t.name for t in threads) == [
        "threaddispatch-async-payments",
        "threaddispatch-async-payments-failures",
    ]
    assert all(t.daemon for t in threads)
    ad.start()  # idempotent: no third thread
    assert len([t for t in live_dispatch_threads() if t not in before]) == 2
    assert ad.stop(5) is True
    assert all(not t.is_alive() for t in threads)


def test_failed_messages_reach_the_error_handler_on_the_failure_loop(cleanup: list[Callable[[], object]]) -> None:
    """A failed dispatch reaches error_handler(FailedMessage(message, error, target)) on the failure thread."""
    seen: list[tuple[FailedMessage[Any], str]] = []
    recorder: RecordingDispatcher[int] = RecordingDispatcher(fail={2, 4})
    ad, sender, _failures = make(
        recorder, cleanup, error_handler=lambda f: seen.append((f, threading.current_thread().name))
    )
    for i in range(6):
        sender.put(i)
    wait_for(lambda: len(seen) == 2)
    assert [(f.message, f.target_queue, f.attempts) for f, _ in seen] == [(2, "orders", 1), (4, "orders", 1)]
    assert all(isinstance(f.error, RuntimeError) and str(f.message) in str(f.error) for f, _ in seen)
    assert {name for _, name in seen} == {"threaddispatch-async-orders-failures"}
    assert recorder.messages() == [0, 1, 3, 5]
    ad.stop(5)
    assert (ad.sent, ad.failed) == (4, 2)


def test_a_slow_error_handler_does_not_stall_dispatch(cleanup: list[Callable[[], object]]) -> None:
    """While the error handler is blocked, later messages are still dispatched."""
    handler_entered = threading.Event()
    handler_release = threading.Event()
    cleanup.append(handler_release.set)

    def handler(_failed: FailedMessage[Any]) -> None:
        handler_entered.set()
        handler_release.wait(30)

    recorder: RecordingDispatcher[int] = RecordingDispatcher(fail={0})
    _ad, sender, _ = make(recorder, cleanup, error_handler=handler)
    sender.put(0)
    assert handler_entered.wait(5)
    for i in range(1, 21):
        sender.put(i)
    recorder.wait_for_count(20)
    assert not handler_release.is_set()
    handler_release.set()


def test_a_raising_error_handler_is_logged_and_the_loop_goes_on(
    cleanup: list[Callable[[], object]], caplog: pytest.LogCaptureFixture
) -> None:
    """An error handler that raises is logged and counted; the next failures still reach it."""
    calls: list[Any] = []

    def handler(failed: FailedMessage[Any]) -> None:
        calls.append(failed.message)
        raise ValueError("handler broke")

    ad, sender, _ = make(RecordingDispatcher(fail=lambda _m: True), cleanup, error_handler=handler)
    with caplog.at_level(logging.ERROR, logger="threaddispatch"):
        for i in range(3):
            sender.put(i)
        ad.stop(5)
    assert calls == [0, 1, 2]
    assert ad.stats()["handler_errors"] == 3
    assert sum("error_handler raised" in r.getMessage() for r in caplog.records) == 3


def test_without_an_error_handler_failures_are_logged(
    cleanup: list[Callable[[], object]], caplog: pytest.LogCaptureFixture
) -> None:
    """With no error handler, a failed message is logged (a WARNING, the drop-log cadence) with its error."""
    ad, sender, _ = make(RecordingDispatcher(fail={"bad"}), cleanup, error_handler=None)
    with caplog.at_level(logging.WARNING, logger="threaddispatch"):
        sender.put("bad")
        sender.put("good")
        ad.stop(5)
    records = [r for r in caplog.records if "'bad' failed after 1 attempt" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is not None
    assert ad.failed == 1 and ad.sent == 1


# -- the buffer and back-pressure --------------------------------------------------------------


def test_buffer_len_counts_messages_waiting_not_the_one_being_sent(cleanup: list[Callable[[], object]]) -> None:
    """With one message in a hung dispatch, buffer_len more fit in the buffer; the next does not."""
    gate = Gate()
    cleanup.append(gate.release.set)
    ad, sender, _ = make(gate, cleanup, buffer_len=3)
    sender.put("sending")
    wait_for(lambda: gate.entered == ["sending"])
    assert [sender.try_put(m) for m in ("a", "b", "c")] == [True, True, True]
    assert len(sender) == 3
    assert sender.try_put("d") is False
    assert ad.stats()["rejected"] == 1
    gate.release.set()
    assert ad.stop(5) is True
    assert gate.done == ["sending", "a", "b", "c"]


def test_put_blocks_while_full_and_returns_as_soon_as_room_appears(cleanup: list[Callable[[], object]]) -> None:
    """put() on a full buffer waits (back-pressure) and returns once the loop takes a message."""
    gate = Gate()
    cleanup.append(gate.release.set)
    ad, sender, _ = make(gate, cleanup, buffer_len=1)
    sender.put(1)
    wait_for(lambda: gate.entered == [1])
    sender.put(2)  # fills the buffer
    returned = threading.Event()

    def producer() -> None:
        sender.put(3)
        returned.set()

    thread = threading.Thread(target=producer)
    thread.start()
    wait_for(lambda: ad._state.put_waiters == 1, message="producer blocked in put")
    assert not returned.is_set()
    gate.release.set()  # the loop takes 2: room appears
    assert returned.wait(5)
    thread.join(5)
    assert ad.stop(5) is True
    assert gate.done == [1, 2, 3]


def test_put_with_timeout_raises_queue_full_after_about_the_timeout(cleanup: list[Callable[[], object]]) -> None:
    """put(timeout=t) on a buffer that stays full raises QueueFullError after about t seconds."""
    gate = Gate()
    cleanup.append(gate.release.set)
    ad, sender, _ = make(gate, cleanup, buffer_len=1)
    sender.put(1)
    wait_for(lambda: gate.entered == [1])
    sender.put(2)
    started = time.monotonic()
    with pytest.raises(QueueFullError, match="stayed full"):
        sender.put(3, timeout=0.2)
    assert time.monotonic() - started >= 0.19  # waited its timeout out (never less, whatever the load)
    with pytest.raises(QueueFullError):
        sender.put(3, timeout=0)
    assert ad.stats()["rejected"] == 2
    assert ad.buffered == 2


def test_try_put_never_blocks_and_returns_false_when_full(cleanup: list[Callable[[], object]]) -> None:
    """try_put() returns False at once on a full buffer and True when it accepted the message."""
    ad, sender, _ = make(RecordingDispatcher(), cleanup, buffer_len=2, start=False)
    assert sender.try_put(1) is True
    assert sender.try_put(2) is True
    assert sender.try_put(3) is False
    ad.start()
    assert ad.stop(5) is True
    assert ad.sent == 2


def test_messages_put_before_start_are_dispatched_after_it(cleanup: list[Callable[[], object]]) -> None:
    """The buffer accepts messages before start(); the loop dispatches them once started."""
    recorder: RecordingDispatcher[int] = RecordingDispatcher()
    ad, sender, _ = make(recorder, cleanup, start=False)
    sender.put(1)
    sender.put(2)
    assert recorder.count() == 0
    with ad:
        recorder.wait_for_count(2)
    assert ad.stopped
    assert recorder.messages() == [1, 2]


# -- stop --------------------------------------------------------------------------------------


def test_stop_drains_the_buffer(cleanup: list[Callable[[], object]]) -> None:
    """stop() dispatches every message accepted before it, then returns True."""
    gate = Gate()
    ad, sender, _ = make(gate, cleanup, buffer_len=200)
    for i in range(200):
        sender.put(i)
    gate.release.set()
    assert ad.stop(10) is True
    assert gate.done == list(range(200))
    assert ad.stats()["waiting"] == 0


def test_stop_before_start_still_dispatches_what_was_buffered(cleanup: list[Callable[[], object]]) -> None:
    """A dispatcher stopped without ever starting delivers its buffer instead of dropping it."""
    recorder: RecordingDispatcher[str] = RecordingDispatcher()
    ad, sender, _ = make(recorder, cleanup, start=False)
    sender.put("early")
    assert ad.stop(5) is True
    assert recorder.messages() == ["early"]


def test_put_and_start_after_stop_raise_dispatcher_closed(cleanup: list[Callable[[], object]]) -> None:
    """After stop(), put, try_put, start and setup raise DispatcherClosedError."""
    ad, sender, _ = make(RecordingDispatcher(), cleanup)
    assert ad.stop(5) is True
    with pytest.raises(DispatcherClosedError, match="stopped"):
        sender.put("late")
    with pytest.raises(DispatcherClosedError):
        sender.try_put("late")
    with pytest.raises(DispatcherClosedError):
        ad.start()
    with pytest.raises(DispatcherClosedError):
        ad.setup(3)
    assert ad.buffered == 0


def test_a_put_blocked_on_a_full_buffer_raises_when_stop_begins(cleanup: list[Callable[[], object]]) -> None:
    """stop() wakes a put waiting for room with DispatcherClosedError: it never hangs."""
    gate = Gate()
    cleanup.append(gate.release.set)
    ad, sender, _ = make(gate, cleanup, buffer_len=1)
    sender.put(1)
    wait_for(lambda: gate.entered == [1])
    sender.put(2)
    outcome: list[BaseException] = []

    def producer() -> None:
        try:
            sender.put(3)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=producer)
    thread.start()
    wait_for(lambda: ad._state.put_waiters == 1)
    assert ad.stop(0.05) is False  # the gate still holds message 1
    thread.join(5)
    assert len(outcome) == 1 and isinstance(outcome[0], DispatcherClosedError)
    gate.release.set()
    assert ad.stop(5) is True
    assert gate.done == [1, 2]


def test_puts_racing_stop_are_either_delivered_or_refused(cleanup: list[Callable[[], object]]) -> None:
    """Under concurrent puts and stop(), every accepted message is dispatched and every other put raised."""
    recorder: RecordingDispatcher[tuple[int, int]] = RecordingDispatcher()
    ad, sender, _ = make(recorder, cleanup, buffer_len=16)
    accepted: list[list[tuple[int, int]]] = [[] for _ in range(4)]
    refused = [0] * 4
    go = threading.Event()

    def producer(index: int) -> None:
        go.wait(5)
        for n in range(1_000_000):
            try:
                sender.put((index, n))
            except DispatcherClosedError:
                refused[index] += 1
                return
            accepted[index].append((index, n))

    threads = [threading.Thread(target=producer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    go.set()
    wait_for(lambda: recorder.count() >= 500)
    assert ad.stop(10) is True
    for thread in threads:
        thread.join(10)
    delivered = recorder.messages()
    assert sorted(delivered) == sorted(m for chunk in accepted for m in chunk)
    assert len(set(delivered)) == len(delivered)
    assert refused == [1, 1, 1, 1]


def test_stop_is_idempotent(cleanup: list[Callable[[], object]]) -> None:
    """A second (and third) stop() returns the same result at once and starts nothing."""
    ad, sender, _ = make(RecordingDispatcher(), cleanup)
    sender.put(1)
    assert ad.stop(5) is True
    assert ad.stop(5) is True
    assert ad.stop() is True
    assert ad.sent == 1


def test_stop_returns_within_its_timeout_when_the_error_handler_hangs(cleanup: list[Callable[[], object]]) -> None:
    """A hung error handler does not stretch stop() past its timeout."""
    release = threading.Event()
    cleanup.append(release.set)
    entered = threading.Event()

    def handler(_failed: FailedMessage[Any]) -> None:
        entered.set()
        release.wait(30)

    ad, sender, _ = make(RecordingDispatcher(fail={1}), cleanup, error_handler=handler)
    sender.put(1)
    assert entered.wait(5)
    assert ad.stop(0.2) is False  # returned while the handler is still hung
    assert not release.is_set()
    release.set()
    ad.stop(5)
    assert ad._state.failures_done


@pytest.mark.parametrize("mode", ["direct", "submit", "batched"])
def test_no_failure_is_lost_during_shutdown(mode: str, cleanup: list[Callable[[], object]]) -> None:
    """Every failing message reaches the error handler exactly once, even when stop() comes at once."""
    failing = {i for i in range(300) if i % 3 == 0}
    dispatcher: Any
    if mode == "batched":

        def send_batch(_target: str, messages: list[int]) -> list[str | BaseException]:
            return [ValueError(m) if m in failing else f"id-{m}" for m in messages]

        dispatcher = BatchedDispatcher(send_batch, max_batch_size=7, flush_interval=30.0)
        cleanup.append(lambda: dispatcher.close(5))
    else:
        dispatcher = RecordingDispatcher(fail=failing, with_submit=(mode == "submit"))
    ad, sender, failures = make(dispatcher, cleanup, buffer_len=300, start=False)
    for i in range(300):
        sender.put(i)
    ad.start()
    ad.stop(10)
    assert ad._state.finished()
    assert Counter(f.message for f in failures) == Counter(failing)
    assert ad.failed == len(failing) and ad.sent == 300 - len(failing)
    if mode == "submit":
        assert dispatcher.submits == 300


# -- submit and batching behind ------------------------------------------------------------------


def test_submit_is_used_when_the_dispatcher_has_it(cleanup: list[Callable[[], object]]) -> None:
    """A dispatcher with submit() gets every message through it; dispatch() is not called."""
    manual = ManualSubmitter()
    ad, sender, failures = make(manual, cleanup)
    for i in range(5):
        sender.put(i)
    wait_for(lambda: manual.count() == 5)
    assert ad.stats()["in_flight"] == 5
    manual.resolve_all(fail=lambda m: m == 3)
    assert ad.stop(5) is True  # the failure happened before stop
    assert [f.message for f in failures] == [3]
    assert isinstance(failures[0].error, ValueError)
    assert ad.sent == 4


def test_in_flight_submits_are_capped_by_max_in_flight(cleanup: list[Callable[[], object]]) -> None:
    """At most max_in_flight submitted messages are unsettled; the rest wait in the buffer."""
    manual = ManualSubmitter()
    ad, sender, _ = make(manual, cleanup, max_in_flight=3)
    for i in range(10):
        sender.put(i)
    wait_for(lambda: manual.count() == 3)
    wait_for(lambda: ad._state.loop_waiting)
    assert manual.count() == 3 and len(sender) == 7
    manual.resolve_all()
    wait_for(lambda: manual.count() == 6)

    def settle_all() -> bool:
        manual.resolve_all()
        return ad.sent == 10

    wait_for(settle_all)
    assert ad.stop(5) is True
    assert ad.sent == 10


def test_a_submit_that_raises_is_a_failed_message(cleanup: list[Callable[[], object]]) -> None:
    """submit() raising at once counts as a failure of that message, reported to the handler."""

    class Refusing(ManualSubmitter):
        def submit(self, message: Any, target: str) -> Future[str | None]:
            raise ConnectionError("down")

    ad, sender, failures = make(Refusing(), cleanup)
    sender.put("m")
    ad.stop(5)
    assert [(f.message, type(f.error)) for f in failures] == [("m", ConnectionError)]


def test_a_cancelled_submit_future_is_a_failed_message(cleanup: list[Callable[[], object]]) -> None:
    """A Future cancelled by the dispatcher reports its message with a CancelledError."""
    manual = ManualSubmitter()
    ad, sender, failures = make(manual, cleanup)
    sender.put("m")
    wait_for(lambda: manual.count() == 1)
    assert manual.futures[0][1].cancel()
    wait_for(lambda: failures)
    assert isinstance(failures[0].error, CancelledError)
    assert ad.stop(5) is True


def test_stop_flushes_a_batching_dispatcher(cleanup: list[Callable[[], object]]) -> None:
    """stop() calls the dispatcher's flush(), so a partial batch goes now, not after flush_interval."""
    batches: list[list[int]] = []

    def send_batch(_target: str, messages: list[int]) -> list[str]:
        batches.append(messages)
        return [f"id-{m}" for m in messages]

    bd: BatchedDispatcher[int] = BatchedDispatcher(send_batch, max_batch_size=10, flush_interval=60.0)
    cleanup.append(lambda: bd.close(5))
    ad, sender, _ = make(bd, cleanup)
    for i in range(3):
        sender.put(i)
    assert ad.stop(10) is True
    assert batches == [[0, 1, 2]]
    assert not bd.closed  # flushed, not closed: the caller owns it


def test_1008_messages_through_batch_size_10_make_101_batches(cleanup: list[Callable[[], object]]) -> None:
    """AsyncDispatcher over BatchedDispatcher(max_batch_size=10): 1,008 messages go in 101 batches."""
    sizes: list[int] = []
    lock = threading.Lock()

    def send_batch(_target: str, messages: list[int]) -> list[str]:
        with lock:
            sizes.append(len(messages))
        return [f"id-{m}" for m in messages]

    bd: BatchedDispatcher[int] = BatchedDispatcher(send_batch, max_batch_size=10, flush_interval=60.0)
    cleanup.append(lambda: bd.close(5))
    ad, sender, failures = make(bd, cleanup, buffer_len=1008, start=False, max_in_flight=2000)
    for i in range(1008):
        sender.put(i)
    ad.start()
    assert ad.stop(10) is True
    assert len(sizes) == 101
    assert sorted(sizes) == [8] + [10] * 100
    assert failures == [] and ad.sent == 1008


def test_batched_partial_failures_reach_the_handler_one_message_each(cleanup: list[Callable[[], object]]) -> None:
    """Messages a batch reports as failed reach the handler one by one; the rest count as sent."""

    def send_batch(_target: str, messages: list[int]) -> list[str | BaseException]:
        return [KeyError(m) if m % 4 == 1 else f"id-{m}" for m in messages]

    bd: BatchedDispatcher[int] = BatchedDispatcher(send_batch, max_batch_size=10, flush_interval=0.01)
    cleanup.append(lambda: bd.close(5))
    ad, sender, failures = make(bd, cleanup)
    for i in range(40):
        sender.put(i)
    ad.stop(10)
    assert sorted(f.message for f in failures) == [i for i in range(40) if i % 4 == 1]
    assert all(isinstance(f.error, KeyError) for f in failures)
    assert ad.sent == 30


# -- retries -----------------------------------------------------------------------------------


@pytest.mark.parametrize("with_submit", [False, True])
def test_retry_policy_retries_before_a_message_counts_as_failed(
    with_submit: bool, cleanup: list[Callable[[], object]]
) -> None:
    """A message failing fewer times than max_attempts is sent; one that keeps failing is reported once."""
    recorder: RecordingDispatcher[str] = RecordingDispatcher(fail={"flaky", "broken"}, with_submit=with_submit)
    policy = RetryPolicy(max_attempts=3, backoff=Constant(0.0))
    ad, sender, failures = make(recorder, cleanup, retry=policy)
    # "flaky" fails twice then passes; "broken" fails every time.
    recorder.set_failing(lambda m: m == "broken" or (m == "flaky" and recorder.attempts("flaky") < 2))
    sender.put("flaky")
    sender.put("broken")
    sender.put("fine")
    wait_for(lambda: len(failures) == 1)
    assert ad.stop(5) is True
    assert sorted(recorder.messages()) == ["fine", "flaky"]
    assert [(f.message, f.attempts) for f in failures] == [("broken", 3)]
    assert recorder.attempts("flaky") == 3 and recorder.attempts("broken") == 3
    assert ad.retried == 4 and ad.failed == 1 and ad.sent == 2


def test_retry_on_false_makes_the_failure_final_at_once(cleanup: list[Callable[[], object]]) -> None:
    """An error the policy's retry_on rejects is reported after one attempt."""
    policy = RetryPolicy(max_attempts=5, backoff=Constant(0.0), retry_on=lambda e: not isinstance(e, RuntimeError))
    recorder: RecordingDispatcher[str] = RecordingDispatcher(fail={"m"})
    ad, sender, failures = make(recorder, cleanup, retry=policy)
    sender.put("m")
    ad.stop(5)
    assert [(f.message, f.attempts) for f in failures] == [("m", 1)]
    assert ad.retried == 0


def test_stop_cuts_retry_backoff_short(cleanup: list[Callable[[], object]]) -> None:
    """Retries waiting on a long backoff go at once when stop() begins; the final failure is reported."""
    recorder: RecordingDispatcher[str] = RecordingDispatcher(fail={"m"})
    policy = RetryPolicy(max_attempts=3, backoff=Constant(3600.0))
    ad, sender, failures = make(recorder, cleanup, retry=policy)
    sender.put("m")
    wait_for(lambda: ad.retried == 1)
    assert ad.stop(10) is False
    assert [(f.message, f.attempts) for f in failures] == [("m", 3)]


def test_a_retried_message_does_not_block_later_ones(cleanup: list[Callable[[], object]]) -> None:
    """A message waiting for its retry backoff does not hold back the messages behind it."""
    recorder: RecordingDispatcher[str] = RecordingDispatcher(fail={"slow"})
    policy = RetryPolicy(max_attempts=2, backoff=Constant(3600.0))
    ad, sender, _ = make(recorder, cleanup, retry=policy)
    sender.put("slow")
    sender.put("next")
    recorder.wait_for_count(1)
    assert recorder.messages() == ["next"]
    assert ad.stats()["in_flight"] == 1  # "slow", waiting to retry


def test_counters_and_stats(cleanup: list[Callable[[], object]]) -> None:
    """stats() reports buffered, sent, failed, retried, rejected and the gauges consistently."""
    recorder: RecordingDispatcher[int] = RecordingDispatcher(fail={1}, fail_times=1)
    ad, sender, failures = make(recorder, cleanup, retry=RetryPolicy(max_attempts=2, backoff=Constant(0.0)))
    for i in range(4):
        sender.put(i)
    ad.stop(5)
    assert ad.stats() == {
        "buffered": 4,
        "sent": 4,
        "failed": 0,
        "retried": 1,
        "rejected": 0,
        "handler_errors": 0,
        "waiting": 0,
        "in_flight": 0,
        "failures_waiting": 0,
        "failure_stalls": 0,
        "abandoned_calls": 0,
        "call_timeouts": 0,
    }
    assert failures == []
    assert "stopped" in repr(ad) and "orders" in repr(sender)


# -- garbage collection, exit, fork ---------------------------------------------------------------


def test_an_unreferenced_dispatcher_is_collected_and_its_loops_leave() -> None:
    """Dropping the AsyncDispatcher and its Sender lets it be collected; its loops drain and exit."""
    before = set(live_dispatch_threads())
    recorder: RecordingDispatcher[int] = RecordingDispatcher()
    ad: AsyncDispatcher[int] = AsyncDispatcher(recorder, "gc")
    sender = ad.setup(10)
    ad.start()
    sender.put(1)
    ref = weakref.ref(ad)
    del ad, sender
    gc.collect()
    assert ref() is None
    wait_for(lambda: not [t for t in live_dispatch_threads() if t not in before], message="loops left")
    assert recorder.messages() == [1]


def test_the_sender_keeps_its_dispatcher_alive(cleanup: list[Callable[[], object]]) -> None:
    """Holding only the Sender keeps the AsyncDispatcher running."""
    recorder: RecordingDispatcher[int] = RecordingDispatcher()
    ad: AsyncDispatcher[int] = AsyncDispatcher(recorder, "held")
    sender = ad.setup(10)
    ad.start()
    ref = weakref.ref(ad)
    del ad
    gc.collect()
    assert ref() is not None
    sender.put(7)
    recorder.wait_for_count(1)
    sender.dispatcher.stop(5)


def _run_script(body: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body)], check=False, capture_output=True, text=True, timeout=60, env=env
    )


def test_exit_drain_delivers_the_buffer_and_reports_failures() -> None:
    """At interpreter exit, buffered messages are dispatched and failures reach the handler."""
    result = _run_script(
        """
        import atexit, threading
        out = []
        atexit.register(lambda: print("RESULT", sorted(out)))
        from threaddispatch.buffered import AsyncDispatcher
        release = threading.Event()
        class Slow:
            def dispatch(self, message, target, *, delay_seconds=None):
                release.wait(0.2)
                if message == 3:
                    raise ValueError("no")
                out.append(message)
        ad = AsyncDispatcher(Slow(), "exit", lambda f: out.append(-f.message))
        send = ad.setup(10)
        ad.start()
        for i in range(6):
            send.put(i)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "RESULT [-3, 0, 1, 2, 4, 5]" in result.stdout


def test_exit_drain_feeds_a_batched_dispatcher_before_it_closes() -> None:
    """At exit, an AsyncDispatcher feeding a BatchedDispatcher drains first, so nothing fails as closed."""
    result = _run_script(
        """
        import atexit
        sent, failed = [], []
        atexit.register(lambda: print("RESULT", len(sent), len(failed)))
        from threaddispatch.batched import BatchedDispatcher
        from threaddispatch.buffered import AsyncDispatcher
        def send_batch(target, messages):
            sent.extend(messages)
            return [str(m) for m in messages]
        bd = BatchedDispatcher(send_batch, flush_interval=60.0)
        bd.submit(-1, "q")
        ad = AsyncDispatcher(bd, "q", failed.append)
        send = ad.setup(100)
        ad.start()
        for i in range(25):
            send.put(i)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "RESULT 26 0" in result.stdout


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_starts_with_an_empty_buffer_and_fresh_loops(cleanup: list[Callable[[], object]]) -> None:
    """After fork the child has an empty buffer and working loops; the parent delivers its own messages once."""
    gate = Gate()
    cleanup.append(gate.release.set)
    ad, sender, _ = make(gate, cleanup)
    sender.put("parent-1")
    wait_for(lambda: gate.entered == ["parent-1"])
    sender.put("parent-2")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            if len(sender) == 0 and ad.stats()["in_flight"] == 0:
                recorder: RecordingDispatcher[str] = RecordingDispatcher()
                ad._state.dispatcher = recorder  # the gate's dispatch in the parent is not ours
                sender.put("child")
                recorder.wait_for_count(1, timeout=10)
                if recorder.messages() == ["child"] and ad.stop(5):
                    code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    gate.release.set()
    assert ad.stop(5) is True
    assert gate.done == ["parent-1", "parent-2"]


# -- RecordingDispatcher -----------------------------------------------------------------------


def test_recording_dispatcher_records_per_target_and_fails_chosen_messages() -> None:
    """RecordingDispatcher keeps messages per target, returns ids, and raises for chosen messages."""
    recorder: RecordingDispatcher[str] = RecordingDispatcher(fail=lambda m: m.startswith("x"))
    assert recorder.dispatch("a", "q1") == "msg-1"
    assert recorder.dispatch("b", "q2") == "msg-2"
    with pytest.raises(RuntimeError, match="'x1' was set to fail"):
        recorder.dispatch("x1", "q1")
    assert recorder.messages("q1") == ["a"] and recorder.messages("q2") == ["b"]
    assert recorder.messages() == ["a", "b"]
    assert recorder.targets() == ["q1", "q2"]
    assert [(m, type(e)) for m, e in recorder.failures("q1")] == [("x1", RuntimeError)]
    assert recorder.count() == 2 and recorder.count("q2") == 1
    assert not hasattr(recorder, "submit")
    recorder.clear()
    assert recorder.count() == 0 and recorder.failures() == []


def test_recording_dispatcher_fail_times_custom_error_and_submit() -> None:
    """fail_times lets a chosen message pass after n failures; error builds the exception; submit is optional."""
    recorder: RecordingDispatcher[str] = RecordingDispatcher(
        fail=["m"], fail_times=2, error=ConnectionError, with_submit=True
    )
    first = recorder.submit("m", "q")
    assert isinstance(first.exception(), ConnectionError)
    with pytest.raises(ConnectionError):
        recorder.dispatch("m", "q")
    assert recorder.submit("m", "q").result() == "msg-1"
    assert recorder.attempts("m") == 3 and recorder.submits == 2
    with pytest.raises(ConfigurationError, match="fail_times"):
        recorder.set_failing(["m"], fail_times=0)
    with pytest.raises(ConfigurationError, match="target"):
        recorder.dispatch("m", "")
    with pytest.raises(ConfigurationError, match="fail must be"):
        RecordingDispatcher(fail=42)  # type: ignore[arg-type]


def test_recording_dispatcher_is_thread_safe() -> None:
    """Concurrent dispatches from many threads are all recorded, none twice."""
    recorder: RecordingDispatcher[tuple[int, int]] = RecordingDispatcher()

    def work(index: int) -> None:
        for n in range(500):
            recorder.dispatch((index, n), f"q{index % 2}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert recorder.count() == 2000
    assert len(set(recorder.messages())) == 2000
    assert recorder.count("q0") == 1000
    with pytest.raises(DispatchTimeoutError):
        recorder.wait_for_count(2001, timeout=0.05)


def test_stop_called_from_inside_dispatch_or_the_handler_does_not_deadlock(
    cleanup: list[Callable[[], object]],
) -> None:
    """stop() called on the dispatch loop or the failure loop returns instead of waiting for itself."""
    results: dict[str, bool] = {}
    holder: list[AsyncDispatcher[Any]] = []

    class StopsItself:
        def dispatch(self, message: Any, target: str, *, delay_seconds: int | None = None) -> None:
            if message == "stop-from-dispatch":
                results["dispatch"] = holder[0].stop()
            elif message == "fail":
                raise ValueError(message)

    def handler(_failed: FailedMessage[Any]) -> None:
        results["handler"] = holder[1].stop()

    first, sender1, _ = make(StopsItself(), cleanup)
    holder.append(first)
    sender1.put("stop-from-dispatch")
    wait_for(lambda: "dispatch" in results)
    assert results["dispatch"] is False
    assert first.stop(5) is True

    second, sender2, _ = make(StopsItself(), cleanup, target="other", error_handler=handler)
    holder.append(second)
    sender2.put("fail")
    wait_for(lambda: "handler" in results)
    assert results["handler"] is False
    assert second.stop(5) is True


def test_stop_returns_within_its_timeout_when_a_batched_send_hangs(cleanup: list[Callable[[], object]]) -> None:
    """Behind an AsyncDispatcher, a hung send_batch does not stretch stop(); everything goes once released."""
    release = threading.Event()
    cleanup.append(release.set)
    sent: list[int] = []

    def send_batch(_target: str, messages: list[int]) -> list[str]:
        release.wait(30)
        sent.extend(messages)
        return [f"id-{m}" for m in messages]

    bd: BatchedDispatcher[int] = BatchedDispatcher(send_batch, max_batch_size=5, flush_interval=60.0)
    cleanup.append(lambda: bd.close(10))
    ad, sender, failures = make(bd, cleanup)
    for i in range(12):
        sender.put(i)
    assert ad.stop(0.3) is False  # returned while send_batch is still hung
    assert not release.is_set()
    release.set()
    assert ad.stop(10) is True
    assert sorted(sent) == list(range(12)) and failures == []


def test_a_collected_never_started_dispatcher_warns_about_its_buffer(caplog: pytest.LogCaptureFixture) -> None:
    """An AsyncDispatcher collected before start() logs how many buffered messages were not dispatched."""
    ad: AsyncDispatcher[int] = AsyncDispatcher(RecordingDispatcher(), "never")
    sender = ad.setup(5)
    sender.put(1)
    sender.put(2)
    with caplog.at_level(logging.WARNING, logger="threaddispatch"):
        del ad, sender
        gc.collect()
    assert any("2 buffered message(s) were not dispatched" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(20)
def test_collection_while_a_thread_holds_the_state_mutex_does_not_deadlock() -> None:
    """An AsyncDispatcher collected by a thread holding its mutex (a GC inside a locked section) stops
    without deadlocking that thread, and still dispatches what was buffered."""
    recorder: RecordingDispatcher[int] = RecordingDispatcher()
    ad: AsyncDispatcher[int] = AsyncDispatcher(recorder, "gc-locked")
    sender = ad.setup(10)
    ad.start()
    sender.put(1)
    recorder.wait_for_count(1)
    state = ad._state
    ref = weakref.ref(ad)
    del ad, sender  # the AsyncDispatcher <-> Sender cycle: only the cycle collector frees it
    collected = threading.Event()

    def collect_holding_the_mutex() -> None:
        with state.mutex:
            gc.collect()  # the finalizer runs here, on a thread that holds the state's mutex
        collected.set()

    threading.Thread(target=collect_holding_the_mutex, daemon=True).start()
    assert collected.wait(5.0), "the finalizer deadlocked on the state's mutex"
    assert ref() is None
    wait_for(state.finished, message="the loops drained and left")
    assert recorder.messages() == [1]


@pytest.mark.timeout(20)
def test_an_error_handler_calling_sys_exit_does_not_end_the_failure_loop() -> None:
    """A BaseException (sys.exit) from error_handler is contained like any error: the failure loop lives,
    every later failed message still reaches the handler, and stop() reports a clean drain of the loops."""
    reported: list[int] = []

    def handler(failed: FailedMessage[int]) -> None:
        reported.append(failed.message)
        if failed.message == 1:
            raise SystemExit(2)

    ad: AsyncDispatcher[int] = AsyncDispatcher(RecordingDispatcher(fail=[1, 2]), "exit-handler", handler)
    sender = ad.setup(10)
    ad.start()
    sender.put(1)
    sender.put(2)
    wait_for(lambda: reported == [1, 2], timeout=5.0, message="both failures reported")
    assert ad.stats()["handler_errors"] == 1
    assert ad.stop(5.0) is True


# -- BaseException from user code ---------------------------------------------------------------


class RaisingOnce:
    """A dispatcher that raises ``error`` for the message ``"boom"`` and records every other message."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.recorder: RecordingDispatcher[str] = RecordingDispatcher()

    def dispatch(self, message: str, target: str, *, delay_seconds: int | None = None) -> str | None:
        if message == "boom":
            raise self.error
        return self.recorder.dispatch(message, target)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(3), GeneratorExit()], ids=type)
def test_a_base_exception_from_dispatch_fails_that_message_and_the_loop_goes_on(
    error: BaseException, cleanup: list[Callable[[], object]], caplog: pytest.LogCaptureFixture
) -> None:
    """KeyboardInterrupt/SystemExit/GeneratorExit raised by dispatch fail that message only: it reaches the
    error handler with that error, later messages are dispatched, and stop() reports a clean drain."""
    dispatcher = RaisingOnce(error)
    ad, sender, failures = make(dispatcher, cleanup)
    with caplog.at_level(logging.ERROR, logger="threaddispatch"):
        sender.put("before")
        sender.put("boom")
        sender.put("after")
        wait_for(lambda: len(failures) == 1, timeout=5.0, message="the failure reported")
        dispatcher.recorder.wait_for_count(2)
        sender.put("later")
        dispatcher.recorder.wait_for_count(3)
        assert ad.stop(5.0) is True
    assert [(f.message, f.error, f.attempts) for f in failures] == [("boom", error, 1)]
    assert dispatcher.recorder.messages() == ["before", "after", "later"]
    assert (ad.sent, ad.failed) == (3, 1)
    assert not [r for r in caplog.records if r.levelno >= logging.CRITICAL]


@pytest.mark.timeout(20)
def test_a_base_exception_from_dispatch_goes_through_the_retry_policy(cleanup: list[Callable[[], object]]) -> None:
    """A SystemExit from dispatch is a failure like any other: retried under the policy, then final."""
    dispatcher = RaisingOnce(SystemExit(1))
    ad, sender, failures = make(dispatcher, cleanup, retry=RetryPolicy(max_attempts=3, backoff=Constant(0.0)))
    sender.put("boom")
    sender.put("ok")
    wait_for(lambda: len(failures) == 1, timeout=5.0, message="the final failure reported")
    assert ad.stop(5.0) is True
    assert [(f.message, f.attempts) for f in failures] == [("boom", 3)]
    assert (ad.retried, ad.sent, ad.failed) == (2, 1, 1)


class RaisingSubmitter(ManualSubmitter):
    """A submitting dispatcher whose submit raises KeyboardInterrupt for ``"boom"``."""

    def submit(self, message: Any, target: str) -> Future[str | None]:
        if message == "boom":
            raise KeyboardInterrupt
        return super().submit(message, target)


@pytest.mark.timeout(20)
def test_a_base_exception_from_submit_fails_that_message_and_the_loop_goes_on(
    cleanup: list[Callable[[], object]],
) -> None:
    """A KeyboardInterrupt from submit() fails that message; later messages are still submitted."""
    submitter = RaisingSubmitter()
    ad, sender, failures = make(submitter, cleanup)
    sender.put("boom")
    sender.put("after")
    wait_for(lambda: submitter.count() == 1, timeout=5.0, message="the later message submitted")
    submitter.resolve_all()
    assert ad.stop(5.0) is True
    assert [(f.message, type(f.error)) for f in failures] == [("boom", KeyboardInterrupt)]
    assert (ad.sent, ad.failed) == (1, 1)


@pytest.mark.timeout(20)
def test_a_retry_predicate_raising_system_exit_makes_the_failure_final(
    cleanup: list[Callable[[], object]],
) -> None:
    """retry_on raising SystemExit does not kill the loop: the failure is final and reported."""

    def retry_on(_error: BaseException) -> bool:
        raise SystemExit(4)

    recorder: RecordingDispatcher[str] = RecordingDispatcher(fail={"bad"})
    ad, sender, failures = make(recorder, cleanup, retry=RetryPolicy(max_attempts=3, retry_on=retry_on))
    sender.put("bad")
    sender.put("good")
    wait_for(lambda: len(failures) == 1, timeout=5.0, message="the failure reported")
    recorder.wait_for_count(1)
    assert ad.stop(5.0) is True
    assert [f.message for f in failures] == ["bad"] and recorder.messages() == ["good"]


# -- the bounded failure backlog ------------------------------------------------------------------


class BlockedHandler:
    """An error handler that blocks on every call until released; records what it got, in order."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.entered = 0
        self.reported: list[Any] = []

    def __call__(self, failed: FailedMessage[Any]) -> None:
        with self.lock:
            self.entered += 1
        if not self.release.wait(30):
            raise AssertionError("BlockedHandler was never released")
        with self.lock:
            self.reported.append(failed.message)

    def entered_count(self) -> int:
        with self.lock:
            return self.entered


@pytest.mark.timeout(30)
def test_the_failure_backlog_is_bounded_by_buffer_len_and_holds_the_dispatch_loop(
    cleanup: list[Callable[[], object]],
) -> None:
    """With the error handler blocked, at most buffer_len failures wait for it; the dispatch loop then waits
    (back-pressure reaches put), and once the handler goes on every message is reported, none lost."""
    handler = BlockedHandler()
    cleanup.append(handler.release.set)
    recorder: RecordingDispatcher[int] = RecordingDispatcher(fail=lambda _m: True)
    ad, sender, _ = make(recorder, cleanup, buffer_len=10, error_handler=handler)
    for i in range(21):  # 1 in the handler, 10 failures waiting for it, 10 in the buffer
        sender.put(i, timeout=10.0)
    held = {"failures_waiting": 10, "waiting": 10, "failed": 11, "in_flight": 0}
    wait_for(
        lambda: (
            {k: v for k, v in ad.stats().items() if k in held} == held
            and ad.stats()["failure_stalls"] >= 1
            and handler.entered_count() == 1
        ),
        timeout=5.0,
        message="the dispatch loop held back by a full failure backlog",
    )
    assert sender.try_put(99) is False
    with pytest.raises(QueueFullError):
        sender.put(99, timeout=0.05)
    handler.release.set()
    wait_for(lambda: len(handler.reported) == 21, timeout=10.0, message="every failure reported")
    assert ad.stop(10.0) is True
    assert handler.reported == list(range(21))
    assert (ad.failed, ad.stats()["failures_waiting"]) == (21, 0)


@pytest.mark.timeout(30)
def test_max_failures_pending_sets_the_bound(cleanup: list[Callable[[], object]]) -> None:
    """max_failures_pending=3 lets 3 failures wait for a blocked handler, whatever buffer_len is."""
    handler = BlockedHandler()
    cleanup.append(handler.release.set)
    recorder: RecordingDispatcher[int] = RecordingDispatcher(fail=lambda _m: True)
    ad, sender, _ = make(recorder, cleanup, buffer_len=100, error_handler=handler, max_failures_pending=3)
    for i in range(50):
        sender.put(i)
    held = {"failures_waiting": 3, "failed": 4, "waiting": 46, "in_flight": 0}
    wait_for(
        lambda: (
            {k: v for k, v in ad.stats().items() if k in held} == held
            and ad.stats()["failure_stalls"] >= 1
            and handler.entered_count() == 1
        ),
        timeout=5.0,
        message="the dispatch loop held back by a full failure backlog",
    )
    handler.release.set()
    wait_for(lambda: len(handler.reported) == 50, timeout=10.0, message="every failure reported")
    assert ad.stop(10.0) is True
    assert handler.reported == list(range(50))


@pytest.mark.timeout(30)
def test_the_failure_backlog_bound_holds_with_a_submitting_dispatcher(cleanup: list[Callable[[], object]]) -> None:
    """With submit, the loop hands nothing over while the backlog is full; what was in flight may still
    fail into it, so it holds at most max_failures_pending + max_in_flight - 1, and nothing is lost."""
    handler = BlockedHandler()
    cleanup.append(handler.release.set)
    submitter = ManualSubmitter()
    ad, sender, _ = make(
        submitter, cleanup, buffer_len=50, error_handler=handler, max_failures_pending=2, max_in_flight=4
    )
    for i in range(30):
        sender.put(i)
    most = 0

    def fail_until_held() -> bool:
        nonlocal most
        submitter.resolve_all(fail=lambda _m: True)
        stats = ad.stats()
        most = max(most, stats["failures_waiting"])
        return stats["in_flight"] == 0 and stats["failures_waiting"] >= 2

    wait_for(fail_until_held, timeout=10.0, message="the dispatch loop held back by a full failure backlog")
    assert most <= 2 + 4 - 1
    handed_over = submitter.count()
    assert handed_over == ad.failed < 30  # all handed over failed; the rest waits in the buffer
    assert ad.stats()["waiting"] == 30 - handed_over
    handler.release.set()

    def succeed_until_all_handed_over() -> bool:
        submitter.resolve_all()
        return submitter.count() == 30 and ad.stats()["in_flight"] == 0

    wait_for(succeed_until_all_handed_over, timeout=10.0, message="the rest handed over and sent")
    assert ad.stop(10.0) is True
    assert sorted(handler.reported) == list(range(handed_over))
    assert (ad.sent, ad.failed) == (30 - handed_over, handed_over)


@pytest.mark.timeout(30)
def test_an_error_handler_putting_into_a_full_buffer_gets_queue_full_not_a_deadlock(
    cleanup: list[Callable[[], object]],
) -> None:
    """A handler that puts a message while the buffer is full is refused at once (QueueFullError):
    waiting would deadlock, as the dispatch loop may be waiting for the handler."""
    outcomes: list[str] = []
    sender_box: list[Sender[int]] = []
    release = threading.Event()
    cleanup.append(release.set)

    def handler(failed: FailedMessage[int]) -> None:
        release.wait(30)
        try:
            sender_box[0].put(failed.message + 1000)
        except QueueFullError:
            outcomes.append("full")
        else:
            outcomes.append("accepted")

    recorder: RecordingDispatcher[int] = RecordingDispatcher(fail=lambda m: m < 1000)
    ad, sender, _ = make(recorder, cleanup, buffer_len=2, error_handler=handler, max_failures_pending=1)
    sender_box.append(sender)
    for i in range(4):  # 1 in the handler, 1 failure waiting, 2 in the buffer
        sender.put(i, timeout=10.0)
    held = {"failures_waiting": 1, "waiting": 2, "in_flight": 0}
    wait_for(
        lambda: {k: v for k, v in ad.stats().items() if k in held} == held,
        timeout=5.0,
        message="the dispatch loop held back by a full failure backlog",
    )
    release.set()
    wait_for(lambda: len(outcomes) == 4, timeout=10.0, message="every failure reported")
    assert ad.stop(10.0) is True
    assert outcomes[0] == "full"
    assert ad.failed == 4 and ad.sent == outcomes.count("accepted")


def test_repr_never_raises_for_an_instance_whose_constructor_did_not_finish() -> None:
    """repr() of an AsyncDispatcher whose __init__ never ran (or failed early) says so instead of raising."""
    half: AsyncDispatcher[Any] = AsyncDispatcher.__new__(AsyncDispatcher)
    assert "not constructed" in repr(half)
