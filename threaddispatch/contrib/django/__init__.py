"""Django integration: the ``threaddispatch.contrib.django`` app.

.. code-block:: python

    # settings.py
    INSTALLED_APPS = [..., "threaddispatch.contrib.django"]
    THREADDISPATCH = {
        "ENGINE": "myproject.jobs.engine",   # dotted path to your JobEngine (or a callable making it)
        "TOKEN": os.environ["THREADDISPATCH_TOKEN"],
    }
    # urls.py
    urlpatterns = [path("api/dispatch/", include("threaddispatch.contrib.django.urls"))]

    $ python manage.py threaddispatch_worker --queues default,emails --concurrency 8

Settings (the ``THREADDISPATCH`` dict) are documented in
:mod:`threaddispatch.contrib.django.conf`; :func:`get_engine` returns the project's engine.
"""

from threaddispatch.contrib.django.conf import get_admin_app, get_engine, get_settings

__all__ = ["get_admin_app", "get_engine", "get_settings"]
