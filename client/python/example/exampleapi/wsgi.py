"""The example API as a WSGI application: ``gunicorn exampleapi.wsgi:application``."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "exampleapi.settings")

application = get_wsgi_application()
