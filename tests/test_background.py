"""BackgroundDispatcher: windows, size trigger, overflow, errors, retries, futures, flush and close."""

from __future__ import annotations

import gc
import inspect
import itertools
import json
import logging
import math
import os
import re
import select
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import pytest

from threaddispatch import (
    BackgroundDispatcher,
    ConfigurationError,
    Constant,
    DispatcherClosedError,
    FailedBatch,
    QueueFullError,
    RetryPolicy,
)
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(30)


class Sink:
    """A thread-safe send_batch that records batches and when they arrived."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: list[list[Any]] = []
        self.times: list[float] = []

    def __call__(self, entries: list[Any]) -> None:
        with self.lock:
            self.batches.append(list(entries))
            self.times.append(time.monotonic())

    @property
    def entries(self) -> list[Any]:
        with self.lock:
            return [e for batch in self.batches for e in batch]


class Gate:
    """A send_batch that blocks on its first call until released, recording every batch."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.sink = Sink()

    def __call__(self, entries: list[Any]) -> None:
        self.entered.set()
        assert self.release.wait(20), "test never released the gate"
        self.sink(entries)


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, "10", None, True])
def test_ms_delay_must_be_a_finite_positive_number(bad: Any) -> None:
    """A bad ms_delay is refused at construction with the value in the message."""
    with pytest.raises(ConfigurationError, match=repr(bad).replace("(", r"\(")):
        BackgroundDispatcher(Sink(), ms_delay=bad)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_queue_size": -5}, "max_queue_size"),
        ({"name": 7}, "name"),
        ({"name": ""}, "name"),
        ({"overflow": "spill"}, "spill"),
        ({"on_error": 42}, "on_error"),
        ({"retry": 3}, "retry"),
    ],
)
def test_bad_options_are_refused_at_construction(kwargs: dict[str, Any], needle: str) -> None:
    """Every bad option raises ConfigurationError naming the option or value."""
    with pytest.raises(ConfigurationError, match=needle):
        BackgroundDispatcher(Sink(), 10, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "effective"),
    [
        ({"max_queue_size": 3}, 3),
        ({"max_batch_size": 100_000}, 10_000),
        ({"max_batch_size": 4, "max_queue_size": 4}, 4),
    ],
)
def test_a_queue_smaller_than_the_batch_size_is_accepted_and_caps_the_batch(
    kwargs: dict[str, Any], effective: int
) -> None:
    """A tiny buffer, or a batch size meant never to trigger, is accepted: the batch size in effect
    is the smaller of the two, so a full buffer goes at once (long before the minute-long window)."""
    sink = Sink()
    d = BackgroundDispatcher(sink, ms_delay=60_000, **kwargs)
    for i in range(effective):
        d.enqueue(i)
    wait_for(lambda: sink.batches, timeout=10, message="the size-triggered batch")
    assert sink.batches == [list(range(effective))]
    assert d.close(10)


def test_send_batch_must_be_callable() -> None:
    """A non-callable send function is refused at once."""
    with pytest.raises(ConfigurationError, match="send_batch"):
        BackgroundDispatcher("not callable", 10)  # type: ignore[arg-type]


def test_nothing_enqueued_means_no_call() -> None:
    """flush and close with an empty buffer never call send_batch."""
    sink = Sink()
    d = BackgroundDispatcher(sink, ms_delay=5)
    assert d.flush(1.0)
    assert d.close(1.0)
    assert sink.batches == []


def test_one_entry_is_sent_alone_after_the_window() -> None:
    """A single entry goes in a one-entry batch, no earlier than ms_delay after it arrived."""
    sink = Sink()
    with BackgroundDispatcher(sink, ms_delay=50) as d:
        enqueued_at = time.monotonic()
        d.enqueue("only")
        wait_for(lambda: sink.batches, message="the batch")
    assert sink.batches == [["only"]]
    assert sink.times[0] - enqueued_at >= 0.045


@pytest.mark.timeout(30)
def test_at_most_one_call_per_window_under_a_trickle() -> None:
    """With entries arriving all the time, consecutive partial batches are at least ms_delay apart."""
    sink = Sink()
    d = BackgroundDispatcher(sink, ms_delay=40, max_batch_size=10_000)
    stop = time.monotonic() + 0.5
    count = 0
    while time.monotonic() < stop:
        d.enqueue(count)
        count += 1
        time.sleep(0.001)  # producer pacing, not a wait for the dispatcher
    with sink.lock:
        window_times = list(sink.times)  # close() then sends the rest at once, by design
    assert d.close(5.0)
    assert sink.entries == list(range(count))
    gaps = [b - a for a, b in itertools.pairwise(window_times)]
    assert len(window_times) >= 5
    assert min(gaps) >= 0.035, gaps


def test_a_full_batch_goes_at_once_without_waiting_for_the_window() -> None:
    """max_batch_size waiting entries are sent immediately even with a one-minute window."""
    sink = Sink()
    d = BackgroundDispatcher(sink, ms_delay=60_000, max_batch_size=10)
    for i in range(25):
        d.enqueue(i)
    wait_for(lambda: len(sink.batches) >= 2, message="two full batches")
    assert sink.batches[:2] == [list(range(10)), list(range(10, 20))]
    assert d.stats()["pending"] == 5  # the partial batch still waits for its window
    assert d.close(5.0)
    assert sink.batches[2] == list(range(20, 25))


def test_order_is_kept_and_no_batch_exceeds_the_maximum() -> None:
    """Entries from one producer arrive in order, in batches of at most max_batch_size."""
    sink = Sink()
    d = BackgroundDispatcher(sink, ms_delay=5, max_batch_size=64, max_queue_size=20_000)
    for i in range(10_000):
        d.enqueue(i)
    assert d.close(10.0)
    assert sink.entries == list(range(10_000))
    assert all(0 < len(b) <= 64 for b in sink.batches)


def _fill_behind_a_blocked_send(overflow: str) -> tuple[BackgroundDispatcher[int], Gate]:
    """A dispatcher whose first batch, exactly entries 0-4, is held in send_batch until gate.release.

    The window is a minute long, so that batch goes by the size trigger alone: however the
    threads are scheduled, it holds all five (a short window could close on fewer).
    """
    gate = Gate()
    d: BackgroundDispatcher[int] = BackgroundDispatcher(
        gate,
        ms_delay=60_000,
        max_batch_size=5,
        max_queue_size=10,
        overflow=overflow,  # type: ignore[arg-type]
    )
    for i in range(5):
        d.enqueue(i)
    assert gate.entered.wait(5), "first batch never started"
    return d, gate


def test_drop_newest_keeps_the_oldest_and_counts_the_rest() -> None:
    """Past max_queue_size, new entries are dropped and counted in total_dropped."""
    d, gate = _fill_behind_a_blocked_send("drop_newest")
    for i in range(5, 25):
        d.enqueue(i)
    assert d.total_dropped == 10
    gate.release.set()
    assert d.close(5.0)
    assert gate.sink.entries == list(range(15))
    assert d.stats()["dropped"] == 10


def test_drop_oldest_keeps_the_newest() -> None:
    """With drop_oldest the buffer keeps the latest max_queue_size entries."""
    d, gate = _fill_behind_a_blocked_send("drop_oldest")
    for i in range(5, 25):
        d.enqueue(i)
    assert d.total_dropped == 10
    gate.release.set()
    assert d.close(5.0)
    assert gate.sink.entries == list(range(5)) + list(range(15, 25))


def test_raise_policy_refuses_the_entry_that_does_not_fit() -> None:
    """overflow='raise' raises QueueFullError naming the entry, and keeps what fitted."""
    d, gate = _fill_behind_a_blocked_send("raise")
    for i in range(5, 15):
        d.enqueue(i)
    with pytest.raises(QueueFullError, match="15"):
        d.enqueue(15)
    gate.release.set()
    assert d.close(5.0)
    assert gate.sink.entries == list(range(15))
    assert d.total_dropped == 0


def test_block_policy_waits_for_room_then_times_out() -> None:
    """overflow='block' blocks a full enqueue; it times out with QueueFullError or proceeds when room appears."""
    d, gate = _fill_behind_a_blocked_send("block")
    for i in range(5, 15):
        d.enqueue(i)
    assert d.stats()["pending"] == 10
    with pytest.raises(QueueFullError, match="stayed full"):
        d.enqueue(99, timeout=0.2)
    done = threading.Event()

    def blocked_producer() -> None:
        d.enqueue(15)
        done.set()

    producer = threading.Thread(target=blocked_producer)
    producer.start()
    wait_for(lambda: d._engine._space_waiters == 1, message="the producer waiting for room")
    assert not done.is_set()  # room appears only when the held send returns
    gate.release.set()
    assert done.wait(5)
    producer.join()
    assert d.close(5.0)
    assert gate.sink.entries == list(range(16))


def test_enqueue_and_submit_after_close_raise() -> None:
    """Work offered after close raises DispatcherClosedError; close is idempotent."""
    d = BackgroundDispatcher(Sink(), ms_delay=5)
    assert d.close(1.0)
    with pytest.raises(DispatcherClosedError, match="closed"):
        d.enqueue(1)
    with pytest.raises(DispatcherClosedError):
        d.submit(1)
    assert d.close(1.0)
    assert d.closed


@pytest.mark.parametrize("overflow", ["block", "raise"])
def test_locked_policies_also_refuse_after_close(overflow: str) -> None:
    """The locked enqueue path of block/raise raises DispatcherClosedError after close too."""
    d = BackgroundDispatcher(Sink(), ms_delay=5, overflow=overflow)  # type: ignore[arg-type]
    d.close(1.0)
    with pytest.raises(DispatcherClosedError):
        d.enqueue(1)


def test_flush_sends_now_and_waits() -> None:
    """flush sends what is queued without waiting for the window and returns once it was sent."""
    sink = Sink()
    d = BackgroundDispatcher(sink, ms_delay=60_000)
    for i in range(3):
        d.enqueue(i)
    assert d.flush(5.0)
    assert sink.entries == [0, 1, 2]
    d.enqueue(3)
    assert d.flush(5.0)
    assert sink.batches == [[0, 1, 2], [3]]
    assert d.close(1.0)


def test_flush_and_close_honour_their_timeouts_with_a_hung_send() -> None:
    """A send that hangs cannot stretch flush or close past their timeouts; both report False."""
    gate = Gate()
    d = BackgroundDispatcher(gate, ms_delay=1)
    d.enqueue("stuck")
    assert gate.entered.wait(5)
    d.enqueue("behind")
    started = time.monotonic()
    assert d.flush(0.2) is False
    assert d.close(0.2) is False
    assert time.monotonic() - started >= 0.35  # both waited out their timeouts, and returned
    gate.release.set()
    assert d.close(5.0)  # once the send returns, the rest drains
    assert gate.sink.entries == ["stuck", "behind"]


def test_failed_batches_reach_on_error_and_the_worker_lives() -> None:
    """A raising send reports FailedBatch(entries, error); later batches are still sent."""
    failures: list[FailedBatch[Any]] = []
    sink = Sink()

    def send(entries: list[Any]) -> None:
        if "bad" in entries:
            raise ConnectionError("remote down")
        sink(entries)

    d = BackgroundDispatcher(send, ms_delay=1, on_error=failures.append)
    d.enqueue("bad")
    assert d.flush(5.0)
    d.enqueue("good")
    assert d.close(5.0) is True
    assert [f.entries for f in failures] == [["bad"]]
    assert isinstance(failures[0].error, ConnectionError)
    assert failures[0].attempts == 1
    assert sink.entries == ["good"]
    stats = d.stats()
    assert (stats["sent"], stats["failed"], stats["failed_batches"]) == (1, 1, 1)


def test_failures_without_on_error_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Without on_error a failed batch is logged at ERROR with its size; nothing is silent."""

    def send(entries: list[Any]) -> None:
        raise ValueError("nope")

    d = BackgroundDispatcher(send, ms_delay=1, name="logged")
    with caplog.at_level(logging.ERROR, logger="threaddispatch"):
        d.enqueue(1)
        d.enqueue(2)
        assert d.close(5.0) is False
    assert any("logged" in r.getMessage() and "2 entries" in r.getMessage() for r in caplog.records)


def test_a_raising_on_error_is_contained(caplog: pytest.LogCaptureFixture) -> None:
    """on_error raising is logged; the worker goes on sending."""
    sink = Sink()

    def send(entries: list[Any]) -> None:
        if entries == ["bad"]:
            raise RuntimeError("send failed")
        sink(entries)

    def broken_handler(_failed: FailedBatch[Any]) -> None:
        raise RuntimeError("handler failed")

    d = BackgroundDispatcher(send, ms_delay=1, on_error=broken_handler)
    with caplog.at_level(logging.ERROR, logger="threaddispatch"):
        d.enqueue("bad")
        assert d.flush(5.0)
        d.enqueue("after")
        d.close(5.0)
    assert sink.entries == ["after"]
    assert any("on_error raised" in r.getMessage() for r in caplog.records)


def test_retry_policy_retries_a_failed_batch_until_it_succeeds() -> None:
    """With retry, a batch failing twice is sent on the third attempt, spaced by the backoff."""
    attempts: list[float] = []
    sink = Sink()

    def flaky(entries: list[Any]) -> None:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise TimeoutError("flaky")
        sink(entries)

    d = BackgroundDispatcher(flaky, ms_delay=1, retry=RetryPolicy(max_attempts=3, backoff=Constant(0.05)))
    d.enqueue("x")
    assert d.flush(5.0)
    assert sink.entries == ["x"]
    assert all(b - a >= 0.045 for a, b in itertools.pairwise(attempts))
    assert d.stats()["retries"] == 2
    assert d.close(1.0)


def test_retry_gives_up_after_max_attempts_or_when_the_predicate_says_no() -> None:
    """Exhausted retries and non-retryable errors end in one FailedBatch with the attempt count."""
    failures: list[FailedBatch[Any]] = []

    def send(entries: list[Any]) -> None:
        raise (KeyError if entries == ["fatal"] else TimeoutError)("x")

    policy = RetryPolicy(max_attempts=3, backoff=Constant(0.0), retry_on=lambda e: isinstance(e, TimeoutError))
    d = BackgroundDispatcher(send, ms_delay=1, retry=policy, on_error=failures.append)
    d.enqueue("transient")
    assert d.flush(5.0)
    d.enqueue("fatal")
    d.close(5.0)
    assert [(f.entries, f.attempts) for f in failures] == [(["transient"], 3), (["fatal"], 1)]


def test_close_cuts_a_retry_backoff_short() -> None:
    """close() does not wait out a long backoff: the last attempts go at once."""
    calls: list[Any] = []

    def send(entries: list[Any]) -> None:
        calls.append(entries)
        raise TimeoutError("down")

    d = BackgroundDispatcher(send, ms_delay=1, retry=RetryPolicy(max_attempts=3, backoff=Constant(30.0)))
    d.enqueue("x")
    wait_for(lambda: calls, message="first attempt")
    assert d.close(5.0) is False
    assert len(calls) == 3  # a backoff waited out would have left close() with only the first attempt made


def test_submit_futures_carry_success_failure_and_drops() -> None:
    """submit's Future resolves after the send, fails with the send error, or with QueueFullError when dropped."""

    def send(entries: list[Any]) -> None:
        if "boom" in entries:
            raise OSError("boom")

    d = BackgroundDispatcher(send, ms_delay=1)
    ok = d.submit("fine")
    assert ok.result(5) is None
    bad = d.submit("boom")
    with pytest.raises(OSError, match="boom"):
        bad.result(5)
    d.close(1.0)

    d2, gate = _fill_behind_a_blocked_send("drop_newest")
    kept = [d2.submit(i) for i in range(5, 15)]
    dropped = d2.submit(15)
    with pytest.raises(QueueFullError):
        dropped.result(5)
    gate.release.set()
    assert d2.close(5.0)
    assert all(f.result(5) is None for f in kept)


def test_mixed_enqueue_and_submit_deliver_plain_entries() -> None:
    """send_batch always receives the entries themselves, never wrappers."""
    sink = Sink()
    d = BackgroundDispatcher(sink, ms_delay=60_000, max_batch_size=4)
    futures = [d.submit("a"), None, d.submit("c")]
    d.enqueue("b")
    d.enqueue("d")
    wait_for(lambda: sink.batches, message="full batch")
    assert sink.batches == [["a", "c", "b", "d"]]
    assert futures[0] is not None and futures[0].result(1) is None
    d.close(1.0)


@pytest.mark.timeout(60)
def test_many_producers_lose_nothing() -> None:
    """8 threads x 20,000 entries: every entry arrives exactly once, batches within bounds."""
    sink = Sink()
    d = BackgroundDispatcher(sink, ms_delay=2, max_batch_size=256, max_queue_size=200_000)
    barrier = threading.Barrier(8)

    def produce(base: int) -> None:
        barrier.wait()
        for i in range(20_000):
            d.enqueue(base + i)

    threads = [threading.Thread(target=produce, args=(n * 1_000_000,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert d.close(30.0)
    got = sink.entries
    assert len(got) == 160_000
    assert set(got) == {n * 1_000_000 + i for n in range(8) for i in range(20_000)}
    assert all(len(b) <= 256 for b in sink.batches)
    for n in range(8):  # each producer's own entries keep their order
        mine = [e for e in got if e // 1_000_000 == n]
        assert mine == sorted(mine)
    stats = d.stats()
    assert stats["enqueued"] == stats["sent"] == 160_000


def test_context_manager_drains_on_exit() -> None:
    """Leaving the with-block closes the dispatcher after delivering everything."""
    sink = Sink()
    with BackgroundDispatcher(sink, ms_delay=60_000) as d:
        d.enqueue(1)
        d.enqueue(2)
    assert sink.entries == [1, 2]
    assert d.closed


def test_stats_add_up() -> None:
    """enqueued == sent + failed + dropped + pending at rest."""
    d, gate = _fill_behind_a_blocked_send("drop_newest")
    for i in range(5, 30):
        d.enqueue(i)
    s = d.stats()
    assert s["enqueued"] == 30
    assert s["pending"] == 10 and s["dropped"] == 15 and s["in_flight"] == 1
    gate.release.set()
    assert d.close(5.0)
    s = d.stats()
    assert s["enqueued"] == s["sent"] + s["failed"] + s["dropped"] + s["pending"] == 30


def test_an_unreferenced_dispatcher_is_collected_and_its_entries_still_go() -> None:
    """Dropping the last reference collects the dispatcher; pending entries are still delivered."""
    sink = Sink()
    d = BackgroundDispatcher(sink, ms_delay=60_000)
    d.enqueue("pending")
    ref = weakref.ref(d)
    del d
    gc.collect()
    assert ref() is None
    wait_for(lambda: sink.entries == ["pending"], message="drain after collection")


def test_an_idle_dispatcher_without_entries_is_collected_with_no_thread() -> None:
    """A dispatcher that never received anything starts no thread and is collected."""
    d = BackgroundDispatcher(Sink(), ms_delay=10)
    ref = weakref.ref(d)
    del d
    gc.collect()
    assert ref() is None


def test_repr_names_the_dispatcher() -> None:
    """repr shows the name, the window and the state."""
    d = BackgroundDispatcher(Sink(), ms_delay=10, name="audit")
    assert "audit" in repr(d) and "open" in repr(d)
    d.close()
    assert "closed" in repr(d)


@pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest", "block", "raise"])
def test_timeout_is_keyword_only_on_enqueue_and_submit(overflow: str) -> None:
    """A second positional argument (a ported Zuplo ``enqueue(entry, context)``, or an old positional
    timeout) is a TypeError under every policy, and nothing is enqueued; timeout= still works."""
    sink = Sink()
    d = BackgroundDispatcher(sink, ms_delay=60_000, max_queue_size=10, overflow=overflow)  # type: ignore[arg-type]
    context = {"requestId": "r-1"}
    for call in (d.enqueue, d.submit):
        for second in (context, 5, None):
            with pytest.raises(TypeError, match="positional"):
                call("ported", second)  # type: ignore[call-arg, arg-type]
    with pytest.raises(TypeError, match="positional"):
        d.enqueue("ported", [], None, None, None)  # type: ignore[call-arg, arg-type]
    assert d.stats()["pending"] == 0
    d.enqueue("a", timeout=1)
    assert d.submit("b", timeout=None).done() is False
    for call in (d.enqueue, d.submit):
        parameter = inspect.signature(call).parameters["timeout"]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY
    assert d.close(10)
    assert sink.entries == ["a", "b"]


class _Refused(Exception):
    pass


def _fail_engine(*args: Any, **kwargs: Any) -> Any:
    raise _Refused("no engine")


@pytest.mark.parametrize("failure", ["bad option", "engine"])
def test_repr_never_raises_for_a_dispatcher_whose_constructor_failed(
    failure: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance left half-made by a failing __init__ (seen in tracebacks, debuggers, log lines)
    still has a repr, saying it was never made."""
    d = BackgroundDispatcher.__new__(BackgroundDispatcher)
    if failure == "engine":
        monkeypatch.setattr("threaddispatch.background.BatchEngine", _fail_engine)
        with pytest.raises(_Refused):
            d.__init__(Sink(), 10, name="half")  # type: ignore[misc]
        assert "'half'" in repr(d)
    else:
        with pytest.raises(ConfigurationError):
            d.__init__(Sink(), 10, max_batch_size=0)  # type: ignore[misc]
    assert "not constructed" in repr(d)
    assert repr(BackgroundDispatcher.__new__(BackgroundDispatcher)).startswith("<BackgroundDispatcher")


def test_close_from_inside_send_batch_returns_instead_of_deadlocking() -> None:
    """send_batch calling close() on its own dispatcher gets False at once; the dispatcher still closes."""
    results: list[bool] = []
    holder: list[BackgroundDispatcher[int]] = []

    def send(entries: list[int]) -> None:
        results.append(holder[0].close())

    d = BackgroundDispatcher(send, ms_delay=1)
    holder.append(d)
    d.enqueue(1)
    wait_for(lambda: results, message="close called from send_batch")
    assert results == [False]
    assert d.close(5.0)
    holder.clear()


@pytest.mark.timeout(20)
def test_collection_while_this_thread_holds_the_engine_lock_does_not_deadlock() -> None:
    """A dispatcher in a reference cycle collected by a thread holding its engine's lock still drains."""
    sink = Sink()
    d = BackgroundDispatcher(sink, ms_delay=60_000)
    d.enqueue("in a cycle")
    engine = d._engine
    d.cycle = d  # type: ignore[attr-defined]  # only the cycle collector can free it now
    ref = weakref.ref(d)
    del d
    with engine._lock:
        gc.collect()  # the finalizer runs here, on a thread that holds the engine's lock
    assert ref() is None
    wait_for(lambda: sink.entries == ["in a cycle"], message="the background drain")


@pytest.mark.timeout(10)
def test_a_raising_retry_backoff_makes_the_failure_final_not_silent() -> None:
    """A backoff that raises must not lose the batch: on_error gets it and submit's Future fails."""
    failures: list[FailedBatch[Any]] = []

    def send(entries: list[Any]) -> None:
        raise TimeoutError("down")

    def broken_backoff(_attempt: int) -> float:
        raise ZeroDivisionError("broken backoff")

    d = BackgroundDispatcher(
        send, ms_delay=1, retry=RetryPolicy(max_attempts=3, backoff=broken_backoff), on_error=failures.append
    )
    future = d.submit("x")
    with pytest.raises(TimeoutError):
        future.result(5.0)
    assert [(f.entries, type(f.error)) for f in failures] == [(["x"], TimeoutError)]
    assert d.stats()["failed"] == 1
    assert d.close(5.0) is True


@pytest.mark.timeout(10)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, "1"])
def test_flush_close_and_blocking_enqueue_refuse_a_bad_timeout_at_the_call(bad: Any) -> None:
    """A NaN, infinite, negative or non-number timeout raises ConfigurationError at once, before any wait."""
    release = threading.Event()
    started = threading.Event()

    def send(entries: list[Any]) -> None:
        started.set()
        release.wait(5.0)

    d = BackgroundDispatcher(send, ms_delay=1, max_batch_size=1, max_queue_size=1, overflow="block")
    try:
        d.enqueue("busy")
        assert started.wait(5.0)
        d.enqueue("fills the queue")
        with pytest.raises(ConfigurationError, match="timeout"):
            d.flush(bad)
        with pytest.raises(ConfigurationError, match="timeout"):
            d.enqueue("x", timeout=bad)
        with pytest.raises(ConfigurationError, match="timeout"):
            d.close(bad)
        assert not d.closed
    finally:
        release.set()
        assert d.close(5.0)


@pytest.mark.timeout(15)
def test_send_batch_calling_sys_exit_neither_kills_the_worker_nor_hangs_close() -> None:
    """A BaseException (sys.exit) from send_batch is contained: the batch is reported failed, later
    entries are still sent, and close(None) returns instead of waiting forever for the dead batch."""
    failures: list[FailedBatch[Any]] = []
    sink = Sink()

    def send(entries: list[Any]) -> None:
        if entries == ["exit"]:
            raise SystemExit(3)
        sink(entries)

    d = BackgroundDispatcher(send, ms_delay=1, on_error=failures.append)
    future = d.submit("exit")
    with pytest.raises(SystemExit):
        future.result(5.0)
    assert [f.entries for f in failures] == [["exit"]]
    d.enqueue("after")
    assert d.flush(5.0)
    assert sink.entries == ["after"]
    result: list[bool] = []
    closer = threading.Thread(target=lambda: result.append(d.close(None)), daemon=True)
    closer.start()
    closer.join(5.0)
    assert result == [True]


@pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest", "block", "raise"])
@pytest.mark.parametrize("bad", [-1, -0.001, math.nan, math.inf, "1", True, False, [1]])
def test_enqueue_and_submit_refuse_a_bad_timeout_under_every_policy(overflow: str, bad: Any) -> None:
    """A negative, NaN, infinite, non-number or bool timeout raises ConfigurationError naming it, whatever
    the overflow policy (the drop policies never wait, but a bad argument is still a bug at the call)."""
    sink = Sink()
    d: BackgroundDispatcher[str] = BackgroundDispatcher(sink, ms_delay=60_000, overflow=overflow)  # type: ignore[arg-type]
    needle = f"timeout.*{re.escape(repr(bad))}"
    with pytest.raises(ConfigurationError, match=needle):
        d.enqueue("refused", timeout=bad)
    with pytest.raises(ConfigurationError, match=needle):
        d.submit("refused too", timeout=bad)
    assert d.stats()["pending"] == 0
    d.enqueue("a", timeout=1.5)
    d.enqueue("b", timeout=0)
    assert d.submit("c", timeout=2).done() is False
    assert d.close(5.0)
    assert sink.entries == ["a", "b", "c"]


def _run_in_forked_child(child: Callable[[], dict[str, Any]], timeout: float = 20.0) -> dict[str, Any]:
    """Fork; run ``child`` in the child and return the dict it reports through a pipe.

    The child writes its report and leaves with ``os._exit`` whatever happens; a child that
    reports nothing within ``timeout`` is killed and the test fails.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_end)
            try:
                report = child()
            except BaseException as error:  # reported to the parent
                report = {"error": repr(error)}
            os.write(write_end, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                pytest.fail("the forked child reported nothing in time")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(b"".join(chunks).decode())
    return result


@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_has_its_own_counters_fresh_locks_and_a_working_dispatcher() -> None:
    """Forked while it had sent 100 entries, held 3 more, and another thread held its close lock, the
    child's dispatcher counts from zero, holds none of the parent's entries, sends its own, and closes;
    the parent sends its 3 pending entries once."""
    sink = Sink()
    d: BackgroundDispatcher[Any] = BackgroundDispatcher(sink, ms_delay=60_000)
    for i in range(100):
        d.enqueue(i)
    assert d.flush(10)
    pending_future = d.submit("pending-1")
    d.enqueue("pending-2")
    d.enqueue("pending-3")
    held = threading.Event()
    release = threading.Event()

    def hold_the_close_lock() -> None:
        with d._close_lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_the_close_lock, daemon=True)
    holder.start()
    assert held.wait(10)

    def child() -> dict[str, Any]:
        report: dict[str, Any] = {"stats_at_fork": d.stats(), "close_lock_held": d._close_lock.locked()}
        d.enqueue("child-1")
        future = d.submit("child-2")
        report["flushed"] = d.flush(10)
        report["future_done"] = future.done() and future.exception() is None
        report["stats_after"] = d.stats()
        closed: list[bool] = []
        closer = threading.Thread(target=lambda: closed.append(d.close(10)), daemon=True)
        closer.start()
        closer.join(15)
        report["closed"] = closed
        report["sent"] = sink.entries
        return report

    try:
        report = _run_in_forked_child(child)
    finally:
        release.set()
        holder.join(10)
    zero = dict.fromkeys(d.stats(), 0)
    assert report.get("error") is None, report
    assert report["stats_at_fork"] == zero
    assert report["close_lock_held"] is False
    assert report["flushed"] is True and report["future_done"] is True
    assert report["stats_after"] == {**zero, "enqueued": 2, "sent": 2, "batches": 1, "calls": 1}
    assert report["closed"] == [True]
    assert report["sent"] == [*range(100), "child-1", "child-2"]  # the sink list was copied at fork
    # The parent still holds its own pending entries and sends them once.
    assert d.close(10)
    assert sink.entries == [*range(100), "pending-1", "pending-2", "pending-3"]
    assert pending_future.result(5) is None
    assert d.stats()["sent"] == 103
