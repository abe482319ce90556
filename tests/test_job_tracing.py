"""JobEngine traces: a CONSUMER span per job run, its outcome, and a link to the span that enqueued it.

Same process (memory and SQLite stores, immediate mode and worker threads), and across
processes: a job enqueued inside a span here is run by a worker subprocess on the same
SQLite file, which exports its spans to a file read back here.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from threaddispatch import JobEngine
from threaddispatch.backoff import Constant
from threaddispatch.errors import Cancel, ConfigurationError, Retry
from threaddispatch.stores import MemoryStore, SQLiteStore, Store
from threaddispatch.stores.base import JobState
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]


class Traced:
    """A TracerProvider exporting to memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def runs(self) -> list[ReadableSpan]:
        return [span for span in self.exporter.get_finished_spans() if span.kind is SpanKind.CONSUMER]


@pytest.fixture
def traced() -> Iterator[Traced]:
    traced = Traced()
    yield traced
    traced.provider.shutdown()


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    if request.param == "memory":
        return MemoryStore
    return lambda: SQLiteStore(str(tmp_path / "jobs.db"))


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def outcomes(traced: Traced) -> dict[str, list[ReadableSpan]]:
    found: dict[str, list[ReadableSpan]] = {}
    for span in traced.runs():
        found.setdefault(str(attributes(span)["threaddispatch.job.name"]), []).append(span)
    return found


def work(ctx: Any, payload: str) -> str:
    if payload == "boom":
        raise ValueError("boom")
    if payload == "retry":
        if ctx.attempt == 1:
            raise Retry(delay=0.0)
        return "again"
    if payload == "cancel":
        raise Cancel("not wanted")
    return payload


def test_each_run_gets_a_consumer_span_with_the_job_and_its_outcome(
    traced: Traced, make_store: Callable[[], Store]
) -> None:
    engine = JobEngine(make_store(), immediate=True, tracer_provider=traced.provider, backoff=Constant(0.0))
    for name in ("ok", "boom", "retry", "cancel"):
        engine.register(name, work, max_retries=1 if name == "boom" else 3)
    ok = engine.enqueue("ok", "ok")
    engine.enqueue("boom", "boom")
    engine.enqueue("retry", "retry")
    engine.enqueue("cancel", "cancel")
    runs = outcomes(traced)

    (span,) = runs["ok"]
    assert span.name == "process default" and span.kind is SpanKind.CONSUMER
    assert attributes(span) == {
        "messaging.system": "threaddispatch",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": "default",
        "messaging.message.id": ok,
        "threaddispatch.job.name": "ok",
        "threaddispatch.job.attempt": 1,
        "threaddispatch.job.outcome": "completed",
    }
    assert span.status.status_code is StatusCode.UNSET and not span.events

    first, second = runs["boom"]  # max_retries=1: two attempts, both failed
    for number, failed in enumerate((first, second), start=1):
        assert attributes(failed)["threaddispatch.job.attempt"] == number
        assert attributes(failed)["threaddispatch.job.outcome"] == "failed"
        assert attributes(failed)["error.type"] == "ValueError"
        assert failed.status.status_code is StatusCode.ERROR
        assert [event.name for event in failed.events] == ["exception"]
        assert dict(failed.events[0].attributes or {})["exception.type"] == "ValueError"

    asked, done = runs["retry"]
    assert attributes(asked)["threaddispatch.job.outcome"] == "retry"
    assert attributes(asked)["threaddispatch.job.retry_delay"] == 0.0
    assert asked.status.status_code is StatusCode.UNSET and not asked.events
    assert attributes(done)["threaddispatch.job.outcome"] == "completed"

    (cancelled,) = runs["cancel"]
    assert attributes(cancelled)["threaddispatch.job.outcome"] == "cancelled"
    assert cancelled.status.status_code is StatusCode.UNSET
    assert engine.get_job(ok).state is JobState.COMPLETED


def test_a_timed_out_attempt_is_an_error(traced: Traced) -> None:
    engine = JobEngine(MemoryStore(), immediate=True, tracer_provider=traced.provider)

    def slow(ctx: Any, payload: None) -> None:
        ctx.wait(1.0)  # past the timeout; immediate mode checks the deadline when the handler returns

    engine.register("slow", slow, timeout=0.01, max_retries=0)
    engine.enqueue("slow")
    (span,) = traced.runs()
    assert attributes(span)["threaddispatch.job.outcome"] == "timed_out"
    assert attributes(span)["error.type"] == "DispatchTimeoutError"
    assert span.status.status_code is StatusCode.ERROR


def test_the_handler_runs_inside_the_run_span(traced: Traced) -> None:
    engine = JobEngine(MemoryStore(), immediate=True, tracer_provider=traced.provider)
    tracer = traced.provider.get_tracer("test")

    def handler(ctx: Any, payload: None) -> None:
        with tracer.start_as_current_span("inner"):
            pass

    engine.register("nested", handler)
    engine.enqueue("nested")
    (run,) = traced.runs()
    (inner,) = [span for span in traced.exporter.get_finished_spans() if span.name == "inner"]
    assert inner.parent is not None and inner.parent.span_id == run.context.span_id


def test_an_async_handler_runs_inside_the_run_span_too(traced: Traced) -> None:
    engine = JobEngine(MemoryStore(), immediate=True, tracer_provider=traced.provider)
    tracer = traced.provider.get_tracer("test")

    async def handler(ctx: Any, payload: None) -> None:
        await asyncio.sleep(0)
        with tracer.start_as_current_span("inner"):
            await asyncio.sleep(0)

    engine.register("nested", handler)
    engine.enqueue("nested")
    (run,) = traced.runs()
    assert attributes(run)["threaddispatch.job.outcome"] == "completed"
    (inner,) = [span for span in traced.exporter.get_finished_spans() if span.name == "inner"]
    assert inner.parent is not None and inner.parent.span_id == run.context.span_id


@pytest.mark.timeout(30)
def test_worker_threads_link_the_run_to_the_enqueuing_span(traced: Traced, make_store: Callable[[], Store]) -> None:
    engine = JobEngine(
        make_store(), tracer_provider=traced.provider, poll_interval=0.01, max_poll_interval=0.05, concurrency=2
    )
    engine.register("ok", work)
    with traced.provider.get_tracer("test").start_as_current_span("request") as request:
        job_id = engine.enqueue("ok", "ok")
    untraced = engine.enqueue("ok", "ok")  # no span around it: a run span without links
    engine.start()
    try:
        wait_for(lambda: len(traced.runs()) == 2, 20, message="two run spans")
    finally:
        assert engine.stop(10)
    by_id = {attributes(span)["messaging.message.id"]: span for span in traced.runs()}
    linked = by_id[job_id]
    assert [(link.context.trace_id, link.context.span_id) for link in linked.links] == [
        (request.get_span_context().trace_id, request.get_span_context().span_id)
    ]
    assert linked.links[0].context.is_remote
    assert linked.context.trace_id != request.get_span_context().trace_id  # a link, not a child
    assert by_id[untraced].links == ()


def test_no_tracer_provider_no_spans(traced: Traced) -> None:
    engine = JobEngine(MemoryStore(), immediate=True)
    engine.register("ok", work)
    with traced.provider.get_tracer("test").start_as_current_span("request"):
        engine.enqueue("ok", "ok")
    assert traced.runs() == []
    assert engine._inline is not None and engine._inline._tracing is None


@pytest.mark.parametrize("bad", ["provider", 3, object()])
def test_a_bad_tracer_provider_is_refused_at_construction(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="tracer_provider"):
        JobEngine(MemoryStore(), tracer_provider=bad)


# -- across processes ---------------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import json, sys
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
    from threaddispatch import JobEngine
    from threaddispatch.stores import SQLiteStore
    from threaddispatch.stores.base import JobState
    from threaddispatch.testing import wait_for

    database, out, job_id = sys.argv[1:4]

    class ToFile(SpanExporter):
        def export(self, spans):
            with open(out, "a") as file:
                for span in spans:
                    file.write(json.dumps({
                        "name": span.name, "kind": span.kind.name, "pid": __import__("os").getpid(),
                        "attributes": dict(span.attributes or {}),
                        "links": [[f"{l.context.trace_id:032x}", f"{l.context.span_id:016x}"] for l in span.links],
                    }) + "\\n")
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ToFile()))
    engine = JobEngine(SQLiteStore(database), tracer_provider=provider, poll_interval=0.01, max_poll_interval=0.05)
    engine.register("remote", lambda ctx, payload: payload * 2)
    engine.start()
    try:
        wait_for(lambda: engine.get_job(job_id).state is JobState.COMPLETED, 30, message="the job done")
    finally:
        engine.stop(10)
    provider.shutdown()
    """
)


@pytest.mark.timeout(90)
def test_a_job_run_in_another_process_links_to_the_enqueuing_span(traced: Traced, tmp_path: Path) -> None:
    database = str(tmp_path / "jobs.db")
    out = tmp_path / "spans.jsonl"
    producer = JobEngine(SQLiteStore(database))  # a web process: no tracer of ours, its own instrumentation
    producer.register("remote", lambda ctx, payload: payload)
    with traced.provider.get_tracer("web").start_as_current_span("request") as request:
        job_id = producer.enqueue("remote", 21)
    context = request.get_span_context()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(script), database, str(out), job_id],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert done.returncode == 0, done.stderr
    spans = [json.loads(line) for line in out.read_text().splitlines()]
    (run,) = [span for span in spans if span["kind"] == "CONSUMER"]
    assert run["pid"] != os.getpid()
    assert run["name"] == "process default"
    assert run["attributes"]["messaging.message.id"] == job_id
    assert run["attributes"]["threaddispatch.job.outcome"] == "completed"
    assert run["links"] == [[f"{context.trace_id:032x}", f"{context.span_id:016x}"]]
    assert producer.result(job_id, timeout=0) == 42
