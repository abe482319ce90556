"""The shared trace context: traceparent capture and parsing, send and run spans with links."""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from threaddispatch._trace import current_traceparent, make_tracing, parse_traceparent
from threaddispatch.errors import ConfigurationError


def test_traceparent_round_trips_into_a_link(traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = traced
    assert current_traceparent() is None  # no span: nothing to carry
    tracing = make_tracing(provider, "jobs")
    assert tracing is not None
    with provider.get_tracer("t").start_as_current_span("request") as request:
        traceparent = current_traceparent()
    assert traceparent is not None
    context = request.get_span_context()
    assert parse_traceparent(traceparent) == (context.trace_id, context.span_id, int(context.trace_flags))
    with tracing.run_span("job run", traceparent, {"threaddispatch.job.id": "j1"}):
        pass
    run = exporter.get_finished_spans()[-1]
    assert run.name == "job run" and dict(run.attributes or {})["threaddispatch.job.id"] == "j1"
    assert [link.context.span_id for link in run.links] == [context.span_id]


@pytest.mark.parametrize(
    "value",
    ["", "00-abc", "01-" + "1" * 32 + "-" + "1" * 16 + "-01", "00-" + "0" * 32 + "-" + "1" * 16 + "-01",
     "00-" + "g" * 32 + "-" + "1" * 16 + "-01", "00-" + "1" * 32 + "-" + "1" * 15 + "-01"],
)  # fmt: skip
def test_malformed_traceparent_is_ignored(value: str, traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = traced
    assert parse_traceparent(value) is None
    tracing = make_tracing(provider, "jobs")
    assert tracing is not None
    with tracing.run_span("job run", value):
        pass
    assert exporter.get_finished_spans()[-1].links == ()


def test_send_span_links_each_distinct_producer_once(traced: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = traced
    tracing = make_tracing(provider, "background")
    assert tracing is not None
    captured = []
    for name in ("a", "b"):
        with provider.get_tracer("t").start_as_current_span(name):
            captured.append(tracing.capture())
            captured.append(tracing.capture())
    assert tracing.capture() is None
    with tracing.send_span("send", [*captured, None], {"messaging.batch.message_count": 4}):
        pass
    send = exporter.get_finished_spans()[-1]
    assert len(send.links) == 2
    assert dict(send.attributes or {})["messaging.batch.message_count"] == 4


def test_bad_tracer_provider_is_refused_naming_it() -> None:
    assert make_tracing(None, "x") is None
    with pytest.raises(ConfigurationError, match=r"tracer_provider must be .*'nope'"):
        make_tracing("nope", "x")
