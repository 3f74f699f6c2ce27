//! Envoy's rate limit service:
//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`, a drop-in
//! for envoyproxy/ratelimit — the same YAML, the same answers — with one
//! difference that is the point: all the descriptors of one request are
//! decided in one atomic step, so a request denied by one limit takes
//! nothing from the others (envoyproxy/ratelimit increments every counter
//! it looks at).
//!
//! The counters are warden's state like any other: sharded, bounded by
//! `check.max_limit_entries`, and in a cluster kept by their owning nodes,
//! so several warden nodes are one rate limiter.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tonic::{Request, Response, Status};

use crate::auth::{Authz, Role};
use crate::check::{CheckError, MAX_COST, Pending};
use crate::config::EnvoyRateLimitSettings;
use crate::descriptors::{MAX_DESCRIPTORS, MAX_ENTRIES, MAX_ENTRY_BYTES, Matched, Quota, Rule};
use crate::engine::{Limit, LimitVerdict, Nanos, Outcome, StateKey};
use crate::service::unary::UnaryMethod;
use crate::service::warden::{WardenService, count_refusal, refusal};
use crate::service::{Admission, CallMetrics, Face, caller_of};

/// Answers Envoy's `ratelimit` filter from envoyproxy/ratelimit rules.
#[derive(Debug, Clone)]
pub struct EnvoyRateLimit {
    checks: WardenService,
    settings: EnvoyRateLimitSettings,
    authz: Authz,
    admission: Admission,
}

impl EnvoyRateLimit {
    pub fn new(
        checks: WardenService,
        settings: EnvoyRateLimitSettings,
        authz: Authz,
        admission: Admission,
    ) -> Self {
        Self {
            checks,
            settings,
            authz,
            admission,
        }
    }
}

/// What one descriptor of a request comes to.
enum Applies {
    /// No rule, or a rule another applying rule `replaces`.
    Nothing,
    Unlimited,
    /// `requests_per_unit: 0`.
    Blocked(Arc<Rule>),
    /// A counted limit and its counter's state id.
    Counted(Arc<Rule>, StateKey),
}

/// `ShouldRateLimit`, read and answered by [`Unary`](crate::service::unary::Unary).
impl UnaryMethod for EnvoyRateLimit {
    type Request = RateLimitRequest;
    type Response = RateLimitResponse;
    const PATH: &'static str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

    fn answer(
        &self,
        request: Request<RateLimitRequest>,
    ) -> impl Future<Output = Result<Response<RateLimitResponse>, Status>> + Send {
        RateLimitService::should_rate_limit(self, request)
    }
}

#[tonic::async_trait]
impl RateLimitService for EnvoyRateLimit {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let _permit = self.admission.admit(&request)?;
        let caller = caller_of(&request);
        if !self.authz.grant(caller.0.as_deref()).has(Role::Check) {
            tracing::warn!(
                event = "caller_denied",
                caller = caller.as_str(),
                reason = "no check role",
                "ShouldRateLimit refused"
            );
            return Err(Status::permission_denied(
                "this client certificate may not call ShouldRateLimit",
            ));
        }
        let req = request.into_inner();
        let cost = validate(&req)?;
        let rules = &self.settings.rules;
        let matched: Vec<Option<Matched>> = req
            .descriptors
            .iter()
            .map(|d| {
                let entries: Vec<(&str, &str)> = d
                    .entries
                    .iter()
                    .map(|e| (e.key.as_str(), e.value.as_str()))
                    .collect();
                rules.find(&req.domain, &entries)
            })
            .collect();
        let replaced: Vec<String> = matched
            .iter()
            .flatten()
            .flat_map(|m| m.rule.replaces.iter().cloned())
            .collect();

        let checker = self.checks.checker();
        let engine = checker.engine();
        let applies: Vec<Applies> = matched
            .into_iter()
            .map(|m| match m {
                None => Applies::Nothing,
                Some(m) if m.rule.name.as_ref().is_some_and(|n| replaced.contains(n)) => {
                    Applies::Nothing
                }
                Some(m) => match m.rule.quota {
                    Quota::Unlimited => Applies::Unlimited,
                    Quota::Blocked => Applies::Blocked(m.rule),
                    Quota::Limited(_) => {
                        let pool = engine.pools().policy(&m.rule.policy);
                        let key = engine.key_in(
                            pool,
                            m.counter.as_bytes(),
                            &[b"rls", req.domain.as_bytes()],
                        );
                        Applies::Counted(m.rule, key)
                    }
                },
            })
            .collect();

        let now = checker.now();
        let (verdicts, over_limit) = self.decide_request(now, &applies, cost).await?;
        let statuses: Vec<DescriptorStatus> = applies
            .iter()
            .zip(&verdicts)
            .map(|(a, verdict)| match a {
                Applies::Nothing => DescriptorStatus {
                    code: Code::Ok as i32,
                    ..Default::default()
                },
                Applies::Unlimited => DescriptorStatus {
                    code: Code::Ok as i32,
                    limit_remaining: u32::MAX,
                    ..Default::default()
                },
                Applies::Blocked(rule) | Applies::Counted(rule, _) => {
                    status(rule, verdict.as_ref(), now)
                }
            })
            .collect();
        let mut response = RateLimitResponse {
            overall_code: if over_limit && !self.settings.shadow_mode {
                Code::OverLimit as i32
            } else {
                Code::Ok as i32
            },
            ..Default::default()
        };
        if self.settings.response_headers {
            response.response_headers_to_add = headers(&statuses);
        }
        response.statuses = statuses;
        let over = response.overall_code == Code::OverLimit as i32;
        CallMetrics::get().gateway_answered(Face::RateLimit, !over);
        if over {
            tracing::info!(
                event = "ratelimit_over_limit",
                caller = caller.as_str(),
                domain = %req.domain.escape_debug(),
                "ShouldRateLimit: over the limit"
            );
        }
        Ok(Response::new(response))
    }
}

impl EnvoyRateLimit {
    /// Decides a request's descriptors: each one's verdict (`None` where
    /// nothing is counted), and whether the request is over the limit.
    ///
    /// The enforced limits and the quota-mode limits that still have room
    /// are decided in one atomic step, taken only if all pass. A request is
    /// over the limit when an enforced limit is exhausted (or blocks
    /// outright), or when it names quota-mode limits and none has room.
    /// Shadow limits are counted after that, each on its own, only for a
    /// request that passed: they never turn one away.
    async fn decide_request(
        &self,
        now: Nanos,
        applies: &[Applies],
        cost: u64,
    ) -> Result<(Vec<Option<LimitVerdict>>, bool), Status> {
        let mut verdicts: Vec<Option<LimitVerdict>> = vec![None; applies.len()];
        let counted = |pick: &dyn Fn(&Rule) -> bool| -> Vec<usize> {
            applies
                .iter()
                .enumerate()
                .filter_map(|(i, a)| match a {
                    Applies::Counted(rule, _) if pick(rule) => Some(i),
                    _ => None,
                })
                .collect()
        };
        let enforced = counted(&|r| !r.shadow_mode && !r.quota_mode);
        let quotas = counted(&|r| !r.shadow_mode && r.quota_mode);
        let shadows = counted(&|r| r.shadow_mode);
        let blocked = applies
            .iter()
            .any(|a| matches!(a, Applies::Blocked(r) if !r.shadow_mode && !r.quota_mode));
        let named_quotas = quotas.len()
            + applies
                .iter()
                .filter(|a| matches!(a, Applies::Blocked(r) if !r.shadow_mode && r.quota_mode))
                .count();
        let step = |indices: &[usize]| -> Vec<(StateKey, Limit)> {
            indices
                .iter()
                .map(|&i| match &applies[i] {
                    Applies::Counted(rule, key) => (*key, limit(rule)),
                    _ => unreachable!("only counted descriptors are decided"),
                })
                .collect()
        };

        // Which quota-mode limits have room, looked at without taking.
        let mut open = Vec::new();
        for &i in &quotas {
            let v = self.decide(now, step(&[i]), cost, false).await?;
            if v.first().is_some_and(|v| v.allowed) {
                open.push(i);
            }
            verdicts[i] = v.into_iter().next();
        }
        let mut passed = false;
        if blocked || (named_quotas > 0 && open.is_empty()) {
            // Over the limit whatever the rest says: look, take nothing.
            for (i, v) in enforced
                .iter()
                .zip(self.decide(now, step(&enforced), cost, false).await?)
            {
                verdicts[*i] = Some(v);
            }
        } else {
            // A quota limit may fill between the look and the step; then
            // the step took nothing, and it is tried without that one.
            loop {
                let indices: Vec<usize> = enforced.iter().chain(&open).copied().collect();
                let decided = self.decide(now, step(&indices), cost, true).await?;
                for (i, v) in indices.iter().zip(decided) {
                    verdicts[*i] = Some(v);
                }
                let enforced_pass = enforced
                    .iter()
                    .all(|&i| verdicts[i].as_ref().is_some_and(|v| v.allowed));
                let before = open.len();
                open.retain(|&i| verdicts[i].as_ref().is_some_and(|v| v.allowed));
                if !enforced_pass || open.len() == before {
                    passed = enforced_pass;
                    break;
                }
                if named_quotas > 0 && open.is_empty() {
                    break;
                }
            }
        }
        for &i in &shadows {
            let v = self.decide(now, step(&[i]), cost, passed).await?;
            verdicts[i] = v.into_iter().next();
        }
        Ok((verdicts, !passed))
    }

    /// One atomic state step over `limits`, here or at their owners.
    async fn decide(
        &self,
        now: Nanos,
        limits: Vec<(StateKey, Limit)>,
        cost: u64,
        commit: bool,
    ) -> Result<Vec<LimitVerdict>, Status> {
        if limits.is_empty() {
            return Ok(Vec::new());
        }
        let count = limits.len();
        let pending = Pending::limits_only(now, limits, cost, commit);
        step_verdicts(self.checks.decide_state(&pending).await, count)
    }
}

/// The verdicts of one state step over `count` limits, or the call's error.
///
/// A step refused because the state is full (nothing could be evicted to
/// make room) is answered as over every limit it named, not failed: Envoy
/// lets a request through when its rate limit call fails, unless told
/// otherwise (`failure_mode_deny` is off by default), and a flood that
/// fills warden's state must not open the limits it fills. `Check` and
/// ext_authz refuse such a request too. An owner that could not be reached
/// in a cluster is an error, as an unreachable rate limit service is:
/// `failure_mode_deny` is the operator's choice there.
fn step_verdicts(
    outcome: Result<Outcome, CheckError>,
    count: usize,
) -> Result<Vec<LimitVerdict>, Status> {
    match outcome {
        Ok(Outcome::Limited { limits, .. }) => Ok(limits.into_vec()),
        Ok(Outcome::StateFull(pool)) => {
            count_refusal(&CheckError::StateFull(pool));
            let refused = LimitVerdict {
                allowed: false,
                remaining: 0,
                reset_after: Nanos::new(0),
                retry_after: None,
            };
            Ok(vec![refused; count])
        }
        // A step without a nonce is never a replay.
        Ok(Outcome::Replay | Outcome::NonceSetFull) => Err(Status::internal("internal error")),
        Err(e) => Err(refusal(&e)),
    }
}

fn limit(rule: &Rule) -> Limit {
    match rule.quota {
        Quota::Limited(l) => l,
        Quota::Unlimited | Quota::Blocked => unreachable!("only counted rules have a limit"),
    }
}

/// Shape and bounds of a request; its cost (`hits_addend`, 0 meaning 1).
fn validate(req: &RateLimitRequest) -> Result<u64, Status> {
    if req.domain.is_empty() {
        return Err(Status::invalid_argument(
            "rate limit domain must not be empty",
        ));
    }
    if req.descriptors.is_empty() {
        return Err(Status::invalid_argument(
            "rate limit descriptor list must not be empty",
        ));
    }
    if req.descriptors.len() > MAX_DESCRIPTORS || req.domain.len() > MAX_ENTRY_BYTES {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_DESCRIPTORS} descriptors and a domain of at most {MAX_ENTRY_BYTES} bytes"
        )));
    }
    // Each descriptor's cost: its own hits_addend, else the request's (0
    // meaning 1). One step has one cost, so they must all agree.
    let request_cost = u64::from(req.hits_addend.max(1));
    let mut costs = req.descriptors.iter().map(|d| {
        d.hits_addend
            .as_ref()
            .map_or(request_cost, |h| h.value.max(1))
    });
    let cost = costs.next().unwrap_or(request_cost);
    for d in &req.descriptors {
        check_descriptor(d)?;
    }
    if costs.any(|c| c != cost) {
        return Err(Status::invalid_argument(
            "descriptors with different hits_addend in one request are not supported: they are decided as one step",
        ));
    }
    if cost > u64::from(MAX_COST) {
        return Err(Status::invalid_argument(format!(
            "hits_addend: at most {MAX_COST}"
        )));
    }
    Ok(cost)
}

fn check_descriptor(d: &RateLimitDescriptor) -> Result<(), Status> {
    if d.entries.is_empty() || d.entries.len() > MAX_ENTRIES {
        return Err(Status::invalid_argument(format!(
            "a descriptor has 1 to {MAX_ENTRIES} entries"
        )));
    }
    if d.entries
        .iter()
        .any(|e| e.key.len() > MAX_ENTRY_BYTES || e.value.len() > MAX_ENTRY_BYTES)
    {
        return Err(Status::invalid_argument(format!(
            "descriptor keys and values: at most {MAX_ENTRY_BYTES} bytes"
        )));
    }
    if d.limit.is_some() {
        return Err(Status::invalid_argument(
            "descriptor limit overrides are not supported: configure the limit in warden's rate limit YAML",
        ));
    }
    if d.is_negative_hits {
        return Err(Status::invalid_argument(
            "is_negative_hits is not supported",
        ));
    }
    Ok(())
}

/// A rule's status, envoyproxy/ratelimit's way: the limit, what is left
/// after this request, and the time to the end of the current window.
fn status(rule: &Rule, verdict: Option<&LimitVerdict>, now: Nanos) -> DescriptorStatus {
    let allowed = verdict.is_some_and(|v| v.allowed);
    let code = if allowed || rule.shadow_mode {
        Code::Ok
    } else {
        Code::OverLimit
    };
    let period = rule.unit.period().as_secs();
    let into = now.whole_secs() % period;
    DescriptorStatus {
        code: code as i32,
        current_limit: Some(RateLimit {
            name: rule.name.clone().unwrap_or_default(),
            requests_per_unit: rule.requests_per_unit,
            unit: rule.unit as i32,
        }),
        limit_remaining: verdict
            .map(|v| u32::try_from(v.remaining).unwrap_or(u32::MAX))
            .unwrap_or(0),
        duration_until_reset: Some(envoy_types::pb::google::protobuf::Duration {
            seconds: i64::try_from(period - into).unwrap_or(i64::MAX),
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// `RateLimit-Limit`, `-Remaining` and `-Reset` of the tightest limit: one
/// that is over, else the one with the least left (envoyproxy/ratelimit's
/// choice).
fn headers(statuses: &[DescriptorStatus]) -> Vec<HeaderValue> {
    let tightest = statuses
        .iter()
        .filter(|s| s.current_limit.is_some())
        .min_by_key(|s| (s.code != Code::OverLimit as i32, s.limit_remaining));
    let Some(s) = tightest else {
        return Vec::new();
    };
    let limit = s.current_limit.as_ref().map_or(0, |l| l.requests_per_unit);
    let reset = s.duration_until_reset.as_ref().map_or(0, |d| d.seconds);
    [
        ("RateLimit-Limit", limit.to_string()),
        ("RateLimit-Remaining", s.limit_remaining.to_string()),
        ("RateLimit-Reset", reset.to_string()),
    ]
    .into_iter()
    .map(|(key, value)| HeaderValue {
        key: key.to_owned(),
        value,
        ..Default::default()
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Pool;

    #[test]
    fn a_step_refused_for_full_state_is_over_every_limit_it_named_not_a_failed_call() {
        let verdicts = step_verdicts(Ok(Outcome::StateFull(Pool::FAILURES)), 3)
            .expect("an answer, not a failed call Envoy would let through");
        assert_eq!(verdicts.len(), 3);
        assert!(verdicts.iter().all(|v| !v.allowed && v.remaining == 0));
    }

    #[test]
    fn an_owner_that_could_not_be_reached_is_a_failed_call() {
        let status = step_verdicts(Err(CheckError::Unavailable), 2).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }
}
