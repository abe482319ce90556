"""Constructor (and timeout) checks of BackgroundDispatcher, BatchedDispatcher, AsyncDispatcher and
RequestDispatcher: a bad value raises ConfigurationError at the call, naming it.

Found by this pass: an ``ms_delay`` int past float range raised OverflowError; a ``name`` with NUL
was refused as "component"; a ``spool`` path with NUL or a lone surrogate raised ValueError or
UnicodeEncodeError; a ``send_timeout``/``dispatch_timeout``/``online_check_interval`` past what a
thread can wait (``1e308``) was accepted, then raised OverflowError in a worker thread (the batch
failed, the dispatch loop died, the probe thread died); ``flush``/``dispatch``/``put`` with such a
timeout raised OverflowError.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from threaddispatch import AsyncDispatcher, BackgroundDispatcher, BatchedDispatcher, RequestDispatcher
from threaddispatch._validate import MAX_WAIT
from threaddispatch.errors import ConfigurationError
from threaddispatch.testing import RecordingDispatcher

pytestmark = pytest.mark.timeout(60)

HUGE_WAITS = [1e308, 10**12, MAX_WAIT * 2]

Make = Callable[..., Any]


def _background(**options: Any) -> BackgroundDispatcher[Any]:
    return BackgroundDispatcher(lambda batch: None, **options)


def _batched(**options: Any) -> BatchedDispatcher[Any]:
    return BatchedDispatcher(lambda target, messages: ["id"] * len(messages), **options)


def _async(**options: Any) -> AsyncDispatcher[Any]:
    return AsyncDispatcher(RecordingDispatcher(), "orders", **options)


def _requests(**options: Any) -> RequestDispatcher[Any, Any]:
    return RequestDispatcher(lambda request, token: request, queue_key=lambda request: "k", **options)


FACES: dict[str, Make] = {"background": _background, "batched": _batched, "async": _async, "requests": _requests}


@pytest.fixture
def made() -> Iterator[list[Any]]:
    """What a test built; each is closed after it (a check that failed to raise leaves no thread)."""
    built: list[Any] = []
    yield built
    for face in built:
        face.close(5)


def _refused(made: list[Any], make: Make, name: str, value: object, shown: str) -> None:
    """``make(name=value)`` raises ConfigurationError whose message names ``name`` and shows ``shown``."""
    with pytest.raises(ConfigurationError) as raised:
        made.append(make(**{name: value}))
    message = str(raised.value)
    assert name in message and shown in message, message


@pytest.mark.parametrize(
    ("face", "name"),
    [
        ("background", "max_batch_size"),
        ("background", "max_queue_size"),
        ("batched", "max_batch_size"),
        ("batched", "max_concurrent_sends"),
        ("async", "max_in_flight"),
        ("async", "max_failures_pending"),
    ],
)
@pytest.mark.parametrize(("value", "shown"), [(True, "True"), (0, "0"), (-1, "-1"), (2.0, "2.0"), ("8", "'8'")])
def test_a_size_that_is_a_bool_not_positive_or_not_an_int_is_refused(
    made: list[Any], face: str, name: str, value: object, shown: str
) -> None:
    """Sizes are ints >= 1: True (an int subclass), 0, negatives, floats and strings raise naming the value."""
    _refused(made, FACES[face], name, value, shown)


@pytest.mark.parametrize(
    ("value", "shown"),
    [(10**400, "int of 1329 bits"), (math.nan, "nan"), (math.inf, "inf"), (0, "0"), (-5, "-5"), (True, "True")],
    ids=["int-past-float", "nan", "inf", "zero", "negative", "bool"],
)
def test_ms_delay_past_float_range_or_not_finite_positive_is_refused(
    made: list[Any], value: object, shown: str
) -> None:
    """ms_delay: an int past float range is a ConfigurationError (it was an OverflowError), as NaN, inf, 0."""
    _refused(made, _background, "ms_delay", value, shown)


@pytest.mark.parametrize(
    ("face", "name"),
    [
        ("background", "send_timeout"),
        ("batched", "send_timeout"),
        ("async", "dispatch_timeout"),
        ("requests", "online_check_interval"),
    ],
)
@pytest.mark.parametrize("value", HUGE_WAITS, ids=["1e308", "1e12", "twice-MAX_WAIT"])
def test_a_timeout_longer_than_a_thread_can_wait_is_refused_at_the_call(
    made: list[Any], face: str, name: str, value: float
) -> None:
    """A timeout or interval past MAX_WAIT raises at construction (it raised OverflowError in a worker)."""
    _refused(made, FACES[face], name, value, "at most")


@pytest.mark.parametrize(
    ("face", "name"),
    [("background", "send_timeout"), ("batched", "send_timeout"), ("async", "dispatch_timeout")],
)
@pytest.mark.parametrize(("value", "shown"), [(math.nan, "nan"), (-1.0, "-1.0"), (0, "0"), (True, "True")])
def test_a_timeout_that_is_not_a_finite_positive_number_is_refused(
    made: list[Any], face: str, name: str, value: object, shown: str
) -> None:
    """Per-call timeouts are finite seconds > 0."""
    _refused(made, FACES[face], name, value, shown)


def test_online_check_interval_is_checked_without_is_online_too(made: list[Any]) -> None:
    """A bad online_check_interval raises even when no is_online probe uses it."""
    _refused(made, _requests, "online_check_interval", -1.0, "-1.0")


@pytest.mark.timeout(60)
def test_a_timeout_of_max_wait_is_accepted_and_works(made: list[Any]) -> None:
    """The bound itself is a usable timeout: a send under send_timeout=MAX_WAIT is delivered."""
    sent: list[list[int]] = []
    dispatcher = BackgroundDispatcher(sent.append, ms_delay=1, send_timeout=MAX_WAIT)
    made.append(dispatcher)
    future = dispatcher.submit(7)
    assert dispatcher.flush(10)
    assert future.result(10) is None and sent == [[7]]


@pytest.mark.parametrize("face", ["background", "batched"])
@pytest.mark.parametrize(
    ("value", "shown"),
    [("a\x00b", r"'a\x00b'"), ("\ud800", r"'\ud800'"), ("", "''")],
    ids=["nul", "surrogate", "empty"],
)
def test_a_bad_name_is_refused_as_name(made: list[Any], face: str, value: str, shown: str) -> None:
    """A name with NUL or a lone surrogate raises naming ``name`` (it was refused as "component")."""
    _refused(made, FACES[face], "name", value, shown)


@pytest.mark.parametrize("face", ["background", "async"])
@pytest.mark.parametrize(
    ("value", "shown"),
    [("jobs\x00.db", r"'jobs\x00.db'"), ("\ud800.db", r"'\ud800.db'"), (b"spool.db", "b'spool.db'"), (5, "5")],
    ids=["nul", "surrogate", "bytes", "int"],
)
def test_a_bad_spool_path_is_refused_naming_it(made: list[Any], face: str, value: object, shown: str) -> None:
    """A spool path with NUL or a lone surrogate, or not a str: ConfigurationError (not ValueError, UnicodeError)."""
    _refused(made, FACES[face], "spool", value, shown)


def test_a_good_spool_path_still_opens(made: list[Any], tmp_path: Path) -> None:
    """A pathlib.Path spool passes the check and opens."""
    dispatcher = _background(spool=tmp_path / "spool.db", ms_delay=1)
    made.append(dispatcher)
    assert dispatcher.flush(10)


@pytest.mark.parametrize("value", HUGE_WAITS, ids=["1e308", "1e12", "twice-MAX_WAIT"])
def test_a_call_timeout_longer_than_a_thread_can_wait_raises_configuration_error(made: list[Any], value: float) -> None:
    """flush/dispatch/put with a timeout past MAX_WAIT raise ConfigurationError naming it (were OverflowError)."""
    background = _background(ms_delay=1)
    batched = _batched()
    async_ = _async()
    made.extend([background, batched, async_])
    sender = async_.setup(4)
    calls: list[Callable[[], object]] = [
        lambda: background.flush(value),
        lambda: batched.flush(value),
        lambda: batched.dispatch("m", "q", timeout=value),
        lambda: sender.put("m", value),
    ]
    for call in calls:
        with pytest.raises(ConfigurationError, match="timeout must be at most"):
            call()
