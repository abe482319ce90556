"""Drop logs on every face built on the engine: one WARNING when drops begin, at most one per interval
after (with the count), one INFO at recovery; the lines carry ``extra`` fields for JSON logs.

BackgroundDispatcher (a per-lane bound, drop_newest / drop_oldest) and EndpointBatchDispatcher
(``max_pending_jobs``) drop; BatchedDispatcher's engine is unbounded and AsyncDispatcher blocks,
so neither drops, and the engine itself is tested for the mechanism they would share.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import pytest

from threaddispatch import BackgroundDispatcher, _drop_log
from threaddispatch._engine import BatchEngine
from threaddispatch._log_json import JsonFormatter
from threaddispatch.endpoint import DispatchJob, EndpointBatchDispatcher
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)


class Gate:
    """A send that holds every call until released; ``entered`` is set once a call is inside."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.sent: list[Any] = []
        self.lock = threading.Lock()  # guards sent

    def __call__(self, *args: Any) -> None:
        self.entered.set()
        assert self.release.wait(30), "the test never released the send"
        with self.lock:
            self.sent.extend(args[-1])


def lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "dropping" in r.getMessage() or "recovered" in r.getMessage()]


def assert_recovered(logs: pytest.LogCaptureFixture, face: str, dropped: int) -> None:
    """The drop lines are the first WARNING and then one INFO: ``face`` recovered after ``dropped`` drops."""
    warning, info = lines(logs)
    assert (warning.levelno, info.levelno) == (logging.WARNING, logging.INFO)
    assert f"{face} recovered" in info.getMessage()
    assert f"{dropped} dropped in all" in info.getMessage()
    assert info.threaddispatch_dropped == dropped  # type: ignore[attr-defined]


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="threaddispatch")
    return caplog


def background_with_drops(overflow: Any) -> tuple[BackgroundDispatcher[int], Gate]:
    """A dispatcher whose first batch is inside send and whose lane is full: the next enqueue drops."""
    gate = Gate()
    dispatcher: BackgroundDispatcher[int] = BackgroundDispatcher(
        gate, 60_000, max_batch_size=2, max_queue_size=2, overflow=overflow, name="audit"
    )
    dispatcher.enqueue(1)
    dispatcher.enqueue(2)  # a full batch: taken at once
    assert gate.entered.wait(10)
    dispatcher.enqueue(3)
    dispatcher.enqueue(4)
    return dispatcher, gate


@pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest"])
def test_background_warns_once_then_informs_at_recovery(overflow: str, logs: pytest.LogCaptureFixture) -> None:
    dispatcher, gate = background_with_drops(overflow)
    try:
        for entry in range(5, 10):
            dispatcher.enqueue(entry)
        assert dispatcher.stats()["dropped"] == 5
        (warning,) = lines(logs)
        assert warning.levelno == logging.WARNING
        message = warning.getMessage()
        assert "BackgroundDispatcher 'audit' is dropping entries" in message
        assert f"overflow={overflow!r}, max_queue_size=2" in message
        assert warning.threaddispatch_dropped == 1  # type: ignore[attr-defined]
        gate.release.set()
        # The batch in flight during the drops settles (still dropping), then the queued one,
        # with no drop since: recovered.
        assert dispatcher.flush(10)
        assert_recovered(logs, "BackgroundDispatcher 'audit'", 5)
    finally:
        gate.release.set()
        dispatcher.close(10)


def test_background_warns_again_after_the_interval_with_the_count(
    monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_drop_log, "INTERVAL", 0.0)  # every drop is past the interval
    dispatcher, gate = background_with_drops("drop_newest")
    try:
        dispatcher.enqueue(5)
        dispatcher.enqueue(6)
        first, second = lines(logs)
        assert "is dropping entries" in first.getMessage()
        assert "is still dropping entries: 1 dropped since the last report" in second.getMessage().replace(
            " (overflow='drop_newest', max_queue_size=2)", ""
        )
        assert {r.levelno for r in (first, second)} == {logging.WARNING}
    finally:
        gate.release.set()
        dispatcher.close(10)


def test_the_drop_lines_carry_extra_fields_for_json_logs(logs: pytest.LogCaptureFixture) -> None:
    dispatcher, gate = background_with_drops("drop_newest")
    try:
        dispatcher.enqueue(5)
        (warning,) = lines(logs)
        record = json.loads(JsonFormatter().format(warning))
        assert record["threaddispatch_face"] == "BackgroundDispatcher 'audit'"
        assert record["threaddispatch_dropped"] == 1
        assert record["level"] == "WARNING"
    finally:
        gate.release.set()
        dispatcher.close(10)


def endpoint_full(overflow: Any) -> tuple[EndpointBatchDispatcher, Gate]:
    """A dispatcher at its max_pending_jobs bound (2): one job in flight, one queued."""
    gate = Gate()
    dispatcher = EndpointBatchDispatcher(
        gate,
        max_batch_size=1,
        batch_timeout=60.0,
        max_concurrent_batches=1,
        max_pending_jobs=2,
        overflow=overflow,
        name="hooks",
    )
    dispatcher.add_job(DispatchJob("a", 1))
    assert gate.entered.wait(10)
    dispatcher.add_job(DispatchJob("a", 2))
    return dispatcher, gate


@pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest"])
def test_endpoint_warns_once_then_informs_at_recovery(overflow: str, logs: pytest.LogCaptureFixture) -> None:
    dispatcher, gate = endpoint_full(overflow)
    try:
        for payload in range(3, 7):
            dispatcher.add_job(DispatchJob("a", payload))
        assert dispatcher.total_dropped == 4
        (warning,) = lines(logs)
        assert warning.levelno == logging.WARNING
        assert "EndpointBatchDispatcher 'hooks' is dropping entries" in warning.getMessage()
        assert f"overflow={overflow!r}, max_pending_jobs=2" in warning.getMessage()
        gate.release.set()
        # The batch in flight during the drops settles (still dropping), then the queued one,
        # with no drop since: recovered.
        wait_for(lambda: len(lines(logs)) == 2, timeout=10)
        assert_recovered(logs, "EndpointBatchDispatcher 'hooks'", 4)
    finally:
        gate.release.set()
        dispatcher.shutdown(10)


def test_endpoint_warns_again_after_the_interval(
    monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_drop_log, "INTERVAL", 0.0)
    dispatcher, gate = endpoint_full("drop_newest")
    try:
        dispatcher.add_job(DispatchJob("a", 3))
        dispatcher.add_job(DispatchJob("a", 4))
        first, second = lines(logs)
        assert "is dropping entries" in first.getMessage()
        assert "1 dropped since the last report" in second.getMessage()
    finally:
        gate.release.set()
        dispatcher.shutdown(10)


def test_the_engine_logs_its_drops_and_its_recovery(logs: pytest.LogCaptureFixture) -> None:
    gate = Gate()
    engine: BatchEngine[int] = BatchEngine(
        gate, name="plain", window=60.0, max_batch_size=10, max_queue_size=1, overflow="drop_newest"
    )
    try:
        assert engine.put(1, "k")  # a full lane (the bound is the batch size): taken at once
        assert gate.entered.wait(10)
        assert engine.put(2, "k")
        assert not engine.put(3, "k")
        assert not engine.put(4, "k")
        (warning,) = lines(logs)
        assert "dispatcher 'plain' is dropping entries (overflow='drop_newest', max_queue_size=1)" in (
            warning.getMessage()
        )
        gate.release.set()
        assert engine.flush(10)
        assert_recovered(logs, "dispatcher 'plain'", 2)
    finally:
        gate.release.set()
        engine.close(10)


def test_no_drop_no_line(logs: pytest.LogCaptureFixture) -> None:
    sent: list[Any] = []
    dispatcher: BackgroundDispatcher[int] = BackgroundDispatcher(sent.extend, 60_000, max_queue_size=100)
    try:
        for entry in range(50):
            dispatcher.enqueue(entry)
        assert dispatcher.flush(10)
        assert lines(logs) == []
    finally:
        dispatcher.close(10)
