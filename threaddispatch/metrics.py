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

Names follow OpenTelemetry's messaging semantic conventions where one applies
(``messaging.client.sent.messages``, ``messaging.client.operation.duration``) and are
``threaddispatch.*`` otherwise. Every reading carries ``threaddispatch.face`` (the class)
and ``threaddispatch.dispatcher`` (the face's name).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

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
    "Metric",
    "Metrics",
    "NoMetrics",
    "Reading",
    "UpDownCounter",
    "Watched",
    "check_metrics",
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
#: Recorded once per batch sent (never read from stats()).
BATCH_SIZE = Metric("threaddispatch.batch.size", "histogram", "{message}", "Entries per send_batch call")
OPERATION_DURATION = Metric(
    "messaging.client.operation.duration", "histogram", "s", "Duration of one send (send_batch or dispatch)"
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
    BATCH_SIZE,
    OPERATION_DURATION,
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
    "JobEngine": {
        **{
            outcome: (JOBS, {"threaddispatch.job.outcome": outcome})
            for outcome in ("claimed", "completed", "failed", "retried", "cancelled", "timed_out", "lost")
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
    return found


def _job_states(engine: Any, base: dict[str, str]) -> list[Reading]:
    try:
        counts: Mapping[str, int] = engine.counts()
    except Exception:  # noqa: BLE001 - a store that cannot answer now: no state gauges in this reading
        return []
    return [Reading(JOB_STATES, count, {**base, "threaddispatch.job.state": state}) for state, count in counts.items()]


class Watched:
    """The faces a collector reads, held weakly (a collected face leaves the readings); thread-safe."""

    def __init__(self, faces: Iterable[object] = ()) -> None:
        # _lock guards _faces: a collection thread reads it while the application adds faces.
        self._lock = threading.Lock()
        self._faces: weakref.WeakSet[Any] = weakref.WeakSet(faces)

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
