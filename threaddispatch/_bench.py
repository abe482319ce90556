"""The benchmark harness behind ``threaddispatch bench`` and ``benchmarks/bench_enqueue.py``.

One workload for every contender: ``producers`` threads each enqueue ``per_producer``
copies of one small dict; a sink counts what arrives; 10 ms window; batches of 512;
nothing may be dropped (the count is verified). Each run happens in a fresh
interpreter (``python -m threaddispatch._bench --run ...``) so no contender inherits
another's heap, threads or JIT-warm caches; the parent takes the median of the runs.

Measured per run: CPU ns per enqueue call (producer threads' CPU time over the
number of calls, loop included), the same divided by the CPU ns of a bare no-op
Python method call measured the same way in the same process (a machine-independent
figure), end-to-end entries/s (first enqueue to last entry
counted by the sink), sink calls, peak RSS growth, the time ``close()`` takes once
everything is delivered, and the consumer thread's wake-ups during one idle second
(voluntary context switches from ``/proc``; Linux only).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import logging
import logging.handlers
import queue
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CONTENDERS", "BenchResult", "main", "run_matrix"]

WINDOW_MS = 10
BATCH = 512


class _Sink:
    """Counts entries; sets ``done`` when ``target`` have arrived. Called from one consumer thread."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.calls = 0
        self.done = threading.Event()

    def batch(self, entries: Any) -> None:
        self.calls += 1
        self.count += len(entries)
        if self.count >= self.target:
            self.done.set()

    def one(self, _entry: Any) -> None:
        self.calls += 1
        self.count += 1
        if self.count >= self.target:
            self.done.set()


@dataclass
class _Contender:
    """What a contender gives the harness: the enqueue callable, a close, and its consumer thread."""

    enqueue: Callable[[Any], Any]
    close: Callable[[], Any]
    consumer: Callable[[], threading.Thread | None]
    item: Any = field(default_factory=lambda: {"event": "click", "n": 1})


def _threaddispatch(sink: _Sink, capacity: int) -> _Contender:
    from threaddispatch import BackgroundDispatcher

    d: BackgroundDispatcher[Any] = BackgroundDispatcher(
        sink.batch, ms_delay=WINDOW_MS, max_batch_size=BATCH, max_queue_size=capacity, name="bench"
    )
    return _Contender(d.enqueue, lambda: d.close(5.0), lambda: d._engine._thread)


def _otel(sink: _Sink, capacity: int) -> _Contender:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.trace import SpanContext, TraceFlags

    class CountingExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            sink.batch(spans)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

    processor = BatchSpanProcessor(
        CountingExporter(),
        max_queue_size=capacity,
        schedule_delay_millis=WINDOW_MS,
        max_export_batch_size=BATCH,
    )
    context = SpanContext(trace_id=1, span_id=1, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    span = ReadableSpan(name="bench", context=context)

    def consumer() -> threading.Thread | None:
        return next((t for t in threading.enumerate() if "Otel" in t.name or "BatchProcessor" in t.name), None)

    return _Contender(processor.on_end, processor.shutdown, consumer, item=span)


def _queue_thread(sink: _Sink, capacity: int, simple: bool = False) -> _Contender:
    q: queue.Queue[Any] | queue.SimpleQueue[Any] = queue.SimpleQueue() if simple else queue.Queue(capacity)
    stop = object()

    def consume() -> None:
        get, get_nowait = q.get, q.get_nowait
        while True:
            item = get()
            if item is stop:
                return
            batch = [item]
            try:
                while len(batch) < BATCH:
                    item = get_nowait()
                    if item is stop:
                        sink.batch(batch)
                        return
                    batch.append(item)
            except queue.Empty:
                pass
            sink.batch(batch)

    thread = threading.Thread(target=consume, name="bench-queue-consumer", daemon=True)
    thread.start()

    def close() -> None:
        q.put(stop)
        thread.join(5.0)

    return _Contender(q.put, close, lambda: thread)


def _queue_listener(sink: _Sink, capacity: int) -> _Contender:
    q: queue.Queue[Any] = queue.Queue(capacity)

    class CountingHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            sink.one(record)

    handler = logging.handlers.QueueHandler(q)
    listener = logging.handlers.QueueListener(q, CountingHandler())
    listener.start()
    record = logging.LogRecord("bench", logging.INFO, __file__, 1, "event %s", ("click",), None)
    return _Contender(handler.handle, listener.stop, lambda: listener._thread, item=record)


def _deque_floor(sink: _Sink, capacity: int) -> _Contender:
    buffer: collections.deque[Any] = collections.deque()
    stopping = threading.Event()

    def consume() -> None:
        popleft = buffer.popleft
        while True:
            count = min(len(buffer), BATCH)
            if count:
                sink.batch(list(itertools.islice(iter(popleft, None), count)))
            elif stopping.is_set():
                return
            else:
                time.sleep(WINDOW_MS / 1000.0)

    thread = threading.Thread(target=consume, name="bench-floor-consumer", daemon=True)
    thread.start()

    def close() -> None:
        stopping.set()
        thread.join(5.0)

    return _Contender(buffer.append, close, lambda: thread)


def _async_direct(sink: _Sink, capacity: int) -> _Contender:
    from threaddispatch.buffered import AsyncDispatcher

    class _One:
        def dispatch(self, message: Any, target: str, *, delay_seconds: int | None = None) -> None:
            sink.one(message)

    ad: AsyncDispatcher[Any] = AsyncDispatcher(_One(), "bench")
    send = ad.setup(capacity)
    ad.start()
    return _Contender(send.put, lambda: ad.stop(5.0), lambda: ad._state.dispatch_thread)


def _async_batched(sink: _Sink, capacity: int) -> _Contender:
    from threaddispatch.batched import BatchedDispatcher
    from threaddispatch.buffered import AsyncDispatcher

    def send_batch(target: str, messages: list[Any]) -> list[Any]:
        sink.batch(messages)
        return [None] * len(messages)

    bd: BatchedDispatcher[Any] = BatchedDispatcher(
        send_batch, max_batch_size=BATCH, flush_interval=WINDOW_MS / 1000, name="bench"
    )
    ad: AsyncDispatcher[Any] = AsyncDispatcher(bd, "bench", max_in_flight=capacity)
    send = ad.setup(capacity)
    ad.start()

    def close() -> None:
        ad.stop(5.0)
        bd.close(5.0)

    return _Contender(send.put, close, lambda: ad._state.dispatch_thread)


CONTENDERS: dict[str, tuple[str, Callable[[_Sink, int], _Contender], str | None]] = {
    "threaddispatch": ("threaddispatch BackgroundDispatcher", _threaddispatch, None),
    "otel": ("OpenTelemetry BatchSpanProcessor", _otel, "opentelemetry.sdk"),
    "queue": ("queue.Queue + thread", _queue_thread, None),
    "simplequeue": ("queue.SimpleQueue + thread", lambda s, c: _queue_thread(s, c, simple=True), None),
    "queuelistener": ("logging QueueHandler/QueueListener", _queue_listener, None),
    "floor": ("deque.append floor", _deque_floor, None),
    "async": ("threaddispatch AsyncDispatcher", _async_direct, None),
    "async-batched": ("threaddispatch AsyncDispatcher + BatchedDispatcher", _async_batched, None),
}


def _thread_wakeups(thread: threading.Thread | None, seconds: float) -> int | None:
    if thread is None or thread.native_id is None:
        return None
    path = f"/proc/self/task/{thread.native_id}/status"

    def read() -> int | None:
        try:
            with open(path) as status:
                for line in status:
                    if line.startswith("voluntary_ctxt_switches"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    before = read()
    time.sleep(seconds)
    after = read()
    return None if before is None or after is None else after - before


class _Calibration:
    def noop(self, _entry: Any) -> None:
        pass


def bare_call_ns(calls: int = 1_000_000) -> float:
    """CPU ns of one call to a no-op Python method (loop included), measured like the contenders."""
    call, item = _Calibration().noop, {"event": "click"}
    best = float("inf")
    for _ in range(3):
        t0 = time.thread_time_ns()
        for _ in itertools.repeat(None, calls):
            call(item)
        best = min(best, (time.thread_time_ns() - t0) / calls)
    return best


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_once(name: str, producers: int, per_producer: int, idle_seconds: float) -> dict[str, Any]:
    """Run one contender once in this process; returns the measurements."""
    total = producers * per_producer
    calibration = bare_call_ns()
    sink = _Sink(total)
    contender = CONTENDERS[name][1](sink, total)
    enqueue, item = contender.enqueue, contender.item
    rss_before = _rss_kib()
    cpu_ns = [0] * producers
    start = threading.Barrier(producers + 1)

    def produce(index: int) -> None:
        start.wait()
        t0 = time.thread_time_ns()
        for _ in itertools.repeat(None, per_producer):
            enqueue(item)
        cpu_ns[index] = time.thread_time_ns() - t0

    threads = [threading.Thread(target=produce, args=(i,), name=f"bench-producer-{i}") for i in range(producers)]
    for thread in threads:
        thread.start()
    start.wait()
    wall0 = time.perf_counter()
    for thread in threads:
        thread.join()
    delivered = sink.done.wait(60.0)
    wall = time.perf_counter() - wall0
    wakeups = _thread_wakeups(contender.consumer(), idle_seconds) if idle_seconds > 0 else None
    close0 = time.perf_counter()
    contender.close()
    close_ms = (time.perf_counter() - close0) * 1000.0
    return {
        "contender": name,
        "producers": producers,
        "entries": total,
        "received": sink.count,
        "complete": bool(delivered and sink.count == total),
        "cpu_ns_per_enqueue": sum(cpu_ns) / total,
        "bare_call_ns": calibration,
        "entries_per_s": total / wall,
        "sink_calls": sink.calls,
        "rss_growth_mib": (_rss_kib() - rss_before) / 1024.0,
        "close_ms": close_ms,
        "idle_wakeups_per_s": None if wakeups is None else wakeups / idle_seconds,
    }


@dataclass
class BenchResult:
    """Median of several fresh-process runs of one contender at one producer count."""

    contender: str
    label: str
    producers: int
    entries: int
    runs: int
    complete: bool
    cpu_ns_per_enqueue: float
    bare_call_ns: float
    entries_per_s: float
    sink_calls: float
    rss_growth_mib: float
    close_ms: float
    idle_wakeups_per_s: float | None


def _available(module: str | None) -> bool:
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def run_matrix(
    contenders: list[str],
    *,
    producer_counts: list[int],
    total_entries: int,
    repeats: int,
    idle_seconds: float = 1.0,
    progress: Callable[[str], None] | None = None,
) -> list[BenchResult]:
    """Run every contender at every producer count ``repeats`` times in fresh processes; medians."""
    results: list[BenchResult] = []
    plan = [(c, p) for p in producer_counts for c in contenders]
    for step, (name, producers) in enumerate(plan, 1):
        label, _factory, module = CONTENDERS[name]
        if not _available(module):
            if progress:
                progress(f"[{step}/{len(plan)}] {label}: skipped ({module} is not installed)")
            continue
        per_producer = max(1, total_entries // producers)
        runs: list[dict[str, Any]] = []
        for attempt in range(repeats):
            if progress:
                progress(f"[{step}/{len(plan)}] {label}, {producers} producer(s), run {attempt + 1}/{repeats}")
            command = [
                sys.executable,
                "-m",
                "threaddispatch._bench",
                "--run",
                name,
                "--producers",
                str(producers),
                "--per-producer",
                str(per_producer),
                "--idle",
                str(idle_seconds if attempt == 0 else 0),
            ]
            out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"benchmark run of {name} failed:\n{out.stderr}")
            runs.append(json.loads(out.stdout))

        def median(key: str, runs: list[dict[str, Any]] = runs) -> float:
            return float(statistics.median(r[key] for r in runs))

        idle = runs[0]["idle_wakeups_per_s"]
        results.append(
            BenchResult(
                contender=name,
                label=label,
                producers=producers,
                entries=runs[0]["entries"],
                runs=len(runs),
                complete=all(r["complete"] for r in runs),
                cpu_ns_per_enqueue=median("cpu_ns_per_enqueue"),
                bare_call_ns=median("bare_call_ns"),
                entries_per_s=median("entries_per_s"),
                sink_calls=median("sink_calls"),
                rss_growth_mib=median("rss_growth_mib"),
                close_ms=median("close_ms"),
                idle_wakeups_per_s=idle,
            )
        )
    return results


def format_table(results: list[BenchResult]) -> str:
    """The results as a reStructuredText grid-free simple table, with ratios to OpenTelemetry."""
    otel = {r.producers: r for r in results if r.contender == "otel"}
    header = (
        "contender",
        "prod",
        "CPU ns/enqueue",
        "in bare calls",
        "x cheaper than OTel",
        "entries/s",
        "sink calls",
        "RSS +MiB",
        "close ms",
        "idle wakeups/s",
        "all delivered",
    )
    rows = [header]
    for r in results:
        base = otel.get(r.producers)
        cheaper = f"{base.cpu_ns_per_enqueue / r.cpu_ns_per_enqueue:.1f}" if base else "-"
        rows.append(
            (
                r.label,
                str(r.producers),
                f"{r.cpu_ns_per_enqueue:.0f}",
                f"{r.cpu_ns_per_enqueue / r.bare_call_ns:.2f}",
                cheaper,
                f"{r.entries_per_s / 1e6:.2f}M",
                f"{r.sink_calls:.0f}",
                f"{r.rss_growth_mib:.1f}",
                f"{r.close_ms:.1f}",
                "-" if r.idle_wakeups_per_s is None else f"{r.idle_wakeups_per_s:.0f}",
                "yes" if r.complete else "NO",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(), rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows[1:]]
    lines.append(rule)
    return "\n".join(lines)


def write_chart(results: list[BenchResult], path: str) -> bool:
    """Write a PNG bar chart of CPU ns/enqueue and entries/s; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    producer_counts = sorted({r.producers for r in results})
    labels = list(dict.fromkeys(r.label for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.8 / max(1, len(producer_counts))
    for offset, producers in enumerate(producer_counts):
        by_label = {r.label: r for r in results if r.producers == producers}
        xs = [i + offset * width for i in range(len(labels))]
        axes[0].bar(
            xs,
            [by_label[lab].cpu_ns_per_enqueue if lab in by_label else 0 for lab in labels],
            width,
            label=f"{producers} producer(s)",
        )
        axes[1].bar(
            xs,
            [by_label[lab].entries_per_s / 1e6 if lab in by_label else 0 for lab in labels],
            width,
            label=f"{producers} producer(s)",
        )
    axes[0].set_yscale("log")
    for ax, title in zip(
        axes, ("CPU ns per enqueue (lower is better)", "M entries/s end to end (higher is better)"), strict=True
    ):
        ax.set_title(title)
        ax.set_xticks([i + width * (len(producer_counts) - 1) / 2 for i in range(len(labels))])
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m threaddispatch._bench``: one run (``--run``) or a whole matrix."""
    parser = argparse.ArgumentParser(prog="threaddispatch-bench")
    parser.add_argument("--run", choices=sorted(CONTENDERS), help="run one contender once, print JSON")
    parser.add_argument("--producers", type=int, default=1)
    parser.add_argument("--per-producer", type=int, default=100_000)
    parser.add_argument("--idle", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.run:
        print(json.dumps(run_once(args.run, args.producers, args.per_producer, args.idle)))
        return 0
    results = run_matrix(
        list(CONTENDERS),
        producer_counts=[1, 4],
        total_entries=1_000_000,
        repeats=3,
        progress=lambda s: print(s, file=sys.stderr),
    )
    print(format_table(results))
    print(json.dumps([asdict(r) for r in results], indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
