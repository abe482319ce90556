"""Hostile: AsyncDispatcher -> BatchedDispatcher hand-offs lose, duplicate or miscount no message.

Attacks this session's changes: up to 1024 messages per hand-off, each entry its own token
(a retried one's attempts in ``handed_attempts``), the inline put and the derived
``buffered`` count. The same message object is put many times (identity), equal but
distinct messages are put (equality), failing and succeeding messages share batches and
retries cross hand-offs, with several send slots, a small ``max_in_flight`` and a small
buffer, and ``stop()`` racing the producers.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest

from threaddispatch import AsyncDispatcher, BatchedDispatcher
from threaddispatch.backoff import Constant, RetryPolicy
from threaddispatch.buffered import FailedMessage
from threaddispatch.errors import DispatcherClosedError
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(120)

PRODUCERS = 4
ATTEMPTS = 3


class Same:
    """Equal to every other Same of its number, and unhashable (so told apart only by equality or identity)."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, number: int) -> None:
        self.number = number

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Same) and other.number == self.number

    def __repr__(self) -> str:
        return f"Same({self.number})"


SHARED = Same(-1)  # one object, put many times by every producer


def key(message: Any) -> tuple[str, int]:
    if message is SHARED:
        return ("shared", -1)
    if isinstance(message, Same):
        return ("same", message.number)
    return ("int", message)


class Send:
    """send_batch: fails about 2 in 7 messages (and every 23rd whole batch raises), by a call counter."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.n = 0
        self.delivered: Counter[tuple[str, int]] = Counter()
        self.failures = 0  # failure outcomes returned or raised, message by message
        self.max_batch = 0
        self.watch: Any = None  # read in each call: the AsyncDispatcher's in_flight
        self.max_watched = 0

    def __call__(self, _target: str, messages: list[Any]) -> list[Any]:
        with self.lock:
            self.n += 1
            self.max_batch = max(self.max_batch, len(messages))
            if self.watch is not None:
                self.max_watched = max(self.max_watched, self.watch())
            if self.n % 23 == 0:
                self.failures += len(messages)
                raise ConnectionError(f"call {self.n} down")
            results: list[Any] = []
            for m in messages:
                self.n += 1
                if (self.n * 2654435761) % 7 < 2:
                    self.failures += 1
                    results.append(KeyError(repr(m)))
                else:
                    self.delivered[key(m)] += 1
                    results.append(f"id-{self.n}")
            return results


def messages_for(producer: int, count: int) -> list[Any]:
    out: list[Any] = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            out.append(SHARED)
        elif kind == 1:
            out.append(Same(i % 10))  # equal to other producers' Same of that number, a distinct object
        else:
            out.append(i % 50)  # equal ints, put again and again
    return out


@pytest.mark.parametrize(
    ("sends", "batch", "buffer_len", "max_in_flight", "prefill"),
    [
        (1, 3, 16, 9, False),
        (2, 10, 16, 9, False),
        (4, 7, 16, 9, False),
        # The whole buffer put before start: hand-offs of up to 1024 messages, bounded by max_in_flight.
        (2, 10, 2400, 2000, True),
        (4, 10, 2400, 700, True),
    ],
)
def test_every_put_is_sent_once_or_reported_once(
    sends: int, batch: int, buffer_len: int, max_in_flight: int, prefill: bool
) -> None:
    send = Send()
    failed: list[FailedMessage[Any]] = []
    flock = threading.Lock()

    def on_failed(f: FailedMessage[Any]) -> None:
        with flock:
            failed.append(f)

    seen_in_flight: list[int] = []
    bd: BatchedDispatcher[Any] = BatchedDispatcher(
        send, max_batch_size=batch, flush_interval=0.001, max_concurrent_sends=sends, name=f"hostile-b-{sends}"
    )
    ad: AsyncDispatcher[Any] = AsyncDispatcher(
        bd,
        "q",
        on_failed,
        retry=RetryPolicy(max_attempts=ATTEMPTS, backoff=Constant(0.0)),
        max_in_flight=max_in_flight,
    )
    send.watch = lambda: (
        ad._state.in_flight
    )  # an int read: no lock (a send may run on the loop, in its mutex-free part)
    sender = ad.setup(buffer_len)
    if not prefill:
        ad.start()
    puts: Counter[tuple[str, int]] = Counter()
    all_messages = [messages_for(p, 600) for p in range(PRODUCERS)]
    for chunk in all_messages:
        puts.update(key(m) for m in chunk)
    errors: list[BaseException] = []

    def produce(chunk: list[Any]) -> None:
        try:
            for n, m in enumerate(chunk):
                sender.put(m, timeout=60)
                if n % 17 == 0 and not prefill:
                    seen_in_flight.append(ad.stats()["in_flight"])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=produce, args=(c,)) for c in all_messages]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
            assert not t.is_alive()
        if prefill:
            assert ad.stats()["waiting"] == 2400
            ad.start()
        total = sum(puts.values())
        wait_for(lambda: ad.sent + ad.failed == total, timeout=60, message="every message settled")
        assert ad.stop(30) is True
    finally:
        ad.stop(30)
        bd.close(30)
    assert errors == []
    got_failed = Counter(key(f.message) for f in failed)
    for k, count in puts.items():
        assert send.delivered[k] + got_failed[k] == count, (k, send.delivered[k], got_failed[k], count)
    assert all(f.attempts == ATTEMPTS for f in failed), Counter(f.attempts for f in failed)
    s = ad.stats()
    assert s["buffered"] == total and s["sent"] == sum(send.delivered.values()) and s["failed"] == len(failed), s
    assert s["in_flight"] == 0 and s["waiting"] == 0 and s["failures_waiting"] == 0, s
    assert s["retried"] + s["failed"] == send.failures, (s, send.failures)
    assert ad._state.handed_attempts == {}
    assert max(seen_in_flight, default=0) <= max_in_flight
    assert 0 < send.max_watched <= max_in_flight
    assert send.max_batch <= batch


def test_stop_racing_puts_settles_every_accepted_message() -> None:
    """stop() while four producers put: a put is refused (DispatcherClosedError) or its message
    is sent or reported (stop() returns False: some fail during it); the counts match exactly."""
    send = Send()
    failed: list[FailedMessage[Any]] = []
    flock = threading.Lock()

    def on_failed(f: FailedMessage[Any]) -> None:
        with flock:
            failed.append(f)

    bd: BatchedDispatcher[Any] = BatchedDispatcher(send, max_batch_size=5, flush_interval=0.001, max_concurrent_sends=3)
    ad: AsyncDispatcher[Any] = AsyncDispatcher(
        bd, "q", on_failed, retry=RetryPolicy(max_attempts=ATTEMPTS, backoff=Constant(0.0)), max_in_flight=20
    )
    sender = ad.setup(32)
    ad.start()
    accepted: Counter[tuple[str, int]] = Counter()
    alock = threading.Lock()
    started = threading.Semaphore(0)
    unexpected: list[BaseException] = []

    def produce(chunk: list[Any]) -> None:
        for n, m in enumerate(chunk):
            try:
                sender.put(m, timeout=60)
            except DispatcherClosedError:
                return
            except BaseException as exc:
                unexpected.append(exc)
                return
            with alock:
                accepted[key(m)] += 1
            if n == 50:
                started.release()

    threads = [threading.Thread(target=produce, args=(messages_for(p, 5000),)) for p in range(PRODUCERS)]
    try:
        for t in threads:
            t.start()
        for _ in threads:
            assert started.acquire(timeout=30)
        # False is documented here: messages fail (and are reported) during the stop.
        ad.stop(30)
        for t in threads:
            t.join(30)
            assert not t.is_alive()
        assert ad._state.finished(), "stop(30) returned with messages unsettled"
    finally:
        ad.stop(30)
        bd.close(30)
    assert unexpected == []
    got_failed = Counter(key(f.message) for f in failed)
    for k in set(accepted) | set(send.delivered) | set(got_failed):
        assert send.delivered[k] + got_failed[k] == accepted[k], (k, send.delivered[k], got_failed[k], accepted[k])
    s = ad.stats()
    assert s["buffered"] == sum(accepted.values()), s
    assert s["in_flight"] == 0 and s["waiting"] == 0, s


def test_a_spooled_buffer_behind_batches_keeps_only_the_failed(tmp_path: Any) -> None:
    """spool=PATH, hand-offs to a BatchedDispatcher with partial failures and retries, equal messages put
    many times by 4 producers: after stop() the spool has nothing pending (a new owner replays nothing)
    and one dead letter per message that failed for good."""
    send = Send()
    failed: list[FailedMessage[Any]] = []
    flock = threading.Lock()

    def on_failed(f: FailedMessage[Any]) -> None:
        with flock:
            failed.append(f)

    path = tmp_path / "async.spool"
    bd: BatchedDispatcher[Any] = BatchedDispatcher(send, max_batch_size=6, flush_interval=0.001, max_concurrent_sends=3)
    ad: AsyncDispatcher[Any] = AsyncDispatcher(
        bd, "q", on_failed, retry=RetryPolicy(max_attempts=2, backoff=Constant(0.0)), max_in_flight=40, spool=path
    )
    sender = ad.setup(64)
    ad.start()
    chunks = [[(p * 7 + i) % 30 for i in range(400)] for p in range(PRODUCERS)]
    errors: list[BaseException] = []

    def produce(chunk: list[int]) -> None:
        try:
            for m in chunk:
                sender.put(m, timeout=60)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=produce, args=(c,)) for c in chunks]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
            assert not t.is_alive()
        total = PRODUCERS * 400
        wait_for(lambda: ad.sent + ad.failed == total, timeout=60, message="every message settled")
        assert ad.stop(30) is True
    finally:
        ad.stop(30)
        bd.close(30)
    assert errors == []
    assert sum(send.delivered.values()) + len(failed) == total
    again: AsyncDispatcher[Any] = AsyncDispatcher(bd, "q", spool=path)
    try:
        assert again._left == []  # nothing pending: every message left the file once sent or failed
        letters = again.spool_dead_letters(limit=10_000)
        assert sorted(letter.entry[0] for letter in letters) == sorted(f.message for f in failed)
    finally:
        again.stop(30)


@pytest.mark.parametrize("sends", [2, 4])
def test_direct_submits_and_flushes_beside_hand_offs_to_the_same_target(sends: int) -> None:
    """Threads submit() to the BatchedDispatcher's target and call flush() while an AsyncDispatcher hands
    off to it (inline batches complete the lane's partial batch): each Future settles once, each message
    is sent once or failed once, and the counts add up exactly."""
    send = Send()
    failed: list[FailedMessage[Any]] = []
    flock = threading.Lock()

    def on_failed(f: FailedMessage[Any]) -> None:
        with flock:
            failed.append(f)

    bd: BatchedDispatcher[Any] = BatchedDispatcher(
        send, max_batch_size=5, flush_interval=0.001, max_concurrent_sends=sends
    )
    ad: AsyncDispatcher[Any] = AsyncDispatcher(bd, "q", on_failed, max_in_flight=200)
    sender = ad.setup(256)
    ad.start()
    futures: list[Any] = []
    settled: Counter[int] = Counter()
    errors: list[BaseException] = []
    stop = threading.Event()

    def note_settled(index: int) -> None:  # a done-callback, on any thread
        with flock:
            settled[index] += 1

    def submit_direct(worker: int) -> None:
        try:
            for i in range(300):
                future = bd.submit(Same(1000 + worker * 1000 + i), "q")
                index = worker * 1000 + i

                def on_done(_future: object, index: int = index) -> None:
                    note_settled(index)

                future.add_done_callback(on_done)
                with flock:
                    futures.append(future)
        except BaseException as exc:
            errors.append(exc)

    def put_buffered() -> None:
        try:
            for i in range(1200):
                sender.put(SHARED if i % 2 else i % 40, timeout=60)
        except BaseException as exc:
            errors.append(exc)

    def flusher() -> None:
        try:
            while not stop.is_set():
                bd.flush(30)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submit_direct, args=(w,)) for w in range(2)]
    threads += [threading.Thread(target=put_buffered) for _ in range(2)]
    flushers = [threading.Thread(target=flusher) for _ in range(2)]
    try:
        for t in threads + flushers:
            t.start()
        for t in threads:
            t.join(60)
            assert not t.is_alive()
        wait_for(lambda: ad.sent + ad.failed == 2400, timeout=60, message="every buffered message settled")
        for future in futures:
            future.exception(timeout=30)  # done, one way or the other
    finally:
        stop.set()
        for t in flushers:
            t.join(30)
        ad.stop(30)
        bd.close(30)
    assert errors == []
    direct_ok = sum(1 for f in futures if f.exception() is None)
    direct_failed = len(futures) - direct_ok
    assert len(futures) == 600 and len(settled) == 600 and max(settled.values()) == 1
    # Without a retry policy each buffered message is tried once: sent, or failed and reported once.
    assert ad.sent + len(failed) == 2400 and ad.failed == len(failed)
    assert sum(send.delivered.values()) == direct_ok + ad.sent
    s = bd.stats()
    assert s["submitted"] == 3000 and s["sent"] + s["failed"] == 3000, s
    assert s["failed"] == direct_failed + len(failed), s
    assert s["pending"] == 0 and s["in_flight"] == 0, s
    assert send.failures == s["failed"]
