"""RequestDispatcher: progress events, the connectivity hook (is_online / offline_on), iterable queue snapshots."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from threaddispatch.errors import ConfigurationError
from threaddispatch.requests import CancellationToken, RequestDispatcher, RequestEvent
from threaddispatch.testing import live_dispatch_threads, wait_for

pytestmark = pytest.mark.timeout(30)


class Made:
    """Makes dispatchers and closes them after the test."""

    def __init__(self) -> None:
        self.made: list[RequestDispatcher[Any, Any]] = []
        self.release = threading.Event()

    def __call__(self, send: Any, **options: Any) -> RequestDispatcher[Any, Any]:
        dispatcher: RequestDispatcher[Any, Any] = RequestDispatcher(send, **options)
        self.made.append(dispatcher)
        return dispatcher


@pytest.fixture
def make() -> Iterator[Made]:
    made = Made()
    yield made
    made.release.set()
    for dispatcher in made.made:
        dispatcher.close(5)


def collect(rd: RequestDispatcher[Any, Any], event: str, **filters: Any) -> list[RequestEvent]:
    seen: list[RequestEvent] = []
    rd.on(event, seen.append, **filters)
    return seen


# -- get_queue snapshots ---------------------------------------------------------------------------


def test_queue_snapshot_iterates_over_its_requests_and_keeps_its_attributes(make: Made) -> None:
    """get_queue() is iterable (requests in order), has a length, and keeps queue_key/status/requests."""
    rd = make(lambda request, token: request)
    rd.pause("k")
    handles = [rd.add(i, queue_key="k") for i in range(3)]
    snapshot = rd.get_queue("k")
    assert [r.request_id for r in snapshot] == [h.request_id for h in handles]
    assert len(snapshot) == 3 and list(snapshot) == list(snapshot.requests)
    assert snapshot.queue_key == "k" and snapshot.status == "paused"
    assert list(rd.get_queue("unknown")) == [] and len(rd.get_queue("unknown")) == 0


# -- progress --------------------------------------------------------------------------------------


def test_send_reports_progress_to_listeners_by_key_and_by_request_id(make: Made) -> None:
    """token.progress() emits upload_progress/download_progress with loaded/total, to key and id listeners."""

    def send(request: Any, token: CancellationToken) -> str:
        token.progress(10, 100, direction="upload")
        token.progress(100, 100, direction="upload")
        token.progress(5, None)  # download by default; total unknown
        return "ok"

    rd = make(send)
    rd.pause("k")
    handle = rd.add("x", queue_key="k")
    other = rd.add("y", queue_key="other")
    every = collect(rd, "download_progress")
    by_key = collect(rd, "upload_progress", queue_key="k")
    by_id = collect(rd, "download_progress", request_id=handle.request_id)
    rd.start("k")
    assert handle.future.result(5) == "ok" and other.future.result(5) == "ok"
    assert [(e.loaded, e.total) for e in by_key] == [(10, 100), (100, 100)]
    assert all(e.request_id == handle.request_id and e.attempt == 1 for e in by_key)
    assert [(e.request_id, e.loaded, e.total) for e in by_id] == [(handle.request_id, 5, None)]
    assert sorted(e.queue_key for e in every) == ["k", "other"]


def test_progress_after_cancellation_is_dropped_and_bad_values_are_refused(make: Made) -> None:
    """A stopped attempt's progress is not reported; bad loaded/total/direction raise ConfigurationError."""
    errors: list[BaseException] = []
    stopped = threading.Event()

    def send(request: Any, token: CancellationToken) -> str:
        for bad in ({"loaded": -1}, {"loaded": 1, "total": -5}, {"loaded": 1, "direction": "sideways"}):
            try:
                token.progress(**bad)
            except ConfigurationError as error:
                errors.append(error)
        stopped.wait(5)
        token.progress(1, 2)
        return "late"

    rd = make(send)
    seen = collect(rd, "download_progress")
    handle = rd.add("x", queue_key="k")
    wait_for(lambda: len(errors) == 3, timeout=5)
    rd.stop_request("k", handle.request_id)
    stopped.set()
    wait_for(lambda: not rd.running_requests("k") and rd.get_request("k", handle.request_id) is not None, timeout=5)
    assert "sideways" in str(errors[2]) and "-1" in str(errors[0]) and "-5" in str(errors[1])
    rd.delete("k", handle.request_id)
    assert seen == []
    CancellationToken().progress(1, 2)  # a token of no dispatcher: nothing to report to


# -- connectivity hook ------------------------------------------------------------------------------


class Network:
    """A probe the tests switch; ``polled`` is set on every poll."""

    def __init__(self) -> None:
        self.up = True
        self.polls = 0
        self.lock = threading.Lock()

    def __call__(self) -> bool:
        with self.lock:
            self.polls += 1
            return self.up

    def polled(self) -> int:
        with self.lock:
            return self.polls


def test_is_online_probe_takes_the_dispatcher_offline_and_back(make: Made) -> None:
    """The probe, polled on the timer thread, flips online; queued requests wait offline and run once it is back."""
    net = Network()
    net.up = False
    rd = make(lambda request, token: request, is_online=net, online_check_interval=0.01)
    wait_for(lambda: not rd.online, timeout=5)
    assert any(t.name == "threaddispatch-requests-timer" for t in live_dispatch_threads())
    handle = rd.add("x", queue_key="k")
    polls = net.polled()
    wait_for(lambda: net.polled() >= polls + 2, timeout=5)
    assert not handle.future.done()  # offline: held
    net.up = True
    assert handle.future.result(5) == "x"
    assert rd.online


def test_offline_on_error_flips_offline_until_the_probe_says_online(make: Made) -> None:
    """A send failing with an offline_on error takes the dispatcher offline; the request waits and is resent."""
    net = Network()
    attempts: list[int] = []

    def send(request: Any, token: CancellationToken) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            net.up = False
            raise ConnectionError("no route")
        return "answered"

    rd = make(send, is_online=net, online_check_interval=0.01, offline_on=(ConnectionError,))
    errors = collect(rd, "error")
    handle = rd.add("x", queue_key="k")
    wait_for(lambda: len(errors) == 1, timeout=5)
    assert errors[0].final is False and isinstance(errors[0].error, ConnectionError)
    assert not rd.online or handle.future.done()
    net.up = True
    assert handle.future.result(5) == "answered"
    assert len(attempts) == 2 and rd.online


def test_offline_on_without_a_probe_waits_for_set_online(make: Made) -> None:
    """Without is_online, an offline_on failure keeps the dispatcher offline until set_online(True)."""
    calls: list[int] = []

    def send(request: Any, token: CancellationToken) -> str:
        calls.append(1)
        if len(calls) == 1:
            raise TimeoutError("slow link")
        return "ok"

    rd = make(send, offline_on=(TimeoutError,))
    handle = rd.add("x", queue_key="k")
    wait_for(lambda: not rd.online, timeout=5)
    assert not handle.future.done() and rd.get_request("k", handle.request_id) is not None
    rd.set_online(True)
    assert handle.future.result(5) == "ok"


def test_a_failing_probe_is_logged_and_changes_nothing(make: Made, caplog: pytest.LogCaptureFixture) -> None:
    """A probe that raises is logged; the dispatcher keeps its state and keeps polling."""
    polls: list[int] = []

    def probe() -> bool:
        polls.append(1)
        raise OSError("probe broke")

    rd = make(lambda request, token: request, is_online=probe, online_check_interval=0.01)
    wait_for(lambda: len(polls) >= 3, timeout=5)
    assert rd.online
    assert "is_online raised" in caplog.text


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"is_online": "yes"}, "is_online"),
        ({"is_online": bool, "online_check_interval": 0}, "online_check_interval"),
        ({"offline_on": ConnectionError}, "offline_on"),
        ({"offline_on": (ConnectionError, "x")}, "offline_on"),
    ],
)
def test_bad_connectivity_options_are_refused(options: dict[str, Any], named: str) -> None:
    """Bad is_online / online_check_interval / offline_on raise ConfigurationError naming the option."""
    with pytest.raises(ConfigurationError, match=named):
        RequestDispatcher(lambda request, token: request, **options)


def test_probe_timer_leaves_at_close() -> None:
    """The polling timer thread is gone after close()."""
    rd: RequestDispatcher[Any, Any] = RequestDispatcher(lambda r, t: r, is_online=lambda: True, online_check_interval=5)
    wait_for(lambda: any(t.name == "threaddispatch-requests-timer" for t in live_dispatch_threads()), timeout=5)
    assert rd.close(5)
    assert not [t for t in live_dispatch_threads() if t.name == "threaddispatch-requests-timer"]
