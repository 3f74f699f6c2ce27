"""Request signing for warden's ``warden-v1`` scheme (see proto/SIGNING.md).

``sign_request`` returns the four headers a client sends; ``WardenAuth``
(requests) and ``WardenHttpxAuth`` (httpx) sign outgoing requests with them.
The canonical-string rules are implemented exactly as in the Rust signer and
the server's verifier, and checked against the published test vectors.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets as _secrets
import time
from typing import Mapping
from urllib.parse import urlsplit

HEADER_KEY_ID = "X-Key-Id"
HEADER_TIMESTAMP = "X-Timestamp"
HEADER_NONCE = "X-Nonce"
HEADER_SIGNATURE = "X-Signature"

SCHEME_WARDEN_V1 = "warden-v1"
SCHEME_TS_BODY = "ts-body"

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")


def _decode(text: str) -> bytes:
    """Percent-decodes; ``+`` stays a plus, a ``%`` without two hex digits stays."""
    raw = text.encode("utf-8")
    out = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == 0x25 and i + 2 < len(raw) and raw[i + 1] in _HEX and raw[i + 2] in _HEX:
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
            continue
        out.append(c)
        i += 1
    return bytes(out)


def _encode(raw: bytes) -> str:
    return "".join(chr(c) if c in _UNRESERVED else f"%{c:02X}" for c in raw)


def canonical_query(raw_query: str) -> str:
    """The canonical form of a raw query string (without the leading ``?``)."""
    pairs = []
    for piece in raw_query.split("&"):
        if not piece:
            continue
        name, _, value = piece.partition("=")
        pairs.append((_encode(_decode(name)), _encode(_decode(value))))
    pairs.sort()
    return "&".join(f"{name}={value}" for name, value in pairs)


def _as_bytes(body: bytes | str | None) -> bytes:
    if body is None:
        return b""
    if isinstance(body, str):
        return body.encode("utf-8")
    return bytes(body)


def string_to_sign(timestamp: int, nonce: str, method: str, path: str, query: str, body: bytes | str | None) -> str:
    """The ``warden-v1`` string to sign: seven lines joined by ``\\n``."""
    return "\n".join(
        [
            SCHEME_WARDEN_V1,
            str(int(timestamp)),
            nonce,
            method.upper(),
            path,
            canonical_query(query),
            hashlib.sha256(_as_bytes(body)).hexdigest(),
        ]
    )


def ts_body_string_to_sign(timestamp: int, body: bytes | str | None) -> bytes:
    """The ``ts-body`` string to sign: ``timestamp + "." + body``."""
    return str(int(timestamp)).encode() + b"." + _as_bytes(body)


def _secret_bytes(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)


def sign_request(
    key_id: str,
    secret: str | bytes,
    method: str,
    path: str,
    query: str = "",
    body: bytes | str | None = b"",
    *,
    timestamp: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The four signing headers for one request under ``warden-v1``.

    ``secret`` is the HMAC key: for keys from warden, the UTF-8 bytes of the
    secret string. ``path`` and ``query`` exactly as sent (the query without
    ``?``). A fresh timestamp and a random 32-character nonce are used unless
    given.
    """
    ts = int(time.time()) if timestamp is None else int(timestamp)
    nonce = _secrets.token_hex(16) if nonce is None else nonce
    message = string_to_sign(ts, nonce, method, path, query, body).encode("utf-8")
    signature = hmac.new(_secret_bytes(secret), message, hashlib.sha256).hexdigest()
    return {
        HEADER_KEY_ID: key_id,
        HEADER_TIMESTAMP: str(ts),
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: signature,
    }


def sign_ts_body(secret: str | bytes, timestamp: int, body: bytes | str | None) -> str:
    """The hex signature of a ``ts-body`` request."""
    return hmac.new(_secret_bytes(secret), ts_body_string_to_sign(timestamp, body), hashlib.sha256).hexdigest()


def _split_url(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.path or "/", parts.query


class WardenAuth:
    """``requests`` auth: ``requests.post(url, data=..., auth=WardenAuth(key_id, secret))``."""

    def __init__(self, key_id: str, secret: str | bytes) -> None:
        self.key_id = key_id
        self._secret = _secret_bytes(secret)

    def __repr__(self) -> str:  # never show the secret
        return f"WardenAuth(key_id={self.key_id!r})"

    def __call__(self, request):  # requests.PreparedRequest
        path, query = _split_url(request.url)
        body = request.body
        if hasattr(body, "read"):
            raise ValueError("WardenAuth cannot sign streamed bodies; pass bytes or str")
        request.headers.update(sign_request(self.key_id, self._secret, request.method, path, query, body))
        return request


try:  # httpx is optional
    import httpx as _httpx

    class WardenHttpxAuth(_httpx.Auth):
        """``httpx`` auth: ``httpx.post(url, content=..., auth=WardenHttpxAuth(key_id, secret))``."""

        requires_request_body = True

        def __init__(self, key_id: str, secret: str | bytes) -> None:
            self.key_id = key_id
            self._secret = _secret_bytes(secret)

        def __repr__(self) -> str:
            return f"WardenHttpxAuth(key_id={self.key_id!r})"

        def auth_flow(self, request):
            raw = request.url.raw_path.decode("ascii")
            path, _, query = raw.partition("?")
            request.headers.update(
                sign_request(self.key_id, self._secret, request.method, path, query, request.content)
            )
            yield request

except ImportError:  # pragma: no cover - exercised only without httpx
    pass


def headers_from(mapping: Mapping[str, str], names: Mapping[str, str] | None = None) -> dict[str, str]:
    """Picks the four signing headers out of a case-insensitive mapping."""
    names = names or {}
    lowered = {k.lower(): v for k, v in mapping.items()}
    result = {}
    for default in (HEADER_KEY_ID, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE):
        name = names.get(default, default)
        if name.lower() in lowered:
            result[default] = lowered[name.lower()]
    return result
