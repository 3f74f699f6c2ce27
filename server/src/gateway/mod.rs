//! The gateway faces: the protocols gateways already speak, answered by the
//! same `Check` pipeline, so a platform team adds warden to a route with
//! gateway configuration alone.
//!
//! - [`ext_authz`]: Envoy's external authorization
//!   (`envoy.service.auth.v3.Authorization/Check`) on the gRPC port;
//! - [`ratelimit`]: Envoy's rate limit service
//!   (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`), a
//!   drop-in for envoyproxy/ratelimit;
//! - [`forward_auth`]: nginx `auth_request`, Caddy `forward_auth`, Traefik
//!   `ForwardAuth`, on an HTTP listener of its own.
//!
//! This module is what the request-checking faces share: reading the
//! original HTTP request (method, URI, signing headers or a bearer key, the
//! body if the gateway sent it, the client's address), adding the limits
//! `[gateway] routes` give its route, and turning warden's verdict into the
//! HTTP answer the Django middleware would give.

use prost::bytes::Bytes;
use std::net::IpAddr;

use warden_client::proto::{CheckRequest, CheckResponse, Decision, LimitRequest, Reason};
use warden_client::reason_name;

use crate::config::{ClientAddressFrom, GatewaySettings, Per};
use crate::route::ServedPath;

pub mod envoy_request;
pub mod ext_authz;
pub mod forward_auth;
pub mod ratelimit;

/// The original request's headers, as the gateway passed them on.
pub trait Headers {
    /// The value of header `name` (lowercase), if present and text.
    fn get(&self, name: &str) -> Option<&str>;

    /// The entries of a comma-separated list header, over every line of it
    /// in order (RFC 9110, 5.3: the lines are one list). A proxy that adds
    /// its own `X-Forwarded-For` line after the client's, instead of
    /// appending to it, still has the last entry. Empty when any line is
    /// not text.
    fn list(&self, name: &str) -> Vec<&str>;

    /// Whether header `name` (lowercase) is present at all, text or not.
    fn present(&self, name: &str) -> bool;
}

impl Headers for axum::http::HeaderMap {
    fn get(&self, name: &str) -> Option<&str> {
        axum::http::HeaderMap::get(self, name).and_then(|v| v.to_str().ok())
    }

    fn list(&self, name: &str) -> Vec<&str> {
        let mut entries = Vec::new();
        for line in self.get_all(name) {
            let Ok(text) = line.to_str() else {
                return Vec::new();
            };
            entries.extend(text.split(',').map(str::trim));
        }
        entries
    }

    fn present(&self, name: &str) -> bool {
        self.contains_key(name)
    }
}

/// Envoy's `attributes.request.http.headers`: keys already lowercase, and
/// the lines of a header already joined with commas. A name sent twice is
/// read as a map reads it: the last one.
impl Headers for envoy_request::HeaderList {
    fn get(&self, name: &str) -> Option<&str> {
        self.last(name)
    }

    fn list(&self, name: &str) -> Vec<&str> {
        Headers::get(self, name).map_or_else(Vec::new, |v| v.split(',').map(str::trim).collect())
    }

    fn present(&self, name: &str) -> bool {
        self.contains(name)
    }
}

/// Headers that carry a request's credentials: never passed upstream.
pub const SIGNING_HEADERS: [&str; 4] = ["x-key-id", "x-timestamp", "x-nonce", "x-signature"];

/// What the gateway did with the request's body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// Sent whole (Envoy with `with_request_body`): a slice of the message
    /// it came in, shared with the check rather than copied.
    Sent(Bytes),
    /// This kind of gateway never sends bodies (forward auth): a signed
    /// `X-Content-SHA256` stands in for it, and the upstream compares.
    NeverSent,
    /// The request has a body the gateway did not send, or sent only part
    /// of: a signature over it cannot be verified.
    Withheld,
}

/// The original request as a gateway describes it.
#[derive(Debug)]
pub struct Original<'a, H: Headers + ?Sized> {
    pub method: &'a str,
    /// Path and query, as sent.
    pub uri: &'a str,
    pub headers: &'a H,
    pub body: Body,
    /// The client's address as the gateway saw the connection, if it says.
    pub source_address: Option<&'a str>,
}

/// Why a request is answered before any check.
#[derive(Debug, PartialEq, Eq)]
pub enum Early {
    /// The gateway sent too little to check anything (400; it is
    /// misconfigured). The text is for warden's log.
    Misconfigured(String),
    /// The request carries no credentials at all (401).
    NoCredentials,
    /// A signed request whose body the gateway withheld (400).
    BodyWithheld,
    /// The request carries a header the application may take another route
    /// from (400; `[gateway] route_override_headers`): the header's name.
    RouteOverride(String),
}

/// The CheckRequest an original request stands for, with its route's
/// limits.
pub fn check_request<H: Headers + ?Sized>(
    original: &Original<'_, H>,
    settings: &GatewaySettings,
) -> Result<CheckRequest, Early> {
    let headers = original.headers;
    // Before anything else: whatever warden answers about this route, the
    // application might serve another.
    if let Some(name) = settings
        .route_override_headers
        .iter()
        .find(|name| headers.present(name))
    {
        return Err(Early::RouteOverride(name.clone()));
    }
    if headers.get("x-key-id").is_none() && headers.get("authorization").is_none() {
        return Err(Early::NoCredentials);
    }
    let (path, query) = original.uri.split_once('?').unwrap_or((original.uri, ""));
    let mut req = CheckRequest {
        method: original.method.to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        key_id: headers.get("x-key-id").unwrap_or_default().to_owned(),
        ..Default::default()
    };
    let address = client_address(original, settings.client_address);
    if let Some(address) = address {
        req.client_address = address.to_string();
    }
    add_route_limits(&mut req, address, settings)?;
    if let Some(bearer) = headers
        .get("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
    {
        req.api_key = bearer.trim().to_owned();
        return Ok(req);
    }
    req.scheme = "warden-v1".to_owned();
    req.timestamp = headers
        .get("x-timestamp")
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    req.nonce = headers.get("x-nonce").unwrap_or_default().to_owned();
    req.signature = headers.get("x-signature").unwrap_or_default().to_owned();
    match &original.body {
        Body::Sent(body) => req.body = body.clone(),
        Body::Withheld => return Err(Early::BodyWithheld),
        Body::NeverSent => {
            if let Some(sha) = headers.get("x-content-sha256") {
                // Malformed hex becomes a wrong length: answered MALFORMED.
                req.body_sha256 = hex::decode(sha.trim()).unwrap_or_else(|_| vec![0]);
            }
        }
    }
    Ok(req)
}

/// The end client's address, from where `[gateway] client_address` says.
/// An unparsable address counts as none.
fn client_address<H: Headers + ?Sized>(
    original: &Original<'_, H>,
    from: ClientAddressFrom,
) -> Option<IpAddr> {
    let text = match from {
        ClientAddressFrom::Source => original.source_address,
        ClientAddressFrom::ForwardedFor { trusted_hops } => {
            let hops = original.headers.list("x-forwarded-for");
            // With fewer entries than trusted proxies, the request did not
            // come through them all: only the connection is known.
            match hops.len().checked_sub(trusted_hops) {
                Some(i) => Some(hops[i]),
                None => original.source_address,
            }
        }
    }?;
    text.trim().parse().ok()
}

/// Adds the limits of the first `[gateway] routes` entry that matches.
fn add_route_limits(
    req: &mut CheckRequest,
    address: Option<IpAddr>,
    settings: &GatewaySettings,
) -> Result<(), Early> {
    let path = ServedPath::of(&req.path);
    let Some((route, limits)) = settings
        .routes
        .iter()
        .find(|(route, _)| route.counts(&req.method, &path))
    else {
        return Ok(());
    };
    for limit in limits {
        let descriptor = match limit.per {
            Per::Route => format!("route:{route}"),
            Per::Ip => match address {
                Some(ip) => format!("ip:{}", counted_address(ip)),
                None => {
                    return Err(Early::Misconfigured(
                        "a per-ip route limit applies, but the gateway gave no client address"
                            .into(),
                    ));
                }
            },
        };
        req.limits.push(LimitRequest {
            policy: limit.policy.clone(),
            descriptor,
        });
    }
    Ok(())
}

/// An address as a per-ip limit counts it: IPv6 by its /64, since one
/// client holds a whole /64 and could otherwise take a fresh count per
/// request.
fn counted_address(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                let prefix = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("{prefix}/64")
            }
        },
    }
}

/// The HTTP answer for the client (and the caller for the upstream).
#[derive(Debug, PartialEq, Eq)]
pub struct HttpAnswer {
    pub status: u16,
    /// For the client: `RateLimit-*`, `Retry-After`, `WWW-Authenticate`.
    pub headers: Vec<(String, String)>,
    /// On ALLOW: the key id and owner, for the upstream.
    pub caller: Option<(String, String)>,
    /// On a denial: the JSON error body.
    pub body: Option<String>,
}

impl HttpAnswer {
    pub fn allowed(&self) -> bool {
        self.caller.is_some()
    }
}

/// The answer for warden's verdict, made of its parts (moved, not
/// copied: this runs for every call a gateway makes).
pub fn answer(response: CheckResponse) -> HttpAnswer {
    let (allowed, reason) = (response.decision() == Decision::Allow, response.reason());
    // In name order, as the verdict's map keeps them.
    let mut headers: Vec<(String, String)> = response.headers.into_iter().collect();
    if allowed {
        let caller = response
            .caller
            .map(|c| (c.key_id, c.owner))
            .unwrap_or_default();
        return HttpAnswer {
            status: 200,
            headers,
            caller: Some(caller),
            body: None,
        };
    }
    let status = match response.http_status {
        s @ 400..=499 => s as u16,
        _ => 403,
    };
    if reason == Reason::Unauthenticated {
        headers.push(("www-authenticate".into(), "Bearer, X-Signature".into()));
    }
    HttpAnswer {
        status,
        headers,
        caller: None,
        body: Some(error_body(reason_name(reason), public_message(reason))),
    }
}

/// 503: warden could not decide this request now (its state is full, or a
/// cluster owner did not answer). Says nothing of why.
pub fn cannot_check_now() -> HttpAnswer {
    HttpAnswer {
        status: 503,
        headers: vec![("retry-after".into(), "1".into())],
        caller: None,
        body: Some(error_body(
            "unavailable",
            "The request cannot be checked right now.",
        )),
    }
}

/// The answer for a request refused before any check.
pub fn early_answer(early: &Early) -> HttpAnswer {
    let (status, error, message, headers) = match early {
        Early::Misconfigured(_) => (400, "malformed", public_message(Reason::Malformed), vec![]),
        Early::NoCredentials => (
            401,
            "unauthenticated",
            public_message(Reason::Unauthenticated),
            vec![("www-authenticate".into(), "Bearer, X-Signature".into())],
        ),
        Early::BodyWithheld => (
            400,
            "malformed",
            "The request body did not reach the authorization service; enable with_request_body in the ext_authz filter (and raise max_request_bytes above your largest body).",
            vec![],
        ),
        Early::RouteOverride(_) => (
            400,
            "malformed",
            "The request carries a header that could make the application serve another route than the one checked (such as X-Original-URL, X-HTTP-Method-Override or SCRIPT_NAME); send the request without it.",
            vec![],
        ),
    };
    HttpAnswer {
        status,
        headers,
        caller: None,
        body: Some(error_body(error, message)),
    }
}

/// What a denied client is told: the same words as the Django middleware.
/// Deliberately generic: which check failed and why is in warden's log.
pub fn public_message(reason: Reason) -> &'static str {
    match reason {
        Reason::Malformed => "The request is malformed.",
        Reason::Unauthenticated => "The request could not be authenticated.",
        Reason::Stale => "The request is too old or from the future; sign it again.",
        Reason::Replay => "This request was already used.",
        Reason::Forbidden => "This client may not call this endpoint.",
        Reason::RateLimited => "Too many requests.",
        Reason::LockedOut => "Too many failed attempts; try again later.",
        Reason::Ok | Reason::Unspecified => "Request denied.",
    }
}

/// The Django middleware's error body: `{"error": ..., "message": ...}`.
/// Serialized from its two strings, with no JSON map built in between
/// (this is written for every denial a gateway asks about).
pub fn error_body(error: &str, message: &str) -> String {
    #[derive(serde::Serialize)]
    struct ErrorBody<'a> {
        error: &'a str,
        message: &'a str,
    }
    serde_json::to_string(&ErrorBody { error, message }).expect("two strings serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteLimit;
    use crate::route::Route;

    proptest::proptest! {
        /// The error body is the JSON the Django middleware sends, escaped
        /// as serde_json escapes any string.
        #[test]
        fn error_body_is_the_json_object_of_its_two_strings(error in "\\PC{0,20}", message in ".{0,40}") {
            let body = error_body(&error, &message);
            proptest::prop_assert_eq!(
                &body,
                &serde_json::json!({ "error": error, "message": message }).to_string()
            );
            let read: serde_json::Value = serde_json::from_str(&body).unwrap();
            proptest::prop_assert_eq!(read["error"].as_str(), Some(error.as_str()));
            proptest::prop_assert_eq!(read["message"].as_str(), Some(message.as_str()));
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> envoy_request::HeaderList {
        let mut list = envoy_request::HeaderList::default();
        for (k, v) in pairs {
            list.push(k, v);
        }
        list
    }

    fn original<'a>(
        h: &'a envoy_request::HeaderList,
        body: Body,
    ) -> Original<'a, envoy_request::HeaderList> {
        Original {
            method: "POST",
            uri: "/login?next=/home",
            headers: h,
            body,
            source_address: Some("198.51.100.9"),
        }
    }

    fn login_limits(from: ClientAddressFrom) -> GatewaySettings {
        GatewaySettings {
            client_address: from,
            routes: vec![
                (
                    Route::parse("POST /login").unwrap(),
                    vec![
                        RouteLimit {
                            policy: "per-ip".into(),
                            per: Per::Ip,
                        },
                        RouteLimit {
                            policy: "all".into(),
                            per: Per::Route,
                        },
                    ],
                ),
                (
                    Route::parse("* /*").unwrap(),
                    vec![RouteLimit {
                        policy: "later".into(),
                        per: Per::Route,
                    }],
                ),
            ],
            ..GatewaySettings::default()
        }
    }

    #[test]
    fn the_first_matching_route_gives_the_limits_per_ip_and_per_route() {
        let h = headers(&[("x-key-id", "k")]);
        let req = check_request(
            &original(&h, Body::Sent(Bytes::new())),
            &login_limits(ClientAddressFrom::Source),
        )
        .unwrap();
        let limits: Vec<_> = req
            .limits
            .iter()
            .map(|l| (l.policy.as_str(), l.descriptor.as_str()))
            .collect();
        assert_eq!(
            limits,
            [("per-ip", "ip:198.51.100.9"), ("all", "route:POST /login")]
        );
        assert_eq!(req.path, "/login");
        assert_eq!(req.query, "next=/home");
        assert_eq!(req.client_address, "198.51.100.9");
    }

    #[test]
    fn x_forwarded_for_is_read_from_the_right_and_a_spoofed_left_entry_is_ignored() {
        let settings = login_limits(ClientAddressFrom::ForwardedFor { trusted_hops: 1 });
        let h = headers(&[
            ("x-key-id", "k"),
            ("x-forwarded-for", "6.6.6.6, 203.0.113.7"),
        ]);
        let req = check_request(&original(&h, Body::Sent(Bytes::new())), &settings).unwrap();
        assert_eq!(req.client_address, "203.0.113.7");
        // Two trusted proxies: the second entry from the right.
        let two = login_limits(ClientAddressFrom::ForwardedFor { trusted_hops: 2 });
        let req = check_request(&original(&h, Body::Sent(Bytes::new())), &two).unwrap();
        assert_eq!(req.client_address, "6.6.6.6");
        // Fewer entries than proxies: only the connection is known.
        let three = login_limits(ClientAddressFrom::ForwardedFor { trusted_hops: 3 });
        let req = check_request(&original(&h, Body::Sent(Bytes::new())), &three).unwrap();
        assert_eq!(req.client_address, "198.51.100.9");
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64_so_rotating_addresses_gains_nothing() {
        let settings = login_limits(ClientAddressFrom::Source);
        let h = headers(&[("x-key-id", "k")]);
        let mut o = original(&h, Body::Sent(Bytes::new()));
        o.source_address = Some("2001:db8:1:2::17");
        let a = check_request(&o, &settings).unwrap();
        o.source_address = Some("2001:db8:1:2:ffff::1");
        let b = check_request(&o, &settings).unwrap();
        assert_eq!(a.limits[0].descriptor, "ip:2001:db8:1:2::/64");
        assert_eq!(a.limits[0].descriptor, b.limits[0].descriptor);
    }

    #[test]
    fn a_per_ip_limit_without_an_address_refuses_rather_than_counting_nothing() {
        let h = headers(&[("x-key-id", "k")]);
        let mut o = original(&h, Body::Sent(Bytes::new()));
        o.source_address = None;
        let early = check_request(&o, &login_limits(ClientAddressFrom::Source)).unwrap_err();
        assert!(matches!(early, Early::Misconfigured(_)));
    }

    #[test]
    fn a_signed_request_whose_body_was_withheld_is_refused_but_a_bearer_one_is_not() {
        let settings = GatewaySettings::default();
        let signed = headers(&[("x-key-id", "k"), ("x-signature", "00")]);
        assert_eq!(
            check_request(&original(&signed, Body::Withheld), &settings).unwrap_err(),
            Early::BodyWithheld
        );
        let bearer = headers(&[("authorization", "Bearer abc")]);
        let req = check_request(&original(&bearer, Body::Withheld), &settings).unwrap();
        assert_eq!(req.api_key, "abc");
        let none = headers(&[]);
        assert_eq!(
            check_request(&original(&none, Body::Sent(Bytes::new())), &settings).unwrap_err(),
            Early::NoCredentials
        );
    }

    #[test]
    fn a_header_the_application_may_route_by_is_refused_before_anything_is_counted() {
        let settings = login_limits(ClientAddressFrom::Source);
        for name in crate::config::ROUTE_OVERRIDE_HEADERS {
            let h = headers(&[("x-key-id", "k"), (name, "/admin")]);
            assert_eq!(
                check_request(&original(&h, Body::Sent(Bytes::new())), &settings).unwrap_err(),
                Early::RouteOverride(name.to_owned()),
                "{name}"
            );
            assert_eq!(early_answer(&Early::RouteOverride(name.into())).status, 400);
        }
        // Also without credentials: the answer says what to change first.
        let h = headers(&[("x-original-url", "/admin")]);
        assert!(matches!(
            check_request(&original(&h, Body::Sent(Bytes::new())), &settings),
            Err(Early::RouteOverride(_))
        ));
        // An operator who needs one of them lets it through.
        let allowing = GatewaySettings {
            route_override_headers: vec![],
            ..login_limits(ClientAddressFrom::Source)
        };
        let h = headers(&[("x-key-id", "k"), ("x-http-method-override", "GET")]);
        assert!(check_request(&original(&h, Body::Sent(Bytes::new())), &allowing).is_ok());
    }
}
