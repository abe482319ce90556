"""EndpointBatchDispatcher with a spool: acknowledged when finished, dead-lettered, replayed; a SIGKILL loses none."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from threaddispatch import EndpointBatchDispatcher
from threaddispatch._spool import Spool
from threaddispatch.backoff import RetryPolicy
from threaddispatch.endpoint import DispatchJob
from threaddispatch.errors import ConfigurationError, DispatcherClosedError, PayloadError, SpoolOwnedError
from threaddispatch.testing import immediate, wait_for


def _pending_ids(path: Path) -> list[str]:
    with Spool(path) as spool:
        return [entry["i"] for _, entry in spool.pending()]


def _spool_of(dispatcher: EndpointBatchDispatcher) -> Spool:
    spool = dispatcher._core.spool
    assert spool is not None
    return spool


class _Recorder:
    """A send_batch that records (endpoint, job ids) per batch and waits for ``gate`` first."""

    def __init__(self, *, open_gate: bool = True) -> None:
        self.gate = threading.Event()
        if open_gate:
            self.gate.set()
        self.batches: list[tuple[Any, list[str]]] = []
        self.lock = threading.Lock()

    def __call__(self, endpoint_id: Any, jobs: list[DispatchJob]) -> None:
        assert self.gate.wait(30)
        with self.lock:
            self.batches.append((endpoint_id, [job.id for job in jobs]))

    def ids(self) -> list[str]:
        with self.lock:
            return [job_id for _endpoint, ids in self.batches for job_id in ids]


@pytest.mark.timeout(60)
def test_jobs_are_spooled_until_delivered(tmp_path: Path) -> None:
    path = tmp_path / "a.spool"
    send = _Recorder(open_gate=False)
    dispatcher = EndpointBatchDispatcher(send, max_batch_size=10, batch_timeout=0.01, spool=path)
    ids = [dispatcher.add_job(DispatchJob("a", {"n": n}, priority=1, max_attempts=2)) for n in range(5)]
    pending = _spool_of(dispatcher).pending()
    assert [entry["i"] for _, entry in pending] == ids
    assert pending[0][1]["e"] == "a" and pending[0][1]["p"] == {"n": 0} and pending[0][1]["r"] == 1
    assert pending[0][1]["m"] == 2
    send.gate.set()
    assert dispatcher.shutdown(30)
    assert send.ids() == ids
    assert _pending_ids(path) == []  # shut down: delivered, acknowledged, ownership released


@pytest.mark.timeout(60)
def test_jobs_left_by_a_close_without_drain_are_replayed_first_in_order(tmp_path: Path) -> None:
    path = tmp_path / "b.spool"
    first_send = _Recorder(open_gate=False)
    first = EndpointBatchDispatcher(
        first_send, max_batch_size=2, batch_timeout=0.01, max_concurrent_batches=1, spool=path
    )
    ids = [first.add_job(DispatchJob("a", n, id=f"job-{n}")) for n in range(6)]
    ids.append(first.add_job(DispatchJob("b", 6, id="job-6", priority=5)))
    wait_for(lambda: first.stats()["active_batches"] == 1, 30, message="the first batch in flight")
    assert not first.shutdown(0.0)  # no drain: the spool closes with every job still in it
    second_send = _Recorder(open_gate=False)  # closed: nothing is delivered before the count below
    second = EndpointBatchDispatcher(
        second_send, max_batch_size=2, batch_timeout=0.01, max_concurrent_batches=1, spool=path, max_pending_jobs=3
    )
    assert second.stats()["held"] == 7  # replayed past max_pending_jobs, none dropped
    second_send.gate.set()
    assert second.shutdown(30)
    by_endpoint: dict[str, list[str]] = {}
    for endpoint, batch in second_send.batches:
        by_endpoint.setdefault(endpoint, []).extend(batch)
    assert by_endpoint == {"a": ids[:6], "b": ["job-6"]}  # same ids, in order
    first_send.gate.set()  # the first dispatcher's late sends cannot acknowledge in a closed spool
    first.shutdown(30)
    assert _pending_ids(path) == []


@pytest.mark.timeout(60)
def test_replayed_jobs_go_before_new_ones_and_keep_their_values(tmp_path: Path) -> None:
    path = tmp_path / "c.spool"
    sent: list[DispatchJob] = []
    gate = threading.Event()

    def send(_endpoint: Any, jobs: list[DispatchJob]) -> None:
        assert gate.wait(30)
        sent.extend(jobs)

    first = EndpointBatchDispatcher(send, max_batch_size=100, batch_timeout=30.0, spool=path)
    later = time.time() + 3600
    first.add_job(DispatchJob("a", [1, "x"], priority=3, max_attempts=7, id="old"))
    first.add_job(DispatchJob("a", None, id="later", scheduled_at=later))
    spool = _spool_of(first)
    first._core.spool = None  # the spool as a crash leaves it: nothing more is acknowledged
    spool.close()
    second = EndpointBatchDispatcher(send, max_batch_size=100, batch_timeout=0.01, spool=path)
    second.add_job(DispatchJob("a", "new", priority=3, id="new"))
    assert second.get_batch_stats().retrying_jobs_count == 1  # "later" waits for its scheduled_at again
    gate.set()
    wait_for(lambda: len(sent) >= 2, 30, message="two jobs sent")
    old = sent[0]
    assert [job.id for job in sent[:2]] == ["old", "new"]
    assert (old.endpoint_id, old.payload, old.priority, old.max_attempts) == ("a", [1, "x"], 3, 7)
    assert second.shutdown(30) is False  # "later" is cancelled at shutdown ...
    assert _pending_ids(path) == []  # ... and given up: it leaves the spool
    first.shutdown(30)


@pytest.mark.timeout(60)
def test_exhausted_jobs_are_dead_lettered_listed_and_replayed(tmp_path: Path) -> None:
    path = tmp_path / "d.spool"
    failing = threading.Event()
    failing.set()
    delivered: list[str] = []

    def send(_endpoint: Any, jobs: list[DispatchJob]) -> None:
        if failing.is_set():
            raise RuntimeError("endpoint down")
        delivered.extend(job.id for job in jobs)

    dispatcher = EndpointBatchDispatcher(
        send, max_batch_size=10, batch_timeout=0.01, retry=RetryPolicy(max_attempts=1), spool=path
    )
    exhausted: list[str] = []
    dispatcher.on("job_exhausted", lambda event: exhausted.append(event["job_id"]))
    for n in range(3):
        dispatcher.add_job(DispatchJob("a", n, id=f"d{n}"))
    wait_for(lambda: len(exhausted) == 3, 30, message="three jobs exhausted")
    dead = dispatcher.spool_dead_letters()
    assert [letter.entry["i"] for letter in dead] == ["d0", "d1", "d2"]
    assert all(letter.error == "RuntimeError: endpoint down" for letter in dead)
    assert _spool_of(dispatcher).pending() == []
    assert [letter.entry["i"] for letter in dispatcher.spool_dead_letters(limit=1)] == ["d0"]

    failing.clear()
    assert dispatcher.replay_spool_dead_letters([dead[1].seq]) == 1
    wait_for(lambda: delivered == ["d1"], 30, message="d1 delivered")
    assert dispatcher.replay_spool_dead_letters() == 2
    wait_for(lambda: sorted(delivered) == ["d0", "d1", "d2"], 30, message="all delivered")
    assert dispatcher.replay_spool_dead_letters() == 0
    assert dispatcher.shutdown(30)
    with Spool(path) as spool:
        assert spool.pending() == [] and spool.dead_letters() == []


@pytest.mark.timeout(60)
def test_dropped_and_cancelled_jobs_leave_the_spool(tmp_path: Path) -> None:
    path = tmp_path / "e.spool"
    send = _Recorder()
    dispatcher = EndpointBatchDispatcher(
        send, max_batch_size=10, batch_timeout=30.0, max_pending_jobs=1, overflow="drop_oldest", spool=path
    )
    dropped = DispatchJob("a", 1, id="dropped")
    dispatcher.add_job(dropped)
    dispatcher.add_job(DispatchJob("a", 2, id="kept"))
    assert dropped.status == "dropped"
    assert [entry["i"] for _, entry in _spool_of(dispatcher).pending()] == ["kept"]
    assert dispatcher.shutdown(30)
    assert send.ids() == ["kept"]

    other = EndpointBatchDispatcher(send, batch_timeout=30.0, spool=path)
    other.add_job(DispatchJob("a", 3, id="scheduled", scheduled_at=time.time() + 3600))
    assert [entry["i"] for _, entry in _spool_of(other).pending()] == ["scheduled"]
    assert not other.shutdown(30)  # cancelled: given up at shutdown
    assert _pending_ids(path) == []


@pytest.mark.timeout(60)
def test_bad_spool_arguments_and_unspoolable_jobs_are_refused(tmp_path: Path) -> None:
    send = _Recorder()
    with pytest.raises(ConfigurationError, match="spool_sync must be 'normal' or 'full', got 'fast'"):
        EndpointBatchDispatcher(send, spool=tmp_path / "f.spool", spool_sync="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="spool must be a file path, got 42"):
        EndpointBatchDispatcher(send, spool=42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="spool must be a file path"):
        EndpointBatchDispatcher(send, spool="")
    plain = EndpointBatchDispatcher(send)
    with pytest.raises(ConfigurationError, match="has no spool"):
        plain.spool_dead_letters()
    with pytest.raises(ConfigurationError, match="has no spool"):
        plain.replay_spool_dead_letters()
    plain.shutdown(30)

    dispatcher = EndpointBatchDispatcher(send, batch_timeout=30.0, spool=tmp_path / "g.spool", spool_sync="full")
    not_json = DispatchJob("a", {1, 2})
    with pytest.raises(PayloadError, match="JSON"):
        dispatcher.add_job(not_json)
    tuple_endpoint = DispatchJob(("a", 1), "x")
    with pytest.raises(PayloadError, match=r"endpoint_id must be a str, int or float .*\('a', 1\)"):
        dispatcher.add_job(tuple_endpoint)
    assert not_json.status == tuple_endpoint.status == "new"
    assert dispatcher.stats()["held"] == 0
    assert _spool_of(dispatcher).pending() == []
    dispatcher.add_job(DispatchJob(7, "x"))  # an int endpoint id survives JSON
    assert dispatcher.shutdown(30)
    assert send.batches[-1][0] == 7


@pytest.mark.timeout(60)
def test_a_spool_cannot_be_shared_by_two_dispatchers(tmp_path: Path) -> None:
    path = tmp_path / "h.spool"
    send = _Recorder()
    owner = EndpointBatchDispatcher(send, spool=path)
    with pytest.raises(SpoolOwnedError, match=f"pid {os.getpid()}"):
        EndpointBatchDispatcher(send, spool=path)
    assert owner.shutdown(30)
    again = EndpointBatchDispatcher(send, spool=path)  # shut down: the spool is free again
    assert again.shutdown(30)


@pytest.mark.timeout(60)
def test_immediate_mode_does_not_touch_the_spool(tmp_path: Path) -> None:
    path = tmp_path / "i.spool"
    send = _Recorder()
    dispatcher = EndpointBatchDispatcher(send, spool=path)
    with immediate():
        job = DispatchJob("a", 1)
        dispatcher.add_job(job)
        assert job.status == "delivered"
    assert _spool_of(dispatcher).pending() == []
    assert dispatcher.shutdown(30)


# -- the crash test -------------------------------------------------------------------------------

_FIRST = """
import sys, time
from threaddispatch import EndpointBatchDispatcher
from threaddispatch.endpoint import DispatchJob

out = open(sys.argv[2], "a", encoding="ascii")

def slow(endpoint_id, jobs):
    out.write("".join(f"{job.payload}\\n" for job in jobs))
    out.flush()
    time.sleep(0.1)  # slower than add_job: the kill finds jobs left

d = EndpointBatchDispatcher(
    slow, max_batch_size=100, batch_timeout=0.01, max_concurrent_batches=1, max_pending_jobs=200_000, spool=sys.argv[1]
)
for n in range(int(sys.argv[3])):
    d.add_job(DispatchJob("ep", n, id=str(n)))
    if n % 100 == 99:
        print(n + 1, flush=True)
time.sleep(120)
"""

_SECOND = """
import sys
from threaddispatch import EndpointBatchDispatcher

out = open(sys.argv[2], "a", encoding="ascii")

def write(endpoint_id, jobs):
    out.write("".join(f"{job.payload}\\n" for job in jobs))

d = EndpointBatchDispatcher(
    write,
    batch_timeout=0.01,
    max_concurrent_batches=1,
    spool=sys.argv[1],
)
assert d.shutdown(90)
out.close()
"""


def _first_disorder(delivered: list[int]) -> str:
    """Where ``delivered`` first goes backwards, with its neighbours (the message of a failed order check)."""
    at = next(i for i in range(1, len(delivered)) if delivered[i] < delivered[i - 1])
    return f"{len(delivered)} delivered; out of order at index {at}: {delivered[max(0, at - 5) : at + 5]}"


def _delivered(path: Path) -> list[int]:
    text = path.read_text(encoding="ascii") if path.exists() else ""
    return [int(line) for line in text.split("\n")[:-1]]  # complete lines only


@pytest.mark.timeout(180)
def test_a_sigkilled_dispatcher_loses_no_added_job(tmp_path: Path) -> None:
    total = int(os.environ.get("SPOOL_CRASH_ENTRIES", "100000"))
    kill_at = int(os.environ.get("SPOOL_CRASH_KILL_AT", "3000"))
    spool, first_out, second_out = tmp_path / "crash.spool", tmp_path / "first.txt", tmp_path / "second.txt"
    child = subprocess.Popen(
        [sys.executable, "-c", _FIRST, str(spool), str(first_out), str(total)],
        stdout=subprocess.PIPE,
        text=True,
    )
    added = 0
    assert child.stdout is not None
    for line in child.stdout:  # the state itself: how many add_job() calls returned
        added = int(line)
        if added >= kill_at:
            break
    child.send_signal(signal.SIGKILL)
    child.wait(60)
    child.stdout.close()
    assert added >= kill_at
    subprocess.run([sys.executable, "-c", _SECOND, str(spool), str(second_out)], check=True, timeout=150)

    first, second = _delivered(first_out), _delivered(second_out)
    counts = Counter(first + second)
    assert set(range(added)) <= counts.keys()  # every job whose add_job returned was delivered
    assert len(first) < added  # the kill came before the slow endpoint caught up
    assert max(Counter(first).values()) == 1 and max(Counter(second).values()) == 1
    duplicates = [n for n, count in counts.items() if count > 1]
    assert len(duplicates) <= 100  # at most the one batch in flight at the kill
    assert second == sorted(second), _first_disorder(second)  # replayed in order


@pytest.mark.timeout(60)
def test_dead_letters_replay_within_max_pending_jobs(tmp_path: Path) -> None:
    path = tmp_path / "j.spool"
    with Spool(path) as spool:
        seqs = spool.append_many(
            [{"e": "a", "p": n, "r": 0, "m": None, "i": f"j{n}", "s": None, "c": 0.0} for n in range(3)]
        )
        spool.dead_letter(seqs, "RuntimeError: down")
    send = _Recorder(open_gate=False)
    dispatcher = EndpointBatchDispatcher(send, batch_timeout=30.0, max_pending_jobs=2, spool=path)
    assert dispatcher.replay_spool_dead_letters() == 2  # the room left: call again for the rest
    assert dispatcher.replay_spool_dead_letters() == 0
    assert [letter.entry["i"] for letter in dispatcher.spool_dead_letters()] == ["j2"]
    send.gate.set()
    assert dispatcher.shutdown(30)
    assert send.ids() == ["j0", "j1"]


@pytest.mark.timeout(60)
def test_an_entry_that_is_not_a_spooled_job_is_dead_lettered_at_construction(tmp_path: Path) -> None:
    path = tmp_path / "k.spool"
    with Spool(path) as spool:
        spool.append_many([42, {"e": "a", "p": 1, "r": 0, "m": None, "i": "ok", "s": None, "c": 0.0}])
    send = _Recorder()
    dispatcher = EndpointBatchDispatcher(send, batch_timeout=0.01, spool=path)
    assert [
        (letter.entry, "not a spooled DispatchJob" in letter.error) for letter in dispatcher.spool_dead_letters()
    ] == [(42, True)]
    assert dispatcher.shutdown(30)
    assert send.ids() == ["ok"]


_FORK = """
import os, sys
from threaddispatch import EndpointBatchDispatcher
from threaddispatch._spool import Spool
from threaddispatch.endpoint import DispatchJob

sent = []
d = EndpointBatchDispatcher(lambda ep, jobs: sent.extend(j.id for j in jobs), batch_timeout=60, spool=sys.argv[1])
d.add_job(DispatchJob("ep", 0, id="parent"))
pid = os.fork()
if pid == 0:
    d.add_job(DispatchJob("ep", 1, id="child"))
    ok = d._core.spool is None and d.shutdown(10) and sent == ["child"]
    os._exit(0 if ok else 3)
_pid, status = os.waitpid(pid, 0)
print("child exit", os.waitstatus_to_exitcode(status))
print("parent spool", [entry["i"] for _, entry in d._core.spool.pending()])
print("parent", d.shutdown(10), sent)
with Spool(sys.argv[1]) as spool:
    print("left", spool.pending())
"""


@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_leaves_its_parents_spool_alone(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _FORK, str(tmp_path / "fork.spool")],
        check=False,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "child exit 0",
        "parent spool ['parent']",
        "parent True ['parent']",
        "left []",
    ]


@pytest.mark.timeout(60)
def test_the_dead_letter_calls_after_shutdown_say_so(tmp_path: Path) -> None:
    dispatcher = EndpointBatchDispatcher(_Recorder(), spool=tmp_path / "l.spool")
    assert dispatcher.shutdown(30)
    with pytest.raises(DispatcherClosedError, match="is shut down"):
        dispatcher.spool_dead_letters()
    with pytest.raises(DispatcherClosedError, match="is shut down"):
        dispatcher.replay_spool_dead_letters()
