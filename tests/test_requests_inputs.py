"""RequestDispatcher's per-request calls and bool arguments refuse a bad value at the call (ConfigurationError).

A queue key and a request id are non-empty str (``check_text``); a bool argument is
``True`` or ``False`` (``check_bool``: ``"no"``, ``0`` or ``None`` are refused, never read
as truthy). Each refusal names the argument and the bad value and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from threaddispatch import RequestDispatcher, RequestHandle
from threaddispatch._validate import check_bool, show
from threaddispatch.errors import ConfigurationError

KEY = "GET /report"

Rd = RequestDispatcher[dict[str, str], str]


@pytest.fixture
def paused() -> Iterator[tuple[Rd, RequestHandle[str]]]:
    """A dispatcher whose queue KEY is paused and holds one request."""
    rd: Rd = RequestDispatcher(lambda request, token: "ok")
    rd.pause(KEY)
    handle = rd.add({"endpoint": "/report"}, queue_key=KEY)
    try:
        yield rd, handle
    finally:
        rd.close(5.0)


# -- check_bool ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, False])
def test_check_bool_returns_a_bool(value: bool) -> None:
    """True and False pass through as themselves."""
    assert check_bool("flag", value) is value


@pytest.mark.parametrize(
    "value", ["no", "", 0, 1, None, 1.0, [], object()], ids=["no", "empty", "0", "1", "None", "1.0", "list", "object"]
)
def test_check_bool_refuses_anything_else_naming_it(value: object) -> None:
    """A truthy or falsy non-bool raises ConfigurationError naming the argument and the value."""
    with pytest.raises(ConfigurationError, match=r"flag must be a bool \(True or False\), got ") as caught:
        check_bool("flag", value)
    assert str(caught.value).endswith(show(value))


# -- queue keys and request ids --------------------------------------------------------------------

Call = Callable[[Rd, RequestHandle[str]], Any]

#: name -> (the call with a bad argument, the argument its message must name)
BAD_IDS: dict[str, tuple[Call, str]] = {
    "start_request(key, '')": (lambda rd, h: rd.start_request(KEY, ""), "request_id"),
    "stop_request(key, NUL)": (lambda rd, h: rd.stop_request(KEY, "a\x00b"), "request_id"),
    "delete(key, int)": (lambda rd, h: rd.delete(KEY, 1), "request_id"),  # type: ignore[arg-type]
    "delete(bytes, id)": (lambda rd, h: rd.delete(KEY.encode(), h.request_id), "queue_key"),  # type: ignore[arg-type]
    "get_request('', id)": (lambda rd, h: rd.get_request("", h.request_id), "queue_key"),
    "get_queue(None)": (lambda rd, h: rd.get_queue(None), "queue_key"),  # type: ignore[arg-type]
    "running_requests(1)": (lambda rd, h: rd.running_requests(1), "queue_key"),  # type: ignore[arg-type]
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", sorted(BAD_IDS))
def test_a_bad_key_or_id_is_refused_naming_the_argument(paused: tuple[Rd, RequestHandle[str]], name: str) -> None:
    """The call raises ConfigurationError naming the argument; the queued request is untouched."""
    rd, handle = paused
    call, argument = BAD_IDS[name]
    with pytest.raises(ConfigurationError, match=argument):
        call(rd, handle)
    assert [r.request_id for r in rd.get_queue(KEY)] == [handle.request_id]
    assert not handle.future.done()


@pytest.mark.timeout(30)
def test_passing_the_handle_for_its_id_says_which_id_to_pass(paused: tuple[Rd, RequestHandle[str]]) -> None:
    """delete(key, handle): the message names request_id and the handle's own id, the fix to make."""
    rd, handle = paused
    with pytest.raises(ConfigurationError, match="request_id") as caught:
        rd.delete(KEY, handle)  # type: ignore[arg-type]
    assert repr(handle.request_id) in str(caught.value)
    assert not handle.future.done()


@pytest.mark.timeout(30)
def test_the_right_ids_still_work(paused: tuple[Rd, RequestHandle[str]]) -> None:
    """With str arguments the calls answer as before: found, stopped, started, read, an unknown id is None."""
    rd, handle = paused
    request = rd.get_request(KEY, handle.request_id)
    assert request is not None and request.request_id == handle.request_id
    assert rd.get_request(KEY, "no-such-id") is None
    assert rd.stop_request(KEY, handle.request_id) is True
    assert rd.start_request(KEY, handle.request_id) is True
    assert rd.running_requests(KEY) == []
    assert rd.running_requests() == []
    assert rd.delete(KEY, handle.request_id) is True
    assert handle.future.cancelled()


# -- bool arguments --------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("value", ["no", 0, None], ids=repr)
def test_set_online_refuses_a_non_bool_and_keeps_the_state(
    paused: tuple[Rd, RequestHandle[str]], value: object
) -> None:
    """set_online("no") is not read as truthy: it raises, and the dispatcher stays as it was."""
    rd, _handle = paused
    rd.set_online(False)
    with pytest.raises(ConfigurationError, match="online must be a bool"):
        rd.set_online(value)  # type: ignore[arg-type]
    assert rd.online is False
    rd.set_online(True)
    with pytest.raises(ConfigurationError, match="online must be a bool"):
        rd.set_online(value)  # type: ignore[arg-type]
    assert rd.online is True


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argument", ["deduplicate", "offline"])
@pytest.mark.parametrize("value", ["no", 1, None], ids=repr)
def test_add_refuses_a_non_bool_flag_and_queues_nothing(
    paused: tuple[Rd, RequestHandle[str]], argument: str, value: object
) -> None:
    """add(deduplicate=/offline=) with a non-bool raises naming the argument; nothing is added."""
    rd, handle = paused
    added = rd.stats()["added"]
    options: dict[str, Any] = {argument: value}
    with pytest.raises(ConfigurationError, match=f"{argument} must be a bool"):
        rd.add({"endpoint": "/other"}, queue_key=KEY, **options)
    assert rd.stats()["added"] == added
    assert [r.request_id for r in rd.get_queue(KEY)] == [handle.request_id]


@pytest.mark.timeout(30)
def test_add_takes_bool_flags(paused: tuple[Rd, RequestHandle[str]]) -> None:
    """add(deduplicate=True, offline=False) is accepted and joins the ongoing request of the same dedupe key."""
    rd, handle = paused
    joined = rd.add({"endpoint": "/report"}, queue_key=KEY, deduplicate=True, offline=False)
    again = rd.add({"endpoint": "/report"}, queue_key=KEY, deduplicate=True, offline=True)
    assert again.request_id == joined.request_id
    assert {r.request_id for r in rd.get_queue(KEY)} == {handle.request_id, joined.request_id}


def test_constructor_and_stats_flags_use_the_same_check() -> None:
    """carry_context= and stats(per_key=) refuse a non-bool with the same message."""
    with pytest.raises(ConfigurationError, match=r"carry_context must be a bool \(True or False\)"):
        RequestDispatcher(lambda request, token: None, carry_context=1)  # type: ignore[arg-type]
    rd: RequestDispatcher[Any, None] = RequestDispatcher(lambda request, token: None)
    try:
        with pytest.raises(ConfigurationError, match=r"per_key must be a bool \(True or False\), got 'yes'"):
            rd.stats(per_key="yes")  # type: ignore[arg-type]
        assert "queue_depths" in rd.stats(per_key=True)
    finally:
        rd.close(5)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("value", ["", "a\x00b", "\ud800", ["k"], b"k", 1], ids=repr)
def test_add_refuses_a_bad_queue_key_while_other_queues_hold_requests(
    paused: tuple[Rd, RequestHandle[str]], value: object
) -> None:
    """The check skipped for a key already queued (it was checked then) still runs for any other value,
    unhashable ones included: ConfigurationError naming ``queue_key``, nothing added."""
    rd, _handle = paused
    added = rd.stats()["added"]
    with pytest.raises(ConfigurationError, match="queue_key must be"):
        rd.add({"endpoint": "/other"}, queue_key=value)  # type: ignore[arg-type]
    assert rd.stats()["added"] == added
    assert rd.add({"endpoint": "/again"}, queue_key=KEY).queue_key == KEY
