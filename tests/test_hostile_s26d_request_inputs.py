"""Hostile tests of RequestDispatcher's per-request calls facing a bad key or request id.

The promise attacked (DESIGN, "Shared rules"; README, each face): bad arguments raise at
the call that received them, a ``threaddispatch.errors`` class (or ValueError/TypeError)
with the bad value in the message. ``start``/``pause``/``stop``/``clear_queue``/
``flush_queue`` and ``on(queue_key=, request_id=)`` check their key and id
(``check_text``: a non-empty str without NUL). ``delete``, ``start_request``,
``stop_request``, ``get_request`` and ``get_queue`` (threaddispatch/requests.py:346-425)
check neither: the commonest slip, passing the ``RequestHandle`` that ``add`` returned
instead of its ``request_id``, answers False/None ("no such request"), so
``rd.delete(key, handle)`` silently leaves the request queued and sent; ``get_queue(1)``
returns a snapshot of a queue named 1 that no call can make.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from threaddispatch import RequestDispatcher, RequestHandle
from threaddispatch.errors import ConfigurationError

KEY = "GET /report"


@pytest.fixture
def paused() -> Iterator[tuple[RequestDispatcher[dict[str, str], str], RequestHandle[str]]]:
    """A dispatcher whose queue KEY is paused and holds one request."""
    rd: RequestDispatcher[dict[str, str], str] = RequestDispatcher(lambda request, token: "ok")
    rd.pause(KEY)
    handle = rd.add({"endpoint": "/report"}, queue_key=KEY)
    try:
        yield rd, handle
    finally:
        rd.close(5.0)


Call = Callable[[RequestDispatcher[dict[str, str], str], RequestHandle[str]], Any]

#: name -> the call, with a bad queue_key or request_id
BAD_CALLS: dict[str, Call] = {
    "delete(key, handle)": lambda rd, h: rd.delete(KEY, h),  # type: ignore[arg-type]
    "start_request(key, handle)": lambda rd, h: rd.start_request(KEY, h),  # type: ignore[arg-type]
    "stop_request(key, handle)": lambda rd, h: rd.stop_request(KEY, h),  # type: ignore[arg-type]
    "get_request(key, handle)": lambda rd, h: rd.get_request(KEY, h),  # type: ignore[arg-type]
    "delete(1, id)": lambda rd, h: rd.delete(1, h.request_id),  # type: ignore[arg-type]
    "get_request(None, id)": lambda rd, h: rd.get_request(None, h.request_id),  # type: ignore[arg-type]
    "get_queue(1)": lambda rd, h: rd.get_queue(1),  # type: ignore[arg-type]
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_a_bad_key_or_request_id_is_refused_at_the_call(
    paused: tuple[RequestDispatcher[dict[str, str], str], RequestHandle[str]], name: str
) -> None:
    """The call raises ConfigurationError naming the bad value; the queued request is untouched."""
    rd, handle = paused
    with pytest.raises(ConfigurationError, match=r"queue_key|request_id"):
        BAD_CALLS[name](rd, handle)
    assert [r.request_id for r in rd.get_queue(KEY)] == [handle.request_id]


@pytest.mark.timeout(30)
def test_the_queue_calls_already_refuse_a_bad_key(
    paused: tuple[RequestDispatcher[dict[str, str], str], RequestHandle[str]],
) -> None:
    """start/pause/stop/clear_queue/flush_queue refuse a key that is not a str (the reference behaviour)."""
    rd, handle = paused
    for call in (rd.start, rd.pause, rd.stop, rd.clear_queue, rd.flush_queue):
        with pytest.raises(ConfigurationError, match="queue_key"):
            call(1)  # type: ignore[arg-type]
    assert [r.request_id for r in rd.get_queue(KEY)] == [handle.request_id]


@pytest.mark.timeout(30)
def test_delete_by_request_id_removes_the_queued_request(
    paused: tuple[RequestDispatcher[dict[str, str], str], RequestHandle[str]],
) -> None:
    """The right call for contrast: delete(key, handle.request_id) removes it and cancels its Future."""
    rd, handle = paused
    assert rd.delete(KEY, handle.request_id) is True
    assert len(rd.get_queue(KEY)) == 0
    assert handle.future.cancelled()
