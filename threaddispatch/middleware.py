"""Job middleware: code that runs around every job handler of a :class:`~threaddispatch.JobEngine`.

A middleware subclasses :class:`Middleware` and overrides any of its no-op hooks:
``before_job(ctx)`` and ``after_job(ctx, result, error)``. A hook that raises is
logged and contained: the job goes on as if the hook had returned (as in dramatiq).
For full control (a transaction around the handler, say) override :meth:`Middleware.wrap`
instead; an exception escaping ``wrap`` is the job's error.

The engine always installs the built-ins, outermost first: :class:`RecoverMiddleware`,
:class:`TimeoutMiddleware`, :class:`LoggingMiddleware`; user middleware runs inside
them, in the order given. Middleware runs on the worker thread with no engine lock
held. Instances are shared by every worker thread, so they must be thread-safe.

Any hook, and ``wrap``, may be an ``async def`` method (or return an awaitable): it is
awaited on the worker thread's private event loop (:mod:`threaddispatch._invoke`), once:
an awaitable whose value is itself awaitable (``return audit(ctx)`` in an ``async def``
hook, a forgotten ``await``) is a TypeError naming the hook (or ``wrap``, or handler), on
the plain chain and inside an async ``wrap`` alike; a hook's is logged and contained as
any failing hook's, a ``wrap``'s or handler's fails the attempt. In an
``async def wrap``, ``call_next()`` returns an awaitable: ``result = await call_next()``.
Everything inside an async ``wrap`` runs in that coroutine, so a middleware after it may
override hooks (sync or async) or an async ``wrap``, but not a plain ``wrap``
(ConfigurationError when the engine is built).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from threaddispatch._invoke import invoke, resolve, settled
from threaddispatch._job_context import JobContext
from threaddispatch._log_json import log_job
from threaddispatch._validate import show
from threaddispatch.errors import ConfigurationError

__all__ = [
    "HandlerCall",
    "LoggingMiddleware",
    "Middleware",
    "RecoverMiddleware",
    "TimeoutMiddleware",
    "compile_chain",
]

_log = logging.getLogger("threaddispatch.jobs")


class Middleware:
    """Base class with no-op hooks around a job handler. Override what you need.

    Hooks run on the worker thread, block for as long as they take, and must be
    thread-safe (one instance serves every worker).
    """

    def before_job(self, ctx: JobContext) -> Awaitable[None] | None:
        """Called before the handler runs (and before inner middleware); may be ``async def``."""
        return None

    def after_job(self, ctx: JobContext, result: object, error: BaseException | None) -> Awaitable[None] | None:
        """Called after the handler returned ``result`` or raised ``error`` (then ``result`` is None); may be async."""
        return None

    def wrap(self, ctx: JobContext, call_next: Callable[[], object]) -> object:
        """Run ``call_next()`` (the inner middleware and the handler) between the hooks.

        Hook exceptions are logged and contained; the handler's outcome passes through.
        """
        _contained(self.before_job, ctx)
        try:
            result = call_next()
        except BaseException as error:
            _contained(self.after_job, ctx, None, error)
            raise
        _contained(self.after_job, ctx, result, None)
        return result


Step = Callable[["JobContext", Callable[[], object]], object]
Before = Callable[["JobContext"], object]
After = Callable[["JobContext", object, "BaseException | None"], object]


class HandlerCall:
    """The innermost ``call_next`` of the chain: the job's handler ``fn(ctx, payload)``.

    Calling it returns the handler's value; an awaitable result is awaited on this
    thread's private loop through ``ctx._guard`` (which lets a timeout or a cancel
    cancel its task, and checks the value, named after the handler). :meth:`begin`
    only starts it, for an async ``wrap`` to await.
    """

    __slots__ = ("ctx", "fn", "payload")

    def __init__(self, fn: Callable[[JobContext, Any], object], ctx: JobContext, payload: object) -> None:
        self.fn = fn
        self.ctx = ctx
        self.payload = payload

    def __call__(self) -> object:
        result = self.fn(self.ctx, self.payload)
        if result is not None and inspect.isawaitable(result):
            return invoke(self.ctx._guard, result, self.fn)
        return result

    def begin(self) -> object:
        """Call the handler and return what it returned, awaitable or not."""
        return self.fn(self.ctx, self.payload)


def compile_chain(chain: Sequence[Middleware]) -> list[Step]:
    """Turn middleware (outermost first) into call steps, skipping hooks left as the no-op defaults.

    A middleware that overrides :meth:`Middleware.wrap` is one step; a run of middleware
    that only override hooks collapses into one step that calls their ``before_job``
    hooks in order and their ``after_job`` hooks in reverse order: the same calls, in the
    same order, as nesting their ``wrap`` methods, with less overhead per job. From the
    first async ``wrap`` on, the rest of the chain is one step: a coroutine (see the
    module docstring), which receives the :class:`HandlerCall` as its ``call_next``.
    """
    steps: list[Step] = []
    befores: list[Before] = []
    afters: list[After] = []

    def close_run() -> None:
        if befores or afters:
            steps.append(_hook_step(tuple(befores), tuple(reversed(afters))))
        befores.clear()
        afters.clear()

    for index, middleware in enumerate(chain):
        cls = type(middleware)
        if cls.wrap is not Middleware.wrap:
            close_run()
            if inspect.iscoroutinefunction(middleware.wrap):
                steps.append(_async_tail(_layers(chain[index:])))
                return steps
            steps.append(middleware.wrap if cls is RecoverMiddleware else partial(invoke, middleware.wrap))
            continue
        if cls.before_job is not Middleware.before_job:
            befores.append(middleware.before_job)
        if cls.after_job is not Middleware.after_job:
            afters.append(middleware.after_job)
    close_run()
    return steps


def _hook_step(befores: tuple[Before, ...], afters: tuple[After, ...]) -> Step:
    def step(ctx: JobContext, call_next: Callable[[], object]) -> object:
        # _contained inlined for the common (no failure) path: one frame less per hook.
        for before in befores:
            try:
                # Hooks return None: only an awaitable result costs a call of resolve.
                if (late := before(ctx)) is not None and inspect.isawaitable(late):
                    resolve(before, late)
            except Exception:  # noqa: BLE001 - a failing hook is logged and never affects the job
                _log.exception("middleware hook %r raised; the job continues", before)
        try:
            result = call_next()
        except BaseException as error:
            for after in afters:
                _contained(after, ctx, None, error)
            raise
        for after in afters:
            try:
                if (late := after(ctx, result, None)) is not None and inspect.isawaitable(late):
                    resolve(after, late)
            except Exception:  # noqa: BLE001 - a failing hook is logged and never affects the job
                _log.exception("middleware hook %r raised; the job continues", after)
        return result

    return step


def _contained(hook: Callable[..., object], *args: object) -> None:
    try:
        invoke(hook, *args)
    except Exception:  # noqa: BLE001 - a failing hook is logged and never affects the job
        _log.exception("middleware hook %r raised; the job continues", hook)


# -- the async tail: the chain from the first async wrap on, as one coroutine --------------------------


class _Hooks:
    """A run of hook-only middleware inside the async tail (afters already reversed)."""

    __slots__ = ("afters", "befores")

    def __init__(self, befores: tuple[Before, ...], afters: tuple[After, ...]) -> None:
        self.befores = befores
        self.afters = afters


def _layers(chain: Sequence[Middleware]) -> tuple[Callable[[JobContext, Callable[[], Any]], Any] | _Hooks, ...]:
    """The async tail's layers, outermost first; a plain ``wrap`` among them is refused."""
    layers: list[Callable[[JobContext, Callable[[], Any]], Any] | _Hooks] = []
    for middleware in chain:
        cls = type(middleware)
        if cls.wrap is not Middleware.wrap:
            if not inspect.iscoroutinefunction(middleware.wrap):
                raise ConfigurationError(
                    f"middleware {show(middleware)} has a plain wrap() inside an async wrap(): "
                    "make it async def, or put it before the async one"
                )
            layers.append(middleware.wrap)
            continue
        before = () if cls.before_job is Middleware.before_job else (middleware.before_job,)
        after = () if cls.after_job is Middleware.after_job else (middleware.after_job,)
        if before or after:
            layers.append(_Hooks(before, after))
    return tuple(layers)


def _async_tail(layers: tuple[Callable[[JobContext, Callable[[], Any]], Any] | _Hooks, ...]) -> Step:
    def step(ctx: JobContext, call_next: Callable[[], object]) -> object:
        if not isinstance(call_next, HandlerCall):  # the tail is always the last step
            raise TypeError(f"the async middleware tail needs the HandlerCall, got {show(call_next)}")
        return invoke(ctx._guard, _run_layers(layers, 0, ctx, call_next))

    return step


async def _settle(fn: object, value: object) -> object:
    """``value`` (what ``fn`` returned), awaited when it is awaitable: once (``_invoke.settled``, naming ``fn``)."""
    if inspect.isawaitable(value):
        return settled(fn, value, await value)
    return value


async def _run_layers(
    layers: tuple[Callable[[JobContext, Callable[[], Any]], Any] | _Hooks, ...],
    index: int,
    ctx: JobContext,
    handler: HandlerCall,
) -> object:
    if index == len(layers):
        return await _settle(handler.fn, handler.begin())
    layer = layers[index]
    if not isinstance(layer, _Hooks):
        return await _settle(layer, layer(ctx, partial(_run_layers, layers, index + 1, ctx, handler)))
    for before in layer.befores:
        await _contained_async(before, ctx)
    try:
        result = await _run_layers(layers, index + 1, ctx, handler)
    except BaseException as error:
        for after in layer.afters:
            await _contained_async(after, ctx, None, error)
        raise
    for after in layer.afters:
        await _contained_async(after, ctx, result, None)
    return result


async def _contained_async(hook: Callable[..., object], *args: object) -> None:
    try:
        await _settle(hook, hook(*args))
    except Exception:  # noqa: BLE001 - a failing hook is logged and never affects the job
        _log.exception("middleware hook %r raised; the job continues", hook)


class RecoverMiddleware(Middleware):
    """Turns a ``BaseException`` that is not an ``Exception`` (``SystemExit``, ``KeyboardInterrupt``,
    ``GeneratorExit`` raised by a handler) into a ``RuntimeError`` failure of the attempt.

    So a handler calling ``sys.exit()`` fails its attempt (and is retried) instead of
    killing the worker thread. Outermost built-in. Thread-safe.
    """

    def wrap(self, ctx: JobContext, call_next: Callable[[], object]) -> object:
        """Run the chain; re-raise a non-``Exception`` as ``RuntimeError`` (chained)."""
        try:
            return call_next()
        except Exception:
            raise
        except BaseException as error:
            raise RuntimeError(f"job handler raised {type(error).__name__}: {error}") from error


class TimeoutMiddleware(Middleware):
    """Arms the job's timeout: at ``ctx.timeout`` seconds the engine sets ``ctx.cancelled``
    and records a failed attempt (then retries or dead-letters the job).

    Python cannot kill a thread: a handler that ignores ``ctx.cancelled`` keeps running
    (and keeps its worker thread busy) until it returns; its outcome is then discarded.
    Handlers doing long work should check ``ctx.cancelled`` or wait with ``ctx.wait()``.
    An ``async def`` handler is cancelled instead (its task gets ``CancelledError``).
    Thread-safe.
    """

    def before_job(self, ctx: JobContext) -> None:
        """Start the clock for ``ctx.timeout`` (no-op when the job has none)."""
        if ctx.timeout is not None:
            ctx._arm_deadline(time.monotonic() + ctx.timeout)


class LoggingMiddleware(Middleware):
    """Logs each attempt's start at INFO: ``job <name> <id> (queue <q>, attempt <n>) started``,
    with the job's id, name, queue and attempt as ``extra`` fields (see ``job_fields``).

    The attempt's outcome (done, retrying, dead-lettered, cancelled) is logged by the engine
    once it is stored, to the same logger. Cheap when the logger is not enabled for INFO.
    Thread-safe.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or _log

    def before_job(self, ctx: JobContext) -> None:
        """Log the start at INFO."""
        if self.logger.isEnabledFor(logging.INFO):
            log_job(self.logger, logging.INFO, ctx.job, "started", "started")
