"""The shared cancel token: flag, wait across threads, raise_if_cancelled, subclassing, fork safety."""

from __future__ import annotations

import math
import os
import select
import signal
import threading

import pytest

from threaddispatch import _cancel
from threaddispatch._cancel import CancelToken
from threaddispatch.errors import CancelledError, ConfigurationError

pytestmark = pytest.mark.timeout(30)


def test_a_new_token_is_not_cancelled_and_has_no_event() -> None:
    """A fresh token is not cancelled; nothing is allocated until someone waits."""
    token = CancelToken()
    assert token.cancelled is False
    assert token._event is None
    token.raise_if_cancelled()  # does not raise
    assert token.wait(0) is False
    assert repr(token) == "<CancelToken cancelled=False>"


def test_cancel_sets_the_flag_once() -> None:
    """_cancel sets cancelled for good and reports whether it was the first to."""
    token = CancelToken()
    assert token._cancel() is True
    assert token._cancel() is False
    assert token.cancelled is True
    assert token.wait(0) is True
    assert token.wait(None) is True  # already cancelled: returns at once
    assert token._event is None  # no waiter ever needed one


def test_raise_if_cancelled() -> None:
    """raise_if_cancelled raises CancelledError (also concurrent.futures.CancelledError) once cancelled."""
    token = CancelToken()
    token._cancel()
    with pytest.raises(CancelledError, match="the work was cancelled"):
        token.raise_if_cancelled()
    import concurrent.futures

    with pytest.raises(concurrent.futures.CancelledError):
        token.raise_if_cancelled()


def test_a_wait_on_another_thread_wakes_on_cancel() -> None:
    """A thread blocked in wait() returns True as soon as another thread cancels."""
    token = CancelToken()
    result: list[bool] = []
    started = threading.Event()

    def waiter() -> None:
        started.set()
        result.append(token.wait(30))

    thread = threading.Thread(target=waiter, name="test-waiter")
    thread.start()
    assert started.wait(5)
    token._cancel()
    thread.join(30)
    assert result == [True]


def test_many_waiters_all_wake() -> None:
    """Every waiter wakes on one cancel, whichever of them created the event."""
    token = CancelToken()
    results: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(9)

    def waiter() -> None:
        barrier.wait(10)
        woke = token.wait(30)
        with lock:
            results.append(woke)

    threads = [threading.Thread(target=waiter, name=f"test-waiter-{i}") for i in range(8)]
    for thread in threads:
        thread.start()
    barrier.wait(10)
    token._cancel()
    for thread in threads:
        thread.join(30)
    assert results == [True] * 8


def test_cancel_racing_the_first_wait_is_never_missed() -> None:
    """Cancel and a first wait started together: the wait always returns True (flag re-read under the lock)."""
    for _ in range(200):
        token = CancelToken()
        barrier = threading.Barrier(2)
        seen: list[bool] = []

        def waiter(t: CancelToken = token, b: threading.Barrier = barrier, out: list[bool] = seen) -> None:
            b.wait(10)
            out.append(t.wait(30))

        thread = threading.Thread(target=waiter, name="test-racer")
        thread.start()
        barrier.wait(10)
        token._cancel()
        thread.join(30)
        assert seen == [True]


def test_wait_times_out_without_cancel() -> None:
    """wait(t) without a cancel returns False after t; negative means 0; infinity means no limit."""
    token = CancelToken()
    assert token.wait(0.001) is False
    assert token.wait(-5) is False  # wait(deadline - now) past the deadline is safe
    token._cancel()
    assert token.wait(math.inf) is True


def test_wait_refuses_a_non_number() -> None:
    """A timeout that is not a number of seconds raises ConfigurationError naming it."""
    token = CancelToken()
    for bad in ("1", math.nan, True, [1]):
        with pytest.raises(ConfigurationError, match="timeout"):
            token.wait(bad)  # type: ignore[arg-type]


class JobLikeToken(CancelToken):
    """How JobContext / CancellationToken would build on it: own slots, own message."""

    __slots__ = ("job_id",)

    def __init__(self, job_id: str) -> None:
        super().__init__()
        self.job_id = job_id

    def _cancelled_message(self) -> str:
        return f"job {self.job_id} was cancelled"


def test_a_subclass_adds_slots_and_names_what_was_cancelled() -> None:
    """A subclass keeps slots (no __dict__) and its raise_if_cancelled names the job."""
    token = JobLikeToken("j-1")
    assert not hasattr(token, "__dict__")
    assert token.wait(0) is False
    token._cancel()
    with pytest.raises(CancelledError, match="job j-1 was cancelled"):
        token.raise_if_cancelled()
    assert repr(token) == "<JobLikeToken cancelled=True>"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_a_fresh_module_lock() -> None:
    """The module lock, held by a parent thread at fork time, is replaced in the child: waits work there."""
    held = _cancel._lock
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
        if pid == 0:  # the child: a first wait takes the module lock
            code = 1
            try:
                token = CancelToken()
                waited = token.wait(0)
                token._cancel()
                code = 0 if (waited is False and token.wait(0) and _cancel._lock is not held) else 2
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
