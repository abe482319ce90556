"""The shared WorkerPool: bounded threads, futures, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Any

import pytest

from threaddispatch import ConfigurationError, DispatcherClosedError
from threaddispatch._invoke import invoke
from threaddispatch._pool import WorkerPool
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(30)


def test_results_and_errors_travel_through_futures() -> None:
    """submit returns a Future carrying the callable's result or exception."""
    pool = WorkerPool(2, name="test-pool")
    assert pool.submit(lambda a, b: a + b, 2, 3).result(5) == 5

    def fail() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError):
        pool.submit(fail).result(5)
    assert pool.shutdown(5)


def test_never_more_than_max_workers_run_at_once() -> None:
    """With 3 workers and 12 blocking tasks, at most 3 run concurrently and all finish."""
    pool = WorkerPool(3, name="test-pool")
    lock = threading.Lock()
    running = peak = 0
    release = threading.Event()

    def task() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        release.wait(10)
        with lock:
            running -= 1

    futures = [pool.submit(task) for _ in range(12)]
    try:
        wait_for(lambda: running == 3, message="three tasks running")
        assert pool.busy() == 12  # 3 running, 9 waiting for a thread
    finally:
        release.set()
    for f in futures:
        f.result(10)
    assert peak == 3
    assert pool.wait_idle(time.monotonic() + 5)
    assert pool.shutdown(5)


def test_thread_names_and_daemon_flag() -> None:
    """Pool threads are daemons named threaddispatch-<name>-<n>."""
    pool = WorkerPool(1, name="named")
    info = pool.submit(lambda: (threading.current_thread().name, threading.current_thread().daemon)).result(5)
    assert info == ("threaddispatch-named-1", True)
    pool.shutdown(5)


def test_shutdown_is_idempotent_and_refuses_new_work() -> None:
    """After shutdown, submit raises DispatcherClosedError; a second shutdown returns True."""
    pool = WorkerPool(1, name="test-pool")
    pool.submit(lambda: None).result(5)
    assert pool.shutdown(5)
    assert pool.shutdown(5)
    with pytest.raises(DispatcherClosedError):
        pool.submit(lambda: None)


def test_shutdown_returns_within_its_timeout_with_a_hung_task() -> None:
    """A task that hangs cannot stretch shutdown past its timeout."""
    pool = WorkerPool(1, name="test-pool")
    release = threading.Event()
    started = threading.Event()

    def hang() -> None:
        started.set()
        release.wait(20)

    pool.submit(hang)
    assert started.wait(5)
    assert pool.shutdown(0.2) is False  # returned with the task still hung
    release.set()
    assert pool.shutdown(5)


def test_bad_max_workers_is_refused() -> None:
    """max_workers must be an int >= 1."""
    with pytest.raises(ConfigurationError, match="0"):
        WorkerPool(0, name="x")


def test_run_is_fire_and_forget_and_logs_errors(caplog: pytest.LogCaptureFixture) -> None:
    """run() schedules without a Future; an exception escaping the task is logged, the pool goes on."""
    pool = WorkerPool(2, name="test-pool")
    done = threading.Event()

    def fail() -> None:
        raise KeyError("missing")

    assert pool.run(fail) is None  # type: ignore[func-returns-value]  # run() returns no Future
    pool.run(done.set)
    assert done.wait(5)
    wait_for(lambda: "raised" in caplog.text, timeout=5)
    assert pool.wait_idle(time.monotonic() + 5)
    assert pool.shutdown(5)
    with pytest.raises(DispatcherClosedError):
        pool.run(done.set)


def test_shutdown_cancel_pending_drops_queued_runs_and_cancels_futures() -> None:
    """Queued run() tasks are dropped and queued submit() futures cancelled by shutdown(cancel_pending=True)."""
    pool = WorkerPool(1, name="test-pool")
    release = threading.Event()
    started = threading.Event()
    ran: list[int] = []

    def block() -> None:
        started.set()
        release.wait(5)

    pool.run(block)
    assert started.wait(5)
    pool.run(ran.append, 1)
    future = pool.submit(ran.append, 2)
    assert pool.busy() == 3
    threading.Timer(0.1, release.set).start()
    assert pool.shutdown(5, cancel_pending=True)
    assert future.cancelled()
    assert ran == []


def test_a_thread_that_cannot_start_leaves_no_task_or_thread_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the first worker thread cannot start, submit raises, and the task is not run later by another thread."""
    pool = WorkerPool(2, name="test-pool")
    real_start = threading.Thread.start
    ran: list[str] = []

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    with pytest.raises(RuntimeError, match="can't start"):
        pool.submit(ran.append, "lost")
    monkeypatch.setattr(threading.Thread, "start", real_start)
    assert pool.busy() == 0
    assert pool.submit(ran.append, "later").result(5) is None
    assert ran == ["later"]
    assert pool.shutdown(5)


@pytest.mark.timeout(30)
def test_a_worker_closes_its_event_loop_as_it_ends() -> None:
    """A pool thread that ran a coroutine closes its private loop on leaving: left-behind tasks are cancelled."""
    pool = WorkerPool(1, name="test-pool", idle_timeout=0.05)
    cancelled = threading.Event()

    async def linger() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def leave_a_task_behind() -> None:
        asyncio.get_running_loop().create_task(linger())
        await asyncio.sleep(0)  # let it start

    pool.submit(invoke, leave_a_task_behind).result(5)
    assert cancelled.wait(10), "the thread's loop was not closed with close_thread_loop"
    assert pool.shutdown(5)


@pytest.mark.timeout(30)
def test_run_raises_only_for_work_it_did_not_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread that cannot start while another lives: run returns and that thread runs the task later.

    The endpoint core relies on it: when run raises, it sends the batch itself, and no thread must send it too.
    """
    pool = WorkerPool(2, name="test-pool")
    release = threading.Event()
    started = threading.Event()
    ran: list[str] = []

    def block() -> None:
        started.set()
        assert release.wait(10)

    pool.run(block)
    assert started.wait(5)
    real_start = threading.Thread.start

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    pool.run(ran.append, "queued")  # no second thread, but the first one will reach it: no error
    monkeypatch.setattr(threading.Thread, "start", real_start)
    release.set()
    assert pool.wait_idle(time.monotonic() + 5)
    assert ran == ["queued"]
    assert pool.shutdown(5)


def test_run_next_runs_on_the_calling_worker_once_its_task_returns() -> None:
    """A task handing on work with run_next: that worker runs it next; no other thread starts or wakes for it."""
    pool = WorkerPool(4, name="test-pool")
    ran: list[tuple[int, int]] = []
    done = threading.Event()

    def step(n: int) -> None:
        ran.append((n, threading.get_ident()))
        if n < 20:
            pool.run_next(step, n + 1)
            assert len(ran) == n + 1  # not run yet: it waits for this task to return
        else:
            done.set()

    pool.run(step, 0)
    assert done.wait(10)
    assert [n for n, _ in ran] == list(range(21))
    assert len({thread for _, thread in ran}) == 1
    assert len(pool._state.threads) == 1  # none started for the hand-ons
    assert pool.shutdown(5)


def test_run_next_from_another_thread_is_run() -> None:
    """Outside the pool's threads (here the test's own) run_next queues the task for a worker as run does."""
    pool = WorkerPool(2, name="test-pool")
    threads: list[threading.Thread] = []
    pool.run_next(lambda: threads.append(threading.current_thread()))
    wait_for(lambda: bool(threads), timeout=10, message="the task ran")
    assert threads[0] is not threading.current_thread() and threads[0].name.startswith("threaddispatch-test-pool")
    assert pool.shutdown(5)
    with pytest.raises(DispatcherClosedError):
        pool.run_next(print)


@pytest.mark.timeout(120)
def test_tasks_queued_while_threads_come_and_go_all_run() -> None:
    """Every task runs while producers queue without the mutex and idle threads leave and start again.

    A task queued without the mutex (every thread busy) is taken by a thread still counted as
    running; with threads leaving after 1 ms idle that hand-over is exercised over and over.
    """
    pool = WorkerPool(3, name="test-pool", idle_timeout=0.001)
    total = 4 * 5_000
    lock = threading.Lock()
    seen: set[int] = set()

    def task(n: int) -> None:
        with lock:
            seen.add(n)
        if n % 7 == 0:
            pool.run_next(task, total + n)  # hand-ons too

    def produce(offset: int) -> None:
        for n in range(offset, offset + 5_000):
            pool.run(task, n)
            if n % 500 == 0:
                time.sleep(0.002)  # let threads go idle and leave

    producers = [threading.Thread(target=produce, args=(i * 5_000,), name=f"test-producer-{i}") for i in range(4)]
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join(60)
    expected = set(range(total)) | {total + n for n in range(0, total, 7)}
    wait_for(lambda: len(seen) == len(expected), timeout=60, message="every task ran")
    assert seen == expected
    assert pool.wait_idle(time.monotonic() + 10)
    assert pool.shutdown(10)


class _TakenBetweenCheckAndPop(deque):  # type: ignore[type-arg]
    """The pool's task deque, where the first emptiness check under the mutex (``not tasks``) is followed
    at once by another worker's lock-free pop of the only task (it runs it): the race a worker that
    checked, then popped, under the mutex lost to a worker taking its next task without it."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = threading.Event()  # set: the next check loses the task to the thief
        self.thief: threading.Thread | None = None

    def _check(self) -> int:
        length = super().__len__()
        if length and self.armed.is_set() and threading.current_thread().name.startswith("threaddispatch-raced"):
            self.armed.clear()
            future, fn, args = super().popleft()
            self.thief = threading.Thread(target=lambda: future.set_result(fn(*args)), name="thief")
            self.thief.start()
        return length

    # ``not tasks`` calls __bool__: on 3.10 a deque's truth test never calls a subclass's __len__.
    def __len__(self) -> int:
        return self._check()

    def __bool__(self) -> bool:
        return self._check() > 0


@pytest.mark.timeout(30)
def test_a_worker_whose_task_another_took_between_its_check_and_its_pop_survives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It died (IndexError: pop from an empty deque, seen on the 3.10 CI run) and stayed counted among
    the pool's threads, so with every other thread gone work queued behind it never ran."""
    died: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(repr(args.exc_value)))
    pool = WorkerPool(1, name="raced", idle_timeout=30)
    tasks = _TakenBetweenCheckAndPop()
    pool._state.tasks = tasks
    try:
        tasks.armed.set()
        first = pool.submit(lambda: "taken by the other worker")
        assert first.result(timeout=10) == "taken by the other worker"
        assert tasks.thief is not None
        tasks.thief.join(10)
        assert pool.submit(lambda: "after").result(timeout=10) == "after"
        assert died == []
    finally:
        assert pool.shutdown(10)


@pytest.mark.timeout(30)
def test_a_worker_ended_by_an_error_is_not_counted_and_later_work_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever ends a worker thread, the pool forgets it: believing itself full it would start no thread."""
    from threaddispatch import _pool

    died: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(repr(args.exc_value)))
    original = _pool._PoolState._work
    calls: list[int] = []

    def breaks_once(state: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a worker bug")
        original(state)

    monkeypatch.setattr(_pool._PoolState, "_work", breaks_once)
    pool = WorkerPool(1, name="broken", idle_timeout=30)
    try:
        pool.run(lambda: None)  # taken by nobody: its thread dies first
        wait_for(lambda: died != [], timeout=10, message="the first worker to die")
        wait_for(lambda: not pool._state.threads, timeout=10, message="the dead worker forgotten")
        assert pool.submit(lambda: "ran").result(timeout=10) == "ran"
    finally:
        assert pool.shutdown(10)
    assert died == ["RuntimeError('a worker bug')"]
