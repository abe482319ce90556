"""Every check JobEngine.enqueue makes: the same exception type and the same message, raised at the call,
from enqueue, a handle's enqueue, enqueue_many and chain alike, with nothing stored.

The messages are spelled out in full: enqueue's fast path (a per-name plan, options skipped
when not given) must refuse exactly what the general path refuses, in the same order.
"""

from __future__ import annotations

import datetime
import enum
import json
import math
from collections.abc import Callable
from typing import Any

import pytest

from threaddispatch.errors import ConfigurationError, PayloadError
from threaddispatch.jobs import JobEngine
from threaddispatch.stores import MemoryStore
from threaddispatch.stores.base import JobRecord

_NAME = "job name must be a non-empty str without NUL characters, got "
_QUEUE = "queue must be a non-empty str without NUL characters or surrounding spaces, got "
_PRIORITY = "priority must be an int from -9223372036854775807 to 9223372036854775807, got "
_RETRIES = "max_retries must be an int from 0 to 9223372036854775806, got "
_DEPENDS = "depends_on must be a list of job ids (non-empty strings), got "
_RUN_AT = "run_at must be an aware datetime or finite epoch seconds, got "
_LOCK_FN = "lock of job 'locked' (from its lock function) must be a non-empty str without NUL characters, got "
_JSON = "{what} is not JSON-serialisable: "


def _stdlib(value: object) -> str:
    """What the standard JSON encoder says of ``value`` on this Python (3.12 added the value to some)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as error:
        return str(error)
    raise AssertionError(f"{value!r} encodes")


def _circular() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


def _deep() -> Any:
    nested: Any = None
    for _ in range(100_000):
        nested = [nested]
    return nested


def _no_lock(payload: object) -> None:
    raise KeyError("no lock here")


#: (case, job name, payload, enqueue keywords, exception type, message; {what} names the payload)
CASES: list[tuple[str, Any, Any, dict[str, Any], type[Exception], str]] = [
    ("name int", 42, None, {}, ConfigurationError, _NAME + "42"),
    ("name empty", "", None, {}, ConfigurationError, _NAME + "''"),
    ("name NUL", "a\x00", None, {}, ConfigurationError, _NAME + "'a\\x00'"),
    ("name list", ["work"], None, {}, ConfigurationError, _NAME + "['work']"),
    ("name unknown", "nope", None, {}, ConfigurationError,
     "unknown job name 'nope': register it first (registered: boom, locked, work)"),
    ("queue empty", "work", None, {"queue": ""}, ConfigurationError, _QUEUE + "''"),
    ("queue spaces", "work", None, {"queue": " q "}, ConfigurationError, _QUEUE + "' q '"),
    ("queue int", "work", None, {"queue": 5}, ConfigurationError, _QUEUE + "5"),
    ("priority str", "work", None, {"priority": "high"}, ConfigurationError, _PRIORITY + "'high'"),
    ("priority bool", "work", None, {"priority": True}, ConfigurationError, _PRIORITY + "True"),
    ("priority huge", "work", None, {"priority": 2**63}, ConfigurationError, _PRIORITY + "9223372036854775808"),
    ("max_retries negative", "work", None, {"max_retries": -1}, ConfigurationError, _RETRIES + "-1"),
    ("max_retries float", "work", None, {"max_retries": 1.5}, ConfigurationError, _RETRIES + "1.5"),
    ("unique_key empty", "work", None, {"unique_key": ""}, ConfigurationError,
     "unique_key must be a non-empty str without NUL characters, got ''"),
    ("unique_key int", "work", None, {"unique_key": 7}, ConfigurationError,
     "unique_key must be a non-empty str without NUL characters, got 7"),
    ("depends_on str", "work", None, {"depends_on": "abc"}, ConfigurationError, _DEPENDS + "'abc'"),
    ("depends_on empty id", "work", None, {"depends_on": [""]}, ConfigurationError, _DEPENDS + "['']"),
    ("depends_on int id", "work", None, {"depends_on": [1]}, ConfigurationError, _DEPENDS + "[1]"),
    ("policy unknown", "work", None, {"on_dependency_failure": "ignore"}, ConfigurationError,
     "on_dependency_failure must be 'cancel' or 'run', got 'ignore'"),
    ("policy None", "work", None, {"on_dependency_failure": None}, ConfigurationError,
     "on_dependency_failure must be 'cancel' or 'run', got None"),
    ("lock empty", "work", None, {"lock": ""}, ConfigurationError,
     "lock must be a non-empty str without NUL characters, got ''"),
    ("lock int", "work", None, {"lock": 3}, ConfigurationError,
     "lock must be a non-empty str without NUL characters, got 3"),
    ("lock function gives ''", "locked", {"lock": ""}, {}, ConfigurationError, _LOCK_FN + "''"),
    ("lock function gives int", "locked", 5, {}, ConfigurationError, _LOCK_FN + "5"),
    ("lock function raises", "boom", 1, {}, KeyError, "'no lock here'"),
    ("run_at and delay", "work", None, {"run_at": 1.0, "delay": 1.0}, ConfigurationError,
     "give run_at or delay, not both (run_at=1.0, delay=1.0)"),
    ("run_at naive", "work", None, {"run_at": datetime.datetime(2030, 1, 1)}, ConfigurationError,
     "run_at must be timezone-aware, got naive datetime.datetime(2030, 1, 1, 0, 0)"),
    ("run_at str", "work", None, {"run_at": "tomorrow"}, ConfigurationError, _RUN_AT + "'tomorrow'"),
    ("run_at nan", "work", None, {"run_at": math.nan}, ConfigurationError, _RUN_AT + "nan"),
    ("run_at inf", "work", None, {"run_at": math.inf}, ConfigurationError, _RUN_AT + "inf"),
    ("run_at bool", "work", None, {"run_at": True}, ConfigurationError, _RUN_AT + "True"),
    ("run_at huge int", "work", None, {"run_at": 10**400}, ConfigurationError, _RUN_AT + "<int of 1329 bits>"),
    ("delay negative", "work", None, {"delay": -1}, ConfigurationError, "delay must be a finite number >= 0, got -1"),
    ("delay str", "work", None, {"delay": "1s"}, ConfigurationError, "delay must be a number of seconds, got '1s'"),
    ("delay nan", "work", None, {"delay": math.nan}, ConfigurationError, "delay must be a finite number >= 0, got nan"),
    ("payload set", "work", {1, 2}, {}, PayloadError, _JSON + _stdlib({1, 2})),
    ("payload nan", "work", math.nan, {}, PayloadError, _JSON + _stdlib(math.nan)),
    ("payload circular", "work", _circular(), {}, PayloadError, _JSON + "Circular reference detected"),
    ("payload deep", "work", _deep(), {}, PayloadError, "{what} is nested too deeply to encode as JSON"),
    ("payload too large", "work", "x" * 300, {}, PayloadError,
     "{what} is 302 bytes of JSON, more than max_payload_size=256"),
    ("payload key tuple", "work", {(1, 2): 3}, {}, PayloadError,
     _JSON + _stdlib({(1, 2): 3})),
    # Several bad values: the first check in enqueue's order names its own.
    ("queue before priority", "work", None, {"queue": "", "priority": "x"}, ConfigurationError, _QUEUE + "''"),
    ("name before queue", "nope", None, {"queue": ""}, ConfigurationError,
     "unknown job name 'nope': register it first (registered: boom, locked, work)"),
    ("lock before payload", "work", {1}, {"lock": ""}, ConfigurationError,
     "lock must be a non-empty str without NUL characters, got ''"),
    ("run_at and delay before payload", "work", {1}, {"run_at": 1.0, "delay": 2.0}, ConfigurationError,
     "give run_at or delay, not both (run_at=1.0, delay=2.0)"),
    ("lock function before payload", "locked", {"lock": "", "bad": {1}}, {}, ConfigurationError, _LOCK_FN + "''"),
]  # fmt: skip


def _engine() -> JobEngine:
    engine = JobEngine(MemoryStore(), max_payload_size=256)
    engine.register("work", lambda ctx, payload: None)
    engine.register("locked", lambda ctx, payload: None, lock=lambda p: p.get("lock") if isinstance(p, dict) else p)
    engine.register("boom", lambda ctx, payload: None, lock=_no_lock)
    return engine


def _enqueue(engine: JobEngine, name: Any, payload: Any, options: dict[str, Any]) -> None:
    engine.enqueue(name, payload, **options)


def _handle(engine: JobEngine, name: Any, payload: Any, options: dict[str, Any]) -> None:
    definition = engine.definitions()[name]
    handle = engine.job(name, queue=definition.queue, lock=engine._lock_rules.get(name))(definition.fn)
    handle.enqueue(payload, **options)


def _many(engine: JobEngine, name: Any, payload: Any, options: dict[str, Any]) -> None:
    engine.enqueue_many(name, [None, payload], **options)


def _chain(engine: JobEngine, name: Any, payload: Any, options: dict[str, Any]) -> None:
    engine.chain(engine.job_spec("work", None), engine.job_spec(name, payload, **options))


FACES: dict[str, Callable[[JobEngine, Any, Any, dict[str, Any]], None]] = {
    "enqueue": _enqueue,
    "handle": _handle,
    "enqueue_many": _many,
    "chain": _chain,
}


def _applies(face: str, name: Any, options: dict[str, Any]) -> bool:
    """Whether a case can be made through ``face``: a handle's name is its registration's;
    ``enqueue_many`` and a chain step take no ``unique_key``."""
    if face == "handle":
        return isinstance(name, str) and name in ("work", "locked", "boom")
    return face == "enqueue" or "unique_key" not in options


APPLICABLE = [
    pytest.param(face, *case, id=f"{case[0]}-{face}")
    for case in CASES
    for face in FACES
    if _applies(face, case[1], case[3])
]


@pytest.mark.parametrize(("face", "case", "name", "payload", "options", "kind", "message"), APPLICABLE)
def test_every_enqueue_check_raises_its_own_error_and_stores_nothing(
    face: str, case: str, name: Any, payload: Any, options: dict[str, Any], kind: type[Exception], message: str
) -> None:
    engine = _engine()
    what = {"enqueue": "payload of job {!r}", "handle": "payload of job {!r}", "enqueue_many": "payload #1 of job {!r}",
            "chain": "payload of chain step #1 (job {!r})"}[face].format(name)  # fmt: skip
    with pytest.raises(kind) as caught:
        FACES[face](engine, name, payload, options)
    assert type(caught.value) is kind
    assert str(caught.value) == message.format(what=what)
    assert sum(engine.counts().values()) == 0


@pytest.mark.parametrize("face", ["enqueue", "handle", "enqueue_many"])
def test_the_same_call_with_good_values_is_stored(face: str) -> None:
    engine = _engine()
    FACES[face](engine, "work", {"ok": 1}, {"queue": "q", "priority": 2, "max_retries": 0, "delay": 0})
    assert engine.counts(queue="q")["pending"] == (2 if face == "enqueue_many" else 1)


def test_registering_a_name_again_changes_what_the_next_enqueue_stores() -> None:
    engine = JobEngine(MemoryStore())
    engine.register("work", lambda ctx, payload: None)
    first = engine.get_job(engine.enqueue("work", 1))
    engine.register("work", lambda ctx, payload: None, queue="q", priority=5, max_retries=0, timeout=None, lock="L")
    second = engine.get_job(engine.enqueue("work", 1))
    engine.register("work", lambda ctx, payload: None, lock=lambda payload: f"user:{payload}")
    third = engine.get_job(engine.enqueue("work", 7))
    assert (first.queue, first.priority, first.max_retries, first.timeout, first.lock) == ("default", 0, 3, 300.0, None)
    assert (second.queue, second.priority, second.max_retries, second.timeout, second.lock) == ("q", 5, 0, None, "L")
    assert (third.queue, third.lock) == ("default", "user:7")


def test_the_record_of_a_plain_enqueue_is_the_one_the_general_path_builds() -> None:
    """Every JobRecord field as enqueue without options stores it, and with its options spelled out."""
    engine = JobEngine(MemoryStore())
    engine.register("work", lambda ctx, payload: None, queue="q", priority=2, max_retries=1, timeout=9.0, lock="L")
    plain = engine.get_job(engine.enqueue("work", {"a": [1, 2.5, None, "é"]}))
    spelled = engine.get_job(engine.enqueue(
        "work", {"a": [1, 2.5, None, "é"]}, queue="q", priority=2, max_retries=1, lock="L", depends_on=[],
        on_dependency_failure="cancel",
    ))  # fmt: skip
    assert plain.payload == spelled.payload == '{"a":[1,2.5,null,"\\u00e9"]}'
    differ = {"id", "run_at", "created_at", "updated_at"}
    assert {k: v for k, v in vars(plain).items() if k not in differ} == {
        k: v for k, v in vars(spelled).items() if k not in differ
    }
    assert plain.run_at == plain.created_at == plain.updated_at
    assert vars(plain).keys() == vars(JobRecord(id="x", name="work", payload="null")).keys()


class _Level(enum.IntEnum):
    HIGH = 3


class _Text(str):
    pass


@pytest.mark.parametrize(
    "payload",
    [None, True, 0, -1, 2**70, 1.5, 1e300, -0.0, "", "é\u2028\n\"\\", _Text("sub"), _Level.HIGH, [], (), [1, (2, 3)],
     {}, {"b": 1, "a": [None]}, {1: "int key", 2.5: "float key", False: "bool key", None: "none key"}],
)  # fmt: skip
def test_a_payload_is_stored_as_the_json_module_writes_it(payload: object) -> None:
    engine = _engine()
    stored = engine.get_job(engine.enqueue("work", payload)).payload
    assert stored == json.dumps(payload, separators=(",", ":"), allow_nan=False)
