"""BatchedDispatcher on the user-code contract: an async send_batch, a per-call send timeout, contained errors."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from threaddispatch.batched import BatchedDispatcher
from threaddispatch.errors import ConfigurationError, DispatchTimeoutError
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], object]]]:
    calls: list[Callable[[], object]] = []
    yield calls
    for call in reversed(calls):
        call()


def make_batched(send: Any, cleanup: list[Callable[[], object]], **kwargs: Any) -> BatchedDispatcher[Any]:
    kwargs.setdefault("flush_interval", 0.01)
    batched: BatchedDispatcher[Any] = BatchedDispatcher(send, **kwargs)
    cleanup.append(lambda: batched.close(10))
    return batched


def test_an_async_send_batch_is_awaited(cleanup: list[Callable[[], object]]) -> None:
    async def send(target: str, messages: list[Any]) -> list[str]:
        await asyncio.sleep(0)
        return [f"{target}-{m}" for m in messages]

    batched = make_batched(send, cleanup, max_batch_size=2)
    futures = [batched.submit(n, "t") for n in range(3)]
    assert batched.flush(10)
    assert [f.result(0) for f in futures] == ["t-0", "t-1", "t-2"]


def test_an_async_send_batch_that_raises_fails_its_batch(cleanup: list[Callable[[], object]]) -> None:
    async def send(target: str, messages: list[Any]) -> list[str]:
        raise ValueError("down")

    batched = make_batched(send, cleanup)
    future = batched.submit(1, "t")
    with pytest.raises(ValueError, match="down"):
        future.result(10)


@pytest.mark.timeout(30)
def test_a_hung_send_batch_times_out_and_later_batches_go(cleanup: list[Callable[[], object]]) -> None:
    release = threading.Event()
    cleanup.append(release.set)
    calls: list[list[Any]] = []

    def send(target: str, messages: list[Any]) -> list[str]:
        calls.append(messages)
        if len(calls) == 1:
            release.wait(30)
        return ["ok" for _ in messages]

    batched = make_batched(send, cleanup, max_concurrent_sends=1, send_timeout=0.1)
    first = batched.submit(1, "t")
    with pytest.raises(DispatchTimeoutError):
        first.result(10)
    assert batched.submit(2, "t").result(10) == "ok"
    stats = batched.stats()
    assert stats["call_timeouts"] == 1
    assert stats["abandoned_calls"] == 1
    release.set()
    wait_for(lambda: batched.stats()["abandoned_calls"] == 0, timeout=10)


@pytest.mark.parametrize("bad", [0, -1, "1", True])
def test_a_bad_send_timeout_raises_configuration_error(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="timeout"):
        BatchedDispatcher(lambda _t, m: m, send_timeout=bad)


def test_batched_stats_have_the_call_counters(cleanup: list[Callable[[], object]]) -> None:
    batched = make_batched(lambda _t, m: m, cleanup)
    stats = batched.stats()
    assert stats["abandoned_calls"] == 0
    assert stats["call_timeouts"] == 0


TRACE: contextvars.ContextVar[str] = contextvars.ContextVar("TRACE", default="none")


@pytest.mark.parametrize("send_timeout", [None, 10.0])
def test_an_async_send_batch_sees_the_first_messages_context(
    send_timeout: float | None, cleanup: list[Callable[[], object]]
) -> None:
    seen: list[str] = []

    async def send(target: str, messages: list[Any]) -> list[str]:
        await asyncio.sleep(0)
        seen.append(TRACE.get())
        return ["ok" for _ in messages]

    batched = make_batched(send, cleanup, send_timeout=send_timeout)

    def submit_in_trace() -> Any:
        TRACE.set("t-9")
        return batched.submit(1, "t")

    assert contextvars.copy_context().run(submit_in_trace).result(10) == "ok"
    assert seen == ["t-9"]
