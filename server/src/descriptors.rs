//! Rate limits by descriptor, in envoyproxy/ratelimit's configuration
//! format, so that teams on envoyproxy/ratelimit move to warden with their
//! YAML files and their Envoy config unchanged.
//!
//! A file names a `domain` and a tree of descriptors; a request's
//! descriptor (a list of key/value entries) is walked down the tree, one
//! level per entry, and the limit at the node its last entry reaches
//! applies. At each level an entry matches, in this order: a node with its
//! key and exact value, a node whose value has `*` wildcards, a node with
//! its key and no value (then every value has a counter of its own). This
//! is envoyproxy/ratelimit's matching (`src/config/config_impl.go`).
//!
//! Counting is envoyproxy/ratelimit's too: fixed windows of one unit,
//! aligned to the Unix epoch (a month is 30 days, a year 365), one counter
//! per distinct descriptor (or per wildcard pattern with
//! `share_threshold`). What differs is warden's: the descriptors of one
//! request are decided together, and a request denied by one limit takes
//! nothing from the others.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::engine::clock::duration_nanos;
use crate::engine::{Limit, Window, WindowKind};
use crate::model::{Invalid, MAX_POLICY_LIMIT};

/// Bounds of a request's descriptors, so a request cannot ask for unbounded
/// work or state ids of any size.
pub const MAX_DESCRIPTORS: usize = 16;
pub const MAX_ENTRIES: usize = 16;
pub const MAX_ENTRY_BYTES: usize = 256;
/// Bound of a configuration tree: files are the operator's, but a typo
/// should fail at start, not grow without bound.
const MAX_DEPTH: usize = 16;

/// A time unit of `rate_limit.unit`, numbered as in
/// `envoy.service.ratelimit.v3.RateLimitResponse.RateLimit.Unit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Second = 1,
    Minute = 2,
    Hour = 3,
    Day = 4,
    Month = 5,
    Year = 6,
    Week = 7,
}

impl Unit {
    fn parse(text: &str) -> Option<Self> {
        Some(match text.to_ascii_lowercase().as_str() {
            "second" => Unit::Second,
            "minute" => Unit::Minute,
            "hour" => Unit::Hour,
            "day" => Unit::Day,
            "week" => Unit::Week,
            "month" => Unit::Month,
            "year" => Unit::Year,
            _ => return None,
        })
    }

    /// The window length, as envoyproxy/ratelimit's `UnitToDivider`.
    pub fn period(self) -> Duration {
        Duration::from_secs(match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3600,
            Unit::Day => 86_400,
            Unit::Week => 7 * 86_400,
            Unit::Month => 30 * 86_400,
            Unit::Year => 365 * 86_400,
        })
    }
}

/// What a configured `rate_limit` does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Quota {
    /// `unlimited: true`: never limited, nothing counted.
    Unlimited,
    /// `requests_per_unit: 0`: every request is over the limit.
    Blocked,
    /// A fixed window of one unit.
    Limited(Limit),
}

/// One configured limit: a node of the tree with a `rate_limit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The state pool its counters live in: a name derived from its place
    /// in the tree, the same on every node of a cluster that loads the same
    /// rule, whatever else the files hold.
    pub policy: String,
    pub quota: Quota,
    pub unit: Unit,
    pub requests_per_unit: u32,
    /// Counted and reported, but never the reason for OVER_LIMIT.
    pub shadow_mode: bool,
    /// One of a request's alternatives: the request is over the limit only
    /// when every quota-mode limit it names is (envoyproxy/ratelimit's
    /// `quota_mode`).
    pub quota_mode: bool,
    /// `rate_limit.name`, for `replaces`.
    pub name: Option<String>,
    /// Names of limits this one replaces when both apply to a request.
    pub replaces: Vec<String>,
    /// Where the tree path is written for people: "domain.key_value.key".
    pub path: String,
}

/// A request's descriptor matched to a rule: the rule and the counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matched {
    pub rule: Arc<Rule>,
    /// What the counter counts: the descriptor's entries, with a shared
    /// wildcard pattern in place of a value under `share_threshold`.
    pub counter: String,
}

/// Every domain's descriptor tree.
#[derive(Debug, Default)]
pub struct DescriptorRules {
    domains: HashMap<String, Node>,
}

#[derive(Debug, Default)]
struct Node {
    /// By "key_value", or "key" for a node without a value.
    children: HashMap<String, Node>,
    /// "key_value" patterns containing `*`, in file order, split at `*`.
    wildcards: Vec<(String, Vec<String>)>,
    rule: Option<Arc<Rule>>,
    /// `share_threshold`: the pattern's value counts for every match.
    share_value: Option<String>,
}

impl DescriptorRules {
    /// Reads every YAML file of `paths` (a directory: its `*.yaml` and
    /// `*.yml` files in name order). Errors name the file.
    pub fn load(paths: &[PathBuf]) -> Result<Self, Invalid> {
        let mut files = Vec::new();
        for path in paths {
            if path.is_dir() {
                let mut inside: Vec<PathBuf> = std::fs::read_dir(path)
                    .map_err(|e| Invalid(format!("cannot read {}: {e}", path.display())))?
                    .filter_map(|entry| entry.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.extension()
                            .is_some_and(|ext| ext == "yaml" || ext == "yml")
                    })
                    .collect();
                inside.sort();
                files.extend(inside);
            } else {
                files.push(path.clone());
            }
        }
        let mut rules = Self::default();
        for file in files {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| Invalid(format!("cannot read {}: {e}", file.display())))?;
            rules
                .add_yaml(&text)
                .map_err(|e| Invalid(format!("{}: {}", file.display(), e.0)))?;
        }
        Ok(rules)
    }

    /// Adds one file's domain. A domain may be defined once.
    pub fn add_yaml(&mut self, text: &str) -> Result<(), Invalid> {
        let root: YamlRoot = serde_norway::from_str(text).map_err(|e| Invalid(e.to_string()))?;
        if root.domain.is_empty() {
            return Err(Invalid("config file cannot have empty domain".into()));
        }
        if self.domains.contains_key(&root.domain) {
            return Err(Invalid(format!(
                "duplicate domain '{}' in config file",
                root.domain
            )));
        }
        let mut node = Node::default();
        load_descriptors(&mut node, &root.domain, &root.domain, &root.descriptors, 1)?;
        self.domains.insert(root.domain, node);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    /// Every rule, for registering their pools.
    pub fn rules(&self) -> Vec<Arc<Rule>> {
        fn walk(node: &Node, out: &mut Vec<Arc<Rule>>) {
            out.extend(node.rule.clone());
            for child in node.children.values() {
                walk(child, out);
            }
        }
        let mut out = Vec::new();
        for node in self.domains.values() {
            walk(node, &mut out);
        }
        out
    }

    /// The rule for one descriptor of `domain`, if any applies: only when
    /// the node its last entry reaches has a `rate_limit`.
    pub fn find(&self, domain: &str, entries: &[(&str, &str)]) -> Option<Matched> {
        let mut node = self.domains.get(domain)?;
        let mut counter = String::new();
        for (i, &(key, value)) in entries.iter().enumerate() {
            let exact = format!("{key}_{value}");
            let (next, counted) = match node.children.get(&exact) {
                Some(n) => (n, value.to_owned()),
                None => match node
                    .wildcards
                    .iter()
                    .find(|(_, parts)| wildcard_match(parts, &exact))
                {
                    Some((pattern, _)) => {
                        let n = &node.children[pattern];
                        (n, n.share_value.clone().unwrap_or_else(|| value.to_owned()))
                    }
                    None => (node.children.get(key)?, value.to_owned()),
                },
            };
            if i > 0 {
                counter.push('\n');
            }
            // Lengths first, so no choice of keys and values can make two
            // different descriptors one counter.
            let _ = write!(counter, "{}:{key}{}:{counted}", key.len(), counted.len());
            if i + 1 == entries.len() {
                return next.rule.clone().map(|rule| Matched { rule, counter });
            }
            if next.children.is_empty() {
                // The request's descriptor is deeper than the tree.
                return None;
            }
            node = next;
        }
        None
    }
}

/// envoyproxy/ratelimit's `wildcardMatch`: `parts` is the pattern split at
/// `*`; every part must appear in order, the first as a prefix, the last as
/// a suffix.
fn wildcard_match(parts: &[String], value: &str) -> bool {
    let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
        return false;
    };
    if parts.len() == 1 {
        return first == value;
    }
    if !value.starts_with(first.as_str()) || !value.ends_with(last.as_str()) {
        return false;
    }
    if value.len() < parts.iter().map(String::len).sum() {
        return false;
    }
    let mut rest = &value[first.len()..value.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part.as_str()) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

fn load_descriptors(
    parent: &mut Node,
    domain: &str,
    path: &str,
    descriptors: &[YamlDescriptor],
    depth: usize,
) -> Result<(), Invalid> {
    if depth > MAX_DEPTH {
        return Err(Invalid(format!(
            "{path}: descriptors nest deeper than {MAX_DEPTH}"
        )));
    }
    for d in descriptors {
        if d.key.is_empty() {
            return Err(Invalid("descriptor has empty key".into()));
        }
        let value = d.value.as_ref().map(Scalar::text).unwrap_or_default();
        let final_key = if value.is_empty() {
            d.key.clone()
        } else {
            format!("{}_{value}", d.key)
        };
        let here = format!("{path}.{final_key}");
        if parent.children.contains_key(&final_key) {
            return Err(Invalid(format!(
                "duplicate descriptor composite key '{here}'"
            )));
        }
        let rule = d
            .rate_limit
            .as_ref()
            .map(|r| rule(domain, &here, r, d.shadow_mode, d.quota_mode))
            .transpose()?;
        if d.share_threshold && !final_key.contains('*') {
            return Err(Invalid(format!(
                "share_threshold can only be used with wildcard values (containing '*'), but found key '{final_key}'"
            )));
        }
        let mut node = Node {
            rule: rule.map(Arc::new),
            share_value: d.share_threshold.then(|| value.clone()),
            ..Node::default()
        };
        if final_key.contains('*') {
            parent.wildcards.push((
                final_key.clone(),
                final_key.split('*').map(str::to_owned).collect(),
            ));
        }
        load_descriptors(&mut node, domain, &here, &d.descriptors, depth + 1)?;
        parent.children.insert(final_key, node);
    }
    Ok(())
}

fn rule(
    domain: &str,
    path: &str,
    r: &YamlRateLimit,
    shadow_mode: bool,
    quota_mode: bool,
) -> Result<Rule, Invalid> {
    let unit = r.unit.as_deref().and_then(Unit::parse);
    let unit = match (r.unlimited, unit, r.unit.as_deref()) {
        (true, Some(_), _) => {
            return Err(Invalid(format!(
                "{path}: should not specify rate limit unit when unlimited"
            )));
        }
        (true, None, _) => Unit::Second,
        (false, Some(unit), _) => unit,
        (false, None, text) => {
            return Err(Invalid(format!(
                "{path}: invalid rate limit unit '{}'",
                text.unwrap_or_default()
            )));
        }
    };
    for replaced in &r.replaces {
        if replaced.name.is_empty() {
            return Err(Invalid(format!(
                "{path}: should not have an empty replaces entry"
            )));
        }
        if Some(&replaced.name) == r.name.as_ref() {
            return Err(Invalid(format!(
                "{path}: replaces should not contain name of same descriptor"
            )));
        }
    }
    let quota = if r.unlimited {
        Quota::Unlimited
    } else if r.requests_per_unit == 0 {
        Quota::Blocked
    } else {
        Quota::Limited(Limit::Window(Window::new(
            WindowKind::Fixed,
            u64::from(r.requests_per_unit).min(MAX_POLICY_LIMIT),
            duration_nanos(unit.period()),
        )))
    };
    let digest = Sha256::digest(format!("{domain}\n{path}").as_bytes());
    Ok(Rule {
        policy: format!("rls-{}", hex::encode(&digest[..8])),
        quota,
        unit,
        requests_per_unit: r.requests_per_unit,
        shadow_mode,
        quota_mode,
        name: r.name.clone().filter(|n| !n.is_empty()),
        replaces: r.replaces.iter().map(|x| x.name.clone()).collect(),
        path: path.to_owned(),
    })
}

/// A file as envoyproxy/ratelimit reads it (its `YamlRoot`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlRoot {
    #[serde(default)]
    domain: String,
    #[serde(default)]
    descriptors: Vec<YamlDescriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlDescriptor {
    #[serde(default)]
    key: String,
    value: Option<Scalar>,
    rate_limit: Option<YamlRateLimit>,
    #[serde(default)]
    descriptors: Vec<YamlDescriptor>,
    #[serde(default)]
    shadow_mode: bool,
    #[serde(default)]
    quota_mode: bool,
    /// Statistics naming in envoyproxy/ratelimit; warden's metrics do not
    /// carry descriptor values, so these change nothing here.
    #[serde(default)]
    #[allow(dead_code)]
    detailed_metric: bool,
    #[serde(default)]
    #[allow(dead_code)]
    value_to_metric: bool,
    #[serde(default)]
    share_threshold: bool,
    /// Dynamic metadata in envoyproxy/ratelimit; accepted and not sent.
    #[allow(dead_code)]
    metadata: Option<serde_norway::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlRateLimit {
    #[serde(default)]
    requests_per_unit: u32,
    unit: Option<String>,
    #[serde(default)]
    unlimited: bool,
    name: Option<String>,
    #[serde(default)]
    replaces: Vec<YamlReplaces>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlReplaces {
    name: String,
}

/// A descriptor value as YAML may write it (`value: 500` is the text
/// "500", as in envoyproxy/ratelimit's Go YAML decoding).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Integer(i64),
    Bool(bool),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Scalar::Text(s) => s.clone(),
            Scalar::Integer(i) => i.to_string(),
            Scalar::Bool(b) => b.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(yaml: &str) -> DescriptorRules {
        let mut r = DescriptorRules::default();
        r.add_yaml(yaml).expect("valid config");
        r
    }

    fn limit_of(m: &Option<Matched>) -> Option<u32> {
        m.as_ref().map(|m| m.rule.requests_per_unit)
    }

    #[test]
    fn a_value_node_wins_over_a_key_node_and_a_key_node_takes_any_value() {
        let r = rules(
            r#"
domain: mongo_cps
descriptors:
  - key: database
    value: users
    rate_limit: { unit: second, requests_per_unit: 500 }
  - key: database
    rate_limit: { unit: second, requests_per_unit: 50 }
"#,
        );
        assert_eq!(
            limit_of(&r.find("mongo_cps", &[("database", "users")])),
            Some(500)
        );
        let other = r.find("mongo_cps", &[("database", "orders")]);
        assert_eq!(limit_of(&other), Some(50));
        let another = r.find("mongo_cps", &[("database", "carts")]);
        assert_ne!(other.unwrap().counter, another.unwrap().counter);
        assert_eq!(r.find("other_domain", &[("database", "users")]), None);
    }

    #[test]
    fn a_limit_applies_only_where_the_last_entry_lands() {
        let r = rules(
            r#"
domain: edge
descriptors:
  - key: remote_address
    rate_limit: { unit: minute, requests_per_unit: 10 }
    descriptors:
      - key: path
        value: /login
        rate_limit: { unit: minute, requests_per_unit: 2 }
  - key: tenant
    descriptors:
      - key: plan
        value: free
        rate_limit: { unit: hour, requests_per_unit: 100 }
"#,
        );
        assert_eq!(
            limit_of(&r.find("edge", &[("remote_address", "1.2.3.4")])),
            Some(10)
        );
        assert_eq!(
            limit_of(&r.find("edge", &[("remote_address", "1.2.3.4"), ("path", "/login")])),
            Some(2)
        );
        // Deeper than the tree, a level without a limit, an unknown value.
        assert_eq!(
            r.find(
                "edge",
                &[("remote_address", "1"), ("path", "/login"), ("x", "y")]
            ),
            None
        );
        assert_eq!(r.find("edge", &[("tenant", "acme")]), None);
        assert_eq!(
            limit_of(&r.find("edge", &[("tenant", "acme"), ("plan", "free")])),
            Some(100)
        );
        assert_eq!(
            r.find("edge", &[("tenant", "acme"), ("plan", "paid")]),
            None
        );
    }

    #[test]
    fn wildcards_match_in_order_and_share_threshold_shares_one_counter() {
        let r = rules(
            r#"
domain: api
descriptors:
  - key: path
    value: /v1/*/items
    rate_limit: { unit: minute, requests_per_unit: 5 }
  - key: path
    value: /shared/*
    share_threshold: true
    rate_limit: { unit: minute, requests_per_unit: 7 }
"#,
        );
        let a = r.find("api", &[("path", "/v1/a/items")]);
        let b = r.find("api", &[("path", "/v1/b/items")]);
        assert_eq!(limit_of(&a), Some(5));
        assert_ne!(a.unwrap().counter, b.unwrap().counter);
        assert_eq!(r.find("api", &[("path", "/v1/a/other")]), None);
        let s1 = r.find("api", &[("path", "/shared/x")]).unwrap();
        let s2 = r.find("api", &[("path", "/shared/y")]).unwrap();
        assert_eq!(s1.counter, s2.counter);
    }

    #[test]
    fn counters_of_different_descriptors_never_coincide() {
        let r = rules(
            r#"
domain: d
descriptors:
  - key: a
    descriptors:
      - key: b
        rate_limit: { unit: second, requests_per_unit: 1 }
"#,
        );
        let x = r.find("d", &[("a", "1\n1:b1:2"), ("b", "3")]).unwrap();
        let y = r.find("d", &[("a", "1"), ("b", "2\n1:b1:3")]).unwrap();
        assert_ne!(x.counter, y.counter);
    }

    #[test]
    fn the_file_errors_envoyproxy_ratelimit_refuses_are_refused() {
        for (yaml, says) in [
            ("descriptors: []", "empty domain"),
            (
                "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: fortnight, requests_per_unit: 1 }",
                "invalid rate limit unit",
            ),
            (
                "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: second, unlimited: true }",
                "unlimited",
            ),
            (
                "domain: d\ndescriptors:\n  - key: a\n  - key: a",
                "duplicate descriptor",
            ),
            ("domain: d\ndescriptors:\n  - value: x", "empty key"),
            (
                "domain: d\ndescriptors:\n  - key: a\n    ke: b",
                "unknown field",
            ),
            (
                "domain: d\ndescriptors:\n  - key: a\n    share_threshold: true",
                "share_threshold",
            ),
            (
                "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { name: n, replaces: [{name: n}], unit: second, requests_per_unit: 1 }",
                "same descriptor",
            ),
        ] {
            let mut r = DescriptorRules::default();
            let err = r.add_yaml(yaml).expect_err(yaml);
            assert!(err.0.contains(says), "{yaml}: {err}");
        }
        let mut r = rules("domain: d\ndescriptors: []");
        assert!(
            r.add_yaml("domain: d\ndescriptors: []")
                .unwrap_err()
                .0
                .contains("duplicate domain")
        );
    }

    #[test]
    fn a_rules_pool_name_depends_only_on_its_place_in_the_tree() {
        let one = rules(
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: second, requests_per_unit: 1 }",
        );
        let two = rules(
            "domain: d\ndescriptors:\n  - key: z\n    rate_limit: { unit: hour, requests_per_unit: 9 }\n  - key: a\n    rate_limit: { unit: second, requests_per_unit: 1 }",
        );
        let name = |r: &DescriptorRules| r.find("d", &[("a", "x")]).unwrap().rule.policy.clone();
        assert_eq!(name(&one), name(&two));
        assert!(crate::model::is_valid_name(&name(&one)));
    }
}
