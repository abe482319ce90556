"""Hostile tests of fork: a forked child's counters start from zero on every face.

The promise attacked (README, BackgroundDispatcher "Fork", which says "the same holds for
every face"): "A child starts with an empty buffer, a fresh worker, fresh locks and its own
counters from zero; the parent's entries are delivered once, by the parent." Each face here
delivers five entries in the parent, then forks; the child reads ``stats()`` before it does
anything. BackgroundDispatcher, EndpointBatchDispatcher and RequestDispatcher count from
zero. BatchedDispatcher resets ``submitted`` and ``batches`` (the engine's) but keeps
``sent`` and ``calls`` (``_BatchedState`` counters, not reset by ``_reset_after_fork``:
threaddispatch/_batched_state.py:709), so the child reports 5 sent of 0 submitted.
AsyncDispatcher keeps ``buffered`` and ``sent`` (``_reset_after_fork`` even adds the
parent's buffer to ``unbuffered``: threaddispatch/_buffered_state.py:437-440).
"""

from __future__ import annotations

import json
import os
import select
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from threaddispatch import (
    AsyncDispatcher,
    BackgroundDispatcher,
    BatchedDispatcher,
    DispatchJob,
    EndpointBatchDispatcher,
    RequestDispatcher,
)
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

#: The counters of each face's stats() that count work (gauges such as "pending" are 0 anyway here).
COUNTERS = {
    "background": ("enqueued", "sent", "batches", "calls"),
    "batched": ("submitted", "sent", "batches", "calls"),
    "async": ("buffered", "sent"),
    "endpoint": ("held", "exhausted"),
    "requests": ("added", "delivered"),
}


def _stats_in_forked_child(stats: Callable[[], dict[str, Any]], timeout: float = 30.0) -> dict[str, Any]:
    """Fork; return ``stats()`` as the child reads it first thing (through a pipe; the child leaves with _exit)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_end)
            try:
                report = stats()
            except BaseException as error:  # reported to the parent
                report = {"error": repr(error)}
            os.write(write_end, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                pytest.fail("the forked child reported nothing in time")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(b"".join(chunks).decode())
    return result


def _child_counters(face: str, stats: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    report = _stats_in_forked_child(stats)
    assert "error" not in report, report
    return {name: report[name] for name in COUNTERS[face]}


def _zero(face: str) -> dict[str, int]:
    return dict.fromkeys(COUNTERS[face], 0)


@pytest.mark.timeout(60)
def test_background_child_counts_from_zero() -> None:
    """BackgroundDispatcher: five sent in the parent, none counted in the child."""
    d: BackgroundDispatcher[int] = BackgroundDispatcher(lambda entries: None, ms_delay=5)
    try:
        for i in range(5):
            d.submit(i).result(timeout=10)
        assert d.stats()["sent"] == 5
        assert _child_counters("background", d.stats) == _zero("background")
    finally:
        d.close(10)


@pytest.mark.timeout(60)
def test_batched_child_counts_from_zero() -> None:
    """BatchedDispatcher: five sent in the parent, none counted in the child (not 5 sent of 0 submitted)."""
    bd: BatchedDispatcher[int] = BatchedDispatcher(
        lambda target, messages: [None] * len(messages), flush_interval=0.005
    )
    try:
        for i in range(5):
            bd.submit(i, "t").result(timeout=10)
        assert bd.stats()["sent"] == 5
        assert _child_counters("batched", bd.stats) == _zero("batched")
    finally:
        bd.close(10)


@pytest.mark.timeout(60)
def test_async_child_counts_from_zero() -> None:
    """AsyncDispatcher: five dispatched in the parent, none counted in the child."""

    class Dispatcher:
        def dispatch(self, message: int, target: str, *, delay_seconds: int | None = None) -> str:
            return "id"

    ad: AsyncDispatcher[int] = AsyncDispatcher(Dispatcher(), target_queue="q")
    send = ad.setup(buffer_len=5)
    ad.start()
    try:
        for i in range(5):
            send.put(i)
        wait_for(lambda: ad.stats()["sent"] == 5, timeout=10, message="five sent")
        assert _child_counters("async", ad.stats) == _zero("async")
    finally:
        ad.stop(10)


@pytest.mark.timeout(60)
def test_endpoint_child_counts_from_zero() -> None:
    """EndpointBatchDispatcher: five jobs delivered in the parent, none held or counted in the child."""
    delivered: list[int] = []
    d = EndpointBatchDispatcher(lambda endpoint, jobs: delivered.extend(j.payload for j in jobs), batch_timeout=0.005)
    try:
        for i in range(5):
            d.add_job(DispatchJob("e", i))
        wait_for(lambda: len(delivered) == 5, timeout=10, message="five delivered")
        assert _child_counters("endpoint", d.stats) == _zero("endpoint")
    finally:
        d.shutdown(10)


@pytest.mark.timeout(60)
def test_requests_child_counts_from_zero() -> None:
    """RequestDispatcher: five requests delivered in the parent, none counted in the child."""
    rd: RequestDispatcher[dict[str, str], str] = RequestDispatcher(lambda request, token: "ok")
    try:
        for i in range(5):
            rd.add({"endpoint": f"/e{i}"}).future.result(timeout=10)
        assert rd.stats()["delivered"] == 5
        assert _child_counters("requests", rd.stats) == _zero("requests")
    finally:
        rd.close(10)
