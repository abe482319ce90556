"""LazyFuture (the request Future with a lazily made Condition) keeps the whole concurrent.futures.Future contract."""

from __future__ import annotations

import concurrent.futures as cf
import os
import select
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from threaddispatch._future import LazyFuture
from threaddispatch.requests import CancellationToken, RequestDispatcher

pytestmark = pytest.mark.timeout(30)


def settle_later(action: Any) -> threading.Thread:
    """Run ``action`` on a thread once the test thread is about to block (it starts at once; ordering is free)."""
    thread = threading.Thread(target=action, name="test-settler")
    thread.start()
    return thread


def test_result_set_before_any_wait_never_builds_a_condition() -> None:
    """A Future settled before anyone waits answers result/exception/done without making its Condition."""
    future = LazyFuture()
    assert not future.done() and not future.cancelled() and not future.running()
    future.set_result(42)
    assert future.done() and future.result(0) == 42 and future.exception(0) is None
    assert future._cond is None
    failed = LazyFuture()
    error = ValueError("boom")
    failed.set_exception(error)
    with pytest.raises(ValueError, match="boom"):
        failed.result(0)
    assert failed.exception(0) is error


def test_result_wakes_a_waiter_that_blocked_first() -> None:
    """result() blocks until another thread sets the result; no wake-up is lost around the Condition's creation."""
    for _ in range(200):
        future = LazyFuture()
        thread = settle_later(lambda f=future: f.set_result("ok"))
        assert future.result(10) == "ok"
        thread.join(10)


def test_exception_wakes_a_waiter_and_timeout_raises() -> None:
    """exception() waits for set_exception; a pending Future times out with TimeoutError."""
    future = LazyFuture()
    with pytest.raises(cf.TimeoutError):
        future.result(0.01)
    with pytest.raises(cf.TimeoutError):
        future.exception(0.01)
    thread = settle_later(lambda: future.set_exception(KeyError("k")))
    assert isinstance(future.exception(10), KeyError)
    thread.join(10)


def test_setting_twice_raises_invalid_state() -> None:
    """set_result/set_exception on a done Future raise InvalidStateError, as the base class does."""
    future = LazyFuture()
    future.set_result(1)
    with pytest.raises(cf.InvalidStateError):
        future.set_result(2)
    with pytest.raises(cf.InvalidStateError):
        future.set_exception(ValueError())
    cancelled = LazyFuture()
    assert cancelled.cancel()
    with pytest.raises(cf.InvalidStateError):
        cancelled.set_result(1)


def test_cancel_contract() -> None:
    """cancel() works on a pending Future (idempotently), not on a finished or running one; result then raises."""
    future = LazyFuture()
    assert future.cancel() and future.cancel()
    assert future.cancelled() and future.done()
    with pytest.raises(cf.CancelledError):
        future.result(0)
    with pytest.raises(cf.CancelledError):
        future.exception(0)
    finished = LazyFuture()
    finished.set_result(1)
    assert not finished.cancel() and not finished.cancelled()
    running = LazyFuture()
    assert running.set_running_or_notify_cancel() and running.running()
    assert not running.cancel()
    running.set_result(2)
    assert running.result(0) == 2
    assert not future.set_running_or_notify_cancel()


def test_cancel_wakes_a_blocked_result() -> None:
    """A result() blocked on the Future raises CancelledError when another thread cancels it."""
    future = LazyFuture()
    thread = settle_later(future.cancel)
    with pytest.raises(cf.CancelledError):
        future.result(10)
    thread.join(10)


def test_done_callbacks_run_once_in_order_and_immediately_when_done() -> None:
    """Callbacks added before settling run in order after it; one added after runs at once; errors are logged."""
    future = LazyFuture()
    calls: list[str] = []

    def broken(_f: cf.Future[Any]) -> None:
        raise RuntimeError("callback bug")

    future.add_done_callback(lambda f: calls.append(f"a:{f.result(0)}"))
    future.add_done_callback(broken)
    future.add_done_callback(lambda f: calls.append(f"b:{f.result(0)}"))
    future.set_result(7)
    future.add_done_callback(lambda f: calls.append("late"))
    assert calls == ["a:7", "b:7", "late"]
    other = LazyFuture()
    assert other._done_callbacks == []  # the shared class default stays empty
    cancelled = LazyFuture()
    cancelled.add_done_callback(lambda f: calls.append(f"cancelled={f.cancelled()}"))
    cancelled.cancel()
    assert calls[-1] == "cancelled=True"


@pytest.mark.parametrize("outcome", ["result", "exception", "cancel"])
def test_wait_and_as_completed_see_every_outcome(outcome: str) -> None:
    """concurrent.futures.wait and as_completed return when a LazyFuture settles, cancellation included."""
    futures = [LazyFuture() for _ in range(3)]
    futures[0].set_result(0)

    def settle() -> None:
        for future in futures[1:]:
            if outcome == "result":
                future.set_result(1)
            elif outcome == "exception":
                future.set_exception(ValueError())
            else:
                future.cancel()

    thread = settle_later(settle)
    done, not_done = cf.wait(futures, timeout=10)
    assert len(done) == 3 and not not_done
    thread.join(10)
    fresh: list[cf.Future[Any]] = [LazyFuture() for _ in range(3)]

    def settle_fresh() -> None:
        for future in fresh:
            if outcome == "cancel":
                future.cancel()
            else:
                future.set_result(2)

    thread = settle_later(settle_fresh)
    assert len(list(cf.as_completed(fresh, timeout=10))) == 3
    thread.join(10)
    assert all(not f._waiters for f in fresh)


def test_wait_first_completed_with_a_mix_of_futures() -> None:
    """wait(FIRST_COMPLETED) over a stock Future and a LazyFuture returns on the LazyFuture."""
    stock: cf.Future[int] = cf.Future()
    lazy = LazyFuture()
    thread = settle_later(lambda: lazy.set_result(1))
    done, _pending = cf.wait([stock, lazy], timeout=10, return_when=cf.FIRST_COMPLETED)
    assert lazy in done
    thread.join(10)


def test_repr_names_the_state() -> None:
    """repr shows pending, finished with the outcome type, and cancelled."""
    future = LazyFuture()
    assert "state=pending" in repr(future)
    future.set_result([])
    assert "returned list" in repr(future)
    cancelled = LazyFuture()
    cancelled.cancel()
    assert "state=cancelled" in repr(cancelled)


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def test_wait_returns_when_the_dispatcher_cancels_a_request(gate: threading.Event) -> None:
    """concurrent.futures.wait on a request Future returns when the request is deleted (it used to hang)."""

    def send(request: Any, token: CancellationToken) -> object:
        return gate.wait(10)

    rd: RequestDispatcher[Any, Any] = RequestDispatcher(send, max_workers=1)
    try:
        rd.pause("k")
        handle = rd.add("x", queue_key="k")
        thread = settle_later(handle.cancel)
        done, not_done = cf.wait([handle.future], timeout=10)
        assert handle.future in done and not not_done and handle.future.cancelled()
        thread.join(10)
        second = rd.add("y", queue_key="k")
        thread = settle_later(lambda: rd.delete("k", second.request_id))
        assert list(cf.as_completed([second.future], timeout=10)) == [second.future]
        thread.join(10)
    finally:
        rd.close(5)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_future_held_by_a_parent_thread_at_fork_time_does_not_block_the_childs_futures() -> None:
    """Each Future has its own lock: one held by a parent thread at fork time blocks nothing in the child."""
    busy = LazyFuture()
    held = busy._lock_of()
    entered = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with held:
            entered.set()
            release.wait(30)

    holder = threading.Thread(target=hold, name="test-holder")
    holder.start()
    assert entered.wait(5)
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # the child: settling a Future takes the module lock
            code = 1
            try:
                future = LazyFuture()
                future.set_result(7)
                code = 0 if future.result(0) == 7 and future._lock_of() is not held else 2
            finally:
                os.write(write_end, bytes([code]))
                os._exit(code)
        os.close(write_end)
        ready, _, _ = select.select([read_end], [], [], 20)
        if not ready:
            os.kill(pid, signal.SIGKILL)  # hung on the parent's lock copy
        status = os.read(read_end, 1) if ready else b"hung"
        _, wait_status = os.waitpid(pid, 0)
    finally:
        release.set()
        holder.join(10)
        os.close(read_end)
    assert status == b"\x00"
    assert os.waitstatus_to_exitcode(wait_status) == 0
