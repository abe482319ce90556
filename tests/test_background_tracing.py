"""BackgroundDispatcher(tracer_provider=...): each send is a span linked to the spans its entries came from."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from threaddispatch import BackgroundDispatcher, FailedBatch, testing
from threaddispatch.backoff import Constant, RetryPolicy
from threaddispatch.errors import ConfigurationError, DispatcherClosedError
from threaddispatch.logging import BatchingHandler

pytestmark = pytest.mark.timeout(60)


def _sends(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name.startswith("send ")]


def _linked(span: ReadableSpan) -> set[int]:
    return {link.context.span_id for link in span.links}


def test_a_send_span_links_to_the_spans_its_entries_were_enqueued_in(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = traced
    batches: list[list[str]] = []
    dispatcher: BackgroundDispatcher[str] = BackgroundDispatcher(
        batches.append, 10_000, name="audit", tracer_provider=provider
    )
    try:
        producers: list[int] = []
        with provider.get_tracer("t").start_as_current_span("request-1") as first:
            dispatcher.enqueue("a")
            dispatcher.enqueue("b")  # the same span twice: linked once
            producers.append(first.get_span_context().span_id)
        with provider.get_tracer("t").start_as_current_span("request-2") as second:
            dispatcher.submit("c")
            producers.append(second.get_span_context().span_id)
        dispatcher.enqueue("d")  # outside any span: nothing to link
        assert dispatcher.flush(10)
    finally:
        dispatcher.close(10)
    assert batches == [["a", "b", "c", "d"]]  # the send gets the entries, not their wrappers
    (send,) = _sends(exporter)
    assert send.name == "send audit"
    assert send.kind is SpanKind.PRODUCER
    assert _linked(send) == set(producers)
    assert len(send.links) == 2
    assert send.attributes is not None
    assert send.attributes["messaging.system"] == "threaddispatch"
    assert send.attributes["messaging.operation.type"] == "send"
    assert send.attributes["messaging.destination.name"] == "audit"
    assert send.attributes["messaging.batch.message_count"] == 4
    assert send.status.status_code is StatusCode.UNSET


def test_each_batch_links_only_its_own_producers(traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = traced
    dispatcher: BackgroundDispatcher[int] = BackgroundDispatcher(
        lambda batch: None, 10_000, max_batch_size=2, name="pairs", tracer_provider=provider
    )
    expected: list[set[int]] = []
    try:
        for pair in range(2):
            spans = set()
            for index in range(2):
                with provider.get_tracer("t").start_as_current_span(f"producer-{pair}-{index}") as span:
                    dispatcher.enqueue(pair * 2 + index)
                    spans.add(span.get_span_context().span_id)
            expected.append(spans)
        assert dispatcher.flush(10)
    finally:
        dispatcher.close(10)
    sends = _sends(exporter)
    assert sorted(expected, key=min) == sorted((_linked(send) for send in sends), key=min)
    assert [send.attributes["messaging.batch.message_count"] for send in sends if send.attributes] == [2, 2]


@pytest.mark.parametrize("overflow", ["block", "raise", "drop_oldest"])
def test_every_overflow_policy_carries_the_context(
    traced: tuple[TracerProvider, InMemorySpanExporter], overflow: Any
) -> None:
    provider, exporter = traced
    sent: list[list[str]] = []
    dispatcher: BackgroundDispatcher[str] = BackgroundDispatcher(
        sent.append, 10_000, overflow=overflow, name="bounded", tracer_provider=provider
    )
    try:
        with provider.get_tracer("t").start_as_current_span("producer") as span:
            dispatcher.enqueue("x", timeout=1.0)
        assert dispatcher.flush(10)
    finally:
        dispatcher.close(10)
    assert sent == [["x"]]
    (send,) = _sends(exporter)
    assert _linked(send) == {span.get_span_context().span_id}


def test_a_failed_send_and_its_retry_are_spans_linked_to_the_producer(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = traced
    calls: list[list[str]] = []
    failed: list[FailedBatch[str]] = []
    reported = threading.Event()

    def send(batch: list[str]) -> None:
        calls.append(batch)
        raise RuntimeError("endpoint down")

    def on_error(batch: FailedBatch[str]) -> None:
        failed.append(batch)
        reported.set()

    dispatcher: BackgroundDispatcher[str] = BackgroundDispatcher(
        send,
        10,
        name="flaky",
        retry=RetryPolicy(max_attempts=2, backoff=Constant(0.001)),
        on_error=on_error,
        tracer_provider=provider,
    )
    try:
        with provider.get_tracer("t").start_as_current_span("producer") as span:
            future = dispatcher.submit("x")
        assert dispatcher.flush(10)
        assert reported.wait(10)
    finally:
        dispatcher.close(10)
    assert calls == [["x"], ["x"]]
    assert isinstance(future.exception(10), RuntimeError)
    sends = _sends(exporter)
    assert len(sends) == 2  # one span per attempt
    for attempt in sends:
        assert _linked(attempt) == {span.get_span_context().span_id}
        assert attempt.status.status_code is StatusCode.ERROR
        assert attempt.attributes is not None and attempt.attributes["error.type"] == "RuntimeError"


def test_a_dropped_submit_is_still_reported(traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, _ = traced
    gate = threading.Event()
    entered = threading.Event()

    def send(batch: list[str]) -> None:
        entered.set()
        assert gate.wait(30)

    dispatcher: BackgroundDispatcher[str] = BackgroundDispatcher(
        send, 1, max_queue_size=1, max_batch_size=1, name="tiny", tracer_provider=provider
    )
    try:
        dispatcher.enqueue("held")
        assert entered.wait(10)
        dispatcher.enqueue("kept")
        dropped = dispatcher.submit("dropped")  # drop_newest: the buffer is full
        with pytest.raises(Exception, match="dropped"):
            dropped.result(10)
    finally:
        gate.set()
        dispatcher.close(10)


def test_immediate_mode_sends_inside_a_span_linked_to_the_caller(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = traced
    sent: list[list[str]] = []
    dispatcher: BackgroundDispatcher[str] = BackgroundDispatcher(sent.append, name="now", tracer_provider=provider)
    try:
        with testing.immediate(), provider.get_tracer("t").start_as_current_span("producer") as span:
            dispatcher.enqueue("x")
    finally:
        dispatcher.close(10)
    assert sent == [["x"]]
    (send,) = _sends(exporter)
    assert _linked(send) == {span.get_span_context().span_id}


def test_a_positional_timeout_is_refused_with_tracing_on_too(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, _ = traced
    dispatcher: BackgroundDispatcher[str] = BackgroundDispatcher(lambda batch: None, tracer_provider=provider)
    try:
        with pytest.raises(TypeError, match="keyword-only"):
            dispatcher.enqueue("x", 1.0)  # type: ignore[call-arg]
    finally:
        dispatcher.close(10)


def test_without_a_tracer_provider_enqueue_is_the_untraced_closure() -> None:
    dispatcher: BackgroundDispatcher[str] = BackgroundDispatcher(lambda batch: None)
    try:
        assert dispatcher.enqueue.__name__ == "enqueue"  # the lock-free closure, not the traced wrapper
        assert dispatcher._sender.tracing is None
    finally:
        dispatcher.close(10)


@pytest.mark.parametrize("bad", ["nope", 42, object()])
def test_a_bad_tracer_provider_is_refused_at_the_constructor_naming_it(bad: object) -> None:
    before = {thread.name for thread in threading.enumerate()}
    with pytest.raises(ConfigurationError, match="tracer_provider") as caught:
        BackgroundDispatcher(lambda batch: None, tracer_provider=bad)
    assert type(bad).__name__ in str(caught.value) or repr(bad) in str(caught.value)
    assert {thread.name for thread in threading.enumerate()} <= before


def test_batching_handler_forwards_the_tracer_provider(traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = traced
    records: list[list[logging.LogRecord]] = []
    handler = BatchingHandler(records.append, 10_000, name="logs", tracer_provider=provider)
    logger = logging.getLogger("test_background_tracing.handler")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with provider.get_tracer("t").start_as_current_span("request") as span:
            logger.warning("inside the request")
        handler.flush(10)
    finally:
        logger.removeHandler(handler)
        handler.close(10)
    assert [record.getMessage() for batch in records for record in batch] == ["inside the request"]
    (send,) = _sends(exporter)
    assert send.name == "send logs"
    assert _linked(send) == {span.get_span_context().span_id}


def test_batching_handler_refuses_a_bad_tracer_provider() -> None:
    with pytest.raises(ConfigurationError, match="tracer_provider"):
        BatchingHandler(lambda records: None, tracer_provider="nope")


def test_tuple_entries_arrive_intact_and_a_closed_dispatcher_names_the_entry(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, _ = traced
    sent: list[list[tuple[str, int]]] = []
    dispatcher: BackgroundDispatcher[tuple[str, int]] = BackgroundDispatcher(
        sent.append, 10_000, tracer_provider=provider
    )
    dispatcher.enqueue(("pair", 2))
    assert dispatcher.flush(10)
    dispatcher.close(10)
    assert sent == [[("pair", 2)]]
    with pytest.raises(DispatcherClosedError, match=r"'late'"):
        dispatcher.enqueue(("late", 3))
