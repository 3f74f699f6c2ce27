//! warden's vocabulary: the value types every other module speaks in —
//! secrets, identity patterns, policies, key ids and names, and the keys
//! made of them — with their validation. It imports nothing of warden's but
//! the engine's limit algorithms and [`crate::route`], so that config,
//! keys, auth and store can all build on it without importing one another.

use std::fmt;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use crate::engine::{Gcra, Limit, Window, WindowKind, clock::duration_nanos};
use crate::route::Route;

/// A value that failed validation, phrased for the operator: the field and
/// what is wrong with it, e.g. `policies[1].limit: must be at least 1`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

pub fn bad(field: impl fmt::Display, msg: impl fmt::Display) -> Invalid {
    Invalid(format!("{field}: {msg}"))
}

/// Bounds that keep a policy from asking for absurd state.
pub const MAX_POLICY_LIMIT: u64 = u32::MAX as u64;
/// Request limits one check may carry (`CheckRequest.limits`, or what a
/// gateway route adds).
pub const MAX_REQUEST_LIMITS: usize = 8;
pub const MAX_NAME_LEN: usize = 64;
/// Bound of every entry cap: 1e9 entries is ~40 GB of state.
pub const MAX_ENTRIES: u64 = 1_000_000_000;

/// An HMAC secret. Its bytes never appear in `Debug` output, logs or errors.
///
/// It keeps HMAC's keyed start state (the inner and outer pads already
/// hashed) beside the bytes: every signed check verifies against it, and
/// keying HMAC anew was two of the five SHA-256 blocks a short message costs.
#[derive(Clone)]
pub struct Secret {
    bytes: Vec<u8>,
    keyed: Hmac<Sha256>,
}

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        let keyed =
            <Hmac<Sha256> as Mac>::new_from_slice(&bytes).expect("HMAC takes any key length");
        Self { bytes, keyed }
    }

    pub fn expose(&self) -> &[u8] {
        &self.bytes
    }

    /// HMAC-SHA256 of `message` under this secret.
    pub fn hmac(&self, message: &[u8]) -> [u8; 32] {
        let mut mac = self.keyed.clone();
        mac.update(message);
        mac.finalize().into_bytes().into()
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Key ids: 1 to 128 characters of `[A-Za-z0-9_.:-]`.
pub fn is_valid_key_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// What kind of name a caller's certificate identity is. The identity text
/// says it unambiguously (see [`crate::tls::identity`]): a SPIFFE ID starts
/// with `spiffe://`, a common name is written `CN=<name>`, and a DNS name
/// can contain neither `:` nor `=`. A caller rule matches only identities of
/// its own kind, so no certificate can pass as a name of another kind (a
/// DNS SAN spelled like a SPIFFE ID, or a CN spelled like a DNS name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityKind {
    Spiffe,
    Dns,
    CommonName,
}

impl IdentityKind {
    pub fn of(identity: &str) -> Self {
        if identity.starts_with("spiffe://") {
            IdentityKind::Spiffe
        } else if identity.starts_with("CN=") {
            IdentityKind::CommonName
        } else {
            IdentityKind::Dns
        }
    }
}

/// An identity pattern: exact, or with `*` standing for any run of
/// characters other than `/` (one SPIFFE path segment, or any DNS labels).
/// Patterns for callers are of one [`IdentityKind`]; patterns for forwarded
/// end-client identities (free-form text from the gateway) have none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    kind: Option<IdentityKind>,
}

impl Pattern {
    /// A pattern for forwarded end-client identities (any text).
    pub fn new(text: &str) -> Result<Self, String> {
        if text.is_empty() || text.len() > 1024 || text.chars().any(char::is_control) {
            return Err("must be 1 to 1024 characters without control characters".into());
        }
        Ok(Self {
            text: text.to_owned(),
            kind: None,
        })
    }

    /// A pattern for calling certificates: a SPIFFE ID, a DNS name or
    /// `CN=<common name>`, each possibly with `*`.
    pub fn caller(text: &str) -> Result<Self, String> {
        const WHAT: &str = "must be a SPIFFE ID (spiffe://...), a DNS name, or CN=<common name>; * stands for one segment";
        let mut pattern = Self::new(text).map_err(|_| WHAT.to_owned())?;
        let kind = IdentityKind::of(text);
        let valid = match kind {
            IdentityKind::Spiffe => text["spiffe://".len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._/*".contains(&b)),
            IdentityKind::CommonName => text.len() > "CN=".len(),
            IdentityKind::Dns => text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.*".contains(&b)),
        };
        if !valid || text == "spiffe://" {
            return Err(WHAT.to_owned());
        }
        if kind == IdentityKind::Dns {
            // DNS names are case-insensitive; identities are lowercased.
            pattern.text.make_ascii_lowercase();
        }
        pattern.kind = Some(kind);
        Ok(pattern)
    }

    pub fn matches(&self, identity: &str) -> bool {
        self.kind.is_none_or(|k| k == IdentityKind::of(identity))
            && glob(self.text.as_bytes(), identity.as_bytes())
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Anchored glob match where `*` matches any bytes except `/`.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => {
            // Try every split point up to the next '/'.
            let limit = text.iter().position(|&b| b == b'/').unwrap_or(text.len());
            (0..=limit).any(|i| glob(rest, &text[i..]))
        }
        Some((&p, rest)) => text.first() == Some(&p) && glob(rest, &text[1..]),
    }
}

/// A named rate limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub limit: Limit,
    pub period: Duration,
    /// Cap on the descriptors tracked for this policy as a request limit.
    pub max_entries: Option<usize>,
    /// This policy's item of the `RateLimit-Policy` header, which only the
    /// policy decides: written once by [`Policy::new`], not formatted on
    /// every check. Derived from the fields above, so a policy is never
    /// changed after it is made (nothing does; a changed policy is a new
    /// one, made when the key ring is rebuilt).
    quota_item: String,
}

impl Policy {
    pub fn new(name: String, limit: Limit, period: Duration, max_entries: Option<usize>) -> Self {
        let quota_item = format!("\"{name}\";q={};w={}", limit.limit(), period.as_secs());
        Self {
            name,
            limit,
            period,
            max_entries,
            quota_item,
        }
    }

    /// `"name";q=<limit>;w=<period in seconds>` (IETF httpapi
    /// ratelimit-headers draft).
    pub fn quota_item(&self) -> &str {
        &self.quota_item
    }
}

/// One key as configured, secrets resolved.
#[derive(Clone, Debug)]
pub struct KeyConfig {
    pub id: String,
    pub owner: String,
    pub scopes: Vec<String>,
    pub policies: Vec<String>,
    pub secrets: Vec<Secret>,
    pub routes: Vec<Route>,
    pub bound_identities: Vec<Pattern>,
    pub revoked: bool,
}

/// How a policy counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Generic cell rate: a bucket of `burst` that refills evenly.
    #[default]
    Gcra,
    /// The current and the previous window, weighted: no burst at the edge.
    SlidingWindow,
    /// Calendar-aligned windows of `period`.
    FixedWindow,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Gcra => "gcra",
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::FixedWindow => "fixed_window",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Self::Gcra, Self::SlidingWindow, Self::FixedWindow]
            .into_iter()
            .find(|a| a.name() == text)
    }
}

/// A policy as people write it: in the config file (`[[policies]]`), through
/// the admin API, and as the store keeps it. [`policy`] validates it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    pub name: String,
    /// "gcra" (default), "sliding_window" or "fixed_window".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<Algorithm>,
    /// Requests allowed per period.
    pub limit: u64,
    /// e.g. "1s", "500ms", "1m", "1h".
    pub period: String,
    /// GCRA only: requests allowed at once. Default `limit`.
    pub burst: Option<u64>,
    /// Most descriptors this policy tracks at once as a request limit (see
    /// "Bounded state" in README). Default: only the global
    /// `check.max_limit_entries` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_entries: Option<u64>,
}

/// Validates one policy (from the config file, the admin API or the
/// store); errors name `field`.
pub fn policy(field: &str, p: PolicySpec) -> Result<Policy, Invalid> {
    if !is_valid_name(&p.name) {
        return Err(bad(
            format!("{field}.name"),
            format!("must be 1 to {MAX_NAME_LEN} characters of [A-Za-z0-9_.-]"),
        ));
    }
    if p.limit == 0 || p.limit > MAX_POLICY_LIMIT {
        return Err(bad(
            format!("{field}.limit"),
            format!("must be between 1 and {MAX_POLICY_LIMIT}"),
        ));
    }
    let period = parse_duration(&format!("{field}.period"), &p.period)?;
    if period < Duration::from_millis(1) || period > Duration::from_secs(366 * 24 * 3600) {
        return Err(bad(
            format!("{field}.period"),
            "must be between 1ms and 366 days",
        ));
    }
    let period_ns = duration_nanos(period);
    let limit = match p.algorithm.unwrap_or_default() {
        Algorithm::Gcra => {
            let burst = p.burst.unwrap_or(p.limit);
            if burst == 0 || burst > MAX_POLICY_LIMIT {
                return Err(bad(
                    format!("{field}.burst"),
                    format!("must be between 1 and {MAX_POLICY_LIMIT}"),
                ));
            }
            Limit::Gcra(Gcra::new(p.limit, period_ns, burst))
        }
        window => {
            if p.burst.is_some() {
                return Err(bad(
                    format!("{field}.burst"),
                    "only applies to algorithm \"gcra\"",
                ));
            }
            let kind = if window == Algorithm::FixedWindow {
                WindowKind::Fixed
            } else {
                WindowKind::Sliding
            };
            Limit::Window(Window::new(kind, p.limit, period_ns))
        }
    };
    let max_entries = match p.max_entries {
        None => None,
        Some(n) if (1..=MAX_ENTRIES).contains(&n) => Some(n as usize),
        Some(_) => {
            return Err(bad(
                format!("{field}.max_entries"),
                format!("must be between 1 and {MAX_ENTRIES}"),
            ));
        }
    };
    Ok(Policy::new(p.name, limit, period, max_entries))
}

/// Policy and descriptor names: short, printable, unambiguous in headers.
pub fn is_valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Parses a duration as people write it: "250ms", "30s", "5m", "1h", "7d",
/// or combinations like "1h 30m" (humantime's syntax, as in the config
/// file).
pub fn parse_duration(field: &str, text: &str) -> Result<Duration, Invalid> {
    humantime::parse_duration(text.trim()).map_err(|_| {
        bad(
            field,
            format!("{text:?} is not a duration like \"500ms\", \"30s\", \"5m\", \"1h\" or \"7d\""),
        )
    })
}
