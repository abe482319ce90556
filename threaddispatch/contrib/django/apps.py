"""The Django app config of :mod:`threaddispatch.contrib.django`."""

from __future__ import annotations

from django.apps import AppConfig


class ThreadDispatchConfig(AppConfig):
    """Checks the ``THREADDISPATCH`` setting at startup (without opening the store) and applies ``EXIT_TIMEOUT``."""

    name = "threaddispatch.contrib.django"
    label = "threaddispatch"
    verbose_name = "threaddispatch"
    default = True

    def ready(self) -> None:
        """Validate the settings; raises ImproperlyConfigured naming a bad key. Non-blocking."""
        from threaddispatch.contrib.django.conf import apply_settings

        apply_settings()
