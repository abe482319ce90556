"""The JobEngine's duration settings past MAX_WAIT: refused at configuration, naming the value.

Every duration of :class:`threaddispatch.jobs.Config` is waited on or subtracted from the
clock by a worker thread (``poll_interval``, ``max_poll_interval``, ``heartbeat_interval``,
``stale_job_threshold``, ``shutdown_timeout``), so each follows the one bound of every wait,
:data:`~threaddispatch._validate.MAX_WAIT` (:func:`~threaddispatch._validate.check_wait`).
``retention`` is never waited for (only ``time.time() - retention``, a cutoff the stores compare
as a double), so any finite value stays valid: a 90-day retention on Windows, where MAX_WAIT is
``threading.TIMEOUT_MAX`` (49.7 days), must not be refused.

Found: ``stale_job_threshold=1e300`` was accepted; the cron thread then died of OverflowError
("timestamp out of range for platform time_t") waiting for it; ``heartbeat_interval=1e299``
killed the heartbeat thread the same way, ``poll_interval=1e300`` the fetcher (after logging
"it claims again in 1e+300s").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from threaddispatch._validate import MAX_WAIT, show
from threaddispatch.errors import ConfigurationError
from threaddispatch.jobs import Config, JobEngine
from threaddispatch.stores import MemoryStore, Store
from threaddispatch.stores.base import JobState

pytestmark = pytest.mark.timeout(60)

HUGE = [1e300, 10**12, MAX_WAIT * 2]
HUGE_IDS = ["1e300", "1e12", "twice-MAX_WAIT"]


def _options(name: str, value: float) -> dict[str, Any]:
    """``{name: value}`` with what the cross-field rules need to let only ``value`` be wrong."""
    options: dict[str, Any] = {name: value}
    if name == "poll_interval":
        options["max_poll_interval"] = value  # max_poll_interval >= poll_interval
    if name == "heartbeat_interval":
        options["stale_job_threshold"] = value * 2  # stale_job_threshold > heartbeat_interval
    return options


DURATIONS = [
    "poll_interval",
    "max_poll_interval",
    "heartbeat_interval",
    "stale_job_threshold",
    "shutdown_timeout",
]

WAYS: dict[str, Callable[[dict[str, Any]], object]] = {
    "JobEngine": lambda options: JobEngine(MemoryStore(), **options),
    "Config": lambda options: Config(**options).validate(),
    "configure": lambda options: JobEngine(MemoryStore()).configure(**options),
}


@pytest.mark.parametrize("way", sorted(WAYS))
@pytest.mark.parametrize("name", DURATIONS)
@pytest.mark.parametrize("value", HUGE, ids=HUGE_IDS)
def test_a_duration_setting_past_max_wait_is_refused_naming_it(way: str, name: str, value: float) -> None:
    """JobEngine(...), Config(...).validate() and engine.configure(...) refuse it: ConfigurationError naming both."""
    with pytest.raises(ConfigurationError) as refused:
        WAYS[way](_options(name, value))
    message = str(refused.value)
    assert "must be at most" in message and show(value) in message, message
    assert message.startswith(f"{name} must be at most"), message  # the setting the bad value was given for


@pytest.mark.parametrize("name", DURATIONS)
def test_a_duration_setting_of_max_wait_is_accepted(name: str) -> None:
    """The bound itself is a valid setting (the heartbeat interval just below the threshold)."""
    options = _options(name, MAX_WAIT)
    if name == "heartbeat_interval":
        options = {"heartbeat_interval": MAX_WAIT / 2, "stale_job_threshold": MAX_WAIT}
    if name == "stale_job_threshold":
        options["heartbeat_interval"] = 10.0
    config = Config(**options).validate()
    assert getattr(config, name) == options[name]


def test_a_huge_retention_is_accepted_and_purges_nothing_recent(store: Store) -> None:
    """retention=1e300 is valid: the cutoff it makes is a finite number every store compares (nothing purged)."""
    engine = JobEngine(store, retention=1e300)
    engine.register("noop", lambda ctx, payload: payload)
    job_id = engine.enqueue("noop", 1)
    [claimed] = store.claim(["default"], 1, worker_id="w", now=time.time() + 1)
    assert claimed.id == job_id
    assert store.complete(job_id, worker_id="w", attempts=claimed.attempts, result="1", now=time.time())
    assert store.purge_finished(older_than=time.time() - 1e300) == 0
    assert engine.get_job(job_id).state is JobState.COMPLETED
