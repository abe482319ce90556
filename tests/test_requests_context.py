"""RequestDispatcher(carry_context=True): send runs in a copy of the adder's contextvars context, every attempt."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from threaddispatch.errors import ConfigurationError
from threaddispatch.requests import CancellationToken, RequestDispatcher

pytestmark = pytest.mark.timeout(30)

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class Send:
    """Records the request id it sees; fails the first attempt of "flaky"; sets the var (it must not leak)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[Any, str]] = []

    def __call__(self, request: Any, token: CancellationToken) -> Any:
        with self.lock:
            self.seen.append((request, request_id.get()))
            attempts = sum(1 for got, _ in self.seen if got == request)
        request_id.set("changed-by-send")
        if request == "flaky" and attempts == 1:
            raise ValueError("once")
        return request


@pytest.fixture
def send() -> Send:
    return Send()


@pytest.fixture
def carrying(send: Send) -> Iterator[RequestDispatcher[Any, Any]]:
    rd: RequestDispatcher[Any, Any] = RequestDispatcher(send, max_workers=2, carry_context=True)
    yield rd
    rd.close(10)


def _add_as(rd: RequestDispatcher[Any, Any], who: str, request: Any, **options: Any) -> Any:
    def add() -> Any:
        request_id.set(who)
        return rd.add(request, **options)

    return contextvars.copy_context().run(add)


def test_send_sees_the_adders_context_on_every_attempt(carrying: RequestDispatcher[Any, Any], send: Send) -> None:
    first = _add_as(carrying, "req-1", "a", queue_key="k")
    flaky = _add_as(carrying, "req-2", "flaky", queue_key="k", retry=1, retry_time=0.0)
    assert first.future.result(10) == "a"
    assert flaky.future.result(10) == "flaky"
    assert sorted(send.seen) == [("a", "req-1"), ("flaky", "req-2"), ("flaky", "req-2")]
    assert request_id.get() == "-"


def test_async_send_sees_the_adders_context(send: Send) -> None:
    async def send_async(request: Any, token: CancellationToken) -> Any:
        return request_id.get()

    rd: RequestDispatcher[Any, Any] = RequestDispatcher(send_async, max_workers=1, carry_context=True)
    try:
        assert _add_as(rd, "req-9", "x", queue_key="k").future.result(10) == "req-9"
    finally:
        rd.close(10)


def test_without_carry_context_send_runs_in_the_workers_context(send: Send) -> None:
    rd: RequestDispatcher[Any, Any] = RequestDispatcher(send, max_workers=1)
    try:
        assert _add_as(rd, "req-1", "a", queue_key="k").future.result(10) == "a"
    finally:
        rd.close(10)
    assert send.seen == [("a", "-")]


def test_carry_context_must_be_a_bool(send: Send) -> None:
    with pytest.raises(ConfigurationError, match="carry_context"):
        RequestDispatcher(send, carry_context="yes")  # type: ignore[arg-type]


def test_the_otel_span_of_the_adder_is_current_in_send() -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    tracer = provider.get_tracer("app")

    def send(request: Any, token: CancellationToken) -> Any:
        return trace.get_current_span().get_span_context().span_id

    rd: RequestDispatcher[Any, Any] = RequestDispatcher(send, max_workers=1, carry_context=True)
    try:
        with tracer.start_as_current_span("request") as span:
            handle = rd.add("x", queue_key="k")
        assert handle.future.result(10) == span.get_span_context().span_id
    finally:
        rd.close(10)
        provider.shutdown()
