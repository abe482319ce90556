"""BackgroundDispatcher with a spool: acknowledged on delivery, dead-lettered, replayed; a SIGKILL loses none."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from threaddispatch import BackgroundDispatcher
from threaddispatch._spool import Spool
from threaddispatch.background import FailedBatch
from threaddispatch.errors import (
    ConfigurationError,
    DispatcherClosedError,
    PayloadError,
    QueueFullError,
    SpoolOwnedError,
)
from threaddispatch.testing import immediate


def _pending(path: Path) -> list[object]:
    with Spool(path) as spool:
        return [entry for _, entry in spool.pending()]


@pytest.mark.timeout(60)
def test_entries_are_spooled_until_their_batch_is_delivered(tmp_path: Path) -> None:
    path = tmp_path / "a.spool"
    gate = threading.Event()
    sent: list[list[int]] = []

    def send(batch: list[int]) -> None:
        gate.wait(30)
        sent.append(batch)

    dispatcher = BackgroundDispatcher(send, 1, spool=path)
    for n in range(5):
        dispatcher.enqueue(n)
    future = dispatcher.submit(5)
    assert [entry for _, entry in dispatcher._spool.pending()] == [0, 1, 2, 3, 4, 5]  # type: ignore[union-attr]
    gate.set()
    future.result(timeout=30)
    assert dispatcher.flush(30)
    assert [n for batch in sent for n in batch] == [0, 1, 2, 3, 4, 5]
    assert dispatcher._spool.pending() == []  # type: ignore[union-attr]
    dispatcher.close()
    assert _pending(path) == []  # closed: ownership released


@pytest.mark.timeout(60)
def test_what_a_previous_owner_left_is_replayed_first_in_order(tmp_path: Path) -> None:
    path = tmp_path / "b.spool"
    with Spool(path) as left:
        left.append_many(["old-1", "old-2", "old-3"])
    sent: list[str] = []
    with BackgroundDispatcher(sent.extend, 1, spool=path) as dispatcher:
        dispatcher.enqueue("new")
        assert dispatcher.flush(30)
    assert sent == ["old-1", "old-2", "old-3", "new"]
    assert _pending(path) == []


@pytest.mark.timeout(60)
def test_more_left_than_the_buffer_holds_is_replayed_without_loss(tmp_path: Path) -> None:
    path = tmp_path / "c.spool"
    with Spool(path) as left:
        left.append_many(list(range(25)))
    sent: list[int] = []
    with BackgroundDispatcher(sent.extend, 1, max_queue_size=10, overflow="drop_oldest", spool=path) as dispatcher:
        assert dispatcher._engine.pending() <= 10  # the excess was sent by the constructor
        dispatcher.enqueue(99)
        assert dispatcher.flush(30)
    assert sent == [*range(25), 99]
    assert dispatcher.total_dropped == 0


@pytest.mark.timeout(60)
def test_a_batch_failed_for_good_is_dead_lettered_and_can_be_replayed(tmp_path: Path) -> None:
    path = tmp_path / "d.spool"
    failing = True
    sent: list[str] = []
    failed: list[FailedBatch[str]] = []

    def send(batch: list[str]) -> None:
        if failing:
            raise RuntimeError("HTTP 503")
        sent.extend(batch)

    with BackgroundDispatcher(send, 1, on_error=failed.append, spool=path) as dispatcher:
        dispatcher.enqueue("a")
        dispatcher.enqueue("b")
        assert dispatcher.flush(30)
        assert [entry for batch in failed for entry in batch.entries] == ["a", "b"]  # on_error still called
        dead = dispatcher.spool_dead_letters()
        assert [(d.entry, d.error) for d in dead] == [("a", "RuntimeError: HTTP 503"), ("b", "RuntimeError: HTTP 503")]
        assert dispatcher._spool.pending() == []  # type: ignore[union-attr]
        failing = False
        assert dispatcher.replay_spool_dead_letters() == 2
        assert dispatcher.flush(30)
        assert sent == ["a", "b"]
        assert dispatcher.spool_dead_letters() == []
        assert dispatcher._spool.pending() == []  # type: ignore[union-attr]


@pytest.mark.timeout(60)
def test_an_entry_dropped_or_refused_by_the_overflow_policy_leaves_the_spool(tmp_path: Path) -> None:
    gate = threading.Event()
    for overflow in ("drop_newest", "raise"):
        path = tmp_path / f"{overflow}.spool"
        started = threading.Event()

        def send(batch: list[int], started: threading.Event = started) -> None:
            started.set()
            gate.wait(30)

        # A window longer than the test: only a full buffer (2 entries) is sent, at once.
        dispatcher = BackgroundDispatcher(send, 600_000, max_queue_size=2, overflow=overflow, spool=path)
        dispatcher.enqueue(0)
        dispatcher.enqueue(1)  # a full batch: goes at once, held in send
        started.wait(30)
        dispatcher.enqueue(2)
        dispatcher.enqueue(3)
        if overflow == "raise":
            with pytest.raises(QueueFullError):
                dispatcher.enqueue(4)
        else:
            dispatcher.enqueue(4)
            assert dispatcher.total_dropped == 1  # the lock-free path's kick dropped it before returning
        assert [entry for _, entry in dispatcher._spool.pending()] == [0, 1, 2, 3]  # type: ignore[union-attr]
        gate.set()
        dispatcher.close()
        gate.clear()
        assert _pending(path) == []


@pytest.mark.timeout(60)
def test_spool_with_tracing_submit_and_retry_combine(tmp_path: Path) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider

    from threaddispatch.backoff import Constant, RetryPolicy

    attempts = 0
    sent: list[object] = []

    def send(batch: list[object]) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("once")
        sent.extend(batch)

    path = tmp_path / "e.spool"
    with Spool(path) as left:
        left.append("left")
    retry = RetryPolicy(max_attempts=3, backoff=Constant(0.001))
    with BackgroundDispatcher(send, 1, retry=retry, tracer_provider=TracerProvider(), spool=path) as dispatcher:
        future = dispatcher.submit({"k": 1})
        dispatcher.enqueue([2])
        future.result(timeout=30)
        assert dispatcher.flush(30)
        assert dispatcher._spool.pending() == []  # type: ignore[union-attr]
    assert sorted(map(str, sent)) == sorted(map(str, ["left", {"k": 1}, [2]]))


def test_bad_spool_arguments_and_a_second_owner_are_refused_at_the_constructor(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="spool_sync must be 'normal' or 'full', got 'sometimes'"):
        BackgroundDispatcher(print, spool=tmp_path / "f.spool", spool_sync="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="spool must be a file path, got 42"):
        BackgroundDispatcher(print, spool=42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="spool"):
        BackgroundDispatcher(print, spool=tmp_path / "missing" / "f.spool")
    first: BackgroundDispatcher[object] = BackgroundDispatcher(print, spool=tmp_path / "g.spool", spool_sync="full")
    with first:
        with pytest.raises(SpoolOwnedError, match="owned by another dispatcher"):
            BackgroundDispatcher(print, spool=tmp_path / "g.spool")
        with pytest.raises(PayloadError, match="JSON-encodable"):
            first.enqueue({1, 2})
        assert first._spool.pending() == []  # type: ignore[union-attr]
        with pytest.raises(TypeError, match="keyword-only"):
            first.enqueue("x", 1.0)  # type: ignore[call-arg]
    with pytest.raises(DispatcherClosedError, match="'late'"):
        first.enqueue("late")
    with pytest.raises(ConfigurationError, match="has no spool"):
        BackgroundDispatcher(print).spool_dead_letters()


@pytest.mark.timeout(60)
def test_immediate_mode_sends_on_the_caller_thread_without_the_spool(tmp_path: Path) -> None:
    path = tmp_path / "h.spool"
    sent: list[int] = []
    with immediate(), BackgroundDispatcher(sent.extend, spool=path) as dispatcher:
        dispatcher.enqueue(1)
        assert sent == [1]
        assert dispatcher._spool.pending() == []  # type: ignore[union-attr]
    assert _pending(path) == []


# -- the crash test -------------------------------------------------------------------------------

_FIRST = """
import sys, time
from threaddispatch import BackgroundDispatcher

out = open(sys.argv[2], "a", encoding="ascii")

def slow(batch):
    out.write("".join(f"{n}\\n" for n in batch))
    out.flush()
    time.sleep(0.02)

d = BackgroundDispatcher(slow, 5, max_batch_size=100, max_queue_size=200_000, overflow="block", spool=sys.argv[1])
for n in range(int(sys.argv[3])):
    d.enqueue(n)
    if n % 100 == 99:
        print(n + 1, flush=True)
time.sleep(120)
"""

_SECOND = """
import sys
from threaddispatch import BackgroundDispatcher

out = open(sys.argv[2], "a", encoding="ascii")
d = BackgroundDispatcher(lambda batch: out.write("".join(f"{n}\\n" for n in batch)), 1, spool=sys.argv[1])
d.close()
out.close()
"""


def _delivered(path: Path) -> list[int]:
    text = path.read_text(encoding="ascii") if path.exists() else ""
    return [int(line) for line in text.split("\n")[:-1]]  # complete lines only


@pytest.mark.timeout(120)
def test_a_sigkilled_dispatcher_loses_no_acknowledged_entry(tmp_path: Path) -> None:
    total = int(os.environ.get("SPOOL_CRASH_ENTRIES", "100000"))
    kill_at = int(os.environ.get("SPOOL_CRASH_KILL_AT", "3000"))
    spool, first_out, second_out = tmp_path / "crash.spool", tmp_path / "first.txt", tmp_path / "second.txt"
    child = subprocess.Popen(
        [sys.executable, "-c", _FIRST, str(spool), str(first_out), str(total)],
        stdout=subprocess.PIPE,
        text=True,
    )
    acknowledged = 0
    assert child.stdout is not None
    for line in child.stdout:  # the state itself: how many enqueue() calls returned
        acknowledged = int(line)
        if acknowledged >= kill_at:
            break
    child.send_signal(signal.SIGKILL)
    child.wait(60)
    child.stdout.close()
    assert acknowledged >= kill_at
    subprocess.run([sys.executable, "-c", _SECOND, str(spool), str(second_out)], check=True, timeout=90)

    first, second = _delivered(first_out), _delivered(second_out)
    counts = Counter(first + second)
    assert set(range(acknowledged)) <= counts.keys()  # every acknowledged entry was delivered
    assert len(first) < acknowledged  # the kill came before the slow sink caught up
    assert max(Counter(first).values()) == 1 and max(Counter(second).values()) == 1
    duplicates = [n for n, count in counts.items() if count > 1]
    assert len(duplicates) <= 100  # at most the batch in flight at the kill
    assert second == sorted(second)  # replayed in order
    assert _pending(spool) == []


@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_leaves_its_parents_spool_alone(tmp_path: Path) -> None:
    from test_background import _run_in_forked_child

    path = tmp_path / "fork.spool"
    sent: list[str] = []
    with BackgroundDispatcher(sent.extend, 600_000, spool=path) as dispatcher:
        dispatcher.enqueue("parent")

        def child() -> dict[str, object]:
            got: list[str] = []
            dispatcher._sender.send_batch = got.extend
            dispatcher.enqueue("child")
            flushed = dispatcher.flush(10)
            return {"flushed": flushed, "got": got, "spooled": dispatcher._spool is not None}

        report = _run_in_forked_child(child)
        assert report == {"flushed": True, "got": ["child"], "spooled": False}
        assert [entry for _, entry in dispatcher._spool.pending()] == ["parent"]  # type: ignore[union-attr]
    assert sent == ["parent"]
    assert _pending(path) == []


@pytest.mark.timeout(60)
def test_a_batch_retried_until_it_fails_for_good_is_dead_lettered(tmp_path: Path) -> None:
    from threaddispatch.backoff import Constant, RetryPolicy

    def send(batch: list[str]) -> None:
        raise RuntimeError("down")

    retry = RetryPolicy(max_attempts=3, backoff=Constant(0.001))
    with BackgroundDispatcher(send, 1, retry=retry, on_error=lambda failed: None, spool=tmp_path / "r.spool") as d:
        future = d.submit("x")
        with pytest.raises(RuntimeError, match="down"):
            future.result(timeout=30)
        assert [(dead.entry, dead.error) for dead in d.spool_dead_letters()] == [("x", "RuntimeError: down")]
        assert d._spool.pending() == []  # type: ignore[union-attr]
        assert d.stats()["retries"] == 2
