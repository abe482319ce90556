"""JobEngine.configure(): the public way to change an engine's tuning before start() (the CLI's
``--max-poll-interval`` goes through it)."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from threaddispatch import _cli_worker
from threaddispatch.backoff import Constant
from threaddispatch.errors import ConfigurationError, InvalidStateError
from threaddispatch.jobs import Config, JobContext, JobEngine
from threaddispatch.stores import MemoryStore
from threaddispatch.stores.base import JobState
from threaddispatch.testing import wait_for

FAST: dict[str, Any] = {
    "poll_interval": 0.01,
    "max_poll_interval": 0.05,
    "heartbeat_interval": 0.05,
    "stale_job_threshold": 0.3,
    "shutdown_timeout": 5.0,
}


def test_configure_returns_the_new_config_and_keeps_the_other_fields() -> None:
    """configure() changes the named fields, returns the new Config, and leaves the rest as they were."""
    engine = JobEngine(MemoryStore(), concurrency=4, poll_interval=2.0)
    config = engine.configure(max_poll_interval=3.0, queues=["a", "b"])
    assert isinstance(config, Config) and engine.config is config
    assert (config.concurrency, config.poll_interval, config.max_poll_interval) == (4, 2.0, 3.0)
    assert config.queues == ("a", "b")  # a list becomes a tuple, as JobEngine(queues=[...]) does


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"poll_interval": float("nan")}, "nan"),
        ({"concurrency": True}, "True"),
        ({"concurrency": 0}, "concurrency"),
        ({"max_poll_interval": 0.5}, "max_poll_interval (0.5)"),  # below the engine's poll_interval 1.0
        ({"queues": "default"}, "'default'"),
        ({"stale_job_threshold": 5.0}, "stale_job_threshold (5.0)"),  # not above heartbeat_interval 10.0
        ({"backoff": 3}, "backoff"),
    ],
)
def test_a_bad_value_raises_naming_it_and_changes_nothing(fields: dict[str, Any], named: str) -> None:
    """A bad value (or a bad combination with the current tuning) raises ConfigurationError naming it."""
    engine = JobEngine(MemoryStore())
    before = engine.config
    with pytest.raises(ConfigurationError, match=named.replace("(", r"\(").replace(")", r"\)")):
        engine.configure(**fields)
    assert engine.config is before


def test_unknown_and_construction_only_fields_are_refused() -> None:
    """An unknown name is a TypeError (as a bad keyword); immediate and max_payload_size are fixed at construction."""
    engine = JobEngine(MemoryStore())
    with pytest.raises(TypeError, match="pol_interval"):
        engine.configure(pol_interval=1.0)
    with pytest.raises(ConfigurationError, match="immediate is fixed"):
        engine.configure(immediate=True)
    with pytest.raises(ConfigurationError, match="max_payload_size is fixed"):
        engine.configure(max_payload_size=10)
    assert engine.config == Config()


@pytest.mark.timeout(60)
def test_the_next_start_runs_with_the_new_tuning() -> None:
    """After configure(), start() serves with the new concurrency, and its retries wait the new backoff."""
    engine = JobEngine(MemoryStore(), **FAST)
    engine.register("fails", lambda ctx, payload: 1 / 0, max_retries=1, timeout=None)
    engine.configure(concurrency=3, backoff=Constant(1000.0))
    try:
        engine.start()
        assert engine.stats()["concurrency"] == 3
        job_id = engine.enqueue("fails", None)
        enqueued = time.time()
        wait_for(lambda: engine.get_job(job_id).state is JobState.RETRYING, timeout=30)
        assert engine.get_job(job_id).run_at >= enqueued + 900  # the default backoff waits at most 60 s
    finally:
        engine.stop(5.0)


@pytest.mark.timeout(60)
def test_configure_while_running_raises_and_works_again_after_stop() -> None:
    """While the workers run configure() raises InvalidStateError; after stop() it works and start() uses it."""
    engine = JobEngine(MemoryStore(), **FAST)

    def noop(ctx: JobContext, payload: object) -> None:
        return None

    engine.register("noop", noop)
    try:
        engine.start()
        with pytest.raises(InvalidStateError, match="running"):
            engine.configure(concurrency=2)
        assert engine.config.concurrency == 10
    finally:
        assert engine.stop(5.0)
    engine.configure(concurrency=2)
    try:
        engine.start()
        assert engine.stats()["concurrency"] == 2
    finally:
        engine.stop(5.0)


@pytest.mark.timeout(60)
def test_cli_max_poll_interval_on_an_engine_its_module_started_is_one_line_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--max-poll-interval`` on an engine already running (started by its module): one line, status 2."""
    (tmp_path / "s26_started_mod.py").write_text(textwrap.dedent("""
        from threaddispatch.jobs import JobEngine
        from threaddispatch.stores import MemoryStore
        engine = JobEngine(MemoryStore(), poll_interval=0.01, max_poll_interval=0.05)
        engine.start()
    """))  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "s26_started_mod", raising=False)
    try:
        assert _cli_worker.main(["s26_started_mod:engine", "--max-poll-interval", "0.5", "--burst"]) == 2
        err = capsys.readouterr().err
        assert "configure()" in err and "Traceback" not in err
    finally:
        module = sys.modules.get("s26_started_mod")
        if module is not None:
            module.engine.stop(5.0)
