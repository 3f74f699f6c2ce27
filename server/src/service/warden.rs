//! `warden.v1.Warden`: `Check` and `CheckStream`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Poll, ready};
use std::time::Instant;

use futures_util::FutureExt;

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
use crate::log_budget::{Line, LineBudget};
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
    /// `check_denied` lines a second, whichever face the checks came by.
    denial_lines: Arc<LineBudget>,
}

impl WardenService {
    pub fn new(
        checker: Arc<Checker>,
        cluster: Option<Arc<ClusterState>>,
        alerts: Arc<Alerts>,
        audit: Option<Arc<AuditLog>>,
        admission: Admission,
        denial_lines: LineBudget,
    ) -> Self {
        Self {
            checker,
            cluster,
            alerts,
            audit,
            admission,
            denial_lines: Arc::new(denial_lines),
        }
    }
}

impl WardenService {
    /// One check as `caller`, with its logs, metrics, alerts and audit: the
    /// one path of a unary `Check`, each request of a `CheckStream`, Envoy's
    /// ext_authz and the forward-auth endpoint. Answered at once unless a
    /// cluster's owners must decide its state step (see [`Checked`]).
    pub fn check_as(&self, req: CheckRequest, caller: &CallerIdentity) -> Checked {
        self.begin(req, caller, Intent::Check)
    }

    /// A unary `Check`: admitted among the calls in flight, as the caller
    /// its connection names, timed. Reached through tonic's generated
    /// service and through [`Unary`](super::unary::Unary) alike.
    pub fn unary_check(&self, request: Request<CheckRequest>) -> Checked {
        let permit = match self.admission.admit(&request) {
            Ok(permit) => permit,
            Err(status) => return Checked::now(Err(status)),
        };
        let started = Instant::now();
        let caller = caller_of(&request);
        self.check_as(request.into_inner(), &caller).then(move || {
            drop(permit);
            CallMetrics::get()
                .check_seconds
                .record(started.elapsed().as_secs_f64());
        })
    }

    /// The pipeline for one request, as far as this process can take it:
    /// to its answer, or to a state step its cluster's owners decide.
    fn begin(&self, req: CheckRequest, caller: &CallerIdentity, intent: Intent) -> Checked {
        match self.begin_here(&req, caller, intent) {
            Begun::Answered(answer) => Checked::now(answer),
            Begun::AtOwners(cluster, pending) => {
                self.at_owners(cluster, pending, req, caller, intent)
            }
        }
    }

    /// What this process makes of `req` by itself. It only borrows the
    /// request: a stream decodes its next request into the room of one
    /// answered here ([`Requests::give_back`]).
    fn begin_here(&self, req: &CheckRequest, caller: &CallerIdentity, intent: Intent) -> Begun {
        let ctx = self.context();
        let pending = match ctx.checker.begin(req, caller) {
            Ok(Step::State(pending)) => pending,
            Ok(Step::Done(answer)) => {
                return Begun::Answered(conclude(&ctx, req, caller, intent, Ok(answer)));
            }
            Err(err) => return Begun::Answered(conclude(&ctx, req, caller, intent, Err(err))),
        };
        if intent == Intent::Forget && pending.nonce.is_none() {
            let answer = Ok(crate::check::malformed_answer(
                "api_key: a bearer key's request is not remembered; there is nothing to forget",
            ));
            return Begun::Answered(conclude(&ctx, req, caller, intent, answer));
        }
        let Some(cluster) = self.cluster.clone() else {
            let answer = match intent {
                Intent::Check => {
                    let outcome = decide_here(&self.checker, &pending);
                    pending.finish(Ok(outcome))
                }
                Intent::Forget => forget_here(&self.checker, pending),
            };
            return Begun::Answered(conclude(&ctx, req, caller, intent, answer));
        };
        Begun::AtOwners(cluster, pending)
    }

    /// The answer to `req` once its owners have decided `pending`. The
    /// future owns what it needs (the service's Arcs, the request), so that
    /// only a cluster's checks pay for one.
    fn at_owners(
        &self,
        cluster: Arc<ClusterState>,
        pending: Pending,
        req: CheckRequest,
        caller: &CallerIdentity,
        intent: Intent,
    ) -> Checked {
        let (service, caller) = (self.clone(), caller.clone());
        Checked::Later(Box::pin(async move {
            let answer = match intent {
                Intent::Check => match cluster.decide(&pending).await {
                    Ok(outcome) => pending.finish(outcome),
                    Err(_) => Err(CheckError::Unavailable),
                },
                Intent::Forget => forget_at_owners(&cluster, pending).await,
            };
            conclude(&service.context(), &req, &caller, intent, answer)
        }))
    }

    fn context(&self) -> Context<'_> {
        Context {
            checker: &self.checker,
            alerts: &self.alerts,
            audit: self.audit.as_deref(),
            denial_lines: &self.denial_lines,
        }
    }

    pub fn checker(&self) -> &Checker {
        &self.checker
    }

    /// Decides a gateway's state step (limits only) here, or at its owners
    /// in a cluster.
    pub async fn decide_state(&self, pending: &Pending) -> Result<Outcome, CheckError> {
        let Some(cluster) = self.cluster.as_deref() else {
            return Ok(decide_here(&self.checker, pending));
        };
        // Boxed: the cluster step's future (peer calls, retries) is ~4.5 KB,
        // and unboxed it would sit in every gateway rate-limit call's
        // future, single node included, which each call boxes and copies.
        match Box::pin(cluster.decide(pending)).await {
            Ok(Ok(outcome)) => Ok(outcome),
            // Stale: only signed requests carry a timestamp to judge, and
            // gateways' limits carry none.
            Ok(Err(_)) | Err(_) => Err(CheckError::Unavailable),
        }
    }
}

/// What a check needs besides the request: shared by unary and streams.
struct Context<'a> {
    checker: &'a Checker,
    alerts: &'a Alerts,
    audit: Option<&'a AuditLog>,
    denial_lines: &'a LineBudget,
}

/// A state step decided by this process's engine, at the instant the
/// check began.
fn decide_here(checker: &Checker, pending: &Pending) -> Outcome {
    checker.engine().decide(pending.now, &pending.request())
}

/// How far [`WardenService::begin_here`] took a request.
enum Begun {
    /// Its answer, made here.
    Answered(Result<CheckResponse, Status>),
    /// Its state step, for its cluster's owners to decide.
    AtOwners(Arc<ClusterState>, Pending),
}

/// A check's answer: made at once, or to come from a cluster's owners.
///
/// Why not an `async fn`: its future would hold the request, the pipeline's
/// state and room for the cluster step, and each unary call moves it
/// (boxed) and each streamed check re-creates it: 2–4 KB copied per call for
/// nothing on a single node, where every check is decided before `begin`
/// returns. This holds the answer, or a boxed future when there is one.
pub enum Checked {
    /// Decided here (taken when polled).
    Now(Option<Result<CheckResponse, Status>>),
    /// Waiting for the owners of its state in a cluster.
    Later(Pin<Box<dyn Future<Output = Result<CheckResponse, Status>> + Send>>),
}

impl Checked {
    fn now(answer: Result<CheckResponse, Status>) -> Self {
        Checked::Now(Some(answer))
    }

    /// Runs `then` once the answer is there: at once, or when the owners
    /// have answered.
    pub fn then(self, then: impl FnOnce() + Send + 'static) -> Self {
        match self {
            Checked::Now(answer) => {
                then();
                Checked::Now(answer)
            }
            Checked::Later(later) => Checked::Later(Box::pin(async move {
                let answer = later.await;
                then();
                answer
            })),
        }
    }
}

impl Future for Checked {
    type Output = Result<CheckResponse, Status>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Checked::Now(answer) => {
                Poll::Ready(answer.take().expect("a check polled after its answer"))
            }
            Checked::Later(later) => later.as_mut().poll(cx),
        }
    }
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

    fn answer(
        &self,
        request: Request<CheckRequest>,
    ) -> impl Future<Output = Result<Response<CheckResponse>, Status>> + Send {
        self.unary_check(request)
            .map(|answer| answer.map(Response::new))
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
        self.begin(request.into_inner(), &caller, Intent::Forget)
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

    /// Reached only for a stream `super::stream::CheckStreams` hands over
    /// (its requests compressed, which tonic refuses before this runs).
    async fn check_stream(
        &self,
        request: Request<Streaming<CheckRequest>>,
    ) -> Result<Response<Self::CheckStreamStream>, Status> {
        self.open_stream(request).map(Response::new)
    }
}

impl WardenService {
    /// The answers of a `CheckStream` whose requests are read by the
    /// `request`'s stream (tonic's decoder, or warden's own:
    /// `super::stream`), once the call is admitted.
    pub fn open_stream<S>(&self, request: Request<S>) -> Result<AnswerStream, Status>
    where
        S: Requests,
    {
        // An open stream is one call in flight, for as long as it is open.
        let permit = self.admission.admit(&request)?;
        Ok(Box::pin(OpenStream {
            caller: caller_of(&request),
            inbound: request.into_inner(),
            service: self.clone(),
            _permit: permit,
            at_owners: None,
            ended: false,
        }))
    }
}

/// The requests of a `CheckStream`, decoded.
pub trait Requests:
    futures_util::Stream<Item = Result<CheckRequest, Status>> + Send + Unpin + 'static
{
    /// `request` is answered: the next may be decoded into its room.
    fn give_back(&mut self, request: CheckRequest) {
        drop(request);
    }
}

/// tonic's decoder, which makes every request afresh.
impl Requests for Streaming<CheckRequest> {}

/// The answers of one `CheckStream`, in the order of its requests.
pub type AnswerStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<CheckResponse, Status>> + Send>>;

/// One open `CheckStream`: its answers, each made when HTTP/2 asks for the
/// next one.
///
/// The request is read and checked in the task that sends the answer, in
/// order, one answer per request: no task of its own and no queue between
/// them (a hand-over per answer, measured). HTTP/2 asks only while the
/// client's flow-control window has room, so a client that stops reading
/// answers stops its requests being read: back-pressure. On a single node
/// a check is answered where it is read, with no future made for it.
struct OpenStream<S> {
    caller: CallerIdentity,
    inbound: S,
    /// What every check runs through (the Arcs the service holds).
    service: WardenService,
    /// Its place among the calls in flight, given back when it closes.
    _permit: CallPermit,
    /// The check waiting for its cluster's owners, when one is.
    at_owners: Option<Checked>,
    /// After a failed answer, which is the last.
    ended: bool,
}

impl<S: Requests> futures_util::Stream for OpenStream<S> {
    type Item = Result<CheckResponse, Status>;

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        let stream = self.get_mut();
        if stream.ended {
            return Poll::Ready(None);
        }
        let answer = match &mut stream.at_owners {
            Some(check) => ready!(Pin::new(check).poll(cx)),
            None => match ready!(Pin::new(&mut stream.inbound).poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(Err(status)) => Err(status),
                Some(Ok(req)) => {
                    let started = Instant::now();
                    let timed = move || {
                        CallMetrics::get()
                            .stream_seconds
                            .record(started.elapsed().as_secs_f64());
                    };
                    let service = &stream.service;
                    match service.begin_here(&req, &stream.caller, Intent::Check) {
                        Begun::Answered(answer) => {
                            timed();
                            stream.inbound.give_back(req);
                            answer
                        }
                        Begun::AtOwners(cluster, pending) => {
                            let mut check = service
                                .at_owners(cluster, pending, req, &stream.caller, Intent::Check)
                                .then(timed);
                            match Pin::new(&mut check).poll(cx) {
                                Poll::Ready(answer) => answer,
                                Poll::Pending => {
                                    stream.at_owners = Some(check);
                                    return Poll::Pending;
                                }
                            }
                        }
                    }
                }
            },
        };
        stream.at_owners = None;
        stream.ended = answer.is_err();
        Poll::Ready(Some(answer))
    }
}

/// What a call asks of the pipeline.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Intent {
    /// Decide the request (`Check`, `CheckStream`).
    Check,
    /// Forget that it was accepted (`Forget`).
    Forget,
}

/// Forgets a genuine request's replay key here (`begin` answers one that
/// has none).
fn forget_here(checker: &Checker, pending: Pending) -> Result<Answer, CheckError> {
    if let Some((replay, _)) = pending.nonce {
        checker.engine().forget(replay);
    }
    Ok(forgotten(pending))
}

/// Forgets a genuine request's replay key at its owner.
async fn forget_at_owners(cluster: &ClusterState, pending: Pending) -> Result<Answer, CheckError> {
    cluster
        .forget(&pending)
        .await
        .map_err(|_| CheckError::Unavailable)?;
    Ok(forgotten(pending))
}

/// The answer to a `Forget` whose replay key is forgotten, logged.
fn forgotten(pending: Pending) -> Answer {
    let answer = pending.forgotten();
    metrics::counter!("warden_requests_forgotten_total").increment(1);
    tracing::info!(
        event = "request_forgotten",
        key_id = answer.key_id().unwrap_or("-"),
        "an accepted request was forgotten; it may be accepted once more"
    );
    answer
}

/// A check's answer, or its refusal as a whole, with its logs, metrics,
/// alerts and audit. A denial's log line carries the key id, caller, reason
/// and request id — never the signature, a secret or the body.
fn conclude(
    ctx: &Context<'_>,
    req: &CheckRequest,
    caller: &CallerIdentity,
    intent: Intent,
    answer: Result<Answer, CheckError>,
) -> Result<CheckResponse, Status> {
    let request_id = loggable_request_id(&req.request_id);
    match answer {
        Ok(decision) => {
            let r = &decision.response;
            if intent == Intent::Check {
                CallMetrics::get().checked(r.decision(), r.reason());
            }
            if r.decision() == Decision::Deny {
                raise_alerts(ctx, r.reason(), decision.key_id(), caller);
                if let (Some(audit), true) = (ctx.audit, is_security_denial(r.reason())) {
                    audit.count_denial(Subject {
                        action: "check.denied",
                        reason: reason_name(r.reason()),
                        key_id: decision.key_id().unwrap_or_default().to_owned(),
                        actor: caller.as_str().to_owned(),
                        source: crate::check::forwarded_source(req)
                            .unwrap_or_else(|| "-".to_owned()),
                    });
                }
                let line = ctx.denial_lines.line(crate::conn::monotonic_ms());
                if let Line::AfterSkipping(skipped) = line {
                    tracing::warn!(
                        event = "check_denials_not_logged",
                        skipped,
                        "denied checks past [server] max_denial_log_lines a second were counted, not logged (warden_checks_total counts every one)"
                    );
                }
                if line == Line::Skip {
                    CallMetrics::get().denial_line_skipped();
                } else {
                    tracing::info!(
                        event = "check_denied",
                        key_id = decision.key_id().unwrap_or("-"),
                        caller = caller.as_str(),
                        reason = reason_name(r.reason()),
                        request_id,
                        // Not `message`: that is the line's own, and a
                        // JSON line with a key twice is refused by strict
                        // parsers (Elasticsearch's among them).
                        detail = %r.message,
                        "check denied"
                    );
                }
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

    /// A check of a single node is answered before `check_as` returns; what
    /// a unary call and each streamed check then move is this, not a
    /// future holding the request and the pipeline's state (2–4 KB, see
    /// [`Checked`]).
    #[test]
    fn a_check_answered_here_is_no_bigger_than_its_answer() {
        let checked = std::mem::size_of::<Checked>();
        let answer = std::mem::size_of::<Option<Result<CheckResponse, Status>>>();
        assert_eq!(checked, answer, "Checked is {checked} bytes");
    }
}
