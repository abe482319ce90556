"""Flask integration: ``ThreadDispatch(app)`` gives an app its job engine, background dispatchers and admin API.

.. code-block:: python

    app = Flask(__name__)
    app.config.update(THREADDISPATCH_STORE="sqlite:///jobs.db", THREADDISPATCH_TOKEN="...",
                      THREADDISPATCH_ADMIN_PATH="/api/dispatch")
    dispatch = ThreadDispatch(app)          # or ThreadDispatch() then dispatch.init_app(app)
    dispatch.engine.enqueue("send_email", {...})
    audit = dispatch.background(send_audit_rows, ms_delay=200)

Configuration keys (``app.config``):

- ``THREADDISPATCH_STORE``: the store URL of the engine (unless ``engine=`` is given).
- ``THREADDISPATCH_ENGINE_OPTIONS``: keyword arguments for that ``JobEngine`` (dict).
- ``THREADDISPATCH_ADMIN_PATH``: serve the admin API (and its dashboard) there, e.g.
  ``/api/dispatch``, as the Blueprint ``threaddispatch`` (endpoint ``threaddispatch.api``,
  listed by ``flask routes``); unset or empty: not served.
- ``THREADDISPATCH_ADMIN_AUTH``: who authenticates admin requests. ``"token"`` (the
  default): the bearer token ``THREADDISPATCH_TOKEN``. ``"app"``: the app's own
  ``before_request`` functions (app-wide, or registered for the blueprint with
  ``app.before_request_funcs.setdefault("threaddispatch", []).append(fn)``) decide, as
  for any other view, and no token is used; a request is refused (403) while the app
  has no ``before_request`` function at all, so that the admin is never left open by mistake.
- ``THREADDISPATCH_TOKEN``: the admin API's bearer token (required with ``"token"``, unless
  ``THREADDISPATCH_ALLOW_UNAUTHENTICATED`` is true: then protect the prefix with your own
  authentication). The admin app refuses cross-site browser mutations and non-JSON bodies
  itself, see :mod:`threaddispatch.admin`, since Flask has no CSRF protection of its own.
- ``THREADDISPATCH_EXIT_TIMEOUT``: seconds the exit drain may take
  (:func:`threaddispatch.set_exit_timeout`, process-wide).

The engine's workers are not started here: run ``flask threaddispatch worker`` (the CLI
group ``init_app`` adds to ``app.cli``: ``worker --queues a,b --concurrency N --log-level
LEVEL``, ``jobs list``), ``threaddispatch worker module:engine``, or call
``dispatch.engine.start()``. At interpreter exit (or :meth:`ThreadDispatch.close`)
the dispatchers made by :meth:`ThreadDispatch.background` are flushed and closed, and a
store opened from ``THREADDISPATCH_STORE`` is closed after the engine stopped.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from flask import Blueprint, Flask, Response, current_app, has_app_context, request

from threaddispatch import _lifecycle
from threaddispatch.backoff import check_seconds
from threaddispatch.contrib._flask_cli import cli_group
from threaddispatch.contrib._mount import check_prefix
from threaddispatch.errors import ConfigurationError
from threaddispatch.jobs import JobEngine
from threaddispatch.stores import Store, open_store

if TYPE_CHECKING:  # at run time imported where used: an app without the admin API nor dispatchers loads neither
    from threaddispatch.admin import AdminApp
    from threaddispatch.background import BackgroundDispatcher

__all__ = ["BLUEPRINT_NAME", "EXTENSION_KEY", "ThreadDispatch", "current_engine"]

T = TypeVar("T")

#: Where the per-app state lives: ``app.extensions[EXTENSION_KEY]``.
EXTENSION_KEY = "threaddispatch"
#: The name of the admin API's Blueprint (its endpoint is ``threaddispatch.api``).
BLUEPRINT_NAME = "threaddispatch"
#: The values of ``THREADDISPATCH_ADMIN_AUTH``.
ADMIN_AUTH_MODES = ("token", "app")
_ADMIN_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]  # HEAD and OPTIONS: Flask adds them

_KNOWN_KEYS = frozenset({
    "THREADDISPATCH_STORE", "THREADDISPATCH_ENGINE_OPTIONS", "THREADDISPATCH_ADMIN_PATH", "THREADDISPATCH_TOKEN",
    "THREADDISPATCH_ALLOW_UNAUTHENTICATED", "THREADDISPATCH_EXIT_TIMEOUT", "THREADDISPATCH_ADMIN_AUTH",
})  # fmt: skip
_serial = itertools.count(1)


class _AppState:
    """What the extension holds for one app; takes part in the exit drain (after the engines).

    ``_lock`` guards ``dispatchers`` and ``closed``.
    """

    # Drained after components of order 0 (engines, dispatchers): the store closes last.
    _drain_order = 1

    def __init__(self, app_name: str, engine: JobEngine | None, owned_store: Store | None) -> None:
        self.app_name = app_name
        self.engine = engine
        self.owned_store = owned_store
        self.admin: AdminApp | None = None
        self.admin_prefix = ""
        self.admin_auth = "token"
        self.dispatchers: list[BackgroundDispatcher[Any]] = []
        self.closed = False
        self._lock = threading.Lock()
        _lifecycle.register(self)

    def add(self, dispatcher: BackgroundDispatcher[Any]) -> None:
        with self._lock:
            if self.closed:
                dispatcher.close(0)
                raise ConfigurationError(f"ThreadDispatch of app {self.app_name!r} is closed")
            self.dispatchers.append(dispatcher)

    def close(self, timeout: float | None) -> tuple[int, int, bool]:
        """Flush and close the dispatchers, stop the engine if it runs, close an owned store.

        Returns (entries delivered, entries lost, whether every close was clean).
        """
        deadline = None if timeout is None else time.monotonic() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        with self._lock:
            self.closed = True
            dispatchers, self.dispatchers = self.dispatchers, []
        pending = sum(d.stats()["pending"] + d.stats()["in_flight"] for d in dispatchers)
        clean = [dispatcher.close(remaining()) for dispatcher in dispatchers]
        lost = sum(d.stats()["pending"] + d.stats()["in_flight"] for d in dispatchers)
        engine = self.engine
        if engine is not None and engine.running:
            clean.append(engine.stop(remaining()))
        if self.owned_store is not None:
            self.owned_store.close()
        _lifecycle.unregister(self)
        return pending - lost, lost, all(clean)

    def _drain_at_exit(self, deadline: float) -> tuple[int, int]:
        delivered, lost, _ = self.close(max(0.0, deadline - time.monotonic()))
        return delivered, lost

    def _reset_after_fork(self) -> None:
        # The dispatchers and the engine reset themselves in the child; nothing is ours to drop.
        return


class ThreadDispatch:
    """The Flask extension: one :class:`~threaddispatch.jobs.JobEngine` and its admin API per app.

    ``engine`` (optional) is used for every app; otherwise each app gets an engine on
    the store of its ``THREADDISPATCH_STORE``. One extension object may serve several
    apps (``init_app`` each); its properties then resolve the current app. Thread-safe.
    """

    def __init__(self, app: Flask | None = None, *, engine: JobEngine | None = None) -> None:
        if engine is not None and not isinstance(engine, JobEngine):
            raise ConfigurationError(f"engine must be a JobEngine, got {engine!r}")
        self._engine = engine
        self._app = app
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read ``app.config``, build the engine and mount the admin API; call once per app.

        Opening a SQLite store creates its file and schema: blocks for that. Raises
        ConfigurationError for a bad or incomplete configuration.
        """
        if EXTENSION_KEY in app.extensions:
            raise ConfigurationError(f"ThreadDispatch is already initialised on app {app.name!r}")
        config = app.config
        unknown = sorted(k for k in config if k.startswith("THREADDISPATCH_") and k not in _KNOWN_KEYS)
        if unknown:
            raise ConfigurationError(f"unknown Flask config key {unknown[0]}; known: {', '.join(sorted(_KNOWN_KEYS))}")
        exit_timeout = config.get("THREADDISPATCH_EXIT_TIMEOUT")
        if exit_timeout is not None:
            _lifecycle.set_exit_timeout(check_seconds("THREADDISPATCH_EXIT_TIMEOUT", exit_timeout))
        engine, owned = self._engine, None
        url = config.get("THREADDISPATCH_STORE")
        if engine is None and url:
            options = config.get("THREADDISPATCH_ENGINE_OPTIONS") or {}
            if not isinstance(options, Mapping):
                raise ConfigurationError(f"THREADDISPATCH_ENGINE_OPTIONS must be a dict, got {options!r}")
            owned = open_store(url)
            try:
                engine = JobEngine(owned, **options)
            except BaseException:
                owned.close()
                raise
        state = _AppState(app.name, engine, owned)
        try:
            self._mount(app, state)
            app.cli.add_command(cli_group(current_engine))
        except BaseException:
            state.close(0)
            raise
        app.extensions[EXTENSION_KEY] = state

    @staticmethod
    def _mount(app: Flask, state: _AppState) -> None:
        config = app.config
        path = config.get("THREADDISPATCH_ADMIN_PATH")
        if not path:
            return
        prefix = check_prefix("THREADDISPATCH_ADMIN_PATH", path)
        if state.engine is None:
            raise ConfigurationError(
                "THREADDISPATCH_ADMIN_PATH needs an engine: set THREADDISPATCH_STORE or pass ThreadDispatch(engine=...)"
            )
        auth = _admin_auth(config)
        token = config.get("THREADDISPATCH_TOKEN") or None
        if auth == "app" and token is not None:
            raise ConfigurationError(
                "THREADDISPATCH_TOKEN is not used with THREADDISPATCH_ADMIN_AUTH='app' (the app's before_request "
                "decides): remove one of the two"
            )
        from threaddispatch.admin import make_wsgi_app

        try:
            state.admin = make_wsgi_app(
                state.engine, "", token,
                allow_unauthenticated=auth == "app" or bool(config.get("THREADDISPATCH_ALLOW_UNAUTHENTICATED", False)),
            )  # fmt: skip
        except ConfigurationError as error:
            raise ConfigurationError(f"{error} (Flask config THREADDISPATCH_TOKEN)") from None
        state.admin_prefix, state.admin_auth = prefix, auth
        app.register_blueprint(_admin_blueprint(), url_prefix=prefix)

    def _state(self) -> _AppState:
        if has_app_context():
            app = current_app._get_current_object()  # type: ignore[attr-defined]
        elif self._app is not None:
            app = self._app
        else:
            raise RuntimeError("ThreadDispatch: no app (use it inside an app context, or pass the app)")
        return _app_state(app)

    @property
    def engine(self) -> JobEngine:
        """The app's job engine. Raises ConfigurationError when none is configured."""
        engine = self._state().engine
        if engine is None:
            raise ConfigurationError("no job engine: set THREADDISPATCH_STORE or pass ThreadDispatch(engine=...)")
        return engine

    @property
    def admin_app(self) -> AdminApp | None:
        """The mounted admin WSGI app, or None when ``THREADDISPATCH_ADMIN_PATH`` is unset."""
        return self._state().admin

    def background(self, send_batch: Callable[[list[T]], object], ms_delay: float = 100, **options: Any,
                   ) -> BackgroundDispatcher[T]:  # fmt: skip
        """A new :class:`~threaddispatch.BackgroundDispatcher` owned by the app: flushed and closed at exit.

        Takes the dispatcher's arguments; ``name`` defaults to ``flask-<app>-<n>``.
        Non-blocking (starts the dispatcher's thread on first use).
        """
        from threaddispatch.background import BackgroundDispatcher

        state = self._state()
        options.setdefault("name", f"flask-{state.app_name}-{next(_serial)}")
        dispatcher: BackgroundDispatcher[T] = BackgroundDispatcher(send_batch, ms_delay, **options)
        state.add(dispatcher)
        return dispatcher

    def close(self, timeout: float | None = None) -> bool:
        """Flush and close the app's dispatchers, stop its engine if running, close a store it opened.

        Idempotent. Blocks up to ``timeout`` seconds in total (None: no limit). Returns
        whether everything was delivered (and the engine stopped cleanly) in time.
        """
        return self._state().close(timeout)[2]

    def __repr__(self) -> str:
        return f"<ThreadDispatch engine={self._engine!r}>"


def current_engine() -> JobEngine:
    """The engine of the current Flask app (inside an app context, as ``flask`` commands run).

    Takes no argument: ``flask threaddispatch worker`` hands it, by name, to the CLI worker,
    which calls it inside the command's app context. Raises RuntimeError outside an app
    context or before ``init_app``, ConfigurationError when the app has no engine.
    """
    if not has_app_context():
        raise RuntimeError("current_engine() needs a Flask app context")
    state = _app_state(current_app._get_current_object())  # type: ignore[attr-defined]
    if state.engine is None:
        raise ConfigurationError("no job engine: set THREADDISPATCH_STORE or pass ThreadDispatch(engine=...)")
    return state.engine


def _app_state(app: Flask) -> _AppState:
    state = app.extensions.get(EXTENSION_KEY)
    if not isinstance(state, _AppState):
        raise RuntimeError(f"ThreadDispatch is not initialised on app {app.name!r}: call init_app(app)")
    return state


def _admin_auth(config: Mapping[str, Any]) -> str:
    auth = config.get("THREADDISPATCH_ADMIN_AUTH") or "token"
    if auth not in ADMIN_AUTH_MODES:
        raise ConfigurationError(f"THREADDISPATCH_ADMIN_AUTH must be 'token' or 'app', got {auth!r}")
    return str(auth)


def _admin_blueprint() -> Blueprint:
    """A new Blueprint (one per app) whose one view hands every request below the prefix to the admin app."""
    blueprint = Blueprint(BLUEPRINT_NAME, __name__)
    for rule in ("", "/", "/<path:path>"):
        blueprint.add_url_rule(rule, "api", _admin_view, methods=_ADMIN_METHODS, strict_slashes=False)
    return blueprint


def _admin_view(path: str = "") -> Response:
    """Answer one admin request: the request's WSGI environ, remounted below the prefix, goes to the admin app.

    Runs after the app's ``before_request`` functions, like any view. Blocks for the admin
    app's store calls.
    """
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    state = _app_state(app)
    admin = state.admin
    if admin is None:  # the blueprint is registered only with an admin app: an app copied without its state
        return Response(status=404)
    if state.admin_auth == "app" and not _has_before_request(app):
        return _refuse_unguarded()
    environ = dict(request.environ)
    full = str(environ.get("PATH_INFO", "") or "")
    environ["SCRIPT_NAME"] = str(environ.get("SCRIPT_NAME", "")) + state.admin_prefix
    # PATH_INFO is the request's bytes as latin-1 (PEP 3333); Flask's ``path`` is decoded text: re-encoded so.
    environ["PATH_INFO"] = (
        full[len(state.admin_prefix) :]
        if full.startswith(state.admin_prefix)
        else "/" + path.encode("utf-8", "surrogatepass").decode("latin-1")
    )
    answer = admin.handle_environ(environ)
    return Response(answer.body, status=answer.status, headers=list(answer.headers))


def _has_before_request(app: Flask) -> bool:
    funcs = app.before_request_funcs
    return bool(funcs.get(None)) or bool(funcs.get(BLUEPRINT_NAME))


def _refuse_unguarded() -> Response:
    message = (
        "THREADDISPATCH_ADMIN_AUTH is 'app' but the app has no before_request function to authenticate admin requests"
    )
    body = json.dumps({"error": {"code": "forbidden", "message": message}})
    return Response(body, status=403, content_type="application/json")
