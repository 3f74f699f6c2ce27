//! Rust client for warden.
//!
//! - [`proto`]: the generated gRPC types and stubs for `warden.v1`.
//! - [`signing`]: the request signer (and the canonical strings the server
//!   verifies against: both sides share this one implementation).
//! - [`Client`]: a typed client with mTLS set up in a few lines.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use warden_client::{Client, Tls, signing::Signer};
//! let tls = Tls::from_files("warden-dev/ca.pem", "warden-dev/client.pem", "warden-dev/client-key.pem")?;
//! let mut client = Client::connect("127.0.0.1:50051", tls).await?;
//! let signer = Signer::new("wk_demo", "the-secret");
//! let answer = client.check(signer.check_request("GET", "/hello", "", b"")).await?;
//! println!("{:?}", answer.decision());
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod busy_wait;
mod coalescing;
pub mod codec;
mod connect;
pub mod signing;

pub use busy_wait::BusyWait;
pub use coalescing::Coalescing;

/// Generated from `proto/warden/v1/warden.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("warden.v1");

    /// The encoded `FileDescriptorSet` of `warden.v1`, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/warden_descriptor.bin"));
}

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};

use crate::proto::warden_client::WardenClient;
use crate::proto::{CheckRequest, CheckResponse, Reason};

/// Why a client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid target address {0:?}")]
    Target(String),
    #[error("invalid TLS material: {0}")]
    Tls(String),
    /// With every cause beneath tonic's own text, which for any failed
    /// connection is only "transport error": refused, timed out, or which
    /// side's certificate was not trusted.
    #[error("cannot connect to warden at {target}: {}", error_chain(.source))]
    Connect {
        target: String,
        source: tonic::transport::Error,
    },
    /// [`mtls_stream`]'s: refused, timed out, or a certificate not trusted.
    #[error("cannot connect to warden at {target}: {}", error_chain(.source))]
    Open {
        target: String,
        source: std::io::Error,
    },
}

/// An error and the errors beneath it, as one line (a cause whose text its
/// parent already ends with is not repeated).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    append_causes(&mut text, error.source());
    text
}

fn append_causes(text: &mut String, mut source: Option<&(dyn std::error::Error + 'static)>) {
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
}

/// Whether a failed call found its node unreachable: refused, a node's
/// "retry", or a connection that broke under the call. Another node may
/// answer it.
fn unreachable(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable || connection_broke(status)
}

/// A failed call's message with the causes beneath it: for a connection
/// that failed under the call (say, the server refused this client's
/// certificate) tonic's message alone is "transport error".
pub fn status_message(status: &tonic::Status) -> String {
    let mut text = status.message().to_owned();
    append_causes(&mut text, std::error::Error::source(status));
    text
}

/// [`status_message`] and the code, for an operator.
pub fn status_text(status: &tonic::Status) -> String {
    format!("{} ({:?})", status_message(status), status.code())
}

/// Whether a failed call failed because its connection broke under it (the
/// server died, or closed the connection): tonic ends such a call as
/// CANCELLED or UNKNOWN with the transport's error beneath, where a status
/// the server sent has none. grpcio calls it UNAVAILABLE.
pub fn connection_broke(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
        && matches!(status.code(), tonic::Code::Cancelled | tonic::Code::Unknown)
}

/// The client side of mutual TLS: which CA to trust for the server, and the
/// certificate this client presents.
#[derive(Clone)]
pub struct Tls {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    server_name: Option<String>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl Tls {
    pub fn from_pem(ca_pem: Vec<u8>, cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Self {
        Self {
            ca_pem,
            cert_pem,
            key_pem,
            server_name: None,
        }
    }

    /// Reads the CA bundle, client certificate and client key from PEM files.
    pub fn from_files(
        ca: impl AsRef<Path>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, Error> {
        Ok(Self::from_pem(read(ca)?, read(cert)?, read(key)?))
    }

    /// The files `warden serve --dev` writes into its dev directory.
    pub fn from_dev_dir(dir: impl AsRef<Path>) -> Result<Self, Error> {
        let dir = dir.as_ref();
        Self::from_files(
            dir.join("ca.pem"),
            dir.join("client.pem"),
            dir.join("client-key.pem"),
        )
    }

    /// The name to expect in the server certificate, when it differs from
    /// the host of the target address (e.g. connecting by IP to a cert for
    /// `warden.internal`).
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }
}

fn read(path: impl AsRef<Path>) -> Result<Vec<u8>, Error> {
    let path = path.as_ref();
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.display().to_string(),
        source,
    })
}

/// A connection to one warden server, or to several nodes of a cluster.
/// Cheap to clone: clones share the underlying HTTP/2 connections.
///
/// With several nodes ([`Client::connect_cluster`]) each call starts at the
/// next node in turn and goes on to the others while one is unreachable
/// (`UNAVAILABLE`: refused, reset, or a node's "retry" while a key's state
/// moves; or the connection broke under the call, see [`connection_broke`]),
/// so one node going away is not noticed. Other errors are not retried:
/// after a passed deadline the node may have decided, and the same request
/// sent again would be refused as its own replay. (A node that dies after
/// its owner decided but before it answered is the one case where the
/// retry is refused as REPLAY.)
///
/// Every check has a deadline ([`DEFAULT_TIMEOUT`], or
/// [`Client::with_timeout`]): a server that stops answering (a paused or
/// hung process, a host gone without closing its connections) costs a
/// call its deadline, never forever. A node whose call failed that way, or
/// was unreachable, is passed over by the calls of the next
/// [`SKIP_AFTER_FAILURE`] (unless every node is), so that one node in
/// trouble costs the calls sent to it one deadline, not every call in turn.
#[derive(Clone, Debug)]
pub struct Client {
    nodes: Vec<WardenClient<Channel>>,
    turn: Arc<AtomicUsize>,
    /// Per node: until when (nanoseconds since `epoch`) calls pass it over.
    skip_until: Arc<[AtomicU64]>,
    epoch: Instant,
    timeout: Duration,
}

/// How long a check may take before the client gives up on it
/// (`DEADLINE_EXCEEDED`). warden answers in well under a millisecond; in a
/// cluster a check that needs an unresponsive peer is answered within about
/// a second (the peers' own deadline), which this leaves room for.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the calls of a cluster client pass over a node that failed to
/// answer one.
pub const SKIP_AFTER_FAILURE: Duration = Duration::from_secs(1);

impl Client {
    /// Connects over mutual TLS. `target` is `host:port`.
    pub async fn connect(target: &str, tls: Tls) -> Result<Self, Error> {
        Ok(Self::from_channel(channel(target, tls).await?))
    }

    /// Connects without TLS, to a server configured with
    /// `insecure_plaintext = true` on loopback. For local experiments only.
    pub async fn connect_plaintext(target: &str) -> Result<Self, Error> {
        let channel = endpoint(&format!("http://{target}"))?.connect().await;
        Ok(Self::from_channel(channel.map_err(|source| {
            Error::Connect {
                target: target.to_owned(),
                source,
            }
        })?))
    }

    /// Over mutual TLS to every node in `targets` (`host:port` each), for
    /// a warden cluster: any node answers any check. Connects on first use.
    pub fn connect_cluster(targets: &[&str], tls: Tls) -> Result<Self, Error> {
        if targets.is_empty() {
            return Err(Error::Target(String::new()));
        }
        let channels = targets
            .iter()
            .map(|t| lazy_channel(t, Some(&tls)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::from_channels(channels))
    }

    /// Wraps an existing channel (e.g. one with custom load balancing).
    pub fn from_channel(channel: Channel) -> Self {
        Self::from_channels(vec![channel])
    }

    fn from_channels(channels: Vec<Channel>) -> Self {
        Self {
            skip_until: channels.iter().map(|_| AtomicU64::new(0)).collect(),
            nodes: channels.into_iter().map(WardenClient::new).collect(),
            turn: Default::default(),
            epoch: Instant::now(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The deadline of each check, instead of [`DEFAULT_TIMEOUT`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Checks one request (on the next node in turn, and on the others
    /// while nodes are unreachable), within the client's deadline.
    pub async fn check(&mut self, request: CheckRequest) -> Result<CheckResponse, tonic::Status> {
        self.call(Rpc::Check, request).await
    }

    /// Forgets that `request` was accepted, so that it may be accepted once
    /// more: for a webhook delivery whose processing failed, which the
    /// provider will send again. Judged as a check is (ALLOW when
    /// forgotten); any node will do, and asking twice does no harm.
    pub async fn forget(&mut self, request: CheckRequest) -> Result<CheckResponse, tonic::Status> {
        self.call(Rpc::Forget, request).await
    }

    async fn call(
        &mut self,
        rpc: Rpc,
        request: CheckRequest,
    ) -> Result<CheckResponse, tonic::Status> {
        let n = self.nodes.len();
        if n == 1 {
            return self.call_on(0, rpc, request).await;
        }
        let start = self.turn.fetch_add(1, Ordering::Relaxed);
        // Nodes that failed lately go last, in turn among themselves.
        let now = self.now();
        let (mut order, skipped): (Vec<usize>, Vec<usize>) = (0..n)
            .map(|i| (start + i) % n)
            .partition(|&i| self.skip_until[i].load(Ordering::Relaxed) <= now);
        order.extend(skipped);
        let mut last = None;
        for i in order {
            match self.call_on(i, rpc, request.clone()).await {
                // Unreachable, or the connection broke under the call (a
                // node that died): the next node may answer.
                Err(status) if unreachable(&status) => last = Some(status),
                answer => return answer,
            }
        }
        Err(last.expect("at least one node"))
    }

    /// One attempt on node `i`, within the deadline; a node that fails to
    /// answer is passed over for a while.
    async fn call_on(
        &mut self,
        i: usize,
        rpc: Rpc,
        request: CheckRequest,
    ) -> Result<CheckResponse, tonic::Status> {
        // Enforced here, not sent as grpc-timeout: a paused server reads
        // nothing, so only this side can end the wait, and tonic reports
        // its own expiry of a grpc-timeout as CANCELLED, which reads as a
        // connection closed under the call (retried on the next node,
        // although the node may have decided).
        let node = &mut self.nodes[i];
        let call = async move {
            match rpc {
                Rpc::Check => node.check(request).await,
                Rpc::Forget => node.forget(request).await,
            }
        };
        let answer = match tokio::time::timeout(self.timeout, call).await {
            Ok(answer) => answer.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded(
                "warden did not answer within the client's deadline",
            )),
        };
        if let Err(status) = &answer
            && (unreachable(status) || status.code() == tonic::Code::DeadlineExceeded)
        {
            let until = self.now() + SKIP_AFTER_FAILURE.as_nanos() as u64;
            self.skip_until[i].store(until, Ordering::Relaxed);
        }
        answer
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// The generated stub of the next node in turn, for `check_stream` and
    /// anything else.
    pub fn stub(&mut self) -> &mut WardenClient<Channel> {
        let n = self.nodes.len();
        let i = self.turn.fetch_add(1, Ordering::Relaxed) % n;
        &mut self.nodes[i]
    }
}

/// The calls [`Client`] makes with a `CheckRequest`.
#[derive(Clone, Copy)]
enum Rpc {
    Check,
    Forget,
}

/// An mTLS channel to warden, for the generated stubs of any service it
/// serves (`warden.v1`, `grpc.health.v1`, reflection). `target` is `host:port`.
pub async fn channel(target: &str, tls: Tls) -> Result<Channel, Error> {
    let (endpoint, connector) = tls_endpoint(target, &tls)?;
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|source| Error::Connect {
            target: target.to_owned(),
            source,
        })
}

/// Like [`channel`], but connecting on first use and reconnecting by
/// itself after a lost connection: for a long-lived channel to a server
/// that may not be up yet. Without `tls`, plaintext (loopback only, for
/// experiments: tonic's own connections, not [`Coalescing`]).
pub fn lazy_channel(target: &str, tls: Option<&Tls>) -> Result<Channel, Error> {
    Ok(match tls {
        Some(tls) => {
            let (endpoint, connector) = tls_endpoint(target, tls)?;
            endpoint.connect_with_connector_lazy(connector)
        }
        None => endpoint(&format!("http://{target}"))?.connect_lazy(),
    })
}

/// How long a connection may take, TCP and TLS, before it fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The byte stream under [`channel`]'s HTTP/2: TCP to `target`, mutual
/// TLS with ALPN `h2`, and [`Coalescing`] writes. For a caller that speaks
/// HTTP/2 itself (warden-bench's lean generator, which measures the server
/// with as little client as a gateway's own HTTP/2 codec). Fails after
/// 5 s, as the channel's connections do: a server that accepts and never
/// answers the handshake does not hold its caller.
pub async fn mtls_stream(
    target: &str,
    tls: &Tls,
) -> Result<Coalescing<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>, Error> {
    let (host, port) = host_and_port(target)?;
    let port = port.parse().map_err(|_| Error::Target(target.to_owned()))?;
    let connector = connector(host, tls)?;
    tokio::time::timeout(CONNECT_TIMEOUT, connector.open(host, port))
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {CONNECT_TIMEOUT:?}"),
            ))
        })
        .map_err(|source| Error::Open {
            target: target.to_owned(),
            source,
        })
}

fn tls_endpoint(target: &str, tls: &Tls) -> Result<(Endpoint, connect::Connector), Error> {
    let (host, _) = host_and_port(target)?;
    // TLS is the connector's: to tonic the connection is plain HTTP/2.
    Ok((
        endpoint(&format!("http://{target}"))?,
        connector(host, tls)?,
    ))
}

/// `host:port`'s two parts, the host without an IPv6 address's brackets.
fn host_and_port(target: &str) -> Result<(&str, &str), Error> {
    target
        .rsplit_once(':')
        .map(|(host, port)| (host.trim_matches(['[', ']']), port))
        .ok_or_else(|| Error::Target(target.to_owned()))
}

/// Connections to `host`, which the server's certificate must name unless
/// `tls` names another.
fn connector(host: &str, tls: &Tls) -> Result<connect::Connector, Error> {
    connect::Connector::new(tls, tls.server_name.as_deref().unwrap_or(host))
}

fn endpoint(uri: &str) -> Result<Endpoint, Error> {
    Ok(Endpoint::from_shared(uri.to_owned())
        .map_err(|_| Error::Target(uri.to_owned()))?
        .connect_timeout(CONNECT_TIMEOUT)
        // A connection to a server that stopped answering (paused, or a
        // host gone without a word) is found and replaced, instead of
        // taking every call's deadline until the kernel gives up on it.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .tcp_nodelay(true))
}

/// The short name of a reason, as warden's logs, metrics and audit records
/// spell it (`"rate_limited"`), and as the Python client's `Decision.reason` does.
pub fn reason_name(reason: Reason) -> &'static str {
    match reason {
        Reason::Unspecified => "unspecified",
        Reason::Ok => "ok",
        Reason::Malformed => "malformed",
        Reason::Unauthenticated => "unauthenticated",
        Reason::Stale => "stale",
        Reason::Replay => "replay",
        Reason::Forbidden => "forbidden",
        Reason::RateLimited => "rate_limited",
        Reason::LockedOut => "locked_out",
    }
}
