"""Calling user code: one contract for every face (sync or async, per-call timeout, contained errors).

:func:`invoke` runs ``fn(*args)`` on the current thread and returns its value; when
``fn`` is an ``async def`` function, or a plain function that returns an awaitable,
the awaitable is run to completion on the current thread's private event loop.
:func:`call` does the same and never raises: it returns an :class:`Outcome` that
classifies what happened (a value, an Exception, a ``Retry`` or ``Cancel`` flow
signal, a BaseException such as SystemExit or KeyboardInterrupt, or a timeout), which
is what a face's retry decision (``RetryPolicy``) needs. :class:`TimedCaller` adds a
per-call timeout: the call runs on a private runner thread, the caller waits with a
deadline, and a call that runs past it is abandoned (bounded) while a fresh runner
takes the next call.

Awaited once, never twice: what an awaited awaitable returns is the call's value, and
that value must not itself be awaitable. An ``async def`` whose last line is ``return
post(x)`` (a forgotten ``await``), or a plain function returning ``wrapper()`` whose
coroutine returns ``post()``, fails with a TypeError naming what came back, counted and
reported like any other failure of the call, never as delivered. The value is closed
when it is a coroutine (no "never awaited" RuntimeWarning, and its body never runs
later) and cancelled when it is a pending Future of this thread's loop (it would run at
the loop's next turn, after the call was reported failed); any other awaitable is left
as it is. Refused, not chained: ``asyncio`` returns such a coroutine as a plain value
(``await send()`` hands it back unrun), trio raises TypeError for a function that does
not give it what it expects, and huey refuses async functions outright; awaiting it here
would make a slip that breaks under ``asyncio.run`` look correct under threaddispatch.
The message names the user's function: a face that wraps it (a span, a carried context,
a job's cancellable task, a middleware chain) checks inside its wrapper with the user's
callable as the subject (:func:`settled`, :func:`awaited`, :func:`resolve`), so what its
own wrapper returns is never awaitable and the wrapper is never named.

A coroutine's first step runs at once, as a Task step with the loop counted running
(``_run_task``): one that finishes without waiting for anything costs no turn of the
loop; one that waits goes on under ``run_until_complete``.

The per-thread loop: made lazily by the first awaitable a thread runs, never
started on a thread whose own event loop is running (the user's), and closed when the
thread ends. Two ways, both in place: worker loops call :func:`close_thread_loop` in
their ``finally`` (deterministic: it cancels the tasks a coroutine left behind, lets
them finish and shuts down async generators, which needs the loop to run once more,
on its own thread); and the loop's holder sits in a ``threading.local``, whose value
is dropped when the thread ends, so a thread that never calls it (a pool thread
leaving on its idle timeout, a user's thread) still gets its loop closed, without the
task clean-up (a finalizer must not run the loop). The loop uses ``PollSelector``
where there is one: its state lives in the process, so a forked child can close the
loop it inherited without touching the parent's (an epoll instance is shared across
fork, and closing an epoll loop unregisters the parent's wake-up socket).

Fork: a child starts with no runner threads (the lifecycle registry resets every
TimedCaller) and with no usable per-thread loop (the forking thread's loop is closed
and replaced at its next use: its wake-up socket pair is shared with the parent).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
import threading
import time
import types
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, Literal, TypeGuard

from threaddispatch import _lifecycle
from threaddispatch._validate import check_int, check_seconds, check_text, show
from threaddispatch.errors import Cancel, DispatcherClosedError, DispatchTimeoutError, Retry

if TYPE_CHECKING:
    import asyncio  # at run time imported where an awaitable is run: plain calls never load asyncio

__all__ = [
    "BASE",
    "CANCEL",
    "ERROR",
    "OK",
    "RETRY",
    "TIMEOUT",
    "Outcome",
    "OutcomeKind",
    "TimedCaller",
    "awaited",
    "call",
    "classify",
    "close_thread_loop",
    "describe",
    "invoke",
    "resolve",
    "settled",
]

_log = logging.getLogger("threaddispatch")

OutcomeKind = Literal["ok", "error", "retry", "cancel", "base", "timeout"]
OK: Final = "ok"  # returned a value
ERROR: Final = "error"  # raised an Exception (not a flow signal)
RETRY: Final = "retry"  # raised errors.Retry: another attempt, after Retry.delay if set
CANCEL: Final = "cancel"  # raised errors.Cancel: no further attempt
BASE: Final = "base"  # raised a BaseException that is not an Exception (SystemExit, KeyboardInterrupt, ...)
TIMEOUT: Final = "timeout"  # ran past its timeout (TimedCaller): error is a DispatchTimeoutError


class Outcome:
    """How one call of user code ended. Immutable by convention; cheap to make.

    ``kind`` is one of the constants above; ``value`` is the return value (``kind ==
    "ok"``) and ``error`` the exception otherwise. Every non-ok kind is a failure of the
    call; ``retry``/``cancel`` say what the user asked for, ``timed_out`` whether the
    failure is a timeout (the error is then a DispatchTimeoutError).
    """

    __slots__ = ("error", "kind", "value")

    def __init__(self, kind: OutcomeKind, value: object = None, error: BaseException | None = None) -> None:
        self.kind = kind
        self.value = value
        self.error = error

    @property
    def ok(self) -> bool:
        """Whether the call returned (no exception)."""
        return self.kind == OK

    @property
    def timed_out(self) -> bool:
        """Whether the call ran past its timeout."""
        return self.kind == TIMEOUT

    @property
    def retry(self) -> Retry | None:
        """The ``Retry`` the call raised, or None."""
        error = self.error
        return error if isinstance(error, Retry) else None

    @property
    def retry_delay(self) -> float | None:
        """The delay the call's ``Retry`` asked for (None: none raised, or no delay given)."""
        error = self.error
        return error.delay if isinstance(error, Retry) else None

    @property
    def cancel(self) -> bool:
        """Whether the call raised ``Cancel`` (no further attempt)."""
        return self.kind == CANCEL

    def result(self) -> object:
        """The value, or raise the error (for callers that want the exception back)."""
        if self.error is not None:
            raise self.error
        return self.value

    def __repr__(self) -> str:
        detail = show(self.value) if self.kind == OK else show(self.error)
        return f"<Outcome {self.kind} {detail}>"


def classify(error: BaseException) -> Outcome:
    """The Outcome of a call of user code that raised ``error`` (what :func:`call` returns for it).

    For a face that calls user code directly on its hot path (see :func:`resolve`) and
    classifies what it raised as :func:`call` would.
    """
    if isinstance(error, Exception):
        if isinstance(error, Retry):
            return Outcome(RETRY, None, error)
        if isinstance(error, Cancel):
            return Outcome(CANCEL, None, error)
        return Outcome(ERROR, None, error)
    return Outcome(BASE, None, error)


def describe(fn: object) -> str:
    """A short name of a callable for messages: its qualified name, or its repr."""
    name = getattr(fn, "__qualname__", None)
    return name if isinstance(name, str) else show(fn)


# -- the per-thread event loop -----------------------------------------------------------------

# Bumped in a forked child: a holder made before the fork belongs to the parent's loop.
_generation = 0


def _new_generation_after_fork() -> None:
    global _generation
    _generation += 1


_lifecycle.at_fork_child(_new_generation_after_fork)


def _new_loop() -> asyncio.AbstractEventLoop:
    import asyncio
    import selectors

    if hasattr(selectors, "PollSelector"):
        return asyncio.SelectorEventLoop(selectors.PollSelector())
    return asyncio.new_event_loop()


class _LoopHolder:
    """One thread's private loop; closes it when dropped (the thread ended without close_thread_loop)."""

    __slots__ = ("generation", "loop")

    def __init__(self) -> None:
        self.loop = _new_loop()
        self.generation = _generation

    def __del__(self) -> None:
        loop = self.loop
        if not loop.is_closed() and not loop.is_running():
            with contextlib.suppress(Exception):  # at interpreter exit the loop's modules may be gone
                loop.close()


# .holder: the thread's _LoopHolder, once the thread ran an awaitable. Thread-local: no lock.
_local = threading.local()


def _thread_loop() -> asyncio.AbstractEventLoop:
    holder: _LoopHolder | None = getattr(_local, "holder", None)
    if holder is not None and holder.generation == _generation and not holder.loop.is_closed():
        return holder.loop
    holder = _local.holder = _LoopHolder()  # the old holder (if any) closes its loop as it is dropped
    return holder.loop


def close_thread_loop(timeout: float = 1.0) -> None:
    """Close the current thread's private loop, if it has one; call it as a worker thread ends.

    Cancels the tasks that coroutines left behind and waits up to ``timeout`` seconds
    for them and for async generators to finish, then closes the loop. Never raises
    (a failure is logged). A later awaitable on this thread gets a new loop.
    """
    holder: _LoopHolder | None = getattr(_local, "holder", None)
    if holder is None:
        return
    del _local.holder
    loop = holder.loop
    if loop.is_closed() or loop.is_running():
        return  # running: a coroutine on this loop called us; the holder's finalizer closes it later
    if holder.generation != _generation:
        loop.close()  # inherited across fork: it must not run here (its wake-up sockets are the parent's)
        return
    import asyncio  # loaded already: this thread made a loop

    try:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.wait(tasks, timeout=timeout))
        loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), timeout))
    except BaseException:  # noqa: BLE001 - a worker's exit must not fail on user coroutines' clean-up
        _log.warning("threaddispatch: cleaning up a thread's event loop failed", exc_info=True)
    finally:
        loop.close()


# Result types known not to be awaitable, to skip inspect.isawaitable (the costliest step of a
# plain call) for them. Bounded; GeneratorType never enters (a generator-based coroutine is one).
# Written without a lock: a lost or repeated insert only costs a later slow check.
_plain_types: dict[type, bool] = {type(None): False}
_MAX_PLAIN_TYPES = 512


def _awaitable(result: object) -> TypeGuard[Awaitable[Any]]:
    """Whether ``result`` must be awaited (``inspect.isawaitable``, cached per type when it is not)."""
    if inspect.isawaitable(result):
        return True
    cls = type(result)
    if cls is not types.GeneratorType and len(_plain_types) < _MAX_PLAIN_TYPES:
        _plain_types[cls] = False
    return False


def settled(fn: object, awaitable: object, value: object) -> object:
    """``value``, what awaiting ``awaitable`` (returned by ``fn``; None: unknown) gave; TypeError if awaitable.

    The one check of the "awaited once" rule (module docstring), for this module's
    calls and for a face that awaits a user's awaitable inside its own coroutine
    (``return settled(user_fn, awaitable, await awaitable)``): pass the user's callable
    as ``fn`` there, so the message names it and not the face's wrapper. An
    awaitable value (a forgotten ``await``) is discarded first: a coroutine (or a
    generator-based one) is closed, a pending Future of this thread's loop cancelled.
    Cheap when ``value`` is not awaitable (a dict look-up for a known type).
    """
    if not (_plain_types.get(type(value), True) and _awaitable(value)):
        return value
    if isinstance(value, (types.CoroutineType, types.GeneratorType)):
        value.close()  # never run, on purpose: no "never awaited" warning
        fate = "it was closed"
    else:
        import asyncio  # loaded: an awaitable was just run

        holder: _LoopHolder | None = getattr(_local, "holder", None)
        if (
            isinstance(value, asyncio.Future)
            and not value.done()
            and holder is not None
            and value.get_loop() is holder.loop
        ):
            value.cancel()  # else it would go on at this loop's next turn, after the call failed
            fate = "it was cancelled"
        else:
            fate = "it was left as it is"
    name = getattr(awaitable, "__qualname__", None)
    if fn is None:
        source = name if isinstance(name, str) else show(awaitable)
    else:
        source = describe(fn)
        if isinstance(name, str) and name != source:
            source = f"{name} (returned by {source})"
    raise TypeError(
        f"{source} returned {show(value)}, an awaitable nobody awaited (a missing 'await'?): threaddispatch "
        f"awaits what a function returns once, not what that awaitable returns; {fate}"
    )


async def awaited(fn: object, awaitable: Awaitable[Any]) -> Any:
    """Await ``awaitable`` (what ``fn`` returned) in a face's coroutine; its value, checked by :func:`settled`.

    For a plain wrapper that hands a user's awaitable on to be awaited (a span around
    the call that made it): returning ``awaited(fn, result)`` keeps ``fn`` the name in
    a forgotten-await TypeError. A wrapper that is a coroutine itself calls
    :func:`settled` around its own ``await``.
    """
    return settled(fn, awaitable, await awaitable)


def _check_no_running_loop(awaitable: Awaitable[Any]) -> None:
    import asyncio  # an awaitable is about to run: asyncio is needed from here on

    if asyncio._get_running_loop() is not None:
        if inspect.iscoroutine(awaitable):
            awaitable.close()  # never awaited, on purpose: no "never awaited" warning
        raise RuntimeError(
            "threaddispatch cannot run a coroutine on a thread whose own event loop is running; "
            "call it from a plain thread"
        )


def _await(fn: object, awaitable: Awaitable[Any]) -> Any:
    """Run ``awaitable`` (what ``fn`` returned) on this thread's loop; its value (:func:`settled`)."""
    _check_no_running_loop(awaitable)
    loop = _thread_loop()
    import asyncio  # loaded by _check_no_running_loop

    code = getattr(awaitable, "cr_code", None)  # before the task takes it (a coroutine's function)
    return settled(fn, awaitable, _run_task(loop, asyncio.ensure_future(awaitable, loop=loop), code))


# Coroutine functions (by code object) whose last coroutine waited after its first step run at once:
# how many of their next coroutines go straight to run_until_complete (a first step run apart costs a
# coroutine that waits more than it saves). Bounded; written without a lock (a lost write costs a retry).
_waiting: dict[types.CodeType, int] = {}
_MAX_WAITING = 512
_SKIP_AFTER_WAIT = 16


def _run_task(loop: asyncio.AbstractEventLoop, task: asyncio.Future[Any], code: types.CodeType | None = None) -> Any:
    """Run ``task`` (just made on ``loop``, not started) to completion on this thread; its result, or raise its error.

    When the loop has nothing else to do (no other callback ready, no timer), the task's
    first step runs here at once (:func:`_first_step`), as the loop would run it: a
    coroutine that finishes without waiting for anything needs no turn of the loop (about
    half of ``run_until_complete``'s cost). Whatever is left (the coroutine waits, or its
    step scheduled callbacks) goes on under ``run_until_complete``, as before. ``code``
    (the coroutine function's) remembers a function whose coroutines wait: the next
    ``_SKIP_AFTER_WAIT`` of them run under ``run_until_complete`` from the start.
    """
    if code is not None and code in _waiting:
        left = _waiting.pop(code, 0) - 1
        if left > 0:
            _waiting[code] = left
        return loop.run_until_complete(task)
    if _can_step(loop):
        try:
            _first_step(loop)
        except BaseException:  # a SystemExit or KeyboardInterrupt the step re-raised: the task holds it too
            if task.done() and not task.cancelled():
                task.exception()  # retrieved, as run_until_complete does: no "never retrieved" warning
            raise
        if not task.done():
            if code is not None and len(_waiting) < _MAX_WAITING:
                _waiting[code] = _SKIP_AFTER_WAIT
            return loop.run_until_complete(task)
        if loop._ready:  # type: ignore[attr-defined]  # the step scheduled callbacks: their turn, as before
            loop.call_soon(loop.stop)
            loop.run_forever()
        return task.result()
    return loop.run_until_complete(task)


# Whether a loop of this type has the BaseEventLoop internals _first_step relies on (checked once per type).
_steppable: dict[type, bool] = {}

# The interpreters whose asyncio internals _first_step was checked against (the suite runs on each).
# On a newer one every coroutine runs under run_until_complete: correct, only slower.
_STEP_CHECKED = sys.version_info < (3, 14)


def _can_step(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the one ready callback of ``loop`` is the new task's first step, and nothing else waits."""
    cls = type(loop)
    known = _steppable.get(cls)
    if known is None:
        import collections

        known = _steppable[cls] = _STEP_CHECKED and (
            isinstance(getattr(loop, "_ready", None), collections.deque)
            and isinstance(getattr(loop, "_scheduled", None), list)
            and hasattr(loop, "_thread_id")
            and callable(getattr(loop, "_asyncgen_firstiter_hook", None))
            and callable(getattr(loop, "_asyncgen_finalizer_hook", None))
            and isinstance(getattr(loop, "_debug", None), bool)
        )
    # In debug mode the loop's own turns (slow-callback warnings, origin tracking) are kept.
    return known and len(loop._ready) == 1 and not loop._scheduled and not loop._debug  # type: ignore[attr-defined]


def _first_step(loop: Any) -> None:
    """Run the one ready callback of ``loop`` (a task's first step) on this thread, as ``run_forever`` would.

    The loop counts as running meanwhile (``get_running_loop()``, ``is_running()``, its
    async generator hooks), and the step runs as a Task step (``current_task()``, the
    task's context, cancellation). The loop is idle again on return, or as this raises.
    """
    import asyncio

    handle = loop._ready.popleft()
    hooks = sys.get_asyncgen_hooks()
    sys.set_asyncgen_hooks(firstiter=loop._asyncgen_firstiter_hook, finalizer=loop._asyncgen_finalizer_hook)
    loop._thread_id = threading.get_ident()
    asyncio._set_running_loop(loop)
    try:
        handle._run()  # a BaseException the step re-raises (SystemExit) propagates; the task has it too
    finally:
        asyncio._set_running_loop(None)
        loop._thread_id = None
        sys.set_asyncgen_hooks(*hooks)


def invoke(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` on this thread and return its value, awaiting an awaitable result.

    Blocks for as long as ``fn`` (and its awaitable) runs. Exceptions propagate as
    raised. A coroutine runs on this thread's private loop; when this thread's own event
    loop is running, an awaitable raises RuntimeError instead (no loop is nested). An
    awaitable whose value is itself awaitable raises TypeError (:func:`settled`).
    """
    result = fn(*args)
    if _plain_types.get(type(result), True) and _awaitable(result):
        return _await(fn, result)
    return result


def resolve(fn: object, value: object) -> object:
    """``value`` (what ``fn`` returned, called by the face itself), awaited as :func:`invoke` awaits a result.

    For a face that calls user code directly (to spare a frame on its hot path) and only
    hands an awaitable result here: it runs on this thread's loop and the forgotten-await
    TypeError names ``fn``. A value that is not awaitable is returned as it is. Blocks for
    as long as the awaitable runs; its exceptions propagate.
    """
    if _plain_types.get(type(value), True) and _awaitable(value):
        return _await(fn, value)
    return value


def call(fn: Callable[..., Any], *args: Any) -> Outcome:
    """Run ``fn(*args)`` like :func:`invoke` and classify how it ended; never raises.

    Every BaseException is contained, SystemExit and KeyboardInterrupt included: call
    it on worker threads, where such an exception is a failure of the call, not a
    request to end the program.
    """
    try:
        result = fn(*args)
        if _plain_types.get(type(result), True) and _awaitable(result):
            result = _await(fn, result)
    except BaseException as error:  # noqa: BLE001 - classified and handed to the face
        return classify(error)
    return Outcome(OK, result)


# -- per-call timeouts -----------------------------------------------------------------------------


class _Call:
    """One call handed to a runner. Fields are guarded by its _CallerState.mutex."""

    __slots__ = ("abandoned", "args", "fn", "loop", "outcome", "task")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.outcome: Outcome | None = None  # set by the runner when the call ended
        self.abandoned = False  # set by the caller at its deadline
        # The coroutine's Task and its loop, while an awaitable runs (to cancel it at the timeout).
        self.task: asyncio.Future[Any] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None


class _Runner:
    """A runner thread's mailbox. Fields are guarded by _CallerState.mutex."""

    __slots__ = ("done", "thread", "wake", "work")

    def __init__(self, mutex: threading.Lock) -> None:
        self.work: _Call | None = None
        self.wake = threading.Condition(mutex)  # the runner waits here for work
        self.done = threading.Condition(mutex)  # the caller waits here for work.outcome
        self.thread: threading.Thread | None = None


class _CallerState:
    """What runner threads touch; they hold this, never the TimedCaller, so it can be collected."""

    def __init__(self, component: str, max_abandoned: int, idle_timeout: float) -> None:
        self.component = component
        self.max_abandoned = max_abandoned
        self.idle_timeout = idle_timeout
        # mutex guards every field below and every field of every _Runner and _Call of this caller.
        self.mutex = threading.Lock()
        self.slot_free = threading.Condition(self.mutex)  # callers wait here while abandoned >= max
        self.idle: list[_Runner] = []  # runners waiting for work, most recent last
        self.runners: set[_Runner] = set()  # every live runner that is not abandoned
        self.abandoned = 0  # runner threads abandoned at a timeout and still running
        self.slot_waiters = 0
        self.closed = False
        self.total_calls = 0
        self.total_timeouts = 0
        self.total_abandoned = 0
        self.late_results = 0

    def run(self, runner: _Runner) -> None:
        """A runner thread: take calls until idle for idle_timeout, closed, or abandoned."""
        try:
            while True:
                with self.mutex:
                    work = self._next_work(runner)
                    if work is None:
                        return
                outcome = self._run_call(work)
                with self.mutex:
                    runner.work = None
                    work.task = work.loop = None
                    if work.abandoned:
                        self.abandoned -= 1
                        self.late_results += 1
                        if self.slot_waiters:
                            self.slot_free.notify()
                    else:
                        work.outcome = outcome
                        runner.done.notify()
                        if not self.closed:
                            self.idle.append(runner)
                if work.abandoned:
                    self._log_late(work, outcome)
                    return  # an abandoned runner ends: a fresh one took its place
        finally:
            close_thread_loop()

    def _next_work(self, runner: _Runner) -> _Call | None:
        """Wait (mutex held) for work; None when it is time to leave (runner removed from the lists)."""
        deadline = time.monotonic() + self.idle_timeout
        while runner.work is None and not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            runner.wake.wait(remaining)
        work = runner.work
        if work is None:
            if runner in self.idle:
                self.idle.remove(runner)
            self.runners.discard(runner)
        return work

    def _run_call(self, work: _Call) -> Outcome:
        """Run one call on this runner thread, publishing a coroutine's Task so the caller can cancel it."""
        try:
            result = work.fn(*work.args)
            if _plain_types.get(type(result), True) and _awaitable(result):
                _check_no_running_loop(result)
                loop = _thread_loop()
                import asyncio  # loaded by _check_no_running_loop

                awaitable = result
                code = getattr(awaitable, "cr_code", None)
                task = asyncio.ensure_future(awaitable, loop=loop)
                with self.mutex:
                    work.task, work.loop = task, loop
                    if work.abandoned:
                        task.cancel()  # timed out before the task existed
                result = settled(work.fn, awaitable, _run_task(loop, task, code))
        except BaseException as error:  # noqa: BLE001 - classified and handed to the caller
            return classify(error)
        return Outcome(OK, result)

    def _log_late(self, work: _Call, outcome: Outcome) -> None:
        name = describe(work.fn)
        if outcome.ok:
            _log.warning(
                "threaddispatch %s: %s returned after its timeout; the result is ignored: %s",
                self.component,
                name,
                show(outcome.value),
            )
        else:
            _log.warning(
                "threaddispatch %s: %s ended after its timeout; the outcome is ignored: %s",
                self.component,
                name,
                show(outcome.error),
            )


class TimedCaller:
    """Calls user code with a per-call timeout; past it the call fails and its thread is abandoned.

    ``timeout`` None calls on the caller's thread (exactly :func:`call`, no extra cost).
    Otherwise each call runs on a runner thread (daemon, ``threaddispatch-<component>-call``)
    while the caller waits up to ``timeout`` seconds. Past it the call's Outcome is a
    timeout with a DispatchTimeoutError; a coroutine is cancelled on its loop; the runner
    thread is abandoned (its late result logged at WARNING and ignored) and the next call
    gets a fresh runner. At most ``max_abandoned`` abandoned threads run at once: past
    that a call first waits for one of them to end, within the same deadline, and times
    out without running if none does. Runners idle for ``idle_timeout`` seconds leave.

    Thread-safe: concurrent callers each get their own runner. During the interpreter's
    exit drain no thread is started: a call with no idle runner then runs on the caller's
    thread without a timeout (the exit drain's deadline bounds it).
    """

    def __init__(
        self, component: str, *, timeout: float | None, max_abandoned: int = 4, idle_timeout: float = 30.0
    ) -> None:
        check_text("component", component)
        self.timeout = None if timeout is None else check_seconds("timeout", timeout, allow_zero=False)
        state = _CallerState(
            component,
            check_int("max_abandoned", max_abandoned, 1),
            check_seconds("idle_timeout", idle_timeout, allow_zero=False),
        )
        self._state = state
        self._finalizer = weakref.finalize(self, _shut, state)
        self._finalizer.atexit = False
        _lifecycle.register(self)

    def call(self, fn: Callable[..., Any], *args: Any) -> Outcome:
        """Run ``fn(*args)`` within the timeout; never raises (see :class:`Outcome`).

        Blocks up to ``timeout`` seconds. Raises DispatcherClosedError after :meth:`close`.
        """
        timeout = self.timeout
        if timeout is None:
            return call(fn, *args)
        return self.call_until(time.monotonic() + timeout, fn, *args)

    def call_until(self, deadline: float | None, fn: Callable[..., Any], *args: Any) -> Outcome:
        """Run ``fn(*args)`` until ``deadline`` (monotonic; None: on this thread, no limit); never raises.

        For a caller whose own deadline (a stop's) is nearer than ``now + timeout``.
        Raises DispatcherClosedError after :meth:`close`.
        """
        if deadline is None:
            return call(fn, *args)
        state = self._state
        work = _Call(fn, args)
        with state.mutex:
            if state.closed:
                raise DispatcherClosedError(f"the {state.component} caller is closed")
            state.total_calls += 1
            if not self._wait_for_slot(state, deadline):
                state.total_timeouts += 1
                return Outcome(TIMEOUT, None, self._timeout_error(fn, "waiting for one of the abandoned calls to end"))
            if state.closed:  # closed while this call waited for a slot
                raise DispatcherClosedError(f"the {state.component} caller is closed")
            try:
                runner = self._hand_over(state, work)
            except RuntimeError as error:
                return Outcome(ERROR, None, error)
        if runner is None:  # exit drain and no idle runner: no thread may start
            return call(fn, *args)
        with state.mutex:
            while work.outcome is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return self._abandon(state, runner, work)
                runner.done.wait(remaining)
            return work.outcome

    @staticmethod
    def _wait_for_slot(state: _CallerState, deadline: float) -> bool:
        """Wait (mutex held) until fewer than max_abandoned runners are abandoned; False at the deadline."""
        if state.abandoned < state.max_abandoned:
            return True
        state.slot_waiters += 1
        try:
            while state.abandoned >= state.max_abandoned:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                state.slot_free.wait(remaining)
        finally:
            state.slot_waiters -= 1
        if state.abandoned < state.max_abandoned and state.slot_waiters:
            state.slot_free.notify()  # more than one slot may have freed: pass the word on
        return True

    @staticmethod
    def _hand_over(state: _CallerState, work: _Call) -> _Runner | None:
        """Give ``work`` to an idle runner or a new one (mutex held); None if no thread may start."""
        if state.idle:
            runner = state.idle.pop()
            runner.work = work
            runner.wake.notify()
            return runner
        if _lifecycle.exiting():
            return None
        runner = _Runner(state.mutex)
        runner.work = work
        thread = threading.Thread(
            target=state.run, args=(runner,), name=f"threaddispatch-{state.component}-call", daemon=True
        )
        runner.thread = thread
        state.runners.add(runner)
        try:
            thread.start()  # the thread waits for the mutex we hold; start() does not
        except RuntimeError:  # "can't start new thread": the call fails, nothing is left behind
            state.runners.discard(runner)
            raise
        return runner

    def _abandon(self, state: _CallerState, runner: _Runner, work: _Call) -> Outcome:
        """The deadline passed (mutex held): abandon the runner, cancel a coroutine, report the timeout."""
        work.abandoned = True
        state.abandoned += 1
        state.total_abandoned += 1
        state.total_timeouts += 1
        state.runners.discard(runner)  # it ends after this call; close() does not wait for it
        task, loop = work.task, work.loop
        if task is not None and loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the call ended meanwhile
                loop.call_soon_threadsafe(task.cancel)
        return Outcome(TIMEOUT, None, self._timeout_error(work.fn, "its thread was abandoned"))

    def _timeout_error(self, fn: object, detail: str) -> DispatchTimeoutError:
        return DispatchTimeoutError(f"{describe(fn)} ran past its timeout of {self.timeout}s ({detail})")

    def stats(self) -> dict[str, int]:
        """Counters for a face's ``stats()``: abandoned threads running now, and totals since start."""
        state = self._state
        with state.mutex:
            return {
                "abandoned_calls": state.abandoned,
                "max_abandoned_calls": state.max_abandoned,
                "call_timeouts": state.total_timeouts,
                "calls_abandoned": state.total_abandoned,
                "late_results": state.late_results,
            }

    @property
    def abandoned(self) -> int:
        """How many abandoned calls are still running."""
        with self._state.mutex:
            return self._state.abandoned

    def close(self, timeout: float | None = None) -> bool:
        """Stop the runners; idempotent. Abandoned threads are left to end on their own (daemons).

        Blocks up to ``timeout`` seconds (None: no limit) for runners to leave, a busy one
        after its call; returns whether they all left. Calls after it raise DispatcherClosedError.
        """
        deadline = None if timeout is None else time.monotonic() + check_seconds("timeout", timeout)
        threads = _shut(self._state)
        _lifecycle.unregister(self)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads if t is not threading.current_thread())

    def _drain_at_exit(self, deadline: float) -> tuple[int, int]:
        return (0, 0)  # nothing of its own is pending: the faces drain their work through it

    def _reset_after_fork(self) -> None:
        old = self._state
        self._state = _CallerState(old.component, old.max_abandoned, old.idle_timeout)
        self._state.closed = old.closed
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _shut, self._state)
        self._finalizer.atexit = False

    def __repr__(self) -> str:
        return f"<TimedCaller {self._state.component} timeout={self.timeout}>"


def _shut(state: _CallerState) -> list[threading.Thread]:
    """Close ``state``: wake every runner so it leaves (after its call); returns the runners' threads."""
    with state.mutex:
        state.closed = True
        for runner in state.idle:
            runner.wake.notify()
        state.idle.clear()
        state.slot_free.notify_all()
        return [r.thread for r in state.runners if r.thread is not None]
