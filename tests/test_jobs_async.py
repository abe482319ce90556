"""JobEngine runs async user code: handlers, middleware hooks and wraps, extension hooks; timeouts cancel the task."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from threaddispatch.backoff import Constant
from threaddispatch.errors import ConfigurationError, InvalidStateError
from threaddispatch.jobs import JobContext, JobEngine
from threaddispatch.middleware import Middleware
from threaddispatch.stores import Store
from threaddispatch.stores.base import JobState

pytestmark = pytest.mark.timeout(60)

FAST: dict[str, Any] = {
    "poll_interval": 0.01,
    "max_poll_interval": 0.05,
    "heartbeat_interval": 0.05,
    "stale_job_threshold": 30.0,
    "shutdown_timeout": 5.0,
    "backoff": Constant(0.01),
}


@pytest.fixture
def make_engine() -> Iterator[Callable[..., JobEngine]]:
    engines: list[JobEngine] = []

    def make(store: Store, **options: Any) -> JobEngine:
        engine = JobEngine(store, **{**FAST, **options})
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop(5)


async def double(ctx: JobContext, payload: int) -> int:
    await asyncio.sleep(0)
    return payload * 2


def test_an_async_handler_is_awaited_by_a_worker(store: Store, make_engine: Callable[..., JobEngine]) -> None:
    engine = make_engine(store)
    engine.register("double", double)
    job_id = engine.enqueue("double", 21)
    engine.start()
    assert engine.result(job_id, timeout=10) == 42
    assert engine.get_job(job_id).result == "42"


def test_an_async_handler_is_awaited_in_immediate_mode(store: Store) -> None:
    engine = JobEngine(store, immediate=True)
    engine.register("double", double)
    assert engine.result(engine.enqueue("double", 4), timeout=0) == 8


def test_an_async_handlers_error_retries_like_a_plain_one(store: Store) -> None:
    async def flaky(ctx: JobContext, payload: object) -> str:
        if ctx.attempt < 2:
            raise RuntimeError("not yet")
        return "ok"

    engine = JobEngine(store, immediate=True)
    engine.register("flaky", flaky, max_retries=2)
    job_id = engine.enqueue("flaky")
    job = engine.get_job(job_id)
    assert (job.state, job.attempts, engine.result(job_id, timeout=0)) == (JobState.COMPLETED, 2, "ok")


class AsyncHooks(Middleware):
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    async def before_job(self, ctx: JobContext) -> None:
        await asyncio.sleep(0)
        self.calls.append("before")

    async def after_job(self, ctx: JobContext, result: object, error: BaseException | None) -> None:
        await asyncio.sleep(0)
        self.calls.append(f"after {result}")


class AsyncWrap(Middleware):
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    async def wrap(self, ctx: JobContext, call_next: Callable[[], Any]) -> object:
        self.calls.append("wrap in")
        result = await call_next()
        self.calls.append("wrap out")
        return result


def test_async_middleware_hooks_and_wrap_are_awaited(store: Store) -> None:
    calls: list[str] = []

    def plain(ctx: JobContext, payload: int) -> int:
        calls.append("handler")
        return payload

    engine = JobEngine(store, immediate=True, middleware=[AsyncHooks(calls), AsyncWrap(calls), AsyncHooks(calls)])
    engine.register("plain", plain)
    engine.register("double", double)
    assert engine.result(engine.enqueue("plain", 3), timeout=0) == 3
    assert calls == ["before", "wrap in", "before", "handler", "after 3", "wrap out", "after 3"]
    calls.clear()
    assert engine.result(engine.enqueue("double", 3), timeout=0) == 6
    assert calls == ["before", "wrap in", "before", "after 6", "wrap out", "after 6"]


def test_a_plain_wrap_inside_an_async_wrap_is_refused(store: Store) -> None:
    class PlainWrap(Middleware):
        def wrap(self, ctx: JobContext, call_next: Callable[[], object]) -> object:
            return call_next()

    with pytest.raises(ConfigurationError, match="PlainWrap"):
        JobEngine(store, middleware=[AsyncWrap([]), PlainWrap()])


def test_async_extension_hooks_are_awaited(store: Store, make_engine: Callable[..., JobEngine]) -> None:
    done = threading.Event()
    seen: list[tuple[str, object]] = []

    class Extension:
        async def on_job_completed(self, job: Any, result: object) -> None:
            await asyncio.sleep(0)
            seen.append((job.id, result))
            done.set()

        async def on_shutdown(self) -> None:
            await asyncio.sleep(0)
            seen.append(("shutdown", None))

    engine = make_engine(store, extensions=[Extension()])
    engine.register("double", double)
    job_id = engine.enqueue("double", 5)
    engine.start()
    assert done.wait(10)
    assert engine.stop(5)
    assert seen == [(job_id, 10), ("shutdown", None)]


def test_an_async_handler_past_its_timeout_has_its_task_cancelled(
    store: Store, make_engine: Callable[..., JobEngine]
) -> None:
    cancelled = threading.Event()

    async def hang(ctx: JobContext, payload: object) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    engine = make_engine(store)
    engine.register("hang", hang, timeout=0.2, max_retries=0)
    job_id = engine.enqueue("hang")
    engine.start()
    with pytest.raises(InvalidStateError):
        engine.result(job_id, timeout=10)
    assert cancelled.wait(10)
    job = engine.get_job(job_id)
    assert job.state == JobState.FAILED and "timed out" in (job.error or "")


def test_an_async_handler_past_its_timeout_is_cancelled_in_immediate_mode(store: Store) -> None:
    cancelled = threading.Event()

    async def hang(ctx: JobContext, payload: object) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    engine = JobEngine(store, immediate=True)
    engine.register("hang", hang, timeout=0.2, max_retries=0)
    job = engine.get_job(engine.enqueue("hang"))
    assert cancelled.is_set()
    assert job.state == JobState.FAILED and "timed out" in (job.error or "")


def test_a_system_exit_from_an_async_handler_fails_the_attempt(store: Store) -> None:
    async def leave(ctx: JobContext, payload: object) -> None:
        raise SystemExit(3)

    engine = JobEngine(store, immediate=True)
    engine.register("leave", leave, max_retries=0)
    job = engine.get_job(engine.enqueue("leave"))
    assert job.state == JobState.FAILED and "SystemExit" in (job.error or "")


def test_a_plain_handler_returning_a_coroutine_has_it_awaited(store: Store) -> None:
    def later(ctx: JobContext, payload: int) -> Any:
        return double(ctx, payload)

    engine = JobEngine(store, immediate=True)
    engine.register("later", later)
    assert engine.result(engine.enqueue("later", 5), timeout=0) == 10


def test_cancelling_a_running_async_job_cancels_its_task(store: Store, make_engine: Callable[..., JobEngine]) -> None:
    started = threading.Event()
    cancelled = threading.Event()

    async def hang(ctx: JobContext, payload: object) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    engine = make_engine(store)
    engine.register("hang", hang, timeout=None)
    job_id = engine.enqueue("hang")
    engine.start()
    assert started.wait(10)
    engine.cancel(job_id)
    assert cancelled.wait(10)
    assert engine.get_job(job_id).state == JobState.CANCELLED
