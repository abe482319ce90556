"""AsyncDispatcher on the user-code contract: async callables, a per-call timeout, flow signals via RetryPolicy."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest

from threaddispatch.backoff import Constant, RetryPolicy
from threaddispatch.buffered import AsyncDispatcher, FailedMessage
from threaddispatch.errors import ConfigurationError, DispatchTimeoutError
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], object]]]:
    calls: list[Callable[[], object]] = []
    yield calls
    for call in reversed(calls):
        call()


class Failures:
    """An error handler that records what it was given."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[FailedMessage[Any]] = []

    def __call__(self, failed: FailedMessage[Any]) -> None:
        with self.lock:
            self.items.append(failed)

    def count(self) -> int:
        with self.lock:
            return len(self.items)


def start(
    dispatcher: Any, cleanup: list[Callable[[], object]], handler: Any = None, **kwargs: Any
) -> tuple[AsyncDispatcher[Any], Any]:
    async_dispatcher: AsyncDispatcher[Any] = AsyncDispatcher(dispatcher, "q", handler, **kwargs)
    sender = async_dispatcher.setup(100)
    async_dispatcher.start()
    cleanup.append(lambda: async_dispatcher.stop(10))
    return async_dispatcher, sender


# -- AsyncDispatcher: async callables ---------------------------------------------------------------


class AsyncSink:
    def __init__(self) -> None:
        self.got: list[Any] = []

    async def dispatch(self, message: Any, target: str, *, delay_seconds: int | None = None) -> str:
        await asyncio.sleep(0)
        self.got.append(message)
        return f"id-{message}"


def test_an_async_dispatch_is_awaited(cleanup: list[Callable[[], object]]) -> None:
    sink = AsyncSink()
    dispatcher, sender = start(sink, cleanup)
    for n in range(5):
        sender.put(n)
    assert dispatcher.stop(10)
    assert sink.got == [0, 1, 2, 3, 4]
    assert dispatcher.sent == 5


def test_an_async_dispatch_that_raises_fails_its_message(cleanup: list[Callable[[], object]]) -> None:
    class Raising:
        async def dispatch(self, message: Any, target: str, *, delay_seconds: int | None = None) -> str:
            raise SystemExit(3)

    failures = Failures()
    dispatcher, sender = start(Raising(), cleanup, failures)
    sender.put("a")
    sender.put("b")
    dispatcher.stop(10)
    assert [(f.message, type(f.error)) for f in failures.items] == [("a", SystemExit), ("b", SystemExit)]


def test_an_async_submit_is_awaited_for_its_future(cleanup: list[Callable[[], object]]) -> None:
    class AsyncSubmitter:
        def dispatch(self, message: Any, target: str, *, delay_seconds: int | None = None) -> str:
            raise AssertionError("submit exists")

        async def submit(self, message: Any, target: str) -> Future[str | None]:
            future: Future[str | None] = Future()
            future.set_result(f"id-{message}")
            return future

    dispatcher, sender = start(AsyncSubmitter(), cleanup)
    sender.put(1)
    assert dispatcher.stop(10)
    assert dispatcher.sent == 1


# -- AsyncDispatcher: per-call timeout ----------------------------------------------------------------


class Hangs:
    """Hangs on the first message until released; sends the rest."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.got: list[Any] = []
        self.first = True

    def dispatch(self, message: Any, target: str, *, delay_seconds: int | None = None) -> str:
        if self.first:
            self.first = False
            self.release.wait(30)
            return "late"
        self.got.append(message)
        return f"id-{message}"


@pytest.mark.timeout(30)
def test_a_hung_dispatch_times_out_and_delivery_goes_on(cleanup: list[Callable[[], object]]) -> None:
    hangs = Hangs()
    cleanup.append(hangs.release.set)
    failures = Failures()
    dispatcher, sender = start(hangs, cleanup, failures, dispatch_timeout=0.1)
    for n in range(3):
        sender.put(n)
    wait_for(lambda: failures.count() == 1 and dispatcher.sent == 2, timeout=10)
    assert isinstance(failures.items[0].error, DispatchTimeoutError)
    assert failures.items[0].message == 0
    assert hangs.got == [1, 2]
    stats = dispatcher.stats()
    assert stats["call_timeouts"] == 1
    assert stats["abandoned_calls"] == 1
    hangs.release.set()
    wait_for(lambda: dispatcher.stats()["abandoned_calls"] == 0, timeout=10)


@pytest.mark.timeout(30)
def test_a_timed_out_dispatch_is_retried(cleanup: list[Callable[[], object]]) -> None:
    hangs = Hangs()
    cleanup.append(hangs.release.set)
    dispatcher, sender = start(
        hangs, cleanup, dispatch_timeout=0.1, retry=RetryPolicy(max_attempts=2, backoff=Constant(0))
    )
    sender.put("a")
    wait_for(lambda: dispatcher.sent == 1, timeout=10)
    assert hangs.got == ["a"]
    assert dispatcher.retried == 1
    hangs.release.set()


@pytest.mark.parametrize("bad", [0, -1, "1", True])
def test_a_bad_dispatch_timeout_raises_configuration_error(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="timeout"):
        AsyncDispatcher(AsyncSink(), "q", dispatch_timeout=bad)


def test_stats_have_the_call_counters_without_a_timeout(cleanup: list[Callable[[], object]]) -> None:
    dispatcher, _sender = start(AsyncSink(), cleanup)
    stats = dispatcher.stats()
    assert stats["abandoned_calls"] == 0
    assert stats["call_timeouts"] == 0


# -- AsyncDispatcher: flow signals through RetryPolicy.next_delay -------------------------------------


class Signals:
    """Raises ``errors`` in turn, then sends."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.sent: list[Any] = []

    def dispatch(self, message: Any, target: str, *, delay_seconds: int | None = None) -> str:
        if self.errors:
            raise self.errors.pop(0)
        self.sent.append(message)
        return "id"


def test_a_retry_predicate_that_raises_system_exit_makes_the_failure_final(
    cleanup: list[Callable[[], object]],
) -> None:
    def predicate(_error: BaseException) -> bool:
        raise SystemExit(1)

    failures = Failures()
    signals = Signals(ValueError("x"))
    dispatcher, sender = start(signals, cleanup, failures, retry=RetryPolicy(max_attempts=3, retry_on=predicate))
    sender.put("m")
    sender.put("n")
    wait_for(lambda: failures.count() == 1 and dispatcher.sent == 1, timeout=10)
    assert failures.items[0].message == "m"


@pytest.mark.timeout(30)
def test_a_stop_that_times_out_leaves_the_loop_dispatching_through_its_timeout(
    cleanup: list[Callable[[], object]], caplog: pytest.LogCaptureFixture
) -> None:
    class HangsOnce:
        def __init__(self) -> None:
            self.entered = threading.Event()
            self.release = threading.Event()
            self.got: list[Any] = []

        def dispatch(self, message: Any, target: str, *, delay_seconds: int | None = None) -> str:
            if message == "hang":
                self.entered.set()
                self.release.wait(30)
            self.got.append(message)
            return "id"

    hangs = HangsOnce()
    cleanup.append(hangs.release.set)
    dispatcher, sender = start(hangs, cleanup, dispatch_timeout=20)
    sender.put("hang")
    sender.put("b")
    assert hangs.entered.wait(10)
    assert dispatcher.stop(0.05) is False
    hangs.release.set()
    wait_for(lambda: dispatcher.sent == 2, timeout=10)
    assert hangs.got == ["hang", "b"]
    assert not [r for r in caplog.records if r.levelname == "CRITICAL"]


TRACE: contextvars.ContextVar[str] = contextvars.ContextVar("TRACE", default="none")


@pytest.mark.parametrize("dispatch_timeout", [None, 10.0])
def test_an_async_dispatch_sees_the_producers_context(
    dispatch_timeout: float | None, cleanup: list[Callable[[], object]]
) -> None:
    seen: list[tuple[Any, str]] = []

    class Traced:
        async def dispatch(self, message: Any, target: str, *, delay_seconds: int | None = None) -> str:
            await asyncio.sleep(0)
            seen.append((message, TRACE.get()))
            return "id"

    dispatcher, sender = start(Traced(), cleanup, carry_context=True, dispatch_timeout=dispatch_timeout)

    def put_in_trace(trace: str, message: Any) -> None:
        TRACE.set(trace)
        sender.put(message)

    contextvars.copy_context().run(put_in_trace, "t-1", "a")
    sender.put("b")
    assert dispatcher.stop(10)
    assert seen == [("a", "t-1"), ("b", "none")]
