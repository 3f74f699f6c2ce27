"""Receiving webhooks: ``@warden_webhook("stripe")`` verifies a provider's
delivery through warden in one call before the view runs.

    @csrf_exempt
    @warden_webhook("stripe", key_id="wh_stripe")
    def stripe_events(request):
        event = json.loads(request.body)
        ...

Providers: ``"stripe"``, ``"github"``, ``"slack"``, ``"standard-webhooks"``.
The key (``key_id``, or ``WARDEN["WEBHOOK_KEYS"][provider]``) holds the
provider's signing secret, imported into warden
(``warden keys create --id wh_stripe --secret-stdin``): the app never sees
it. warden checks the signature in constant time, the timestamp, replays
and the key's rate limits, atomically.

What the provider is answered when the view does not run:

- a forged, tampered, stale or malformed delivery: 400 for Stripe (what
  Stripe's documentation asks for), 401 for the others;
- a delivery warden has already accepted (the provider retrying, or someone
  replaying it): 200 ``{"status": "duplicate"}`` — the view does not run
  again, and the provider stops retrying;
- over the key's rate limit: 429 with ``Retry-After`` (providers retry);
- warden unreachable: 503 (providers retry later), whatever
  ``FAILURE_MODE`` says: an unverified webhook is never let through.

Views it decorates are skipped by ``WardenMiddleware``; ``request.warden``
is the key's caller (key id and owner) when the view runs.

A delivery is accepted before the view runs, once. When the view then
fails (raises, or answers 5xx), warden is told to forget the delivery, so
that the provider's next try runs the view again: a Standard Webhooks retry
(the same message id) and a GitHub redelivery (the same body) would
otherwise be answered as duplicates, and the event never processed.
"""

from __future__ import annotations

import functools
import ipaddress
import logging

from asgiref.sync import iscoroutinefunction
from django.http import HttpRequest, HttpResponse, JsonResponse

from warden_client.client import CheckRequest, WardenError
from warden_client.django.conf import Conf, get_conf
from warden_client.django.middleware import PUBLIC_MESSAGES, client_ip, raw_path, unavailable_response

log = logging.getLogger("warden_client.django")

# The headers each provider signs with: only these are sent to warden.
PROVIDER_HEADERS = {
    "stripe": ("Stripe-Signature",),
    "github": ("X-Hub-Signature-256", "X-GitHub-Delivery"),
    "slack": ("X-Slack-Signature", "X-Slack-Request-Timestamp"),
    "standard-webhooks": ("webhook-id", "webhook-timestamp", "webhook-signature"),
}


def _key_id(provider: str, key_id: str | None) -> str:
    if key_id:
        return key_id
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    keys = getattr(settings, "WARDEN", {}).get("WEBHOOK_KEYS", {})
    if provider not in keys:
        raise ImproperlyConfigured(f'give key_id, or settings.WARDEN["WEBHOOK_KEYS"]["{provider}"]')
    return keys[provider]


def webhook_request(request: HttpRequest, conf: Conf, provider: str, key_id: str) -> CheckRequest:
    """The CheckRequest for a delivery: its provider headers and raw body."""
    req = CheckRequest(
        key_id=key_id,
        scheme=provider,
        method=request.method or "POST",
        path=raw_path(request),
        body=request.body,
        request_id=request.META.get("HTTP_X_REQUEST_ID", "")[:128],
    )
    for name in PROVIDER_HEADERS[provider]:
        value = request.headers.get(name)
        if value is not None:
            req.headers[name] = value
    address = client_ip(request, conf)
    try:
        req.client_address = str(ipaddress.ip_address(address))
    except ValueError:
        pass
    return req


def _forget(provider: str, forget) -> None:
    """The view failed (raised, or answered 5xx) on a delivery warden had
    accepted: the provider will send it again, and then it must run.
    ``forget()`` asks warden to forget the delivery."""
    try:
        decision = forget()
    except WardenError as e:
        _not_forgotten(provider, str(e))
        return
    if not decision.allowed:
        _not_forgotten(provider, f"{decision.reason}: {decision.message}")


async def _aforget(provider: str, forget) -> None:
    """``_forget`` for an async view: ``forget()`` is awaited."""
    try:
        decision = await forget()
    except WardenError as e:
        _not_forgotten(provider, str(e))
        return
    if not decision.allowed:
        _not_forgotten(provider, f"{decision.reason}: {decision.message}")


def _not_forgotten(provider: str, why: str) -> None:
    log.error("a %s webhook whose view failed could not be forgotten (%s): "
              "the provider's next try will be answered as a duplicate", provider, why)


def _answer(provider: str, decision) -> HttpResponse | None:
    """What the provider is told when the view does not run; ``None`` when
    it runs."""
    if decision.allowed:
        return None
    if decision.reason == "replay":
        log.info("%s webhook already received; not run again", provider)
        return JsonResponse({"status": "duplicate"}, status=200)
    log.warning("%s webhook refused: %s (%s)", provider, decision.reason, decision.message)
    response = _refused(provider, decision.reason, decision.http_status)
    for name, value in decision.headers.items():
        response[name] = value
    return response


def _refused(provider: str, reason: str, status: int) -> HttpResponse:
    if reason in ("unauthenticated", "stale", "malformed"):
        status = 400 if provider == "stripe" or reason == "malformed" else 401
    return JsonResponse({"error": reason, "message": PUBLIC_MESSAGES.get(reason, "Request denied.")}, status=status or 403)


def warden_webhook(provider: str, key_id: str | None = None):
    """Decorator for a view receiving ``provider``'s webhooks."""
    if provider not in PROVIDER_HEADERS:
        raise ValueError(f"unknown webhook provider {provider!r}; one of {sorted(PROVIDER_HEADERS)}")

    def decorate(view):
        if iscoroutinefunction(view):
            @functools.wraps(view)
            async def async_wrapper(request: HttpRequest, *args, **kwargs):
                conf = get_conf()
                req = webhook_request(request, conf, provider, _key_id(provider, key_id))
                client = conf.aclient()
                try:
                    decision = await client.check(req)
                except WardenError as e:
                    log.error("warden could not verify a %s webhook: %s", provider, e)
                    return unavailable_response()
                refused = _answer(provider, decision)
                if refused is not None:
                    return refused
                request.warden = decision.caller
                try:
                    response = await view(request, *args, **kwargs)
                except Exception:
                    await _aforget(provider, lambda: client.forget(req))
                    raise
                if response.status_code >= 500:
                    await _aforget(provider, lambda: client.forget(req))
                return response

            wrapper = async_wrapper
        else:
            @functools.wraps(view)
            def sync_wrapper(request: HttpRequest, *args, **kwargs):
                conf = get_conf()
                req = webhook_request(request, conf, provider, _key_id(provider, key_id))
                client = conf.client()
                try:
                    decision = client.check(req)
                except WardenError as e:
                    log.error("warden could not verify a %s webhook: %s", provider, e)
                    return unavailable_response()
                refused = _answer(provider, decision)
                if refused is not None:
                    return refused
                request.warden = decision.caller
                try:
                    response = view(request, *args, **kwargs)
                except Exception:
                    _forget(provider, lambda: client.forget(req))
                    raise
                if response.status_code >= 500:
                    _forget(provider, lambda: client.forget(req))
                return response

            wrapper = sync_wrapper

        # WardenMiddleware leaves these views to the decorator.
        wrapper.warden_webhook = provider
        return wrapper

    return decorate
