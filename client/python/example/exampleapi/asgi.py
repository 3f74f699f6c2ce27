"""The example API as an ASGI application: ``uvicorn exampleapi.asgi:application``."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "exampleapi.settings")

application = get_asgi_application()
