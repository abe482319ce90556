"""A fresh Flask app for the real-server tests: ``create_app()`` reads its directory from ``SHOP_DIR``.

``POST /orders/<n>`` enqueues the job ``record`` (``{"n": n}``), whose handler writes one
row per run into ``<SHOP_DIR>/runs.db``; the admin API is at ``/ops/dispatch`` (token "tok").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flask import Flask

from tests.apps import record_run
from threaddispatch.contrib.flask import ThreadDispatch


def create_app() -> Flask:
    directory = Path(os.environ["SHOP_DIR"])
    app = Flask("flask_shop")
    app.config.update(
        THREADDISPATCH_STORE=f"sqlite:///{directory / 'jobs.db'}",
        THREADDISPATCH_ENGINE_OPTIONS={"poll_interval": 0.02, "max_poll_interval": 0.2},
        THREADDISPATCH_ADMIN_PATH="/ops/dispatch",
        THREADDISPATCH_TOKEN="tok",
    )
    dispatch = ThreadDispatch(app)
    runs = directory / "runs.db"

    @dispatch.engine.job("record")
    def record(ctx: Any, payload: dict[str, int]) -> int:
        record_run(runs, payload["n"])
        return payload["n"]

    @app.post("/orders/<int:n>")
    def order(n: int) -> dict[str, Any]:
        return {"job": dispatch.engine.enqueue("record", {"n": n}), "pid": os.getpid()}

    return app
