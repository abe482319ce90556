"""What one endpoint and one batch cost EndpointBatchDispatcher: objects, frames, C-speed lane operations (issue 14).

No timings: each test checks the structure that keeps a cost flat (what the collector tracks,
which operations run as C calls), so a change that brings a Python frame or an object back
per batch or per endpoint fails here rather than only in the benchmark.
"""

from __future__ import annotations

from collections import deque
from typing import cast

from threaddispatch import _endpoint_core
from threaddispatch._endpoint_records import DispatchJob, WebhookBatch
from threaddispatch._lanes import FifoLane, PriorityLane


def test_a_batch_record_is_one_object_to_the_collector() -> None:
    batch = WebhookBatch("b1", "e", (DispatchJob("e", 1),), 0.0)
    assert not hasattr(batch, "__dict__")  # slots: no dict per batch beside the record
    batch.status = "processing"  # the fields stay writable
    assert batch.status == "processing"


def test_a_one_priority_lane_is_a_plain_deque_to_the_engine() -> None:
    """len, bool and hash of a one-priority lane are C calls: the engine makes several per batch."""
    lane = cast("PriorityLane[DispatchJob]", _endpoint_core._priority_lane("e"))
    assert type(lane) is PriorityLane
    assert type(lane).__len__ is deque.__len__
    assert type(lane).__hash__ is object.__hash__ and FifoLane.__hash__ is object.__hash__
    assert "__bool__" not in vars(PriorityLane)
    lane.append(DispatchJob("e", 1))
    assert len(lane) == 1 and lane and hash(lane) == object.__hash__(lane)
    # The split form's slots stay unset: no dict or list of its own, three slots fewer for a collection to visit.
    assert not hasattr(lane, "_buckets") and not hasattr(lane, "_order") and not hasattr(lane, "_size")


def test_a_lane_splits_for_a_second_priority_and_is_one_deque_again_once_empty() -> None:
    lane = cast("PriorityLane[DispatchJob]", _endpoint_core._priority_lane("e"))
    low, high = DispatchJob("e", "low"), DispatchJob("e", "high", priority=5)
    lane.append(low)
    lane.append(high)
    assert type(lane) is not PriorityLane and isinstance(lane, PriorityLane)  # the same object, split
    assert len(lane) == 2 and lane.items() == [high, low]
    assert lane.take(5) == [high, low]
    assert type(lane) is PriorityLane and len(lane) == 0 and not lane
    assert not hasattr(lane, "_buckets") and not hasattr(lane, "_order")  # the split form's dict and list are gone
    lane.append(low)
    assert lane.drop_oldest() is low and len(lane) == 0


def test_a_take_returns_the_oldest_entries_in_order_whole_or_in_part() -> None:
    """Taking the whole one-priority lane (the batch of an endpoint with few jobs) and taking part of it agree."""
    lane = cast("PriorityLane[DispatchJob]", _endpoint_core._priority_lane("e"))
    jobs = [DispatchJob("e", i) for i in range(5)]
    for job in jobs:
        lane.append(job)
    assert lane.take(2) == jobs[:2] and len(lane) == 3
    assert lane.take(3) == jobs[2:] and len(lane) == 0 and type(lane) is PriorityLane
    assert lane.take(3) == []
    fifo = FifoLane("e")
    fifo.append(1)
    assert fifo.take(100) == [1] and len(fifo) == 0
    fifo.extend([2, 3, 4])
    assert fifo.take(2) == [2, 3] and fifo.take(5) == [4]
