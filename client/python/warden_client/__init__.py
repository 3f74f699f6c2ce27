"""Python client for warden.

- ``WardenClient`` / ``AsyncWardenClient``: typed clients for ``Check`` over
  mutual TLS (``warden_client.client``).
- ``sign_request`` and the ``requests``/``httpx`` auth classes for clients
  that send signed requests (``warden_client.signing``).
- ``warden_client.django``: middleware; ``warden_client.django.drf``: DRF
  authentication and throttle classes.
"""

from warden_client.client import (
    AsyncWardenClient,
    Caller,
    CheckRequest,
    CircuitBreaker,
    Decision,
    LimitRequest,
    LimitStatus,
    WardenClient,
    WardenError,
    WardenUnavailable,
)
from warden_client.signing import WardenAuth, sign_request

__all__ = [
    "AsyncWardenClient",
    "Caller",
    "CheckRequest",
    "CircuitBreaker",
    "Decision",
    "LimitRequest",
    "LimitStatus",
    "WardenAuth",
    "WardenClient",
    "WardenError",
    "WardenUnavailable",
    "sign_request",
]
