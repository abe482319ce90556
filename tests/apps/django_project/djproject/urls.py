"""The project's urls: the orders view, the admin API under ``ops/dispatch/`` and (when installed) the Django admin."""

from django.apps import apps
from django.urls import include, path

from djproject.views import order

urlpatterns = [
    path("orders/<int:n>", order),
    path("ops/dispatch/", include("threaddispatch.contrib.django.urls")),
]
if apps.is_installed("django.contrib.admin"):
    from django.contrib import admin

    urlpatterns.append(path("admin/", admin.site.urls))
