//! End to end: the Envoy faces of the real binary over mTLS — external
//! authorization (`envoy.service.auth.v3.Authorization/Check`) and the rate
//! limit service (`envoy.service.ratelimit.v3.RateLimitService`) — called
//! with clients generated from the official Envoy protos, sending the
//! messages Envoy sends (`tests/fixtures/envoy`, see its README).

use crate::support;
use crate::unary;

use std::collections::HashMap;
use std::path::PathBuf;

use base64::Engine as _;
use envoy_types::pb::envoy::config::core::v3::address::Address;
use envoy_types::pb::envoy::config::core::v3::{Address as EnvoyAddress, SocketAddress};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use prost::Message as _;
use serde_json::Value;
use support::{ConfigDir, RawCodec, SECRET, Server};
use tonic::transport::Channel;
use warden_client::signing::{Signer, new_nonce, unix_now};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/envoy")
}

// ---------------------------------------------------------------------------
// Fixtures: proto3 JSON to the generated types. Strict: a field the loader
// does not know fails the test, so no fixture is silently sent in part.

fn object(v: &Value, known: &[&str], what: &str) -> serde_json::Map<String, Value> {
    let map = v
        .as_object()
        .unwrap_or_else(|| panic!("{what}: not an object"))
        .clone();
    for k in map.keys() {
        assert!(
            known.contains(&k.as_str()),
            "{what}: field {k} is not loaded"
        );
    }
    map
}

fn text(v: Option<&Value>) -> String {
    v.map(|v| v.as_str().expect("a string").to_owned())
        .unwrap_or_default()
}

fn peer(v: &Value) -> Peer {
    let p = object(v, &["address", "principal"], "peer");
    let address = p.get("address").map(|a| {
        let a = object(a, &["socketAddress"], "address");
        let s = object(&a["socketAddress"], &["address", "portValue"], "socketAddress");
        EnvoyAddress {
            address: Some(Address::SocketAddress(SocketAddress {
                address: text(s.get("address")),
                port_specifier: s.get("portValue").map(|p| {
                    envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(
                        p.as_u64().unwrap() as u32,
                    )
                }),
                ..Default::default()
            })),
        }
    });
    Peer {
        address,
        principal: text(p.get("principal")),
        ..Default::default()
    }
}

fn ext_authz_fixture(name: &str) -> CheckRequest {
    let path = fixtures().join("ext_authz").join(name);
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let root = object(&v, &["attributes"], "CheckRequest");
    let a = object(
        &root["attributes"],
        &["source", "destination", "request"],
        "attributes",
    );
    let r = object(&a["request"], &["http"], "request");
    let h = object(
        &r["http"],
        &[
            "id", "method", "headers", "path", "host", "scheme", "protocol", "size", "body",
            "rawBody",
        ],
        "http",
    );
    let headers = h["headers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            source: a.get("source").map(peer),
            destination: a.get("destination").map(peer),
            request: Some(Request {
                http: Some(HttpRequest {
                    id: text(h.get("id")),
                    method: text(h.get("method")),
                    headers,
                    path: text(h.get("path")),
                    host: text(h.get("host")),
                    scheme: text(h.get("scheme")),
                    protocol: text(h.get("protocol")),
                    // proto3 JSON writes int64 as a string.
                    size: h
                        .get("size")
                        .map_or(-1, |s| s.as_str().unwrap().parse().unwrap()),
                    body: text(h.get("body")),
                    raw_body: h
                        .get("rawBody")
                        .map(|b| {
                            base64::engine::general_purpose::STANDARD
                                .decode(b.as_str().unwrap())
                                .unwrap()
                        })
                        .unwrap_or_default(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

fn ratelimit_fixture(name: &str) -> RateLimitRequest {
    let path = fixtures().join("ratelimit/requests").join(name);
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let root = object(
        &v,
        &["domain", "descriptors", "hitsAddend"],
        "RateLimitRequest",
    );
    RateLimitRequest {
        domain: text(root.get("domain")),
        descriptors: root["descriptors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                let d = object(d, &["entries"], "descriptor");
                descriptor(
                    &d["entries"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|e| {
                            let e = object(e, &["key", "value"], "entry");
                            (text(e.get("key")), text(e.get("value")))
                        })
                        .collect::<Vec<_>>(),
                )
            })
            .collect(),
        hits_addend: root
            .get("hitsAddend")
            .map_or(0, |h| h.as_u64().unwrap() as u32),
    }
}

// ---------------------------------------------------------------------------
// Building and reading the messages.

fn descriptor<K: AsRef<str>, V: AsRef<str>>(entries: &[(K, V)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.as_ref().to_owned(),
                value: v.as_ref().to_owned(),
            })
            .collect(),
        ..Default::default()
    }
}

fn rl(domain: &str, descriptors: &[&[(&str, &str)]], hits: u32) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_owned(),
        descriptors: descriptors.iter().map(|d| descriptor(d)).collect(),
        hits_addend: hits,
    }
}

fn http_mut(req: &mut CheckRequest) -> &mut HttpRequest {
    req.attributes
        .as_mut()
        .unwrap()
        .request
        .as_mut()
        .unwrap()
        .http
        .as_mut()
        .unwrap()
}

/// Signs the fixture's request with `key_id` at `timestamp`, as a client of
/// the API would, and puts the signing headers where Envoy passes them.
fn sign_at(mut req: CheckRequest, key_id: &str, timestamp: i64) -> CheckRequest {
    let http = http_mut(&mut req);
    let (path, query) = http.path.split_once('?').unwrap_or((&http.path, ""));
    // The client signs the body it sends, whatever part of it Envoy passes
    // on: the fixtures' POSTs carry ORDER.
    let body: &[u8] = if http.method == "POST" {
        ORDER.as_bytes()
    } else {
        b""
    };
    let s = Signer::new(key_id, SECRET).sign_at(
        timestamp,
        &new_nonce(),
        &http.method,
        path,
        query,
        body,
    );
    for (name, value) in s.to_pairs() {
        http.headers.insert(name.to_ascii_lowercase(), value);
    }
    req
}

/// The body of the fixtures' POST requests.
const ORDER: &str = r#"{"sku":"A-1042","quantity":2}"#;

fn sign(req: CheckRequest, key_id: &str) -> CheckRequest {
    sign_at(req, key_id, unix_now())
}

/// The HTTP status, headers (lowercase) and body Envoy would answer with,
/// or the upstream headers it would add on OK.
#[derive(Debug)]
struct Answer {
    ok: bool,
    status: i32,
    headers: HashMap<String, String>,
    removed: Vec<String>,
    client_headers: HashMap<String, String>,
    body: String,
}

fn read(r: CheckResponse) -> Answer {
    let code = r.status.as_ref().map_or(-1, |s| s.code);
    let pairs = |hs: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption]| {
        hs.iter()
            .map(|h| {
                let h = h.header.as_ref().unwrap();
                (h.key.to_ascii_lowercase(), h.value.clone())
            })
            .collect::<HashMap<_, _>>()
    };
    match r.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            assert_eq!(code, 0, "OK responses carry status OK");
            Answer {
                ok: true,
                status: 200,
                headers: pairs(&ok.headers),
                removed: ok.headers_to_remove.clone(),
                client_headers: pairs(&ok.response_headers_to_add),
                body: String::new(),
            }
        }
        Some(HttpResponse::DeniedResponse(d)) => {
            assert_eq!(code, 7, "denials carry PERMISSION_DENIED");
            Answer {
                ok: false,
                status: d.status.map_or(403, |s| s.code),
                headers: HashMap::new(),
                removed: Vec::new(),
                client_headers: pairs(&d.headers),
                body: d.body,
            }
        }
        other => panic!("no HTTP response: {other:?}"),
    }
}

fn error_of(a: &Answer) -> String {
    let v: Value = serde_json::from_str(&a.body).expect("a JSON body");
    v["error"].as_str().unwrap().to_owned()
}

async fn channel(dir: &ConfigDir, server: &Server) -> Channel {
    warden_client::channel(
        &server.addr,
        warden_client::Tls::from_dev_dir(dir.path()).unwrap(),
    )
    .await
    .unwrap()
}

// ---------------------------------------------------------------------------
// External authorization.

const EXT_AUTHZ_CONFIG: &str = r#"
[[callers]]
identity = "spiffe://test/gateway"
roles = ["check", "forward-identity", "admin"]

[[callers]]
identity = "spiffe://test/envoy-plain"
roles = ["check"]

[store]
dir = "store"
master_key_file = "master.key"

[gateway]
client_address = "x-forwarded-for"
trusted_hops = 1

[[gateway.routes]]
route = "POST /v1/orders"
limits = [{ policy = "orders-per-ip", per = "ip" }]

[[policies]]
name = "five"
limit = 5
period = "1h"

[[policies]]
name = "many"
limit = 1000
period = "1h"

[[policies]]
name = "orders-per-ip"
limit = 2
period = "1h"

[[keys]]
id = "wk_edge"
owner = "edge-team"
policies = ["five"]
secrets = [{ value = "test-secret-0123456789abcdefghijklmnopqrstuvwxyz" }]

[[keys]]
id = "wk_orders"
owner = "shop"
policies = ["many"]
secrets = [{ value = "test-secret-0123456789abcdefghijklmnopqrstuvwxyz" }]

[[keys]]
id = "wk_bound"
owner = "frontend"
policies = ["many"]
bound_identities = ["spiffe://shop.example/ns/web/sa/frontend"]
secrets = [{ value = "test-secret-0123456789abcdefghijklmnopqrstuvwxyz" }]
"#;

fn ext_authz_server() -> (ConfigDir, Server) {
    ext_authz_server_with("")
}

/// [`ext_authz_server`], with `before` ahead of its configuration (such as
/// a `[check]` table of its own).
fn ext_authz_server_with(before: &str) -> (ConfigDir, Server) {
    let dir = ConfigDir::new();
    dir.write_master_key();
    assert!(EXT_AUTHZ_CONFIG.contains(SECRET));
    let server = dir.start(&format!("{before}{EXT_AUTHZ_CONFIG}"));
    server.wait_past_fence();
    (dir, server)
}

#[tokio::test]
async fn a_signed_request_passes_with_its_caller_for_the_upstream_and_its_credentials_removed() {
    let (dir, server) = ext_authz_server();
    let mut envoy = AuthorizationClient::new(channel(&dir, &server).await);
    for fixture in ["get.json", "post_with_body.json", "post_raw_body.json"] {
        let key = if fixture == "get.json" {
            "wk_edge"
        } else {
            "wk_orders"
        };
        let a = read(
            envoy
                .check(sign(ext_authz_fixture(fixture), key))
                .await
                .unwrap()
                .into_inner(),
        );
        assert!(a.ok, "{fixture}: {a:?}");
        assert_eq!(a.headers["x-warden-key-id"], key);
        for h in ["x-key-id", "x-timestamp", "x-nonce", "x-signature"] {
            assert!(
                a.removed.contains(&h.to_owned()),
                "{fixture}: {h} reaches the upstream"
            );
        }
        assert!(!a.removed.contains(&"authorization".to_owned()));
        assert!(a.client_headers.contains_key("ratelimit"), "{a:?}");
    }
    let a = read(
        envoy
            .check(sign(ext_authz_fixture("get.json"), "wk_edge"))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(a.headers["x-warden-owner"], "edge-team");
    assert!(a.client_headers["ratelimit"].contains("r=3"), "{a:?}");
}

/// `new` in place of `old` in `wire`: the same number of bytes,
/// so every length around it still holds.
fn spliced(wire: &[u8], old: &str, new: &[u8]) -> Vec<u8> {
    assert_eq!(old.len(), new.len());
    let at = wire
        .windows(old.len())
        .position(|w| w == old.as_bytes())
        .expect("the marker is in the message");
    assert!(
        wire[at + 1..]
            .windows(old.len())
            .all(|w| w != old.as_bytes()),
        "the marker is in the message once"
    );
    [&wire[..at], new, &wire[at + old.len()..]].concat()
}

/// warden reads only the fields of Envoy's message it uses
/// (`gateway/envoy_request.rs`). Attacked with bytes no Envoy sends, over
/// mTLS: a body that is not UTF-8 (a `string` field warden reads, as bytes)
/// is refused whole, as tonic's decoder always refused it, and spends
/// nothing; text that is not UTF-8 inside a field warden never reads (the
/// destination's principal) is skipped, and the request is answered.
#[tokio::test]
async fn a_body_that_is_not_utf8_is_refused_spending_nothing_and_unread_fields_are_skipped() {
    use prost::Message as _;
    let (dir, server) = ext_authz_server();
    let mut grpc = tonic::client::Grpc::new(channel(&dir, &server).await);
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/envoy.service.auth.v3.Authorization/Check",
    );
    let not_utf8 = [0xffu8; 8];

    let mut post = sign(ext_authz_fixture("post_with_body.json"), "wk_edge");
    http_mut(&mut post).body = "@@BODY@@".to_owned();
    let broken = spliced(&post.encode_to_vec(), "@@BODY@@", &not_utf8);
    grpc.ready().await.unwrap();
    let refused = grpc
        .unary(
            tonic::Request::new(broken),
            path.clone(),
            RawCodec::<CheckResponse>::default(),
        )
        .await
        .expect_err("a body that is not UTF-8 is refused");
    assert_eq!(refused.code(), tonic::Code::Internal, "{refused:?}");

    let mut get = sign(ext_authz_fixture("get.json"), "wk_edge");
    get.attributes
        .as_mut()
        .unwrap()
        .destination
        .as_mut()
        .unwrap()
        .principal = "@@PRIN@@".to_owned();
    let unread = spliced(&get.encode_to_vec(), "@@PRIN@@", &not_utf8);
    assert!(
        CheckRequest::decode(unread.as_slice()).is_err(),
        "the official decoder refuses it"
    );
    grpc.ready().await.unwrap();
    let a = read(
        grpc.unary(
            tonic::Request::new(unread),
            path,
            RawCodec::<CheckResponse>::default(),
        )
        .await
        .unwrap()
        .into_inner(),
    );
    assert!(a.ok, "{a:?}");
    // The first of wk_edge's five an hour: the refused call took none.
    assert!(a.client_headers["ratelimit"].contains("r=4"), "{a:?}");
}

#[tokio::test]
async fn forged_stale_replayed_and_over_the_limit_are_denied_with_the_http_answer() {
    let (dir, server) = ext_authz_server();
    let envoy = AuthorizationClient::new(channel(&dir, &server).await);
    let check = |req| {
        let mut envoy = envoy.clone();
        async move { read(envoy.check(req).await.unwrap().into_inner()) }
    };

    let mut forged = sign(ext_authz_fixture("get.json"), "wk_edge");
    http_mut(&mut forged)
        .headers
        .insert("x-signature".into(), "0".repeat(64));
    let a = check(forged).await;
    assert_eq!(
        (a.ok, a.status, error_of(&a).as_str()),
        (false, 401, "unauthenticated")
    );
    assert!(a.client_headers.contains_key("www-authenticate"));
    assert_eq!(a.client_headers["content-type"], "application/json");

    let stale = sign_at(ext_authz_fixture("get.json"), "wk_edge", unix_now() - 3600);
    let a = check(stale).await;
    assert_eq!((a.status, error_of(&a).as_str()), (401, "stale"));
    let future = sign_at(ext_authz_fixture("get.json"), "wk_edge", unix_now() + 3600);
    assert_eq!(error_of(&check(future).await), "stale");

    let once = sign(ext_authz_fixture("get.json"), "wk_edge");
    assert!(check(once.clone()).await.ok);
    let a = check(once).await;
    assert_eq!((a.status, error_of(&a).as_str()), (401, "replay"));

    // Five per hour: four more pass, the next is 429 with Retry-After.
    for _ in 0..4 {
        assert!(
            check(sign(ext_authz_fixture("get.json"), "wk_edge"))
                .await
                .ok
        );
    }
    let a = check(sign(ext_authz_fixture("get.json"), "wk_edge")).await;
    assert_eq!((a.status, error_of(&a).as_str()), (429, "rate_limited"));
    let retry: u64 = a.client_headers["retry-after"].parse().unwrap();
    assert!((1..=3600).contains(&retry), "{a:?}");
    // The JSON body is the Django middleware's: no internals.
    assert_eq!(
        serde_json::from_str::<Value>(&a.body).unwrap()["message"],
        "Too many requests."
    );
}

/// A full replay memory is warden refusing, not warden failing: Envoy is
/// answered with a denial (503), never a failed call, which
/// `failure_mode_allow: true` would turn into every signed request let
/// through unchecked and unremembered for as long as an attacker keeps the
/// memory full. A replay of a remembered request is still a replay.
#[tokio::test]
async fn a_full_replay_memory_is_a_503_denial_that_failure_mode_allow_cannot_open() {
    let (dir, server) = ext_authz_server_with("[check]\nnonce_capacity = 3\n");
    let mut envoy = AuthorizationClient::new(channel(&dir, &server).await);
    let first = sign(ext_authz_fixture("get.json"), "wk_orders");
    assert!(read(envoy.check(first.clone()).await.unwrap().into_inner()).ok);
    for _ in 0..2 {
        let req = sign(ext_authz_fixture("get.json"), "wk_orders");
        assert!(read(envoy.check(req).await.unwrap().into_inner()).ok);
    }
    for _ in 0..3 {
        let req = sign(ext_authz_fixture("get.json"), "wk_orders");
        let a = read(
            envoy
                .check(req)
                .await
                .expect("an answer, not a failed call")
                .into_inner(),
        );
        assert_eq!(
            (a.ok, a.status, error_of(&a).as_str()),
            (false, 503, "unavailable")
        );
        assert_eq!(a.client_headers["retry-after"], "1");
        assert!(!a.body.contains("replay cache"), "no internals: {}", a.body);
    }
    let a = read(envoy.check(first).await.unwrap().into_inner());
    assert_eq!((a.status, error_of(&a).as_str()), (401, "replay"));
    server.wait_for_log("\"event\":\"replay_cache_full\"");
}

#[tokio::test]
async fn a_body_envoy_did_not_send_is_denied_with_how_to_fix_it_and_changes_nothing() {
    let (dir, server) = ext_authz_server();
    let mut envoy = AuthorizationClient::new(channel(&dir, &server).await);
    for fixture in ["post_body_not_sent.json", "post_partial_body.json"] {
        let req = sign(ext_authz_fixture(fixture), "wk_orders");
        let a = read(envoy.check(req.clone()).await.unwrap().into_inner());
        assert_eq!(a.status, 400, "{fixture}: {a:?}");
        assert!(
            a.body.contains("with_request_body"),
            "{fixture}: {}",
            a.body
        );
        // Nothing was remembered: the same request with its body passes.
        let mut whole = req;
        let http = http_mut(&mut whole);
        http.headers.remove("x-envoy-auth-partial-body");
        http.body = ORDER.into();
        let a = read(envoy.check(whole).await.unwrap().into_inner());
        assert!(a.ok, "{fixture}: {a:?}");
    }
    // A body that does not match the signature is a forgery.
    let mut tampered = sign(ext_authz_fixture("post_with_body.json"), "wk_orders");
    http_mut(&mut tampered).body = r#"{"sku":"A-1042","quantity":200}"#.into();
    assert_eq!(
        read(envoy.check(tampered).await.unwrap().into_inner()).status,
        401
    );
}

#[tokio::test]
async fn the_envoy_verified_principal_binds_only_when_that_envoy_may_forward_identities() {
    let (dir, server) = ext_authz_server();
    let mut trusted = AuthorizationClient::new(channel(&dir, &server).await);
    let a = read(
        trusted
            .check(sign(ext_authz_fixture("get.json"), "wk_bound"))
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(a.ok, "{a:?}");
    // Another client certificate presents the same principal.
    let mut elsewhere = ext_authz_fixture("get.json");
    elsewhere
        .attributes
        .as_mut()
        .unwrap()
        .source
        .as_mut()
        .unwrap()
        .principal = "spiffe://shop.example/ns/web/sa/attacker".into();
    let a = read(
        trusted
            .check(sign(elsewhere, "wk_bound"))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!((a.status, error_of(&a).as_str()), (403, "forbidden"));
    // An Envoy without forward-identity: the principal is not believed.
    let plain_tls = dir.client_tls("envoy-plain", "envoy-plain", &["spiffe://test/envoy-plain"]);
    let mut plain = AuthorizationClient::new(
        warden_client::channel(&server.addr, plain_tls)
            .await
            .unwrap(),
    );
    let a = read(
        plain
            .check(sign(ext_authz_fixture("get.json"), "wk_bound"))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(a.status, 403, "{a:?}");
    // It still checks requests of unbound keys.
    let a = read(
        plain
            .check(sign(ext_authz_fixture("get.json"), "wk_orders"))
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(a.ok, "{a:?}");
}

#[tokio::test]
async fn route_limits_count_each_client_address_and_a_spoofed_forwarded_for_entry_gains_nothing() {
    let (dir, server) = ext_authz_server();
    let mut envoy = AuthorizationClient::new(channel(&dir, &server).await);
    let from = |xff: &str| {
        let mut req = ext_authz_fixture("post_with_body.json");
        http_mut(&mut req)
            .headers
            .insert("x-forwarded-for".into(), xff.into());
        sign(req, "wk_orders")
    };
    for _ in 0..2 {
        assert!(
            read(
                envoy
                    .check(from("198.51.100.1"))
                    .await
                    .unwrap()
                    .into_inner()
            )
            .ok
        );
    }
    let a = read(
        envoy
            .check(from("198.51.100.1"))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(a.status, 429, "{a:?}");
    // The client prepends an address of its choosing: the trusted proxy's
    // entry (the last) still names it.
    let a = read(
        envoy
            .check(from("192.0.2.99, 198.51.100.1"))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(a.status, 429, "{a:?}");
    assert!(
        read(
            envoy
                .check(from("198.51.100.2"))
                .await
                .unwrap()
                .into_inner()
        )
        .ok
    );
    // Other routes are not limited by it.
    for _ in 0..3 {
        let mut get = ext_authz_fixture("get.json");
        http_mut(&mut get)
            .headers
            .insert("x-forwarded-for".into(), "198.51.100.1".into());
        assert!(
            read(
                envoy
                    .check(sign(get, "wk_orders"))
                    .await
                    .unwrap()
                    .into_inner()
            )
            .ok
        );
    }
}

#[tokio::test]
async fn a_caller_header_the_client_sent_itself_is_replaced_never_appended_to() {
    // The upstream trusts x-warden-key-id: a client that sends its own
    // must not reach it with that value beside warden's. Envoy's default
    // for a header option appends, so every option warden answers with
    // says "overwrite" (and none uses the deprecated `append`).
    use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
    let (dir, server) = ext_authz_server();
    let mut envoy = AuthorizationClient::new(channel(&dir, &server).await);
    let mut req = ext_authz_fixture("get.json");
    for (name, value) in [("x-warden-key-id", "wk_admin"), ("x-warden-owner", "root")] {
        http_mut(&mut req).headers.insert(name.into(), value.into());
    }
    let allowed = envoy
        .check(sign(req, "wk_edge"))
        .await
        .unwrap()
        .into_inner();
    let denied = envoy
        .check(sign(ext_authz_fixture("get.json"), "wk_nobody"))
        .await
        .unwrap()
        .into_inner();
    let options = |r: &CheckResponse| match r.http_response.clone() {
        Some(HttpResponse::OkResponse(ok)) => {
            assert_eq!(ok.headers.len(), 2, "{ok:?}");
            [ok.headers, ok.response_headers_to_add].concat()
        }
        Some(HttpResponse::DeniedResponse(denied)) => denied.headers,
        other => panic!("no HTTP response: {other:?}"),
    };
    for option in options(&allowed).into_iter().chain(options(&denied)) {
        assert_eq!(
            option.append_action,
            HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
            "{option:?}"
        );
        #[allow(deprecated)] // the field a reader of old Envoy versions sees
        let append = option.append;
        assert_eq!(append, None, "{option:?}");
    }
    let a = read(allowed);
    assert_eq!(a.headers["x-warden-key-id"], "wk_edge");
    assert_eq!(a.headers["x-warden-owner"], "edge-team");
}

#[tokio::test]
async fn a_route_limit_counts_every_spelling_of_its_path_and_dot_segments_are_refused() {
    // The application behind the gateway reads `//v1/orders` and
    // `/v1/%6Frders` as its `/v1/orders`, a servlet container `/v1/orders;x`
    // too, and Spring before 6 or Express `/v1/orders/`: so must the route's
    // limit (two per address), or a client spends it once per spelling.
    let (dir, server) = ext_authz_server();
    let mut envoy = AuthorizationClient::new(channel(&dir, &server).await);
    let at = |path: &str| {
        let mut req = ext_authz_fixture("post_with_body.json");
        let http = http_mut(&mut req);
        http.path = path.into();
        http.headers.insert(":path".into(), path.into());
        http.headers
            .insert("x-forwarded-for".into(), "198.51.100.7".into());
        sign(req, "wk_orders")
    };
    let mut ask = async |req| read(envoy.check(req).await.unwrap().into_inner());
    assert!(ask(at("/v1/orders")).await.ok);
    assert!(ask(at("//v1/orders")).await.ok);
    for spelling in [
        "/v1/%6Frders",
        "/v1//orders",
        "/v1/%6f%72ders",
        "/%761/orders",
        "/v1/orders;",
        "/v1/orders;jsessionid=1",
        "/v1;x/orders",
        "/v1/orders/",
        "/v1\\orders",
    ] {
        let a = ask(at(spelling)).await;
        assert_eq!(a.status, 429, "{spelling}: {a:?}");
    }
    // What a path with a dot segment names depends on who resolves it
    // (before or after decoding `%2F`, with `\` as a separator or not):
    // refused, whatever route it would reach, before anything is counted.
    for spelling in [
        "/v1/x/../orders",
        "/v1/x/%2e%2E/orders",
        "/v1/x%2F..%2Forders",
        "/v1/x\\..\\orders",
        "/v1/./orders",
        "/v1/orders/.",
        "/v1/x/..;/orders",
        "/v1/x/..;x=1/orders",
    ] {
        let a = ask(at(spelling)).await;
        assert_eq!(a.status, 400, "{spelling}: {a:?}");
        assert!(a.body.contains("malformed"), "{spelling}: {a:?}");
    }
    // Another address still has its own two.
    let mut req = ext_authz_fixture("post_with_body.json");
    http_mut(&mut req)
        .headers
        .insert("x-forwarded-for".into(), "198.51.100.8".into());
    assert!(ask(sign(req, "wk_orders")).await.ok);
}

#[tokio::test]
async fn a_header_the_application_may_route_by_is_refused_and_spends_nothing() {
    // gunicorn takes the mount point from a SCRIPT_NAME header sent by a
    // trusted forwarder (Envoy on the same host is one) and Django then
    // serves the path below it; Daphne takes it from Daphne-Root-Path;
    // older Symfony and IIS take the whole path from X-Original-URL; many
    // frameworks the method from X-HTTP-Method-Override. warden would have
    // judged one route and the application served another.
    let (dir, server) = ext_authz_server();
    let mut envoy = AuthorizationClient::new(channel(&dir, &server).await);
    let signed = sign(ext_authz_fixture("post_with_body.json"), "wk_orders");
    for (name, value) in [
        ("script_name", "/v1"),
        ("daphne-root-path", "/v1"),
        ("x-original-url", "/admin"),
        ("x-rewrite-url", "/admin"),
        ("x-http-method-override", "DELETE"),
    ] {
        let mut req = signed.clone();
        http_mut(&mut req).headers.insert(name.into(), value.into());
        let a = read(envoy.check(req).await.unwrap().into_inner());
        assert_eq!(a.status, 400, "{name}: {a:?}");
        assert!(a.body.contains("another route"), "{name}: {a:?}");
    }
    // Nothing was spent: the same signed request without the header is
    // still the first use of its nonce.
    let a = read(envoy.check(signed).await.unwrap().into_inner());
    assert!(a.ok, "{a:?}");
}

#[tokio::test]
async fn bearer_keys_pass_without_a_body_and_no_credentials_is_401() {
    let (dir, server) = ext_authz_server();
    let out = dir.cli(
        &server,
        &[
            "keys", "create", "--owner", "mobile", "--bearer", "--policy", "many", "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let api_key = v["api_key"].as_str().unwrap();
    let mut envoy = AuthorizationClient::new(channel(&dir, &server).await);

    let mut req = ext_authz_fixture("post_body_not_sent.json");
    http_mut(&mut req)
        .headers
        .insert("authorization".into(), format!("Bearer {api_key}"));
    let a = read(envoy.check(req).await.unwrap().into_inner());
    assert!(a.ok, "{a:?}");
    assert_eq!(a.headers["x-warden-owner"], "mobile");
    assert!(
        a.removed.contains(&"authorization".to_owned()),
        "the API key reaches the upstream"
    );

    let a = read(
        envoy
            .check(ext_authz_fixture("get.json"))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!((a.status, error_of(&a).as_str()), (401, "unauthenticated"));
    assert!(a.client_headers.contains_key("www-authenticate"));

    // Not an HTTP request at all: a call error, not a verdict.
    let err = envoy.check(CheckRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

// ---------------------------------------------------------------------------
// Rate limit service.

/// The rate limit service is served only when configured: without
/// `[envoy_ratelimit]` a call to it is UNIMPLEMENTED (not answered by some
/// other service, and not an allowance), and ext_authz beside it still
/// answers.
#[tokio::test]
async fn the_rate_limit_service_is_unimplemented_unless_configured() {
    let (dir, server) = ext_authz_server();
    let channel = channel(&dir, &server).await;
    let status = RateLimitServiceClient::new(channel.clone())
        .should_rate_limit(rl("shop", &[&[("path", "/")]], 1))
        .await
        .expect_err("a rate limit service that is not configured answered");
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    let answer = AuthorizationClient::new(channel)
        .check(ext_authz_fixture("get.json"))
        .await
        .expect("ext_authz answers beside it")
        .into_inner();
    // Unsigned: denied by warden's pipeline, which is what answered.
    assert_ne!(answer.status.map(|s| s.code), Some(0));
}

fn ratelimit_config(files: &[&str], extra: &str) -> String {
    let list: Vec<String> = files
        .iter()
        .map(|f| format!("{:?}", fixtures().join("ratelimit/readme").join(f)))
        .collect();
    format!(
        r#"
[[callers]]
identity = "spiffe://test/gateway"
roles = ["check"]

[[callers]]
identity = "spiffe://test/not-a-gateway"
roles = ["admin"]

[envoy_ratelimit]
config = [{}]
{extra}
"#,
        list.join(", ")
    )
}

async fn ratelimit_server(
    files: &[&str],
    extra: &str,
) -> (ConfigDir, Server, RateLimitServiceClient<Channel>) {
    let dir = ConfigDir::new();
    let server = dir.start(&ratelimit_config(files, extra));
    let client = RateLimitServiceClient::new(channel(&dir, &server).await);
    (dir, server, client)
}

async fn ask(
    client: &mut RateLimitServiceClient<Channel>,
    req: RateLimitRequest,
) -> RateLimitResponse {
    client.should_rate_limit(req).await.unwrap().into_inner()
}

/// Waits until the current fixed window of `period` seconds has at least
/// two seconds left, so a test's requests fall in one window (envoyproxy's
/// windows are aligned to the Unix epoch, and so are warden's).
fn inside_one_window(period: i64) {
    let left = period - unix_now() % period;
    if left < 2 {
        std::thread::sleep(std::time::Duration::from_secs(left as u64 + 1));
    }
}

fn code(r: &RateLimitResponse) -> Code {
    Code::try_from(r.overall_code).unwrap()
}

#[test]
fn every_configuration_of_envoyproxy_ratelimit_s_readme_and_examples_loads() {
    let dir = fixtures().join("ratelimit/readme");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        warden::descriptors::DescriptorRules::load(std::slice::from_ref(&path))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        n += 1;
    }
    assert_eq!(n, 18);
}

#[tokio::test]
async fn readme_example_2_several_descriptors_are_one_decision_and_a_denied_request_takes_nothing()
{
    // "the service will rate limit against _all_ matching rules and return
    // an aggregate result; a logical OR of all the individual rate limit
    // decisions."
    let (_dir, _server, mut rls) = ratelimit_server(&["example2.yaml"], "").await;
    let req = ratelimit_fixture("messaging_marketing.json");
    inside_one_window(86_400);
    for i in 0..5u32 {
        let r = ask(&mut rls, req.clone()).await;
        assert_eq!(code(&r), Code::Ok, "request {i}");
        // "Only allow 5 marketing messages a day"; 100 to any number.
        assert_eq!(r.statuses[0].limit_remaining, 4 - i);
        assert_eq!(r.statuses[1].limit_remaining, 99 - i);
        let limit = r.statuses[0].current_limit.as_ref().unwrap();
        assert_eq!((limit.requests_per_unit, limit.unit), (5, Unit::Day as i32));
    }
    let r = ask(&mut rls, req.clone()).await;
    assert_eq!(code(&r), Code::OverLimit);
    assert_eq!(Code::try_from(r.statuses[0].code).unwrap(), Code::OverLimit);
    assert_eq!(Code::try_from(r.statuses[1].code).unwrap(), Code::Ok);
    // The denied request took nothing from the 100 a day: 95 are left
    // before this one, 94 after.
    let alone = rl("messaging", &[&[("to_number", "2061111111")]], 0);
    let r = ask(&mut rls, alone).await;
    assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 94));
    // Another number has its own counters.
    let r = ask(
        &mut rls,
        rl(
            "messaging",
            &[&[("message_type", "marketing"), ("to_number", "2062222222")]],
            0,
        ),
    )
    .await;
    assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 4));
    // Headers for the tightest limit.
    let headers: HashMap<_, _> = r
        .response_headers_to_add
        .iter()
        .map(|h| (h.key.as_str(), h.value.as_str()))
        .collect();
    assert_eq!(headers["RateLimit-Limit"], "5");
    assert_eq!(headers["RateLimit-Remaining"], "4");
    let reset: u64 = headers["RateLimit-Reset"].parse().unwrap();
    assert!((1..=86_400).contains(&reset));
}

#[tokio::test]
async fn readme_examples_3_4_and_5_block_match_by_depth_and_leave_unlimited_alone() {
    let (_dir, _server, mut rls) =
        ratelimit_server(&["example3.yaml", "example4-b.yaml", "example5.yaml"], "").await;
    // Example 3: "Black list IP" — 0 per second.
    let r = ask(
        &mut rls,
        rl("edge_proxy_per_ip", &[&[("remote_address", "50.0.0.5")]], 0),
    )
    .await;
    assert_eq!(code(&r), Code::OverLimit);
    let r = ask(
        &mut rls,
        rl("edge_proxy_per_ip", &[&[("remote_address", "50.0.0.1")]], 0),
    )
    .await;
    assert_eq!(code(&r), Code::Ok);
    let limit = r.statuses[0].current_limit.as_ref().unwrap();
    assert_eq!(
        (limit.requests_per_unit, limit.unit),
        (10, Unit::Second as i32)
    );
    // Example 4: two tuples match only the nested configuration.
    let r = ask(
        &mut rls,
        rl(
            "example4",
            &[&[("key", "value"), ("subkey", "subvalue")]],
            0,
        ),
    )
    .await;
    assert_eq!(
        r.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        300
    );
    let r = ask(&mut rls, rl("example4", &[&[("key", "value")]], 0)).await;
    assert_eq!(
        (code(&r), r.statuses[0].current_limit.clone()),
        (Code::Ok, None)
    );
    // Example 5: "an OK status code with the LimitRemaining field set to
    // MaxUint32".
    let r = ask(&mut rls, rl("internal", &[&[("ldap", "x")]], 1_000_000)).await;
    assert_eq!(
        (code(&r), r.statuses[0].limit_remaining),
        (Code::Ok, u32::MAX)
    );
    let r = ask(&mut rls, rl("internal", &[&[("azure", "x")]], 101)).await;
    assert_eq!(code(&r), Code::OverLimit);
    // Unknown domains limit nothing.
    let r = ask(&mut rls, rl("no_such_domain", &[&[("a", "b")]], 0)).await;
    assert_eq!(code(&r), Code::Ok);
}

#[tokio::test]
async fn readme_examples_6_and_7_shadow_mode_never_denies_and_replaces_drops_the_named_limit() {
    let (_dir, _server, mut rls) = ratelimit_server(&["example6.yaml", "example7.yaml"], "").await;
    // Example 6: user-a "would not get rate-limited regardless of the rate
    // of requests"; user-b is limited to 20 per second.
    let r = ask(
        &mut rls,
        rl(
            "example6",
            &[&[("service", "auth-service"), ("user", "user-a")]],
            11,
        ),
    )
    .await;
    assert_eq!(
        (code(&r), Code::try_from(r.statuses[0].code).unwrap()),
        (Code::Ok, Code::Ok)
    );
    let r = ask(
        &mut rls,
        rl(
            "example6",
            &[&[("service", "auth-service"), ("user", "user-b")]],
            21,
        ),
    )
    .await;
    assert_eq!(code(&r), Code::OverLimit);
    // Example 7: with both descriptors, 10 per second applies ("the
    // (key_1, value_1), (user, bkthomps) rule was replaced").
    let both: &[&[(&str, &str)]] = &[
        &[("key_1", "value_1"), ("user", "bkthomps")],
        &[("key_2", "value_2"), ("user", "bkthomps")],
    ];
    let r = ask(&mut rls, rl("example7", both, 6)).await;
    assert_eq!(code(&r), Code::Ok, "{r:?}");
    assert_eq!(
        r.statuses[0].current_limit, None,
        "the replaced limit is not applied"
    );
    // Alone, (key_1, value_1), (user, bkthomps) is 5 per second.
    let r = ask(
        &mut rls,
        rl(
            "example7",
            &[&[("key_1", "value_1"), ("user", "bkthomps")]],
            6,
        ),
    )
    .await;
    assert_eq!(code(&r), Code::OverLimit);
}

#[tokio::test]
async fn readme_examples_9_and_11_wildcards_and_shared_thresholds() {
    let (_dir, _server, mut rls) =
        ratelimit_server(&["example9-b.yaml", "example11-a.yaml"], "").await;
    // Example 9: "Matches /api/123/action ... Does not match /api/123/other."
    let r = ask(
        &mut rls,
        rl("example9", &[&[("path", "/api/123/action")]], 21),
    )
    .await;
    assert_eq!(code(&r), Code::OverLimit);
    let r = ask(
        &mut rls,
        rl("example9", &[&[("path", "/api/123/other")]], 21),
    )
    .await;
    assert_eq!(
        (code(&r), r.statuses[0].current_limit.clone()),
        (Code::Ok, None)
    );
    inside_one_window(3600);
    // Example 11: "If 5 requests are made for files/a.pdf and 5 requests
    // for files/b.csv, a request for files/c.txt will be rate limited".
    let file = |key: &str, name: &str| rl("example11", &[&[(key, name)]], 5);
    assert_eq!(
        code(&ask(&mut rls, file("files", "files/a.pdf")).await),
        Code::Ok
    );
    assert_eq!(
        code(&ask(&mut rls, file("files", "files/b.csv")).await),
        Code::Ok
    );
    let r = ask(&mut rls, rl("example11", &[&[("files", "files/c.txt")]], 1)).await;
    assert_eq!(code(&r), Code::OverLimit);
    // "requests for files_no_share/b.csv will still be allowed".
    let r = ask(
        &mut rls,
        rl(
            "example11",
            &[&[("files_no_share", "files_no_share/a.pdf")]],
            10,
        ),
    )
    .await;
    assert_eq!(code(&r), Code::Ok);
    let r = ask(
        &mut rls,
        rl(
            "example11",
            &[&[("files_no_share", "files_no_share/b.csv")]],
            10,
        ),
    )
    .await;
    assert_eq!(code(&r), Code::Ok);
}

#[tokio::test]
async fn quota_mode_limits_are_alternatives_the_request_is_over_only_when_all_are() {
    // examples/ratelimit/config/example.yaml: service_1 allows 1 a minute,
    // service_2 two, both in quota mode.
    let (_dir, _server, mut rls) = ratelimit_server(&["example.yaml"], "").await;
    let both = rl(
        "rl",
        &[&[("service", "service_1")], &[("service", "service_2")]],
        0,
    );
    inside_one_window(60);
    // As in envoyproxy/ratelimit, every quota with room counts a request:
    // the first takes from both, the second only from service_2 (service_1
    // is full), the third finds both full.
    for i in 0..2 {
        assert_eq!(
            code(&ask(&mut rls, both.clone()).await),
            Code::Ok,
            "request {i}"
        );
    }
    let r = ask(&mut rls, both).await;
    assert_eq!(code(&r), Code::OverLimit);
    assert!(r.statuses.iter().all(|s| s.code == Code::OverLimit as i32));
}

#[tokio::test]
async fn bad_requests_are_refused_whole_and_only_gateways_may_ask() {
    let (dir, server, mut rls) = ratelimit_server(&["example1.yaml"], "").await;
    let refused =
        |r: Result<tonic::Response<RateLimitResponse>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        refused(
            rls.should_rate_limit(rl("", &[&[("database", "users")]], 0))
                .await
        ),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        refused(rls.should_rate_limit(rl("mongo_cps", &[], 0)).await),
        tonic::Code::InvalidArgument
    );
    let many: Vec<&[(&str, &str)]> = vec![&[("database", "users")]; 17];
    assert_eq!(
        refused(rls.should_rate_limit(rl("mongo_cps", &many, 0)).await),
        tonic::Code::InvalidArgument
    );
    let huge = "x".repeat(257);
    assert_eq!(
        refused(
            rls.should_rate_limit(rl("mongo_cps", &[&[("database", huge.as_str())]], 0))
                .await
        ),
        tonic::Code::InvalidArgument
    );
    let mut overridden = rl("mongo_cps", &[&[("database", "users")]], 0);
    overridden.descriptors[0].limit = Some(Default::default());
    assert_eq!(
        refused(rls.should_rate_limit(overridden).await),
        tonic::Code::InvalidArgument
    );
    // Descriptors with different costs cannot be one step: a descriptor's
    // own hits_addend against another's, or against the request's.
    let hits = |v| Some(envoy_types::pb::google::protobuf::UInt64Value { value: v });
    let both: &[&[(&str, &str)]] = &[&[("database", "users")], &[("database", "default")]];
    let mut mixed = rl("mongo_cps", both, 0);
    mixed.descriptors[0].hits_addend = hits(2);
    assert_eq!(
        refused(rls.should_rate_limit(mixed).await),
        tonic::Code::InvalidArgument
    );
    let mut mixed = rl("mongo_cps", both, 3);
    mixed.descriptors[0].hits_addend = hits(3);
    mixed.descriptors[1].hits_addend = hits(4);
    assert_eq!(
        refused(rls.should_rate_limit(mixed).await),
        tonic::Code::InvalidArgument
    );
    // None of that took anything: 500 are left for users this second.
    let r = ask(&mut rls, rl("mongo_cps", &[&[("database", "users")]], 500)).await;
    assert_eq!(code(&r), Code::Ok);
    // Per-descriptor hits that agree (with each other and the request's)
    // are the request's cost (in the next second's window: this one is
    // spent for users).
    let into_second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_millis();
    std::thread::sleep(std::time::Duration::from_millis(u64::from(
        1010 - into_second,
    )));
    let mut agreed = rl("mongo_cps", both, 7);
    agreed.descriptors[0].hits_addend = hits(7);
    let r = ask(&mut rls, agreed).await;
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(r.statuses[1].limit_remaining, 500 - 7);

    let tls = dir.client_tls(
        "not-a-gateway",
        "not-a-gateway",
        &["spiffe://test/not-a-gateway"],
    );
    let mut other =
        RateLimitServiceClient::new(warden_client::channel(&server.addr, tls).await.unwrap());
    assert_eq!(
        refused(
            other
                .should_rate_limit(rl("mongo_cps", &[&[("database", "users")]], 0))
                .await
        ),
        tonic::Code::PermissionDenied
    );
}

#[tokio::test]
async fn global_shadow_mode_answers_ok_but_reports_the_limit() {
    let (_dir, _server, mut rls) = ratelimit_server(&["example5.yaml"], "shadow_mode = true").await;
    let r = ask(&mut rls, rl("internal", &[&[("azure", "x")]], 101)).await;
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(r.statuses[0].code, Code::OverLimit as i32);
}

#[tokio::test]
async fn a_flood_of_distinct_descriptors_stays_within_the_state_bound() {
    // Each remote address is a counter of its own; the pool is bounded by
    // check.max_limit_entries, and past it entries are evicted (what
    // forgives the least first) rather than the server growing or refusing.
    let (_dir, server, mut rls) =
        ratelimit_server(&["example3.yaml"], "\n[check]\nmax_limit_entries = 100\n").await;
    for i in 0..1000 {
        let ip = format!("10.{}.{}.1", i / 256, i % 256);
        let r = ask(
            &mut rls,
            rl(
                "edge_proxy_per_ip",
                &[&[("remote_address", ip.as_str())]],
                0,
            ),
        )
        .await;
        assert_eq!(code(&r), Code::Ok);
    }
    // Pool gauges are refreshed every second.
    let mut held = None;
    for _ in 0..50 {
        let (_, metrics) = server.http_get("/metrics");
        let pool: Vec<f64> = metrics
            .lines()
            .filter(|l| l.starts_with("warden_state_pool_entries{") && l.contains("rls-"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .collect();
        if let Some(&n) = pool.first() {
            held = Some(n);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let entries = held.expect("the rate limit pool is reported");
    assert!(entries <= 100.0, "{entries} entries held");
}

// ---------------------------------------------------------------------------
// The README's Envoy configuration.

/// The README's YAML block whose first line is `# <name>`.
fn readme_block(name: &str) -> String {
    support::readme_block("yaml", &format!("# {name}"))
}

fn at<'a>(v: &'a serde_norway::Value, path: &[&str]) -> &'a serde_norway::Value {
    path.iter().fold(v, |v, key| match key.parse::<usize>() {
        Ok(i) => &v[i],
        Err(_) => &v[*key],
    })
}

#[tokio::test]
async fn the_readme_envoy_configuration_agrees_with_warden() {
    let envoy: serde_norway::Value = serde_norway::from_str(&readme_block("envoy.yaml")).unwrap();
    let edge = readme_block("/etc/warden/ratelimit/edge.yaml");

    // The warden cluster: HTTP/2 over TLS 1.3 with a client certificate.
    let clusters = at(&envoy, &["static_resources", "clusters"])
        .as_sequence()
        .unwrap();
    let warden = clusters
        .iter()
        .find(|c| c["name"] == "warden")
        .expect("a warden cluster");
    assert!(
        !at(
            warden,
            &[
                "typed_extension_protocol_options",
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config",
                "http2_protocol_options"
            ]
        )
        .is_null()
    );
    let tls = at(
        warden,
        &["transport_socket", "typed_config", "common_tls_context"],
    );
    assert_eq!(tls["alpn_protocols"][0], "h2");
    assert!(
        !at(
            tls,
            &["tls_certificates", "0", "certificate_chain", "filename"]
        )
        .is_null()
    );
    assert!(!at(tls, &["validation_context", "trusted_ca", "filename"]).is_null());

    let hcm = at(
        &envoy,
        &[
            "static_resources",
            "listeners",
            "0",
            "filter_chains",
            "0",
            "filters",
            "0",
            "typed_config",
        ],
    );
    // Envoy routes the path it normalized, and ext_authz is sent that path.
    assert_eq!(hcm["normalize_path"].as_bool(), Some(true));
    assert_eq!(hcm["merge_slashes"].as_bool(), Some(true));
    let filters = hcm["http_filters"].as_sequence().unwrap();
    let filter = |name: &str| {
        &filters
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("no {name}"))["typed_config"]
    };
    let authz = filter("envoy.filters.http.ext_authz");
    assert_eq!(authz["transport_api_version"], "V3");
    assert_eq!(
        at(authz, &["grpc_service", "envoy_grpc", "cluster_name"]),
        "warden"
    );
    assert_eq!(authz["failure_mode_allow"], false);
    assert_eq!(
        at(authz, &["with_request_body", "pack_as_bytes"]).as_bool(),
        Some(true)
    );
    let ratelimit = filter("envoy.filters.http.ratelimit");
    assert_eq!(
        at(ratelimit, &["rate_limit_service", "transport_api_version"]),
        "V3"
    );
    assert_eq!(
        at(
            ratelimit,
            &[
                "rate_limit_service",
                "grpc_service",
                "envoy_grpc",
                "cluster_name"
            ]
        ),
        "warden"
    );
    let domain = ratelimit["domain"].as_str().unwrap();

    // The route's actions produce the descriptors warden's file limits:
    // remote_address (the remote_address action's key) and tenant.
    let actions = at(
        hcm,
        &[
            "route_config",
            "virtual_hosts",
            "0",
            "routes",
            "0",
            "route",
            "rate_limits",
        ],
    );
    assert!(!at(actions, &["0", "actions", "0", "remote_address"]).is_null());
    assert_eq!(
        at(
            actions,
            &["1", "actions", "0", "request_headers", "descriptor_key"]
        ),
        "tenant"
    );

    let dir = ConfigDir::new();
    std::fs::write(dir.path().join("edge.yaml"), &edge).unwrap();
    let server = dir.start(
        "[[callers]]\nidentity = \"spiffe://test/gateway\"\nroles = [\"check\"]\n\n[envoy_ratelimit]\nconfig = [\"edge.yaml\"]\n",
    );
    let mut rls = RateLimitServiceClient::new(channel(&dir, &server).await);
    let r = ask(
        &mut rls,
        rl(
            domain,
            &[&[("remote_address", "203.0.113.7")], &[("tenant", "acme")]],
            0,
        ),
    )
    .await;
    assert_eq!(code(&r), Code::Ok);
    let limits: Vec<u32> = r
        .statuses
        .iter()
        .map(|s| s.current_limit.as_ref().unwrap().requests_per_unit)
        .collect();
    assert_eq!(limits, [50, 6000]);
}

// ---------------------------------------------------------------------------
// Framed by hand: a call read and answered by warden itself (one plain
// message) and the same message followed by request trailers (answered by
// tonic's generated service) get the same answer.

const EXT_AUTHZ_CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";
const SHOULD_RATE_LIMIT: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

#[tokio::test]
async fn ext_authz_answers_alike_on_warden_s_unary_path_and_tonic_s() {
    let (dir, server) = ext_authz_server();
    let mut channel = unary::channel_as(&server, dir.path(), "client").await;

    // Unsigned: a 401 denial, the same however often it is asked.
    let unsigned = ext_authz_fixture("get.json").encode_to_vec();
    let (ours, _) = unary::both_paths(&mut channel, EXT_AUTHZ_CHECK, &unsigned).await;
    assert_eq!(ours.grpc_status(), "0");
    let a = read(ours.message::<CheckResponse>());
    assert_eq!((a.status, error_of(&a).as_str()), (401, "unauthenticated"));

    // Not an HTTP request: the same call error.
    let empty = CheckRequest::default().encode_to_vec();
    let (ours, _) = unary::both_paths(&mut channel, EXT_AUTHZ_CHECK, &empty).await;
    assert_eq!(ours.grpc_status(), "3", "INVALID_ARGUMENT: {ours:?}");

    // Not a CheckRequest: tonic's decoding error, whichever path it came by.
    let (ours, _) = unary::both_paths(&mut channel, EXT_AUTHZ_CHECK, &[0x0a, 0x7f]).await;
    assert_eq!(ours.grpc_status(), "13", "INTERNAL: {ours:?}");
}

#[tokio::test]
async fn should_rate_limit_answers_alike_on_warden_s_unary_path_and_tonic_s() {
    let (dir, server, _) = ratelimit_server(&["example2.yaml"], "").await;
    let mut channel = unary::channel_as(&server, dir.path(), "client").await;

    // A domain no rule names: nothing is counted, so the same answer
    // however often it is asked.
    let elsewhere = rl("nowhere", &[&[("path", "/")]], 1).encode_to_vec();
    let (ours, _) = unary::both_paths(&mut channel, SHOULD_RATE_LIMIT, &elsewhere).await;
    assert_eq!(ours.grpc_status(), "0", "{ours:?}");
    let answer: RateLimitResponse = ours.message();
    assert_eq!(code(&answer), Code::Ok, "{answer:?}");

    // Not a RateLimitRequest: tonic's decoding error on both.
    let (ours, _) = unary::both_paths(&mut channel, SHOULD_RATE_LIMIT, &[0x0a, 0x7f]).await;
    assert_eq!(ours.grpc_status(), "13", "INTERNAL: {ours:?}");
}
