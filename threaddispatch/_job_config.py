"""The JobEngine's configuration: its tuning (:class:`Config`, :class:`QueueConfig`), job definitions,
extension hook names, and the checks of the values callers pass for them.

Each tuning field is listed once, in :class:`Config`: ``JobEngine(**options)`` and
``JobEngine.from_config`` both go through :meth:`Config.from_options`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from threaddispatch._invoke import call
from threaddispatch._ratelimit import TokenBucket
from threaddispatch._trace import check_tracer_provider
from threaddispatch._validate import INT64_MAX, check_int, check_seconds, check_text, check_wait, show
from threaddispatch.backoff import Backoff, ExponentialJitter
from threaddispatch.errors import ConfigurationError
from threaddispatch.metrics import Metrics, check_metrics
from threaddispatch.stores.base import JobState

__all__ = [
    "EXTENSION_HOOKS",
    "Config",
    "ExtensionHook",
    "Handler",
    "JobDefinition",
    "QueueConfig",
    "define",
    "options_signature",
]

#: A job handler: ``fn(ctx, payload)`` with ctx a :class:`~threaddispatch.JobContext`.
Handler = Callable[[Any, Any], object]

#: Extension hook names and the event each one listens to (an extension implements any subset).
EXTENSION_HOOKS: Mapping[str, str] = {
    "on_job_enqueued": "job_enqueued",  # (job)
    "on_job_started": "job_started",  # (job)
    "on_job_completed": "job_completed",  # (job, result)
    "on_job_failed": "job_failed",  # (job, error) - the last attempt failed; a dead letter follows
    "on_job_retrying": "job_retrying",  # (job, error, delay_seconds)
    "on_job_dlq": "job_dlq",  # (job, dead_letter)
    "on_job_cancelled": "job_cancelled",  # (job, error_or_None)
    "on_cron_fired": "cron_fired",  # (cron_name, job_id) - this engine enqueued a cron entry's tick
    "on_shutdown": "shutdown",  # ()
}


def check_queue(value: object, what: str = "queue") -> str:
    """A queue name (non-empty text); returns it."""
    return check_text(what, value, strip=True)


def check_timeout(value: object) -> float | None:
    """A job timeout: None (no timeout) or seconds > 0."""
    if value is None:
        return None
    return check_seconds("timeout", value, allow_zero=False)


def check_priority(value: object) -> int:
    """A job priority: a 64-bit int."""
    # Symmetric, so negating a priority (claim order) never leaves the 64-bit range.
    return check_int("priority", value, -INT64_MAX, INT64_MAX)


def check_max_retries(value: object) -> int:
    """A job's ``max_retries``: an int >= 0."""
    # attempts reaches max_retries + 1, which must fit the 64-bit column too.
    return check_int("max_retries", value, 0, INT64_MAX - 1)


def check_limit(limit: object, offset: object) -> None:
    """The ``limit`` and ``offset`` of a listing: ints >= 0."""
    check_int("limit", limit, 0)
    check_int("offset", offset, 0)


def check_optional_queue(value: object) -> None:
    """A ``queue`` filter: None or a queue name."""
    if value is not None:
        check_text("queue", value, strip=True)


def check_queues(value: object) -> tuple[str, ...] | None:
    """A ``queues`` override: None, or a non-empty list of queue names (returned once each, in order)."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ConfigurationError(f"queues must be a non-empty list of queue names, got {value!r}")
    for queue in value:
        check_queue(queue)
    return tuple(dict.fromkeys(value))


def check_state_filter(value: object) -> JobState | None:
    """A ``state`` filter: None, a JobState or its value."""
    if value is None or isinstance(value, JobState):
        return value
    try:
        return JobState(value)
    except ValueError:
        known = ", ".join(state.value for state in JobState)
        raise ConfigurationError(f"unknown job state {show(value)}; known: {known}") from None


def check_page(after: object, limit: object, position: object) -> tuple[str, float] | None:
    """The arguments of a keyset page: ``after`` None or ``(id, epoch seconds)``, limit and position >= 0."""
    check_int("limit", limit, 0)
    check_int("position", position, 0)
    if after is None:
        return None
    if not isinstance(after, tuple) or len(after) != 2:
        raise ConfigurationError(f"after must be None or an (id, timestamp) tuple, got {show(after)}")
    anchor_id, anchor_time = after
    if isinstance(anchor_time, bool) or not isinstance(anchor_time, (int, float)) or not math.isfinite(anchor_time):
        raise ConfigurationError(f"after timestamp must be finite epoch seconds, got {show(anchor_time)}")
    return check_text("after id", anchor_id), float(anchor_time)


@dataclass(frozen=True)
class QueueConfig:
    """Limits for one queue, for the whole cluster sharing the engine's store.

    ``max_concurrency``: at most that many of its jobs run at once (None: only the
    engine's ``concurrency`` bounds it). ``rate_limit``: at most that many jobs start
    per second, as a token bucket holding ``rate_burst`` tokens. A job held back by a
    limit stays pending: it is not a failed attempt. Immutable.

    An engine gives its queues' limits to the store when it starts; the memory, SQLite and
    PostgreSQL stores then hold them in every claim, for all the engines and processes
    claiming from the store (one process, one SQLite file, one database), and each engine
    holds them for itself too. Give every worker of a queue the same limits (each claims
    within its own numbers, against the shared bucket and running count; a worker without
    them is not held back). A store without limits of its own (a custom Store) leaves them
    per engine.
    """

    name: str
    max_concurrency: int | None = None
    rate_limit: float | None = None
    rate_burst: int = 1

    def __post_init__(self) -> None:
        check_queue(self.name, "QueueConfig name")
        if self.max_concurrency is not None:
            check_int("max_concurrency", self.max_concurrency, 1)
        if self.rate_limit is not None:
            TokenBucket(self.rate_limit, self.rate_burst)  # validates both
        else:
            check_int("rate_burst", self.rate_burst, 1)


@dataclass(frozen=True)
class Config:
    """The engine's tuning, with the defaults of the design; ``JobEngine(**vars)`` mirrors it.

    Durations are float seconds. The intervals, ``stale_job_threshold`` and ``shutdown_timeout``
    are each at most ``MAX_WAIT`` (1e9 s, about 31 years: the longest a thread can wait; worker
    threads wait for each of them, so a longer one is refused here, not an OverflowError there).
    ``retention``: finished jobs older than that are purged (None keeps them); any finite number
    of seconds, since it is never waited for. ``max_payload_size``: bytes of JSON a payload may take.
    ``metrics``: a :class:`~threaddispatch.metrics.Metrics` the engine records its jobs
    with (None, the default, or NO_METRICS: none, at the cost of one test per job).
    ``tracer_provider``: an OpenTelemetry TracerProvider; each job run then gets a CONSUMER
    span linked to the span that enqueued it (None: no spans).
    Immutable; :meth:`validate` raises ConfigurationError naming a bad value.
    """

    concurrency: int = 10
    queues: tuple[str, ...] = ("default",)
    poll_interval: float = 1.0
    max_poll_interval: float = 30.0
    shutdown_timeout: float = 30.0
    heartbeat_interval: float = 10.0
    stale_job_threshold: float = 30.0
    backoff: Backoff = field(default_factory=lambda: ExponentialJitter(initial=1.0, max=60.0))
    queue_configs: tuple[QueueConfig, ...] = ()
    retention: float | None = 7 * 86400.0
    max_payload_size: int = 1 << 20
    immediate: bool = False
    metrics: Metrics | None = None
    tracer_provider: Any = None

    @classmethod
    def default(cls) -> Config:
        """A Config with every default."""
        return cls()

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Config:
        """The validated Config of ``JobEngine(**options)``: any subset of the fields, by name.

        ``queues`` may be any sequence and ``queue_configs`` any iterable (stored as tuples);
        ``backoff=None`` means the default. TypeError names an unknown option (as a bad keyword
        would), ConfigurationError a bad value.
        """
        names = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"JobEngine() got an unexpected keyword argument {unknown[0]!r}")
        values = dict(options)
        queues = values.get("queues")
        if isinstance(queues, str):
            raise ConfigurationError(f"queues must be a list of queue names, not the str {queues!r}")
        if queues is not None and not isinstance(queues, tuple):
            values["queues"] = tuple(queues)
        if "queue_configs" in values:
            values["queue_configs"] = tuple(values["queue_configs"])
        if values.get("backoff", 0) is None:
            del values["backoff"]
        return cls(**values).validate()

    def options(self) -> dict[str, Any]:
        """Every field by name: ``JobEngine(store, **config.options())`` builds an engine with this tuning."""
        return {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}

    def validate(self) -> Config:
        """Check every field; returns self. Raises ConfigurationError naming the first bad value."""
        check_int("concurrency", self.concurrency, 1)
        if isinstance(self.queues, str) or not isinstance(self.queues, (tuple, list)) or not self.queues:
            raise ConfigurationError(f"queues must be a non-empty list of queue names, got {self.queues!r}")
        for queue in self.queues:
            check_queue(queue)
        check_wait("poll_interval", self.poll_interval, allow_zero=False)
        check_wait("max_poll_interval", self.max_poll_interval, allow_zero=False)
        if self.max_poll_interval < self.poll_interval:
            raise ConfigurationError(
                f"max_poll_interval ({self.max_poll_interval!r}) must be >= poll_interval ({self.poll_interval!r})"
            )
        check_wait("shutdown_timeout", self.shutdown_timeout)
        check_wait("heartbeat_interval", self.heartbeat_interval, allow_zero=False)
        check_wait("stale_job_threshold", self.stale_job_threshold, allow_zero=False)
        if self.stale_job_threshold <= self.heartbeat_interval:
            raise ConfigurationError(
                f"stale_job_threshold ({self.stale_job_threshold!r}) must be > heartbeat_interval "
                f"({self.heartbeat_interval!r}), or live jobs would be taken for dead ones"
            )
        if not callable(self.backoff):
            raise ConfigurationError(f"backoff must be a callable attempt -> seconds, got {self.backoff!r}")
        names = set()
        for config in self.queue_configs:
            if not isinstance(config, QueueConfig):
                raise ConfigurationError(f"queue_configs must hold QueueConfig objects, got {config!r}")
            if config.name in names:
                raise ConfigurationError(f"queue_configs names queue {config.name!r} twice")
            names.add(config.name)
        if self.retention is not None:
            # Never waited for: only subtracted from time.time(), a finite cutoff any store compares.
            check_seconds("retention", self.retention)
        check_int("max_payload_size", self.max_payload_size, 2)
        if not isinstance(self.immediate, bool):
            raise ConfigurationError(f"immediate must be True or False, got {self.immediate!r}")
        if self.metrics is not None:
            check_metrics(self.metrics)
        check_tracer_provider(self.tracer_provider)
        return self


@dataclass(frozen=True)
class JobDefinition:
    """A registered job: its handler ``fn(ctx, payload)`` and default options. Immutable."""

    name: str
    fn: Handler
    max_retries: int = 3
    timeout: float | None = 300.0
    queue: str = "default"
    priority: int = 0
    backoff: Backoff | None = None


def define(
    name: str,
    fn: Handler,
    *,
    max_retries: int = 3,
    timeout: float | None = 300.0,
    queue: str = "default",
    priority: int = 0,
    backoff: Backoff | None = None,
) -> JobDefinition:
    """The checked :class:`JobDefinition` of ``JobEngine.register``; ConfigurationError names a bad value."""
    check_text("job name", name)
    if not callable(fn):
        raise ConfigurationError(f"job {name!r}: handler must be callable fn(ctx, payload), got {fn!r}")
    if backoff is not None and not callable(backoff):
        raise ConfigurationError(f"job {name!r}: backoff must be callable attempt -> seconds, got {backoff!r}")
    return JobDefinition(
        name,
        fn,
        max_retries=check_max_retries(max_retries),
        timeout=check_timeout(timeout),
        queue=check_queue(queue),
        priority=check_priority(priority),
        backoff=backoff,
    )


class ExtensionHook:
    """An extension hook as an event listener: sync or async (awaited on this thread's private loop).

    A BaseException that is not an Exception (SystemExit, ...) becomes a RuntimeError, so
    the emitter logs it like any failing listener and the thread goes on.
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., object]) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> None:
        outcome = call(self.fn, *args)
        error = outcome.error
        if error is None:
            return
        if isinstance(error, Exception):
            raise error
        raise RuntimeError(f"extension hook {show(self.fn)} raised {type(error).__name__}: {error}") from error

    def __repr__(self) -> str:
        return repr(self.fn)


def options_signature(signature: inspect.Signature) -> inspect.Signature:
    """``signature`` (of ``JobEngine.__init__``, ending in ``**options``) with that catch-all spelled out.

    Every :class:`Config` field becomes a keyword-only parameter with its default (None for
    ``backoff``: the engine's default), so ``help(JobEngine)`` and runtime introspection list
    them, while the fields themselves stay listed once, in Config.
    """
    fixed = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    fields = [
        inspect.Parameter(
            item.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None if item.default is dataclasses.MISSING else item.default,
            annotation=item.type,
        )
        for item in dataclasses.fields(Config)
    ]
    return signature.replace(parameters=[*fixed, *fields])
