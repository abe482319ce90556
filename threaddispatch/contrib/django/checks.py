"""System checks of the ``THREADDISPATCH`` setting: what ``manage.py check`` reports, with ids and hints.

==========================  ====================================================================
``threaddispatch.E001``     ``ENGINE`` cannot be imported, or names neither a JobEngine nor a callable
``threaddispatch.E002``     the admin urls are included with token auth but ``TOKEN`` is missing
``threaddispatch.E003``     the setting itself is invalid (a bad key or value)
``threaddispatch.E004``     ``ADMIN_AUTH = "staff"`` without the apps the Django session needs
``threaddispatch.W001``     neither ``ENGINE`` nor ``STORE``: there is no engine to run or manage
==========================  ====================================================================

The checks import ``ENGINE`` (as Django imports the urls) but never call a factory nor
open a store.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from django.apps import apps
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.urls import URLPattern, URLResolver, get_resolver

from threaddispatch.contrib.django.conf import DispatchSettings, get_settings, import_engine_target
from threaddispatch.jobs import JobEngine

__all__ = ["check_settings", "check_urls"]

_ENGINE_HINT = (
    "Set THREADDISPATCH['ENGINE'] to the dotted path of your JobEngine (or of a function returning it), "
    "e.g. 'myproject.jobs.engine'."
)
_STAFF_APPS = ("django.contrib.admin", "django.contrib.auth", "django.contrib.sessions")


@checks.register()
def check_settings(app_configs: Sequence[Any] | None = None, **_kwargs: Any) -> list[checks.CheckMessage]:
    """E001, E003, E004 and W001."""
    try:
        config = get_settings()
    except ImproperlyConfigured as error:
        return [checks.Error(str(error), hint="See the keys documented in threaddispatch.contrib.django.conf.",
                             id="threaddispatch.E003")]  # fmt: skip
    found: list[checks.CheckMessage] = []
    if config.engine is not None:
        found.extend(_check_engine(config.engine))
    elif config.store is None:
        found.append(checks.Warning("settings.THREADDISPATCH has neither ENGINE nor STORE", hint=_ENGINE_HINT,
                                    id="threaddispatch.W001"))  # fmt: skip
    if config.admin_auth == "staff":
        missing = [name for name in _STAFF_APPS if not apps.is_installed(name)]
        if missing:
            found.append(checks.Error(
                f"settings.THREADDISPATCH['ADMIN_AUTH'] is 'staff' but {', '.join(missing)} is not installed",
                hint="Add it to INSTALLED_APPS (staff_member_required logs in through the Django admin), "
                     "or use ADMIN_AUTH 'token'.",
                id="threaddispatch.E004",
            ))  # fmt: skip
    return found


def _check_engine(path: str) -> list[checks.CheckMessage]:
    try:
        target = import_engine_target(path)
    except ImproperlyConfigured as error:
        return [checks.Error(str(error), hint=_ENGINE_HINT, id="threaddispatch.E001")]
    if isinstance(target, JobEngine) or callable(target):
        return []
    return [checks.Error(
        f"settings.THREADDISPATCH: ENGINE {path!r} is not a JobEngine (got {type(target).__name__})",
        hint=_ENGINE_HINT, id="threaddispatch.E001",
    )]  # fmt: skip


@checks.register(checks.Tags.urls)
def check_urls(app_configs: Sequence[Any] | None = None, **_kwargs: Any) -> list[checks.CheckMessage]:
    """E002: the admin urls are included, authenticate by token, and no TOKEN is set."""
    try:
        config = get_settings()
    except ImproperlyConfigured:
        return []  # E003 reports it
    if not _needs_token(config) or not _admin_urls_included():
        return []
    return [checks.Error(
        "settings.THREADDISPATCH has no TOKEN, but threaddispatch.contrib.django.urls is included and "
        "authenticates requests by bearer token",
        hint="Set THREADDISPATCH['TOKEN'] (from the environment, e.g. os.environ['THREADDISPATCH_TOKEN']), "
             "or ADMIN_AUTH 'staff' to let the Django admin's staff in.",
        id="threaddispatch.E002",
    )]  # fmt: skip


def _needs_token(config: DispatchSettings) -> bool:
    return config.admin_auth == "token" and config.token is None and not config.allow_unauthenticated


def _admin_urls_included() -> bool:
    from threaddispatch.contrib.django.views import admin_api

    try:
        patterns = get_resolver().url_patterns
    except ImproperlyConfigured:
        return False  # no ROOT_URLCONF: Django's own checks report it
    return any(pattern.callback is admin_api for pattern in _walk(patterns))


def _walk(patterns: Sequence[Any]) -> Iterator[URLPattern]:
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _walk(pattern.url_patterns)
        elif isinstance(pattern, URLPattern):
            yield pattern
