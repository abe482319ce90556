"""Two BatchingHandlers on one logger, both sinks down: neither queues the other's failure records.

Each handler skips the records logged while it delivers a batch (its own "send_batch failed"
record, what ``on_error`` and ``send_records`` log). Before, the guard was per handler: A's
failure record, logged on A's thread, was queued by B; B's send failed and its failure record
was queued by A; and so on, one new record per window each, for as long as both sinks were
down. Now a record logged while any BatchingHandler delivers is queued by none; it still
reaches the logger's other handlers, or ``logging.lastResort`` (stderr, once) when there are none.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest

from threaddispatch.background import FailedBatch
from threaddispatch.logging import BatchingHandler

pytestmark = pytest.mark.timeout(60)

ROUNDS = 4


class _DownSink:
    """A ``send_records`` whose server is down: keeps each batch's messages, then raises."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards batches
        self.batches: list[list[str]] = []

    def __call__(self, records: list[logging.LogRecord]) -> None:
        with self.lock:
            self.batches.append([record.getMessage() for record in records])
        raise ConnectionError("log server down")

    def sent(self) -> list[list[str]]:
        with self.lock:
            return [list(batch) for batch in self.batches]


class _Collect(logging.Handler):
    """Keeps the messages of the records it handles (``Handler.handle`` holds its lock)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def lib_logger() -> Iterator[logging.Logger]:
    """The ``threaddispatch`` logger (where the dispatchers log their failures), cut off from the root for the test."""
    logger = logging.getLogger("threaddispatch")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in saved[2]:
        logger.removeHandler(handler)
    try:
        yield logger
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            if isinstance(handler, BatchingHandler):
                handler.close(5)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        for handler in saved[2]:
            logger.addHandler(handler)


def _no_other_handler(logger: logging.Logger) -> None:
    """Take every handler off ``logger``: from here the test's BatchingHandlers are its only ones.

    Called in the test body, not the fixture: pytest >= 9.1 attaches its log-capture handlers
    to each non-propagating logger when the test's call phase starts (after the fixture has made
    this one non-propagating); they would be the "other handler" that keeps lastResort silent.
    """
    for handler in list(logger.handlers):
        logger.removeHandler(handler)


def _settle(*handlers: BatchingHandler) -> None:
    """Flush each handler in turn, several rounds: a record one queued in another is sent by a later round."""
    for _ in range(ROUNDS):
        for handler in handlers:
            handler.flush(5)


@pytest.mark.parametrize("with_on_error", [False, True], ids=["dispatcher_log", "on_error_logs"])
def test_two_handlers_whose_sinks_are_down_do_not_feed_each_other(
    lib_logger: logging.Logger, with_on_error: bool
) -> None:
    """Each sink gets the one record once; the failure records go to the other handler on the logger, not A or B."""
    reports: list[int] = []

    def on_error(failed: FailedBatch[logging.LogRecord]) -> None:
        reports.append(len(failed.entries))
        lib_logger.error("shipping %d log records failed", len(failed.entries))

    other = _Collect()
    lib_logger.addHandler(other)
    sink_a, sink_b = _DownSink(), _DownSink()
    a = BatchingHandler(sink_a, ms_delay=1, name="s26-a", on_error=on_error if with_on_error else None)
    b = BatchingHandler(sink_b, ms_delay=1, name="s26-b", on_error=on_error if with_on_error else None)
    lib_logger.addHandler(a)
    lib_logger.addHandler(b)
    logging.getLogger("threaddispatch.s26_app").warning("the one record")
    _settle(a, b)
    assert sink_a.sent() == [["the one record"]]
    assert sink_b.sent() == [["the one record"]]
    # Nothing lost silently: each failure is reported once, to the logger's other handler.
    failures = [m for m in other.messages if m != "the one record"]
    if with_on_error:
        assert reports == [1, 1]
        assert failures == ["shipping 1 log records failed"] * 2
    else:
        assert len(failures) == 2 and all("send_batch failed for 1 entries" in m for m in failures)
        assert {m.split(":")[0] for m in failures} == {"s26-a", "s26-b"}
    assert a.self_records_skipped == b.self_records_skipped == 2  # both failure records, skipped by both


def test_with_no_other_handler_each_failure_goes_to_last_resort_once(
    lib_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    """With only BatchingHandlers on the logger, a failure record they all skip is written by lastResort, once."""
    assert logging.lastResort is not None
    _no_other_handler(lib_logger)
    sink_a, sink_b = _DownSink(), _DownSink()
    a = BatchingHandler(sink_a, ms_delay=1, name="s26-a")
    b = BatchingHandler(sink_b, ms_delay=1, name="s26-b")
    lib_logger.addHandler(a)
    lib_logger.addHandler(b)
    lib_logger.getChild("s26_app").warning("the one record")
    _settle(a, b)
    assert sink_a.sent() == sink_b.sent() == [["the one record"]]
    err = capsys.readouterr().err
    assert err.count("send_batch failed for 1 entries") == 2, err
    assert err.count("s26-a: send_batch failed") == 1 and err.count("s26-b: send_batch failed") == 1


def test_a_skipped_record_below_last_resorts_level_is_only_counted(
    lib_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    """An INFO line a sending thread logs is skipped and counted; lastResort (WARNING) prints only the WARNING one."""
    received: list[str] = []
    _no_other_handler(lib_logger)

    def send(records: list[logging.LogRecord]) -> None:
        received.extend(record.getMessage() for record in records)
        lib_logger.info("shipped %d records", len(records))
        lib_logger.warning("shipped, loudly")

    a = BatchingHandler(send, ms_delay=1, name="s26-a")
    b = BatchingHandler(send, ms_delay=1, name="s26-b")
    lib_logger.addHandler(a)
    lib_logger.addHandler(b)
    lib_logger.getChild("s26_app").warning("the one record")
    _settle(a, b)
    assert received == ["the one record", "the one record"]
    assert a.self_records_skipped == b.self_records_skipped == 4  # each send's two lines, skipped by both
    err = capsys.readouterr().err
    assert "shipped %d" not in err and "shipped 1 records" not in err
    assert err.count("shipped, loudly") == 2, err  # the WARNING ones do reach lastResort: it is not silenced


class _HungSink:
    """A ``send_records`` that holds its first batch until released: the handler's queue then fills."""

    def __init__(self) -> None:
        self.called = threading.Event()
        self.release = threading.Event()

    def __call__(self, records: list[logging.LogRecord]) -> None:
        self.called.set()
        self.release.wait(30)


def test_a_full_handlers_drop_report_is_queued_by_no_batching_handler(lib_logger: logging.Logger) -> None:
    """A's "is dropping entries" line, logged inside A's emit, is not queued by A or B (where it would be dropped
    in turn, its own report re-entering the other handler); it reaches the logger's other handler once."""
    other = _Collect()
    lib_logger.addHandler(other)
    sinks = _HungSink(), _HungSink()
    a, b = (
        BatchingHandler(sink, ms_delay=1, max_batch_size=1, max_queue_size=1, name=name)
        for sink, name in zip(sinks, ("s26-a", "s26-b"), strict=True)
    )
    lib_logger.addHandler(a)
    lib_logger.addHandler(b)
    app = lib_logger.getChild("s26_app")
    try:
        app.warning("in flight")
        assert all(sink.called.wait(10) for sink in sinks)
        app.warning("queued")
        app.warning("dropped")  # both queues are full
        assert a.dispatcher.stats()["dropped"] == 1
        assert b.dispatcher.stats()["dropped"] == 1
        reports = [m for m in other.messages if "is dropping entries" in m]
        assert len(reports) == 2 and {m.split(" is dropping")[0] for m in reports} == {
            "BackgroundDispatcher 's26-a'",
            "BackgroundDispatcher 's26-b'",
        }
    finally:
        for sink in sinks:
            sink.release.set()
