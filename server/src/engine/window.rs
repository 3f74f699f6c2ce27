//! Window counters: the fixed window (a count per period) and the sliding
//! window counter (the previous window's count, weighted by how much of it
//! still overlaps the sliding period, plus the current count).
//!
//! All arithmetic is exact integer arithmetic: a request of cost `n` fits a
//! sliding window when `prev * (period - elapsed) + (cur + n) * period <=
//! limit * period`.

use super::clock::Nanos;
use super::gcra::LimitStep;

/// Which window algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowKind {
    Fixed,
    Sliding,
}

/// The parameters of one window limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    kind: WindowKind,
    limit: u64,
    period: Nanos,
}

/// Counts of one key. `index` is the number of the window (`now / period`)
/// the counts belong to; `idle_at` is when the state stops mattering, so the
/// sweeper can drop it without knowing the policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowState {
    pub index: u64,
    pub idle_at: Nanos,
    pub prev: u32,
    pub cur: u32,
}

impl Window {
    /// `limit` requests per `period` nanoseconds. `limit` is at most
    /// `u32::MAX` so that counts fit the compact state.
    pub fn new(kind: WindowKind, limit: u64, period: Nanos) -> Self {
        assert!(
            limit > 0 && period > Nanos::ZERO,
            "window parameters must be positive"
        );
        assert!(limit <= u64::from(u32::MAX), "window limit must fit in u32");
        Self {
            kind,
            limit,
            period,
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn period(&self) -> Nanos {
        self.period
    }

    pub fn kind(&self) -> WindowKind {
        self.kind
    }

    /// The counts as they stand at `now`, rolled forward to the current window.
    fn current(&self, state: Option<WindowState>, now: Nanos) -> (u64, u64, u64) {
        let index = now / self.period;
        let (prev, cur) = match state {
            Some(s) if s.index == index => (u64::from(s.prev), u64::from(s.cur)),
            Some(s) if s.index + 1 == index => (u64::from(s.cur), 0),
            _ => (0, 0),
        };
        let prev = if self.kind == WindowKind::Fixed {
            0
        } else {
            prev
        };
        (index, prev, cur)
    }

    pub fn decide(
        &self,
        state: Option<WindowState>,
        now: Nanos,
        cost: u64,
    ) -> LimitStep<WindowState> {
        let (index, prev, cur) = self.current(state, now);
        let p = u128::from(self.period.get());
        let elapsed = now - index * self.period;
        let weighted_prev = u128::from(prev) * u128::from((self.period - elapsed).get());
        let budget = u128::from(self.limit) * p;
        let used = weighted_prev + u128::from(cur) * p;
        let allowed = used + u128::from(cost) * p <= budget;
        let cur_after = if allowed { cur + cost } else { cur };
        let used_after = weighted_prev + u128::from(cur_after) * p;
        let remaining = u64::try_from(budget.saturating_sub(used_after) / p).unwrap_or(0);
        let windows_to_idle = if self.kind == WindowKind::Sliding {
            2
        } else {
            1
        };
        let next = WindowState {
            index,
            idle_at: self.period.saturating_mul(index + windows_to_idle),
            prev: u32::try_from(prev).unwrap_or(u32::MAX),
            cur: u32::try_from(cur_after).unwrap_or(u32::MAX),
        };
        let to_window_end = self.period - elapsed;
        let reset_after = match (self.kind, prev, cur_after) {
            (_, 0, 0) => Nanos::ZERO,
            (WindowKind::Fixed, _, _) => to_window_end,
            (WindowKind::Sliding, _, 0) => to_window_end,
            (WindowKind::Sliding, _, _) => to_window_end + self.period,
        };
        let retry_after = (!allowed)
            .then(|| self.retry_after(prev, cur, elapsed, cost))
            .flatten();
        LimitStep {
            allowed,
            next,
            remaining,
            reset_after,
            retry_after,
        }
    }

    /// Nanoseconds until a request of `cost` fits, or `None` if it never can.
    fn retry_after(&self, prev: u64, cur: u64, elapsed: Nanos, cost: u64) -> Option<Nanos> {
        if cost > self.limit {
            return None;
        }
        let p = u128::from(self.period.get());
        let to_window_end = self.period - elapsed;
        match self.kind {
            WindowKind::Fixed => Some(to_window_end),
            WindowKind::Sliding if cur + cost <= self.limit => {
                // Only the previous window's weight is in the way: wait until
                // prev * (period - e) <= (limit - cur - cost) * period.
                let free = u128::from(self.limit - cur - cost) * p;
                let e = p - free / u128::from(prev);
                Some(Nanos::new(u64::try_from(e).unwrap_or(u64::MAX)) - elapsed)
            }
            WindowKind::Sliding => {
                // The current count itself is too high: in the next window it
                // becomes the weighted previous count.
                let free = u128::from(self.limit - cost) * p;
                let e = p - free / u128::from(cur);
                Some(to_window_end + Nanos::new(u64::try_from(e).unwrap_or(u64::MAX)))
            }
        }
    }

    /// Takes back `cost` counted at `taken_at` from `state`.
    pub fn refund(&self, state: &mut WindowState, taken_at: Nanos, cost: u64) {
        let cost = u32::try_from(cost).unwrap_or(u32::MAX);
        let index = taken_at / self.period;
        if state.index == index {
            state.cur = state.cur.saturating_sub(cost);
        } else if state.index == index + 1 {
            state.prev = state.prev.saturating_sub(cost);
        }
    }

    pub fn is_idle(state: &WindowState, now: Nanos) -> bool {
        state.idle_at <= now
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: Nanos = Nanos::from_secs(1);

    #[test]
    fn fixed_window_resets_at_the_boundary_exactly() {
        let w = Window::new(WindowKind::Fixed, 2, SEC);
        let mut s = None;
        for _ in 0..2 {
            let v = w.decide(s, Nanos::new(100), 1);
            assert!(v.allowed);
            s = Some(v.next);
        }
        let v = w.decide(s, Nanos::new(100), 1);
        assert!(!v.allowed);
        assert_eq!(v.retry_after, Some(SEC - Nanos::new(100)));
        assert!(!w.decide(s, SEC - Nanos::new(1), 1).allowed);
        assert!(w.decide(s, SEC, 1).allowed);
    }

    #[test]
    fn sliding_window_weights_the_previous_window() {
        let w = Window::new(WindowKind::Sliding, 10, SEC);
        let mut s = None;
        for _ in 0..10 {
            let v = w.decide(s, Nanos::ZERO, 1);
            assert!(v.allowed);
            s = Some(v.next);
        }
        // A quarter into the next window, 75% of the 10 still count: 7.5, so
        // two more fit (9.5) and the third does not (10.5).
        let t = SEC + SEC / 4;
        let v1 = w.decide(s, t, 1);
        assert!(v1.allowed);
        let v2 = w.decide(Some(v1.next), t, 1);
        assert!(v2.allowed);
        let v3 = w.decide(Some(v2.next), t, 1);
        assert!(!v3.allowed);
        let wait = v3.retry_after.unwrap();
        assert!(w.decide(Some(v2.next), t + wait, 1).allowed);
        assert!(!w.decide(Some(v2.next), t + wait - Nanos::new(1), 1).allowed);
    }

    #[test]
    fn a_cost_above_the_limit_never_fits() {
        for kind in [WindowKind::Fixed, WindowKind::Sliding] {
            let v = Window::new(kind, 3, SEC).decide(None, Nanos::ZERO, 4);
            assert!(!v.allowed);
            assert_eq!(v.retry_after, None);
        }
    }

    /// Reference model: the log of every allowed request; the counts are
    /// recomputed from it at each step.
    fn model_allows(
        kind: WindowKind,
        limit: u64,
        period: u64,
        log: &[(u64, u64)],
        now: u64,
        cost: u64,
    ) -> bool {
        let index = now / period;
        let count_in = |i: u64| {
            log.iter()
                .filter(|(t, _)| t / period == i)
                .map(|(_, c)| c)
                .sum::<u64>()
        };
        let cur = count_in(index);
        match kind {
            WindowKind::Fixed => cur + cost <= limit,
            WindowKind::Sliding => {
                let prev = if index == 0 { 0 } else { count_in(index - 1) };
                let elapsed = now % period;
                u128::from(prev) * u128::from(period - elapsed)
                    + u128::from(cur + cost) * u128::from(period)
                    <= u128::from(limit) * u128::from(period)
            }
        }
    }

    proptest! {
        #[test]
        fn windows_match_an_event_log_model(
            sliding in any::<bool>(),
            limit in 1u64..30,
            period_ms in 1u64..3_000,
            steps in proptest::collection::vec((0u64..1_500_000_000, 1u64..10), 1..150),
        ) {
            let kind = if sliding { WindowKind::Sliding } else { WindowKind::Fixed };
            let period = period_ms * 1_000_000;
            let w = Window::new(kind, limit, Nanos::new(period));
            let mut state: Option<WindowState> = None;
            let mut log = Vec::new();
            let mut now = Nanos::ZERO;
            for (step, cost) in steps {
                now += Nanos::new(step);
                if state.is_some_and(|s| Window::is_idle(&s, now)) {
                    state = None;
                }
                let v = w.decide(state, now, cost);
                prop_assert_eq!(v.allowed, model_allows(kind, limit, period, &log, now.get(), cost));
                if v.allowed {
                    state = Some(v.next);
                    log.push((now.get(), cost));
                } else if let Some(wait) = v.retry_after {
                    prop_assert!(model_allows(kind, limit, period, &log, (now + wait).get(), cost));
                    prop_assert!(wait == Nanos::ZERO || !model_allows(kind, limit, period, &log, (now + wait).get() - 1, cost));
                }
            }
        }
    }
}
