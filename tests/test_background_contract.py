"""BackgroundDispatcher and BatchingHandler on the calling contract (issue 12).

Async send functions and hooks are awaited, a per-call ``send_timeout`` abandons a hung
send, retries follow ``RetryPolicy.next_delay`` and wait on the engine's timer (never on
the worker thread), and the exit log counts only what was delivered.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import threading
from typing import Any

import pytest

from threaddispatch import (
    BackgroundDispatcher,
    Constant,
    DispatchTimeoutError,
    FailedBatch,
    RetryPolicy,
)
from threaddispatch.logging import BatchingHandler
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(30)


def test_an_async_send_batch_is_awaited() -> None:
    """An ``async def`` send_batch runs to completion: its effect is there once flush() returns."""
    got: list[Any] = []

    async def send(entries: list[Any]) -> None:
        await asyncio.sleep(0)
        got.extend(entries)

    d = BackgroundDispatcher(send, ms_delay=1)
    d.enqueue(1)
    d.enqueue(2)
    assert d.flush(5.0)
    assert got == [1, 2]
    assert d.stats()["sent"] == 2
    assert d.close(5.0)


def test_an_async_send_batch_that_raises_fails_the_batch() -> None:
    """A coroutine's exception is the batch's failure: on_error gets it and the Future carries it."""
    failures: list[FailedBatch[Any]] = []

    async def send(entries: list[Any]) -> None:
        raise ValueError("remote refused")

    d = BackgroundDispatcher(send, ms_delay=1, on_error=failures.append)
    future = d.submit("x")
    with pytest.raises(ValueError, match="remote refused"):
        future.result(5.0)
    assert d.flush(5.0)
    assert [(f.entries, type(f.error)) for f in failures] == [(["x"], ValueError)]
    assert d.stats()["failed"] == 1 and d.stats()["sent"] == 0
    assert d.close(5.0) is True


@pytest.mark.timeout(30)
def test_send_timeout_fails_a_hung_batch_and_later_batches_still_go() -> None:
    """A send past send_timeout fails with DispatchTimeoutError; its thread is abandoned; the next batch goes."""
    release = threading.Event()
    got: list[Any] = []
    failures: list[FailedBatch[Any]] = []

    def send(entries: list[Any]) -> None:
        if entries == ["hang"]:
            release.wait(20)
            return
        got.extend(entries)

    d = BackgroundDispatcher(send, ms_delay=1, send_timeout=0.2, on_error=failures.append)
    try:
        future = d.submit("hang")
        with pytest.raises(DispatchTimeoutError):
            future.result(10.0)
        assert d.stats()["abandoned_calls"] == 1
        assert d.stats()["call_timeouts"] == 1
        d.enqueue("after")
        assert d.flush(10.0)
        assert got == ["after"]
        assert [f.entries for f in failures] == [["hang"]]
        assert isinstance(failures[0].error, DispatchTimeoutError)
    finally:
        release.set()
    wait_for(lambda: d.stats()["abandoned_calls"] == 0, timeout=10.0, message="abandoned send ended")
    assert d.close(5.0) is True


def test_send_timeout_is_validated() -> None:
    from threaddispatch import ConfigurationError

    for bad in (0, -1, float("nan"), "1", True):
        with pytest.raises(ConfigurationError, match="timeout"):
            BackgroundDispatcher(print, send_timeout=bad)  # type: ignore[arg-type]  # "1" is wrong on purpose


@pytest.mark.timeout(30)
def test_a_retry_backoff_does_not_hold_the_worker() -> None:
    """While a failed batch waits out its backoff, later batches are sent (the wait is on the timer)."""
    sent: list[Any] = []
    first_failed = threading.Event()

    def send(entries: list[Any]) -> None:
        if entries == ["flaky"] and not first_failed.is_set():
            first_failed.set()
            raise OSError("transient")
        sent.extend(entries)

    d = BackgroundDispatcher(send, ms_delay=1, retry=RetryPolicy(max_attempts=2, backoff=Constant(30.0)))
    d.enqueue("flaky")
    assert first_failed.wait(5.0)
    d.enqueue("later")
    wait_for(lambda: "later" in sent, timeout=10.0, message="a batch sent during the backoff")
    assert "flaky" not in sent
    assert d.close(5.0) is True  # close cuts the backoff short: the retry goes at once
    assert sent == ["later", "flaky"]


def test_flush_waits_for_a_batch_being_retried() -> None:
    """flush() returns only once a batch waiting for its retry has been sent (or failed for good)."""
    sent: list[Any] = []
    attempts: list[int] = []

    def send(entries: list[Any]) -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise OSError("transient")
        sent.extend(entries)

    d = BackgroundDispatcher(send, ms_delay=1, retry=RetryPolicy(max_attempts=3, backoff=Constant(0.05)))
    d.enqueue("x")
    assert d.flush(10.0)
    assert sent == ["x"]
    assert d.stats()["retries"] == 2
    assert d.stats()["pending"] == 0
    assert d.close(5.0)


def test_batching_handler_awaits_an_async_send_records() -> None:
    got: list[str] = []

    async def send_records(records: list[logging.LogRecord]) -> None:
        await asyncio.sleep(0)
        got.extend(r.getMessage() for r in records)

    handler = BatchingHandler(send_records, ms_delay=1, name="contract-log")
    logger = logging.getLogger("test_background_contract.async")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("hello %s", "world")
        handler.flush(5.0)
        assert got == ["hello world"]
    finally:
        logger.removeHandler(handler)
        handler.close(5.0)


def test_batching_handler_takes_a_send_timeout() -> None:
    release = threading.Event()
    failures: list[FailedBatch[logging.LogRecord]] = []

    def send_records(records: list[logging.LogRecord]) -> None:
        release.wait(20)

    handler = BatchingHandler(send_records, ms_delay=1, send_timeout=0.2, on_error=failures.append, name="log-t")
    try:
        handler.emit(logging.makeLogRecord({"msg": "stuck"}))
        wait_for(lambda: failures, timeout=10.0, message="timed-out batch reported")
        assert isinstance(failures[0].error, DispatchTimeoutError)
    finally:
        release.set()
    wait_for(lambda: handler.dispatcher.stats()["abandoned_calls"] == 0, timeout=10.0, message="abandoned ended")
    handler.close(5.0)


@pytest.mark.timeout(60)
def test_the_exit_log_does_not_count_a_hung_send_as_delivered() -> None:
    """At exit with a send that never returns, its entries are reported lost, not delivered."""
    script = """
        import logging, threading
        import threaddispatch
        from threaddispatch import BackgroundDispatcher
        logging.basicConfig(level=logging.INFO)
        threaddispatch.set_exit_timeout(0.5)
        entered = threading.Event()
        never = threading.Event()
        def send(entries):
            entered.set()
            never.wait()
        d = BackgroundDispatcher(send, ms_delay=60_000, max_batch_size=5)
        for i in range(5):
            d.enqueue(i)
        assert entered.wait(10)
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "delivered 5" not in result.stderr
    assert "delivered 0 entries and lost 5" in result.stderr
