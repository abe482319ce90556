"""Dependency fan-in and fan-out on every store: the cost per finished dependency must stay flat in N.

For each store (memory, sqlite, postgresql when a server is found or ``--dsn`` is given) and each N
(default 1k, 10k, 70k), in a fresh store:

- fan-in: N jobs (``enqueue_many``), then ONE job ``depends_on`` all N, then ``run_pending()``
  runs the N and the dependent; printed: the dependent's enqueue, the run, and the run per
  attempt (µs; flat in N when each completion costs the same whatever N is).
  The dependent's enqueue per dependency: one lookup of their states, one insert of its waits (and
  on PostgreSQL one mark and one second look) for all N, not a round trip each.
- fan-out: one job, then N jobs each ``depends_on`` it (one ``enqueue_many``, settled together:
  printed per dependent too); the upkeep's
  sweep (``Store.release_waiting``) over the N waiting jobs; then the one job run alone (its
  queue only: its completion releases the N in its transaction), then the N run.

A SQLite row is rewritten whole by every UPDATE, so a count kept on the dependent's row (which
also holds the JSON list of its N dependencies) made each completion cost O(N): fan-in O(N²).
The PostgreSQL server (tests/pg_server.py's throwaway cluster, ``fsync=off``) measures the SQL,
not the disk. Run ``python benchmarks/bench_fanin.py --help``; the machine may be shared: run it
twice to see the spread.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from threaddispatch.jobs import JobEngine  # noqa: E402
from threaddispatch.stores import JobState, Store, open_store  # noqa: E402


def _engine(store: Store) -> JobEngine:
    engine = JobEngine(store, queues=["default", "root"])
    engine.register("dep", lambda _ctx, _payload: 1)
    engine.register("root", lambda _ctx, _payload: 1, queue="root")
    engine.register("sink", lambda ctx, _payload: len(ctx.dependency_results))
    return engine


def _timed(call: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = call()
    return time.perf_counter() - start, value


def fan_in(store: Store, count: int) -> str:
    engine = _engine(store)
    deps = engine.enqueue_many("dep", [None] * count)
    enqueue, sink = _timed(lambda: engine.enqueue("sink", depends_on=deps))
    assert engine.get_job(sink).waiting_on == count
    run, ran = _timed(engine.run_pending)
    assert ran == count + 1 and engine.result(sink) == count, (ran, engine.get_job(sink))
    return (
        f"dependent {enqueue:7.2f} s ({enqueue / count * 1e6:5.0f} µs/dependency)   run {run:7.2f} s   "
        f"{run / ran * 1e6:7.0f} µs/attempt"
    )


def fan_out(store: Store, count: int) -> str:
    engine = _engine(store)
    root = engine.enqueue("root")
    enqueue, dependents = _timed(lambda: engine.enqueue_many("sink", [None] * count, depends_on=[root]))
    sweep, settled = _timed(lambda: store.release_waiting(now=time.time()))
    assert settled == 0
    release, ran = _timed(lambda: engine.run_pending(queues=["root"]))
    assert ran == 1 and engine.get_job(dependents[-1]).state is JobState.PENDING
    run, ran = _timed(engine.run_pending)
    assert ran == count
    return (
        f"dependents {enqueue:6.2f} s ({enqueue / count * 1e6:4.0f} µs/dependent)   sweep {sweep:6.2f} s   "
        f"release {release:6.2f} s   "
        f"run {run:6.2f} s   {run / ran * 1e6:5.0f} µs/attempt"
    )


@contextlib.contextmanager
def _stores(kinds: list[str], dsn: str | None) -> Iterator[dict[str, Callable[[], Store]]]:
    server = None
    if "postgresql" in kinds and dsn is None:
        from pg_server import PostgresServer, find_bindir

        bindir = find_bindir()
        if bindir is None:
            print("no PostgreSQL binaries found (initdb, pg_ctl): postgresql left out (or pass --dsn)")
            kinds = [kind for kind in kinds if kind != "postgresql"]
        else:
            server = PostgresServer(bindir).start()
            dsn = server.dsn
    with tempfile.TemporaryDirectory() as workdir:

        def sqlite() -> Store:
            return open_store(f"sqlite:///{workdir}/{uuid.uuid4().hex}.db")

        def postgresql() -> Store:
            from threaddispatch.stores.postgres import PostgresStore

            return PostgresStore(str(dsn), schema=f"fanin_{uuid.uuid4().hex[:12]}")

        makers = {"memory": lambda: open_store("memory://"), "sqlite": sqlite, "postgresql": postgresql}
        try:
            yield {kind: makers[kind] for kind in kinds}
        finally:
            if server is not None:
                server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 70_000], help="N (default 1k 10k 70k)")
    parser.add_argument(
        "--stores", nargs="+", choices=["memory", "sqlite", "postgresql"], default=["memory", "sqlite", "postgresql"]
    )
    parser.add_argument("--parts", nargs="+", choices=["fan-in", "fan-out"], default=["fan-in", "fan-out"])
    parser.add_argument("--dsn", help="a PostgreSQL URL to use instead of a throwaway server")
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.2f}")
    parts = {"fan-in": fan_in, "fan-out": fan_out}
    with _stores(args.stores, args.dsn) as makers:
        for part in args.parts:
            for kind, make in makers.items():
                for count in args.sizes:
                    store = make()
                    try:
                        print(f"{part:7} {kind:10} N={count:>6}: {parts[part](store, count)}", flush=True)
                    finally:
                        store.close()
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
