"""Mount paths a request cannot reach are refused at configuration: the admin app's base_path, the Flask
``THREADDISPATCH_ADMIN_PATH`` and PrefixMount's prefix (a request's path arrives decoded: ``"/ap%69"`` never
matches; a NUL or a ``..`` segment is never meant)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from threaddispatch import JobEngine
from threaddispatch.admin import make_wsgi_app
from threaddispatch.contrib._mount import PrefixMount, check_prefix
from threaddispatch.errors import ConfigurationError
from threaddispatch.stores import MemoryStore

pytestmark = pytest.mark.timeout(30)

UNREACHABLE = [
    "/ap%69",
    "/api\x00",
    "/api/../x",
    "/api/./x",
    "/a//b",
    "/a b",
    "/a?b",
    "/a#b",
    "/a\\b",
    "/x\ud800",
    "/a\u200b",
]
REACHABLE = ["/api/dispatch", "/api/dispatch/", "/café/ops", "/ops:admin@host", "/a-b_c.d~e"]


@pytest.fixture
def engine() -> Iterator[JobEngine]:
    made = JobEngine(MemoryStore())
    yield made
    made.stop(5)


@pytest.mark.parametrize("path", UNREACHABLE)
def test_an_unreachable_base_path_is_refused_naming_it(engine: JobEngine, path: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(repr(path))):
        make_wsgi_app(engine, path, token="t")


@pytest.mark.parametrize("path", REACHABLE)
def test_a_reachable_base_path_is_kept(engine: JobEngine, path: str) -> None:
    assert make_wsgi_app(engine, path, token="t").base_path == path.rstrip("/")


@pytest.mark.parametrize("path", UNREACHABLE)
def test_an_unreachable_prefix_is_refused_naming_it(path: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(repr(path))):
        check_prefix("prefix", path)
    with pytest.raises(ConfigurationError, match="prefix"):
        PrefixMount(lambda environ, start: [], path, lambda environ, start: [])


@pytest.mark.parametrize("path", REACHABLE)
def test_a_reachable_prefix_is_kept(path: str) -> None:
    assert check_prefix("prefix", path) == path.rstrip("/")


@pytest.mark.parametrize("path", ["/ap%69", "/api\x00", "/api/../x"])
def test_flask_refuses_an_unreachable_admin_path(tmp_path: Path, path: str) -> None:
    flask = pytest.importorskip("flask")
    from threaddispatch.contrib.flask import ThreadDispatch

    app = flask.Flask("shop")
    app.config.update(
        THREADDISPATCH_STORE=f"sqlite:///{tmp_path / 'jobs.db'}",
        THREADDISPATCH_ADMIN_PATH=path,
        THREADDISPATCH_TOKEN="t",
    )
    with pytest.raises(ConfigurationError, match="THREADDISPATCH_ADMIN_PATH"):
        ThreadDispatch(app)
