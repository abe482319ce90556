"""The ``THREADDISPATCH`` setting of the Django app, and the engine and admin app it describes.

Keys of the ``THREADDISPATCH`` dict (all optional, but the engine needs ENGINE or STORE):

- ``ENGINE``: dotted path of the project's :class:`~threaddispatch.jobs.JobEngine`, or of
  a callable taking no argument that returns one. The worker command needs it: the
  jobs must be registered.
- ``STORE``: a store URL; without ``ENGINE`` an engine is made on it (enough for the
  admin API, which only manages the store).
- ``ENGINE_OPTIONS``: keyword arguments for that engine (dict).
- ``TOKEN``: the admin API's bearer token; required by the urls unless
  ``ALLOW_UNAUTHENTICATED`` is true or ``ADMIN_AUTH`` is ``"staff"``.
- ``ADMIN_AUTH``: who authenticates requests to the urls. ``"token"`` (the default): the
  bearer token. ``"staff"``: Django's session, as for the Django admin: the view is wrapped
  in ``staff_member_required`` (others are redirected to the admin login), CSRF-protected
  like any session view, and no token is used (``django.contrib.admin``, ``auth`` and
  ``sessions`` must be installed).
- ``AUTODISCOVER``: import the ``tasks`` module of every installed app at startup, so that
  the jobs they register exist in every process (the web's and the worker's), as celery
  and huey do; ``True`` (the default), ``False``, or another module name.
- ``EXIT_TIMEOUT``: seconds the exit drain may take (process-wide).
- ``QUEUES`` / ``CONCURRENCY``: defaults of the ``threaddispatch_worker`` command.

The engine and the admin app are made on first use and cached (thread-safe); changing
the setting (``override_settings`` in tests) drops them.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.utils.module_loading import import_string

from threaddispatch import _lifecycle
from threaddispatch.backoff import check_seconds
from threaddispatch.errors import ConfigurationError
from threaddispatch.jobs import JobEngine
from threaddispatch.stores import Store, open_store

if TYPE_CHECKING:  # imported by get_admin_app: a project that mounts no admin API never loads it
    from threaddispatch.admin import AdminApp

__all__ = [
    "DispatchSettings",
    "apply_settings",
    "get_admin_app",
    "get_engine",
    "get_settings",
    "import_engine_target",
    "reset",
]

SETTING = "THREADDISPATCH"
_KEYS = frozenset({
    "ENGINE", "STORE", "ENGINE_OPTIONS", "TOKEN", "ALLOW_UNAUTHENTICATED", "EXIT_TIMEOUT", "QUEUES", "CONCURRENCY",
    "ADMIN_AUTH", "AUTODISCOVER",
})  # fmt: skip
#: The values of ``ADMIN_AUTH``.
ADMIN_AUTH_MODES = ("token", "staff")


@dataclass(frozen=True)
class DispatchSettings:
    """The ``THREADDISPATCH`` setting, checked. Immutable."""

    engine: str | None = None
    store: str | None = None
    engine_options: Mapping[str, Any] | None = None
    token: str | None = None
    allow_unauthenticated: bool = False
    exit_timeout: float | None = None
    queues: tuple[str, ...] | None = None
    concurrency: int | None = None
    admin_auth: str = "token"
    autodiscover: str | None = "tasks"


def _fail(message: str) -> ImproperlyConfigured:
    return ImproperlyConfigured(f"settings.{SETTING}: {message}")


def get_settings() -> DispatchSettings:
    """Read and check ``settings.THREADDISPATCH``; raises ImproperlyConfigured naming a bad key."""
    raw = getattr(settings, SETTING, {})
    if not isinstance(raw, Mapping):
        raise _fail(f"must be a dict, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise _fail(f"unknown key {unknown[0]!r}; known: {', '.join(sorted(_KEYS))}")
    for key in ("ENGINE", "STORE", "TOKEN"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise _fail(f"{key} must be a non-empty str, got {type(value).__name__}")  # never echo a token or DSN
    options = raw.get("ENGINE_OPTIONS")
    if options is not None and not isinstance(options, Mapping):
        raise _fail(f"ENGINE_OPTIONS must be a dict, got {options!r}")
    exit_timeout = raw.get("EXIT_TIMEOUT")
    if exit_timeout is not None:
        try:
            exit_timeout = check_seconds("EXIT_TIMEOUT", exit_timeout)
        except ConfigurationError as error:
            raise _fail(str(error)) from None
    queues = raw.get("QUEUES")
    if queues is not None and (
        isinstance(queues, str) or not isinstance(queues, (list, tuple)) or not queues
        or not all(isinstance(q, str) and q for q in queues)
    ):  # fmt: skip
        raise _fail(f"QUEUES must be a non-empty list of queue names, got {queues!r}")
    concurrency = raw.get("CONCURRENCY")
    if concurrency is not None and (
        isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
    ):
        raise _fail(f"CONCURRENCY must be an int >= 1, got {concurrency!r}")
    return DispatchSettings(
        admin_auth=_admin_auth(raw),
        autodiscover=_autodiscover(raw),
        engine=raw.get("ENGINE"),
        store=raw.get("STORE"),
        engine_options=options,
        token=raw.get("TOKEN"),
        allow_unauthenticated=bool(raw.get("ALLOW_UNAUTHENTICATED", False)),
        exit_timeout=exit_timeout,
        queues=None if queues is None else tuple(queues),
        concurrency=concurrency,
    )


def _admin_auth(raw: Mapping[str, Any]) -> str:
    auth = raw.get("ADMIN_AUTH", "token")
    if auth not in ADMIN_AUTH_MODES:
        raise _fail(f"ADMIN_AUTH must be 'token' or 'staff', got {auth!r}")
    if auth == "staff" and raw.get("TOKEN") is not None:
        raise _fail("TOKEN is not used with ADMIN_AUTH 'staff' (the Django session decides): remove one of the two")
    return str(auth)


def _autodiscover(raw: Mapping[str, Any]) -> str | None:
    value = raw.get("AUTODISCOVER", True)
    if value is True:
        return "tasks"
    if value is False:
        return None
    if not isinstance(value, str) or not value.isidentifier():
        raise _fail(f"AUTODISCOVER must be True, False or a module name like 'tasks', got {value!r}")
    return value


def apply_settings() -> DispatchSettings:
    """Check the setting and apply ``EXIT_TIMEOUT`` (called by the app's ``ready()``)."""
    config = get_settings()
    if config.exit_timeout is not None:
        _lifecycle.set_exit_timeout(config.exit_timeout)
    return config


# _lock guards the three cached objects below.
_lock = threading.Lock()
_engine: JobEngine | None = None
_owned_store: Store | None = None
_admin: AdminApp | None = None


def import_engine_target(path: str) -> object:
    """What the ENGINE path names (imported, not called); raises ImproperlyConfigured when it cannot be imported."""
    try:
        return import_string(path)
    except ImportError as error:
        raise _fail(f"ENGINE {path!r} cannot be imported: {error}") from None


def _make_engine(config: DispatchSettings) -> tuple[JobEngine, Store | None]:
    if config.engine is not None:
        target = import_engine_target(config.engine)
        engine = target if isinstance(target, JobEngine) else target() if callable(target) else target
        if not isinstance(engine, JobEngine):
            raise _fail(f"ENGINE {config.engine!r} is not a JobEngine (got {type(engine).__name__})")
        return engine, None
    if config.store is None:
        raise _fail("set ENGINE (dotted path of your JobEngine) or STORE (a store URL)")
    try:
        store = open_store(config.store)
    except ConfigurationError as error:
        raise _fail(f"STORE: {error}") from None
    try:
        return JobEngine(store, **dict(config.engine_options or {})), store
    except (ConfigurationError, TypeError) as error:
        store.close()
        raise _fail(f"ENGINE_OPTIONS: {error}") from None


def get_engine() -> JobEngine:
    """The project's engine (made on first call, then cached). Raises ImproperlyConfigured.

    Thread-safe; the first call may block to open the store.
    """
    global _engine, _owned_store
    with _lock:
        if _engine is None:
            _engine, _owned_store = _make_engine(get_settings())
        return _engine


def get_admin_app() -> AdminApp:
    """The admin app over :func:`get_engine` (cached), for the urls. Raises ImproperlyConfigured."""
    global _admin
    from threaddispatch.admin import make_wsgi_app

    engine = get_engine()
    with _lock:
        if _admin is None or _admin.engine is not engine:
            config = get_settings()
            try:
                _admin = make_wsgi_app(
                    engine, "", config.token,
                    allow_unauthenticated=config.allow_unauthenticated or config.admin_auth == "staff",
                )  # fmt: skip
            except ConfigurationError as error:
                raise _fail(f"TOKEN: {error}") from None
        return _admin


def reset() -> None:
    """Drop the cached engine and admin app; close a store this module opened (stop its engine first)."""
    global _engine, _owned_store, _admin
    with _lock:
        engine, store = _engine, _owned_store
        _engine = _owned_store = _admin = None
    if store is not None:
        if engine is not None:
            engine.stop()
        store.close()


def _on_setting_changed(*, setting: str, **_kwargs: Any) -> None:
    if setting == SETTING:
        reset()


setting_changed.connect(_on_setting_changed, dispatch_uid="threaddispatch-settings")
