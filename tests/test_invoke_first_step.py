"""A coroutine run by ``call``/``invoke``: its first step runs at once, as a Task step, with the loop counted running.

What a coroutine sees must not depend on whether it finishes in its first step (no turn of
the loop) or waits (the rest under ``run_until_complete``): a running loop, a current Task,
its own copy of the caller's context, async generator hooks, and the loop's other work
(tasks it left behind, timers) still getting their turns.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from threaddispatch._invoke import BASE, OK, TimedCaller, call, close_thread_loop, invoke

pytestmark = pytest.mark.timeout(30)

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


def on_thread(fn: Any) -> Any:
    """``fn()`` on a fresh thread (its own private loop, closed after), its result."""
    box: list[Any] = []

    def body() -> None:
        try:
            box.append(fn())
        finally:
            close_thread_loop()

    thread = threading.Thread(target=body, name="test-first-step")
    thread.start()
    thread.join(20)
    assert not thread.is_alive() and box
    return box[0]


def test_a_coroutine_finishing_at_once_sees_a_running_loop_and_its_task() -> None:
    """get_running_loop(), current_task() and asyncio.timeout() work in a step that never waits."""

    async def look() -> tuple[bool, bool, bool]:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        async with asyncio.timeout(5) if hasattr(asyncio, "timeout") else _nothing():
            pass
        return loop.is_running(), task is not None, not task.done() if task else False

    assert on_thread(lambda: invoke(look)) == (True, True, True)


class _nothing:  # asyncio.timeout before 3.11
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


def test_the_loop_is_idle_again_after_a_first_step() -> None:
    """After the call the thread has no running loop: a second call, and asyncio.run, work."""

    async def one() -> int:
        return 1

    async def two() -> int:
        return 2

    def body() -> tuple[Any, Any, Any]:
        first = invoke(one)
        running = asyncio._get_running_loop()
        return first, running, asyncio.run(two())

    assert on_thread(body) == (1, None, 2)


def test_what_a_coroutine_sets_in_a_context_var_stays_in_its_task() -> None:
    """The coroutine runs in a copy of the caller's context, waiting or not."""

    async def set_at_once() -> str:
        before = VAR.get()
        VAR.set("inside")
        return before

    async def set_then_wait() -> str:
        VAR.set("inside")
        await asyncio.sleep(0)
        return VAR.get()

    def body() -> tuple[Any, ...]:
        VAR.set("caller")
        return invoke(set_at_once), VAR.get(), invoke(set_then_wait), VAR.get()

    assert on_thread(body) == ("caller", "caller", "inside", "caller")


def test_a_task_left_behind_still_gets_its_turn() -> None:
    """A task a quick coroutine starts and leaves runs its step during that call, as under run_until_complete."""
    ran = threading.Event()

    async def note() -> None:
        ran.set()

    async def fire_and_forget() -> str:
        asyncio.get_running_loop().create_task(note())
        return "done"

    assert on_thread(lambda: (invoke(fire_and_forget), ran.is_set())) == ("done", True)


def test_a_timer_left_behind_fires_in_a_later_call() -> None:
    """A callback scheduled on the loop by an earlier coroutine runs during a later call that waits for it."""
    fired = threading.Event()

    async def schedule() -> None:
        asyncio.get_running_loop().call_later(0.01, fired.set)

    async def wait_for_it() -> bool:
        for _ in range(1000):
            if fired.is_set():
                return True
            await asyncio.sleep(0.01)
        return False

    assert on_thread(lambda: (invoke(schedule), invoke(wait_for_it))[1]) is True


def test_an_async_generator_begun_in_a_first_step_is_finalized_by_the_loop() -> None:
    """The loop's async generator hooks are set during the step: close_thread_loop finalizes a generator left open."""
    closed = threading.Event()

    async def agen() -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            closed.set()

    held: list[Any] = []

    async def start_one() -> int:
        gen = agen()
        held.append(gen)  # kept open past the call
        return await gen.__anext__()

    assert on_thread(lambda: invoke(start_one)) == 1
    assert closed.is_set()  # on_thread's close_thread_loop ran shutdown_asyncgens


def test_outcomes_are_classified_alike_for_a_first_step() -> None:
    """A value, an Exception and a SystemExit raised without waiting are classified as before."""

    async def value() -> int:
        return 7

    async def error() -> None:
        raise ValueError("no")

    async def leave() -> None:
        raise SystemExit(3)

    def body() -> list[Any]:
        outcomes = [call(value), call(error), call(leave)]
        return [(o.kind, type(o.error).__name__ if o.error else o.value) for o in outcomes]

    assert on_thread(body) == [(OK, 7), ("error", "ValueError"), (BASE, "SystemExit")]


def test_a_timed_call_that_finishes_at_once_returns_its_value_on_the_runner() -> None:
    """TimedCaller: a coroutine finishing in its first step returns through the runner (its cancel: test_invoke)."""

    async def quick() -> str:
        return threading.current_thread().name

    caller = TimedCaller("test-first-step", timeout=5.0)
    try:
        outcome = caller.call(quick)
        assert outcome.kind == OK and outcome.value == "threaddispatch-test-first-step-call"
    finally:
        assert caller.close(10)


def test_a_function_whose_coroutines_wait_keeps_working_past_the_remembered_window() -> None:
    """Coroutines of a function that waits (run under run_until_complete for a while, then tried at once
    again) and of one that never waits, interleaved: every result and every task's context is right."""

    async def waits(i: int) -> tuple[int, str]:
        VAR.set(f"w{i}")
        await asyncio.sleep(0)
        return i, VAR.get()

    async def at_once(i: int) -> int:
        return -i

    def body() -> list[Any]:
        return [(invoke(waits, i), invoke(at_once, i)) for i in range(40)]

    assert on_thread(body) == [((i, f"w{i}"), -i) for i in range(40)]
