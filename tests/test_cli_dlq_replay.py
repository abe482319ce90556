"""``threaddispatch dlq replay ID...`` replays every id it can: a refused one neither stops the others nor hides.

``JobEngine.replay`` refuses a dead letter whose unique key another unfinished job holds
(InvalidStateError; the letter is kept). Before, the command replayed the ids before the
refused one and stopped with the error (exit 2), the ids after it left unreplayed. Now each
refused id is a line on stderr naming it and the reason, the others are replayed, and the
exit code is 1 when any was refused. An unknown id still replays nothing (exit 2): a typo.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from conftest import SHARED_STORE_PARAMS
from test_cli import assert_user_error, run, run_process

from threaddispatch.errors import JobNotFoundError
from threaddispatch.jobs import JobEngine
from threaddispatch.stores import Store
from threaddispatch.stores.base import JobState

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=SHARED_STORE_PARAMS)
def store_kind(request: pytest.FixtureRequest) -> str:
    """The stores the CLI, another process, can open by URL."""
    kind: str = request.param
    return kind


@pytest.fixture
def db(store: Store, store_url: str) -> Iterator[tuple[str, JobEngine]]:
    """A store's URL and an engine on it in this process, with job ``boom`` (no retries)."""
    engine = JobEngine(store)
    engine.register("boom", lambda ctx, payload: payload, max_retries=0)
    yield store_url, engine
    engine.stop(5)


def dead_letter(engine: JobEngine, key: str) -> str:
    """The dead letter of a failed ``boom`` job with unique key ``key`` (failed through the store, no worker)."""
    job_id = engine.enqueue("boom", {"key": key}, unique_key=key, priority=1 << 40)
    [claimed] = engine.store.claim(["default"], 1, worker_id="w", now=time.time() + 1)
    assert claimed.id == job_id
    letter = engine.store.fail(job_id, worker_id="w", attempts=1, error="RuntimeError: boom", now=time.time())
    assert letter is not None
    return letter.id


def _letters(engine: JobEngine, count: int) -> list[str]:
    return [dead_letter(engine, f"report:{i}") for i in range(count)]


def _hold_key(engine: JobEngine, key: str) -> str:
    """A pending job holding ``key``: a replay of a letter with that key is refused while it is unfinished."""
    return engine.enqueue("boom", {"holder": key}, unique_key=key)


def _replayed(engine: JobEngine, letter_id: str) -> bool:
    try:
        engine.get_dead_letter(letter_id)
    except JobNotFoundError:
        return True
    return False


def test_a_refused_id_in_the_middle_does_not_stop_the_rest(db: tuple[str, JobEngine]) -> None:
    """ID1 ID2 ID3 with ID2's key held: ID1 and ID3 are replayed, ID2 kept and named on stderr; exit 1."""
    url, engine = db
    first, middle, last = _letters(engine, 3)
    holder = _hold_key(engine, "report:1")
    result = run("dlq", "replay", first, middle, last, store=url)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert [_replayed(engine, letter) for letter in (first, middle, last)] == [True, False, True]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "replayed 2 dead letter(s)" and len(lines) == 3
    payloads = [engine.get_job(line.split()[-1]).decoded_payload() for line in lines[1:]]
    assert payloads == [{"key": "report:0"}, {"key": "report:2"}]
    [error] = result.stderr.strip().splitlines()
    assert error.startswith(f"threaddispatch dlq replay: dead letter {middle} not replayed: ")
    assert f"unique_key 'report:1' is held by active job '{holder}'" in error


def test_every_refused_id_is_reported_and_json_lists_them(db: tuple[str, JobEngine]) -> None:
    """Two of four refused: one stderr line each, in order; --json gives the new ids and the refused with why."""
    url, engine = db
    letters = _letters(engine, 4)
    _hold_key(engine, "report:0")
    _hold_key(engine, "report:3")
    result = run("dlq", "replay", *letters, "--json", store=url)
    assert result.returncode == 1, (result.stdout, result.stderr)
    data = json.loads(result.stdout)
    assert data["replayed"] == 2 and len(data["job_ids"]) == 2
    assert [entry["dead_letter_id"] for entry in data["refused"]] == [letters[0], letters[3]]
    assert all("is held by active job" in entry["error"] for entry in data["refused"])
    errors = result.stderr.strip().splitlines()
    assert [line.split()[5] for line in errors] == [letters[0], letters[3]]
    assert [letter.id for letter in engine.dlq()] == [letters[3], letters[0]]  # the refused are kept, newest first


def test_all_refused_replays_nothing_and_exits_1(db: tuple[str, JobEngine]) -> None:
    """Every id refused: nothing replayed, the letters kept; exit 1 (not 2: the command itself was fine)."""
    url, engine = db
    [only] = _letters(engine, 1)
    _hold_key(engine, "report:0")
    result = run("dlq", "replay", only, store=url)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout.strip() == "replayed 0 dead letter(s)"
    assert only in result.stderr
    assert not _replayed(engine, only)


def test_nothing_refused_is_exit_0_and_an_unknown_id_replays_nothing(db: tuple[str, JobEngine]) -> None:
    """All replayable: exit 0, nothing on stderr, an empty refused list; an unknown id is exit 2 before any replay."""
    url, engine = db
    letters = _letters(engine, 3)
    assert_user_error(run("dlq", "replay", letters[0], "nope", store=url), "no dead letter with id 'nope'")
    assert not _replayed(engine, letters[0])
    result = run("dlq", "replay", *letters[:2], "--json", store=url)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    data = json.loads(result.stdout)
    assert data["replayed"] == 2 and data["refused"] == []
    assert all(engine.get_job(job_id).state is JobState.PENDING for job_id in data["job_ids"])


def test_the_entry_point_exits_1_for_a_refused_id(db: tuple[str, JobEngine]) -> None:
    """``python -m threaddispatch dlq replay`` in its own process: exit 1, the refused id on stderr, the rest go."""
    url, engine = db
    first, second = _letters(engine, 2)
    _hold_key(engine, "report:0")
    result = run_process("dlq", "replay", first, second, store=url)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and first in result.stderr
    assert "replayed 1 dead letter(s)" in result.stdout
    assert [_replayed(engine, first), _replayed(engine, second)] == [False, True]


def test_replay_all_replays_past_a_refused_letter_and_reports_it(db: tuple[str, JobEngine]) -> None:
    """``--all`` is JobEngine.replay_all: the refused letter is kept and the rest replayed; it is named (stderr,
    ``refused`` in --json) and the exit code is 1, as with ids (it exited 0 naming none)."""
    url, engine = db
    held, free = _letters(engine, 2)
    _hold_key(engine, "report:0")
    result = run_process("dlq", "replay", "--all", "--json", store=url)
    assert result.returncode == 1, (result.stdout, result.stderr)
    data = json.loads(result.stdout)
    assert data["replayed"] == 1 and [entry["dead_letter_id"] for entry in data["refused"]] == [held]
    assert "report:0" in data["refused"][0]["error"]
    assert held in result.stderr and "Traceback" not in result.stderr
    assert engine.get_job(data["job_ids"][0]).decoded_payload() == {"key": "report:1"}
    assert [_replayed(engine, held), _replayed(engine, free)] == [False, True]
