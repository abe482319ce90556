"""What ``JobEngine.enqueue`` builds before the store: job ids, payload JSON, and per-name plans.

One job a module: the record of a new job, cheaply. An enqueue without options (the common
call) costs a dict lookup, one JSON encoding, one id and one record: what does not change
between calls for one job name (its registration's queue, priority, retries, timeout and
serial lock rule, and how its payload is named in errors) is a :class:`JobPlan`, made when
the name is registered.

Job ids are the 32 hex digits of a UUIDv7 (RFC 9562): a 48-bit Unix time in milliseconds,
then 74 random bits seeded at each new millisecond and counted up within one, so the ids
of a process increase in the order they are made, whatever the clock does (a clock that
steps back keeps counting from the last id), and sort by creation time within a process.
Ids of different processes are unique (a forked child draws new random bits), but their
order across processes and machines is only as good as their clocks: not a contract.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

from threaddispatch import _lifecycle
from threaddispatch._job_config import JobDefinition
from threaddispatch._validate import check_text, show
from threaddispatch.errors import ConfigurationError, PayloadError
from threaddispatch.stores.base import DeadLetter, JobRecord, JobState

__all__ = ["MAX_DUE_AHEAD", "JobPlan", "LockRule", "encode_json", "new_job_id", "new_record", "replay_record"]

#: A registration's serial lock: a lock name, or a function of the payload giving one (or None).
LockRule = str | Callable[[Any], str | None]

_RANDOM_BITS = 74  # a UUIDv7's rand_a (12 bits) and rand_b (62 bits), counted as one number
_RANDOM_MASK = (1 << _RANDOM_BITS) - 1
_B_MASK = (1 << 62) - 1
_VERSION_AND_VARIANT = 0x7 << 76 | 0x2 << 62

_id_lock = threading.Lock()  # guards _last
_last = 0  # the last id made here as (milliseconds << 74 | counter); 0: none yet (or a new child)


def _renew_ids() -> None:
    """In a forked child: a lock no parent thread holds, and new random bits (the parent counts on from _last)."""
    global _id_lock, _last
    _id_lock = threading.Lock()
    _last = 0


_lifecycle.at_fork_child(_renew_ids)


def new_job_id() -> str:
    """A new job id: a UUIDv7 as 32 hex digits, greater than every id made before in this process."""
    global _last
    stamp = time.time_ns() // 1_000_000 << _RANDOM_BITS
    # Random bits only for a new millisecond (read without the lock: _last only grows, so a stale
    # read can only draw bits that go unused). The top bit stays 0: room to count up.
    seed = int.from_bytes(os.urandom(10), "big") >> 7 if stamp > _last else 0
    with _id_lock:
        value = _last = stamp | seed if stamp > _last else _last + 1
    milliseconds, counter = value >> _RANDOM_BITS, value & _RANDOM_MASK
    return f"{milliseconds << 80 | (counter >> 62) << 64 | counter & _B_MASK | _VERSION_AND_VARIANT:032x}"


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
# The same C encoder without the circular-reference markers, made once instead of per call. It
# writes the same text; on any error the call is encoded again by _ENCODER, for its exact error.
_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_FAST = (
    None
    if _c_make_encoder is None
    else _c_make_encoder(None, _ENCODER.default, json.encoder.encode_basestring_ascii, None, ":", ",",
                         False, False, False)
)  # fmt: skip


def encode_json(what: str, value: object, max_size: int) -> str:
    """``value`` as compact JSON text of at most ``max_size`` characters; PayloadError naming ``what`` otherwise."""
    try:
        text = "".join(_FAST(value, 0)) if _FAST is not None else _ENCODER.encode(value)
    except Exception:  # noqa: BLE001 - any failure: the reference encoder raises it again, in its own words
        text = _encode_or_explain(what, value)
    if len(text) > max_size:
        raise PayloadError(f"{what} is {len(text)} bytes of JSON, more than max_payload_size={max_size}")
    return text


def _encode_or_explain(what: str, value: object) -> str:
    try:
        return _ENCODER.encode(value)
    except (TypeError, ValueError) as error:
        raise PayloadError(f"{what} is not JSON-serialisable: {error}") from error
    except RecursionError:
        raise PayloadError(f"{what} is nested too deeply to encode as JSON") from None


class JobPlan:
    """What every enqueue of one registered job name shares: the registration's options and lock rule,
    and how a payload is named in errors. Immutable; made at registration, read without a lock."""

    __slots__ = ("definition", "lock_rule", "max_payload_size", "name", "what")

    def __init__(self, definition: JobDefinition, lock_rule: LockRule | None, max_payload_size: int) -> None:
        self.definition = definition
        self.name = definition.name
        self.lock_rule = lock_rule
        self.max_payload_size = max_payload_size
        self.what = f"payload of job {definition.name!r}"

    def lock_for(self, payload: object) -> str | None:
        """The serial lock the registration gives ``payload`` (None: none); ConfigurationError for a bad one."""
        rule = self.lock_rule
        if rule is None or isinstance(rule, str):
            return rule
        derived = rule(payload)  # user code: the caller holds no lock
        if derived is not None:
            check_text(f"lock of job {self.name!r} (from its lock function)", derived)
        return derived

    def encode(self, what: str, payload: object) -> str:
        """``payload`` as JSON text (``what`` names it in a PayloadError)."""
        return encode_json(what, payload, self.max_payload_size)


#: The furthest ahead, in seconds, a new job may be due (``enqueue(delay=)``/``run_at=``): 1e9 s,
#: about 31 years, the number ``MAX_WAIT`` is where a thread can wait that long. Not ``MAX_WAIT``
#: itself: no thread waits for a due time (the fetcher polls by ``max_poll_interval``), so a job due
#: in 90 days stays valid on Windows, where ``MAX_WAIT`` is ``threading.TIMEOUT_MAX`` (49.7 days).
#: A later due time (``delay=1e15``) could be stored, but no ``datetime`` holds it: refused at the call.
MAX_DUE_AHEAD = 1e9


def _too_far_ahead(name: str, run_at: float, now: float) -> NoReturn:
    raise ConfigurationError(
        f"a job may be due at most {MAX_DUE_AHEAD:.0f} seconds (about 31 years) from now; "
        f"delay/run_at made job {name!r} due {run_at - now:.6g} seconds from now (run_at={show(run_at)})"
    )


def new_record(  # noqa: PLR0917 - positional: once per job, on enqueue's hot path
    name: str,
    payload_text: str,
    queue: str,
    priority: int,
    max_retries: int,
    timeout: float | None,
    run_at: float,
    now: float,
    unique_key: str | None = None,
    trace_context: str | None = None,
    depends_on: tuple[str, ...] = (),
    on_dependency_failure: str = "cancel",
    lock: str | None = None,
) -> JobRecord:
    """The record of a new pending job: what enqueue, enqueue_many, cron ticks and replay store.

    ``trace_context``: the traceparent to store (the caller reads ``current_traceparent()`` once
    per call, or replay keeps the dead letter's). Built positionally, in JobRecord's field order.
    Raises ConfigurationError for a ``run_at`` more than :data:`MAX_DUE_AHEAD` seconds after ``now``.
    """
    # An addition and a compare, no call; ``now + delay`` is how enqueue makes run_at: delay=MAX_DUE_AHEAD passes.
    if run_at > now + MAX_DUE_AHEAD:
        _too_far_ahead(name, run_at, now)
    return JobRecord(
        new_job_id(), name, payload_text, queue, JobState.PENDING, priority, 0, max_retries, timeout, run_at,
        now, now, None, None, None, None, unique_key, None, None, trace_context, depends_on,
        on_dependency_failure, 0, lock,
    )  # fmt: skip


def replay_record(letter: DeadLetter, original: JobRecord | None, plan: JobPlan | None, now: float) -> JobRecord:
    """The new pending job of a dead letter's replay: the failed job again, as ``JobEngine.retry`` keeps it.

    Name, payload, queue, priority, max_retries and trace context come from ``letter``, and so
    do the serial ``lock``, ``unique_key``, ``depends_on``, ``on_dependency_failure`` and
    ``timeout`` the letter keeps (:class:`DeadLetter`). A letter stored before stores kept
    those (its ``on_dependency_failure`` None) takes them from the failed job's record
    ``original`` while it is stored; once that was purged, the lock is the one ``plan`` (this
    engine's registration of the name, None without one) gives the payload, and there is no
    unique key and no dependency. ``timeout``: the registration's when there is one (as a fresh
    enqueue's). Calls the registration's lock function (user code): the caller holds no lock.
    """
    kept: DeadLetter | JobRecord | None = letter if letter.on_dependency_failure is not None else original
    if kept is not None:
        lock, unique_key, timeout = kept.lock, kept.unique_key, kept.timeout
        depends_on, policy = kept.depends_on, kept.on_dependency_failure or "cancel"
    else:
        lock = None if plan is None else plan.lock_for(_letter_payload(letter))
        unique_key, timeout, depends_on, policy = None, None, (), "cancel"
    if plan is not None:
        timeout = plan.definition.timeout  # the registration's as it is now, as a fresh enqueue's
    return new_record(
        letter.name, letter.payload, letter.queue, letter.priority, letter.max_retries, timeout, now, now,
        unique_key, letter.trace_context, depends_on, policy, lock,
    )  # fmt: skip


def _letter_payload(letter: DeadLetter) -> object:
    """``letter``'s payload decoded (for its registration's lock function); PayloadError if its text is not JSON."""
    try:
        return json.loads(letter.payload)
    except ValueError as error:
        raise PayloadError(f"payload of dead letter {letter.id!r} is not JSON: {error}") from None
