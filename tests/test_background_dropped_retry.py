"""A retry batch dropped by ``overflow="drop_oldest"``: its Futures, the flush and the spool are settled."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from threaddispatch import BackgroundDispatcher
from threaddispatch._spool import Spool
from threaddispatch.backoff import Constant, RetryPolicy
from threaddispatch.errors import QueueFullError
from threaddispatch.testing import wait_for


def _retry_in_lane(dispatcher: BackgroundDispatcher[str]) -> bool:
    """The failed batch's retry came due and waits in the lane (the window is long, so it is not sent)."""
    engine = dispatcher._engine
    return not engine._scheduled and sum(len(lane) for lane in engine._lanes.values()) == 1


def _drop_the_retry(spool: Path | None) -> tuple[BackgroundDispatcher[str], list[list[str]]]:
    calls: list[list[str]] = []

    def send(batch: list[str]) -> None:
        calls.append(list(batch))
        if len(calls) == 1:
            raise RuntimeError("the first attempt fails")

    dispatcher: BackgroundDispatcher[str] = BackgroundDispatcher(
        send,
        600_000,  # a ten-minute window: only flush() sends
        max_queue_size=2,
        overflow="drop_oldest",
        retry=RetryPolicy(max_attempts=5, backoff=Constant(0.01)),
        spool=spool,
    )
    return dispatcher, calls


@pytest.mark.timeout(60)
@pytest.mark.parametrize("spooled", [False, True], ids=["no-spool", "spool"])
def test_a_dropped_retry_batch_settles_its_futures_and_the_flush_waiting_for_it(tmp_path: Path, spooled: bool) -> None:
    path = tmp_path / "r.spool"
    dispatcher, calls = _drop_the_retry(path if spooled else None)
    future = dispatcher.submit("a")
    flushed: list[bool] = []
    flusher = threading.Thread(target=lambda: flushed.append(dispatcher.flush(30)), name="test-flush")
    flusher.start()
    wait_for(lambda: len(calls) == 1, timeout=30)
    # The engine's capacity gate, shut: the worker holds full batches back, so the third entry
    # below overflows the lane instead of racing the worker for it (the race this reproduces).
    dispatcher._engine._gate = lambda _key: False
    wait_for(lambda: _retry_in_lane(dispatcher), timeout=30)
    dispatcher.enqueue("b")
    dispatcher.enqueue("c")  # three in a lane of two: the oldest, the retry batch, is dropped
    dispatcher._engine._gate = None
    with pytest.raises(QueueFullError):
        future.result(timeout=30)
    flusher.join(30)
    assert not flusher.is_alive() and flushed == [True]
    assert dispatcher.stats()["dropped"] == 1
    dispatcher.close(30)
    assert calls == [["a"], ["b", "c"]]  # a full batch (max_queue_size caps it) went at once; "a" never again
    if spooled:
        with Spool(path) as spool:
            assert spool.pending() == [] and spool.dead_letters(10) == []
