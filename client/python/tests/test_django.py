"""The Django middleware and DRF classes in the example project, through
Django's test client, against the real warden binary over mTLS."""

import contextlib
import logging
import os
import time

import pytest

from warden_client.signing import sign_request


def headers(key, method, path, query="", body=b""):
    h = sign_request(key["key_id"], key["secret"], method, path, query, body)
    return {f"HTTP_{k.upper().replace('-', '_')}": v for k, v in h.items()}


@pytest.fixture
def key(warden, warden_settings):
    return warden.create_key("--owner", "django-test", "--scope", "orders:read", "--policy", "demo")


def test_a_signed_request_reaches_the_view_with_request_warden_set(client, key):
    r = client.post("/api/orders", data=b'{"qty":1}', content_type="application/json",
                    **headers(key, "POST", "/api/orders", body=b'{"qty":1}'))
    assert r.status_code == 200, r.content
    assert r.json() == {"key_id": key["key_id"], "owner": "django-test", "scopes": ["orders:read"]}
    assert "RateLimit" in r.headers and "RateLimit-Policy" in r.headers


def test_a_tampered_body_is_401_with_a_body_that_reveals_nothing(client, key):
    r = client.post("/api/orders", data=b'{"qty":999}', content_type="application/json",
                    **headers(key, "POST", "/api/orders", body=b'{"qty":1}'))
    assert r.status_code == 401
    assert r.json() == {"error": "unauthenticated", "message": "The request could not be authenticated."}


def test_a_replay_is_401(client, key):
    h = headers(key, "GET", "/api/orders", query="x=1")
    assert client.get("/api/orders?x=1", **h).status_code == 200
    r = client.get("/api/orders?x=1", **h)
    assert r.status_code == 401 and r.json()["error"] == "replay"


def test_over_the_limit_is_429_with_a_correct_retry_after(client, warden, warden_settings):
    warden.cli("policies", "put", "three-per-minute", "--limit", "3", "--period", "1m", "--json")
    key = warden.create_key("--owner", "limited", "--policy", "three-per-minute")
    for _ in range(3):
        assert client.get("/api/orders", **headers(key, "GET", "/api/orders")).status_code == 200
    r = client.get("/api/orders", **headers(key, "GET", "/api/orders"))
    assert r.status_code == 429
    # 3 per minute: one request every 20 s.
    assert 1 <= int(r.headers["Retry-After"]) <= 20
    assert r.json()["error"] == "rate_limited" and r.json()["retry_after"] == int(r.headers["Retry-After"])


def test_ratelimit_headers_off_leaves_them_off_every_answer_but_a_refusal_keeps_its_retry_after(
        client, warden, warden_settings):
    warden_settings.WARDEN = {**warden_settings.WARDEN, "RATELIMIT_HEADERS": False}
    warden.cli("policies", "put", "one-per-minute", "--limit", "1", "--period", "1m", "--json")
    key = warden.create_key("--owner", "quiet", "--policy", "one-per-minute")
    allowed = client.get("/api/orders", **headers(key, "GET", "/api/orders"))
    assert allowed.status_code == 200, allowed.content
    assert allowed.json()["key_id"] == key["key_id"]
    refused = client.get("/api/orders", **headers(key, "GET", "/api/orders"))
    assert refused.status_code == 429, refused.content
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    for r in (allowed, refused):
        assert not [h for h in r.headers if h.lower().startswith("ratelimit")], dict(r.headers)
    # On again: the same key's next minute would be refused, so a fresh key
    # shows the headers are back on an allowed answer and on a refusal.
    warden_settings.WARDEN = {**warden_settings.WARDEN, "RATELIMIT_HEADERS": True}
    key = warden.create_key("--owner", "loud", "--policy", "one-per-minute")
    allowed = client.get("/api/orders", **headers(key, "GET", "/api/orders"))
    refused = client.get("/api/orders", **headers(key, "GET", "/api/orders"))
    assert (allowed.status_code, refused.status_code) == (200, 429)
    for r in (allowed, refused):
        assert "RateLimit" in r.headers and "RateLimit-Policy" in r.headers, dict(r.headers)


def test_ratelimit_headers_is_true_or_false(warden_settings):
    from django.core.exceptions import ImproperlyConfigured

    from warden_client.django.conf import get_conf

    assert get_conf().ratelimit_headers is True
    for bad in ("false", 0, None, "no"):
        warden_settings.WARDEN = {**warden_settings.WARDEN, "RATELIMIT_HEADERS": bad}
        with pytest.raises(ImproperlyConfigured, match="RATELIMIT_HEADERS"):
            get_conf()


def test_an_unprotected_path_makes_no_call(client, warden, warden_settings):
    before = warden.metric("warden_rpc_duration_seconds_count{rpc=\"Check\"}")
    assert client.get("/health").status_code == 200
    assert warden.metric("warden_rpc_duration_seconds_count{rpc=\"Check\"}") == before


def test_missing_credentials_are_401_without_a_call(client, warden, warden_settings):
    before = warden.metric("warden_rpc_duration_seconds_count{rpc=\"Check\"}")
    assert client.get("/api/orders").status_code == 401
    assert warden.metric("warden_rpc_duration_seconds_count{rpc=\"Check\"}") == before


def test_the_public_login_route_is_limited_per_ip(client, warden_settings):
    # The dev policy "per-ip" allows 30 per minute per IP.
    codes = [client.post("/api/login", REMOTE_ADDR="198.51.100.9").status_code for _ in range(31)]
    assert codes[:30] == [200] * 30 and codes[30] == 429
    assert client.post("/api/login", REMOTE_ADDR="198.51.100.10").status_code == 200


def test_a_route_limit_by_view_counts_every_spelling_its_pattern_answers(client, warden_settings):
    # The example's login pattern answers with and without a trailing
    # slash; its limit names the view, so both spend one count.
    codes = [client.post("/api/login" + "/" * (i % 2), REMOTE_ADDR="198.51.100.91").status_code for i in range(31)]
    assert codes[:30] == [200] * 30 and codes[30] == 429, codes


def test_a_route_limit_by_path_counts_it_with_and_without_a_trailing_slash(client, warden_settings):
    warden_settings.WARDEN = {**warden_settings.WARDEN, "ROUTE_LIMITS": [
        {"path": "/api/login", "methods": ["POST"], "policy": "per-ip", "by": "ip"}]}
    codes = [client.post("/api/login" + "/" * (i % 2), REMOTE_ADDR="198.51.100.93").status_code for i in range(31)]
    assert codes[:30] == [200] * 30 and codes[30] == 429, codes


def test_a_route_limit_on_get_counts_head_which_runs_the_same_view(client, warden_settings):
    warden_settings.WARDEN = {**warden_settings.WARDEN, "ROUTE_LIMITS": [
        {"view": "login", "methods": ["GET"], "policy": "per-ip", "by": "ip"}]}
    codes = [client.head("/api/login", REMOTE_ADDR="198.51.100.92").status_code for _ in range(31)]
    assert 429 not in codes[:30] and codes[30] == 429, codes
    # Another method is not counted by it.
    assert client.post("/api/login", REMOTE_ADDR="198.51.100.92").status_code == 200


def test_an_exempt_or_public_path_lets_no_other_path_past_the_credentials(client, warden_settings):
    # "/api/order" names that path and what lies below it, never
    # "/api/orders": a view beside it must not lose its check by sharing the
    # first letters of its name.
    for setting in ("EXEMPT_PATHS", "PUBLIC_PATHS"):
        warden_settings.WARDEN = {**warden_settings.WARDEN, setting: ["/api/order", "/api/async/"]}
        r = client.get("/api/orders")
        assert r.status_code == 401, (setting, r.status_code)
        # What it names is let through: below an entry ending in "/" too.
        assert client.get("/api/order").status_code == 404, setting
        assert client.get("/api/async/orders").status_code == 200, setting
    warden_settings.WARDEN = {**warden_settings.WARDEN, "EXEMPT_PATHS": ["/api/order*"]}
    assert client.get("/api/orders").status_code == 200


def test_a_mount_point_the_client_picks_moves_no_view_out_of_its_check(client, warden, warden_settings):
    # gunicorn takes SCRIPT_NAME from a request header when its forwarder
    # is trusted (127.0.0.1 by default), and Envoy passes such a header on.
    # Django finds the view by the path below the mount point: these all
    # run the /api/orders view, which must not run unchecked.
    before = warden.metric("warden_rpc_duration_seconds_count{rpc=\"Check\"}")
    for mount in ("/x", "/health", "/api/login"):
        r = client.post("/api/orders", SCRIPT_NAME=mount)
        assert r.status_code == 401, (mount, r.status_code, r.content)
    # PUBLIC_PATHS did not lend the app's own key to it either.
    assert warden.metric("warden_rpc_duration_seconds_count{rpc=\"Check\"}") == before


def test_an_app_mounted_below_a_prefix_is_checked_by_its_own_paths(client, key, warden, warden_settings, caplog):
    # Mounted at /svc: the settings name the paths urls.py sees; the
    # signature covers the whole path the client sent.
    h = headers(key, "GET", "/svc/api/orders")
    r = client.get("/api/orders", SCRIPT_NAME="/svc", **h)
    assert r.status_code == 200 and r.json()["key_id"] == key["key_id"], r.content
    assert client.get("/api/orders", SCRIPT_NAME="/svc").status_code == 401
    before = warden.metric("warden_rpc_duration_seconds_count{rpc=\"Check\"}")
    assert client.get("/health", SCRIPT_NAME="/svc").status_code == 200
    assert warden.metric("warden_rpc_duration_seconds_count{rpc=\"Check\"}") == before
    # A PROTECTED_PATHS entry written with the mount point still checks.
    warden_settings.WARDEN = {**warden_settings.WARDEN, "PROTECTED_PATHS": ["/svc/api/"]}
    assert client.get("/api/orders", SCRIPT_NAME="/svc").status_code == 401
    # An EXEMPT_PATHS entry written with it no longer lets anything past:
    # the request is checked, and the log says why.
    warden_settings.WARDEN = {**warden_settings.WARDEN, "PROTECTED_PATHS": ["/"], "EXEMPT_PATHS": ["/svc/health"]}
    with caplog.at_level(logging.WARNING, logger="warden_client"):
        assert client.get("/health", SCRIPT_NAME="/svc").status_code == 401
    assert any("EXEMPT_PATHS entry '/svc/health'" in m and "below the mount point" in m for m in caplog.messages)


def test_a_route_limit_by_path_is_one_count_however_the_client_spells_the_path(client, warden_settings):
    # By "path" counts the route as configured: neither a trailing slash
    # nor a mount point the client picks gives it a fresh count.
    warden_settings.WARDEN = {**warden_settings.WARDEN, "ROUTE_LIMITS": [
        {"path": "/api/login", "methods": ["POST"], "policy": "per-ip", "by": "path"}]}
    codes = [client.post("/api/login" + "/" * (i % 2), SCRIPT_NAME=f"/m{i}", REMOTE_ADDR=f"198.51.100.{i}").status_code
             for i in range(31)]
    assert codes[:30] == [200] * 30 and codes[30] == 429, codes


def test_a_key_id_named_by_a_request_that_does_not_prove_it_spends_nothing_of_that_keys_limits(
        client, warden, warden_settings):
    # A route counted "by" key, on a path open to anonymous use too: a
    # request naming a key it does not hold must not spend that key's
    # count, and bearer keys sent without X-Key-Id are each their own.
    warden.cli("policies", "put", "two-per-hour", "--limit", "2", "--period", "1h", "--json")
    warden_settings.WARDEN = {**warden_settings.WARDEN, "PUBLIC_PATHS": ["/api/orders"], "ROUTE_LIMITS": [
        {"path": "/api/orders", "methods": ["GET"], "policy": "two-per-hour", "by": "key"}]}
    victim = warden.create_key("--owner", "victim", "--policy", "demo")
    for i in range(3):
        r = client.get("/api/orders", HTTP_X_KEY_ID=victim["key_id"], REMOTE_ADDR=f"198.51.100.{60 + i}")
        assert r.status_code == 200, r.content
    assert client.get("/api/orders", **headers(victim, "GET", "/api/orders")).status_code == 200
    bearers = [warden.create_key("--owner", f"bearer-{i}", "--bearer", "--policy", "demo") for i in range(3)]
    for b in bearers:
        r = client.get("/api/orders", HTTP_AUTHORIZATION=f"Bearer {b['api_key']}")
        assert r.status_code == 200, (b["key_id"], r.content)
    # The count is per key all the same: the victim's third is refused.
    assert client.get("/api/orders", **headers(victim, "GET", "/api/orders")).status_code == 200
    assert client.get("/api/orders", **headers(victim, "GET", "/api/orders")).status_code == 429


def test_behind_a_proxy_that_is_not_configured_the_shared_failure_budget_is_warned_of(client, warden_settings, caplog):
    # Without TRUSTED_PROXY_HEADER, every client behind a proxy is its
    # address: one client's bad signatures lock all of them out. Said once.
    from warden_client.django import middleware

    middleware._proxy_warned = False
    with caplog.at_level(logging.WARNING, logger="warden_client.django"):
        for _ in range(3):
            client.get("/api/orders", REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR="198.51.100.4",
                       HTTP_AUTHORIZATION="Bearer wk_not_a_key")
    warned = [r.getMessage() for r in caplog.records if "TRUSTED_PROXY_HEADER" in r.getMessage()]
    assert len(warned) == 1 and "10.0.0.2" in warned[0], warned
    # Configured, nothing to say.
    middleware._proxy_warned = False
    caplog.clear()
    warden_settings.WARDEN = {**warden_settings.WARDEN, "TRUSTED_PROXY_HEADER": "X-Forwarded-For"}
    with caplog.at_level(logging.WARNING, logger="warden_client.django"):
        client.get("/api/orders", REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR="198.51.100.4",
                   HTTP_AUTHORIZATION="Bearer wk_not_a_key")
    assert not [r for r in caplog.records if "TRUSTED_PROXY_HEADER" in r.getMessage()]


def test_a_route_limit_that_would_count_everyone_together_is_refused(warden_settings):
    from django.core.exceptions import ImproperlyConfigured

    from warden_client.django.conf import get_conf

    for bad in ({"path": "/api/login", "policy": "per-ip", "by": "IP"},
                {"path": "/api/login", "view": "login", "policy": "per-ip"},
                {"policy": "per-ip"}):
        warden_settings.WARDEN = {**warden_settings.WARDEN, "ROUTE_LIMITS": [bad]}
        with pytest.raises(ImproperlyConfigured):
            get_conf()


def test_an_ipv6_client_gets_one_count_per_64_and_an_ipv4_mapped_address_is_its_ipv4(client, warden_settings):
    # One host holds a whole /64: a fresh address per request must not be
    # a fresh per-ip count. The dev policy "per-ip" allows 30 per minute.
    codes = [client.post("/api/login", REMOTE_ADDR=f"2001:db8:7:7::{i:x}").status_code for i in range(1, 32)]
    assert codes[:30] == [200] * 30 and codes[30] == 429, codes
    assert client.post("/api/login", REMOTE_ADDR="2001:db8:7:8::1").status_code == 200
    codes = [client.post("/api/login", REMOTE_ADDR="198.51.100.77").status_code for _ in range(30)]
    assert codes == [200] * 30
    assert client.post("/api/login", REMOTE_ADDR="::ffff:198.51.100.77").status_code == 429


def test_warden_stopped_and_failing_closed_is_a_quick_503(client, warden_settings, tmp_path):
    from conftest import start_warden

    doomed = start_warden(tmp_path / "doomed")
    doomed.stop()
    warden_settings.WARDEN = {**warden_settings.WARDEN, "TARGET": doomed.addr, "TIMEOUT": 0.3,
                              "BREAKER": {"FAILURES": 2, "RESET_AFTER": 30}}
    started = time.perf_counter()
    codes = [client.get("/api/orders", HTTP_X_KEY_ID="k", HTTP_X_SIGNATURE="0" * 64).status_code for _ in range(20)]
    assert codes == [503] * 20
    assert time.perf_counter() - started < 2.0


def test_warden_stopped_and_failing_open_lets_requests_through_with_a_warning(client, warden_settings, tmp_path, caplog):
    warden_settings.WARDEN = {**warden_settings.WARDEN, "TARGET": "127.0.0.1:1", "FAILURE_MODE": "open",
                              "TIMEOUT": 0.3, "BREAKER": {"FAILURES": 1000, "RESET_AFTER": 1}}
    with caplog.at_level(logging.WARNING, logger="warden_client.django"):
        r = client.get("/api/orders", HTTP_X_KEY_ID="k", HTTP_X_SIGNATURE="0" * 64)
    assert r.status_code == 200 and r.json()["key_id"] is None
    assert any("failing open" in rec.getMessage() for rec in caplog.records)


def test_a_full_replay_memory_fails_closed_even_when_failing_open(client, warden_settings, tmp_path, transport, caplog):
    # warden is there and refuses new nonces while its replay memory is
    # full. An attacker who fills it must not turn FAILURE_MODE "open" into
    # "no checks" (every signed request let through unremembered, so
    # replayable), nor trip the breaker into failing open for everyone.
    from conftest import start_warden

    dev = tmp_path / "full"
    start_warden(dev, ready=False).stop()  # its CA and certificates
    config = dev / "warden.toml"
    secret = "test-secret-0123456789abcdefghijklmnopqrstuvwxyz"
    config.write_text(f"""
listen = "127.0.0.1:0"

[[callers]]
identity = "spiffe://warden.dev/client"
roles = ["check"]

[check]
nonce_capacity = 3

[[policies]]
name = "plenty"
limit = 1000
period = "1d"

[[keys]]
id = "wk_full"
policies = ["plenty"]
secrets = [{{ value = "{secret}" }}]

[tls]
cert = "{dev / 'server.pem'}"
key = "{dev / 'server-key.pem'}"
client_ca = "{dev / 'ca.pem'}"
""")
    full = start_warden(dev, config)
    try:
        tls = full.tls()
        warden_settings.WARDEN = {**warden_settings.WARDEN, "TARGET": full.addr, "FAILURE_MODE": "open",
                                  "CA": tls["ca"], "CERT": tls["cert"], "KEY": tls["key"],
                                  "TRANSPORT": transport, "BREAKER": {"FAILURES": 1, "RESET_AFTER": 30}}
        key = {"key_id": "wk_full", "secret": secret}
        first = headers(key, "GET", "/api/orders")
        assert client.get("/api/orders", **first).status_code == 200
        for _ in range(2):
            assert client.get("/api/orders", **headers(key, "GET", "/api/orders")).status_code == 200
        with caplog.at_level(logging.WARNING, logger="warden_client.django"):
            codes = [client.get("/api/orders", **headers(key, "GET", "/api/orders")).status_code for _ in range(3)]
        assert codes == [503] * 3
        assert not any("failing open" in rec.getMessage() for rec in caplog.records)
        assert any("replay cache is full" in rec.getMessage() for rec in caplog.records)
        # A replay of a remembered request is still refused as one.
        r = client.get("/api/orders", **first)
        assert r.status_code == 401 and r.json()["error"] == "replay"
    finally:
        full.stop()


def test_a_hung_warden_failing_open_lets_requests_through(client, warden_settings, own_warden, caplog):
    # Hung (SIGSTOP) on a connection already made: the check ends at the
    # deadline as "unreachable", so FAILURE_MODE applies. With the compiled
    # transport it once ended as a refusal (503) whatever the mode.
    hung = own_warden
    tls = hung.tls()
    warden_settings.WARDEN = {**warden_settings.WARDEN, "TARGET": hung.addr, "FAILURE_MODE": "open",
                              "CA": tls["ca"], "CERT": tls["cert"], "KEY": tls["key"],
                              "TIMEOUT": 0.3, "BREAKER": {"FAILURES": 1000, "RESET_AFTER": 1}}
    # Connected: this server answers that the request is malformed.
    assert client.get("/api/orders", HTTP_X_KEY_ID="k", HTTP_X_SIGNATURE="0" * 64).status_code == 400
    hung.pause()
    try:
        with caplog.at_level(logging.WARNING, logger="warden_client.django"):
            r = client.get("/api/orders", HTTP_X_KEY_ID="k", HTTP_X_SIGNATURE="0" * 64)
    finally:
        hung.resume()
    assert r.status_code == 200 and r.json()["key_id"] is None
    assert any("failing open" in rec.getMessage() for rec in caplog.records)


def test_a_webhook_bound_to_one_client_identity(client, warden, warden_settings):
    key = warden.create_key("--owner", "billing-partner", "--route", "POST /webhooks/billing",
                            "--scope", "billing:webhook", "--bind", "CN=partner-billing,O=Partner Inc")
    body = b'{"type":"invoice.paid"}'
    ok = client.post("/webhooks/billing", data=body, content_type="application/json",
                     HTTP_X_CLIENT_DN="CN=partner-billing,O=Partner Inc", HTTP_X_CLIENT_VERIFY="SUCCESS",
                     **headers(key, "POST", "/webhooks/billing", body=body))
    assert ok.status_code == 200 and ok.json() == {"received": "invoice.paid"}
    other = client.post("/webhooks/billing", data=body, content_type="application/json",
                        HTTP_X_CLIENT_DN="CN=someone-else", HTTP_X_CLIENT_VERIFY="SUCCESS",
                        **headers(key, "POST", "/webhooks/billing", body=body))
    assert other.status_code == 403
    # Any other valid key, unbound, from the partner's own certificate: the
    # view refuses it, as the README promises.
    unbound = warden.create_key("--owner", "someone", "--policy", "demo")
    stranger = client.post("/webhooks/billing", data=body, content_type="application/json",
                           HTTP_X_CLIENT_DN="CN=partner-billing,O=Partner Inc", HTTP_X_CLIENT_VERIFY="SUCCESS",
                           **headers(unbound, "POST", "/webhooks/billing", body=body))
    assert stranger.status_code == 403


def test_drf_authentication_and_throttle_in_a_drf_view(client, warden, warden_settings):
    warden.cli("policies", "put", "items-two", "--limit", "2", "--period", "1m", "--json")
    warden_settings.WARDEN = {**warden_settings.WARDEN, "THROTTLE_POLICIES": {"items": "items-two"},
                              "PROTECTED_PATHS": ["/webhooks/"]}  # DRF does the check itself here
    key = warden.create_key("--owner", "drf")
    for _ in range(2):
        r = client.get("/api/items", **headers(key, "GET", "/api/items"))
        assert r.status_code == 200, r.content
        assert r.json()["key_id"] == key["key_id"]
    r = client.get("/api/items", **headers(key, "GET", "/api/items"))
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert client.get("/api/items").status_code in (401, 403)


def test_drf_reuses_the_middlewares_check(client, warden, warden_settings):
    warden.cli("policies", "put", "items-one", "--limit", "1", "--period", "1m", "--json")
    warden_settings.WARDEN = {**warden_settings.WARDEN, "THROTTLE_POLICIES": {"items": "items-one"}}
    key = warden.create_key("--owner", "drf-mw")
    assert client.get("/api/items", **headers(key, "GET", "/api/items")).status_code == 200
    r = client.get("/api/items", **headers(key, "GET", "/api/items"))
    assert r.status_code == 429


def test_one_clients_bad_signatures_never_lock_out_another(client, key):
    """Failures are charged to the client address the middleware passes on:
    an attacker who knows the key id locks out only itself."""
    forged = dict(key, secret="not-the-secret-0123456789abcdefghijkl")
    for _ in range(25):
        r = client.get("/api/orders", REMOTE_ADDR="198.51.100.23", **headers(forged, "GET", "/api/orders"))
        assert r.status_code in (401, 429)
    r = client.get("/api/orders", REMOTE_ADDR="198.51.100.23", **headers(key, "GET", "/api/orders"))
    assert r.status_code == 429 and r.json()["error"] == "locked_out"
    r = client.get("/api/orders", REMOTE_ADDR="192.0.2.80", **headers(key, "GET", "/api/orders"))
    assert r.status_code == 200, r.content


def test_several_targets_in_the_settings_fail_over_without_the_app_noticing(client, key, warden_settings, warden):
    # The first node refuses connections; the middleware's calls go on to
    # the next.
    warden_settings.WARDEN = {**warden_settings.WARDEN, "TARGET": ["127.0.0.1:1", warden.addr]}
    for _ in range(3):
        r = client.get("/api/orders", **headers(key, "GET", "/api/orders"))
        assert r.status_code == 200, r.content


def test_the_middleware_answers_the_same_over_either_transport(client, key, warden_settings, transport):
    from django.core.exceptions import ImproperlyConfigured

    from warden_client.django.conf import get_conf

    warden_settings.WARDEN = {**warden_settings.WARDEN, "TRANSPORT": transport}
    assert get_conf().client().transport == transport
    h = headers(key, "POST", "/api/orders", body=b'{"qty": 1}')
    r = client.post("/api/orders", data=b'{"qty": 1}', content_type="application/json", **h)
    assert r.status_code == 200, r.content
    r = client.post("/api/orders", data=b'{"qty": 1}', content_type="application/json", **h)
    assert r.status_code == 401 and r.json()["error"] == "replay"
    warden_settings.WARDEN = {**warden_settings.WARDEN, "TRANSPORT": "smoke-signals"}
    with pytest.raises(ImproperlyConfigured, match="TRANSPORT"):
        get_conf()


def test_busy_wait_is_a_setting_with_bounds(warden_settings):
    from django.core.exceptions import ImproperlyConfigured

    from warden_client.django.conf import get_conf

    # Unset: each client's own default, longer for an event loop's lone
    # call, whose miss costs three thread wake-ups instead of one.
    assert "BUSY_WAIT_US" not in warden_settings.WARDEN
    assert get_conf().client().busy_wait_us == 200
    assert get_conf().aclient().busy_wait_us == 500
    warden_settings.WARDEN = {**warden_settings.WARDEN, "BUSY_WAIT_US": 0}
    assert get_conf().client().busy_wait_us == 0
    assert get_conf().aclient().busy_wait_us == 0
    for bad in (-1, 10_001, 1.5, "200", True):
        warden_settings.WARDEN = {**warden_settings.WARDEN, "BUSY_WAIT_US": bad}
        with pytest.raises(ImproperlyConfigured, match="BUSY_WAIT_US"):
            get_conf()



# Under ASGI. Django's AsyncClient runs the example project's async
# middleware stack; headers go in `headers=`.


def signed_headers(key, method, path, query="", body=b""):
    return sign_request(key["key_id"], key["secret"], method, path, query, body)


def test_under_asgi_a_signed_request_is_allowed_once(async_client, key, warden_settings, transport):
    import asyncio

    from warden_client.django.conf import get_conf

    warden_settings.WARDEN = {**warden_settings.WARDEN, "TRANSPORT": transport}

    async def run():
        assert get_conf().aclient().transport == transport
        h = signed_headers(key, "POST", "/api/async/orders", body=b'{"qty": 1}')
        first = await async_client.post("/api/async/orders", data=b'{"qty": 1}', content_type="application/json",
                                        headers=h)
        again = await async_client.post("/api/async/orders", data=b'{"qty": 1}', content_type="application/json",
                                        headers=h)
        return first, again

    first, again = asyncio.run(run())
    assert first.status_code == 200, first.content
    assert first.json() == {"key_id": key["key_id"], "owner": "django-test", "scopes": ["orders:read"]}
    assert "RateLimit" in first.headers
    assert again.status_code == 401 and again.json()["error"] == "replay"


def test_under_asgi_ratelimit_headers_off_leaves_them_off(async_client, key, warden_settings):
    import asyncio

    warden_settings.WARDEN = {**warden_settings.WARDEN, "RATELIMIT_HEADERS": False}

    async def run():
        h = signed_headers(key, "POST", "/api/async/orders", body=b'{"qty": 1}')
        return await async_client.post("/api/async/orders", data=b'{"qty": 1}', content_type="application/json",
                                       headers=h)

    r = asyncio.run(run())
    assert r.status_code == 200, r.content
    assert r.json()["key_id"] == key["key_id"]
    assert not [h for h in r.headers if h.lower().startswith("ratelimit")], dict(r.headers)


def test_under_asgi_checks_to_a_hung_warden_wait_for_no_other_request(async_client, warden_settings, own_warden,
                                                                       transport):
    # Ten requests at once while warden hangs, failing open: each waits for
    # its own check's deadline (0.3 s), not behind the others'. A sync
    # middleware, run on Django's thread for sync code, took 3 s here.
    import asyncio

    hung = own_warden
    tls = hung.tls()
    warden_settings.WARDEN = {**warden_settings.WARDEN, "TARGET": hung.addr, "FAILURE_MODE": "open",
                              "CA": tls["ca"], "CERT": tls["cert"], "KEY": tls["key"], "TRANSPORT": transport,
                              "TIMEOUT": 0.3, "BREAKER": {"FAILURES": 1000, "RESET_AFTER": 1}}
    junk = {"X-Key-Id": "k", "X-Signature": "0" * 64}

    async def run():
        # Connected: this server answers that the request is malformed.
        assert (await async_client.get("/api/async/orders", headers=junk)).status_code == 400
        hung.pause()
        try:
            started = time.monotonic()
            answers = await asyncio.gather(*[async_client.get("/api/async/orders", headers=junk) for _ in range(10)])
            return answers, time.monotonic() - started
        finally:
            hung.resume()

    answers, elapsed = asyncio.run(run())
    assert [r.status_code for r in answers] == [200] * 10
    assert elapsed < 1.5, elapsed


def test_under_asgi_a_drf_view_reuses_the_middlewares_check(async_client, warden, warden_settings):
    # DRF views are sync; under ASGI they run on a thread after the async
    # middleware has checked. A second check would be refused as a replay.
    import asyncio

    warden.cli("policies", "put", "items-one-asgi", "--limit", "1", "--period", "1m", "--json")
    warden_settings.WARDEN = {**warden_settings.WARDEN, "THROTTLE_POLICIES": {"items": "items-one-asgi"}}
    key = warden.create_key("--owner", "drf-asgi")

    async def run():
        first = await async_client.get("/api/items", headers=signed_headers(key, "GET", "/api/items"))
        second = await async_client.get("/api/items", headers=signed_headers(key, "GET", "/api/items"))
        return first, second

    first, second = asyncio.run(run())
    assert first.status_code == 200, first.content
    assert first.json()["key_id"] == key["key_id"]
    assert second.status_code == 429


@contextlib.contextmanager
def example_served_by(server: list[str], warden, tmp_path):
    """The example project served over HTTP by a real server (``server``:
    its command, ``{port}`` standing for the port it is to listen on):
    yields its base URL once /health answers."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    example = Path(__file__).resolve().parents[1] / "example"
    env = {**os.environ, "PYTHONPATH": str(example), "WARDEN_DEV_DIR": str(warden.dev_dir),
           "WARDEN_TARGET": warden.addr, "DJANGO_SETTINGS_MODULE": "exampleapi.settings"}
    log = tmp_path / f"{server[0]}.log"
    proc = subprocess.Popen([sys.executable, "-m", *(a.format(port=port) for a in server)], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"))
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_example_project_served_by_uvicorn_checks_every_request(warden, tmp_path):
    # The way an async Django app is deployed: a real ASGI server, Django's
    # real ASGI handler (a thread per request for its sync parts), the
    # example's asgi.py, and the middleware in async mode over HTTP.
    import httpx

    key = warden.create_key("--owner", "uvicorn", "--policy", "demo")
    uvicorn = ["uvicorn", "exampleapi.asgi:application", "--no-access-log", "--host", "127.0.0.1", "--port",
               "{port}"]
    with example_served_by(uvicorn, warden, tmp_path) as base:
        body = b'{"qty": 2}'
        for path in ("/api/async/orders", "/api/orders"):
            h = signed_headers(key, "POST", path, body=body)
            first = httpx.post(base + path, content=body, headers={**h, "Content-Type": "application/json"})
            assert first.status_code == 200, first.text
            assert first.json()["key_id"] == key["key_id"] and "RateLimit" in first.headers
            again = httpx.post(base + path, content=body, headers={**h, "Content-Type": "application/json"})
            assert again.status_code == 401 and again.json()["error"] == "replay"
        # The signature covers the path as sent; Django reads it decoded.
        # Under ASGI the middleware finds the sent path in the scope's
        # raw_path (there is no RAW_URI): re-encoding the decoded path
        # would not give these back, and genuine requests would be 401.
        for sent in ("/api/async/%6Frders", "/api/%6frders"):
            h = signed_headers(key, "POST", sent, body=body)
            r = httpx.post(base + sent, content=body, headers={**h, "Content-Type": "application/json"})
            assert r.status_code == 200, (sent, r.text)
        tampered = signed_headers(key, "POST", "/api/async/orders", body=body)
        r = httpx.post(base + "/api/async/orders", content=b'{"qty": 200}', headers=tampered)
        assert r.status_code == 401 and r.json()["error"] == "unauthenticated"
        assert httpx.get(base + "/api/async/orders").status_code == 401


def test_the_example_project_served_by_gunicorn_ignores_the_mount_point_a_client_sends(warden, tmp_path):
    # gunicorn maps a SCRIPT_NAME request header from a trusted forwarder
    # (127.0.0.1 unless configured) onto the mount point, as a proxy on the
    # same host that passes the client's headers on would have it. The
    # split must not move a view out of its check.
    import httpx

    key = warden.create_key("--owner", "gunicorn", "--policy", "demo")
    gunicorn = ["gunicorn", "exampleapi.wsgi:application", "--workers", "1", "--bind", "127.0.0.1:{port}"]
    with example_served_by(gunicorn, warden, tmp_path) as base:
        # Without credentials: Django runs the /api/orders view for both.
        r = httpx.get(base + "/x/api/orders", headers={"SCRIPT_NAME": "/x"})
        assert r.status_code == 401 and r.json()["error"] == "unauthenticated", r.text
        r = httpx.get(base + "/health/api/orders", headers={"SCRIPT_NAME": "/health"})
        assert r.status_code == 401, r.text
        # An app mounted below a prefix, honestly: the client signs the
        # whole path it sends (gunicorn's RAW_URI), the settings name
        # the paths below the mount point.
        h = signed_headers(key, "GET", "/svc/api/orders")
        r = httpx.get(base + "/svc/api/orders", headers={**h, "SCRIPT_NAME": "/svc"})
        assert r.status_code == 200 and r.json()["key_id"] == key["key_id"], r.text
