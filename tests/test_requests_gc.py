"""RequestDispatcher at depth and the garbage collector: what a pending request costs a full collection.

A full collection visits every object the collector tracks, so its pause at 100k queued
requests grows with the tracked objects each one holds. A pending request (the caller
dropped its handle) holds two: its record and its Future (and on 3.10 the Future's
instance dict, which 3.11 keeps inline). Its Future knows its core, queue key and request
id as plain attributes, not through a tuple the collector would track (one more per
request before).
"""

from __future__ import annotations

import gc
import sys
from typing import Any

import pytest

from threaddispatch.requests import CancellationToken, Mode, RequestDispatcher

pytestmark = pytest.mark.timeout(60)

DEPTH = 2_000
TRACKED = 2 if sys.version_info >= (3, 11) else 3  # 3.10: the Future's __dict__ is an object of its own


def _send(request: Any, token: CancellationToken) -> None:
    return None


@pytest.mark.parametrize("mode", ["queued", "concurrent"])
def test_a_pending_request_holds_only_its_record_and_its_future(mode: Mode) -> None:
    rd: RequestDispatcher[Any, None] = RequestDispatcher(_send, max_workers=1, name="gc-count")
    try:
        rd.pause("k")
        request = {"method": "GET", "endpoint": "/users"}
        rd.add(request, queue_key="k", mode=mode)  # the queue and its first structures exist
        gc.collect()
        before = len(gc.get_objects())
        for _ in range(DEPTH):
            rd.add(request, queue_key="k", mode=mode)
        per_request = (len(gc.get_objects()) - before) / DEPTH
        assert rd.stats()["pending"] == DEPTH + 1
        assert per_request <= TRACKED + 0.01, per_request
    finally:
        assert rd.close(10.0) is False  # the paused requests were cancelled


def test_cancelling_the_future_of_a_pending_request_still_deletes_it() -> None:
    rd: RequestDispatcher[Any, None] = RequestDispatcher(_send, max_workers=1, name="gc-cancel")
    try:
        rd.pause("k")
        first = rd.add({"n": 1}, queue_key="k", mode="queued")
        second = rd.add({"n": 2}, queue_key="k", mode="queued")
        assert first.future.cancel() is True
        assert [q.request_id for q in rd.get_queue("k")] == [second.request_id]
        assert rd.stats()["cancelled"] == 1
    finally:
        rd.close(10.0)
