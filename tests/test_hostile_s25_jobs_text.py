"""Hostile tests of JobEngine with text no store can hold, and a fetcher facing an unexpected error.

A lone surrogate (``"\\ud800"``; Python makes them from undecodable bytes with
``surrogateescape``: ``os.fsdecode``, ``sys.argv``, environment variables) is a valid
``str`` that UTF-8 cannot encode, so SQLite and PostgreSQL cannot store it. The promises
attacked: bad input is refused at the call with ConfigurationError, the same for every
store (README, "Bad input"); a failed attempt is recorded with its error, never left
running (``_job_outcomes.error_text`` spells NUL out for that reason); and the fetcher
keeps claiming whatever one claim raised.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import STORE_FACTORIES

from threaddispatch import JobEngine
from threaddispatch.errors import ConfigurationError
from threaddispatch.jobs import JobContext
from threaddispatch.stores import JobState, MemoryStore, Store
from threaddispatch.testing import wait_for

SURROGATE = "bad \ud800 text"  # a str UTF-8 cannot encode
STRANDED = "its failure was not stored"  # the engine's log line when a failure could not be written

# Every store kind (the PostgreSQL one marked for the session's server).
KINDS = [
    pytest.param(kind, marks=[pytest.mark.postgres] if kind == "postgresql" else [], id=kind)
    for kind in sorted(STORE_FACTORIES)
]


@pytest.fixture
def kind_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A store of the kind ``request.param`` names (the PostgreSQL one on the session's server)."""
    kind: str = request.param
    url = {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path / 'jobs.db'}"}.get(kind)
    if url is None:
        url = request.getfixturevalue("pg_url")
    store = STORE_FACTORIES[kind](url)
    yield store
    store.close()


class _Lines(logging.Handler):
    """Keeps the messages of the records it gets; sets ``stranded`` on the engine's "not stored" line."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self.stranded = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.messages.append(message)
        if STRANDED in message:
            self.stranded.set()


@pytest.fixture
def engine_logger() -> Iterator[tuple[logging.Logger, _Lines]]:
    """A logger of the test's own for the engine, and the handler that watches it."""
    logger = logging.getLogger(f"hostile_s25.jobs_text.{id(object())}")
    logger.propagate = False
    lines = _Lines()
    logger.addHandler(lines)
    yield logger, lines
    logger.removeHandler(lines)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "kind_store",
    KINDS,
    indirect=True,
)  # fmt: skip
def test_an_error_message_with_a_lone_surrogate_is_stored_as_the_jobs_failure(
    kind_store: Store, engine_logger: tuple[logging.Logger, _Lines]
) -> None:
    """A handler raising ``ValueError(os.fsdecode(b"\\xff"))``-like text fails its job, with that error, at once."""
    logger, lines = engine_logger
    engine = JobEngine(kind_store, logger=logger, poll_interval=0.02, max_poll_interval=0.05)

    @engine.job("decode", max_retries=0)
    def decode(_ctx: JobContext, _payload: object) -> None:
        raise ValueError(f"cannot read {SURROGATE!s}")

    engine.start()
    try:
        job_id = engine.enqueue("decode")

        # Either outcome is a state change to wait on: the job ends, or the engine says it could not record it.
        def ended() -> bool:  # one read: a pending record then a running one would pass two reads
            seen = engine.get_job(job_id)
            return (seen.state is not JobState.RUNNING and seen.attempts > 0) or lines.stranded.is_set()

        wait_for(ended, timeout=20)
        job = engine.get_job(job_id)
        assert not lines.stranded.is_set(), lines.messages
        assert job.state is JobState.FAILED
        assert job.error is not None and "ValueError: cannot read bad" in job.error
        assert engine.dlq_count() == 1
    finally:
        assert engine.stop(10)


def _register_name(engine: JobEngine) -> object:
    return engine.register(SURROGATE, lambda _ctx, _payload: None)


def _register_queue(engine: JobEngine) -> object:
    return engine.register("other", lambda _ctx, _payload: None, queue=SURROGATE)


def _enqueue_queue(engine: JobEngine) -> object:
    return engine.enqueue("noop", queue=SURROGATE)


def _enqueue_unique_key(engine: JobEngine) -> object:
    return engine.enqueue("noop", unique_key=SURROGATE)


def _enqueue_lock(engine: JobEngine) -> object:
    return engine.enqueue("noop", lock=SURROGATE)


def _cron_name(engine: JobEngine) -> object:
    return engine.cron("@hourly", "noop", name=SURROGATE)


def _pause_queue(engine: JobEngine) -> object:
    engine.pause_queue(SURROGATE)
    return None


CALLS: dict[str, Callable[[JobEngine], object]] = {
    "register-name": _register_name,
    "register-queue": _register_queue,
    "enqueue-queue": _enqueue_queue,
    "enqueue-unique_key": _enqueue_unique_key,
    "enqueue-lock": _enqueue_lock,
    "cron-name": _cron_name,
    "pause_queue": _pause_queue,
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize(
    "kind_store",
    KINDS,
    indirect=True,
)  # fmt: skip
def test_a_lone_surrogate_in_a_name_is_refused_at_the_call_on_every_store(kind_store: Store, call: str) -> None:
    """The same ConfigurationError, naming the bad value, whichever store (as the admin API already does)."""
    engine = JobEngine(kind_store)
    engine.register("noop", lambda _ctx, _payload: None)
    with pytest.raises(ConfigurationError, match=r"surrogate|UTF-8|Unicode"):
        CALLS[call](engine)


@pytest.mark.timeout(30)
def test_start_with_a_queue_name_no_store_can_hold_is_refused_at_the_call(tmp_path: Path) -> None:
    engine = JobEngine(STORE_FACTORIES["sqlite"](f"sqlite:///{tmp_path / 'jobs.db'}"), poll_interval=0.02)
    died: list[str] = []
    previous_hook = threading.excepthook
    threading.excepthook = lambda args: died.append(f"{args.thread.name if args.thread else '?'}: {args.exc_value!r}")
    try:
        with pytest.raises(ConfigurationError, match="queue"):
            engine.start(queues=[SURROGATE])
    finally:
        engine.stop(10)
        threading.excepthook = previous_hook
        engine.store.close()
    assert died == []


class _ClaimFailsOnce(MemoryStore):
    """A MemoryStore whose first claim raises an error that is not a StoreError (a store bug, a codec error)."""

    def __init__(self) -> None:
        super().__init__()
        self.claim_failed = threading.Event()

    def claim(self, *args: Any, **kwargs: Any) -> Any:
        if not self.claim_failed.is_set():
            self.claim_failed.set()
            raise RuntimeError("one claim broke")
        return super().claim(*args, **kwargs)


@pytest.mark.timeout(30)
def test_the_fetcher_keeps_claiming_after_one_claim_raised_an_unexpected_error() -> None:
    store = _ClaimFailsOnce()
    engine = JobEngine(store, poll_interval=0.02, max_poll_interval=0.05)
    engine.register("answer", lambda _ctx, _payload: 42)
    died: list[str] = []
    previous_hook = threading.excepthook
    threading.excepthook = lambda args: died.append(f"{args.thread.name if args.thread else '?'}: {args.exc_value!r}")
    try:
        engine.start()
        assert store.claim_failed.wait(10)
        job_id = engine.enqueue("answer")
        assert engine.result(job_id, timeout=10) == 42
        assert died == []
    finally:
        engine.stop(10)
        threading.excepthook = previous_hook
