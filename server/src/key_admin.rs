//! Changes to keys and policies, whoever asks for them (today the gRPC admin
//! API). Every change follows one path: one writer at a time, look the key
//! up, change it, store it (fsynced), audit it (fsynced), make it effective
//! for the next check — and only then return. The gRPC service translates
//! requests and answers; it decides nothing.

use std::sync::Arc;

use crate::audit::{AuditLog, Event};
use crate::check::{CallerIdentity, Checker};
use crate::crypto::{api_key_hash, random_hex};
use crate::keys::RingError;
use crate::model::{KeyConfig, Pattern, Policy, PolicySpec, is_valid_key_id};
use crate::route::Route;
use crate::store::{KeyKind, KeyRecord, SecretRecord, Store, StoreError};
use warden_client::signing::unix_now;

/// Longest list (scopes, routes, ...) a key may have, and longest item.
pub const MAX_LIST_ITEMS: usize = 64;
pub const MAX_ITEM_BYTES: usize = 256;

/// Why a change was refused. The texts are safe to show the caller.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(&'static str),
    #[error("{0}")]
    Exists(&'static str),
    #[error("{0}")]
    Precondition(&'static str),
    /// Storing or auditing failed; the details went to the server log.
    #[error("the change could not be stored; see the server log")]
    Internal,
    /// The store did not confirm the change (a database that stopped
    /// answering): it may have been made.
    #[error(
        "the key store did not confirm the change: it may have been made; look (warden keys show, policies list) before making it again"
    )]
    Unconfirmed,
}

fn internal(what: &str, e: impl std::fmt::Display) -> AdminError {
    tracing::error!(event = "admin_failed", what, error = %e, "admin operation failed");
    AdminError::Internal
}

/// A key to create.
#[derive(Debug, Default)]
pub struct NewKey {
    /// Empty: a fresh random id.
    pub id: String,
    pub owner: String,
    pub scopes: Vec<String>,
    pub policies: Vec<String>,
    pub routes: Vec<String>,
    pub bound_identities: Vec<String>,
    pub bearer: bool,
    /// HMAC keys: where the secret comes from.
    pub secret: NewSecret,
}

/// Where a new HMAC secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewSecret {
    /// Generated in this form, and shown once.
    Generated(SecretFormat),
    /// Given by the administrator — a webhook provider's signing secret —
    /// and never shown back.
    Given(String),
}

/// How a generated secret is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretFormat {
    /// "wsk_" and 64 hex characters.
    Warden,
    /// "whsec_" and base64: a Standard Webhooks secret.
    Whsec,
}

/// Bounds of a given secret: providers' secrets are shorter than warden's
/// own (GitHub's are chosen by people), but never trivially short.
const MIN_GIVEN_SECRET: usize = 16;
const MAX_GIVEN_SECRET: usize = 1024;

impl Default for NewSecret {
    fn default() -> Self {
        NewSecret::Generated(SecretFormat::Warden)
    }
}

impl NewSecret {
    fn check(&self) -> Result<(), AdminError> {
        match self {
            NewSecret::Given(s)
                if !(MIN_GIVEN_SECRET..=MAX_GIVEN_SECRET).contains(&s.len())
                    || s.chars().any(char::is_control) =>
            {
                Err(AdminError::Invalid(format!(
                    "secret: {MIN_GIVEN_SECRET} to {MAX_GIVEN_SECRET} bytes, no control characters"
                )))
            }
            _ => Ok(()),
        }
    }
}

/// A created key and its credential, shown this once.
#[derive(Debug)]
pub struct Created {
    pub key: KeyRecord,
    pub credential: Credential,
}

/// The one-time credential of a new key or secret.
#[derive(Debug)]
pub enum Credential {
    Secret { id: String, secret: String },
    ApiKey(String),
}

/// Owns every change to stored keys and policies.
pub struct KeyAdmin {
    checker: Arc<Checker>,
    store: Option<Arc<Store>>,
    audit: Option<Arc<AuditLog>>,
    config_policies: Vec<Policy>,
    config_keys: Vec<KeyConfig>,
    /// One change at a time: read, modify, write, rebuild.
    writing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for KeyAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAdmin").finish_non_exhaustive()
    }
}

impl KeyAdmin {
    pub fn new(
        checker: Arc<Checker>,
        store: Option<Arc<Store>>,
        audit: Option<Arc<AuditLog>>,
        config_policies: Vec<Policy>,
        config_keys: Vec<KeyConfig>,
    ) -> Self {
        Self {
            checker,
            store,
            audit,
            config_policies,
            config_keys,
            writing: tokio::sync::Mutex::new(()),
        }
    }

    pub fn store(&self) -> Result<&Arc<Store>, AdminError> {
        self.store.as_ref().ok_or(AdminError::Precondition(
            "no key store is configured ([store] in the config file)",
        ))
    }

    pub fn audit(&self) -> Result<&Arc<AuditLog>, AdminError> {
        self.audit.as_ref().ok_or(AdminError::Precondition(
            "no audit log is configured ([store] in the config file)",
        ))
    }

    /// The state slot of every key checks know now (see
    /// [`crate::engine::Slot`]): where a cluster keeps each key's state.
    pub fn key_slots(&self) -> Vec<crate::engine::Slot> {
        let engine = self.checker.engine();
        self.checker
            .keys()
            .key_ids()
            .map(|id| engine.key(id.as_bytes(), &[]).slot())
            .collect()
    }

    /// The slot of one key's state.
    pub fn key_slot(&self, key_id: &str) -> crate::engine::Slot {
        self.checker.engine().key(key_id.as_bytes(), &[]).slot()
    }

    /// The slot of a request limit's state: its descriptor's (the policy
    /// does not move it).
    pub fn limit_slot(&self, descriptor: &str) -> crate::engine::Slot {
        self.checker.engine().key(descriptor.as_bytes(), &[]).slot()
    }

    /// The slot of an end client's failure budget (see
    /// [`crate::check::Checker::failure_slot`]).
    pub fn failure_slot(&self, identity: &str, address: &str) -> Option<crate::engine::Slot> {
        self.checker.failure_slot(identity, address)
    }

    pub fn config_keys(&self) -> &[KeyConfig] {
        &self.config_keys
    }

    pub fn config_policies(&self) -> &[Policy] {
        &self.config_policies
    }

    /// Creates a key with a fresh HMAC secret or bearer API key.
    pub async fn create(&self, actor: &CallerIdentity, new: NewKey) -> Result<Created, AdminError> {
        let store = self.store()?;
        let id = if new.id.is_empty() {
            format!("wk_{}", random_hex(8))
        } else {
            new.id
        };
        if !is_valid_key_id(&id) {
            return Err(AdminError::Invalid(
                "key_id: must be 1 to 128 characters of [A-Za-z0-9_.:-]".into(),
            ));
        }
        if new.owner.len() > MAX_ITEM_BYTES || new.owner.chars().any(char::is_control) {
            return Err(AdminError::Invalid(
                "owner: at most 256 characters, no control characters".into(),
            ));
        }
        let mut key = KeyRecord {
            id: id.clone(),
            owner: new.owner,
            scopes: new.scopes,
            policies: new.policies,
            routes: new.routes,
            bound_identities: new.bound_identities,
            kind: if new.bearer {
                KeyKind::Bearer
            } else {
                KeyKind::Hmac
            },
            revoked: false,
            created_at: unix_now(),
            secrets: Vec::new(),
            api_key_hash: None,
        };
        self.validate(&key)?;
        if new.bearer && new.secret != NewSecret::Generated(SecretFormat::Warden) {
            return Err(AdminError::Invalid(
                "secret: bearer keys take no secret; their API key is generated".into(),
            ));
        }
        new.secret.check()?;
        let _writing = self.writing.lock().await;
        if self.is_config_key(&id) || store.key(&id).is_some() {
            return Err(AdminError::Exists("a key with this id exists"));
        }
        let credential = if new.bearer {
            let api_key = format!("wak_{}", random_hex(32));
            key.api_key_hash = Some(api_key_hash(&api_key));
            Credential::ApiKey(api_key)
        } else {
            let (record, secret) = new_secret(store, &id, new.secret);
            let credential = Credential::Secret {
                id: record.id.clone(),
                secret,
            };
            key.secrets.push(record);
            credential
        };
        let detail = format!(
            "kind={} owner={}",
            if new.bearer { "bearer" } else { "hmac" },
            key.owner
        );
        self.commit(key.clone(), actor, "key.create", detail)
            .await?;
        Ok(Created { key, credential })
    }

    /// The one path for changing a stored key: `change` edits it and says
    /// what to audit (action, detail) and what to return.
    pub async fn modify<T>(
        &self,
        actor: &CallerIdentity,
        key_id: &str,
        change: impl FnOnce(&mut KeyRecord) -> Result<(&'static str, String, T), AdminError>,
    ) -> Result<(KeyRecord, T), AdminError> {
        let store = self.store()?;
        let _writing = self.writing.lock().await;
        if self.is_config_key(key_id) {
            return Err(AdminError::Precondition(
                "this key is defined in the config file; change it there",
            ));
        }
        let mut key = store
            .key(key_id)
            .ok_or(AdminError::NotFound("no such key"))?;
        let before = key.clone();
        let (action, detail, out) = change(&mut key)?;
        // Only what the change touched is validated: a key whose policy has
        // since left the config file can still be revoked or rotated.
        if (
            &key.scopes,
            &key.policies,
            &key.routes,
            &key.bound_identities,
        ) != (
            &before.scopes,
            &before.policies,
            &before.routes,
            &before.bound_identities,
        ) {
            self.validate(&key)?;
        }
        self.commit(key.clone(), actor, action, detail).await?;
        Ok((key, out))
    }

    /// Adds a secret to an HMAC key; the others stay valid until
    /// `old_valid_until` (Unix seconds; 0 = until revoked).
    pub async fn add_secret(
        &self,
        actor: &CallerIdentity,
        key_id: &str,
        old_valid_until: i64,
        secret: NewSecret,
    ) -> Result<(KeyRecord, Credential), AdminError> {
        secret.check()?;
        let store = self.store()?.clone();
        self.modify(actor, key_id, |key| {
            if key.revoked {
                return Err(AdminError::Precondition("this key is revoked"));
            }
            if key.kind != KeyKind::Hmac {
                return Err(AdminError::Precondition(
                    "bearer keys have no secrets to rotate; create a new key",
                ));
            }
            if old_valid_until < 0 {
                return Err(AdminError::Invalid(
                    "old_valid_until: Unix seconds, or 0".into(),
                ));
            }
            if old_valid_until > 0 {
                for s in key.secrets.iter_mut().filter(|s| !s.revoked) {
                    s.valid_until = Some(
                        s.valid_until
                            .map_or(old_valid_until, |u| u.min(old_valid_until)),
                    );
                }
            }
            let (record, secret) = new_secret(&store, &key.id, secret);
            let credential = Credential::Secret {
                id: record.id.clone(),
                secret,
            };
            let detail = format!("secret_id={} old_valid_until={old_valid_until}", record.id);
            key.secrets.push(record);
            Ok(("secret.add", detail, credential))
        })
        .await
    }

    /// Revokes a whole key (`secret_id` empty) or one of its secrets.
    pub async fn revoke(
        &self,
        actor: &CallerIdentity,
        key_id: &str,
        secret_id: &str,
    ) -> Result<KeyRecord, AdminError> {
        let (key, ()) = self
            .modify(actor, key_id, |key| {
                if secret_id.is_empty() {
                    key.revoked = true;
                    return Ok(("key.revoke", String::new(), ()));
                }
                let secret = key
                    .secrets
                    .iter_mut()
                    .find(|s| s.id == secret_id)
                    .ok_or(AdminError::NotFound("no such secret"))?;
                secret.revoked = true;
                Ok(("secret.revoke", format!("secret_id={secret_id}"), ()))
            })
            .await?;
        Ok(key)
    }

    /// Creates or replaces a stored policy.
    pub async fn put_policy(
        &self,
        actor: &CallerIdentity,
        spec: PolicySpec,
    ) -> Result<Policy, AdminError> {
        let store = self.store()?;
        if self.config_policies.iter().any(|p| p.name == spec.name) {
            return Err(AdminError::Precondition(
                "this policy is defined in the config file; change it there",
            ));
        }
        let policy =
            crate::model::policy("policy", spec.clone()).map_err(|e| AdminError::Invalid(e.0))?;
        let detail = format!(
            "policy={} limit={} period={}",
            spec.name, spec.limit, spec.period
        );
        let _writing = self.writing.lock().await;
        let recorded = self.audit_now(actor, "policy.put", "", detail)?;
        if let Err(e) = store.put_policy(spec).await {
            return Err(self.not_stored(actor, recorded, "", "store policy", e));
        }
        // Every key may count against the policy: all are rebuilt.
        rebuild_keys(
            self.checker.clone(),
            store.clone(),
            self.config_policies.clone(),
            self.config_keys.clone(),
        )
        .await
        .map_err(|e| internal("rebuild keys", e))?;
        Ok(policy)
    }

    fn is_config_key(&self, id: &str) -> bool {
        self.config_keys.iter().any(|k| k.id == id)
    }

    /// Bounds and references of a key's fields.
    fn validate(&self, key: &KeyRecord) -> Result<(), AdminError> {
        check_list("scopes", &key.scopes)?;
        check_list("policies", &key.policies)?;
        check_list("routes", &key.routes)?;
        check_list("bound_identities", &key.bound_identities)?;
        let ring = self.checker.keys();
        if let Some(p) = key.policies.iter().find(|p| ring.policy(p).is_none()) {
            return Err(AdminError::Invalid(format!(
                "policies: unknown policy {p:?}"
            )));
        }
        for r in &key.routes {
            Route::parse(r).map_err(|e| AdminError::Invalid(format!("routes: {e}")))?;
        }
        for b in &key.bound_identities {
            Pattern::new(b).map_err(|e| AdminError::Invalid(format!("bound_identities: {e}")))?;
        }
        Ok(())
    }

    /// Audits the change, stores the key, and makes it effective.
    async fn commit(
        &self,
        key: KeyRecord,
        actor: &CallerIdentity,
        action: &'static str,
        detail: String,
    ) -> Result<(), AdminError> {
        let store = self.store()?;
        let recorded = self.audit_now(actor, action, &key.id, detail)?;
        if let Err(e) = store.put_key(key.clone()).await {
            return Err(self.not_stored(actor, recorded, &key.id, "store key", e));
        }
        load_key(self.checker.clone(), store.clone(), key)
            .await
            .map_err(|e| internal("load key", e))
    }

    /// Records a change before it is made, and returns the record's
    /// sequence number (none without an audit log). A change that cannot
    /// be recorded is not made, so the log misses none that was: on a
    /// full disk, revoking a key fails whole instead of taking effect
    /// unrecorded.
    fn audit_now(
        &self,
        actor: &CallerIdentity,
        action: &'static str,
        key_id: &str,
        detail: String,
    ) -> Result<Option<u64>, AdminError> {
        let Some(audit) = &self.audit else {
            return Ok(None);
        };
        let event = Event {
            actor: actor.as_str().to_owned(),
            action,
            key_id: key_id.to_owned(),
            detail,
        };
        let records = audit
            .append_durable(&[event])
            .map_err(|e| internal("audit", e))?;
        Ok(records.last().map(|r| r.seq))
    }

    /// Records that the change recorded as `seq` was not made after all
    /// (the store refused it), or may not have been (the store did not
    /// confirm it), and says so to the admin. Best effort: if recording
    /// fails too, the server log says so, and the key store shows what was
    /// made.
    fn not_stored(
        &self,
        actor: &CallerIdentity,
        seq: Option<u64>,
        key_id: &str,
        what: &str,
        error: StoreError,
    ) -> AdminError {
        let unconfirmed = matches!(error, StoreError::Unconfirmed(_));
        if let (Some(audit), Some(seq)) = (&self.audit, seq) {
            let (action, detail) = match unconfirmed {
                false => (
                    "change.failed",
                    format!(
                        "the change of record {seq} was not made: the store could not write it"
                    ),
                ),
                true => (
                    "change.unconfirmed",
                    format!(
                        "the change of record {seq} may not have been made: the store did not confirm it"
                    ),
                ),
            };
            let event = Event {
                actor: actor.as_str().to_owned(),
                action,
                key_id: key_id.to_owned(),
                detail,
            };
            if let Err(e) = audit.append_durable(&[event]) {
                tracing::error!(
                    event = "audit_write_failed",
                    error = %e,
                    seq,
                    "could not record that an audited change was not made"
                );
            }
        }
        match unconfirmed {
            false => internal(what, error),
            true => {
                tracing::error!(event = "admin_unconfirmed", what, error = %error, "the store did not confirm an admin change");
                AdminError::Unconfirmed
            }
        }
    }
}

/// Makes one changed key effective. Loading it is cheap, but it waits for
/// any full rebuild in progress (the keys change one change at a time).
pub async fn load_key(
    checker: Arc<Checker>,
    store: Arc<Store>,
    record: KeyRecord,
) -> Result<(), String> {
    off_async_threads(move || checker.reload_key(&store, &record)).await
}

/// Rebuilds every key from the config and the store: it opens every stored
/// secret, O(keys).
pub async fn rebuild_keys(
    checker: Arc<Checker>,
    store: Arc<Store>,
    policies: Vec<Policy>,
    keys: Vec<KeyConfig>,
) -> Result<(), String> {
    off_async_threads(move || checker.reload_keys(&policies, &keys, Some(&store))).await
}

/// Runs a change of the keys on a blocking thread: it may take long, or
/// wait for another that does, and must not hold up the checks running on
/// the async threads.
async fn off_async_threads(
    change: impl FnOnce() -> Result<(), RingError> + Send + 'static,
) -> Result<(), String> {
    tokio::task::spawn_blocking(change)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// A secret record to store, and the secret to show once (empty for a
/// given one: the administrator has it).
fn new_secret(store: &Store, key_id: &str, source: NewSecret) -> (SecretRecord, String) {
    let (secret, shown) = match source {
        NewSecret::Generated(SecretFormat::Warden) => {
            let s = format!("wsk_{}", random_hex(32));
            (s.clone(), s)
        }
        NewSecret::Generated(SecretFormat::Whsec) => {
            let s = crate::webhooks::new_whsec();
            (s.clone(), s)
        }
        NewSecret::Given(s) => (s, String::new()),
    };
    let id = format!("sec_{}", random_hex(6));
    let record = SecretRecord {
        sealed: store.seal(key_id, &id, secret.as_bytes()),
        id,
        created_at: unix_now(),
        valid_until: None,
        revoked: false,
    };
    (record, shown)
}

/// Checks a list of short strings from a request.
fn check_list(field: &str, items: &[String]) -> Result<(), AdminError> {
    if items.len() > MAX_LIST_ITEMS
        || items
            .iter()
            .any(|i| i.is_empty() || i.len() > MAX_ITEM_BYTES || i.chars().any(char::is_control))
    {
        return Err(AdminError::Invalid(format!(
            "{field}: at most {MAX_LIST_ITEMS} entries of 1 to {MAX_ITEM_BYTES} characters, no control characters"
        )));
    }
    Ok(())
}
