//! Who may do what. A valid client certificate proves who is calling, not
//! what it may do: this module maps caller identities to roles, and
//! end-client identities to the routes they may call.
//!
//! Rules are tried in order and the first whose identity pattern matches
//! decides, as in a firewall: put specific rules before broad ones.

use std::collections::HashSet;

use crate::model::Pattern;
use crate::route::{Route, ServedPath};

/// A role a caller can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// May call `Check` / `CheckStream`.
    Check,
    /// May use the admin API.
    Admin,
    /// May pass on an end-client identity in `client_identity`.
    ForwardIdentity,
    /// Another node of the cluster: may send state steps (`warden.v1.Peer`).
    Peer,
    /// May sign outbound webhooks (`SignWebhook`) with the keys its key
    /// prefixes allow: whoever holds it can send webhooks as you.
    Sign,
}

impl Role {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "check" => Some(Self::Check),
            "admin" => Some(Self::Admin),
            "forward-identity" => Some(Self::ForwardIdentity),
            "peer" => Some(Self::Peer),
            "sign" => Some(Self::Sign),
            _ => None,
        }
    }
}

/// One `[[callers]]` rule.
#[derive(Clone, Debug)]
pub struct CallerRule {
    pub identity: Pattern,
    pub roles: HashSet<Role>,
    /// With `check`: only keys whose id starts with one of these (empty: any).
    pub key_prefixes: Vec<String>,
    /// With `check`: only these request-limit policies (`None`: any).
    pub policies: Option<HashSet<String>>,
}

/// One `[[clients]]` rule: what an end client (by certificate identity) may
/// call.
#[derive(Clone, Debug)]
pub struct ClientRule {
    pub identity: Pattern,
    pub routes: Vec<Route>,
}

/// What one caller may do: the rule that matched it (borrowed, so
/// resolving a grant on the hot path allocates nothing).
#[derive(Clone, Copy, Debug)]
pub enum Grant<'a> {
    /// No rule matched: nothing is allowed.
    Nothing,
    /// Plaintext mode: `check` only.
    PlaintextCheck,
    Rule(&'a CallerRule),
}

impl Grant<'_> {
    pub fn has(&self, role: Role) -> bool {
        match self {
            Grant::Nothing => false,
            Grant::PlaintextCheck => role == Role::Check,
            Grant::Rule(rule) => rule.roles.contains(&role),
        }
    }

    pub fn may_check_key(&self, key_id: &str) -> bool {
        match self {
            Grant::Rule(rule) => {
                rule.key_prefixes.is_empty()
                    || rule.key_prefixes.iter().any(|p| key_id.starts_with(p))
            }
            _ => true,
        }
    }

    pub fn may_use_policy(&self, policy: &str) -> bool {
        match self {
            Grant::Rule(rule) => rule
                .policies
                .as_ref()
                .is_none_or(|allowed| allowed.contains(policy)),
            _ => true,
        }
    }
}

/// All authorization rules of one server.
#[derive(Clone, Debug, Default)]
pub struct Authz {
    pub callers: Vec<CallerRule>,
    pub clients: Vec<ClientRule>,
    /// Plaintext mode has no identities: every caller may check (and nothing
    /// else). Only ever true on loopback.
    pub plaintext: bool,
}

impl Authz {
    /// The grant of a caller, by the identity of its certificate.
    pub fn grant(&self, identity: Option<&str>) -> Grant<'_> {
        match identity {
            None if self.plaintext => Grant::PlaintextCheck,
            None => Grant::Nothing,
            Some(id) => self
                .callers
                .iter()
                .find(|rule| rule.identity.matches(id))
                .map_or(Grant::Nothing, Grant::Rule),
        }
    }

    /// Whether an end client may call a route. Clients without a matching
    /// `[[clients]]` rule are not restricted by route.
    pub fn client_may_call(
        &self,
        identity: Option<&str>,
        method: &str,
        path: &ServedPath<'_>,
    ) -> bool {
        let Some(id) = identity else { return true };
        match self.clients.iter().find(|rule| rule.identity.matches(id)) {
            Some(rule) => {
                rule.routes.is_empty() || rule.routes.iter().any(|r| r.allows(method, path))
            }
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_star_matches_within_one_path_segment_only() {
        let p = Pattern::new("spiffe://prod/ns/*/sa/gateway").unwrap();
        assert!(p.matches("spiffe://prod/ns/edge/sa/gateway"));
        assert!(!p.matches("spiffe://prod/ns/edge/x/sa/gateway"));
        assert!(!p.matches("spiffe://prod/ns/edge/sa/gateway2"));
        let dns = Pattern::new("*.gateways.internal").unwrap();
        assert!(dns.matches("a.gateways.internal"));
        assert!(!dns.matches("gateways.internal.evil.com"));
        let exact = Pattern::new("spiffe://prod/app").unwrap();
        assert!(exact.matches("spiffe://prod/app"));
        assert!(!exact.matches("spiffe://prod/app/extra"));
        assert!(!exact.matches("spiffe://prod/ap"));
    }

    #[test]
    fn a_caller_rule_matches_only_identities_of_its_own_kind() {
        let spiffe = Pattern::caller("spiffe://t.test/*").unwrap();
        assert!(spiffe.matches("spiffe://t.test/admin"));
        // A CN that spells a SPIFFE ID is a CN.
        assert!(!spiffe.matches("CN=spiffe://t.test/admin"));
        let dns = Pattern::caller("*.gateways.internal").unwrap();
        assert!(dns.matches("a.gateways.internal"));
        assert!(!dns.matches("CN=a.gateways.internal"));
        // DNS names compare without case, as DNS does.
        assert!(
            Pattern::caller("GW.Internal")
                .unwrap()
                .matches("gw.internal")
        );
        let cn = Pattern::caller("CN=legacy-gateway").unwrap();
        assert!(cn.matches("CN=legacy-gateway"));
        assert!(!cn.matches("legacy-gateway"));
        for bad in [
            "legacy gateway",
            "spiffe://",
            "CN=",
            "https://x/y",
            "a:b",
            "",
        ] {
            assert!(Pattern::caller(bad).is_err(), "{bad:?}");
        }
        // Forwarded end-client identities are free-form.
        assert!(
            Pattern::new("CN=partner,O=Partner Inc")
                .unwrap()
                .matches("CN=partner,O=Partner Inc")
        );
    }

    #[test]
    fn the_first_matching_rule_decides() {
        let rule = |id: &str, roles: &[Role]| CallerRule {
            identity: Pattern::caller(id).unwrap(),
            roles: roles.iter().copied().collect(),
            key_prefixes: vec![],
            policies: None,
        };
        let authz = Authz {
            callers: vec![
                rule("spiffe://prod/admin", &[Role::Admin]),
                rule("spiffe://prod/*", &[Role::Check]),
            ],
            ..Authz::default()
        };
        let admin = authz.grant(Some("spiffe://prod/admin"));
        assert!(admin.has(Role::Admin) && !admin.has(Role::Check));
        assert!(authz.grant(Some("spiffe://prod/gw")).has(Role::Check));
        assert!(matches!(
            authz.grant(Some("spiffe://staging/gw")),
            Grant::Nothing
        ));
        assert!(matches!(authz.grant(None), Grant::Nothing));
    }

    #[test]
    fn grants_restrict_keys_and_policies() {
        let rule = CallerRule {
            identity: Pattern::caller("x").unwrap(),
            roles: HashSet::from([Role::Check]),
            key_prefixes: vec!["wk_live_".into()],
            policies: Some(HashSet::from(["per-ip".to_owned()])),
        };
        let grant = Grant::Rule(&rule);
        assert!(grant.may_check_key("wk_live_1") && !grant.may_check_key("wk_test_1"));
        assert!(grant.may_use_policy("per-ip") && !grant.may_use_policy("login"));
    }
}
