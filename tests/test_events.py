"""EventEmitter: ordering, once, off, contained listener errors."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any

import pytest

from threaddispatch import EventEmitter


def test_listeners_run_in_order_with_the_arguments() -> None:
    """emit calls every listener of the event in registration order and reports whether there were any."""
    emitter = EventEmitter()
    calls: list[tuple[str, object]] = []
    emitter.on("sent", lambda payload: calls.append(("a", payload)))
    emitter.on("sent", lambda payload: calls.append(("b", payload)))
    assert emitter.emit("sent", {"n": 1}) is True
    assert emitter.emit("other") is False
    assert calls == [("a", {"n": 1}), ("b", {"n": 1})]


def test_once_fires_once_even_under_concurrent_emits() -> None:
    """A once-listener runs exactly once when many threads emit at the same time."""
    emitter = EventEmitter()
    hits: list[int] = []
    emitter.once("tick", lambda: hits.append(1))
    barrier = threading.Barrier(8)

    def fire() -> None:
        barrier.wait()
        emitter.emit("tick")

    threads = [threading.Thread(target=fire) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert hits == [1]
    assert emitter.listener_count("tick") == 0


def test_off_and_the_returned_unsubscribe_remove_a_listener() -> None:
    """off(fn) and the callable returned by on() both remove the registration."""
    emitter = EventEmitter()
    calls: list[str] = []

    def a() -> None:
        calls.append("a")

    unsubscribe = emitter.on("e", lambda: calls.append("b"))
    emitter.on("e", a)
    assert emitter.off("e", a) is True
    assert emitter.off("e", a) is False
    assert unsubscribe() is True
    emitter.emit("e")
    assert calls == []


def test_off_removes_a_once_listener_by_its_function() -> None:
    """A listener added with once() can be removed with off(fn) before it fires."""
    emitter = EventEmitter()
    calls: list[int] = []

    def fn() -> None:
        calls.append(1)

    emitter.once("e", fn)
    assert emitter.off("e", fn)
    emitter.emit("e")
    assert calls == []


def test_a_raising_listener_is_logged_and_the_rest_still_run(caplog: pytest.LogCaptureFixture) -> None:
    """Listener errors never reach the emitter's caller; later listeners run; the error is counted."""
    emitter = EventEmitter()
    calls: list[str] = []

    def broken() -> None:
        raise RuntimeError("listener bug")

    emitter.on("e", broken)
    emitter.on("e", lambda: calls.append("after"))
    with caplog.at_level(logging.ERROR, logger="threaddispatch.events"):
        assert emitter.emit("e")
    assert calls == ["after"]
    assert emitter.listener_errors == 1
    assert "listener bug" in caplog.text


def test_remove_all_listeners_for_one_event_or_all() -> None:
    """remove_all_listeners(event) clears one event; without an argument clears all."""
    emitter = EventEmitter()
    emitter.on("a", lambda: None)
    emitter.on("b", lambda: None)
    emitter.remove_all_listeners("a")
    assert (emitter.listener_count("a"), emitter.listener_count("b")) == (0, 1)
    emitter.remove_all_listeners()
    assert emitter.listener_count("b") == 0


def test_known_events_and_bad_listeners_are_checked() -> None:
    """An unknown event name or a non-callable listener raises at on()."""
    emitter = EventEmitter(known_events=frozenset({"sent"}))
    with pytest.raises(ValueError, match="nope"):
        emitter.on("nope", lambda: None)
    with pytest.raises(TypeError, match="callable"):
        emitter.on("sent", 5)  # type: ignore[arg-type]


def test_a_listener_may_remove_itself_while_being_called() -> None:
    """Emitting works on a snapshot: a listener removing itself does not skip the next one."""
    emitter = EventEmitter()
    calls: list[str] = []

    def first() -> None:
        calls.append("first")
        emitter.off("e", first)

    emitter.on("e", first)
    emitter.on("e", lambda: calls.append("second"))
    emitter.emit("e")
    emitter.emit("e")
    assert calls == ["first", "second", "second"]


@pytest.mark.timeout(10)
def test_a_once_listener_firing_does_not_remove_the_same_function_added_with_on() -> None:
    """When ``once(fn)`` fires, it removes its own registration, not an ``on(fn)`` of the same function."""
    emitter = EventEmitter()
    calls: list[int] = []

    def listener(n: int) -> None:
        calls.append(n)

    emitter.on("tick", listener)
    emitter.once("tick", listener)
    emitter.emit("tick", 1)
    assert calls == [1, 1]
    assert emitter.listener_count("tick") == 1
    emitter.emit("tick", 2)
    assert calls == [1, 1, 2]


# -- the contract: async listeners, contained BaseExceptions, fork -------------------------------


def test_async_listeners_are_awaited_in_order_on_the_emitting_thread() -> None:
    """``async def`` listeners (``on`` and ``once``) run to completion before emit returns, in order."""
    emitter = EventEmitter()
    calls: list[tuple[str, object, str]] = []

    async def first(payload: object) -> None:
        await asyncio.sleep(0)
        calls.append(("first", payload, threading.current_thread().name))

    async def once(payload: object) -> None:
        calls.append(("once", payload, threading.current_thread().name))

    emitter.on("e", first)
    emitter.once("e", once)
    emitter.on("e", lambda payload: calls.append(("plain", payload, threading.current_thread().name)))
    assert emitter.emit("e", 1)
    assert emitter.emit("e", 2)
    here = threading.current_thread().name
    assert calls == [
        ("first", 1, here),
        ("once", 1, here),
        ("plain", 1, here),
        ("first", 2, here),
        ("plain", 2, here),
    ]
    assert emitter.listener_errors == 0


def test_a_plain_listener_returning_an_awaitable_has_it_awaited() -> None:
    emitter = EventEmitter()
    done: list[int] = []

    async def work(n: int) -> None:
        done.append(n)

    def plain(n: int) -> Coroutine[Any, Any, None]:
        return work(n)  # not an async def itself: what it returns is awaited

    emitter.on("e", plain)
    emitter.emit("e", 7)
    assert done == [7]


def test_an_async_listener_that_raises_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    emitter = EventEmitter()
    calls: list[str] = []

    async def broken() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("async listener bug")

    emitter.on("e", broken)
    emitter.on("e", lambda: calls.append("after"))
    with caplog.at_level(logging.ERROR, logger="threaddispatch.events"):
        assert emitter.emit("e")
    assert calls == ["after"]
    assert emitter.listener_errors == 1
    assert "async listener bug" in caplog.text


@pytest.mark.parametrize("error", [SystemExit(2), KeyboardInterrupt(), GeneratorExit()])
def test_a_base_exception_from_a_listener_is_contained(error: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    """SystemExit, KeyboardInterrupt, GeneratorExit from a listener: logged and counted, never raised to emit."""
    emitter = EventEmitter()
    calls: list[str] = []

    def broken() -> None:
        raise error

    emitter.on("e", broken)
    emitter.on("e", lambda: calls.append("after"))
    with caplog.at_level(logging.ERROR, logger="threaddispatch.events"):
        assert emitter.emit("e")
    assert calls == ["after"]
    assert emitter.listener_errors == 1
    assert type(error).__name__ in caplog.text


def test_an_async_listener_on_a_thread_with_a_running_loop_is_an_error_not_a_hang() -> None:
    """Emitting from inside a running event loop cannot nest a loop: the listener fails, counted."""
    emitter = EventEmitter()

    async def listener() -> None:
        pass

    emitter.on("e", listener)

    async def main() -> None:
        emitter.emit("e")

    asyncio.run(main())
    assert emitter.listener_errors == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.timeout(30)
def test_a_forked_child_gets_a_fresh_listener_lock() -> None:
    """A lock held by another thread at fork time is replaced in the child: emit and on work there."""
    emitter = EventEmitter()
    emitter.on("e", lambda: None)
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with emitter._listeners_lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: exit at once, whatever happens
            code = 1
            try:
                emitter.on("e", lambda: None)
                code = 0 if emitter.emit("e") and emitter.listener_count("e") == 2 else 1
            finally:
                os._exit(code)
    finally:
        release.set()
        holder.join(10)
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
