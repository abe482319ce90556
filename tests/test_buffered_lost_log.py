"""AsyncDispatcher without an error handler: lost messages are logged on the shared drop-log cadence.

One WARNING with the first loss's traceback, then at most one a minute with the count, and
one INFO when messages are delivered again; every lost message is still counted in ``stats()``.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from threaddispatch._drop_log import DropLog
from threaddispatch.batched import BatchedDispatcher
from threaddispatch.buffered import AsyncDispatcher, Sender
from threaddispatch.testing import RecordingDispatcher, wait_for

pytestmark = pytest.mark.timeout(60)

LOST = 1000


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="threaddispatch")
    return caplog


def ours(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "threaddispatch"]


def lose(dispatcher: Any, request: pytest.FixtureRequest) -> tuple[AsyncDispatcher[Any], Sender[Any]]:
    """A started AsyncDispatcher without an error handler, to which LOST messages were put."""
    ad: AsyncDispatcher[Any] = AsyncDispatcher(dispatcher, "orders")
    request.addfinalizer(lambda: ad.stop(10))
    sender = ad.setup(100)
    ad.start()
    for i in range(LOST):
        sender.put(i)
    return ad, sender


def test_a_thousand_messages_lost_to_a_closed_target_give_one_warning(
    request: pytest.FixtureRequest, logs: pytest.LogCaptureFixture
) -> None:
    """A closed BatchedDispatcher refuses every hand-off: 1,000 losses, one WARNING with a traceback, all counted."""
    target: BatchedDispatcher[Any] = BatchedDispatcher(lambda _t, messages: [None] * len(messages), name="closed")
    target.close(5)
    ad, _ = lose(target, request)
    ad.stop(30)  # False: messages failed during the stop
    stats = ad.stats()
    assert (stats["failed"], stats["sent"], stats["in_flight"], stats["failures_waiting"]) == (LOST, 0, 0, 0)
    records = ours(logs)
    assert len(records) == 1, [r.getMessage() for r in records]
    (warning,) = records
    assert warning.levelno == logging.WARNING and warning.exc_info is not None
    assert "failed after 1 attempt(s); it is lost" in warning.getMessage()
    assert "no error_handler" in warning.getMessage()
    assert warning.threaddispatch_dropped == 1  # type: ignore[attr-defined]


def test_losses_then_deliveries_log_one_warning_and_one_recovery(
    request: pytest.FixtureRequest, logs: pytest.LogCaptureFixture
) -> None:
    """A direct dispatcher failing 1,000 messages, then delivering again: a WARNING, then an INFO with the count."""
    dispatcher: RecordingDispatcher[Any] = RecordingDispatcher(fail=lambda message: message != "good")
    ad, sender = lose(dispatcher, request)
    wait_for(lambda: ad.failed == LOST and ad.stats()["failures_waiting"] == 0, timeout=30)

    def recovered() -> bool:
        sender.put("good")  # one delivery at a time until the INFO line: the losses may still be reported
        return any(r.levelno == logging.INFO and "recovered" in r.getMessage() for r in ours(logs))

    wait_for(recovered, timeout=30)
    assert ad.stop(10)
    assert ad.failed == LOST
    records = ours(logs)
    assert [r.levelno for r in records] == [logging.WARNING, logging.INFO], [r.getMessage() for r in records]
    assert records[0].exc_info is not None
    assert f"{LOST} dropped in all" in records[1].getMessage()


def test_the_drop_log_line_carries_the_detail_and_the_traceback_when_one_is_due(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """DropLog.dropped(detail=, exc_info=): both on a line that is logged, neither costs a line that is not."""
    caplog.set_level(logging.INFO, logger="test.lost")
    drops = DropLog(logging.getLogger("test.lost"), "Face 'x'", "why", clock=lambda: 1000.0)
    error = ValueError("boom")
    drops.dropped(detail="'m' failed", exc_info=error)
    drops.dropped(detail="'n' failed", exc_info=error)  # within the interval: counted only
    (line,) = caplog.records
    assert line.getMessage().endswith("; last: 'm' failed")
    assert line.exc_info is not None and line.exc_info[1] is error
