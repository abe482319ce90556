"""The exception family: what each class is, and what a user's ``except`` clause catches."""

from __future__ import annotations

import concurrent.futures

import pytest

import threaddispatch
from threaddispatch import RequestDispatcher


def test_cancelled_error_is_the_standard_librarys_class() -> None:
    """threaddispatch.CancelledError is concurrent.futures.CancelledError itself, not a subclass of it."""
    assert threaddispatch.CancelledError is concurrent.futures.CancelledError


@pytest.mark.timeout(30)
def test_except_cancelled_error_catches_a_cancelled_request_future() -> None:
    """A request cancelled before it ran: its Future raises what ``except threaddispatch.CancelledError`` catches."""
    with RequestDispatcher[dict[str, int], str](lambda request, token: "sent") as rd:
        rd.pause("k")
        handle = rd.add({"n": 1}, queue_key="k")
        assert handle.cancel()
        with pytest.raises(threaddispatch.CancelledError):
            handle.future.result(timeout=5)


def test_every_other_error_is_a_thread_dispatch_error() -> None:
    """Every exported exception class but CancelledError and the flow signals is a ThreadDispatchError."""
    signals = {"Retry", "Cancel", "CancelledError"}
    for name in threaddispatch.errors.__all__:
        cls = getattr(threaddispatch.errors, name)
        if name not in signals:
            assert issubclass(cls, threaddispatch.ThreadDispatchError), name
