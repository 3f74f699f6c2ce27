//! The tonic services. They translate between gRPC and the pipeline, admit
//! or shed calls, and write the log lines and metrics; they know nothing of
//! locking or state.

pub mod admin;
pub mod warden;

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use crate::check::CallerIdentity;
use crate::conn::{ConnState, PeerInfo};

/// The mTLS identity of whoever made this call (`-` in plaintext mode).
pub fn caller_of<T>(request: &tonic::Request<T>) -> CallerIdentity {
    CallerIdentity(
        request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.identity.clone()),
    )
}

/// Load shedding: a call starts only if a global slot and a slot on its
/// connection are free *right now*; otherwise it is refused at once with
/// RESOURCE_EXHAUSTED. Never a queue: under overload, latency stays flat for
/// admitted calls and the excess fails fast so clients can back off.
#[derive(Clone, Debug)]
pub struct Admission {
    global: Arc<Semaphore>,
}

/// Held for as long as a call is in flight.
#[derive(Debug)]
pub struct CallPermit {
    _global: OwnedSemaphorePermit,
    _conn: Option<OwnedSemaphorePermit>,
    conn: Option<Arc<ConnState>>,
}

impl Drop for CallPermit {
    fn drop(&mut self) {
        metrics::gauge!("warden_inflight_calls").decrement(1.0);
        if let Some(conn) = &self.conn {
            conn.touch();
        }
    }
}

impl Admission {
    pub fn new(max_inflight: usize) -> Self {
        Self {
            global: Arc::new(Semaphore::new(max_inflight)),
        }
    }

    pub fn admit<T>(&self, request: &tonic::Request<T>) -> Result<CallPermit, Status> {
        let conn = request
            .extensions()
            .get::<PeerInfo>()
            .map(|p| p.conn.clone());
        let conn_permit = match &conn {
            Some(c) => match c.calls.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    metrics::counter!("warden_shed_total", "cause" => "connection_limit")
                        .increment(1);
                    return Err(Status::resource_exhausted(
                        "too many concurrent calls on this connection",
                    ));
                }
            },
            None => None,
        };
        let global = self.global.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!("warden_shed_total", "cause" => "server_busy").increment(1);
            Status::resource_exhausted("server overloaded; retry with backoff")
        })?;
        if let Some(c) = &conn {
            c.touch();
        }
        metrics::gauge!("warden_inflight_calls").increment(1.0);
        Ok(CallPermit {
            _global: global,
            _conn: conn_permit,
            conn,
        })
    }
}
