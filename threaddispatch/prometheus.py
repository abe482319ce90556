"""A Prometheus collector for the faces' own ``stats()`` (extra ``prometheus``).

``registry.register(ThreadDispatchCollector(dispatcher, engine, ...))``: at each scrape it
reads every face's ``stats()`` (a JobEngine's ``counts()`` too) and reports them under the
names of :mod:`threaddispatch.metrics`, dots made underscores (``messaging.client.sent.messages``
is ``messaging_client_sent_messages_total``), attributes as labels. Nothing runs on the
hot path, and the faces need no ``metrics=`` for it.

The faces are named to the collector, not registered by themselves: which faces a
process exports, and in which registry, is the application's choice; a face knows
nothing of Prometheus, and any face with a ``stats()`` in the vocabulary works, the
ones made before the collector included. Faces are held weakly: a collected face leaves
the scrape. ``stats()`` keeps no distribution and no per-queue job counts: for those
(batch size and send duration, a JobEngine's per-job counters, run time and queue wait),
give the faces ``metrics=PrometheusMetrics(registry)``, which records them as they happen
and reads the rest from ``stats()`` at scrape time, as the collector does.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator, Sequence
from typing import Literal

from threaddispatch.metrics import (
    VOCABULARY,
    Attributes,
    Counter,
    Histogram,
    Metric,
    Metrics,
    UpDownCounter,
    Watched,
    renew_after_fork,
)

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.core import Metric as PromMetric
    from prometheus_client.metrics import Histogram as PromHistogram
    from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry
except ImportError as error:  # pragma: no cover - the extra is missing
    raise ImportError(
        "threaddispatch.prometheus needs prometheus_client: pip install 'threaddispatch[prometheus]'"
    ) from error

__all__ = ["PrometheusMetrics", "ThreadDispatchCollector", "prometheus_name"]

_Key = tuple[tuple[str, str], ...]  # a label set: (attribute, value) pairs, sorted


def prometheus_name(name: str) -> str:
    """A vocabulary name (or attribute) as Prometheus spells it: dots made underscores."""
    return name.replace(".", "_")


class ThreadDispatchCollector(Collector):
    """Reports the ``stats()`` of ``faces`` (and of those :meth:`add`-ed later) at each scrape."""

    def __init__(self, *faces: object) -> None:
        self._faces = Watched(faces)

    def add(self, face: object) -> None:
        """Report ``face`` from the next scrape on; held weakly."""
        self._faces.add(face)

    def remove(self, face: object) -> None:
        """Stop reporting ``face``."""
        self._faces.discard(face)

    def describe(self) -> list[PromMetric]:
        # Names known without reading any face: the registry checks them for clashes, and
        # does not call collect() at register time.
        return [_family(metric, []) for metric in VOCABULARY if metric.kind != "histogram"]

    def collect(self) -> Iterator[PromMetric]:
        by_metric: dict[Metric, list[tuple[dict[str, str], float]]] = {}
        for reading in self._faces.readings():
            by_metric.setdefault(reading.metric, []).append((reading.attributes, reading.value))
        for metric, samples in by_metric.items():
            labels = sorted({key for attributes, _ in samples for key in attributes})
            family = _family(metric, [prometheus_name(label) for label in labels])
            for attributes, value in samples:
                family.add_metric([attributes.get(label, "") for label in labels], value)
            yield family


def _family(metric: Metric, labels: list[str]) -> CounterMetricFamily | GaugeMetricFamily:
    name = prometheus_name(metric.name)
    if metric.kind == "counter":
        return CounterMetricFamily(name, metric.description, labels=labels, unit="")
    return GaugeMetricFamily(name, metric.description, labels=labels)


def _key(attributes: Attributes | None) -> _Key:
    return tuple(sorted((key, str(value)) for key, value in (attributes or {}).items()))


class _Sum:
    """A counter or up-down counter recorded here: its value per label set. Thread-safe."""

    __slots__ = ("__weakref__", "_lock", "_values", "metric")

    def __init__(self, metric: Metric) -> None:
        self.metric = metric
        self._lock = threading.Lock()  # guards _values
        self._values: dict[_Key, float] = {}
        renew_after_fork(self)

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock, and values from zero (as the faces' ``stats()`` restart)."""
        self._lock = threading.Lock()
        self._values = {}

    def add(self, amount: int | float, attributes: Attributes | None = None) -> None:
        key = _key(attributes)
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def family(self) -> PromMetric:
        with self._lock:
            values = dict(self._values)
        labels = sorted({name for key in values for name, _ in key})
        family = _family(self.metric, [prometheus_name(label) for label in labels])
        for key, value in values.items():
            found = dict(key)
            family.add_metric([found.get(label, "") for label in labels], value)
        return family


class _Distribution:
    """A histogram recorded here: per label set, the count in each bucket, and the sum. Thread-safe."""

    __slots__ = ("__weakref__", "_bounds", "_lock", "_values", "metric")

    def __init__(self, metric: Metric, bounds: Sequence[float]) -> None:
        self.metric = metric
        self._bounds = sorted(bounds)
        self._lock = threading.Lock()  # guards _values
        # label set -> [count per bucket (the last one +Inf), sum]
        self._values: dict[_Key, tuple[list[int], list[float]]] = {}
        renew_after_fork(self)

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock, and no values yet."""
        self._lock = threading.Lock()
        self._values = {}

    def record(self, amount: int | float, attributes: Attributes | None = None) -> None:
        key = _key(attributes)
        index = bisect.bisect_left(self._bounds, amount)
        with self._lock:
            found = self._values.get(key)
            if found is None:
                found = self._values[key] = ([0] * (len(self._bounds) + 1), [0.0])
            found[0][index] += 1
            found[1][0] += amount

    def family(self) -> PromMetric:
        with self._lock:
            values = {key: (list(counts), total[0]) for key, (counts, total) in self._values.items()}
        labels = sorted({name for key in values for name, _ in key})
        family = HistogramMetricFamily(
            prometheus_name(self.metric.name), self.metric.description, labels=[prometheus_name(x) for x in labels]
        )
        edges = [repr(float(bound)) for bound in self._bounds] + ["+Inf"]
        for key, (counts, total) in values.items():
            found = dict(key)
            running, buckets = 0, []
            for edge, count in zip(edges, counts, strict=True):
                running += count
                buckets.append((edge, float(running)))
            family.add_metric([found.get(label, "") for label in labels], buckets, total)
        return family


class _Recorded(Collector):
    """The instruments a :class:`PrometheusMetrics` made (one per name), reported at each scrape."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self._lock = threading.Lock()  # guards _sums and _distributions
        self._sums: dict[str, _Sum] = {}
        self._distributions: dict[str, _Distribution] = {}
        renew_after_fork(self)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    def sum(self, name: str, kind: Literal["counter", "gauge"], unit: str, description: str) -> _Sum:
        with self._lock:
            found = self._sums.get(name)
            if found is None:
                found = self._sums[name] = _Sum(_metric(name, kind, unit, description))
            return found

    def distribution(self, name: str, unit: str, description: str) -> _Distribution:
        with self._lock:
            found = self._distributions.get(name)
            if found is None:
                metric = _metric(name, "histogram", unit, description)
                found = self._distributions[name] = _Distribution(metric, self._bounds)
            return found

    def describe(self) -> list[PromMetric]:
        # Every name these instruments may take, known up front (the registry checks them for clashes).
        return [
            HistogramMetricFamily(prometheus_name(metric.name), metric.description)
            for metric in VOCABULARY
            if metric.kind == "histogram"
        ]

    def collect(self) -> Iterator[PromMetric]:
        with self._lock:
            instruments: list[_Sum | _Distribution] = [*self._sums.values(), *self._distributions.values()]
        for instrument in instruments:
            yield instrument.family()


def _metric(name: str, kind: Literal["counter", "gauge", "histogram"], unit: str, description: str) -> Metric:
    """The vocabulary's metric ``name``, or one made for a name of the caller's own."""
    for metric in VOCABULARY:
        if metric.name == name:
            return metric
    return Metric(name, kind, unit, description)


class PrometheusMetrics(Metrics):
    """Metrics in a ``prometheus_client`` registry (None: the default one): ``metrics=PrometheusMetrics()``.

    What a face keeps in ``stats()`` is read at scrape time (as :class:`ThreadDispatchCollector`
    does: nothing on the hot path); what it does not is recorded as it happens: histograms
    (``buckets``: their upper bounds, prometheus_client's defaults unless given) and a
    JobEngine's per-queue, per-job-name counters. Registers two collectors in ``registry``
    (a registry takes one PrometheusMetrics). Thread-safe.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, buckets: Sequence[float] = PromHistogram.DEFAULT_BUCKETS
    ) -> None:
        self.collector = ThreadDispatchCollector()
        self._recorded = _Recorded([float(bound) for bound in buckets if bound != float("inf")])
        target = REGISTRY if registry is None else registry
        target.register(self.collector)
        target.register(self._recorded)

    def counter(self, name: str, *, unit: str = "", description: str = "") -> Counter:
        return self._recorded.sum(name, "counter", unit, description)

    def up_down_counter(self, name: str, *, unit: str = "", description: str = "") -> UpDownCounter:
        return self._recorded.sum(name, "gauge", unit, description)

    def histogram(self, name: str, *, unit: str = "", description: str = "") -> Histogram:
        return self._recorded.distribution(name, unit, description)

    def watch(self, face: object) -> None:
        """Read ``face``'s ``stats()`` at each scrape from now on; held weakly."""
        self.collector.add(face)

    def unwatch(self, face: object) -> None:
        """Stop reading ``face``'s ``stats()``."""
        self.collector.remove(face)

    def __repr__(self) -> str:
        return f"<PrometheusMetrics faces={len(self.collector._faces)}>"
