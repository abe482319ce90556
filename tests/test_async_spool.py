"""AsyncDispatcher with a spool: acknowledged on dispatch, dead-lettered, replayed; a SIGKILL loses none."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from threaddispatch._buffered_state import _ACK_GROUP
from threaddispatch._spool import Spool
from threaddispatch.batched import BatchedDispatcher
from threaddispatch.buffered import AsyncDispatcher, FailedMessage
from threaddispatch.errors import (
    ConfigurationError,
    DispatcherClosedError,
    PayloadError,
    SpoolOwnedError,
)
from threaddispatch.testing import immediate, wait_for


def _pending(path: Path) -> list[object]:
    with Spool(path) as spool:
        return [entry for _, entry in spool.pending()]


class _Recording:
    """A dispatcher that records (message, delay_seconds); waits on ``gate`` when given one; fails ``bad``."""

    def __init__(self, gate: threading.Event | None = None, bad: object = None) -> None:
        self.gate = gate
        self.bad = bad
        self.sent: list[tuple[object, int | None]] = []
        self.entered = threading.Event()

    def dispatch(self, message: object, target: str, *, delay_seconds: int | None = None) -> None:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        if message == self.bad:
            raise RuntimeError(f"cannot send {message!r}")
        self.sent.append((message, delay_seconds))


@pytest.mark.timeout(60)
def test_messages_are_spooled_until_dispatched(tmp_path: Path) -> None:
    path = tmp_path / "a.spool"
    gate = threading.Event()
    sink = _Recording(gate)
    dispatcher: AsyncDispatcher[object] = AsyncDispatcher(sink, "q", spool=path)
    sender = dispatcher.setup(10)
    dispatcher.start()
    sender.put("one")
    sender.put({"two": 2}, delay_seconds=5)
    assert sender.try_put(3)
    assert sink.entered.wait(30)
    spool = dispatcher._state.spool
    assert spool is not None
    assert [entry for _, entry in spool.pending()] == [["one", None], [{"two": 2}, 5], [3, None]]
    gate.set()
    assert dispatcher.stop(30)
    assert sink.sent == [("one", None), ({"two": 2}, 5), (3, None)]
    assert spool.closed
    assert _pending(path) == []


@pytest.mark.timeout(60)
def test_a_close_without_drain_leaves_its_messages_for_the_next_owner_first_in_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "b.spool"
    gate = threading.Event()
    old_sink = _Recording(gate)
    old: AsyncDispatcher[object] = AsyncDispatcher(old_sink, "q", spool=path)
    old_sender = old.setup(10)
    old.start()
    for n in range(5):
        old_sender.put(n, delay_seconds=n if n == 3 else None)
    assert old_sink.entered.wait(30)
    assert old.stop(0) is False  # blocked in dispatch: not drained; the spool is closed all the same
    try:
        sink = _Recording()
        new: AsyncDispatcher[object] = AsyncDispatcher(sink, "q", spool=path)
        sender = new.setup(2)  # fewer places than were left: all of them are buffered anyway
        assert len(sender) == 5
        with new:
            sender.put("new")  # waits for room, behind the replayed ones
        assert sink.sent == [(0, None), (1, None), (2, None), (3, 3), (4, None), ("new", None)]
        assert _pending(path) == []
    finally:
        gate.set()
        wait_for(old._state.finished, timeout=30, message="the old dispatcher drains")
    assert "the spool could not record" in caplog.text  # the old loop's settles, past its close


@pytest.mark.timeout(60)
def test_a_previous_owners_foreign_entry_is_dead_lettered_at_construction(tmp_path: Path) -> None:
    path = tmp_path / "c.spool"
    with Spool(path) as spool:
        spool.append_many([["a", None], {"not": "ours"}, ["b", 2]])
    sink = _Recording()
    dispatcher: AsyncDispatcher[object] = AsyncDispatcher(sink, "q", spool=path)
    [dead] = dispatcher.spool_dead_letters()
    assert dead.entry == {"not": "ours"} and "not an AsyncDispatcher message" in dead.error
    dispatcher.setup(5)
    with dispatcher:
        pass
    assert sink.sent == [("a", None), ("b", 2)]


@pytest.mark.timeout(60)
def test_a_message_failed_for_good_is_dead_lettered_and_can_be_replayed(tmp_path: Path) -> None:
    from threaddispatch.backoff import Constant, RetryPolicy

    path = tmp_path / "d.spool"
    failures: list[FailedMessage[object]] = []
    sink = _Recording(bad="bad")
    retry = RetryPolicy(max_attempts=3, backoff=Constant(0))
    dispatcher: AsyncDispatcher[object] = AsyncDispatcher(sink, "q", failures.append, retry=retry, spool=path)
    sender = dispatcher.setup(10)
    with dispatcher:
        sender.put("good")
        sender.put("bad", delay_seconds=7)
    assert [failed.attempts for failed in failures] == [3]  # the handler is still called, after the retries
    assert _pending(path) == []
    again: AsyncDispatcher[object] = AsyncDispatcher(_Recording(), "q", spool=path)
    [dead] = again.spool_dead_letters()
    assert dead.entry == ["bad", 7] and "RuntimeError: cannot send 'bad'" in dead.error
    with pytest.raises(Exception, match="setup"):
        again.replay_spool_dead_letters()
    again.setup(10)
    with again:
        assert again.replay_spool_dead_letters() == 1
    assert again.dispatcher.sent == [("bad", 7)]  # type: ignore[attr-defined]
    with Spool(path) as spool:
        assert spool.pending() == [] and spool.dead_letters() == []
    with pytest.raises(DispatcherClosedError):
        again.replay_spool_dead_letters()


@pytest.mark.timeout(60)
def test_dead_letters_replay_within_the_buffers_room(tmp_path: Path) -> None:
    path = tmp_path / "e.spool"
    with Spool(path) as spool:
        seqs = spool.append_many([[n, None] for n in range(5)])
        spool.dead_letter(seqs, "RuntimeError: down")
    gate = threading.Event()
    sink = _Recording(gate)
    dispatcher: AsyncDispatcher[object] = AsyncDispatcher(sink, "q", spool=path)
    assert [dead.entry for dead in dispatcher.spool_dead_letters()] == [[n, None] for n in range(5)]
    dispatcher.setup(3)
    assert dispatcher.replay_spool_dead_letters([seqs[4], seqs[1]]) == 2
    assert dispatcher.replay_spool_dead_letters() == 1  # one place left
    gate.set()
    with dispatcher:
        pass
    assert sink.sent == [(1, None), (4, None), (0, None)]
    with Spool(path) as spool:
        assert [dead.entry for dead in spool.dead_letters()] == [[2, None], [3, None]]
        assert spool.pending() == []


@pytest.mark.timeout(60)
def test_a_refused_or_unencodable_put_leaves_the_spool_untouched(tmp_path: Path) -> None:
    path = tmp_path / "f.spool"
    dispatcher: AsyncDispatcher[object] = AsyncDispatcher(_Recording(), "q", spool=path)
    sender = dispatcher.setup(1)
    sender.put("kept")
    assert sender.try_put("refused") is False
    with pytest.raises(PayloadError, match="JSON"):
        sender.put({1, 2})
    with pytest.raises(ConfigurationError, match="timeout"):
        sender.put("x", timeout=-1)
    assert len(sender) == 1
    spool = dispatcher._state.spool
    assert spool is not None and [entry for _, entry in spool.pending()] == [["kept", None]]
    assert dispatcher.stop(30)
    with pytest.raises(DispatcherClosedError):
        sender.put("late")
    with pytest.raises(DispatcherClosedError):
        sender.try_put("late")
    assert _pending(path) == []


@pytest.mark.timeout(60)
def test_bad_spool_arguments_and_a_second_owner_are_refused_at_the_constructor(tmp_path: Path) -> None:
    sink = _Recording()
    with pytest.raises(ConfigurationError, match="spool_sync must be 'normal' or 'full', got 'fsync'"):
        AsyncDispatcher(sink, "q", spool=tmp_path / "g.spool", spool_sync="fsync")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="spool must be a file path, got 42"):
        AsyncDispatcher(sink, "q", spool=42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="has no spool"):
        AsyncDispatcher(sink, "q").spool_dead_letters()
    first: AsyncDispatcher[object] = AsyncDispatcher(sink, "q", spool=tmp_path / "g.spool", spool_sync="full")
    with pytest.raises(SpoolOwnedError, match=r"g\.spool"):
        AsyncDispatcher(sink, "q", spool=tmp_path / "g.spool")
    first.setup(1)
    assert first.stop(10)
    AsyncDispatcher(sink, "q", spool=tmp_path / "g.spool").stop(10)  # free again once stopped


class _Submitting:
    """A submitting dispatcher whose Futures the test settles."""

    def __init__(self) -> None:
        self.futures: list[tuple[object, Future[str | None]]] = []
        self.lock = threading.Lock()

    def dispatch(self, message: object, target: str, *, delay_seconds: int | None = None) -> None:
        raise AssertionError("submit is used")

    def submit(self, message: object, target: str, *, delay_seconds: int | None = None) -> Future[str | None]:
        future: Future[str | None] = Future()
        with self.lock:
            self.futures.append((message, future))
        return future


@pytest.mark.timeout(60)
def test_submitted_messages_leave_the_spool_when_sent_cancelled_or_dead(tmp_path: Path) -> None:
    path = tmp_path / "h.spool"
    sink = _Submitting()
    dispatcher: AsyncDispatcher[object] = AsyncDispatcher(sink, "q", lambda failed: None, spool=path)
    sender = dispatcher.setup(10)
    dispatcher.start()
    for message in ("sent", "cancelled", "failed"):
        sender.put(message)
    wait_for(lambda: len(sink.futures) == 3, timeout=30, message="three submits")
    futures = dict(sink.futures)
    futures["sent"].set_result("id")
    futures["cancelled"].cancel()
    futures["failed"].set_exception(RuntimeError("rejected"))
    dispatcher.stop(30)
    with Spool(path) as spool:
        assert spool.pending() == []
        assert [dead.entry for dead in spool.dead_letters()] == [["failed", None]]


@pytest.mark.timeout(60)
def test_a_batched_dispatchers_hand_off_acknowledges_each_batch(tmp_path: Path) -> None:
    path = tmp_path / "i.spool"
    batches: list[list[object]] = []

    def send(target: str, messages: list[object]) -> list[str | BaseException | None]:
        batches.append(list(messages))
        return [None] * len(messages)

    batched: BatchedDispatcher[object] = BatchedDispatcher(send, max_batch_size=3)
    try:
        dispatcher: AsyncDispatcher[object] = AsyncDispatcher(batched, "q", lambda failed: None, spool=path)
        assert dispatcher._state.hand_off is not None
        sender = dispatcher.setup(100)
        with dispatcher:
            for n in range(7):
                sender.put(n)
        assert sorted(n for batch in batches for n in batch) == list(range(7))  # type: ignore[type-var]
        with Spool(path) as spool:
            assert spool.pending() == []
    finally:
        batched.close(10)


@pytest.mark.timeout(60)
def test_a_spooled_hand_off_acknowledges_at_most_an_ack_group_of_whole_batches_at_a_time(tmp_path: Path) -> None:
    """A crash sends again at most about _ACK_GROUP messages behind a BatchedDispatcher too: a spooled
    hand-off takes that many (in whole batches) at a time, not the unspooled hand-off's larger chunk."""
    path = tmp_path / "h.spool"
    batched: BatchedDispatcher[object] = BatchedDispatcher(lambda target, messages: [None] * len(messages))
    try:
        dispatcher: AsyncDispatcher[object] = AsyncDispatcher(batched, "q", lambda failed: None, spool=path)
        sender = dispatcher.setup(1000)
        for n in range(1000):  # all buffered before the loop starts: it takes full chunks
            sender.put(n)
        spool = dispatcher._state.spool
        assert spool is not None
        settles: list[int] = []
        real_settle = spool.settle

        def counting_settle(seqs: Any, error: Any, owner: str) -> None:
            settles.append(len(seqs))
            real_settle(seqs, error, owner)

        spool.settle = counting_settle  # type: ignore[method-assign]
        dispatcher.start()
        assert dispatcher.stop(30)
        group = -(-_ACK_GROUP // batched.max_batch_size) * batched.max_batch_size
        assert sum(settles) == 1000 and max(settles) <= group
        assert _pending(path) == []
    finally:
        batched.close(10)


@pytest.mark.timeout(60)
def test_dispatched_messages_are_acknowledged_in_groups(tmp_path: Path) -> None:
    """200 buffered messages dispatched one by one leave the spool in a few commits, not one each."""
    path = tmp_path / "g.spool"
    sink = _Recording()
    dispatcher: AsyncDispatcher[object] = AsyncDispatcher(sink, "q", spool=path)
    sender = dispatcher.setup(200)
    for n in range(200):
        sender.put(n)
    spool = dispatcher._state.spool
    assert spool is not None
    settles: list[int] = []
    real_settle = spool.settle

    def counting_settle(seqs: Any, error: Any, owner: str) -> None:
        settles.append(len(seqs))
        real_settle(seqs, error, owner)

    spool.settle = counting_settle  # type: ignore[method-assign]
    dispatcher.start()
    assert dispatcher.stop(30)
    assert [message for message, _ in sink.sent] == list(range(200))
    assert sum(settles) == 200 and len(settles) <= 200 // _ACK_GROUP + 1
    assert _pending(path) == []


@pytest.mark.timeout(60)
def test_immediate_mode_acknowledges_on_the_caller_thread(tmp_path: Path) -> None:
    path = tmp_path / "j.spool"
    sink = _Recording(bad="bad")
    dispatcher: AsyncDispatcher[object] = AsyncDispatcher(sink, "q", lambda failed: None, spool=path)
    sender = dispatcher.setup(10)
    with immediate():
        sender.put("now")
        sender.put("bad")
    assert sink.sent == [("now", None)]
    spool = dispatcher._state.spool
    assert spool is not None and spool.pending() == []
    assert [dead.entry for dead in dispatcher.spool_dead_letters()] == [["bad", None]]
    dispatcher.stop(10)


_FIRST = """
import sys
import threading
from threaddispatch.buffered import AsyncDispatcher

spool, out, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
sink = open(out, "a", buffering=1)

class Stuck:
    def dispatch(self, message, target):
        sink.write(f"{message}\\n")  # written (a syscall) before the dispatch returns, so before its ack
        if message == 1000:
            threading.Event().wait()  # the sink hangs here, this message in flight, until the kill

dispatcher = AsyncDispatcher(Stuck(), "q", spool=spool)
sender = dispatcher.setup(total)
dispatcher.start()
for n in range(total):
    sender.put(n)
    if (n + 1) % 100 == 0:
        print(n + 1, flush=True)  # every put up to here returned: durable
print("done", flush=True)
sys.stdin.read()  # hold on until killed
"""

_SECOND = """
import sys
from threaddispatch.buffered import AsyncDispatcher

spool, out = sys.argv[1], sys.argv[2]
with open(out, "a", buffering=1) as sink:

    class Fast:
        def dispatch(self, message, target):
            sink.write(f"{message}\\n")

    dispatcher = AsyncDispatcher(Fast(), "q", spool=spool)
    dispatcher.setup(10)
    dispatcher.start()
    assert dispatcher.stop(60)
"""


def _delivered(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


@pytest.mark.timeout(120)
def test_a_sigkilled_dispatcher_loses_no_message_whose_put_returned(tmp_path: Path) -> None:
    total, kill_at = 20_000, 3_000
    spool, first_out, second_out = tmp_path / "crash.spool", tmp_path / "first.txt", tmp_path / "second.txt"
    child = subprocess.Popen(
        [sys.executable, "-c", _FIRST, str(spool), str(first_out), str(total)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    returned = 0
    assert child.stdout is not None and child.stdin is not None
    for line in child.stdout:  # the state itself: how many put() calls returned
        if line.strip() == "done":
            break
        returned = int(line)
        if returned >= kill_at:
            break
    child.send_signal(signal.SIGKILL)
    child.wait(60)
    child.stdout.close()
    child.stdin.close()
    assert returned >= kill_at
    subprocess.run([sys.executable, "-c", _SECOND, str(spool), str(second_out)], check=True, timeout=90)

    first, second = _delivered(first_out), _delivered(second_out)
    counts: Counter[Any] = Counter(first + second)
    assert set(range(returned)) <= counts.keys()  # every message whose put returned was delivered
    assert max(Counter(first).values()) == 1 and max(Counter(second).values()) == 1
    assert first == list(range(1001))  # up to the one in flight at the kill
    # Sent again: the one in flight, and those dispatched since the last acknowledgement (one commit per group).
    again = sorted(n for n, count in counts.items() if count > 1)
    assert again == list(range(again[0], 1001)) and len(again) <= _ACK_GROUP + 1
    assert second == list(range(again[0], second[-1] + 1))  # in order, from the first not acknowledged on
    assert _pending(spool) == []


@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_dispatches_without_its_parents_spool(tmp_path: Path) -> None:
    from test_background import _run_in_forked_child

    path = tmp_path / "fork.spool"
    gate = threading.Event()
    sink = _Recording(gate)
    dispatcher: AsyncDispatcher[object] = AsyncDispatcher(sink, "q", spool=path)
    sender = dispatcher.setup(10)
    dispatcher.start()
    sender.put("parent")
    assert sink.entered.wait(30)

    def child() -> dict[str, object]:
        got = _Recording()
        dispatcher._state.dispatcher = got
        sender.put("child")
        stopped = dispatcher.stop(10)
        return {"stopped": stopped, "got": [message for message, _ in got.sent], "spooled": dispatcher._state.spool}

    try:
        report = _run_in_forked_child(child)
    finally:
        gate.set()
    assert report == {"stopped": True, "got": ["child"], "spooled": None}
    assert dispatcher.stop(30)
    assert sink.sent == [("parent", None)]
    assert _pending(path) == []
