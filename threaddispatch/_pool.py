"""The one worker pool used by faces that run user work concurrently.

Not ``concurrent.futures.ThreadPoolExecutor``: once interpreter shutdown begins, an
executor refuses new work before ``atexit`` hooks run, which would break the exit
drain. This pool keeps accepting work during the drain (its threads already exist)
and, if it has no thread at all then, runs the work on the caller instead of
starting one. Threads start lazily, are daemons named ``threaddispatch-<name>-<n>``,
and leave after ``idle_timeout`` seconds without work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from threaddispatch import _lifecycle
from threaddispatch._invoke import close_thread_loop
from threaddispatch.errors import ConfigurationError, DispatcherClosedError

__all__ = ["WorkerPool"]

R = TypeVar("R")
_Task = tuple["Future[Any] | None", Callable[..., Any], tuple[Any, ...]]  # (future, fn, args); future None: run()

_log = logging.getLogger("threaddispatch.pool")

# .state: the _PoolState whose worker this thread is, for its whole life (None or unset: no worker).
_worker_of = threading.local()


class _PoolState:
    """Everything the worker threads touch; they hold this, never the pool, so the pool can be collected."""

    def __init__(self, name: str, max_workers: int, idle_timeout: float) -> None:
        self.name = name
        self.max_workers = max_workers
        self.idle_timeout = idle_timeout
        # mutex guards every field below; all_idle is a condition on it.
        self.mutex = threading.Lock()
        self.all_idle = threading.Condition(self.mutex)
        # Idle threads wait on their own lock, listed here (most recent last); wake_one() pops and
        # releases one. waking: threads so woken that have not taken the mutex back yet. Work is
        # handed on in a chain: a woken thread that leaves tasks behind wakes the next idle thread,
        # so whoever queues a burst wakes one thread, not one per task.
        self.sleepers: list[threading.Lock] = []
        self.waking = 0
        # (future, fn, args); future None for fire-and-forget work (WorkerPool.run).
        self.tasks: deque[_Task] = deque()
        self.threads: set[threading.Thread] = set()
        self.idle = 0
        self.running = 0
        self.shutdown = False
        self.serial = 0

    def wake_one(self) -> None:
        """Wake the most recently idle thread (mutex held; sleepers not empty)."""
        self.waking += 1
        self.sleepers.pop().release()

    def sleep(self, wake_lock: threading.Lock, timeout: float) -> None:
        """Wait (mutex held, released meanwhile) until woken by wake_one or ``timeout``; mutex held again after."""
        self.sleepers.append(wake_lock)
        self.mutex.release()
        try:
            woken = wake_lock.acquire(True, timeout)
        finally:
            self.mutex.acquire()
        if not woken:
            if wake_lock in self.sleepers:
                self.sleepers.remove(wake_lock)  # timed out
                return
            wake_lock.acquire()  # woken as the wait timed out: wake_one released it (under the mutex)
        self.waking -= 1

    def worker(self) -> None:
        _worker_of.state = self
        try:
            self._work()
        finally:
            _worker_of.state = None
            close_thread_loop()  # the private event loop of the coroutines this thread ran
            with self.mutex:
                # Already gone when _work returned; a thread ended by an error must not stay counted
                # either, or the pool, believing it full, would start no thread for the work queued next.
                self.threads.discard(threading.current_thread())

    def _work(self) -> None:
        tasks = self.tasks
        popleft = tasks.popleft
        wake_lock = threading.Lock()  # held while awake; released by wake_one
        wake_lock.acquire()
        finished = False  # whether this thread just ran a task (counted in running until the mutex is held)
        while True:
            if finished:
                # The next task without the mutex (deque.popleft is atomic): this thread stays
                # counted in running, so nothing the mutex guards changes. The mutex is taken only
                # to go idle, so workers that find work never queue on it (two workers taking it
                # per task convoyed on it: a request dispatcher's drain ran at a fifth of one
                # worker's rate with two; now at about one's).
                # (One GIL hand-off before going idle, for work others are about to hand on, doubled
                # an 8-worker drain of no-op requests but made 4 producers adding beside 8 workers
                # convoy on the dispatcher's lock: 70 µs per add instead of 11-14. Not done.)
                task = _pop(popleft)
                if task is not None:
                    future, fn, args = task
                    if tasks and self.sleepers and not self.waking:  # hints: checked again under the mutex
                        self._chain()
                    if future is None:
                        run_detached(fn, args)
                    else:
                        run_task(future, fn, args)
                    continue
            with self.mutex:
                if finished:
                    self.running -= 1
                    finished = False
                    if not self.running and not tasks:
                        self.all_idle.notify_all()
                if not tasks:
                    self.idle += 1
                    deadline = time.monotonic() + self.idle_timeout
                    while not tasks and not self.shutdown:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self.sleep(wake_lock, remaining)
                    self.idle -= 1
                    if not tasks:
                        self.threads.discard(threading.current_thread())
                        self.all_idle.notify_all()
                        return
                # _pop, not popleft: a worker taking its next task without the mutex may have taken
                # this one since the check (the thread then died of IndexError, still counted in threads).
                task = _pop(popleft)
                if task is None:
                    continue  # idle again
                future, fn, args = task
                self.running += 1
                if tasks and self.sleepers and not self.waking:
                    self.wake_one()  # the chain: the next idle thread comes for the rest
            if future is None:
                run_detached(fn, args)
            else:
                run_task(future, fn, args)
            finished = True

    def _chain(self) -> None:
        """Tasks wait and a thread sleeps: wake it for the rest (the chain), unless one is on its way."""
        with self.mutex:
            if self.tasks and self.sleepers and not self.waking:
                self.wake_one()


def _pop(popleft: Callable[[], _Task]) -> _Task | None:
    """The next task, or None if there is none (``deque.popleft`` raises IndexError then)."""
    try:
        return popleft()
    except IndexError:
        return None


def _take_back(tasks: deque[Any], task: object) -> bool:
    """Remove ``task`` (this very tuple: tasks may compare equal) from ``tasks``; False if a thread took it.

    Only while the pool has no thread (mutex held): workers pop without the mutex, and a pop
    between the scan and the ``del`` would shift the index onto another task. Producers may
    still append meanwhile; that leaves the index right, but ends the scan (RuntimeError): scan again.
    """
    while True:
        try:
            for index, queued in enumerate(tasks):
                if queued is task:
                    del tasks[index]
                    return True
            return False
        except RuntimeError:  # deque mutated during iteration: an append
            continue


def run_task(future: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Run ``fn(*args)`` into ``future`` unless it was cancelled; never raises."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args)
    except BaseException as error:  # noqa: BLE001 - delivered to the future's owner
        future.set_exception(error)
    else:
        future.set_result(result)


def run_detached(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Run fire-and-forget ``fn(*args)``; an exception escaping it is logged; never raises."""
    try:
        fn(*args)
    except BaseException:  # noqa: BLE001 - nobody waits for it: log it
        _log.exception("worker pool task %r raised", fn)


class WorkerPool:
    """Runs callables on up to ``max_workers`` daemon threads; ``submit`` never blocks.

    Thread-safe. Work queues without limit: callers bound it themselves (faces count
    what they have in flight).
    """

    def __init__(self, max_workers: int, *, name: str, idle_timeout: float = 30.0) -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ConfigurationError(f"max_workers must be an int >= 1, got {max_workers!r}")
        self._state = _PoolState(name, max_workers, idle_timeout)
        _lifecycle.register(self)

    @property
    def max_workers(self) -> int:
        return self._state.max_workers

    def submit(self, fn: Callable[..., R], /, *args: Any) -> Future[R]:
        """Schedule ``fn(*args)``; the Future carries its result or exception.

        Raises DispatcherClosedError after :meth:`shutdown`.
        """
        future: Future[R] = Future()
        if self._schedule(future, fn, args):
            # Exit drain with no thread left: do the work here rather than start a thread.
            run_task(future, fn, args)
        return future

    def run(self, fn: Callable[..., object], /, *args: Any) -> None:
        """Schedule ``fn(*args)`` fire-and-forget: no Future; an exception escaping ``fn`` is logged.

        Cheaper than :meth:`submit` for work that reports its own outcome. Raises
        DispatcherClosedError after :meth:`shutdown`, or the error of a thread that could
        not start when no thread is left to run ``fn``; whenever it raises, ``fn`` was not
        queued and never runs (so the caller may run it itself).
        """
        if self._schedule(None, fn, args):
            run_detached(fn, args)

    def run_next(self, fn: Callable[..., object], /, *args: Any) -> None:
        """Schedule ``fn(*args)`` like :meth:`run`, for the calling worker to run once its task returns.

        For a task handing on work as it ends (a finished attempt launching the next one): called
        on one of this pool's threads, it queues ``fn`` and wakes no other thread, so the caller
        takes it itself (after what was queued before it) instead of waking an idle thread and
        going to sleep: one wake-up and one sleep less per task. Only for a caller that returns
        soon: ``fn`` waits for it. From any other thread it is :meth:`run`. Raises like :meth:`run`.
        """
        state = self._state
        if getattr(_worker_of, "state", None) is not state:
            self.run(fn, *args)
            return
        # Without the mutex: this thread is counted in running and takes its next task without
        # it (deque.append is atomic), so the task cannot be stranded.
        if state.shutdown:
            raise DispatcherClosedError(f"worker pool {state.name!r} is shut down")
        state.tasks.append((None, fn, args))

    def _schedule(self, future: Future[Any] | None, fn: Callable[..., Any], args: tuple[Any, ...]) -> bool:
        """Queue the task for a thread; returns True when the caller must run it inline (exit drain)."""
        state = self._state
        task = (future, fn, args)
        if not state.idle and len(state.threads) >= state.max_workers and not state.shutdown:
            # Every thread exists and none is idle (hints): queue without the mutex (deque.append
            # is atomic). A thread counted in running looks at the tasks, under the mutex, before
            # it goes idle: counted after the append, one takes it. Else place it under the mutex.
            state.tasks.append(task)
            if state.running and not state.idle:
                return False
            with state.mutex:
                return self._place(task, queued=True)
        with state.mutex:
            return self._place(task, queued=False)

    def _place(self, task: _Task, *, queued: bool) -> bool:
        """Queue ``task`` (unless ``queued`` already) and see that a thread takes it; mutex held.

        Returns True when the caller must run it inline (the exit drain, no thread left);
        raises DispatcherClosedError after shutdown, or the error of a thread that could not
        start when none is left. Whenever it raises or returns True the task is out of the
        queue again (unless a thread took it meanwhile: then it runs there and this returns False).
        """
        state = self._state
        tasks = state.tasks
        if state.shutdown:
            # Queued without the mutex before this saw the shutdown: the threads left drain the queue
            # before they leave (they look at it under the mutex), so it runs; with none left, take it back.
            if queued and (state.threads or not _take_back(tasks, task)):
                return False
            raise DispatcherClosedError(f"worker pool {state.name!r} is shut down")
        if not queued:
            tasks.append(task)
        if state.idle >= len(tasks):
            if state.sleepers and not state.waking:
                state.wake_one()  # else a thread already on its way takes it, or hands it on
            return False
        if len(state.threads) < state.max_workers and not _lifecycle.exiting():
            state.serial += 1
            thread = threading.Thread(
                target=state.worker, name=f"threaddispatch-{state.name}-{state.serial}", daemon=True
            )
            state.threads.add(thread)
            try:
                thread.start()
            except BaseException:
                # No thread will ever run from this one: forget it, and take the task
                # back unless a running thread will reach it (the caller gets the error).
                state.threads.discard(thread)
                if not state.threads and _take_back(tasks, task):
                    raise
            return False
        if state.threads:
            return False
        return _take_back(tasks, task)

    def busy(self) -> int:
        """How many tasks are running or queued now."""
        with self._state.mutex:
            return self._state.running + len(self._state.tasks)

    def wait_idle(self, deadline: float) -> bool:
        """Block until nothing runs or waits, or until ``deadline`` (monotonic); returns whether idle."""
        state = self._state
        with state.mutex:
            while state.running or state.tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                state.all_idle.wait(remaining)
            return True

    def shutdown(self, timeout: float | None = None, *, cancel_pending: bool = False) -> bool:
        """Refuse new work, let queued work finish and threads leave; idempotent.

        Blocks up to ``timeout`` seconds (None: until done). Returns whether every
        thread left in time. With ``cancel_pending``, queued work is cancelled instead.
        """
        state = self._state
        deadline = None if timeout is None else time.monotonic() + timeout
        with state.mutex:
            state.shutdown = True
            if cancel_pending:
                while (task := _pop(state.tasks.popleft)) is not None:  # workers pop without the mutex
                    future = task[0]
                    if future is not None:
                        future.cancel()
            while state.sleepers:
                state.wake_one()
            threads = list(state.threads)
        _lifecycle.unregister(self)
        for thread in threads:
            if thread is threading.current_thread():
                continue
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(remaining)
        return not any(thread.is_alive() for thread in threads if thread is not threading.current_thread())

    def _drain_at_exit(self, deadline: float) -> tuple[int, int]:
        # The pool only waits: every owner (the faces, JobEngine's runtime) counts the work on its
        # busy threads in its own drain, so the pool reporting them too counted each entry twice.
        self.wait_idle(deadline)
        return (0, 0)

    def _reset_after_fork(self) -> None:
        old = self._state
        self._state = _PoolState(old.name, old.max_workers, old.idle_timeout)
        self._state.shutdown = old.shutdown
