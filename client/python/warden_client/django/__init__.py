"""Django integration: ``WardenMiddleware`` checks every protected request
with warden in one atomic call; see ``warden_client.django.conf`` for the
``WARDEN`` setting."""

from warden_client.django.middleware import WardenMiddleware

__all__ = ["WardenMiddleware"]
