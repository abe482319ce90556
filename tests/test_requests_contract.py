"""RequestDispatcher on the shared contract: async user code, the shared cancel token, the one retry decision."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from threaddispatch._cancel import CancelToken
from threaddispatch.errors import CancelledError, ConfigurationError, Retry
from threaddispatch.request_storage import MemoryRequestStorage, StoredRequest
from threaddispatch.requests import CancellationToken, RequestDispatcher, RequestHandle
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(30)

Made = Callable[..., RequestDispatcher[Any, Any]]


@pytest.fixture
def make() -> Iterator[Made]:
    made: list[RequestDispatcher[Any, Any]] = []

    def build(send: Callable[..., Any], **options: Any) -> RequestDispatcher[Any, Any]:
        dispatcher: RequestDispatcher[Any, Any] = RequestDispatcher(send, **options)
        made.append(dispatcher)
        return dispatcher

    yield build
    for dispatcher in made:
        dispatcher.close(5)


# -- async send ----------------------------------------------------------------------------------------


def test_async_send_resolves_to_its_awaited_value(make: Made) -> None:
    """An ``async def`` send, and a plain send returning a coroutine, resolve to the awaited value."""

    async def send(request: int, token: CancellationToken) -> int:
        await asyncio.sleep(0)
        return request * 2

    async def later(request: int) -> int:
        return request + 1

    assert make(send).add(21, queue_key="k").future.result(5) == 42
    assert make(lambda request, token: later(request)).add(1, queue_key="k").future.result(5) == 2


def test_async_send_failure_is_retried_then_final(make: Made) -> None:
    """An async send's exception goes through the retry path like a plain send's."""
    calls: list[int] = []

    async def send(request: str, token: CancellationToken) -> str:
        calls.append(1)
        raise LookupError(request)

    handle = make(send).add("gone", queue_key="k", retry=1, retry_time=0)
    with pytest.raises(LookupError):
        handle.future.result(5)
    assert len(calls) == 2


def _hanging_send() -> tuple[Callable[..., Any], threading.Event, threading.Event]:
    started = threading.Event()
    task_cancelled = threading.Event()

    async def send(request: str, token: CancellationToken) -> str:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            task_cancelled.set()
            raise
        return request

    return send, started, task_cancelled


@pytest.mark.parametrize("how", ["stop", "stop_request", "cancel"])
def test_stopping_a_running_async_send_cancels_its_task(make: Made, how: str) -> None:
    """stop / stop_request / handle.cancel set the token, which cancels the send's task on its loop."""
    send, started, task_cancelled = _hanging_send()
    rd = make(send)
    handle = rd.add("r", queue_key="k")
    assert started.wait(5)
    if how == "stop":
        rd.stop("k")
    elif how == "stop_request":
        assert rd.stop_request("k", handle.request_id)
    else:
        assert handle.cancel()
    assert task_cancelled.wait(5)
    if how == "cancel":
        with pytest.raises(CancelledError):
            handle.future.result(5)
    else:
        wait_for(lambda: not rd.running_requests("k"), timeout=5)
        assert not handle.future.done()  # stopped, not settled: it stays queued


def test_close_at_its_timeout_cancels_a_hung_async_send(make: Made) -> None:
    """close(timeout) past its deadline cancels the token, and with it the coroutine's task."""
    send, started, task_cancelled = _hanging_send()
    rd = make(send)
    handle = rd.add("r", queue_key="k")
    assert started.wait(5)
    assert rd.close(0.05) is False
    assert task_cancelled.wait(5)
    with pytest.raises(CancelledError):
        handle.future.result(5)


def test_a_later_attempt_on_the_same_worker_is_not_cancelled(make: Made) -> None:
    """A cancel aimed at one attempt's task never reaches the next coroutine the same worker runs."""
    hang, started, task_cancelled = _hanging_send()

    async def send(request: str, token: CancellationToken) -> str:
        if request == "first":
            return str(await hang(request, token))
        await asyncio.sleep(0.01)
        return request

    rd = make(send, max_workers=1)
    first = rd.add("first", queue_key="a")
    assert started.wait(5)
    assert first.cancel()
    first.cancel()  # a second cancel of the same attempt: nothing more is scheduled
    assert task_cancelled.wait(5)
    assert [rd.add(name, queue_key="b").future.result(5) for name in ("x", "y")] == ["x", "y"]


# -- async hooks ---------------------------------------------------------------------------------------


def test_async_retry_on_error_is_awaited(make: Made) -> None:
    """An async ``retry_on_error`` returning False makes the failure final (its coroutine is not truthy)."""
    calls: list[int] = []

    def send(request: str, token: CancellationToken) -> str:
        calls.append(1)
        raise LookupError(request)

    async def retry_on_error(error: Exception) -> bool:
        return False

    handle = make(send, retry_on_error=retry_on_error).add("r", queue_key="k", retry=3, retry_time=0)
    with pytest.raises(LookupError):
        handle.future.result(5)
    assert len(calls) == 1


def test_async_is_online_is_awaited(make: Made) -> None:
    """An async ``is_online`` returning False takes the dispatcher offline."""
    probed = threading.Event()

    async def is_online() -> bool:
        probed.set()
        return False

    rd = make(lambda request, token: request, is_online=is_online, online_check_interval=0.01)
    assert probed.wait(5)
    wait_for(lambda: not rd.online, timeout=5)


def test_async_storage_hooks_are_awaited(make: Made) -> None:
    """Async ``on_initialization`` and ``on_update_storage`` run to completion."""
    storage = MemoryRequestStorage()
    restored: list[RequestHandle[Any]] = []
    updates: list[tuple[str, int]] = []

    async def on_initialization(dispatcher: RequestDispatcher[Any, Any], handles: list[RequestHandle[Any]]) -> None:
        await asyncio.sleep(0)
        restored.extend(handles)

    async def on_update_storage(key: str, entries: list[StoredRequest]) -> None:
        await asyncio.sleep(0)
        updates.append((key, len(entries)))

    first = make(lambda request, token: request, storage=storage, on_update_storage=on_update_storage)
    first.pause("k")
    first.add("kept", queue_key="k")
    assert updates == [("k", 1)]
    first.close(5)
    second = make(lambda request, token: request, storage=storage, on_initialization=on_initialization)
    assert [handle.future.result(5) for handle in restored] == ["kept"]
    second.close(5)


# -- errors and flow signals ---------------------------------------------------------------------------


def test_retry_with_a_bad_delay_is_logged_naming_the_delay(make: Made, caplog: pytest.LogCaptureFixture) -> None:
    """The final failure a Retry with a bad delay makes (tests/test_face_contract.py) is logged naming the delay."""

    def send(request: str, token: CancellationToken) -> str:
        signal = Retry()
        signal.delay = -1
        raise signal

    with caplog.at_level(logging.WARNING, logger="threaddispatch"):
        handle = make(send).add("r", queue_key="k", retry=3, retry_time=0)
        with pytest.raises(Retry):
            handle.future.result(5)
    assert "Retry(delay=-1)" in caplog.text


# -- the token -----------------------------------------------------------------------------------------


def test_cancellation_token_is_the_shared_cancel_token() -> None:
    """CancellationToken is a CancelToken: its wait takes a deadline's remainder and checks its timeout."""
    token = CancellationToken()
    assert isinstance(token, CancelToken)
    assert token.wait(-1) is False
    with pytest.raises(ConfigurationError, match="timeout"):
        token.wait("soon")  # type: ignore[arg-type]
    token._cancel()
    assert token.cancelled and token.wait(0)
    with pytest.raises(CancelledError, match="the request was cancelled"):
        token.raise_if_cancelled()
    assert repr(token) == "<CancellationToken cancelled=True>"
