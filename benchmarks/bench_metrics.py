"""What metrics and traces cost: the batching faces, and JobEngine with metrics off, OTel metrics, tracing.

Usage: python benchmarks/bench_metrics.py [--entries 300000] [--batches 20000] [--jobs 20000] [--repeats 5]
[--before DIR] [--only WORKLOAD]

Two workloads, each cell in a fresh interpreter, the modes round-robin in one run:

* ``enqueue``: ``--entries`` enqueues into a BackgroundDispatcher (default window and batch
  size), then flush(). Reported: the producer thread's CPU per enqueue
  (``time.thread_time``), the process CPU per entry (producer and worker: enqueue + send),
  and wall time per entry.
* ``batch``: ``--batches`` one-entry batches (``max_batch_size=1``), BackgroundDispatcher and
  BatchedDispatcher: process CPU and wall time per batch, which is where a face records
  its histograms when metrics are on.

* ``job-enqueue``: ``--jobs`` ``JobEngine.enqueue`` calls on a MemoryStore (the engine's own
  cost, no I/O): the producer's CPU and wall time per enqueue.
* ``job-run``: ``--jobs`` jobs (enqueued in one ``enqueue_many``) run by a started engine
  (MemoryStore, concurrency 4, a no-op handler) until all completed: process CPU and wall
  time per job (fetch, run, group commit).

JobEngine modes: ``off``, ``otel`` (``metrics=OTelMetrics``, as above), ``trace``
(``tracer_provider=`` an SDK TracerProvider exporting to memory; every job enqueued inside
a span, so each run span carries a link).

Face modes: ``off`` (no ``metrics=``), ``none`` (``metrics=NO_METRICS``, the same thing said
out loud), ``otel`` (``OTelMetrics`` on an SDK MeterProvider with an in-memory reader,
collected once at the end so the observable callbacks run too). ``--before DIR`` adds an
``off`` row (every workload but ``batched``) run against another copy of the package (``git archive <rev> threaddispatch
| tar -x -C DIR``), to see that metrics off costs what the code before metrics cost.
Ratios are to ``off``; medians of ``--repeats``. The machine is shared: repeat a run to see the spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODES = ("off", "none", "otel")
JOB_MODES = ("off", "otel", "trace")


def _job_cell(workload: str, mode: str, count: int) -> dict[str, float]:
    """One JobEngine measurement (see the module docstring), in this interpreter."""
    import contextlib

    from threaddispatch import JobEngine
    from threaddispatch.stores import MemoryStore

    options: dict[str, Any] = {}
    reader: Any = None
    span: Any = contextlib.nullcontext()
    if mode == "otel":
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        from threaddispatch.otel import OTelMetrics

        reader = InMemoryMetricReader()
        options["metrics"] = OTelMetrics(MeterProvider(metric_readers=[reader]))
    elif mode == "trace":
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
        options["tracer_provider"] = provider
        span = provider.get_tracer("bench").start_as_current_span("request")
    engine = JobEngine(MemoryStore(), concurrency=4, poll_interval=0.01, max_poll_interval=0.05, **options)
    engine.register("noop", lambda ctx, payload: None)
    if workload == "job-enqueue":
        engine.start(concurrency=1)  # binds metrics= (the engine counts enqueues from its first run)
        engine.stop(10)
        with span:
            engine.enqueue("noop", -1)
            cpu, thread, wall = time.process_time(), time.thread_time(), time.perf_counter()
            enqueue = engine.enqueue
            for number in range(count):
                enqueue("noop", number)
            thread = time.thread_time() - thread
            wall = time.perf_counter() - wall
            cpu = time.process_time() - cpu
    else:
        with span:
            engine.enqueue_many("noop", range(count))
        cpu, thread, wall = time.process_time(), time.thread_time(), time.perf_counter()
        engine.start()
        while engine.stats()["completed"] < count:
            time.sleep(0.02)  # a benchmark's cheap poll, off the measured threads
        wall = time.perf_counter() - wall
        cpu = time.process_time() - cpu
        thread = time.thread_time() - thread
        engine.stop(60)
    if reader is not None:
        reader.get_metrics_data()
    return {"thread_us": thread / count * 1e6, "cpu_us": cpu / count * 1e6, "wall_us": wall / count * 1e6}


def _cell(workload: str, mode: str, count: int) -> dict[str, float]:
    """One measurement, in this interpreter (the child of :func:`_run`)."""
    if workload.startswith("job-"):
        return _job_cell(workload, mode, count)
    from threaddispatch import BackgroundDispatcher, BatchedDispatcher

    options: dict[str, Any] = {}
    reader = None
    if mode == "none":
        from threaddispatch.metrics import NO_METRICS

        options["metrics"] = NO_METRICS
    elif mode == "otel":
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        from threaddispatch.otel import OTelMetrics

        reader = InMemoryMetricReader()
        options["metrics"] = OTelMetrics(MeterProvider(metric_readers=[reader]))
    if workload == "enqueue":
        dispatcher: Any = BackgroundDispatcher(lambda batch: None, **options)
        dispatcher.enqueue(-1)
        dispatcher.flush(60)
        cpu, thread, wall = time.process_time(), time.thread_time(), time.perf_counter()
        enqueue = dispatcher.enqueue
        for number in range(count):
            enqueue(number)
        thread = time.thread_time() - thread
        dispatcher.flush(600)
    elif workload == "batch":
        dispatcher = BackgroundDispatcher(lambda batch: None, 1, max_batch_size=1, **options)
        dispatcher.enqueue(-1)
        dispatcher.flush(60)
        cpu, thread, wall = time.process_time(), time.thread_time(), time.perf_counter()
        for number in range(count):
            dispatcher.enqueue(number)
        thread = time.thread_time() - thread
        dispatcher.flush(600)
    else:  # batched: one-message batches through BatchedDispatcher's send threads
        dispatcher = BatchedDispatcher(
            lambda target, messages: [None] * len(messages), max_batch_size=1, max_concurrent_sends=1, **options
        )
        dispatcher.submit(-1, "q").result(60)
        cpu, thread, wall = time.process_time(), time.thread_time(), time.perf_counter()
        futures = [dispatcher.submit(number, "q") for number in range(count)]
        thread = time.thread_time() - thread
        futures[-1].result(600)
        dispatcher.flush(600)
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    if reader is not None:
        reader.get_metrics_data()  # the observable callbacks run here, off the hot path
    dispatcher.close(60)
    return {"thread_us": thread / count * 1e6, "cpu_us": cpu / count * 1e6, "wall_us": wall / count * 1e6}


def _run(workload: str, mode: str, count: int, tree: str | None) -> dict[str, float]:
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2]);"
        "from bench_metrics import _cell;"
        "print(json.dumps(_cell(sys.argv[3], sys.argv[4], int(sys.argv[5]))))"
    )
    paths = [str(ROOT), str(Path(__file__).resolve().parent)] if tree is None else [tree, str(ROOT / "benchmarks")]
    out = subprocess.run(
        [sys.executable, "-c", code, *paths, workload, mode, str(count)],
        check=True,
        capture_output=True,
        text=True,
        cwd=tree or ROOT,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=300_000)
    parser.add_argument("--batches", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--before", default=None, help="another copy of the package, for an 'off (before)' row")
    parser.add_argument("--only", default=None, help="one workload: enqueue, batch, batched, job-enqueue, job-run")
    args = parser.parse_args()
    workloads = (
        ("enqueue", args.entries),
        ("batch", args.batches),
        ("batched", args.batches),
        ("job-enqueue", args.jobs),
        ("job-run", args.jobs),
    )
    for workload, count in workloads:
        if args.only not in (None, workload):
            continue
        rows: list[tuple[str, str | None]] = [
            (mode, None) for mode in (JOB_MODES if workload.startswith("job-") else MODES)
        ]
        if args.before:
            rows.insert(1, ("off", args.before))
        results: dict[int, list[dict[str, float]]] = {index: [] for index in range(len(rows))}
        for _ in range(args.repeats):
            for index, (mode, tree) in enumerate(rows):
                if tree is not None and workload == "batched":
                    continue
                results[index].append(_run(workload, mode, count, tree))
        unit = {"enqueue": "enqueue", "job-enqueue": "enqueue", "job-run": "job"}.get(workload, "batch")
        face = {"batched": "BatchedDispatcher", "job-enqueue": "JobEngine", "job-run": "JobEngine"}.get(
            workload, "BackgroundDispatcher"
        )
        print(f"\n{face}, {workload}: {count} per run, median of {args.repeats} (us per {unit}; ratio to off)")
        print(f"  {'mode':<14}{'producer CPU':>14}{'process CPU':>14}{'wall':>12}")
        base = {key: statistics.median(r[key] for r in results[0]) for key in ("thread_us", "cpu_us", "wall_us")}
        for index, (mode, tree) in enumerate(rows):
            if not results[index]:
                continue
            median = {key: statistics.median(r[key] for r in results[index]) for key in base}
            label = f"{mode} (before)" if tree else mode
            cells = "".join(
                f"{median[key]:>8.3f} x{median[key] / base[key]:.2f}".rjust(14 if key != "wall_us" else 12)
                for key in ("thread_us", "cpu_us", "wall_us")
            )
            print(f"  {label:<14}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
