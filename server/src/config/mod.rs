//! The config file (`warden serve --config warden.toml`): its schema
//! ([`schema`], the file as written), the validated settings the server runs
//! with ([`settings`]), and here the one step between them.
//!
//! Every problem is reported as one line naming the field, e.g.
//! `policies[1].limit: must be at least 1`, so an operator can fix it without
//! reading code. Paths in the file are relative to the file's directory.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::audit::AuditSettings;
use crate::auth::{Authz, CallerRule, ClientRule, Role};
use crate::model::{
    Invalid, KeyConfig, MAX_ENTRIES, Pattern, Policy, PolicySpec, Secret, bad, is_valid_key_id,
    policy,
};
use crate::route::Route;
use crate::store::{MasterKeySource, StoreSettings};

pub mod schema;
pub mod settings;

pub use schema::*;
pub use settings::*;

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

/// `[server]`; `check` for the bounds that follow the largest message.
fn server_settings(f: ServerFile, check: &CheckSettings) -> Result<ServerSettings, Invalid> {
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
    if let Some(d) = f.idle_timeout {
        s.idle_timeout = d;
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
    if let Some(d) = f.handshake_timeout {
        s.handshake_timeout = d;
        if s.handshake_timeout < Duration::from_millis(100)
            || s.handshake_timeout > Duration::from_secs(60)
        {
            return Err(bad(
                "server.handshake_timeout",
                "must be between 100ms and 60s",
            ));
        }
    }
    if let Some(d) = f.request_read_timeout {
        if d < Duration::from_millis(100) || d > Duration::from_secs(600) {
            return Err(bad(
                "server.request_read_timeout",
                "must be between 100ms and 10m",
            ));
        }
        s.request_read_timeout = d;
    }
    let largest = check.largest_message();
    s.max_waiting_request_bytes = match f.max_waiting_request_bytes {
        None => default_waiting_request_bytes(largest),
        Some(n) if (largest..=1 << 40).contains(&n) => n,
        Some(_) => {
            return Err(bad(
                "server.max_waiting_request_bytes",
                format!(
                    "must be between {largest} (the largest message accepted) and 1099511627776"
                ),
            ));
        }
    };
    if let Some(n) = f.max_denial_log_lines {
        if n > 1_000_000 {
            return Err(bad(
                "server.max_denial_log_lines",
                "must be at most 1000000 (0 logs no denial)",
            ));
        }
        s.max_denial_log_lines = n;
    }
    if let Some(d) = f.drain_delay {
        s.drain_delay = d;
    }
    if let Some(d) = f.drain_timeout {
        s.drain_timeout = d;
    }
    Ok(s)
}

fn alert_settings(f: AlertsFile) -> Result<AlertSettings, Invalid> {
    let d = AlertSettings::default();
    let window = f.window.unwrap_or(d.window);
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
    /// `None`: a single process, as without a cluster.
    pub cluster: Option<ClusterSettings>,
    /// `None`: no forward-auth endpoint.
    pub forward_auth: Option<ForwardAuthSettings>,
    pub gateway: GatewaySettings,
    /// `None`: no Envoy rate limit service.
    pub envoy_ratelimit: Option<EnvoyRateLimitSettings>,
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
        let tls = transport(file.tls, file.insecure_plaintext, listen, base)?;
        let store = file
            .store
            .map(|st| store_settings(st, base, env))
            .transpose()?;
        let cluster = file
            .cluster
            .map(|c| cluster_settings(c, store.as_ref(), tls.as_ref(), base, env))
            .transpose()?;
        let policies = policies(file.policies)?;
        let names: HashSet<String> = policies.iter().map(|p| p.name.clone()).collect();
        let keys = keys(file.keys, &names, base, env)?;
        let authz = authz(file.callers, file.clients, &names, tls.is_none())?;
        let forward_auth = file
            .forward_auth
            .map(|f| forward_auth_settings(f, &authz, tls.is_some()))
            .transpose()?;
        let gateway = gateway_settings(file.gateway, &names)?;
        let envoy_ratelimit = file
            .envoy_ratelimit
            .map(|e| envoy_ratelimit_settings(e, base))
            .transpose()?;
        let check = check_settings(file.check)?;
        let server = server_settings(file.server, &check)?;
        Ok(Self {
            listen,
            tls,
            check,
            server,
            alerts: alert_settings(file.alerts)?,
            audit: audit_settings(file.audit)?,
            store,
            cluster,
            forward_auth,
            gateway,
            envoy_ratelimit,
            policies,
            keys,
            authz,
        })
    }
}

/// `[tls]`, or plaintext when explicitly asked for on loopback only.
fn transport(
    tls: Option<TlsFile>,
    insecure_plaintext: bool,
    listen: SocketAddr,
    base: &Path,
) -> Result<Option<TlsPaths>, Invalid> {
    match (tls, insecure_plaintext) {
        (Some(_), true) => Err(bad(
            "insecure_plaintext",
            "cannot be combined with a [tls] section",
        )),
        (None, true) if !listen.ip().is_loopback() => Err(bad(
            "insecure_plaintext",
            "plaintext is only allowed on a loopback address",
        )),
        (None, true) => Ok(None),
        (None, false) => Err(bad(
            "tls",
            "missing: give cert, key and client_ca (or insecure_plaintext = true on loopback)",
        )),
        (Some(t), false) => Ok(Some(tls_settings(t, base)?)),
    }
}

fn store_settings(
    st: StoreFile,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<StoreSettings, Invalid> {
    let master_key = match (st.master_key_file, st.master_key_env) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "store",
                "give master_key_file or master_key_env, not both",
            ));
        }
        (Some(f), None) => MasterKeySource::File(base.join(f)),
        (None, Some(e)) => MasterKeySource::Env(e),
        (None, None) => MasterKeySource::Env("WARDEN_MASTER_KEY".into()),
    };
    let postgres_url = match (st.postgres_url, st.postgres_url_env) {
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
    };
    let save_state_every = st
        .save_state_every
        .unwrap_or(crate::store::SAVE_STATE_EVERY);
    if !save_state_every.is_zero()
        && (save_state_every < Duration::from_secs(1)
            || save_state_every > Duration::from_secs(86_400))
    {
        return Err(bad(
            "store.save_state_every",
            "must be 0s (off) or between 1s and 24h",
        ));
    }
    Ok(StoreSettings {
        dir: base.join(st.dir),
        master_key,
        postgres_url,
        save_state_every,
    })
}

fn forward_auth_settings(
    f: ForwardAuthFile,
    authz: &Authz,
    tls: bool,
) -> Result<ForwardAuthSettings, Invalid> {
    let listen: SocketAddr = f
        .listen
        .parse()
        .map_err(|_| bad("forward_auth.listen", "must be an IP:port address"))?;
    let identity = match (f.tls, f.identity) {
        (true, _) if !tls => {
            return Err(bad(
                "forward_auth.tls",
                "needs the [tls] section (its certificate, key and client CA)",
            ));
        }
        (true, Some(_)) => {
            return Err(bad(
                "forward_auth.identity",
                "not with tls = true: each gateway's client certificate is its identity",
            ));
        }
        (true, None) => None,
        (false, None) => {
            return Err(bad(
                "forward_auth.identity",
                "missing: the caller identity of the plaintext endpoint (or tls = true)",
            ));
        }
        (false, Some(identity)) => {
            if !listen.ip().is_loopback() {
                return Err(bad(
                    "forward_auth.listen",
                    "plaintext HTTP is for loopback addresses only (run the gateway on the same host, or set tls = true)",
                ));
            }
            if identity.is_empty() || identity.len() > 255 || identity.chars().any(char::is_control)
            {
                return Err(bad("forward_auth.identity", "must be 1 to 255 characters"));
            }
            if !authz.grant(Some(&identity)).has(Role::Check) {
                return Err(bad(
                    "forward_auth.identity",
                    "no [[callers]] rule gives this identity the \"check\" role",
                ));
            }
            Some(identity)
        }
    };
    let header = |field: &str, value: Option<String>, default: &str| {
        header_name(field, value.unwrap_or_else(|| default.to_owned()))
    };
    Ok(ForwardAuthSettings {
        listen,
        tls: f.tls,
        identity,
        method_header: header(
            "forward_auth.method_header",
            f.method_header,
            "X-Original-Method",
        )?,
        uri_header: header("forward_auth.uri_header", f.uri_header, "X-Original-URI")?,
        client_address_header: f
            .client_address_header
            .map(|h| header("forward_auth.client_address_header", Some(h), ""))
            .transpose()?,
        denial_body: f.denial_body.unwrap_or(true),
        auth_request_statuses: f.auth_request_statuses.unwrap_or(false),
    })
}

fn gateway_settings(
    g: GatewayFile,
    policies: &HashSet<String>,
) -> Result<GatewaySettings, Invalid> {
    let client_address = match (g.client_address.as_deref(), g.trusted_hops) {
        (None | Some("source"), None) => ClientAddressFrom::Source,
        (None | Some("source"), Some(_)) => {
            return Err(bad(
                "gateway.trusted_hops",
                "only applies with client_address = \"x-forwarded-for\"",
            ));
        }
        (Some("x-forwarded-for"), hops) => {
            let trusted_hops = hops.unwrap_or(1);
            if !(1..=16).contains(&trusted_hops) {
                return Err(bad("gateway.trusted_hops", "must be between 1 and 16"));
            }
            ClientAddressFrom::ForwardedFor { trusted_hops }
        }
        (Some(_), _) => {
            return Err(bad(
                "gateway.client_address",
                "must be \"source\" or \"x-forwarded-for\"",
            ));
        }
    };
    let mut routes = Vec::with_capacity(g.routes.len());
    for (i, r) in g.routes.into_iter().enumerate() {
        let field = format!("gateway.routes[{i}]");
        let route = Route::parse(&r.route).map_err(|e| bad(format!("{field}.route"), e))?;
        if r.limits.is_empty() || r.limits.len() > crate::model::MAX_REQUEST_LIMITS {
            return Err(bad(
                format!("{field}.limits"),
                format!("give 1 to {} limits", crate::model::MAX_REQUEST_LIMITS),
            ));
        }
        let mut limits = Vec::with_capacity(r.limits.len());
        for (j, l) in r.limits.into_iter().enumerate() {
            if !policies.contains(&l.policy) {
                return Err(bad(
                    format!("{field}.limits[{j}].policy"),
                    format!("{:?} is not a policy of [[policies]]", l.policy),
                ));
            }
            let per = match l.per.as_str() {
                "ip" => Per::Ip,
                "route" => Per::Route,
                _ => {
                    return Err(bad(
                        format!("{field}.limits[{j}].per"),
                        "must be \"ip\" or \"route\"",
                    ));
                }
            };
            limits.push(RouteLimit {
                policy: l.policy,
                per,
            });
        }
        routes.push((route, limits));
    }
    let route_override_headers = match g.route_override_headers {
        None => GatewaySettings::default().route_override_headers,
        Some(names) => {
            if names.len() > MAX_ROUTE_OVERRIDE_HEADERS {
                return Err(bad(
                    "gateway.route_override_headers",
                    format!("give at most {MAX_ROUTE_OVERRIDE_HEADERS} header names"),
                ));
            }
            names
                .into_iter()
                .enumerate()
                .map(|(i, name)| header_name(format!("gateway.route_override_headers[{i}]"), name))
                .collect::<Result<_, _>>()?
        }
    };
    Ok(GatewaySettings {
        client_address,
        routes,
        route_override_headers,
    })
}

/// Enough for every server's own header and a few of the operator's.
const MAX_ROUTE_OVERRIDE_HEADERS: usize = 32;

/// A header name from the config, lowercase, as the faces look it up.
fn header_name(field: impl std::fmt::Display, name: String) -> Result<String, Invalid> {
    match axum::http::HeaderName::from_bytes(name.as_bytes()) {
        Ok(_) => Ok(name.to_ascii_lowercase()),
        Err(_) => Err(bad(field, "must be an HTTP header name")),
    }
}

fn envoy_ratelimit_settings(
    e: EnvoyRateLimitFile,
    base: &Path,
) -> Result<EnvoyRateLimitSettings, Invalid> {
    if e.config.is_empty() {
        return Err(bad(
            "envoy_ratelimit.config",
            "give the envoyproxy/ratelimit YAML files or directories",
        ));
    }
    let paths: Vec<_> = e.config.iter().map(|p| base.join(p)).collect();
    let rules = crate::descriptors::DescriptorRules::load(&paths)
        .map_err(|err| bad("envoy_ratelimit.config", err))?;
    Ok(EnvoyRateLimitSettings {
        rules: std::sync::Arc::new(rules),
        shadow_mode: e.shadow_mode,
        response_headers: e.response_headers.unwrap_or(true),
    })
}

fn cluster_settings(
    c: ClusterFile,
    store: Option<&StoreSettings>,
    tls: Option<&TlsPaths>,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ClusterSettings, Invalid> {
    if store.is_none_or(|s| s.postgres_url.is_none()) {
        return Err(bad(
            "cluster",
            "needs a shared store: [store] postgres_url (or postgres_url_env) is the coordinator",
        ));
    }
    let node = match (c.node, c.node_env) {
        (Some(node), None) => node,
        (None, Some(var)) => env(&var).ok_or_else(|| {
            bad(
                "cluster.node_env",
                format!("the environment variable {var} is not set"),
            )
        })?,
        _ => return Err(bad("cluster.node", "give node or node_env (one of them)")),
    };
    if !is_valid_key_id(&node) {
        return Err(bad(
            "cluster.node",
            "must be 1 to 128 characters of [A-Za-z0-9_.:-]",
        ));
    }
    let advertise = c.advertise.replace("{node}", &node);
    let advertise_ok = advertise
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !advertise_ok || advertise.len() > 255 {
        return Err(bad("cluster.advertise", "must be host:port"));
    }
    let lease_ttl = c.lease_ttl.unwrap_or(Duration::from_secs(5));
    if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&lease_ttl) {
        return Err(bad("cluster.lease_ttl", "must be between 1s and 60s"));
    }
    let peer_tls = match (tls, c.cert, c.key) {
        (Some(tls), cert, key) => Some(PeerTls {
            cert: cert.map_or_else(|| tls.cert.clone(), |p| base.join(p)),
            key: key.map_or_else(|| tls.key.clone(), |p| base.join(p)),
            ca: tls.client_ca.clone(),
        }),
        (None, None, None) => None,
        (None, _, _) => {
            return Err(bad(
                "cluster.cert",
                "peer certificates need [tls]; without TLS peers are called in plaintext",
            ));
        }
    };
    Ok(ClusterSettings {
        node,
        advertise,
        lease_ttl,
        peer_tls,
    })
}

fn policies(specs: Vec<PolicySpec>) -> Result<Vec<Policy>, Invalid> {
    let mut policies = Vec::with_capacity(specs.len());
    let mut names = HashSet::new();
    for (i, p) in specs.into_iter().enumerate() {
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
    Ok(policies)
}

fn keys(
    files: Vec<KeyFile>,
    policies: &HashSet<String>,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<KeyConfig>, Invalid> {
    let mut keys = Vec::with_capacity(files.len());
    let mut ids = HashSet::new();
    for (i, k) in files.into_iter().enumerate() {
        let field = format!("keys[{i}]");
        let key = key(&field, k, policies, base, env)?;
        if !ids.insert(key.id.clone()) {
            return Err(bad(
                format!("{field}.id"),
                format!("duplicate key id {:?}", key.id),
            ));
        }
        keys.push(key);
    }
    Ok(keys)
}

fn authz(
    callers: Vec<CallerFile>,
    clients: Vec<ClientFile>,
    policies: &HashSet<String>,
    plaintext: bool,
) -> Result<Authz, Invalid> {
    let callers = callers
        .into_iter()
        .enumerate()
        .map(|(i, c)| caller(&format!("callers[{i}]"), c, policies))
        .collect::<Result<Vec<_>, _>>()?;
    if !plaintext && callers.is_empty() {
        return Err(bad(
            "callers",
            "none configured: add [[callers]] entries mapping client certificate identities to roles (no certificate is trusted by default)",
        ));
    }
    let clients = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let field = format!("clients[{i}]");
            let identity =
                Pattern::new(&c.identity).map_err(|m| bad(format!("{field}.identity"), m))?;
            Ok(ClientRule {
                identity,
                routes: routes(&field, &c.routes)?,
            })
        })
        .collect::<Result<Vec<_>, Invalid>>()?;
    Ok(Authz {
        callers,
        clients,
        plaintext,
    })
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
    if let Some(d) = f.denial_window {
        s.denial_window = d;
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

/// Turns a TOML error (a wrong type, an unknown variant or field, a
/// duration that does not parse) into the same one line as every other
/// config error: the field, what is wrong, and where.
fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> Invalid {
    let reason = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let at = span.start.min(text.len());
            let line_no = text[..at].matches('\n').count() + 1;
            Invalid(format!(
                "{}: {reason} ({} line {line_no})",
                field_at(text, at),
                path.display()
            ))
        }
        None => Invalid(format!("{}: {reason}", path.display())),
    }
}

/// The field a byte offset of a TOML text falls in, as config errors name
/// fields: `policies[1].algorithm`, `tls.min_version`, `listen`.
fn field_at(text: &str, offset: usize) -> String {
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    let mut section: Option<String> = None;
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for header in text[..line_start].lines().map(str::trim) {
        if let Some(name) = header.strip_prefix("[[").and_then(|r| r.strip_suffix("]]")) {
            let n = seen.entry(name).or_insert(0);
            section = Some(format!("{name}[{n}]"));
            *n += 1;
        } else if let Some(name) = header.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            section = Some(name.to_owned());
        }
    }
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty());
    match (section, key) {
        (Some(s), Some(k)) => format!("{s}.{k}"),
        (Some(s), None) => s,
        (None, Some(k)) => k.to_owned(),
        (None, None) => "config".to_owned(),
    }
}

fn tls_settings(t: TlsFile, base: &Path) -> Result<TlsPaths, Invalid> {
    let mut tls = TlsPaths::new(base.join(t.cert), base.join(t.key), base.join(t.client_ca));
    tls.crls = t.crls.into_iter().map(|p| base.join(p)).collect();
    tls.allow_tls12 = t.min_version == Some(TlsVersion::Tls12);
    tls.allow_cn_identity = t.allow_cn_identity;
    if let Some(d) = t.reload_interval {
        tls.reload_interval = d;
        if tls.reload_interval < Duration::from_millis(100) {
            return Err(bad("tls.reload_interval", "must be at least 100ms"));
        }
    }
    if let Some(d) = t.expiry_warning {
        tls.expiry_warning = d;
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
                format!("{r:?} is not one of \"check\", \"admin\", \"forward-identity\", \"peer\""),
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
    let past_skew = c.past_skew.unwrap_or(d.past_skew);
    if past_skew < Duration::from_secs(1) || past_skew > Duration::from_secs(3600) {
        return Err(bad("check.past_skew", "must be between 1s and 1h"));
    }
    let future_skew = c.future_skew.unwrap_or(d.future_skew);
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
    let failure_period = c.failure_period.unwrap_or(d.failure_period);
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
    let webhook_replay_window = c.webhook_replay_window.unwrap_or(d.webhook_replay_window);
    if webhook_replay_window < Duration::from_secs(60)
        || webhook_replay_window > Duration::from_secs(30 * 86_400)
    {
        return Err(bad(
            "check.webhook_replay_window",
            "must be between 1m and 30d",
        ));
    }
    Ok(CheckSettings {
        webhook_replay_window,
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
        let file: File =
            toml::from_str(text).map_err(|e| parse_error(Path::new("warden.toml"), text, &e))?;
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
    fn route_override_headers_are_refused_unless_the_operator_says_otherwise() {
        let default = parse(TLS).unwrap();
        assert!(
            default
                .gateway
                .route_override_headers
                .iter()
                .any(|h| h == "script_name")
        );
        let own = parse(&format!(
            "{TLS}[gateway]\nroute_override_headers = [\"X-Original-URL\"]\n"
        ))
        .unwrap();
        assert_eq!(own.gateway.route_override_headers, ["x-original-url"]);
        let none = parse(&format!("{TLS}[gateway]\nroute_override_headers = []\n")).unwrap();
        assert!(none.gateway.route_override_headers.is_empty());
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
                format!("{TLS}[check]\nfailure_period = \"soon\"\n"),
                "check.failure_period",
            ),
            (
                format!(
                    "{TLS}[[policies]]\nname = \"a\"\nlimit = 1\nperiod = \"1s\"\n[[policies]]\nname = \"b\"\nlimit = 1\nperiod = \"1s\"\nburst = \"many\"\n"
                ),
                "policies[1].burst",
            ),
            (
                "listen = \"10.0.0.1:1\"\ninsecure_plaintext = true\n".to_owned(),
                "insecure_plaintext",
            ),
            (
                format!("{TLS}[gateway]\nclient_address = \"header\"\n"),
                "gateway.client_address",
            ),
            (
                format!("{TLS}[gateway]\ntrusted_hops = 2\n"),
                "gateway.trusted_hops",
            ),
            (
                format!("{TLS}[gateway]\nclient_address = \"x-forwarded-for\"\ntrusted_hops = 0\n"),
                "gateway.trusted_hops",
            ),
            (
                format!("{TLS}[[gateway.routes]]\nroute = \"/login\"\nlimits = []\n"),
                "gateway.routes[0].route",
            ),
            (
                format!(
                    "{TLS}[gateway]\nroute_override_headers = [\"X-Original-URL\", \"bad name\"]\n"
                ),
                "gateway.route_override_headers[1]",
            ),
            (
                format!(
                    "{TLS}[[gateway.routes]]\nroute = \"POST /login\"\nlimits = [{{ policy = \"nope\", per = \"ip\" }}]\n"
                ),
                "gateway.routes[0].limits[0].policy",
            ),
            (
                format!(
                    "{TLS}[[policies]]\nname = \"p\"\nlimit = 1\nperiod = \"1s\"\n[[gateway.routes]]\nroute = \"POST /login\"\nlimits = [{{ policy = \"p\", per = \"user\" }}]\n"
                ),
                "gateway.routes[0].limits[0].per",
            ),
            (
                format!("{TLS}[envoy_ratelimit]\nconfig = [\"/nonexistent/ratelimit.yaml\"]\n"),
                "envoy_ratelimit.config",
            ),
            (
                "insecure_plaintext = true\n[forward_auth]\nlisten = \"127.0.0.1:1\"\ntls = true\n"
                    .to_owned(),
                "forward_auth.tls",
            ),
            (
                format!(
                    "{TLS}[forward_auth]\nlisten = \"0.0.0.0:1\"\ntls = true\nidentity = \"x\"\n"
                ),
                "forward_auth.identity",
            ),
            (
                format!(
                    "{TLS}[forward_auth]\nlisten = \"0.0.0.0:1\"\nidentity = \"spiffe://t/gw\"\n"
                ),
                "forward_auth.listen",
            ),
            (
                format!("{TLS}[server]\nrequest_read_timeout = \"50ms\"\n"),
                "server.request_read_timeout",
            ),
            (
                // Below the largest message accepted (tonic's 4 MiB): a
                // request that size could never be waited for.
                format!("{TLS}[server]\nmax_waiting_request_bytes = 4194303\n"),
                "server.max_waiting_request_bytes",
            ),
            (
                // Below the largest check with a 16 MiB body.
                format!(
                    "{TLS}[check]\nmax_body_bytes = 16777216\n[server]\nmax_waiting_request_bytes = 16777216\n"
                ),
                "server.max_waiting_request_bytes",
            ),
            (
                format!("{TLS}[server]\nmax_denial_log_lines = 1000001\n"),
                "server.max_denial_log_lines",
            ),
        ];
        for (text, field) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.starts_with(field), "{err:?} should name {field}");
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }

    #[test]
    fn denial_log_lines_are_a_thousand_a_second_unless_set_and_zero_logs_none() {
        assert_eq!(parse(TLS).unwrap().server.max_denial_log_lines, 1000);
        assert_eq!(ServerSettings::default().max_denial_log_lines, 1000);
        let none = parse(&format!("{TLS}[server]\nmax_denial_log_lines = 0\n")).unwrap();
        assert_eq!(none.server.max_denial_log_lines, 0);
    }

    /// The memory bound on requests being waited for grows with the largest
    /// message by default, so that raising `max_body_bytes` never makes a
    /// large body unacceptable; one given is used as it is.
    #[test]
    fn the_waiting_request_bound_holds_the_largest_message() {
        let default = parse(TLS).unwrap();
        let largest = default.check.largest_message();
        assert_eq!(largest, 4 * 1024 * 1024);
        assert_eq!(default.server.max_waiting_request_bytes, 64 << 20);
        assert_eq!(
            ServerSettings::default().max_waiting_request_bytes,
            64 << 20
        );
        assert_eq!(default.server.request_read_timeout, Duration::from_secs(10));
        let big = parse(&format!("{TLS}[check]\nmax_body_bytes = 67108864\n")).unwrap();
        let largest = big.check.largest_message();
        assert_eq!(largest, (64 << 20) + 64 * 1024);
        assert_eq!(big.server.max_waiting_request_bytes, 4 * largest);
        let given = parse(&format!(
            "{TLS}[server]\nmax_waiting_request_bytes = 4194304\n"
        ))
        .unwrap();
        assert_eq!(given.server.max_waiting_request_bytes, 4 << 20);
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
        use crate::model::parse_duration;
        assert_eq!(
            parse_duration("f", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(parse_duration("f", "2m").unwrap(), Duration::from_secs(120));
        assert_eq!(
            parse_duration("f", "1h 30m").unwrap(),
            Duration::from_secs(5400)
        );
        assert!(parse_duration("f", "soon").is_err());
        assert!(parse_duration("f", "").is_err());
        let file: File = toml::from_str("[check]\nfailure_period = \"90s\"\n").unwrap();
        assert_eq!(file.check.failure_period, Some(Duration::from_secs(90)));
    }
}

#[cfg(test)]
mod deploy_tests {
    use super::*;

    /// The config shipped with the Kubernetes manifests must stay valid.
    #[test]
    fn the_kubernetes_config_is_valid() {
        let text = include_str!("../../deploy/kubernetes/warden.toml");
        let file: File = toml::from_str(text).unwrap();
        let config = Config::from_file(file, Path::new("/"), &|_| Some("s".repeat(40))).unwrap();
        assert_eq!(config.server.metrics_listen.unwrap().port(), 9464);
        assert_eq!(config.authz.callers.len(), 2);
    }

    /// So must the three-node cluster's, with each pod's own name.
    #[test]
    fn the_kubernetes_cluster_config_is_valid() {
        let text = include_str!("../../deploy/kubernetes/cluster/warden.toml");
        let file: File = toml::from_str(text).unwrap();
        let env = |name: &str| match name {
            "POD_NAME" => Some("warden-1".to_owned()),
            "WARDEN_STORE_URL" => Some("postgres://warden@warden-postgres/warden".to_owned()),
            _ => Some("s".repeat(40)),
        };
        let config = Config::from_file(file, Path::new("/"), &env).unwrap();
        let cluster = config.cluster.unwrap();
        assert_eq!(cluster.node, "warden-1");
        assert_eq!(
            cluster.advertise,
            "warden-1.warden-peers.warden.svc.cluster.local:50051"
        );
        assert!(cluster.peer_tls.unwrap().cert.ends_with("peer.crt"));
        assert!(config.authz.callers.len() >= 3);
    }
}
