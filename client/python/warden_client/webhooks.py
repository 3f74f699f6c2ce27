"""Sending webhooks signed by warden: the app never holds the signing secret.

``sign_webhook`` (a method of ``WardenClient``) returns the headers for a
payload; ``WebhookSigner`` does it for ``requests`` and ``httpx`` as their
``auth``::

    signer = WebhookSigner(client, key_id="wh_customer_42", scheme="standard-webhooks")
    requests.post(url, data=payload, auth=signer)
    httpx.post(url, content=payload, auth=signer)

The receiver verifies with the secret it was given when the key was created
(``warden keys create --secret-format whsec``), with any Standard Webhooks
library (or Stripe's, for ``scheme="stripe"``). During a rotation
(``warden keys rotate --grace``) every message carries a signature for the
old and for the new secret.
"""

from __future__ import annotations

from warden_client.client import SignedWebhook, WardenClient

__all__ = ["SignedWebhook", "WebhookSigner", "sign_webhook"]


def sign_webhook(
    client: WardenClient, key_id: str, scheme: str, payload: bytes | str, *, message_id: str = "", timestamp: int = 0
) -> SignedWebhook:
    """``client.sign_webhook(...)``, as a function."""
    return client.sign_webhook(key_id, scheme, payload, message_id=message_id, timestamp=timestamp)


class WebhookSigner:
    """Signs the body of an outgoing request through warden and adds the
    signature headers. Works as ``auth=`` for both ``requests`` (a callable
    taking the prepared request) and ``httpx`` (a callable taking the
    request), without importing either. ``message_id``: the Standard
    Webhooks id to use for every request it signs (a retry of one message);
    by default warden makes a new one per request."""

    def __init__(self, client: WardenClient, key_id: str, scheme: str = "standard-webhooks", message_id: str = "") -> None:
        self.client = client
        self.key_id = key_id
        self.scheme = scheme
        self.message_id = message_id

    def __call__(self, request):
        if hasattr(request, "content") and not hasattr(request, "body"):
            body = request.read() if hasattr(request, "read") else request.content  # httpx
        else:
            body = request.body or b""  # requests
            if isinstance(body, str):
                body = body.encode()
            if not isinstance(body, (bytes, bytearray)):
                raise TypeError("WebhookSigner signs bytes or text bodies, not streams")
        signed = self.client.sign_webhook(self.key_id, self.scheme, bytes(body), message_id=self.message_id)
        for name, value in signed.headers.items():
            request.headers[name] = value
        return request
