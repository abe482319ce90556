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
the scrape. Histograms (batch size, send duration) exist only as OpenTelemetry
instruments (:class:`~threaddispatch.otel.OTelMetrics`): ``stats()`` keeps no distribution.
"""

from __future__ import annotations

from collections.abc import Iterator

from threaddispatch.metrics import VOCABULARY, Metric, Watched

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.core import Metric as PromMetric
    from prometheus_client.registry import Collector
except ImportError as error:  # pragma: no cover - the extra is missing
    raise ImportError(
        "threaddispatch.prometheus needs prometheus_client: pip install 'threaddispatch[prometheus]'"
    ) from error

__all__ = ["ThreadDispatchCollector", "prometheus_name"]


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
