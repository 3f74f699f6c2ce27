//! `warden.v1.Warden`: `Check` and `CheckStream`.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status, Streaming};
use warden_client::proto::warden_server::Warden;
use warden_client::proto::{
    CheckRequest, CheckResponse, Decision, Reason, SignWebhookRequest, SignWebhookResponse,
};
use warden_client::reason_name;

use super::unary::UnaryMethod;
use super::{Admission, CallMetrics, CallPermit, caller_of};
use crate::alerts::{Alerts, Kind, SubjectKind};
use crate::audit::{AuditLog, Event, Subject};
use crate::check::{Answer, CallerIdentity, CheckError, Checker, Pending, Step};
use crate::cluster::ClusterState;
use crate::engine::Outcome;
use crate::freshness::Stale;
use crate::webhooks::SignRefusal;
use warden_client::codec::decode_check_request;

/// Answers checks with the shared [`Checker`].
#[derive(Debug, Clone)]
pub struct WardenService {
    checker: Arc<Checker>,
    /// `Some` in a cluster: state steps go to their owners.
    cluster: Option<Arc<ClusterState>>,
    alerts: Arc<Alerts>,
    audit: Option<Arc<AuditLog>>,
    admission: Admission,
}

impl WardenService {
    pub fn new(
        checker: Arc<Checker>,
        cluster: Option<Arc<ClusterState>>,
        alerts: Arc<Alerts>,
        audit: Option<Arc<AuditLog>>,
        admission: Admission,
    ) -> Self {
        Self {
            checker,
            cluster,
            alerts,
            audit,
            admission,
        }
    }
}

impl WardenService {
    /// One check as `caller`, with its logs, metrics, alerts and audit: the
    /// one path of a unary `Check`, each request of a `CheckStream` and the
    /// forward-auth endpoint.
    pub async fn check_as(
        &self,
        req: &CheckRequest,
        caller: &CallerIdentity,
    ) -> Result<CheckResponse, Status> {
        check_one(&self.context(), req, caller, Intent::Check).await
    }

    /// A unary `Check`: admitted among the calls in flight, as the caller
    /// its connection names, timed. Reached through tonic's generated
    /// service and through [`Unary`](super::unary::Unary) alike.
    pub async fn unary_check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<CheckResponse, Status> {
        let _permit = self.admission.admit(&request)?;
        let started = Instant::now();
        let caller = caller_of(&request);
        let answer = self.check_as(&request.into_inner(), &caller).await;
        CallMetrics::get()
            .check_seconds
            .record(started.elapsed().as_secs_f64());
        answer
    }

    fn context(&self) -> Context<'_> {
        Context {
            checker: &self.checker,
            cluster: self.cluster.as_deref(),
            alerts: &self.alerts,
            audit: self.audit.as_deref(),
        }
    }

    pub fn checker(&self) -> &Checker {
        &self.checker
    }

    /// Decides a state step here, or at its owners in a cluster.
    pub async fn decide_state(&self, pending: &Pending) -> Result<Outcome, CheckError> {
        match decide_state(&self.checker, self.cluster.as_deref(), pending).await? {
            Ok(outcome) => Ok(outcome),
            // Only signed requests carry a timestamp to judge (the
            // callers of this one, gateways' limits, carry none).
            Err(_) => Err(CheckError::Unavailable),
        }
    }
}

/// One state step: on this process's engine, or by the owning nodes of a
/// cluster (which may refuse it as fenced).
async fn decide_state(
    checker: &Checker,
    cluster: Option<&ClusterState>,
    pending: &Pending,
) -> Result<Result<Outcome, Stale>, CheckError> {
    match cluster {
        None => Ok(Ok(checker.engine().decide(pending.now, &pending.request()))),
        // Boxed: the cluster step's future (peer calls, retries) is ~4.5 KB,
        // and unboxed it would sit in every check's future, single node
        // included, which each unary call allocates and copies whole.
        Some(cluster) => Box::pin(cluster.decide(pending))
            .await
            .map_err(|_| CheckError::Unavailable),
    }
}

/// What a check needs besides the request: shared by unary and streams.
struct Context<'a> {
    checker: &'a Checker,
    cluster: Option<&'a ClusterState>,
    alerts: &'a Alerts,
    audit: Option<&'a AuditLog>,
}

/// A unary `Check`, read and answered by [`Unary`](super::unary::Unary).
impl UnaryMethod for WardenService {
    type Request = CheckRequest;
    type Response = CheckResponse;
    const PATH: &'static str = "/warden.v1.Warden/Check";

    fn decode(message: bytes::Bytes) -> Option<CheckRequest> {
        // Undecodable is answered in-band (MALFORMED), as tonic's codec does.
        Some(decode_check_request(message))
    }

    async fn answer(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        self.unary_check(request).await.map(Response::new)
    }
}

#[tonic::async_trait]
impl Warden for WardenService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        self.unary_check(request).await.map(Response::new)
    }

    async fn forget(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let _permit = self.admission.admit(&request)?;
        let caller = caller_of(&request);
        check_one(
            &self.context(),
            &request.into_inner(),
            &caller,
            Intent::Forget,
        )
        .await
        .map(Response::new)
    }

    async fn sign_webhook(
        &self,
        request: Request<SignWebhookRequest>,
    ) -> Result<Response<SignWebhookResponse>, Status> {
        let _permit = self.admission.admit(&request)?;
        let caller = caller_of(&request);
        let req = request.into_inner();
        match self.checker.sign_webhook(&req, &caller) {
            Ok(signed) => {
                metrics::counter!("warden_webhooks_signed_total", "scheme" => if req.scheme == "stripe" { "stripe" } else { "standard-webhooks" })
                    .increment(1);
                tracing::debug!(
                    event = "webhook_signed",
                    key_id = req.key_id.as_str(),
                    caller = caller.as_str(),
                    message_id = signed.message_id.as_str(),
                    "outbound webhook signed"
                );
                Ok(Response::new(signed))
            }
            Err(SignRefusal::PermissionDenied(why)) => {
                metrics::counter!("warden_caller_denied_total").increment(1);
                tracing::warn!(
                    event = "caller_denied",
                    caller = caller.as_str(),
                    key_id = loggable_key_id(&req.key_id),
                    reason = why,
                    "SignWebhook refused"
                );
                Err(Status::permission_denied(why))
            }
            Err(SignRefusal::Invalid(why)) => Err(Status::invalid_argument(why)),
            Err(SignRefusal::NotFound) => {
                Err(Status::not_found("no such key with an active secret"))
            }
        }
    }

    type CheckStreamStream = AnswerStream;

    async fn check_stream(
        &self,
        request: Request<Streaming<CheckRequest>>,
    ) -> Result<Response<Self::CheckStreamStream>, Status> {
        // An open stream is one call in flight, for as long as it is open.
        let permit = self.admission.admit(&request)?;
        let stream = OpenStream {
            caller: caller_of(&request),
            inbound: request.into_inner(),
            service: self.clone(),
            _permit: permit,
            ended: false,
        };
        // Each answer is made when HTTP/2 asks for the next one: the
        // request is read and checked in the task that sends the answer,
        // in order, one answer per request. No task of its own and no
        // queue between them (a hand-over per answer, measured). HTTP/2
        // asks only while the client's flow-control window has room, so a
        // client that stops reading answers stops its requests being read:
        // back-pressure, as with the bounded queue before.
        let answers = futures_util::stream::unfold(stream, |mut s| async move {
            if s.ended {
                return None;
            }
            let answer = match s.inbound.message().await {
                Ok(Some(req)) => {
                    let started = Instant::now();
                    let answer = s.service.check_as(&req, &s.caller).await;
                    CallMetrics::get()
                        .stream_seconds
                        .record(started.elapsed().as_secs_f64());
                    answer
                }
                Ok(None) => return None,
                Err(status) => Err(status),
            };
            // A failed answer is the last.
            s.ended = answer.is_err();
            Some((answer, s))
        });
        Ok(Response::new(Box::pin(answers)))
    }
}

/// The answers of one `CheckStream`, in the order of its requests.
pub type AnswerStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<CheckResponse, Status>> + Send>>;

/// What one open `CheckStream` holds while it answers.
struct OpenStream {
    caller: CallerIdentity,
    inbound: Streaming<CheckRequest>,
    /// What every check runs through (the Arcs the service holds).
    service: WardenService,
    /// Its place among the calls in flight, given back when it closes.
    _permit: CallPermit,
    ended: bool,
}

/// What a call asks of the pipeline.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Intent {
    /// Decide the request (`Check`, `CheckStream`).
    Check,
    /// Forget that it was accepted (`Forget`).
    Forget,
}

/// Runs the pipeline for one request: here, or with its state step decided
/// by the owning nodes of a cluster.
async fn run_check(
    ctx: &Context<'_>,
    req: &CheckRequest,
    caller: &CallerIdentity,
    intent: Intent,
) -> Result<Answer, CheckError> {
    let pending = match ctx.checker.begin(req, caller)? {
        Step::Done(answer) => return Ok(answer),
        Step::State(pending) => pending,
    };
    if intent == Intent::Forget {
        return forget(ctx, pending).await;
    }
    let outcome = decide_state(ctx.checker, ctx.cluster, &pending).await?;
    pending.finish(outcome)
}

/// Forgets a genuine request's replay key, here or at its owner.
async fn forget(ctx: &Context<'_>, pending: Pending) -> Result<Answer, CheckError> {
    let Some((replay, _)) = pending.nonce else {
        return Ok(crate::check::malformed_answer(
            "api_key: a bearer key's request is not remembered; there is nothing to forget",
        ));
    };
    match ctx.cluster {
        None => {
            ctx.checker.engine().forget(replay);
        }
        Some(cluster) => Box::pin(cluster.forget(&pending))
            .await
            .map_err(|_| CheckError::Unavailable)?,
    }
    let answer = pending.forgotten();
    metrics::counter!("warden_requests_forgotten_total").increment(1);
    tracing::info!(
        event = "request_forgotten",
        key_id = answer.key_id.as_deref().unwrap_or("-"),
        "an accepted request was forgotten; it may be accepted once more"
    );
    Ok(answer)
}

/// Runs one check and logs a denial. The log line carries the key id,
/// caller, reason and request id — never the signature, a secret or the body.
async fn check_one(
    ctx: &Context<'_>,
    req: &CheckRequest,
    caller: &CallerIdentity,
    intent: Intent,
) -> Result<CheckResponse, Status> {
    let request_id = loggable_request_id(&req.request_id);
    match run_check(ctx, req, caller, intent).await {
        Ok(decision) => {
            let r = &decision.response;
            if intent == Intent::Check {
                CallMetrics::get().checked(r.decision(), r.reason());
            }
            if r.decision() == Decision::Deny {
                raise_alerts(ctx, r.reason(), decision.key_id.as_deref(), caller);
                if let (Some(audit), true) = (ctx.audit, is_security_denial(r.reason())) {
                    audit.count_denial(Subject {
                        action: "check.denied",
                        reason: reason_name(r.reason()),
                        key_id: decision.key_id.clone().unwrap_or_default(),
                        actor: caller.as_str().to_owned(),
                        source: crate::check::forwarded_source(req)
                            .unwrap_or_else(|| "-".to_owned()),
                    });
                }
                tracing::info!(
                    event = "check_denied",
                    key_id = decision.key_id.as_deref().unwrap_or("-"),
                    caller = caller.as_str(),
                    reason = reason_name(r.reason()),
                    request_id,
                    message = %r.message,
                    "check denied"
                );
            }
            Ok(decision.response)
        }
        Err(err) => {
            match &err {
                CheckError::PermissionDenied(why) => {
                    metrics::counter!("warden_caller_denied_total").increment(1);
                    if let Some(audit) = ctx.audit {
                        audit.count_denial(Subject {
                            action: "call.denied",
                            reason: why,
                            key_id: loggable_key_id(&req.key_id).to_owned(),
                            actor: caller.as_str().to_owned(),
                            source: crate::check::forwarded_source(req)
                                .unwrap_or_else(|| "-".to_owned()),
                        });
                    }
                    tracing::warn!(
                        event = "caller_denied",
                        caller = caller.as_str(),
                        key_id = loggable_key_id(&req.key_id),
                        request_id,
                        reason = why,
                        "call refused"
                    );
                }
                CheckError::StateFull(_) => tracing::warn!(
                    event = "state_full",
                    caller = caller.as_str(),
                    request_id,
                    "rate-limit state is full and nothing could be evicted; refusing the check"
                ),
                CheckError::Unavailable => tracing::warn!(
                    event = "state_unavailable",
                    caller = caller.as_str(),
                    request_id,
                    "the cluster nodes owning this check's state did not decide it in time"
                ),
                CheckError::ReplayCacheFull => tracing::warn!(
                    event = "replay_cache_full",
                    caller = caller.as_str(),
                    request_id,
                    "replay cache full; refusing checks"
                ),
            }
            Err(refusal(&err))
        }
    }
}

/// The gRPC status of a check refused as a whole, counted by cause: for
/// `Check` and for the gateway faces that decide state.
pub fn refusal(err: &CheckError) -> Status {
    count_refusal(err);
    match err {
        CheckError::PermissionDenied(why) => Status::permission_denied(*why),
        CheckError::StateFull(_) | CheckError::ReplayCacheFull => {
            Status::resource_exhausted(err.to_string())
        }
        CheckError::Unavailable => Status::unavailable(err.to_string()),
    }
}

/// Counts a check refused as a whole by its cause
/// (`warden_check_errors_total`), also where the refusal is answered
/// otherwise than as a failed call (Envoy's rate limit service answers a
/// full state `OVER_LIMIT`).
pub fn count_refusal(err: &CheckError) {
    let cause = match err {
        CheckError::PermissionDenied(_) => "permission_denied",
        CheckError::StateFull(_) => "state_full",
        CheckError::Unavailable => "unavailable",
        CheckError::ReplayCacheFull => "replay_cache_full",
    };
    metrics::counter!("warden_check_errors_total", "cause" => cause).increment(1);
}

/// Denials that go to the audit log (tallied per subject and window): the
/// ones that suggest an attack or a misuse, not ordinary rate limiting or
/// malformed input.
fn is_security_denial(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::Unauthenticated
            | Reason::Replay
            | Reason::LockedOut
            | Reason::Forbidden
            | Reason::Stale
    )
}

/// Counts a denial towards the anomaly alerts and reports any alert raised:
/// one log line, one metric and one audit record per alert, not per denial.
fn raise_alerts(ctx: &Context<'_>, reason: Reason, key_id: Option<&str>, caller: &CallerIdentity) {
    let kind = match reason {
        Reason::Unauthenticated => Kind::BadSignature,
        Reason::Replay => Kind::Replay,
        Reason::LockedOut => Kind::Lockout,
        Reason::RateLimited => Kind::RateLimited,
        _ => return,
    };
    for alert in ctx.alerts.record(kind, key_id, caller.as_str()) {
        if let Some(audit) = ctx.audit {
            audit.record_later(Event {
                actor: caller.as_str().to_owned(),
                action: "alert",
                key_id: if alert.subject_kind == SubjectKind::Key {
                    alert.subject.clone()
                } else {
                    String::new()
                },
                detail: format!(
                    "{} {}={} reached {} in one window",
                    alert.kind.name(),
                    alert.subject_kind.name(),
                    alert.subject,
                    alert.threshold
                ),
            });
        }
        metrics::counter!("warden_alerts_total", "kind" => alert.kind.name(), "subject_kind" => alert.subject_kind.name())
            .increment(1);
        tracing::warn!(
            event = "anomaly_alert",
            kind = alert.kind.name(),
            subject_kind = alert.subject_kind.name(),
            subject = %alert.subject,
            threshold = alert.threshold,
            "anomaly: threshold reached in this window; no further alert for it until the next window"
        );
    }
}

/// The key id if it is well formed (a malformed one is not logged).
fn loggable_key_id(id: &str) -> &str {
    if crate::model::is_valid_key_id(id) {
        id
    } else {
        "-"
    }
}

/// The request id if it is safe to log as is (validation rejects the rest).
fn loggable_request_id(id: &str) -> &str {
    if !id.is_empty() && crate::check::is_valid_request_id(id) {
        id
    } else {
        "-"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without running it.
    fn future_size<A, F: Future>(_: impl Fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every unary call allocates its check's future and copies it in
    /// whole, so a future that carried the cluster step inline (~5 KB)
    /// cost each call a large allocation and copy, single node included.
    #[test]
    fn a_check_future_stays_small_whatever_the_cluster_step_holds() {
        type Args = (
            &'static Context<'static>,
            &'static CheckRequest,
            &'static CallerIdentity,
        );
        let check =
            future_size(|(ctx, req, caller): Args| check_one(ctx, req, caller, Intent::Check));
        assert!(check <= 1024, "a check's future is {check} bytes");
    }
}
