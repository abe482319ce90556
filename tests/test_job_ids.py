"""Job ids: 32 hex digits, a UUIDv7 (48-bit millisecond time, then random bits), increasing within a process
whatever the clock does, unique across threads and across a forked child."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from threaddispatch import _job_enqueue
from threaddispatch.jobs import JobEngine, new_job_id
from threaddispatch.stores import MemoryStore


@pytest.fixture
def clock() -> Iterator[list[int]]:
    """``time.time_ns`` reads ``clock[0]`` (nanoseconds) while the test runs; then the ids count from the real clock."""
    now = [time.time_ns()]
    real, last = time.time_ns, _job_enqueue._last
    time.time_ns = lambda: now[0]
    try:
        yield now
    finally:
        time.time_ns = real
        _job_enqueue._last = last  # the ids a test made ahead of the clock are left behind


def test_an_id_is_32_hex_digits_of_a_uuid7_carrying_its_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    job_id = new_job_id()
    after = time.time_ns() // 1_000_000
    assert len(job_id) == 32 and job_id == job_id.lower() and int(job_id, 16) >= 0
    parsed = uuid.UUID(hex=job_id)
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert before <= int(job_id[:12], 16) <= after


def test_ids_increase_within_a_process_while_the_clock_stands_still(clock: list[int]) -> None:
    ids = [new_job_id() for _ in range(10_000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_ids_increase_when_the_clock_goes_back(clock: list[int]) -> None:
    first = new_job_id()
    clock[0] -= 3_600 * 10**9  # an NTP step back by an hour
    second = new_job_id()
    clock[0] += 7_200 * 10**9
    third = new_job_id()
    assert first < second < third
    assert int(third[:12], 16) == clock[0] // 1_000_000  # a clock ahead again: its time again


def test_ids_sort_by_creation_time_across_milliseconds(clock: list[int]) -> None:
    clock[0] += 86_400 * 10**9  # ahead of any id made before
    ids = []
    for _ in range(50):
        ids.append(new_job_id())
        clock[0] += 1_000_000
    assert ids == sorted(ids)
    assert [int(i[:12], 16) for i in ids] == [clock[0] // 1_000_000 - 50 + n for n in range(50)]


@pytest.mark.timeout(60)
def test_ids_are_unique_across_four_threads_and_each_thread_sees_them_increase() -> None:
    made: list[list[str]] = [[] for _ in range(4)]
    barrier = threading.Barrier(4, timeout=30)

    def make(into: list[str]) -> None:
        barrier.wait()
        for _ in range(10_000):
            into.append(new_job_id())

    threads = [threading.Thread(target=make, args=(into,)) for into in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert all(len(ids) == 10_000 and ids == sorted(ids) for ids in made)
    assert len({job_id for ids in made for job_id in ids}) == 40_000


@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_makes_ids_its_parent_never_makes_even_in_the_same_millisecond() -> None:
    """The clock stands still in both: a child that kept its parent's last id would make the parent's next ones."""
    script = textwrap.dedent(
        """
        import json, os, time
        from threaddispatch.jobs import new_job_id

        frozen = time.time_ns()
        time.time_ns = lambda: frozen
        new_job_id()
        read_end, write_end = os.pipe()
        pid = os.fork()
        ids = [new_job_id() for _ in range(10_000)]
        if pid == 0:
            with os.fdopen(write_end, "w") as out:
                json.dump(ids, out)
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as child:
            child_ids = json.load(child)
        os.waitpid(pid, 0)
        print(json.dumps({"parent": ids, "child": child_ids}))
        """
    )
    found = json.loads(
        subprocess.run([sys.executable, "-c", script], capture_output=True, check=True, timeout=50).stdout
    )
    parent, child = found["parent"], found["child"]
    assert parent == sorted(parent) and child == sorted(child)
    assert len(set(parent) | set(child)) == 20_000


def test_the_engine_stores_its_jobs_under_such_ids_in_enqueue_order() -> None:
    engine = JobEngine(MemoryStore())
    engine.register("work", lambda ctx, payload: None)
    ids = [engine.enqueue("work", n) for n in range(100)] + engine.enqueue_many("work", range(100))
    assert ids == sorted(ids) and all(uuid.UUID(hex=job_id).version == 7 for job_id in ids)
    assert [engine.get_job(job_id).decoded_payload() for job_id in ids] == [*range(100), *range(100)]
