"""Settings of the fixture project: ``SHOP_DIR`` holds its files; ``TD_SETTINGS`` (JSON) replaces THREADDISPATCH.

``TD_NO_ADMIN=1`` leaves ``django.contrib.admin`` out (for the staff check).
"""

import json
import os
from pathlib import Path

DIRECTORY = Path(os.environ["SHOP_DIR"])
DEBUG = False
SECRET_KEY = "threaddispatch-fixture-project"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "djproject.urls"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "threaddispatch.contrib.django",
    "shop",
]
if os.environ.get("TD_NO_ADMIN"):
    INSTALLED_APPS.remove("django.contrib.admin")
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(DIRECTORY / "django.sqlite3")}}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = True
THREADDISPATCH = json.loads(
    os.environ.get("TD_SETTINGS") or '{"ENGINE": "djproject.jobs.engine", "ADMIN_AUTH": "staff", "CONCURRENCY": 4}'
)
