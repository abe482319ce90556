"""AsyncDispatcher: per-message delay_seconds passed to the dispatcher, and the producer's contextvars."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest

from threaddispatch.buffered import AsyncDispatcher, FailedMessage
from threaddispatch.errors import ConfigurationError
from threaddispatch.testing import RecordingDispatcher

pytestmark = pytest.mark.timeout(60)

TRACE_ID: contextvars.ContextVar[str] = contextvars.ContextVar("TRACE_ID", default="none")

BAD_DELAYS = [-1, float("nan"), True, "5", float("inf"), 1.5]


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], object]]]:
    actions: list[Callable[[], object]] = []
    yield actions
    for action in actions:
        action()


class Seen:
    """A dispatcher recording (message, delay_seconds, TRACE_ID) per call; thread-safe."""

    def __init__(self, fail: bool = False) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[Any, Any, str]] = []
        self.fail = fail

    def dispatch(self, message: Any, target: str, **kwargs: Any) -> str:
        with self.lock:
            self.calls.append((message, kwargs.get("delay_seconds", "absent"), TRACE_ID.get()))
        if self.fail:
            raise RuntimeError(f"failed {message}")
        return f"id-{message}"


class SubmitSeen(Seen):
    """A submitting dispatcher with the old signature submit(message, target); resolves at once."""

    def submit(self, message: Any, target: str) -> Future[str | None]:
        future: Future[str | None] = Future()
        future.set_result(self.dispatch(message, target))
        return future


def in_trace(trace_id: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` in a fresh context where TRACE_ID is ``trace_id`` (as a request handler would)."""

    def run() -> Any:
        TRACE_ID.set(trace_id)
        return fn(*args, **kwargs)

    return contextvars.copy_context().run(run)


def make_async(dispatcher: Any, cleanup: list[Callable[[], object]], **kwargs: Any) -> Any:
    failures: list[FailedMessage[Any]] = []
    kwargs.setdefault("error_handler", failures.append)
    kwargs.setdefault("carry_context", True)
    ad: AsyncDispatcher[Any] = AsyncDispatcher(dispatcher, "orders", **kwargs)
    sender = ad.setup(100)
    ad.start()
    cleanup.append(lambda: ad.stop(10))
    return ad, sender, failures


# -- AsyncDispatcher: delay_seconds ------------------------------------------------------------


def test_sender_put_carries_delay_seconds_to_dispatch(cleanup: list[Callable[[], object]]) -> None:
    """put(m, delay_seconds=d) reaches dispatch(m, target, delay_seconds=d); a put without it passes none."""
    seen = Seen()
    ad, sender, failures = make_async(seen, cleanup)
    sender.put("a", delay_seconds=30)
    assert sender.try_put("b", delay_seconds=0)
    sender.put("c")
    assert ad.stop(10) is True
    assert [(m, d) for m, d, _t in seen.calls] == [("a", 30), ("b", 0), ("c", "absent")]
    assert failures == []


def test_submit_gets_delay_seconds_only_when_one_was_given(cleanup: list[Callable[[], object]]) -> None:
    """A submit(message, target) without delay_seconds keeps working for messages put without a delay."""
    seen = SubmitSeen()
    ad, sender, failures = make_async(seen, cleanup)
    sender.put("plain")
    assert ad.stop(10) is True
    assert [m for m, _d, _t in seen.calls] == ["plain"]
    assert failures == []


def test_recording_dispatcher_records_the_delay(cleanup: list[Callable[[], object]]) -> None:
    """RecordingDispatcher.delays() lists the delay_seconds each sent message came with."""
    recorder: RecordingDispatcher[str] = RecordingDispatcher(with_submit=True)
    ad, sender, _failures = make_async(recorder, cleanup)
    sender.put("a", delay_seconds=5)
    sender.put("b")
    assert ad.stop(10) is True
    assert recorder.delays("orders") == [5, None]
    assert recorder.delays() == [5, None]


def test_failed_message_keeps_its_delay(cleanup: list[Callable[[], object]]) -> None:
    """The FailedMessage of a delayed message carries the delay, so a handler can put it again as it was."""
    ad, sender, failures = make_async(Seen(fail=True), cleanup)
    sender.put("x", delay_seconds=7)
    ad.stop(10)  # its result depends on whether "x" failed before the stop began: not the point here
    assert [(f.message, f.delay_seconds) for f in failures] == [("x", 7)]


@pytest.mark.parametrize("bad", BAD_DELAYS, ids=repr)
def test_bad_delay_seconds_raise_at_put(bad: Any, cleanup: list[Callable[[], object]]) -> None:
    """put and try_put refuse a negative, NaN, infinite, bool, str or fractional delay, naming it."""
    ad, sender, _failures = make_async(Seen(), cleanup)
    with pytest.raises(ConfigurationError, match="delay_seconds"):
        sender.put("m", delay_seconds=bad)
    with pytest.raises(ConfigurationError, match="delay_seconds"):
        sender.try_put("m", delay_seconds=bad)
    assert ad.stats()["buffered"] == 0


# -- AsyncDispatcher: contextvars --------------------------------------------------------------


def test_dispatch_runs_in_the_producers_context(cleanup: list[Callable[[], object]]) -> None:
    """A ContextVar set by the producer before put() is seen inside dispatch, per message."""
    seen = Seen()
    ad, sender, _failures = make_async(seen, cleanup)
    in_trace("trace-1", sender.put, "a")
    in_trace("trace-2", sender.put, "b")
    sender.put("c")
    assert ad.stop(10) is True
    assert [(m, t) for m, _d, t in seen.calls] == [("a", "trace-1"), ("b", "trace-2"), ("c", "none")]


def test_submit_runs_in_the_producers_context(cleanup: list[Callable[[], object]]) -> None:
    """With a submitting dispatcher, submit runs in the producer's context too."""
    seen = SubmitSeen()
    ad, sender, _failures = make_async(seen, cleanup)
    in_trace("trace-s", sender.put, "a")
    assert ad.stop(10) is True
    assert [(m, t) for m, _d, t in seen.calls] == [("a", "trace-s")]


def test_error_handler_runs_in_the_producers_context(cleanup: list[Callable[[], object]]) -> None:
    """The error handler of a failed message sees the producer's ContextVar (its log line keeps the trace id)."""
    handled: list[tuple[Any, str]] = []
    ad, sender, _failures = make_async(
        SubmitSeen(fail=True), cleanup, error_handler=lambda f: handled.append((f.message, TRACE_ID.get()))
    )
    in_trace("trace-f", sender.put, "a")
    ad.stop(10)  # its result depends on whether "a" failed before the stop began: not the point here
    assert handled == [("a", "trace-f")]


def test_a_var_set_inside_dispatch_does_not_leak(cleanup: list[Callable[[], object]]) -> None:
    """dispatch runs in a copy of the producer's context: what it sets stays out of the producer and later sends."""
    seen_before: list[str] = []

    class Setter:
        def dispatch(self, message: Any, target: str) -> str:
            seen_before.append(TRACE_ID.get())
            TRACE_ID.set("set-by-dispatch")
            return "id"

    ad, sender, _failures = make_async(Setter(), cleanup)
    sender.put("a")
    sender.put("b")
    assert ad.stop(10) is True
    assert seen_before == ["none", "none"]
    assert TRACE_ID.get() == "none"


def test_without_carry_context_dispatch_runs_in_the_loops_own_context(cleanup: list[Callable[[], object]]) -> None:
    """carry_context is opt-in: by default nothing is captured and dispatch does not see the producer's var."""
    seen = Seen()
    ad, sender, failures = make_async(seen, cleanup, carry_context=False)
    in_trace("trace-1", sender.put, "a", delay_seconds=3)
    assert ad.stop(10) is True
    assert seen.calls == [("a", 3, "none")]
    assert failures == []


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_carry_context_must_be_a_bool(bad: Any) -> None:
    """A non-bool carry_context raises ConfigurationError naming it."""
    with pytest.raises(ConfigurationError, match="carry_context"):
        AsyncDispatcher(Seen(), "orders", carry_context=bad)
