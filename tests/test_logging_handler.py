"""threaddispatch.logging.BatchingHandler: batched log shipping that never raises into logging."""

from __future__ import annotations

import io
import logging
import threading
from typing import Any

import pytest

from threaddispatch.logging import BatchingHandler
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def logger() -> Any:
    log = logging.getLogger(f"test-batching-{threading.get_ident()}-{id(object())}")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    yield log
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def test_records_arrive_in_batches_with_messages_formatted(logger: logging.Logger) -> None:
    """Records are batched to send_records with their message formatted on the caller's thread."""
    batches: list[list[logging.LogRecord]] = []
    handler = BatchingHandler(batches.append, ms_delay=60_000, max_batch_size=3)
    logger.addHandler(handler)
    mutable = ["before"]
    logger.info("value %s", mutable)
    mutable[0] = "after"  # formatting happened at the call, so the record keeps "before"
    logger.warning("two")
    logger.error("three")
    wait_for(lambda: batches, message="a full batch of three")
    assert [r.getMessage() for r in batches[0]] == ["value ['before']", "two", "three"]
    assert all(r.args is None and r.exc_info is None for r in batches[0])


def test_exceptions_are_rendered_before_queueing(logger: logging.Logger) -> None:
    """exc_info is turned into text on the caller's thread (tracebacks do not travel)."""
    batches: list[list[logging.LogRecord]] = []
    handler = BatchingHandler(batches.append, ms_delay=60_000)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    try:
        raise ValueError("kaput")
    except ValueError:
        logger.exception("failed")
    handler.flush()
    (record,) = batches[0]
    assert "ValueError: kaput" in record.getMessage()
    assert record.exc_info is None


def test_a_failing_sender_never_raises_into_the_logging_call(logger: logging.Logger) -> None:
    """send_records raising is reported to on_error; the logging call itself returns normally."""
    failures: list[Any] = []

    def send(records: list[logging.LogRecord]) -> None:
        raise ConnectionError("log service down")

    handler = BatchingHandler(send, ms_delay=1, on_error=failures.append)
    logger.addHandler(handler)
    logger.info("one")
    handler.flush()
    assert len(failures) == 1 and isinstance(failures[0].error, ConnectionError)


def test_logging_after_close_does_not_raise(logger: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    """A record emitted after the handler closed goes to handleError, never up to the caller."""
    handler = BatchingHandler(lambda records: None, ms_delay=1)
    logger.addHandler(handler)
    handler.close()
    logger.info("after close")  # must not raise
    assert "closed" in capsys.readouterr().err


def test_a_sender_that_logs_to_its_own_logger_does_not_feed_itself(logger: logging.Logger) -> None:
    """Records logged from inside send_records are not queued again, so no feedback loop."""
    received: list[str] = []

    def send(records: list[logging.LogRecord]) -> None:
        received.extend(r.getMessage() for r in records)
        logger.info("shipped %d records", len(records))  # routed to this same handler

    handler = BatchingHandler(send, ms_delay=1)
    logger.addHandler(handler)
    for i in range(3):
        logger.info("event %d", i)
        handler.flush()
    handler.close()
    assert received == ["event 0", "event 1", "event 2"]
    assert handler.self_records_skipped == 3


def test_level_filtering_applies(logger: logging.Logger) -> None:
    """The handler's level filters records before they are queued."""
    batches: list[list[logging.LogRecord]] = []
    handler = BatchingHandler(batches.append, ms_delay=1, level=logging.WARNING)
    logger.addHandler(handler)
    logger.info("dropped by level")
    logger.warning("kept")
    handler.close()
    assert [r.getMessage() for b in batches for r in b] == ["kept"]


def test_later_handlers_see_the_record_unchanged(logger: logging.Logger) -> None:
    """The handler prepares a copy (bpo-35726): a StreamHandler after it prints its own format, args, traceback."""
    batches: list[list[logging.LogRecord]] = []
    batching = BatchingHandler(batches.append, ms_delay=60_000)
    batching.setFormatter(logging.Formatter("BATCH %(levelname)s %(message)s"))
    stream = io.StringIO()
    printing = logging.StreamHandler(stream)
    printing.setFormatter(logging.Formatter("STREAM %(message)s"))
    seen: list[logging.LogRecord] = []
    logger.addHandler(batching)
    logger.addHandler(printing)

    def keep(record: logging.LogRecord) -> bool:
        seen.append(record)
        return True

    logger.addFilter(keep)
    try:
        raise ValueError("kaput")
    except ValueError:
        logger.exception("value %s", 42)
    batching.flush()
    printed = stream.getvalue()
    assert printed.startswith("STREAM value 42\n"), printed
    assert "BATCH" not in printed
    assert "ValueError: kaput" in printed
    (original,) = seen
    assert original.args == (42,) and original.msg == "value %s" and original.exc_info is not None
    (shipped,) = batches[0]
    assert shipped is not original
    assert shipped.getMessage().startswith("BATCH ERROR value 42") and "ValueError: kaput" in shipped.getMessage()
    assert shipped.args is None and shipped.exc_info is None and shipped.exc_text is None


def test_a_queue_smaller_than_the_batch_size_is_accepted() -> None:
    """A tiny buffer is accepted (it caps the batch size) rather than refused."""
    batches: list[list[logging.LogRecord]] = []
    handler = BatchingHandler(batches.append, ms_delay=60_000, max_queue_size=3)
    try:
        for i in range(3):
            handler.emit(logging.makeLogRecord({"msg": f"m{i}"}))
        wait_for(lambda: batches, timeout=10, message="the size-triggered batch")
        assert [r.getMessage() for r in batches[0]] == ["m0", "m1", "m2"]
    finally:
        handler.close()


@pytest.mark.parametrize("bad", [{"level": "NO SUCH LEVEL"}, {"max_batch_size": 0}])
def test_repr_never_raises_for_a_handler_whose_constructor_failed(bad: dict[str, Any]) -> None:
    """A handler left half-made by a failing __init__ still has a repr."""
    handler = BatchingHandler.__new__(BatchingHandler)
    with pytest.raises((ValueError, TypeError)):
        handler.__init__(lambda records: None, **bad)  # type: ignore[misc]
    assert repr(handler).startswith("<BatchingHandler")
    handler.flush()  # logging.shutdown() flushes and closes every handler made, even half-made ones
    handler.close()
