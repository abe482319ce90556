"""Enqueue and end-to-end throughput of BackgroundDispatcher against its peers, side by side.

Usage: python benchmarks/bench_enqueue.py [--entries 1000000] [--repeats 5] [--producers 1,4]
       python benchmarks/bench_enqueue.py --policies [--before DIR] [--entries 1000000] [--repeats 5]
       python benchmarks/bench_enqueue.py --send-overhead [--batches 20000] [--repeats 5]
       python benchmarks/bench_enqueue.py --tracing [--entries 1000000] [--repeats 5] [--producers 4]

Every cell is the median of ``--repeats`` runs, each in a fresh interpreter; see
``threaddispatch/_bench.py`` for the workload and what is measured. The README's
table comes from this script's output on the reference machine.

``--send-overhead`` instead measures what an ``async def`` send_batch costs per batch
against a plain one: BackgroundDispatcher sends ``--batches`` one-entry batches through
each (the coroutine awaits nothing, so the difference is the calling contract's: making
the coroutine and running it on the worker's private event loop), median of the repeats.

``--policies`` measures BackgroundDispatcher's enqueue under each ``overflow`` policy with
room to spare (``max_queue_size`` = every entry of the run, so nothing is dropped nor
refused), beside OpenTelemetry's BatchSpanProcessor, queue.Queue + thread and logging's
QueueListener, in the same run, round-robin (one fresh interpreter per cell and round).
``--before DIR`` adds the same policy rows run against another copy of the package (e.g.
``git archive HEAD threaddispatch | tar -x -C DIR``): before/after ratios from one run.

``--tracing`` measures BackgroundDispatcher's enqueue without a ``tracer_provider`` (the
default), with one while the producers are in no span, and with one while each producer
is inside a sampled span (the captured context is carried to the send span's links), in
the same run, round-robin, one fresh interpreter per cell and round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if "--tree" in sys.argv:  # a cell run against another copy of the package (--before)
    sys.path.insert(0, sys.argv[sys.argv.index("--tree") + 1])

from threaddispatch import BackgroundDispatcher, _bench

POLICIES = ("drop_newest", "drop_oldest", "block", "raise")
PEERS = ("otel", "queue", "queuelistener")
TRACING = {
    "tracing:off": "no tracer_provider (default)",
    "tracing:on": "tracer_provider, producers in no span",
    "tracing:span": "tracer_provider, each producer in a span",
}


def _sync_send(entries: list[int]) -> None:
    del entries


async def _async_send(entries: list[int]) -> None:
    del entries


def _per_batch_us(send: object, batches: int) -> float:
    """Microseconds per one-entry batch, from the first enqueue until flush() saw them all sent."""
    dispatcher: BackgroundDispatcher[int] = BackgroundDispatcher(send, ms_delay=1, max_batch_size=1)  # type: ignore[arg-type]
    dispatcher.enqueue(-1)  # start the worker (and, for async, its loop) outside the measurement
    dispatcher.flush(60)
    started = time.perf_counter()
    for i in range(batches):
        dispatcher.enqueue(i)
    dispatcher.flush(600)
    elapsed = time.perf_counter() - started
    sent_batches = dispatcher.stats()["batches"] - 1
    dispatcher.close(60)
    return elapsed / max(sent_batches, 1) * 1e6


def send_overhead(batches: int, repeats: int) -> int:
    results: dict[str, list[float]] = {"sync": [], "async": []}
    for _ in range(repeats):
        results["sync"].append(_per_batch_us(_sync_send, batches))
        results["async"].append(_per_batch_us(_async_send, batches))
    sync_us = statistics.median(results["sync"])
    async_us = statistics.median(results["async"])
    print(f"send_batch per batch (median of {repeats}, {batches} one-entry batches each):")
    print(f"  sync  def send_batch: {sync_us:8.2f} us")
    print(f"  async def send_batch: {async_us:8.2f} us  (+{async_us - sync_us:.2f} us, x{async_us / sync_us:.2f})")
    return 0


def _policy_contender(policy: str) -> Any:
    def make(sink: Any, capacity: int) -> Any:
        d: BackgroundDispatcher[Any] = BackgroundDispatcher(
            sink.batch,
            ms_delay=_bench.WINDOW_MS,
            max_batch_size=_bench.BATCH,
            max_queue_size=capacity,
            overflow=policy,  # type: ignore[arg-type]
            name="bench",
        )
        return _bench._Contender(d.enqueue, lambda: d.close(5.0), lambda: d._engine._thread)

    return make


def _tracing_contender(traced: bool) -> Any:
    def make(sink: Any, capacity: int) -> Any:
        provider = None
        if traced:
            from opentelemetry.sdk.trace import TracerProvider

            provider = TracerProvider()  # no processor: the send spans are made and dropped
        d: BackgroundDispatcher[Any] = BackgroundDispatcher(
            sink.batch,
            ms_delay=_bench.WINDOW_MS,
            max_batch_size=_bench.BATCH,
            max_queue_size=capacity,
            name="bench",
            tracer_provider=provider,
        )
        return _bench._Contender(d.enqueue, lambda: d.close(5.0), lambda: d._engine._thread)

    return make


def _producers_in_spans() -> None:
    """Make each benchmark producer thread run inside its own sampled span (entered before it is timed)."""
    from opentelemetry import context, trace
    from opentelemetry.sdk.trace import TracerProvider

    from threaddispatch import _bench_curves

    tracer = TracerProvider().get_tracer("bench")
    run_producers = _bench_curves.run_producers

    def in_spans(producers: int, produce: Any) -> float:
        def produce_in_span(index: int) -> None:
            span = tracer.start_span(f"producer-{index}")
            token = context.attach(trace.set_span_in_context(span))
            try:
                produce(index)
            finally:
                context.detach(token)
                span.end()

        return run_producers(producers, produce_in_span)

    _bench_curves.run_producers = in_spans


def run_cell(name: str, producers: int, per_producer: int) -> dict[str, Any]:
    """One run in this process: ``policy:<overflow>``, ``tracing:<mode>`` or one of _bench's contenders."""
    for policy in POLICIES:
        _bench.CONTENDERS[f"policy:{policy}"] = (f"overflow={policy!r}", _policy_contender(policy), None)
    for cell, label in TRACING.items():
        _bench.CONTENDERS[cell] = (label, _tracing_contender(cell != "tracing:off"), None)
    if name == "tracing:span":
        _producers_in_spans()
    return _bench.run_once(name, producers, per_producer, 0.0)


def tracing(entries: int, producers: int, repeats: int) -> int:
    """Enqueue with tracing off and on, in one run (round-robin fresh interpreters); median of the repeats."""
    runs: dict[str, list[dict[str, Any]]] = {cell: [] for cell in TRACING}
    per_producer = entries // producers
    for round_ in range(repeats):
        for cell in TRACING:
            command = [sys.executable, __file__, "--cell", cell, "--producers", str(producers)]
            command += ["--entries", str(per_producer)]
            out = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
            runs[cell].append(json.loads(out.stdout))
            print(f"round {round_ + 1}: {cell}: {out.stdout.strip()}", file=sys.stderr, flush=True)
    base = statistics.median(r["cpu_ns_per_enqueue"] for r in runs["tracing:off"])
    print(f"{producers} producers, {entries} entries, median of {repeats} (CPU ns per enqueue, all threads' share)")
    print(f"{'BackgroundDispatcher':<44} {'CPU ns':>8} {'x off':>6} {'spread':>13} {'M/s':>6} {'complete':>8}")
    for cell, label in TRACING.items():
        cpu = [r["cpu_ns_per_enqueue"] for r in runs[cell]]
        rate = statistics.median(r["entries_per_s"] for r in runs[cell])
        done = all(r["complete"] for r in runs[cell])
        spread = f"{min(cpu):.0f}-{max(cpu):.0f}"
        print(
            f"{label:<44} {statistics.median(cpu):>8.0f} {statistics.median(cpu) / base:>6.2f} {spread:>13} "
            f"{rate / 1e6:>6.2f} {'yes' if done else 'NO':>8}"
        )
    return 0


def policies(entries: int, producers: int, repeats: int, before: str | None) -> int:
    cells: list[tuple[str, str | None]] = [(f"policy:{p}", None) for p in POLICIES]
    if before:
        cells += [(f"policy:{p}", before) for p in POLICIES]
    cells += [(peer, None) for peer in PEERS]
    runs: dict[tuple[str, str | None], list[dict[str, Any]]] = {cell: [] for cell in cells}
    per_producer = entries // producers
    for round_ in range(repeats):
        for name, tree in cells:
            command = [sys.executable, __file__, "--cell", name, "--producers", str(producers)]
            command += ["--entries", str(per_producer)] + (["--tree", tree] if tree else [])
            out = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
            runs[(name, tree)].append(json.loads(out.stdout))
            print(f"round {round_ + 1}: {name} {tree or ''}: {out.stdout.strip()}", file=sys.stderr, flush=True)
    med = {
        cell: {k: statistics.median(r[k] for r in rs) for k in ("cpu_ns_per_enqueue", "entries_per_s")}
        for cell, rs in runs.items()
    }
    base = med[("policy:drop_newest", None)]["cpu_ns_per_enqueue"]
    print(f"{producers} producers, {entries} entries, median of {repeats} (CPU ns per enqueue, all threads' share)")
    print(f"{'contender':<34} {'CPU ns':>8} {'x drop_newest':>14} {'x before':>9} {'M/s':>6} {'complete':>8}")
    for (name, tree), m in med.items():
        label = name.removeprefix("policy:") if name.startswith("policy:") else _bench.CONTENDERS[name][0]
        label = f"{'before: ' if tree else ''}{label}"
        was = med.get((name, before)) if before and not tree else None
        ratio = f"{m['cpu_ns_per_enqueue'] / was['cpu_ns_per_enqueue']:.2f}" if was else "-"
        done = all(r["complete"] for r in runs[(name, tree)])
        print(
            f"{label:<34} {m['cpu_ns_per_enqueue']:>8.0f} {m['cpu_ns_per_enqueue'] / base:>14.2f} {ratio:>9} "
            f"{m['entries_per_s'] / 1e6:>6.2f} {'yes' if done else 'NO':>8}"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--producers", default="1,4")
    parser.add_argument("--chart", default=str(Path(__file__).with_name("enqueue.png")))
    parser.add_argument("--send-overhead", action="store_true", help="async vs sync send_batch cost per batch")
    parser.add_argument("--batches", type=int, default=20_000)
    parser.add_argument("--policies", action="store_true", help="each overflow policy beside the peers")
    parser.add_argument("--before", help="with --policies: also run the policies against this package copy")
    parser.add_argument("--tracing", action="store_true", help="enqueue with tracer_provider off and on")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(run_cell(args.cell, int(args.producers), args.entries)))
        return 0
    if args.policies:
        producers = int(args.producers.split(",")[-1])
        return policies(args.entries, producers, args.repeats, args.before)
    if args.send_overhead:
        return send_overhead(args.batches, args.repeats)
    if args.tracing:
        return tracing(args.entries, int(args.producers.split(",")[-1]), args.repeats)
    results = _bench.run_matrix(
        list(_bench.CONTENDERS),
        producer_counts=[int(p) for p in args.producers.split(",")],
        total_entries=args.entries,
        repeats=args.repeats,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(_bench.format_table(results))
    if _bench.write_chart(results, args.chart):
        print(f"chart: {args.chart}", file=sys.stderr)
    for r in results:
        print(asdict(r), file=sys.stderr)
    return 0 if all(r.complete for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
