//! Serves the calls of established gRPC connections over HTTP/2, with hyper.
//!
//! Why not tonic's `Server`, which did this until session 39: around every
//! call it puts layers warden has no use for. A `grpc-timeout` timer (a
//! client that gives up resets its stream, which ends the call here too), a
//! layer turning service errors into answers (warden's services have none:
//! their error type is `Infallible`), a tracing span (none configured), the
//! connection's extensions copied in a layer of their own, and a boxed
//! service and future over all of it. Measured with a fixed answer on one
//! connection (h2load, 64 in flight), those layers cost about 1 µs of
//! server CPU per call: 6.8–7.6 against 6.0–6.3 µs (`benches/HISTORY.md`,
//! session 38). This module is what remains: hyper's HTTP/2 connection
//! with the settings tonic was given, the caller's [`PeerInfo`] in each
//! request, and a graceful drain.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::task::{Context, Waker};

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio_stream::wrappers::ReceiverStream;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::{Request, Response};

use crate::conn::{Conn, PeerInfo};
use crate::request_wait::RequestWaits;

/// Largest header list a client may send (HTTP/2 SETTINGS).
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// Calls a client may open and cancel before warden has taken them up, at
/// any one time, before its connection is closed (GOAWAY
/// ENHANCE_YOUR_CALM): HTTP/2 "rapid reset", CVE-2023-44487. h2's own
/// default, set here so that it cannot change unseen.
const MAX_PENDING_RESETS: usize = 20;
/// Calls warden itself may reset on one connection because of the client's
/// protocol errors before that connection is closed: "MadeYouReset",
/// CVE-2025-8671. hyper's default, set here so that it cannot change
/// unseen (tonic 0.14's builder replaced it with "no limit" unless one was
/// given: without a limit, a client could open calls without bound by
/// making warden reset each one).
const MAX_ERROR_RESETS: usize = 1024;

/// Serves every connection from `incoming` with `service` until `drain`
/// completes, each with at most `max_streams` streams open at once (the
/// protocol-level bound, set above the per-connection call limit so that
/// excess calls get a clear RESOURCE_EXHAUSTED instead of waiting unseen
/// in the client), and each call's request read within `waits`; then
/// stops taking connections, tells each open one to finish
/// (GOAWAY: calls in flight are answered, no new ones start) and returns
/// once all are closed. The caller bounds how long that may take.
pub async fn serve<S>(
    incoming: ReceiverStream<io::Result<Conn>>,
    drain: impl Future<Output = ()>,
    service: S,
    max_streams: u32,
    waits: Arc<RequestWaits>,
) where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        // No HTTP/2 pings: the kernel's TCP keepalive finds vanished peers
        // (`conn::arm_keepalive`), at no cost per call. hyper's pings'
        // bookkeeping was 1.4 % of the server's samples (session 46).
        .keep_alive_interval(None)
        .max_concurrent_streams(max_streams)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(MAX_ERROR_RESETS)
        // gRPC answers carry no `date` (grpc-go's do not either): no gRPC
        // client reads it, and hyper's, though formatted once a second,
        // cost every call a clock read, a header-map entry and its HPACK
        // encoding: 2 % of a unary call's server CPU (session 45).
        .auto_date_header(false);
    crate::serving::serve_connections(incoming, drain, |conn| {
        let calls = Calls {
            service: service.clone(),
            peer: conn.peer().clone(),
            waits: waits.clone(),
        };
        http2.serve_connection(TokioIo::new(conn), calls)
    })
    .await;
}

/// One connection's calls: each request carries the connection's
/// [`PeerInfo`], which the services read (who called, its call limit), and
/// its body is read within the bounds of [`RequestWaits`].
#[derive(Clone)]
struct Calls<S> {
    service: S,
    peer: PeerInfo,
    waits: Arc<RequestWaits>,
}

impl<S> hyper::service::Service<Request<Incoming>> for Calls<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = S::Future;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let body = Body::new(self.waits.bound(parts.uri.path(), body));
        let mut request = Request::from_parts(parts, body);
        request.extensions_mut().insert(self.peer.clone());
        // warden's services (tonic's generated servers, its router, warden's
        // own unary path) are always ready: asked anyway, as tower's
        // contract wants, and called at once.
        let mut service = self.service.clone();
        let ready = service.poll_ready(&mut Context::from_waker(Waker::noop()));
        debug_assert!(ready.is_ready(), "a gRPC service that is not always ready");
        service.call(request)
    }
}
