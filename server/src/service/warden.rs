//! `warden.v1.Warden`: `Check` and `CheckStream`.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use warden_client::proto::warden_server::Warden;
use warden_client::proto::{CheckRequest, CheckResponse, Decision as Verdict, Reason};

use super::caller_of;
use crate::check::{CallerIdentity, CheckError, Checker};

/// Answers checks with the shared [`Checker`].
#[derive(Debug, Clone)]
pub struct WardenService {
    checker: Arc<Checker>,
}

impl WardenService {
    pub fn new(checker: Arc<Checker>) -> Self {
        Self { checker }
    }
}

/// In-flight answers buffered per stream before the reader waits for the
/// client to read: back-pressure instead of an unbounded queue.
const STREAM_BUFFER: usize = 64;

#[tonic::async_trait]
impl Warden for WardenService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let caller = caller_of(&request);
        check_one(&self.checker, &request.into_inner(), &caller).map(Response::new)
    }

    type CheckStreamStream = ReceiverStream<Result<CheckResponse, Status>>;

    async fn check_stream(
        &self,
        request: Request<Streaming<CheckRequest>>,
    ) -> Result<Response<Self::CheckStreamStream>, Status> {
        let caller = caller_of(&request);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let checker = self.checker.clone();
        // One task per stream answers in order, one answer per request.
        tokio::spawn(async move {
            loop {
                let answer = match inbound.message().await {
                    Ok(Some(req)) => check_one(&checker, &req, &caller),
                    Ok(None) => break,
                    Err(status) => Err(status),
                };
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Runs one check and logs a denial. The log line carries the key id,
/// caller, reason and request id — never the signature, a secret or the body.
fn check_one(
    checker: &Checker,
    req: &CheckRequest,
    caller: &CallerIdentity,
) -> Result<CheckResponse, Status> {
    let request_id = loggable_request_id(&req.request_id);
    match checker.check(req, caller) {
        Ok(decision) => {
            let r = &decision.response;
            if r.decision() == Verdict::Deny {
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
        Err(CheckError::PermissionDenied(why)) => {
            tracing::warn!(
                event = "caller_denied",
                caller = caller.as_str(),
                key_id = loggable_key_id(&req.key_id),
                request_id,
                reason = why,
                "call refused"
            );
            Err(Status::permission_denied(why))
        }
        Err(CheckError::ReplayCacheFull) => {
            tracing::warn!(
                event = "replay_cache_full",
                caller = caller.as_str(),
                request_id,
                "replay cache full; refusing checks"
            );
            Err(Status::resource_exhausted(
                CheckError::ReplayCacheFull.to_string(),
            ))
        }
    }
}

/// The key id if it is well formed (a malformed one is not logged).
fn loggable_key_id(id: &str) -> &str {
    if crate::keys::is_valid_key_id(id) {
        id
    } else {
        "-"
    }
}

/// The request id if it is safe to log as is (validation rejects the rest).
fn loggable_request_id(id: &str) -> &str {
    if id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) && !id.is_empty() {
        id
    } else {
        "-"
    }
}

pub fn reason_name(reason: Reason) -> &'static str {
    match reason {
        Reason::Unspecified => "unspecified",
        Reason::Ok => "ok",
        Reason::Malformed => "malformed",
        Reason::Unauthenticated => "unauthenticated",
        Reason::Stale => "stale",
        Reason::Replay => "replay",
        Reason::Forbidden => "forbidden",
        Reason::RateLimited => "rate_limited",
        Reason::LockedOut => "locked_out",
    }
}
