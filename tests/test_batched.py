"""BatchedDispatcher: per-target batches on the engine, the send-slot cap, per-message results, close, GC, fork."""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest

from threaddispatch.batched import BatchedDispatcher
from threaddispatch.buffered import Dispatcher
from threaddispatch.errors import (
    ConfigurationError,
    DispatcherClosedError,
    DispatchTimeoutError,
    ThreadDispatchError,
)
from threaddispatch.testing import live_dispatch_threads, wait_for

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """A send_batch that records every call and returns ids; thread-safe."""

    def __init__(self, result: Callable[[str, list[Any]], Any] | None = None) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, list[Any]]] = []
        self.result = result

    def __call__(self, target: str, messages: list[Any]) -> Any:
        with self.lock:
            self.calls.append((target, list(messages)))
        if self.result is not None:
            return self.result(target, messages)
        return [f"{target}:{m}" for m in messages]

    def sizes(self) -> list[int]:
        with self.lock:
            return [len(batch) for _target, batch in self.calls]


class HangingSend:
    """A send_batch that blocks until released, counting how many calls are inside it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.inside = 0
        self.calls = 0

    def __call__(self, target: str, messages: list[Any]) -> list[str]:
        with self.lock:
            self.inside += 1
            self.calls += 1
        try:
            if not self.release.wait(30):
                raise AssertionError("HangingSend was never released")
        finally:
            with self.lock:
                self.inside -= 1
        return [f"id-{m}" for m in messages]


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], object]]]:
    """Callables run at teardown in the order added (release hangs first), before the thread check."""
    actions: list[Callable[[], object]] = []
    yield actions
    for action in actions:
        action()


def make(send_batch: Any, cleanup: list[Callable[[], object]], **kwargs: Any) -> BatchedDispatcher[Any]:
    bd: BatchedDispatcher[Any] = BatchedDispatcher(send_batch, **kwargs)
    cleanup.append(lambda: bd.close(10))
    return bd


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": True}, "max_batch_size"),
        ({"flush_interval": -1}, "flush_interval"),
        ({"flush_interval": float("nan")}, "flush_interval"),
        ({"flush_interval": "1"}, "flush_interval"),
        ({"max_concurrent_sends": 0}, "max_concurrent_sends"),
        ({"max_concurrent_sends": 2.0}, "max_concurrent_sends"),
        ({"name": ""}, "name"),
    ],
)
def test_bad_arguments_raise_configuration_error_naming_them(kwargs: dict[str, Any], bad: str) -> None:
    """Each bad constructor argument raises ConfigurationError naming it."""
    with pytest.raises(ConfigurationError, match=bad):
        BatchedDispatcher(Recorder(), **kwargs)


def test_send_batch_must_be_callable() -> None:
    """A non-callable send_batch is refused at construction."""
    with pytest.raises(ConfigurationError, match="send_batch"):
        BatchedDispatcher("not callable")  # type: ignore[arg-type]


def test_bad_target_delay_and_timeout_raise_at_the_call(cleanup: list[Callable[[], object]]) -> None:
    """submit/dispatch/flush refuse an empty or non-str target, a negative delay and a bad timeout."""
    bd = make(Recorder(), cleanup)
    with pytest.raises(ConfigurationError, match="target"):
        bd.submit("m", "")
    with pytest.raises(ConfigurationError, match="target"):
        bd.submit("m", 7)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="delay_seconds"):
        bd.submit("m", "q", delay_seconds=-1)
    with pytest.raises(ConfigurationError, match="timeout"):
        bd.dispatch("m", "q", timeout=-1)
    with pytest.raises(ConfigurationError, match="timeout"):
        bd.flush(float("inf"))
    assert bd.stats()["submitted"] == 0


def test_it_is_a_dispatcher() -> None:
    """BatchedDispatcher satisfies the Dispatcher protocol (checked by mypy on this assignment)."""
    bd: BatchedDispatcher[str] = BatchedDispatcher(Recorder())
    dispatcher: Dispatcher[str] = bd
    assert dispatcher.dispatch("m", "q") == "q:m"
    assert bd.close(5) is True


# -- batching ----------------------------------------------------------------------------------


def test_1008_messages_at_batch_size_10_make_101_batches(cleanup: list[Callable[[], object]]) -> None:
    """1,008 messages to one target with max_batch_size=10 go in 101 send_batch calls: 100 of 10, one of 8."""
    send = Recorder()
    bd = make(send, cleanup, max_batch_size=10, flush_interval=60.0)
    futures = [bd.submit(i, "orders") for i in range(1008)]
    assert bd.flush(10) is True
    assert len(send.calls) == 101
    assert sorted(send.sizes()) == [8] + [10] * 100
    assert sorted(m for _t, batch in send.calls for m in batch) == list(range(1008))
    assert [f.result(0) for f in futures] == [f"orders:{i}" for i in range(1008)]
    assert bd.stats()["batches"] == 101 and bd.stats()["calls"] == 101


def test_a_full_batch_goes_without_waiting_for_the_interval(cleanup: list[Callable[[], object]]) -> None:
    """max_batch_size messages are sent at once, long before flush_interval."""
    send = Recorder()
    bd = make(send, cleanup, max_batch_size=5, flush_interval=60.0)
    futures = [bd.submit(i, "q") for i in range(5)]
    assert [f.result(10) for f in futures] == [f"q:{i}" for i in range(5)]
    assert send.sizes() == [5]


def test_a_partial_batch_goes_after_flush_interval(cleanup: list[Callable[[], object]]) -> None:
    """A lone message is sent when flush_interval passes, without flush()."""
    send = Recorder()
    bd = make(send, cleanup, max_batch_size=10, flush_interval=0.05)
    assert bd.submit("alone", "q").result(10) == "q:alone"
    assert send.calls == [("q", ["alone"])]


def test_a_zero_flush_interval_sends_what_is_there(cleanup: list[Callable[[], object]]) -> None:
    """flush_interval=0 sends without waiting; batches still never exceed max_batch_size."""
    send = Recorder()
    bd = make(send, cleanup, max_batch_size=3, flush_interval=0)
    futures = [bd.submit(i, "q") for i in range(20)]
    assert [f.result(10) for f in futures] == [f"q:{i}" for i in range(20)]
    assert max(send.sizes()) <= 3


def test_batches_never_mix_targets_and_keep_order(cleanup: list[Callable[[], object]]) -> None:
    """Each send_batch call holds one target's messages, in the order submitted, at most max_batch_size.

    One send slot: with several, two batches of a target may be sent at once, in either order."""
    send = Recorder()
    bd = make(send, cleanup, max_batch_size=4, flush_interval=60.0, max_concurrent_sends=1)
    for i in range(30):
        bd.submit(i, f"t{i % 3}")
    assert bd.flush(10) is True
    per_target: dict[str, list[int]] = {}
    for target, batch in send.calls:
        assert len(batch) <= 4
        assert {int(target[1:])} == {m % 3 for m in batch}
        per_target.setdefault(target, []).extend(batch)
    assert per_target == {f"t{k}": [i for i in range(30) if i % 3 == k] for k in range(3)}


def test_dispatch_blocks_until_sent_and_returns_the_id(cleanup: list[Callable[[], object]]) -> None:
    """dispatch() returns the message's id once its batch was sent."""
    bd = make(Recorder(), cleanup, flush_interval=0.01)
    assert bd.dispatch("hello", "greetings") == "greetings:hello"


def test_dispatch_timeout_raises_dispatch_timeout_error(cleanup: list[Callable[[], object]]) -> None:
    """dispatch(timeout=t) raises DispatchTimeoutError when the batch is not sent in time."""
    hang = HangingSend()
    cleanup.append(hang.release.set)
    bd = make(hang, cleanup, flush_interval=0.01)
    with pytest.raises(DispatchTimeoutError, match="not sent within"):
        bd.dispatch("m", "q", timeout=0.1)


def test_dispatch_reraises_send_batchs_own_timeout_error(cleanup: list[Callable[[], object]]) -> None:
    """A TimeoutError that send_batch reports for a message is raised as is, not as a dispatch timeout."""
    bd = make(Recorder(lambda _t, ms: [TimeoutError("upstream") for _ in ms]), cleanup, flush_interval=0.01)
    with pytest.raises(TimeoutError, match="upstream") as info:
        bd.dispatch("m", "q", timeout=10)
    assert not isinstance(info.value, DispatchTimeoutError)


def test_hold_delays_holds_a_message_back_until_close(cleanup: list[Callable[[], object]]) -> None:
    """With hold_delays=True a delayed message stays out of the batches; close() sends it at once."""
    send = Recorder()
    bd = make(send, cleanup, max_batch_size=10, flush_interval=0.01, hold_delays=True)
    late = bd.submit("late", "q", delay_seconds=600)
    early = bd.submit("early", "q")
    assert early.result(10) == "q:early"
    assert bd.flush(10) is True  # flush() sends what is in the lanes; a held message is not there yet
    assert not late.done()
    assert bd.close(10) is True
    assert late.result(0) == "q:late"
    assert [batch for _t, batch in send.calls] == [["early"], ["late"]]


def test_a_cancelled_future_keeps_its_message_out_of_the_batch(cleanup: list[Callable[[], object]]) -> None:
    """Cancelling a message's Future before its batch goes means it is not sent."""
    send = Recorder()
    bd = make(send, cleanup, max_batch_size=10, flush_interval=60.0)
    keep = bd.submit("keep", "q")
    drop = bd.submit("drop", "q")
    assert drop.cancel()
    assert bd.flush(10) is True
    assert keep.result(0) == "q:keep"
    assert send.calls == [("q", ["keep"])]
    assert bd.stats()["cancelled"] == 1


# -- results and failures ----------------------------------------------------------------------


def test_a_partial_batch_failure_fails_only_its_messages(cleanup: list[Callable[[], object]]) -> None:
    """Results mixing ids and exceptions resolve each Future with its own outcome."""

    def result(_target: str, messages: list[int]) -> list[str | BaseException]:
        return [ValueError(f"bad {m}") if m % 2 else f"id-{m}" for m in messages]

    bd = make(Recorder(result), cleanup, max_batch_size=6, flush_interval=0.01)
    futures = [bd.submit(i, "q") for i in range(6)]
    assert bd.flush(10) is True
    for i, future in enumerate(futures):
        if i % 2:
            assert isinstance(future.exception(0), ValueError) and str(future.exception(0)) == f"bad {i}"
        else:
            assert future.result(0) == f"id-{i}"
    with pytest.raises(ValueError, match="bad 1"):
        bd.dispatch(1, "q", timeout=10)
    stats = bd.stats()
    assert (stats["sent"], stats["failed"]) == (3, 4)


def test_none_results_count_as_sent_without_an_id(cleanup: list[Callable[[], object]]) -> None:
    """A None result means the message was sent but has no id."""
    bd = make(Recorder(lambda _t, ms: [None] * len(ms)), cleanup, flush_interval=0.01)
    assert bd.dispatch("m", "q", timeout=10) is None
    assert bd.stats()["sent"] == 1


def test_a_raising_send_batch_fails_every_message_of_the_batch(cleanup: list[Callable[[], object]]) -> None:
    """When send_batch raises, every message of that batch gets the exception; the next batch still goes."""
    calls = [0]

    def result(_target: str, messages: list[int]) -> list[str]:
        calls[0] += 1
        if calls[0] == 1:
            raise ConnectionError("down")
        return [f"id-{m}" for m in messages]

    bd = make(Recorder(result), cleanup, max_batch_size=3, flush_interval=60.0)
    first = [bd.submit(i, "q") for i in range(3)]
    assert all(isinstance(f.exception(10), ConnectionError) for f in first)
    second = [bd.submit(i, "q") for i in range(3, 6)]
    assert [f.result(10) for f in second] == ["id-3", "id-4", "id-5"]


@pytest.mark.parametrize(
    ("returned", "problem"),
    [
        (lambda ms: ["id"] * (len(ms) - 1), "returned 2 result"),
        (lambda ms: ["id"] * (len(ms) + 1), "returned 4 result"),
        (lambda ms: None, "returned NoneType"),
        (lambda ms: "id", "returned str"),
        (lambda ms: 3, "returned int"),
    ],
)
def test_a_result_list_of_the_wrong_shape_fails_every_message_with_a_clear_error(
    returned: Callable[[list[Any]], Any], problem: str, cleanup: list[Callable[[], object]]
) -> None:
    """A result that is not one entry per message fails the whole batch with ThreadDispatchError saying why."""
    bd = make(Recorder(lambda _t, ms: returned(ms)), cleanup, max_batch_size=3, flush_interval=60.0)
    futures = [bd.submit(i, "q") for i in range(3)]
    assert bd.flush(10) is True
    for future in futures:
        error = future.exception(0)
        assert isinstance(error, ThreadDispatchError)
        assert problem in str(error) and "one result" in str(error) and "3 messages" in str(error)
    assert bd.stats()["failed"] == 3 and bd.stats()["sent"] == 0


def test_a_generator_of_results_is_accepted(cleanup: list[Callable[[], object]]) -> None:
    """send_batch may return any iterable of results, not only a list."""
    bd = make(Recorder(lambda _t, ms: (f"g{m}" for m in ms)), cleanup, flush_interval=0.01)
    assert bd.dispatch(1, "q", timeout=10) == "g1"


# -- concurrency cap and back-pressure ----------------------------------------------------------


def test_the_concurrency_cap_holds_under_load(cleanup: list[Callable[[], object]]) -> None:
    """No more than max_concurrent_sends send_batch calls ever run at once, and the cap is reached."""
    cap = 3
    lock = threading.Lock()
    inside = [0]
    peak = [0]
    reached = threading.Event()
    cleanup.append(reached.set)

    def send_batch(_target: str, messages: list[int]) -> list[str]:
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
            if inside[0] == cap:
                reached.set()
        try:
            # The first sends hold until the cap is reached, then every send takes a little while.
            reached.wait(10)
            time.sleep(0.001)
        finally:
            with lock:
                inside[0] -= 1
        return [f"id-{m}" for m in messages]

    bd = make(send_batch, cleanup, max_batch_size=5, flush_interval=0.001, max_concurrent_sends=cap)
    producers = [
        threading.Thread(target=lambda k=k: [bd.submit(i, f"t{(i + k) % 7}") for i in range(400)]) for k in range(4)
    ]
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join(10)
    assert bd.flush(30) is True
    assert reached.is_set()
    assert peak[0] == cap
    assert bd.stats()["sent"] == 1600


def test_back_pressure_holds_batches_in_the_engine_while_every_slot_is_busy(
    cleanup: list[Callable[[], object]],
) -> None:
    """With every send slot taken by a hung send, further batches wait in the lanes instead of piling up."""
    hang = HangingSend()
    cleanup.append(hang.release.set)
    bd = make(hang, cleanup, max_batch_size=2, flush_interval=60.0, max_concurrent_sends=2)
    futures = [bd.submit(i, "q") for i in range(10)]
    wait_for(lambda: hang.inside == 2)
    wait_for(lambda: bd.stats()["pending"] == 4)  # 2 sending, 1 batch held by the blocked worker, 4 in the lane
    stats = bd.stats()
    assert stats["sending"] == 2 and hang.calls == 2
    hang.release.set()
    assert [f.result(10) for f in futures] == [f"id-{i}" for i in range(10)]
    assert hang.calls == 5


def test_flush_returns_false_within_its_timeout_when_send_hangs(cleanup: list[Callable[[], object]]) -> None:
    """flush(timeout) with a hung send_batch returns False after about timeout."""
    hang = HangingSend()
    cleanup.append(hang.release.set)
    bd = make(hang, cleanup, flush_interval=60.0)
    bd.submit("m", "q")
    assert bd.flush(0.2) is False  # returned while send_batch is still hung
    hang.release.set()
    assert bd.flush(10) is True


# -- close -------------------------------------------------------------------------------------


def test_close_sends_everything_queued(cleanup: list[Callable[[], object]]) -> None:
    """close() sends partial batches at once and returns True."""
    send = Recorder()
    bd = make(send, cleanup, max_batch_size=10, flush_interval=60.0)
    futures = [bd.submit(i, "q") for i in range(15)]
    assert bd.close(10) is True
    assert [f.result(0) for f in futures] == [f"q:{i}" for i in range(15)]
    assert sorted(send.sizes()) == [5, 10]


def test_close_is_idempotent_and_work_after_it_raises(cleanup: list[Callable[[], object]]) -> None:
    """A second close returns at once; submit and dispatch afterwards raise DispatcherClosedError."""
    bd = make(Recorder(), cleanup)
    assert bd.close(5) is True
    assert bd.close(5) is True
    assert bd.closed
    with pytest.raises(DispatcherClosedError, match="closed"):
        bd.submit("late", "q")
    with pytest.raises(DispatcherClosedError):
        bd.dispatch("late", "q")
    assert "closed" in repr(bd)


def test_close_returns_false_when_a_message_failed_during_it(cleanup: list[Callable[[], object]]) -> None:
    """close() reports False when a message it sent failed."""
    bd = make(Recorder(lambda _t, ms: [ValueError("x") for _ in ms]), cleanup, flush_interval=60.0)
    future = bd.submit("m", "q")
    assert bd.close(10) is False
    assert isinstance(future.exception(0), ValueError)


def test_close_returns_within_its_timeout_with_a_hung_send(cleanup: list[Callable[[], object]]) -> None:
    """With send_batch hung, close(timeout) returns False in time; what could not be sent fails, nothing hangs."""
    hang = HangingSend()
    cleanup.append(hang.release.set)
    bd = make(hang, cleanup, max_batch_size=1, flush_interval=60.0, max_concurrent_sends=1)
    stuck = bd.submit("stuck", "q")
    wait_for(lambda: hang.inside == 1)
    queued = [bd.submit(i, "q") for i in range(3)]
    assert bd.close(0.3) is False  # returned while send_batch is still hung
    for future in queued:
        assert isinstance(future.exception(5), DispatchTimeoutError)
    assert not stuck.done()
    hang.release.set()
    assert stuck.result(10) == "id-stuck"
    assert hang.calls == 1


def test_context_manager_closes(cleanup: list[Callable[[], object]]) -> None:
    """Leaving a with block closes the dispatcher after sending what was queued."""
    send = Recorder()
    with BatchedDispatcher(send, flush_interval=60.0) as bd:
        future = bd.submit("m", "q")
    assert bd.closed and future.result(0) == "q:m"


def test_send_threads_are_named_and_leave_on_close(cleanup: list[Callable[[], object]]) -> None:
    """The engine worker and the send threads are daemon threads named after the dispatcher; close ends them."""
    before = set(live_dispatch_threads())
    bd = make(Recorder(), cleanup, name="orders-batcher", flush_interval=0.01)
    bd.dispatch("m", "q", timeout=10)
    names = {t.name for t in live_dispatch_threads() if t not in before}
    assert "threaddispatch-orders-batcher" in names
    assert "threaddispatch-orders-batcher-send-1" in names
    assert bd.close(5) is True
    assert not [t for t in live_dispatch_threads() if t not in before]


# -- garbage collection and fork -----------------------------------------------------------------


def test_an_unreferenced_dispatcher_is_collected_and_delivers_what_it_held() -> None:
    """Dropping a BatchedDispatcher lets it be collected; its queue is still sent and its threads leave."""
    before = set(live_dispatch_threads())
    send = Recorder()
    bd: BatchedDispatcher[int] = BatchedDispatcher(send, flush_interval=60.0)
    futures = [bd.submit(i, "q") for i in range(3)]
    ref = weakref.ref(bd)
    del bd
    gc.collect()
    assert ref() is None
    assert [f.result(10) for f in futures] == ["q:0", "q:1", "q:2"]
    wait_for(lambda: not [t for t in live_dispatch_threads() if t not in before], timeout=10, message="threads left")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_fresh_send_slots_and_an_empty_queue(cleanup: list[Callable[[], object]]) -> None:
    """In a child forked while every send slot is busy, sends work again and the parent's queue is not resent."""
    hang = HangingSend()
    cleanup.append(hang.release.set)
    bd = make(hang, cleanup, max_batch_size=1, flush_interval=60.0, max_concurrent_sends=1)
    parent_future = bd.submit("parent", "q")
    wait_for(lambda: hang.inside == 1)
    bd.submit("parent-queued", "q")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            sent: list[list[Any]] = []

            def child_send(_target: str, messages: list[Any]) -> list[str]:
                sent.append(messages)
                return ["child-id"] * len(messages)

            bd._state.send_batch = child_send
            if bd.stats()["pending"] == 0 and bd.dispatch("child", "q", timeout=10) == "child-id":
                code = 0 if sent == [["child"]] and bd.close(5) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    hang.release.set()
    assert parent_future.result(10) == "id-parent"
    assert bd.close(10) is True
    assert hang.calls == 2


def test_submit_returns_a_future_without_blocking(cleanup: list[Callable[[], object]]) -> None:
    """submit() returns a pending Future at once even while every send slot is hung."""
    hang = HangingSend()
    cleanup.append(hang.release.set)
    bd = make(hang, cleanup, max_batch_size=1, flush_interval=60.0, max_concurrent_sends=1)
    first = bd.submit(0, "q")
    wait_for(lambda: hang.inside == 1)
    more: list[Future[str | None]] = [bd.submit(i, "q") for i in range(1, 50)]
    assert not any(f.done() for f in [first, *more])
    hang.release.set()
    assert [f.result(10) for f in more] == [f"id-{i}" for i in range(1, 50)]


def test_exit_drain_sends_what_is_queued() -> None:
    """At interpreter exit, messages waiting for their flush_interval are sent, not lost."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = textwrap.dedent(
        """
        import atexit
        sent = []
        atexit.register(lambda: print("RESULT", sorted(sent)))
        from threaddispatch.batched import BatchedDispatcher
        def send_batch(target, messages):
            sent.extend(messages)
            return ["id"] * len(messages)
        bd = BatchedDispatcher(send_batch, max_batch_size=10, flush_interval=60.0)
        for i in range(13):
            bd.submit(i, "q")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    assert f"RESULT {list(range(13))}" in result.stdout


@pytest.mark.timeout(20)
def test_flush_and_close_called_from_inside_send_batch_return_instead_of_waiting_for_themselves() -> None:
    """flush()/close() without a timeout, called by send_batch, cannot wait for the batch they run in:
    they return False at once (as BackgroundDispatcher does) instead of hanging forever."""
    results: list[tuple[str, bool]] = []
    done = threading.Event()
    holder: list[BatchedDispatcher[str]] = []

    def send(target: str, messages: list[str]) -> list[str]:
        if messages == ["reenter"]:
            results.append(("flush", holder[0].flush()))
            results.append(("close", holder[0].close()))
            done.set()
        return messages

    bd: BatchedDispatcher[str] = BatchedDispatcher(send, flush_interval=0.001, name="reenter")
    holder.append(bd)
    bd.submit("reenter", "t")
    assert done.wait(5.0), "flush()/close() inside send_batch waited for their own batch"
    assert results == [("flush", False), ("close", False)]
    assert bd.close(5.0)
    holder.clear()


def test_repr_never_raises_for_an_instance_whose_constructor_did_not_finish() -> None:
    """repr() of a BatchedDispatcher whose __init__ never ran (or failed early) names it instead of raising."""
    half: BatchedDispatcher[Any] = BatchedDispatcher.__new__(BatchedDispatcher)
    assert "not constructed" in repr(half)
