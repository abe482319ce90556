"""OpenTelemetry metrics for every face: ``metrics=OTelMetrics(meter_provider)`` (extra ``otel``).

What the faces count in ``stats()`` is exported through observable instruments whose
callbacks read ``stats()`` when the SDK collects, so the hot path pays nothing for them
(a JobEngine's per-queue job counts too, kept by its JobRecorder); only histograms are
recorded: batch size and send duration once per batch sent, a job's run time and queue
wait once per attempt. See :mod:`threaddispatch.metrics` for the names.

A face made with ``metrics=`` is watched from its construction. Any other face with a
``stats()`` in the vocabulary (EndpointBatchDispatcher, JobEngine, whose ``counts()``
gives the per-state gauges) is watched with :meth:`OTelMetrics.watch`. Faces are held
weakly: a collected face leaves the readings.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from threaddispatch.metrics import (
    VOCABULARY,
    Counter,
    Histogram,
    Metric,
    Metrics,
    UpDownCounter,
    Watched,
    renew_after_fork,
)

try:
    from opentelemetry import metrics as _otel
except ImportError as error:  # pragma: no cover - the extra is missing
    raise ImportError("threaddispatch.otel needs opentelemetry-api: pip install 'threaddispatch[otel]'") from error

__all__ = ["OTelMetrics"]

_SCOPE = "threaddispatch"


class OTelMetrics(Metrics):
    """Metrics through an OpenTelemetry ``MeterProvider`` (None: the global one).

    Instruments are made once, on the meter ``threaddispatch``; one OTelMetrics serves any
    number of faces, each told apart by its ``threaddispatch.face`` and
    ``threaddispatch.dispatcher`` attributes.
    """

    def __init__(self, meter_provider: Any = None) -> None:
        provider = _otel.get_meter_provider() if meter_provider is None else meter_provider
        self._meter = provider.get_meter(_SCOPE)
        self._faces = Watched()
        # _lock guards _instruments (faces made on several threads at once ask for them).
        self._lock = threading.Lock()
        self._instruments: dict[tuple[str, str], Any] = {}
        renew_after_fork(self)
        for metric in VOCABULARY:
            self._observe(metric)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    def _observe(self, metric: Metric) -> None:
        callbacks = [self._callback(metric)]
        if metric.kind == "counter":
            self._meter.create_observable_counter(
                metric.name, callbacks, unit=metric.unit, description=metric.description
            )
        elif metric.kind == "gauge":
            self._meter.create_observable_up_down_counter(
                metric.name, callbacks, unit=metric.unit, description=metric.description
            )

    def _callback(self, metric: Metric) -> Any:
        def observe(options: Any) -> Iterator[_otel.Observation]:
            for reading in self._faces.readings():
                if reading.metric is metric:
                    yield _otel.Observation(reading.value, reading.attributes)

        return observe

    def watch(self, face: object) -> None:
        """Export ``face``'s ``stats()`` (read at collection time) from now on; held weakly."""
        self._faces.add(face)

    def unwatch(self, face: object) -> None:
        """Stop exporting ``face``'s ``stats()``."""
        self._faces.discard(face)

    def counter(self, name: str, *, unit: str = "", description: str = "") -> Counter:
        instrument: Counter = self._instrument("counter", name, unit, description)
        return instrument

    def up_down_counter(self, name: str, *, unit: str = "", description: str = "") -> UpDownCounter:
        instrument: UpDownCounter = self._instrument("up_down_counter", name, unit, description)
        return instrument

    def histogram(self, name: str, *, unit: str = "", description: str = "") -> Histogram:
        instrument: Histogram = self._instrument("histogram", name, unit, description)
        return instrument

    def _instrument(self, kind: str, name: str, unit: str, description: str) -> Any:
        # One instrument per name: every face bound here shares it.
        with self._lock:
            instrument = self._instruments.get((kind, name))
            if instrument is None:
                make = getattr(self._meter, f"create_{kind}")
                instrument = self._instruments[(kind, name)] = make(name, unit=unit, description=description)
            return instrument

    def __repr__(self) -> str:
        return f"<OTelMetrics faces={len(self._faces)}>"
