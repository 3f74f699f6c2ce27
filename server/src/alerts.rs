//! Anomaly alerts: the "alert on spikes" of the Redis recipe, without an
//! external system. Security denials are counted per key id and per caller
//! identity in fixed windows; a count reaching its threshold raises exactly
//! one alert for that subject, kind and window, instead of a flood.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::config::AlertSettings;
use crate::engine::clock::duration_nanos;
use crate::engine::{Clock, Nanos};

/// What is being counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Bad signatures and unknown or revoked keys.
    BadSignature,
    Replay,
    Lockout,
    RateLimited,
}

impl Kind {
    /// How many kinds there are.
    const COUNT: usize = 4;

    /// Where this kind's counts are kept. Every kind named, so that a kind
    /// added is not missed here (and `COUNT` grows with it).
    fn index(self) -> usize {
        match self {
            Kind::BadSignature => 0,
            Kind::Replay => 1,
            Kind::Lockout => 2,
            Kind::RateLimited => 3,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::BadSignature => "bad_signature",
            Kind::Replay => "replay",
            Kind::Lockout => "lockout",
            Kind::RateLimited => "rate_limited",
        }
    }
}

/// Whom an alert is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SubjectKind {
    Key,
    Caller,
}

impl SubjectKind {
    pub fn name(self) -> &'static str {
        match self {
            SubjectKind::Key => "key",
            SubjectKind::Caller => "caller",
        }
    }
}

/// One raised alert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub kind: Kind,
    pub subject_kind: SubjectKind,
    pub subject: String,
    pub threshold: u32,
}

/// Most subjects tracked at once. When full, a tenth of them is evicted
/// (and counted): those with the fewest events this window, and among
/// equals those touched longest ago. A spray of junk key ids (one event
/// each) then evicts itself and never a subject on its way to an alert;
/// purely oldest-first would let the spray push out a real key that is hit
/// less often than the table turns over.
const MAX_SUBJECTS: usize = 100_000;

/// One subject's count in its window, and when it was last touched.
#[derive(Clone, Copy, Debug)]
struct Count {
    window: u64,
    count: u32,
    touched: u64,
}

impl Count {
    /// Counts one event in `window`: a count of a past window starts again.
    fn count_one(&mut self, window: u64, touched: u64) -> u32 {
        if self.window != window {
            self.window = window;
            self.count = 0;
        }
        self.touched = touched;
        self.count = self.count.saturating_add(1);
        self.count
    }
}

/// How many (kind, subject kind) pairs there are: one map of counts each.
const GROUPS: usize = Kind::COUNT * 2;

/// The map a subject's count lives in. Kept apart by kind and subject kind,
/// so that a subject already counted is found by its name alone, without
/// copying it into a key: a flood of denials from one key allocates nothing.
fn group(kind: Kind, subject_kind: SubjectKind) -> usize {
    let subject = match subject_kind {
        SubjectKind::Key => 0,
        SubjectKind::Caller => 1,
    };
    kind.index() * 2 + subject
}

#[derive(Debug, Default)]
struct Table {
    counts: [HashMap<String, Count>; GROUPS],
    /// Increments on every event: the order subjects were touched in.
    tick: u64,
    /// Subjects evicted in the current window, reported once per window.
    evicted: u64,
    evicted_window: u64,
}

impl Table {
    /// Subjects tracked, of every kind.
    fn len(&self) -> usize {
        self.counts.iter().map(HashMap::len).sum()
    }
}

/// The counters. Only denials touch them, so allowed checks never wait here.
pub struct Alerts {
    settings: AlertSettings,
    window: Nanos,
    clock: Arc<dyn Clock>,
    max_subjects: usize,
    table: Mutex<Table>,
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Alerts {
    pub fn new(settings: AlertSettings, clock: Arc<dyn Clock>) -> Self {
        Self {
            window: duration_nanos(settings.window).max(Nanos::new(1)),
            settings,
            clock,
            max_subjects: MAX_SUBJECTS,
            table: Mutex::new(Table::default()),
        }
    }

    /// Subjects evicted so far in the current window.
    #[cfg(test)]
    pub fn evicted_this_window(&self) -> u64 {
        let window = self.clock.now() / self.window;
        let t = self.table.lock();
        if t.evicted_window == window {
            t.evicted
        } else {
            0
        }
    }

    fn threshold(&self, kind: Kind) -> u32 {
        match kind {
            Kind::BadSignature => self.settings.bad_signatures,
            Kind::Replay => self.settings.replays,
            Kind::Lockout => self.settings.lockouts,
            Kind::RateLimited => self.settings.rate_limited,
        }
    }

    /// Counts one event for the key (if known to be well formed) and the
    /// caller; returns the alerts this event raised (at most one each).
    pub fn record(&self, kind: Kind, key_id: Option<&str>, caller: &str) -> Vec<Alert> {
        let window = self.clock.now() / self.window;
        let threshold = self.threshold(kind);
        let subjects = key_id
            .map(|k| (SubjectKind::Key, k))
            .into_iter()
            .chain(std::iter::once((SubjectKind::Caller, caller)));
        let mut raised = Vec::new();
        let mut table = self.table.lock();
        for (subject_kind, subject) in subjects {
            table.tick += 1;
            let touched = table.tick;
            let group = group(kind, subject_kind);
            let count = match table.counts[group].get_mut(subject) {
                Some(count) => count.count_one(window, touched),
                None => {
                    if table.len() >= self.max_subjects {
                        self.evict_oldest(&mut table, window);
                    }
                    let first = Count {
                        window,
                        count: 1,
                        touched,
                    };
                    table.counts[group].insert(subject.to_owned(), first);
                    first.count
                }
            };
            if count == threshold {
                raised.push(Alert {
                    kind,
                    subject_kind,
                    subject: subject.to_owned(),
                    threshold,
                });
            }
        }
        raised
    }

    /// Drops the tenth of the subjects least on their way to an alert:
    /// fewest events this window (a past window counts as none), then
    /// touched longest ago.
    fn evict_oldest(&self, table: &mut Table, window: u64) {
        let rank = |c: &Count| (if c.window == window { c.count } else { 0 }, c.touched);
        let mut ranks: Vec<(u32, u64)> = table
            .counts
            .iter()
            .flat_map(HashMap::values)
            .map(rank)
            .collect();
        let cut = (ranks.len() / 10).max(1);
        let (_, &mut last_evicted, _) = ranks.select_nth_unstable(cut - 1);
        let before = table.len();
        for counts in &mut table.counts {
            counts.retain(|_, c| rank(c) > last_evicted);
        }
        let evicted = (before - table.len()) as u64;
        if table.evicted_window != window {
            table.evicted_window = window;
            table.evicted = 0;
            tracing::warn!(
                event = "alert_subjects_evicted",
                max_subjects = self.max_subjects,
                "the alert table is full (a spray of key ids or callers?): evicting the subjects touched longest ago"
            );
        }
        table.evicted += evicted;
        metrics::counter!("warden_alert_subjects_evicted_total").increment(evicted);
    }

    /// Forgets counts of past windows.
    pub fn sweep(&self) {
        let window = self.clock.now() / self.window;
        for counts in &mut self.table.lock().counts {
            counts.retain(|_, c| c.window == window);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::engine::FakeClock;

    fn alerts(clock: Arc<FakeClock>) -> Alerts {
        let settings = AlertSettings {
            window: Duration::from_secs(60),
            bad_signatures: 3,
            ..AlertSettings::default()
        };
        Alerts::new(settings, clock)
    }

    #[test]
    fn a_flood_raises_one_alert_per_subject_and_window() {
        let clock = Arc::new(FakeClock::new(Nanos::ZERO));
        let a = alerts(clock.clone());
        let mut raised = Vec::new();
        for _ in 0..100 {
            raised.extend(a.record(Kind::BadSignature, Some("k1"), "spiffe://gw"));
        }
        assert_eq!(raised.len(), 2);
        assert_eq!(raised[0].subject_kind, SubjectKind::Key);
        assert_eq!(raised[0].subject, "k1");
        assert_eq!(raised[1].subject_kind, SubjectKind::Caller);
        // The next window counts afresh.
        clock.advance(Duration::from_secs(60));
        let again: Vec<_> = (0..3)
            .flat_map(|_| a.record(Kind::BadSignature, Some("k1"), "spiffe://gw"))
            .collect();
        assert_eq!(again.len(), 2);
    }

    #[test]
    fn kinds_and_subjects_are_counted_apart() {
        let a = alerts(Arc::new(FakeClock::new(Nanos::ZERO)));
        for i in 0..2 {
            assert!(
                a.record(Kind::BadSignature, Some("k1"), &format!("caller-{i}"))
                    .is_empty()
            );
            assert!(a.record(Kind::Replay, Some("k1"), "caller-x").is_empty());
        }
        let third = a.record(Kind::BadSignature, Some("k1"), "caller-9");
        assert_eq!(third.len(), 1, "only the key crossed: {third:?}");
    }

    #[test]
    fn a_key_and_a_caller_of_one_name_are_counted_apart() {
        let a = alerts(Arc::new(FakeClock::new(Nanos::ZERO)));
        assert!(
            a.record(Kind::BadSignature, Some("same"), "caller-1")
                .is_empty()
        );
        assert!(a.record(Kind::BadSignature, None, "same").is_empty());
        // Three events named "same", but two for the key and one for the
        // caller: neither has reached 3.
        let third = a.record(Kind::BadSignature, Some("same"), "caller-2");
        assert!(third.is_empty(), "{third:?}");
    }

    #[test]
    fn every_kind_and_subject_kind_has_a_map_of_its_own() {
        let kinds = [
            Kind::BadSignature,
            Kind::Replay,
            Kind::Lockout,
            Kind::RateLimited,
        ];
        let groups: std::collections::HashSet<usize> = kinds
            .into_iter()
            .flat_map(|k| [SubjectKind::Key, SubjectKind::Caller].map(|s| group(k, s)))
            .collect();
        assert_eq!(groups.len(), GROUPS);
        assert!(groups.iter().all(|&g| g < GROUPS));
    }

    #[test]
    fn sweeping_forgets_past_windows() {
        let clock = Arc::new(FakeClock::new(Nanos::ZERO));
        let a = alerts(clock.clone());
        a.record(Kind::Replay, Some("k"), "c");
        clock.advance(Duration::from_secs(61));
        a.sweep();
        assert_eq!(a.table.lock().len(), 0);
    }

    /// The outside attack's finding: 100k junk subjects filled the table so
    /// that real key-level alerts stopped being raised.
    #[test]
    fn a_spray_of_junk_subjects_does_not_silence_a_real_alert() {
        let clock = Arc::new(FakeClock::new(Nanos::ZERO));
        let mut a = alerts(clock.clone());
        a.max_subjects = 1000;
        let mut raised = Vec::new();
        // The real key is hit in pairs, far less often than the table
        // turns over: oldest-first eviction would drop it every time.
        for i in 0..50_000 {
            a.record(
                Kind::BadSignature,
                Some(&format!("junk-{i}")),
                "spiffe://gw",
            );
            if i % 5_000 == 4_999 {
                for _ in 0..2 {
                    raised.extend(a.record(Kind::BadSignature, Some("victim-key"), "spiffe://gw"));
                }
            }
        }
        assert!(
            raised
                .iter()
                .any(|r| r.subject == "victim-key" && r.subject_kind == SubjectKind::Key),
            "{raised:?}"
        );
        assert!(a.table.lock().len() <= 1000);
        assert!(a.evicted_this_window() > 40_000);
    }
}
