"""Django REST framework classes.

- ``WardenAuthentication``: signed requests or a bearer API key; sets
  ``request.user`` to a ``WardenUser`` and ``request.auth`` to warden's
  ``Decision``. Reuses the middleware's check when it ran (a request is
  checked once: its nonce can only be used once).
- ``WardenThrottle``: maps the view's DRF throttle scope onto a warden policy
  (``WARDEN["THROTTLE_POLICIES"]``). The limit is part of the same atomic
  ``Check``, so a denied request takes no tokens from any limit.
"""

from __future__ import annotations

from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.throttling import BaseThrottle

from warden_client.client import Caller, Decision
from warden_client.django.conf import get_conf
from warden_client.django.middleware import run_check


class WardenUser:
    """The API client behind a request: not a Django user, but enough for
    DRF permissions (``IsAuthenticated``) and for the app to see who called."""

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    is_superuser = False

    def __init__(self, caller: Caller) -> None:
        self.caller = caller
        self.pk = self.id = self.key_id = caller.key_id
        self.owner = caller.owner
        self.scopes = caller.scopes

    def __str__(self) -> str:
        return self.key_id


def _decision(request) -> Decision | None:
    return getattr(request._request, "_warden_decision", None)


class WardenAuthentication(BaseAuthentication):
    def authenticate(self, request):
        decision = _decision(request)
        if decision is None:
            view = request.parser_context.get("view") if request.parser_context else None
            denied = run_check(request._request, get_conf(), type(view) if view is not None else None)
            decision = _decision(request)
            if denied is not None:
                if decision is None:
                    if denied.status_code == 401:
                        raise exceptions.AuthenticationFailed("The request could not be authenticated.")
                    raise exceptions.APIException("The request cannot be checked right now.")
                if decision.reason == "rate_limited" or decision.reason == "locked_out":
                    raise exceptions.Throttled(wait=decision.retry_after_ms / 1000 or None)
                if decision.http_status == 403:
                    raise exceptions.PermissionDenied("This client may not call this endpoint.")
                raise exceptions.AuthenticationFailed("The request could not be authenticated.")
        if decision is None or not decision.allowed or decision.caller is None:
            return None  # failed open, or not checked: anonymous
        return WardenUser(decision.caller), decision

    def authenticate_header(self, request) -> str:
        return 'Signature realm="warden"'


class WardenThrottle(BaseThrottle):
    """Set ``throttle_scope`` on the view (or ``scope`` on a subclass) and map
    it in ``WARDEN["THROTTLE_POLICIES"]``."""

    scope: str | None = None
    #: Marks warden's throttles for the middleware, which joins their
    #: policies to the request's one atomic check.
    warden_throttle = True

    def __init__(self) -> None:
        self._wait: float | None = None

    def allow_request(self, request, view) -> bool:
        decision = _decision(request)
        if decision is None or decision.allowed:
            return True
        if decision.reason == "rate_limited":
            self._wait = decision.retry_after_ms / 1000 or None
            return False
        return True

    def wait(self) -> float | None:
        return self._wait
