//! A bound on how many lines of one event warden logs a second.
//!
//! Why: every denied check is one log line (`check_denied`, about 270
//! bytes of JSON). A client that floods warden with requests it knows will
//! be refused (over its limit, badly signed, replayed) made warden write
//! one line per request: 16 MB a second at 60,000 refusals a second, into
//! the log pipeline of whoever runs it, and 2–3 µs of server CPU per
//! refusal on top of the check's 15 (session 42, forward auth). The lines
//! past the budget are counted, not written; the count is logged once the
//! second is over, and `warden_checks_total` still counts every decision.

use std::sync::atomic::{AtomicU64, Ordering};

/// Lines of one event allowed a second (of a monotonic clock).
#[derive(Debug)]
pub struct LineBudget {
    per_second: u32,
    /// The current second (high 32 bits) and the lines allowed in it so far
    /// (low 32 bits), changed together.
    second_and_count: AtomicU64,
    /// Lines refused since the last [`Line::AfterSkipping`].
    skipped: AtomicU64,
}

/// Whether to write a line.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Write,
    /// Write it, and say first that this many were not written before it.
    AfterSkipping(u64),
    /// Over the budget: counted, not written.
    Skip,
}

impl LineBudget {
    /// `per_second` lines a second; 0 writes none (each is counted).
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second,
            second_and_count: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    /// Whether a line may be written at `now_ms` (milliseconds of a
    /// monotonic clock).
    pub fn line(&self, now_ms: u64) -> Line {
        let second = (now_ms / 1000) & u64::from(u32::MAX);
        let mut current = self.second_and_count.load(Ordering::Relaxed);
        loop {
            let same_second = current >> 32 == second;
            let count = if same_second {
                current & 0xffff_ffff
            } else {
                0
            };
            if count >= u64::from(self.per_second) {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                return Line::Skip;
            }
            let next = (second << 32) | (count + 1);
            match self.second_and_count.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                // The first line of a second reports what the seconds
                // before it skipped.
                Ok(_) if count == 0 => {
                    return match self.skipped.swap(0, Ordering::Relaxed) {
                        0 => Line::Write,
                        skipped => Line::AfterSkipping(skipped),
                    };
                }
                Ok(_) => return Line::Write,
                Err(now) => current = now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_past_the_budget_of_a_second_are_skipped_and_reported_with_the_next_second() {
        let budget = LineBudget::new(3);
        let at = 5_000;
        assert_eq!(budget.line(at), Line::Write);
        assert_eq!(budget.line(at + 10), Line::Write);
        assert_eq!(budget.line(at + 20), Line::Write);
        for ms in 0..100 {
            assert_eq!(budget.line(at + 30 + ms), Line::Skip);
        }
        // A quiet second between: the count waits for the next line.
        assert_eq!(budget.line(at + 2_500), Line::AfterSkipping(100));
        assert_eq!(budget.line(at + 2_600), Line::Write);
        assert_eq!(budget.line(at + 2_700), Line::Write);
        assert_eq!(budget.line(at + 2_800), Line::Skip);
        assert_eq!(budget.line(at + 3_000), Line::AfterSkipping(1));
    }

    #[test]
    fn a_budget_of_zero_writes_nothing_and_counts_everything() {
        let budget = LineBudget::new(0);
        for ms in 0..3_000 {
            assert_eq!(budget.line(ms), Line::Skip);
        }
        assert_eq!(budget.skipped.load(Ordering::Relaxed), 3_000);
    }

    #[test]
    fn threads_racing_for_one_second_write_exactly_the_budget() {
        let budget = std::sync::Arc::new(LineBudget::new(1_000));
        let written: u64 = (0..4)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || {
                    (0..10_000)
                        .filter(|_| budget.line(42_000) != Line::Skip)
                        .count() as u64
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(written, 1_000);
        assert_eq!(budget.skipped.load(Ordering::Relaxed), 39_000);
    }
}
