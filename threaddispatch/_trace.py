"""OpenTelemetry trace context (extra ``otel``); its one job: carry a producer's span to the work it caused.

Two forms of a producer's context:

* in memory, a span context captured at enqueue (:meth:`Tracing.capture`), for the
  in-process batching faces: a send span is *linked* to the spans of the entries it
  carries, as OpenTelemetry's messaging conventions do for a batch publish;
* stored, a W3C ``traceparent`` string (:func:`current_traceparent`), for jobs: written in
  the job record at enqueue by whatever process enqueues, read back by the worker process
  that runs it (:func:`link_from_traceparent`), so a web request's trace shows its job.

``opentelemetry`` is imported lazily, once. :func:`current_traceparent` works without any
tracer configured here (the enqueuing process's own instrumentation made the span), and
never imports the API itself: until something in the process has imported
``opentelemetry.trace`` no span can be current (spans are made and entered through it), so
an enqueue in a process that has the package installed but unused pays no import (44 ms
on the first enqueue, measured) and one dict lookup per call. A face with no
``tracer_provider`` never makes a :class:`Tracing`, so its hot path pays nothing.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from threaddispatch._validate import show
from threaddispatch.errors import ConfigurationError

__all__ = [
    "Tracing",
    "check_tracer_provider",
    "current_traceparent",
    "link_from_traceparent",
    "make_tracing",
    "parse_traceparent",
]

_SCOPE = "threaddispatch"
_HEX = frozenset("0123456789abcdef")

_api: Any = None  # opentelemetry.trace once imported; False if it is not installed


def _otel() -> Any:
    """The ``opentelemetry.trace`` module, or None if the API is not installed (looked up once)."""
    global _api
    if _api is None:
        try:
            from opentelemetry import trace
        except ImportError:
            _api = False
        else:
            _api = trace
    return _api or None


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the calling thread's current span, or None (no valid span, or no OTel API)."""
    trace = _api or (_otel() if "opentelemetry.trace" in sys.modules else None)
    if trace is None:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def parse_traceparent(value: str) -> tuple[int, int, int] | None:
    """``(trace_id, span_id, flags)`` of a version-00 W3C traceparent, or None if it is malformed or all-zero."""
    parts = value.split("-")
    if len(parts) != 4 or parts[0] != "00":
        return None
    _, trace_hex, span_hex, flags_hex = parts
    if (len(trace_hex), len(span_hex), len(flags_hex)) != (32, 16, 2):
        return None
    if not _HEX.issuperset(trace_hex + span_hex + flags_hex):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(flags_hex, 16)


def link_from_traceparent(value: str | None) -> Any:
    """An ``opentelemetry.trace.Link`` to the remote span a stored traceparent names, or None."""
    trace = _otel()
    if trace is None or not value:
        return None
    parsed = parse_traceparent(value)
    if parsed is None:
        return None
    trace_id, span_id, flags = parsed
    context = trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(flags))
    return trace.Link(context)


def check_tracer_provider(tracer_provider: object) -> None:
    """ConfigurationError unless ``tracer_provider`` is None or an OpenTelemetry TracerProvider (with the API)."""
    if tracer_provider is None:
        return
    if not callable(getattr(tracer_provider, "get_tracer", None)):
        raise ConfigurationError(
            f"tracer_provider must be an OpenTelemetry TracerProvider (with get_tracer), got {show(tracer_provider)}"
        )
    if _otel() is None:  # pragma: no cover - the extra is missing
        raise ConfigurationError("tracer_provider needs opentelemetry-api: pip install 'threaddispatch[otel]'")


def make_tracing(tracer_provider: object, component: str) -> Tracing | None:
    """A :class:`Tracing` for ``tracer_provider=`` (None: none); ConfigurationError if it is not a provider."""
    check_tracer_provider(tracer_provider)
    if tracer_provider is None:
        return None
    return Tracing(tracer_provider, component)


class Tracing:
    """A face's tracer: captures producers' span contexts and opens the spans of the work they caused.

    Made by :func:`make_tracing`; thread-safe (OpenTelemetry tracers are).
    """

    def __init__(self, tracer_provider: Any, component: str) -> None:
        self._trace = _otel()
        self._tracer = tracer_provider.get_tracer(_SCOPE)
        self.component = component

    def capture(self) -> Any:
        """The calling thread's current span context, or None if there is no valid span. About a microsecond."""
        context = self._trace.get_current_span().get_span_context()
        return context if context.is_valid else None

    @contextlib.contextmanager
    def send_span(
        self, name: str, contexts: Iterable[Any], attributes: Mapping[str, Any] | None = None
    ) -> Iterator[Any]:
        """Open a PRODUCER span ``name`` linked to each distinct captured context (None entries skipped).

        The span records an exception that escapes the block and sets an error status.
        """
        seen: set[tuple[int, int]] = set()
        links = []
        for context in contexts:
            if context is None:
                continue
            key = (context.trace_id, context.span_id)
            if key not in seen:
                seen.add(key)
                links.append(self._trace.Link(context))
        with self._tracer.start_as_current_span(
            name, kind=self._trace.SpanKind.PRODUCER, links=links, attributes=dict(attributes or {})
        ) as span:
            yield span

    @contextlib.contextmanager
    def run_span(
        self, name: str, traceparent: str | None, attributes: Mapping[str, Any] | None = None
    ) -> Iterator[Any]:
        """Open a CONSUMER span ``name`` linked to the stored ``traceparent`` (if any), e.g. around a job's run."""
        link = link_from_traceparent(traceparent)
        with self._tracer.start_as_current_span(
            name,
            kind=self._trace.SpanKind.CONSUMER,
            links=[link] if link is not None else [],
            attributes=dict(attributes or {}),
        ) as span:
            yield span

    def record_error(self, span: Any, error: BaseException) -> None:
        """Mark ``span`` failed by ``error``: the exception recorded, ``error.type`` set, status ERROR."""
        span.record_exception(error)
        span.set_attribute("error.type", type(error).__qualname__)
        span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"[:200]))
