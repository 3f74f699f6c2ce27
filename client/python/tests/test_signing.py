"""The Python signer reproduces every published vector (proto/SIGNING.md)."""

import json
from pathlib import Path

import pytest

from warden_client.signing import (
    canonical_query,
    sign_request,
    sign_ts_body,
    string_to_sign,
    ts_body_string_to_sign,
)

VECTORS = json.loads((Path(__file__).resolve().parents[3] / "proto" / "signing-vectors.json").read_text())["vectors"]


@pytest.mark.parametrize("v", [v for v in VECTORS if v["scheme"] == "warden-v1"], ids=lambda v: v["nonce"])
def test_warden_v1_vectors(v):
    body = bytes.fromhex(v["body_hex"])
    assert canonical_query(v["query"]) == v["canonical_query"]
    assert string_to_sign(v["timestamp"], v["nonce"], v["method"], v["path"], v["query"], body) == v["string_to_sign"]
    headers = sign_request(
        "k", v["secret"], v["method"], v["path"], v["query"], body, timestamp=v["timestamp"], nonce=v["nonce"]
    )
    assert headers["X-Signature"] == v["signature"]
    assert headers["X-Timestamp"] == str(v["timestamp"])


@pytest.mark.parametrize("v", [v for v in VECTORS if v["scheme"] == "ts-body"], ids=lambda v: str(v["timestamp"]))
def test_ts_body_vectors(v):
    body = bytes.fromhex(v["body_hex"])
    assert ts_body_string_to_sign(v["timestamp"], body).hex() == v["string_to_sign_hex"]
    assert sign_ts_body(v["secret"], v["timestamp"], body) == v["signature"]


def test_fresh_nonces_and_timestamps_are_generated():
    a = sign_request("k", "s" * 32, "GET", "/")
    b = sign_request("k", "s" * 32, "GET", "/")
    assert a["X-Nonce"] != b["X-Nonce"] and len(a["X-Nonce"]) == 32
    assert set(a) == {"X-Key-Id", "X-Timestamp", "X-Nonce", "X-Signature"}


def test_auth_objects_never_show_the_secret():
    from warden_client.signing import WardenAuth, WardenHttpxAuth

    assert "topsecret" not in repr(WardenAuth("k", "topsecret-0123456789abcdefghijklmn"))
    assert "topsecret" not in repr(WardenHttpxAuth("k", "topsecret-0123456789abcdefghijklmn"))
