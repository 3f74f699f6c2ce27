//! The forward-auth endpoint: nginx `auth_request`, Caddy `forward_auth` and
//! Traefik `ForwardAuth` ask it, with the original request's method and URI
//! in headers, whether to let a request through.
//!
//! These gateways send the auth endpoint the original request's headers but
//! never its body. So a signed request is verified over its method, path,
//! query, timestamp and nonce and over an **empty body** — unless it carries
//! `X-Content-SHA256` (the hex SHA-256 of its body, covered by the
//! signature in place of the body), which the upstream must then compare
//! with the body it receives (the Django middleware does all of this
//! itself). A bearer key (`Authorization: Bearer …`) needs no body.
//!
//! Answers: 200 with `X-Warden-Key-Id` / `X-Warden-Owner` (for
//! `auth_request_set`) and the rate-limit headers; or 400/401/403/429 with
//! `Retry-After` where it applies and the same small JSON body the Django
//! middleware returns; 503 when warden cannot decide (state full, owner
//! node unreachable). For nginx, `denial_body = false` drops the body and
//! `auth_request_statuses = true` answers every refusal but 401 as 403,
//! the status meant in `X-Warden-Status` (see [`http`]).
//!
//! Two ways to serve it: HTTPS with client certificates (`tls = true`, the
//! same certificates, bounds and caller roles as the gRPC port), or
//! plaintext HTTP on a loopback address for a gateway on the same host.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_stream::wrappers::ReceiverStream;

use super::{Body, Early, Headers, HttpAnswer, Original};
use crate::check::CallerIdentity;
use crate::config::{ForwardAuthSettings, GatewaySettings};
use crate::conn::Conn;
use crate::service::warden::WardenService;

/// Who the endpoint's checks run as.
#[derive(Clone)]
pub enum Caller {
    /// Plaintext on loopback: every request runs as the configured
    /// identity.
    Configured(CallerIdentity),
    /// mTLS: each connection's client certificate identity.
    Certificate,
}

/// What answering a forward-auth request needs, shared by every
/// connection of every serving thread.
pub struct Endpoint {
    pub service: WardenService,
    pub settings: ForwardAuthSettings,
    pub gateway: GatewaySettings,
    pub caller: Caller,
}

/// Serves each connection from `incoming` (handed over by the server's
/// accept loop, under its bounds) with HTTP/1.1 until `drain` completes,
/// then answers what is in flight and closes them.
///
/// No header read timeout: hyper's applies to the wait between a kept-alive
/// connection's requests too, and would close the upstream connections
/// nginx pools under it (a race that fails its subrequests). An idle
/// connection is closed after `idle_timeout` instead, and their number is
/// bounded by the accept loop.
pub async fn serve(
    incoming: ReceiverStream<io::Result<Conn>>,
    drain: impl Future<Output = ()>,
    endpoint: Arc<Endpoint>,
) {
    let http1 = hyper::server::conn::http1::Builder::new();
    crate::serving::serve_connections(incoming, drain, |conn| {
        let endpoint = endpoint.clone();
        let peer = conn.peer().clone();
        let caller = match &endpoint.caller {
            Caller::Configured(identity) => identity.clone(),
            Caller::Certificate => CallerIdentity(peer.identity.clone()),
        };
        let requests = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            // A request is activity: the connection is not idle.
            peer.conn.touch();
            let (endpoint, caller) = (endpoint.clone(), caller.clone());
            async move {
                let e = &*endpoint;
                Ok::<_, Infallible>(
                    answer(
                        &e.service,
                        &e.settings,
                        &e.gateway,
                        &caller,
                        request.headers(),
                    )
                    .await,
                )
            }
        });
        http1.serve_connection(TokioIo::new(conn), requests)
    })
    .await;
}

async fn answer(
    service: &WardenService,
    settings: &ForwardAuthSettings,
    gateway: &GatewaySettings,
    caller: &CallerIdentity,
    headers: &HeaderMap,
) -> Response {
    let answer = decide(service, settings, gateway, caller, headers).await;
    http(answer, settings)
}

async fn decide(
    service: &WardenService,
    settings: &ForwardAuthSettings,
    gateway: &GatewaySettings,
    caller: &CallerIdentity,
    headers: &HeaderMap,
) -> HttpAnswer {
    // Given twice, one of them is the client's (a gateway that adds its
    // own instead of replacing the client's), and which one the gateway
    // acted on is not known.
    let mut once = [&settings.method_header, &settings.uri_header]
        .into_iter()
        .chain(&settings.client_address_header);
    if let Some(twice) = once.find(|name| headers.get_all(name.as_str()).iter().nth(1).is_some()) {
        return misconfigured(format!(
            "the {twice} header was given more than once: the gateway must replace the client's, not add its own"
        ));
    }
    let (Some(method), Some(uri)) = (
        Headers::get(headers, &settings.method_header),
        Headers::get(headers, &settings.uri_header),
    ) else {
        return misconfigured(format!(
            "missing the {} or {} header",
            settings.method_header, settings.uri_header
        ));
    };
    let original = Original {
        method,
        uri,
        headers,
        body: Body::NeverSent,
        source_address: settings
            .client_address_header
            .as_deref()
            .and_then(|h| Headers::get(headers, h)),
    };
    let req = match super::check_request(&original, gateway) {
        Ok(req) => req,
        Err(Early::Misconfigured(why)) => return misconfigured(why),
        Err(early) => return super::early_answer(&early),
    };
    match service.check_as(req, caller).await {
        Ok(response) => super::answer(response),
        // A caller without the check role is refused for good: a 403 with
        // no Retry-After, which would have it ask again every second.
        Err(status) if status.code() == tonic::Code::PermissionDenied => HttpAnswer {
            status: 403,
            headers: Vec::new(),
            ..super::cannot_check_now()
        },
        Err(_) => super::cannot_check_now(),
    }
}

fn misconfigured(why: String) -> HttpAnswer {
    tracing::warn!(
        event = "forward_auth_misconfigured",
        why,
        "a forward-auth request lacks what the gateway must send"
    );
    super::early_answer(&Early::Misconfigured(why))
}

/// The answer as an HTTP response: the caller headers for
/// `auth_request_set`, the client's headers, and on a denial the JSON body
/// unless `[forward_auth] denial_body = false`.
///
/// With `auth_request_statuses`, a refusal is a status nginx's
/// `auth_request` passes on: 401 as it is, any other 403, with the status
/// meant in `X-Warden-Status` for nginx to answer the client with. nginx
/// takes any other status for the auth endpoint failing: it logs an error
/// line and closes the client's connection after its answer, so that a
/// flood of rate-limited requests would cost it a connection (and a TLS
/// handshake) each, and an error line each.
fn http(answer: HttpAnswer, settings: &ForwardAuthSettings) -> Response {
    let mut out = HeaderMap::new();
    for (name, value) in &answer.headers {
        if let (Ok(n), Ok(v)) = (header_name(name), HeaderValue::from_str(value)) {
            out.insert(n, v);
        }
    }
    if let Some((key_id, owner)) = &answer.caller {
        for (name, value) in [("x-warden-key-id", key_id), ("x-warden-owner", owner)] {
            if let Ok(v) = HeaderValue::from_str(value) {
                out.insert(HeaderName::from_static(name), v);
            }
        }
    }
    let meant = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::FORBIDDEN);
    let status = if settings.auth_request_statuses && !answer.allowed() {
        out.insert(
            HeaderName::from_static("x-warden-status"),
            HeaderValue::from(meant.as_u16()),
        );
        match meant {
            StatusCode::UNAUTHORIZED => meant,
            _ => StatusCode::FORBIDDEN,
        }
    } else {
        meant
    };
    match answer.body.filter(|_| settings.denial_body) {
        Some(body) => {
            out.insert(
                axum::http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            (status, out, body).into_response()
        }
        None => (status, out).into_response(),
    }
}

/// The name of a header of the verdict. The two that every limited answer
/// carries are named from constants: parsed, a name `http` does not know
/// is copied into an allocation of its own, on every call.
fn header_name(name: &str) -> Result<HeaderName, axum::http::header::InvalidHeaderName> {
    const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
    const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
    match name {
        "RateLimit" => Ok(RATELIMIT),
        "RateLimit-Policy" => Ok(RATELIMIT_POLICY),
        other => HeaderName::from_bytes(other.as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_header_named_from_a_constant_is_the_name_parsed() {
        for name in ["RateLimit", "RateLimit-Policy", "Retry-After", "x-other"] {
            assert_eq!(
                header_name(name).unwrap(),
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                "{name}"
            );
        }
        assert!(header_name("not a name").is_err());
    }
}
