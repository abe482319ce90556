"""The Django app config of :mod:`threaddispatch.contrib.django`."""

from __future__ import annotations

from django.apps import AppConfig


class ThreadDispatchConfig(AppConfig):
    """Checks the ``THREADDISPATCH`` setting at startup (without opening the store), applies ``EXIT_TIMEOUT``,
    registers the system checks and imports each installed app's ``tasks`` module (``AUTODISCOVER``)."""

    name = "threaddispatch.contrib.django"
    label = "threaddispatch"
    verbose_name = "threaddispatch"
    default = True

    def ready(self) -> None:
        """Validate the settings (raises ImproperlyConfigured naming a bad key), then autodiscover.

        Imports the ``tasks`` modules (what they do at import, registering jobs, runs now);
        opens no store itself.
        """
        from django.utils.module_loading import autodiscover_modules

        from threaddispatch.contrib.django import checks  # noqa: F401 - registers the checks
        from threaddispatch.contrib.django.conf import apply_settings

        config = apply_settings()
        if config.autodiscover is not None:
            autodiscover_modules(config.autodiscover)
