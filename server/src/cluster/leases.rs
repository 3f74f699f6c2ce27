//! When another node's lease has run out, judged by this node's monotonic
//! clock from what it saw of that node's renewals, never by the database's
//! clock.
//!
//! A lease that runs out by the database's clock (`lease_until < now()`)
//! follows every step of that clock. Stepped ahead (an NTP step on the
//! database host), every live lease ran out at once: every node rejoined
//! and fenced its slots, and fresh requests were refused for seconds.
//! Stepped back, a lease lived on for as long as the step: a node that died
//! just then kept its slots unanswered for that long (an hour's step, an
//! hour).
//!
//! So each renewal leaves a mark no other renewal leaves ([`LeaseMark`]:
//! a number from a database sequence), every node notes when it first saw
//! each member's current mark, and a member's lease has run out for this
//! node once its mark has not changed for a whole lease TTL on this node's
//! monotonic clock. That is safe whatever the clocks say: the member's
//! renewal that left the mark started before this node read it, and the
//! member stops answering `lease_ttl - lease_ttl/10` after that start
//! ([`super::Membership::may_serve`]), so it has stopped before this node
//! sees its lease run out, with a tenth of the TTL to spare for the two
//! monotonic clocks' rates. The removal is conditional on the mark being
//! the same still (a renewal in between keeps the lease).
//!
//! A node's own lease row is its name's: two live processes given one
//! name would each answer for the same slots with state of its own. So
//! each process writes a random incarnation in the row, renews only a row
//! it wrote itself (or, once, its stopped predecessor's: [`Holder`]), and
//! refuses a name whose row another live process renews ([`NameInUse`],
//! [`Found`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What one renewal left in a lease row, and no other renewal leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseMark {
    /// From the `warden_renewals` sequence, which never hands a number out
    /// twice; `None` in the row of a node of an older version, which does
    /// not write it.
    pub renewal: Option<i64>,
    /// The row's `lease_until` (database clock, Unix microseconds): it moves
    /// with every renewal of an older node too.
    pub until_us: i64,
}

/// Every member's lease as this node has watched it: the mark last seen,
/// and since when (this node's monotonic clock).
#[derive(Debug, Default)]
pub struct Leases {
    seen: HashMap<String, (LeaseMark, Instant)>,
}

impl Leases {
    /// A renewal that returned at `at` read these lease rows: all there
    /// are. A mark seen before keeps the time it was first seen; rows gone
    /// are forgotten.
    ///
    /// `at` is when the renewal *returned*, not when it started: the rows
    /// were read somewhere in between, and a lease is only safe to judge
    /// from the latest moment its mark could have been read.
    pub fn saw<'a>(&mut self, rows: impl IntoIterator<Item = (&'a str, LeaseMark)>, at: Instant) {
        let mut seen = HashMap::with_capacity(self.seen.len());
        for (node, mark) in rows {
            let since = match self.seen.get(node) {
                Some(&(before, since)) if before == mark => since,
                _ => at,
            };
            seen.insert(node.to_owned(), (mark, since));
        }
        self.seen = seen;
    }

    /// The leases, other than `me`'s, whose mark has not changed for `ttl`
    /// at `now` (the start of the renewal that removes them), with the mark
    /// each must still have to be removed.
    pub fn run_out(&self, me: &str, now: Instant, ttl: Duration) -> Vec<(String, LeaseMark)> {
        let mut out: Vec<(String, LeaseMark)> = self
            .seen
            .iter()
            .filter(|(node, (_, since))| {
                node.as_str() != me && now.saturating_duration_since(*since) >= ttl
            })
            .map(|(node, (mark, _))| (node.clone(), *mark))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// How long until `node`'s lease runs out for this node, unless it
    /// renews (`ttl` for a node not seen yet).
    pub fn left(&self, node: &str, now: Instant, ttl: Duration) -> Duration {
        self.seen.get(node).map_or(ttl, |(_, since)| {
            ttl.saturating_sub(now.saturating_duration_since(*since))
        })
    }
}

/// Another live process holds this node's name: the incarnation it wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameInUse(pub String);

/// What was under this node's name before this process first wrote there.
#[derive(Debug)]
pub enum Found {
    /// No lease row: the name is free.
    Nothing,
    /// A row nobody renewed for a lease TTL (or that was removed while
    /// watched), and the incarnation that wrote it (`None`: a version that
    /// writes none).
    Predecessor(Option<String>),
}

/// Who may have written this node's lease row last.
#[derive(Clone, Copy, Debug)]
pub struct Holder<'a> {
    /// This process.
    pub mine: &'a str,
    /// Before this process's first renewal, its dead predecessor.
    pub may_follow: Option<&'a str>,
}

impl Holder<'_> {
    /// Whether a row last written by `previous` (`None`: no row, or one
    /// of a version that writes no incarnation) is this node's to renew.
    pub fn may_renew_after(&self, previous: Option<&str>) -> bool {
        previous.is_none_or(|p| p == self.mine || Some(p) == self.may_follow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(2);

    fn mark(renewal: i64) -> LeaseMark {
        LeaseMark {
            renewal: Some(renewal),
            until_us: 0,
        }
    }

    fn ms(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn a_lease_runs_out_a_whole_ttl_after_its_mark_was_first_seen_and_not_before() {
        let t0 = Instant::now();
        let mut leases = Leases::default();
        leases.saw([("a", mark(1)), ("b", mark(2))], t0);
        // Seen again unchanged: the time it was first seen stands.
        leases.saw([("a", mark(1)), ("b", mark(2))], ms(t0, 1_500));
        assert!(leases.run_out("a", ms(t0, 1_999), TTL).is_empty());
        assert_eq!(
            leases.left("b", ms(t0, 1_500), TTL),
            Duration::from_millis(500)
        );
        assert_eq!(
            leases.run_out("a", ms(t0, 2_000), TTL),
            vec![("b".to_owned(), mark(2))]
        );
    }

    #[test]
    fn a_renewal_in_between_starts_the_lease_again() {
        let t0 = Instant::now();
        let mut leases = Leases::default();
        leases.saw([("b", mark(2))], t0);
        leases.saw([("b", mark(7))], ms(t0, 1_900));
        assert!(leases.run_out("a", ms(t0, 3_000), TTL).is_empty());
        assert_eq!(
            leases.left("b", ms(t0, 3_000), TTL),
            Duration::from_millis(900)
        );
        assert_eq!(leases.run_out("a", ms(t0, 3_900), TTL).len(), 1);
    }

    /// An older node writes no renewal number; its `lease_until`, which
    /// moves at each renewal, is its mark.
    #[test]
    fn an_older_nodes_lease_is_judged_by_its_lease_until() {
        let t0 = Instant::now();
        let old = |until_us| LeaseMark {
            renewal: None,
            until_us,
        };
        let mut leases = Leases::default();
        leases.saw([("old", old(10))], t0);
        leases.saw([("old", old(20))], ms(t0, 1_000));
        assert!(leases.run_out("a", ms(t0, 2_500), TTL).is_empty());
        leases.saw([("old", old(20))], ms(t0, 2_500));
        assert_eq!(leases.run_out("a", ms(t0, 3_000), TTL).len(), 1);
    }

    #[test]
    fn this_nodes_own_lease_and_rows_gone_are_never_run_out() {
        let t0 = Instant::now();
        let mut leases = Leases::default();
        leases.saw([("a", mark(1)), ("b", mark(2))], t0);
        leases.saw([("a", mark(1))], ms(t0, 100));
        assert!(leases.run_out("a", ms(t0, 60_000), TTL).is_empty());
        // Back under the same mark (cannot happen with a sequence, but a
        // row that went and came back is a new sighting all the same).
        leases.saw([("a", mark(1)), ("b", mark(2))], ms(t0, 200));
        assert!(leases.run_out("a", ms(t0, 2_100), TTL).is_empty());
    }

    /// A lease row last written by another process is renewed only when
    /// that process is this one's dead predecessor, and only before this
    /// process's own first renewal; an older version's row (no
    /// incarnation) cannot be told apart and is taken as it was.
    #[test]
    fn a_lease_row_another_live_process_wrote_is_never_renewed() {
        let first = Holder {
            mine: "me",
            may_follow: Some("dead"),
        };
        let later = Holder {
            mine: "me",
            may_follow: None,
        };
        for holder in [first, later] {
            assert!(holder.may_renew_after(None));
            assert!(holder.may_renew_after(Some("me")));
            assert!(!holder.may_renew_after(Some("other")));
        }
        assert!(first.may_renew_after(Some("dead")));
        assert!(!later.may_renew_after(Some("dead")));
    }
}
