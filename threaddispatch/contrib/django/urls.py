"""The admin API as Django urls: ``path("api/dispatch/", include("threaddispatch.contrib.django.urls"))``.

Every path below the include goes to the admin app (see :mod:`threaddispatch.admin`),
with its bearer-token authentication; Django's CSRF check is skipped only for requests
carrying that token (see :mod:`threaddispatch.contrib.django.views`).
"""

from __future__ import annotations

from django.urls import re_path

from threaddispatch.contrib.django.views import admin_api

app_name = "threaddispatch"

urlpatterns = [re_path(r"^(?P<path>.*)$", admin_api, name="api")]
