//! The `Check` pipeline of DESIGN.md in one function: validate, authorize the
//! caller, verify the signature (or API key) against the source's failure
//! budget, check freshness and the restart fence, check the route, and then —
//! in one atomic engine step — the replay set and every rate limit. Only a
//! request that passes everything stores its nonce and takes its tokens.
//!
//! This module decides; it does not talk gRPC and does not log. The service
//! layer turns [`Decision`]s into responses and log lines.

use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use smallvec::SmallVec;

use warden_client::proto::{
    Caller, CheckRequest, CheckResponse, LimitStatus, SignWebhookRequest, SignWebhookResponse,
};

use crate::auth::{Authz, Grant, Role};
use crate::config::CheckSettings;
use crate::engine::clock::{ceil_millis, duration_nanos};
use crate::engine::{
    Clock, Engine, Gcra, Limit, LimitVerdict, Nanos, Outcome, Pool, ReplayKey, Request, Slot,
    StateKey, StateSeed,
};
use crate::freshness::{Fence, Freshness, Predecessor, Stale};
use crate::keys::{ApiKey, KeyRing, RingError};
use crate::model::{KeyConfig, Policy, is_valid_key_id, is_valid_name};
use crate::route::{ServedPath, has_dot_segment};
use crate::signing::{Body, Scheme, Signed, is_valid_nonce, verify, verify_nothing};
use crate::store::KeyKind;
use crate::store::{KeyRecord, Store};
use crate::webhooks::{
    Delivery, MAX_HEADER_BYTES as MAX_WEBHOOK_HEADER_BYTES, MAX_HEADERS as MAX_WEBHOOK_HEADERS,
    Provider, SignRefusal,
};

pub use warden_client::proto::{Decision, Reason};

/// Size bounds of a CheckRequest, besides the configurable body size.
pub const MAX_PATH_BYTES: usize = 8 * 1024;
pub const MAX_QUERY_BYTES: usize = 8 * 1024;
pub const MAX_LIMITS: usize = crate::model::MAX_REQUEST_LIMITS;
pub const MAX_DESCRIPTOR_BYTES: usize = 256;
pub const MAX_COST: u32 = 1_000_000;
pub const MAX_REQUEST_ID_BYTES: usize = 128;
pub const MAX_METHOD_BYTES: usize = 16;
pub const MAX_CLIENT_IDENTITY_BYTES: usize = 1024;
pub const MAX_API_KEY_BYTES: usize = 256;
pub const MAX_CLIENT_ADDRESS_BYTES: usize = 64;

/// A call the pipeline refuses as a whole (a gRPC error, not a DENY).
///
/// The messages of the two "full" refusals are a contract: the Python
/// client tells them apart from an unreachable warden by them, and fails
/// closed on them whatever its failure mode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckError {
    /// The replay set has no room left; accepting would mean forgetting
    /// live nonces.
    #[error("the replay cache is full; retry later")]
    ReplayCacheFull,
    /// A request limit needs a new entry, its pool is full and nothing
    /// could be evicted; counting it against nothing would be a bypass.
    #[error("rate-limit state is full; retry later")]
    StateFull(Pool),
    /// In a cluster: the nodes owning this check's state could not decide
    /// it in time (a node left or cannot be reached; its slots move).
    #[error("the node owning this key's state cannot be reached; retry")]
    Unavailable,
    /// The calling certificate may not make this call. The text is safe to
    /// send to the caller.
    #[error("{0}")]
    PermissionDenied(&'static str),
}

/// Who is calling `Check`: the mTLS identity of the gateway or app.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallerIdentity(pub Option<Arc<str>>);

impl CallerIdentity {
    pub fn as_str(&self) -> &str {
        self.0.as_deref().unwrap_or("-")
    }
}

/// The outcome of one check, with what the service needs to log it. Logs get
/// `key_id`, reason and message; never the signature, secret or body.
#[derive(Debug)]
pub struct Answer {
    pub response: CheckResponse,
    /// The key id as sent, when it was well formed, for logs. `None` when
    /// the response's caller names the key (an allowed answer: not copied
    /// for every check), or when nothing does.
    key_id: Option<String>,
}

impl Answer {
    /// The key the answer is for, for logs: as sent when it was well
    /// formed, else the caller's.
    pub fn key_id(&self) -> Option<&str> {
        self.key_id
            .as_deref()
            .or_else(|| self.response.caller.as_ref().map(|c| c.key_id.as_str()))
    }
}

/// The check pipeline with its state. One per process, shared by all calls.
pub struct Checker {
    engine: Engine,
    clock: Arc<dyn Clock>,
    /// Swapped whole when keys or policies change (admin API), so a check
    /// sees one consistent set from start to end.
    keys: RwLock<Arc<KeyRing>>,
    /// One change of the keys at a time, each made from the ring before it:
    /// an admin change here and another node's arrive on different tasks,
    /// and neither may undo the other.
    changing: Mutex<()>,
    authz: Authz,
    settings: CheckSettings,
    failures: Gcra,
    /// The skews and the restart fence: requests this process's predecessor
    /// may have accepted are STALE here (see [`crate::freshness`]).
    freshness: Freshness,
    /// In a cluster: where a failure is charged instead of this engine (the
    /// budget's owning node, which tells every node once it is spent).
    failure_sink: std::sync::OnceLock<FailureSink>,
}

/// What a change of the keys rebuilds, as operators see it timed
/// (`warden_key_changes_seconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyChange {
    /// One stored key.
    Key,
    /// Every key: a policy changed, or a shared store's feed was lost.
    All,
}

impl KeyChange {
    fn label(self) -> &'static str {
        match self {
            KeyChange::Key => "key",
            KeyChange::All => "all",
        }
    }
}

/// Charges one failure to a failure budget (its state key and limit).
pub type FailureSink = Box<dyn Fn(StateKey, Limit) + Send + Sync>;

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker")
            .field("freshness", &self.freshness)
            .field("keys", &self.keys.read().key_count())
            .finish_non_exhaustive()
    }
}

/// A malformed request: the field and a short, safe reason.
struct Malformed(String);

fn malformed(msg: impl Into<String>) -> Malformed {
    Malformed(msg.into())
}

/// How a request proves which key it belongs to.
enum Credential<'a> {
    /// A signature over the request (warden-v1 or ts-body).
    Signed {
        signed: Signed<'a>,
        signature: [u8; 32],
    },
    /// A bearer API key.
    Bearer(&'a str),
    /// A provider's webhook signature, read from its headers.
    Webhook(Delivery),
}

impl Credential<'_> {
    /// Whether a signature was made with one of `key`'s active secrets at
    /// `now_secs`. For an unknown key (`None`) it burns the time of one
    /// verification and is false. Bearer keys are looked up, not verified.
    fn verifies(&self, key: Option<&ApiKey>, now_secs: i64) -> bool {
        match (self, key) {
            (Credential::Signed { signed, signature }, Some(k)) => {
                verify(k.active_secrets(now_secs), &signed.message(), signature)
            }
            (Credential::Signed { signed, signature }, None) => {
                verify_nothing(&signed.message(), signature)
            }
            (Credential::Webhook(d), Some(k)) => d.verify(k.active_secrets(now_secs)),
            (Credential::Webhook(d), None) => d.verify_nothing(),
            (Credential::Bearer(_), _) => false,
        }
    }

    /// The signed time to judge for freshness; bearer keys and GitHub
    /// webhooks carry none.
    fn timestamp(&self, req: &CheckRequest) -> Option<i64> {
        match self {
            Credential::Signed { .. } => Some(req.timestamp),
            Credential::Webhook(d) => d.timestamp,
            Credential::Bearer(_) => None,
        }
    }
}

/// A request that passed validation, with its parts borrowed.
struct Valid<'a> {
    credential: Credential<'a>,
    client_address: Option<IpAddr>,
    /// Inline for the usual few: this is built for every check.
    limits: SmallVec<[(&'a str, &'a str); 4]>,
    cost: u64,
}

impl Checker {
    /// Starts the pipeline. The restart fence is set from `clock` now.
    pub fn new(
        settings: CheckSettings,
        keys: KeyRing,
        authz: Authz,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self::with_seed(settings, keys, authz, clock, StateSeed::random(), None)
    }

    /// Like [`Self::new`], keying state ids with `seed` (the cluster's),
    /// and fenced behind what `predecessor`, the process before, recorded.
    pub fn with_seed(
        settings: CheckSettings,
        keys: KeyRing,
        authz: Authz,
        clock: Arc<dyn Clock>,
        seed: StateSeed,
        predecessor: Option<Predecessor>,
    ) -> Self {
        let now = clock.now();
        let failures = Gcra::new(
            settings.failure_limit,
            duration_nanos(settings.failure_period),
            settings.failure_limit,
        );
        let engine = Engine::with_seed(settings.shards, settings.nonce_capacity, seed);
        engine.pools().set_total_cap(settings.max_limit_entries);
        engine
            .pools()
            .set_cap(Pool::FAILURES, Some(settings.max_failure_sources));
        set_policy_caps(&engine, &keys);
        Self {
            engine,
            freshness: Freshness::starting_after(
                now,
                settings.past_skew,
                settings.future_skew,
                predecessor,
            ),
            clock,
            keys: RwLock::new(Arc::new(keys)),
            changing: Mutex::new(()),
            authz,
            settings,
            failures,
            failure_sink: std::sync::OnceLock::new(),
        }
    }

    /// Sends failures to `sink` from now on (once; a cluster's budgets).
    pub fn charge_failures_to(&self, sink: FailureSink) {
        let _ = self.failure_sink.set(sink);
    }

    /// Requests signed below this fence are STALE: a process before this
    /// one may have accepted them.
    pub fn fence(&self) -> Fence {
        self.freshness.fence()
    }

    /// Takes `fence` instead of the restart fence counted at the start:
    /// the fence of the process whose whole state this one took back
    /// (`saved_state::Handover`). Every nonce that process accepted is
    /// here, so its fence, which covers every process before it, is all
    /// that is needed. Before the checker serves.
    pub fn go_on_behind(&mut self, fence: Fence) {
        self.freshness = self.freshness.with_fence(fence);
    }

    /// The skews and the restart fence.
    pub fn freshness(&self) -> &Freshness {
        &self.freshness
    }

    /// When the replay key of a request without a signed time (a GitHub
    /// webhook delivery) may be forgotten, if first seen at `now`.
    pub fn unsigned_forget_at(&self, now: Nanos) -> Nanos {
        now.saturating_add(duration_nanos(self.settings.webhook_replay_window))
    }

    /// The time on the clock checks are decided by.
    pub fn now(&self) -> Nanos {
        self.clock.now()
    }

    /// Decides a state step on this process's engine.
    pub fn decide_here(&self, pending: Pending) -> Result<Answer, CheckError> {
        let outcome = self.engine.decide(pending.now, &pending.request());
        pending.finish(Ok(outcome))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The slot of the failure budget an end client's failed attempts are
    /// charged to, by its forwarded identity or else its address (text as
    /// in a `CheckRequest`); `None` when neither is a valid one.
    pub fn failure_slot(&self, identity: &str, address: &str) -> Option<Slot> {
        if !identity.is_empty() && !is_valid_client_identity(identity) {
            return None;
        }
        let address = parse_client_address(address).ok()?;
        Source::end_client(identity, address).map(|s| s.state_key(&self.engine).slot())
    }

    /// The keys and policies checks use now.
    pub fn keys(&self) -> Arc<KeyRing> {
        self.keys.read().clone()
    }

    /// Makes the ring `change` builds from the current one effective for
    /// the next check; if it fails, nothing changes. Waits while another
    /// change is made (a full rebuild takes long with many keys): async
    /// code calls it on a blocking thread (`key_admin::load_key`,
    /// `key_admin::rebuild_keys`).
    fn change_keys(
        &self,
        what: KeyChange,
        change: impl FnOnce(&KeyRing) -> Result<KeyRing, RingError>,
    ) -> Result<(), RingError> {
        let _one_at_a_time = self.changing.lock();
        let started = std::time::Instant::now();
        let ring = change(&self.keys())?;
        metrics::histogram!("warden_key_changes_seconds", "change" => what.label())
            .record(started.elapsed().as_secs_f64());
        metrics::gauge!("warden_api_keys").set(ring.key_count() as f64);
        set_policy_caps(&self.engine, &ring);
        let before = std::mem::replace(&mut *self.keys.write(), Arc::new(ring));
        // Dropped after the lock: the last ring of a full rebuild holds
        // every old key, and checks wait on that lock.
        drop(before);
        Ok(())
    }

    /// Rebuilds the keys from the config's and the store's: after a policy
    /// change, after missing a shared store's changes. Every stored secret
    /// is opened: O(keys), run it off the async threads.
    pub fn reload_keys(
        &self,
        policies: &[Policy],
        keys: &[KeyConfig],
        store: Option<&Store>,
    ) -> Result<(), RingError> {
        self.change_keys(KeyChange::All, |_| KeyRing::build(policies, keys, store))
    }

    /// One stored key changed (created, modified, revoked): only it is
    /// rebuilt, and only its secrets are opened.
    pub fn reload_key(&self, store: &Store, record: &KeyRecord) -> Result<(), RingError> {
        self.change_keys(KeyChange::Key, |ring| ring.with_stored_key(store, record))
    }

    pub fn settings(&self) -> &CheckSettings {
        &self.settings
    }

    /// Signs an outbound webhook as `caller`: it needs the "sign" role and,
    /// like a check, a key prefix that allows the key.
    pub fn sign_webhook(
        &self,
        req: &SignWebhookRequest,
        caller: &CallerIdentity,
    ) -> Result<SignWebhookResponse, SignRefusal> {
        let grant = self.authz.grant(caller.0.as_deref());
        if !grant.has(Role::Sign) {
            return Err(SignRefusal::PermissionDenied(
                "this client certificate may not sign webhooks",
            ));
        }
        if !is_valid_key_id(&req.key_id) {
            return Err(SignRefusal::Invalid(
                "key_id: must be 1 to 128 characters of [A-Za-z0-9_.:-]".into(),
            ));
        }
        if !grant.may_check_key(&req.key_id) {
            return Err(SignRefusal::PermissionDenied(
                "this client certificate may not sign with this key",
            ));
        }
        let ring = self.keys();
        let now_secs = i64::try_from(self.clock.now().whole_secs()).unwrap_or(i64::MAX);
        let skews = (
            i64::try_from(self.settings.past_skew.as_secs()).unwrap_or(i64::MAX),
            i64::try_from(self.settings.future_skew.as_secs()).unwrap_or(i64::MAX),
        );
        crate::webhooks::sign_request(
            req,
            ring.key(&req.key_id).map(|k| k.as_ref()),
            now_secs,
            skews,
            self.settings.max_body_bytes,
        )
    }

    /// Runs the whole pipeline for one request, on this process's state.
    pub fn check(&self, req: &CheckRequest, caller: &CallerIdentity) -> Result<Answer, CheckError> {
        match self.begin(req, caller)? {
            Step::Done(answer) => Ok(answer),
            Step::State(pending) => self.decide_here(pending),
        }
    }

    /// Runs the pipeline up to its state step: everything that needs no
    /// state but the failure budgets (validation, authorization, signature,
    /// freshness, route). What is left, if anything, is one [`Pending`] state
    /// step: decided here by [`Self::check`], or by the owning nodes of a
    /// cluster.
    pub fn begin(&self, req: &CheckRequest, caller: &CallerIdentity) -> Result<Step, CheckError> {
        let now = self.clock.now();
        // Step 2, first part: without the role nothing else is looked at.
        let grant = self.authz.grant(caller.0.as_deref());
        if !grant.has(Role::Check) {
            return Err(CheckError::PermissionDenied(
                "this client certificate may not call Check",
            ));
        }
        let ring = self.keys();
        let response = match self.validate(req, &ring) {
            Err(Malformed(msg)) => deny(Reason::Malformed, msg),
            Ok(valid) => {
                authorize(&grant, req, &valid)?;
                let client = if req.client_identity.is_empty() {
                    caller.0.as_deref()
                } else {
                    Some(req.client_identity.as_str())
                };
                let source = Source::of(req, valid.client_address, caller);
                match self.authenticate(req, &ring, &valid, &source, now) {
                    Err(denial) => *denial,
                    Ok(key) => {
                        if !grant.may_check_key(&key.id) {
                            return Err(CheckError::PermissionDenied(
                                "this client certificate may not check requests for this key",
                            ));
                        }
                        match self.route_denial(req, &key, client) {
                            Some(denial) => denial,
                            None => {
                                let pending = self.state_step(req, &ring, &valid, &key, now);
                                return Ok(Step::State(pending));
                            }
                        }
                    }
                }
            }
        };
        let key_id = is_valid_key_id(&req.key_id).then(|| req.key_id.clone());
        Ok(Step::Done(Answer { response, key_id }))
    }

    /// Step 1: shape and bounds. Nothing is looked up yet.
    fn validate<'a>(&self, req: &'a CheckRequest, ring: &KeyRing) -> Result<Valid<'a>, Malformed> {
        if let Some(why) = warden_client::codec::undecodable(req) {
            return Err(malformed(why));
        }
        let bearer = !req.api_key.is_empty();
        let key_id_optional = bearer && req.key_id.is_empty();
        if !(key_id_optional || is_valid_key_id(&req.key_id)) {
            return Err(malformed(
                "key_id: must be 1 to 128 characters of [A-Za-z0-9_.:-]",
            ));
        }
        if req.method.is_empty()
            || req.method.len() > MAX_METHOD_BYTES
            || !req.method.bytes().all(|b| b.is_ascii_alphabetic())
        {
            return Err(malformed("method: must be 1 to 16 ASCII letters"));
        }
        // Control characters (newlines above all) could shift the fields of
        // the newline-joined string to sign; they never occur in a real
        // request line.
        if !req.path.starts_with('/')
            || req.path.len() > MAX_PATH_BYTES
            || req.path.chars().any(char::is_control)
        {
            return Err(malformed(
                "path: must start with '/', at most 8192 bytes, no control characters",
            ));
        }
        if has_dot_segment(&req.path) {
            return Err(malformed(
                "path: '.' and '..' segments are refused however written (encoded, before ';'); resolve them first",
            ));
        }
        if req.query.len() > MAX_QUERY_BYTES || req.query.chars().any(char::is_control) {
            return Err(malformed(
                "query: at most 8192 bytes, no control characters",
            ));
        }
        // A `#` starts a fragment, which HTTP clients never send. nginx
        // routes `/login#x` as `/login` and passes it on as sent, where the
        // application reads `/login` too: checked as sent, it would escape
        // every rule and limit on `/login`.
        if req.path.contains('#') {
            return Err(malformed(
                "path: a '#' starts a fragment, which is never sent; send the path without it",
            ));
        }
        if req.query.contains('#') {
            return Err(malformed(
                "query: a '#' starts a fragment, which is never sent; send the query without it",
            ));
        }
        if req.body.len() > self.settings.max_body_bytes {
            return Err(malformed(format!(
                "body: larger than the limit of {} bytes",
                self.settings.max_body_bytes
            )));
        }
        let credential = if bearer {
            bearer_credential(req)?
        } else {
            signed_credential(req)?
        };
        if req.limits.len() > MAX_LIMITS {
            return Err(malformed("limits: at most 8"));
        }
        let mut limits = SmallVec::new();
        for l in &req.limits {
            if !is_valid_name(&l.policy) || ring.policy(&l.policy).is_none() {
                return Err(malformed("limits: unknown policy"));
            }
            if l.descriptor.is_empty()
                || l.descriptor.len() > MAX_DESCRIPTOR_BYTES
                || l.descriptor.chars().any(char::is_control)
            {
                return Err(malformed(
                    "limits: descriptor must be 1 to 256 bytes, no control characters",
                ));
            }
            let pair = (l.policy.as_str(), l.descriptor.as_str());
            if limits.contains(&pair) {
                return Err(malformed("limits: the same policy and descriptor twice"));
            }
            limits.push(pair);
        }
        if req.cost > MAX_COST {
            return Err(malformed("cost: at most 1000000"));
        }
        if !is_valid_client_identity(&req.client_identity) {
            return Err(malformed(
                "client_identity: at most 1024 characters, no control characters",
            ));
        }
        if !is_valid_request_id(&req.request_id) {
            return Err(malformed(
                "request_id: at most 128 printable ASCII characters",
            ));
        }
        let client_address = parse_client_address(&req.client_address)
            .map_err(|()| malformed("client_address: must be an IPv4 or IPv6 address"))?;
        Ok(Valid {
            credential,
            client_address,
            limits,
            cost: u64::from(req.cost.max(1)),
        })
    }

    /// Steps 3 and 4: who sent this, under the failure budget of the
    /// request's source, and is it fresh. `Err` is the denial to answer with.
    ///
    /// Failures are charged to the source, never to the key they name, so
    /// knowing a key id gives no power over its owner. A source that is one
    /// end client (a forwarded identity or address) is refused before any
    /// verification once its budget is spent: that throttles guessing. A
    /// source that stands for many clients (only the calling certificate is
    /// known) cannot be refused that way without refusing the innocent, so
    /// there a genuine request always passes and only failures are answered
    /// LOCKED_OUT.
    fn authenticate(
        &self,
        req: &CheckRequest,
        ring: &KeyRing,
        valid: &Valid<'_>,
        source: &Source<'_>,
        now: Nanos,
    ) -> Result<Arc<ApiKey>, Box<CheckResponse>> {
        let locked_out = |wait| {
            Box::new(deny_with_retry(
                Reason::LockedOut,
                wait,
                "too many failed attempts from this client",
            ))
        };
        // A shared source's budget is only looked at when its request
        // fails: a genuine request passes either way.
        if !source.is_shared()
            && let Some(wait) = self.failure_budget(source.state_key(&self.engine), now, false)
        {
            return Err(locked_out(wait));
        }

        let now_secs = i64::try_from(now.whole_secs()).unwrap_or(i64::MAX);
        let key = match &valid.credential {
            Credential::Bearer(api_key) => ring
                .bearer(api_key)
                .filter(|k| req.key_id.is_empty() || req.key_id == k.id),
            // Unknown, revoked and badly signed all look the same, and take
            // the same time (a decoy secret for unknown keys).
            signed => {
                let key = ring.key(&req.key_id).filter(|k| k.kind == KeyKind::Hmac);
                let genuine = signed.verifies(key.map(|k| k.as_ref()), now_secs);
                key.filter(|_| genuine)
            }
        };
        let Some(key) = key else {
            let budget = source.state_key(&self.engine);
            if source.is_shared()
                && let Some(wait) = self.failure_budget(budget, now, false)
            {
                return Err(locked_out(wait));
            }
            if !req.dry_run {
                match self.failure_sink.get() {
                    Some(sink) => sink(budget, Limit::Gcra(self.failures)),
                    None => {
                        self.failure_budget(budget, now, true);
                    }
                }
            }
            let message = match valid.credential {
                Credential::Signed { .. } => "the request signature could not be verified",
                Credential::Bearer(_) => "the API key is not valid",
                Credential::Webhook(_) => "the webhook signature could not be verified",
            };
            return Err(Box::new(deny(Reason::Unauthenticated, message)));
        };

        // Freshness only for genuine requests: a STALE answer must not
        // reveal that a key exists. Bearer keys carry no timestamp.
        if let Some(timestamp) = valid.credential.timestamp(req)
            && let Err(stale) = self.freshness.judge(timestamp, now)
        {
            let opens_in = match stale {
                Stale::BeforeFence => self.freshness.fence().opens_in(now),
                _ => None,
            };
            return Err(Box::new(stale_denial(stale, opens_in)));
        }
        Ok(key.clone())
    }

    /// Step 6 for an authenticated request: may this key, from this
    /// client, call this route? The denial if not.
    fn route_denial(
        &self,
        req: &CheckRequest,
        key: &ApiKey,
        client: Option<&str>,
    ) -> Option<CheckResponse> {
        let method = req.method.as_str();
        let path = ServedPath::of(&req.path);
        if !key.may_call(method, &path) {
            return Some(deny(Reason::Forbidden, "this key may not call this route"));
        }
        if !key.may_be_used_by(client) {
            return Some(deny(
                Reason::Forbidden,
                "this key may not be used by this client",
            ));
        }
        if !self.authz.client_may_call(client, method, &path) {
            return Some(deny(
                Reason::Forbidden,
                "this client may not call this route",
            ));
        }
        None
    }

    /// Steps 7 to 9: the replay key and every rate limit, for one atomic
    /// decision.
    fn state_step(
        &self,
        req: &CheckRequest,
        ring: &KeyRing,
        valid: &Valid<'_>,
        key: &ApiKey,
        now: Nanos,
    ) -> Pending {
        let owner = key.id.as_bytes();
        // Bearer requests carry no nonce: there is nothing to replay-check.
        let replay_key = match &valid.credential {
            Credential::Signed { signed, signature } => Some(match signed.scheme {
                Scheme::WardenV1 => self
                    .engine
                    .replay_key(owner, &[b"nonce", req.nonce.as_bytes()]),
                Scheme::TsBody => self.engine.replay_key(owner, &[b"signature", signature]),
            }),
            Credential::Webhook(d) => Some(self.engine.replay_key(
                owner,
                &[b"webhook", d.provider.name().as_bytes(), &d.replay_id],
            )),
            Credential::Bearer(_) => None,
        };
        // The replay key lives exactly as long as the timestamp is fresh;
        // without a signed time, for the configured window.
        let timestamp = valid.credential.timestamp(req);
        let forget_at = match timestamp {
            Some(t) => self.freshness.forget_at(t),
            None => self.unsigned_forget_at(now),
        };

        let count = key.policies.len() + valid.limits.len();
        let mut reported = Reported::with_capacity(count);
        let mut limits: Vec<(StateKey, Limit)> = Vec::with_capacity(count);
        for p in &key.policies {
            limits.push((
                self.engine.key(owner, &[b"policy", p.name.as_bytes()]),
                p.limit,
            ));
            reported.push(p, p.name.clone());
        }
        for &(policy, descriptor) in &valid.limits {
            let p = ring.policy(policy).expect("validated policy");
            let pool = self.engine.pools().policy(policy);
            limits.push((
                self.engine
                    .key_in(pool, descriptor.as_bytes(), &[b"limit", policy.as_bytes()]),
                p.limit,
            ));
            let mut name = String::with_capacity(policy.len() + 1 + descriptor.len());
            name.push_str(policy);
            name.push(':');
            name.push_str(descriptor);
            reported.push(p, name);
        }

        Pending {
            now,
            nonce: replay_key.map(|k| (k, forget_at)),
            limits,
            cost: valid.cost,
            commit: !req.dry_run,
            timestamp,
            reported,
            caller: Caller {
                key_id: key.id.clone(),
                owner: key.owner.clone(),
                scopes: key.scopes.clone(),
            },
        }
    }

    /// One failure against the budget of `key`, taken only when `commit`
    /// (a look when not). `Some(wait)` when the budget is spent: how long
    /// until it refills. If the pool of failure budgets is full and nothing
    /// can be evicted, a failure goes unrecorded (counted as refused):
    /// genuine requests are never refused to make room for it.
    fn failure_budget(&self, key: StateKey, now: Nanos, commit: bool) -> Option<Nanos> {
        let limits = [(key, Limit::Gcra(self.failures))];
        let failure = Request {
            nonce: None,
            limits: &limits,
            cost: 1,
            commit,
        };
        match self.engine.decide(now, &failure) {
            Outcome::Limited {
                allowed: false,
                limits,
            } => limits[0].retry_after,
            _ => None,
        }
    }
}

/// Where a check stands after [`Checker::begin`].
#[derive(Debug)]
pub enum Step {
    /// Decided without state: a denial (or a malformed request).
    Done(Answer),
    /// Authenticated and allowed on its route: the replay key and the rate
    /// limits are left to decide, atomically.
    State(Pending),
}

/// The state step of one check: what the engine (or a cluster's owners)
/// must decide, and what the answer is built from.
#[derive(Debug)]
pub struct Pending {
    /// When the check began; the local decision is made at this instant.
    pub now: Nanos,
    /// The replay key and when it may be forgotten (signed requests).
    pub nonce: Option<(ReplayKey, Nanos)>,
    /// Every limit: the key's policies, then the request limits.
    pub limits: Vec<(StateKey, Limit)>,
    pub cost: u64,
    /// False for a dry run.
    pub commit: bool,
    /// The signed timestamp, for a cluster owner's takeover fence.
    pub timestamp: Option<i64>,
    reported: Reported,
    caller: Caller,
}

/// What an answer says about each limit, gathered while the limits are:
/// the `RateLimit-Policy` header (each policy's item, written when the
/// policy was loaded, joined) and, per limit, the name its status carries
/// (`policy` or `policy:descriptor`) and its limit, as the answer's status
/// of it, whose counts the decision fills in.
#[derive(Debug, Default)]
struct Reported {
    quota: String,
    limits: Vec<LimitStatus>,
}

impl Reported {
    fn with_capacity(limits: usize) -> Self {
        Self {
            quota: String::with_capacity(48 * limits),
            limits: Vec::with_capacity(limits),
        }
    }

    fn push(&mut self, policy: &Policy, name: String) {
        if !self.quota.is_empty() {
            self.quota.push_str(", ");
        }
        self.quota.push_str(policy.quota_item());
        self.limits.push(LimitStatus {
            name,
            limit: policy.limit.limit(),
            ..LimitStatus::default()
        });
    }
}

impl Pending {
    /// A step of limits only, with no key and no nonce: the Envoy rate
    /// limit service's.
    pub fn limits_only(
        now: Nanos,
        limits: Vec<(StateKey, Limit)>,
        cost: u64,
        commit: bool,
    ) -> Self {
        Self {
            now,
            nonce: None,
            limits,
            cost,
            commit,
            timestamp: None,
            reported: Reported::default(),
            caller: Caller::default(),
        }
    }

    /// Its replay key alone, as a dry run: what a `Forget` sends to the
    /// key's owner.
    pub fn nonce_only(&self) -> Pending {
        Pending {
            nonce: self.nonce,
            ..Pending::limits_only(self.now, Vec::new(), 1, false)
        }
    }

    /// The answer to a `Forget` of this request: its replay key is no
    /// longer remembered.
    pub fn forgotten(self) -> Answer {
        Answer {
            key_id: None,
            response: CheckResponse {
                decision: Decision::Allow as i32,
                reason: Reason::Ok as i32,
                http_status: 200,
                caller: Some(self.caller),
                ..Default::default()
            },
        }
    }

    /// The engine's view of this step.
    pub fn request(&self) -> Request<'_> {
        Request {
            nonce: self.nonce,
            limits: &self.limits,
            cost: self.cost,
            commit: self.commit,
        }
    }

    /// The answer, from the decision on [`Self::request`].
    /// A cluster's owners may refuse a step as stale by their clocks and
    /// takeover fences (`Err`).
    pub fn finish(self, outcome: Result<Outcome, Stale>) -> Result<Answer, CheckError> {
        let mut response = match outcome {
            Err(stale @ Stale::TakenOver { retry_after }) => stale_denial(stale, retry_after),
            Err(stale) => stale_denial(stale, None),
            Ok(Outcome::Replay) => deny(Reason::Replay, "this request was already used"),
            Ok(Outcome::NonceSetFull) => return Err(CheckError::ReplayCacheFull),
            Ok(Outcome::StateFull(pool)) => return Err(CheckError::StateFull(pool)),
            Ok(Outcome::Limited {
                allowed,
                limits: verdicts,
            }) => {
                let mut response = if allowed {
                    CheckResponse {
                        decision: Decision::Allow as i32,
                        reason: Reason::Ok as i32,
                        http_status: 200,
                        ..Default::default()
                    }
                } else {
                    let denied = verdicts.iter().filter(|v| !v.allowed);
                    match denied.map(|v| v.retry_after).collect::<Option<Vec<_>>>() {
                        Some(waits) => {
                            let wait = waits.into_iter().max().unwrap_or(Nanos::ZERO);
                            deny_with_retry(Reason::RateLimited, wait, "rate limit exceeded")
                        }
                        None => deny(
                            Reason::RateLimited,
                            "cost: more than a limit allows at once",
                        ),
                    }
                };
                report_limits(&mut response, self.reported, &verdicts);
                response
            }
        };
        // An allowed answer names its caller, and logs read the key from it.
        let key_id = if response.decision() == Decision::Allow {
            response.caller = Some(self.caller);
            None
        } else {
            Some(self.caller.key_id)
        };
        Ok(Answer { response, key_id })
    }
}

/// The signature fields of a signed request.
fn signed_credential(req: &CheckRequest) -> Result<Credential<'_>, Malformed> {
    if let Some(provider) = Provider::parse(&req.scheme) {
        return webhook_credential(req, provider);
    }
    if !req.headers.is_empty() {
        return Err(malformed("headers: only with a webhook scheme"));
    }
    let scheme = Scheme::parse(&req.scheme)
        .ok_or_else(|| {
            malformed("scheme: must be \"warden-v1\", \"ts-body\", \"standard-webhooks\", \"stripe\", \"github\" or \"slack\"")
        })?;
    let body = match (req.body_sha256.len(), scheme) {
        (0, _) => Body::Bytes(&req.body),
        (_, Scheme::TsBody) => {
            return Err(malformed(
                "body_sha256: not allowed with scheme \"ts-body\", send the body",
            ));
        }
        (_, _) if !req.body.is_empty() => {
            return Err(malformed(
                "body_sha256: give either body or body_sha256, not both",
            ));
        }
        (32, _) => Body::Sha256(req.body_sha256.as_slice().try_into().expect("length is 32")),
        _ => return Err(malformed("body_sha256: must be 32 bytes")),
    };
    if req.timestamp <= 0 {
        return Err(malformed("timestamp: must be Unix seconds"));
    }
    match scheme {
        Scheme::WardenV1 if !is_valid_nonce(&req.nonce) => {
            return Err(malformed(
                "nonce: must be 16 to 64 characters of [A-Za-z0-9_-]",
            ));
        }
        Scheme::TsBody if !req.nonce.is_empty() => {
            return Err(malformed("nonce: must be empty with scheme \"ts-body\""));
        }
        _ => {}
    }
    let Some(signature) = crate::signing::hex32(&req.signature) else {
        return Err(malformed("signature: must be 64 hex characters"));
    };
    Ok(Credential::Signed {
        signed: Signed {
            scheme,
            timestamp: req.timestamp,
            nonce: &req.nonce,
            method: &req.method,
            path: &req.path,
            query: &req.query,
            body,
        },
        signature,
    })
}

/// The API key of a bearer request; signature fields must be absent.
fn bearer_credential(req: &CheckRequest) -> Result<Credential<'_>, Malformed> {
    if req.api_key.len() > MAX_API_KEY_BYTES || !req.api_key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(malformed("api_key: at most 256 printable ASCII characters"));
    }
    if !req.signature.is_empty() || !req.nonce.is_empty() || !req.scheme.is_empty() {
        return Err(malformed(
            "api_key: give either an API key or a signature, not both",
        ));
    }
    Ok(Credential::Bearer(&req.api_key))
}

/// A webhook delivery: the provider's headers and the raw body; the
/// fields of warden's own schemes must be empty.
fn webhook_credential(req: &CheckRequest, provider: Provider) -> Result<Credential<'_>, Malformed> {
    if req.timestamp != 0
        || !req.nonce.is_empty()
        || !req.signature.is_empty()
        || !req.body_sha256.is_empty()
    {
        return Err(malformed(
            "a webhook scheme takes the provider's headers and the body; timestamp, nonce, signature and body_sha256 must be empty",
        ));
    }
    let size: usize = req.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    if req.headers.len() > MAX_WEBHOOK_HEADERS
        || size > MAX_WEBHOOK_HEADER_BYTES
        || req
            .headers
            .iter()
            .any(|(k, v)| k.is_empty() || k.chars().chain(v.chars()).any(char::is_control))
    {
        return Err(malformed(
            "headers: at most 16, 8 KiB in all, no control characters",
        ));
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    Delivery::read(provider, &header, &req.body)
        .map(Credential::Webhook)
        .map_err(|e| Malformed(e.0))
}

/// Step 2, second part: the caller's grant against what the request asks for.
fn authorize(grant: &Grant<'_>, req: &CheckRequest, valid: &Valid<'_>) -> Result<(), CheckError> {
    if !req.key_id.is_empty() && !grant.may_check_key(&req.key_id) {
        return Err(CheckError::PermissionDenied(
            "this client certificate may not check requests for this key",
        ));
    }
    if !valid
        .limits
        .iter()
        .all(|(policy, _)| grant.may_use_policy(policy))
    {
        return Err(CheckError::PermissionDenied(
            "this client certificate may not use this policy",
        ));
    }
    if !req.client_identity.is_empty() && !grant.has(Role::ForwardIdentity) {
        return Err(CheckError::PermissionDenied(
            "this client certificate may not forward client identities",
        ));
    }
    Ok(())
}

/// A forwarded end-client identity as validation accepts it (empty is fine).
fn is_valid_client_identity(id: &str) -> bool {
    id.len() <= MAX_CLIENT_IDENTITY_BYTES && !id.chars().any(char::is_control)
}

/// A forwarded client address: empty, or an IPv4 or IPv6 address.
fn parse_client_address(text: &str) -> Result<Option<IpAddr>, ()> {
    match text {
        "" => Ok(None),
        text if text.len() <= MAX_CLIENT_ADDRESS_BYTES => text.parse().map(Some).map_err(|_| ()),
        _ => Err(()),
    }
}

/// Where a request says it came from, for the audit log: the forwarded
/// client identity, else the forwarded address, when validation would
/// accept them (the request itself may be malformed elsewhere).
pub fn forwarded_source(req: &CheckRequest) -> Option<String> {
    if !req.client_identity.is_empty() && is_valid_client_identity(&req.client_identity) {
        return Some(req.client_identity.clone());
    }
    parse_client_address(&req.client_address)
        .ok()
        .flatten()
        .map(|address| address.to_string())
}

/// Request ids: at most 128 printable ASCII characters (empty is fine).
pub fn is_valid_request_id(id: &str) -> bool {
    id.len() <= MAX_REQUEST_ID_BYTES && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Gives every policy of `ring` its cap as a request limit.
fn set_policy_caps(engine: &Engine, ring: &KeyRing) {
    for p in ring.policies() {
        engine
            .pools()
            .set_cap(engine.pools().policy(&p.name), p.max_entries);
    }
}

/// Where a failed attempt came from: whose failure budget it spends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source<'a> {
    /// The end client's certificate identity, forwarded by the gateway.
    ClientIdentity(&'a str),
    /// The end client's address (IPv6 by its /64: one host has them all).
    Address(IpAddr),
    /// Only the calling certificate is known: it speaks for many clients.
    Caller(&'a str),
}

impl<'a> Source<'a> {
    fn of(req: &'a CheckRequest, address: Option<IpAddr>, caller: &'a CallerIdentity) -> Self {
        Self::end_client(&req.client_identity, address).unwrap_or(Source::Caller(caller.as_str()))
    }

    /// The end client a gateway forwarded, if any: its identity, else its
    /// address.
    fn end_client(identity: &'a str, address: Option<IpAddr>) -> Option<Self> {
        if !identity.is_empty() {
            return Some(Source::ClientIdentity(identity));
        }
        Some(match address? {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                Source::Address(IpAddr::V6(prefix.into()))
            }
            IpAddr::V6(v6) => {
                Source::Address(IpAddr::V4(v6.to_ipv4_mapped().expect("checked above")))
            }
            v4 => Source::Address(v4),
        })
    }

    /// Whether refusing this source would refuse clients other than the one
    /// that failed.
    fn is_shared(&self) -> bool {
        matches!(self, Source::Caller(_))
    }

    fn state_key(&self, engine: &Engine) -> StateKey {
        match self {
            Source::ClientIdentity(id) => {
                engine.key_in(Pool::FAILURES, id.as_bytes(), &[b"failures:identity"])
            }
            Source::Address(IpAddr::V4(a)) => {
                engine.key_in(Pool::FAILURES, &a.octets(), &[b"failures:address"])
            }
            Source::Address(IpAddr::V6(a)) => {
                engine.key_in(Pool::FAILURES, &a.octets(), &[b"failures:address"])
            }
            Source::Caller(id) => {
                engine.key_in(Pool::FAILURES, id.as_bytes(), &[b"failures:caller"])
            }
        }
    }
}

fn http_status(reason: Reason) -> u32 {
    match reason {
        Reason::Ok => 200,
        Reason::Malformed => 400,
        Reason::Unauthenticated | Reason::Stale | Reason::Replay => 401,
        Reason::Forbidden => 403,
        Reason::RateLimited | Reason::LockedOut => 429,
        Reason::Unspecified => 500,
    }
}

/// A MALFORMED answer to a call this request cannot serve.
pub fn malformed_answer(message: &str) -> Answer {
    Answer {
        response: deny(Reason::Malformed, message),
        key_id: None,
    }
}

fn deny(reason: Reason, message: impl Into<String>) -> CheckResponse {
    CheckResponse {
        decision: Decision::Deny as i32,
        reason: reason as i32,
        http_status: http_status(reason),
        message: message.into(),
        ..Default::default()
    }
}

/// A STALE answer. While the fence that refused it (this process's, or a
/// cluster owner's takeover fence) has not opened, a request may well be a
/// fresh one from a correct clock, signed a moment too early: the answer
/// says when signing again can succeed (`opens_in`), as a rate-limited one
/// does.
fn stale_denial(stale: Stale, opens_in: Option<Nanos>) -> CheckResponse {
    match opens_in {
        Some(wait) => deny_with_retry(Reason::Stale, wait, stale.message()),
        None => deny(Reason::Stale, stale.message()),
    }
}

fn deny_with_retry(reason: Reason, wait: Nanos, message: &str) -> CheckResponse {
    let mut response = deny(reason, message);
    response.retry_after_ms = ceil_millis(wait);
    response
        .headers
        .insert("Retry-After".to_owned(), wait.ceil_secs().to_string());
    response
}

/// Each limit's status, and the `RateLimit-Policy` and `RateLimit` headers
/// (IETF httpapi ratelimit-headers draft): every limit's quota and window,
/// and every limit's remaining quota and seconds to reset. Request-limit
/// descriptors are not echoed to clients. This runs for every check, so
/// the per-check header is written in place, numbers without `fmt`.
fn report_limits(response: &mut CheckResponse, reported: Reported, verdicts: &[LimitVerdict]) {
    if reported.limits.is_empty() {
        return;
    }
    let mut limits = reported.limits;
    let mut state = String::with_capacity(reported.quota.len());
    let mut digits = itoa::Buffer::new();
    for (i, (status, v)) in limits.iter_mut().zip(verdicts).enumerate() {
        status.remaining = v.remaining;
        status.reset_after_ms = ceil_millis(v.reset_after);
        if i > 0 {
            state.push_str(", ");
        }
        // Headers name the policy only, never a descriptor: the name is
        // `policy` or `policy:descriptor`, and no policy name holds a colon
        // (`model::is_valid_name`).
        let policy = status.name.split(':').next().unwrap_or_default();
        state.push('"');
        state.push_str(policy);
        state.push_str("\";r=");
        state.push_str(digits.format(v.remaining));
        state.push_str(";t=");
        state.push_str(digits.format(v.reset_after.ceil_secs()));
    }
    let headers = &mut response.headers;
    headers.insert("RateLimit-Policy".to_owned(), reported.quota);
    headers.insert("RateLimit".to_owned(), state);
    response.limits = limits;
}

#[cfg(test)]
mod tests;
