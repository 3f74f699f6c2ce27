//! The config file as written: the serde schema of `warden.toml`. Every
//! field is optional unless the server cannot do without it; what each
//! means, and its default, is in its doc comment. `super` turns this into
//! validated settings.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::model::PolicySpec;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// Address to serve on. Default 127.0.0.1:50051.
    pub listen: Option<String>,
    /// Serve without TLS. Refused unless `listen` is a loopback address.
    #[serde(default)]
    pub insecure_plaintext: bool,
    pub tls: Option<TlsFile>,
    #[serde(default)]
    pub check: CheckFile,
    #[serde(default)]
    pub server: ServerFile,
    #[serde(default)]
    pub alerts: AlertsFile,
    #[serde(default)]
    pub audit: AuditFile,
    /// The key store; without it the admin API is unavailable.
    pub store: Option<StoreFile>,
    /// Membership of a cluster of warden processes (needs a PostgreSQL
    /// store, which is the coordinator).
    pub cluster: Option<ClusterFile>,
    /// An HTTP endpoint for nginx `auth_request`, Caddy `forward_auth` and
    /// Traefik `ForwardAuth`.
    pub forward_auth: Option<ForwardAuthFile>,
    /// What the gateway faces (Envoy ext_authz, forward auth) add to a
    /// request: limits by route, and where the client's address comes from.
    #[serde(default)]
    pub gateway: GatewayFile,
    /// The Envoy rate limit service (`envoy.service.ratelimit.v3`), a
    /// drop-in for envoyproxy/ratelimit.
    pub envoy_ratelimit: Option<EnvoyRateLimitFile>,
    #[serde(default)]
    pub policies: Vec<PolicySpec>,
    #[serde(default)]
    pub keys: Vec<KeyFile>,
    /// Which client-certificate identities may do what.
    #[serde(default)]
    pub callers: Vec<CallerFile>,
    /// Routes that end clients (by certificate identity) may call.
    #[serde(default)]
    pub clients: Vec<ClientFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerFile {
    /// Exact identity, or a pattern with `*` (any run of characters but `/`).
    pub identity: String,
    /// Any of "check", "admin", "forward-identity", "sign" (outbound
    /// webhooks), "peer" (another node of
    /// the cluster).
    pub roles: Vec<String>,
    /// With "check": only keys whose id starts with one of these.
    #[serde(default)]
    pub key_prefixes: Vec<String>,
    /// With "check": only these request-limit policies (default: any).
    pub policies: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    pub identity: String,
    pub routes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA bundle that client certificates must chain to (PEM).
    pub client_ca: PathBuf,
    /// Certificate revocation lists (PEM) for client certificates.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// "1.3" (default) or "1.2" to also accept TLS 1.2 clients.
    pub min_version: Option<TlsVersion>,
    /// Fall back to the subject CN as the caller identity when a client
    /// certificate has no SPIFFE or DNS SAN. Default false.
    #[serde(default)]
    pub allow_cn_identity: bool,
    /// How often certificate files are checked for changes. Default "2s".
    /// SIGHUP reloads at once.
    #[serde(default, with = "humantime_serde")]
    pub reload_interval: Option<Duration>,
    /// Warn when the server certificate or a CA expires sooner. Default "30d".
    #[serde(default, with = "humantime_serde")]
    pub expiry_warning: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckFile {
    /// How far a request's timestamp may lie behind the server's clock.
    /// Default "300s". (`skew`, its old name, is accepted too.)
    #[serde(alias = "skew", default, with = "humantime_serde")]
    pub past_skew: Option<Duration>,
    /// How far a request's timestamp may lie ahead of the server's clock.
    /// After a restart, requests are STALE until this much past the start
    /// (the restart fence), so keep it small. Default "5s".
    #[serde(default, with = "humantime_serde")]
    pub future_skew: Option<Duration>,
    /// Largest body accepted in a CheckRequest. Default 1048576 (1 MiB).
    pub max_body_bytes: Option<usize>,
    /// Most nonces remembered at once. Default 10000000.
    pub nonce_capacity: Option<usize>,
    /// Number of state shards (rounded up to a power of two). Default 64.
    pub shards: Option<usize>,
    /// Failed signatures / unknown-key attempts allowed per source (the
    /// forwarded client identity, else the client address, else the caller)
    /// per `failure_period` before LOCKED_OUT. Default 20.
    pub failure_limit: Option<u64>,
    /// Default "60s".
    #[serde(default, with = "humantime_serde")]
    pub failure_period: Option<Duration>,
    /// Most request-limit entries (descriptors, all policies together) and
    /// failure budgets held at once. Default 4000000.
    pub max_limit_entries: Option<u64>,
    /// Most failure budgets (sources) held at once. Default 1000000.
    pub max_failure_sources: Option<u64>,
    /// For webhook schemes whose signature carries no time (GitHub): how
    /// long a delivery is remembered against replay. Default "72h".
    #[serde(default, with = "humantime_serde")]
    pub webhook_replay_window: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    /// Where Prometheus metrics are served (`/metrics`, plain HTTP), or
    /// "off". Default "127.0.0.1:9464".
    pub metrics_listen: Option<String>,
    /// Checks in flight at once; beyond it calls are shed at once with
    /// RESOURCE_EXHAUSTED. An open CheckStream counts as one. Default 4096.
    pub max_inflight: Option<usize>,
    /// Calls in flight at once on one connection. Default 128.
    pub max_calls_per_connection: Option<usize>,
    /// Close connections with no traffic for this long. Default "10m".
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Connections open at once (handshaking or established). Beyond it new
    /// connections are closed at once. Default: the descriptor limit less a
    /// reserve of 256 for files, reloads and the metrics listener.
    pub max_connections: Option<usize>,
    /// TLS handshakes in progress at once, from everyone. Default 1024.
    pub max_handshakes: Option<usize>,
    /// TLS handshakes in progress at once from one IP address. Default 32.
    pub max_handshakes_per_address: Option<usize>,
    /// How long a client may take to complete the TLS handshake. Default "3s".
    #[serde(default, with = "humantime_serde")]
    pub handshake_timeout: Option<Duration>,
    /// How long a request that has begun may take to arrive whole: a unary
    /// call's request, or one message of a stream (a stream waiting
    /// between messages is never cut). Past it the call is answered
    /// DEADLINE_EXCEEDED. Default "10s".
    #[serde(default, with = "humantime_serde")]
    pub request_read_timeout: Option<Duration>,
    /// Bytes of requests not yet whole that all calls together may hold
    /// while warden waits for the rest; a call that would pass it is
    /// answered RESOURCE_EXHAUSTED. Default 64 MiB (or four of the largest
    /// messages, if more).
    pub max_waiting_request_bytes: Option<usize>,
    /// Denied checks logged a second (`event=check_denied`); past it they
    /// are counted and the count logged once the second is over. 0 logs
    /// none. Default 1000.
    pub max_denial_log_lines: Option<u32>,
    /// After SIGTERM: report NOT_SERVING for this long while still serving,
    /// so load balancers stop sending traffic. Default "0s".
    #[serde(default, with = "humantime_serde")]
    pub drain_delay: Option<Duration>,
    /// After that: how long in-flight calls may take to finish. Default "30s".
    #[serde(default, with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// This node's name, unique in the cluster, e.g. the pod name.
    pub node: Option<String>,
    /// The environment variable holding the node's name instead (e.g.
    /// `POD_NAME` from the Kubernetes downward API).
    pub node_env: Option<String>,
    /// The address other nodes reach this one on (host:port of its gRPC
    /// listener); `{node}` stands for the node's name, e.g.
    /// "{node}.warden-peers.warden.svc:50051".
    pub advertise: String,
    /// How long a node's lease lasts without renewal (renewed five times per
    /// lease). Default "5s".
    #[serde(default, with = "humantime_serde")]
    pub lease_ttl: Option<Duration>,
    /// The client certificate (PEM) this node presents to the others, whose
    /// identity holds the "peer" role there; its chain must lead to their
    /// `[tls] client_ca`. Default: `[tls] cert`.
    pub cert: Option<PathBuf>,
    /// Its private key. Default: `[tls] key`.
    pub key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardAuthFile {
    /// Address of the HTTP endpoint: a loopback address for plaintext,
    /// any address with `tls = true`.
    pub listen: String,
    /// Serve HTTPS with client certificates (`[tls]`'s certificate, key and
    /// client CA): each gateway's certificate identity is the caller, and
    /// needs the "check" role. Default false: plaintext on loopback.
    #[serde(default)]
    pub tls: bool,
    /// Plaintext only: the caller identity its checks run as; a
    /// `[[callers]]` rule must give it the "check" role (e.g.
    /// "nginx.forward-auth").
    pub identity: Option<String>,
    /// Header carrying the original request's method. Default
    /// "X-Original-Method" (nginx; Traefik and Caddy: "X-Forwarded-Method").
    pub method_header: Option<String>,
    /// Header carrying the original URI (path and query). Default
    /// "X-Original-URI" (Traefik and Caddy: "X-Forwarded-Uri").
    pub uri_header: Option<String>,
    /// Header carrying the end client's address, for failure budgets
    /// (e.g. "X-Real-IP"). Default: none.
    pub client_address_header: Option<String>,
    /// Whether a refusal carries its JSON body. Caddy and Traefik pass it
    /// on to the client; nginx's `auth_request` never does, and closes its
    /// kept-alive connection to warden after every answer with a body, so
    /// give nginx false. Default true.
    pub denial_body: Option<bool>,
    /// Whether refusals use only the statuses nginx's `auth_request`
    /// passes on (401 and 403): a 400, 429 or 503 is then answered 403
    /// with the status meant in `X-Warden-Status`. Any other status is an
    /// error to nginx, which logs an error line and closes the client's
    /// connection after answering it. Give nginx true. Default false.
    pub auth_request_statuses: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    /// Where the end client's address comes from: "source" (default: the
    /// address Envoy saw, or the forward-auth `client_address_header`) or
    /// "x-forwarded-for" (see `trusted_hops`).
    pub client_address: Option<String>,
    /// With "x-forwarded-for": how many proxies of yours append to the
    /// header; the entry that many from the right is the client. Default 1.
    pub trusted_hops: Option<usize>,
    /// Request limits by route: the first route that matches applies.
    #[serde(default)]
    pub routes: Vec<GatewayRouteFile>,
    /// Headers some application servers take a request's path, mount
    /// point or method from; a request carrying one is refused (400).
    /// Default: SCRIPT_NAME, Daphne-Root-Path, X-Original-URL,
    /// X-Rewrite-URL, X-HTTP-Method-Override, X-HTTP-Method,
    /// X-Method-Override. `[]` refuses none.
    pub route_override_headers: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayRouteFile {
    /// "METHOD /path", `*` for any method, a trailing `*` for a prefix.
    pub route: String,
    pub limits: Vec<RouteLimitFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteLimitFile {
    /// A policy of `[[policies]]`.
    pub policy: String,
    /// What one counter counts: "ip" (each client address) or "route" (all
    /// requests to the route together).
    pub per: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvoyRateLimitFile {
    /// envoyproxy/ratelimit YAML files, or directories whose `*.yaml` and
    /// `*.yml` files are read (like its runtime `config/` directory).
    pub config: Vec<PathBuf>,
    /// Answer OK even when a limit is exceeded (counting as usual), like
    /// envoyproxy/ratelimit's `SHADOW_MODE`. Default false.
    #[serde(default)]
    pub shadow_mode: bool,
    /// Add `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`
    /// for the tightest limit to the response (envoyproxy/ratelimit's
    /// `LIMIT_RESPONSE_HEADERS_ENABLED`). Default true.
    pub response_headers: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    /// Directory of the embedded store (store.jsonl, audit.log).
    pub dir: PathBuf,
    /// File holding the master key (64 hex characters).
    pub master_key_file: Option<PathBuf>,
    /// Environment variable holding the master key. Default
    /// WARDEN_MASTER_KEY when no file is given.
    pub master_key_env: Option<String>,
    /// Keep keys and policies in this PostgreSQL database instead of the
    /// embedded file, shared by every warden process that points at it.
    /// `?sslmode=verify-full&sslrootcert=/path/ca.pem`: over TLS, the
    /// database's certificate verified (see `postgres::connect`).
    pub postgres_url: Option<String>,
    /// Environment variable holding the PostgreSQL URL (it may carry a
    /// password).
    pub postgres_url_env: Option<String>,
    /// How often a single process writes a checkpoint of its rate-limit
    /// state (state.saved), so that a crash loses only what changed since.
    /// Default 60s; "0s" turns checkpoints off.
    #[serde(default, with = "humantime_serde")]
    pub save_state_every: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFile {
    /// Past this size the audit log is rotated. Default 67108864 (64 MiB).
    pub max_file_bytes: Option<u64>,
    /// Security denials are written once per subject per window, with a
    /// count. Default "60s".
    #[serde(default, with = "humantime_serde")]
    pub denial_window: Option<Duration>,
    /// Subjects tallied apart per window; further ones are summed. Default
    /// 1000.
    pub max_denial_subjects: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsFile {
    /// The counting window. Default "60s".
    #[serde(default, with = "humantime_serde")]
    pub window: Option<Duration>,
    /// Events per key id or caller identity per window that raise an alert.
    /// Defaults: 20 bad signatures, 20 replays, 5 lockouts, 1000 rate limits.
    pub bad_signatures: Option<u32>,
    pub replays: Option<u32>,
    pub lockouts: Option<u32>,
    pub rate_limited: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    pub id: String,
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Names of policies every request with this key counts against.
    #[serde(default)]
    pub policies: Vec<String>,
    /// Active HMAC secrets; any of them verifies (rotation).
    #[serde(default)]
    pub secrets: Vec<SecretFile>,
    /// When set, the key may only call these routes: "METHOD /path", with
    /// `*` as the method for any method and a trailing `*` for a path prefix.
    #[serde(default)]
    pub routes: Vec<String>,
    /// A revoked key answers exactly like an unknown one.
    #[serde(default)]
    pub revoked: bool,
    /// When set, signed requests with this key are only accepted from these
    /// client identities (patterns allowed): the forwarded end-client
    /// identity, or else the calling certificate's.
    #[serde(default)]
    pub bound_identities: Vec<String>,
}

/// Where a secret comes from. The HMAC key is the UTF-8 bytes of the value.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretFile {
    /// The secret itself, in the file (development only).
    pub value: Option<String>,
    /// Name of an environment variable holding the secret.
    pub env: Option<String>,
    /// Path of a file holding the secret (trailing newline ignored).
    pub file: Option<PathBuf>,
}

/// The lowest TLS version a client may speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}
