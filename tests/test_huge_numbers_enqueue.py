"""A huge but finite ``timeout`` for BackgroundDispatcher.enqueue/submit and EndpointBatchDispatcher.add_job.

The rule is :func:`threaddispatch._validate.check_wait`'s, the one ``flush`` and ``close`` follow:
a timeout past :data:`~threaddispatch._validate.MAX_WAIT` raises ConfigurationError naming it, at
the call, under every overflow policy (as any bad timeout is), with or without tracing or a spool.
The entry is not accepted. MAX_WAIT itself is a usable timeout: a producer blocked at the bound
gets in once there is room.

Found: with ``overflow="block"`` and the buffer full, ``enqueue(entry, timeout=1e308)`` passed
``check_seconds`` and then raised OverflowError ("timestamp out of range for platform time_t")
from the wait for room; so did ``add_job(job, timeout=1e308)`` at ``max_pending_jobs``. Under the
other policies the same value was accepted while ``flush(1e308)`` was refused.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from threaddispatch import BackgroundDispatcher, DispatchJob, EndpointBatchDispatcher
from threaddispatch._validate import MAX_WAIT, show
from threaddispatch.errors import ConfigurationError

pytestmark = pytest.mark.timeout(60)

HUGE = [1e308, 10**12, MAX_WAIT * 2]
HUGE_IDS = ["1e308", "1e12", "twice-MAX_WAIT"]
POLICIES = ["block", "raise", "drop_newest", "drop_oldest"]


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Set at teardown (and by a test): a held send returns."""
    event = threading.Event()
    yield event
    event.set()


def _full(gate: threading.Event, overflow: Any, **options: Any) -> tuple[BackgroundDispatcher[int], list[int]]:
    """A dispatcher with max_queue_size=2 whose first send is held by ``gate`` and whose buffer is full."""
    sent: list[int] = []
    started = threading.Event()

    def send(batch: list[int]) -> None:
        started.set()
        gate.wait(30)
        sent.extend(batch)

    dispatcher = BackgroundDispatcher(
        send, ms_delay=1, max_batch_size=1, max_queue_size=2, overflow=overflow, **options
    )
    dispatcher.enqueue(0)
    assert started.wait(10)  # 0 is in the held send: the buffer is empty again
    dispatcher.enqueue(1)
    dispatcher.enqueue(2)  # full now
    return dispatcher, sent


@pytest.mark.parametrize("overflow", POLICIES)
@pytest.mark.parametrize("value", HUGE, ids=HUGE_IDS)
def test_an_enqueue_timeout_past_max_wait_is_refused_on_a_full_buffer(
    gate: threading.Event, overflow: Any, value: float
) -> None:
    """enqueue/submit(timeout=huge) at the bound: ConfigurationError naming it, not OverflowError; nothing accepted."""
    dispatcher, sent = _full(gate, overflow)
    try:
        for call in (dispatcher.enqueue, dispatcher.submit):
            with pytest.raises(ConfigurationError, match="timeout must be at most") as refused:
                call(99, timeout=value)
            assert show(value) in str(refused.value)
        gate.set()
        assert dispatcher.flush(10)
        assert 99 not in sent
    finally:
        gate.set()
        dispatcher.close(10)


@pytest.mark.parametrize("overflow", POLICIES)
@pytest.mark.parametrize("value", HUGE, ids=HUGE_IDS)
def test_an_enqueue_timeout_past_max_wait_is_refused_with_room_too(overflow: Any, value: float) -> None:
    """The same value is refused with room to spare (as flush refuses it): one rule, whatever the buffer holds."""
    dispatcher: BackgroundDispatcher[int] = BackgroundDispatcher(lambda batch: None, ms_delay=1, overflow=overflow)
    try:
        with pytest.raises(ConfigurationError, match="timeout must be at most"):
            dispatcher.enqueue(1, timeout=value)
        assert dispatcher.stats()["enqueued"] == 0
    finally:
        dispatcher.close(10)


@pytest.mark.parametrize("overflow", ["block", "drop_newest"])
def test_an_enqueue_timeout_past_max_wait_is_refused_with_a_spool(tmp_path: Path, overflow: Any) -> None:
    """With a spool the value is refused before the entry is written (nothing to replay)."""
    dispatcher: BackgroundDispatcher[int] = BackgroundDispatcher(
        lambda batch: None, ms_delay=1, overflow=overflow, spool=tmp_path / "huge.spool"
    )
    try:
        with pytest.raises(ConfigurationError, match="timeout must be at most"):
            dispatcher.enqueue(1, timeout=1e308)
        assert dispatcher.flush(10)
    finally:
        dispatcher.close(10)
    reopened: BackgroundDispatcher[int] = BackgroundDispatcher(
        lambda batch: pytest.fail(f"replayed {batch}"), ms_delay=1, spool=tmp_path / "huge.spool"
    )
    assert reopened.close(10)


def test_a_blocked_enqueue_with_max_wait_gets_in_once_there_is_room(gate: threading.Event) -> None:
    """MAX_WAIT is accepted under "block": the producer waits at the bound and is let in when a send ends."""
    dispatcher, sent = _full(gate, "block")
    done = threading.Event()
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            dispatcher.enqueue(3, timeout=MAX_WAIT)
        except BaseException as error:
            errors.append(error)
        done.set()

    producer = threading.Thread(target=produce, name="huge-numbers-producer")
    producer.start()
    try:
        assert not done.wait(0.1)  # still waiting for room (or it failed at once: reported below)
        gate.set()
        assert done.wait(10)
        assert errors == []
        assert dispatcher.flush(10)
        assert sent == [0, 1, 2, 3]
    finally:
        gate.set()
        producer.join(10)
        dispatcher.close(10)


@pytest.mark.parametrize("value", HUGE, ids=HUGE_IDS)
def test_an_add_job_timeout_past_max_wait_is_refused_at_the_bound(gate: threading.Event, value: float) -> None:
    """EndpointBatchDispatcher.add_job(job, timeout=huge) under "block" at max_pending_jobs: ConfigurationError."""
    started = threading.Event()

    def send(endpoint_id: object, jobs: list[DispatchJob]) -> None:
        started.set()
        gate.wait(30)

    dispatcher = EndpointBatchDispatcher(send, max_batch_size=1, batch_timeout=0.001, max_pending_jobs=1,
                                         overflow="block")  # fmt: skip
    try:
        dispatcher.add_job(DispatchJob("e", 0))
        assert started.wait(10)  # held: the bound of one job is reached
        job = DispatchJob("e", 1)
        with pytest.raises(ConfigurationError, match="timeout must be at most") as refused:
            dispatcher.add_job(job, timeout=value)
        assert show(value) in str(refused.value)
        assert job.status == "new"  # refused before anything: it can be added later
    finally:
        gate.set()
        assert dispatcher.shutdown(10)


@pytest.mark.parametrize("overflow", ["block", "drop_newest"])
def test_an_enqueue_timeout_past_max_wait_is_refused_with_tracing(overflow: Any) -> None:
    """The traced enqueue (tracer_provider=...) refuses the same value."""
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    dispatcher: BackgroundDispatcher[int] = BackgroundDispatcher(
        lambda batch: None, ms_delay=1, overflow=overflow, tracer_provider=sdk.TracerProvider()
    )
    try:
        with pytest.raises(ConfigurationError, match="timeout must be at most"):
            dispatcher.enqueue(1, timeout=1e308)
        assert dispatcher.stats()["enqueued"] == 0
    finally:
        dispatcher.close(10)


@pytest.mark.parametrize("value", HUGE, ids=HUGE_IDS)
def test_an_endpoint_send_timeout_past_max_wait_is_refused_at_construction(value: float) -> None:
    """EndpointBatchDispatcher(send_timeout=huge) is refused, as the other faces' send_timeout is (it raised
    OverflowError in the sending thread at the first batch, which then counted as failed)."""
    with pytest.raises(ConfigurationError, match="send_timeout must be at most") as refused:
        EndpointBatchDispatcher(lambda endpoint_id, jobs: None, send_timeout=value)
    assert show(value) in str(refused.value)
