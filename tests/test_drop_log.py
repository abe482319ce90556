"""The shared drop log: WARNING at the first drop, at most one per interval after, INFO at recovery."""

from __future__ import annotations

import logging

import pytest

from threaddispatch._drop_log import DropLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> tuple[DropLog, Clock, pytest.LogCaptureFixture]:
    clock = Clock()
    caplog.set_level(logging.INFO, logger="test.drops")
    return DropLog(logging.getLogger("test.drops"), "Face 'x'", "overflow='drop_newest'", clock=clock), clock, caplog


def test_first_drop_warns_once_then_once_per_interval(log: tuple[DropLog, Clock, pytest.LogCaptureFixture]) -> None:
    drops, clock, caplog = log
    drops.dropped()
    for _ in range(99):
        drops.dropped()
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "Face 'x' is dropping entries (overflow='drop_newest'): 1 dropped" in caplog.records[0].getMessage()
    clock.now += 60
    drops.dropped(5)
    assert len(caplog.records) == 2
    assert "104 dropped since the last report" in caplog.records[1].getMessage()
    assert caplog.records[1].threaddispatch_dropped == 104  # type: ignore[attr-defined]


def test_recovers_at_the_first_delivery_without_a_drop(log: tuple[DropLog, Clock, pytest.LogCaptureFixture]) -> None:
    drops, _, caplog = log
    drops.delivered()  # nothing dropped: nothing said
    assert caplog.records == []
    drops.dropped(3)
    drops.delivered()  # drops since the previous delivery: still dropping
    assert drops.dropping
    drops.dropped(2)
    drops.delivered()
    assert drops.dropping
    drops.delivered()
    assert not drops.dropping
    info = caplog.records[-1]
    assert info.levelno == logging.INFO
    assert "recovered" in info.getMessage() and "5 dropped in all" in info.getMessage()
    drops.dropped()  # a new episode warns again at once
    assert caplog.records[-1].levelno == logging.WARNING
    assert "1 dropped;" in caplog.records[-1].getMessage()


def test_zero_count_is_not_a_drop(log: tuple[DropLog, Clock, pytest.LogCaptureFixture]) -> None:
    drops, _, caplog = log
    drops.dropped(0)
    assert caplog.records == [] and not drops.dropping
