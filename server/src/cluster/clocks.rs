//! The nodes' wall clocks, compared through the database's.
//!
//! Request timestamps are judged by wall clocks, and each node has its
//! own. An owner judges a step's timestamp by its own clock (it forgets
//! nonces by it), so what a node accepted is bounded by its clock; a node
//! taking over another's slots must fence as far as that node's clock ran
//! ahead of its own (README, Clocks in a cluster). To know how far, every
//! node reads the database's clock at each renewal and writes how far its
//! own runs ahead of it in its lease row ([`ClockReading`]). Two nodes'
//! readings taken on the same database clock differ by exactly how far
//! their own clocks differ; that is why a node pairs each member's reading
//! with its own reading nearest to it on the database's clock, and not
//! with its latest: a database clock that stepped in between would
//! otherwise look like a skew between the nodes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

/// How far two members' clocks may disagree before a node warns: NTP keeps
/// them within milliseconds, and the fences round to whole seconds anyway.
const SKEW_WARNING: Duration = Duration::from_secs(1);

/// How many of its own readings a node keeps: a lease's worth and more
/// (five per lease), to pair with every member's last one.
const OWN_READINGS: usize = 16;

/// A node's clock against the database's, read at one renewal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockReading {
    /// The database's clock when it was read (`clock_timestamp()`, Unix
    /// microseconds).
    pub at_us: i64,
    /// How far the node's clock (the one checks judge timestamps by) ran
    /// ahead of the database's then, in microseconds (negative: behind).
    /// Off by at most half the round trip that read it: well under a
    /// millisecond next to the database.
    pub ahead_us: i64,
}

impl ClockReading {
    /// Reads the database's clock against this process's.
    pub async fn take(client: &tokio_postgres::Client) -> Result<Self, tokio_postgres::Error> {
        use crate::engine::clock::{Clock, SystemClock};
        let before = SystemClock.now();
        let at_us: i64 = client
            .query_one(
                "SELECT (extract(epoch from clock_timestamp()) * 1000000)::bigint",
                &[],
            )
            .await?
            .get(0);
        let after = SystemClock.now();
        let middle_us = (before.get() / 2 + after.get() / 2) / 1_000;
        Ok(Self {
            at_us,
            ahead_us: i64::try_from(middle_us).unwrap_or(i64::MAX) - at_us,
        })
    }
}

/// This node's own readings, and whether it has warned of a skew.
#[derive(Debug, Default)]
pub struct Clocks {
    /// The last [`OWN_READINGS`], oldest first.
    own: Mutex<VecDeque<ClockReading>>,
    /// Set while another member's clock is more than [`SKEW_WARNING`] from
    /// this node's (warned once).
    apart: AtomicBool,
}

impl Clocks {
    /// Keeps `mine`, this node's latest reading, and says how far the
    /// members' clocks (`theirs`, by node) are from it: in metrics, and in
    /// a warning (once until they agree again) past `SKEW_WARNING`.
    /// Takeover fences grow by the skew, and an owner whose clock is behind
    /// a client's by more than the future skew refuses its fresh requests
    /// as signed ahead.
    pub fn judge<'a>(
        &self,
        mine: ClockReading,
        theirs: impl Iterator<Item = (&'a str, ClockReading)>,
    ) {
        {
            let mut own = self.own.lock();
            if own.len() == OWN_READINGS {
                own.pop_front();
            }
            own.push_back(mine);
        }
        metrics::gauge!("warden_cluster_clock_ahead_seconds").set(mine.ahead_us as f64 / 1e6);
        let furthest = theirs
            .map(|(node, reading)| (node, self.ahead_of_mine(reading, mine)))
            .max_by_key(|(_, apart)| apart.unsigned_abs());
        let Some((node, apart)) = furthest else {
            return;
        };
        metrics::gauge!("warden_cluster_clock_skew_seconds").set(apart.unsigned_abs() as f64 / 1e6);
        let too_far = apart.unsigned_abs() > SKEW_WARNING.as_micros() as u64;
        if too_far && !self.apart.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                event = "cluster_clock_skew",
                node,
                ahead_of_this_node_ms = apart / 1_000,
                "the clocks of two cluster nodes disagree: takeover fences grow by as much, and a node whose clock is behind refuses requests signed ahead of it; check NTP on both"
            );
        } else if !too_far && self.apart.swap(false, Ordering::Relaxed) {
            tracing::info!(
                event = "cluster_clock_skew_gone",
                "the cluster nodes' clocks agree again"
            );
        }
    }

    /// How far the clock of any reading of `theirs` ran ahead of this
    /// node's (`mine` its latest reading), in whole seconds rounded up:
    /// what a takeover fence taken by this node's clock must add, since
    /// each owner accepted timestamps up to its own clock plus the future
    /// skew.
    pub fn furthest_ahead(
        &self,
        mine: ClockReading,
        theirs: impl Iterator<Item = ClockReading>,
    ) -> Duration {
        let furthest = theirs
            .map(|reading| self.ahead_of_mine(reading, mine))
            .max()
            .unwrap_or(0);
        Duration::from_micros(
            u64::try_from(furthest)
                .unwrap_or(0)
                .next_multiple_of(1_000_000),
        )
    }

    /// How far the clock that read `theirs` ran ahead of this node's (µs),
    /// against this node's reading nearest to it on the database's clock
    /// (`latest`, or one kept before it).
    fn ahead_of_mine(&self, theirs: ClockReading, latest: ClockReading) -> i64 {
        let own = self.own.lock();
        let mine = own
            .iter()
            .copied()
            .chain([latest])
            .min_by_key(|m| m.at_us.abs_diff(theirs.at_us))
            .unwrap_or(latest);
        theirs.ahead_us.saturating_sub(mine.ahead_us)
    }
}
