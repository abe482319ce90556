"""Metrics: one small interface, and one vocabulary, for every face.

A face takes ``metrics=``: :data:`NO_METRICS` (the default, which costs nothing: the face
holds None and its send path pays one ``is not None`` test per batch), an
:class:`~threaddispatch.otel.OTelMetrics`, or any :class:`Metrics` of your own.

Two kinds of numbers, and where each comes from:

* Counters and gauges the faces already keep in ``stats()`` (enqueued, delivered, failed,
  dropped, retried, queue depth, ...) are never counted twice on the hot path: they are
  read from ``stats()`` when a collector asks (:func:`readings` turns a face's ``stats()``
  into named readings). An OpenTelemetry exporter reads them through observable
  instruments; :class:`~threaddispatch.prometheus.ThreadDispatchCollector` at scrape time.
* Histograms (batch size, send duration) exist nowhere else, so a face records them once
  per batch sent, through :class:`FaceRecorder`, never per entry.
* A JobEngine (``JobEngine(store, metrics=...)``) has a :class:`JobRecorder`: per queue and
  job name it counts enqueued, started, completed, failed, retried and dead-lettered jobs
  (plain counts under a lock, read at collection time like ``stats()``) and records the
  run-time and queue-wait histograms, once per attempt. Its ``counts()`` and the store's
  per-queue counts give the state and pending gauges, read at collection time too.

Names follow OpenTelemetry's messaging semantic conventions where one applies
(``messaging.client.sent.messages``, ``messaging.client.operation.duration``,
``messaging.client.consumed.messages``, ``messaging.process.duration``) and are
``threaddispatch.*`` otherwise. Every reading carries ``threaddispatch.face`` (the class)
and ``threaddispatch.dispatcher`` (the face's name); a job's also ``messaging.destination.name``
(its queue) and ``threaddispatch.job.name``.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from threaddispatch import _lifecycle
from threaddispatch._validate import show
from threaddispatch.errors import ConfigurationError

__all__ = [
    "BATCH_SIZE",
    "NO_METRICS",
    "OPERATION_DURATION",
    "VOCABULARY",
    "Counter",
    "FaceRecorder",
    "Histogram",
    "JobRecorder",
    "Metric",
    "Metrics",
    "NoMetrics",
    "Reading",
    "UpDownCounter",
    "Watched",
    "check_metrics",
    "job_recorder",
    "readings",
]

#: Attribute values as OpenTelemetry takes them.
Attributes = Mapping[str, "str | bool | int | float"]


class Counter(Protocol):
    """A monotonic sum."""

    def add(self, amount: int | float, attributes: Attributes | None = None) -> None: ...


class UpDownCounter(Protocol):
    """A sum that goes up and down (a queue depth)."""

    def add(self, amount: int | float, attributes: Attributes | None = None) -> None: ...


class Histogram(Protocol):
    """A distribution of recorded values."""

    def record(self, amount: int | float, attributes: Attributes | None = None) -> None: ...


@dataclass(frozen=True)
class Metric:
    """One name of the vocabulary: ``kind`` is ``counter`` (monotonic) or ``gauge`` (goes up and down)."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    unit: str
    description: str


@dataclass(frozen=True)
class Reading:
    """One value of one metric, for one face, read from its ``stats()`` (or ``counts()``)."""

    metric: Metric
    value: int | float
    attributes: dict[str, str]


ENQUEUED = Metric("threaddispatch.enqueued", "counter", "{message}", "Entries accepted by the face")
SENT = Metric(
    "messaging.client.sent.messages",
    "counter",
    "{message}",
    "Entries whose send ended: delivered (no error.type) or failed for good (error.type)",
)
DROPPED = Metric("threaddispatch.dropped", "counter", "{message}", "Entries dropped by the overflow policy")
REJECTED = Metric("threaddispatch.rejected", "counter", "{message}", "Entries refused at put (the buffer was full)")
CANCELLED = Metric("threaddispatch.cancelled", "counter", "{message}", "Entries cancelled before their send")
RETRIED = Metric("threaddispatch.retried", "counter", "{retry}", "Retries scheduled (one per attempt)")
BATCHES = Metric("threaddispatch.batches", "counter", "{batch}", "Batches handed to the send function")
QUEUE_DEPTH = Metric("threaddispatch.queue.depth", "gauge", "{message}", "Entries waiting to be sent")
IN_FLIGHT = Metric("threaddispatch.in_flight", "gauge", "{batch}", "Sends (or batches) in progress")
JOBS = Metric("threaddispatch.jobs", "counter", "{job}", "Jobs by outcome (threaddispatch.job.outcome)")
JOB_RUNNING = Metric("threaddispatch.jobs.running", "gauge", "{job}", "Jobs this engine is running now")
JOB_STATES = Metric(
    "threaddispatch.jobs.state", "gauge", "{job}", "Jobs in the store by state (threaddispatch.job.state)"
)
JOB_PENDING = Metric(
    "threaddispatch.jobs.pending", "gauge", "{job}", "Jobs waiting in the store (state pending), per queue"
)
#: Recorded once per batch sent (never read from stats()).
BATCH_SIZE = Metric("threaddispatch.batch.size", "histogram", "{message}", "Entries per send_batch call")
OPERATION_DURATION = Metric(
    "messaging.client.operation.duration", "histogram", "s", "Duration of one send (send_batch or dispatch)"
)

#: A JobEngine's, counted per job by its :class:`JobRecorder` (read at collection time, as
#: ``stats()`` is), with ``messaging.destination.name`` (the queue) and ``threaddispatch.job.name``.
JOB_ENQUEUED = Metric("threaddispatch.job.enqueued", "counter", "{job}", "Jobs stored by enqueue")
JOB_STARTED = Metric("messaging.client.consumed.messages", "counter", "{job}", "Job attempts a worker started")
JOB_COMPLETED = Metric("threaddispatch.job.completed", "counter", "{job}", "Attempts that succeeded")
JOB_FAILED = Metric(
    "threaddispatch.job.failed",
    "counter",
    "{job}",
    "Attempts that raised (then retried or dead-lettered), by error.type",
)
JOB_RETRIED = Metric("threaddispatch.job.retried", "counter", "{retry}", "Retries scheduled")
JOB_DEAD_LETTERED = Metric(
    "threaddispatch.job.dead_lettered", "counter", "{job}", "Jobs failed for good (a dead letter)"
)
#: Recorded per attempt, with the same attributes (the duration with the semantic conventions' ``messaging.*`` too).
JOB_DURATION = Metric(
    "messaging.process.duration", "histogram", "s", "Run time of one job attempt (handler and middleware)"
)
JOB_QUEUE_WAIT = Metric(
    "threaddispatch.job.queue_wait", "histogram", "s", "From a job's due time (max(run_at, created_at)) to its start"
)

#: Every name, for the instruments an implementation creates up front.
VOCABULARY: tuple[Metric, ...] = (
    ENQUEUED,
    SENT,
    DROPPED,
    REJECTED,
    CANCELLED,
    RETRIED,
    BATCHES,
    QUEUE_DEPTH,
    IN_FLIGHT,
    JOBS,
    JOB_RUNNING,
    JOB_STATES,
    JOB_PENDING,
    BATCH_SIZE,
    OPERATION_DURATION,
    JOB_ENQUEUED,
    JOB_STARTED,
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_RETRIED,
    JOB_DEAD_LETTERED,
    JOB_DURATION,
    JOB_QUEUE_WAIT,
)

_FAILED = {"error.type": "_OTHER"}  # semantic conventions: the fallback error.type (the class is not in stats())

#: Per face class: ``stats()`` key -> (metric, extra attributes).
_STATS: dict[str, dict[str, tuple[Metric, dict[str, str]]]] = {
    "BackgroundDispatcher": {
        "enqueued": (ENQUEUED, {}),
        "sent": (SENT, {}),
        "failed": (SENT, _FAILED),
        "dropped": (DROPPED, {}),
        "retries": (RETRIED, {}),
        "batches": (BATCHES, {}),
        "pending": (QUEUE_DEPTH, {}),
        "in_flight": (IN_FLIGHT, {}),
    },
    "BatchedDispatcher": {
        "submitted": (ENQUEUED, {}),
        "sent": (SENT, {}),
        "failed": (SENT, _FAILED),
        "cancelled": (CANCELLED, {}),
        "batches": (BATCHES, {}),
        "pending": (QUEUE_DEPTH, {}),
        "sending": (IN_FLIGHT, {}),
    },
    "AsyncDispatcher": {
        "buffered": (ENQUEUED, {}),
        "sent": (SENT, {}),
        "failed": (SENT, _FAILED),
        "rejected": (REJECTED, {}),
        "retried": (RETRIED, {}),
        "waiting": (QUEUE_DEPTH, {}),
        "in_flight": (IN_FLIGHT, {}),
    },
    "EndpointBatchDispatcher": {
        "dropped": (DROPPED, {}),
        "exhausted": (SENT, _FAILED),
        "cancelled": (CANCELLED, {}),
        "pending": (QUEUE_DEPTH, {}),
        "active_batches": (IN_FLIGHT, {}),
    },
    "RequestDispatcher": {
        "added": (ENQUEUED, {}),
        "delivered": (SENT, {}),
        "failed": (SENT, _FAILED),
        "cancelled": (CANCELLED, {}),
        "retried": (RETRIED, {}),
        "pending": (QUEUE_DEPTH, {}),
        "running": (IN_FLIGHT, {}),
    },
    "JobEngine": {
        **{
            outcome: (JOBS, {"threaddispatch.job.outcome": outcome})
            for outcome in (
                "claimed",
                "completed",
                "failed",
                "retried",
                "dead_lettered",
                "cancelled",
                "timed_out",
                "lost",
            )
        },
        "in_flight": (JOB_RUNNING, {}),
    },
}


def face_attributes(face: object) -> dict[str, str]:
    """``threaddispatch.face`` and ``threaddispatch.dispatcher`` of ``face`` (its name, its target, or "")."""
    name = getattr(face, "name", None)
    if not isinstance(name, str):
        name = getattr(face, "target_queue", "")
    return {"threaddispatch.face": type(face).__name__, "threaddispatch.dispatcher": str(name or "")}


def _face_kind(face: object) -> str | None:
    for cls in type(face).__mro__:
        if cls.__name__ in _STATS:
            return cls.__name__
    return None


def readings(face: object) -> list[Reading]:
    """``face.stats()`` (and a JobEngine's ``counts()``) as readings of the vocabulary; [] for an unknown face.

    Called at collection (or scrape) time only. A JobEngine's ``counts()`` reads its store:
    a store that cannot answer leaves its state gauges out of this reading.
    """
    kind = _face_kind(face)
    if kind is None:
        return []
    base = face_attributes(face)
    stats: Mapping[str, Any] = face.stats()  # type: ignore[attr-defined]
    found = [
        Reading(metric, stats[key], {**base, **extra})
        for key, (metric, extra) in _STATS[kind].items()
        if isinstance(stats.get(key), (int, float))
    ]
    if kind == "JobEngine":
        found += _job_states(face, base)
        with _JOB_RECORDERS_LOCK:
            recorder = _JOB_RECORDERS.get(face)
        if recorder is not None:
            found += recorder.readings(base)
    return found


def _job_states(engine: Any, base: dict[str, str]) -> list[Reading]:
    try:
        counts: Mapping[str, int] = engine.counts()
        queues = sorted({*engine.config.queues, *(d.queue for d in engine.definitions().values())})
        by_queue: Mapping[str, Mapping[Any, int]] = engine.store.counts_by_queue(queues)
    except Exception:  # noqa: BLE001 - a store that cannot answer now: no state gauges in this reading
        return []
    found = [Reading(JOB_STATES, count, {**base, "threaddispatch.job.state": state}) for state, count in counts.items()]
    for queue, states in by_queue.items():
        pending = sum(count for state, count in states.items() if getattr(state, "value", state) == "pending")
        found.append(Reading(JOB_PENDING, pending, {**base, "messaging.destination.name": queue}))
    return found


class _Renewable(Protocol):
    def _after_fork(self) -> None: ...


#: What holds a lock a forked child must renew (a parent thread may hold it at fork time).
_RENEW: weakref.WeakSet[_Renewable] = weakref.WeakSet()


def renew_after_fork(holder: _Renewable) -> None:
    """Call ``holder._after_fork()`` in every forked child while ``holder`` lives (held weakly)."""
    _RENEW.add(holder)


def _renew_all_after_fork() -> None:
    global _JOB_RECORDERS_LOCK
    _JOB_RECORDERS_LOCK = threading.Lock()
    for holder in list(_RENEW):
        holder._after_fork()


_lifecycle.at_fork_child(_renew_all_after_fork)


class Watched:
    """The faces a collector reads, held weakly (a collected face leaves the readings); thread-safe."""

    def __init__(self, faces: Iterable[object] = ()) -> None:
        # _lock guards _faces: a collection thread reads it while the application adds faces.
        self._lock = threading.Lock()
        self._faces: weakref.WeakSet[Any] = weakref.WeakSet(faces)
        renew_after_fork(self)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    def add(self, face: object) -> None:
        with self._lock:
            self._faces.add(face)

    def discard(self, face: object) -> None:
        with self._lock:
            self._faces.discard(face)

    def readings(self) -> list[Reading]:
        """The readings of every face still alive, read now (each face's ``stats()`` outside the lock)."""
        with self._lock:
            faces = list(self._faces)
        return [reading for face in faces for reading in readings(face)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._faces)


class FaceRecorder:
    """One face's per-batch histograms: batch size and send duration, with the face's attributes.

    A face holds one only when metrics are on; it calls :meth:`send` once per batch sent.
    The attribute dicts are made here, once (per destination), never per call. The
    duration carries the semantic conventions' required ``messaging.*`` attributes; the
    batch size only the face's own (the SDK's cost per record grows with each attribute).
    """

    __slots__ = ("_by_destination", "_durations", "_face", "_sizes")

    def __init__(self, sizes: Histogram, durations: Histogram, attributes: dict[str, str]) -> None:
        self._sizes = sizes
        self._durations = durations
        self._face = dict(attributes)
        # destination (None: the face has none) -> (batch-size attributes, duration attributes)
        self._by_destination: dict[str | None, tuple[dict[str, str], dict[str, str]]] = {}
        self._by_destination[None] = self._attributes(None)

    def send(
        self, size: int, started: float, error: BaseException | None = None, destination: str | None = None
    ) -> None:
        """Record one send of ``size`` entries that began at ``started`` (``time.perf_counter()``) and ends now."""
        seconds = time.perf_counter() - started
        found = self._by_destination.get(destination)
        sizes, durations = self._attributes(destination) if found is None else found
        self._sizes.record(size, sizes)
        if error is not None:
            durations = {**durations, "error.type": type(error).__qualname__}
        self._durations.record(seconds, durations)

    def _attributes(self, destination: str | None) -> tuple[dict[str, str], dict[str, str]]:
        sizes = self._face if destination is None else {**self._face, "messaging.destination.name": destination}
        durations = {
            "messaging.system": "threaddispatch",
            "messaging.operation.name": "send",
            "messaging.operation.type": "send",
            **sizes,
        }
        if len(self._by_destination) < 1000:  # a bound: targets are few; past it, made per call
            self._by_destination[destination] = (sizes, durations)
        return sizes, durations


class JobRecorder:
    """A JobEngine's per-job numbers (the ``JOB_*`` names), by queue and job name. Thread-safe.

    An engine holds one only when metrics are on (:func:`job_recorder`); the runtime calls
    it once per event of a job, after the store write that made the event true. Counts
    are kept here (a dict under a lock: far cheaper than an SDK instrument) and read at
    collection time through :func:`readings`; the run-time and queue-wait histograms are
    recorded, with attribute dicts made once per (queue, job name), but for a failure's
    ``error.type``.
    """

    __slots__ = ("__weakref__", "_by_job", "_counts", "_durations", "_lock", "_waits")

    def __init__(self, metrics: Metrics) -> None:
        self._durations = metrics.histogram(
            JOB_DURATION.name, unit=JOB_DURATION.unit, description=JOB_DURATION.description
        )
        self._waits = metrics.histogram(
            JOB_QUEUE_WAIT.name, unit=JOB_QUEUE_WAIT.unit, description=JOB_QUEUE_WAIT.description
        )
        self._lock = threading.Lock()  # guards _counts
        # (metric name, queue, job name, error.type or "") -> count
        self._counts: dict[tuple[str, str, str, str], int] = {}
        renew_after_fork(self)
        # (queue, job name) -> (attributes, duration attributes). Written without the lock:
        # a lost or repeated insert only builds an equal pair again.
        self._by_job: dict[tuple[str, str], tuple[dict[str, str], dict[str, str]]] = {}

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock, and counts from zero (as the engine's ``stats()`` restart)."""
        self._lock = threading.Lock()
        self._counts = {}

    def _count(self, metric: Metric, job: Any, error_type: str = "") -> None:
        key = (metric.name, job.queue, job.name, error_type)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def _attributes(self, job: Any) -> tuple[dict[str, str], dict[str, str]]:
        key = (job.queue, job.name)
        found = self._by_job.get(key)
        if found is None:
            counted = {"messaging.destination.name": job.queue, "threaddispatch.job.name": job.name}
            # The semantic conventions' required attributes only: the SDK's cost per record grows with each.
            timed = {"messaging.system": "threaddispatch", "messaging.operation.name": "process", **counted}
            found = (counted, timed)
            if len(self._by_job) < 1000:  # a bound: queues and job names are few; past it, made per call
                self._by_job[key] = found
        return found

    def enqueued(self, job: Any) -> None:
        """``job`` was stored by an enqueue (a ``job_enqueued`` listener)."""
        self._count(JOB_ENQUEUED, job)

    def started(self, job: Any) -> None:
        """An attempt of the claimed ``job`` starts now: counted, and its queue wait recorded."""
        self._count(JOB_STARTED, job)
        started_at = job.started_at
        if started_at is not None:
            self._waits.record(max(0.0, started_at - max(job.run_at, job.created_at)), self._attributes(job)[0])

    def completed(self, job: Any, seconds: float) -> None:
        """An attempt of ``job`` succeeded after ``seconds`` (its completion is stored)."""
        self._count(JOB_COMPLETED, job)
        self._durations.record(seconds, self._attributes(job)[1])

    def failed(self, job: Any, seconds: float, error: BaseException, *, retried: bool) -> None:
        """An attempt of ``job`` raised ``error`` after ``seconds``; then ``retried``, or dead-lettered."""
        kind = type(error).__qualname__
        self._count(JOB_FAILED, job, kind)
        self._count(JOB_RETRIED if retried else JOB_DEAD_LETTERED, job)
        self._durations.record(seconds, {**self._attributes(job)[1], "error.type": kind})

    def readings(self, base: Mapping[str, str]) -> list[Reading]:
        """The counts so far, as readings with ``base`` (the engine's attributes) and each job's own."""
        with self._lock:
            counts = list(self._counts.items())
        found = []
        for (name, queue, job_name, error_type), value in counts:
            attributes = {**base, "messaging.destination.name": queue, "threaddispatch.job.name": job_name}
            if error_type:
                attributes["error.type"] = error_type
            found.append(Reading(_COUNTED[name], value, attributes))
        return found


_COUNTED = {
    metric.name: metric
    for metric in (JOB_ENQUEUED, JOB_STARTED, JOB_COMPLETED, JOB_FAILED, JOB_RETRIED, JOB_DEAD_LETTERED)
}
_JOB_RECORDERS: weakref.WeakKeyDictionary[Any, JobRecorder | None] = weakref.WeakKeyDictionary()
_JOB_RECORDERS_LOCK = threading.Lock()  # guards _JOB_RECORDERS; renewed in a forked child


def job_recorder(engine: Any) -> JobRecorder | None:
    """The :class:`JobRecorder` of ``engine`` (a JobEngine), made once; None when its ``metrics`` is off.

    Binding watches the engine (its ``stats()`` and state counts are read at collection
    time) and counts its enqueues through its ``job_enqueued`` event. Idempotent: the
    engine's constructor and every runtime it starts may call it.
    """
    metrics: Metrics | None = engine.config.metrics
    if metrics is None or isinstance(metrics, NoMetrics):
        return None
    with _JOB_RECORDERS_LOCK:
        if engine in _JOB_RECORDERS:
            return _JOB_RECORDERS[engine]
    made = metrics.bind_jobs(engine)  # outside the lock: a Metrics may be the application's own code
    with _JOB_RECORDERS_LOCK:
        if engine in _JOB_RECORDERS:  # another thread bound it meanwhile (watching twice is watching once)
            return _JOB_RECORDERS[engine]
        _JOB_RECORDERS[engine] = made
    if made is not None:
        engine.events.on("job_enqueued", made.enqueued)
    return made


class Metrics:
    """The metrics interface a face takes as ``metrics=``.

    An implementation makes instruments (:meth:`counter`, :meth:`up_down_counter`,
    :meth:`histogram`) and may :meth:`watch` faces, reading their ``stats()`` (through
    :func:`readings`) whenever its backend collects. A face calls :meth:`bind` once, at
    construction: it watches the face and returns the :class:`FaceRecorder` the face
    records its batches with (None: record nothing, as :class:`NoMetrics` does).
    """

    def counter(self, name: str, *, unit: str = "", description: str = "") -> Counter:
        raise NotImplementedError

    def up_down_counter(self, name: str, *, unit: str = "", description: str = "") -> UpDownCounter:
        raise NotImplementedError

    def histogram(self, name: str, *, unit: str = "", description: str = "") -> Histogram:
        raise NotImplementedError

    def watch(self, face: object) -> None:
        """Read ``face``'s ``stats()`` at collection time. This base class has no collection: it does nothing."""

    def bind(self, face: object) -> FaceRecorder | None:
        """Called by a face's constructor: watch it, and return what it records its batches with."""
        self.watch(face)
        sizes = self.histogram(BATCH_SIZE.name, unit=BATCH_SIZE.unit, description=BATCH_SIZE.description)
        durations = self.histogram(
            OPERATION_DURATION.name, unit=OPERATION_DURATION.unit, description=OPERATION_DURATION.description
        )
        return FaceRecorder(sizes, durations, face_attributes(face))

    def bind_jobs(self, engine: object) -> JobRecorder | None:
        """Called once per JobEngine (:func:`job_recorder`): watch it, and return what it records its jobs with."""
        self.watch(engine)
        return JobRecorder(self)


class _Nothing:
    __slots__ = ()

    def add(self, amount: int | float, attributes: Attributes | None = None) -> None:
        pass

    def record(self, amount: int | float, attributes: Attributes | None = None) -> None:
        pass


_NOTHING = _Nothing()


class NoMetrics(Metrics):
    """No metrics (the default): instruments that do nothing, and :meth:`bind` returns None.

    A face bound to it holds no recorder, so its hot path pays nothing for metrics.
    """

    def counter(self, name: str, *, unit: str = "", description: str = "") -> Counter:
        return _NOTHING

    def up_down_counter(self, name: str, *, unit: str = "", description: str = "") -> UpDownCounter:
        return _NOTHING

    def histogram(self, name: str, *, unit: str = "", description: str = "") -> Histogram:
        return _NOTHING

    def bind(self, face: object) -> FaceRecorder | None:
        return None

    def bind_jobs(self, engine: object) -> JobRecorder | None:
        return None

    def __repr__(self) -> str:
        return "NO_METRICS"


#: The default ``metrics=`` of every face.
NO_METRICS = NoMetrics()


def check_metrics(metrics: object) -> Metrics:
    """``metrics`` when it is a :class:`Metrics` (None: :data:`NO_METRICS`); else ConfigurationError."""
    if metrics is None:
        return NO_METRICS
    if not isinstance(metrics, Metrics):
        raise ConfigurationError(f"metrics must be a threaddispatch.metrics.Metrics, got {show(metrics)}")
    return metrics
