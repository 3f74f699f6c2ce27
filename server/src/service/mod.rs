//! The tonic services. They translate between gRPC and the pipeline and
//! write the log lines; they know nothing of locking or state.

pub mod warden;

use std::sync::Arc;

use crate::check::CallerIdentity;
use crate::server::PeerInfo;

/// The mTLS identity of whoever made this call (`-` in plaintext mode).
pub fn caller_of<T>(request: &tonic::Request<T>) -> CallerIdentity {
    request
        .extensions()
        .get::<PeerInfo>()
        .map(|p| CallerIdentity(p.identity.clone()))
        .unwrap_or(CallerIdentity(None::<Arc<str>>))
}
