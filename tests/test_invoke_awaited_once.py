"""User code is awaited once: an awaitable that an awaited awaitable returns fails the call (TypeError).

The contract (threaddispatch/_invoke.py's docstring): what ``fn`` returns is awaited when
it is awaitable, and the value that gives is the call's value; when that value is itself
awaitable (``async def send(...): return post(...)``, a forgotten ``await``), the call
fails with a TypeError naming it, reported and counted like any other failure, never as
delivered. A refused coroutine is closed (its body never runs, and no "never awaited"
RuntimeWarning is left for the garbage collector); a refused pending Future of the
worker's loop is cancelled. Checked here on ``_invoke`` itself and on every face.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
import warnings
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from typing import Any

import pytest

from threaddispatch import (
    AsyncDispatcher,
    BackgroundDispatcher,
    BatchedDispatcher,
    EndpointBatchDispatcher,
    FailedBatch,
    RequestDispatcher,
)
from threaddispatch._invoke import ERROR, OK, TimedCaller, call, close_thread_loop, invoke
from threaddispatch._job_context import JobContext
from threaddispatch.backoff import RetryPolicy
from threaddispatch.endpoint import DispatchJob
from threaddispatch.jobs import JobEngine
from threaddispatch.logging import BatchingHandler
from threaddispatch.middleware import Middleware
from threaddispatch.stores import MemoryStore
from threaddispatch.testing import wait_for

MISSING_AWAIT = "missing 'await'"


@pytest.fixture
def no_never_awaited_warning() -> Iterator[None]:
    """Fail the test if a "coroutine ... was never awaited" RuntimeWarning is raised (collected at the end)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        yield
        gc.collect()
    leaked = [str(w.message) for w in caught if "never awaited" in str(w.message)]
    assert not leaked, leaked


class Inner:
    """The coroutine function a slip returns unawaited: records whether its body ever ran."""

    def __init__(self) -> None:
        self.ran = threading.Event()

    async def post(self, *_args: object) -> str:
        self.ran.set()
        return "posted"


# -- _invoke --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_never_awaited_warning")
def test_an_async_def_returning_a_coroutine_fails_with_a_type_error_naming_both() -> None:
    """invoke(): TypeError naming the function and the coroutine it returned; the coroutine never runs."""
    inner = Inner()

    async def send() -> Coroutine[Any, Any, str]:
        return inner.post()

    with pytest.raises(TypeError, match=MISSING_AWAIT) as caught:
        invoke(send)
    message = str(caught.value)
    assert "send" in message and "Inner.post" in message and "it was closed" in message, message
    assert "returned by" not in message  # the awaitable is send's own coroutine
    assert not inner.ran.is_set()
    close_thread_loop()


@pytest.mark.usefixtures("no_never_awaited_warning")
def test_a_plain_function_returning_a_coroutine_that_returns_a_coroutine_fails() -> None:
    """call(): a plain fn returning ``wrapper()`` whose body returns ``post()``: ERROR, naming wrapper and fn."""
    inner = Inner()

    async def wrapper() -> Coroutine[Any, Any, str]:
        return inner.post()

    def send() -> Coroutine[Any, Any, Coroutine[Any, Any, str]]:
        return wrapper()

    outcome = call(send)
    assert outcome.kind == ERROR and isinstance(outcome.error, TypeError), outcome
    assert "wrapper (returned by" in str(outcome.error) and "send" in str(outcome.error)
    assert not inner.ran.is_set()
    close_thread_loop()


def test_a_plain_function_returning_a_coroutine_is_still_awaited() -> None:
    """The first level stays: a plain function's coroutine is awaited and its value is the call's."""
    inner = Inner()

    def send() -> Coroutine[Any, Any, str]:
        return inner.post()

    outcome = call(send)
    assert outcome.kind == OK and outcome.value == "posted"
    assert inner.ran.is_set()
    close_thread_loop()


@pytest.mark.usefixtures("no_never_awaited_warning")
def test_a_returned_task_of_the_private_loop_is_cancelled_not_run_later() -> None:
    """``return asyncio.ensure_future(post())``: refused, and the task is cancelled, so no later turn runs it."""
    inner = Inner()
    tasks: list[asyncio.Future[str]] = []

    async def post_later() -> str:
        await asyncio.Event().wait()  # pending until cancelled
        return await inner.post()

    async def send() -> asyncio.Future[str]:
        task = asyncio.ensure_future(post_later())
        tasks.append(task)
        return task

    async def later() -> None:
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    outcome = call(send)
    assert outcome.kind == ERROR and isinstance(outcome.error, TypeError), outcome
    assert "it was cancelled" in str(outcome.error)
    assert call(later).ok  # turns of the same thread's loop: the task's cancellation is delivered
    assert tasks[0].cancelled()
    assert not inner.ran.is_set()
    close_thread_loop()


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("no_never_awaited_warning")
def test_timed_caller_refuses_it_as_a_failure_not_a_timeout() -> None:
    """TimedCaller (a runner thread): the same TypeError, an ERROR outcome within the timeout."""
    inner = Inner()

    async def send() -> Coroutine[Any, Any, str]:
        return inner.post()

    caller = TimedCaller("awaited-once", timeout=5.0)
    try:
        outcome = caller.call(send)
        assert outcome.kind == ERROR and isinstance(outcome.error, TypeError), outcome
        assert MISSING_AWAIT in str(outcome.error)
        assert caller.stats()["call_timeouts"] == 0
        assert caller.call(lambda: 3).value == 3  # the runner goes on
    finally:
        assert caller.close(10)
    assert not inner.ran.is_set()


# -- every face -----------------------------------------------------------------------------------

Reported = Callable[[BaseException], None]
Build = Callable[..., Callable[[str], None]]  # (inner, report, timeout, **face options) -> give(item)


def _tracer_provider() -> object:
    """An OpenTelemetry SDK TracerProvider that keeps nothing (the faces' traced paths wrap the send)."""
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
    provider = sdk_trace.TracerProvider()
    _stops.append(provider.shutdown)  # after the face's own stop (appended before it)
    return provider


def _face_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options as a face takes them: ``tracer_provider=True`` stands for a provider made here."""
    if options.get("tracer_provider") is True:
        return {**options, "tracer_provider": _tracer_provider()}
    return options


def _background(inner: Inner, report: Reported, timeout: float | None, **options: Any) -> Callable[[str], None]:
    async def send(entries: list[str]) -> Coroutine[Any, Any, str]:
        return inner.post(entries)

    def on_error(failed: FailedBatch[str]) -> None:
        report(failed.error)

    _names.append(send.__qualname__)
    d = BackgroundDispatcher(
        send,
        ms_delay=1,
        send_timeout=timeout,
        on_error=on_error,
        retry=RetryPolicy(max_attempts=1),
        **_face_options(options),
    )
    _stops.append(lambda: d.close(10))
    _stats.append(lambda: (d.stats()["sent"], d.stats()["failed"]))
    return d.enqueue


def _endpoint(inner: Inner, report: Reported, timeout: float | None, **options: Any) -> Callable[[str], None]:
    async def send_batch(_endpoint_id: object, jobs: list[DispatchJob]) -> Coroutine[Any, Any, str]:
        return inner.post(jobs)

    _names.append(send_batch.__qualname__)
    if timeout is not None:
        options["send_timeout"] = timeout
    d = EndpointBatchDispatcher(
        send_batch,
        max_batch_size=1,
        batch_timeout=0.001,
        retry=RetryPolicy(max_attempts=1),
        **_face_options(options),
    )
    d.on("job_exhausted", lambda event: report(event["error"]))
    _stops.append(lambda: d.shutdown(10))

    def give(item: str) -> None:
        d.add_job(DispatchJob("endpoint", item))

    return give


def _batched(inner: Inner, report: Reported, timeout: float | None, **options: Any) -> Callable[[str], None]:
    async def send_batch(_target: str, messages: list[str]) -> Any:  # a list of results, if it were right
        return inner.post(messages)

    _names.append(send_batch.__qualname__)
    if timeout is not None:
        options["send_timeout"] = timeout
    d: BatchedDispatcher[str] = BatchedDispatcher(
        send_batch, max_batch_size=1, flush_interval=0.001, **_face_options(options)
    )

    def settled(future: Future[Any]) -> None:
        error = future.exception()
        if error is not None:
            report(error)

    _stops.append(lambda: d.close(10))

    def give(item: str) -> None:
        d.submit(item, "target").add_done_callback(settled)

    return give


class _Target:
    def __init__(self, inner: Inner) -> None:
        self.inner = inner

    async def dispatch(self, message: str, _target: str, **_options: object) -> Coroutine[Any, Any, str]:
        return self.inner.post(message)


def _async(inner: Inner, report: Reported, timeout: float | None, **options: Any) -> Callable[[str], None]:
    if timeout is not None:
        options["dispatch_timeout"] = timeout
    target: Any = _Target(inner)  # its dispatch returns what no Dispatcher should
    _names.append(_Target.dispatch.__qualname__)
    d: AsyncDispatcher[str] = AsyncDispatcher(
        target,
        "awaited-once",
        lambda failed: report(failed.error),
        retry=RetryPolicy(max_attempts=1),
        **options,
    )
    sender = d.setup(10)
    d.start()
    _stops.append(lambda: d.stop(10))

    def give(item: str) -> None:
        sender.put(item, timeout=5)

    return give


def _requests(inner: Inner, report: Reported, timeout: float | None) -> Callable[[str], None]:
    assert timeout is None

    async def send(request: str, _token: object) -> Coroutine[Any, Any, str]:
        return inner.post(request)

    _names.append(send.__qualname__)
    rd: RequestDispatcher[str, Any] = RequestDispatcher(send)

    def settled(future: Future[Any]) -> None:
        error = future.exception()
        if error is not None:
            report(error)

    _stops.append(lambda: rd.close(10))
    _stats.append(lambda: (rd.stats()["delivered"], rd.stats()["failed"]))
    return lambda item: rd.add(item).future.add_done_callback(settled)


class _Hooks:
    def __init__(self, report: Reported) -> None:
        self.report = report

    def on_job_failed(self, _job: Any, error: BaseException | str | None) -> None:
        self.report(error if isinstance(error, BaseException) else TypeError(str(error)))


def _jobs(inner: Inner, report: Reported, timeout: float | None, **options: Any) -> Callable[[str], None]:
    engine = JobEngine(
        MemoryStore(),
        concurrency=1,
        poll_interval=0.01,
        max_poll_interval=0.05,
        extensions=[_Hooks(report)],
        **options,
    )

    async def handler(_ctx: object, payload: str) -> Coroutine[Any, Any, str]:
        return inner.post(payload)

    _names.append(handler.__qualname__)
    engine.register("work", handler, max_retries=0, timeout=timeout)
    engine.start()
    _stops.append(lambda: engine.stop(10))

    def give(item: str) -> None:
        engine.enqueue("work", json.dumps(item))

    return give


def _logging(inner: Inner, report: Reported, timeout: float | None, **options: Any) -> Callable[[str], None]:
    async def send_records(records: list[logging.LogRecord]) -> Coroutine[Any, Any, str]:
        return inner.post(records)

    def on_error(failed: FailedBatch[logging.LogRecord]) -> None:
        report(failed.error)

    _names.append(send_records.__qualname__)
    handler = BatchingHandler(
        send_records,
        ms_delay=1,
        send_timeout=timeout,
        on_error=on_error,
        retry=RetryPolicy(max_attempts=1),
        **_face_options(options),
    )
    _stops.append(lambda: handler.close(10))

    def give(item: str) -> None:
        handler.handle(logging.LogRecord("awaited-once", logging.INFO, __file__, 1, item, None, None))

    return give


class _AsyncWrap(Middleware):
    """An async wrap: the job's handler then runs inside the async tail (one coroutine)."""

    async def wrap(self, ctx: JobContext, call_next: Callable[[], Any]) -> object:
        return await call_next()


_stops: list[Callable[[], object]] = []
_stats: list[Callable[[], tuple[int, int]]] = []
_names: list[str] = []  # the __qualname__ of the user's function the face calls

FACES = [
    pytest.param(_background, None, id="background-inline"),
    pytest.param(_background, 5.0, id="background-timed"),
    pytest.param(_endpoint, None, id="endpoint-inline"),
    pytest.param(_endpoint, 5.0, id="endpoint-timed"),
    pytest.param(_batched, None, id="batched-inline"),
    pytest.param(_batched, 5.0, id="batched-timed"),
    pytest.param(_async, None, id="async-inline"),
    pytest.param(_async, 5.0, id="async-timed"),
    pytest.param(_requests, None, id="requests"),
    pytest.param(_jobs, None, id="jobs"),
    pytest.param(_jobs, 5.0, id="jobs-timed"),
    pytest.param(_logging, None, id="logging-inline"),
    pytest.param(_logging, 5.0, id="logging-timed"),
]

# Each face's wrappers around the user's function: tracing (a span around the send), a carried
# context (AsyncDispatcher carry_context), async middleware (the job runs in the async tail).
WRAPPED_FACES = [
    pytest.param(_background, None, {"tracer_provider": True}, id="background-traced"),
    pytest.param(_background, 5.0, {"tracer_provider": True}, id="background-traced-timed"),
    pytest.param(_endpoint, None, {"tracer_provider": True}, id="endpoint-traced"),
    pytest.param(_endpoint, 5.0, {"tracer_provider": True}, id="endpoint-traced-timed"),
    pytest.param(_batched, None, {"tracer_provider": True}, id="batched-traced"),
    pytest.param(_batched, 5.0, {"tracer_provider": True}, id="batched-traced-timed"),
    pytest.param(_async, None, {"carry_context": True}, id="async-context"),
    pytest.param(_async, 5.0, {"carry_context": True}, id="async-context-timed"),
    pytest.param(_jobs, None, {"middleware": [_AsyncWrap()]}, id="jobs-async-middleware"),
    pytest.param(_jobs, 5.0, {"middleware": [_AsyncWrap()]}, id="jobs-async-middleware-timed"),
    pytest.param(_logging, 5.0, {"tracer_provider": True}, id="logging-traced-timed"),
]


def _reported(build: Build, timeout: float | None, options: dict[str, Any]) -> tuple[BaseException, str]:
    """Build the face, give it one item, and return the failure it reported and the user's function's name."""
    inner = Inner()
    errors: list[BaseException] = []
    _stops.clear()
    _stats.clear()
    _names.clear()
    try:
        give = build(inner, errors.append, timeout, **options)
        give("item")
        wait_for(lambda: bool(errors), 10, message="the failure reported")
    finally:
        for stop in reversed(_stops):
            stop()
    error = errors[0]
    assert MISSING_AWAIT in str(error), error
    assert not isinstance(error, TimeoutError)
    assert not inner.ran.is_set()
    for stats in _stats:
        delivered, failed = stats()
        assert (delivered, failed) == (0, 1)
    (name,) = _names
    return error, name


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_never_awaited_warning")
@pytest.mark.parametrize(("build", "timeout"), FACES)
def test_every_face_reports_a_forgotten_await_as_a_failure(build: Build, timeout: float | None) -> None:
    """Each face's failure path gets the TypeError; the inner coroutine never runs; no count says delivered."""
    _reported(build, timeout, {})


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_never_awaited_warning")
@pytest.mark.parametrize(
    ("build", "timeout", "options"), [pytest.param(*p.values, {}, id=p.id) for p in FACES] + WRAPPED_FACES
)
def test_every_face_names_the_users_function_not_its_own_wrapper(
    build: Build, timeout: float | None, options: dict[str, Any]
) -> None:
    """The TypeError's source is the user's function (its __qualname__), on every face and through every wrapper.

    Not a face's own wrapper (``_with_values (returned by in_context)``, ``JobContext._guard``,
    ``Core._await_sending``, ``... (returned by _same)``): the message starts with the user's function.
    """
    error, name = _reported(build, timeout, dict(options))
    assert str(error).startswith(f"{name} returned <coroutine object Inner.post"), error
