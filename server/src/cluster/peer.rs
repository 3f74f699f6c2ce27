//! `warden.v1.Peer`: the state steps other nodes send this one. Only
//! certificates holding the `peer` role may call it.

use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::{Request, Response, Status};
use warden_client::proto::peer_server::Peer;
use warden_client::proto::{
    HandOffAck, HandOffBatch, Settled, Settlement, StateStep, StateVerdict, TaggedStep,
    TaggedVerdict, VouchReply, VouchRequest,
};

use super::state::{ClusterState, Phase};
use crate::auth::{Authz, Role};
use crate::check::MAX_LIMITS;
use crate::service::caller_of;

/// Serves the parts of checks this node owns.
#[derive(Debug, Clone)]
pub struct PeerService {
    state: Arc<ClusterState>,
    authz: Arc<Authz>,
    /// True once the server stops taking calls (after the drain delay):
    /// peers' streams are ended then, so they do not hold the shutdown up.
    closing: tokio::sync::watch::Receiver<bool>,
}

impl PeerService {
    pub fn new(
        state: Arc<ClusterState>,
        authz: Authz,
        closing: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            state,
            authz: Arc::new(authz),
            closing,
        }
    }

    fn admit<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let caller = caller_of(request);
        if self.authz.grant(caller.0.as_deref()).has(Role::Peer) {
            return Ok(());
        }
        metrics::counter!("warden_caller_denied_total").increment(1);
        tracing::warn!(
            event = "caller_denied",
            caller = caller.as_str(),
            reason = "peer role missing",
            "call refused"
        );
        Err(Status::permission_denied(
            "this client certificate may not call the peer service",
        ))
    }
}

/// Answers buffered per stream before the reader waits for the peer.
const STREAM_BUFFER: usize = 256;

/// A step as large as any check can make, and no larger.
fn check_size(step: &StateStep) -> Result<(), Status> {
    if step.limits.len() > MAX_LIMITS * 2 + 64 {
        return Err(Status::invalid_argument("limits: too many"));
    }
    Ok(())
}

#[tonic::async_trait]
impl Peer for PeerService {
    type DecideStreamStream = ReceiverStream<Result<TaggedVerdict, Status>>;

    async fn decide_stream(
        &self,
        request: Request<Streaming<TaggedStep>>,
    ) -> Result<Response<Self::DecideStreamStream>, Status> {
        self.admit(&request)?;
        let mut closing = self.closing.clone();
        if *closing.borrow() {
            return Err(Status::unavailable("this node is shutting down"));
        }
        let mut steps = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        let state = self.state.clone();
        tokio::spawn(async move {
            loop {
                let tagged = tokio::select! {
                    m = steps.message() => match m {
                        Ok(Some(tagged)) => tagged,
                        _ => break,
                    },
                    _ = closing.wait_for(|c| *c) => break,
                };
                let answer = match tagged.step {
                    Some(step) if check_size(&step).is_ok() => Ok(TaggedVerdict {
                        tag: tagged.tag,
                        verdict: Some(state.serve(&step, Phase::Decide)),
                    }),
                    _ => Err(Status::invalid_argument("step: missing or too large")),
                };
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn reserve(&self, request: Request<StateStep>) -> Result<Response<StateVerdict>, Status> {
        self.admit(&request)?;
        check_size(request.get_ref())?;
        Ok(Response::new(
            self.state.serve(request.get_ref(), Phase::Reserve),
        ))
    }

    async fn hand_off(
        &self,
        request: Request<HandOffBatch>,
    ) -> Result<Response<HandOffAck>, Status> {
        self.admit(&request)?;
        self.state
            .receive(request.get_ref())
            .map_err(Status::invalid_argument)?;
        Ok(Response::new(HandOffAck {}))
    }

    async fn vouch(&self, request: Request<VouchRequest>) -> Result<Response<VouchReply>, Status> {
        self.admit(&request)?;
        let r = request.get_ref();
        Ok(Response::new(VouchReply {
            granted: self.state.membership().vouch_for(&r.node, r.version),
        }))
    }

    async fn settle(&self, request: Request<Settlement>) -> Result<Response<Settled>, Status> {
        self.admit(&request)?;
        let s = request.into_inner();
        Ok(Response::new(Settled {
            found: self.state.settle(s.reservation, s.commit),
        }))
    }
}
