"""BatchedDispatcher(tracer_provider=...): each send in a PRODUCER span linked to its messages' producer spans."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from threaddispatch.batched import BatchedDispatcher
from threaddispatch.buffered import AsyncDispatcher
from threaddispatch.errors import ConfigurationError

pytestmark = pytest.mark.timeout(30)


def _spans(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def _ids(span: Any) -> tuple[int, int]:
    context = span.get_span_context() if hasattr(span, "get_span_context") else span.context
    return context.trace_id, context.span_id


def _linked(span: ReadableSpan) -> set[tuple[int, int]]:
    return {(link.context.trace_id, link.context.span_id) for link in span.links}


class Sender:
    """send_batch that records the span current while it runs and makes a child span."""

    def __init__(self, provider: TracerProvider, fail: bool = False) -> None:
        self.tracer = provider.get_tracer("test")
        self.fail = fail
        self.current: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def __call__(self, target: str, messages: list[Any]) -> list[Any]:
        with self.lock:
            self.current.append(_ids(trace.get_current_span()))
        with self.tracer.start_as_current_span("http"):
            if self.fail:
                raise RuntimeError("down")
            return [f"id-{m}" for m in messages]


def test_send_span_links_the_producers_and_parents_send_batch_spans(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = traced
    send = Sender(provider)
    tracer = provider.get_tracer("app")
    bd: BatchedDispatcher[int] = BatchedDispatcher(send, max_batch_size=2, flush_interval=60, tracer_provider=provider)
    try:
        with tracer.start_as_current_span("request-1") as one:
            first = bd.submit(1, "orders")
        with tracer.start_as_current_span("request-2") as two:
            second = bd.submit(2, "orders")
        assert (first.result(10), second.result(10)) == ("id-1", "id-2")
    finally:
        bd.close(10)
    (span,) = _spans(exporter, "send orders")
    assert span.kind == trace.SpanKind.PRODUCER
    assert _linked(span) == {_ids(one), _ids(two)}
    attributes = dict(span.attributes or {})
    assert attributes["messaging.destination.name"] == "orders"
    assert attributes["messaging.batch.message_count"] == 2
    assert attributes["messaging.system"] == "threaddispatch"
    assert send.current == [_ids(span)]  # the send span is current inside send_batch
    (http,) = _spans(exporter, "http")
    assert http.parent is not None and http.parent.span_id == span.context.span_id


def test_a_failing_send_marks_its_span_as_an_error(traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = traced
    bd: BatchedDispatcher[int] = BatchedDispatcher(
        Sender(provider, fail=True), flush_interval=0.01, tracer_provider=provider
    )
    try:
        with pytest.raises(RuntimeError, match="down"):
            bd.submit(1, "orders").result(10)
    finally:
        bd.close(10)
    (span,) = _spans(exporter, "send orders")
    assert span.status.status_code == trace.StatusCode.ERROR
    assert [event.name for event in span.events] == ["exception"]


def test_an_async_send_batch_runs_inside_its_span(traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = traced
    seen: list[tuple[int, int]] = []

    async def send_batch(target: str, messages: list[int]) -> list[Any]:
        await asyncio.sleep(0)
        seen.append(_ids(trace.get_current_span()))
        return [None] * len(messages)

    bd: BatchedDispatcher[int] = BatchedDispatcher(send_batch, flush_interval=0.01, tracer_provider=provider)
    try:
        with provider.get_tracer("app").start_as_current_span("request") as request:
            future = bd.submit(1, "orders")
        assert future.result(10) is None
    finally:
        bd.close(10)
    (span,) = _spans(exporter, "send orders")
    assert seen == [_ids(span)]
    assert _linked(span) == {_ids(request)}


def test_with_a_send_timeout_the_span_is_current_on_the_runner(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = traced
    send = Sender(provider)
    bd: BatchedDispatcher[int] = BatchedDispatcher(send, flush_interval=0.01, send_timeout=10, tracer_provider=provider)
    try:
        assert bd.submit(1, "orders").result(10) == "id-1"
    finally:
        bd.close(10)
    (span,) = _spans(exporter, "send orders")
    assert send.current == [_ids(span)]
    assert span.links == ()  # no producer span was current at submit


def test_behind_an_async_dispatcher_the_links_need_carry_context(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = traced
    tracer = provider.get_tracer("app")
    linked: dict[bool, set[tuple[int, int]]] = {}
    producers: dict[bool, set[tuple[int, int]]] = {}
    for carry in (True, False):
        exporter.clear()
        bd: BatchedDispatcher[int] = BatchedDispatcher(
            Sender(provider), max_batch_size=3, flush_interval=60, tracer_provider=provider
        )
        ad: AsyncDispatcher[int] = AsyncDispatcher(bd, "orders", carry_context=carry)
        sender = ad.setup(10)
        producers[carry] = set()
        for i in range(3):
            with tracer.start_as_current_span(f"request-{i}") as span:
                sender.put(i)
            producers[carry].add(_ids(span))
        with ad:
            pass  # stop() drains and flushes
        bd.close(10)
        assert ad.sent == 3
        linked[carry] = set().union(*(_linked(span) for span in _spans(exporter, "send orders")))
    assert linked[True] == producers[True]
    assert linked[False] == set()  # documented: the hand-off runs on the dispatch loop


def test_no_tracer_provider_captures_nothing() -> None:
    seen: list[Any] = []

    def send_batch(target: str, messages: list[int]) -> list[Any]:
        return [None] * len(messages)

    bd: BatchedDispatcher[int] = BatchedDispatcher(send_batch, flush_interval=0.01)
    original = bd._state.deliver

    def deliver(target: Any, items: list[Any]) -> Any:
        seen.extend(pending.span for pending in items)
        return original(target, items)

    bd._engine._plain_deliver = deliver
    try:
        assert bd.submit(1, "orders").result(10) is None
    finally:
        bd.close(10)
    assert seen == [None]


def test_a_bad_tracer_provider_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="tracer_provider"):
        BatchedDispatcher(lambda target, messages: [None] * len(messages), tracer_provider="jaeger")
