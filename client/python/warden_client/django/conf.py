"""The ``WARDEN`` Django setting, read at request time (so tests and
``override_settings`` take effect), with one client per distinct
connection setting.

    WARDEN = {
        "TARGET": "warden.internal:50051",  # or several nodes of a cluster:
                                             # ["warden-0:50051", "warden-1:50051"]
                                             # (or "a:50051,b:50051"); calls fail
                                             # over between them
        "CA": "/etc/warden/ca.pem",          # CA that signed warden's certificate
        "CERT": "/etc/warden/app.pem",       # this app's client certificate
        "KEY": "/etc/warden/app-key.pem",
        "SERVER_NAME": None,                 # expected name in warden's certificate
        "TIMEOUT": 0.5,                      # seconds, every call
        "TRANSPORT": "auto",                 # "native" (compiled: warden-client-native,
                                             # client/python-native), "grpcio",
                                             # or "auto": native when installed
        "BUSY_WAIT_US": None,                # compiled transport: µs a call looks for
                                             # its answer before sleeping (200 by
                                             # default), or under ASGI before it lets
                                             # the loop go on (500); 0: never
        # Paths are those your urls.py sees: below the mount point
        # (SCRIPT_NAME), if the app has one (see RequestPaths).
        "PROTECTED_PATHS": ["/api/"],        # prefixes checked (default: all)
        "EXEMPT_PATHS": ["/health"],         # never checked, no call made: the path and
                                             # below it ("/health/..."), not "/healthz";
                                             # "/health*" for every path it starts
        "PUBLIC_PATHS": ["/api/login"],      # no credentials needed; only ROUTE_LIMITS
                                             # apply (matched as EXEMPT_PATHS)
        "APP_API_KEY": "wak_...",            # bearer key used for PUBLIC_PATHS checks
        "ROUTE_LIMITS": [                    # extra limits per route
            {"path": "/api/login", "methods": ["POST"], "policy": "login-per-ip", "by": "ip"},
            # or by the URL pattern's name, for every spelling it answers:
            # {"view": "login", "methods": ["POST"], "policy": "login-per-ip"},
        ],
        "THROTTLE_POLICIES": {"burst": "burst-policy"},  # DRF throttle scope -> warden policy
        "FAILURE_MODE": "closed",            # or "open" when warden is unreachable
        "BREAKER": {"FAILURES": 3, "RESET_AFTER": 5.0},
        "HEADERS": {"X-Key-Id": "X-Key-Id", ...},        # rename the signing headers
        "RATELIMIT_HEADERS": True,           # RateLimit-Policy and RateLimit on every
                                             # checked answer; False: none (a refusal
                                             # keeps its Retry-After)
        "CLIENT_IDENTITY_HEADER": None,      # e.g. "X-Client-DN" set by nginx
        "CLIENT_VERIFY_HEADER": None,        # e.g. "X-Client-Verify"; must be "SUCCESS"
        "TRUSTED_PROXY_HEADER": None,        # e.g. "X-Forwarded-For" for the client IP
        "TRUSTED_PROXY_HOPS": 1,             # your proxies appending to it: the entry
                                             # this many from the right is the client
        "WEBHOOK_KEYS": {"stripe": "wh_stripe"},  # @warden_webhook provider -> key id
    }
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from warden_client.client import (
    MAX_BUSY_WAIT_US,
    TRANSPORTS,
    AsyncWardenClient,
    CircuitBreaker,
    WardenClient,
    is_valid_busy_wait,
)

log = logging.getLogger("warden_client.django")

_clients: dict[tuple, WardenClient | AsyncWardenClient] = {}
_lock = threading.Lock()


ROUTE_LIMIT_BY = ("ip", "key", "path")


@dataclass(frozen=True)
class RouteLimit:
    """A limit for one route: by its ``path`` (exact, or a prefix ending in
    ``*``) or by its ``view``, the name its URL pattern is reversed by
    (``"login"``, ``"accounts:login"``). A view is every spelling of its
    URL at once: a pattern that answers with and without a trailing slash
    needs no second limit."""

    path: str | None
    methods: tuple[str, ...]
    policy: str
    by: str  # one of ROUTE_LIMIT_BY
    view: str | None = None

    def matches(self, method: str, paths: tuple[str, ...], view_name: str | None = None) -> bool:
        """Whether this limit counts a request. ``paths`` are the request's
        path below the mount point and its whole path (see
        ``RequestPaths``): a limit that names either counts it, so a
        setting with the mount point's prefix and one without both hold."""
        method = method.upper()
        # Django runs a view's GET for HEAD (all its work, no body sent):
        # a limit on GET counts it.
        if self.methods and method not in self.methods and not (method == "HEAD" and "GET" in self.methods):
            return False
        if self.view is not None:
            return view_name == self.view
        prefix = self.path.endswith("*")
        target = self.path.rstrip("*")
        if prefix:
            return any(path.startswith(target) for path in paths)
        # With or without a trailing slash: a pattern may answer both (and
        # APPEND_SLASH redirects to one), and counting one more spelling
        # costs nothing, where leaving one out gives a second count.
        return any(path.rstrip("/") == target.rstrip("/") for path in paths)

    @property
    def route(self) -> str:
        """What a limit ``by`` "path" counts: the route as configured, never
        the spelling a client sent, which it could vary for a fresh count."""
        return f"view:{self.view}" if self.view is not None else f"path:{self.path}"


def _names(setting: str, path: str) -> bool:
    """Whether an EXEMPT_PATHS or PUBLIC_PATHS entry covers ``path``: the path
    itself and what lies below it (``/api/login`` covers ``/api/login`` and
    ``/api/login/...``, never ``/api/login_history``); an entry ending in
    ``/`` covers what lies below it, one ending in ``*`` any path it starts."""
    if setting.endswith("*"):
        return path.startswith(setting[:-1])
    if setting.endswith("/"):
        return path.startswith(setting)
    return path == setting or path.startswith(setting + "/")


@dataclass(frozen=True)
class RequestPaths:
    """The two paths Django gives a request. ``path_info`` is the one its
    URL resolver finds the view by: the path below the mount point
    (``SCRIPT_NAME``, or ``FORCE_SCRIPT_NAME``, or an ASGI server's
    ``root_path``). ``path`` is the mount point and ``path_info`` together.

    Settings that let a request past (``EXEMPT_PATHS``, ``PUBLIC_PATHS``)
    are matched against ``path_info`` alone, because the mount point is
    not always the operator's: gunicorn takes it from a ``SCRIPT_NAME``
    request header from its trusted forwarders (127.0.0.1 by default), and
    Daphne from a ``Daphne-Root-Path`` header, so a client whose proxy
    passes such a header picks the split. Matched
    against the whole path, ``/health/api/orders`` sent with ``SCRIPT_NAME:
    /health`` would have been exempt while Django ran the ``/api/orders``
    view. Settings that add checks or limits (``PROTECTED_PATHS``,
    ``ROUTE_LIMITS``) match either path: in doubt, more is checked."""

    path_info: str
    path: str

    @classmethod
    def of(cls, request) -> RequestPaths:
        return cls(request.path_info, request.path)

    @property
    def both(self) -> tuple[str, ...]:
        return (self.path_info, self.path)


_warned_mounted: set[tuple[str, str]] = set()


def _exempts(entries: tuple[str, ...], setting: str, paths: RequestPaths) -> bool:
    if any(_names(e, paths.path_info) for e in entries):
        return True
    if paths.path != paths.path_info:
        # An entry written with the mount point in it no longer matches:
        # the request is checked (the safe side), and the operator is told
        # why their exempt path now answers 401, once per entry.
        for e in entries:
            if _names(e, paths.path) and (setting, e) not in _warned_mounted:
                _warned_mounted.add((setting, e))
                log.warning(
                    "warden: %s entry %r names the request's whole path %r but not its path below the mount "
                    "point %r; these entries are matched below the mount point only, so the request is checked. "
                    "Write the entry without the mount point.", setting, e, paths.path, paths.path_info)
    return False


@dataclass(frozen=True)
class Conf:
    target: str | tuple[str, ...]
    ca: str
    cert: str
    key: str
    server_name: str | None = None
    timeout: float = 0.5
    transport: str = "auto"
    # None: each client's own default (WardenClient's, AsyncWardenClient's).
    busy_wait_us: int | None = None
    protected: tuple[str, ...] = ("/",)
    exempt: tuple[str, ...] = ()
    public: tuple[str, ...] = ()
    app_api_key: str | None = None
    route_limits: tuple[RouteLimit, ...] = ()
    throttle_policies: dict = field(default_factory=dict)
    failure_mode: str = "closed"
    breaker_failures: int = 3
    breaker_reset_after: float = 5.0
    headers: dict = field(default_factory=dict)
    ratelimit_headers: bool = True
    client_identity_header: str | None = None
    client_verify_header: str | None = None
    trusted_proxy_header: str | None = None
    trusted_proxy_hops: int = 1

    def is_checked(self, paths: RequestPaths) -> bool:
        # PROTECTED_PATHS are plain prefixes, so that in doubt more is
        # checked; EXEMPT_PATHS and PUBLIC_PATHS, which let requests past
        # the client's credentials, match whole segments (see _names), and
        # only the path the view is found by (see RequestPaths).
        if _exempts(self.exempt, "EXEMPT_PATHS", paths):
            return False
        return any(path.startswith(p) for p in self.protected for path in paths.both)

    def is_public(self, paths: RequestPaths) -> bool:
        return _exempts(self.public, "PUBLIC_PATHS", paths)

    def client(self) -> WardenClient:
        """The client for a sync (WSGI) stack."""
        return self._shared(WardenClient, busy_wait_us=self.busy_wait_us)

    def aclient(self) -> AsyncWardenClient:
        """The client for an async (ASGI) stack. ``BUSY_WAIT_US`` bounds how
        long a check made while no other is in flight holds the event loop
        (500 µs unless set; see ``AsyncWardenClient``)."""
        return self._shared(AsyncWardenClient, busy_wait_us=self.busy_wait_us)

    def _shared(self, kind, **options):
        """One client of `kind` per distinct connection setting."""
        ident = (kind, self.target, self.ca, self.cert, self.key, self.server_name, self.timeout, self.transport,
                 self.busy_wait_us, self.breaker_failures, self.breaker_reset_after)
        with _lock:
            client = _clients.get(ident)
            if client is None:
                client = kind(
                    self.target, self.cert, self.key, self.ca,
                    server_name=self.server_name, timeout=self.timeout, transport=self.transport,
                    breaker=CircuitBreaker(self.breaker_failures, self.breaker_reset_after), **options,
                )
                _clients[ident] = client
            return client


_parsed: tuple[object, Conf] | None = None


def get_conf() -> Conf:
    """The parsed ``WARDEN`` setting. Parsed again whenever the setting is a
    different object (``override_settings``, tests assigning it), not on
    every request: a change made by mutating the same dict in place is not
    seen."""
    global _parsed
    from django.conf import settings

    raw = getattr(settings, "WARDEN", None)
    parsed = _parsed
    if parsed is not None and parsed[0] is raw:
        return parsed[1]
    conf = _parse(raw)
    _parsed = (raw, conf)
    return conf


def _parse(raw) -> Conf:
    from django.core.exceptions import ImproperlyConfigured

    if not raw:
        raise ImproperlyConfigured("settings.WARDEN is not set")
    missing = [k for k in ("TARGET", "CA", "CERT", "KEY") if not raw.get(k)]
    if missing:
        raise ImproperlyConfigured(f"settings.WARDEN lacks {', '.join(missing)}")
    mode = raw.get("FAILURE_MODE", "closed")
    if mode not in ("closed", "open"):
        raise ImproperlyConfigured('settings.WARDEN["FAILURE_MODE"] must be "closed" or "open"')
    transport = raw.get("TRANSPORT", "auto")
    if transport not in TRANSPORTS:
        raise ImproperlyConfigured(f'settings.WARDEN["TRANSPORT"] must be one of {", ".join(TRANSPORTS)}')
    busy_wait_us = raw.get("BUSY_WAIT_US")
    if busy_wait_us is not None and not is_valid_busy_wait(busy_wait_us):
        raise ImproperlyConfigured(f'settings.WARDEN["BUSY_WAIT_US"] must be an integer from 0 to {MAX_BUSY_WAIT_US}')
    ratelimit_headers = raw.get("RATELIMIT_HEADERS", True)
    if not isinstance(ratelimit_headers, bool):
        raise ImproperlyConfigured('settings.WARDEN["RATELIMIT_HEADERS"] must be True or False')
    breaker = raw.get("BREAKER", {})
    return Conf(
        target=raw["TARGET"] if isinstance(raw["TARGET"], str) else tuple(raw["TARGET"]),
        ca=str(raw["CA"]),
        cert=str(raw["CERT"]),
        key=str(raw["KEY"]),
        server_name=raw.get("SERVER_NAME"),
        timeout=float(raw.get("TIMEOUT", 0.5)),
        transport=transport,
        busy_wait_us=busy_wait_us,
        protected=tuple(raw.get("PROTECTED_PATHS", ("/",))),
        exempt=tuple(raw.get("EXEMPT_PATHS", ())),
        public=tuple(raw.get("PUBLIC_PATHS", ())),
        app_api_key=raw.get("APP_API_KEY"),
        route_limits=tuple(_route_limit(r) for r in raw.get("ROUTE_LIMITS", ())),
        throttle_policies=dict(raw.get("THROTTLE_POLICIES", {})),
        failure_mode=mode,
        breaker_failures=int(breaker.get("FAILURES", 3)),
        breaker_reset_after=float(breaker.get("RESET_AFTER", 5.0)),
        headers=dict(raw.get("HEADERS", {})),
        ratelimit_headers=ratelimit_headers,
        client_identity_header=raw.get("CLIENT_IDENTITY_HEADER"),
        client_verify_header=raw.get("CLIENT_VERIFY_HEADER"),
        trusted_proxy_header=raw.get("TRUSTED_PROXY_HEADER"),
        trusted_proxy_hops=_hops(raw.get("TRUSTED_PROXY_HOPS", 1)),
    )


def _route_limit(r) -> RouteLimit:
    from django.core.exceptions import ImproperlyConfigured

    if ("path" in r) == ("view" in r):
        raise ImproperlyConfigured('settings.WARDEN["ROUTE_LIMITS"]: each needs a "path" or a "view", not both')
    by = r.get("by", "ip")
    # Anything else would be one counter for every client: a typo must not
    # turn a per-address limit into a limit for everyone.
    if by not in ROUTE_LIMIT_BY:
        raise ImproperlyConfigured(f'settings.WARDEN["ROUTE_LIMITS"]: "by" must be one of {", ".join(ROUTE_LIMIT_BY)}')
    if "policy" not in r:
        raise ImproperlyConfigured('settings.WARDEN["ROUTE_LIMITS"]: each needs a "policy"')
    return RouteLimit(r.get("path"), tuple(m.upper() for m in r.get("methods", ())), r["policy"], by, r.get("view"))


def _hops(value) -> int:
    from django.core.exceptions import ImproperlyConfigured

    if not isinstance(value, int) or not 1 <= value <= 16:
        raise ImproperlyConfigured('settings.WARDEN["TRUSTED_PROXY_HOPS"] must be an integer from 1 to 16')
    return value
