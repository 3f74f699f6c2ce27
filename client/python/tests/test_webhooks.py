"""Webhooks both ways against the real warden binary over mTLS, checked
with the providers' own libraries: deliveries signed by ``standardwebhooks``,
``stripe`` and ``slack_sdk`` verify in warden (and are refused when forged,
tampered, stale or replayed); what warden signs for outbound webhooks
verifies with ``standardwebhooks`` and ``stripe`` — with either secret
during a rotation; ``WebhookSigner`` signs real ``requests`` and ``httpx``
requests; ``@warden_webhook`` answers providers through Django's test
client."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import secrets
import subprocess
import threading
import time
from datetime import datetime, timezone

import httpx
import pytest
import requests
import standardwebhooks
import stripe
from slack_sdk.signature import SignatureVerifier

from conftest import warden_bin
from warden_client import WardenClient, WebhookSigner
from warden_client.client import CheckRequest

STRIPE_SECRET = "whsec_" + secrets.token_hex(16)
GITHUB_SECRET = "gh-" + secrets.token_hex(12)
SLACK_SECRET = secrets.token_hex(16)
SW_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def run_cli(warden, *args: str, stdin: str = "") -> dict:
    out = subprocess.run(
        [str(warden_bin()), *args, "--json", "--dev-dir", str(warden.dev_dir)],
        input=stdin, capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="session")
def webhook_keys(warden):
    """The providers' secrets, imported into warden once per session."""
    for key_id, secret in [("wh_stripe", STRIPE_SECRET), ("wh_github", GITHUB_SECRET),
                           ("wh_slack", SLACK_SECRET), ("wh_std", SW_SECRET)]:
        shown = run_cli(warden, "keys", "create", "--id", key_id, "--policy", "demo", "--secret-stdin",
                        stdin=secret + "\n")
        assert secret not in json.dumps(shown)
    return True


@pytest.fixture
def client(warden):
    c = WardenClient(warden.addr, timeout=2.0, **warden.tls())
    yield c
    c.close()


def delivery(key_id: str, scheme: str, headers: dict, body: bytes) -> CheckRequest:
    req = CheckRequest(key_id=key_id, scheme=scheme, method="POST", path=f"/webhooks/{scheme}", body=body)
    for name, value in headers.items():
        req.headers[name] = value
    return req


def stripe_header(secret: str, payload: str, t: int | None = None) -> str:
    t = int(time.time()) if t is None else t
    # stripe-python's own signing, as its tests use it.
    sig = stripe.WebhookSignature._compute_signature(f"{t}.{payload}", secret)
    return f"t={t},v1={sig}"


def test_a_standard_webhooks_delivery_signed_by_the_library_verifies_once(warden, client, webhook_keys):
    payload = json.dumps({"type": "invoice.paid", "id": secrets.token_hex(4)})
    now = datetime.now(tz=timezone.utc)
    msg_id = "msg_" + secrets.token_hex(8)
    signature = standardwebhooks.Webhook(SW_SECRET).sign(msg_id=msg_id, timestamp=now, data=payload)
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())), "webhook-signature": signature}
    d = client.check(delivery("wh_std", "standard-webhooks", headers, payload.encode()))
    assert d.allowed, d
    assert d.caller.key_id == "wh_std"
    assert client.check(delivery("wh_std", "standard-webhooks", headers, payload.encode())).reason == "replay"
    tampered = client.check(delivery("wh_std", "standard-webhooks", {**headers, "webhook-id": "msg_other"}, payload.encode()))
    assert tampered.reason == "unauthenticated"


def test_stripe_and_slack_deliveries_signed_by_their_libraries_verify(warden, client, webhook_keys):
    payload = json.dumps({"id": "evt_" + secrets.token_hex(6), "object": "event"})
    d = client.check(delivery("wh_stripe", "stripe", {"Stripe-Signature": stripe_header(STRIPE_SECRET, payload)}, payload.encode()))
    assert d.allowed, d
    stale = stripe_header(STRIPE_SECRET, payload, int(time.time()) - 3600)
    assert client.check(delivery("wh_stripe", "stripe", {"Stripe-Signature": stale}, payload.encode())).reason == "stale"
    wrong = stripe_header("whsec_not_the_secret_at_all", payload)
    assert client.check(delivery("wh_stripe", "stripe", {"Stripe-Signature": wrong}, payload.encode())).reason == "unauthenticated"

    body = "token=x&team_id=T1&command=%2Fdeploy&text=" + secrets.token_hex(4)
    ts = str(int(time.time()))
    sig = SignatureVerifier(SLACK_SECRET).generate_signature(timestamp=ts, body=body)
    headers = {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": sig}
    assert client.check(delivery("wh_slack", "slack", headers, body.encode())).allowed
    assert client.check(delivery("wh_slack", "slack", headers, body.encode())).reason == "replay"


def test_outbound_signatures_verify_with_the_providers_libraries_through_a_rotation(warden, client):
    created = run_cli(warden, "keys", "create", "--id", "wh_out_" + secrets.token_hex(3), "--policy", "demo",
                      "--secret-format", "whsec")
    key_id, old_secret = created["key_id"], created["secret"]
    payload = json.dumps({"type": "order.shipped", "id": 42})
    signed = client.sign_webhook(key_id, "standard-webhooks", payload)
    assert standardwebhooks.Webhook(old_secret).verify(payload, signed.headers) == {"type": "order.shipped", "id": 42}

    rotated = run_cli(warden, "keys", "rotate", key_id, "--grace", "1h", "--secret-format", "whsec")
    new_secret = rotated["secret"]
    signed = client.sign_webhook(key_id, "standard-webhooks", payload)
    assert len(signed.headers["webhook-signature"].split(" ")) == 2
    # Receivers that know either secret accept it.
    for secret in (old_secret, new_secret):
        standardwebhooks.Webhook(secret).verify(payload, signed.headers)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(payload, signed.headers)

    # Stripe's format, verified by stripe-python.
    stripe_key = run_cli(warden, "keys", "create", "--id", "wh_stripe_out_" + secrets.token_hex(3), "--policy", "demo",
                         "--secret-format", "whsec")
    event = json.dumps({"id": "evt_out", "object": "event", "data": {"object": {"id": "x", "object": "charge"}}})
    signed = client.sign_webhook(stripe_key["key_id"], "stripe", event)
    verified = stripe.Webhook.construct_event(event, signed.headers["Stripe-Signature"], stripe_key["secret"])
    assert verified["id"] == "evt_out"


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Receiver.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_signer_signs_real_requests_and_httpx_requests(warden, client):
    created = run_cli(warden, "keys", "create", "--id", "wh_signer_" + secrets.token_hex(3), "--policy", "demo",
                      "--secret-format", "whsec")
    server = http.server.HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        signer = WebhookSigner(client, created["key_id"])
        payload = b'{"event":"sent-with-requests"}'
        assert requests.post(url, data=payload, auth=signer, timeout=5).status_code == 204
        assert httpx.post(url, content=b'{"event":"sent-with-httpx"}', auth=signer, timeout=5).status_code == 204
    finally:
        server.shutdown()
    assert len(_Receiver.received) == 2
    for headers, body in _Receiver.received:
        lower = {k.lower(): v for k, v in headers.items()}
        standardwebhooks.Webhook(created["secret"]).verify(body, lower)


@pytest.fixture
def webhook_settings(warden_settings, webhook_keys):
    warden_settings.WARDEN = {**warden_settings.WARDEN, "WEBHOOK_KEYS": {"stripe": "wh_stripe", "github": "wh_github"}}
    return warden_settings


def test_the_django_decorator_runs_the_view_once_per_delivery_and_answers_providers(webhook_settings):
    from django.test import Client

    from exampleapi import views

    web = Client()
    payload = json.dumps({"id": "evt_" + secrets.token_hex(6), "type": "invoice.paid"})
    header = stripe_header(STRIPE_SECRET, payload)
    before = len(views.RECEIVED)
    r = web.post("/webhooks/stripe", data=payload, content_type="application/json", HTTP_STRIPE_SIGNATURE=header)
    assert r.status_code == 200 and r.json() == {"received": "invoice.paid"}
    # The same delivery again: 200 "duplicate", and the view did not run.
    r = web.post("/webhooks/stripe", data=payload, content_type="application/json", HTTP_STRIPE_SIGNATURE=header)
    assert r.status_code == 200 and r.json() == {"status": "duplicate"}
    assert len(views.RECEIVED) == before + 1
    # Forged: Stripe is answered 400, as its documentation asks.
    forged = stripe_header("whsec_forged_by_someone", payload)
    r = web.post("/webhooks/stripe", data=payload, content_type="application/json", HTTP_STRIPE_SIGNATURE=forged)
    assert r.status_code == 400 and r.json()["error"] == "unauthenticated"
    r = web.post("/webhooks/stripe", data=payload, content_type="application/json")
    assert r.status_code == 400 and r.json()["error"] == "malformed"

    # GitHub: the body alone is signed.
    push = json.dumps({"ref": "refs/heads/main", "after": secrets.token_hex(20)}).encode()
    sig = "sha256=" + hmac.new(GITHUB_SECRET.encode(), push, hashlib.sha256).hexdigest()
    r = web.post("/webhooks/github", data=push, content_type="application/json",
                 HTTP_X_HUB_SIGNATURE_256=sig, HTTP_X_GITHUB_EVENT="push", HTTP_X_GITHUB_DELIVERY="d-1")
    assert r.status_code == 200 and r.json() == {"received": "push"}
    # Replayed with a new (unsigned) delivery id: still the same delivery.
    r = web.post("/webhooks/github", data=push, content_type="application/json",
                 HTTP_X_HUB_SIGNATURE_256=sig, HTTP_X_GITHUB_EVENT="push", HTTP_X_GITHUB_DELIVERY="d-2")
    assert r.json() == {"status": "duplicate"}
    r = web.post("/webhooks/github", data=push + b" ", content_type="application/json",
                 HTTP_X_HUB_SIGNATURE_256=sig, HTTP_X_GITHUB_EVENT="push", HTTP_X_GITHUB_DELIVERY="d-3")
    assert r.status_code == 401


def test_a_delivery_whose_view_failed_runs_again_when_the_provider_sends_it_again(webhook_settings):
    # The view raised, then answered 503: each time the provider's next try
    # (the same body, for GitHub the same delivery) must run it again, and
    # once it succeeded, never again.
    from django.http import HttpResponse, JsonResponse
    from django.test import RequestFactory

    from warden_client.django.webhooks import warden_webhook

    runs = []

    def flaky(request):
        runs.append(request.body)
        if len(runs) == 1:
            raise RuntimeError("the database went away")
        if len(runs) == 2:
            return HttpResponse(status=503)
        return JsonResponse({"received": "push"})

    view = warden_webhook("github")(flaky)
    push = json.dumps({"ref": "refs/heads/main", "after": secrets.token_hex(20)}).encode()
    sig = "sha256=" + hmac.new(GITHUB_SECRET.encode(), push, hashlib.sha256).hexdigest()

    def deliver():
        return view(RequestFactory().post("/webhooks/github", data=push, content_type="application/json",
                                          HTTP_X_HUB_SIGNATURE_256=sig, HTTP_X_GITHUB_EVENT="push"))

    with pytest.raises(RuntimeError):
        deliver()
    assert deliver().status_code == 503
    assert deliver().status_code == 200
    r = deliver()
    assert r.status_code == 200 and json.loads(r.content) == {"status": "duplicate"}
    assert len(runs) == 3


def test_an_async_view_is_guarded_alike_and_runs_again_after_it_failed(webhook_settings):
    import asyncio

    from django.http import JsonResponse
    from django.test import RequestFactory

    from warden_client.django.webhooks import warden_webhook

    runs = []

    async def flaky(request):
        runs.append(request.body)
        if len(runs) == 1:
            raise RuntimeError("the database went away")
        return JsonResponse({"received": "push"})

    view = warden_webhook("github")(flaky)
    assert asyncio.iscoroutinefunction(view)
    push = json.dumps({"ref": "refs/heads/main", "after": secrets.token_hex(20)}).encode()
    sig = "sha256=" + hmac.new(GITHUB_SECRET.encode(), push, hashlib.sha256).hexdigest()

    def request(signature):
        return RequestFactory().post("/webhooks/github", data=push, content_type="application/json",
                                     HTTP_X_HUB_SIGNATURE_256=signature, HTTP_X_GITHUB_EVENT="push")

    async def deliveries():
        with pytest.raises(RuntimeError):
            await view(request(sig))
        answers = [await view(request(sig)), await view(request(sig))]
        forged = await view(request("sha256=" + "0" * 64))
        return answers, forged

    (ran, duplicate), forged = asyncio.run(deliveries())
    assert ran.status_code == 200 and json.loads(ran.content) == {"received": "push"}
    assert duplicate.status_code == 200 and json.loads(duplicate.content) == {"status": "duplicate"}
    assert forged.status_code == 401
    assert len(runs) == 2


def test_a_forwarded_for_entry_the_client_invented_is_not_its_address(warden_settings):
    from django.test import RequestFactory

    from warden_client.django.conf import get_conf
    from warden_client.django.middleware import client_ip

    warden_settings.WARDEN = {**warden_settings.WARDEN, "TRUSTED_PROXY_HEADER": "X-Forwarded-For"}
    conf = get_conf()
    request = RequestFactory().get("/", HTTP_X_FORWARDED_FOR="6.6.6.6, 203.0.113.7", REMOTE_ADDR="10.0.0.2")
    assert client_ip(request, conf) == "203.0.113.7"
    warden_settings.WARDEN = {**warden_settings.WARDEN, "TRUSTED_PROXY_HOPS": 2}
    assert client_ip(request, get_conf()) == "6.6.6.6"
    alone = RequestFactory().get("/", HTTP_X_FORWARDED_FOR="203.0.113.7", REMOTE_ADDR="10.0.0.2")
    assert client_ip(alone, get_conf()) == "10.0.0.2"


def test_the_async_client_signs_webhooks_too(warden, transport):
    import asyncio

    from warden_client import AsyncWardenClient, WardenError, WardenUnavailable

    created = run_cli(warden, "keys", "create", "--id", "wh_async_" + secrets.token_hex(3), "--policy", "demo",
                      "--secret-format", "whsec")

    async def sign():
        c = AsyncWardenClient(warden.addr, timeout=2.0, transport=transport, **warden.tls())
        try:
            signed = await c.sign_webhook(created["key_id"], "standard-webhooks", b'{"async":true}',
                                          message_id="msg_async")
            # An unknown key: warden refuses the call itself, the same
            # exception over either transport.
            with pytest.raises(WardenError) as e:
                await c.sign_webhook("no-such-key", "standard-webhooks", b"{}")
            return signed, e.value
        finally:
            await c.close()

    signed, refused = asyncio.run(sign())
    assert signed.message_id == "msg_async"
    standardwebhooks.Webhook(created["secret"]).verify(b'{"async":true}', signed.headers)
    assert not isinstance(refused, WardenUnavailable)
    assert refused.code is not None and refused.code.name in ("NOT_FOUND", "PERMISSION_DENIED", "INVALID_ARGUMENT")
