"""A queue's requests by id live in bounded shards, so no ``add`` copies the whole queue.

One dict per queue key resized itself as it grew: the add that crossed 2/3 of its table
copied every entry (3.4 ms CPU at 87,381 queued requests, 24 ms at 699,050; the slowest
add apart from garbage collections). Now a queue's index seals a dict at ``SHARD``
entries and starts another, so an add copies at most one shard; order, lookups by id,
removal and emptying behave as one dict in queue order did.
"""

from __future__ import annotations

from typing import Any

import pytest

from threaddispatch import _request_records
from threaddispatch._request_records import PendingRequest, RequestIndex
from threaddispatch.requests import CancellationToken, RequestDispatcher

pytestmark = pytest.mark.timeout(60)


def _req(i: int) -> PendingRequest:
    return PendingRequest(f"r-{i}", "k", i, "queued", None, None, 0, 0.5, True)


@pytest.fixture
def small_shards(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(_request_records, "SHARD", 4)
    return 4


def test_no_shard_grows_past_its_bound_and_order_is_queue_order(small_shards: int) -> None:
    index = RequestIndex()
    reqs = [_req(i) for i in range(19)]
    for req in reqs:
        index.add(req)
    assert index.largest_shard() == small_shards
    assert len(index) == 19 and bool(index)
    assert list(index.values()) == reqs
    assert all(index.get(r.request_id) is r for r in reqs)
    assert index.get("r-missing") is None


def test_removal_anywhere_keeps_order_and_drops_emptied_shards(small_shards: int) -> None:
    index = RequestIndex()
    reqs = [_req(i) for i in range(12)]  # three shards of four
    for req in reqs:
        index.add(req)
    for req in reqs[:4]:  # the whole first shard: it is dropped
        index.remove(req)
    index.remove(reqs[6])  # one in the middle of the second
    assert index.shards() == 2
    assert list(index.values()) == reqs[4:6] + reqs[7:]
    assert index.get(reqs[6].request_id) is None and index.get(reqs[7].request_id) is reqs[7]
    assert reqs[6].shard is None  # a removed request keeps no shard alive
    for req in reqs[4:6] + reqs[7:]:
        index.remove(req)
    assert len(index) == 0 and not index and list(index.values()) == []
    index.add(reqs[0])
    assert list(index.values()) == [reqs[0]]


def _send(request: Any, token: CancellationToken) -> None:
    return None


def test_a_deep_queue_across_shards_deletes_finds_and_drains_in_order(small_shards: int) -> None:
    done: list[Any] = []

    def send(request: Any, token: CancellationToken) -> None:
        done.append(request)

    rd: RequestDispatcher[Any, None] = RequestDispatcher(send, max_workers=1, name="index")
    try:
        rd.pause("k")
        handles = [rd.add(i, queue_key="k", mode="queued") for i in range(23)]
        assert rd._core.queues["k"].requests.largest_shard() == small_shards
        assert rd.delete("k", handles[5].request_id) is True
        assert rd.get_request("k", handles[17].request_id) is not None
        assert [q.request for q in rd.get_queue("k")] == [i for i in range(23) if i != 5]
        rd.start("k")
        assert rd.close(30.0) is True
        assert done == [i for i in range(23) if i != 5]
    finally:
        rd.close(10.0)
