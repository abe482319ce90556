"""``GET /stats`` and ``threaddispatch stats`` answer for the cluster, from the store (issue 16), with one dict.

The serving engine is idle (as ``threaddispatch serve``'s is); the work is done by another
engine on the same store (a SQLite file, a PostgreSQL schema), which is what the answer must show.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SHARED_STORE_PARAMS

from threaddispatch._admin_stats import cluster_stats
from threaddispatch.admin import make_wsgi_app
from threaddispatch.cli import main
from threaddispatch.jobs import JobEngine
from threaddispatch.stores import SQLiteStore, Store
from threaddispatch.stores.base import JobState
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)

TOKEN = "stats-token"


def _boom(ctx: object, payload: object) -> None:
    raise RuntimeError("boom")


@pytest.fixture(params=SHARED_STORE_PARAMS)
def store_kind(request: pytest.FixtureRequest) -> str:
    """The stores two engines can share: a SQLite file, a PostgreSQL schema."""
    kind: str = request.param
    return kind


@pytest.fixture
def cluster(make_store: Callable[[], Store], store_url: str) -> Iterator[tuple[JobEngine, JobEngine, str]]:
    """An idle serving engine, and a worker engine serving ``mail`` and ``default``, on one store."""
    serving_store, worker_store = make_store(), make_store()
    serving = JobEngine(serving_store)
    worker = JobEngine(worker_store, queues=("default", "mail"), concurrency=2, poll_interval=0.05)
    worker.register("noop", lambda ctx, payload: payload)
    worker.register("boom", _boom, max_retries=0)
    yield serving, worker, store_url
    worker.stop(10)
    serving.stop(5)
    worker_store.close()
    serving_store.close()


def _load(worker: JobEngine) -> None:
    """Done work on the worker, then its queues paused so that what follows stays pending and countable."""
    worker.start()
    done = worker.enqueue("noop", 1)
    failed = worker.enqueue("boom", 2)
    wait_for(lambda: worker.get_job(done).state is JobState.COMPLETED, timeout=20, message="the noop job done")
    wait_for(lambda: worker.get_job(failed).state is JobState.FAILED, timeout=20, message="the boom job failed")
    worker.pause_queue("mail")
    worker.pause_queue("default")
    worker.enqueue("noop", 3, queue="mail")
    worker.enqueue("noop", 4, queue="mail")
    worker.enqueue("noop", 5, queue="nobody-serves-this")


def _stats(app: Any) -> dict[str, Any]:
    answer = app.handle("GET", "/stats", authorization=f"Bearer {TOKEN}")
    assert answer.status == 200, answer.body
    data: dict[str, Any] = answer.json()
    return data


def test_stats_answers_for_the_cluster_not_the_idle_serving_engine(cluster: tuple[JobEngine, JobEngine, str]) -> None:
    """Counts by state and queue, dead letters, paused queues and live workers come from the store."""
    serving, worker, _url = cluster
    _load(worker)
    data = _stats(make_wsgi_app(serving, token=TOKEN))
    assert data["counts"] == {s.value: 0 for s in JobState} | {"completed": 1, "failed": 1, "pending": 3}
    assert data["total"] == 5
    queues = {queue["name"]: queue for queue in data["queues"]}
    assert queues["mail"] == {"name": "mail", "paused": True, "workers": 1,
                              "counts": {s.value: 0 for s in JobState} | {"pending": 2}}  # fmt: skip
    assert queues["default"]["counts"]["completed"] == 1 and queues["default"]["workers"] == 1
    assert data["other_queues"]["pending"] == 1  # the queue no engine knows: no one will claim it
    assert data["dead_letters"] == 1
    assert data["paused_queues"] == ["default", "mail"]
    [live] = data["workers"]
    assert live["id"] == worker.worker_id and set(live["queues"]) == {"default", "mail"}
    assert data["store"]["kind"] == type(serving.store).__name__
    # The serving engine's own counters are there too, under a name that says whose they are.
    assert data["serving_engine"]["state"] == "new" and data["serving_engine"]["worker_id"] == ""


def test_the_cli_stats_and_the_admin_stats_are_one_dict(
    cluster: tuple[JobEngine, JobEngine, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``threaddispatch stats --json`` prints what ``/stats`` answers, less the serving engine's counters."""
    serving, worker, url = cluster
    _load(worker)
    worker.stop(10)  # no heartbeat moves between the two reads
    capsys.readouterr()
    assert main(["stats", "--json", "--store", url]) == 0
    printed = json.loads(capsys.readouterr().out)
    answered = _stats(make_wsgi_app(serving, token=TOKEN))
    assert answered.pop("serving_engine")["state"] == "new"
    assert printed == answered == json.loads(json.dumps(cluster_stats(serving)))
    assert main(["stats", "--store", url]) == 0
    table = capsys.readouterr().out
    assert "dead letters: 1" in table and "paused queues: default, mail" in table and "live workers: 0" in table
    assert "(other queues)" in table


def test_stats_of_an_empty_store(tmp_path: Path) -> None:
    """A new store: zero counts, the engine's default queue, no dead letters, no workers."""
    store = SQLiteStore(tmp_path / "jobs.db")
    try:
        data = cluster_stats(JobEngine(store))
    finally:
        store.close()
    assert data["total"] == 0 and data["dead_letters"] == 0 and data["workers"] == []
    assert [queue["name"] for queue in data["queues"]] == ["default"]
