//! `warden.v1.Peer`: the state steps other nodes send this one. Only
//! certificates holding the `peer` role may call it.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use warden_client::proto::peer_server::Peer;
use warden_client::proto::{
    HandOffAck, HandOffBatch, Settled, Settlement, StateStep, StateVerdict, VouchReply,
    VouchRequest,
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
}

impl PeerService {
    pub fn new(state: Arc<ClusterState>, authz: Authz) -> Self {
        Self {
            state,
            authz: Arc::new(authz),
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

/// A step as large as any check can make, and no larger.
fn check_size(step: &StateStep) -> Result<(), Status> {
    if step.limits.len() > MAX_LIMITS * 2 + 64 {
        return Err(Status::invalid_argument("limits: too many"));
    }
    Ok(())
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn decide(&self, request: Request<StateStep>) -> Result<Response<StateVerdict>, Status> {
        self.admit(&request)?;
        check_size(request.get_ref())?;
        Ok(Response::new(
            self.state.serve(request.get_ref(), Phase::Decide),
        ))
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
