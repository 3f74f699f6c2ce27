//! How long a call looks for its answer before its thread sleeps.
//!
//! The compiled transport of the Python client (`client/python-native`)
//! runs each call on the calling thread. Sleeping costs a wake-up when the
//! answer comes: measured on the 2-core VM warden is measured on (warden on
//! the same host), 87 µs per call when the thread sleeps at once against
//! 54 µs when it keeps looking, and a Django middleware's overhead 219 →
//! 135 µs. Looking costs CPU, so it is bounded: at most `max` per call, and
//! only while most recent looks found their answer within `max`; calls to
//! a remote or busy warden, whose answers take longer, sleep at once rather
//! than spin in vain.
//!
//! The policy lives here, not in the extension module, so that it is
//! tested: an extension module links no test binary.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The looking policy of one channel (see the module documentation).
///
/// "Most" is a moving average of hits, not of durations, so that one slow
/// answer (a server pausing for a millisecond) does not stop the looking
/// that pays for all the others. Only calls that looked are counted: a call
/// that slept got its answer later by its own wake-up, often past `max`
/// though it would have come within it to a call that looked. Counting
/// those kept looking off for good once a bad moment (six slow answers in
/// a row) had turned it off. While it is off, one call in
/// [`BusyWait::PROBE_EVERY`] looks anyway, and a probe answered in time
/// turns it on again as it was at first: it takes six late answers in a
/// row to turn it off again. Before, the probe only nudged the average
/// back over the line, where the next late answer (one in ten on a VM
/// whose server had gone idle) turned it off again for another
/// `PROBE_EVERY` calls: looking stayed off nearly for good at a 93 % hit
/// rate, which for an async call meant three thread wake-ups instead of
/// none.
#[derive(Debug)]
pub struct BusyWait {
    max: Duration,
    /// Share of recent looking calls answered within `max`, as a fraction
    /// of [`ALL_HITS`].
    hits: AtomicU32,
    /// Calls since looking went off, for choosing the probes.
    calls: AtomicU32,
}

/// Every recent looking call answered within the budget.
const ALL_HITS: u32 = 1 << 16;

impl BusyWait {
    /// The longest look accepted: beyond it, sleeping costs less.
    pub const MAX: Duration = Duration::from_millis(10);

    /// While looking is off, one call in this many looks anyway: what a
    /// remote warden costs (at most `max` of CPU per that many calls) for
    /// looking to come back within two probes once answers come soon again.
    pub const PROBE_EVERY: u32 = 32;

    /// A policy looking for up to `max` (0: never look); `None` beyond
    /// [`Self::MAX`].
    pub fn new(max: Duration) -> Option<Self> {
        (max <= Self::MAX).then(|| Self {
            max,
            hits: AtomicU32::new(ALL_HITS),
            calls: AtomicU32::new(0),
        })
    }

    /// How long the next call may look before sleeping: `max` while at
    /// least half of recent looks were answered within it, and for a probe
    /// while they were not.
    pub fn budget(&self) -> Duration {
        if self.hits.load(Ordering::Relaxed) >= ALL_HITS / 2
            || self
                .calls
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(Self::PROBE_EVERY)
        {
            self.max
        } else {
            Duration::ZERO
        }
    }

    /// Counts a call given `budget` (by [`Self::budget`]) and answered
    /// after `took`; weight 1/8, so that six answers in a row later than
    /// `max` stop the looking. A probe (a call that looked while looking
    /// was off) answered in time starts looking again with a clean record;
    /// one answered late leaves it off. Calls from several threads may race
    /// here; a lost sample does not matter.
    pub fn observe(&self, budget: Duration, took: Duration) {
        if budget.is_zero() {
            return;
        }
        let hits = self.hits.load(Ordering::Relaxed);
        let in_time = took <= self.max;
        let now = match (hits >= ALL_HITS / 2, in_time) {
            (true, true) => hits - hits / 8 + ALL_HITS / 8,
            (true, false) => hits - hits / 8,
            (false, true) => ALL_HITS,
            (false, false) => hits,
        };
        if hits >= ALL_HITS / 2 && now < ALL_HITS / 2 {
            // The first call after this is a probe only PROBE_EVERY calls on.
            self.calls.store(1, Ordering::Relaxed);
        }
        self.hits.store(now, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(200);
    const SOON: Duration = Duration::from_micros(100);
    const LATE: Duration = Duration::from_micros(300);

    /// Makes one call answered after `took` (as a thread that looked, or
    /// slept, as the budget said); whether it looked.
    fn call(wait: &BusyWait, took: Duration) -> bool {
        let budget = wait.budget();
        wait.observe(budget, took);
        !budget.is_zero()
    }

    fn looking_turned_off() -> BusyWait {
        let wait = BusyWait::new(MAX).unwrap();
        for _ in 0..6 {
            assert!(call(&wait, LATE));
        }
        wait
    }

    #[test]
    fn looking_stops_after_six_answers_later_than_the_budget() {
        let wait = BusyWait::new(MAX).unwrap();
        for _ in 0..5 {
            assert!(call(&wait, LATE));
        }
        assert!(call(&wait, LATE), "five late answers stopped the looking");
        assert_eq!(wait.budget(), Duration::ZERO);
    }

    #[test]
    fn one_slow_answer_among_soon_ones_does_not_stop_looking() {
        let wait = BusyWait::new(MAX).unwrap();
        for i in 0..1000 {
            let took = if i % 10 == 0 { LATE } else { SOON };
            assert!(call(&wait, took), "stopped looking at call {i}");
        }
    }

    /// The trap this policy once had: sleeping calls come later than the
    /// budget by their wake-up, and counted as misses they kept looking off
    /// for good although answers came soon again.
    #[test]
    fn sleeping_calls_answered_late_by_their_wake_up_do_not_keep_looking_off() {
        let wait = looking_turned_off();
        // The server answers soon again: looking calls get it within the
        // budget, sleeping calls only past it.
        let mut calls = 0;
        let mut looked_in_a_row = 0;
        while looked_in_a_row < 100 {
            let looks = wait.budget();
            wait.observe(looks, if looks.is_zero() { LATE } else { SOON });
            looked_in_a_row = if looks.is_zero() {
                0
            } else {
                looked_in_a_row + 1
            };
            calls += 1;
            assert!(
                calls <= 2 * BusyWait::PROBE_EVERY + 100,
                "looking never came back"
            );
        }
    }

    /// The trap this policy had next: a probe answered in time put the
    /// average just back over the line, and the next late answer turned
    /// looking off again. With one answer in ten late (a VM whose server
    /// had gone idle between calls), looking stayed off for most calls.
    #[test]
    fn looking_turned_on_again_by_a_probe_survives_the_next_late_answers() {
        let wait = looking_turned_off();
        let mut calls = 0;
        while !call(&wait, SOON) {
            calls += 1;
            assert!(calls <= BusyWait::PROBE_EVERY, "no probe");
        }
        for i in 0..5 {
            assert!(
                call(&wait, LATE),
                "late answer {i} after the probe stopped the looking"
            );
        }
        // One answer in ten late from then on: looking stays on.
        for i in 0..1000 {
            let took = if i % 10 == 9 { LATE } else { SOON };
            assert!(call(&wait, took), "stopped looking at call {i}");
        }
    }

    #[test]
    fn a_server_that_answers_late_costs_one_probe_in_every_probe_every_calls() {
        let wait = looking_turned_off();
        let looked = (0..BusyWait::PROBE_EVERY * 10)
            .filter(|_| call(&wait, LATE))
            .count();
        assert_eq!(looked, 10);
    }

    #[test]
    fn a_budget_of_zero_never_looks_and_one_past_the_limit_is_refused() {
        let never = BusyWait::new(Duration::ZERO).unwrap();
        assert!((0..100).all(|_| !call(&never, SOON)));
        assert!(BusyWait::new(BusyWait::MAX + Duration::from_micros(1)).is_none());
    }
}
