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

/// Most subjects tracked at once; beyond it new subjects are not counted
/// until old windows are swept (bounded memory under a key-id spray).
const MAX_SUBJECTS: usize = 100_000;

type Subject = (Kind, SubjectKind, String);

/// The counters. Only denials touch them, so allowed checks never wait here.
pub struct Alerts {
    settings: AlertSettings,
    window: Nanos,
    clock: Arc<dyn Clock>,
    counts: Mutex<HashMap<Subject, (u64, u32)>>,
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
            window: duration_nanos(settings.window).max(1),
            settings,
            clock,
            counts: Mutex::new(HashMap::new()),
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
        let mut counts = self.counts.lock();
        for (subject_kind, subject) in subjects {
            let id = (kind, subject_kind, subject.to_owned());
            let full = counts.len() >= MAX_SUBJECTS;
            let entry = match counts.get_mut(&id) {
                Some(e) => e,
                None if full => continue,
                None => counts.entry(id).or_insert((window, 0)),
            };
            if entry.0 != window {
                *entry = (window, 0);
            }
            entry.1 = entry.1.saturating_add(1);
            if entry.1 == threshold {
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

    /// Forgets counts of past windows.
    pub fn sweep(&self) {
        let window = self.clock.now() / self.window;
        self.counts.lock().retain(|_, (w, _)| *w == window);
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
        let clock = Arc::new(FakeClock::new(0));
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
        let a = alerts(Arc::new(FakeClock::new(0)));
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
    fn sweeping_forgets_past_windows() {
        let clock = Arc::new(FakeClock::new(0));
        let a = alerts(clock.clone());
        a.record(Kind::Replay, Some("k"), "c");
        clock.advance(Duration::from_secs(61));
        a.sweep();
        assert!(a.counts.lock().is_empty());
    }
}
