"""JobEngine: persistent jobs run by worker threads, on a pluggable store.

The face of xraph's dispatch on plain threads. Producers ``enqueue`` jobs into a
:class:`~threaddispatch.stores.Store` (the store IS the queue); workers claim them
atomically, run their handlers, and record the outcome, retrying with backoff and
dead-lettering after ``max_retries + 1`` attempts. A worker process that dies loses
nothing: its jobs stop heartbeating and go back to pending (at-least-once delivery).

Threads of a started engine, all daemons:

- ``threaddispatch-jobs-fetcher`` claims at most as many jobs as there are free worker
  slots, honouring paused queues and per-queue ``max_concurrency`` / ``rate_limit``.
  When idle it polls, backing off from ``poll_interval`` to ``max_poll_interval``; an
  enqueue in this process wakes it at once.
- ``threaddispatch-jobs-worker-<n>``: ``concurrency`` threads of the shared
  :class:`~threaddispatch._pool.WorkerPool` that run handlers through the middleware.
- ``threaddispatch-jobs-heartbeat`` heartbeats running jobs, enforces timeouts,
  recovers stale jobs of dead workers and purges finished jobs past ``retention``.
- ``threaddispatch-jobs-cron`` fires the cron entries of the store whose job this
  engine registered, whichever process declared them, each while it holds that entry's
  leader lease; each tick fires once across every process. It lists the store's entries
  at every turn (a tick, or a third of ``stale_job_threshold``).

The engine's own loop is not the shared batching engine: jobs are not batched by a
time window but claimed from a store against free slots, limits and leases.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from functools import partial
from types import FrameType, TracebackType
from typing import Any, TypeVar

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
)
from threaddispatch._job_context import JobContext
from threaddispatch._job_cron import CronRunner
from threaddispatch._pool import WorkerPool
from threaddispatch._ratelimit import TokenBucket
from threaddispatch._validate import check_int, check_seconds, check_text, show
from threaddispatch.backoff import Backoff, RetryPolicy
from threaddispatch.errors import (
    Cancel,
    CancelledError,
    ConfigurationError,
    DispatcherClosedError,
    DispatchTimeoutError,
    InvalidStateError,
    JobNotFoundError,
    NoStoreError,
    PayloadError,
    Retry,
    StoreError,
)
from threaddispatch.events import EventEmitter
from threaddispatch.middleware import (
    HandlerCall,
    LoggingMiddleware,
    Middleware,
    RecoverMiddleware,
    TimeoutMiddleware,
    compile_chain,
)
from threaddispatch.stores.base import (
    ACTIVE_STATES,
    FINAL_STATES,
    READY_STATES,
    Completion,
    CronEntry,
    DeadLetter,
    JobRecord,
    JobState,
    Store,
)

__all__ = [
    "EXTENSION_HOOKS",
    "Config",
    "JobContext",
    "JobDefinition",
    "JobEngine",
    "QueueConfig",
]

F = TypeVar("F", bound=Callable[..., Any])

_log = logging.getLogger("threaddispatch.jobs")
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


_MAX_ERROR_TEXT = 8000
# .runtime: the runtime token (JobEngine._runtime) of the engine whose thread this is, while it runs
# the engine's loops or work; stop() there must not wait for itself. Thread-local: no lock.
_ENGINE_THREAD = threading.local()


class _Slot:
    """One claimed job in this process. Fields change under the engine's lock."""

    __slots__ = ("abandoned", "ctx", "definition", "job", "settled", "started", "thread")

    def __init__(self, job: JobRecord, ctx: JobContext, definition: JobDefinition | None) -> None:
        self.job = job
        self.ctx = ctx
        self.definition = definition
        self.started = False  # a worker thread began it (else stop may release it)
        self.thread: threading.Thread | None = None  # the worker thread running it, once started
        # settled: its outcome is decided (recorded, timed out, handed back, lost); the
        # handler's own outcome, if it comes later, is discarded.
        self.settled = False
        # abandoned: settled without the handler's outcome (timed out, lost, cancelled, handed
        # back); its thread may still be running the handler.
        self.abandoned = False


def new_job_id() -> str:
    """A new job id: 32 hex digits, the time in nanoseconds then 64 random bits, so ids sort by creation."""
    return f"{time.time_ns():016x}{os.urandom(8).hex()}"


def _error_text(error: BaseException) -> str:
    # NUL spelled out: PostgreSQL cannot store it in text, and an unstorable error would strand the job.
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__)).replace("\x00", "\\x00")
    return text if len(text) <= _MAX_ERROR_TEXT else "...\n" + text[-_MAX_ERROR_TEXT:]


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


class JobEngine:
    """Persistent jobs on a store, run by worker threads (see the module docstring).

    ``store`` is required (NoStoreError otherwise). Every keyword mirrors a
    :class:`Config` field (``JobEngine.from_config`` takes one). ``middleware`` runs
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
    normal mode, and ``get_job``/``result`` read the outcome from the store. Differences:
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
        self._definitions: dict[str, JobDefinition] = {}
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
        self._init_runtime()
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

    def _init_runtime(self) -> None:
        # _lock guards every field below. _wake (fetcher), _maint (heartbeat thread) and
        # _idle (stop waiting for in-flight jobs) are conditions on it. User code (handlers,
        # middleware, hooks) and store calls never run with it held.
        self._lock = threading.Lock()
        self._runtime = object()  # marks this runtime's threads in _ENGINE_THREAD (a new one after fork)
        self._wake = threading.Condition(self._lock)
        self._maint = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._state = "new"  # new -> running -> stopping -> stopped (-> running again)
        self._stop_event = threading.Event()
        self._wake_pending = False
        self._next_due = math.inf  # earliest run_at (epoch) this process knows of
        self._inflight: dict[str, _Slot] = {}
        # Abandoned slots (timed out, cancelled, lost) whose job this process claimed again while
        # their thread still runs: out of _inflight (the new claim's slot is there), still counted.
        self._orphans: set[_Slot] = set()
        self._queue_running: dict[str, int] = {}
        self._waiters: dict[str, set[threading.Event]] = {}
        # _done: finished jobs waiting for the group commit (slot, result JSON, note, result).
        self._done: list[tuple[_Slot, str | None, str | None, object]] = []
        self._flush_lock = threading.Lock()  # one group commit at a time, in order
        self._threads_stop = False  # set by stop() once the heartbeat/cron threads may leave
        self._threads: list[threading.Thread] = []
        self._cron_thread: threading.Thread | None = None
        self._unsubscribe: Callable[[], None] | None = None  # the store's wake-ups (LISTEN/NOTIFY)
        self._pool: WorkerPool | None = None
        self._queues: tuple[str, ...] = self.config.queues
        self._concurrency = self.config.concurrency
        self._limits: dict[str, QueueConfig] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._paused: set[str] = set()
        self._paused_checked = -math.inf
        self._rotation = 0
        # The retry policy of each backoff in use (RetryPolicy is immutable). Written without the
        # lock: a lost or repeated insert only builds an equal policy again.
        self._policies: dict[Backoff, RetryPolicy] = {}
        self.worker_id = ""
        self._stats = dict.fromkeys(
            (
                "claimed",
                "completed",
                "failed",
                "retried",
                "cancelled",
                "timed_out",
                "lost",
                "released",
                "reaped",
                "idle_polls",
            ),
            0,
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
    ) -> JobDefinition:
        """Register handler ``fn(ctx, payload)`` as job ``name`` with default options; returns the definition.

        ``timeout`` None means no timeout; ``backoff`` None uses the engine's. Registering
        a name again replaces it. Non-blocking.
        """
        definition = define(
            name, fn, max_retries=max_retries, timeout=timeout, queue=queue, priority=priority, backoff=backoff
        )
        with self._lock:
            self._definitions[name] = definition
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
    ) -> Callable[[F], F]:
        """Decorator form of :meth:`register`; ``name`` defaults to the function's name."""

        def decorate(fn: F) -> F:
            self.register(
                fn.__name__ if name is None else name, fn, max_retries=max_retries, timeout=timeout, queue=queue,
                priority=priority, backoff=backoff,
            )  # fmt: skip
            return fn

        return decorate

    def definitions(self) -> dict[str, JobDefinition]:
        """The registered jobs by name (a copy)."""
        with self._lock:
            return dict(self._definitions)

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
        check_text("job name", name)
        definition = self._definitions.get(name)
        if definition is None:
            known = ", ".join(sorted(self._definitions)) or "none"
            raise ConfigurationError(f"unknown job name {name!r}: register it first (registered: {known})")
        return definition

    def _encode(self, what: str, value: object) -> str:
        try:
            text = _ENCODER.encode(value)
        except (TypeError, ValueError) as error:
            raise PayloadError(f"{what} is not JSON-serialisable: {error}") from error
        except RecursionError:
            raise PayloadError(f"{what} is nested too deeply to encode as JSON") from None
        if len(text) > self.config.max_payload_size:
            raise PayloadError(
                f"{what} is {len(text)} bytes of JSON, more than max_payload_size={self.config.max_payload_size}"
            )
        return text

    def _build(
        self,
        name: str,
        payload_text: str,
        definition: JobDefinition,
        *,
        queue: str | None,
        priority: int | None,
        run_at: float,
        max_retries: int | None,
        unique_key: str | None,
        now: float,
    ) -> JobRecord:
        return JobRecord(
            id=new_job_id(),
            name=name,
            payload=payload_text,
            queue=definition.queue if queue is None else queue,
            state=JobState.PENDING,
            priority=definition.priority if priority is None else priority,
            attempts=0,
            max_retries=definition.max_retries if max_retries is None else max_retries,
            timeout=definition.timeout,
            run_at=run_at,
            created_at=now,
            updated_at=now,
            unique_key=unique_key,
        )

    def _options(
        self,
        *,
        queue: str | None,
        priority: int | None,
        run_at: object,
        delay: object,
        max_retries: int | None,
        unique_key: str | None,
        now: float,
    ) -> float:
        if queue is not None:
            check_queue(queue)
        if priority is not None:
            check_priority(priority)
        if max_retries is not None:
            check_max_retries(max_retries)
        if unique_key is not None:
            check_text("unique_key", unique_key)
        if run_at is not None and delay is not None:
            raise ConfigurationError(f"give run_at or delay, not both (run_at={run_at!r}, delay={delay!r})")
        if run_at is not None:
            return _to_epoch("run_at", run_at)
        if delay is not None:
            return now + check_seconds("delay", delay)
        return now

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
    ) -> str:
        """Store a job for ``name`` with a JSON ``payload``; returns its id.

        Options default to the job's registration. ``run_at`` (aware datetime or epoch
        seconds) or ``delay`` (seconds) postpone it. With ``unique_key``, while a job
        with that key is pending, retrying or running no second one is created: its id
        is returned. Raises ConfigurationError for an unregistered name or a bad option,
        PayloadError for a payload that is not JSON or too large. Blocks for one store
        write. Works before start and after stop (the job waits in the store).
        """
        now = time.time()
        definition = self._definition(name)
        due = self._options(
            queue=queue,
            priority=priority,
            run_at=run_at,
            delay=delay,
            max_retries=max_retries,
            unique_key=unique_key,
            now=now,
        )
        text = self._encode(f"payload of job {name!r}", payload)
        job = self._build(
            name, text, definition, queue=queue, priority=priority, run_at=due, max_retries=max_retries,
            unique_key=unique_key, now=now,
        )  # fmt: skip
        job_id = self.store.enqueue((job,))[0]
        if job_id == job.id:
            self._enqueued((job,))
            if self.config.immediate and job.run_at <= time.time():
                self._run_until_done(job)
        return job_id

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
    ) -> list[str]:
        """Store one ``name`` job per payload in ONE store transaction; returns their ids in order.

        All payloads are checked before anything is stored (one bad payload refuses the
        batch with PayloadError naming its index). Blocks for one store write.
        """
        now = time.time()
        definition = self._definition(name)
        due = self._options(
            queue=queue,
            priority=priority,
            run_at=run_at,
            delay=delay,
            max_retries=max_retries,
            unique_key=None,
            now=now,
        )
        texts = [self._encode(f"payload #{index} of job {name!r}", payload) for index, payload in enumerate(payloads)]
        if not texts:
            return []
        jobs = [
            self._build(
                name,
                text,
                definition,
                queue=queue,
                priority=priority,
                run_at=due,
                max_retries=max_retries,
                unique_key=None,
                now=now,
            )
            for text in texts
        ]
        ids = self.store.enqueue(jobs)
        self._enqueued(jobs)
        if self.config.immediate and due <= time.time():
            for job in jobs:
                self._run_until_done(job)
        return ids

    def _enqueued(self, jobs: Sequence[JobRecord]) -> None:
        if not jobs:
            return
        if self.events.has_listeners("job_enqueued"):
            for job in jobs:
                self.events.emit("job_enqueued", job)
        if self._state != "running":
            return
        due = min(job.run_at for job in jobs)
        if any(job.queue in self._queues for job in jobs):
            with self._lock:
                self._wake_pending = True
                self._next_due = min(self._next_due, due)
                self._wake.notify()

    # -- running on the caller's thread (immediate mode) ---------------------------------------------

    def run_pending(self, *, queues: Sequence[str] | None = None) -> int:
        """Run every job of ``queues`` (default: the configured ones) that is due now, on this thread.

        Retries come at once when the engine is immediate, else when their backoff has
        passed (a later call runs them). Returns how many attempts ran. Raises
        InvalidStateError while the engine's workers run (they claim the same jobs).
        Blocks for the jobs' handlers and a few store calls per attempt.
        """
        names = check_queues(queues) or self.config.queues
        if self._state in ("running", "stopping"):
            raise InvalidStateError("run_pending() runs jobs without workers; this JobEngine's workers are running")
        ran = 0
        while (claimed := self._claim_one(names)) is not None:
            self._run_claimed(claimed)
            ran += 1
        return ran

    def _run_until_done(self, job: JobRecord) -> None:
        """Run ``job`` (just enqueued, due) and its retries here, and what the store hands out before it."""
        while (claimed := self._claim_one((job.queue,))) is not None:
            finished = self._run_claimed(claimed)
            if claimed.id == job.id and finished.state is not JobState.RETRYING:
                return  # done, failed, cancelled, or no longer this engine's claim

    def _claim_one(self, queues: Sequence[str]) -> JobRecord | None:
        with self._lock:
            if not self.worker_id:
                self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
            worker_id = self.worker_id
        claimed = self.store.claim(queues, 1, worker_id=worker_id, now=time.time())
        return claimed[0] if claimed else None

    def _run_claimed(self, job: JobRecord) -> JobRecord:
        """Run one claimed job on this thread and record its outcome; returns its record as this engine left it."""
        with self._lock:
            slot = _Slot(job, self._context(job), self._definitions.get(job.name))
            previous = self._inflight.get(job.id)
            if previous is not None:
                self._orphans.add(previous)
            self._inflight[job.id] = slot
            self._queue_running[job.queue] = self._queue_running.get(job.queue, 0) + 1
            self._stats["claimed"] += 1
        self._execute(slot)
        return slot.job

    # -- lifecycle ----------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the workers run (between start() and stop())."""
        return self._state == "running"

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
            self._state = "running"
            self._stop_event = threading.Event()
            self._queues = served or self.config.queues
            self._concurrency = concurrency if concurrency is not None else self.config.concurrency
            self._limits = {c.name: c for c in self.config.queue_configs if c.name in self._queues}
            self._buckets = {
                c.name: TokenBucket(c.rate_limit, c.rate_burst) for c in self._limits.values() if c.rate_limit
            }
            self._wake_pending = True
            self._threads_stop = False
            self._next_due = math.inf
            self._paused_checked = -math.inf
            self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
            self._pool = WorkerPool(self._concurrency, name="jobs-worker")
            self._threads = [
                threading.Thread(target=self._fetch_loop, name="threaddispatch-jobs-fetcher", daemon=True),
                threading.Thread(target=self._maintenance_loop, name="threaddispatch-jobs-heartbeat", daemon=True),
            ]
            self._cron_thread = None
            # Started under the lock: a stop() racing this start (it reads _threads under the
            # lock) must never find a thread it cannot join yet. Thread.start() only waits for
            # the thread to exist, not for it to take the lock, so this cannot deadlock.
            for thread in self._threads:
                thread.start()
        self._ensure_cron_thread()
        try:
            unsubscribe = self.store.subscribe_wakeups(self._store_wakeup)
        except StoreError:
            self.logger.warning("store wake-ups unavailable; polling only", exc_info=True)
        else:
            with self._lock:
                # A stop() that raced this start has already looked for a subscription to end.
                keep = self._state == "running" and self._unsubscribe is None
                if keep:
                    self._unsubscribe = unsubscribe
            if not keep:
                unsubscribe()

    def _store_wakeup(self, queue: str | None, run_at: float | None) -> None:
        """The store saw jobs arrive on ``queue`` (None: anywhere), due from ``run_at``: wake the fetcher.

        Called on a store thread (e.g. PostgresStore's LISTEN thread); takes the lock briefly.
        """
        if queue is not None and queue not in self._queues:
            return
        with self._lock:
            if self._state != "running":
                return
            if run_at is not None and run_at > time.time():
                self._next_due = min(self._next_due, run_at)
            self._wake_pending = True
            self._wake.notify()

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
        budget = self.config.shutdown_timeout if timeout is None else check_seconds("timeout", timeout)
        deadline = time.monotonic() + budget
        on_engine_thread = getattr(_ENGINE_THREAD, "runtime", None) is self._runtime
        with self._lock:
            if self._state != "running":
                if self._state == "stopping":
                    if on_engine_thread:
                        return False  # the stopper may be waiting for this very thread
                    # Another thread is stopping: wait for it within our own budget.
                    while self._state == "stopping":
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            return False
                        self._idle.wait(remaining)
                return True
            self._state = "stopping"
            self._stop_event.set()
            self._wake.notify_all()
            fetcher = self._threads[0]
            pool = self._pool
        if not on_engine_thread:
            return self._finish_stop(deadline, fetcher, pool, None)
        stopper = threading.Thread(
            target=self._finish_stop,
            args=(deadline, fetcher, pool, threading.current_thread()),
            name="threaddispatch-jobs-stop",
            daemon=True,
        )
        try:
            stopper.start()
        except RuntimeError:  # interpreter shutdown: the exit drain finishes the stop
            self.logger.warning("stop() on an engine thread during interpreter exit: left to the exit drain")
        return False

    def _finish_stop(
        self, deadline: float, fetcher: threading.Thread, pool: WorkerPool | None, caller: threading.Thread | None
    ) -> bool:
        """The rest of :meth:`stop` once the state is "stopping"; ``caller``: an engine thread whose job stays."""
        if fetcher is not threading.current_thread():
            fetcher.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()
        self._flush_completions()  # workers queue no more once the state left "running"
        self._release_unstarted()
        clean = self._wait_inflight(deadline)
        handed_back = self._hand_back_running(caller)
        with self._lock:
            self._threads_stop = True
            self._maint.notify_all()
            threads = [*self._threads[1:], *([self._cron_thread] if self._cron_thread else [])]
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        if pool is not None:
            pool.shutdown(max(0.0, deadline - time.monotonic()))
        self._cron.release_leases(self.worker_id, deadline)
        with self._lock:
            self._state = "stopped"
            self._idle.notify_all()
        self.events.emit("shutdown")
        return clean and not handed_back

    def _release_unstarted(self) -> None:
        with self._lock:
            slots = [slot for slot in self._inflight.values() if not slot.started and not slot.settled]
            for slot in slots:
                slot.settled = True
                self._forget(slot)
        if slots:
            try:
                self.store.release([slot.job.id for slot in slots], worker_id=self.worker_id, now=time.time())
            except StoreError:
                self.logger.exception("could not release %d unstarted jobs; they will be reaped as stale", len(slots))
            with self._lock:
                self._stats["released"] += len(slots)

    def _wait_inflight(self, deadline: float) -> bool:
        with self._lock:
            while any(not slot.abandoned for slot in self._inflight.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
            return not self._inflight and not self._orphans

    def _hand_back_running(self, caller: threading.Thread | None) -> int:
        with self._lock:
            slots = [
                slot
                for slot in self._inflight.values()
                if not slot.settled and (caller is None or slot.thread is not caller)
            ]
            for slot in slots:
                slot.settled = slot.abandoned = True
                slot.ctx._cancel()
        if not slots:
            return 0
        self.logger.warning(
            "stop: %d job(s) still running at the shutdown timeout are handed back: %s",
            len(slots), ", ".join(f"{slot.job.name} {slot.job.id}" for slot in slots),
        )  # fmt: skip
        try:
            self.store.release(
                [slot.job.id for slot in slots], worker_id=self.worker_id, now=time.time(), refund_attempt=False
            )
        except StoreError:
            self.logger.exception("could not hand back %d running jobs; they will be reaped as stale", len(slots))
        with self._lock:
            self._stats["released"] += len(slots)
        return len(slots)

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
            if self._state != "running":
                return (0, 0)
            before = self._stats["completed"] + self._stats["failed"] + self._stats["retried"]
        self.stop(max(0.0, deadline - time.monotonic()))
        with self._lock:
            done = self._stats["completed"] + self._stats["failed"] + self._stats["retried"] - before
            # Handed back, not lost: another worker runs them. Reported as "lost" to this process.
            return (done, len(self._inflight) + len(self._orphans))

    def _reset_after_fork(self) -> None:
        # The child has none of the parent's threads; its claims stay the parent's.
        self._init_runtime()

    # -- fetching -------------------------------------------------------------------------------------

    def _refresh_paused(self) -> None:
        now = time.monotonic()
        if now - self._paused_checked < max(self.config.poll_interval, 1.0):
            return
        self._paused_checked = now
        try:
            paused = self.store.paused_queues()
        except StoreError:
            self.logger.warning("could not read paused queues", exc_info=True)
            return
        with self._lock:
            self._paused = paused

    def _plan(self, free: int) -> tuple[list[tuple[list[str], int, TokenBucket | None]], float]:
        """Claims to make now as (queues, limit, bucket); and how soon a rate limit frees a token."""
        plans: list[tuple[list[str], int, TokenBucket | None]] = []
        unlimited: list[str] = []
        rate_wait = math.inf
        for queue in self._queues:
            if queue in self._paused:
                continue
            limits = self._limits.get(queue)
            if limits is None:
                unlimited.append(queue)
                continue
            room = free
            if limits.max_concurrency is not None:
                room = min(room, limits.max_concurrency - self._queue_running.get(queue, 0))
            if room <= 0:
                continue
            bucket = self._buckets.get(queue)
            if bucket is not None:
                room = bucket.take(room)
                if room <= 0:
                    rate_wait = min(rate_wait, bucket.wait_time())
                    continue
            plans.append(([queue], room, bucket))
        if unlimited:
            plans.append((unlimited, free, None))
        if len(plans) > 1:
            # Rotate so no queue always claims first and starves the others.
            self._rotation = (self._rotation + 1) % len(plans)
            plans = plans[self._rotation :] + plans[: self._rotation]
        return plans, rate_wait

    def _fetch_loop(self) -> None:
        _ENGINE_THREAD.runtime = self._runtime
        idle = self.config.poll_interval
        poll = self.config.poll_interval
        while True:
            self._refresh_paused()
            with self._lock:
                if self._state != "running":
                    return
                batch, self._done = self._done, []
                # Slots of jobs in the batch are free once it is written (in the claim's transaction).
                free = self._concurrency - len(self._inflight) - len(self._orphans) + len(batch)
                if free <= 0:
                    # Woken by a finishing job (or stop); nothing to claim meanwhile.
                    self._wake.wait(poll)
                    continue
                self._wake_pending = False
                plans, rate_wait = self._plan(free)
            claimed: list[JobRecord] = []
            failed_store = False
            for queues, planned, bucket in plans:
                limit = min(planned, free - len(claimed))
                if limit <= 0:
                    if bucket is not None:
                        bucket.give_back(planned)
                    continue
                try:
                    if batch:
                        # Group commit: the finished jobs and the next claim share one transaction.
                        applied, jobs = self.store.complete_and_claim(
                            self._outcomes(batch), queues, limit, worker_id=self.worker_id, now=time.time()
                        )
                        self._finish_batch(batch, applied)
                        batch = []
                    else:
                        jobs = self.store.claim(queues, limit, worker_id=self.worker_id, now=time.time())
                except StoreError:
                    self.logger.warning("claiming jobs failed; retrying after %.3gs", idle, exc_info=True)
                    jobs = []
                    failed_store = True
                    if batch:
                        self._finish_batch(batch, None)
                        batch = []
                if bucket is not None:
                    bucket.give_back(planned - len(jobs))
                claimed.extend(jobs)
            if batch:
                self._write_batch(batch)
            if claimed:
                self._dispatch(claimed)
                idle = poll
                continue
            with self._lock:
                if self._state != "running":
                    return
                if (self._wake_pending or self._done) and not failed_store:
                    continue
                wait = min(idle, rate_wait)
                if self._next_due < math.inf:
                    wait = min(wait, max(0.0, self._next_due - time.time()))
                    if self._next_due <= time.time():
                        self._next_due = math.inf  # due now; the next claim takes it (or it was taken)
                self._stats["idle_polls"] += 1
                self._wake.wait(wait)
                woken = self._wake_pending
            idle = poll if woken else min(idle * 2, self.config.max_poll_interval)

    def _dispatch(self, jobs: list[JobRecord]) -> None:
        slots = []
        with self._lock:
            stopping = self._state != "running"
            if not stopping:
                for job in jobs:
                    slot = _Slot(job, self._context(job), self._definitions.get(job.name))
                    previous = self._inflight.get(job.id)
                    if previous is not None:
                        self._orphans.add(previous)  # its handler still runs; the new claim takes its key
                    self._inflight[job.id] = slot
                    self._queue_running[job.queue] = self._queue_running.get(job.queue, 0) + 1
                    slots.append(slot)
                self._stats["claimed"] += len(jobs)
            pool = self._pool
        if stopping or pool is None:
            # Claimed while stop() began: give them straight back.
            try:
                self.store.release([job.id for job in jobs], worker_id=self.worker_id, now=time.time())
            except StoreError:
                self.logger.exception("could not release %d jobs at stop; they will be reaped as stale", len(jobs))
            return
        for slot in slots:
            pool.run(self._execute, slot)

    # -- executing ------------------------------------------------------------------------------------

    def _execute(self, slot: _Slot) -> None:
        # Usually on a pool thread; on the caller when the pool runs work inline (exit drain).
        previous = getattr(_ENGINE_THREAD, "runtime", None)
        _ENGINE_THREAD.runtime = self._runtime
        try:
            self._run_slot(slot)
        finally:
            _ENGINE_THREAD.runtime = previous

    def _run_slot(self, slot: _Slot) -> None:
        with self._lock:
            if slot.settled:
                return  # released at stop before it started
            slot.started = True
            slot.thread = threading.current_thread()
        job = slot.job
        ctx = slot.ctx
        ctx.started = time.monotonic()
        if self.events.has_listeners("job_started"):
            self.events.emit("job_started", job)
        definition = slot.definition
        error: BaseException | None = None
        result: object = None
        text = note = None
        if definition is None:
            error = ConfigurationError(f"no handler registered for job name {job.name!r} in this worker")
        else:
            try:
                raw = job.payload  # decoded as job.decoded_payload() does; "null" (no payload) without json
                result = self._call_chain(ctx, definition.fn, None if raw == "null" else json.loads(raw))
            except BaseException as caught:  # noqa: BLE001 - every handler outcome is recorded
                error = caught
            if self.config.immediate and ctx.deadline is not None and time.monotonic() > ctx.deadline:
                # Nothing interrupted the caller's thread: the attempt counts as timed out, as it would have.
                error, result = ctx._timeout_error(), None
        if error is None:
            text, note = self._encode_result(job, result)
        with self._lock:
            if slot.settled:
                # Timed out, lost or handed back meanwhile: that outcome stands; this one is discarded.
                self._forget(slot)
                return
            slot.settled = True
            if error is None and self._state == "running":
                # Group commit: the fetcher writes every finished job in one transaction before
                # its next claim. The slot stays in flight (and its job running) until then.
                self._done.append((slot, text, note, result))
                self._wake_pending = True
                self._wake.notify()
                return
        try:
            if error is None:
                self._record_success(slot, text, note, result)
            else:
                self._record_failure(slot, error)
        finally:
            with self._lock:
                self._forget(slot)

    def _encode_result(self, job: JobRecord, result: object) -> tuple[str | None, str | None]:
        if result is None:
            return None, None
        try:
            return _ENCODER.encode(result), None
        except (TypeError, ValueError, RecursionError) as error:
            note = f"result not stored: not JSON-serialisable ({error})"
            self.logger.error("job %s %s: %s", job.name, job.id, note)
            return None, note

    def _flush_completions(self) -> None:
        """Write the completions the workers queued, in one store transaction (any thread; no lock held)."""
        with self._lock:
            batch, self._done = self._done, []
        if batch:
            self._write_batch(batch)

    def _outcomes(self, batch: list[tuple[_Slot, str | None, str | None, object]]) -> list[Completion]:
        return [Completion(slot.job.id, self.worker_id, slot.job.attempts, text, note) for slot, text, note, _ in batch]

    def _write_batch(self, batch: list[tuple[_Slot, str | None, str | None, object]]) -> None:
        applied: set[str] | None
        try:
            applied = self.store.complete_many(self._outcomes(batch), now=time.time())
        except StoreError:
            applied = None
        self._finish_batch(batch, applied)

    def _finish_batch(
        self, batch: list[tuple[_Slot, str | None, str | None, object]], applied: set[str] | None
    ) -> None:
        """After a group commit: count, free the slots, report lost claims; ``applied`` None = write failed."""
        if applied is None:
            self.logger.error(
                "%d jobs ran but their completion was not stored; they will be reaped and may run again", len(batch)
            )
        now = time.time()
        completed = []
        for slot, text, note, result in batch:
            if applied is not None and slot.job.id in applied:
                job = slot.job
                job.state, job.result, job.finished_at, job.error = JobState.COMPLETED, text, now, note
                completed.append((job, result))
        with self._lock:
            self._stats["completed"] += len(completed)
            for slot, _, _, _ in batch:
                self._forget(slot)
            pool = self._pool
        for slot, _, _, _ in batch:
            if applied is not None and slot.job.id not in applied:
                self._lost(slot)
        if completed and self.events.has_listeners("job_completed"):
            # Hooks are user code: run them on a worker thread, never on the fetcher.
            if pool is not None:
                try:
                    pool.run(self._emit_completed, completed)
                    return
                except DispatcherClosedError:
                    pass
            self._emit_completed(completed)

    def _emit_completed(self, completed: list[tuple[JobRecord, object]]) -> None:
        previous = getattr(_ENGINE_THREAD, "runtime", None)
        _ENGINE_THREAD.runtime = self._runtime
        try:
            for job, result in completed:
                self.events.emit("job_completed", job, result)
        finally:
            _ENGINE_THREAD.runtime = previous

    def _call_chain(self, ctx: JobContext, fn: Handler, payload: Any) -> object:
        # Each step gets ctx and a zero-argument call of the rest; partial objects do it without
        # a Python frame per level.
        call_next: Callable[[], object] = HandlerCall(fn, ctx, payload)
        for step in reversed(self._steps):
            call_next = partial(step, ctx, call_next)
        return call_next()

    def _forget(self, slot: _Slot) -> None:
        """Drop a slot from the in-flight table (lock held); wake the fetcher, stop() and result() waiters."""
        if self._inflight.get(slot.job.id) is slot:
            del self._inflight[slot.job.id]
        elif slot in self._orphans:
            self._orphans.discard(slot)
        else:
            return
        queue = slot.job.queue
        left = self._queue_running.get(queue, 1) - 1
        if left:
            self._queue_running[queue] = left
        else:
            self._queue_running.pop(queue, None)
        self._wake.notify()
        if self._state != "running":
            self._idle.notify_all()
        for waiter in self._waiters.get(slot.job.id, ()):
            waiter.set()

    def _record_success(self, slot: _Slot, text: str | None, note: str | None, result: object) -> None:
        job = slot.job
        now = time.time()
        try:
            applied = self.store.complete(
                job.id, worker_id=self.worker_id, attempts=job.attempts, result=text, now=now, error=note
            )
        except StoreError:
            self.logger.exception("job %s %s ran but its completion was not stored; it may run again", job.name, job.id)
            return
        if not applied:
            self._lost(slot)
            return
        job.state, job.result, job.finished_at, job.error = JobState.COMPLETED, text, now, note
        with self._lock:
            self._stats["completed"] += 1
        if self.events.has_listeners("job_completed"):
            self.events.emit("job_completed", job, result)

    def _record_failure(self, slot: _Slot, error: BaseException) -> None:
        """Record a failed attempt: cancelled, retrying, or failed with a dead letter. Never raises.

        When deciding or recording the outcome raises (anything but a StoreError, which leaves
        the job to the reaper), the attempt still ends: the job fails for good with a dead letter.
        """
        try:
            self._settle_failure(slot, error)
        except Exception as broken:  # a job must never be left running by a bug here
            self.logger.exception(
                "job %s %s: recording its failure (%s) raised; failing it for good", slot.job.name, slot.job.id,
                type(error).__name__,
            )  # fmt: skip
            self._fail_for_good(slot, error, broken)

    def _fail_for_good(self, slot: _Slot, error: BaseException, broken: Exception) -> None:
        """The fallback of :meth:`_record_failure`: fail the claim with a dead letter carrying both errors."""
        job = slot.job
        now = time.time()
        try:
            text = f"{_error_text(error)}\nwhile recording it: {_error_text(broken)}"
            letter = self.store.fail(job.id, worker_id=self.worker_id, attempts=job.attempts, error=text, now=now)
        except Exception:  # nothing is left to try: the reaper recovers the job
            self.logger.exception("job %s %s: its failure was not stored; it will be reaped", job.name, job.id)
            return
        if letter is None:
            self._lost(slot)
            return
        job.state, job.error, job.finished_at = JobState.FAILED, text, now
        self._count("failed")

    def _retry_delay(self, slot: _Slot, error: BaseException) -> tuple[float | None, BaseException]:
        """Seconds before the next attempt (None: fail for good), and the error to record.

        The decision is :meth:`RetryPolicy.next_delay`'s, with the job's own limit
        (``max_retries + 1`` attempts) and the definition's backoff or the engine's. A
        ``Retry`` whose delay is bad (set after construction: the constructor checks it)
        makes the failure final at once, recorded with that ConfigurationError, as
        ``next_delay`` rules. (``Retry(delay=-1)`` itself raises in the handler: an
        ordinary error, retried like any other.)
        """
        if isinstance(error, Retry) and error.delay is not None:
            try:
                check_seconds("Retry delay", error.delay)
            except ConfigurationError as bad:
                bad.__cause__ = error
                return None, bad
        backoff = (slot.definition.backoff if slot.definition else None) or self.config.backoff
        try:
            policy = self._policies.get(backoff)
            if policy is None:
                policy = self._policies[backoff] = RetryPolicy(backoff=backoff)
        except TypeError:  # an unhashable backoff: no cache
            policy = RetryPolicy(backoff=backoff)
        job = slot.job
        return policy.next_delay(job.attempts, error, max_attempts=job.max_retries + 1), error

    def _settle_failure(self, slot: _Slot, error: BaseException) -> None:
        job = slot.job
        now = time.time()
        text = _error_text(error)
        try:
            if isinstance(error, Cancel):
                if self.store.cancel(job.id, now=now, worker_id=self.worker_id, attempts=job.attempts, error=text):
                    job.state, job.error, job.finished_at = JobState.CANCELLED, text, now
                    self._count("cancelled")
                    self.events.emit("job_cancelled", job, error)
                else:
                    self._lost(slot)
                return
            delay, error = self._retry_delay(slot, error)
            text = _error_text(error)
            if delay is not None:
                if self.config.immediate:
                    delay = 0.0  # immediate mode retries at once
                if self.store.retry_later(
                    job.id, worker_id=self.worker_id, attempts=job.attempts, run_at=now + delay, error=text, now=now
                ):
                    job.state, job.error, job.run_at = JobState.RETRYING, text, now + delay
                    with self._lock:
                        self._stats["retried"] += 1
                        if job.queue in self._queues:
                            self._next_due = min(self._next_due, now + delay)
                            self._wake.notify()
                    self.events.emit("job_retrying", job, error, delay)
                else:
                    self._lost(slot)
                return
            letter = self.store.fail(job.id, worker_id=self.worker_id, attempts=job.attempts, error=text, now=now)
            if letter is None:
                self._lost(slot)
                return
            job.state, job.error, job.finished_at = JobState.FAILED, text, now
            self._count("failed")
            self.events.emit("job_failed", job, error)
            self.events.emit("job_dlq", job, letter)
        except StoreError:
            self.logger.exception(
                "job %s %s failed (%s) but the failure was not stored; it will be reaped and run again",
                job.name, job.id, type(error).__name__,
            )  # fmt: skip

    def _count(self, name: str) -> None:
        with self._lock:
            self._stats[name] += 1

    def _lost(self, slot: _Slot) -> None:
        """The store says the job is no longer our claim (cancelled, reaped, re-claimed)."""
        slot.ctx._cancel()
        self._count("lost")
        self.logger.info("job %s %s is no longer this worker's claim; its outcome is discarded",
                         slot.job.name, slot.job.id)  # fmt: skip

    # -- heartbeat, timeouts, reaping -------------------------------------------------------------------

    def _context(self, job: JobRecord) -> JobContext:
        return JobContext(job, self, self.logger, immediate=self.config.immediate, on_deadline=self._deadline_armed)

    def _deadline_armed(self, deadline: float) -> None:
        with self._lock:
            self._maint.notify()

    def _maintenance_loop(self) -> None:
        _ENGINE_THREAD.runtime = self._runtime
        interval = self.config.heartbeat_interval
        retention = self.config.retention
        purge_every = max(interval, min(3600.0, (retention or 0.0) / 2))
        next_beat = time.monotonic()
        next_purge = time.monotonic()
        while True:
            with self._lock:
                if self._threads_stop:
                    return
                now = time.monotonic()
                deadlines = [s.ctx.deadline for s in self._inflight.values() if s.ctx.deadline and not s.settled]
                wake_at = min([next_beat, *deadlines])
                if wake_at > now:
                    self._maint.wait(wake_at - now)
                    continue
                expired = [
                    slot
                    for slot in self._inflight.values()
                    if not slot.settled and slot.ctx.deadline is not None and slot.ctx.deadline <= now
                ]
                for slot in expired:
                    slot.settled = slot.abandoned = True
                beat = now >= next_beat
                stopping = self._state == "stopping"
            for slot in expired:
                self._time_out(slot)
            if not beat:
                continue
            next_beat = time.monotonic() + interval
            self._heartbeat()
            if not stopping:
                self._reap()
                if retention is not None and time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + purge_every
                    try:
                        purged = self.store.purge_finished(older_than=time.time() - retention)
                    except StoreError:
                        self.logger.warning("purging finished jobs failed", exc_info=True)
                    else:
                        if purged:
                            self.logger.info("purged %d finished jobs older than %.3gs", purged, retention)

    def _time_out(self, slot: _Slot) -> None:
        slot.ctx._cancel()
        self._count("timed_out")
        error = DispatchTimeoutError(f"job {slot.job.name} {slot.job.id} timed out after {slot.ctx.timeout}s")
        self.logger.warning("%s; its thread keeps running until the handler returns", error)
        self._record_failure(slot, error)

    def _heartbeat(self) -> None:
        with self._lock:
            ids = [job_id for job_id, slot in self._inflight.items() if not slot.settled]
        if not ids:
            return
        try:
            alive = self.store.heartbeat(ids, worker_id=self.worker_id, now=time.time())
        except StoreError:
            self.logger.warning("heartbeat failed for %d jobs", len(ids), exc_info=True)
            return
        if len(alive) == len(ids):
            return
        with self._lock:
            lost = [self._inflight[i] for i in ids if i not in alive and i in self._inflight]
            lost = [slot for slot in lost if not slot.settled]
            for slot in lost:
                slot.settled = slot.abandoned = True
        for slot in lost:
            self._lost(slot)

    def _reap(self) -> None:
        now = time.time()
        try:
            reaped = self.store.reap_stale(older_than=now - self.config.stale_job_threshold, now=now)
        except StoreError:
            self.logger.warning("recovering stale jobs failed", exc_info=True)
            return
        if reaped:
            with self._lock:
                self._stats["reaped"] += len(reaped)
                self._next_due = min(self._next_due, now)
                self._wake_pending = True
                self._wake.notify()
            self.logger.warning("recovered %d stale job(s) of dead workers: %s", len(reaped), ", ".join(reaped))

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
        Blocks for one store write.
        """
        stored = self._cron.declare(expression, job_name, payload, queue=queue, priority=priority, name=name, tz=tz)
        with self._lock:
            start = self._state == "running" and self._cron_thread is None
        if start:
            self._ensure_cron_thread()
        return stored

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

    def _ensure_cron_thread(self) -> None:
        with self._lock:
            if self._cron_thread is not None or self._state != "running":
                return
            self._cron_thread = threading.Thread(target=self._cron_loop, name="threaddispatch-jobs-cron", daemon=True)
            self._cron_thread.start()  # under the lock, for the same reason as in start()

    def _cron_loop(self) -> None:
        _ENGINE_THREAD.runtime = self._runtime
        self._cron.run(self.worker_id, self._stop_event, max(self.config.stale_job_threshold, 0.1))

    def _cron_job(self, entry: CronEntry, definition: JobDefinition, tick: float, now: float) -> JobRecord:
        """The job of ``entry``'s ``tick``: unique per tick, so a tick fired twice stores one job."""
        return self._build(
            entry.job_name,
            entry.payload,
            definition,
            queue=entry.queue,
            priority=entry.priority,
            run_at=now,
            max_retries=None,
            unique_key=f"cron:{entry.name}:{tick!r}",
            now=now,
        )

    # -- results and management ---------------------------------------------------------------------------

    def result(self, job_id: str, timeout: float | None = None) -> Any:
        """Wait for the job to finish and return its handler's (JSON-decoded) return value.

        Blocks up to ``timeout`` seconds (None: no limit): woken at once when this
        process finishes the job, otherwise polling the store. Raises
        DispatchTimeoutError when time runs out, JobNotFoundError for an unknown (or
        purged) job, CancelledError for a cancelled job and InvalidStateError carrying
        the error text for a failed one.
        """
        check_text("job id", job_id)
        deadline = None if timeout is None else time.monotonic() + check_seconds("timeout", timeout)
        poll = min(self.config.poll_interval, 0.25)
        event = threading.Event()
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(event)
        try:
            while True:
                event.clear()
                job = self.store.get(job_id)
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
                events = self._waiters.get(job_id)
                if events is not None:
                    events.discard(event)
                    if not events:
                        del self._waiters[job_id]

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
        with self._lock:
            slot = self._inflight.get(job_id)
            if slot is not None and not slot.settled:
                slot.settled = slot.abandoned = True
            else:
                slot = None
        if slot is not None:
            slot.ctx._cancel()
            self._count("cancelled")

    def _cancel_in_store(self, job_id: str, running: bool) -> None:
        cancellable = ACTIVE_STATES if running else READY_STATES
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

        Raises JobNotFoundError, or InvalidStateError for a job in another state.
        """
        check_text("job id", job_id)
        self.store.requeue(job_id, now=time.time())
        job = self.store.get(job_id)
        if job is not None:
            self._enqueued((job,))

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

        Raises JobNotFoundError for an unknown dead letter.
        """
        check_text("dead letter id", dead_letter_id)
        letter = self.store.get_dead_letter(dead_letter_id)
        if letter is None:
            raise JobNotFoundError(f"no dead letter with id {dead_letter_id!r}")
        definition = self._definitions.get(letter.name)
        if definition is not None:
            timeout = definition.timeout
        else:
            # A management engine (CLI, admin) has no handlers: keep the failed job's timeout.
            original = self.store.get(letter.job_id)
            timeout = original.timeout if original is not None else None
        now = time.time()
        job = JobRecord(
            id=new_job_id(),
            name=letter.name,
            payload=letter.payload,
            queue=letter.queue,
            priority=letter.priority,
            max_retries=letter.max_retries,
            timeout=timeout,
            run_at=now,
            created_at=now,
            updated_at=now,
        )
        job_id = self.store.replay_dead_letter(dead_letter_id, job=job)
        self._enqueued((job,))
        return job_id

    def replay_all(self, queue: str | None = None, *, limit: int | None = None) -> list[str]:
        """:meth:`replay` every dead letter (of ``queue``) there is when called, oldest first; returns the new ids.

        ``limit`` caps how many are replayed, taking the newest (None: all). Dead letters replayed or purged
        by someone else meanwhile are skipped. Blocks for one store read per 500 dead
        letters and one write per replay.
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
        replayed = []
        for letter in chosen:
            try:
                replayed.append(self.replay(letter.id))
            except JobNotFoundError:
                continue
        return replayed

    def purge_dlq(self, older_than: float | None = None) -> int:
        """Delete dead letters older than ``older_than`` seconds (all when None); returns how many."""
        cutoff = None if older_than is None else time.time() - check_seconds("older_than", older_than)
        return self.store.purge_dead_letters(older_than=cutoff)

    def pause_queue(self, queue: str) -> None:
        """Stop claiming jobs of ``queue`` in every engine sharing the store (running jobs finish).

        Takes effect here at once, elsewhere within their ``poll_interval``.
        """
        check_queue(queue)
        self.store.set_queue_paused(queue, True, now=time.time())
        with self._lock:
            self._paused.add(queue)

    def resume_queue(self, queue: str) -> None:
        """Claim jobs of ``queue`` again (see :meth:`pause_queue`)."""
        check_queue(queue)
        self.store.set_queue_paused(queue, False, now=time.time())
        with self._lock:
            self._paused.discard(queue)
            self._wake_pending = True
            self._wake.notify()

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
            data: dict[str, Any] = dict(self._stats)
            data.update(
                state=self._state,
                worker_id=self.worker_id,
                in_flight=len(self._inflight) + len(self._orphans),
                concurrency=self._concurrency,
                queues=list(self._queues),
                running_by_queue=dict(self._queue_running),
                paused=sorted(self._paused),
            )
        return data

    def __repr__(self) -> str:
        return f"<JobEngine {self._state} store={type(self.store).__name__} queues={list(self._queues)}>"
