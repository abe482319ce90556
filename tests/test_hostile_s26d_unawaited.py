"""Hostile tests of the user-code contract: an ``async def`` that returns a coroutine it did not await.

The promise attacked (DESIGN, "Calling user code"; README, "How your functions are
called"): "an awaitable returned by a plain function is awaited too. Nothing is ever
'sent' unawaited." An ``async def send`` whose last line is ``return post(entries)``
(a forgotten ``await``, the commonest asyncio slip) returns a coroutine *from* the
awaited coroutine. ``_invoke`` awaits once (``call``, ``TimedCaller._run_call``): the
inner coroutine is never run, Python warns "coroutine ... was never awaited" when it
is collected, and the face counts the batch as delivered (BackgroundDispatcher's
Future resolves to None, ``stats()["sent"]`` counts it; a RequestDispatcher's Future
resolves to the coroutine object). The entry was never sent and nothing reports it.
Either outcome keeps the promise: the inner awaitable is awaited too, or the call fails
(a TypeError saying what was returned) and is reported like any failure. The same slip
through a plain function (a plain ``send`` returning ``wrapper()`` whose coroutine
returns ``post()``) is the same case.
"""

from __future__ import annotations

import gc
import inspect
import threading
import warnings
from collections.abc import Coroutine
from typing import Any

import pytest

from threaddispatch import BackgroundDispatcher, FailedBatch, RequestDispatcher

#: What the inner coroutine's collection must not say: the contract closes one it refuses.
NEVER_AWAITED = "was never awaited"


def _collect_and_check_no_warning(caught: list[warnings.WarningMessage]) -> None:
    """Collect the dropped inner coroutine now and check that it raised no "never awaited" RuntimeWarning."""
    gc.collect()
    leaked = [str(w.message) for w in caught if NEVER_AWAITED in str(w.message)]
    assert not leaked, leaked


@pytest.mark.timeout(30)
@pytest.mark.parametrize("send_timeout", [None, 5.0], ids=["inline", "timed"])
def test_background_async_send_returning_an_unawaited_coroutine_is_run_or_reported(
    send_timeout: float | None,
) -> None:
    """The inner coroutine runs (the entry is posted), or the batch fails and reaches on_error."""
    posted: list[list[int]] = []
    errors: list[FailedBatch[int]] = []

    async def post(entries: list[int]) -> None:
        posted.append(list(entries))

    async def send(entries: list[int]) -> Coroutine[Any, Any, None]:
        return post(entries)  # the forgotten await

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        d = BackgroundDispatcher(send, ms_delay=5, send_timeout=send_timeout, on_error=errors.append)
        try:
            future = d.submit(1)
            error = future.exception(timeout=10)
            assert d.flush(10)
        finally:
            d.close(10)
        _collect_and_check_no_warning(caught)
    if error is None:
        assert posted == [[1]], "the batch counted as sent, but its coroutine never ran"
    else:
        assert [e.entries for e in errors] == [[1]]


@pytest.mark.timeout(30)
def test_background_plain_send_returning_a_coroutine_that_returns_a_coroutine_is_run_or_reported() -> None:
    """A plain send returning ``wrapper()`` whose body returns ``post()``: post runs, or the batch fails."""
    posted: list[list[int]] = []
    errors: list[FailedBatch[int]] = []

    async def post(entries: list[int]) -> None:
        posted.append(list(entries))

    async def wrapper(entries: list[int]) -> Coroutine[Any, Any, None]:
        return post(entries)

    def send(entries: list[int]) -> Coroutine[Any, Any, Coroutine[Any, Any, None]]:
        return wrapper(entries)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        d = BackgroundDispatcher(send, ms_delay=5, on_error=errors.append)
        try:
            error = d.submit(1).exception(timeout=10)
        finally:
            d.close(10)
        _collect_and_check_no_warning(caught)
    if error is None:
        assert posted == [[1]], "the batch counted as sent, but its coroutine never ran"
    else:
        assert [e.entries for e in errors] == [[1]]


@pytest.mark.timeout(30)
def test_request_async_send_returning_an_unawaited_coroutine_gives_its_result_or_fails() -> None:
    """RequestDispatcher: the Future holds the inner coroutine's result, or fails; never a coroutine object."""
    ran = threading.Event()

    async def fetch(request: dict[str, str]) -> str:
        ran.set()
        return "response"

    async def send(request: dict[str, str], token: object) -> Coroutine[Any, Any, str]:
        return fetch(request)  # the forgotten await

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        rd: RequestDispatcher[dict[str, str], Any] = RequestDispatcher(send)
        try:
            future = rd.add({"endpoint": "/report"}).future
            error = future.exception(timeout=10)
            result = None if error is not None else future.result(timeout=0)
            if inspect.iscoroutine(result):
                result.close()  # the defect: the Future holds the coroutine the send never awaited
        finally:
            rd.close(10)
        _collect_and_check_no_warning(caught)
    if error is None:
        assert result == "response", f"the Future holds {result!r}"
        assert ran.is_set()
