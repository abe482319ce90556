"""BatchedDispatcher: per-message delay_seconds on envelopes (or held on request), and the producer's contextvars."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from threaddispatch.batched import BatchedDispatcher, Envelope
from threaddispatch.buffered import AsyncDispatcher, FailedMessage
from threaddispatch.errors import ConfigurationError

pytestmark = pytest.mark.timeout(60)

TRACE_ID: contextvars.ContextVar[str] = contextvars.ContextVar("TRACE_ID", default="none")


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], object]]]:
    actions: list[Callable[[], object]] = []
    yield actions
    for action in actions:
        action()


class EnvelopeRecorder:
    """A send_batch(target, envelopes) that records what it was given and the TRACE_ID it ran in."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: list[list[Envelope[Any]]] = []
        self.ran_in: list[str] = []

    def __call__(self, target: str, envelopes: list[Envelope[Any]]) -> list[str]:
        with self.lock:
            self.batches.append(list(envelopes))
            self.ran_in.append(TRACE_ID.get())
        return [f"id-{e.message}" for e in envelopes]

    def envelopes(self) -> list[Envelope[Any]]:
        with self.lock:
            return [e for batch in self.batches for e in batch]


def in_trace(trace_id: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` in a fresh context where TRACE_ID is ``trace_id`` (as a request handler would)."""

    def run() -> Any:
        TRACE_ID.set(trace_id)
        return fn(*args, **kwargs)

    return contextvars.copy_context().run(run)


def make_async(dispatcher: Any, cleanup: list[Callable[[], object]], **kwargs: Any) -> Any:
    failures: list[FailedMessage[Any]] = []
    kwargs.setdefault("error_handler", failures.append)
    kwargs.setdefault("carry_context", True)
    ad: AsyncDispatcher[Any] = AsyncDispatcher(dispatcher, "orders", **kwargs)
    sender = ad.setup(100)
    ad.start()
    cleanup.append(lambda: ad.stop(10))
    return ad, sender, failures


# -- BatchedDispatcher: envelopes and delays -------------------------------------------------


def make_batched(send_batch: Any, cleanup: list[Callable[[], object]], **kwargs: Any) -> BatchedDispatcher[Any]:
    bd: BatchedDispatcher[Any] = BatchedDispatcher(send_batch, **kwargs)
    cleanup.append(lambda: bd.close(10))
    return bd


def test_envelopes_give_send_batch_each_messages_delay(cleanup: list[Callable[[], object]]) -> None:
    """With envelopes=True the delay is not held here: it reaches send_batch on each message's envelope."""
    send = EnvelopeRecorder()
    bd = make_batched(send, cleanup, envelopes=True, max_batch_size=10, flush_interval=60.0)
    late = bd.submit("late", "q", delay_seconds=900)
    now = bd.submit("now", "q")
    zero = bd.submit("zero", "q", delay_seconds=0)
    assert bd.flush(10) is True  # one batch, sent now: nothing waits 900 s in this process
    assert [late.result(0), now.result(0), zero.result(0)] == ["id-late", "id-now", "id-zero"]
    assert [(e.message, e.delay_seconds) for e in send.envelopes()] == [("late", 900), ("now", None), ("zero", 0)]
    assert len(send.batches) == 1


def test_legacy_send_batch_refuses_a_delay_it_cannot_see(cleanup: list[Callable[[], object]]) -> None:
    """send_batch(target, messages) cannot see a delay: submit refuses it at the call, naming both options."""
    send = EnvelopeRecorder()
    bd = make_batched(send, cleanup)
    with pytest.raises(ConfigurationError, match=r"envelopes=True.*hold_delays=True"):
        bd.submit("m", "q", delay_seconds=5)
    with pytest.raises(ConfigurationError, match="delay_seconds"):
        bd.dispatch("m", "q", delay_seconds=5, timeout=10)
    assert bd.flush(10) is True
    assert send.batches == []


def test_hold_delays_keeps_the_in_process_delay(cleanup: list[Callable[[], object]]) -> None:
    """hold_delays=True holds a delayed message here; close() sends it at once; its envelope says no delay."""
    send = EnvelopeRecorder()
    bd = make_batched(send, cleanup, envelopes=True, hold_delays=True, flush_interval=0.01)
    held = bd.submit("held", "q", delay_seconds=600)
    assert bd.submit("now", "q").result(10) == "id-now"
    assert not held.done()  # 600 s away: still held in this process
    assert bd.close(10) is True
    assert held.result(0) == "id-held"
    assert [(e.message, e.delay_seconds) for e in send.envelopes()] == [("now", None), ("held", None)]


@pytest.mark.parametrize("bad", [-1, float("nan"), True, "5", float("inf")], ids=repr)
def test_bad_delay_seconds_raise_at_submit(bad: Any, cleanup: list[Callable[[], object]]) -> None:
    """submit refuses a negative, NaN, infinite, bool or str delay, naming it, in every mode."""
    for kwargs in ({}, {"envelopes": True}, {"hold_delays": True}):
        bd = make_batched(EnvelopeRecorder(), cleanup, **kwargs)
        with pytest.raises(ConfigurationError, match="delay_seconds"):
            bd.submit("m", "q", delay_seconds=bad)


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_bad_envelopes_and_hold_delays_flags_are_refused(bad: Any) -> None:
    """envelopes and hold_delays must be bools."""
    with pytest.raises(ConfigurationError, match="envelopes"):
        BatchedDispatcher(EnvelopeRecorder(), envelopes=bad)
    with pytest.raises(ConfigurationError, match="hold_delays"):
        BatchedDispatcher(EnvelopeRecorder(), hold_delays=bad)


# -- BatchedDispatcher: contextvars ----------------------------------------------------------


def test_each_envelope_carries_its_producers_context(cleanup: list[Callable[[], object]]) -> None:
    """Every envelope has its submitter's context; send_batch itself runs in the first message's context."""
    send = EnvelopeRecorder()
    bd = make_batched(send, cleanup, envelopes=True, max_batch_size=10, flush_interval=60.0)
    in_trace("t-1", bd.submit, "a", "q")
    in_trace("t-2", bd.submit, "b", "q")
    assert bd.flush(10) is True
    assert [e.context.run(TRACE_ID.get) for e in send.envelopes()] == ["t-1", "t-2"]
    assert send.ran_in == ["t-1"]


def test_legacy_send_batch_runs_in_the_first_messages_context(cleanup: list[Callable[[], object]]) -> None:
    """send_batch(target, messages) runs in the context of the first message of its batch."""
    ran_in: list[str] = []

    def send_batch(_target: str, messages: list[Any]) -> list[None]:
        ran_in.append(TRACE_ID.get())
        return [None] * len(messages)

    bd = make_batched(send_batch, cleanup, max_batch_size=10, flush_interval=60.0)
    in_trace("first", bd.submit, "a", "q")
    in_trace("second", bd.submit, "b", "q")
    assert bd.flush(10) is True
    assert ran_in == ["first"]


def test_async_over_batched_carries_delay_and_context_to_the_envelope(cleanup: list[Callable[[], object]]) -> None:
    """Sender.put(m, delay_seconds=d) in a traced request reaches send_batch's envelope with d and the trace."""
    send = EnvelopeRecorder()
    bd = make_batched(send, cleanup, envelopes=True, max_batch_size=10, flush_interval=60.0)
    assert bd.accepts_delay_seconds is True
    ad, sender, failures = make_async(bd, cleanup)
    in_trace("req-42", sender.put, "order", delay_seconds=15)
    sender.put("other")
    assert ad.stop(10) is True
    assert failures == []
    got = [(e.message, e.delay_seconds, e.context.run(TRACE_ID.get)) for e in send.envelopes()]
    assert got == [("order", 15, "req-42"), ("other", None, "none")]


def test_a_delay_the_batcher_cannot_pass_on_is_refused_at_put(cleanup: list[Callable[[], object]]) -> None:
    """Over a BatchedDispatcher with a plain send_batch, put(m, delay_seconds=n) raises at the put, not later."""
    sent: list[Any] = []

    def send_batch(_target: str, messages: list[Any]) -> list[None]:
        sent.extend(messages)
        return [None] * len(messages)

    bd = make_batched(send_batch, cleanup)
    ad, sender, failures = make_async(bd, cleanup)
    assert bd.accepts_delay_seconds is False
    with pytest.raises(ConfigurationError, match=r"delay_seconds.*envelopes=True"):
        sender.put("m", delay_seconds=5)
    with pytest.raises(ConfigurationError, match="delay_seconds"):
        sender.try_put("m", delay_seconds=5)
    sender.put("plain")
    assert ad.stop(10) is True
    assert failures == []
    assert sent == ["plain"]
