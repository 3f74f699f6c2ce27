//! `warden.v1.Admin`: keys, secrets, policies and the audit log. Callers
//! need the `admin` role. Every change is written to the store (fsynced),
//! then to the audit log (fsynced), then made effective for the next Check,
//! and only then acknowledged.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use tonic::{Request, Response, Status};
use warden_client::proto::admin_server::Admin;
use warden_client::proto::{
    AddSecretRequest, AddSecretResponse, AuditRecord, CreateKeyRequest, CreateKeyResponse,
    GetKeyRequest, KeyInfo, KeyKind as ProtoKind, ListAuditRequest, ListAuditResponse,
    ListKeysRequest, ListKeysResponse, ListPoliciesRequest, ListPoliciesResponse, PolicyInfo,
    RevokeRequest, SecretInfo, UpdateKeyRequest, VerifyAuditRequest, VerifyAuditResponse,
};

use super::caller_of;
use crate::audit::{AuditLog, Event, Record};
use crate::auth::{Authz, Role};
use crate::check::{CallerIdentity, Checker};
use crate::crypto::{api_key_hash, random_hex};
use crate::engine::Limit;
use crate::model::{KeyConfig, Pattern, Policy, PolicySpec, Route, is_valid_key_id, is_valid_name};
use crate::store::{KeyKind, KeyRecord, SecretRecord, Store};
use warden_client::signing::unix_now;

/// Everything the admin API works on.
pub struct AdminService {
    checker: Arc<Checker>,
    store: Option<Arc<Store>>,
    audit: Option<Arc<AuditLog>>,
    authz: Authz,
    config_policies: Vec<Policy>,
    config_keys: Vec<KeyConfig>,
    /// One change at a time: read, modify, write, rebuild.
    writing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for AdminService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminService").finish_non_exhaustive()
    }
}

const MAX_PAGE: u32 = 1000;
const DEFAULT_PAGE: u32 = 100;
const MAX_LIST_ITEMS: usize = 64;
const MAX_ITEM_BYTES: usize = 256;

/// Internal failures are logged in full and answered with a generic status.
fn internal(what: &str, e: impl std::fmt::Display) -> Status {
    tracing::error!(event = "admin_failed", what, error = %e, "admin operation failed");
    Status::internal("the change could not be stored; see the server log")
}

fn kind_name(kind: KeyKind) -> ProtoKind {
    match kind {
        KeyKind::Hmac => ProtoKind::Hmac,
        KeyKind::Bearer => ProtoKind::Bearer,
    }
}

fn key_info(k: &KeyRecord) -> KeyInfo {
    KeyInfo {
        key_id: k.id.clone(),
        owner: k.owner.clone(),
        scopes: k.scopes.clone(),
        policies: k.policies.clone(),
        routes: k.routes.clone(),
        bound_identities: k.bound_identities.clone(),
        kind: kind_name(k.kind) as i32,
        revoked: k.revoked,
        secrets: k
            .secrets
            .iter()
            .map(|s| SecretInfo {
                secret_id: s.id.clone(),
                created_at: s.created_at,
                valid_until: s.valid_until.unwrap_or(0),
                revoked: s.revoked,
            })
            .collect(),
        created_at: k.created_at,
        source: "store".into(),
    }
}

fn config_key_info(k: &KeyConfig) -> KeyInfo {
    KeyInfo {
        key_id: k.id.clone(),
        owner: k.owner.clone(),
        scopes: k.scopes.clone(),
        policies: k.policies.clone(),
        routes: Vec::new(),
        bound_identities: k
            .bound_identities
            .iter()
            .map(|p| p.as_str().to_owned())
            .collect(),
        kind: ProtoKind::Hmac as i32,
        revoked: k.revoked,
        secrets: Vec::new(),
        created_at: 0,
        source: "config".into(),
    }
}

fn policy_info(p: &Policy) -> PolicyInfo {
    let period_ms = p.period.as_millis() as u64;
    let period = if period_ms.is_multiple_of(1000) {
        format!("{}s", period_ms / 1000)
    } else {
        format!("{period_ms}ms")
    };
    let (algorithm, burst) = match &p.limit {
        Limit::Gcra(g) => ("gcra", g.burst()),
        Limit::Window(w) if w.kind() == crate::engine::WindowKind::Fixed => ("fixed_window", 0),
        Limit::Window(_) => ("sliding_window", 0),
    };
    PolicyInfo {
        name: p.name.clone(),
        algorithm: algorithm.into(),
        limit: p.limit.limit(),
        period,
        burst,
    }
}

/// Checks a list of short strings from a request.
fn check_list(field: &str, items: &[String]) -> Result<(), Status> {
    if items.len() > MAX_LIST_ITEMS
        || items
            .iter()
            .any(|i| i.is_empty() || i.len() > MAX_ITEM_BYTES || i.chars().any(char::is_control))
    {
        return Err(Status::invalid_argument(format!(
            "{field}: at most {MAX_LIST_ITEMS} entries of 1 to {MAX_ITEM_BYTES} characters, no control characters"
        )));
    }
    Ok(())
}

fn page_token(last: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last)
}

fn from_page_token(token: &str) -> Result<String, Status> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| Status::invalid_argument("page_token: not a token from a previous response"))
}

fn page_size(requested: u32) -> usize {
    match requested {
        0 => DEFAULT_PAGE as usize,
        n => n.min(MAX_PAGE) as usize,
    }
}

impl AdminService {
    pub fn new(
        checker: Arc<Checker>,
        store: Option<Arc<Store>>,
        audit: Option<Arc<AuditLog>>,
        authz: Authz,
        config_policies: Vec<Policy>,
        config_keys: Vec<KeyConfig>,
    ) -> Self {
        Self {
            checker,
            store,
            audit,
            authz,
            config_policies,
            config_keys,
            writing: tokio::sync::Mutex::new(()),
        }
    }

    /// The caller, if it holds the admin role; audits a refusal.
    fn admin<T>(&self, request: &Request<T>, rpc: &str) -> Result<CallerIdentity, Status> {
        let caller = caller_of(request);
        if self.authz.grant(caller.0.as_deref()).has(Role::Admin) {
            return Ok(caller);
        }
        tracing::warn!(
            event = "caller_denied",
            caller = caller.as_str(),
            rpc,
            "admin call refused"
        );
        metrics::counter!("warden_caller_denied_total").increment(1);
        if let Some(audit) = &self.audit {
            audit.record_later(Event {
                actor: caller.as_str().to_owned(),
                action: "admin.denied",
                key_id: String::new(),
                detail: rpc.to_owned(),
            });
        }
        Err(Status::permission_denied(
            "this client certificate may not use the admin API",
        ))
    }

    fn store(&self) -> Result<&Arc<Store>, Status> {
        self.store.as_ref().ok_or_else(|| {
            Status::failed_precondition("no key store is configured ([store] in the config file)")
        })
    }

    fn is_config_key(&self, id: &str) -> bool {
        self.config_keys.iter().any(|k| k.id == id)
    }

    /// Stores the key, audits the change, and makes it effective, all before
    /// returning. Called with `writing` held.
    async fn commit_key(
        &self,
        store: &Store,
        key: KeyRecord,
        caller: &CallerIdentity,
        action: &'static str,
        detail: String,
    ) -> Result<(), Status> {
        let id = key.id.clone();
        store
            .put_key(key)
            .await
            .map_err(|e| internal("store key", e))?;
        self.audit_now(caller, action, &id, detail)?;
        self.rebuild(store)
    }

    fn audit_now(
        &self,
        caller: &CallerIdentity,
        action: &'static str,
        key_id: &str,
        detail: String,
    ) -> Result<(), Status> {
        if let Some(audit) = &self.audit {
            let event = Event {
                actor: caller.as_str().to_owned(),
                action,
                key_id: key_id.to_owned(),
                detail,
            };
            audit
                .append_durable(&[event])
                .map_err(|e| internal("audit", e))?;
        }
        Ok(())
    }

    fn rebuild(&self, store: &Store) -> Result<(), Status> {
        self.checker
            .reload_keys(&self.config_policies, &self.config_keys, Some(store))
            .map_err(|e| internal("rebuild keys", e))
    }

    fn existing(&self, store: &Store, key_id: &str) -> Result<KeyRecord, Status> {
        if self.is_config_key(key_id) {
            return Err(Status::failed_precondition(
                "this key is defined in the config file; change it there",
            ));
        }
        store
            .key(key_id)
            .ok_or_else(|| Status::not_found("no such key"))
    }

    fn validate_key_fields(
        &self,
        policies: &[String],
        routes: &[String],
        bound: &[String],
        scopes: &[String],
    ) -> Result<(), Status> {
        check_list("scopes", scopes)?;
        check_list("policies", policies)?;
        check_list("routes", routes)?;
        check_list("bound_identities", bound)?;
        let ring = self.checker.keys();
        if let Some(p) = policies.iter().find(|p| ring.policy(p).is_none()) {
            return Err(Status::invalid_argument(format!(
                "policies: unknown policy {p:?}"
            )));
        }
        for r in routes {
            Route::parse(r).map_err(|e| Status::invalid_argument(format!("routes: {e}")))?;
        }
        for b in bound {
            Pattern::new(b)
                .map_err(|e| Status::invalid_argument(format!("bound_identities: {e}")))?;
        }
        Ok(())
    }

    fn new_secret(store: &Store, key_id: &str) -> (SecretRecord, String) {
        let secret = format!("wsk_{}", random_hex(32));
        let id = format!("sec_{}", random_hex(6));
        let record = SecretRecord {
            sealed: store.seal(key_id, &id, secret.as_bytes()),
            id,
            created_at: unix_now(),
            valid_until: None,
            revoked: false,
        };
        (record, secret)
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_key(
        &self,
        request: Request<CreateKeyRequest>,
    ) -> Result<Response<CreateKeyResponse>, Status> {
        let caller = self.admin(&request, "CreateKey")?;
        let store = self.store()?;
        let r = request.into_inner();
        let id = if r.key_id.is_empty() {
            format!("wk_{}", random_hex(8))
        } else {
            r.key_id.clone()
        };
        if !is_valid_key_id(&id) {
            return Err(Status::invalid_argument(
                "key_id: must be 1 to 128 characters of [A-Za-z0-9_.:-]",
            ));
        }
        if r.owner.len() > MAX_ITEM_BYTES || r.owner.chars().any(char::is_control) {
            return Err(Status::invalid_argument(
                "owner: at most 256 characters, no control characters",
            ));
        }
        self.validate_key_fields(&r.policies, &r.routes, &r.bound_identities, &r.scopes)?;
        let kind = match ProtoKind::try_from(r.kind).unwrap_or(ProtoKind::Unspecified) {
            ProtoKind::Bearer => KeyKind::Bearer,
            _ => KeyKind::Hmac,
        };
        let _writing = self.writing.lock().await;
        if self.is_config_key(&id) || store.key(&id).is_some() {
            return Err(Status::already_exists("a key with this id exists"));
        }
        let mut key = KeyRecord {
            id: id.clone(),
            owner: r.owner,
            scopes: r.scopes,
            policies: r.policies,
            routes: r.routes,
            bound_identities: r.bound_identities,
            kind,
            revoked: false,
            created_at: unix_now(),
            secrets: Vec::new(),
            api_key_hash: None,
        };
        let mut response = CreateKeyResponse::default();
        match kind {
            KeyKind::Hmac => {
                let (record, secret) = Self::new_secret(store, &id);
                response.secret_id = record.id.clone();
                response.secret = secret;
                key.secrets.push(record);
            }
            KeyKind::Bearer => {
                let api_key = format!("wak_{}", random_hex(32));
                key.api_key_hash = Some(api_key_hash(&api_key));
                response.api_key = api_key;
            }
        }
        let detail = format!(
            "kind={} owner={}",
            if kind == KeyKind::Bearer {
                "bearer"
            } else {
                "hmac"
            },
            key.owner
        );
        response.key = Some(key_info(&key));
        self.commit_key(store, key, &caller, "key.create", detail)
            .await?;
        Ok(Response::new(response))
    }

    async fn get_key(&self, request: Request<GetKeyRequest>) -> Result<Response<KeyInfo>, Status> {
        self.admin(&request, "GetKey")?;
        let id = request.into_inner().key_id;
        if let Some(k) = self.config_keys.iter().find(|k| k.id == id) {
            return Ok(Response::new(config_key_info(k)));
        }
        let k = self
            .store()?
            .key(&id)
            .ok_or_else(|| Status::not_found("no such key"))?;
        Ok(Response::new(key_info(&k)))
    }

    async fn list_keys(
        &self,
        request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        self.admin(&request, "ListKeys")?;
        let r = request.into_inner();
        let size = page_size(r.page_size);
        let after = if r.page_token.is_empty() {
            String::new()
        } else {
            from_page_token(&r.page_token)?
        };
        let owner = (!r.owner.is_empty()).then_some(r.owner.as_str());
        // Config keys and stored keys, in one id order.
        let mut merged: BTreeMap<String, KeyInfo> = BTreeMap::new();
        for k in self
            .config_keys
            .iter()
            .filter(|k| k.id > after && owner.is_none_or(|o| k.owner == o))
        {
            merged.insert(k.id.clone(), config_key_info(k));
        }
        if let Some(store) = &self.store {
            for k in store.keys_after(&after, owner, size + 1) {
                merged.insert(k.id.clone(), key_info(&k));
            }
        }
        let mut keys: Vec<KeyInfo> = merged.into_values().take(size + 1).collect();
        let next_page_token = if keys.len() > size {
            keys.truncate(size);
            page_token(&keys[size - 1].key_id)
        } else {
            String::new()
        };
        Ok(Response::new(ListKeysResponse {
            keys,
            next_page_token,
        }))
    }

    async fn add_secret(
        &self,
        request: Request<AddSecretRequest>,
    ) -> Result<Response<AddSecretResponse>, Status> {
        let caller = self.admin(&request, "AddSecret")?;
        let store = self.store()?;
        let r = request.into_inner();
        let _writing = self.writing.lock().await;
        let mut key = self.existing(store, &r.key_id)?;
        if key.revoked {
            return Err(Status::failed_precondition("this key is revoked"));
        }
        if key.kind != KeyKind::Hmac {
            return Err(Status::failed_precondition(
                "bearer keys have no secrets to rotate; create a new key",
            ));
        }
        if r.old_valid_until < 0 {
            return Err(Status::invalid_argument(
                "old_valid_until: Unix seconds, or 0",
            ));
        }
        if r.old_valid_until > 0 {
            for s in key.secrets.iter_mut().filter(|s| !s.revoked) {
                s.valid_until = Some(
                    s.valid_until
                        .map_or(r.old_valid_until, |u| u.min(r.old_valid_until)),
                );
            }
        }
        let (record, secret) = Self::new_secret(store, &key.id);
        let secret_id = record.id.clone();
        key.secrets.push(record);
        let info = key_info(&key);
        let detail = format!(
            "secret_id={secret_id} old_valid_until={}",
            r.old_valid_until
        );
        self.commit_key(store, key, &caller, "secret.add", detail)
            .await?;
        Ok(Response::new(AddSecretResponse {
            secret_id,
            secret,
            key: Some(info),
        }))
    }

    async fn revoke(&self, request: Request<RevokeRequest>) -> Result<Response<KeyInfo>, Status> {
        let caller = self.admin(&request, "Revoke")?;
        let store = self.store()?;
        let r = request.into_inner();
        let _writing = self.writing.lock().await;
        let mut key = self.existing(store, &r.key_id)?;
        let (action, detail) = if r.secret_id.is_empty() {
            key.revoked = true;
            ("key.revoke", String::new())
        } else {
            let secret = key
                .secrets
                .iter_mut()
                .find(|s| s.id == r.secret_id)
                .ok_or_else(|| Status::not_found("no such secret"))?;
            secret.revoked = true;
            ("secret.revoke", format!("secret_id={}", r.secret_id))
        };
        let info = key_info(&key);
        self.commit_key(store, key, &caller, action, detail).await?;
        Ok(Response::new(info))
    }

    async fn update_key(
        &self,
        request: Request<UpdateKeyRequest>,
    ) -> Result<Response<KeyInfo>, Status> {
        let caller = self.admin(&request, "UpdateKey")?;
        let store = self.store()?;
        let r = request.into_inner();
        let _writing = self.writing.lock().await;
        let mut key = self.existing(store, &r.key_id)?;
        let mut changed = Vec::new();
        if let Some(l) = r.scopes {
            key.scopes = l.values;
            changed.push("scopes");
        }
        if let Some(l) = r.routes {
            key.routes = l.values;
            changed.push("routes");
        }
        if let Some(l) = r.bound_identities {
            key.bound_identities = l.values;
            changed.push("bound_identities");
        }
        if let Some(l) = r.policies {
            key.policies = l.values;
            changed.push("policies");
        }
        self.validate_key_fields(
            &key.policies,
            &key.routes,
            &key.bound_identities,
            &key.scopes,
        )?;
        let info = key_info(&key);
        self.commit_key(
            store,
            key,
            &caller,
            "key.update",
            format!("changed={}", changed.join(",")),
        )
        .await?;
        Ok(Response::new(info))
    }

    async fn put_policy(
        &self,
        request: Request<PolicyInfo>,
    ) -> Result<Response<PolicyInfo>, Status> {
        let caller = self.admin(&request, "PutPolicy")?;
        let store = self.store()?;
        let r = request.into_inner();
        if !is_valid_name(&r.name) {
            return Err(Status::invalid_argument(
                "name: 1 to 64 characters of [A-Za-z0-9_.-]",
            ));
        }
        if self.config_policies.iter().any(|p| p.name == r.name) {
            return Err(Status::failed_precondition(
                "this policy is defined in the config file; change it there",
            ));
        }
        let file = PolicySpec {
            name: r.name.clone(),
            algorithm: Some(r.algorithm.clone()).filter(|a| !a.is_empty()),
            limit: r.limit,
            period: r.period.clone(),
            burst: (r.burst > 0).then_some(r.burst),
            max_entries: None,
        };
        let policy = crate::model::policy("policy", file.clone())
            .map_err(|e| Status::invalid_argument(e.0))?;
        let _writing = self.writing.lock().await;
        store
            .put_policy(file)
            .await
            .map_err(|e| internal("store policy", e))?;
        let detail = format!("policy={} limit={} period={}", r.name, r.limit, r.period);
        self.audit_now(&caller, "policy.put", "", detail)?;
        self.rebuild(store)?;
        Ok(Response::new(policy_info(&policy)))
    }

    async fn list_policies(
        &self,
        request: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        self.admin(&request, "ListPolicies")?;
        let mut policies: Vec<PolicyInfo> = self.config_policies.iter().map(policy_info).collect();
        if let Some(store) = &self.store {
            for p in store.policies() {
                if let Ok(policy) = crate::model::policy("policy", p) {
                    policies.push(policy_info(&policy));
                }
            }
        }
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(ListPoliciesResponse { policies }))
    }

    async fn verify_audit(
        &self,
        request: Request<VerifyAuditRequest>,
    ) -> Result<Response<VerifyAuditResponse>, Status> {
        self.admin(&request, "VerifyAudit")?;
        let audit = self.audit.clone().ok_or_else(|| {
            Status::failed_precondition("no audit log is configured ([store] in the config file)")
        })?;
        let unreadable = |e: &dyn std::fmt::Display| {
            tracing::error!(event = "admin_failed", what = "verify audit", error = %e, "audit log unreadable");
            Status::internal("the audit log could not be read; see the server log")
        };
        let verified = tokio::task::spawn_blocking(move || audit.verify())
            .await
            .map_err(|e| unreadable(&e))?
            .map_err(|e| unreadable(&e))?;
        Ok(Response::new(match verified {
            Ok(intact) => VerifyAuditResponse {
                intact: true,
                records: intact.records,
                unkeyed_records: intact.unkeyed,
                broken: String::new(),
            },
            Err(broken) => VerifyAuditResponse {
                intact: false,
                records: 0,
                unkeyed_records: 0,
                broken: broken.to_string(),
            },
        }))
    }

    async fn list_audit(
        &self,
        request: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        self.admin(&request, "ListAudit")?;
        let audit = self.audit.as_ref().ok_or_else(|| {
            Status::failed_precondition("no audit log is configured ([store] in the config file)")
        })?;
        let r = request.into_inner();
        let size = page_size(r.page_size);
        let after: u64 = if r.page_token.is_empty() {
            0
        } else {
            from_page_token(&r.page_token)?.parse().map_err(|_| {
                Status::invalid_argument("page_token: not a token from a previous response")
            })?
        };
        let lines = audit.read_lines().map_err(|e| internal("read audit", e))?;
        // Lines are returned as stored, unparsable ones included as raw
        // detail, so that verification over this API sees what is on disk.
        let mut records = Vec::new();
        let mut last_seq = after;
        let mut more = false;
        for (i, line) in lines.iter().enumerate() {
            let position = i as u64 + 1;
            if position <= after {
                continue;
            }
            let record = serde_json::from_str::<Record>(line).unwrap_or_else(|_| Record {
                seq: 0,
                time_ms: 0,
                actor: String::new(),
                action: "unreadable".into(),
                key_id: String::new(),
                detail: line.clone(),
                prev_hash: String::new(),
                hash: String::new(),
            });
            let filtered_out = (!r.key_id.is_empty() && record.key_id != r.key_id)
                || (r.since_ms > 0 && record.time_ms < r.since_ms)
                || (r.until_ms > 0 && record.time_ms > r.until_ms);
            if filtered_out {
                last_seq = position;
                continue;
            }
            if records.len() == size {
                more = true;
                break;
            }
            last_seq = position;
            records.push(AuditRecord {
                seq: record.seq,
                time_ms: record.time_ms,
                actor: record.actor,
                action: record.action,
                key_id: record.key_id,
                detail: record.detail,
                prev_hash: record.prev_hash,
                hash: record.hash,
            });
        }
        let next_page_token = if more {
            page_token(&last_seq.to_string())
        } else {
            String::new()
        };
        Ok(Response::new(ListAuditResponse {
            records,
            next_page_token,
        }))
    }
}
