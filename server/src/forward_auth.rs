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
//! node unreachable). Plaintext HTTP on loopback only.

use std::future::Future;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use warden_client::proto::{CheckRequest, Decision, Reason};
use warden_client::reason_name;

use crate::check::CallerIdentity;
use crate::config::ForwardAuthSettings;
use crate::service::warden::WardenService;

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    service: WardenService,
    settings: ForwardAuthSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let caller = CallerIdentity(Some(settings.identity.as_str().into()));
    let app = axum::Router::new().fallback(move |headers: HeaderMap| {
        let (service, settings, caller) = (service.clone(), settings.clone(), caller.clone());
        async move { answer(&service, &settings, &caller, &headers).await }
    });
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(event = "forward_auth_failed", error = %e, "forward-auth listener failed");
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Why a forwarded request is answered before any check.
enum Early {
    /// A header the gateway must set is missing (400; it is misconfigured).
    Misconfigured(String),
    /// The request carries no credentials at all (401).
    NoCredentials,
}

/// The CheckRequest a forwarded request stands for.
fn request(settings: &ForwardAuthSettings, headers: &HeaderMap) -> Result<CheckRequest, Early> {
    let method = header(headers, &settings.method_header).ok_or_else(|| {
        Early::Misconfigured(format!("missing the {} header", settings.method_header))
    })?;
    let uri = header(headers, &settings.uri_header).ok_or_else(|| {
        Early::Misconfigured(format!("missing the {} header", settings.uri_header))
    })?;
    if headers.get("x-key-id").is_none() && headers.get("authorization").is_none() {
        return Err(Early::NoCredentials);
    }
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let mut req = CheckRequest {
        method: method.to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        key_id: header(headers, "x-key-id").unwrap_or_default().to_owned(),
        ..Default::default()
    };
    if let Some(address) = settings
        .client_address_header
        .as_deref()
        .and_then(|h| header(headers, h))
    {
        req.client_address = address.trim().to_owned();
    }
    if let Some(bearer) = header(headers, "authorization").and_then(|a| a.strip_prefix("Bearer ")) {
        req.api_key = bearer.trim().to_owned();
        return Ok(req);
    }
    req.scheme = "warden-v1".to_owned();
    req.timestamp = header(headers, "x-timestamp")
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    req.nonce = header(headers, "x-nonce").unwrap_or_default().to_owned();
    req.signature = header(headers, "x-signature")
        .unwrap_or_default()
        .to_owned();
    if let Some(sha) = header(headers, "x-content-sha256") {
        // Malformed hex becomes a wrong length: answered MALFORMED.
        req.body_sha256 = hex::decode(sha.trim()).unwrap_or_else(|_| vec![0]);
    }
    Ok(req)
}

async fn answer(
    service: &WardenService,
    settings: &ForwardAuthSettings,
    caller: &CallerIdentity,
    headers: &HeaderMap,
) -> Response {
    let req = match request(settings, headers) {
        Ok(req) => req,
        Err(Early::Misconfigured(why)) => {
            tracing::warn!(
                event = "forward_auth_misconfigured",
                why,
                "a forward-auth request lacks a header the gateway must set"
            );
            return json(
                StatusCode::BAD_REQUEST,
                "malformed",
                public_message(Reason::Malformed),
                HeaderMap::new(),
            );
        }
        Err(Early::NoCredentials) => {
            let mut headers = HeaderMap::new();
            headers.insert(
                axum::http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer, X-Signature"),
            );
            return json(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                public_message(Reason::Unauthenticated),
                headers,
            );
        }
    };
    let response = match service.check_as(&req, caller).await {
        Ok(r) => r,
        Err(status) => {
            let code = match status.code() {
                tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            return json(
                code,
                "unavailable",
                "The request cannot be checked right now.",
                HeaderMap::new(),
            );
        }
    };
    let mut out = HeaderMap::new();
    for (name, value) in &response.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            out.insert(n, v);
        }
    }
    if response.decision() == Decision::Allow {
        if let Some(caller) = &response.caller {
            for (name, value) in [
                ("x-warden-key-id", &caller.key_id),
                ("x-warden-owner", &caller.owner),
            ] {
                if let Ok(v) = HeaderValue::from_str(value) {
                    out.insert(HeaderName::from_static(name), v);
                }
            }
        }
        return (StatusCode::OK, out).into_response();
    }
    let status = StatusCode::from_u16(response.http_status as u16).unwrap_or(StatusCode::FORBIDDEN);
    let reason = response.reason();
    json(status, reason_name(reason), public_message(reason), out)
}

/// What a denied client is told: the same words as the Django middleware.
/// Deliberately generic: which check failed and why is in warden's log.
fn public_message(reason: Reason) -> &'static str {
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

fn json(status: StatusCode, error: &str, message: &str, mut headers: HeaderMap) -> Response {
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let body = serde_json::json!({ "error": error, "message": message }).to_string();
    (status, headers, body).into_response()
}
