"""Hostile tests of the one retry decision facing a ``retry_on`` or backoff that raises a BaseException.

The promises attacked (README, "How your functions are called"): ``RetryPolicy.next_delay``
"never raises"; a BaseException (``SystemExit``, ``KeyboardInterrupt``, ``GeneratorExit``)
raised in your code on a worker thread "fails that call like an error and never kills a
worker"; and nothing is lost silently: a failed batch reaches ``on_error`` (its ``submit()``
Futures fail), a failed job gets ``batch_failed``/``job_exhausted``. ``retry_on`` and the
backoff are user code, called by ``next_delay``.

``RetryPolicy._wants_retry`` and ``next_delay`` (threaddispatch/backoff.py) caught
``Exception`` only, so a BaseException from either escaped ``next_delay`` into the face.
BackgroundDispatcher: the batch was neither sent nor reported (no ``on_error``, ``failed``
stayed 0), its Future stayed pending for good and ``close()`` returned True.
EndpointBatchDispatcher: the job was left ``processing`` for good, with ``batch_started``
and no ``batch_failed``/``job_exhausted``; ``shutdown()`` returned True. Fixed in a4b1470
(``next_delay`` contains a BaseException); these tests failed before it. AsyncDispatcher
and RequestDispatcher (``retry_on_error``) reported the message/request already.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future

import pytest

from threaddispatch import (
    AsyncDispatcher,
    BackgroundDispatcher,
    DispatchJob,
    EndpointBatchDispatcher,
    FailedBatch,
    FailedMessage,
    RequestDispatcher,
    RetryPolicy,
)
from threaddispatch.testing import wait_for

BASES: list[type[BaseException]] = [KeyboardInterrupt, SystemExit, GeneratorExit]


def _raiser(kind: type[BaseException], called: threading.Event) -> Callable[..., bool]:
    def raise_it(*_args: object) -> bool:
        called.set()
        raise kind("from the retry policy")

    return raise_it


def _policy(where: str, kind: type[BaseException], called: threading.Event) -> RetryPolicy:
    if where == "retry_on":
        return RetryPolicy(max_attempts=3, retry_on=_raiser(kind, called))
    return RetryPolicy(max_attempts=3, backoff=_raiser(kind, called))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["retry_on", "backoff"])
@pytest.mark.parametrize("kind", BASES, ids=lambda k: k.__name__)
def test_background_batch_whose_retry_policy_raises_a_base_exception_is_reported(
    kind: type[BaseException], where: str
) -> None:
    """The failed batch reaches on_error and its Future fails; the next entry is still sent."""
    called = threading.Event()
    errors: list[FailedBatch[int]] = []
    sent: list[list[int]] = []

    def send(entries: list[int]) -> None:
        if entries == [1]:
            raise ValueError("the first batch fails")
        sent.append(list(entries))

    d = BackgroundDispatcher(send, ms_delay=5, retry=_policy(where, kind, called), on_error=errors.append)
    try:
        first = d.submit(1)
        assert called.wait(10)
        second = d.submit(2)
        assert second.result(timeout=10) is None  # batches go in order: the first one's handling is over
        assert sent == [[2]]
        assert first.done(), "the failed batch's Future never settles"
        assert isinstance(first.exception(timeout=0), ValueError)
        assert [e.entries for e in errors] == [[1]]
        assert d.stats()["failed"] == 1
    finally:
        d.close(10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("kind", "where"), [(KeyboardInterrupt, "retry_on"), (SystemExit, "backoff")])
def test_endpoint_job_whose_retry_policy_raises_a_base_exception_is_reported(
    kind: type[BaseException], where: str
) -> None:
    """The failed batch emits batch_failed and the job ends (exhausted), not left processing."""
    called = threading.Event()
    events: list[str] = []

    def send(endpoint_id: str, jobs: list[DispatchJob]) -> None:
        raise ValueError("every send fails")

    d = EndpointBatchDispatcher(send, batch_timeout=0.01, retry=_policy(where, kind, called))
    for event in ("batch_failed", "job_exhausted"):
        d.on(event, lambda _payload, event=event: events.append(event))
    try:
        job = DispatchJob("e", 1, max_attempts=3)
        d.add_job(job)
        assert called.wait(10)
        wait_for(lambda: "job_exhausted" in events, timeout=10, message="job_exhausted for the job")
        assert "batch_failed" in events
        assert job.status != "processing"
    finally:
        d.shutdown(10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["retry_on", "backoff"])
@pytest.mark.parametrize("kind", BASES, ids=lambda k: k.__name__)
def test_async_message_whose_retry_policy_raises_a_base_exception_is_reported(
    kind: type[BaseException], where: str
) -> None:
    """AsyncDispatcher: the message reaches error_handler with the dispatch's error; the next one goes."""
    called = threading.Event()
    failed: list[FailedMessage[int]] = []
    dispatched: list[int] = []

    class Dispatcher:
        def dispatch(self, message: int, target: str, *, delay_seconds: int | None = None) -> str:
            if message == 1:
                raise ValueError("the first message fails")
            dispatched.append(message)
            return "id"

    ad: AsyncDispatcher[int] = AsyncDispatcher(
        Dispatcher(), target_queue="q", error_handler=failed.append, retry=_policy(where, kind, called)
    )
    send = ad.setup(buffer_len=4)
    ad.start()
    try:
        send.put(1)
        send.put(2)
        wait_for(lambda: failed and dispatched, timeout=10, message="the failure reported and the next sent")
        assert called.is_set()
        assert [(f.message, type(f.error)) for f in failed] == [(1, ValueError)]
        assert dispatched == [2]
    finally:
        ad.stop(10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", BASES, ids=lambda k: k.__name__)
def test_request_whose_retry_on_error_raises_a_base_exception_fails_with_the_send_error(
    kind: type[BaseException],
) -> None:
    """RequestDispatcher: the request's Future fails with the send's error; the dispatcher goes on."""
    called = threading.Event()

    def send(request: dict[str, str], token: object) -> str:
        if request["endpoint"] == "/fails":
            raise ValueError("the send fails")
        return "ok"

    rd: RequestDispatcher[dict[str, str], str] = RequestDispatcher(send, retry_on_error=_raiser(kind, called))
    try:
        future: Future[str] = rd.add({"endpoint": "/fails"}, retry=2, retry_time=0.01).future
        assert isinstance(future.exception(timeout=10), ValueError)
        assert called.is_set()
        assert rd.add({"endpoint": "/works"}).future.result(timeout=10) == "ok"
    finally:
        rd.close(10)
