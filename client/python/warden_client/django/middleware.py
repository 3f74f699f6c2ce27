"""``WardenMiddleware``: one atomic warden ``Check`` per protected request.

It runs after URL resolution (``process_view``) so that DRF throttle scopes
of the view are part of the same atomic check. On DENY it answers with the
status warden suggests (400/401/403/429), ``Retry-After`` and ``RateLimit-*``
headers and a small JSON body that reveals nothing internal. On ALLOW it sets
``request.warden`` (key id, owner, scopes) and adds the rate-limit headers to
the response. When warden is unreachable it fails closed (503) unless
``FAILURE_MODE`` is ``"open"``.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
from urllib.parse import quote

from asgiref.sync import iscoroutinefunction, markcoroutinefunction

from django.http import HttpRequest, HttpResponse, JsonResponse

from warden_client.client import CheckRequest, Decision, LimitRequest, WardenError, WardenUnavailable
from warden_client.django.conf import Conf, RequestPaths, get_conf
from warden_client.signing import HEADER_KEY_ID, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP

log = logging.getLogger("warden_client.django")

# Bodies above this are sent to warden as their SHA-256 only.
BODY_HASH_THRESHOLD = 512 * 1024

# What clients are told. Deliberately generic: which check failed and why
# is in warden's log, not in the response.
PUBLIC_MESSAGES = {
    "malformed": "The request is malformed.",
    "unauthenticated": "The request could not be authenticated.",
    "stale": "The request is too old or from the future; sign it again.",
    "replay": "This request was already used.",
    "forbidden": "This client may not call this endpoint.",
    "rate_limited": "Too many requests.",
    "locked_out": "Too many failed attempts; try again later.",
}


@functools.lru_cache(maxsize=4096)
def _normalized_address(address: str) -> str | None:
    """The address in its one written form, or ``None`` when it is none.
    Cached: the same clients come back, and parsing is most of the cost."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def _counted_address(address: str) -> str:
    """The address as a per-ip limit counts it, as warden's own gateways
    do: IPv4 as is (also when written IPv4-mapped), IPv6 by its /64, since
    one client holds a whole /64 and could otherwise take a fresh count per
    request. Text that is no address (a misconfigured proxy header) is
    counted as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _meta_name(header: str) -> str:
    return "HTTP_" + header.upper().replace("-", "_")


def client_ip(request: HttpRequest, conf: Conf) -> str:
    """The client's address: with ``TRUSTED_PROXY_HEADER`` (X-Forwarded-For),
    the entry ``TRUSTED_PROXY_HOPS`` from the right — the one your own
    proxy wrote. Entries further left are the client's to invent (a proxy
    that appends keeps whatever the client sent), so trusting them would
    let anyone pick whose per-IP limit and failure budget to spend."""
    if conf.trusted_proxy_header:
        forwarded = request.META.get(_meta_name(conf.trusted_proxy_header), "")
        hops = [h.strip() for h in forwarded.split(",") if h.strip()]
        if len(hops) >= conf.trusted_proxy_hops:
            return hops[-conf.trusted_proxy_hops]
    elif not _proxy_warned and "HTTP_X_FORWARDED_FOR" in request.META:
        _warn_of_proxy(request.META.get("REMOTE_ADDR", ""))
    return request.META.get("REMOTE_ADDR", "")


_proxy_warned = False


def _warn_of_proxy(remote: str) -> None:
    """Once per process: requests come through a proxy that names the
    client, and the middleware is not told to read it. Every client behind
    the proxy then shares its address's per-IP limits and failure budget,
    so one client's bad signatures lock all of them out."""
    global _proxy_warned
    _proxy_warned = True
    log.warning(
        "requests arrive with X-Forwarded-For from %s, but WARDEN['TRUSTED_PROXY_HEADER'] is not set: "
        "every client behind that proxy shares one per-IP limit and failure budget, and one client's "
        "bad signatures lock out all of them; set TRUSTED_PROXY_HEADER (and TRUSTED_PROXY_HOPS)",
        remote or "an unknown address",
    )


def raw_path(request: HttpRequest) -> str:
    """The path as the client sent it (signatures cover the raw path): from
    the WSGI server (gunicorn's ``RAW_URI``, uWSGI's ``REQUEST_URI``) or the
    ASGI server (the scope's ``raw_path``: uvicorn, Daphne, Hypercorn).
    Without either, the decoded path encoded again, which gives back what
    was sent only when the client encoded nothing it need not have."""
    raw = request.META.get("RAW_URI") or request.META.get("REQUEST_URI")
    if raw:
        return raw.split("?", 1)[0]
    scope = getattr(request, "scope", None)
    if scope and scope.get("raw_path"):
        # Bytes as received; latin-1 maps each byte to one character.
        return scope["raw_path"].decode("latin-1").split("?", 1)[0]
    return quote(request.path, safe="/:@!$&'()*+,;=-._~%")


def header(request: HttpRequest, conf: Conf, name: str) -> str:
    return request.META.get(_meta_name(conf.headers.get(name, name)), "")


def bearer_token(request: HttpRequest) -> str:
    auth = request.META.get("HTTP_AUTHORIZATION", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.META.get("HTTP_X_API_KEY", "")


def throttle_policies(view, conf: Conf) -> list[str]:
    """warden policies for the DRF throttle scopes of a view class."""
    if view is None:
        return []
    # WardenThrottle (and subclasses) say so with a class attribute, so this
    # module need not import DRF, which is optional and imports it.
    scopes = []
    for throttle in getattr(view, "throttle_classes", ()):
        if isinstance(throttle, type) and getattr(throttle, "warden_throttle", False):
            scope = getattr(throttle, "scope", None) or getattr(view, "throttle_scope", None)
            if scope and scope in conf.throttle_policies:
                scopes.append((scope, conf.throttle_policies[scope]))
    return scopes


def build_request(request: HttpRequest, conf: Conf, view=None) -> CheckRequest | None:
    """The CheckRequest for an incoming request, or ``None`` when it carries
    no credentials and its path is not public."""
    path = raw_path(request)
    req = CheckRequest(
        method=request.method or "GET",
        path=path,
        query=request.META.get("QUERY_STRING", ""),
        request_id=request.META.get("HTTP_X_REQUEST_ID", "")[:128],
    )
    paths = RequestPaths.of(request)
    key_id = header(request, conf, HEADER_KEY_ID)
    signature = header(request, conf, HEADER_SIGNATURE)
    token = bearer_token(request)
    if signature:
        # Only signatures cover the body; bearer checks never send it.
        body = request.body
        if len(body) > BODY_HASH_THRESHOLD:
            req.body_sha256 = hashlib.sha256(body).digest()
        else:
            req.body = body
        req.key_id = key_id
        req.signature = signature
        req.nonce = header(request, conf, HEADER_NONCE)
        ts = header(request, conf, HEADER_TIMESTAMP)
        req.timestamp = int(ts) if ts.isdigit() else 0
        # Limits "by key" count this key: nothing is counted unless the
        # signature proves it.
        proven_key = key_id
    elif token:
        req.api_key = token
        req.key_id = key_id
        # warden refuses a key id that is not the bearer key's own. Without
        # one, a digest of the token stands in for the key (never the
        # token itself), so that bearer keys are not all one count.
        proven_key = key_id or "bearer:" + hashlib.sha256(token.encode()).hexdigest()[:32]
    elif conf.is_public(paths) and conf.app_api_key:
        # Anonymous traffic on a public route: the app vouches with its own
        # bearer key, and only the route's limits (e.g. per IP) apply. An
        # X-Key-Id it sends proves nothing: counted by address instead, or
        # anyone could spend any key's limits.
        req.api_key = conf.app_api_key
        proven_key = None
    else:
        return None
    if conf.client_identity_header:
        verified = not conf.client_verify_header or header(request, conf, conf.client_verify_header) == "SUCCESS"
        identity = header(request, conf, conf.client_identity_header)
        if verified and identity:
            req.client_identity = identity
    # Failed attempts are charged to their source: with the address, one
    # client's bad signatures never lock out another behind this app.
    address = client_ip(request, conf)
    normalized = _normalized_address(address)
    if normalized:
        req.client_address = normalized
    # DRF throttle scopes count per key, or per address for anonymous use.
    subject = proven_key or _counted_address(address)
    by_ip = f"ip:{_counted_address(address)}"
    by_key = f"key:{proven_key}" if proven_key else by_ip
    view_name = getattr(getattr(request, "resolver_match", None), "view_name", None)
    for rl in conf.route_limits:
        if rl.matches(req.method, paths.both, view_name):
            descriptor = {"ip": by_ip, "key": by_key, "path": rl.route}
            req.limits.append(LimitRequest(policy=rl.policy, descriptor=descriptor[rl.by]))
    for scope, policy in throttle_policies(view, conf):
        req.limits.append(LimitRequest(policy=policy, descriptor=f"{scope}:{subject}"))
    return req


def denial_response(decision: Decision, ratelimit_headers: bool = True) -> HttpResponse:
    """The refusal a client sees. Its ``Retry-After`` is always sent (a 429
    without one leaves clients guessing); the ``RateLimit`` headers only
    with ``ratelimit_headers`` (``RATELIMIT_HEADERS``)."""
    body = {"error": decision.reason, "message": PUBLIC_MESSAGES.get(decision.reason, "Request denied.")}
    if decision.retry_after_ms:
        body["retry_after"] = -(-decision.retry_after_ms // 1000)
    response = JsonResponse(body, status=decision.http_status or 403)
    for name, value in decision.headers.items():
        if ratelimit_headers or name.lower() == "retry-after":
            response[name] = value
    return response


def unavailable_response() -> HttpResponse:
    response = JsonResponse({"error": "unavailable", "message": "The request cannot be checked right now."}, status=503)
    response["Retry-After"] = "1"
    return response


def run_check(request: HttpRequest, conf: Conf, view=None) -> HttpResponse | None:
    """Checks `request`; returns the response to send instead of the view,
    or ``None`` to go on (with ``request.warden`` set when allowed)."""
    req = build_request(request, conf, view)
    if req is None:
        return denial_response(Decision(allowed=False, reason="unauthenticated", http_status=401))
    try:
        decision = conf.client().check(req)
    except WardenError as e:
        return _unanswered(request, conf, e)
    return _answered(request, conf, decision)


async def arun_check(request: HttpRequest, conf: Conf, view=None) -> HttpResponse | None:
    """``run_check`` for an async (ASGI) stack: the check is awaited on the
    event loop, with no thread of its own."""
    req = build_request(request, conf, view)
    if req is None:
        return denial_response(Decision(allowed=False, reason="unauthenticated", http_status=401))
    try:
        decision = await conf.aclient().check(req)
    except WardenError as e:
        return _unanswered(request, conf, e)
    return _answered(request, conf, decision)


def _unanswered(request: HttpRequest, conf: Conf, e: WardenError) -> HttpResponse | None:
    """warden gave no decision: FAILURE_MODE says what happens when it was
    unreachable; a call it refused (a misconfiguration) always fails closed."""
    if isinstance(e, WardenUnavailable):
        if conf.failure_mode == "open":
            log.warning("warden unreachable, failing open: %s (path %s)", e, request.path)
            request.warden = None
            return None
        log.error("warden unreachable, failing closed: %s (path %s)", e, request.path)
        return unavailable_response()
    log.error("warden refused the check: %s", e)
    return unavailable_response()


def _answered(request: HttpRequest, conf: Conf, decision: Decision) -> HttpResponse | None:
    request._warden_decision = decision
    if not decision.allowed:
        return denial_response(decision, conf.ratelimit_headers)
    request.warden = decision.caller
    if conf.ratelimit_headers:
        # Put on the view's response on its way out (``_with_headers``).
        request._warden_headers = decision.headers
    return None


class WardenMiddleware:
    """Add after ``CommonMiddleware``; see ``warden_client.django.conf``.

    Sync and async: under ASGI, with the middleware after it async too, the
    check is awaited on the event loop. A sync-only middleware there has
    Django hand each check to a thread and back (``sync_to_async``), which
    costs every request a few hundred microseconds; through Django's test
    client those checks even queued behind one another."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)
            # Django awaits a coroutine function as it is, and runs any
            # other process_view on a thread.
            self.process_view = self._aprocess_view

    def __call__(self, request: HttpRequest):
        if iscoroutinefunction(self):
            return self._acall(request)
        request.warden = None
        return self._with_headers(request, self.get_response(request))

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        request.warden = None
        return self._with_headers(request, await self.get_response(request))

    @staticmethod
    def _with_headers(request: HttpRequest, response: HttpResponse) -> HttpResponse:
        for name, value in getattr(request, "_warden_headers", {}).items():
            response[name] = value
        return response

    @staticmethod
    def _checks(request: HttpRequest, conf: Conf, view_func) -> bool:
        # Webhook views verify their provider's signature themselves.
        return conf.is_checked(RequestPaths.of(request)) and not getattr(view_func, "warden_webhook", None)

    def process_view(self, request: HttpRequest, view_func, view_args, view_kwargs):
        conf = get_conf()
        if not self._checks(request, conf, view_func):
            return None
        return run_check(request, conf, getattr(view_func, "cls", None))

    async def _aprocess_view(self, request: HttpRequest, view_func, view_args, view_kwargs):
        conf = get_conf()
        if not self._checks(request, conf, view_func):
            return None
        return await arun_check(request, conf, getattr(view_func, "cls", None))
