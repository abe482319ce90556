"""Middleware is awaited once, as every user call is: a forgotten ``await`` in a hook or a wrap is a TypeError.

The rule (threaddispatch/_invoke.py's docstring): what a hook or ``wrap`` returns is
awaited when it is awaitable, and that value must not itself be awaitable. A hook whose
coroutine returns a coroutine (``async def before_job(...): return audit(ctx)``) fails as
any failing hook does: logged ("middleware hook ... raised; the job continues") with a
TypeError naming the hook, and the job goes on; a ``wrap`` or handler doing it fails the
attempt with that TypeError. On the plain chain and inside an async ``wrap`` (the async
tail, one coroutine) alike; the refused coroutine is closed, never run, and no "never
awaited" RuntimeWarning is left behind.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import warnings
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from threaddispatch import JobEngine
from threaddispatch._job_context import JobContext
from threaddispatch.middleware import Middleware
from threaddispatch.stores import MemoryStore
from threaddispatch.stores.base import JobState

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("no_never_awaited_warning")]

MISSING_AWAIT = "missing 'await'"
HOOK_RAISED = "middleware hook"


@pytest.fixture
def no_never_awaited_warning() -> Iterator[None]:
    """Fail the test if a "coroutine ... was never awaited" RuntimeWarning is raised (collected at the end)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        yield
        gc.collect()
    leaked = [str(w.message) for w in caught if "never awaited" in str(w.message)]
    assert not leaked, leaked


class Audit:
    """The coroutine function a slip returns unawaited: records whether its body ever ran."""

    def __init__(self) -> None:
        self.ran = threading.Event()

    async def audit(self, *_args: object) -> None:
        self.ran.set()


class SlipBefore(Middleware):
    def __init__(self, audit: Audit) -> None:
        self.audit = audit

    async def before_job(self, ctx: JobContext) -> Any:
        return self.audit.audit(ctx)  # the slip: no await


class SlipAfter(Middleware):
    def __init__(self, audit: Audit) -> None:
        self.audit = audit

    async def after_job(self, ctx: JobContext, result: object, error: BaseException | None) -> Any:
        return self.audit.audit(ctx, result)  # the slip: no await


class AsyncWrap(Middleware):
    """An async wrap in front: everything after it runs in one coroutine (the async tail)."""

    async def wrap(self, ctx: JobContext, call_next: Callable[[], Any]) -> object:
        return await call_next()


class SlipWrap(Middleware):
    async def wrap(self, ctx: JobContext, call_next: Callable[[], Any]) -> object:
        return call_next()  # the slip: the rest of the chain's coroutine, unawaited


def _double(_ctx: JobContext, payload: int) -> int:
    return payload * 2


def _engine(middleware: list[Middleware]) -> JobEngine:
    engine = JobEngine(MemoryStore(), immediate=True, middleware=middleware)
    engine.register("double", _double, max_retries=0)
    return engine


def _hook_failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if HOOK_RAISED in r.getMessage() and r.exc_info is not None]


@pytest.mark.parametrize("tail", [False, True], ids=["plain-chain", "async-tail"])
@pytest.mark.parametrize(
    ("hook", "name"),
    [(SlipBefore, SlipBefore.before_job.__qualname__), (SlipAfter, SlipAfter.after_job.__qualname__)],
    ids=["before_job", "after_job"],
)
def test_a_hook_returning_a_coroutine_unawaited_is_a_contained_hook_failure(
    caplog: pytest.LogCaptureFixture, hook: Callable[[Audit], Middleware], name: str, tail: bool
) -> None:
    """The hook's TypeError (naming it) is logged as a failing hook's error; the job completes; audit never ran."""
    audit = Audit()
    engine = _engine([AsyncWrap(), hook(audit)] if tail else [hook(audit)])
    with caplog.at_level(logging.ERROR, logger="threaddispatch.jobs"):
        job_id = engine.enqueue("double", 4)
    assert engine.result(job_id, timeout=0) == 8
    failures = _hook_failures(caplog)
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]
    exc_info = failures[0].exc_info
    assert exc_info is not None
    error = exc_info[1]
    assert isinstance(error, TypeError) and MISSING_AWAIT in str(error), error
    # The hook is named, not a wrapper of ours (_same, _settle); its coroutine was closed, never run.
    assert str(error).startswith(f"{name} returned <coroutine object Audit.audit"), error
    assert "it was closed" in str(error), error
    assert not audit.ran.is_set()


def test_an_async_wrap_returning_call_next_unawaited_fails_the_attempt_naming_the_wrap() -> None:
    """``return call_next()`` in an async wrap: the attempt fails with a TypeError naming the wrap; no handler runs."""
    ran = threading.Event()

    def handler(_ctx: JobContext, payload: int) -> int:
        ran.set()
        return payload

    engine = JobEngine(MemoryStore(), immediate=True, middleware=[SlipWrap()])
    engine.register("work", handler, max_retries=0)
    job = engine.get_job(engine.enqueue("work", 1))
    assert job.state == JobState.FAILED, job
    message = (job.error or "").strip().splitlines()[-1]  # the stored error ends with the exception's line
    assert message.startswith(f"TypeError: {SlipWrap.wrap.__qualname__} returned <coroutine object "), message
    assert MISSING_AWAIT in message, message
    assert not ran.is_set()


@pytest.mark.parametrize("tail", [False, True], ids=["plain-chain", "async-tail"])
def test_an_async_handler_returning_a_coroutine_unawaited_is_named_in_the_attempts_error(tail: bool) -> None:
    """Through the middleware (plain chain or async tail) the handler's TypeError names the handler."""
    audit = Audit()

    async def slip(_ctx: JobContext, _payload: object) -> Coroutine[Any, Any, None]:
        return audit.audit()

    engine = JobEngine(MemoryStore(), immediate=True, middleware=[AsyncWrap()] if tail else [])
    engine.register("slip", slip, max_retries=0)
    job = engine.get_job(engine.enqueue("slip"))
    assert job.state == JobState.FAILED, job
    message = (job.error or "").strip().splitlines()[-1]  # the stored error ends with the exception's line
    assert message.startswith(f"TypeError: {slip.__qualname__} returned <coroutine object Audit.audit"), message
    assert MISSING_AWAIT in message, message
    assert not audit.ran.is_set()


def test_a_hook_that_awaits_is_unchanged() -> None:
    """The first level stays: an async hook's value (None) is awaited once, and the job's hooks run in order."""
    calls: list[str] = []

    class Hooks(Middleware):
        async def before_job(self, ctx: JobContext) -> None:
            await asyncio.sleep(0)
            calls.append("before")

        async def after_job(self, ctx: JobContext, result: object, error: BaseException | None) -> None:
            calls.append(f"after {result}")

    for chain in ([Hooks()], [AsyncWrap(), Hooks()]):
        calls.clear()
        engine = _engine(list(chain))
        assert engine.result(engine.enqueue("double", 2), timeout=0) == 4
        assert calls == ["before", "after 4"]
