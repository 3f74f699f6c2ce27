//! Security denials, aggregated: one audit record per subject and window,
//! with a count and the first and last time, instead of one per denial.
//!
//! A flood of forged requests used to append one record each (616,000 in
//! one short attack). Now a window's denials for one (action, reason, key,
//! caller, source) make one record. The subjects held per window are
//! bounded: past the bound, denials of further subjects are summed per
//! (action, reason, caller) under key and source `*`, so a spray of junk key
//! ids or addresses costs at most `max_subjects` records per window plus a
//! handful.

use std::collections::HashMap;

use super::Event;

/// What one aggregated record is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Subject {
    pub action: &'static str,
    pub reason: &'static str,
    pub key_id: String,
    pub actor: String,
    /// The request's source (forwarded client identity or address), or "-".
    pub source: String,
}

#[derive(Clone, Copy, Debug)]
struct Tally {
    count: u64,
    first_ms: i64,
    last_ms: i64,
}

/// One window's tallies.
#[derive(Debug)]
pub struct Ledger {
    max_subjects: usize,
    tallies: HashMap<Subject, Tally>,
}

impl Ledger {
    pub fn new(max_subjects: usize) -> Self {
        Self {
            max_subjects,
            tallies: HashMap::new(),
        }
    }

    /// Counts one denial at `now_ms`.
    pub fn count(&mut self, subject: Subject, now_ms: i64) {
        if let Some(t) = self.tallies.get_mut(&subject) {
            t.count += 1;
            t.last_ms = now_ms;
            return;
        }
        let subject = if self.tallies.len() >= self.max_subjects {
            Subject {
                key_id: "*".into(),
                source: "*".into(),
                ..subject
            }
        } else {
            subject
        };
        let t = self.tallies.entry(subject).or_insert(Tally {
            count: 0,
            first_ms: now_ms,
            last_ms: now_ms,
        });
        t.count += 1;
        t.last_ms = now_ms;
    }

    pub fn is_empty(&self) -> bool {
        self.tallies.is_empty()
    }

    /// The window's records, oldest first; the ledger starts afresh.
    pub fn drain(&mut self) -> Vec<Event> {
        let mut tallies: Vec<_> = self.tallies.drain().collect();
        tallies.sort_by_key(|(s, t)| (t.first_ms, s.key_id.clone()));
        tallies
            .into_iter()
            .map(|(s, t)| {
                let detail = format!(
                    "reason={} count={} first_ms={} last_ms={} source={}",
                    s.reason, t.count, t.first_ms, t.last_ms, s.source
                );
                Event {
                    actor: s.actor,
                    action: s.action,
                    key_id: s.key_id,
                    detail,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(key: &str) -> Subject {
        Subject {
            action: "check.denied",
            reason: "unauthenticated",
            key_id: key.into(),
            actor: "spiffe://gw".into(),
            source: "203.0.113.7".into(),
        }
    }

    #[test]
    fn a_flood_on_one_subject_is_one_record_with_its_count_and_times() {
        let mut l = Ledger::new(10);
        for t in 0..10_000 {
            l.count(subject("k1"), 1_000 + t);
        }
        let records = l.drain();
        assert_eq!(records.len(), 1);
        assert_eq!(
            records[0].detail,
            "reason=unauthenticated count=10000 first_ms=1000 last_ms=10999 source=203.0.113.7"
        );
        assert!(l.is_empty());
    }

    #[test]
    fn a_spray_of_junk_subjects_is_bounded_and_summed() {
        let mut l = Ledger::new(100);
        for i in 0..50_000 {
            l.count(subject(&format!("junk-{i}")), i);
        }
        let records = l.drain();
        assert_eq!(records.len(), 101);
        let folded = records.iter().find(|r| r.key_id == "*").unwrap();
        assert!(folded.detail.contains("count=49900"), "{}", folded.detail);
        assert!(folded.detail.ends_with("source=*"), "{}", folded.detail);
    }
}
