"""The Python client against the real warden binary over mTLS."""

import asyncio
import os
import time

import pytest

from warden_client import AsyncWardenClient, CheckRequest, WardenClient, WardenUnavailable, sign_request
from warden_client.client import CircuitBreaker


def signed(key, method="POST", path="/orders", query="", body=b"{}"):
    h = sign_request(key["key_id"], key["secret"], method, path, query, body)
    return CheckRequest(
        key_id=h["X-Key-Id"], timestamp=int(h["X-Timestamp"]), nonce=h["X-Nonce"], signature=h["X-Signature"],
        method=method, path=path, query=query, body=body,
    )


@pytest.fixture
def client(warden):
    c = WardenClient(warden.addr, timeout=2.0, **warden.tls())
    yield c
    c.close()


def test_the_signers_output_verifies_in_warden(warden, client):
    key = warden.create_key("--owner", "py", "--scope", "orders:write")
    d = client.check(signed(key))
    assert d.allowed and d.reason == "ok" and d.http_status == 200
    assert d.caller.key_id == key["key_id"] and d.caller.scopes == ("orders:write",)


def test_a_tampered_body_is_unauthenticated_and_a_replay_is_refused(warden, client):
    key = warden.create_key("--owner", "py")
    req = signed(key)
    assert client.check(req).allowed
    assert client.check(req).reason == "replay"
    tampered = signed(key)
    tampered.body = b'{"amount": 1000000}'
    d = client.check(tampered)
    assert (d.allowed, d.reason, d.http_status) == (False, "unauthenticated", 401)


def test_keyword_fields_and_streams(warden, client):
    key = warden.create_key("--owner", "py")
    h = sign_request(key["key_id"], key["secret"], "GET", "/k")
    d = client.check(key_id=key["key_id"], timestamp=int(h["X-Timestamp"]), nonce=h["X-Nonce"],
                     signature=h["X-Signature"], method="GET", path="/k")
    assert d.allowed
    answers = client.check_many([signed(key), signed(key, path="/other")])
    assert [a.reason for a in answers] == ["ok", "ok"]


def test_requests_and_httpx_auth_sign_what_they_send(warden, client):
    import httpx
    import requests

    from warden_client.signing import WardenAuth, WardenHttpxAuth

    key = warden.create_key("--owner", "py")
    prepared = requests.Request("POST", "https://api.example/v1/pay?b=2&a=1", data=b'{"x":1}',
                                auth=WardenAuth(key["key_id"], key["secret"])).prepare()
    h = prepared.headers
    d = client.check(CheckRequest(key_id=h["X-Key-Id"], timestamp=int(h["X-Timestamp"]), nonce=h["X-Nonce"],
                                  signature=h["X-Signature"], method="POST", path="/v1/pay", query="b=2&a=1",
                                  body=b'{"x":1}'))
    assert d.allowed, d
    request = httpx.Request("PUT", "https://api.example/v1/items/7?z=%7e", content=b"abc")
    flow = WardenHttpxAuth(key["key_id"], key["secret"]).auth_flow(request)
    signed_request = next(flow)
    h = signed_request.headers
    d = client.check(CheckRequest(key_id=h["X-Key-Id"], timestamp=int(h["X-Timestamp"]), nonce=h["X-Nonce"],
                                  signature=h["X-Signature"], method="PUT", path="/v1/items/7", query="z=%7e",
                                  body=b"abc"))
    assert d.allowed, d


def test_the_async_client(warden):
    key = warden.create_key("--owner", "py")

    async def run():
        c = AsyncWardenClient(warden.addr, timeout=2.0, **warden.tls())
        try:
            return [await c.check(signed(key)), await c.check(signed(key, path="/b"))]
        finally:
            await c.close()

    assert [d.reason for d in asyncio.run(run())] == ["ok", "ok"]


def test_a_forked_child_never_reuses_the_parents_channel(warden, client):
    key = warden.create_key("--owner", "py")
    assert client.check(signed(key)).allowed
    parent_pid = os.getpid()
    assert client.channel_pid == parent_pid
    pid = os.fork()
    if pid == 0:  # the child, as in a pre-fork worker
        code = 1
        try:
            d = client.check(signed(key))
            code = 0 if d.allowed and client.channel_pid == os.getpid() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's channel still works after the fork.
    assert client.check(signed(key)).allowed
    assert client.channel_pid == parent_pid


def test_a_dead_server_costs_microseconds_once_the_breaker_opens(warden):
    dead = WardenClient("127.0.0.1:1", timeout=0.3, breaker=CircuitBreaker(failures=2, reset_after=30), **warden.tls())
    for _ in range(2):
        with pytest.raises(WardenUnavailable):
            dead.check(CheckRequest(key_id="k", method="GET", path="/"))
    assert dead.breaker.is_open
    started = time.perf_counter()
    for _ in range(100):
        with pytest.raises(WardenUnavailable):
            dead.check(CheckRequest(key_id="k", method="GET", path="/"))
    assert (time.perf_counter() - started) / 100 < 0.001


def test_reason_names_come_from_the_proto_enum():
    from warden_client._proto.warden.v1 import warden_pb2
    from warden_client.client import reason_name

    assert reason_name(warden_pb2.REASON_RATE_LIMITED) == "rate_limited"
    assert reason_name(warden_pb2.REASON_LOCKED_OUT) == "locked_out"
    assert reason_name(9999) == "unspecified"
    for name, value in warden_pb2.Reason.items():
        assert reason_name(value) == name.removeprefix("REASON_").lower()


def test_with_several_targets_a_node_that_is_down_is_not_noticed(warden):
    key = warden.create_key("--owner", "py-failover")
    # A node that refuses connections, and a live one: every call lands,
    # whichever target its turn starts at.
    c = WardenClient(["127.0.0.1:1", warden.addr], timeout=2.0, **warden.tls())
    try:
        assert c.targets == ["127.0.0.1:1", warden.addr]
        answers = [c.check(signed(key)) for _ in range(6)]
        assert all(a.allowed for a in answers)
        assert c.breaker.allow()
    finally:
        c.close()
    # The same, written as one comma-separated string (as in an env var).
    c = WardenClient(f"127.0.0.1:1, {warden.addr}", timeout=2.0, **warden.tls())
    try:
        assert c.check(signed(key)).allowed
    finally:
        c.close()


def test_when_every_target_is_down_the_call_fails_as_unavailable(warden):
    c = WardenClient("127.0.0.1:1,127.0.0.1:2", timeout=1.0, **warden.tls())
    try:
        with pytest.raises(WardenUnavailable):
            c.check(key_id="k", method="GET", path="/")
    finally:
        c.close()


def test_the_async_client_fails_over_too(warden):
    key = warden.create_key("--owner", "py-failover-aio")

    async def run():
        c = AsyncWardenClient(["127.0.0.1:1", warden.addr], timeout=2.0, **warden.tls())
        try:
            return [await c.check(signed(key)) for _ in range(4)]
        finally:
            await c.close()

    assert all(a.allowed for a in asyncio.run(run()))
