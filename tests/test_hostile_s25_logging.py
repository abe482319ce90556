"""Hostile tests of BatchingHandler on the root logger while its log server is down.

BatchingHandler promises that records logged by ``send_records`` itself are not queued
again, "so a handler that logs to its own logger cannot feed itself". Attacked: the
records its own dispatcher logs about a failed send (``send_batch failed ... they are
lost``, at ERROR on the ``threaddispatch`` logger, which propagates to the root) and the
records ``on_error`` logs. Both are logged on the dispatcher's thread, outside
``send_records``: each failed batch queued a new record, which failed in turn, for as
long as the server was down. They are skipped by this handler now, and still reach the
logger's other handlers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

import pytest

from threaddispatch.background import FailedBatch
from threaddispatch.logging import BatchingHandler


class _DownServer:
    """A ``send_records`` whose server is down: records each batch's messages, then raises."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards batches
        self.batches: list[list[str]] = []
        self.called = threading.Event()

    def __call__(self, records: list[logging.LogRecord]) -> None:
        with self.lock:
            self.batches.append([record.getMessage() for record in records])
        self.called.set()
        raise ConnectionError("log server down")

    def sent(self) -> list[list[str]]:
        with self.lock:
            return [list(batch) for batch in self.batches]


@pytest.fixture
def on_root() -> Iterator[Callable[[BatchingHandler], None]]:
    """Attach handlers to the root logger (at INFO) for the test; detached and closed after it."""
    root = logging.getLogger()
    level = root.level
    attached: list[BatchingHandler] = []

    def attach(handler: BatchingHandler) -> None:
        attached.append(handler)
        root.addHandler(handler)
        root.setLevel(logging.INFO)

    yield attach
    for handler in attached:
        root.removeHandler(handler)
        handler.close(5)
    root.setLevel(level)


def _settle(handler: BatchingHandler) -> None:
    """Two flushes: the first waits for the failing send; a record it made is queued before the second begins."""
    handler.flush(5)
    handler.flush(5)


@pytest.mark.timeout(30)
def test_a_failing_send_does_not_feed_the_handler_its_own_failure_records(
    on_root: Callable[[BatchingHandler], None],
) -> None:
    server = _DownServer()
    handler = BatchingHandler(server, ms_delay=1)
    on_root(handler)
    logging.getLogger("hostile_s25.app").warning("the one record")
    assert server.called.wait(10)
    _settle(handler)
    assert server.sent() == [["the one record"]]


@pytest.mark.timeout(30)
def test_an_on_error_that_logs_does_not_feed_the_handler(on_root: Callable[[BatchingHandler], None]) -> None:
    server = _DownServer()
    reports: list[int] = []

    def on_error(failed: FailedBatch[logging.LogRecord]) -> None:
        reports.append(len(failed.entries))
        logging.getLogger("hostile_s25.ops").error("shipping %d log records failed", len(failed.entries))

    handler = BatchingHandler(server, ms_delay=1, on_error=on_error)
    on_root(handler)
    logging.getLogger("hostile_s25.app").warning("the one record")
    assert server.called.wait(10)
    _settle(handler)
    assert server.sent() == [["the one record"]]
    assert reports == [1]


@pytest.mark.timeout(30)
def test_a_send_that_logs_to_the_root_logger_while_failing_does_not_feed_the_handler(
    on_root: Callable[[BatchingHandler], None],
) -> None:
    """What the docstring promises, under failure: records logged inside ``send_records`` are skipped and counted."""
    server = _DownServer()

    def send(records: list[logging.LogRecord]) -> None:
        logging.getLogger("hostile_s25.client").warning("retrying the log server")
        server(records)

    handler = BatchingHandler(send, ms_delay=1, on_error=lambda failed: None)
    on_root(handler)
    logging.getLogger("hostile_s25.app").warning("the one record")
    assert server.called.wait(10)
    _settle(handler)
    assert server.sent() == [["the one record"]]
    assert handler.self_records_skipped == 1


class _Collect(logging.Handler):
    """Keeps every record it handles (thread-safe: ``logging.Handler.handle`` holds its lock)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("with_on_error", [True, False], ids=["on_error", "dispatcher_log"])
def test_the_failure_records_the_handler_skips_still_reach_the_loggers_other_handlers(
    on_root: Callable[[BatchingHandler], None], with_on_error: bool
) -> None:
    server = _DownServer()

    def on_error(failed: FailedBatch[logging.LogRecord]) -> None:
        logging.getLogger("hostile_s25.ops").error("shipping %d log records failed", len(failed.entries))

    other = _Collect()
    root = logging.getLogger()
    root.addHandler(other)
    try:
        handler = BatchingHandler(server, ms_delay=1, on_error=on_error if with_on_error else None)
        on_root(handler)
        logging.getLogger("hostile_s25.app").warning("the one record")
        assert server.called.wait(10)
        _settle(handler)
    finally:
        root.removeHandler(other)
    assert server.sent() == [["the one record"]]
    messages = [record.getMessage() for record in other.records]
    expected = "shipping 1 log records failed" if with_on_error else "logging: send_batch failed for 1 entries"
    assert [message for message in messages if message.startswith(expected)] != []
    assert handler.self_records_skipped == 1
