"""EndpointBatchDispatcher(tracer_provider=...): each batch send is a span linked to the spans that added its jobs."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from threaddispatch import ConfigurationError, Constant, RetryPolicy
from threaddispatch.endpoint import DispatchJob, EndpointBatchDispatcher
from threaddispatch.testing import immediate, wait_for

pytestmark = pytest.mark.timeout(60)


def sends(exporter: InMemorySpanExporter) -> list[Any]:
    return [span for span in exporter.get_finished_spans() if span.kind is SpanKind.PRODUCER]


def test_a_batch_send_is_a_span_linked_to_its_producers(traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = traced
    seen: list[Any] = []

    def send_batch(_endpoint_id: Hashable, jobs: list[DispatchJob]) -> None:
        from opentelemetry import trace

        seen.append(trace.get_current_span().get_span_context())

    dispatcher = EndpointBatchDispatcher(send_batch, batch_timeout=60.0, tracer_provider=provider, name="hooks")
    tracer = provider.get_tracer("test")
    producers = []
    with dispatcher:
        for payload in range(3):
            with tracer.start_as_current_span(f"request-{payload}") as request:
                dispatcher.add_job(DispatchJob("https://a.example/hook", payload))
                producers.append(request.get_span_context().span_id)
        dispatcher.add_job(DispatchJob("https://a.example/hook", "no span"))  # nothing to link
        assert dispatcher.process_batch_for_endpoint("https://a.example/hook") is not None
    (send,) = sends(exporter)
    assert send.name == "send hooks"  # the dispatcher: endpoints may be too many for span names
    assert sorted(link.context.span_id for link in send.links) == sorted(producers)
    attributes = dict(send.attributes or {})
    assert attributes["messaging.batch.message_count"] == 4
    assert attributes["messaging.destination.name"] == "https://a.example/hook"
    assert attributes["messaging.operation.type"] == "send"
    assert attributes["messaging.system"] == "threaddispatch"
    assert seen[0].span_id == send.context.span_id  # send_batch runs inside the span


def test_the_worker_sends_in_spans_too_and_a_failed_send_is_an_error(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = traced
    calls: list[int] = []

    def send_batch(_endpoint_id: Hashable, jobs: list[DispatchJob]) -> None:
        calls.append(len(jobs))
        if len(calls) == 1:
            raise ConnectionError("endpoint down")

    retry = RetryPolicy(max_attempts=2, backoff=Constant(0.0))
    dispatcher = EndpointBatchDispatcher(send_batch, batch_timeout=0.01, retry=retry, tracer_provider=provider)
    with provider.get_tracer("test").start_as_current_span("request") as request:
        dispatcher.add_job(DispatchJob(7, "x"))
    wait_for(lambda: len(sends(exporter)) == 2, timeout=10)
    assert dispatcher.shutdown(10)
    failed, retried = sends(exporter)
    assert failed.status.status_code is StatusCode.ERROR
    assert retried.status.status_code is not StatusCode.ERROR
    for span in (failed, retried):  # the retry still links to the span that added the job
        assert [link.context.span_id for link in span.links] == [request.get_span_context().span_id]
        assert dict(span.attributes or {})["messaging.destination.name"] == "7"


def test_immediate_mode_sends_in_a_span(traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = traced
    dispatcher = EndpointBatchDispatcher(lambda _e, _j: None, tracer_provider=provider)
    with dispatcher, immediate(), provider.get_tracer("test").start_as_current_span("request"):
        dispatcher.add_job(DispatchJob("e", 1))
    (send,) = sends(exporter)
    assert len(send.links) == 1


def test_without_a_tracer_provider_no_context_is_captured() -> None:
    job = DispatchJob("e", 1)
    dispatcher = EndpointBatchDispatcher(lambda _e, _j: None, batch_timeout=60.0)
    with dispatcher:
        dispatcher.add_job(job)
    assert job.status == "delivered"


@pytest.mark.parametrize("bad", ["provider", 3, object()])
def test_a_bad_tracer_provider_is_refused_at_the_constructor(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="tracer_provider"):
        EndpointBatchDispatcher(lambda _e, _j: None, tracer_provider=bad)
