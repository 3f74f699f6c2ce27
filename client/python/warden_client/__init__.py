"""Python client for warden.

- ``WardenClient`` / ``AsyncWardenClient``: typed clients for ``Check`` over
  mutual TLS (``warden_client.client``).
- ``sign_request`` and the ``requests``/``httpx`` auth classes for clients
  that send signed requests (``warden_client.signing``).
- ``warden_client.webhooks``: outbound webhooks signed by warden
  (``sign_webhook``, ``WebhookSigner`` for ``requests``/``httpx``).
- ``warden_client.django``: middleware; ``warden_client.django.drf``: DRF
  authentication and throttle classes; ``warden_client.django.webhooks``:
  ``@warden_webhook("stripe")`` for inbound webhooks.
"""

from warden_client.client import (
    AsyncWardenClient,
    Caller,
    CheckRequest,
    CircuitBreaker,
    Decision,
    LimitRequest,
    LimitStatus,
    SignedWebhook,
    WardenClient,
    WardenError,
    WardenUnavailable,
)
from warden_client.signing import WardenAuth, sign_request
from warden_client.webhooks import WebhookSigner, sign_webhook

__all__ = [
    "AsyncWardenClient",
    "Caller",
    "CheckRequest",
    "CircuitBreaker",
    "Decision",
    "LimitRequest",
    "LimitStatus",
    "SignedWebhook",
    "WardenAuth",
    "WardenClient",
    "WardenError",
    "WardenUnavailable",
    "WebhookSigner",
    "sign_request",
    "sign_webhook",
]
