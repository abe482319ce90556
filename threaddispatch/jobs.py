"""JobEngine: persistent jobs run by worker threads, on a pluggable store (the public face).

The face of xraph's dispatch on plain threads. Producers ``enqueue`` jobs into a
:class:`~threaddispatch.stores.Store` (the store IS the queue); workers claim them
atomically, run their handlers, and record the outcome, retrying with backoff and
dead-lettering after ``max_retries + 1`` attempts. A worker process that dies loses
nothing: its jobs stop heartbeating and go back to pending (at-least-once delivery).

This module is the façade: registration, producing (``enqueue``, ``enqueue_many``,
``replay``: one record builder), the lifecycle calls, cron declarations, result waiting
and the management calls. It runs past 600 lines because it is the engine's whole public
API and its docstrings are the API's contract; the work is done elsewhere, one job a module:

- :mod:`~threaddispatch._job_config`: Config, QueueConfig, job definitions, value checks;
- :mod:`~threaddispatch._job_context`: JobContext, what a handler gets;
- :mod:`~threaddispatch._job_enqueue`: what an enqueue builds: job ids, payload JSON, per-name plans;
- :mod:`~threaddispatch._job_shared`: the state the engine shares with its runs (one lock);
- :mod:`~threaddispatch._job_runtime`: one run (a new one per ``start()``): fetch -> execute
  -> the one completion path, and stopping;
- :mod:`~threaddispatch._job_outcomes`: the one write path of outcomes (group commit);
- :mod:`~threaddispatch._job_maintenance`: heartbeats, timeouts, reaping, purging;
- :mod:`~threaddispatch._job_cron`: declaring cron entries and firing them under leases.

Threads of a started engine, all daemons:

- ``threaddispatch-jobs-fetcher`` claims at most as many jobs as there are free worker
  slots, honouring paused queues and per-queue ``max_concurrency`` / ``rate_limit`` (which
  the store also holds across the cluster, in the claim), and
  writes the outcomes of finished jobs in its next claim's transaction. When idle it
  polls, backing off from ``poll_interval`` to ``max_poll_interval``; an enqueue in this
  process wakes it at once.
- ``threaddispatch-jobs-worker-<n>``: ``concurrency`` threads of the shared
  :class:`~threaddispatch._pool.WorkerPool` that run handlers through the middleware.
- ``threaddispatch-jobs-heartbeat`` heartbeats running jobs and enforces timeouts.
- ``threaddispatch-jobs-upkeep`` recovers stale jobs of dead workers and purges finished
  jobs past ``retention``, beside the heartbeats: however long a reap or purge takes, no
  heartbeat waits for it.
- ``threaddispatch-jobs-cron`` fires the cron entries of the store whose job this
  engine registered, whichever process declared them, each while it holds that entry's
  leader lease; each tick fires once across every process. It lists the store's entries
  at every turn (a tick, or a third of ``stale_job_threshold``).

The engine's own loop is not the shared batching engine: jobs are not batched by a
time window but claimed from a store against free slots, limits and leases.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from types import FrameType, TracebackType
from typing import Any

from threaddispatch import _lifecycle
from threaddispatch._job_config import (
    EXTENSION_HOOKS,
    Config,
    ExtensionHook,
    Handler,
    JobDefinition,
    QueueConfig,
    check_limit,
    check_max_retries,
    check_optional_queue,
    check_page,
    check_priority,
    check_queue,
    check_queues,
    check_state_filter,
    define,
    options_signature,
)
from threaddispatch._job_context import JobContext
from threaddispatch._job_cron import CronRunner
from threaddispatch._job_enqueue import JobPlan, LockRule, encode_json, new_job_id, new_record, replay_record
from threaddispatch._job_handle import JobHandle, JobSpec, PayloadT, ResultT
from threaddispatch._job_runtime import Runtime
from threaddispatch._job_shared import Shared
from threaddispatch._job_workers import list_workers
from threaddispatch._trace import current_traceparent
from threaddispatch._validate import check_int, check_seconds, check_text, check_wait, show
from threaddispatch.backoff import Backoff
from threaddispatch.errors import (
    CancelledError,
    ConfigurationError,
    DispatchTimeoutError,
    InvalidStateError,
    JobNotFoundError,
    NoStoreError,
    StoreUnavailableError,
)
from threaddispatch.events import EventEmitter
from threaddispatch.metrics import job_recorder
from threaddispatch.middleware import (
    LoggingMiddleware,
    Middleware,
    RecoverMiddleware,
    TimeoutMiddleware,
    compile_chain,
)
from threaddispatch.stores.base import (
    ACTIVE_STATES,
    DEPENDENCY_FAILURE_POLICIES,
    FINAL_STATES,
    READY_STATES,
    CronEntry,
    DeadLetter,
    JobRecord,
    JobState,
    LockHold,
    Store,
    WorkerInfo,
)

__all__ = [
    "EXTENSION_HOOKS",
    "Config",
    "JobContext",
    "JobDefinition",
    "JobEngine",
    "JobHandle",
    "JobSpec",
    "QueueConfig",
    "ReplayedJobs",
    "new_job_id",
]

#: The most running jobs :meth:`JobEngine.lock_holders` reads (a cluster's concurrency is far below).
_MAX_RUNNING_SHOWN = 10_000

_log = logging.getLogger("threaddispatch.jobs")

# .queued: while an immediate run is under way on this thread (its outermost enqueue), the
# (engine, job) pairs enqueued by its handlers, run by that outermost enqueue once its own job
# is done: a chain of jobs each enqueueing the next runs at one stack depth. Thread-local: no lock.
_IMMEDIATE = threading.local()


#: The keywords of a chain step (JobSpec options) and their defaults: :meth:`JobEngine.enqueue`'s.
_SPEC_DEFAULTS: dict[str, Any] = {
    "queue": None, "priority": None, "run_at": None, "delay": None, "max_retries": None, "unique_key": None,
    "depends_on": None, "on_dependency_failure": "cancel", "lock": None,
}  # fmt: skip


def _step_payload(index: int, name: str, _position: int) -> str:
    """How a chain step's payload is named in errors."""
    return f"payload of chain step #{index} (job {name!r})"


def _check_depends_on(value: object) -> tuple[str, ...]:
    """``depends_on``: a list (or tuple) of job ids, repeats dropped; ConfigurationError naming the value otherwise."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) and item for item in value):
        raise ConfigurationError(f"depends_on must be a list of job ids (non-empty strings), got {show(value)}")
    return tuple(dict.fromkeys(value))


def _check_policy(value: object) -> str:
    if value not in DEPENDENCY_FAILURE_POLICIES:
        raise ConfigurationError(f"on_dependency_failure must be 'cancel' or 'run', got {show(value)}")
    return str(value)


def _to_epoch(name: str, value: object) -> float:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ConfigurationError(f"{name} must be timezone-aware, got naive {value!r}")
        return value.timestamp()
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        try:
            if math.isfinite(value):
                return float(value)
        except OverflowError:  # an int too large for a float
            pass
    raise ConfigurationError(f"{name} must be an aware datetime or finite epoch seconds, got {show(value)}")


# Config fields read once, by __init__ (the immediate flag, the payload limit in each JobPlan, the recorders).
_FIXED_AT_CONSTRUCTION = frozenset({"immediate", "max_payload_size", "metrics", "tracer_provider"})


class ReplayedJobs(list[str]):
    """What :meth:`JobEngine.replay_all` did: the list of new job ids (oldest letter first), and in
    ``refused`` each dead letter it kept because its replay was refused, by id, with the reason."""

    __slots__ = ("refused",)

    def __init__(self, job_ids: Iterable[str] = (), refused: dict[str, str] | None = None) -> None:
        super().__init__(job_ids)
        self.refused: dict[str, str] = {} if refused is None else refused


class JobEngine:
    """Persistent jobs on a store, run by worker threads (see the module docstring).

    ``store`` is required (NoStoreError otherwise). Every other keyword is a
    :class:`Config` field (TypeError for an unknown one; ``JobEngine.from_config`` takes a Config). ``middleware`` runs
    inside the built-ins; ``extensions`` are objects with any of the hooks in
    :data:`EXTENSION_HOOKS`; a failing hook is logged and never affects the job.

    Handlers, middleware hooks and extension hooks may be ``async def`` functions (or
    return an awaitable): they are awaited on the worker thread's private event loop. A
    coroutine is cancelled when its job times out, is cancelled, lost, or handed back at
    stop; in immediate mode too (at its deadline). A BaseException such as SystemExit
    from a handler fails the attempt (RecoverMiddleware); from a hook it is logged.

    All methods are thread-safe. Producer methods (``enqueue``, ``get_job``, ...) work
    whether or not the engine is started, and after ``stop()`` too: the store is the
    queue, so a job enqueued after stop waits there for a worker.

    ``immediate=True`` (tests, serverless) runs work on the caller's thread: ``enqueue``
    stores the job as usual, then runs it, with every attempt it takes, before returning
    its id. Middleware, hooks, ``unique_key``, results and dead letters behave as in
    normal mode, and ``get_job``/``result`` read the outcome from the store. A job
    enqueued by a handler (of this engine or another immediate one) while an immediate
    run is under way on that thread is stored, then run by the outermost ``enqueue`` once
    its own job is done, in the order enqueued: the nested ``enqueue`` returns the id
    before the job ran (a :meth:`result` for it on that thread runs it then), and a chain
    of jobs each enqueueing the next runs at one stack depth. Differences:
    a failed attempt with retries left is retried at once (the backoff and a
    ``Retry(delay=...)`` are not waited for; ``on_job_retrying`` gets delay 0.0); a
    job timeout cannot interrupt the caller, so it is checked when the handler returns
    (an attempt that ran too long fails with DispatchTimeoutError, its result dropped);
    a job due later (``delay``/``run_at``) stays pending until :meth:`run_pending` runs
    the jobs due by then. Before running its job, ``enqueue`` runs any job of that queue
    the store would hand out first (higher priority, or due earlier). Such an engine
    never starts threads: ``start()``/``run()`` raise InvalidStateError, and crons do
    not fire in it.
    """

    def __init__(
        self,
        store: Store | None = None,
        *,
        middleware: Iterable[Middleware] = (),
        extensions: Iterable[object] = (),
        logger: logging.Logger | None = None,
        **options: Any,
    ) -> None:
        if store is None:
            raise NoStoreError("JobEngine needs a store, e.g. JobEngine(SQLiteStore('jobs.db'))")
        if not isinstance(store, Store):
            raise ConfigurationError(f"store must be a threaddispatch.stores.Store, got {store!r}")
        self.config = Config.from_options(options)
        self.store = store
        self.logger = logger or _log
        middleware = list(middleware)
        for item in middleware:
            if not isinstance(item, Middleware):
                raise ConfigurationError(f"middleware must be Middleware instances, got {item!r}")
        self._chain: tuple[Middleware, ...] = (
            RecoverMiddleware(),
            TimeoutMiddleware(),
            LoggingMiddleware(self.logger),
            *middleware,
        )
        self._steps = compile_chain(self._chain)
        self.events = EventEmitter(known_events=frozenset(EXTENSION_HOOKS.values()))
        self.extensions: list[object] = []
        for extension in extensions:
            self.add_extension(extension)
        # The state this engine shares with its runtimes; _lock guards it (see _job_shared).
        self._shared = Shared(self, store, self.config, self.logger, self.events, tuple(self._steps))
        job_recorder(self)  # bound at construction: a producer-only engine counts its enqueues too
        self._lock = self._shared.lock
        # job name -> the serial lock its registration gives (a name, or a function of the payload);
        # job name -> its JobPlan (its definition and lock rule, as _shared.definitions and _lock_rules
        # hold them). Both written under _lock, read without it (a lost race reads the previous registration's)
        self._lock_rules: dict[str, LockRule] = {}
        self._plans: dict[str, JobPlan] = {}
        self._immediate = self.config.immediate
        self._cron = CronRunner(
            store,
            self.logger,
            self.events,
            definitions=self.definitions,
            lookup=self._definition,
            encode=self._encode,
            build=self._cron_job,
            enqueued=self._enqueued,
        )
        self._runtime: Runtime | None = None  # the last start()'s (lock)
        self._inline: Runtime | None = None  # runs jobs on callers' threads: immediate mode, run_pending (lock)
        _lifecycle.register(self)

    @classmethod
    def from_config(
        cls,
        store: Store | None,
        config: Config,
        *,
        middleware: Iterable[Middleware] = (),
        extensions: Iterable[object] = (),
        logger: logging.Logger | None = None,
    ) -> JobEngine:
        """Build an engine from a :class:`Config` (plus the non-tuning options)."""
        if not isinstance(config, Config):
            raise ConfigurationError(f"config must be a Config, got {config!r}")
        return cls(
            store,
            **config.options(),
            middleware=middleware,
            extensions=extensions,
            logger=logger,
        )

    # -- registration ------------------------------------------------------------------------------

    def register(
        self,
        name: str,
        fn: Handler,
        *,
        max_retries: int = 3,
        timeout: float | None = 300.0,
        queue: str = "default",
        priority: int = 0,
        backoff: Backoff | None = None,
        lock: str | Callable[[Any], str | None] | None = None,
    ) -> JobDefinition:
        """Register handler ``fn(ctx, payload)`` as job ``name`` with default options; returns the definition.

        ``timeout`` None means no timeout; ``backoff`` None uses the engine's. ``lock``: the
        serial lock of its jobs (see :meth:`enqueue`), a name or ``lock(payload)`` giving one
        (or None: no lock) at each enqueue; an enqueue's own ``lock=`` wins. Registering
        a name again replaces it. Non-blocking.
        """
        if lock is not None and not callable(lock):
            check_text("lock", lock)
        definition = define(
            name, fn, max_retries=max_retries, timeout=timeout, queue=queue, priority=priority, backoff=backoff
        )
        with self._lock:
            self._shared.definitions[name] = definition
            if lock is None:
                self._lock_rules.pop(name, None)
            else:
                self._lock_rules[name] = lock
            self._plans[name] = JobPlan(definition, lock, self.config.max_payload_size)
        return definition

    def job(
        self,
        name: str | None = None,
        *,
        max_retries: int = 3,
        timeout: float | None = 300.0,
        queue: str = "default",
        priority: int = 0,
        backoff: Backoff | None = None,
        lock: str | Callable[[Any], str | None] | None = None,
    ) -> Callable[[Callable[[JobContext, PayloadT], ResultT]], JobHandle[PayloadT, ResultT]]:
        """Decorator form of :meth:`register`; ``name`` defaults to the function's name.

        Returns a :class:`~threaddispatch.JobHandle`, typed from the handler's payload and
        result annotations: ``handle.enqueue(payload, ...)`` and ``handle.enqueue_many``
        enqueue the job without spelling its name, and calling the handle calls the handler.
        """

        def decorate(fn: Callable[[JobContext, PayloadT], ResultT]) -> JobHandle[PayloadT, ResultT]:
            definition = self.register(
                fn.__name__ if name is None else name, fn, max_retries=max_retries, timeout=timeout, queue=queue,
                priority=priority, backoff=backoff, lock=lock,
            )  # fmt: skip
            return JobHandle(definition, fn, self.enqueue, self.enqueue_many)

        return decorate

    def definitions(self) -> dict[str, JobDefinition]:
        """The registered jobs by name (a copy)."""
        with self._lock:
            return dict(self._shared.definitions)

    def add_extension(self, extension: object) -> None:
        """Subscribe ``extension``'s hook methods (any of :data:`EXTENSION_HOOKS`) to the engine's events."""
        found = False
        for hook, event in EXTENSION_HOOKS.items():
            method = getattr(extension, hook, None)
            if method is not None:
                if not callable(method):
                    raise ConfigurationError(f"extension {extension!r}: {hook} must be callable")
                self.events.on(event, ExtensionHook(method))
                found = True
        if not found:
            raise ConfigurationError(f"extension {extension!r} has none of the hooks {', '.join(EXTENSION_HOOKS)}")
        self.extensions.append(extension)

    # -- producing -----------------------------------------------------------------------------------

    def _definition(self, name: str) -> JobDefinition:
        return self._plan(name).definition

    def _plan(self, name: str) -> JobPlan:
        """The plan of registered job ``name``; ConfigurationError for a bad or unknown name."""
        plan = self._plans.get(name) if type(name) is str else None
        if plan is not None:
            return plan
        check_text("job name", name)
        with self._lock:
            definition = self._shared.definitions.get(name)
            if definition is None:
                known = ", ".join(sorted(self._shared.definitions)) or "none"
                raise ConfigurationError(f"unknown job name {name!r}: register it first (registered: {known})")
            # A definition without a plan (put in _shared.definitions directly): plan it as register() would.
            plan = self._plans[name] = JobPlan(definition, self._lock_rules.get(name), self.config.max_payload_size)
        return plan

    def _encode(self, what: str, value: object) -> str:
        return encode_json(what, value, self.config.max_payload_size)

    def enqueue(
        self,
        name: str,
        payload: object = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        run_at: datetime | float | None = None,
        delay: float | None = None,
        max_retries: int | None = None,
        unique_key: str | None = None,
        depends_on: Sequence[str] | None = None,
        on_dependency_failure: str = "cancel",
        lock: str | None = None,
    ) -> str:
        """Store a job for ``name`` with a JSON ``payload``; returns its id.

        Options default to the job's registration. ``run_at`` (aware datetime or epoch
        seconds) or ``delay`` (seconds) postpone it. With ``unique_key``, while a job
        with that key is pending, retrying or running no second one is created: its id
        is returned. Raises ConfigurationError for an unregistered name or a bad option,
        PayloadError for a payload that is not JSON or too large. Blocks for one store
        write. Works before start and after stop (the job waits in the store).

        ``depends_on`` (a list of job ids) makes the job wait (state ``waiting``, never
        claimed) until every one of those jobs completed; if one ends failed or cancelled
        the job is cancelled, or runs anyway with ``on_dependency_failure="run"``. The
        handler reads their results with :meth:`dependency_results`. An unknown id raises
        JobNotFoundError (nothing is stored).

        ``lock`` (e.g. ``"customer:42"``) is a serial lock: at most one job holding it runs at
        a time in every process on the store; the others wait, in enqueue order. Default:
        the registration's ``lock``.
        """
        now = time.time()
        plan = self._plan(name)
        if (
            queue is None and priority is None and run_at is None and delay is None and max_retries is None
            and unique_key is None and depends_on is None and lock is None and on_dependency_failure == "cancel"
        ):  # fmt: skip
            # No option given: the registration's, nothing to check (the common call).
            definition = plan.definition
            job_lock = plan.lock_for(payload)
            job = new_record(
                name, plan.encode(plan.what, payload), definition.queue, definition.priority, definition.max_retries,
                definition.timeout, now, now, None, current_traceparent(), (), "cancel", job_lock,
            )  # fmt: skip
            return self._store_new((job,))[0]
        return self._store_new(self._jobs_of(
            plan, (payload,), lambda _: plan.what, now, queue=queue, priority=priority, run_at=run_at, delay=delay,
            max_retries=max_retries, unique_key=unique_key, depends_on=depends_on,
            on_dependency_failure=on_dependency_failure, lock=lock,
        ))[0]  # fmt: skip

    def enqueue_many(
        self,
        name: str,
        payloads: Iterable[object],
        *,
        queue: str | None = None,
        priority: int | None = None,
        run_at: datetime | float | None = None,
        delay: float | None = None,
        max_retries: int | None = None,
        depends_on: Sequence[str] | None = None,
        on_dependency_failure: str = "cancel",
        lock: str | None = None,
    ) -> list[str]:
        """Store one ``name`` job per payload in ONE store transaction; returns their ids in order.

        All payloads are checked before anything is stored (one bad payload refuses the
        batch with PayloadError naming its index). ``depends_on``: every job waits for
        those; ``lock``: every job holds it, so they run one at a time, in order (see
        :meth:`enqueue`). Blocks for one store write.
        """
        now = time.time()
        plan = self._plan(name)
        return self._store_new(self._jobs_of(
            plan, payloads, lambda index: f"payload #{index} of job {name!r}", now, queue=queue, priority=priority,
            run_at=run_at, delay=delay, max_retries=max_retries, unique_key=None, depends_on=depends_on,
            on_dependency_failure=on_dependency_failure, lock=lock,
        ))  # fmt: skip

    def _jobs_of(
        self,
        plan: JobPlan,
        payloads: Iterable[object],
        what: Callable[[int], str],
        now: float,
        *,
        queue: str | None,
        priority: int | None,
        run_at: object,
        delay: object,
        max_retries: int | None,
        unique_key: str | None,
        depends_on: object,
        on_dependency_failure: object,
        lock: object = None,
    ) -> list[JobRecord]:
        """The checked records of one ``plan`` job per payload (not stored); ``what(index)`` names a payload.

        The name was checked (``plan``); the options are checked in enqueue's order, the first bad one raising.
        """
        definition = plan.definition
        if queue is not None:
            check_queue(queue)
        if priority is not None:
            check_priority(priority)
        if max_retries is not None:
            check_max_retries(max_retries)
        if unique_key is not None:
            check_text("unique_key", unique_key)
        dependencies = () if depends_on is None else _check_depends_on(depends_on)
        policy = _check_policy(on_dependency_failure)
        if lock is not None:
            check_text("lock", lock)
        payloads = list(payloads)
        locks = [lock if lock is not None else plan.lock_for(payload) for payload in payloads]
        if run_at is not None and delay is not None:
            raise ConfigurationError(f"give run_at or delay, not both (run_at={run_at!r}, delay={delay!r})")
        if run_at is not None:
            due = _to_epoch("run_at", run_at)
        elif delay is not None:
            due = now + check_seconds("delay", delay)
        else:
            due = now
        texts = [plan.encode(what(index), payload) for index, payload in enumerate(payloads)]
        trace_context = current_traceparent() if texts else None
        name = plan.name
        queue = definition.queue if queue is None else queue
        priority = definition.priority if priority is None else priority
        max_retries = definition.max_retries if max_retries is None else max_retries
        timeout = definition.timeout
        return [
            new_record(name, text, queue, priority, max_retries, timeout, due, now, unique_key, trace_context,
                       dependencies, policy, job_lock)  # type: ignore[arg-type]  # checked above
            for text, job_lock in zip(texts, locks, strict=True)
        ]  # fmt: skip

    def _store_new(self, jobs: Sequence[JobRecord]) -> list[str]:
        """Store ``jobs`` (new records) in one store write; tell this process's runtime; run them when immediate."""
        if not jobs:
            return []
        ids = self.store.enqueue(jobs)
        created = [job for job, job_id in zip(jobs, ids, strict=True) if job_id == job.id]  # else: its unique_key's
        self._enqueued(created)
        if self._immediate:
            now = time.time()
            self._run_immediately([job for job in created if job.run_at <= now])
        return ids

    def _run_immediately(self, jobs: Sequence[JobRecord]) -> None:
        """Run ``jobs`` (just enqueued, due) here, or, inside an immediate run on this thread, after it.

        The outermost call runs its jobs, then every job their handlers enqueued, in the order
        enqueued (a trampoline: the stack stays as deep as one job however long the chain).
        An error of the store ends the run, and the jobs not yet run stay pending in the store.
        """
        queued: deque[tuple[JobEngine, JobRecord]] | None = getattr(_IMMEDIATE, "queued", None)
        if queued is not None:
            queued.extend((self, job) for job in jobs)
            return
        if not jobs:
            return
        _IMMEDIATE.queued = queued = deque((self, job) for job in jobs)
        try:
            while queued:
                engine, job = queued.popleft()
                engine._run_until_done(job)
        finally:
            _IMMEDIATE.queued = None

    def _run_queued_now(self, job_id: str) -> None:
        """Run ``job_id`` now if an immediate run on this thread queued it (a handler waits for its result)."""
        queued: deque[tuple[JobEngine, JobRecord]] | None = getattr(_IMMEDIATE, "queued", None)
        if not queued:
            return
        for index, (engine, job) in enumerate(queued):
            if engine is self and job.id == job_id:
                del queued[index]
                self._run_until_done(job)  # one level deeper, for the waiter; what it enqueues is queued
                return

    def job_spec(self, name: str, payload: object = None, **options: Any) -> JobSpec:
        """A job to enqueue later with :meth:`chain`: ``name``, ``payload`` and :meth:`enqueue`'s keywords.

        Checked when chained. Non-blocking.
        """
        return JobSpec(name, payload, dict(options))

    def chain(self, *steps: JobSpec) -> list[str]:
        """Enqueue ``steps`` (from :meth:`job_spec` or a handle's ``spec``) each depending on the one before.

        One store write for all; returns their ids in order. Step n+1 runs when step n
        completed (its handler reads that result as ``ctx.engine.dependency_results(ctx)[-1]``);
        a step that fails cancels the rest (or they run anyway, for steps given
        ``on_dependency_failure="run"``). The first step may have ``depends_on`` of its own.
        ``unique_key`` is refused (a step deduplicated into another job would not be the
        step the next waits for). Raises as :meth:`enqueue` does, ConfigurationError for no
        steps or a step that is not a JobSpec.
        """
        if not steps:
            raise ConfigurationError("chain() needs at least one step (a JobSpec)")
        jobs: list[JobRecord] = []
        for index, step in enumerate(steps):
            if not isinstance(step, JobSpec):
                raise ConfigurationError(f"chain() step #{index} must be a JobSpec (engine.job_spec), got {show(step)}")
            options = {**_SPEC_DEFAULTS, **step.options}
            unknown = sorted(set(options) - set(_SPEC_DEFAULTS))
            if unknown or options["unique_key"] is not None:
                refused = ", ".join(unknown) or "unique_key"
                raise ConfigurationError(f"chain() step #{index} ({step.name!r}): not a chain step option: {refused}")
            if jobs:
                options["depends_on"] = [*_check_depends_on(options["depends_on"] or []), jobs[-1].id]
            what = functools.partial(_step_payload, index, step.name)
            jobs.extend(self._jobs_of(self._plan(step.name), (step.payload,), what, time.time(), **options))
        return self._store_new(jobs)

    def dependency_results(self, job: JobContext | JobRecord) -> list[Any]:
        """The (JSON-decoded) results of the jobs ``job`` depends on, in its ``depends_on`` order.

        ``job`` is a handler's ctx or a job record. A dependency that did not complete (it
        failed or was cancelled, for a job of policy ``"run"``, or was purged) gives None.
        Blocks for one store read per dependency.
        """
        record = job.job if isinstance(job, JobContext) else job
        results = []
        for dependency in record.depends_on:
            found = self.store.get(dependency)
            results.append(found.decoded_result() if found is not None and found.state is JobState.COMPLETED else None)
        return results

    def _enqueued(self, jobs: Sequence[JobRecord]) -> None:
        if not jobs:
            return
        if self.events.has_listeners("job_enqueued"):
            for job in jobs:
                self.events.emit("job_enqueued", job)
        runtime = self._runtime
        if runtime is not None:
            runtime.jobs_arrived(jobs)

    # -- running on the caller's thread (immediate mode) ---------------------------------------------

    def run_pending(self, *, queues: Sequence[str] | None = None) -> int:
        """Run every job of ``queues`` (default: the configured ones) that is due now, on this thread.

        Retries come at once when the engine is immediate, else when their backoff has
        passed (a later call runs them). Returns how many attempts ran; each outcome is
        written by the time it returns. Raises InvalidStateError while the engine's workers
        run (they claim the same jobs), and the store's error when a claim fails: a success
        is written with the next claim, in one store call (as the workers' fetcher writes),
        so the job whose completion that claim carried is left to the reaper, logged, and
        runs again. Blocks for the jobs' handlers and about one store call per attempt.
        """
        names = check_queues(queues) or self.config.queues
        if self._state in ("running", "stopping"):
            raise InvalidStateError("run_pending() runs jobs without workers; this JobEngine's workers are running")
        return self._inline_runtime().run_due(names)

    def _run_until_done(self, job: JobRecord) -> None:
        """Run ``job`` (just enqueued, due) and its retries here, and what the store hands out before it."""
        runtime = self._inline_runtime()
        while (claimed := runtime.claim_one((job.queue,))) is not None:
            finished = runtime.run_claimed(claimed)
            if claimed.id == job.id and finished.state is not JobState.RETRYING:
                return  # done, failed, cancelled, or no longer this engine's claim

    def _inline_runtime(self) -> Runtime:
        """The runtime that runs jobs on the caller's thread (made on first use)."""
        with self._lock:
            if self._inline is None:
                self._inline = Runtime(
                    self._shared, self._cron, queues=self.config.queues, concurrency=self.config.concurrency,
                    inline=True,
                )  # fmt: skip
            return self._inline

    # -- lifecycle ----------------------------------------------------------------------------------

    @property
    def _state(self) -> str:
        """new (never started) -> running -> stopping -> stopped (-> running again)."""
        runtime = self._runtime
        return "new" if runtime is None else runtime.state

    @property
    def running(self) -> bool:
        """Whether the workers run (between start() and stop())."""
        return self._state == "running"

    def configure(self, **fields: Any) -> Config:
        """Change tuning fields (:class:`Config` names) while the workers are not running; returns the new Config.

        Checked together, as ``JobEngine(**fields)`` checks them: a bad value raises ConfigurationError
        naming it and leaves the tuning as it was; an unknown name raises TypeError. ``immediate``,
        ``max_payload_size``, ``metrics`` and ``tracer_provider`` are fixed at construction
        (ConfigurationError). Raises InvalidStateError while the workers run or stop (their threads
        read the tuning as they go); after stop() the next start() uses the new one. Non-blocking; thread-safe.
        """
        unknown = sorted(set(fields) - set(Config.__dataclass_fields__))
        if unknown:
            raise TypeError(f"configure() got an unexpected keyword argument {unknown[0]!r}")
        fixed = sorted(set(fields) & _FIXED_AT_CONSTRUCTION)
        if fixed:
            raise ConfigurationError(
                f"{fixed[0]} is fixed when the JobEngine is made (got {show(fields[fixed[0]])}); build a new engine"
            )
        with self._lock:  # start() reads self.config under it: a racing start() sees the old tuning or the new
            if self._state in ("running", "stopping"):
                raise InvalidStateError(
                    f"configure() changes the tuning before start(); this JobEngine is {self._state}"
                )
            config = Config.from_options({**self.config.options(), **fields})
            self.config = self._shared.config = config
        return config

    def start(self, *, queues: Sequence[str] | None = None, concurrency: int | None = None) -> None:
        """Start the worker threads; ``queues``/``concurrency`` override the configured ones for this run.

        Non-blocking (starts threads). Raises InvalidStateError if already running or
        stopping, or during interpreter exit. An engine can be started again after stop().
        """
        served = check_queues(queues)
        if concurrency is not None:
            check_int("concurrency", concurrency, 1)
        if self.config.immediate:
            raise InvalidStateError(
                "an immediate JobEngine runs work in enqueue() and run_pending(), on the caller's thread: "
                "it does not start"
            )
        if _lifecycle.exiting():
            raise InvalidStateError("the interpreter is exiting; JobEngine cannot start")
        with self._lock:
            if self._state in ("running", "stopping"):
                raise InvalidStateError(f"JobEngine is already {self._state}")
            runtime = Runtime(
                self._shared,
                self._cron,
                queues=served or self.config.queues,
                concurrency=concurrency if concurrency is not None else self.config.concurrency,
                previous=self._runtime,
            )
            self._runtime = runtime
            runtime.start_threads()
        runtime.subscribe()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop the workers; idempotent. Returns whether every started job finished in time.

        Claimed jobs that have not started go back to pending at once. Running jobs get
        until ``timeout`` (default ``shutdown_timeout``) seconds to finish; those still
        running then get ``ctx.cancelled`` set and are handed back to pending (another
        worker will run them again). Blocks at most ``timeout`` seconds plus one store
        call, even if a handler hangs (its thread cannot be killed and is left behind,
        as a daemon). Enqueueing keeps working after stop: jobs wait in the store.

        Called on one of the engine's own threads (in a handler, middleware or hook) it cannot
        wait for the jobs, its own among them: it begins the stop, lets it finish on a
        ``threaddispatch-jobs-stop`` thread and returns False at once. The calling job is not
        handed back; it is recorded when its handler returns.
        """
        budget = self.config.shutdown_timeout if timeout is None else check_wait("timeout", timeout)
        with self._lock:  # a start() racing this one has made its runtime and started its threads, or not begun
            runtime = self._runtime
        return True if runtime is None else runtime.stop(time.monotonic() + budget)

    def run(self, *, queues: Sequence[str] | None = None, concurrency: int | None = None) -> bool:
        """Start, block until SIGINT/SIGTERM (or :meth:`stop` from another thread), then stop.

        Signal handlers are installed only when called on the main thread, and restored
        afterwards. Returns what :meth:`stop` returned.
        """
        requested = threading.Event()
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():

            def on_signal(signum: int, _frame: FrameType | None) -> None:  # runs on the main thread
                self.logger.info("received signal %d: stopping", signum)
                requested.set()

            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, on_signal)
        try:
            self.start(queues=queues, concurrency=concurrency)
            while not requested.wait(0.2):
                if self._state != "running":
                    break
            return self.stop()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def __enter__(self) -> JobEngine:
        if not self.config.immediate:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _drain_at_exit(self, deadline: float) -> tuple[int, int]:
        with self._lock:
            runtime = self._runtime
            if runtime is None or runtime.state != "running":
                return (0, 0)
            before = self._finished()
        self.stop(max(0.0, deadline - time.monotonic()))
        with self._lock:
            # Handed back, not lost: another worker runs them. Reported as "lost" to this process.
            return (self._finished() - before, runtime.busy())

    def _finished(self) -> int:
        stats = self._shared.stats
        return stats["completed"] + stats["failed"] + stats["retried"]

    def _reset_after_fork(self) -> None:
        # The child has none of the parent's threads; its claims stay the parent's.
        self._shared = self._shared.renewed()
        self._lock = self._shared.lock
        self._runtime = self._inline = None
        self._cron.reset_after_fork()

    # -- cron ------------------------------------------------------------------------------------------

    def cron(
        self,
        expression: str,
        job_name: str,
        payload: object = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        name: str | None = None,
        tz: Any = None,
        overlap: str = "skip",
    ) -> CronEntry:
        """Enqueue ``job_name`` with ``payload`` at every tick of ``expression``; returns the stored entry.

        ``expression`` is a 5-field cron line (UTC unless ``tz`` is given), a macro
        (``@hourly``...) or ``@every 30s`` (see :mod:`threaddispatch.cron`); an invalid one
        raises ConfigurationError naming it. A zone is stored in the entry's expression
        (``CRON_TZ=Europe/Berlin 30 2 * * *``), so ``tz`` must be an IANA name or a
        ``ZoneInfo``. ``name`` (default ``"<job_name>@<expression>"``)
        identifies the entry across processes: each tick fires once in total, by whichever
        engine holds the store's cron leader lease. A new entry first fires at the next
        tick; missed ticks (all engines down) are not caught up, only the latest fires.

        ``overlap``: what a tick does while the entry's previous job has not finished (in any
        process): ``"skip"`` (default: nothing, the tick passes), ``"queue"`` (its job waits
        and runs after the previous one; the entry's jobs share the serial lock
        ``"cron:<name>"``) or ``"allow"`` (it runs alongside). Stored with the entry.
        Blocks for one store write.
        """
        return self._cron.declare(
            expression, job_name, payload, queue=queue, priority=priority, name=name, tz=tz, overlap=overlap
        )

    def crons(self) -> list[CronEntry]:
        """Every cron entry in the store (declared by any process)."""
        return self.store.list_crons()

    def get_cron(self, name: str) -> CronEntry:
        """The stored cron entry ``name`` (declared by any process). Raises JobNotFoundError. One store read."""
        check_text("cron name", name)
        entry = next((e for e in self.store.list_crons() if e.name == name), None)
        if entry is None:
            raise JobNotFoundError(f"no cron entry named {name!r}")
        return entry

    def remove_cron(self, name: str) -> bool:
        """Delete a cron entry from the store and from this engine; returns whether the store had it."""
        check_text("cron name", name)
        self._cron.forget(name)
        return self.store.delete_cron(name)

    def disable_cron(self, name: str) -> CronEntry:
        """Stop the cron entry ``name`` firing, in every process sharing the store, until enabled again.

        Persistent (survives restarts and re-declaration with :meth:`cron`). Raises
        JobNotFoundError for an unknown name. Blocks for a store write.
        """
        check_text("cron name", name)
        return self.store.set_cron_enabled(name, False, now=time.time())

    def enable_cron(self, name: str) -> CronEntry:
        """Let a disabled cron entry fire again from its next tick (missed ticks are not caught up).

        Raises JobNotFoundError for an unknown name. Blocks for a store write.
        """
        check_text("cron name", name)
        return self.store.set_cron_enabled(name, True, now=time.time())

    def _cron_job(self, entry: CronEntry, definition: JobDefinition, tick: float, now: float) -> JobRecord:
        """The job of ``entry``'s ``tick``: unique per tick, so a tick fired twice stores one job.

        Under ``overlap="skip"`` and ``"queue"`` the entry's jobs share the serial lock
        ``cron:<name>``: the store stores no job for a skipping tick while one holds it, and a
        queued one waits for it.
        """
        return new_record(
            entry.job_name,
            entry.payload,
            queue=entry.queue,
            priority=entry.priority,
            max_retries=definition.max_retries,
            timeout=definition.timeout,
            run_at=now,
            now=now,
            unique_key=f"cron:{entry.name}:{tick!r}",
            trace_context=current_traceparent(),
            lock=None if entry.overlap == "allow" else f"cron:{entry.name}",
        )

    # -- results and management ---------------------------------------------------------------------------

    def result(self, job_id: str, timeout: float | None = None) -> Any:
        """Wait for the job to finish and return its handler's (JSON-decoded) return value.

        Blocks up to ``timeout`` seconds (None: no limit): woken at once when this
        process finishes the job, otherwise polling the store. Raises
        DispatchTimeoutError when time runs out (also when the store's read itself ran past
        it and gave up with StoreUnavailableError), JobNotFoundError for an unknown (or
        purged) job, CancelledError for a cancelled job and InvalidStateError carrying
        the error text for a failed one.
        """
        check_text("job id", job_id)
        deadline = None if timeout is None else time.monotonic() + check_seconds("timeout", timeout)
        if self._immediate:
            self._run_queued_now(job_id)
        poll = min(self.config.poll_interval, 0.25)
        event = threading.Event()
        waiters = self._shared.waiters
        with self._lock:
            waiters.setdefault(job_id, set()).add(event)
        try:
            while True:
                event.clear()
                try:
                    if deadline is None:
                        job = self.store.get(job_id)
                    else:  # the read's own wait for a lock ends by the deadline too
                        job = self.store.get_within(job_id, timeout=max(0.0, deadline - time.monotonic()))
                except StoreUnavailableError as error:
                    # The store's own bound (e.g. PostgreSQL's lock_timeout) ended the read: past our
                    # deadline that is our timeout; before it, read again after the poll interval.
                    # Without a deadline the error is the caller's: nothing else would end the wait.
                    if deadline is None:
                        raise
                    if time.monotonic() >= deadline:
                        raise DispatchTimeoutError(
                            f"job {job_id} not finished within {timeout}s (the store did not answer: {error})"
                        ) from error
                    event.wait(min(poll, max(0.0, deadline - time.monotonic())))
                    continue
                if job is None:
                    raise JobNotFoundError(f"no job with id {job_id!r}")
                if job.state is JobState.COMPLETED:
                    return job.decoded_result()
                if job.state is JobState.FAILED:
                    last_line = (job.error or "").strip().splitlines()[-1:] or ["unknown error"]
                    raise InvalidStateError(f"job {job.name} {job_id} failed: {last_line[0]}")
                if job.state is JobState.CANCELLED:
                    raise CancelledError(f"job {job.name} {job_id} was cancelled")
                wait = poll
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise DispatchTimeoutError(f"job {job_id} not finished within {timeout}s (it is {job.state})")
                    wait = min(wait, remaining)
                event.wait(wait)
        finally:
            with self._lock:
                events = waiters.get(job_id)
                if events is not None:
                    events.discard(event)
                    if not events:
                        del waiters[job_id]

    def get_job(self, job_id: str) -> JobRecord:
        """The job's current record. Raises JobNotFoundError. One store read."""
        check_text("job id", job_id)
        job = self.store.get(job_id)
        if job is None:
            raise JobNotFoundError(f"no job with id {job_id!r}")
        return job

    def list_jobs(
        self, state: JobState | str | None = None, queue: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[JobRecord]:
        """Jobs, newest first, filtered by ``state`` and ``queue``. One store read."""
        check_limit(limit, offset)
        check_optional_queue(queue)
        checked = check_state_filter(state)
        return self.store.list_jobs(state=checked, queue=queue, limit=limit, offset=offset)

    def counts(self, queue: str | None = None) -> dict[str, int]:
        """``{state: count}`` for every state (0 included), for one queue or all. One store read."""
        check_optional_queue(queue)
        return {state.value: count for state, count in self.store.counts(queue=queue).items()}

    def cancel(self, job_id: str, *, running: bool = True) -> None:
        """Cancel a pending or retrying job, or (``running=True``) a running one, which gets ``ctx.cancelled`` set.

        A running job's handler is not interrupted (threads cannot be), and its outcome is
        discarded. With ``running=False`` the check and the cancel are one conditional store
        statement: a job a worker claims meanwhile is refused, never cancelled under its
        handler. Raises JobNotFoundError, or InvalidStateError naming the state of a job that
        cannot be cancelled (finished; or running, with ``running=False``). Blocks for one
        store write (and a read when refused).
        """
        check_text("job id", job_id)
        if not isinstance(running, bool):
            raise ConfigurationError(f"running must be a bool, got {show(running)}")
        self._cancel_in_store(job_id, running)
        for runtime in (self._runtime, self._inline):
            if runtime is not None and runtime.cancel_running(job_id):
                return

    def _cancel_in_store(self, job_id: str, running: bool) -> None:
        cancellable = ACTIVE_STATES if running else READY_STATES | {JobState.WAITING}
        for _ in range(3):
            now = time.time()
            if running:  # without the keyword: a store written before it existed still cancels
                cancelled = self.store.cancel(job_id, now=now, error="cancelled by an operator")
            else:
                cancelled = self.store.cancel(job_id, now=now, error="cancelled by an operator", include_running=False)
            if cancelled:
                return
            state = self.get_job(job_id).state
            if state not in cancellable:
                already = "already " if state in FINAL_STATES else ""
                raise InvalidStateError(f"job {job_id!r} is {already}{state.value}; it cannot be cancelled")
            # It changed state between the refused write and the read (retried, released): try again.
        raise InvalidStateError(f"job {job_id!r} kept changing state; it was not cancelled")

    def retry(self, job_id: str) -> None:
        """Run a failed or cancelled job again from scratch (attempts reset; its dead letters removed).

        A job with ``depends_on`` is placed as at its enqueue: it waits for each dependency
        not yet finished (released as they complete), and under
        ``on_dependency_failure="cancel"`` a dependency that is failed or cancelled refuses
        the retry (InvalidStateError naming it, the job left as it was): retry that
        dependency first, then this job, which then waits for it.

        In immediate mode the job runs before this returns, as :meth:`enqueue` runs a new one.
        Raises JobNotFoundError, or InvalidStateError for a job in another state.
        """
        check_text("job id", job_id)
        self.store.requeue(job_id, now=time.time())
        job = self.store.get(job_id)
        if job is not None:
            self._enqueued((job,))
            if self._immediate and job.state is JobState.PENDING:
                self._run_immediately([job])  # as enqueue does: run here before returning

    def dlq(self, limit: int = 50, offset: int = 0, queue: str | None = None) -> list[DeadLetter]:
        """Dead letters, newest first. One store read."""
        check_limit(limit, offset)
        check_optional_queue(queue)
        return self.store.list_dead_letters(queue=queue, limit=limit, offset=offset)

    def dlq_count(self, queue: str | None = None) -> int:
        """How many dead letters there are, in ``queue`` or in all queues. One store read."""
        check_optional_queue(queue)
        return self.store.count_dead_letters(queue=queue)

    def replay(self, dead_letter_id: str) -> str:
        """Enqueue a dead letter's job again as a new job and delete the dead letter; returns the new id.

        The new job keeps what the failed job had, as :meth:`retry` keeps it: its serial
        ``lock``, ``unique_key`` and ``depends_on``, which the dead letter keeps (a dead letter
        stored before stores kept them, by SQLite's migration 11 or PostgreSQL's 14, takes them
        from the failed job's record; once that was purged, past the retention, the lock is the
        one its registration gives the payload here, and there is no unique key and no
        dependency to keep). The store
        places it as :meth:`retry` places a job (``Store.replay_dead_letter``, one transaction
        with the delete): behind its lock's earlier jobs; waiting for each dependency not yet
        finished. A ``unique_key`` another unfinished job holds now, or (under
        ``on_dependency_failure="cancel"``) a failed or cancelled dependency, refuses the replay
        with InvalidStateError naming it, and the dead letter is kept: retry the dependency
        first, or wait for the key's holder.

        In immediate mode the new job runs before this returns (when pending), as :meth:`enqueue`
        runs one. Raises JobNotFoundError for an unknown dead letter (or one replayed or purged
        meanwhile: a dead letter is replayed once, however many ask at once). Blocks for a store
        read and a write (and a read of the job's record for a dead letter stored before the
        migration; a read back for a job with dependencies).
        """
        check_text("dead letter id", dead_letter_id)
        letter = self.store.get_dead_letter(dead_letter_id)
        if letter is None:
            raise JobNotFoundError(f"no dead letter with id {dead_letter_id!r}")
        plan = self._plan(letter.name) if letter.name in self._shared.definitions else None
        original = None if letter.on_dependency_failure is not None else self.store.get(letter.job_id)
        job = replay_record(letter, original, plan, time.time())
        job_id = self.store.replay_dead_letter(dead_letter_id, job=job)
        placed = self.store.get(job_id) if job.depends_on else job  # waiting or pending: the store decided
        if placed is not None:
            self._enqueued((placed,))
            if self._immediate and placed.state is JobState.PENDING:
                self._run_immediately([placed])  # as enqueue does: run here before returning
        return job_id

    def replay_all(self, queue: str | None = None, *, limit: int | None = None) -> ReplayedJobs:
        """:meth:`replay` every dead letter (of ``queue``) there is when called, oldest first; returns the new ids.

        ``limit`` caps how many are replayed, taking the newest (None: all). Dead letters replayed or purged
        by someone else meanwhile are skipped; so are those whose replay is refused (a held
        unique key, a failed dependency: see :meth:`replay`), which stay dead letters, each logged
        as a warning and named in the result's ``refused`` with the reason (:class:`ReplayedJobs`:
        the list of new ids). Blocks for one store read per 500 dead letters and, per replay,
        :meth:`replay`'s.
        """
        if limit is not None:
            check_int("limit", limit, 0)
        check_optional_queue(queue)
        letters: list[DeadLetter] = []
        while limit is None or len(letters) < limit:
            page = self.store.list_dead_letters(queue=queue, limit=500, offset=len(letters))
            letters.extend(page)
            if len(page) < 500:
                break
        chosen = (letters if limit is None else letters[:limit])[::-1]  # the newest `limit`, oldest first
        replayed = ReplayedJobs()
        for letter in chosen:
            try:
                replayed.append(self.replay(letter.id))
            except JobNotFoundError:
                continue
            except InvalidStateError as error:
                self.logger.warning("dead letter %s was not replayed (it is kept): %s", letter.id, error)
                replayed.refused[letter.id] = str(error)
        return replayed

    def purge_dlq(self, older_than: float | None = None) -> int:
        """Delete dead letters older than ``older_than`` seconds (all when None); returns how many."""
        cutoff = None if older_than is None else time.time() - check_seconds("older_than", older_than)
        return self.store.purge_dead_letters(older_than=cutoff)

    def pause_queue(self, queue: str) -> None:
        """Stop claiming jobs of ``queue`` in every engine sharing the store (running jobs finish).

        Takes effect here at once; other engines see it at their next read of the paused
        queues (within ``max(poll_interval, 1 s)`` while they claim). One store write.
        """
        check_queue(queue)
        self.store.set_queue_paused(queue, True, now=time.time())
        with self._lock:
            self._shared.paused.add(queue)
            self._shared.paused_version += 1

    def resume_queue(self, queue: str) -> None:
        """Claim jobs of ``queue`` again (see :meth:`pause_queue`). One store write.

        Takes effect here at once. Every built-in store announces it (PostgreSQL and SQLite
        to every process, MemoryStore to the engines sharing it), so idle engines claim at
        once; on a store without wake-ups they see it at their next poll.
        """
        check_queue(queue)
        self.store.set_queue_paused(queue, False, now=time.time())
        with self._lock:
            self._shared.paused.discard(queue)
            self._shared.paused_version += 1
        runtime = self._runtime
        if runtime is not None:
            runtime.wake()

    def paused_queues(self) -> set[str]:
        """The queues paused now (read from the store)."""
        return self.store.paused_queues()

    # -- management reads (the admin app's) ----------------------------------------------------------

    def list_jobs_after(
        self,
        after: tuple[str, float] | None,
        *,
        state: JobState | str | None = None,
        queue: str | None = None,
        limit: int = 50,
        position: int = 0,
    ) -> list[JobRecord]:
        """Keyset page of :meth:`list_jobs`: the jobs after ``after = (job id, created_at)``; None: the first page.

        ``position`` is a hint: the anchor's offset when it was listed. No job is skipped
        when jobs arrive or leave while paging (see :meth:`Store.list_jobs_after`). Raises
        ConfigurationError for a bad argument. Blocks for one or a few store reads.
        """
        anchor = check_page(after, limit, position)
        check_optional_queue(queue)
        checked = check_state_filter(state)
        return self.store.list_jobs_after(anchor, state=checked, queue=queue, limit=limit, position=position)

    def list_dead_letters_after(
        self, after: tuple[str, float] | None, *, queue: str | None = None, limit: int = 50, position: int = 0
    ) -> list[DeadLetter]:
        """Keyset page of :meth:`dlq` after ``after = (dead letter id, failed_at)``; as :meth:`list_jobs_after`."""
        anchor = check_page(after, limit, position)
        check_optional_queue(queue)
        return self.store.list_dead_letters_after(anchor, queue=queue, limit=limit, position=position)

    def get_dead_letter(self, dead_letter_id: str) -> DeadLetter:
        """The dead letter ``dead_letter_id``. Raises JobNotFoundError. One store read."""
        letter = self.store.get_dead_letter(check_text("dead letter id", dead_letter_id))
        if letter is None:
            raise JobNotFoundError(f"no dead letter with id {dead_letter_id!r}")
        return letter

    def queue_stats(self) -> list[dict[str, Any]]:
        """Every queue this engine knows, by name: its counts, pause state, limits, and what runs here.

        Known: the configured queues, those with limits, those served or paused, and the
        queues of job definitions and cron entries. Blocks for three store reads (paused
        queues, cron entries, the counts of every queue at once).
        """
        stats = self.stats()
        served = set(stats["queues"]) if stats["state"] == "running" else set()
        limits = {config.name: config for config in self.config.queue_configs}
        paused = self.paused_queues()
        names = {*self.config.queues, *limits, *served, *paused}
        names.update(definition.queue for definition in self.definitions().values())
        names.update(entry.queue for entry in self.crons())
        ordered = sorted(names)
        counts = self.store.counts_by_queue(ordered)
        queues = []
        for name in ordered:
            config = limits.get(name)
            queues.append({
                "name": name,
                "paused": name in paused,
                "counts": {state.value: count for state, count in counts[name].items()},
                "served_here": name in served,
                "running_here": stats["running_by_queue"].get(name, 0),
                "max_concurrency": None if config is None else config.max_concurrency,
                "rate_limit": None if config is None else config.rate_limit,
                "rate_burst": None if config is None else config.rate_burst,
            })  # fmt: skip
        return queues

    def describe_store(self) -> dict[str, object]:
        """The store's description (kind, location; no secrets). Non-blocking for the built-in stores."""
        return dict(self.store.describe())

    def stats(self) -> dict[str, Any]:
        """This engine's counters since it was made, plus its running state; no store access."""
        with self._lock:
            runtime = self._runtime or self._inline
            data: dict[str, Any] = dict(self._shared.stats)
            data.update(
                state=self._state,
                worker_id=self.worker_id,
                in_flight=0 if runtime is None else runtime.busy(),
                concurrency=self.config.concurrency if runtime is None else runtime.concurrency,
                queues=list(self.config.queues if runtime is None else runtime.queues),
                running_by_queue={} if runtime is None else dict(runtime.queue_running),
                paused=sorted(self._shared.paused),
            )
        return data

    @property
    def worker_id(self) -> str:
        """The worker id of this engine's claims: its last start()'s, else its inline runs' ("" before either)."""
        runtime = self._runtime or self._inline
        return "" if runtime is None else runtime.worker_id

    def __repr__(self) -> str:
        runtime = self._runtime
        queues = list(self.config.queues if runtime is None else runtime.queues)
        return f"<JobEngine {self._state} store={type(self.store).__name__} queues={queues}>"

    def workers(self) -> list[WorkerInfo]:
        """The live workers of this engine's store (every process's), oldest start first; one store read.

        Live: a heartbeat within ``stale_job_threshold`` seconds (default 30), the same point
        at which a dead worker's jobs are reaped.
        """
        return list_workers(self.store, stale_after=self.config.stale_job_threshold)

    def lock_holders(self, lock: str | None = None) -> list[LockHold]:
        """Who holds each serial lock now (of ``lock``, or every lock), oldest heartbeat first.

        Two kinds, one record type: a running job with a lock (its claim holds it; attempts,
        worker and heartbeat are the claim's, or its start before the first heartbeat), and
        a :class:`~threaddispatch.stores.base.LockHold` a handler keeps past its job's
        running state (a timeout, a cancel, a hand-back at stop) until it returns; tell them
        apart by the job's state. Blocks for one store read of the holds and one of the
        running jobs per 500 (at most :data:`_MAX_RUNNING_SHOWN` are read). Raises
        ConfigurationError for a bad ``lock``.
        """
        if lock is not None:
            check_text("lock", lock)
        holders = list(self.store.list_holds(lock=lock))
        seen = {hold.job_id for hold in holders}  # pages read while jobs move may repeat one
        for offset in range(0, _MAX_RUNNING_SHOWN, 500):
            page = self.store.list_jobs(state=JobState.RUNNING, limit=500, offset=offset)
            for job in page:
                if job.id in seen:
                    continue
                seen.add(job.id)
                if job.lock is not None and job.worker_id is not None and (lock is None or job.lock == lock):
                    beat = job.heartbeat_at or job.started_at or job.updated_at
                    holders.append(LockHold(job.lock, job.id, job.attempts, job.worker_id, beat))
            if len(page) < 500:
                break
        holders.sort(key=lambda hold: (hold.heartbeat_at, hold.job_id))
        return holders

    def throughput(self, minutes: int = 60) -> list[dict[str, float]]:
        """Jobs completed and failed per minute over the last ``minutes`` (1 to 1440), by finish time.

        ``[{"start": epoch seconds, "completed": n, "failed": n}, ...]``, oldest minute
        first, the current (partial) minute last. Raises ConfigurationError for a bad
        ``minutes``. Blocks for one store read (:meth:`Store.throughput`).
        """
        check_int("minutes", minutes, 1, 24 * 60)
        now = time.time()
        since = (now // 60 - minutes + 1) * 60
        buckets: list[dict[str, float]] = [
            {"start": since + 60 * i, "completed": 0, "failed": 0} for i in range(minutes)
        ]
        for index, state, count in self.store.throughput(since=since, now=now, bucket=60.0):
            if 0 <= index < minutes and state.value in ("completed", "failed"):
                buckets[index][state.value] += count
        return buckets


# help(JobEngine) lists every Config field as a keyword (the fields themselves are listed once, in Config).
JobEngine.__init__.__signature__ = options_signature(inspect.signature(JobEngine.__init__))  # type: ignore[attr-defined]
