"""A small Django API protected by warden.

Point it at a running `warden serve --dev` (the default ./warden-dev/) or set
WARDEN_TARGET, WARDEN_CA, WARDEN_CERT, WARDEN_KEY and WARDEN_APP_API_KEY.
"""

import json
import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
DEV_DIR = Path(os.environ.get("WARDEN_DEV_DIR", BASE_DIR.parent.parent.parent / "warden-dev"))

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
ALLOWED_HOSTS = ["*"]
USE_TZ = True

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "rest_framework",
    "exampleapi",
]

MIDDLEWARE = [
    "django.middleware.common.CommonMiddleware",
    "warden_client.django.WardenMiddleware",
]

ROOT_URLCONF = "exampleapi.urls"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
# No model of this app is stored (keys live in warden): no migrations, so
# runserver has none to warn about.
MIGRATION_MODULES = {"auth": None, "contenttypes": None}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def _dev_address():
    try:
        return json.loads((DEV_DIR / "demo-key.json").read_text())["address"]
    except (OSError, ValueError, KeyError):
        return "127.0.0.1:50051"


WARDEN = {
    "TARGET": os.environ.get("WARDEN_TARGET") or _dev_address(),
    "CA": os.environ.get("WARDEN_CA", str(DEV_DIR / "ca.pem")),
    "CERT": os.environ.get("WARDEN_CERT", str(DEV_DIR / "client.pem")),
    "KEY": os.environ.get("WARDEN_KEY", str(DEV_DIR / "client-key.pem")),
    "TIMEOUT": 0.5,
    "PROTECTED_PATHS": ["/api/", "/webhooks/"],
    "EXEMPT_PATHS": ["/health"],
    # The login endpoint takes no API credentials; the app vouches for it
    # with its own bearer key and warden applies the per-IP limit.
    "PUBLIC_PATHS": ["/api/login"],
    "APP_API_KEY": os.environ.get("WARDEN_APP_API_KEY"),
    "ROUTE_LIMITS": [
        {"view": "login", "methods": ["POST"], "policy": "per-ip", "by": "ip"},
    ],
    "THROTTLE_POLICIES": {"items": os.environ.get("WARDEN_ITEMS_POLICY", "per-ip")},
    "FAILURE_MODE": os.environ.get("WARDEN_FAILURE_MODE", "closed"),
    # nginx passes the verified client certificate's DN (see README).
    "CLIENT_IDENTITY_HEADER": "X-Client-DN",
    "CLIENT_VERIFY_HEADER": "X-Client-Verify",
    # @warden_webhook(provider) -> the warden key holding its secret.
    "WEBHOOK_KEYS": {"stripe": "wh_stripe", "github": "wh_github"},
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["warden_client.django.drf.WardenAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "UNAUTHENTICATED_USER": None,
}

LOGGING = {
    "version": 1,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"warden_client": {"handlers": ["console"], "level": "INFO"}},
}
