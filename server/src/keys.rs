//! API keys as the check pipeline sees them: who owns a key, which secrets
//! verify its signatures, which policies it counts against and which routes it
//! may call.

use std::collections::HashMap;
use std::sync::Arc;

use crate::model::{KeyConfig, Pattern, Policy, Secret};
use crate::route::{Route, ServedPath};
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
    /// Bearer keys: the SHA-256 of the API key, hex (the bearer index's key).
    pub api_key_hash: Option<String>,
    /// Defined in the config file: the store never replaces it.
    pub from_config: bool,
}

impl ApiKey {
    /// The secrets that verify at `now_secs`.
    pub fn active_secrets(&self, now_secs: i64) -> impl Iterator<Item = &Secret> {
        self.secrets
            .iter()
            .filter(move |s| s.valid_until.is_none_or(|until| now_secs <= until))
            .map(|s| &s.secret)
    }

    pub fn may_call(&self, method: &str, path: &ServedPath<'_>) -> bool {
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
///
/// A check holds the ring it started with and a change replaces the ring
/// whole, so a ring is cheap to copy: a change of one key copies one shard
/// of each index and opens only that key's secrets (see
/// [`KeyRing::with_stored_key`]).
#[derive(Clone, Debug, Default)]
pub struct KeyRing {
    keys: KeyIndex,
    /// Bearer keys by the SHA-256 of their API key.
    bearer: KeyIndex,
    policies: HashMap<String, Arc<Policy>>,
}

/// Keys by a string (id, or bearer hash) in shards that rings share until
/// one of them changes. Rebuilding every key on every admin change made
/// creating n keys cost O(n²) (41 ms a key at 15,000 keys, each a stall of
/// a runtime thread); now a change copies one shard's pointers.
#[derive(Clone, Debug)]
struct KeyIndex {
    shards: Vec<Arc<HashMap<Arc<str>, Arc<ApiKey>>>>,
}

const INDEX_SHARDS: usize = 64;

impl Default for KeyIndex {
    fn default() -> Self {
        Self {
            shards: vec![Arc::default(); INDEX_SHARDS],
        }
    }
}

impl KeyIndex {
    /// The shard of `name`, from its last bytes: ids and hashes end in
    /// their most varied characters. Administrators choose ids, so they
    /// could crowd one shard; that only makes their own changes copy more.
    fn shard(name: &str) -> usize {
        let bytes = name.as_bytes();
        let mut tail = [0u8; 8];
        let n = bytes.len().min(8);
        tail[..n].copy_from_slice(&bytes[bytes.len() - n..]);
        let mixed = u64::from_le_bytes(tail).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (mixed >> 58) as usize
    }

    fn get(&self, name: &str) -> Option<&Arc<ApiKey>> {
        self.shards[Self::shard(name)].get(name)
    }

    fn insert(&mut self, name: &str, key: Arc<ApiKey>) {
        Arc::make_mut(&mut self.shards[Self::shard(name)]).insert(Arc::from(name), key);
    }

    fn remove(&mut self, name: &str) -> Option<Arc<ApiKey>> {
        let shard = &mut self.shards[Self::shard(name)];
        if !shard.contains_key(name) {
            return None;
        }
        Arc::make_mut(shard).remove(name)
    }

    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.shards.iter().flat_map(|s| s.keys().map(|k| &**k))
    }
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
        let mut ring = Self::default();
        for k in keys.iter().filter(|k| !k.revoked) {
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
                api_key_hash: None,
                from_config: true,
            };
            ring.keys.insert(&k.id, Arc::new(key));
        }
        ring.policies = policies;
        ring
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
        store.for_each_key(|record| ring.put_stored_key(store, record))?;
        Ok(ring)
    }

    /// This ring with one stored key as `record` now has it: added,
    /// changed or (revoked) gone. Only that key's secrets are opened.
    pub fn with_stored_key(&self, store: &Store, record: &KeyRecord) -> Result<Self, RingError> {
        let mut ring = self.clone();
        ring.put_stored_key(store, record)?;
        Ok(ring)
    }

    fn put_stored_key(&mut self, store: &Store, record: &KeyRecord) -> Result<(), RingError> {
        // Config keys shadow stored ones (the admin API refuses their ids;
        // another node of a shared store may have a different config).
        if self.keys.get(&record.id).is_some_and(|k| k.from_config) {
            return Ok(());
        }
        // Built before anything changes: a key that does not load leaves
        // the ring as it was.
        let key = if record.revoked {
            None
        } else {
            Some(Arc::new(self.api_key(store, record)?))
        };
        if let Some(old) = self.keys.remove(&record.id)
            && let Some(hash) = &old.api_key_hash
        {
            self.bearer.remove(hash);
        }
        if let Some(key) = key {
            if let Some(hash) = &key.api_key_hash {
                self.bearer.insert(hash, key.clone());
            }
            self.keys.insert(&record.id, key);
        }
        Ok(())
    }

    fn api_key(&self, store: &Store, record: &KeyRecord) -> Result<ApiKey, RingError> {
        let bad =
            |what: &str, e: String| RingError(format!("stored key {}: {what}: {e}", record.id));
        // Sized exactly: grown one push at a time, the list kept room for
        // four secrets of 192 B each, on every key, for as long as it lives.
        let active = || record.secrets.iter().filter(|s| !s.revoked);
        let mut secrets = Vec::with_capacity(active().count());
        for s in active() {
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
                .map(|r| Route::parse_stored(r))
                .collect::<Result<_, _>>()
                .map_err(|e| bad("route", e))?,
            bound_identities: record
                .bound_identities
                .iter()
                .map(|p| Pattern::new(p))
                .collect::<Result<_, _>>()
                .map_err(|e| bad("bound identity", e))?,
            api_key_hash: record.api_key_hash.clone(),
            from_config: false,
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
        self.keys.names()
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::crypto::{MasterKey, api_key_hash};
    use crate::model::PolicySpec;
    use crate::store::SecretRecord;

    #[test]
    fn routes_match_method_and_exact_or_prefix_path() {
        let exact = Route::parse("POST /webhooks/billing").unwrap();
        assert!(exact.allows("POST", &ServedPath::of("/webhooks/billing")));
        assert!(
            exact.allows("post", &ServedPath::of("/webhooks/billing")),
            "methods in any case"
        );
        assert!(!exact.allows("GET", &ServedPath::of("/webhooks/billing")));
        assert!(!exact.allows("POST", &ServedPath::of("/webhooks/billing/x")));
        let prefix = Route::parse("* /v1/*").unwrap();
        assert!(prefix.allows("DELETE", &ServedPath::of("/v1/orders")));
        assert!(!prefix.allows("GET", &ServedPath::of("/v2/orders")));
        assert!(Route::parse("POST webhooks").is_err());
        assert!(Route::parse("/only-a-path").is_err());
    }

    fn store(dir: &std::path::Path) -> Store {
        Store::open_with(
            dir,
            MasterKey::from_hex(&MasterKey::generate_hex()).unwrap(),
        )
        .unwrap()
    }

    fn policies() -> Vec<Policy> {
        ["p1", "p2"]
            .map(|name| {
                crate::model::policy(
                    "policy",
                    PolicySpec {
                        name: name.into(),
                        algorithm: None,
                        limit: 10,
                        period: "1m".into(),
                        burst: None,
                        max_entries: None,
                    },
                )
                .unwrap()
            })
            .into()
    }

    /// The config's key: stored records with its id must not replace it.
    fn config_key() -> KeyConfig {
        KeyConfig {
            id: "cfg".into(),
            owner: "config".into(),
            scopes: vec![],
            policies: vec!["p1".into()],
            secrets: vec![Secret::new(b"config-secret".to_vec())],
            routes: vec![],
            bound_identities: vec![],
            revoked: false,
        }
    }

    /// Version `v` of stored key `id`: its secrets are named by `v`, so an
    /// old version's would show.
    fn record(store: &Store, id: &str, v: u8, shape: &Shape) -> KeyRecord {
        let secrets = (0..shape.secrets)
            .map(|i| SecretRecord {
                id: format!("s{v}_{i}"),
                sealed: store.seal(id, &format!("s{v}_{i}"), format!("{id}/{v}/{i}").as_bytes()),
                created_at: 1,
                valid_until: None,
                revoked: shape.revoked_secret == Some(i),
            })
            .collect();
        KeyRecord {
            id: id.into(),
            owner: format!("owner-{v}"),
            scopes: vec![],
            policies: shape.policies.iter().map(|p| p.to_string()).collect(),
            routes: vec![],
            bound_identities: vec![],
            kind: if shape.bearer {
                KeyKind::Bearer
            } else {
                KeyKind::Hmac
            },
            revoked: shape.revoked,
            created_at: 1,
            secrets,
            api_key_hash: shape.bearer.then(|| api_key_hash(&bearer_api_key(id, v))),
        }
    }

    fn bearer_api_key(id: &str, v: u8) -> String {
        format!("wak_{id}_{v}")
    }

    #[derive(Clone, Debug)]
    struct Shape {
        revoked: bool,
        bearer: bool,
        secrets: usize,
        revoked_secret: Option<usize>,
        policies: Vec<&'static str>,
    }

    /// An active HMAC key with one secret and one policy.
    fn hmac_key_shape() -> Shape {
        Shape {
            revoked: false,
            bearer: false,
            secrets: 1,
            revoked_secret: None,
            policies: vec!["p1"],
        }
    }

    fn shape() -> impl Strategy<Value = Shape> {
        (
            any::<bool>(),
            any::<bool>(),
            0..3usize,
            proptest::option::of(0..3usize),
            proptest::sample::subsequence(vec!["p1", "p2", "gone"], 0..=3),
        )
            .prop_map(
                |(revoked, bearer, secrets, revoked_secret, policies)| Shape {
                    revoked,
                    bearer,
                    secrets,
                    revoked_secret,
                    policies,
                },
            )
    }

    /// What a check can see of a ring: every key as it resolves by id and
    /// by bearer API key.
    fn view(ring: &KeyRing, versions: &BTreeMap<String, u8>) -> Vec<String> {
        let mut seen: Vec<String> = ring
            .key_ids()
            .map(|id| {
                let k = ring.key(id).unwrap();
                let secrets: Vec<_> = k
                    .secrets
                    .iter()
                    .map(|s| String::from_utf8_lossy(s.secret.expose()).into_owned())
                    .collect();
                let policies: Vec<_> = k.policies.iter().map(|p| p.name.as_str()).collect();
                format!(
                    "{id} {} {secrets:?} {policies:?} {:?} {}",
                    k.owner, k.api_key_hash, k.from_config
                )
            })
            .collect();
        seen.sort();
        for (id, v) in versions {
            for version in 0..=*v {
                if let Some(k) = ring.bearer(&bearer_api_key(id, version)) {
                    seen.push(format!("bearer {id}/{version} -> {}", k.id));
                }
            }
        }
        seen.push(format!("count {}", ring.key_count()));
        seen
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Changing keys one at a time gives the ring a rebuild of all of
        /// them gives: revoked keys and secrets gone, a bearer key found by
        /// its API key only while it is current, config keys untouched.
        #[test]
        fn changing_one_key_at_a_time_ends_where_a_full_rebuild_does(
            changes in proptest::collection::vec((0..5usize, shape()), 1..24),
        ) {
            let ids = ["a", "b", "c", "d", "cfg"];
            let dir = tempfile::tempdir().unwrap();
            let store = store(dir.path());
            let (policies, config) = (policies(), [config_key()]);
            let mut ring = KeyRing::new(&policies, &config);
            let mut latest: BTreeMap<String, KeyRecord> = BTreeMap::new();
            let mut versions: BTreeMap<String, u8> = BTreeMap::new();
            for (i, (which, shape)) in changes.iter().enumerate() {
                let id = ids[*which];
                let v = u8::try_from(i).unwrap();
                let rec = record(&store, id, v, shape);
                ring = ring.with_stored_key(&store, &rec).unwrap();
                versions.insert(id.to_owned(), v);
                latest.insert(id.to_owned(), rec);
            }
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            for rec in latest.values() {
                runtime.block_on(store.put_key(rec.clone())).unwrap();
            }
            let rebuilt = KeyRing::build(&policies, &config, Some(&store)).unwrap();
            prop_assert_eq!(view(&ring, &versions), view(&rebuilt, &versions));
            prop_assert!(ring.key("cfg").unwrap().from_config);
        }
    }

    #[test]
    fn a_key_change_rebuilds_that_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let hmac = hmac_key_shape();
        let mut ring = KeyRing::new(&policies(), &[]);
        for id in ["a", "b", "c"] {
            ring = ring
                .with_stored_key(&store, &record(&store, id, 0, &hmac))
                .unwrap();
        }
        let changed = ring
            .with_stored_key(&store, &record(&store, "b", 1, &hmac))
            .unwrap();
        assert!(Arc::ptr_eq(
            ring.key("a").unwrap(),
            changed.key("a").unwrap()
        ));
        assert!(Arc::ptr_eq(
            ring.key("c").unwrap(),
            changed.key("c").unwrap()
        ));
        assert_eq!(changed.key("b").unwrap().owner, "owner-1");
        assert_eq!(
            ring.key("b").unwrap().owner,
            "owner-0",
            "the old ring is unchanged"
        );
        assert_eq!(changed.key_count(), 3);
    }

    /// Every key is held for as long as warden runs: its secrets (192 B
    /// each, with the HMAC state) take the room they need and no more.
    #[test]
    fn a_loaded_key_holds_its_active_secrets_and_no_spare_room() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let shape = Shape {
            secrets: 3,
            revoked_secret: Some(1),
            ..hmac_key_shape()
        };
        let ring = KeyRing::new(&policies(), &[])
            .with_stored_key(&store, &record(&store, "a", 0, &shape))
            .unwrap();
        let key = ring.key("a").unwrap();
        assert_eq!(key.secrets.len(), 2, "the revoked one is left out");
        assert_eq!(key.secrets.capacity(), 2);
    }

    #[test]
    fn a_key_that_does_not_load_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let hmac = hmac_key_shape();
        let ring = KeyRing::new(&policies(), &[])
            .with_stored_key(&store, &record(&store, "a", 0, &hmac))
            .unwrap();
        let mut broken = record(&store, "a", 1, &hmac);
        broken.secrets[0].sealed = record(&store, "other", 1, &hmac).secrets[0].sealed.clone();
        assert!(ring.with_stored_key(&store, &broken).is_err());
        let mut bad_route = record(&store, "a", 2, &hmac);
        bad_route.routes = vec!["not a route".into()];
        assert!(ring.with_stored_key(&store, &bad_route).is_err());
        assert_eq!(ring.key("a").unwrap().owner, "owner-0");
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let s = Secret::new(b"top-secret-bytes".to_vec());
        assert!(!format!("{s:?}").contains("top-secret"));
    }
}
