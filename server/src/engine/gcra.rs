//! GCRA (the generic cell rate algorithm): a token bucket whose whole state is
//! one integer, the theoretical arrival time (TAT) of the next request.
//!
//! A bucket of `burst` tokens refills one token every `interval`
//! (`period / limit`, rounded up so the rate never exceeds the policy). A
//! request of cost `n` fits when `max(tat, now) + n * interval` lies at most
//! `burst * interval` ahead of `now`; taking it moves the TAT there. A TAT in
//! the past means a full bucket, which needs no memory at all: such state is
//! evicted.

use super::clock::Nanos;

/// The parameters of one GCRA limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    /// Time to refill one token.
    interval: Nanos,
    /// `burst * interval`: how far ahead of now the TAT may run.
    tolerance: Nanos,
    limit: u64,
    burst: u64,
    period: Nanos,
}

/// The verdict on one request against one limit, and the state to store if
/// the whole check commits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitStep<S> {
    pub allowed: bool,
    /// The state after taking the request (only meaningful when allowed).
    pub next: S,
    /// Requests of cost 1 that would still fit after this verdict.
    pub remaining: u64,
    /// Nanoseconds until the limit is fully available again.
    pub reset_after: Nanos,
    /// When denied: nanoseconds until this request would fit. `None` when it
    /// can never fit (cost above the burst).
    pub retry_after: Option<Nanos>,
}

impl Gcra {
    /// `limit` requests per `period` nanoseconds, up to `burst` at once.
    /// All three must be positive; callers validate policies before this.
    pub fn new(limit: u64, period: Nanos, burst: u64) -> Self {
        assert!(
            limit > 0 && period > Nanos::ZERO && burst > 0,
            "GCRA parameters must be positive"
        );
        let interval = period.div_ceil(limit).max(Nanos::new(1));
        Self {
            interval,
            tolerance: interval.saturating_mul(burst),
            limit,
            burst,
            period,
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn period(&self) -> Nanos {
        self.period
    }

    pub fn burst(&self) -> u64 {
        self.burst
    }

    pub fn interval(&self) -> Nanos {
        self.interval
    }

    /// Decides a request of `cost` at `now`, given the stored TAT (`None`
    /// when the key has no state, i.e. a full bucket).
    pub fn decide(&self, tat: Option<Nanos>, now: Nanos, cost: u64) -> LimitStep<Nanos> {
        let start = tat.map_or(now, |t| t.max(now));
        let next = start.saturating_add(self.interval.saturating_mul(cost));
        let horizon = now.saturating_add(self.tolerance);
        if next <= horizon {
            LimitStep {
                allowed: true,
                next,
                remaining: (horizon - next) / self.interval,
                reset_after: next - now,
                retry_after: None,
            }
        } else {
            let fits_ever = self.interval.saturating_mul(cost) <= self.tolerance;
            LimitStep {
                allowed: false,
                next: start,
                remaining: horizon.saturating_sub(start) / self.interval,
                reset_after: start - now,
                retry_after: fits_ever.then(|| next - horizon),
            }
        }
    }

    /// Whether a stored TAT carries no information any more (full bucket).
    pub fn is_idle(tat: Nanos, now: Nanos) -> bool {
        tat <= now
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: Nanos = Nanos::from_secs(1);

    #[test]
    fn a_full_bucket_allows_exactly_burst_requests_at_once() {
        let g = Gcra::new(10, SEC, 3);
        let mut tat = None;
        for expected_remaining in [2, 1, 0] {
            let v = g.decide(tat, Nanos::ZERO, 1);
            assert!(v.allowed);
            assert_eq!(v.remaining, expected_remaining);
            tat = Some(v.next);
        }
        let v = g.decide(tat, Nanos::ZERO, 1);
        assert!(!v.allowed);
        assert_eq!(v.retry_after, Some(SEC / 10));
    }

    #[test]
    fn a_denied_request_fits_exactly_at_retry_after_and_not_a_nanosecond_before() {
        let g = Gcra::new(100, 60 * SEC, 100);
        let mut tat = None;
        for _ in 0..100 {
            tat = Some(g.decide(tat, Nanos::new(5), 1).next);
        }
        let denied = g.decide(tat, Nanos::new(5), 1);
        let wait = denied.retry_after.unwrap();
        assert_eq!(wait, Nanos::new(600_000_000));
        assert!(
            !g.decide(tat, Nanos::new(5) + wait - Nanos::new(1), 1)
                .allowed
        );
        assert!(g.decide(tat, Nanos::new(5) + wait, 1).allowed);
    }

    #[test]
    fn a_cost_above_the_burst_never_fits() {
        let g = Gcra::new(10, SEC, 5);
        let v = g.decide(None, Nanos::ZERO, 6);
        assert!(!v.allowed);
        assert_eq!(v.retry_after, None);
        assert_eq!(v.remaining, 5);
    }

    #[test]
    fn the_interval_rounds_up_so_the_rate_never_exceeds_the_policy() {
        let g = Gcra::new(3, SEC, 1);
        assert_eq!(g.interval(), Nanos::new(333_333_334));
    }

    /// The reference model: a bucket holding `level` nanoseconds of credit,
    /// refilled one per nanosecond up to `burst * interval`, where a request
    /// of cost n needs n * interval credit. No TAT arithmetic at all.
    struct ModelBucket {
        level: u64,
        capacity: u64,
        interval: u64,
        last: u64,
    }

    impl ModelBucket {
        fn take(&mut self, now: u64, cost: u64) -> bool {
            self.level = (self.level + (now - self.last)).min(self.capacity);
            self.last = now;
            let need = cost * self.interval;
            if self.level >= need {
                self.level -= need;
                true
            } else {
                false
            }
        }
    }

    proptest! {
        #[test]
        fn gcra_matches_a_token_bucket_model(
            limit in 1u64..50,
            period_ms in 1u64..5_000,
            burst in 1u64..20,
            steps in proptest::collection::vec((0u64..2_000_000_000, 1u64..25), 1..200),
        ) {
            let g = Gcra::new(limit, Nanos::from_millis(period_ms), burst);
            let mut model = ModelBucket { level: g.tolerance.get(), capacity: g.tolerance.get(), interval: g.interval().get(), last: 0 };
            let mut tat: Option<Nanos> = None;
            let mut now = Nanos::ZERO;
            for (step, cost) in steps {
                now += Nanos::new(step);
                // Evicting idle state must not change any decision.
                if tat.is_some_and(|t| Gcra::is_idle(t, now)) {
                    tat = None;
                }
                let v = g.decide(tat, now, cost);
                prop_assert_eq!(v.allowed, model.take(now.get(), cost));
                if v.allowed {
                    tat = Some(v.next);
                    prop_assert_eq!(v.remaining, model.level / g.interval().get());
                } else if let Some(wait) = v.retry_after {
                    // Waiting exactly retry_after makes it fit, one ns less does not.
                    prop_assert!(g.decide(tat, now + wait, cost).allowed);
                    prop_assert!(wait == Nanos::ZERO || !g.decide(tat, now + wait - Nanos::new(1), cost).allowed);
                }
            }
        }
    }
}
