//! The validated settings the server runs with, and their defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::descriptors::DescriptorRules;
use crate::route::Route;

/// The server's TLS material and how it is used.
#[derive(Clone, Debug)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub crls: Vec<PathBuf>,
    pub allow_tls12: bool,
    pub allow_cn_identity: bool,
    pub reload_interval: Duration,
    pub expiry_warning: Duration,
}

impl TlsPaths {
    /// Files in the given places, everything else at its default.
    pub fn new(cert: PathBuf, key: PathBuf, client_ca: PathBuf) -> Self {
        Self {
            cert,
            key,
            client_ca,
            crls: Vec::new(),
            allow_tls12: false,
            allow_cn_identity: false,
            reload_interval: Duration::from_secs(2),
            expiry_warning: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// Settings of the check pipeline.
#[derive(Clone, Debug)]
pub struct CheckSettings {
    pub past_skew: Duration,
    pub future_skew: Duration,
    pub max_body_bytes: usize,
    pub nonce_capacity: usize,
    pub shards: usize,
    pub failure_limit: u64,
    pub failure_period: Duration,
    pub max_limit_entries: usize,
    pub max_failure_sources: usize,
    /// How long a delivery of a webhook scheme without a signed time
    /// (GitHub) is remembered against replay.
    pub webhook_replay_window: Duration,
}

impl Default for CheckSettings {
    fn default() -> Self {
        Self {
            past_skew: Duration::from_secs(300),
            future_skew: Duration::from_secs(5),
            max_body_bytes: 1024 * 1024,
            nonce_capacity: 10_000_000,
            shards: 64,
            failure_limit: 20,
            failure_period: Duration::from_secs(60),
            max_limit_entries: 4_000_000,
            max_failure_sources: 1_000_000,
            webhook_replay_window: Duration::from_secs(72 * 3600),
        }
    }
}

/// Room in a `CheckRequest` beyond the body for its other fields.
pub const MESSAGE_OVERHEAD: usize = 64 * 1024;
/// tonic's own limit on a message (`max_decoding_message_size` unset),
/// which the admin, peer and health calls and the Envoy rate limit service
/// have always had.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

impl CheckSettings {
    /// The largest check message accepted (`Check`, `CheckStream`, ext_authz).
    pub fn max_message(&self) -> usize {
        self.max_body_bytes + MESSAGE_OVERHEAD
    }

    /// The largest message any call accepts.
    pub fn largest_message(&self) -> usize {
        self.max_message().max(DEFAULT_MAX_MESSAGE_BYTES)
    }
}

/// This node's place in a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSettings {
    pub node: String,
    pub advertise: String,
    pub lease_ttl: Duration,
    /// The client certificate and key presented to other nodes, and the CA
    /// their server certificates must chain to. `None` in plaintext mode
    /// (loopback only), where peers are called without TLS.
    pub peer_tls: Option<PeerTls>,
}

/// Files of a node's identity towards its peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// The forward-auth HTTP endpoint (`[forward_auth]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardAuthSettings {
    pub listen: SocketAddr,
    /// HTTPS with client certificates; the callers are their identities.
    pub tls: bool,
    /// Plaintext: the one caller identity every check runs as.
    pub identity: Option<String>,
    pub method_header: String,
    pub uri_header: String,
    pub client_address_header: Option<String>,
    /// Whether a refusal carries its JSON body (nginx: false, so that it
    /// keeps its connections to warden).
    pub denial_body: bool,
    /// Whether a refusal other than 401 is answered 403 with its status in
    /// `X-Warden-Status` (nginx: true, so that it keeps its client's
    /// connection and logs no error).
    pub auth_request_statuses: bool,
}

/// What the gateway faces add to a request (`[gateway]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewaySettings {
    pub client_address: ClientAddressFrom,
    /// The first route that matches a request gives its limits.
    pub routes: Vec<(Route, Vec<RouteLimit>)>,
    /// Headers (lowercase) that some application servers take a request's
    /// path, mount point or method from: a request carrying one is
    /// refused. Route rules and route limits judge the route the gateway
    /// sees; with one of these, the application may serve another.
    pub route_override_headers: Vec<String>,
}

/// The default `[gateway] route_override_headers`.
pub const ROUTE_OVERRIDE_HEADERS: [&str; 7] = [
    // gunicorn: the mount point, from a trusted forwarder (127.0.0.1 by
    // default, often "*"); Django then serves the path below it.
    "script_name",
    // Daphne: the mount point, from anyone.
    "daphne-root-path",
    // Symfony before 2018, Zend/Laminas, IIS URL Rewrite: the whole path.
    "x-original-url",
    "x-rewrite-url",
    // Rails, Laravel, Spring's HiddenHttpMethodFilter kin, many API
    // frameworks: the method.
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            client_address: ClientAddressFrom::default(),
            routes: Vec::new(),
            route_override_headers: ROUTE_OVERRIDE_HEADERS.map(String::from).to_vec(),
        }
    }
}

/// Where a gateway face finds the end client's address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClientAddressFrom {
    /// Envoy's source address; the forward-auth `client_address_header`.
    #[default]
    Source,
    /// `X-Forwarded-For`, the entry this many from the right (1: the last).
    ForwardedFor { trusted_hops: usize },
}

/// One limit a route adds: a policy, counted per client address or for the
/// route as a whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteLimit {
    pub policy: String,
    pub per: Per,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Per {
    /// Descriptor `ip:<client address>`.
    Ip,
    /// Descriptor `route:<the route as configured>`.
    Route,
}

/// The Envoy rate limit service (`[envoy_ratelimit]`).
#[derive(Clone, Debug)]
pub struct EnvoyRateLimitSettings {
    pub rules: Arc<DescriptorRules>,
    pub shadow_mode: bool,
    pub response_headers: bool,
}

/// Limits and lifecycle of the server process.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    pub metrics_listen: Option<SocketAddr>,
    pub max_inflight: usize,
    pub max_calls_per_connection: usize,
    pub idle_timeout: Duration,
    /// `None`: derived from the descriptor limit at start.
    pub max_connections: Option<usize>,
    pub max_handshakes: usize,
    pub max_handshakes_per_address: usize,
    pub handshake_timeout: Duration,
    /// How long a request that has begun may take to arrive whole.
    pub request_read_timeout: Duration,
    /// Bytes of requests not yet whole that all calls together may hold
    /// while warden waits for the rest: at least the largest message
    /// accepted (the config's default grows with it, see
    /// [`default_waiting_request_bytes`]).
    pub max_waiting_request_bytes: usize,
    /// Denied checks logged a second (see [`crate::log_budget`]).
    pub max_denial_log_lines: u32,
    pub drain_delay: Duration,
    pub drain_timeout: Duration,
}

pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// The default of `max_waiting_request_bytes`: 64 MiB, or room for four of
/// the largest messages any call accepts if that is more.
pub fn default_waiting_request_bytes(largest_message: usize) -> usize {
    (64 * 1024 * 1024).max(largest_message.saturating_mul(4))
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            metrics_listen: Some(DEFAULT_METRICS_LISTEN.parse().expect("valid address")),
            max_inflight: 4096,
            max_calls_per_connection: 128,
            idle_timeout: Duration::from_secs(600),
            max_connections: None,
            max_handshakes: 1024,
            max_handshakes_per_address: 32,
            handshake_timeout: Duration::from_secs(3),
            request_read_timeout: Duration::from_secs(10),
            max_waiting_request_bytes: default_waiting_request_bytes(
                CheckSettings::default().largest_message(),
            ),
            max_denial_log_lines: 1000,
            drain_delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Thresholds of the anomaly alerts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertSettings {
    pub window: Duration,
    pub bad_signatures: u32,
    pub replays: u32,
    pub lockouts: u32,
    pub rate_limited: u32,
}

impl Default for AlertSettings {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            bad_signatures: 20,
            replays: 20,
            lockouts: 5,
            rate_limited: 1000,
        }
    }
}
