"""Calling user code: sync or async on the current thread, classified outcomes, per-call timeouts."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import select
import signal
import threading
import time
import types
import warnings
from collections.abc import Callable, Generator
from typing import Any

import pytest

from threaddispatch import _invoke, _lifecycle
from threaddispatch._invoke import (
    BASE,
    CANCEL,
    ERROR,
    OK,
    RETRY,
    TIMEOUT,
    Outcome,
    TimedCaller,
    call,
    close_thread_loop,
    invoke,
)
from threaddispatch.errors import (
    Cancel,
    ConfigurationError,
    DispatcherClosedError,
    DispatchTimeoutError,
    Retry,
)
from threaddispatch.testing import live_dispatch_threads, wait_for

pytestmark = pytest.mark.timeout(60)


def ran_on(caller: TimedCaller) -> threading.Thread:
    """The runner thread that served one call (the call returns its ``current_thread()``)."""
    runner = caller.call(threading.current_thread).value
    assert isinstance(runner, threading.Thread)  # the call succeeded: its value is what the function returned
    return runner


def on_thread(fn: Callable[[], Any], *, close_loop: bool = True) -> Any:
    """Run ``fn`` on a fresh thread (a stand-in for a worker); return what it returned or raise what it raised."""
    box: list[Any] = []
    raised: list[BaseException] = []

    def body() -> None:
        try:
            box.append(fn())
        except BaseException as error:
            raised.append(error)
        finally:
            if close_loop:
                close_thread_loop()

    thread = threading.Thread(target=body, name="test-worker")
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    if raised:
        raise raised[0]
    return box[0]


async def double(x: int) -> int:
    await asyncio.sleep(0)
    return x * 2


class Awaitable42:
    """An awaitable that is not a coroutine (a custom __await__)."""

    def __await__(self) -> Generator[Any, None, int]:
        yield from asyncio.sleep(0).__await__()
        return 42


# -- call / invoke ---------------------------------------------------------------------------------


def test_a_plain_function_returns_its_value() -> None:
    """call() of a plain function is OK with its value; arguments are passed positionally."""
    outcome = call(lambda a, b: a + b, 2, 3)
    assert outcome.kind == OK and outcome.ok and outcome.value == 5 and outcome.error is None
    assert outcome.result() == 5
    assert invoke(lambda: "x") == "x"
    assert call(lambda: None).value is None


def test_an_async_def_function_is_awaited() -> None:
    """An async def function runs to completion; its return value is the outcome's value."""
    assert on_thread(lambda: call(double, 21)).value == 42
    assert on_thread(lambda: invoke(double, 4)) == 8


def test_a_plain_function_returning_an_awaitable_has_it_awaited() -> None:
    """A plain function returning a coroutine, or any awaitable, gets the awaited value."""
    assert on_thread(lambda: call(lambda: double(5))).value == 10
    assert on_thread(lambda: call(Awaitable42)).value == 42


def test_a_generator_based_coroutine_is_awaited_and_a_plain_generator_is_a_value() -> None:
    """A @types.coroutine generator is awaited; a plain generator is returned as is, every time."""

    @types.coroutine
    def old_style() -> Generator[Any, None, str]:
        yield from asyncio.sleep(0).__await__()
        return "old"

    def numbers() -> Generator[int, None, None]:
        yield 1

    def both() -> tuple[Outcome, Outcome, Outcome]:
        return call(numbers), call(old_style), call(numbers)

    first, old, again = on_thread(both)
    assert old.value == "old"
    assert isinstance(first.value, types.GeneratorType) and isinstance(again.value, types.GeneratorType)
    assert types.GeneratorType not in _invoke._plain_types


def test_a_type_seen_as_plain_still_awaits_other_types() -> None:
    """The per-type shortcut for plain results never hides an awaitable of another type."""

    def sometimes(n: int) -> object:
        return n if n % 2 else double(n)

    values = on_thread(lambda: [call(sometimes, n).value for n in range(6)])
    assert values == [0, 1, 4, 3, 8, 5]
    assert _invoke._plain_types.get(int) is False


def test_exceptions_are_classified() -> None:
    """An Exception is ERROR; Retry is RETRY with its delay; Cancel is CANCEL; each keeps the exception."""

    def fail(error: BaseException) -> None:
        raise error

    boom = ValueError("boom")
    outcome = call(fail, boom)
    assert outcome.kind == ERROR and outcome.error is boom and not outcome.ok
    assert outcome.retry is None and outcome.retry_delay is None and not outcome.cancel
    with pytest.raises(ValueError, match="boom"):
        outcome.result()

    retry = call(fail, Retry(2.5))
    assert retry.kind == RETRY and retry.retry is retry.error and retry.retry_delay == 2.5
    assert call(fail, Retry()).retry_delay is None
    cancel = call(fail, Cancel("stop"))
    assert cancel.kind == CANCEL and cancel.cancel and not cancel.timed_out


@pytest.mark.parametrize("error", [SystemExit(3), KeyboardInterrupt(), GeneratorExit(), asyncio.CancelledError()])
def test_a_base_exception_is_contained_sync(error: BaseException) -> None:
    """SystemExit, KeyboardInterrupt, GeneratorExit raised by user code fail the call as BASE; call() returns."""

    def fail() -> None:
        raise error

    outcome = call(fail)
    assert outcome.kind == BASE and outcome.error is error and not outcome.ok


@pytest.mark.parametrize("error", [ValueError("v"), Retry(1.0), SystemExit(4), KeyboardInterrupt(), GeneratorExit()])
def test_a_coroutines_exception_is_handled_like_a_plain_functions(error: BaseException) -> None:
    """Whatever a coroutine raises gets the same kind as from a plain function, and the thread's loop lives on."""

    def fail() -> None:
        raise error

    async def afail() -> None:
        await asyncio.sleep(0)
        raise error

    def both() -> tuple[Outcome, Outcome, Outcome]:
        return call(fail), call(afail), call(double, 1)  # the loop is still usable afterwards

    plain, coro, after = on_thread(both)
    assert coro.kind == plain.kind and coro.error is error
    assert after.value == 2


def test_invoke_propagates_what_the_code_raises() -> None:
    """invoke() raises the exception of a plain function and of a coroutine unchanged."""

    async def afail() -> None:
        raise KeyError("k")

    with pytest.raises(KeyError):
        on_thread(lambda: invoke(afail))
    with pytest.raises(ZeroDivisionError):
        invoke(lambda: 1 / 0)


def test_each_thread_has_its_own_loop_reused_across_calls() -> None:
    """Two calls on one thread share its loop; another thread gets another loop."""

    async def current_loop() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    first, second = on_thread(lambda: (invoke(current_loop), invoke(current_loop)))
    assert first is second
    other = on_thread(lambda: invoke(current_loop))
    assert other is not first
    assert first.is_closed() and other.is_closed()


def test_no_loop_is_nested_in_a_running_one() -> None:
    """Called from a thread whose own loop runs, an awaitable fails with RuntimeError (never awaited, no warning)."""

    async def users_code() -> tuple[Outcome, Outcome]:
        return call(double, 1), call(lambda: 7)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine ... was never awaited" would fail here
        nested, plain = on_thread(lambda: asyncio.run(users_code()))
        gc.collect()
    assert nested.kind == ERROR and isinstance(nested.error, RuntimeError)
    assert "event loop is running" in str(nested.error)
    assert plain.value == 7


def test_close_thread_loop_closes_and_cancels_leftover_tasks() -> None:
    """close_thread_loop cancels tasks a coroutine left behind, lets them finish, and closes the loop."""
    seen: dict[str, Any] = {}

    async def leave_a_task() -> None:
        async def forever() -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                seen["cancelled"] = True
                raise

        seen["task"] = asyncio.ensure_future(forever())
        seen["loop"] = asyncio.get_running_loop()
        await asyncio.sleep(0)

    on_thread(lambda: invoke(leave_a_task))
    assert seen["cancelled"] is True
    assert seen["task"].cancelled()
    assert seen["loop"].is_closed()


def test_close_thread_loop_without_a_loop_is_a_no_op() -> None:
    """A thread that never ran a coroutine has nothing to close; a second close is harmless too."""

    def close_twice() -> None:
        close_thread_loop()
        close_thread_loop()

    on_thread(close_twice)


def test_the_loop_is_closed_when_the_thread_ends_without_close() -> None:
    """A thread that ends without close_thread_loop still gets its loop closed (thread-local finalizer)."""

    async def current_loop() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    loop = on_thread(lambda: invoke(current_loop), close_loop=False)
    wait_for(lambda: gc.collect() is not None and loop.is_closed(), timeout=10, message="loop closed")


def test_a_later_call_after_close_gets_a_new_loop() -> None:
    """After close_thread_loop, the same thread makes a fresh loop for its next coroutine."""

    async def current_loop() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def body() -> tuple[asyncio.AbstractEventLoop, asyncio.AbstractEventLoop]:
        first = invoke(current_loop)
        close_thread_loop()
        return first, invoke(current_loop)

    first, second = on_thread(body)
    assert first is not second and first.is_closed()


# -- TimedCaller -----------------------------------------------------------------------------------


@pytest.fixture
def closing() -> Generator[list[TimedCaller], None, None]:
    """TimedCallers made by a test, closed after it (abandoned runners are released by the test)."""
    made: list[TimedCaller] = []
    yield made
    for caller in made:
        caller.close(10)


def make(closing: list[TimedCaller], timeout: float | None, **options: Any) -> TimedCaller:
    caller = TimedCaller("test", timeout=timeout, **options)
    closing.append(caller)
    return caller


def test_without_a_timeout_the_call_runs_on_the_callers_thread(closing: list[TimedCaller]) -> None:
    """timeout=None: no runner thread, the callable runs right here."""
    caller = make(closing, None)
    outcome = caller.call(threading.current_thread)
    assert outcome.value is threading.current_thread()
    assert not [t for t in live_dispatch_threads() if t.name == "threaddispatch-test-call"]
    assert caller.call_until(None, lambda: 3).value == 3


def test_with_a_timeout_the_call_runs_on_a_named_daemon_runner(closing: list[TimedCaller]) -> None:
    """A timed call runs on a daemon thread named threaddispatch-<component>-call; the runner is reused."""
    caller = make(closing, 30.0)
    first = caller.call(threading.current_thread).value
    second = caller.call(threading.current_thread).value
    assert isinstance(first, threading.Thread)
    assert first is second and first is not threading.current_thread()
    assert first.name == "threaddispatch-test-call" and first.daemon
    assert caller.call(double, 4).value == 8
    assert caller.stats()["abandoned_calls"] == 0


def test_a_timed_out_call_is_abandoned_and_a_later_call_still_runs(
    closing: list[TimedCaller], caplog: pytest.LogCaptureFixture
) -> None:
    """Past its timeout a call fails with DispatchTimeoutError; its thread is abandoned; a fresh runner goes on."""
    caller = make(closing, 0.05)
    release = threading.Event()
    hung_on: list[threading.Thread] = []

    def hang() -> str:
        hung_on.append(threading.current_thread())
        release.wait(30)
        return "late"

    outcome = caller.call(hang)
    assert outcome.kind == TIMEOUT and outcome.timed_out and not outcome.ok
    assert isinstance(outcome.error, DispatchTimeoutError) and isinstance(outcome.error, TimeoutError)
    assert "hang" in str(outcome.error) and "0.05" in str(outcome.error)
    assert caller.abandoned == 1
    after = caller.call_until(time.monotonic() + 30, threading.current_thread).value  # a far deadline: load-proof
    assert after is not hung_on[0]  # a fresh runner took over
    stats = caller.stats()
    assert stats["abandoned_calls"] == 1 and stats["calls_abandoned"] == 1 and stats["call_timeouts"] == 1
    with caplog.at_level(logging.WARNING, logger="threaddispatch"):
        release.set()
        wait_for(lambda: caller.abandoned == 0, timeout=10, message="abandoned call ended")
        hung_on[0].join(10)
    assert not hung_on[0].is_alive()  # an abandoned runner ends after its call
    assert caller.stats()["late_results"] == 1
    assert any("after its timeout" in r.getMessage() and "'late'" in r.getMessage() for r in caplog.records)


def test_a_coroutine_past_its_timeout_is_cancelled(closing: list[TimedCaller]) -> None:
    """At the timeout the coroutine's task is cancelled on its loop, so the abandoned thread ends soon."""
    caller = make(closing, 0.05)
    cancelled = threading.Event()

    async def hang() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    outcome = caller.call(hang)
    assert outcome.timed_out
    assert cancelled.wait(10)
    wait_for(lambda: caller.abandoned == 0, timeout=10, message="cancelled call ended")


def test_a_coroutine_timed_out_before_its_task_existed_is_cancelled_at_start() -> None:
    """If the caller abandons a call before the runner made its Task, the runner cancels the task itself."""
    state = _invoke._CallerState("test", 4, 1.0)
    started = threading.Event()

    async def never_runs() -> None:
        started.set()

    work = _invoke._Call(never_runs, ())
    work.abandoned = True
    outcome = on_thread(lambda: state._run_call(work))
    assert outcome.kind == BASE and isinstance(outcome.error, asyncio.CancelledError)
    assert not started.is_set()


def test_abandoned_threads_are_bounded_and_a_waiting_caller_keeps_its_deadline(closing: list[TimedCaller]) -> None:
    """At max_abandoned hung calls, the next call waits for a slot; none frees in time: it times out unrun."""
    caller = make(closing, 0.05, max_abandoned=2)
    release = threading.Event()
    ran: list[str] = []

    def hang(name: str) -> None:
        ran.append(name)
        release.wait(30)

    assert caller.call(hang, "a").timed_out
    assert caller.call(hang, "b").timed_out
    assert caller.abandoned == 2
    outcome = caller.call(hang, "c")
    assert outcome.timed_out and "abandoned calls to end" in str(outcome.error)
    assert ran == ["a", "b"]  # c never ran: no third thread leaked
    assert len([t for t in live_dispatch_threads() if t.name == "threaddispatch-test-call"]) == 2
    release.set()
    wait_for(lambda: caller.abandoned == 0, timeout=10, message="abandoned calls ended")
    assert caller.call_until(time.monotonic() + 30, lambda: "d").value == "d"


def test_a_waiting_caller_runs_when_an_abandoned_call_ends_in_time(closing: list[TimedCaller]) -> None:
    """A call waiting for a slot runs as soon as an abandoned call ends within its deadline."""
    caller = make(closing, 0.05, max_abandoned=1)
    release = threading.Event()
    assert caller.call(release.wait, 30).timed_out
    result: list[Outcome] = []

    def wait_then_run() -> None:
        # This call's deadline is far: the release comes first.
        result.append(caller.call_until(time.monotonic() + 30, lambda: "ran"))

    waiter = threading.Thread(target=wait_then_run, name="test-waiter")
    waiter.start()
    wait_for(lambda: caller._state.slot_waiters == 1, timeout=10, message="caller waits for a slot")
    release.set()
    waiter.join(30)
    assert result[0].value == "ran"


def test_a_base_exception_does_not_kill_the_runner(closing: list[TimedCaller]) -> None:
    """SystemExit and KeyboardInterrupt from a timed call fail it; the same runner takes the next call."""
    caller = make(closing, 30.0)
    runner = caller.call(threading.current_thread).value

    def die(error: BaseException) -> None:
        raise error

    async def adie() -> None:
        raise KeyboardInterrupt

    assert caller.call(die, SystemExit(1)).kind == BASE
    assert caller.call(adie).kind == BASE
    assert caller.call(die, Retry(0.5)).retry_delay == 0.5
    assert caller.call(threading.current_thread).value is runner


def test_concurrent_callers_get_their_own_runners(closing: list[TimedCaller]) -> None:
    """Two threads calling at once run at once (a barrier both must reach), not one after the other."""
    caller = make(closing, 30.0)
    barrier = threading.Barrier(2)
    results: list[Outcome] = []
    lock = threading.Lock()

    def side() -> None:
        outcome = caller.call(barrier.wait, 20)
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=side, name=f"test-side-{i}") for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(o.kind for o in results) == [OK, OK]


def test_close_stops_the_runners_and_refuses_later_calls(closing: list[TimedCaller]) -> None:
    """close() lets runners leave, returns True, is idempotent; a call after it raises DispatcherClosedError."""
    caller = make(closing, 30.0)
    runner = ran_on(caller)
    assert caller.close(10) is True
    assert not runner.is_alive()
    assert caller.close(10) is True
    with pytest.raises(DispatcherClosedError):
        caller.call(lambda: None)


def test_idle_runners_leave_after_idle_timeout(closing: list[TimedCaller]) -> None:
    """A runner without work for idle_timeout seconds ends; the next call starts a new one."""
    caller = make(closing, 30.0, idle_timeout=0.01)
    first = ran_on(caller)
    first.join(10)
    assert not first.is_alive()
    assert caller.call(lambda: 1).value == 1


def test_an_unreferenced_caller_lets_its_runners_go() -> None:
    """A TimedCaller nobody references is collected and its runner threads leave."""
    caller = TimedCaller("test", timeout=30.0)
    runner = ran_on(caller)
    del caller
    gc.collect()
    runner.join(10)
    assert not runner.is_alive()


def test_a_runner_that_cannot_start_fails_the_call(closing: list[TimedCaller], monkeypatch: pytest.MonkeyPatch) -> None:
    """When no thread can be started, the call fails with that RuntimeError and nothing is left registered."""
    caller = make(closing, 30.0)

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    outcome = caller.call(lambda: 1)
    assert outcome.kind == ERROR and "can't start" in str(outcome.error)
    assert not caller._state.runners
    monkeypatch.undo()
    assert caller.call(lambda: 2).value == 2


def test_during_the_exit_drain_no_runner_is_started(
    closing: list[TimedCaller], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the exit drain began, a call with no idle runner runs on the caller's thread instead."""
    caller = make(closing, 30.0)
    monkeypatch.setattr(_lifecycle, "exiting", lambda: True)
    assert caller.call(threading.current_thread).value is threading.current_thread()


def test_bad_arguments_are_refused_naming_them() -> None:
    """Component, timeout, max_abandoned and idle_timeout are checked at construction."""
    with pytest.raises(ConfigurationError, match="component"):
        TimedCaller("", timeout=1.0)
    for bad in (0, -1, "1", float("nan")):
        with pytest.raises(ConfigurationError, match="timeout"):
            TimedCaller("test", timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="max_abandoned"):
        TimedCaller("test", timeout=1.0, max_abandoned=0)
    with pytest.raises(ConfigurationError, match="idle_timeout"):
        TimedCaller("test", timeout=1.0, idle_timeout=0)


def test_outcome_repr_names_kind_and_detail() -> None:
    """An Outcome's repr shows its kind and the value or error."""
    assert repr(Outcome(OK, 3)) == "<Outcome ok 3>"
    assert repr(call(lambda: 1 / 0)).startswith("<Outcome error ZeroDivisionError(")


# -- fork ------------------------------------------------------------------------------------------


def run_in_child(body: Callable[[], bool]) -> None:
    """Fork; in the child run ``body`` and exit 0 if it returned True; fail here otherwise (bounded wait)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if body() else 2
        except BaseException:
            code = 3
        finally:
            os.write(write_end, bytes([code]))
            os._exit(code)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 30)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        status = os.read(read_end, 1) if ready else b"hung"
    finally:
        os.waitpid(pid, 0)
        os.close(read_end)
    assert status == b"\x00", f"child failed: {status!r}"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_starts_with_no_runner(closing: list[TimedCaller]) -> None:
    """A child forked while the parent has a runner and an abandoned call starts clean and can call."""
    caller = make(closing, 0.05)
    release = threading.Event()
    parent_runner = caller.call_until(time.monotonic() + 30, threading.current_thread).value
    assert caller.call(release.wait, 30).timed_out
    assert caller.abandoned == 1

    def child() -> bool:
        fresh = caller.stats() == {
            "abandoned_calls": 0,
            "max_abandoned_calls": 4,
            "call_timeouts": 0,
            "calls_abandoned": 0,
            "late_results": 0,
        }
        clean = not caller._state.idle and not caller._state.runners
        runner = caller.call_until(time.monotonic() + 30, threading.current_thread).value
        async_ok = caller.call_until(time.monotonic() + 30, double, 3).value == 6
        return fresh and clean and runner is not parent_runner and async_ok and caller.close(10)

    try:
        run_in_child(child)
    finally:
        release.set()
    wait_for(lambda: caller.abandoned == 0, timeout=10, message="parent's abandoned call ended")
    assert caller.call_until(time.monotonic() + 30, double, 5).value == 10  # the parent is unaffected


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_replaces_its_inherited_loop_and_the_parents_keeps_working() -> None:
    """The child closes the loop it inherited and makes its own; the parent's loop still sees its
    wake-up socket afterwards (closing an epoll loop in the child would unregister it in the parent)."""

    async def current_loop() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    async def woken_from_another_thread() -> str:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        threading.Thread(
            target=lambda: loop.call_soon_threadsafe(future.set_result, "woken"), name="test-waker"
        ).start()
        return await asyncio.wait_for(future, 20)

    def parent_side() -> None:
        parent_loop = invoke(current_loop)

        def child() -> bool:
            child_loop = invoke(current_loop)
            woke = invoke(woken_from_another_thread) == "woken"
            close_thread_loop()
            return child_loop is not parent_loop and parent_loop.is_closed() and woke

        run_in_child(child)
        assert not parent_loop.is_closed()
        assert invoke(current_loop) is parent_loop
        # The parent's selector must still report its self-pipe readable once written to (asyncio
        # internals, read only here): a select that waits the full 10 s means it was unregistered.
        selector = parent_loop._selector
        parent_loop._write_to_self()
        ready = selector.select(10)
        assert any(key.fd == parent_loop._ssock.fileno() for key, _ in ready)
        assert invoke(woken_from_another_thread) == "woken"

    on_thread(parent_side)
