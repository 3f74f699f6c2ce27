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
//! node unreachable).
//!
//! Two ways to serve it: HTTPS with client certificates (`tls = true`, the
//! same certificates, bounds and caller roles as the gRPC port), or
//! plaintext HTTP on a loopback address for a gateway on the same host.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::serve::{IncomingStream, Listener};
use tokio::sync::mpsc;

use super::{Body, Early, Headers, HttpAnswer, Original};
use crate::check::CallerIdentity;
use crate::config::{ForwardAuthSettings, GatewaySettings};
use crate::conn::{Conn, PeerInfo};
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

/// Serves until `shutdown` resolves. Connections come from the server's
/// accept loop, under its bounds.
pub async fn serve(
    incoming: ConnListener,
    caller: Caller,
    service: WardenService,
    settings: ForwardAuthSettings,
    gateway: GatewaySettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let app = axum::Router::new().fallback(
        move |ConnectInfo(peer): ConnectInfo<PeerInfo>, headers: HeaderMap| {
            let (service, settings, gateway, caller) = (
                service.clone(),
                settings.clone(),
                gateway.clone(),
                caller.clone(),
            );
            async move {
                // A request is activity: the connection is not idle.
                peer.conn.touch();
                let caller = match caller {
                    Caller::Configured(identity) => identity,
                    Caller::Certificate => CallerIdentity(peer.identity.clone()),
                };
                answer(&service, &settings, &gateway, &caller, &headers).await
            }
        },
    );
    let served = axum::serve(
        incoming,
        app.into_make_service_with_connect_info::<PeerInfo>(),
    )
    .with_graceful_shutdown(shutdown)
    .await;
    if let Err(e) = served {
        tracing::error!(event = "forward_auth_failed", error = %e, "forward-auth listener failed");
    }
}

/// The connections the accept loop hands over, as a listener for the HTTP
/// server.
pub struct ConnListener {
    conns: mpsc::Receiver<io::Result<Conn>>,
    local: SocketAddr,
}

impl ConnListener {
    pub fn new(conns: mpsc::Receiver<io::Result<Conn>>, local: SocketAddr) -> Self {
        Self { conns, local }
    }
}

impl Listener for ConnListener {
    type Io = Conn;
    type Addr = PeerInfo;

    async fn accept(&mut self) -> (Conn, PeerInfo) {
        loop {
            match self.conns.recv().await {
                Some(Ok(conn)) => {
                    let peer = conn.peer().clone();
                    return (conn, peer);
                }
                Some(Err(_)) => continue,
                // The accept loop stopped: so does the server.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<PeerInfo> {
        Err(io::Error::other(format!(
            "a listener of mTLS connections on {}",
            self.local
        )))
    }
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, ConnListener>> for PeerInfo {
    fn connect_info(stream: IncomingStream<'_, ConnListener>) -> Self {
        stream.remote_addr().clone()
    }
}

async fn answer(
    service: &WardenService,
    settings: &ForwardAuthSettings,
    gateway: &GatewaySettings,
    caller: &CallerIdentity,
    headers: &HeaderMap,
) -> Response {
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
        Err(early) => return http(super::early_answer(&early)),
    };
    match service.check_as(req, caller).await {
        Ok(response) => http(super::answer(&response)),
        // A caller without the check role is refused for good: a 403 with
        // no Retry-After, which would have it ask again every second.
        Err(status) if status.code() == tonic::Code::PermissionDenied => http(HttpAnswer {
            status: 403,
            headers: Vec::new(),
            ..super::cannot_check_now()
        }),
        Err(_) => http(super::cannot_check_now()),
    }
}

fn misconfigured(why: String) -> Response {
    tracing::warn!(
        event = "forward_auth_misconfigured",
        why,
        "a forward-auth request lacks what the gateway must send"
    );
    http(super::early_answer(&Early::Misconfigured(why)))
}

/// The answer as an HTTP response: the caller headers for
/// `auth_request_set`, the client's headers, the JSON body on a denial.
fn http(answer: HttpAnswer) -> Response {
    let mut out = HeaderMap::new();
    for (name, value) in &answer.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
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
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::FORBIDDEN);
    match answer.body {
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
