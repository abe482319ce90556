"""``threaddispatch locks list``: the serial-lock holds of a store, as a table or JSON, as ``GET /locks`` has them.

Holds are made through the store (claim, ``hold_locks``, fail: no worker thread) on the
stores another process can open by URL (a SQLite file, a PostgreSQL schema); the command
runs in this process through ``main`` and once through the real entry point.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from conftest import SHARED_STORE_PARAMS
from test_admin_locks import held
from test_cli import assert_user_error, run, run_process

from threaddispatch._admin_locks import lock_holds
from threaddispatch._cli_admin import _when
from threaddispatch.errors import ConfigurationError
from threaddispatch.jobs import JobEngine
from threaddispatch.stores import Store

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=SHARED_STORE_PARAMS)
def store_kind(request: pytest.FixtureRequest) -> str:
    """The stores the CLI, another process, can open by URL."""
    kind: str = request.param
    return kind


@pytest.fixture
def db(store: Store, store_url: str) -> Iterator[tuple[str, JobEngine]]:
    """A store's URL and an engine on it in this process, with job ``noop``."""
    engine = JobEngine(store)
    engine.register("noop", lambda ctx, payload: payload, max_retries=0)
    yield store_url, engine
    engine.stop(5)


def test_no_holds(db: tuple[str, JobEngine]) -> None:
    """Nothing held: one line, or an empty JSON listing; exit 0."""
    url, _engine = db
    result = run("locks", "list", store=url)
    assert (result.returncode, result.stdout.strip()) == (0, "no lock holds"), result.stderr
    assert json.loads(run("locks", "list", "--json", store=url).stdout) == {"holds": [], "total": 0}


def test_holds_as_a_table_and_as_json(db: tuple[str, JobEngine]) -> None:
    """A row per holder, oldest heartbeat first: lock, holder, job, name, state, attempt, worker, since when the
    holding attempt runs, heartbeat (UTC)."""
    url, engine = db
    now = time.time()
    newer = held(engine, "customer:7", heartbeat=now, worker="w-2")
    older = held(engine, "customer:42", heartbeat=now - 10)
    since = {job_id: _when(engine.get_job(job_id).started_at) for job_id in (newer, older)}
    table = run("locks", "list", store=url)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    assert lines[0].split() == ["LOCK", "HOLDER", "JOB", "NAME", "STATE", "ATTEMPT", "WORKER", "SINCE", "HEARTBEAT"]
    assert [line.split() for line in lines[1:]] == [
        ["customer:42", "outlived", older, "noop", "failed", "1", "w", since[older], _when(now - 10)],
        ["customer:7", "outlived", newer, "noop", "failed", "1", "w-2", since[newer], _when(now)],
    ]
    assert "-" not in since.values()
    as_json = json.loads(run("locks", "list", "--json", store=url).stdout)
    assert as_json == {"holds": lock_holds(engine)[0], "total": 2}
    assert [hold["job_id"] for hold in as_json["holds"]] == [older, newer]


def test_lock_and_limit(db: tuple[str, JobEngine]) -> None:
    """``--lock KEY`` shows that key's holds only; ``--limit`` caps them and says how many there are."""
    url, engine = db
    now = time.time()
    first = held(engine, "a b", heartbeat=now - 1)
    held(engine, "c", heartbeat=now)
    one = json.loads(run("locks", "list", "--json", "--lock", "a b", store=url).stdout)
    assert [hold["job_id"] for hold in one["holds"]] == [first] and one["total"] == 1
    assert run("locks", "list", "--lock", "nobody", store=url).stdout.strip() == "no lock holds"
    capped = run("locks", "list", "--limit", "1", store=url)
    assert capped.returncode == 0, capped.stderr
    assert first in capped.stdout and "(1 of 2 shown; raise --limit for more)" in capped.stdout
    capped_json = json.loads(run("locks", "list", "--limit", "1", "--json", store=url).stdout)
    assert len(capped_json["holds"]) == 1 and capped_json["total"] == 2
    assert_user_error(run("locks", "list", "--limit", "0", store=url), "--limit")
    assert_user_error(run("locks", "list", "--lock", "", store=url), "lock must be a non-empty str")


def test_the_entry_point(db: tuple[str, JobEngine]) -> None:
    """``python -m threaddispatch locks list --json`` prints the holds; ``locks`` alone is a usage error, exit 2."""
    url, engine = db
    job_id = held(engine, "customer:42", heartbeat=time.time())
    result = run_process("locks", "list", "--json", store=url)
    assert result.returncode == 0, result.stderr
    assert [hold["job_id"] for hold in json.loads(result.stdout)["holds"]] == [job_id]
    assert run_process("locks", "list", "--help").returncode == 0
    assert run_process("locks", store=url).returncode == 2


def test_lock_holds_checks_its_arguments(store: Store) -> None:
    """The shared reader refuses a bad lock key or limit with ConfigurationError naming it."""
    engine = JobEngine(store)
    with pytest.raises(ConfigurationError, match="lock"):
        lock_holds(engine, lock="nul\x00")
    with pytest.raises(ConfigurationError, match="limit"):
        lock_holds(engine, limit=0)
    with pytest.raises(ConfigurationError, match="limit"):
        lock_holds(engine, limit=True)
