//! The tonic services. They translate between gRPC and the pipeline, admit
//! or shed calls, and write the log lines and metrics; they know nothing of
//! locking or state.

pub mod admin;
pub mod stream;
pub mod unary;
pub mod warden;

use std::sync::{Arc, OnceLock};

use metrics::{Counter, Gauge, Histogram};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use warden_client::proto::{Decision, Reason};
use warden_client::reason_name;

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

/// The metrics every call touches, looked up once. A lookup by name and
/// labels (`metrics::counter!(...)`) hashes the key, takes the registry's
/// lock and copies the labels, on every call; a handle is one atomic add.
/// Built at the first call, after `main` installed the recorder (before
/// serving); without a recorder (in-process tests) the handles do nothing.
pub struct CallMetrics {
    pub inflight: Gauge,
    /// `warden_rpc_duration_seconds` for `Check` and for `CheckStream`.
    pub check_seconds: Histogram,
    pub stream_seconds: Histogram,
    /// `warden_checks_total`, by decision (deny, allow) and reason: each
    /// registered when it first occurs, so `/metrics` shows no series for
    /// pairs that never happen (an allowed replay).
    checks: [[OnceLock<Counter>; REASONS]; 2],
    /// `warden_gateway_answers_total`, by face and answer (refused,
    /// allowed), each registered when it first occurs.
    gateway_answers: [[OnceLock<Counter>; 2]; 2],
    /// `warden_denial_log_lines_skipped_total`: counted for every denial
    /// past the log's budget, so a flood of refusals pays one atomic add
    /// each, not a lookup. Registered at the first.
    denial_lines_skipped: OnceLock<Counter>,
}

/// The gateway faces that count their answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Face {
    ExtAuthz,
    RateLimit,
}

/// Reasons in `warden.v1.Reason` (the last is `REASON_LOCKED_OUT`).
const REASONS: usize = Reason::LockedOut as usize + 1;

impl CallMetrics {
    pub fn get() -> &'static Self {
        static METRICS: OnceLock<CallMetrics> = OnceLock::new();
        METRICS.get_or_init(|| {
            let rpc = |name: &'static str| metrics::histogram!("warden_rpc_duration_seconds", "rpc" => name);
            Self {
                inflight: metrics::gauge!("warden_inflight_calls"),
                check_seconds: rpc("Check"),
                stream_seconds: rpc("CheckStream"),
                checks: Default::default(),
                gateway_answers: Default::default(),
                denial_lines_skipped: OnceLock::new(),
            }
        })
    }

    /// Counts one answered check.
    pub fn checked(&self, decision: Decision, reason: Reason) {
        let allowed = decision == Decision::Allow;
        let Some(slot) = self.checks[usize::from(allowed)].get(reason as usize) else {
            return;
        };
        slot.get_or_init(|| {
            let decision = if allowed { "allow" } else { "deny" };
            metrics::counter!("warden_checks_total", "decision" => decision, "reason" => reason_name(reason))
        })
        .increment(1);
    }

    /// Counts one answer a gateway face gave.
    pub fn gateway_answered(&self, face: Face, allowed: bool) {
        self.gateway_answers[face as usize][usize::from(allowed)]
            .get_or_init(|| {
                let face = match face {
                    Face::ExtAuthz => "ext_authz",
                    Face::RateLimit => "ratelimit",
                };
                let allowed = if allowed { "true" } else { "false" };
                metrics::counter!("warden_gateway_answers_total", "face" => face, "allowed" => allowed)
            })
            .increment(1);
    }

    /// Counts one denial not logged, past the log's budget.
    pub fn denial_line_skipped(&self) {
        self.denial_lines_skipped
            .get_or_init(|| metrics::counter!("warden_denial_log_lines_skipped_total"))
            .increment(1);
    }
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
        CallMetrics::get().inflight.decrement(1.0);
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
        CallMetrics::get().inflight.increment(1.0);
        Ok(CallPermit {
            _global: global,
            _conn: conn_permit,
            conn,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_a_checks_counter() {
        let reasons: Vec<Reason> = (0..).map_while(|i| Reason::try_from(i).ok()).collect();
        assert_eq!(
            reasons.len(),
            REASONS,
            "a reason was added: REASONS must follow"
        );
    }
}
