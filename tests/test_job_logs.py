"""The JobEngine worker's per-job log lines (issue 16, "Logs"), and JsonFormatter.

Each line is at its level, carries the job's id, name, queue and attempt as ``extra``
fields (record attributes) and in its text; a deliberate ``Cancel`` has no traceback; the
final failure keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from threaddispatch._log_json import JsonFormatter
from threaddispatch.backoff import Constant
from threaddispatch.errors import Cancel, Retry
from threaddispatch.jobs import JobContext, JobEngine
from threaddispatch.stores import MemoryStore, SQLiteStore
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)

FIELDS = ("job_id", "job_name", "queue", "attempt", "outcome")


class Collect(logging.Handler):
    """Keeps every record handed to it (thread-safe: ``emit`` runs under the handler's lock)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def outcomes(self, job_id: str) -> list[tuple[str, int, int]]:
        """(outcome, level, attempt) of the per-job lines of ``job_id``, in order."""
        return [
            (r.outcome, r.levelno, r.attempt)  # type: ignore[attr-defined]
            for r in list(self.records)
            if getattr(r, "job_id", None) == job_id and r.levelno >= logging.INFO
        ]

    def one(self, job_id: str, outcome: str) -> logging.LogRecord:
        """The one line at INFO or above of ``job_id`` with ``outcome``."""
        [record] = [
            r
            for r in list(self.records)
            if getattr(r, "job_id", None) == job_id and r.outcome == outcome and r.levelno >= logging.INFO  # type: ignore[attr-defined]
        ]
        return record


@pytest.fixture
def collect() -> Iterator[tuple[logging.Logger, Collect]]:
    """A logger of its own (DEBUG, not propagating) with a collecting handler."""
    logger = logging.getLogger(f"test.job_logs.{uuid.uuid4().hex}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    handler = Collect()
    logger.addHandler(handler)
    yield logger, handler
    logger.removeHandler(handler)


def immediate(logger: logging.Logger) -> JobEngine:
    return JobEngine(MemoryStore(), immediate=True, logger=logger, backoff=Constant(3600.0))


def raising(error: Exception, *, attempts: int | None = None) -> Callable[[JobContext, object], str]:
    """A handler raising ``error`` on every attempt, or on the first ``attempts`` (then returning "ok")."""

    def handler(ctx: JobContext, payload: object) -> str:
        if attempts is None or ctx.attempt <= attempts:
            raise error
        return "ok"

    return handler


def assert_fields(record: logging.LogRecord, job_id: str, name: str, attempt: int, queue: str = "default") -> None:
    assert {k: getattr(record, k) for k in FIELDS[:4]} == {
        "job_id": job_id,
        "job_name": name,
        "queue": queue,
        "attempt": attempt,
    }
    # For plain formatters the text carries them too.
    assert f"job {name} {job_id} (queue {queue}, attempt {attempt})" in record.getMessage()


def test_a_success_logs_started_and_done_at_info(collect: tuple[logging.Logger, Collect]) -> None:
    logger, handler = collect
    engine = immediate(logger)
    engine.register("add", lambda ctx, payload: payload["a"] + 1, queue="maths")
    job_id = engine.enqueue("add", {"a": 1})
    assert handler.outcomes(job_id) == [("started", logging.INFO, 1), ("done", logging.INFO, 1)]
    done = handler.one(job_id, "done")
    assert_fields(done, job_id, "add", 1, queue="maths")
    assert " done in " in done.getMessage() and done.getMessage().endswith((" ms", " s"))
    assert done.duration_ms >= 0  # type: ignore[attr-defined]
    assert done.exc_info is None
    assert_fields(handler.one(job_id, "started"), job_id, "add", 1, queue="maths")


def test_a_retried_failure_is_one_warning_with_the_summary_and_its_traceback_at_debug(
    collect: tuple[logging.Logger, Collect],
) -> None:
    logger, handler = collect
    engine = immediate(logger)
    engine.register("flaky", raising(ValueError("first try fails\nsecond line"), attempts=1), max_retries=3)
    job_id = engine.enqueue("flaky")
    assert handler.outcomes(job_id) == [
        ("started", logging.INFO, 1),
        ("retrying", logging.WARNING, 1),
        ("started", logging.INFO, 2),
        ("done", logging.INFO, 2),
    ]
    [warning, debug] = [r for r in handler.records if getattr(r, "outcome", None) == "retrying"]
    assert_fields(warning, job_id, "flaky", 1)
    message = warning.getMessage()
    assert "failed after" in message and "(ValueError: first try fails)" in message
    assert "retry in 0 s" in message  # immediate mode retries at once
    assert "second line" not in message and warning.exc_info is None
    assert warning.error == "ValueError: first try fails"  # type: ignore[attr-defined]
    assert debug.levelno == logging.DEBUG and debug.exc_info is not None
    assert debug.exc_info[0] is ValueError


def test_a_retry_asked_for_is_info_without_a_traceback(collect: tuple[logging.Logger, Collect]) -> None:
    logger, handler = collect
    engine = immediate(logger)
    engine.register("once_more", raising(Retry(reason="not yet"), attempts=1), max_retries=1)
    job_id = engine.enqueue("once_more")
    assert ("retrying", logging.INFO, 1) in handler.outcomes(job_id)
    retrying = [r for r in handler.records if getattr(r, "outcome", None) == "retrying"]
    assert len(retrying) == 1 and retrying[0].exc_info is None
    assert "asked for a retry" in retrying[0].getMessage() and "Retry: not yet" in retrying[0].getMessage()


def test_the_final_failure_is_dead_lettered_at_warning_with_its_traceback(
    collect: tuple[logging.Logger, Collect],
) -> None:
    logger, handler = collect
    engine = immediate(logger)

    def boom(ctx: JobContext, payload: object) -> None:
        raise RuntimeError(f"boom {ctx.attempt}")

    engine.register("boom", boom, max_retries=3)
    job_id = engine.enqueue("boom")
    outcomes = handler.outcomes(job_id)
    assert [o for o in outcomes if o[0] != "started"] == [
        ("retrying", logging.WARNING, 1),
        ("retrying", logging.WARNING, 2),
        ("retrying", logging.WARNING, 3),
        ("dead_lettered", logging.WARNING, 4),
    ]
    final = handler.one(job_id, "dead_lettered")
    assert_fields(final, job_id, "boom", 4)
    assert "failed after " in final.getMessage()
    assert "(RuntimeError: boom 4), dead-lettered after 4 attempts" in final.getMessage()
    assert final.exc_info is not None and final.exc_info[0] is RuntimeError
    assert "boom 4" in "".join(logging.Formatter().formatException(final.exc_info))
    assert engine.dlq_count() == 1


def test_a_job_without_retries_is_dead_lettered_after_one_attempt(collect: tuple[logging.Logger, Collect]) -> None:
    logger, handler = collect
    engine = immediate(logger)
    engine.register("broken", raising(KeyError("missing")), max_retries=0)
    job_id = engine.enqueue("broken")
    assert handler.outcomes(job_id) == [("started", logging.INFO, 1), ("dead_lettered", logging.WARNING, 1)]
    final = handler.one(job_id, "dead_lettered")
    assert "dead-lettered after 1 attempt" in final.getMessage() and final.exc_info is not None
    [letter] = engine.dlq()
    assert letter.job_id == job_id


def test_a_job_failed_for_good_because_recording_broke_is_logged_as_dead_lettered(
    collect: tuple[logging.Logger, Collect], monkeypatch: pytest.MonkeyPatch
) -> None:
    logger, handler = collect
    store = MemoryStore()
    engine = JobEngine(store, immediate=True, logger=logger, backoff=Constant(3600.0))

    def broken_retry_later(*args: object, **kwargs: object) -> bool:
        raise TypeError("a bug in the store")

    monkeypatch.setattr(store, "retry_later", broken_retry_later)
    engine.register("flaky", raising(ValueError("transient")), max_retries=3)
    job_id = engine.enqueue("flaky")
    final = handler.one(job_id, "dead_lettered")
    assert final.levelno == logging.WARNING and final.exc_info is not None and final.exc_info[0] is ValueError
    assert final.getMessage().endswith("failed (ValueError: transient), dead-lettered after 1 attempt")
    assert engine.dlq_count() == 1


def test_a_cancel_is_info_without_a_traceback(collect: tuple[logging.Logger, Collect]) -> None:
    logger, handler = collect
    engine = immediate(logger)
    engine.register("give_up", raising(Cancel("not needed")), max_retries=5)
    job_id = engine.enqueue("give_up")
    assert handler.outcomes(job_id) == [("started", logging.INFO, 1), ("cancelled", logging.INFO, 1)]
    cancelled = handler.one(job_id, "cancelled")
    assert_fields(cancelled, job_id, "give_up", 1)
    assert cancelled.getMessage().endswith("cancelled: Cancel: not needed")
    # No line of this job carries a traceback, at any level.
    assert all(r.exc_info is None for r in handler.records if getattr(r, "job_id", None) == job_id)
    assert [r for r in handler.records if r.levelno >= logging.WARNING] == []


def test_nothing_is_built_when_info_is_off(collect: tuple[logging.Logger, Collect]) -> None:
    logger, handler = collect
    logger.setLevel(logging.WARNING)
    engine = immediate(logger)
    engine.register("add", lambda ctx, payload: 1)
    engine.register("give_up", raising(Cancel("no")))
    engine.enqueue("add")
    engine.enqueue("give_up")
    assert handler.records == []


def test_a_running_worker_logs_each_line_with_its_retry_delay(
    collect: tuple[logging.Logger, Collect], tmp_path: Path
) -> None:
    logger, handler = collect
    engine = JobEngine(SQLiteStore(str(tmp_path / "jobs.db")), logger=logger, backoff=Constant(4.0))
    engine.register("fine", lambda ctx, payload: "ok")
    engine.register("fails", raising(OSError("disk full")), max_retries=1)
    engine.start(concurrency=2)
    try:
        fine = engine.enqueue("fine")
        failing = engine.enqueue("fails")
        wait_for(lambda: len(handler.outcomes(fine)) == 2, 30, message="started and done of 'fine'")
        wait_for(lambda: len(handler.outcomes(failing)) == 2, 30, message="started and retrying of 'fails'")
    finally:
        engine.stop(10)
    assert handler.outcomes(fine) == [("started", logging.INFO, 1), ("done", logging.INFO, 1)]
    assert handler.outcomes(failing) == [("started", logging.INFO, 1), ("retrying", logging.WARNING, 1)]
    retrying = handler.one(failing, "retrying")
    assert retrying.getMessage().endswith("(OSError: disk full), retry in 4 s")
    assert retrying.retry_in == 4.0  # type: ignore[attr-defined]
    assert (retrying.threadName or "").startswith("threaddispatch-")


def test_the_json_formatter_writes_one_object_a_line_with_the_fields(collect: tuple[logging.Logger, Collect]) -> None:
    logger, handler = collect
    engine = immediate(logger)
    engine.register("boom", raising(RuntimeError("kaput")), max_retries=0)
    job_id = engine.enqueue("boom")
    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in handler.records if getattr(r, "job_id", None) == job_id]
    assert all("\n" not in line for line in lines)
    started, final = (json.loads(line) for line in lines)
    assert started["level"] == "INFO" and started["outcome"] == "started"
    assert final["level"] == "WARNING" and final["logger"] == logger.name
    assert {k: final[k] for k in FIELDS} == {
        "job_id": job_id,
        "job_name": "boom",
        "queue": "default",
        "attempt": 1,
        "outcome": "dead_lettered",
    }
    assert final["message"].endswith("dead-lettered after 1 attempt")
    assert "Traceback" in final["exc_info"] and "RuntimeError: kaput" in final["exc_info"]
    assert final["time"].endswith("+00:00") and "T" in final["time"]
    assert final["process"] == os.getpid()  # worker processes of one supervisor are told apart
    assert "exc_info" not in started


def test_the_json_formatter_keeps_any_extra_and_strs_what_json_cannot_hold() -> None:
    record = logging.LogRecord("x.y", logging.ERROR, __file__, 1, "hello %s", ("there",), None)
    record.path = Path("/tmp/a")
    record.count = 3
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "hello there" and entry["level"] == "ERROR" and entry["logger"] == "x.y"
    assert entry["path"] == "/tmp/a" and entry["count"] == 3
    assert "args" not in entry and "msg" not in entry and "exc_info" not in entry
