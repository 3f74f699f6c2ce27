//! API keys as the check pipeline sees them: who owns a key, which secrets
//! verify its signatures, which policies it counts against and which routes it
//! may call.

use std::collections::HashMap;
use std::sync::Arc;

use crate::model::{KeyConfig, Pattern, Policy, Route, Secret};
use crate::store::{KeyKind, KeyRecord, Store};

/// A secret with the time it stops verifying (rotation grace).
#[derive(Clone, Debug)]
pub struct KeySecret {
    pub secret: Secret,
    /// Unix seconds; `None` means until revoked.
    pub valid_until: Option<i64>,
}

/// One API key, ready for the hot path.
#[derive(Debug)]
pub struct ApiKey {
    pub id: String,
    pub owner: String,
    pub scopes: Vec<String>,
    pub kind: KeyKind,
    /// Any of these verifies a signature (several during rotation).
    pub secrets: Vec<KeySecret>,
    /// The key's own limits, in configured order.
    pub policies: Vec<Arc<Policy>>,
    /// Empty means every route.
    pub routes: Vec<Route>,
    /// Empty means any client identity; else the client must match one.
    pub bound_identities: Vec<Pattern>,
}

impl ApiKey {
    /// The secrets that verify at `now_secs`.
    pub fn active_secrets(&self, now_secs: i64) -> impl Iterator<Item = &Secret> {
        self.secrets
            .iter()
            .filter(move |s| s.valid_until.is_none_or(|until| now_secs <= until))
            .map(|s| &s.secret)
    }

    pub fn may_call(&self, method: &str, path: &str) -> bool {
        self.routes.is_empty() || self.routes.iter().any(|r| r.allows(method, path))
    }

    /// Whether a request from this client identity may use the key.
    pub fn may_be_used_by(&self, client: Option<&str>) -> bool {
        self.bound_identities.is_empty()
            || client.is_some_and(|id| self.bound_identities.iter().any(|p| p.matches(id)))
    }
}

/// Every active key and policy, by name. Revoked keys are simply absent, so
/// they answer exactly as unknown ones do.
#[derive(Debug, Default)]
pub struct KeyRing {
    keys: HashMap<String, Arc<ApiKey>>,
    /// Bearer keys by the SHA-256 of their API key.
    bearer: HashMap<String, Arc<ApiKey>>,
    policies: HashMap<String, Arc<Policy>>,
}

/// Why stored keys could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RingError(pub String);

impl KeyRing {
    /// Builds the ring from validated config (policies referenced by keys
    /// exist; the config check guarantees it).
    pub fn new(policies: &[Policy], keys: &[KeyConfig]) -> Self {
        let policies: HashMap<String, Arc<Policy>> = policies
            .iter()
            .map(|p| (p.name.clone(), Arc::new(p.clone())))
            .collect();
        let keys = keys
            .iter()
            .filter(|k| !k.revoked)
            .map(|k| {
                let key = ApiKey {
                    id: k.id.clone(),
                    owner: k.owner.clone(),
                    scopes: k.scopes.clone(),
                    kind: KeyKind::Hmac,
                    secrets: k
                        .secrets
                        .iter()
                        .map(|s| KeySecret {
                            secret: s.clone(),
                            valid_until: None,
                        })
                        .collect(),
                    policies: k
                        .policies
                        .iter()
                        .filter_map(|name| policies.get(name).cloned())
                        .collect(),
                    routes: k.routes.clone(),
                    bound_identities: k.bound_identities.clone(),
                };
                (k.id.clone(), Arc::new(key))
            })
            .collect();
        Self {
            keys,
            bearer: HashMap::new(),
            policies,
        }
    }

    /// The config's keys and policies plus everything in the store. Store
    /// entries never shadow config entries (the admin API refuses them).
    pub fn build(
        policies: &[Policy],
        keys: &[KeyConfig],
        store: Option<&Store>,
    ) -> Result<Self, RingError> {
        let mut ring = Self::new(policies, keys);
        let Some(store) = store else { return Ok(ring) };
        for p in store.policies() {
            let name = p.name.clone();
            let policy = crate::model::policy(&format!("stored policy {name}"), p)
                .map_err(|e| RingError(e.0))?;
            ring.policies
                .entry(name)
                .or_insert_with(|| Arc::new(policy));
        }
        for record in store.all_keys() {
            if record.revoked || ring.keys.contains_key(&record.id) {
                continue;
            }
            let key = Arc::new(ring.api_key(store, &record)?);
            if let Some(hash) = &record.api_key_hash {
                ring.bearer.insert(hash.clone(), key.clone());
            }
            ring.keys.insert(record.id.clone(), key);
        }
        Ok(ring)
    }

    fn api_key(&self, store: &Store, record: &KeyRecord) -> Result<ApiKey, RingError> {
        let bad =
            |what: &str, e: String| RingError(format!("stored key {}: {what}: {e}", record.id));
        let mut secrets = Vec::new();
        for s in record.secrets.iter().filter(|s| !s.revoked) {
            let secret = store
                .open_secret(&record.id, s)
                .map_err(|e| bad("secret", e.to_string()))?;
            secrets.push(KeySecret {
                secret,
                valid_until: s.valid_until,
            });
        }
        Ok(ApiKey {
            id: record.id.clone(),
            owner: record.owner.clone(),
            scopes: record.scopes.clone(),
            kind: record.kind,
            secrets,
            policies: record
                .policies
                .iter()
                .filter_map(|name| self.policies.get(name).cloned())
                .collect(),
            routes: record
                .routes
                .iter()
                .map(|r| Route::parse(r))
                .collect::<Result<_, _>>()
                .map_err(|e| bad("route", e))?,
            bound_identities: record
                .bound_identities
                .iter()
                .map(|p| Pattern::new(p))
                .collect::<Result<_, _>>()
                .map_err(|e| bad("bound identity", e))?,
        })
    }

    pub fn key(&self, id: &str) -> Option<&Arc<ApiKey>> {
        self.keys.get(id)
    }

    /// The bearer key with this API key, if any.
    pub fn bearer(&self, api_key: &str) -> Option<&Arc<ApiKey>> {
        self.bearer.get(&crate::crypto::api_key_hash(api_key))
    }

    pub fn policy(&self, name: &str) -> Option<&Arc<Policy>> {
        self.policies.get(name)
    }

    pub fn policies(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.policies.values()
    }

    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_method_and_exact_or_prefix_path() {
        let exact = Route::parse("POST /webhooks/billing").unwrap();
        assert!(exact.allows("POST", "/webhooks/billing"));
        assert!(
            exact.allows("post", "/webhooks/billing"),
            "methods in any case"
        );
        assert!(!exact.allows("GET", "/webhooks/billing"));
        assert!(!exact.allows("POST", "/webhooks/billing/x"));
        let prefix = Route::parse("* /v1/*").unwrap();
        assert!(prefix.allows("DELETE", "/v1/orders"));
        assert!(!prefix.allows("GET", "/v2/orders"));
        assert!(Route::parse("POST webhooks").is_err());
        assert!(Route::parse("/only-a-path").is_err());
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let s = Secret::new(b"top-secret-bytes".to_vec());
        assert!(!format!("{s:?}").contains("top-secret"));
    }
}
