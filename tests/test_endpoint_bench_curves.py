"""The EndpointBatchDispatcher curves of ``_bench_curves``: equal batches, the frozen heap, slow calls apart from GC."""

from __future__ import annotations

import gc
import time

import pytest

from threaddispatch import _bench_curves


@pytest.mark.timeout(60)
def test_equal_batches_curve_sends_batches_of_one_size_at_every_n() -> None:
    run, ops_for = _bench_curves.CURVES["endpoints-equal"][2:]
    batch = _bench_curves.EQUAL_BATCH
    for n in (3, 40):
        ops = ops_for(n, 120)
        assert ops == max(120, batch * n)
        result = _bench_curves._curve_result("endpoints-equal", n, run(n, ops, time.monotonic() + 30))
        assert result["complete"] is True
        assert (result["delivered"], result["sink_calls"]) == (ops, ops // batch)  # every batch is full


@pytest.mark.timeout(60)
def test_frozen_limit_curve_leaves_the_collector_unfrozen() -> None:
    # Python 3.12.1 starts with objects already frozen (375): the run must leave no more than that.
    frozen_before = gc.get_freeze_count()
    span = _bench_curves.CURVES["endpoints-limit-frozen"][2](30, 30, time.monotonic() + 30)
    assert gc.get_freeze_count() <= frozen_before
    result = _bench_curves._curve_result("endpoints-limit-frozen", 30, span)
    assert result["complete"] is True and result["delivered"] == 30
    assert 0 <= result["max_clear_call_ms"] <= result["max_call_ms"]


def test_timed_calls_leave_out_the_calls_a_collection_ran_in() -> None:
    def call(item: int) -> None:
        if item == 1:
            gc.collect()  # the slow call: a collection ran in it
        else:
            time.sleep(0)

    with _bench_curves._GcPauses() as pauses:
        _cpu, slowest, calls, clear = _bench_curves._timed_calls(call, iter(range(3)), time.monotonic() + 30, pauses)
    assert calls == 3 and pauses.started >= 1
    assert clear is not None and clear <= slowest


def test_peer_ratio_column_compares_endpoint_curves_at_the_same_n() -> None:
    def point(series: str, n: int, cpu_ns: float) -> _bench_curves.CurvePoint:
        return _bench_curves.CurvePoint(series, series, n, 2000, 1, True, 2000, cpu_ns, cpu_ns, sink_calls=1000)

    table = _bench_curves.format_curves(
        [point("endpoints", 10, 300.0), point("endpoints", 100_000, 3000.0), point("peer-per-job", 100_000, 1000.0)]
    )
    rows = {line.split()[0] + " " + line.split()[1]: line.split() for line in table.splitlines()[3:-1]}
    assert rows["endpoints 100,000"][5] == "3.00"  # x peer: 3,000 ns over the peer's 1,000
    assert rows["endpoints 10"][5] == "-"  # no peer point at n=10
