"""The admin app's dashboard files (served without the token, under a strict CSP) and the jobs listing's name filter."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import threaddispatch
from threaddispatch.admin import AdminApp, make_wsgi_app
from threaddispatch.jobs import JobEngine
from threaddispatch.stores import MemoryStore, Store
from threaddispatch.stores.base import JobState

pytestmark = pytest.mark.timeout(30)

TOKEN = "dash-token"
AUTH = f"Bearer {TOKEN}"
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
DASHBOARD = Path(threaddispatch.__file__).parent / "dashboard"


@pytest.fixture
def engine(store: Store) -> Iterator[JobEngine]:
    made = JobEngine(store)
    made.register("noop", lambda ctx, payload: payload)
    made.register("other", lambda ctx, payload: payload)
    yield made
    made.stop(5)


@pytest.fixture
def app() -> Iterator[AdminApp]:
    made = JobEngine(MemoryStore())
    yield make_wsgi_app(made, token=TOKEN)
    made.stop(5)


def test_a_browser_gets_the_page_without_the_token(app: AdminApp) -> None:
    answer = app.handle("GET", "/", accept=BROWSER, script_name="/api/dispatch")
    headers = dict(answer.headers)
    assert answer.status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Vary"] == "Accept"
    policy = headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy
    page = answer.body.decode()
    assert 'src="/api/dispatch/ui/dashboard.js"' in page and 'data-base="/api/dispatch"' in page


def test_the_page_has_no_inline_script_nor_handler(app: AdminApp) -> None:
    page = app.handle("GET", "/", accept=BROWSER).body.decode()
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page, re.S)
    assert scripts and all('src="' in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"\son[a-z]+\s*=", page)


def test_the_script_never_renders_html() -> None:
    source = (DASHBOARD / "dashboard.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in source


def test_the_page_knows_every_job_state(app: AdminApp) -> None:
    states = [state.value for state in JobState]
    script = re.search(r"const STATES = \[(.*?)\];", (DASHBOARD / "dashboard.js").read_text())
    assert script is not None
    assert sorted(re.findall(r'"(\w+)"', script.group(1))) == sorted(states)  # the count cards and queue columns
    page = app.handle("GET", "/", accept=BROWSER).body.decode()
    select = re.search(r'<select id="filter-state".*?</select>', page, re.S)
    assert select is not None
    assert sorted(re.findall(r"<option>(\w+)</option>", select.group(0))) == sorted(states)
    head = re.search(r'<table id="queues"><thead>(.*?)</thead>', page, re.S)
    assert head is not None and len(re.findall(r"<th>", head.group(1))) == len(states) + 3  # queue, state, action


@pytest.mark.parametrize(
    "accept", [None, "*/*", "application/json", "application/json, text/html;q=0.5", "text/html;q=0, */*"]
)
def test_api_clients_keep_the_route_list(app: AdminApp, accept: str | None) -> None:
    assert app.handle("GET", "/", accept=accept).status == 401
    answer = app.handle("GET", "/", accept=accept, authorization=AUTH)
    assert answer.status == 200 and "routes" in answer.json()


def test_a_browser_with_the_token_still_gets_the_page(app: AdminApp) -> None:
    answer = app.handle("GET", "/", accept=BROWSER, authorization=AUTH)
    assert answer.status == 200 and answer.body.startswith(b"<!doctype html>")


@pytest.mark.parametrize(("name", "kind"), [("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")])
def test_assets_need_no_token(app: AdminApp, name: str, kind: str) -> None:
    answer = app.handle("GET", f"/ui/{name}")
    headers = dict(answer.headers)
    assert answer.status == 200
    assert headers["Content-Type"].startswith(kind) and headers["X-Content-Type-Options"] == "nosniff"
    assert answer.body == (DASHBOARD / name).read_bytes()


@pytest.mark.parametrize("path", ["/ui/", "/ui/index.html", "/ui/../admin.py", "/ui/dashboard.js/x", "/ui/other.js"])
def test_other_paths_need_the_token(app: AdminApp, path: str) -> None:
    assert app.handle("GET", path, accept=BROWSER).status == 401
    assert app.handle("GET", path, accept=BROWSER, authorization=AUTH).status == 404


def test_assets_answer_get_and_head_only(app: AdminApp) -> None:
    assert app.handle("POST", "/ui/dashboard.js").status == 401
    assert app.handle("HEAD", "/ui/dashboard.js").status == 200


def test_over_wsgi_at_the_base_path_with_and_without_slash(app: AdminApp) -> None:
    for path in ("/api/dispatch", "/api/dispatch/"):
        answer = app.handle_environ({"REQUEST_METHOD": "GET", "PATH_INFO": path, "HTTP_ACCEPT": BROWSER})
        assert answer.status == 200
        assert b'src="/api/dispatch/ui/dashboard.js"' in answer.body
    asset = app.handle_environ({"REQUEST_METHOD": "GET", "PATH_INFO": "/api/dispatch/ui/dashboard.css"})
    assert asset.status == 200


def test_the_mount_prefix_is_escaped_in_the_page() -> None:
    engine = JobEngine(MemoryStore())
    app = make_wsgi_app(engine, "", token=TOKEN)
    environ = {"REQUEST_METHOD": "GET", "SCRIPT_NAME": '/a"b<c>', "PATH_INFO": "/", "HTTP_ACCEPT": BROWSER}
    page = app.handle_environ(environ).body.decode()
    assert 'data-base="/a&quot;b&lt;c&gt;"' in page and '"b<c>' not in page


# -- the jobs listing by name ---------------------------------------------------------------------------


def test_jobs_filtered_by_name_page_through_every_match(engine: JobEngine) -> None:
    app = make_wsgi_app(engine, token=TOKEN)
    named = [engine.enqueue("noop", i) for i in range(7)]
    others = [engine.enqueue("other", i) for i in range(5)]
    seen: list[str] = []
    cursor: str | None = None
    while True:
        query = "name=noop&limit=3" + (f"&cursor={cursor}" if cursor else "")
        answer = app.handle("GET", "/jobs", query=query, authorization=AUTH)
        assert answer.status == 200
        data = answer.json()
        assert {job["name"] for job in data["jobs"]} <= {"noop"}
        seen.extend(job["id"] for job in data["jobs"])
        cursor = data["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(named) and len(seen) == len(named)
    everything = app.handle("GET", "/jobs", authorization=AUTH).json()["jobs"]
    assert {job["id"] for job in everything} == {*named, *others}


def test_the_name_filter_scans_past_a_store_chunk(engine: JobEngine) -> None:
    from threaddispatch import _admin_handlers

    app = make_wsgi_app(engine, token=TOKEN)
    wanted = engine.enqueue("other", "first")  # the oldest: behind more than a chunk of other jobs
    engine.enqueue_many("noop", list(range(_admin_handlers._NAME_SCAN_CHUNK + 20)))
    answer = app.handle("GET", "/jobs", query="name=other&state=pending", authorization=AUTH)
    assert [job["id"] for job in answer.json()["jobs"]] == [wanted]


def test_a_cursor_of_another_name_is_refused(engine: JobEngine) -> None:
    app = make_wsgi_app(engine, token=TOKEN)
    for i in range(3):
        engine.enqueue("noop", i)
    cursor = app.handle("GET", "/jobs", query="name=noop&limit=1", authorization=AUTH).json()["next_cursor"]
    answer = app.handle("GET", "/jobs", query=f"name=other&limit=1&cursor={cursor}", authorization=AUTH)
    assert answer.status == 400 and answer.json()["error"]["parameter"] == "cursor"


@pytest.mark.parametrize("name", ["", " noop", "a\x00b"])
def test_a_bad_name_is_refused(app: AdminApp, name: str) -> None:
    from urllib.parse import quote

    answer = app.handle("GET", "/jobs", query=f"name={quote(name)}", authorization=AUTH)
    assert answer.status == 400 and answer.json()["error"]["parameter"] == "name"
