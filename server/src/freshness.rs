//! Freshness: which request timestamps are acceptable now, and the fence that
//! keeps a restarted process (or, in a cluster, a node taking over a key)
//! from accepting a request its predecessor may already have accepted.
//!
//! Nonces live in memory. A process that starts cannot know which nonces the
//! one before it saw, so it must refuse every timestamp that process could
//! have accepted. The predecessor stopped at some moment `D` no later than our
//! start, and accepted timestamps up to `D + future_skew` (a client whose
//! clock runs ahead). So the [`Fence`] is the first whole second after
//! `start + future_skew`: everything below it is STALE. That is why the
//! future skew is small and separate from the past skew: after a restart, a
//! client with a correct clock is served again `future_skew + 1` seconds
//! later at most.
//!
//! Timestamps are whole Unix seconds. A timestamp `t` is fresh at `now` when
//! `now_secs - past_skew <= t <= now_secs + future_skew` (with `now_secs` the
//! whole second of `now`) and `t >= fence`. A nonce must therefore be
//! remembered until `now_secs > t + past_skew`, i.e. until
//! `(t + past_skew + 1)` seconds: [`Freshness::forget_at`].

use std::time::Duration;

use crate::engine::clock::{Clock, Nanos};

/// The first whole second a request may be signed in, for a process or an
/// owner that started answering at a given moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fence {
    first_second: i64,
}

impl Fence {
    /// The fence for state that begins at `start` with no memory of what was
    /// accepted before: above every timestamp a predecessor, stopped no later
    /// than `start`, could have accepted with `future_skew`.
    pub fn after(start: Nanos, future_skew: Duration) -> Self {
        let start_secs = i64::try_from(start.whole_secs()).unwrap_or(i64::MAX);
        let ahead = i64::try_from(future_skew.as_secs()).unwrap_or(i64::MAX);
        Self {
            first_second: start_secs.saturating_add(ahead).saturating_add(1),
        }
    }

    /// The fence at `first_second` (as a [`Predecessor`] recorded it).
    pub fn at(first_second: i64) -> Self {
        Self { first_second }
    }

    /// The fence for state that begins at `start` after `predecessor`:
    /// above every timestamp it could have accepted with its own future
    /// skew (larger, when the skew was lowered since), and never below its
    /// fence, which covers every process before it.
    pub fn after_predecessor(
        start: Nanos,
        future_skew: Duration,
        predecessor: Option<Predecessor>,
    ) -> Self {
        let ours = Self::after(start, future_skew);
        match predecessor {
            None => ours,
            Some(p) => {
                // Counted from its clock mark, when there is one: a process
                // that stopped long ago accepted nothing lately.
                let stopped = p.last_shown.unwrap_or(start);
                ours.max(Self::after(stopped, p.future_skew)).max(p.fence)
            }
        }
    }

    /// The first acceptable timestamp, in Unix seconds.
    pub fn first_second(self) -> i64 {
        self.first_second
    }

    /// The moment a client with a correct clock is served again.
    pub fn opens_at(self) -> Nanos {
        Nanos::from_secs(u64::try_from(self.first_second).unwrap_or(0))
    }

    /// How long after `now` the fence opens; `None` once it has. A request
    /// refused under a fence not yet open may well be a fresh one from a
    /// correct clock, signed a moment too early: signing it again after
    /// this wait passes. Once the fence has opened, nothing signed before
    /// it ever passes, and there is nothing to wait for.
    pub fn opens_in(self, now: Nanos) -> Option<Nanos> {
        (now < self.opens_at()).then(|| self.opens_at() - now)
    }

    /// Returns once `clock` shows the fence open: looked at again every
    /// 100 ms, not slept through at once, as a clock held at the previous
    /// process's clock mark stands still for a while.
    pub async fn opened(self, clock: &dyn Clock) {
        loop {
            let wait = self.opens_at().saturating_sub(clock.now());
            if wait == Nanos::ZERO {
                return;
            }
            tokio::time::sleep(Duration::from(wait).min(Duration::from_millis(100))).await;
        }
    }
}

/// What the process before this one left for its fence (see
/// `fence_record`): the future skew it accepted timestamps with, its own
/// fence, and the latest time it may have shown (its clock mark; `None`
/// without one: then this process's start stands in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Predecessor {
    pub future_skew: Duration,
    pub fence: Fence,
    pub last_shown: Option<Nanos>,
}

/// Why a timestamp is not fresh. Each has its own message, safe for clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stale {
    /// Signed before the fence: a predecessor may have accepted it.
    BeforeFence,
    /// Older than the past skew allows.
    TooOld,
    /// Further ahead of the server's clock than the future skew allows.
    TooFarAhead,
    /// Signed before a cluster node took the key's state over: the node
    /// that kept it before may have accepted it. `retry_after`: how long
    /// until the owner's fence opens ([`Fence::opens_in`]), when it has not
    /// yet (and the owner said so: nodes of earlier versions do not).
    TakenOver { retry_after: Option<Nanos> },
}

impl Stale {
    pub fn message(self) -> &'static str {
        match self {
            Stale::BeforeFence => {
                "timestamp: signed before this server started answering; sign the request again"
            }
            Stale::TooOld => "timestamp: older than the allowed clock skew",
            Stale::TooFarAhead => {
                "timestamp: ahead of the server clock by more than allowed; check the client's clock"
            }
            Stale::TakenOver { .. } => {
                "timestamp: signed before this key's state moved to another node; sign again with the current time"
            }
        }
    }
}

/// The freshness rule of one process: the skews and its fence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Freshness {
    past_skew: u64,
    future_skew: u64,
    fence: Fence,
}

impl Freshness {
    /// The rule for a process starting at `start` with no record of the
    /// one before (its skews taken to be these).
    pub fn starting_at(start: Nanos, past_skew: Duration, future_skew: Duration) -> Self {
        Self::starting_after(start, past_skew, future_skew, None)
    }

    /// The rule for a process starting at `start` after `predecessor`.
    pub fn starting_after(
        start: Nanos,
        past_skew: Duration,
        future_skew: Duration,
        predecessor: Option<Predecessor>,
    ) -> Self {
        Self {
            past_skew: past_skew.as_secs(),
            future_skew: future_skew.as_secs(),
            fence: Fence::after_predecessor(start, future_skew, predecessor),
        }
    }

    pub fn fence(&self) -> Fence {
        self.fence
    }

    /// The same skews, behind `fence`.
    pub fn with_fence(self, fence: Fence) -> Self {
        Self { fence, ..self }
    }

    /// Whether a request signed at `timestamp` (Unix seconds) may be
    /// accepted at `now`.
    pub fn judge(&self, timestamp: i64, now: Nanos) -> Result<(), Stale> {
        if timestamp < self.fence.first_second {
            return Err(Stale::BeforeFence);
        }
        self.within_skews(timestamp, now)
    }

    /// Whether `timestamp` lies within the skews of `now`, fence aside:
    /// how a cluster node judges a request another node let through, for
    /// the state it keeps. The nonce lives by this node's clock, so it
    /// must be this clock that says the request is still fresh: a node
    /// whose clock runs ahead of the receiving node's would otherwise store
    /// a nonce it has already forgotten, and the request could be replayed.
    pub fn within_skews(&self, timestamp: i64, now: Nanos) -> Result<(), Stale> {
        let now_secs = i128::from(now.whole_secs());
        let t = i128::from(timestamp);
        if t < now_secs - i128::from(self.past_skew) {
            return Err(Stale::TooOld);
        }
        if t > now_secs + i128::from(self.future_skew) {
            return Err(Stale::TooFarAhead);
        }
        Ok(())
    }

    /// When the replay key of a request signed at `timestamp` may be
    /// forgotten: the first moment [`Self::judge`] refuses it as too old.
    pub fn forget_at(&self, timestamp: i64) -> Nanos {
        Nanos::from_secs(
            u64::try_from(timestamp)
                .unwrap_or(0)
                .saturating_add(self.past_skew + 1),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Nanos = Nanos::from_secs(1);

    fn rule(start: Nanos) -> Freshness {
        Freshness::starting_at(start, Duration::from_secs(300), Duration::from_secs(5))
    }

    #[test]
    fn the_fence_covers_the_future_skew_after_the_start_second() {
        let f = rule(1000 * S + S / 2);
        assert_eq!(f.fence().first_second(), 1006);
        assert_eq!(f.fence().opens_at(), 1006 * S);
        let none = Freshness::starting_at(1000 * S, Duration::from_secs(300), Duration::ZERO);
        assert_eq!(none.fence().first_second(), 1001);
    }

    #[test]
    fn each_stale_timestamp_gets_its_own_reason() {
        let f = rule(1000 * S);
        let now = 2000 * S + S / 2;
        assert_eq!(f.judge(1005, now), Err(Stale::BeforeFence));
        assert_eq!(f.judge(2000 - 300, now), Ok(()));
        assert_eq!(f.judge(2000 - 301, now), Err(Stale::TooOld));
        assert_eq!(f.judge(2005, now), Ok(()));
        assert_eq!(f.judge(2006, now), Err(Stale::TooFarAhead));
        assert_eq!(f.judge(i64::MAX, now), Err(Stale::TooFarAhead));
        assert_eq!(f.judge(i64::MIN, now), Err(Stale::BeforeFence));
    }

    #[test]
    fn a_nonce_is_kept_exactly_as_long_as_its_timestamp_is_fresh() {
        let f = rule(Nanos::ZERO);
        let t = 5000;
        let forget = f.forget_at(t);
        assert_eq!(f.judge(t, forget - Nanos::new(1)), Ok(()));
        assert_eq!(f.judge(t, forget), Err(Stale::TooOld));
    }

    proptest! {
        /// The property the fence exists for: whatever a predecessor accepted
        /// at any moment up to our start, we refuse, at any moment after.
        #[test]
        fn nothing_a_predecessor_accepted_is_accepted_after_a_restart(
            start in 1_000_000u64..2_000_000,
            stopped_before in 0u64..400,
            accepted_at_offset in 0u64..400,
            ts_offset in -400i64..400,
            later in 0u64..1000,
            future in 0u64..60,
        ) {
            let past = Duration::from_secs(300);
            let future = Duration::from_secs(future);
            let start = start * S;
            // The predecessor started long before and stopped no later than us.
            let stopped = start - stopped_before * S / 3;
            let pred = Freshness::starting_at(Nanos::ZERO, past, future);
            let accepted_at = stopped.saturating_sub(accepted_at_offset * S / 7);
            let ts = (accepted_at / S) as i64 + ts_offset;
            prop_assume!(pred.judge(ts, accepted_at).is_ok());
            let next = Freshness::starting_at(start, past, future);
            prop_assert!(next.judge(ts, start + later * S / 3).is_err());
        }

        /// The same through a chain of processes whose future skews were
        /// changed at each restart (lowered, raised), each following the
        /// record and the clock mark of the one before: nothing the first
        /// or the second accepted is accepted by the third.
        #[test]
        fn nothing_any_predecessor_accepted_is_accepted_whatever_the_skews_became(
            skews in proptest::array::uniform3(0u64..300),
            first_start in 1_000_000u64..1_000_100,
            runs in proptest::array::uniform2(0u64..400),
            downs in proptest::array::uniform2(0u64..400),
            with_mark in proptest::array::uniform2(proptest::bool::ANY),
            accepted_by in 0usize..2,
            when in 0.0f64..=1.0,
            how_far_ahead in 0.0f64..=1.0,
            later in 0u64..1000,
        ) {
            let past = Duration::from_secs(300);
            let skew = |i: usize| Duration::from_secs(skews[i]);
            // Each process runs, stops (its last mark: the latest time it
            // showed), and the next starts after a while down, its clock
            // held at that mark at least.
            let mut starts = vec![first_start * S];
            let mut stops = Vec::new();
            let mut rules = vec![Freshness::starting_at(starts[0], past, skew(0))];
            for i in 1..3 {
                let stopped = starts[i - 1] + runs[i - 1] * S / 3;
                let start = stopped + downs[i - 1] * S / 3;
                let before = Predecessor {
                    future_skew: skew(i - 1),
                    fence: rules[i - 1].fence(),
                    last_shown: with_mark[i - 1].then_some(stopped),
                };
                rules.push(Freshness::starting_after(start, past, skew(i), Some(before)));
                starts.push(start);
                stops.push(stopped);
            }
            // Accepted while it ran, signed up to its skew ahead.
            let (from, to) = (starts[accepted_by], stops[accepted_by]);
            let accepted_at = from + Nanos::new(((to - from).get() as f64 * when) as u64);
            let ahead = (skews[accepted_by] as f64 * how_far_ahead) as i64;
            let ts = (accepted_at / S) as i64 + ahead;
            prop_assume!(rules[accepted_by].judge(ts, accepted_at).is_ok());
            prop_assert!(rules[2].judge(ts, starts[2] + later * S / 3).is_err());
        }
    }

    #[test]
    fn a_lowered_future_skew_is_fenced_behind_the_previous_one() {
        /// The first second fenced for a process starting at `start` with a
        /// `future_skew` of `skew` seconds after `before`.
        fn fence_after(start: Nanos, skew: u64, before: Predecessor) -> i64 {
            let past = Duration::from_secs(300);
            Freshness::starting_after(start, past, Duration::from_secs(skew), Some(before))
                .fence()
                .first_second()
        }
        let lowered = Predecessor {
            future_skew: Duration::from_secs(20),
            fence: Fence::at(900),
            last_shown: None,
        };
        assert_eq!(fence_after(1000 * S + S / 2, 5, lowered), 1021);
        // A recorded fence above it stands (a skew lowered twice in a row).
        let fenced_later = Predecessor {
            future_skew: Duration::from_secs(5),
            fence: Fence::at(1300),
            last_shown: None,
        };
        assert_eq!(fence_after(1000 * S, 5, fenced_later), 1300);
        // A raised one needs nothing of the record.
        let raised = Predecessor {
            future_skew: Duration::from_secs(5),
            fence: Fence::at(900),
            last_shown: None,
        };
        assert_eq!(fence_after(1000 * S, 60, raised), 1061);
        // Counted from its clock mark: stopped 100 s before this start, a
        // 20 s skew asks nothing more of it.
        let long_stopped = Predecessor {
            last_shown: Some(900 * S),
            ..lowered
        };
        assert_eq!(fence_after(1000 * S, 5, long_stopped), 1006);
        // Stopped 10 s before: 10 s more.
        let just_stopped = Predecessor {
            last_shown: Some(990 * S),
            ..lowered
        };
        assert_eq!(fence_after(1000 * S, 5, just_stopped), 1011);
    }
}
