"""One small adapter per face, so each lifecycle and contract test is written once (tests/test_face_contract.py).

An adapter makes its face around a per-item user function ``work(item)``, gives it string
items, records what was delivered (``work`` returned) and what failed for good (through the
face's own failure path: on_error, error_handler, a Future, an event, a job hook), stops it
with a timeout and reads its stats. Every face sends one item per call (batches of one),
so a failure of one item is the failure of one call.

``work`` is wrapped in the face's native callable; with ``asynchronous=True`` that callable
is an ``async def`` that awaits before calling ``work``, so the item is recorded only if the
coroutine was really awaited to its end (and the event loop it ran on is recorded).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, ClassVar

from threaddispatch import (
    AsyncDispatcher,
    BackgroundDispatcher,
    BatchedDispatcher,
    EndpointBatchDispatcher,
)
from threaddispatch.background import FailedBatch
from threaddispatch.backoff import Constant, RetryPolicy
from threaddispatch.endpoint import DispatchJob
from threaddispatch.jobs import JobContext, JobEngine
from threaddispatch.logging import BatchingHandler
from threaddispatch.requests import RequestDispatcher
from threaddispatch.stores import MemoryStore
from threaddispatch.testing import wait_for

Work = Callable[[str], object]


class Face:
    """What every adapter offers; subclasses build the face in :meth:`_build`.

    ``retries``: the face takes a retry policy (Retry/Cancel apply). ``call_timeout``: it
    takes a per-call timeout (the keyword in ``timeout_keyword``). ``refuses_after_stop``:
    work given after stop raises DispatcherClosedError. ``drains_queued``: stop sends work
    still queued (JobEngine hands queued jobs back to the store instead).
    ``collected_running``: a running face nobody references is collected (a started
    JobEngine is held by its threads until stopped). ``reports_to_a_callback``: failures reach
    a user callback (not only a Future). ``senders``: how many calls the face runs at once.
    ``immediate``: ``threaddispatch.testing.immediate()`` runs its work on the caller's thread.
    """

    name: ClassVar[str]
    retries: ClassVar[bool] = True
    call_timeout: ClassVar[bool] = False
    refuses_after_stop: ClassVar[bool] = True
    drains_queued: ClassVar[bool] = True
    collected_running: ClassVar[bool] = True
    reports_to_a_callback: ClassVar[bool] = True
    senders: ClassVar[int] = 1
    immediate: ClassVar[bool] = True

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards delivered, failures, loops
        self.delivered: list[str] = []
        self.failures: dict[str, BaseException | str] = {}
        self.loops: set[int] = set()  # ids of the event loops an async callable ran on
        self.face: Any = None

    # -- building ---------------------------------------------------------------------------

    def make(
        self,
        work: Work,
        *,
        asynchronous: bool = False,
        attempts: int = 1,
        backoff: float = 60.0,
        timeout: float | None = None,
        async_reports: bool = False,
    ) -> Face:
        """Build the face around ``work``: ``attempts`` tries per item, ``backoff`` seconds apart.

        ``work`` may be an ``async def`` itself. With ``async_reports``, the face's failure
        callback (on_error, error_handler, event listener, job hook) is an ``async def``.
        """
        self.attempts = attempts
        self.backoff = backoff
        self.async_reports = async_reports
        self._build(self._wrap(work, asynchronous), timeout)
        return self

    def _wrap(self, work: Work, asynchronous: bool) -> Callable[[str], Any]:
        """The per-item callable the face's native callable runs: records a delivery after ``work`` returns."""

        def deliver(item: str) -> None:
            work(item)
            with self.lock:
                self.delivered.append(item)

        if asyncio.iscoroutinefunction(work):

            async def deliver_awaited(item: str) -> None:
                await work(item)
                with self.lock:
                    self.loops.add(id(asyncio.get_running_loop()))
                    self.delivered.append(item)

            return deliver_awaited
        if not asynchronous:
            return deliver

        async def deliver_async(item: str) -> None:
            await asyncio.sleep(0)  # only an awaited coroutine gets past here
            with self.lock:
                self.loops.add(id(asyncio.get_running_loop()))
            deliver(item)

        return deliver_async

    def _build(self, one: Callable[[str], Any], timeout: float | None) -> None:
        raise NotImplementedError

    def policy(self) -> RetryPolicy:
        return RetryPolicy(max_attempts=self.attempts, backoff=Constant(self.backoff))

    def failed(self, item: str, error: BaseException | str | None) -> None:
        with self.lock:
            self.failures[item] = "" if error is None else error

    def failed_batch(self, failed: FailedBatch[Any], item_of: Callable[[Any], str] = str) -> None:
        for entry in failed.entries:
            self.failed(item_of(entry), failed.error)

    def reporter(self, report: Callable[[Any], None]) -> Callable[[Any], Any]:
        """``report`` as the face's failure callback: an ``async def`` one with ``make(async_reports=True)``."""
        if not self.async_reports:
            return report

        async def report_async(argument: Any) -> None:
            await asyncio.sleep(0)  # only an awaited callback gets past here
            report(argument)

        return report_async

    # -- using ------------------------------------------------------------------------------

    def give(self, item: str) -> None:
        raise NotImplementedError

    def stop(self, timeout: float) -> bool:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        return dict(self.face.stats())

    def in_forked_child(self) -> None:
        """What a forked child does before using the face (JobEngine's child starts its engine itself)."""

    def wait_delivered(self, *items: str, timeout: float = 10.0) -> None:
        wait_for(lambda: set(items) <= set(self.delivered), timeout, message=f"{self.name}: {items} delivered")

    def wait_failed(self, item: str, timeout: float = 10.0) -> BaseException | str:
        wait_for(lambda: item in self.failures, timeout, message=f"{self.name}: {item!r} reported failed")
        return self.failures[item]

    def drop(self) -> weakref.ref[Any]:
        """Forget the face (every reference this adapter holds) and return a weak reference to it."""
        ref = weakref.ref(self.face)
        self.face = None
        gc.collect()
        return ref


def described(error: BaseException | str) -> str:
    """An error as the face reported it: its class name and message (JobEngine stores text)."""
    return error if isinstance(error, str) else f"{type(error).__name__}: {error}"


class Background(Face):
    name = "background"
    call_timeout = True

    def _build(self, one: Callable[[str], Any], timeout: float | None) -> None:
        options: dict[str, Any] = {} if timeout is None else {"send_timeout": timeout}
        self.face = BackgroundDispatcher(
            _batch_of(one),
            ms_delay=1,
            max_batch_size=1,
            on_error=self.reporter(self.failed_batch),
            retry=self.policy(),
            **options,
        )

    def give(self, item: str) -> None:
        self.face.enqueue(item)

    def stop(self, timeout: float) -> bool:
        return bool(self.face.close(timeout))


class Logging(Face):
    """BatchingHandler: a log record's message is the item; emit never raises, so after stop it is dropped."""

    name = "logging"
    refuses_after_stop = False

    def _build(self, one: Callable[[str], Any], timeout: float | None) -> None:
        assert timeout is None
        records = _batch_of(one)

        def send_records(batch: list[logging.LogRecord]) -> object:
            return records([record.getMessage() for record in batch])

        self.face = BatchingHandler(
            send_records,
            ms_delay=1,
            max_batch_size=1,
            retry=self.policy(),
            on_error=self.reporter(lambda failed: self.failed_batch(failed, logging.LogRecord.getMessage)),
        )

    def give(self, item: str) -> None:
        self.face.emit(logging.LogRecord("contract", logging.INFO, __file__, 1, item, None, None))

    def stop(self, timeout: float) -> bool:
        self.face.close(timeout)
        return bool(self.face.dispatcher.stats()["pending"] == 0 and not self._in_flight())

    def _in_flight(self) -> bool:
        stats = self.face.dispatcher.stats()
        return bool(stats["enqueued"] != stats["sent"] + stats["failed"] + stats["dropped"])

    def stats(self) -> dict[str, Any]:
        return dict(self.face.dispatcher.stats())


class Endpoint(Face):
    name = "endpoint"
    senders = 10  # max_concurrent_batches' default
    call_timeout = True

    def _build(self, one: Callable[[str], Any], timeout: float | None) -> None:
        options: dict[str, Any] = {} if timeout is None else {"send_timeout": timeout}

        if asyncio.iscoroutinefunction(one):

            async def send_batch(_endpoint_id: object, jobs: list[DispatchJob]) -> None:
                for job in jobs:
                    await one(job.payload)

        else:

            def send_batch(_endpoint_id: object, jobs: list[DispatchJob]) -> None:  # type: ignore[misc]
                for job in jobs:
                    one(job.payload)

        self.face = EndpointBatchDispatcher(
            send_batch, max_batch_size=1, batch_timeout=0.001, retry=self.policy(), **options
        )
        self.face.on("job_exhausted", self.reporter(lambda event: self.failed(event["job"].payload, event["error"])))

    def give(self, item: str) -> None:
        self.face.add_job(DispatchJob("endpoint", item))

    def stop(self, timeout: float) -> bool:
        return bool(self.face.shutdown(timeout))


class _Target:
    """AsyncDispatcher's dispatcher: ``dispatch(message, target)`` runs the per-item callable."""

    def __init__(self, one: Callable[[str], Any]) -> None:
        self.dispatch = _dispatch_of(one)


def _dispatch_of(one: Callable[[str], Any]) -> Callable[..., Any]:
    if asyncio.iscoroutinefunction(one):

        async def dispatch_async(message: str, _target: str, **_options: object) -> None:
            await one(message)

        return dispatch_async

    def dispatch(message: str, _target: str, **_options: object) -> None:
        one(message)

    return dispatch


class Async(Face):
    name = "async"
    call_timeout = True

    def _build(self, one: Callable[[str], Any], timeout: float | None) -> None:
        options: dict[str, Any] = {} if timeout is None else {"dispatch_timeout": timeout}
        self.face = AsyncDispatcher(
            _Target(one),
            "contract",
            self.reporter(lambda failed: self.failed(failed.message, failed.error)),
            retry=self.policy(),
            **options,
        )
        self.sender = self.face.setup(1000)
        self.face.start()

    def give(self, item: str) -> None:
        self.sender.put(item, timeout=5)

    def stop(self, timeout: float) -> bool:
        return bool(self.face.stop(timeout))

    def drop(self) -> weakref.ref[Any]:
        self.sender = None
        return super().drop()


class Batched(Face):
    """BatchedDispatcher: a message's Future is its failure path; it does not retry."""

    name = "batched"
    retries = False
    reports_to_a_callback = False
    senders = 4  # max_concurrent_sends' default
    call_timeout = True

    def _build(self, one: Callable[[str], Any], timeout: float | None) -> None:
        options: dict[str, Any] = {} if timeout is None else {"send_timeout": timeout}
        if asyncio.iscoroutinefunction(one):

            async def send_batch(_target: str, messages: list[str]) -> list[None]:
                for message in messages:
                    await one(message)
                return [None] * len(messages)

        else:

            def send_batch(_target: str, messages: list[str]) -> list[None]:  # type: ignore[misc]
                for message in messages:
                    one(message)
                return [None] * len(messages)

        self.face = BatchedDispatcher(send_batch, max_batch_size=1, flush_interval=0.001, **options)

    def give(self, item: str) -> None:
        future: Future[str | None] = self.face.submit(item, "contract")
        future.add_done_callback(lambda done: self._settled(item, done))

    def _settled(self, item: str, future: Future[str | None]) -> None:
        error = future.exception() if not future.cancelled() else "cancelled"
        if error is not None:
            self.failed(item, error)

    def stop(self, timeout: float) -> bool:
        return bool(self.face.close(timeout))


class Requests(Face):
    """RequestDispatcher: ``add(retry=attempts - 1, retry_time=backoff)``; the handle's Future is the failure path."""

    name = "requests"
    reports_to_a_callback = False
    senders = 4
    immediate = False  # not a batching face

    def _build(self, one: Callable[[str], Any], timeout: float | None) -> None:
        assert timeout is None
        if asyncio.iscoroutinefunction(one):

            async def send_async(request: str, _token: object) -> str:
                await one(request)
                return request

            self.face = RequestDispatcher(send_async, max_workers=4)
        else:

            def send(request: str, _token: object) -> str:
                one(request)
                return request

            self.face = RequestDispatcher(send, max_workers=4)

    def give(self, item: str) -> None:
        handle = self.face.add(item, retry=self.attempts - 1, retry_time=self.backoff)
        handle.future.add_done_callback(lambda done: self._settled(item, done))

    def _settled(self, item: str, future: Future[Any]) -> None:
        error = future.exception() if not future.cancelled() else "cancelled"
        if error is not None:
            self.failed(item, error)

    def stop(self, timeout: float) -> bool:
        return bool(self.face.close(timeout))

    def stats(self) -> dict[str, Any]:
        return {}


class _JobHooks:
    """A JobEngine extension reporting a job that failed for good, or was cancelled, to the adapter."""

    def __init__(self, face: Jobs) -> None:
        self.face = face

    def on_job_failed(self, job: Any, error: BaseException | str | None) -> None:
        self.face.failed(json.loads(job.payload), error if error is not None else (job.error or ""))

    def on_job_cancelled(self, job: Any, error: BaseException | str | None) -> None:
        self.face.failed(json.loads(job.payload), error if error is not None else (job.error or "cancelled"))


class _AsyncJobHooks(_JobHooks):
    """The same hooks as ``async def`` methods (awaited by the engine)."""

    async def on_job_failed(self, job: Any, error: BaseException | str | None) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        super().on_job_failed(job, error)

    async def on_job_cancelled(self, job: Any, error: BaseException | str | None) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        super().on_job_cancelled(job, error)


class Jobs(Face):
    """JobEngine on a MemoryStore: jobs enqueued after stop wait in the store, and stop hands queued jobs back.

    Its timeout is the job's (``register(timeout=)``): an attempt past it fails, and the hung
    handler keeps its worker thread (the engine has 4) until it returns.
    """

    name = "jobs"
    refuses_after_stop = False
    drains_queued = False
    collected_running = False
    senders = 4
    immediate = False  # JobEngine(immediate=True) is its own switch (tests/test_jobs_immediate.py)

    def _build(self, one: Callable[[str], Any], timeout: float | None) -> None:
        self.face = JobEngine(
            MemoryStore(),
            concurrency=4,
            poll_interval=0.01,
            max_poll_interval=0.05,
            heartbeat_interval=0.05,
            stale_job_threshold=30.0,
            extensions=[(_AsyncJobHooks if self.async_reports else _JobHooks)(self)],
        )
        if asyncio.iscoroutinefunction(one):

            async def handler_async(_ctx: JobContext, payload: str) -> None:
                await one(payload)

            handler: Callable[..., Any] = handler_async
        else:

            def handler(_ctx: JobContext, payload: str) -> None:
                one(payload)

        self.face.register(
            "work", handler, max_retries=self.attempts - 1, timeout=timeout, backoff=Constant(self.backoff)
        )
        self.face.start()

    def give(self, item: str) -> None:
        self.face.enqueue("work", item)

    def in_forked_child(self) -> None:
        assert not self.face.running  # a child's engine is left stopped
        self.face.start()

    def stop(self, timeout: float) -> bool:
        return bool(self.face.stop(timeout))


def _batch_of(one: Callable[[str], Any]) -> Callable[[list[str]], Any]:
    """A ``send_batch(entries)`` running the per-item callable on each entry (async when it is)."""
    if asyncio.iscoroutinefunction(one):

        async def send_async(entries: list[str]) -> None:
            for entry in entries:
                await one(entry)

        return send_async

    def send(entries: list[str]) -> None:
        for entry in entries:
            one(entry)

    return send


FACES: dict[str, type[Face]] = {
    face.name: face for face in (Background, Logging, Endpoint, Async, Batched, Requests, Jobs)
}
