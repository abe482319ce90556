"""The benchmark harness behind ``threaddispatch bench`` and ``benchmarks/bench_enqueue.py``.

``threaddispatch bench`` runs the enqueue race below, then a few scaling curves
(``_bench_curves``: EndpointBatchDispatcher by endpoints and by depth, RequestDispatcher
queued by depth), prints both as tables (the curves also as ASCII bars) and draws them in
one PNG. ``--quick`` is a ~10 s smoke run of the same.

The race: one workload for every contender: ``producers`` threads each enqueue ``per_producer``
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

It runs past 600 lines because each contender's harness (ours and every peer's) is written
out here, side by side, so that one can see they do the same work.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the harness loads its tools when it runs: ``threaddispatch --help`` builds its parser alone
    import queue

    from threaddispatch._bench_curves import CurvePoint

__all__ = [
    "CONTENDERS",
    "BenchResult",
    "add_arguments",
    "build_parser",
    "main",
    "run_command",
    "run_matrix",
    "run_plan",
    "write_chart",
]

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
    import queue

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
    import logging
    import queue
    from logging.handlers import QueueHandler, QueueListener

    q: queue.Queue[Any] = queue.Queue(capacity)

    class CountingHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            sink.one(record)

    handler = QueueHandler(q)
    listener = QueueListener(q, CountingHandler())
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
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_once(name: str, producers: int, per_producer: int, idle_seconds: float) -> dict[str, Any]:
    """Run one contender once in this process; returns the measurements."""
    from threaddispatch import _bench_curves

    total = producers * per_producer
    calibration = bare_call_ns()
    sink = _Sink(total)
    contender = CONTENDERS[name][1](sink, total)
    enqueue, item = contender.enqueue, contender.item
    rss_before = _rss_kib()
    cpu_ns = [0] * producers

    def produce(index: int) -> None:
        t0 = time.thread_time_ns()
        for _ in itertools.repeat(None, per_producer):
            enqueue(item)
        cpu_ns[index] = time.thread_time_ns() - t0

    wall0 = _bench_curves.run_producers(producers, produce)
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
    import json
    import statistics
    import subprocess

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


def write_chart(results: list[BenchResult], path: str, curves: list[CurvePoint] | None = None) -> bool:
    """Write a PNG: bars of CPU ns/enqueue and entries/s, and the curves beside them when given.

    Returns False when matplotlib is missing.
    """
    from threaddispatch import _bench_curves

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    producer_counts = sorted({r.producers for r in results})
    labels = list(dict.fromkeys(r.label for r in results))
    fig = plt.figure(figsize=(13, 10.5 if curves else 5))
    grid = fig.add_gridspec(2 if curves else 1, 2)
    axes = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])]
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
    if curves:
        _bench_curves.plot_curves(fig.add_subplot(grid[1, :]), curves)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# The curves ``threaddispatch bench`` draws: a subset of benchmarks/bench_scaling.py's that fits its budget.
DEFAULT_CURVES: dict[str, list[int]] = {
    "endpoints": [10, 1_000, 100_000],
    "depth": [1_000, 100_000],
    "requests-queued": [1_000, 100_000],
}
QUICK_CURVES: dict[str, list[int]] = {"endpoints": [10, 1_000], "depth": [1_000, 10_000], "requests-queued": [1_000]}


def producer_list(text: str) -> list[int]:
    """argparse type: comma-separated producer counts >= 1."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not counts or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"expected producer counts >= 1, got {text!r}")
    return counts


def parse_curves(text: str) -> dict[str, list[int]]:
    """argparse type: ``series=n,n,...;series=...`` (``none`` for no curves); names from ``_bench_curves.CURVES``."""
    from threaddispatch import _bench_curves

    if text.strip().lower() == "none":
        return {}
    curves: dict[str, list[int]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, sizes = part.partition("=")
        name = name.strip()
        if name not in _bench_curves.CURVES:
            known = ", ".join(_bench_curves.CURVES)
            raise argparse.ArgumentTypeError(f"unknown curve {name!r} in {text!r}; known: {known}")
        try:
            counts = [int(n) for n in sizes.split(",") if n.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}=whole numbers, got {part!r}") from None
        if not counts or any(n < 1 for n in counts):
            raise argparse.ArgumentTypeError(f"expected {name}=sizes >= 1, got {part!r}")
        curves[name] = counts
    return curves


def contender_list(text: str) -> list[str]:
    """argparse type: comma-separated race contenders (names of ``CONTENDERS``)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in CONTENDERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown contender(s) {', '.join(unknown) or repr(text)}; known: {', '.join(CONTENDERS)}"
        )
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``threaddispatch bench`` to ``parser`` (cli.py's subparser, or :func:`build_parser`)."""
    from threaddispatch._cli_common import positive_int

    add = parser.add_argument
    add("--entries", type=positive_int, default=None, help="entries per race run (default 200000; --quick 20000)")
    add("--producers", type=producer_list, default=[1, 4], help="race producer counts (default 1,4)")
    add("--repeats", type=positive_int, default=3, help="fresh-process runs per race cell (default 3)")
    add("--contenders", type=contender_list, default=None, help="comma-separated race subset (default: all)")
    add("--curves", type=parse_curves, default=None, help="e.g. 'endpoints=10,1000;depth=1000' or 'none'")
    add("--curve-repeats", type=positive_int, default=1, help="fresh-process runs per curve point (default 1)")
    add("--curve-timeout", type=float, default=10.0, help="seconds a curve point may take (default 10)")
    add("--quick", action="store_true", help="a ~10 s smoke run: small race, one run each, short curves")
    add("--chart", default="threaddispatch-bench.png", help="PNG chart path ('' for none)")
    add("--json", action="store_true", help="print JSON instead of the tables")
    add("--quiet", action="store_true", help="no progress lines")


def build_parser(prog: str = "threaddispatch bench") -> argparse.ArgumentParser:
    """The parser of ``python -m threaddispatch._bench``: ``threaddispatch bench``'s, and a child's ``--run``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="The enqueue race against the peers, then the scaling curves; prints tables, writes a PNG.",
    )
    add_arguments(parser)
    add = parser.add_argument
    add("--run", choices=sorted(CONTENDERS), help=argparse.SUPPRESS)  # one race run in this process (a child)
    add("--per-producer", type=int, default=100_000, help=argparse.SUPPRESS)
    add("--idle", type=float, default=0.0, help=argparse.SUPPRESS)
    return parser


@dataclass
class Plan:
    """What one ``threaddispatch bench`` run does (``--quick`` shrinks it)."""

    contenders: list[str]
    producer_counts: list[int]
    entries: int
    repeats: int
    idle_seconds: float
    curves: dict[str, list[int]]
    curve_repeats: int
    curve_timeout: float
    curve_jobs: int


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The run's plan from the options :func:`add_arguments` defines."""
    contenders = args.contenders or list(CONTENDERS)
    curves = args.curves if args.curves is not None else (QUICK_CURVES if args.quick else DEFAULT_CURVES)
    if args.quick:
        entries = args.entries or 20_000
        return Plan(contenders, args.producers, entries, 1, 0.0, curves, 1, min(args.curve_timeout, 5.0), 20_000)
    return Plan(
        *(contenders, args.producers, args.entries or 200_000, args.repeats, 1.0),
        *(curves, args.curve_repeats, args.curve_timeout, 100_000),
    )


def run_plan(plan: Plan, progress: Callable[[str], None] | None = None) -> tuple[list[BenchResult], list[CurvePoint]]:
    """The race, then the curves."""
    from threaddispatch import _bench_curves

    results = run_matrix(
        plan.contenders,
        producer_counts=plan.producer_counts,
        total_entries=plan.entries,
        repeats=plan.repeats,
        idle_seconds=plan.idle_seconds,
        progress=progress,
    )
    curves = _bench_curves.run_curves(
        plan.curves, repeats=plan.curve_repeats, timeout=plan.curve_timeout, jobs=plan.curve_jobs, progress=progress
    )
    return results, curves


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def main(argv: list[str] | None = None) -> int:
    """``python -m threaddispatch._bench``: ``threaddispatch bench`` (see :func:`run_command`), or a child's run."""
    import json

    args = build_parser().parse_args(argv)
    if args.run:
        print(json.dumps(run_once(args.run, args.producers[0], args.per_producer, args.idle)))
        return 0
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """``threaddispatch bench``: the race, the curves, the tables and the chart.

    Exit code 1 when a race contender lost entries or a curve point failed.
    """
    import json

    from threaddispatch import _bench_curves

    plan = plan_from_args(args)

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    progress(
        f"threaddispatch bench: {plan.entries:,} entries per run, producers {plan.producer_counts}, "
        f"{plan.repeats} fresh-process run(s) each, window {WINDOW_MS} ms, batches of {BATCH}; then the curves"
    )
    began = time.perf_counter()
    results, curves = run_plan(plan, progress)
    took = time.perf_counter() - began
    if args.json:
        report = {"race": [asdict(r) for r in results], "curves": [asdict(p) for p in curves], "seconds": took}
        print(json.dumps(report, indent=2))
    else:
        print(format_table(results))
        if curves:
            print()
            print(_bench_curves.format_curves(curves))
            print()
            print(_bench_curves.sparkbars(curves))
    if args.chart and write_chart(results, args.chart, curves):
        progress(f"chart written to {args.chart}")
    elif args.chart:
        progress("matplotlib is not installed: no chart (pip install 'threaddispatch[bench]')")
    progress(f"threaddispatch bench: took {_minutes(took)}")
    late = [f"{p.label} n={p.n:,}" for p in curves if not p.complete and not p.error]
    if late:
        progress(f"curve points that did not finish in {plan.curve_timeout:.0f} s: {'; '.join(late)}")
    failed = [f"{p.label} n={p.n:,}: {p.error}" for p in curves if p.error]
    if failed:
        print(f"threaddispatch bench: curve points failed: {'; '.join(failed)}", file=sys.stderr)
    incomplete = [r.label for r in results if not r.complete]
    if incomplete:
        print(f"threaddispatch bench: entries were lost by: {', '.join(incomplete)}", file=sys.stderr)
    return 1 if incomplete or failed else 0


if __name__ == "__main__":
    sys.exit(main())
