"""RequestDispatcher: keys, modes, deduplication, pause/stop/start, offline, retries, events."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from threaddispatch.errors import Cancel, CancelledError, ConfigurationError, Retry
from threaddispatch.requests import (
    CancellationToken,
    RequestDispatcher,
    RequestEvent,
    default_dedupe_key,
    default_queue_key,
)
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(30)

Send = Callable[[Any, CancellationToken], Any]


class Harness:
    """Makes dispatchers and closes them after the test; ``release`` unblocks sends that wait on it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.made: list[RequestDispatcher[Any, Any]] = []

    def make(self, send: Send, **options: Any) -> RequestDispatcher[Any, Any]:
        dispatcher: RequestDispatcher[Any, Any] = RequestDispatcher(send, **options)
        self.made.append(dispatcher)
        return dispatcher


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.release.set()
    for dispatcher in harness.made:
        dispatcher.close(5)


class Recorder:
    """Collects events of a dispatcher, thread-safely."""

    def __init__(self, dispatcher: RequestDispatcher[Any, Any], *events: str, **filters: Any) -> None:
        self.events: list[RequestEvent] = []
        self.lock = threading.Lock()
        for event in events:
            dispatcher.on(event, self._record, **filters)

    def _record(self, event: RequestEvent) -> None:
        with self.lock:
            self.events.append(event)

    def names(self) -> list[str]:
        with self.lock:
            return [e.event for e in self.events]

    def of(self, name: str) -> list[RequestEvent]:
        with self.lock:
            return [e for e in self.events if e.event == name]


# -- basics ---------------------------------------------------------------------------------------


def test_add_returns_handle_whose_future_gets_the_response(h: Harness) -> None:
    """add() returns a unique id and a Future resolved with send's return, sent on a pool thread with a live token."""
    seen: list[tuple[str, CancellationToken]] = []

    def send(request: dict[str, Any], token: CancellationToken) -> str:
        seen.append((threading.current_thread().name, token))
        return f"response to {request['endpoint']}"

    rd = h.make(send)
    first = rd.add({"endpoint": "/users"})
    second = rd.add({"endpoint": "/users"})
    assert first.future.result(5) == "response to /users"
    assert second.future.result(5) == "response to /users"
    assert first.request_id != second.request_id
    assert first.queue_key == "GET /users"
    assert not first.deduplicated
    assert all(name.startswith("threaddispatch-requests-") for name, _token in seen)
    assert all(isinstance(token, CancellationToken) and not token.cancelled for _name, token in seen)


def test_default_queue_key_uses_method_endpoint_and_sorted_query() -> None:
    """The default key is METHOD endpoint?sorted-query; query order does not split a queue."""
    assert default_queue_key({"endpoint": "/users", "query": {"b": 2, "a": 1}}) == "GET /users?a=1&b=2"
    assert default_queue_key({"method": "post", "endpoint": "/users"}) == "POST /users"
    assert default_queue_key({"url": "/x", "params": [("z", 1), ("a", 2)]}) == "GET /x?a=2&z=1"
    assert default_queue_key({"endpoint": "/x?k=v", "query": "b=1&a=2"}) == "GET /x?k=v&a=2&b=1"
    assert default_queue_key({"endpoint": "/x", "query": {"a": 1}}) != default_queue_key(
        {"method": "DELETE", "endpoint": "/x", "query": {"a": 1}}
    )
    assert default_queue_key("/plain") == "/plain"

    class Command:
        method = "PUT"
        endpoint = "/items/1"
        query = None

    assert default_queue_key(Command()) == "PUT /items/1"
    with pytest.raises(ConfigurationError, match="no str endpoint"):
        default_queue_key({"method": "GET"})
    with pytest.raises(ConfigurationError, match="42"):
        default_queue_key(42)


def test_default_dedupe_key_is_canonical() -> None:
    """Equal mappings in any key order give the same dedupe key; different bodies give different keys."""
    assert default_dedupe_key({"a": 1, "b": [1, 2]}) == default_dedupe_key({"b": [1, 2], "a": 1})
    assert default_dedupe_key({"a": 1}) != default_dedupe_key({"a": 2})
    assert default_dedupe_key("x") == "x"


def test_queue_key_function_and_explicit_key_replace_the_default(h: Harness) -> None:
    """The constructor's queue_key= derives keys; add(queue_key=) overrides it."""
    rd = h.make(lambda request, token: request, queue_key=lambda request: f"tenant:{request['tenant']}")
    assert rd.add({"tenant": 7}).queue_key == "tenant:7"
    assert rd.add({"tenant": 7}, queue_key="mine").queue_key == "mine"


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"mode": "sometimes"}, "sometimes"),
        ({"retry": -1}, "-1"),
        ({"retry": 1.5}, "1.5"),
        ({"retry_time": -0.1}, "-0.1"),
        ({"retry_time": float("nan")}, "nan"),
        ({"deduplicate_time": "soon"}, "soon"),
        ({"queue_key": ""}, "''"),
        ({"queue_key": 5}, "5"),
    ],
)
def test_bad_add_arguments_raise_naming_the_value(h: Harness, options: dict[str, Any], named: str) -> None:
    """A bad add() argument raises ConfigurationError at the call, naming the value; nothing is queued."""
    rd = h.make(lambda request, token: None)
    with pytest.raises(ConfigurationError, match=named):
        rd.add({"endpoint": "/x"}, **options)
    assert rd.get_queue_keys() == []


def test_queue_key_function_returning_non_str_is_refused(h: Harness) -> None:
    """A queue_key function returning something else than a str is refused at add, naming what it returned."""
    rd = h.make(lambda request, token: None, queue_key=lambda request: ("a", "tuple"))
    with pytest.raises(ConfigurationError, match="tuple"):
        rd.add("x")


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"max_workers": 0}, "0"),
        ({"queue_key": "key"}, "key"),
        ({"retry_on_error": 3}, "3"),
        ({"storage": object()}, "object"),
        ({"name": ""}, "''"),
    ],
)
def test_bad_constructor_arguments_raise(options: dict[str, Any], named: str) -> None:
    """Bad constructor arguments raise ConfigurationError naming the value."""
    with pytest.raises(ConfigurationError, match=named):
        RequestDispatcher(lambda request, token: None, **options)


def test_send_not_callable_is_refused() -> None:
    """send must be callable."""
    with pytest.raises(ConfigurationError, match="send"):
        RequestDispatcher("not callable")  # type: ignore[arg-type]


def test_failed_send_settles_future_with_its_exception(h: Harness) -> None:
    """With no retry, the send's exception is the Future's, and one final error event is fired."""

    def send(request: str, token: CancellationToken) -> None:
        raise KeyError(request)

    rd = h.make(send)
    events = Recorder(rd, "error", "remove")
    handle = rd.add("boom", queue_key="k")
    with pytest.raises(KeyError, match="boom"):
        handle.future.result(5)
    [error] = events.of("error")
    assert error.final and isinstance(error.error, KeyError) and error.attempt == 1
    assert [e.reason for e in events.of("remove")] == ["failed"]


@pytest.mark.timeout(30)
def test_max_workers_bounds_concurrent_sends(h: Harness) -> None:
    """No more than max_workers sends run at once."""
    lock = threading.Lock()
    active = [0]
    peak = [0]

    def send(request: int, token: CancellationToken) -> int:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        h.release.wait(10)
        with lock:
            active[0] -= 1
        return request

    rd = h.make(send, max_workers=3)
    handles = [rd.add(i, queue_key="k") for i in range(10)]
    wait_for(lambda: active[0] == 3, message="three sends running")
    h.release.set()
    assert [handle.future.result(5) for handle in handles] == list(range(10))
    assert peak[0] == 3


def test_events_fire_before_the_future_settles(h: Harness) -> None:
    """A request's response/remove events are fired before its Future resolves."""
    handles: dict[str, Any] = {}
    done_at_event: list[bool] = []

    def send(request: str, token: CancellationToken) -> str:
        h.release.wait(10)
        return request

    rd = h.make(send)
    rd.on("response", lambda e: done_at_event.append(handles[str(e.request_id)].future.done()))
    rd.on("remove", lambda e: done_at_event.append(handles[str(e.request_id)].future.done()))
    handle = rd.add("x", queue_key="k")
    handles[handle.request_id] = handle
    h.release.set()
    handle.future.result(5)
    assert done_at_event == [False, False]


# -- deduplication ---------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_fifty_threads_deduplicated_onto_one_call(h: Harness) -> None:
    """50 threads adding the same request get one send, 50 handles with one id and one Future."""
    calls = []

    def send(request: dict[str, Any], token: CancellationToken) -> str:
        calls.append(request)
        h.release.wait(10)
        return "shared response"

    rd = h.make(send)
    events = Recorder(rd, "deduplicated")
    barrier = threading.Barrier(50)
    handles: list[Any] = [None] * 50

    def caller(index: int) -> None:
        barrier.wait(10)
        handles[index] = rd.add({"endpoint": "/feed", "query": {"page": 1}}, deduplicate=True)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    h.release.set()
    assert all(handle.future.result(5) == "shared response" for handle in handles)
    assert len(calls) == 1
    assert len({handle.request_id for handle in handles}) == 1
    assert all(handle.future is handles[0].future for handle in handles)
    assert sum(handle.deduplicated for handle in handles) == 49
    assert len(events.of("deduplicated")) == 49


def test_deduplication_never_joins_a_finished_request(h: Harness) -> None:
    """Once a request resolved, the same request is sent again under a new id."""
    calls = Counter[str]()

    def send(request: str, token: CancellationToken) -> int:
        calls[request] += 1
        return calls[request]

    rd = h.make(send)
    first = rd.add("same", queue_key="k", deduplicate=True)
    assert first.future.result(5) == 1
    second = rd.add("same", queue_key="k", deduplicate=True)
    assert second.future.result(5) == 2
    assert second.request_id != first.request_id and not second.deduplicated


def test_deduplication_needs_equal_dedupe_keys(h: Harness) -> None:
    """Different requests in one queue are not joined, even with deduplicate=True."""

    def send(request: dict[str, int], token: CancellationToken) -> int:
        h.release.wait(10)
        return request["page"]

    rd = h.make(send)
    one = rd.add({"endpoint": "/x", "page": 1}, deduplicate=True)
    two = rd.add({"endpoint": "/x", "page": 2}, deduplicate=True)
    three = rd.add({"page": 1, "endpoint": "/x"}, deduplicate=True)
    assert one.request_id != two.request_id
    assert three.request_id == one.request_id
    h.release.set()
    assert (one.future.result(5), two.future.result(5)) == (1, 2)


def test_deduplication_does_not_join_a_stopped_request(h: Harness) -> None:
    """A request stopped on its own is not joined; the newcomer is queued and sent."""
    rd = h.make(lambda request, token: "sent")
    rd.pause("k")
    stopped = rd.add("same", queue_key="k", deduplicate=True)
    assert rd.stop_request("k", stopped.request_id)
    newcomer = rd.add("same", queue_key="k", deduplicate=True)
    assert newcomer.request_id != stopped.request_id and not newcomer.deduplicated
    rd.start("k")
    assert newcomer.future.result(5) == "sent"
    assert not stopped.future.done()
    assert rd.get_request("k", stopped.request_id).state == "stopped"  # type: ignore[union-attr]


def test_deduplicate_time_limits_how_old_a_joined_request_may_be(h: Harness) -> None:
    """A request older than deduplicate_time is not joined; the newcomer becomes the one to join."""
    now = [100.0]
    rd = h.make(lambda request, token: request)
    rd._core.clock = lambda: now[0]
    rd.pause("k")
    first = rd.add("r", queue_key="k", deduplicate=True, deduplicate_time=1.0)
    now[0] = 100.5
    joined = rd.add("r", queue_key="k", deduplicate=True, deduplicate_time=1.0)
    now[0] = 101.5
    fresh = rd.add("r", queue_key="k", deduplicate=True, deduplicate_time=1.0)
    now[0] = 101.6
    joins_fresh = rd.add("r", queue_key="k", deduplicate=True, deduplicate_time=1.0)
    never = rd.add("r", queue_key="k", deduplicate=True, deduplicate_time=0)
    assert joined.request_id == first.request_id
    assert fresh.request_id != first.request_id
    assert joins_fresh.request_id == fresh.request_id
    assert never.request_id not in {first.request_id, fresh.request_id}
    rd.start("k")
    assert never.future.result(5) == "r"


# -- modes -------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_cancelable_burst_delivers_only_the_last_response(h: Harness) -> None:
    """In cancelable mode each new request cancels the ones before it; only the last response is delivered."""
    burst = 20
    tokens: dict[int, CancellationToken] = {}
    returned = [0]
    lock = threading.Lock()

    def send(request: dict[str, int], token: CancellationToken) -> int:
        page = request["page"]
        with lock:
            tokens[page] = token
        try:
            if page == burst - 1:
                h.release.wait(10)
            else:
                token.wait(10)
                token.raise_if_cancelled()
            return page
        finally:
            with lock:
                returned[0] += 1

    rd = h.make(send, max_workers=4)
    events = Recorder(rd, "response", "abort", "drained")
    handles = [rd.add({"endpoint": "/list", "page": page}, mode="cancelable") for page in range(burst)]
    assert all(handle.future.cancelled() for handle in handles[:-1])
    wait_for(lambda: burst - 1 in tokens, message="the last request is being sent")
    h.release.set()
    assert handles[-1].future.result(5) == burst - 1
    wait_for(lambda: returned[0] == len(tokens), message="every started send returned")
    assert all(token.cancelled for page, token in tokens.items() if page != burst - 1)
    assert not tokens[burst - 1].cancelled
    assert [e.request_id for e in events.of("response")] == [handles[-1].request_id]
    assert len(events.of("abort")) == burst - 1
    assert len(events.of("drained")) == 1  # replacing a request does not drain the queue; the last response does
    assert rd.get_queue_keys() == []


@pytest.mark.timeout(30)
def test_queued_mode_sends_one_at_a_time_in_order(h: Harness) -> None:
    """Queued requests of one key run one at a time, in the order they were added."""
    order: list[int] = []
    active = [0]
    peak = [0]
    lock = threading.Lock()

    def send(request: int, token: CancellationToken) -> int:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            order.append(request)
        threading.Event().wait(0.001)  # widen the window in which a second send could overlap
        with lock:
            active[0] -= 1
        return request

    rd = h.make(send, max_workers=8)
    handles = [rd.add(i, queue_key="ordered", mode="queued") for i in range(30)]
    assert [handle.future.result(5) for handle in handles] == list(range(30))
    assert order == list(range(30))
    assert peak[0] == 1


def test_queued_request_waits_for_concurrent_ones_ahead_and_holds_later_ones(h: Harness) -> None:
    """A queued request waits until nothing of its queue is in flight; requests behind it wait for it."""
    order: list[str] = []
    gates = {name: threading.Event() for name in ("a", "q", "b")}

    def send(request: str, token: CancellationToken) -> str:
        order.append(request)
        gates[request].wait(10)
        return request

    rd = h.make(send)
    a = rd.add("a", queue_key="k")
    q = rd.add("q", queue_key="k", mode="queued")
    b = rd.add("b", queue_key="k")
    assert [r.state for r in rd.get_queue("k").requests] == ["running", "waiting", "waiting"]
    gates["a"].set()
    a.future.result(5)
    wait_for(lambda: order == ["a", "q"], message="the queued request started")
    assert rd.get_request("k", b.request_id).state == "waiting"  # type: ignore[union-attr]
    gates["q"].set()
    gates["b"].set()
    assert (q.future.result(5), b.future.result(5)) == ("q", "b")
    assert order == ["a", "q", "b"]


@pytest.mark.timeout(30)
def test_queued_retry_keeps_its_place_and_its_delay(h: Harness) -> None:
    """In queued mode a failed request waiting for its retry holds its place; flush does not cut its delay."""
    attempts: list[tuple[str, float]] = []
    retry_time = 0.2

    def send(request: str, token: CancellationToken) -> str:
        attempts.append((request, time.monotonic()))
        if request == "A" and len(attempts) == 1:
            raise ConnectionError("flaky")
        return request

    rd = h.make(send)
    a = rd.add("A", queue_key="q", mode="queued", retry=1, retry_time=retry_time)
    b = rd.add("B", queue_key="q", mode="queued")
    wait_for(lambda: rd.get_request("q", a.request_id).state == "retrying", message="A waits for its retry")  # type: ignore[union-attr]
    assert rd.get_request("q", b.request_id).state == "waiting"  # type: ignore[union-attr]
    assert rd.flush() == 0
    rd.set_online(True)
    assert (a.future.result(5), b.future.result(5)) == ("A", "B")
    assert [name for name, _at in attempts] == ["A", "A", "B"]
    assert attempts[1][1] - attempts[0][1] >= retry_time - 0.01


# -- retries -------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_retries_are_at_least_retry_time_apart(h: Harness) -> None:
    """A request failing 3 times with retry=3 succeeds on its 4th attempt, each retry_time after the last."""
    times: list[float] = []
    retry_time = 0.05

    def send(request: str, token: CancellationToken) -> str:
        times.append(time.monotonic())
        if len(times) <= 3:
            raise TimeoutError(f"attempt {len(times)}")
        return "finally"

    rd = h.make(send)
    events = Recorder(rd, "error", "loading")
    handle = rd.add("r", queue_key="k", retry=3, retry_time=retry_time)
    assert handle.future.result(5) == "finally"
    assert len(times) == 4
    assert all(later - earlier >= retry_time - 0.01 for earlier, later in itertools.pairwise(times))
    assert [(e.attempt, e.final) for e in events.of("error")] == [(1, False), (2, False), (3, False)]
    assert [e.attempt for e in events.of("loading")] == [1, 2, 3, 4]


def test_exhausted_retries_fail_with_the_last_error(h: Harness) -> None:
    """After retry + 1 failed attempts the Future holds the last error."""
    attempts = [0]

    def send(request: str, token: CancellationToken) -> None:
        attempts[0] += 1
        raise ValueError(f"failure {attempts[0]}")

    rd = h.make(send)
    handle = rd.add("r", queue_key="k", retry=2, retry_time=0)
    with pytest.raises(ValueError, match="failure 3"):
        handle.future.result(5)
    assert attempts[0] == 3


def test_retry_on_error_can_refuse_a_retry(h: Harness) -> None:
    """retry_on_error returning False (or raising) makes the failure final at once."""
    attempts = Counter[str]()

    def send(request: str, token: CancellationToken) -> None:
        attempts[request] += 1
        raise (PermissionError if request == "denied" else LookupError)(request)

    def retry_on_error(error: Exception) -> bool:
        if isinstance(error, LookupError):
            raise RuntimeError("broken predicate")
        return not isinstance(error, PermissionError)

    rd = h.make(send, retry_on_error=retry_on_error)
    denied = rd.add("denied", queue_key="k", retry=5, retry_time=0)
    broken = rd.add("broken", queue_key="k", retry=5, retry_time=0)
    with pytest.raises(PermissionError):
        denied.future.result(5)
    with pytest.raises(LookupError):
        broken.future.result(5)
    assert attempts == {"denied": 1, "broken": 1}


def test_retry_and_cancel_signals_from_send(h: Harness) -> None:
    """Retry(delay) from send retries after that delay; Cancel ends the request with no retry."""
    times: list[float] = []

    def send(request: str, token: CancellationToken) -> str:
        times.append(time.monotonic())
        if request == "cancel":
            raise Cancel("give up")
        if len(times) == 1:
            raise Retry(delay=0.1)
        return "ok"

    rd = h.make(send, retry_on_error=lambda error: False)
    retried = rd.add("retry", queue_key="a", retry=1, retry_time=10)
    assert retried.future.result(5) == "ok"
    assert times[1] - times[0] >= 0.1 - 0.01
    cancelled = rd.add("cancel", queue_key="b", retry=5, retry_time=0)
    with pytest.raises(Cancel):
        cancelled.future.result(5)
    assert len(times) == 3


# -- pause / stop / start ------------------------------------------------------------------------------


def test_pause_applies_to_a_key_before_it_has_requests(h: Harness) -> None:
    """A key paused (or stopped) before any request holds the requests added later until start."""
    rd = h.make(lambda request, token: request)
    events = Recorder(rd, "queue_status")
    rd.pause("p")
    rd.stop("s")
    held = [rd.add("one", queue_key="p"), rd.add("two", queue_key="s")]
    assert [rd.get_request(handle.queue_key, handle.request_id).state for handle in held] == ["waiting"] * 2  # type: ignore[union-attr]
    assert rd.get_queue("p").status == "paused" and rd.get_queue("s").status == "stopped"
    assert sorted(rd.get_queue_keys()) == ["p", "s"]
    assert rd.flush_queue("p") == 0
    rd.start("p")
    rd.start("s")
    assert [handle.future.result(5) for handle in held] == ["one", "two"]
    assert [(e.queue_key, e.status) for e in events.of("queue_status")] == [
        ("p", "paused"),
        ("s", "stopped"),
        ("p", "started"),
        ("s", "started"),
    ]


def test_pause_lets_running_requests_finish_and_holds_the_rest(h: Harness) -> None:
    """Pause: the running request finishes and is delivered; a later one waits until start."""
    started = threading.Event()

    def send(request: str, token: CancellationToken) -> str:
        started.set()
        if request == "running":
            h.release.wait(10)
        return request

    rd = h.make(send)
    running = rd.add("running", queue_key="k")
    assert started.wait(5)
    rd.pause("k")
    waiting = rd.add("waiting", queue_key="k")
    h.release.set()
    assert running.future.result(5) == "running"
    assert rd.get_request("k", waiting.request_id).state == "waiting"  # type: ignore[union-attr]
    assert [r.request_id for r in rd.running_requests("k")] == []
    rd.start("k")
    assert waiting.future.result(5) == "waiting"


@pytest.mark.timeout(30)
def test_stop_cancels_running_requests_which_stay_queued_and_run_again_on_start(h: Harness) -> None:
    """Stop sets the running request's token and keeps it queued with a pending Future; start sends it again."""
    tokens: list[CancellationToken] = []
    returned = threading.Event()

    def send(request: str, token: CancellationToken) -> str:
        tokens.append(token)
        if len(tokens) == 1:
            token.wait(10)
            returned.set()
            token.raise_if_cancelled()
        return f"{request} on attempt {len(tokens)}"

    rd = h.make(send)
    events = Recorder(rd, "abort", "error", "response")
    handle = rd.add("req", queue_key="k")
    wait_for(lambda: tokens, message="first attempt started")
    rd.stop("k")
    assert tokens[0].cancelled
    with pytest.raises(CancelledError):
        tokens[0].raise_if_cancelled()
    assert not handle.future.done()
    assert rd.get_request("k", handle.request_id).state == "waiting"  # type: ignore[union-attr]
    assert len(events.of("abort")) == 1
    assert returned.wait(5)
    rd.start("k")
    assert handle.future.result(5) == "req on attempt 2"
    assert not tokens[1].cancelled
    assert events.names().count("error") == 0  # the aborted attempt's CancelledError is not a failure


@pytest.mark.timeout(30)
def test_stop_request_and_start_request_act_on_one_request(h: Harness) -> None:
    """stop_request cancels one running request (kept queued); others go on; start_request sends it again."""
    tokens: dict[str, list[CancellationToken]] = {"one": [], "two": []}

    def send(request: str, token: CancellationToken) -> str:
        tokens[request].append(token)
        if request == "one" and len(tokens["one"]) == 1:
            token.wait(10)
            token.raise_if_cancelled()
        return request

    rd = h.make(send)
    one = rd.add("one", queue_key="k")
    wait_for(lambda: tokens["one"], message="one started")
    assert rd.stop_request("k", one.request_id)
    assert tokens["one"][0].cancelled
    two = rd.add("two", queue_key="k")
    assert two.future.result(5) == "two"
    assert rd.get_request("k", one.request_id).state == "stopped"  # type: ignore[union-attr]
    assert not one.future.done()
    assert rd.start_request("k", one.request_id)
    assert one.future.result(5) == "one"
    assert len(tokens["one"]) == 2
    assert not rd.stop_request("k", "no-such-id")
    assert not rd.start_request("k", "no-such-id")


def test_delete_cancel_and_future_cancel_remove_the_request(h: Harness) -> None:
    """delete(), handle.cancel() and the holder's future.cancel() remove the request and cancel its Future."""
    tokens: list[CancellationToken] = []

    def send(request: str, token: CancellationToken) -> str:
        tokens.append(token)
        token.wait(10)
        return request

    rd = h.make(send)
    events = Recorder(rd, "remove", "abort")
    running = rd.add("running", queue_key="k")
    wait_for(lambda: tokens, message="running started")
    rd.pause("k")
    by_handle = rd.add("by handle", queue_key="k")
    by_future = rd.add("by future", queue_key="k")
    assert rd.delete("k", running.request_id)
    assert running.future.cancelled() and tokens[0].cancelled
    assert by_handle.cancel()
    assert by_future.future.cancel()
    assert by_handle.future.cancelled()
    assert rd.get_queue("k").requests == ()
    assert not rd.delete("k", running.request_id)
    assert [e.reason for e in events.of("remove")] == ["cancelled"] * 3
    assert len(events.of("abort")) == 3


def test_clear_queue_and_clear_cancel_everything_and_report_drained(h: Harness) -> None:
    """clear_queue empties one queue, clear every queue; Futures are cancelled and drained fires."""
    rd = h.make(lambda request, token: request)
    events = Recorder(rd, "drained")
    rd.pause("a")
    rd.pause("b")
    handles = [rd.add(i, queue_key=key) for key in ("a", "b") for i in range(3)]
    assert rd.clear_queue("a") == 3
    assert rd.get_queue("a").requests == () and len(rd.get_queue("b").requests) == 3
    assert rd.clear() == 3
    assert all(handle.future.cancelled() for handle in handles)
    assert [e.queue_key for e in events.of("drained")] == ["a", "b"]
    assert rd.get_queue("a").status == "paused"


# -- offline ---------------------------------------------------------------------------------------------


def test_offline_starts_nothing_and_online_flushes_every_queue(h: Harness) -> None:
    """While offline, added requests wait; set_online(True) sends every queue's requests."""
    rd = h.make(lambda request, token: request)
    rd.set_online(False)
    assert not rd.online
    handles = [rd.add(key, queue_key=key) for key in ("a", "b", "c")]
    assert {rd.get_request(x.queue_key, x.request_id).state for x in handles} == {"waiting"}  # type: ignore[union-attr]
    rd.set_online(True)
    assert [handle.future.result(5) for handle in handles] == ["a", "b", "c"]


@pytest.mark.timeout(30)
def test_failure_while_offline_stays_queued_until_online(h: Harness) -> None:
    """A request failing while offline with offline=True waits, uncounted; online again it is resent."""
    attempts = [0]
    started = threading.Event()

    def send(request: str, token: CancellationToken) -> str:
        attempts[0] += 1
        if attempts[0] == 1:
            started.set()
            h.release.wait(10)
            raise ConnectionError("network is down")
        return "delivered"

    rd = h.make(send)
    events = Recorder(rd, "error")
    handle = rd.add("r", queue_key="k", retry=0)
    assert started.wait(5)
    rd.set_online(False)
    h.release.set()
    wait_for(lambda: events.of("error"), message="the failure was reported")
    assert not events.of("error")[0].final
    assert not handle.future.done()
    assert rd.get_request("k", handle.request_id).state == "waiting"  # type: ignore[union-attr]
    rd.set_online(True)
    assert handle.future.result(5) == "delivered"
    assert attempts[0] == 2


def test_failure_while_offline_with_offline_false_follows_retry_rules(h: Harness) -> None:
    """With offline=False a failure while offline is an ordinary failure (here final: retry=0)."""
    started = threading.Event()

    def send(request: str, token: CancellationToken) -> str:
        started.set()
        h.release.wait(10)
        raise ConnectionError("network is down")

    rd = h.make(send)
    handle = rd.add("r", queue_key="k", offline=False)
    assert started.wait(5)
    rd.set_online(False)
    h.release.set()
    with pytest.raises(ConnectionError):
        handle.future.result(5)


# -- events ----------------------------------------------------------------------------------------------


def test_listeners_filter_by_queue_key_and_request_id_and_unsubscribe(h: Harness) -> None:
    """on(queue_key=) and on(request_id=) receive only their events; the returned function unsubscribes."""
    rd = h.make(lambda request, token: request)
    everything: list[object] = []
    only_a: list[object] = []
    only_id: list[object] = []
    mismatched: list[object] = []
    rd.on("response", lambda e: everything.append(e.response))
    rd.on("response", lambda e: only_a.append(e.response), queue_key="a")
    rd.pause("b")
    target = rd.add("b1", queue_key="b")
    rd.on("response", lambda e: only_id.append(e.response), request_id=target.request_id)
    rd.on("response", lambda e: mismatched.append(e.response), request_id=target.request_id, queue_key="a")
    rd.start("b")
    for handle in (rd.add("a1", queue_key="a"), rd.add("b2", queue_key="b"), target):
        handle.future.result(5)
    assert sorted(map(str, everything)) == ["a1", "b1", "b2"]
    assert only_a == ["a1"] and only_id == ["b1"] and mismatched == []
    unsubscribe = rd.on("response", lambda e: only_a.append("late"), queue_key="a")
    unsubscribe()
    unsubscribe()
    rd.add("a2", queue_key="a").future.result(5)
    assert only_a == ["a1", "a2"]


def test_listener_errors_are_contained(h: Harness) -> None:
    """A raising listener does not break delivery nor the other listeners."""
    rd = h.make(lambda request, token: request)
    seen: list[object] = []

    def broken(event: RequestEvent) -> None:
        raise RuntimeError("listener bug")

    rd.on("response", broken)
    rd.on("response", lambda e: seen.append(e.response))
    assert rd.add("x", queue_key="k").future.result(5) == "x"
    assert seen == ["x"]


def test_unknown_event_and_bad_listener_are_refused(h: Harness) -> None:
    """on() refuses an unknown event name and a non-callable listener, naming them."""
    rd = h.make(lambda request, token: None)
    with pytest.raises(ConfigurationError, match="finished"):
        rd.on("finished", lambda e: None)
    with pytest.raises(ConfigurationError, match="None"):
        rd.on("response", None)  # type: ignore[arg-type]


@pytest.mark.timeout(30)
def test_drained_fires_once_each_time_a_queue_empties(h: Harness) -> None:
    """drained fires once when the last request of a queue leaves it, and again the next time."""
    rd = h.make(lambda request, token: h.release.wait(10) and request)
    drained: list[str] = []
    rd.on("drained", lambda e: drained.append(e.queue_key), queue_key="k")
    for round_number in (1, 2):
        h.release.clear()
        handles = [rd.add(i, queue_key="k") for i in range(3)]
        h.release.set()
        for handle in handles:
            handle.future.result(5)
        assert drained == ["k"] * round_number


def test_queue_change_loading_and_snapshots(h: Harness) -> None:
    """queue_change reports the queue size; get_queue/get_request/running_requests show states and modes."""
    started = threading.Event()

    def send(request: str, token: CancellationToken) -> str:
        started.set()
        h.release.wait(10)
        return request

    rd = h.make(send)
    events = Recorder(rd, "queue_change", "loading")
    running = rd.add("run", queue_key="k", retry=2, retry_time=0.1)
    queued = rd.add("queued", queue_key="k", mode="queued")
    assert started.wait(5)
    snapshot = rd.get_queue("k")
    assert [(r.request_id, r.state, r.mode) for r in snapshot.requests] == [
        (running.request_id, "running", "concurrent"),
        (queued.request_id, "waiting", "queued"),
    ]
    assert snapshot.requests[0].retry == 2 and snapshot.requests[0].future is running.future
    assert [r.request_id for r in rd.running_requests()] == [running.request_id]
    assert rd.get_request("k", "missing") is None
    assert rd.get_queue("unknown").requests == () and rd.get_queue("unknown").status == "started"
    h.release.set()
    queued.future.result(5)
    assert [e.size for e in events.of("queue_change")] == [1, 2, 1, 0]
    assert [e.request_id for e in events.of("loading")] == [running.request_id, queued.request_id]
