"""The admin WSGI app over a real socket: every route, auth, pagination, errors, mounting; and its store helpers."""

from __future__ import annotations

import base64
import hmac
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.client import HTTPConnection
from typing import Any
from urllib.parse import quote, urlencode

import pytest

from threaddispatch import admin as admin_module
from threaddispatch.admin import AdminApp, make_server, make_wsgi_app
from threaddispatch.backoff import Constant
from threaddispatch.contrib._mount import PrefixMount
from threaddispatch.errors import ConfigurationError, JobNotFoundError
from threaddispatch.jobs import JobEngine
from threaddispatch.stores import Store
from threaddispatch.stores.base import JobRecord, JobState
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(30)

TOKEN = "s3cret-token-\u00e9"  # non-ASCII on purpose: sent and compared as UTF-8 bytes
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE = "/api/dispatch"
_priorities = itertools.count(1 << 40)


def _top() -> int:
    """A priority above every job made before: the next claim takes this job."""
    return next(_priorities)


@pytest.fixture
def engine(store: Store) -> Iterator[JobEngine]:
    """An engine (not started) with a no-op job and a failing job registered."""
    made = JobEngine(store, poll_interval=0.01, max_poll_interval=0.05, backoff=Constant(0.01))
    made.register("noop", lambda ctx, payload: payload)
    made.register("boom", _boom, max_retries=0)
    yield made
    made.stop(5)


def _boom(ctx: object, payload: object) -> object:
    raise RuntimeError(f"boom {payload}")


@dataclass
class Reply:
    """One HTTP answer: status, headers (lower-case names) and the decoded JSON body (None when empty)."""

    status: int
    headers: dict[str, str]
    body: Any


class Server:
    """A threaded wsgiref server on 127.0.0.1 (any free port) serving a WSGI app in a thread."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.httpd = make_server(app, "127.0.0.1", 0)
        self.port = self.httpd.server_port
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="threaddispatch-test-admin-server"
        )
        self.thread.start()

    def request(
        self, method: str, path: str, *, token: str | None = TOKEN, params: dict[str, object] | None = None,
        body: bytes | object = None, headers: dict[str, str] | None = None,
    ) -> Reply:  # fmt: skip
        """Send one request and read the whole answer (a fresh connection each time)."""
        if params:
            path = f"{path}?{urlencode(params)}"
        sent: dict[str, str | bytes] = dict(headers or {})
        if token is not None:
            # Raw UTF-8 bytes, as curl and browsers send them (http.client would encode a str as latin-1).
            sent["Authorization"] = f"Bearer {token}".encode()
        data: bytes | None
        if body is None or isinstance(body, bytes):
            data = body
        else:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        conn = HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            raw = response.read()
            names = {k.lower(): v for k, v in response.getheaders()}
        finally:
            conn.close()
        return Reply(response.status, names, json.loads(raw) if raw else None)

    def close(self) -> None:
        """Stop serving and wait for the serving thread and the request threads."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[..., Iterable[bytes]]], Server]]:
    """Start servers for WSGI apps; every one is stopped at teardown."""
    servers: list[Server] = []

    def start(app: Callable[..., Iterable[bytes]]) -> Server:
        server = Server(app)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def api(engine: JobEngine, serve: Callable[[Callable[..., Iterable[bytes]]], Server]) -> Server:
    """The admin app for ``engine`` at /api/dispatch with TOKEN, served on a real socket."""
    return serve(make_wsgi_app(engine, token=TOKEN))


# -- state helpers (through the store: deterministic, no worker thread) -------------------------------------


def claim(engine: JobEngine, job_id: str) -> JobRecord:
    """Claim ``job_id`` (enqueued with the top priority of its queue) as worker "w"."""
    job = engine.get_job(job_id)
    [claimed] = engine.store.claim([job.queue], 1, worker_id="w", now=time.time() + 1)
    assert claimed.id == job_id
    return claimed


def running_job(engine: JobEngine, queue: str = "default") -> str:
    """A job in state running."""
    job_id = engine.enqueue("noop", {"state": "running"}, queue=queue, priority=_top())
    claim(engine, job_id)
    return job_id


def retrying_job(engine: JobEngine) -> str:
    """A job in state retrying (due in an hour)."""
    job_id = engine.enqueue("noop", {"state": "retrying"}, priority=_top())
    claimed = claim(engine, job_id)
    assert engine.store.retry_later(job_id, worker_id="w", attempts=claimed.attempts, run_at=time.time() + 3600,
                                    error="first try failed", now=time.time())  # fmt: skip
    return job_id


def failed_job(engine: JobEngine, payload: object = None, queue: str = "default") -> tuple[str, str]:
    """A failed job and its dead letter id."""
    job_id = engine.enqueue("boom", payload, queue=queue, priority=_top())
    claimed = claim(engine, job_id)
    error = "Traceback...\nRuntimeError: boom"
    letter = engine.store.fail(job_id, worker_id="w", attempts=claimed.attempts, error=error, now=time.time())
    assert letter is not None
    return job_id, letter.id


def completed_job(engine: JobEngine) -> str:
    """A completed job."""
    job_id = engine.enqueue("noop", {"state": "completed"}, priority=_top())
    claimed = claim(engine, job_id)
    assert engine.store.complete(job_id, worker_id="w", attempts=claimed.attempts, result="42", now=time.time())
    return job_id


def assert_error(reply: Reply, status: int, code: str, parameter: str | None = None) -> str:
    """Check a JSON error answer; returns its message."""
    assert reply.status == status, reply
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    if parameter is not None:
        assert error["parameter"] == parameter, error
    return str(error["message"])


# -- construction and authentication ---------------------------------------------------------------------------


def test_constructing_without_a_token_raises_unless_explicitly_unauthenticated(engine: JobEngine) -> None:
    """No token is a ConfigurationError; allow_unauthenticated=True permits it; a blank token is refused."""
    with pytest.raises(ConfigurationError, match="token"):
        make_wsgi_app(engine)
    with pytest.raises(ConfigurationError, match="token"):
        make_wsgi_app(engine, token="  ")
    with pytest.raises(ConfigurationError, match="base_path"):
        make_wsgi_app(engine, "api", token=TOKEN)
    with pytest.raises(ConfigurationError, match="JobEngine"):
        make_wsgi_app(object(), token=TOKEN)  # type: ignore[arg-type]
    assert isinstance(make_wsgi_app(engine, allow_unauthenticated=True), AdminApp)


def test_requests_without_or_with_a_wrong_token_get_401(api: Server) -> None:
    """Missing token, wrong token, wrong scheme: 401 with a Bearer challenge, on known and unknown routes alike."""
    for reply in (
        api.request("GET", f"{BASE}/jobs", token=None),
        api.request("GET", f"{BASE}/jobs", token="wrong"),
        api.request("GET", f"{BASE}/jobs", token=TOKEN[:-1]),
        api.request("GET", f"{BASE}/no-such-route", token=None),
        api.request("POST", f"{BASE}/dlq/purge", token=None),
        api.request("GET", f"{BASE}/jobs", token=None, headers={"Authorization": f"Basic {TOKEN}"}),
    ):
        assert_error(reply, 401, "unauthorized")
        assert reply.headers["www-authenticate"].startswith("Bearer")
    assert api.request("GET", f"{BASE}/jobs").status == 200


def test_token_is_compared_in_constant_time(api: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bearer token goes through hmac.compare_digest (as bytes)."""
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the module admin calls through
    assert api.request("GET", f"{BASE}/health").status == 200
    assert api.request("GET", f"{BASE}/health", token="nope").status == 401
    assert seen == [(TOKEN.encode(), TOKEN.encode()), (b"nope", TOKEN.encode())]


def test_unauthenticated_app_needs_no_token(engine: JobEngine, serve: Callable[..., Server]) -> None:
    """Built with allow_unauthenticated=True and no token, it answers without Authorization."""
    server = serve(make_wsgi_app(engine, allow_unauthenticated=True))
    assert server.request("GET", f"{BASE}/health", token=None).body["status"] == "ok"


# -- jobs ----------------------------------------------------------------------------------------------------------


def test_jobs_list_filters_by_state_and_queue(engine: JobEngine, api: Server) -> None:
    """GET /jobs returns newest first; state and queue filter; payloads are decoded JSON."""
    first = engine.enqueue("noop", {"n": 1})
    second = engine.enqueue("noop", {"n": 2}, queue="mail")
    running = running_job(engine, queue="mail")
    reply = api.request("GET", f"{BASE}/jobs")
    assert reply.status == 200
    assert [job["id"] for job in reply.body["jobs"]] == [running, second, first]
    assert reply.body["next_cursor"] is None
    assert reply.body["jobs"][1]["payload"] == {"n": 2}
    assert [j["id"] for j in api.request("GET", f"{BASE}/jobs", params={"queue": "mail"}).body["jobs"]] == [
        running, second,
    ]  # fmt: skip
    by_state = api.request("GET", f"{BASE}/jobs", params={"state": "running"}).body["jobs"]
    assert [job["id"] for job in by_state] == [running]
    both = api.request("GET", f"{BASE}/jobs", params={"state": "pending", "queue": "default"}).body["jobs"]
    assert [job["id"] for job in both] == [first]


def test_jobs_pagination_with_a_cursor_neither_skips_nor_repeats(engine: JobEngine, api: Server) -> None:
    """Pages of ``limit`` chained by next_cursor cover every job once, even when jobs arrive and leave meanwhile."""
    ids = engine.enqueue_many("noop", [{"i": i} for i in range(25)])
    expected = list(reversed(ids))
    page1 = api.request("GET", f"{BASE}/jobs", params={"limit": 10})
    assert [j["id"] for j in page1.body["jobs"]] == expected[:10]
    # Jobs arriving (newer: listed first) must not shift the next page.
    engine.enqueue_many("noop", [{"late": i} for i in range(5)])
    page2 = api.request("GET", f"{BASE}/jobs", params={"limit": 10, "cursor": page1.body["next_cursor"]})
    assert [j["id"] for j in page2.body["jobs"]] == expected[10:20]
    # A job already shown leaving the filtered listing must not make the next page skip one.
    engine.cancel(expected[0])
    page3 = api.request("GET", f"{BASE}/jobs", params={"limit": 10, "cursor": page2.body["next_cursor"]})
    assert [j["id"] for j in page3.body["jobs"]] == expected[20:]
    assert page3.body["next_cursor"] is None


def test_filtered_pagination_keeps_its_place_when_earlier_jobs_leave_the_filter(engine: JobEngine, api: Server) -> None:
    """Paging state=pending while shown jobs get cancelled (an offset would skip jobs) still covers all the rest."""
    ids = list(reversed(engine.enqueue_many("noop", [{"i": i} for i in range(12)])))
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, object] = {"state": "pending", "limit": 5}
        if cursor:
            params["cursor"] = cursor
        reply = api.request("GET", f"{BASE}/jobs", params=params)
        page = [job["id"] for job in reply.body["jobs"]]
        seen.extend(page)
        for job_id in page:
            engine.cancel(job_id)
        cursor = reply.body["next_cursor"]
        if cursor is None:
            break
    assert seen == ids


def test_bad_list_parameters_give_400_naming_the_parameter(api: Server) -> None:
    """Bad state, limit, cursor, unknown or repeated parameters: 400 with error.parameter."""
    base = f"{BASE}/jobs"
    message = assert_error(api.request("GET", base, params={"state": "nope"}), 400, "bad_parameter", "state")
    assert "known: pending" in message
    for limit in ("0", "-1", "abc", str(admin_module.MAX_LIMIT + 1), ""):
        assert_error(api.request("GET", base, params={"limit": limit}), 400, "bad_parameter", "limit")
    assert_error(api.request("GET", base, params={"cursor": "garbage!"}), 400, "bad_parameter", "cursor")
    assert_error(api.request("GET", base, params={"stat": "pending"}), 400, "bad_parameter", "stat")
    assert_error(api.request("GET", f"{base}?limit=1&limit=2"), 400, "bad_parameter", "limit")
    assert_error(api.request("GET", base, params={"queue": " padded "}), 400, "bad_parameter", "queue")
    assert_error(api.request("GET", f"{BASE}/dlq", params={"cursor": "x"}), 400, "bad_parameter", "cursor")


def test_a_cursor_only_fits_the_listing_and_filters_it_came_from(engine: JobEngine, api: Server) -> None:
    """A jobs cursor reused with other filters, or on /dlq, is refused with 400 cursor."""
    engine.enqueue_many("noop", [{"i": i} for i in range(3)])
    cursor = api.request("GET", f"{BASE}/jobs", params={"limit": 1}).body["next_cursor"]
    assert cursor
    reply = api.request("GET", f"{BASE}/jobs", params={"limit": 1, "cursor": cursor, "state": "pending"})
    assert "other filters" in assert_error(reply, 400, "bad_parameter", "cursor")
    assert_error(api.request("GET", f"{BASE}/dlq", params={"cursor": cursor}), 400, "bad_parameter", "cursor")


def test_job_detail_and_unknown_ids(engine: JobEngine, api: Server) -> None:
    """GET /jobs/{id} returns the full record; an unknown id is a JSON 404."""
    job_id = completed_job(engine)
    reply = api.request("GET", f"{BASE}/jobs/{job_id}")
    assert reply.status == 200
    job = reply.body["job"]
    assert (job["id"], job["state"], job["result"], job["attempts"]) == (job_id, "completed", 42, 1)
    assert job_id in assert_error(api.request("GET", f"{BASE}/jobs/{job_id}x"), 404, "not_found")
    for action in ("cancel", "retry"):
        assert_error(api.request("POST", f"{BASE}/jobs/nope/{action}"), 404, "not_found")


def test_cancel_pending_retrying_or_running_only(engine: JobEngine, api: Server) -> None:
    """POST /jobs/{id}/cancel cancels pending, retrying and running jobs (the engine's rule); finished ones get 409."""
    pending = engine.enqueue("noop", {"n": 1})
    retrying = retrying_job(engine)
    running = running_job(engine)
    completed = completed_job(engine)
    for job_id in (pending, retrying, running):
        reply = api.request("POST", f"{BASE}/jobs/{job_id}/cancel")
        assert reply.status == 200
        assert reply.body["job"]["state"] == "cancelled"
        assert engine.get_job(job_id).state is JobState.CANCELLED
    for job_id, state in ((completed, "completed"), (pending, "cancelled")):
        message = assert_error(api.request("POST", f"{BASE}/jobs/{job_id}/cancel"), 409, "conflict")
        assert state in message and "cannot be cancelled" in message


def test_cancel_never_cancels_a_job_claimed_during_the_request(
    engine: JobEngine, api: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker claiming the job while the cancel request is served: 409 and the job runs on, or 200 and it never ran.

    The claim is made the moment the route first reads the job, the window a check-then-cancel route leaves open.
    """
    job_id = engine.enqueue("noop", {"n": 1}, priority=_top())
    real_get_job = engine.get_job
    claimed: list[JobRecord] = []

    def get_job_then_a_worker_claims(wanted: str) -> JobRecord:
        record = real_get_job(wanted)
        if not claimed and record.state is JobState.PENDING:
            claimed.extend(engine.store.claim([record.queue], 1, worker_id="w", now=time.time() + 1))
            assert [job.id for job in claimed] == [wanted]
        return record

    monkeypatch.setattr(engine, "get_job", get_job_then_a_worker_claims)
    reply = api.request("POST", f"{BASE}/jobs/{job_id}/cancel")
    monkeypatch.undo()
    if claimed:  # the worker won: its handler runs, so the cancel must be refused
        assert "running" in assert_error(reply, 409, "conflict")
        assert engine.get_job(job_id).state is JobState.RUNNING
    else:  # the cancel won: no worker can claim the job any more
        assert reply.status == 200 and reply.body["job"]["state"] == "cancelled"
        assert engine.store.claim(["default"], 1, worker_id="w", now=time.time() + 1) == []


@pytest.mark.timeout(60)
def test_cancels_racing_real_workers_answer_200_only_for_jobs_that_never_ran(
    store: Store, serve: Callable[..., Server]
) -> None:
    """Cancel requests racing a running engine's claims: 200 and cancelled (before or while it ran), or 409 and
    completed (it finished first)."""
    ran: set[str] = set()
    lock = threading.Lock()

    def record(ctx: Any, payload: object) -> None:
        with lock:
            ran.add(ctx.id)

    engine = JobEngine(store, concurrency=2, poll_interval=0.01, max_poll_interval=0.05)
    engine.register("record", record)
    server = serve(make_wsgi_app(engine, token=TOKEN))
    ids = engine.enqueue_many("record", list(range(40)))
    statuses: dict[str, int] = {}

    def cancel_each(chunk: list[str]) -> None:
        for job_id in chunk:
            statuses[job_id] = server.request("POST", f"{BASE}/jobs/{job_id}/cancel").status

    clients = [threading.Thread(target=cancel_each, args=(ids[i::2],), name=f"test-canceller-{i}") for i in range(2)]
    engine.start()
    try:
        for client in clients:
            client.start()
        for client in clients:
            client.join(30)
        finished = (JobState.COMPLETED, JobState.CANCELLED)
        wait_for(lambda: all(engine.get_job(i).state in finished for i in ids), timeout=20, message="all finished")
    finally:
        assert engine.stop(5)
    for job_id in ids:
        state = engine.get_job(job_id).state
        if statuses[job_id] == 200:
            assert state is JobState.CANCELLED, job_id  # a running job's outcome is discarded
        else:
            assert statuses[job_id] == 409 and state is JobState.COMPLETED and job_id in ran, (job_id, statuses[job_id])


def test_retry_failed_only(engine: JobEngine, api: Server) -> None:
    """POST /jobs/{id}/retry runs a failed job again (its dead letter goes); others get 409."""
    failed, letter = failed_job(engine, {"x": 1})
    reply = api.request("POST", f"{BASE}/jobs/{failed}/retry")
    assert reply.status == 200
    assert (reply.body["job"]["state"], reply.body["job"]["attempts"]) == ("pending", 0)
    assert engine.store.get_dead_letter(letter) is None
    message = assert_error(api.request("POST", f"{BASE}/jobs/{failed}/retry"), 409, "conflict")
    assert "is pending" in message and "only failed" in message


def test_counts_for_all_and_one_queue(engine: JobEngine, api: Server) -> None:
    """GET /jobs/counts gives every state (zeros included) and a total; ``queue`` narrows it."""
    engine.enqueue("noop", 1)
    engine.enqueue("noop", 2, queue="mail")
    running_job(engine, queue="mail")
    reply = api.request("GET", f"{BASE}/jobs/counts")
    assert reply.body["counts"] == {s.value: 0 for s in JobState} | {"pending": 2, "running": 1}
    assert reply.body["total"] == 3
    mail = api.request("GET", f"{BASE}/jobs/counts", params={"queue": "mail"}).body
    assert (mail["counts"]["pending"], mail["counts"]["running"], mail["total"]) == (1, 1, 2)


# -- dead letters --------------------------------------------------------------------------------------------------


def test_dead_letter_list_detail_and_pagination(engine: JobEngine, api: Server) -> None:
    """GET /dlq lists newest first with a cursor; GET /dlq/{id} shows one; unknown ids are 404."""
    letters = [failed_job(engine, {"i": i}, queue="mail" if i % 2 else "default")[1] for i in range(7)]
    newest_first = list(reversed(letters))
    page1 = api.request("GET", f"{BASE}/dlq", params={"limit": 4})
    assert [d["id"] for d in page1.body["dead_letters"]] == newest_first[:4]
    page2 = api.request("GET", f"{BASE}/dlq", params={"limit": 4, "cursor": page1.body["next_cursor"]})
    assert [d["id"] for d in page2.body["dead_letters"]] == newest_first[4:]
    assert page2.body["next_cursor"] is None
    mail = api.request("GET", f"{BASE}/dlq", params={"queue": "mail"}).body["dead_letters"]
    assert [d["id"] for d in mail] == [letters[5], letters[3], letters[1]]
    detail = api.request("GET", f"{BASE}/dlq/{letters[0]}").body["dead_letter"]
    assert (detail["name"], detail["payload"]) == ("boom", {"i": 0})
    assert detail["error"] == "Traceback...\nRuntimeError: boom"
    assert_error(api.request("GET", f"{BASE}/dlq/nope"), 404, "not_found")
    assert_error(api.request("POST", f"{BASE}/dlq/nope/replay"), 404, "not_found")


def test_replay_one_and_replay_all(engine: JobEngine, api: Server) -> None:
    """Replay makes a new pending job from a dead letter and deletes it; replay-all does every one (of a queue)."""
    _, first = failed_job(engine, {"i": 0})
    for i in range(3):
        failed_job(engine, {"i": i + 1}, queue="mail")
    failed_job(engine, {"i": 9})
    reply = api.request("POST", f"{BASE}/dlq/{first}/replay")
    assert reply.status == 200
    replayed = engine.get_job(reply.body["job_id"])
    assert (replayed.state, replayed.name, replayed.decoded_payload()) == (JobState.PENDING, "boom", {"i": 0})
    assert engine.store.get_dead_letter(first) is None
    mail = api.request("POST", f"{BASE}/dlq/replay-all", body={"queue": "mail"})
    assert mail.body["replayed"] == 3
    assert sorted(engine.get_job(i).decoded_payload()["i"] for i in mail.body["job_ids"]) == [1, 2, 3]
    assert [d.queue for d in engine.dlq()] == ["default"]
    rest = api.request("POST", f"{BASE}/dlq/replay-all", params={"limit": 10})
    assert rest.body["replayed"] == 1 and engine.dlq() == []
    assert_error(api.request("POST", f"{BASE}/dlq/replay-all", params={"limit": 0}), 400, "bad_parameter", "limit")


def test_replay_all_names_the_letters_whose_replay_was_refused(engine: JobEngine, api: Server) -> None:
    """A letter whose unique key another unfinished job holds is kept; replay-all names it under ``refused``."""
    job_id = engine.enqueue("boom", {"i": 1}, unique_key="report:1", priority=_top())
    claimed = claim(engine, job_id)
    letter = engine.store.fail(job_id, worker_id="w", attempts=claimed.attempts, error="boom", now=time.time())
    assert letter is not None
    _, free = failed_job(engine, {"i": 2})
    engine.enqueue("boom", {"holder": 1}, unique_key="report:1")
    reply = api.request("POST", f"{BASE}/dlq/replay-all")
    assert reply.status == 200 and reply.body["replayed"] == 1
    assert [entry["dead_letter_id"] for entry in reply.body["refused"]] == [letter.id]
    assert "report:1" in reply.body["refused"][0]["error"]
    assert [d.id for d in engine.dlq()] == [letter.id] and engine.store.get_dead_letter(free) is None


def test_purge_all_or_older_than(engine: JobEngine, api: Server) -> None:
    """POST /dlq/purge deletes every dead letter, or those older than ``older_than`` seconds (query or JSON body)."""
    for i in range(3):
        failed_job(engine, {"i": i})
    assert api.request("POST", f"{BASE}/dlq/purge", body={"older_than": 3600}).body == {"purged": 0}
    assert_error(api.request("POST", f"{BASE}/dlq/purge", params={"older_than": "-1"}), 400, "bad_parameter",
                 "older_than")  # fmt: skip
    assert_error(api.request("POST", f"{BASE}/dlq/purge", body={"older_than": "soon"}), 400, "bad_parameter",
                 "older_than")  # fmt: skip
    assert len(engine.dlq()) == 3
    assert api.request("POST", f"{BASE}/dlq/purge", body={"all": True}).body == {"purged": 3}
    assert engine.dlq() == []


def test_purge_needs_an_explicit_age_or_all(engine: JobEngine, api: Server) -> None:
    """No parameter, a null older_than, all=false or both given: 400 and nothing purged; all=true purges everything."""
    failed_job(engine, {"i": 0})
    purge = f"{BASE}/dlq/purge"
    assert_error(api.request("POST", purge), 400, "bad_parameter", "older_than")
    assert_error(api.request("POST", purge, body={}), 400, "bad_parameter", "older_than")
    assert_error(api.request("POST", purge, body={"older_than": None}), 400, "bad_parameter", "older_than")
    assert_error(api.request("POST", purge, body={"all": None}), 400, "bad_parameter", "all")
    assert_error(api.request("POST", purge, body={"all": False}), 400, "bad_parameter", "all")
    assert_error(api.request("POST", purge, body={"all": "yes"}), 400, "bad_parameter", "all")
    assert_error(api.request("POST", purge, body={"all": True, "older_than": 0}), 400, "bad_parameter", "all")
    assert len(engine.dlq()) == 1
    assert api.request("POST", purge, params={"all": "true"}).body == {"purged": 1}
    assert engine.dlq() == []


def test_dead_letter_then_replay_end_to_end_with_a_running_engine(store: Store, serve: Callable[..., Server]) -> None:
    """A job failing for real lands in the DLQ; replayed through the API, it runs again and completes."""
    attempts: list[object] = []
    done = threading.Event()

    def flaky(ctx: object, payload: object) -> object:
        attempts.append(payload)
        if len(attempts) == 1:
            raise RuntimeError("first run fails")
        done.set()
        return "ok"

    engine = JobEngine(store, poll_interval=0.01, max_poll_interval=0.05, backoff=Constant(0.01))
    engine.register("flaky", flaky, max_retries=0)
    engine.start()
    try:
        server = serve(make_wsgi_app(engine, token=TOKEN))
        job_id = engine.enqueue("flaky", {"to": "x"})
        wait_for(lambda: engine.get_job(job_id).state is JobState.FAILED, message="job failed")
        [letter] = server.request("GET", f"{BASE}/dlq").body["dead_letters"]
        assert letter["job_id"] == job_id and "first run fails" in letter["error"]
        new_id = server.request("POST", f"{BASE}/dlq/{letter['id']}/replay").body["job_id"]
        assert done.wait(10)
        wait_for(lambda: server.request("GET", f"{BASE}/jobs/{new_id}").body["job"]["state"] == "completed",
                 message="replayed job completed")  # fmt: skip
        assert server.request("GET", f"{BASE}/jobs/{new_id}").body["job"]["result"] == "ok"
        assert server.request("GET", f"{BASE}/stats").body["serving_engine"]["state"] == "running"
    finally:
        assert engine.stop(5)


# -- crons ---------------------------------------------------------------------------------------------------------


def test_crons_list_disable_and_enable(engine: JobEngine, api: Server) -> None:
    """GET /crons lists entries; disable stops every tick firing, enable lets the next one fire; names may hold '/'."""
    entry = engine.cron("*/5 * * * *", "noop", {"k": 1})
    assert "/" in entry.name
    engine.cron("@every 30s", "noop", name="simple")
    crons = api.request("GET", f"{BASE}/crons").body["crons"]
    assert [(c["name"], c["enabled"]) for c in crons] == [(entry.name, True), ("simple", True)]
    path = f"{BASE}/crons/{quote(entry.name, safe='')}"
    disabled = api.request("POST", f"{path}/disable")
    assert disabled.status == 200
    assert (disabled.body["cron"]["enabled"], disabled.body["cron"]["last_tick"]) == (False, None)
    job = JobRecord(id="cron-job", name="noop", payload="{}", created_at=time.time())
    assert not engine.store.fire_cron(entry.name, tick=time.time() + 10**6, job=job)
    assert api.request("POST", f"{path}/disable").body["cron"]["enabled"] is False  # idempotent
    assert [c["enabled"] for c in api.request("GET", f"{BASE}/crons").body["crons"]] == [False, True]
    enabled = api.request("POST", f"{path}/enable")
    assert enabled.body["cron"]["enabled"] is True
    assert engine.store.fire_cron(entry.name, tick=time.time() + 10**6, job=job)
    assert_error(api.request("POST", f"{BASE}/crons/nope/enable"), 404, "not_found")
    assert_error(api.request("GET", f"{BASE}/crons/simple/enable"), 405, "method_not_allowed")


def test_get_and_delete_one_cron(engine: JobEngine, api: Server) -> None:
    """GET /crons/{name} answers one entry; DELETE removes it (then 404); unknown names are 404; names may hold '/'."""
    entry = engine.cron("*/5 * * * *", "noop", {"k": 1})
    engine.cron("@every 30s", "noop", name="simple")
    path = f"{BASE}/crons/{quote(entry.name, safe='')}"
    got = api.request("GET", path)
    assert got.status == 200
    assert (got.body["cron"]["name"], got.body["cron"]["payload"]) == (entry.name, {"k": 1})
    assert_error(api.request("GET", f"{BASE}/crons/nope"), 404, "not_found")
    assert_error(api.request("DELETE", f"{BASE}/crons/nope"), 404, "not_found")
    deleted = api.request("DELETE", path)
    assert (deleted.status, deleted.body) == (200, {"deleted": entry.name})
    assert [c["name"] for c in api.request("GET", f"{BASE}/crons").body["crons"]] == ["simple"]
    assert_error(api.request("GET", path), 404, "not_found")
    assert_error(api.request("DELETE", path), 404, "not_found")
    routes = api.request("GET", f"{BASE}/").body["routes"]
    assert f"GET {BASE}/crons/{{name}}" in routes and f"DELETE {BASE}/crons/{{name}}" in routes


def test_dlq_count(engine: JobEngine, api: Server) -> None:
    """GET /dlq/count counts dead letters, in all queues or in one (``queue``); it is not read as a letter id."""
    assert api.request("GET", f"{BASE}/dlq/count").body == {"count": 0}
    failed_job(engine, 1)
    failed_job(engine, 2)
    failed_job(engine, 3, queue="other")
    assert api.request("GET", f"{BASE}/dlq/count").body == {"count": 3}
    assert api.request("GET", f"{BASE}/dlq/count", params={"queue": "other"}).body == {"count": 1}
    assert api.request("GET", f"{BASE}/dlq/count", params={"queue": "none"}).body == {"count": 0}
    assert_error(api.request("GET", f"{BASE}/dlq/count", params={"limit": 1}), 400, "bad_parameter", "limit")
    assert f"GET {BASE}/dlq/count" in api.request("GET", f"{BASE}/").body["routes"]


# -- queues, stats, health -----------------------------------------------------------------------------------------


def test_queues_list_pause_and_resume(engine: JobEngine, api: Server) -> None:
    """GET /queues shows known queues with counts and pause state; pause/resume change it for every engine."""
    engine.enqueue("noop", 1, queue="mail")
    assert api.request("POST", f"{BASE}/queues/mail/pause").body == {"queue": "mail", "paused": True}
    queues = {q["name"]: q for q in api.request("GET", f"{BASE}/queues").body["queues"]}
    assert set(queues) == {"default", "mail"}
    assert queues["mail"]["paused"] and not queues["default"]["paused"]
    assert queues["mail"]["counts"]["pending"] == 1
    assert engine.paused_queues() == {"mail"}
    assert api.request("POST", f"{BASE}/queues/mail/resume").body == {"queue": "mail", "paused": False}
    assert engine.paused_queues() == set()
    # A queue name outside ASCII travels percent-encoded as UTF-8.
    name = "r\u00e9sum\u00e9s/urgent"
    assert api.request("POST", f"{BASE}/queues/{quote(name, safe='')}/pause").body["queue"] == name
    assert engine.paused_queues() == {name}


def test_stats_and_health(engine: JobEngine, api: Server, store: Store) -> None:
    """GET /stats has job counts, the store kind and the serving engine's counters; /health is 200, then 503 once
    the store fails."""
    engine.enqueue("noop", 1)
    stats = api.request("GET", f"{BASE}/stats").body
    assert stats["serving_engine"]["state"] == "new"
    assert stats["counts"]["pending"] == 1
    assert stats["store"]["kind"] == type(store).__name__
    assert api.request("GET", f"{BASE}/health").body == {"status": "ok", "store": "ok", "engine": "new"}
    store.close()
    reply = api.request("GET", f"{BASE}/health")
    assert reply.status == 503 and reply.body["status"] == "unavailable"


# -- routing, methods, bodies, errors ------------------------------------------------------------------------------


def test_unknown_routes_and_wrong_methods(api: Server) -> None:
    """Unknown routes (inside or outside the base path) are JSON 404; a wrong method is 405 with Allow."""
    assert_error(api.request("GET", f"{BASE}/nope"), 404, "not_found")
    assert_error(api.request("GET", "/elsewhere"), 404, "not_found")
    assert_error(api.request("GET", f"{BASE}x/jobs"), 404, "not_found")
    reply = api.request("POST", f"{BASE}/jobs")
    assert_error(reply, 405, "method_not_allowed")
    assert reply.headers["allow"] == "GET, HEAD"
    reply = api.request("GET", f"{BASE}/dlq/purge")
    assert_error(reply, 405, "method_not_allowed")
    assert reply.headers["allow"] == "POST"
    assert_error(api.request("DELETE", f"{BASE}/jobs/abc"), 405, "method_not_allowed")
    assert api.request("GET", f"{BASE}/jobs/").status == 200  # a trailing slash is tolerated


def test_head_answers_headers_only(api: Server) -> None:
    """HEAD on a GET route answers 200 with headers and no body."""
    reply = api.request("HEAD", f"{BASE}/health")
    assert reply.status == 200 and reply.body is None
    assert reply.headers["content-type"].startswith("application/json")


def test_request_bodies_must_be_small_json_objects(engine: JobEngine, api: Server) -> None:
    """POST bodies are JSON objects (application/json); not JSON, not an object, too large, another type: refused."""
    json_type = {"Content-Type": "application/json; charset=utf-8"}
    assert_error(api.request("POST", f"{BASE}/dlq/purge", body=b"{nope", headers=json_type), 400, "bad_parameter",
                 "body")  # fmt: skip
    assert_error(api.request("POST", f"{BASE}/dlq/purge", body=[1, 2]), 400, "bad_parameter", "body")
    assert_error(api.request("POST", f"{BASE}/dlq/purge", body=b"x" * (admin_module.MAX_BODY_SIZE + 1)), 413,
                 "body_too_large")  # fmt: skip
    assert_error(api.request("POST", f"{BASE}/dlq/purge?older_than=5", body={"older_than": 6}), 400,
                 "bad_parameter", "older_than")  # fmt: skip
    assert_error(api.request("POST", f"{BASE}/dlq/purge", body={"everything": True}), 400, "bad_parameter",
                 "everything")  # fmt: skip
    assert api.request("POST", f"{BASE}/dlq/purge", body=b'{"older_than": 60}', headers=json_type).body == {
        "purged": 0
    }  # fmt: skip
    # Any other type (a form, text/plain, none at all) is what a cross-site HTML form can send: 415.
    for media in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x", None):
        headers: dict[str, str] = {} if media is None else {"Content-Type": media}
        for body in (b"older_than=3600", b'{"older_than": 60}'):
            reply = api.request("POST", f"{BASE}/dlq/purge", body=body, headers=headers)
            assert_error(reply, 415, "unsupported_media_type")


def test_unexpected_failures_answer_500_without_details(
    engine: JobEngine, api: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception inside a handler gives a JSON 500 (logged, not leaked) and the server keeps serving."""

    def broken(queue: str | None = None) -> dict[str, int]:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(engine, "counts", broken)
    reply = api.request("GET", f"{BASE}/jobs/counts")
    assert "secret" not in assert_error(reply, 500, "internal_error")
    assert "secret internals" in caplog.text
    assert api.request("GET", f"{BASE}/health").status == 200


def test_index_lists_routes_under_the_mount_point(api: Server) -> None:
    """GET on the base path lists every route with its full path."""
    routes = api.request("GET", f"{BASE}/").body["routes"]
    assert f"GET {BASE}/jobs" in routes and f"POST {BASE}/dlq/replay-all" in routes
    assert f"POST {BASE}/queues/{{name}}/pause" in routes


def test_mounting_under_a_prefix_uses_script_name(engine: JobEngine, serve: Callable[..., Server]) -> None:
    """Mounted under /admin by another WSGI app (base_path ""), or behind a SCRIPT_NAME, paths resolve right."""
    admin_app = make_wsgi_app(engine, "", token=TOKEN)

    def site(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({"site": environ["PATH_INFO"]}).encode()]

    server = serve(PrefixMount(site, "/admin", admin_app))
    assert server.request("GET", "/admin/health").body["status"] == "ok"
    assert "GET /admin/jobs" in server.request("GET", "/admin").body["routes"]
    assert server.request("GET", "/other").body == {"site": "/other"}
    assert server.request("GET", "/administrator").body == {"site": "/administrator"}
    assert_error(server.request("GET", "/admin/jobs", token=None), 401, "unauthorized")

    # An outer server that already moved "/outer" into SCRIPT_NAME: the base path follows it.
    inner = make_wsgi_app(engine, BASE, token=TOKEN)

    def outer(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        assert path.startswith("/outer")
        environ = {**environ, "SCRIPT_NAME": "/outer", "PATH_INFO": path[len("/outer") :]}
        return inner(environ, start_response)

    server = serve(outer)
    assert f"GET /outer{BASE}/stats" in server.request("GET", f"/outer{BASE}/").body["routes"]
    assert server.request("GET", f"/outer{BASE}/jobs").status == 200


def test_concurrent_requests_are_served_in_parallel(engine: JobEngine, api: Server) -> None:
    """Many clients at once all get answers (a thread per request)."""
    engine.enqueue_many("noop", list(range(30)))
    results: list[int] = []
    lock = threading.Lock()

    def client() -> None:
        reply = api.request("GET", f"{BASE}/jobs", params={"limit": 5})
        with lock:
            results.append(len(reply.body["jobs"]))

    threads = [threading.Thread(target=client) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert results == [5] * 16


# -- cross-site requests ---------------------------------------------------------------------------------------------


def test_a_cross_site_text_plain_post_cannot_purge_an_unauthenticated_api(
    engine: JobEngine, serve: Callable[..., Server]
) -> None:
    """The classic CSRF form post (text/plain JSON, from another origin) to an app without a token changes nothing."""
    failed_job(engine)
    server = serve(make_wsgi_app(engine, allow_unauthenticated=True))
    purge = f"{BASE}/dlq/purge"
    reply = server.request("POST", purge, token=None, body=b'{"older_than":0}', headers={"Content-Type": "text/plain"})
    assert_error(reply, 415, "unsupported_media_type")
    browser = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"}
    assert_error(server.request("POST", purge, token=None, body=b'{"older_than":0}', headers=browser), 403,
                 "cross_site_request")  # fmt: skip
    assert len(engine.dlq()) == 1


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "http://localhost:{port}"},  # same port, another host name: another origin
        {"Origin": "http://127.0.0.1:1"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "cross-site", "Origin": "http://127.0.0.1:{port}"},
    ],
)
def test_cross_site_browser_mutations_get_403(
    engine: JobEngine, serve: Callable[..., Server], headers: dict[str, str]
) -> None:
    """A POST whose Origin is another host:port or whose Sec-Fetch-Site is not same-origin/none: 403, nothing done."""
    server = serve(make_wsgi_app(engine, allow_unauthenticated=True))
    sent = {name: value.format(port=server.port) for name, value in headers.items()}
    reply = server.request("POST", f"{BASE}/queues/mail/pause", token=None, headers=sent)
    assert "cross-site" in assert_error(reply, 403, "cross_site_request")
    assert engine.paused_queues() == set()
    # Reading is not a mutation: a cross-site GET is still answered (the browser keeps it from the other site).
    assert server.request("GET", f"{BASE}/health", token=None, headers=sent).status == 200


def test_same_origin_and_non_browser_mutations_pass(engine: JobEngine, api: Server) -> None:
    """Same-origin browser requests (Origin equal to Host, Sec-Fetch-Site same-origin or none) and bare clients pass."""
    for headers in (
        {},
        {"Origin": f"http://127.0.0.1:{api.port}", "Sec-Fetch-Site": "same-origin"},
        {"Origin": f"HTTP://127.0.0.1:{api.port}"},
        {"Sec-Fetch-Site": "none"},
    ):
        reply = api.request("POST", f"{BASE}/queues/mail/pause", headers=headers)
        assert reply.status == 200, (headers, reply)
    origin_https = make_wsgi_app(engine, token=TOKEN).handle(
        "POST", "/queues/mail/resume", authorization=f"Bearer {TOKEN}".encode().decode("latin-1"),
        origin="https://admin.example", host="admin.example",
    )  # fmt: skip
    assert origin_https.status == 200, origin_https.json()  # no port in Host: the origin's default port


# -- hostile input: 400, never 500, never an exception out of handle() ---------------------------------------------


def _cursor(**fields: object) -> str:
    data = {"v": 1, "k": "jobs", "f": [None, None], "a": ["x", 1.0], "p": 0, **fields}
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def test_deeply_nested_json_is_a_400_not_a_recursion_error(engine: JobEngine, api: Server) -> None:
    """A 60 KB body of nested arrays (or a cursor of nested arrays): 400, and handle() itself does not raise."""
    nested = b"[" * 60_000
    assert len(nested) <= admin_module.MAX_BODY_SIZE
    json_type = {"Content-Type": "application/json"}
    assert_error(api.request("POST", f"{BASE}/dlq/purge", body=nested, headers=json_type), 400, "bad_parameter",
                 "body")  # fmt: skip
    app = make_wsgi_app(engine, allow_unauthenticated=True)
    response = app.handle("POST", "/dlq/purge", body=nested, content_type="application/json")
    assert response.status == 400
    deep_cursor = base64.urlsafe_b64encode(b"[" * 30_000).decode()
    assert app.handle("GET", "/jobs", query=urlencode({"cursor": deep_cursor})).status == 400


@pytest.mark.parametrize(
    ("path", "params", "body", "parameter"),
    [
        ("/jobs", {"cursor": _cursor(p=2**63)}, None, "cursor"),
        ("/jobs", {"cursor": _cursor(p=10**400)}, None, "cursor"),
        ("/jobs", {"cursor": _cursor(a=["x", 10**400])}, None, "cursor"),
        ("/dlq/purge", None, b'{"older_than": ' + b"9" * 400 + b"}", "older_than"),
        ("/dlq/purge", {"older_than": "9" * 400}, None, "older_than"),
        ("/dlq/purge", None, b'{"older_than": 9223372036854775808}', "older_than"),
        ("/dlq/replay-all", None, b'{"limit": ' + b"9" * 400 + b"}", "limit"),
        ("/dlq/replay-all", None, b'{"queue": "\\ud800"}', "queue"),  # a lone surrogate
        ("/jobs/counts", {"queue": "a\x00b"}, None, "queue"),
    ],
    ids=[
        "p-2**63",
        "p-400-digits",
        "anchor-400-digits",
        "json-400-digits",
        "query-400-digits",
        "json-2**63",
        "limit-400-digits",
        "surrogate",
        "nul",
    ],
)
def test_out_of_range_numbers_and_bad_text_are_400(
    api: Server, path: str, params: dict[str, object] | None, body: bytes | None, parameter: str
) -> None:
    """Cursor positions past signed 64-bit, 400-digit numbers, lone surrogates, NUL: 400 naming the parameter."""
    method = "GET" if path.startswith("/jobs") else "POST"
    headers = {"Content-Type": "application/json"} if body is not None else {}
    reply = api.request(method, f"{BASE}{path}", params=params, body=body, headers=headers)
    assert_error(reply, 400, "bad_parameter", parameter)


def test_handle_never_raises(
    engine: JobEngine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Anything unexpected anywhere in handle() or the WSGI entry: a logged JSON 500, never an exception."""
    app = make_wsgi_app(engine, allow_unauthenticated=True)

    def broken(*args: object, **kwargs: object) -> dict[str, object]:
        raise RecursionError("deep internals")

    monkeypatch.setattr(AdminApp, "_params", broken)
    response = app.handle("POST", "/dlq/purge", body=b"{}", content_type="application/json")
    assert response.status == 500 and response.json()["error"]["code"] == "internal_error"
    assert "deep internals" in caplog.text and "deep internals" not in response.body.decode()
    monkeypatch.undo()

    class FailingInput:
        def read(self, size: int = -1) -> bytes:
            raise OSError("client went away")

    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/api/dispatch/dlq/purge", "CONTENT_LENGTH": "2",
               "CONTENT_TYPE": "application/json", "wsgi.input": FailingInput()}  # fmt: skip
    assert app.handle_environ(environ).status == 400
    for length in ("-1", "x", str(2**70)):
        assert app.handle_environ({**environ, "CONTENT_LENGTH": length}).status in (400, 413)
    assert app.handle_environ({**environ, "CONTENT_LENGTH": str(admin_module.MAX_BODY_SIZE + 1)}).status == 413


def test_a_non_ascii_token_sent_as_utf8_matches(api: Server) -> None:
    """The header arrives latin-1-decoded (PEP 3333): its bytes, re-encoded, are compared with the UTF-8 token."""
    assert api.request("GET", f"{BASE}/health").status == 200  # sent as UTF-8 bytes, like curl
    latin1 = {"Authorization": f"Bearer {TOKEN}"}  # http.client encodes a str as latin-1: other bytes
    assert_error(api.request("GET", f"{BASE}/health", token=None, headers=latin1), 401, "unauthorized")


# -- the store helpers behind the admin (base-class defaults) ------------------------------------------------------


def test_list_jobs_after_matches_offset_listing_and_survives_a_lost_anchor(store: Store) -> None:
    """Keyset pages equal the offset listing; a deleted anchor resumes at the next older job; a far hint rescans."""
    engine = JobEngine(store)
    engine.register("noop", lambda ctx, payload: payload)
    ids = []
    for i in range(30):
        ids.append(engine.enqueue("noop", i))
    listing = [job.id for job in store.list_jobs(limit=100)]
    assert listing == list(reversed(ids))
    anchor = store.get(listing[9])
    assert anchor is not None
    after = (anchor.id, anchor.created_at)
    assert [j.id for j in store.list_jobs_after(after, limit=5, position=10)] == listing[10:15]
    assert [j.id for j in store.list_jobs_after(after, limit=5, position=29)] == listing[10:15]  # hint too far
    assert [j.id for j in store.list_jobs_after(after, limit=50)] == listing[10:]
    # The anchor disappears (purged): the page starts at the first job older than it.
    engine.cancel(anchor.id)
    store.purge_finished(older_than=time.time() + 60)
    assert [j.id for j in store.list_jobs_after(after, limit=3, position=10)] == listing[10:13]
    assert store.list_jobs_after(None, limit=2) == store.list_jobs(limit=2)


def test_set_cron_enabled_persists_and_refuses_unknown_names(store: Store) -> None:
    """Disabling keeps the entry (upserts keep it disabled); enabling skips missed ticks; unknown names raise."""
    engine = JobEngine(store)
    engine.register("noop", lambda ctx, payload: payload)
    entry = engine.cron("@every 30s", "noop", name="tick")
    assert engine.disable_cron("tick").enabled is False
    engine.cron("@every 30s", "noop", {"changed": True}, name="tick")  # a process re-declaring it at start
    [stored] = engine.crons()
    assert not stored.enabled and stored.to_dict()["payload"] == {"changed": True}
    now = time.time()
    enabled = engine.enable_cron("tick")
    assert enabled.enabled and enabled.last_tick is not None and enabled.last_tick >= now
    job = JobRecord(id="j1", name="noop", payload="{}", created_at=now)
    assert not store.fire_cron("tick", tick=now - 60, job=job)  # a tick missed while disabled
    assert store.fire_cron("tick", tick=time.time() + 30, job=job)
    assert entry.enabled
    with pytest.raises(JobNotFoundError):
        engine.enable_cron("nope")
