//! `warden.v1.Admin`: keys, secrets, policies and the audit log, over gRPC.
//! [`AdminOnly`] checks the `admin` role once, for every call; the service
//! then translates between protobuf and [`KeyAdmin`], which owns every
//! change, and the audit log, which owns its paging.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use warden_client::proto::admin_server::Admin;
use warden_client::proto::{
    AddSecretRequest, AddSecretResponse, AuditRecord, AwaitedHandover, ClusterMember,
    ClusterStatusRequest, ClusterStatusResponse, CreateKeyRequest, CreateKeyResponse,
    GetKeyRequest, KeyInfo, KeyKind as ProtoKind, ListAuditRequest, ListAuditResponse,
    ListKeysRequest, ListKeysResponse, ListPoliciesRequest, ListPoliciesResponse,
    LocateStateRequest, LocateStateResponse, PolicyInfo, RevokeRequest,
    SecretFormat as ProtoSecretFormat, SecretInfo, UpdateKeyRequest, VerifyAuditRequest,
    VerifyAuditResponse, locate_state_request,
};

use crate::audit::{AuditLog, Direction, Event, PageError, Position};
use crate::auth::{Authz, Role};
use crate::check::CallerIdentity;
use crate::cluster::Membership;
use crate::conn::PeerInfo;
use crate::engine::Limit;
use crate::key_admin::{AdminError, Credential, KeyAdmin, NewKey, NewSecret, SecretFormat};
use crate::model::{Algorithm, KeyConfig, Policy, PolicySpec, is_valid_name};
use crate::store::{KeyKind, KeyRecord};

const MAX_PAGE: u32 = 1000;
const DEFAULT_PAGE: u32 = 100;

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Self {
        let text = e.to_string();
        match e {
            AdminError::Invalid(_) => Status::invalid_argument(text),
            AdminError::NotFound(_) => Status::not_found(text),
            AdminError::Exists(_) => Status::already_exists(text),
            AdminError::Precondition(_) => Status::failed_precondition(text),
            AdminError::Internal => Status::internal(text),
            // gRPC's code for "may have completed".
            AdminError::Unconfirmed => Status::deadline_exceeded(text),
        }
    }
}

/// Who an admin call is from, put there by [`AdminOnly`].
#[derive(Clone, Debug)]
struct AdminCaller(CallerIdentity);

fn admin_caller<T>(request: &Request<T>) -> CallerIdentity {
    request
        .extensions()
        .get::<AdminCaller>()
        .map(|c| c.0.clone())
        .unwrap_or_default()
}

/// The admin role, checked once in front of the whole admin service: a call
/// from a certificate without it is refused, logged and audited (with the
/// RPC it tried) before any handler runs.
#[derive(Clone)]
pub struct AdminOnly<S> {
    inner: S,
    authz: Arc<Authz>,
    audit: Option<Arc<AuditLog>>,
}

impl<S> AdminOnly<S> {
    pub fn new(inner: S, authz: Authz, audit: Option<Arc<AuditLog>>) -> Self {
        Self {
            inner,
            authz: Arc::new(authz),
            audit,
        }
    }
}

impl<S: NamedService> NamedService for AdminOnly<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for AdminOnly<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let caller = CallerIdentity(
            request
                .extensions()
                .get::<PeerInfo>()
                .and_then(|p| p.identity.clone()),
        );
        if self.authz.grant(caller.0.as_deref()).has(Role::Admin) {
            request.extensions_mut().insert(AdminCaller(caller));
            return Box::pin(self.inner.call(request));
        }
        let rpc = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or("-")
            .to_owned();
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
                detail: rpc,
            });
        }
        let refused =
            Status::permission_denied("this client certificate may not use the admin API");
        Box::pin(async move { Ok(refused.into_http()) })
    }
}

/// Translates the admin API to [`KeyAdmin`], the audit log and the cluster
/// membership.
#[derive(Debug)]
pub struct AdminService {
    keys: KeyAdmin,
    membership: Option<Arc<Membership>>,
}

impl AdminService {
    pub fn new(keys: KeyAdmin, membership: Option<Arc<Membership>>) -> Self {
        Self { keys, membership }
    }
}

/// The secret a request asks for: given, or generated in a format.
fn new_secret(given: String, format: i32) -> Result<NewSecret, Status> {
    let format = match ProtoSecretFormat::try_from(format) {
        Ok(ProtoSecretFormat::Unspecified | ProtoSecretFormat::Warden) => SecretFormat::Warden,
        Ok(ProtoSecretFormat::Whsec) => SecretFormat::Whsec,
        Err(_) => return Err(Status::invalid_argument("secret_format: unknown")),
    };
    match (given.is_empty(), format) {
        (true, format) => Ok(NewSecret::Generated(format)),
        (false, SecretFormat::Warden) => Ok(NewSecret::Given(given)),
        (false, SecretFormat::Whsec) => Err(Status::invalid_argument(
            "give a secret or a secret_format to generate, not both",
        )),
    }
}

fn credential_fields(credential: Credential) -> (String, String, String) {
    match credential {
        Credential::Secret { id, secret } => (id, secret, String::new()),
        Credential::ApiKey(api_key) => (String::new(), String::new(), api_key),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_key(
        &self,
        request: Request<CreateKeyRequest>,
    ) -> Result<Response<CreateKeyResponse>, Status> {
        let caller = admin_caller(&request);
        let r = request.into_inner();
        let bearer =
            ProtoKind::try_from(r.kind).unwrap_or(ProtoKind::Unspecified) == ProtoKind::Bearer;
        let created = self
            .keys
            .create(
                &caller,
                NewKey {
                    id: r.key_id,
                    owner: r.owner,
                    scopes: r.scopes,
                    policies: r.policies,
                    routes: r.routes,
                    bound_identities: r.bound_identities,
                    bearer,
                    secret: new_secret(r.secret, r.secret_format)?,
                },
            )
            .await?;
        let (secret_id, secret, api_key) = credential_fields(created.credential);
        Ok(Response::new(CreateKeyResponse {
            key: Some(key_info(&created.key)),
            secret_id,
            secret,
            api_key,
        }))
    }

    async fn get_key(&self, request: Request<GetKeyRequest>) -> Result<Response<KeyInfo>, Status> {
        let id = request.into_inner().key_id;
        if let Some(k) = self.keys.config_keys().iter().find(|k| k.id == id) {
            return Ok(Response::new(config_key_info(k)));
        }
        let k = self
            .keys
            .store()?
            .key(&id)
            .ok_or_else(|| Status::not_found("no such key"))?;
        Ok(Response::new(key_info(&k)))
    }

    async fn list_keys(
        &self,
        request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
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
            .keys
            .config_keys()
            .iter()
            .filter(|k| k.id > after && owner.is_none_or(|o| k.owner == o))
        {
            merged.insert(k.id.clone(), config_key_info(k));
        }
        if let Ok(store) = self.keys.store() {
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
        let caller = admin_caller(&request);
        let r = request.into_inner();
        let (key, credential) = self
            .keys
            .add_secret(
                &caller,
                &r.key_id,
                r.old_valid_until,
                new_secret(r.secret, r.secret_format)?,
            )
            .await?;
        let (secret_id, secret, _) = credential_fields(credential);
        Ok(Response::new(AddSecretResponse {
            secret_id,
            secret,
            key: Some(key_info(&key)),
        }))
    }

    async fn revoke(&self, request: Request<RevokeRequest>) -> Result<Response<KeyInfo>, Status> {
        let caller = admin_caller(&request);
        let r = request.into_inner();
        let key = self.keys.revoke(&caller, &r.key_id, &r.secret_id).await?;
        Ok(Response::new(key_info(&key)))
    }

    async fn update_key(
        &self,
        request: Request<UpdateKeyRequest>,
    ) -> Result<Response<KeyInfo>, Status> {
        let caller = admin_caller(&request);
        let r = request.into_inner();
        let (key, ()) = self
            .keys
            .modify(&caller, &r.key_id, |key| {
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
                Ok(("key.update", format!("changed={}", changed.join(",")), ()))
            })
            .await?;
        Ok(Response::new(key_info(&key)))
    }

    async fn put_policy(
        &self,
        request: Request<PolicyInfo>,
    ) -> Result<Response<PolicyInfo>, Status> {
        let caller = admin_caller(&request);
        let r = request.into_inner();
        if !is_valid_name(&r.name) {
            return Err(Status::invalid_argument(
                "name: 1 to 64 characters of [A-Za-z0-9_.-]",
            ));
        }
        let algorithm = match r.algorithm.as_str() {
            "" => None,
            text => Some(Algorithm::parse(text).ok_or_else(|| {
                Status::invalid_argument(
                    "algorithm: one of \"gcra\", \"sliding_window\", \"fixed_window\"",
                )
            })?),
        };
        let spec = PolicySpec {
            name: r.name,
            algorithm,
            limit: r.limit,
            period: r.period,
            burst: (r.burst > 0).then_some(r.burst),
            max_entries: None,
        };
        let policy = self.keys.put_policy(&caller, spec).await?;
        Ok(Response::new(policy_info(&policy)))
    }

    async fn list_policies(
        &self,
        _request: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        let mut policies: Vec<PolicyInfo> = self
            .keys
            .config_policies()
            .iter()
            .map(policy_info)
            .collect();
        if let Ok(store) = self.keys.store() {
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
        _request: Request<VerifyAuditRequest>,
    ) -> Result<Response<VerifyAuditResponse>, Status> {
        let audit = self.keys.audit()?.clone();
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

    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let membership = self.membership.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this node is not in a cluster ([cluster] in the config file)",
            )
        })?;
        let view = membership.view();
        let table = membership.table();
        let owned: BTreeMap<String, u64> = table
            .count_owned(self.keys.key_slots())
            .into_iter()
            .collect();
        Ok(Response::new(ClusterStatusResponse {
            node: membership.node().to_owned(),
            version: view.version,
            coordinator_ok: view.coordinator_ok,
            members: view
                .members
                .iter()
                .map(|m| ClusterMember {
                    node: m.node.clone(),
                    advertise: m.advertise.clone(),
                    lease_left_ms: m.lease_left.as_millis() as u64,
                    joined_at_ms: m.joined_at_ms,
                    keys_owned: owned.get(m.node.as_str()).copied().unwrap_or(0),
                    clock_ahead_ms: m.clock.map(|c| c.ahead_us / 1_000),
                })
                .collect(),
            awaiting: table
                .awaited_slots()
                .map(|(node, slots)| AwaitedHandover {
                    node: node.to_owned(),
                    slots: slots as u32,
                })
                .collect(),
            awaiting_for_ms: table
                .awaiting_since
                .map_or(0, |since| since.elapsed().as_millis() as u64),
        }))
    }

    async fn locate_state(
        &self,
        request: Request<LocateStateRequest>,
    ) -> Result<Response<LocateStateResponse>, Status> {
        let membership = self.membership.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this node is not in a cluster ([cluster] in the config file)",
            )
        })?;
        let slot = match request.into_inner().of {
            Some(locate_state_request::Of::KeyId(id)) if crate::model::is_valid_key_id(&id) => {
                self.keys.key_slot(&id)
            }
            Some(locate_state_request::Of::Limit(l))
                if is_valid_name(&l.policy)
                    && !l.descriptor.is_empty()
                    && l.descriptor.len() <= crate::check::MAX_DESCRIPTOR_BYTES =>
            {
                self.keys.limit_slot(&l.descriptor)
            }
            Some(locate_state_request::Of::ClientAddress(a)) if !a.is_empty() => {
                self.keys.failure_slot("", &a).ok_or_else(|| {
                    Status::invalid_argument("client_address: must be an IPv4 or IPv6 address")
                })?
            }
            Some(locate_state_request::Of::ClientIdentity(id)) if !id.is_empty() => {
                self.keys.failure_slot(&id, "").ok_or_else(|| {
                    Status::invalid_argument(
                        "client_identity: at most 1024 characters, no control characters",
                    )
                })?
            }
            _ => {
                return Err(Status::invalid_argument(
                    "give a valid key_id, a limit with a policy name and a descriptor of 1 to 256 bytes, a client_address or a client_identity",
                ));
            }
        };
        let table = membership.table();
        Ok(Response::new(LocateStateResponse {
            node: table.owner_name(slot).unwrap_or_default().to_owned(),
            slot: u32::from(slot),
            version: table.version,
            awaiting: table.awaited_for(slot).map(str::to_owned).collect(),
        }))
    }

    async fn list_audit(
        &self,
        request: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        let audit = self.keys.audit()?.clone();
        let r = request.into_inner();
        let from: Option<Position> = if r.page_token.is_empty() {
            None
        } else {
            Some(from_page_token(&r.page_token)?.parse().map_err(|()| {
                Status::invalid_argument("page_token: not a token from a previous response")
            })?)
        };
        let direction = if r.newest_first {
            Direction::Newest
        } else {
            Direction::Oldest
        };
        let size = page_size(r.page_size);
        // Reading files: off the async threads.
        let (key_id, since_ms, until_ms) = (r.key_id, r.since_ms, r.until_ms);
        let page = tokio::task::spawn_blocking(move || {
            audit.page(from, direction, size, |record| {
                (key_id.is_empty() || record.key_id == key_id)
                    && (since_ms <= 0 || record.time_ms >= since_ms)
                    && (until_ms <= 0 || record.time_ms <= until_ms)
            })
        })
        .await
        .map_err(|e| PageError::Io(std::io::Error::other(e)));
        let (records, next) = page.and_then(|page| page).map_err(|e| match e {
            PageError::Gone => Status::failed_precondition(
                "page_token: the audit file it points into is gone (archived?); start again",
            ),
            PageError::Io(e) => {
                tracing::error!(event = "admin_failed", what = "read audit", error = %e, "audit log unreadable");
                Status::internal("the audit log could not be read; see the server log")
            }
        })?;
        Ok(Response::new(ListAuditResponse {
            records: records
                .into_iter()
                .map(|record| AuditRecord {
                    seq: record.seq,
                    time_ms: record.time_ms,
                    actor: record.actor,
                    action: record.action,
                    key_id: record.key_id,
                    detail: record.detail,
                    prev_hash: record.prev_hash,
                    hash: record.hash,
                })
                .collect(),
            next_page_token: next.map(|p| page_token(&p.to_string())).unwrap_or_default(),
        }))
    }
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
