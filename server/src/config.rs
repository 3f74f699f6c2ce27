//! The config file (`warden serve --config warden.toml`) and its validation.
//!
//! Every problem is reported as one line naming the field, e.g.
//! `policies[1].limit: must be at least 1`, so an operator can fix it without
//! reading code. Paths in the file are relative to the file's directory.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::audit::AuditSettings;
use crate::auth::{Authz, CallerRule, ClientRule, Role};
use crate::model::{
    Invalid, KeyConfig, MAX_ENTRIES, Pattern, Policy, PolicySpec, Route, Secret, bad,
    is_valid_key_id, parse_duration, policy,
};
use crate::store::{MasterKeySource, StoreSettings};

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
    /// Any of "check", "admin", "forward-identity".
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
    pub min_version: Option<String>,
    /// Fall back to the subject CN as the caller identity when a client
    /// certificate has no SPIFFE or DNS SAN. Default false.
    #[serde(default)]
    pub allow_cn_identity: bool,
    /// How often certificate files are checked for changes. Default "2s".
    /// SIGHUP reloads at once.
    pub reload_interval: Option<String>,
    /// Warn when the server certificate or a CA expires sooner. Default "30d".
    pub expiry_warning: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckFile {
    /// How far a request's timestamp may lie behind the server's clock.
    /// Default "300s". (`skew`, its old name, is accepted too.)
    #[serde(alias = "skew")]
    pub past_skew: Option<String>,
    /// How far a request's timestamp may lie ahead of the server's clock.
    /// After a restart, requests are STALE until this much past the start
    /// (the restart fence), so keep it small. Default "5s".
    pub future_skew: Option<String>,
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
    pub failure_period: Option<String>,
    /// Most request-limit entries (descriptors, all policies together) and
    /// failure budgets held at once. Default 4000000.
    pub max_limit_entries: Option<u64>,
    /// Most failure budgets (sources) held at once. Default 1000000.
    pub max_failure_sources: Option<u64>,
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
    pub idle_timeout: Option<String>,
    /// Connections open at once (handshaking or established). Beyond it new
    /// connections are closed at once. Default: the descriptor limit less a
    /// reserve of 256 for files, reloads and the metrics listener.
    pub max_connections: Option<usize>,
    /// TLS handshakes in progress at once, from everyone. Default 1024.
    pub max_handshakes: Option<usize>,
    /// TLS handshakes in progress at once from one IP address. Default 32.
    pub max_handshakes_per_address: Option<usize>,
    /// How long a client may take to complete the TLS handshake. Default "3s".
    pub handshake_timeout: Option<String>,
    /// After SIGTERM: report NOT_SERVING for this long while still serving,
    /// so load balancers stop sending traffic. Default "0s".
    pub drain_delay: Option<String>,
    /// After that: how long in-flight calls may take to finish. Default "30s".
    pub drain_timeout: Option<String>,
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
    pub postgres_url: Option<String>,
    /// Environment variable holding the PostgreSQL URL (it may carry a
    /// password).
    pub postgres_url_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFile {
    /// Past this size the audit log is rotated. Default 67108864 (64 MiB).
    pub max_file_bytes: Option<u64>,
    /// Security denials are written once per subject per window, with a
    /// count. Default "60s".
    pub denial_window: Option<String>,
    /// Subjects tallied apart per window; further ones are summed. Default
    /// 1000.
    pub max_denial_subjects: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsFile {
    /// The counting window. Default "60s".
    pub window: Option<String>,
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
        }
    }
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
    pub drain_delay: Duration,
    pub drain_timeout: Duration,
}

pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

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

/// "off" or an IP:port address.
pub fn parse_metrics_listen(field: &str, text: &str) -> Result<Option<SocketAddr>, Invalid> {
    if text == "off" {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        bad(
            field,
            format!("{text:?} is not an IP:port address or \"off\""),
        )
    })
}

fn server_settings(f: ServerFile) -> Result<ServerSettings, Invalid> {
    let mut s = ServerSettings::default();
    if let Some(text) = f.metrics_listen {
        s.metrics_listen = parse_metrics_listen("server.metrics_listen", &text)?;
    }
    if let Some(n) = f.max_inflight {
        if n == 0 || n > 1_000_000 {
            return Err(bad("server.max_inflight", "must be between 1 and 1000000"));
        }
        s.max_inflight = n;
    }
    if let Some(n) = f.max_calls_per_connection {
        if n == 0 || n > 10_000 {
            return Err(bad(
                "server.max_calls_per_connection",
                "must be between 1 and 10000",
            ));
        }
        s.max_calls_per_connection = n;
    }
    if let Some(text) = f.idle_timeout {
        s.idle_timeout = parse_duration("server.idle_timeout", &text)?;
        if s.idle_timeout < Duration::from_secs(1) {
            return Err(bad("server.idle_timeout", "must be at least 1s"));
        }
    }
    if let Some(n) = f.max_connections {
        if !(16..=1_000_000).contains(&n) {
            return Err(bad(
                "server.max_connections",
                "must be between 16 and 1000000",
            ));
        }
        s.max_connections = Some(n);
    }
    if let Some(n) = f.max_handshakes {
        if !(1..=100_000).contains(&n) {
            return Err(bad("server.max_handshakes", "must be between 1 and 100000"));
        }
        s.max_handshakes = n;
    }
    if let Some(n) = f.max_handshakes_per_address {
        if !(1..=100_000).contains(&n) {
            return Err(bad(
                "server.max_handshakes_per_address",
                "must be between 1 and 100000",
            ));
        }
        s.max_handshakes_per_address = n;
    }
    if let Some(text) = f.handshake_timeout {
        s.handshake_timeout = parse_duration("server.handshake_timeout", &text)?;
        if s.handshake_timeout < Duration::from_millis(100)
            || s.handshake_timeout > Duration::from_secs(60)
        {
            return Err(bad(
                "server.handshake_timeout",
                "must be between 100ms and 60s",
            ));
        }
    }
    if let Some(text) = f.drain_delay {
        s.drain_delay = parse_duration("server.drain_delay", &text)?;
    }
    if let Some(text) = f.drain_timeout {
        s.drain_timeout = parse_duration("server.drain_timeout", &text)?;
    }
    Ok(s)
}

fn alert_settings(f: AlertsFile) -> Result<AlertSettings, Invalid> {
    let d = AlertSettings::default();
    let window = match f.window {
        Some(text) => parse_duration("alerts.window", &text)?,
        None => d.window,
    };
    if window < Duration::from_secs(1) {
        return Err(bad("alerts.window", "must be at least 1s"));
    }
    let threshold = |field: &str, v: Option<u32>, default: u32| match v {
        Some(0) => Err(bad(format!("alerts.{field}"), "must be at least 1")),
        Some(n) => Ok(n),
        None => Ok(default),
    };
    Ok(AlertSettings {
        window,
        bad_signatures: threshold("bad_signatures", f.bad_signatures, d.bad_signatures)?,
        replays: threshold("replays", f.replays, d.replays)?,
        lockouts: threshold("lockouts", f.lockouts, d.lockouts)?,
        rate_limited: threshold("rate_limited", f.rate_limited, d.rate_limited)?,
    })
}

/// A validated configuration, ready to serve.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// `None` only when serving plaintext on loopback.
    pub tls: Option<TlsPaths>,
    pub check: CheckSettings,
    pub server: ServerSettings,
    pub alerts: AlertSettings,
    pub audit: AuditSettings,
    pub store: Option<StoreSettings>,
    pub policies: Vec<Policy>,
    pub keys: Vec<KeyConfig>,
    pub authz: Authz,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, Invalid> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Invalid(format!("cannot read config {}: {e}", path.display())))?;
        let file: File = toml::from_str(&text).map_err(|e| parse_error(path, &text, &e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_file(file, base, &|name| std::env::var(name).ok())
    }

    /// Validates a parsed file. `env` looks up environment variables (a
    /// parameter so tests need not touch the process environment).
    pub fn from_file(
        file: File,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, Invalid> {
        let listen_text = file.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            bad(
                "listen",
                format!("{listen_text:?} is not an IP:port address"),
            )
        })?;
        let tls = match (file.tls, file.insecure_plaintext) {
            (Some(_), true) => {
                return Err(bad(
                    "insecure_plaintext",
                    "cannot be combined with a [tls] section",
                ));
            }
            (None, true) if !listen.ip().is_loopback() => {
                return Err(bad(
                    "insecure_plaintext",
                    "plaintext is only allowed on a loopback address",
                ));
            }
            (None, true) => None,
            (None, false) => {
                return Err(bad(
                    "tls",
                    "missing: give cert, key and client_ca (or insecure_plaintext = true on loopback)",
                ));
            }
            (Some(t), false) => Some(tls_settings(t, base)?),
        };
        let check = check_settings(file.check)?;
        let server = server_settings(file.server)?;
        let alerts = alert_settings(file.alerts)?;
        let audit = audit_settings(file.audit)?;
        let store = match file.store {
            None => None,
            Some(st) => Some(StoreSettings {
                dir: base.join(st.dir),
                master_key: match (st.master_key_file, st.master_key_env) {
                    (Some(_), Some(_)) => {
                        return Err(bad(
                            "store",
                            "give master_key_file or master_key_env, not both",
                        ));
                    }
                    (Some(f), None) => MasterKeySource::File(base.join(f)),
                    (None, Some(e)) => MasterKeySource::Env(e),
                    (None, None) => MasterKeySource::Env("WARDEN_MASTER_KEY".into()),
                },
                postgres_url: match (st.postgres_url, st.postgres_url_env) {
                    (Some(_), Some(_)) => {
                        return Err(bad(
                            "store",
                            "give postgres_url or postgres_url_env, not both",
                        ));
                    }
                    (Some(url), None) => Some(url),
                    (None, Some(name)) => Some(env(&name).ok_or_else(|| {
                        bad(
                            "store.postgres_url_env",
                            format!("environment variable {name} is not set"),
                        )
                    })?),
                    (None, None) => None,
                },
            }),
        };

        let mut policies = Vec::with_capacity(file.policies.len());
        let mut names = HashSet::new();
        for (i, p) in file.policies.into_iter().enumerate() {
            let field = format!("policies[{i}]");
            let policy = policy(&field, p)?;
            if !names.insert(policy.name.clone()) {
                return Err(bad(
                    format!("{field}.name"),
                    format!("duplicate policy {:?}", policy.name),
                ));
            }
            policies.push(policy);
        }

        let mut keys = Vec::with_capacity(file.keys.len());
        let mut ids = HashSet::new();
        for (i, k) in file.keys.into_iter().enumerate() {
            let field = format!("keys[{i}]");
            let key = key(&field, k, &names, base, env)?;
            if !ids.insert(key.id.clone()) {
                return Err(bad(
                    format!("{field}.id"),
                    format!("duplicate key id {:?}", key.id),
                ));
            }
            keys.push(key);
        }

        let mut callers = Vec::with_capacity(file.callers.len());
        for (i, c) in file.callers.into_iter().enumerate() {
            callers.push(caller(&format!("callers[{i}]"), c, &names)?);
        }
        if tls.is_some() && callers.is_empty() {
            return Err(bad(
                "callers",
                "none configured: add [[callers]] entries mapping client certificate identities to roles (no certificate is trusted by default)",
            ));
        }
        let mut clients = Vec::with_capacity(file.clients.len());
        for (i, c) in file.clients.into_iter().enumerate() {
            let field = format!("clients[{i}]");
            let identity =
                Pattern::new(&c.identity).map_err(|m| bad(format!("{field}.identity"), m))?;
            let routes = routes(&field, &c.routes)?;
            clients.push(ClientRule { identity, routes });
        }
        let authz = Authz {
            callers,
            clients,
            plaintext: tls.is_none(),
        };
        Ok(Self {
            listen,
            tls,
            check,
            server,
            alerts,
            audit,
            store,
            policies,
            keys,
            authz,
        })
    }
}

fn audit_settings(f: AuditFile) -> Result<AuditSettings, Invalid> {
    let mut s = AuditSettings::default();
    if let Some(n) = f.max_file_bytes {
        if !(4096..=1 << 40).contains(&n) {
            return Err(bad(
                "audit.max_file_bytes",
                "must be between 4096 and 1099511627776",
            ));
        }
        s.max_file_bytes = n;
    }
    if let Some(text) = f.denial_window {
        s.denial_window = parse_duration("audit.denial_window", &text)?;
        if s.denial_window < Duration::from_secs(1) || s.denial_window > Duration::from_secs(3600) {
            return Err(bad("audit.denial_window", "must be between 1s and 1h"));
        }
    }
    if let Some(n) = f.max_denial_subjects {
        if !(1..=1_000_000).contains(&n) {
            return Err(bad(
                "audit.max_denial_subjects",
                "must be between 1 and 1000000",
            ));
        }
        s.max_denial_subjects = n;
    }
    Ok(s)
}

/// Turns a TOML error into one line: file, line, the offending line's text
/// (which names the field) and the reason.
fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> Invalid {
    let reason = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
            Invalid(format!(
                "{} line {line_no} ({line}): {reason}",
                path.display()
            ))
        }
        None => Invalid(format!("{}: {reason}", path.display())),
    }
}

fn tls_settings(t: TlsFile, base: &Path) -> Result<TlsPaths, Invalid> {
    let mut tls = TlsPaths::new(base.join(t.cert), base.join(t.key), base.join(t.client_ca));
    tls.crls = t.crls.into_iter().map(|p| base.join(p)).collect();
    tls.allow_tls12 = match t.min_version.as_deref() {
        None | Some("1.3") => false,
        Some("1.2") => true,
        Some(other) => {
            return Err(bad(
                "tls.min_version",
                format!("{other:?} is not \"1.2\" or \"1.3\""),
            ));
        }
    };
    tls.allow_cn_identity = t.allow_cn_identity;
    if let Some(text) = t.reload_interval {
        tls.reload_interval = parse_duration("tls.reload_interval", &text)?;
        if tls.reload_interval < Duration::from_millis(100) {
            return Err(bad("tls.reload_interval", "must be at least 100ms"));
        }
    }
    if let Some(text) = t.expiry_warning {
        tls.expiry_warning = parse_duration("tls.expiry_warning", &text)?;
    }
    Ok(tls)
}

fn caller(field: &str, c: CallerFile, policies: &HashSet<String>) -> Result<CallerRule, Invalid> {
    let identity = Pattern::caller(&c.identity).map_err(|m| bad(format!("{field}.identity"), m))?;
    let mut roles = HashSet::new();
    for (j, r) in c.roles.iter().enumerate() {
        let role = Role::parse(r).ok_or_else(|| {
            bad(
                format!("{field}.roles[{j}]"),
                format!("{r:?} is not one of \"check\", \"admin\", \"forward-identity\""),
            )
        })?;
        roles.insert(role);
    }
    if roles.is_empty() {
        return Err(bad(format!("{field}.roles"), "give at least one role"));
    }
    if let Some(list) = &c.policies {
        for (j, p) in list.iter().enumerate() {
            if !policies.contains(p) {
                return Err(bad(
                    format!("{field}.policies[{j}]"),
                    format!("unknown policy {p:?}"),
                ));
            }
        }
    }
    Ok(CallerRule {
        identity,
        roles,
        key_prefixes: c.key_prefixes,
        policies: c.policies.map(|l| l.into_iter().collect()),
    })
}

fn routes(field: &str, texts: &[String]) -> Result<Vec<Route>, Invalid> {
    texts
        .iter()
        .enumerate()
        .map(|(j, r)| Route::parse(r).map_err(|msg| bad(format!("{field}.routes[{j}]"), msg)))
        .collect()
}

fn check_settings(c: CheckFile) -> Result<CheckSettings, Invalid> {
    let d = CheckSettings::default();
    let past_skew = match c.past_skew {
        Some(s) => parse_duration("check.past_skew", &s)?,
        None => d.past_skew,
    };
    if past_skew < Duration::from_secs(1) || past_skew > Duration::from_secs(3600) {
        return Err(bad("check.past_skew", "must be between 1s and 1h"));
    }
    let future_skew = match c.future_skew {
        Some(s) => parse_duration("check.future_skew", &s)?,
        None => d.future_skew,
    };
    if future_skew > Duration::from_secs(300) || future_skew > past_skew {
        return Err(bad(
            "check.future_skew",
            "must be between 0s and 300s, and at most past_skew",
        ));
    }
    if future_skew.subsec_nanos() != 0 || past_skew.subsec_nanos() != 0 {
        return Err(bad(
            "check.past_skew",
            "skews are whole seconds (timestamps are whole seconds)",
        ));
    }
    let max_body_bytes = c.max_body_bytes.unwrap_or(d.max_body_bytes);
    if max_body_bytes == 0 || max_body_bytes > 64 * 1024 * 1024 {
        return Err(bad(
            "check.max_body_bytes",
            "must be between 1 and 67108864",
        ));
    }
    let nonce_capacity = c.nonce_capacity.unwrap_or(d.nonce_capacity);
    if nonce_capacity == 0 || nonce_capacity > 1_000_000_000 {
        return Err(bad(
            "check.nonce_capacity",
            "must be between 1 and 1000000000",
        ));
    }
    let shards = c.shards.unwrap_or(d.shards);
    if shards == 0 || shards > 65_536 {
        return Err(bad("check.shards", "must be between 1 and 65536"));
    }
    let failure_limit = c.failure_limit.unwrap_or(d.failure_limit);
    if failure_limit == 0 || failure_limit > 1_000_000 {
        return Err(bad("check.failure_limit", "must be between 1 and 1000000"));
    }
    let failure_period = match c.failure_period {
        Some(s) => parse_duration("check.failure_period", &s)?,
        None => d.failure_period,
    };
    let entries = |field: &str, v: Option<u64>, default: usize| match v {
        None => Ok(default),
        Some(n) if (1..=MAX_ENTRIES).contains(&n) => Ok(n as usize),
        Some(_) => Err(bad(field, format!("must be between 1 and {MAX_ENTRIES}"))),
    };
    let max_limit_entries = entries(
        "check.max_limit_entries",
        c.max_limit_entries,
        d.max_limit_entries,
    )?;
    let max_failure_sources = entries(
        "check.max_failure_sources",
        c.max_failure_sources,
        d.max_failure_sources,
    )?;
    Ok(CheckSettings {
        past_skew,
        future_skew,
        max_body_bytes,
        nonce_capacity,
        shards,
        failure_limit,
        failure_period,
        max_limit_entries,
        max_failure_sources,
    })
}

fn key(
    field: &str,
    k: KeyFile,
    policies: &HashSet<String>,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<KeyConfig, Invalid> {
    if !is_valid_key_id(&k.id) {
        return Err(bad(
            format!("{field}.id"),
            "must be 1 to 128 characters of [A-Za-z0-9_.:-]",
        ));
    }
    for (j, name) in k.policies.iter().enumerate() {
        if !policies.contains(name) {
            return Err(bad(
                format!("{field}.policies[{j}]"),
                format!("unknown policy {name:?}"),
            ));
        }
    }
    let unique: HashSet<&String> = k.policies.iter().collect();
    if unique.len() != k.policies.len() {
        return Err(bad(format!("{field}.policies"), "a policy is listed twice"));
    }
    if k.secrets.is_empty() && !k.revoked {
        return Err(bad(
            format!("{field}.secrets"),
            "at least one secret is required",
        ));
    }
    let mut secrets = Vec::with_capacity(k.secrets.len());
    for (j, s) in k.secrets.into_iter().enumerate() {
        let f = format!("{field}.secrets[{j}]");
        let value = match (s.value, s.env, s.file) {
            (Some(v), None, None) => v,
            (None, Some(name), None) => env(&name)
                .ok_or_else(|| bad(&f, format!("environment variable {name} is not set")))?,
            (None, None, Some(path)) => {
                let path = base.join(path);
                std::fs::read_to_string(&path)
                    .map_err(|e| bad(&f, format!("cannot read {}: {e}", path.display())))?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned()
            }
            _ => return Err(bad(&f, "give exactly one of value, env or file")),
        };
        if value.len() < 32 {
            // Never print the value, only what is wrong with it.
            return Err(bad(&f, "a secret must be at least 32 bytes"));
        }
        secrets.push(Secret::new(value.into_bytes()));
    }
    let routes = routes(field, &k.routes)?;
    let mut bound_identities = Vec::with_capacity(k.bound_identities.len());
    for (j, id) in k.bound_identities.iter().enumerate() {
        bound_identities
            .push(Pattern::new(id).map_err(|m| bad(format!("{field}.bound_identities[{j}]"), m))?);
    }
    Ok(KeyConfig {
        id: k.id,
        owner: k.owner,
        scopes: k.scopes,
        policies: k.policies,
        secrets,
        routes,
        bound_identities,
        revoked: k.revoked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Invalid> {
        let file: File = toml::from_str(text).map_err(|e| Invalid(e.message().to_owned()))?;
        Config::from_file(file, Path::new("/etc/warden"), &|name| {
            (name == "SECRET_A").then(|| "a".repeat(40))
        })
    }

    const TLS: &str = "[[callers]]\nidentity = \"spiffe://t/gw\"\nroles = [\"check\"]\n\n[tls]\ncert = \"s.pem\"\nkey = \"s-key.pem\"\nclient_ca = \"ca.pem\"\n";

    #[test]
    fn a_full_config_validates_and_resolves_secrets() {
        let cfg = parse(&format!(
            "listen = \"0.0.0.0:7000\"\n{TLS}\n[[policies]]\nname = \"std\"\nlimit = 10\nperiod = \"1s\"\n\n[[keys]]\nid = \"k1\"\npolicies = [\"std\"]\nsecrets = [{{ env = \"SECRET_A\" }}]\nroutes = [\"POST /hooks/*\"]\n"
        ))
        .unwrap();
        assert_eq!(cfg.listen.port(), 7000);
        assert_eq!(cfg.tls.unwrap().cert, Path::new("/etc/warden/s.pem"));
        assert_eq!(cfg.keys[0].secrets.len(), 1);
        assert_eq!(cfg.policies[0].limit.limit(), 10);
    }

    #[test]
    fn errors_name_the_bad_field() {
        let cases = [
            (
                format!("{TLS}[[policies]]\nname = \"p\"\nlimit = 0\nperiod = \"1s\"\n"),
                "policies[0].limit",
            ),
            (
                format!("{TLS}[[policies]]\nname = \"p\"\nlimit = 1\nperiod = \"soon\"\n"),
                "policies[0].period",
            ),
            (
                format!(
                    "{TLS}[[policies]]\nname = \"p\"\nlimit = 1\nperiod = \"1s\"\nalgorithm = \"leaky\"\n"
                ),
                "policies[0].algorithm",
            ),
            (
                format!(
                    "{TLS}[[keys]]\nid = \"k\"\npolicies = [\"nope\"]\nsecrets = [{{ env = \"SECRET_A\" }}]\n"
                ),
                "keys[0].policies[0]",
            ),
            (
                format!("{TLS}[[keys]]\nid = \"k\"\nsecrets = [{{ env = \"MISSING\" }}]\n"),
                "keys[0].secrets[0]",
            ),
            (
                format!("{TLS}[[keys]]\nid = \"k\"\nsecrets = [{{ value = \"short\" }}]\n"),
                "keys[0].secrets[0]",
            ),
            (
                format!("{TLS}[[keys]]\nid = \"bad id\"\nsecrets = [{{ env = \"SECRET_A\" }}]\n"),
                "keys[0].id",
            ),
            (format!("{TLS}[check]\nskew = \"0s\"\n"), "check.past_skew"),
            (
                format!("{TLS}[check]\nfuture_skew = \"10m\"\n"),
                "check.future_skew",
            ),
            ("listen = \"nowhere\"\n".to_owned(), "listen"),
            ("".to_owned(), "tls"),
            (
                "[tls]\ncert = \"a\"\nkey = \"b\"\nclient_ca = \"c\"\n".to_owned(),
                "callers",
            ),
            (
                format!("[[callers]]\nidentity = \"x\"\nroles = [\"root\"]\n{TLS}"),
                "callers[0].roles[0]",
            ),
            (
                format!(
                    "[[callers]]\nidentity = \"x\"\nroles = [\"check\"]\npolicies = [\"nope\"]\n{TLS}"
                ),
                "callers[0].policies[0]",
            ),
            (format!("{TLS}min_version = \"1.1\"\n"), "tls.min_version"),
            (
                "listen = \"10.0.0.1:1\"\ninsecure_plaintext = true\n".to_owned(),
                "insecure_plaintext",
            ),
        ];
        for (text, field) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.starts_with(field), "{err:?} should name {field}");
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }

    #[test]
    fn a_short_secret_is_rejected_without_echoing_it() {
        let err = parse(&format!(
            "{TLS}[[keys]]\nid = \"k\"\nsecrets = [{{ value = \"hunter2\" }}]\n"
        ))
        .unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn plaintext_is_allowed_on_loopback_only() {
        assert!(parse("insecure_plaintext = true\n").unwrap().tls.is_none());
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(
            parse_duration("f", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(parse_duration("f", "2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("f", "2 weeks").is_err());
        assert!(parse_duration("f", "").is_err());
    }
}

#[cfg(test)]
mod deploy_tests {
    use super::*;

    /// The config shipped with the Kubernetes manifests must stay valid.
    #[test]
    fn the_kubernetes_config_is_valid() {
        let text = include_str!("../deploy/kubernetes/warden.toml");
        let file: File = toml::from_str(text).unwrap();
        let config = Config::from_file(file, Path::new("/"), &|_| Some("s".repeat(40))).unwrap();
        assert_eq!(config.server.metrics_listen.unwrap().port(), 9464);
        assert_eq!(config.authz.callers.len(), 2);
    }
}
