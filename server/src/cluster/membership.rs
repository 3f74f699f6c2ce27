//! Who is in the cluster, kept on the coordinator every node already has:
//! the PostgreSQL of the shared key store. No gossip or consensus of ours.
//!
//! Each node holds a lease row (`warden_members`) and renews it five times
//! per `lease_ttl`. A renewal also deletes the leases that have run out, as
//! this node judges by its own monotonic clock from what it saw of their
//! renewals ([`super::leases`]): no wall clock decides, neither the nodes'
//! nor the database's, so none of them need agree or hold still.
//! Every join and every departure (expired or graceful) bumps
//! `membership_version` in the same transaction and announces it on
//! [`CHANNEL`], so the version only grows, two nodes that see the same
//! version see the same members, and every node renews (and so sees the
//! change) at once rather than at its next tick. A node leaving on SIGTERM
//! deletes its row at once.
//!
//! A lease row is its node name's, and one live process holds a name
//! ([`super::leases::Holder`]): a process watches a row it finds under its
//! name before it first writes there (`Membership::watch_name`), refuses
//! the name if another process renews it, and otherwise follows the
//! stopped predecessor behind a fence on the name's slots. It writes its
//! first lease only once its restart fence has opened: as
//! an owner it refuses what was signed before that fence.
//!
//! Each version's members are also kept, in the same transaction, in
//! `warden_membership_log` (the last thousand versions). A node that
//! missed versions between two renewals (another node left and came back
//! in between, or two changes came at once) passes through each one it
//! missed, as if it had seen them late: slots go and come back exactly as
//! they would have, and only those are fenced or handed over. Without the
//! versions it missed (older nodes write no log), it cannot know who owned
//! its slots meanwhile and fences all it owns.
//!
//! When PostgreSQL cannot be reached, a node keeps the last membership it
//! saw and says so: `coordinator_ok` is false in `warden cluster status`,
//! `warden_cluster_coordinator_ok` is 0, and a warning is logged once.
//!
//! The lease also decides whether this node may answer for the state it
//! owns ([`Membership::may_serve`]): only until `lease_ttl - lease_ttl/10`
//! after the start of its last successful renewal, which is before any
//! other node can see the lease run out, so a paused or cut-off node stops
//! before anyone else may take its slots over.
//!
//! When the coordinator cannot be reached, a node keeps serving on the
//! last membership only if nobody can change it: every other member
//! confirms ([`Membership::vouch_for`]) that it cannot reach PostgreSQL
//! either and sees the same version. Each confirmation round keeps it
//! serving for one lease more. A node cut off from PostgreSQL alone gets no
//! such confirmation (the others can reach it) and stops at its lease's
//! end, before they expel it. Alone in its membership, a node needs no one
//! (nobody could take its slots without it seeing a join first... except
//! through PostgreSQL: see README, Running a cluster). And when
//! PostgreSQL comes back, a node removes others' run-out leases only after
//! it has itself renewed for a whole lease TTL: nodes that served on
//! confirmations have stopped or renewed by then.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio::sync::{Notify, mpsc, oneshot, watch};

/// Where membership changes are announced (NOTIFY) and heard (LISTEN).
pub const CHANNEL: &str = "warden_members";

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::RwLockReadGuard;

use super::clocks::{ClockReading, Clocks};
use super::leases::{Found, Holder, LeaseMark, Leases, NameInUse};
use super::ownership::{Node, SlotTable, Takeover};
use crate::config::ClusterSettings;
use crate::engine::Slot;
use crate::engine::clock::SystemClock;
use crate::freshness::Fence;
use crate::postgres::{Tables, create_missing};

/// The cluster's tables (with `warden_meta`, which the key store shares).
pub const TABLES: Tables = Tables {
    read: "SELECT k, v FROM warden_meta WHERE false;
SELECT node, advertise, lease_until, joined_at, clock_ahead_us, clock_read_at_us, renewal,
       incarnation, future_skew_s FROM warden_members WHERE false;
SELECT 'warden_renewals'::regclass;
SELECT version, members FROM warden_membership_log WHERE false;",
    create: "
CREATE TABLE IF NOT EXISTS warden_meta (k text PRIMARY KEY, v text NOT NULL);
CREATE TABLE IF NOT EXISTS warden_members (
    node text PRIMARY KEY,
    advertise text NOT NULL,
    lease_until timestamptz NOT NULL,
    joined_at timestamptz NOT NULL
);
ALTER TABLE warden_members ADD COLUMN IF NOT EXISTS clock_ahead_us bigint,
    ADD COLUMN IF NOT EXISTS clock_read_at_us bigint,
    ADD COLUMN IF NOT EXISTS renewal bigint,
    ADD COLUMN IF NOT EXISTS incarnation text,
    ADD COLUMN IF NOT EXISTS future_skew_s bigint;
CREATE SEQUENCE IF NOT EXISTS warden_renewals;
CREATE TABLE IF NOT EXISTS warden_membership_log (version bigint PRIMARY KEY, members text NOT NULL);
",
};

/// The cluster's tables, and the membership's version (0 before the
/// first member joins).
pub async fn prepare_tables(client: &tokio_postgres::Client) -> Result<(), String> {
    create_missing(client, &TABLES).await?;
    client
        .batch_execute(
            "INSERT INTO warden_meta (k, v) VALUES ('membership_version', '0')
             ON CONFLICT (k) DO NOTHING",
        )
        .await
        .map_err(|e| {
            format!(
                "writing the membership's version: {}",
                warden_client::error_chain(&e)
            )
        })
}

/// The most versions a node replays after missing some; more than that and
/// it fences everything it owns instead.
const MAX_REPLAYED: i64 = 64;

/// One live member, as of the last renewal.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub node: String,
    pub advertise: String,
    /// Time left on its lease as of this node's last renewal, by this
    /// node's judgement ([`Leases::left`]; for this node itself, until it
    /// stops answering).
    pub lease_left: Duration,
    /// Unix milliseconds it joined (this time).
    pub joined_at_ms: i64,
    /// Its clock against the database's at its last renewal; `None` from a
    /// node of a version before this was measured.
    pub clock: Option<ClockReading>,
    /// How far ahead of its clock it accepts timestamps (its
    /// `check.future_skew`); `None` from a node of a version before this
    /// was recorded.
    pub future_skew: Option<Duration>,
}

/// The membership as this node last saw it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct View {
    /// Grows with every join and departure.
    pub version: u64,
    /// Live members, by name.
    pub members: Vec<Member>,
    /// Whether the last renewal reached the coordinator.
    pub coordinator_ok: bool,
}

impl View {
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(|m| m.node.as_str())
    }

    /// `node`'s clock against the database's, as it last reported it.
    pub fn clock(&self, node: &str) -> Option<ClockReading> {
        self.clocks()
            .find(|&(n, _)| n == node)
            .map(|(_, reading)| reading)
    }

    /// Every member's clock reading, by node; members of a version that
    /// reports none are left out.
    pub fn clocks(&self) -> impl Iterator<Item = (&str, ClockReading)> {
        self.members
            .iter()
            .filter_map(|m| Some((m.node.as_str(), m.clock?)))
    }

    /// The largest future skew a member reports.
    pub fn largest_future_skew(&self) -> Duration {
        self.members
            .iter()
            .filter_map(|m| m.future_skew)
            .max()
            .unwrap_or(Duration::ZERO)
    }

    fn table_nodes(&self) -> Vec<Node> {
        self.members
            .iter()
            .map(|m| Node {
                name: m.node.clone(),
                address: m.advertise.clone(),
                joined_at_ms: m.joined_at_ms,
            })
            .collect()
    }
}

/// What one successful renewal learned.
#[derive(Debug)]
struct Renewal {
    view: View,
    /// This node held no live lease before it (its first join, or a lease
    /// that ran out meanwhile).
    rejoined: bool,
    /// The versions between the table's and `view`'s, with their members,
    /// as the log has them (possibly not all of them).
    missed: Vec<(u64, Vec<Node>)>,
    /// Every lease row's mark, by node.
    marks: Vec<(String, LeaseMark)>,
}

/// Why a renewal made no change.
#[derive(Debug)]
enum RenewError {
    Db(tokio_postgres::Error),
    /// Nothing was written: the row is another live process's.
    NameInUse(NameInUse),
}

impl From<tokio_postgres::Error> for RenewError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(e)
    }
}

/// The memberships a node passes through from its table's version
/// `from` to `view`: each version it missed, then `view`. `None` when it
/// cannot know them all (the log lacks one, or this node was not a member
/// of one: it lost its lease meanwhile), and so not who owned its slots.
fn versions_through(
    from: u64,
    missed: Vec<(u64, Vec<Node>)>,
    view: &View,
    me: &str,
) -> Option<Vec<(u64, Vec<Node>)>> {
    let expected = from + 1..view.version;
    let complete = missed.iter().map(|(v, _)| *v).eq(expected)
        && missed
            .iter()
            .all(|(_, nodes)| nodes.iter().any(|n| n.name == me));
    complete.then(|| {
        let mut path = missed;
        path.push((view.version, view.table_nodes()));
        path
    })
}

/// This node's membership: its lease, and the view it keeps current.
pub struct Membership {
    settings: ClusterSettings,
    url: String,
    /// This process's restart fence: it takes no lease, and so owns no
    /// slot, before the fence opens. As an owner it refuses what is signed
    /// before it (what a process before it under its name may have
    /// accepted), and owning slots earlier would refuse fresh requests to
    /// them meanwhile.
    restart_fence: Fence,
    view: RwLock<View>,
    /// Who owns which slot under `view`, with this node's takeover fences.
    /// Checks decide under a read lock, so a new table (write lock) is in
    /// place only once no check still decides under the old one.
    table: RwLock<Arc<SlotTable>>,
    /// Held while a new table is made from the current one and put in its
    /// place (a new membership, a hand-over received, leaving). Two such
    /// changes at once would both start from the same table, and the later
    /// would undo the earlier: a hand-over lost that way leaves its
    /// sender's slots awaited until they are given up on, and fenced.
    changing: Mutex<()>,
    /// Every new table, in order, for handing over what this node no
    /// longer owns (see [`Self::table_changes`]).
    table_changed: Mutex<Option<mpsc::UnboundedSender<Arc<SlotTable>>>>,
    /// Nodes that handed over what they owed this node, and for which
    /// version (`u64::MAX`: they left).
    handed: Mutex<HashMap<String, u64>>,
    /// Set on the way out: answers for nothing any more.
    leaving: AtomicBool,
    /// This node's clock readings, to compare the members' with.
    clocks: Clocks,
    lease: Mutex<Lease>,
    /// The other members' leases, as this node watched them renew.
    leases: Mutex<Leases>,
    /// The largest future skew accepted, and the past skew: a takeover
    /// fence covers what the previous owner could have accepted, and is
    /// forgotten once nothing under it can be fresh.
    future_skew: Duration,
    past_skew: Duration,
    joined: watch::Sender<bool>,
    /// Made at random by this process and written in its lease row: a
    /// row renewed under another one means another live process holds
    /// this node's name.
    incarnation: String,
    /// Set once another live process was found holding this node's name:
    /// this one answers for nothing any more and shuts down.
    name_taken: watch::Sender<bool>,
    /// This process took its name over from a predecessor whose lease row
    /// it found unrenewed (`watch_name`).
    followed: AtomicBool,
}

/// What this node knows of its own lease.
#[derive(Debug, Default)]
struct Lease {
    /// Until when it may answer for its slots (local monotonic clock).
    valid_until: Option<Instant>,
    /// When its last renewal attempt started, and whether it failed.
    last_attempt: Option<(Instant, bool)>,
    /// Until when every other member confirmed that nobody can change the
    /// membership (the coordinator is unreachable for all).
    vouched_until: Option<Instant>,
    /// Since when renewals succeed without a break.
    connected_since: Option<Instant>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("node", &self.settings.node)
            .finish_non_exhaustive()
    }
}

impl Membership {
    pub fn new(
        settings: ClusterSettings,
        coordinator_url: String,
        past_skew: Duration,
        future_skew: Duration,
        restart_fence: Fence,
    ) -> Arc<Self> {
        Arc::new(Self {
            settings,
            url: coordinator_url,
            restart_fence,
            view: RwLock::new(View::default()),
            table: RwLock::new(Arc::new(SlotTable::empty())),
            changing: Mutex::new(()),
            table_changed: Mutex::new(None),
            handed: Mutex::new(HashMap::new()),
            leaving: AtomicBool::new(false),
            clocks: Clocks::default(),
            lease: Mutex::new(Lease::default()),
            leases: Mutex::new(Leases::default()),
            future_skew,
            past_skew,
            joined: watch::channel(false).0,
            incarnation: crate::crypto::random_hex(8),
            name_taken: watch::channel(false).0,
            followed: AtomicBool::new(false),
        })
    }

    /// Who owns which slot, as of the last membership seen.
    pub fn table(&self) -> Arc<SlotTable> {
        self.table.read().clone()
    }

    /// The table, held: no new table replaces it until the guard is
    /// dropped (an owner decides its part under it).
    pub fn table_guard(&self) -> RwLockReadGuard<'_, Arc<SlotTable>> {
        self.table.read()
    }

    /// Every table from now on, in order, none skipped: what this node
    /// owned in one and not in the next is what it hands over. One
    /// subscriber (the last one asked).
    pub fn table_changes(&self) -> mpsc::UnboundedReceiver<Arc<SlotTable>> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.table_changed.lock() = Some(tx);
        rx
    }

    fn replace_table(&self, table: impl Into<Arc<SlotTable>>) {
        let table = table.into();
        debug_assert!(self.changing.is_locked(), "tables change one at a time");
        *self.table.write() = table.clone();
        if let Some(tx) = &*self.table_changed.lock() {
            let _ = tx.send(table);
        }
    }

    /// `from` handed over everything it owed this node for membership
    /// `version` (`u64::MAX`: on its way out): its slots are answered for.
    pub fn handed_over(&self, from: &str, version: u64) {
        let _changing = self.changing.lock();
        {
            let mut handed = self.handed.lock();
            let v = handed.entry(from.to_owned()).or_insert(0);
            *v = (*v).max(version);
        }
        let current = self.table();
        if let Some(t) = current.handed_over(from, None) {
            tracing::info!(
                event = "cluster_handed_over",
                from,
                "state handed over; serving its slots"
            );
            self.replace_table(t);
        }
    }

    /// Fences handed over with slots by their previous owner: in the table
    /// before the last batch lets any of those slots be answered for here.
    pub fn raise_fences(&self, fences: &[(u32, Vec<Slot>)]) {
        if fences.is_empty() {
            return;
        }
        let _changing = self.changing.lock();
        let mut table = (*self.table()).clone();
        for (secs, slots) in fences {
            table.raise_fences(*secs, slots.iter().copied());
        }
        self.replace_table(table);
    }

    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Relaxed)
    }

    /// On the way out: from now on this node answers for no slot. Returns
    /// the table without it, which says where its state goes.
    pub fn start_leaving(&self) -> SlotTable {
        let _changing = self.changing.lock();
        self.leaving.store(true, Ordering::SeqCst);
        let current = self.table();
        let others: Vec<Node> = current
            .nodes
            .iter()
            .filter(|n| n.name != self.node())
            .cloned()
            .collect();
        let handed = HashMap::new();
        let without = SlotTable::build(
            current.version,
            others,
            self.node(),
            &current,
            Takeover {
                fence_secs: 0,
                unknown: false,
                handed: &handed,
            },
        );
        self.replace_table(without.clone());
        without
    }

    /// Whether this node may answer for the slots it owns right now (see
    /// the module documentation).
    pub fn may_serve(&self) -> bool {
        if self.leaving.load(Ordering::Relaxed) || *self.name_taken.borrow() {
            return false;
        }
        let lease = self.lease.lock();
        let now = Instant::now();
        if lease.valid_until.is_some_and(|until| now < until)
            || lease.vouched_until.is_some_and(|until| now < until)
        {
            return true;
        }
        // The view, not the table: a check may hold the table's lock here.
        let alone = self
            .view
            .read()
            .members
            .iter()
            .all(|m| m.node == self.node());
        alone && lease.valid_until.is_some() && self.unreachable_now(&lease, now)
    }

    /// Whether the coordinator is unreachable right now: this node's last
    /// attempt is recent and failed.
    pub fn coordinator_unreachable(&self) -> bool {
        self.unreachable_now(&self.lease.lock(), Instant::now())
    }

    fn unreachable_now(&self, lease: &Lease, now: Instant) -> bool {
        matches!(lease.last_attempt, Some((at, true)) if now.duration_since(at) < self.renew_every() * 2)
    }

    /// A peer's question while the coordinator is down: may `node` go on
    /// serving on membership `version`? Yes only if this node cannot reach
    /// the coordinator either (so it cannot have seen, or made, a change)
    /// and sees the same version with `node` in it.
    pub fn vouch_for(&self, node: &str, version: u64) -> bool {
        let table = self.table();
        !self.is_leaving()
            && self.coordinator_unreachable()
            && table.version == version
            && table.nodes.iter().any(|n| n.name == node)
    }

    /// Every other member confirmed, in a round that started at `asked`.
    pub fn vouched(&self, asked: Instant) {
        self.lease.lock().vouched_until = Some(self.lease_end(asked));
    }

    pub fn lease_ttl(&self) -> Duration {
        self.settings.lease_ttl
    }

    /// Until when a lease renewed (or a confirmation asked for) at `start`
    /// lets this node answer: a tenth of the TTL before the database could
    /// let it run out, whatever the clocks' rates.
    fn lease_end(&self, start: Instant) -> Instant {
        let ttl = self.settings.lease_ttl;
        start + ttl - ttl / 10
    }

    /// How often the lease is renewed.
    pub fn renew_every(&self) -> Duration {
        self.settings.lease_ttl / 5
    }

    pub fn node(&self) -> &str {
        &self.settings.node
    }

    pub fn view(&self) -> View {
        self.view.read().clone()
    }

    /// Resolves once this node holds a lease (health is NOT_SERVING until
    /// then).
    pub async fn joined(&self) {
        let mut joined = self.joined.subscribe();
        let _ = joined.wait_for(|j| *j).await;
    }

    /// Resolves if another live process is found holding this node's name
    /// (see [`NameInUse`]): the server then shuts down with an error.
    pub async fn name_refused(&self) {
        let mut taken = self.name_taken.subscribe();
        let _ = taken.wait_for(|t| *t).await;
    }

    /// Whether this node's name was found held by another live process.
    pub fn name_is_taken(&self) -> bool {
        *self.name_taken.borrow()
    }

    /// Another live process renews a lease under this node's name: two
    /// processes answering for the same slots, each with state of its own,
    /// would each accept what the other accepted. This one stops answering
    /// at once and never writes the row again.
    fn refuse_name(&self, other: &NameInUse) {
        tracing::error!(
            event = "cluster_node_name_in_use",
            node = %self.settings.node,
            other_incarnation = %other.0,
            "another live warden process holds this node's name ([cluster] node): this one stops; give each node a name of its own"
        );
        self.name_taken.send_replace(true);
    }

    /// Keeps the lease and the view current until `stop`, then leaves.
    pub async fn run(self: Arc<Self>, mut stop: oneshot::Receiver<()>) {
        let every = self.renew_every();
        let changed = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(self.url.clone(), changed.clone()));
        self.keep_lease(every, &changed, &mut stop).await;
        listener.abort();
    }

    async fn keep_lease(
        &self,
        every: Duration,
        changed: &Notify,
        stop: &mut oneshot::Receiver<()>,
    ) {
        // What was under this node's name, watched before the first
        // renewal (and so always known once renewed).
        let mut found: Option<Found> = None;
        let mut renewed = false;
        loop {
            let attempt = Instant::now();
            let connected = tokio::select! {
                c = tokio::time::timeout(every, crate::postgres::connect(&self.url)) => {
                    c.map_err(|_| "connecting timed out".to_owned()).and_then(|c| c)
                }
                _ = &mut *stop => return,
            };
            let client = match connected {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    let prepared = match prepare_tables(&client).await {
                        Ok(()) => self
                            .set_session(&client)
                            .await
                            .map_err(|e| warden_client::error_chain(&e)),
                        Err(e) => Err(e),
                    };
                    match prepared {
                        Ok(()) => client,
                        Err(e) => {
                            self.lost(&e, attempt);
                            if continue_after(every, stop).await {
                                return;
                            }
                            continue;
                        }
                    }
                }
                Err(e) => {
                    self.lost(&e, attempt);
                    if continue_after(every, stop).await {
                        return;
                    }
                    continue;
                }
            };
            if found.is_none() {
                let watched = tokio::select! {
                    w = self.watch_name(&client) => w,
                    _ = &mut *stop => return,
                };
                match watched {
                    Ok(watched) => {
                        let followed = matches!(watched, Found::Predecessor(_));
                        self.followed.store(followed, Ordering::SeqCst);
                        found = Some(watched);
                    }
                    Err(RenewError::NameInUse(other)) => return self.refuse_name(&other),
                    Err(RenewError::Db(e)) => {
                        self.lost(&warden_client::error_chain(&e), attempt);
                        if continue_after(every, stop).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            // No slot of its own before its restart fence opens.
            if !renewed {
                tokio::select! {
                    _ = self.restart_fence.opened(&SystemClock) => {}
                    _ = &mut *stop => return,
                }
            }
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = changed.notified() => {}
                    _ = &mut *stop => {
                        self.leave(&client).await;
                        return;
                    }
                }
                let attempt = Instant::now();
                // Others' run-out leases are removed only after a whole
                // lease of healthy renewals (see the module documentation).
                let ttl = self.settings.lease_ttl;
                let sweep = self
                    .lease
                    .lock()
                    .connected_since
                    .is_some_and(|since| since.elapsed() >= ttl);
                let run_out = if sweep {
                    self.leases.lock().run_out(self.node(), attempt, ttl)
                } else {
                    Vec::new()
                };
                let since = self.table().version;
                // The row may have been written last by this process, or,
                // before its first renewal, by the dead predecessor it
                // watched; by anyone else, another live process holds
                // this name.
                let may_follow = match &found {
                    Some(Found::Predecessor(incarnation)) if !renewed => incarnation.as_deref(),
                    _ => None,
                };
                let holder = Holder {
                    mine: &self.incarnation,
                    may_follow,
                };
                match tokio::time::timeout(
                    every * 2,
                    renew(
                        &client,
                        &self.settings,
                        holder,
                        &run_out,
                        since,
                        self.future_skew,
                    ),
                )
                .await
                {
                    Ok(Ok(renewal)) => {
                        renewed = true;
                        self.seen(renewal, attempt)
                    }
                    Ok(Err(RenewError::NameInUse(other))) => return self.refuse_name(&other),
                    Ok(Err(RenewError::Db(e))) => {
                        self.lost(&warden_client::error_chain(&e), attempt);
                        break;
                    }
                    Err(_) => {
                        self.lost("renewal timed out", attempt);
                        break;
                    }
                }
            }
            if continue_after(every, stop).await {
                return;
            }
        }
    }

    /// Before this process first writes its lease row: a row under its
    /// name is either a dead predecessor's (a process killed before it
    /// could give its lease up) or another live process's (two nodes
    /// given one name). Watches it for a lease TTL: renewed meanwhile, the
    /// name is in use ([`NameInUse`]); unrenewed for the whole TTL, or
    /// removed meanwhile, the predecessor has stopped (a live holder renews
    /// five times per TTL). No row at all: the name is free.
    async fn watch_name(&self, client: &tokio_postgres::Client) -> Result<Found, RenewError> {
        let read = || async {
            client
                .query_opt(
                    &format!(
                        "SELECT incarnation, renewal, {UNTIL_US} FROM warden_members m WHERE node = $1"
                    ),
                    &[&self.settings.node],
                )
                .await
                .map(|row| {
                    row.map(|r| {
                        let mark = LeaseMark {
                            renewal: r.get(1),
                            until_us: r.get(2),
                        };
                        (r.get::<_, Option<String>>(0), mark)
                    })
                })
        };
        let Some((incarnation, first)) = read().await? else {
            return Ok(Found::Nothing);
        };
        tracing::info!(
            event = "cluster_name_watch",
            node = %self.settings.node,
            "a lease under this node's name is in the database: watching it for a lease TTL before joining, in case another live process holds the name"
        );
        let started = Instant::now();
        while started.elapsed() < self.settings.lease_ttl {
            tokio::time::sleep(self.renew_every()).await;
            match read().await? {
                // Removed meanwhile (by nodes that judged it run out, or by
                // a predecessor leaving): a predecessor all the same, which
                // may have answered until its lease ran out by its own
                // clock, after this process started. Its slots come back
                // to this name.
                None => return Ok(Found::Predecessor(incarnation)),
                Some((holder, mark)) if mark != first => {
                    return Err(RenewError::NameInUse(NameInUse(
                        holder.unwrap_or_else(|| "(an older version)".into()),
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(Found::Predecessor(incarnation))
    }

    /// Names this node's membership session (`application_name`, seen in
    /// `pg_stat_activity`) and bounds how long it may sit inside a
    /// transaction. A renewal is a transaction driven one statement at a
    /// time; a node paused (or hung) between two of them would otherwise
    /// hold its lease row's lock for as long as the pause lasts, and every
    /// other node's sweep of run-out leases would wait behind it: nobody
    /// could renew, nobody could confirm for a paused node, and the whole
    /// cluster would stop at its leases' end. PostgreSQL ends such a session
    /// after one renewal interval; a renewal's statements follow one another
    /// within milliseconds.
    async fn set_session(
        &self,
        client: &tokio_postgres::Client,
    ) -> Result<(), tokio_postgres::Error> {
        let idle_ms = self.renew_every().as_millis().max(1).to_string();
        client
            .query_one(
                "SELECT set_config('application_name', $1, false),
                        set_config('idle_in_transaction_session_timeout', $2, false)",
                &[&membership_session_name(&self.settings.node), &idle_ms],
            )
            .await
            .map(drop)
    }

    /// A renewal that started at `attempt` succeeded.
    fn seen(&self, renewal: Renewal, attempt: Instant) {
        let returned = Instant::now();
        let Renewal {
            mut view,
            rejoined,
            missed,
            marks,
        } = renewal;
        {
            let mut leases = self.leases.lock();
            leases.saw(marks.iter().map(|(n, m)| (n.as_str(), *m)), returned);
            let ttl = self.settings.lease_ttl;
            let mine = self.lease_end(attempt).saturating_duration_since(returned);
            for m in &mut view.members {
                m.lease_left = if m.node == self.node() {
                    mine
                } else {
                    leases.left(&m.node, returned, ttl)
                };
            }
        }
        // The table first, the lease second. A node whose lease ran out
        // (paused, say) rejoins with a new table that fences what it takes
        // back; were the lease valid before that table is in place, a check
        // in between would be served on the old, unfenced table and could
        // accept a request the slots' owner meanwhile accepted. Installing
        // the table waits for steps served on the old one (`table_guard`),
        // so once the lease is valid again no step sees the old table.
        self.update_table(&view, rejoined, missed);
        {
            let mut lease = self.lease.lock();
            lease.valid_until = Some(self.lease_end(attempt));
            lease.last_attempt = Some((attempt, false));
            lease.vouched_until = None;
            lease.connected_since.get_or_insert(attempt);
        }
        let mut current = self.view.write();
        if !current.coordinator_ok && current.version > 0 {
            tracing::info!(
                event = "cluster_coordinator_back",
                "the cluster coordinator (PostgreSQL) is reachable again"
            );
        }
        if view.version != current.version {
            tracing::info!(
                event = "cluster_membership",
                version = view.version,
                members = %view.nodes().collect::<Vec<_>>().join(","),
                "cluster membership changed"
            );
        }
        metrics::gauge!("warden_cluster_members").set(view.members.len() as f64);
        metrics::gauge!("warden_cluster_version").set(view.version as f64);
        metrics::gauge!("warden_cluster_coordinator_ok").set(1.0);
        if let Some(mine) = view.clock(self.node()) {
            self.clocks.judge(mine, view.clocks());
        }
        *current = view;
        drop(current);
        self.joined.send_replace(true);
    }

    /// How far the clock of any member, of `view` or of the view before
    /// it, ran ahead of this node's (see [`Clocks::furthest_ahead`]).
    fn others_ahead(&self, view: &View) -> Duration {
        let Some(mine) = view.clock(self.node()) else {
            return Duration::ZERO;
        };
        let previous = self.view.read();
        let theirs = view.clocks().chain(previous.clocks());
        self.clocks
            .furthest_ahead(mine, theirs.map(|(_, reading)| reading))
    }

    /// The largest future skew of this node and of any member of `view`
    /// or of the view before it: a previous owner accepted up to its own
    /// skew ahead, which may be larger than this node's (a skew being
    /// lowered node by node).
    fn largest_future_skew(&self, view: &View) -> Duration {
        let previous = self.view.read();
        self.future_skew
            .max(view.largest_future_skew())
            .max(previous.largest_future_skew())
    }

    /// Rebuilds the slot table when the membership changed, once for each
    /// version missed (see the module documentation). Slots taken over get
    /// the takeover fence: the previous owner may have accepted requests
    /// signed up to the moment it stopped answering plus its future skew,
    /// and it stops at the latest one renewal interval after the change
    /// (when it renews and sees it).
    pub(super) fn update_table(&self, view: &View, rejoined: bool, missed: Vec<(u64, Vec<Node>)>) {
        let _changing = self.changing.lock();
        if self.leaving.load(Ordering::Relaxed) {
            return;
        }
        let before = self.table();
        let now_secs = crate::engine::clock::unix_secs();
        let past = u32::try_from(now_secs.saturating_sub(self.past_skew.as_secs())).unwrap_or(0);
        let fence = u32::try_from(
            now_secs
                + self.largest_future_skew(view).as_secs()
                + self.renew_every().as_secs().max(1)
                + 1
                + self.others_ahead(view).as_secs(),
        )
        .unwrap_or(u32::MAX);
        if view.version == before.version && !rejoined {
            // The same members: forget fences nothing fresh can fall
            // under, and stop waiting for a member that never sent after
            // two lease TTLs (holding a lease, it renewed and saw the
            // change, so it stopped answering for those slots long since:
            // fence them instead).
            let mut table = None;
            if before
                .awaiting_since
                .is_some_and(|since| since.elapsed() > self.settings.lease_ttl * 2)
            {
                let mut t = (*before).clone();
                for from in before.awaited() {
                    tracing::warn!(
                        event = "cluster_handoff_missing",
                        from,
                        "a previous owner never handed its slots over; serving them behind the takeover fence"
                    );
                    t.stop_awaiting(from, Some(fence));
                }
                table = Some(t);
            }
            if before.fences_before(past) {
                let mut t = table.unwrap_or_else(|| (*before).clone());
                t.forget_fences_before(past);
                table = Some(t);
            }
            if let Some(t) = table {
                self.replace_table(t);
            }
            return;
        }
        let first = before.version == 0;
        let replayed = (!first && !rejoined)
            .then(|| versions_through(before.version, missed, view, self.node()))
            .flatten();
        if replayed.as_ref().is_some_and(|path| path.len() > 1) {
            tracing::info!(
                event = "cluster_versions_replayed",
                from = before.version,
                to = view.version,
                "membership versions were missed between renewals; passing through each"
            );
        }
        // On joining, this node's own slots are fenced only after a
        // predecessor under its name (see `watch_name`): it may have been
        // paused rather than dead, answering until its lease ran out by its
        // own clock, after this process started.
        let unknown = if first {
            self.followed.load(Ordering::SeqCst)
        } else {
            rejoined || replayed.is_none()
        };
        let path = replayed.unwrap_or_else(|| vec![(view.version, view.table_nodes())]);
        let handed = {
            let mut handed = self.handed.lock();
            let snapshot = handed.clone();
            let now_live = |n: &str| view.members.iter().any(|m| m.node == n);
            // Handovers on joining count for the first table only; a node
            // that left and is back (a restart) owes one again when it
            // leaves again.
            handed.retain(|n, v| *v == u64::MAX && !now_live(n));
            let mut snapshot = snapshot;
            if first && !rejoined {
                // Joining under a name whose lease row was still there
                // (its predecessor's, `watch_name`): no version ever left
                // the name out, so no other member held its slots, and
                // none owes it anything. Their state died with the
                // predecessor, and the joining fence covers what it took.
                for m in view.members.iter().filter(|m| m.node != self.node()) {
                    snapshot.entry(m.node.clone()).or_insert(view.version);
                }
            }
            snapshot
        };
        let mut table = before;
        for (version, nodes) in path {
            let mut next = SlotTable::build(
                version,
                nodes,
                &self.settings.node,
                &table,
                Takeover {
                    fence_secs: fence,
                    unknown,
                    handed: &handed,
                },
            );
            next.forget_fences_before(past);
            metrics::counter!("warden_cluster_rebalances_total").increment(1);
            // Each in turn, so that what this node owned only meanwhile
            // is handed over to its owner now.
            table = Arc::new(next);
            self.replace_table(table.clone());
        }
    }

    fn lost(&self, error: &str, attempt: Instant) {
        {
            let mut lease = self.lease.lock();
            lease.last_attempt = Some((attempt, true));
            lease.connected_since = None;
        }
        metrics::counter!("warden_cluster_coordinator_errors_total").increment(1);
        metrics::gauge!("warden_cluster_coordinator_ok").set(0.0);
        let mut view = self.view.write();
        if view.coordinator_ok || view.version == 0 {
            tracing::warn!(
                event = "cluster_coordinator_lost",
                error,
                "cannot reach the cluster coordinator (PostgreSQL); keeping the last membership seen"
            );
        }
        view.coordinator_ok = false;
    }

    async fn leave(&self, client: &tokio_postgres::Client) {
        // The row and the version's bump in one transaction, as in
        // `renew`: committed apart, a renewal in between saw the old
        // version without this member.
        let left = in_transaction(client, async {
            let removed = client
                .execute(
                    "DELETE FROM warden_members
                     WHERE node = $1 AND incarnation IS NOT DISTINCT FROM $2",
                    &[&self.settings.node, &self.incarnation],
                )
                .await?;
            if removed > 0 {
                client.batch_execute(BUMP_VERSION).await?;
            }
            Ok::<_, tokio_postgres::Error>(())
        });
        match tokio::time::timeout(Duration::from_secs(2), left).await {
            Ok(Ok(())) => {
                tracing::info!(event = "cluster_left", node = %self.settings.node, "left the cluster")
            }
            _ => tracing::warn!(
                event = "cluster_leave_failed",
                "could not remove this node's lease; it runs out by itself"
            ),
        }
    }
}

/// Waits `every`, or returns true when told to stop meanwhile.
async fn continue_after(every: Duration, stop: &mut oneshot::Receiver<()>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(every) => false,
        _ = stop => true,
    }
}

/// The seed every node keys state ids with (see [`crate::engine`]): made
/// by the first node and kept in the coordinator, so that all nodes agree
/// on every id and a master-key rotation does not change them.
pub async fn state_seed(url: &str) -> Result<crate::engine::StateSeed, String> {
    let (client, connection) = crate::postgres::connect(url).await?;
    let connection = tokio::spawn(connection);
    let seed = async {
        prepare_tables(&client).await?;
        client
            .execute(
                "INSERT INTO warden_meta (k, v) VALUES ('state_seed', $1) ON CONFLICT (k) DO NOTHING",
                &[&crate::crypto::random_hex(16)],
            )
            .await
            .map_err(|e| e.to_string())?;
        let v: String = client
            .query_one("SELECT v FROM warden_meta WHERE k = 'state_seed'", &[])
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        Ok::<_, String>(v)
    }
    .await;
    drop(client);
    connection.abort();
    let mut bytes = [0u8; 16];
    hex::decode_to_slice(seed?.trim(), &mut bytes)
        .map_err(|_| "warden_meta.state_seed is not 32 hex characters".to_owned())?;
    Ok(crate::engine::StateSeed::from_bytes(bytes))
}

/// Bumps the version, logs its members (every row: the changes before it
/// in the same transaction are in) and forgets versions a thousand old, and
/// announces it (delivered when the transaction commits).
const BUMP_VERSION: &str =
    "UPDATE warden_meta SET v = (v::bigint + 1)::text WHERE k = 'membership_version';
INSERT INTO warden_membership_log (version, members)
SELECT (SELECT v::bigint FROM warden_meta WHERE k = 'membership_version'),
       coalesce(json_agg(json_build_array(node, advertise,
                (extract(epoch from joined_at) * 1000)::bigint) ORDER BY node), '[]')::text
FROM warden_members;
DELETE FROM warden_membership_log
WHERE version <= (SELECT v::bigint FROM warden_meta WHERE k = 'membership_version') - 1000;
SELECT pg_notify('warden_members', v) FROM warden_meta WHERE k = 'membership_version'";

/// A lease row's `lease_until` in Unix microseconds, the same way wherever
/// a [`LeaseMark`] is read or matched.
const UNTIL_US: &str = "(extract(epoch from m.lease_until) * 1000000)::bigint";

/// Wakes the lease keeper whenever a node announces a change; reconnects
/// after a lost connection. Polling goes on regardless, so a missed
/// notification only delays a change to the next tick.
async fn listen(url: String, changed: Arc<Notify>) {
    loop {
        if let Ok((client, mut connection)) = crate::postgres::connect(&url).await {
            let statement = format!("LISTEN {CHANNEL}");
            let mut subscribe = Box::pin(client.batch_execute(&statement));
            let subscribed = loop {
                tokio::select! {
                    r = &mut subscribe => break r.is_ok(),
                    m = std::future::poll_fn(|cx| connection.poll_message(cx)) => {
                        if !matches!(m, Some(Ok(_))) { break false; }
                    }
                }
            };
            drop(subscribe);
            if subscribed {
                loop {
                    match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                        Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                            changed.notify_one()
                        }
                        Some(Ok(_)) => {}
                        _ => break,
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The `application_name` of `node`'s membership session.
fn membership_session_name(node: &str) -> String {
    format!("warden membership {node}")
}

/// One renewal: this node's lease extended (or taken), the leases in
/// `run_out` removed unless renewed meanwhile, the version bumped if either
/// changed the membership, and every member read with its lease's mark,
/// with the members of versions after `since` that this node missed — all
/// in one transaction. Whether a lease ran out is this node's judgement
/// ([`Leases`]), not the database clock's.
async fn renew(
    client: &tokio_postgres::Client,
    settings: &ClusterSettings,
    holder: Holder<'_>,
    run_out: &[(String, LeaseMark)],
    since: u64,
    future_skew: Duration,
) -> Result<Renewal, RenewError> {
    let future_skew_s = i64::try_from(future_skew.as_secs()).unwrap_or(i64::MAX);
    let ttl = settings.lease_ttl.as_secs_f64();
    let clock = ClockReading::take(client).await?;
    in_transaction(client, async {
        // A row that is there is a live lease: only a node that judged it
        // run out (or its node, leaving) removes it. `lease_until` is still
        // kept, for nodes of older versions, which judge by it.
        let written = client
            .query_one(
                "WITH previous AS (SELECT incarnation, advertise FROM warden_members WHERE node = $1)
                 INSERT INTO warden_members
                   (node, advertise, lease_until, joined_at, clock_ahead_us, clock_read_at_us,
                    renewal, incarnation, future_skew_s)
                 VALUES ($1, $2, now() + make_interval(secs => $3), now(), $4, $5,
                         nextval('warden_renewals'), $6, $7)
                 ON CONFLICT (node) DO UPDATE
                   SET advertise = EXCLUDED.advertise, lease_until = EXCLUDED.lease_until,
                       clock_ahead_us = EXCLUDED.clock_ahead_us,
                       clock_read_at_us = EXCLUDED.clock_read_at_us,
                       renewal = EXCLUDED.renewal, incarnation = EXCLUDED.incarnation,
                       future_skew_s = EXCLUDED.future_skew_s
                 RETURNING NOT EXISTS (SELECT 1 FROM previous),
                           (SELECT incarnation FROM previous),
                           (SELECT advertise FROM previous)",
                &[
                    &settings.node,
                    &settings.advertise,
                    &ttl,
                    &clock.ahead_us,
                    &clock.at_us,
                    &holder.mine,
                    &future_skew_s,
                ],
            )
            .await?;
        let joined: bool = written.get(0);
        let previous: Option<String> = written.get(1);
        // A node that comes back under its name at another address (its
        // predecessor's row still there): every table must learn it, as
        // they do a join, or the others forward to the old address.
        let moved = written
            .get::<_, Option<String>>(2)
            .is_some_and(|was| was != settings.advertise);
        if !holder.may_renew_after(previous.as_deref()) {
            // Rolled back below: the other process's row stays as it was.
            return Err(RenewError::NameInUse(NameInUse(
                previous.unwrap_or_default(),
            )));
        }
        let expired = if run_out.is_empty() {
            0
        } else {
            let nodes: Vec<&str> = run_out.iter().map(|(n, _)| n.as_str()).collect();
            let renewals: Vec<Option<i64>> = run_out.iter().map(|(_, m)| m.renewal).collect();
            let until: Vec<i64> = run_out.iter().map(|(_, m)| m.until_us).collect();
            client
                .execute(
                    &format!(
                        "DELETE FROM warden_members m
                         USING unnest($1::text[], $2::bigint[], $3::bigint[])
                               AS gone(node, renewal, until_us)
                         WHERE m.node = gone.node
                           AND m.renewal IS NOT DISTINCT FROM gone.renewal
                           AND {UNTIL_US} = gone.until_us"
                    ),
                    &[&nodes, &renewals, &until],
                )
                .await?
        };
        if joined || moved || expired > 0 {
            client.batch_execute(BUMP_VERSION).await?;
        }
        // The version and its members in one statement, so in one snapshot
        // (each statement of a READ COMMITTED transaction sees what others
        // committed before it began). Read apart, a dead member's removal
        // committed in between showed the old version without it, and the
        // takeover fence, which reads the dead member's clock from that
        // view, left out how far it ran ahead: a replay accepted (session
        // 58). This node's own row, written above, carries the version.
        let rows = client
            .query(
                &format!(
                    "SELECT node, advertise, (extract(epoch from joined_at) * 1000)::bigint,
                            clock_ahead_us, clock_read_at_us, renewal, {UNTIL_US}, future_skew_s,
                            (SELECT v FROM warden_meta WHERE k = 'membership_version')
                     FROM warden_members m ORDER BY node"
                ),
                &[],
            )
            .await?;
        let version: String = rows.first().map(|r| r.get(8)).unwrap_or_default();
        let marks = rows
            .iter()
            .map(|r| {
                let mark = LeaseMark {
                    renewal: r.get(5),
                    until_us: r.get(6),
                };
                (r.get::<_, String>(0), mark)
            })
            .collect();
        let view = View {
            version: version.parse().unwrap_or(0),
            members: rows
                .iter()
                .map(|r| Member {
                    node: r.get(0),
                    advertise: r.get(1),
                    // This node's judgement, filled in by `seen`.
                    lease_left: Duration::ZERO,
                    joined_at_ms: r.get(2),
                    clock: r
                        .get::<_, Option<i64>>(3)
                        .zip(r.get::<_, Option<i64>>(4))
                        .map(|(ahead_us, at_us)| ClockReading { at_us, ahead_us }),
                    future_skew: r
                        .get::<_, Option<i64>>(7)
                        .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0))),
                })
                .collect(),
            coordinator_ok: true,
        };
        let missed = if since > 0 && view.version > since + 1 {
            let since = i64::try_from(since).unwrap_or(i64::MAX);
            let upto = i64::try_from(view.version).unwrap_or(i64::MAX);
            client
                .query(
                    "SELECT version, members FROM warden_membership_log
                     WHERE version > $1 AND version < $2 AND version <= $1 + $3
                     ORDER BY version",
                    &[&since, &upto, &MAX_REPLAYED],
                )
                .await?
                .iter()
                .map(|r| {
                    let members: Vec<(String, String, i64)> =
                        serde_json::from_str(r.get(1)).unwrap_or_default();
                    let nodes = members
                        .into_iter()
                        .map(|(name, address, joined_at_ms)| Node {
                            name,
                            address,
                            joined_at_ms,
                        })
                        .collect();
                    (r.get::<_, i64>(0) as u64, nodes)
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(Renewal {
            view,
            rejoined: joined,
            missed,
            marks,
        })
    })
    .await
}

/// Runs `work` between `BEGIN` and `COMMIT` on `client`, rolled back if it
/// fails: the one transaction of `renew` and of `leave`, which borrow the
/// session (tokio_postgres's `Client::transaction` takes it mutably). A
/// call cut short by its timeout drops the whole session, and PostgreSQL
/// rolls back what it left open.
async fn in_transaction<T, E: From<tokio_postgres::Error>>(
    client: &tokio_postgres::Client,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    client.batch_execute("BEGIN").await?;
    match work.await {
        Ok(done) => {
            client.batch_execute("COMMIT").await?;
            Ok(done)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::engine::Slot;

    fn membership(me: &str) -> Arc<Membership> {
        Membership::new(
            ClusterSettings {
                node: me.into(),
                advertise: format!("{me}:1"),
                lease_ttl: Duration::from_secs(2),
                peer_tls: None,
            },
            String::new(),
            Duration::from_secs(300),
            Duration::from_secs(5),
            Fence::after(crate::engine::Nanos::ZERO, Duration::from_secs(5)),
        )
    }

    /// `names` at `version`, each joined at the time given (a restart is a
    /// new time under the same name).
    pub(in crate::cluster) fn view(version: u64, names: &[(&str, i64)]) -> View {
        View {
            version,
            members: names
                .iter()
                .map(|&(node, joined_at_ms)| Member {
                    node: node.into(),
                    advertise: format!("{node}:1"),
                    lease_left: Duration::from_secs(2),
                    joined_at_ms,
                    future_skew: Some(Duration::from_secs(5)),
                    clock: Some(ClockReading {
                        at_us: 0,
                        ahead_us: 0,
                    }),
                })
                .collect(),
            coordinator_ok: true,
        }
    }

    /// A process that took its name over from a predecessor it found
    /// unrenewed fences every slot it owns on joining: the predecessor may
    /// have been cut off or paused rather than dead, answering until its
    /// lease ran out by its own clock, which may be after this process
    /// started (and its restart fence was set). Joining a free name fences
    /// nothing of its own. Either way, a name whose row was still there
    /// waits for no hand-over.
    #[test]
    fn after_a_predecessor_under_its_name_a_node_fences_all_it_owns_on_joining() {
        let fresh = membership("node-a");
        fresh.update_table(&view(3, &THREE), false, Vec::new());
        let t = fresh.table();
        assert!((0..=Slot::MAX).all(|s| !t.owns(s) || !t.fenced(s, now())));

        let follower = membership("node-a");
        follower.followed.store(true, Ordering::SeqCst);
        follower.update_table(&view(3, &THREE), false, Vec::new());
        assert_fences_all_it_owns(&follower.table());
        // Its lease row was still there: nobody else held its slots, and
        // nobody owes it a hand-over.
        assert_eq!(follower.table().awaited().count(), 0);
    }

    pub(in crate::cluster) const THREE: [(&str, i64); 3] =
        [("node-a", 1), ("node-b", 1), ("node-c", 1)];

    /// Node A at version 3 with B and C, both of which handed over to it.
    fn settled_a() -> Arc<Membership> {
        let a = membership("node-a");
        a.update_table(&view(3, &THREE), true, Vec::new());
        a.handed_over("node-b", 3);
        a.handed_over("node-c", 3);
        let t = a.table();
        assert_eq!(t.awaited().count(), 0);
        assert!((0..=Slot::MAX).all(|s| !t.fenced(s, 1) && t.is_mine(s) == t.owns(s)));
        a
    }

    fn now() -> i64 {
        crate::engine::clock::unix_secs() as i64
    }

    /// Every slot the table's node owns refuses a request signed now.
    fn assert_fences_all_it_owns(t: &SlotTable) {
        let owned: Vec<Slot> = (0..=Slot::MAX).filter(|&s| t.owns(s)).collect();
        assert!(!owned.is_empty());
        assert!(owned.iter().all(|&s| t.fenced(s, now())));
    }

    /// A node joining a cluster waits for every member's hand-over, and the
    /// members send theirs at once, so they arrive together on different
    /// threads. Each must count: one lost means that member's slots are
    /// given up on after two lease TTLs and fenced, refusing fresh
    /// requests (as a CI run of the rolling-restart test showed: a joiner
    /// logged both hand-overs, then "never handed its slots over").
    #[test]
    fn hand_overs_arriving_together_all_count() {
        for round in 0..300 {
            let a = membership("node-a");
            a.update_table(&view(3, &THREE), true, Vec::new());
            assert_eq!(a.table().awaited().count(), 2);
            let together = Arc::new(std::sync::Barrier::new(2));
            let senders: Vec<_> = ["node-b", "node-c"]
                .into_iter()
                .map(|from| {
                    let (a, together) = (a.clone(), together.clone());
                    std::thread::spawn(move || {
                        together.wait();
                        a.handed_over(from, 3);
                    })
                })
                .collect();
            for s in senders {
                s.join().unwrap();
            }
            let still: Vec<String> = a.table().awaited().map(str::to_owned).collect();
            assert!(still.is_empty(), "round {round}: still awaiting {still:?}");
        }
    }

    /// C restarts (leaves on SIGTERM having handed over, joins again) while
    /// A is between renewals: A reads version 5 having seen 3. Passing
    /// through version 4 from the log, A fences none of its own slots, and
    /// its hand-over sees version 4, where it held C's slots, before 5,
    /// where C has them back.
    #[test]
    fn a_node_that_missed_a_restart_of_another_fences_none_of_its_own_slots() {
        let a = settled_a();
        let before = a.table();
        let mut tables = a.table_changes();
        a.handed_over("node-c", u64::MAX);
        let restarted = view(5, &[("node-a", 1), ("node-b", 1), ("node-c", 2)]);
        let while_away = view(4, &[("node-a", 1), ("node-b", 1)]).table_nodes();
        a.update_table(&restarted, false, vec![(4, while_away)]);

        let t = a.table();
        assert_eq!(t.version, 5);
        for slot in 0..=Slot::MAX {
            assert_eq!(t.owns(slot), before.owns(slot), "slot {slot}");
            assert!(!t.fenced(slot, now()), "slot {slot} is fenced");
        }
        let four = tables.try_recv().expect("version 4 is handed on");
        let five = tables.try_recv().expect("then version 5");
        assert_eq!((four.version, five.version), (4, 5));
        assert!(
            (0..=Slot::MAX).any(|s| four.owns(s) && !five.owns(s)),
            "A held some of C's slots at version 4, to be handed back"
        );
        assert!(tables.try_recv().is_err());
    }

    /// `view` with `node`'s clock `ahead_secs` ahead of the database's.
    fn with_clock(view: View, node: &str, ahead_secs: i64) -> View {
        read_at(view, node, 0.0, ahead_secs)
    }

    /// B dies with its clock 10 s ahead of A's, as each reported it against
    /// the database's. B accepted timestamps up to its clock plus the
    /// future skew, so the fence A puts on the slots it takes from B
    /// reaches 10 s further than A's own clock would put it. From a node
    /// of an older version, which reports nothing, nothing is added.
    #[test]
    fn a_takeover_fence_reaches_as_far_as_a_previous_owners_clock_ran_ahead() {
        for (b_ahead, a_ahead, margin) in [(10, 0, 10), (7, -3, 10), (-4, 0, 0), (0, 0, 0)] {
            let three = with_clock(
                with_clock(view(3, &THREE), "node-b", b_ahead),
                "node-a",
                a_ahead,
            );
            let without_b = view(4, &[("node-a", 1), ("node-c", 1)]);
            // future skew 5 s, one renewal interval (rounded up to 1 s), 1 s.
            assert_b_taken_behind(
                three,
                with_clock(without_b, "node-a", a_ahead),
                5 + 1 + 1 + margin,
                &format!("{b_ahead} {a_ahead}"),
            );
        }
        // B reported nothing (an older version): the fence as before.
        let a = settled_a();
        let mut three = view(3, &THREE);
        three.members[1].clock = None;
        *a.view.write() = three;
        let before = now();
        a.update_table(&view(4, &[("node-a", 1), ("node-c", 1)]), false, Vec::new());
        let t = a.table();
        let taken = (0..=Slot::MAX).find(|&s| t.is_mine(s) && t.fenced(s, before));
        let slot = taken.expect("B's slots are fenced");
        assert!(!t.fenced(slot, now() + 8));
    }

    /// B dies while its `future_skew` is still 20 s, A's already lowered to
    /// 5 s (a skew lowered node by node). B accepted timestamps up to 20 s
    /// ahead, so the fence A puts on B's slots reaches 15 s further than
    /// its own skew would put it. Until session 24 it counted A's skew.
    #[test]
    fn a_takeover_fence_reaches_as_far_as_a_previous_owners_future_skew() {
        let mut three = view(3, &THREE);
        three.members[1].future_skew = Some(Duration::from_secs(20));
        // B's future skew 20 s, one renewal interval (rounded up to 1 s), 1 s.
        assert_b_taken_behind(
            three,
            view(4, &[("node-a", 1), ("node-c", 1)]),
            20 + 1 + 1,
            "B's skew",
        );
    }

    /// A, settled in `three`, sees B gone (`without_b`): every slot it
    /// takes from B is fenced `reach` seconds past the takeover, and no
    /// further.
    fn assert_b_taken_behind(three: View, without_b: View, reach: i64, what: &str) {
        let a = settled_a();
        let owned = a.table();
        *a.view.write() = three;
        let before = now();
        a.update_table(&without_b, false, Vec::new());
        let after = now();
        let t = a.table();
        let taken: Vec<Slot> = (0..=Slot::MAX)
            .filter(|&s| t.is_mine(s) && !owned.owns(s))
            .collect();
        assert!(!taken.is_empty(), "{what}");
        for &slot in &taken {
            assert!(t.fenced(slot, before + reach), "{what}: slot {slot}");
            assert!(!t.fenced(slot, after + reach + 1), "{what}: slot {slot}");
        }
    }

    /// `view` with `node`'s clock read at `at_secs` on the database's clock,
    /// `ahead_secs` ahead of it.
    fn read_at(mut view: View, node: &str, at_secs: f64, ahead_secs: i64) -> View {
        let m = view.members.iter_mut().find(|m| m.node == node).unwrap();
        m.clock = Some(ClockReading {
            at_us: (at_secs * 1e6) as i64,
            ahead_us: ahead_secs * 1_000_000,
        });
        view
    }

    /// The database's clock leaps 10 s ahead between B's last reading and
    /// A's latest: A's clock now reads 10 s behind the database's, B's (read
    /// before the leap) even. That is no skew between A and B: A pairs B's
    /// reading with its own from before the leap, and B's slots are fenced
    /// as if the clocks agreed. Paired with A's latest, the fence would
    /// have reached 10 s further, and refused fresh requests that long.
    #[test]
    fn a_database_clock_that_leaps_between_two_readings_is_no_skew_between_the_nodes() {
        let a = settled_a();
        let owned = a.table();
        // A's reading before the leap, kept.
        let earlier = read_at(view(3, &THREE), "node-a", 1000.0, 0);
        a.clocks
            .judge(earlier.clock("node-a").unwrap(), earlier.clocks());
        *a.view.write() = read_at(view(3, &THREE), "node-b", 1000.2, 0);
        let after_leap = read_at(
            view(4, &[("node-a", 1), ("node-c", 1)]),
            "node-a",
            1010.4,
            -10,
        );
        let before = now();
        a.update_table(&after_leap, false, Vec::new());
        let t = a.table();
        let slot = (0..=Slot::MAX)
            .find(|&s| t.is_mine(s) && !owned.owns(s))
            .expect("A took some of B's slots");
        assert!(t.fenced(slot, before + 7));
        assert!(!t.fenced(slot, now() + 8), "the fence reached further");
    }

    /// The same restart, but the log lacks version 4 (written by a node of
    /// an older version, or forgotten): A cannot know who held its slots,
    /// and fences every one it owns.
    #[test]
    fn a_node_that_cannot_know_a_missed_version_fences_all_it_owns() {
        let a = settled_a();
        a.handed_over("node-c", u64::MAX);
        let restarted = view(5, &[("node-a", 1), ("node-b", 1), ("node-c", 2)]);
        a.update_table(&restarted, false, Vec::new());
        assert_fences_all_it_owns(&a.table());
    }

    /// A's own lease ran out meanwhile (it rejoined): whatever the log
    /// says, others may have held its slots, so it fences them all.
    #[test]
    fn a_node_that_rejoined_fences_all_it_owns_even_with_the_log() {
        let a = settled_a();
        let while_away = view(4, &[("node-b", 1), ("node-c", 1)]).table_nodes();
        a.update_table(&view(5, &THREE), true, vec![(4, while_away)]);
        assert_fences_all_it_owns(&a.table());
    }

    #[test]
    fn missed_versions_are_passed_through_only_when_all_are_known() {
        let me = "node-a";
        let with_me = || view(1, &THREE).table_nodes();
        let target = view(6, &THREE);
        let versions = |path: Option<Vec<(u64, Vec<Node>)>>| {
            path.map(|p| p.iter().map(|(v, _)| *v).collect::<Vec<_>>())
        };
        assert_eq!(
            versions(versions_through(
                3,
                vec![(4, with_me()), (5, with_me())],
                &target,
                me
            )),
            Some(vec![4, 5, 6])
        );
        assert_eq!(
            versions(versions_through(5, Vec::new(), &target, me)),
            Some(vec![6]),
            "nothing missed"
        );
        assert_eq!(
            versions(versions_through(3, vec![(5, with_me())], &target, me)),
            None,
            "version 4 is not in the log"
        );
        assert_eq!(
            versions(versions_through(
                3,
                vec![(4, with_me()), (4, with_me())],
                &target,
                me
            )),
            None,
            "a version twice"
        );
        let without_me = view(1, &THREE[1..]).table_nodes();
        assert_eq!(
            versions(versions_through(
                3,
                vec![(4, with_me()), (5, without_me)],
                &target,
                me
            )),
            None,
            "this node was not a member at version 5"
        );
    }

    /// A throwaway database on the test PostgreSQL (`bash tests/run`
    /// starts one), with the membership tables; `None` outside CI
    /// without one.
    async fn coordinator() -> Option<String> {
        let Ok(base) = std::env::var("WARDEN_TEST_POSTGRES_URL") else {
            assert!(
                std::env::var("CI").is_err(),
                "WARDEN_TEST_POSTGRES_URL must be set in CI (bash tests/run starts PostgreSQL)"
            );
            eprintln!("skipped: WARDEN_TEST_POSTGRES_URL is not set; run bash tests/run");
            return None;
        };
        let admin = connect(&base).await;
        let name = format!("warden_unit_{}", crate::crypto::random_hex(6));
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let (prefix, _) = base.rsplit_once('/').unwrap();
        let url = format!("{prefix}/{name}");
        prepare_tables(&connect(&url).await).await.unwrap();
        Some(url)
    }

    async fn connect(url: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test PostgreSQL");
        tokio::spawn(connection);
        client
    }

    /// One renewal of `node`'s lease under a fresh process of its name,
    /// removing the leases in `run_out`.
    async fn renew_as(
        client: &tokio_postgres::Client,
        node: &Membership,
        run_out: &[(String, LeaseMark)],
        since: u64,
    ) -> Renewal {
        let holder = Holder {
            mine: &node.incarnation,
            may_follow: None,
        };
        match renew(
            client,
            &node.settings,
            holder,
            run_out,
            since,
            node.future_skew,
        )
        .await
        {
            Ok(renewal) => renewal,
            Err(e) => panic!("renewal of {} failed: {e:?}", node.node()),
        }
    }

    /// The property the takeover fence rests on: a view read by a renewal
    /// holds exactly the members its version was logged with, however
    /// other nodes change the membership meanwhile. A node the view left
    /// out would have its clock's skew left out of the fence. Here a member
    /// joins and goes away over and over (removed by another node as run
    /// out, or leaving by itself) while an observer renews as fast as it
    /// can. With the version and the members read in two statements (until
    /// session 58), a removal committed between them showed the old version
    /// without the removed member, and this failed within a few hundred
    /// renewals.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_renewal_reads_every_version_with_the_members_it_was_logged_with() {
        let Some(url) = coordinator().await else {
            return;
        };
        let (observer, remover) = (membership("node-a"), membership("node-b"));
        let (a, b) = (connect(&url).await, connect(&url).await);
        renew_as(&b, &remover, &[], 0).await;

        let churn = {
            let url = url.clone();
            tokio::spawn(async move {
                let (b, d) = (connect(&url).await, connect(&url).await);
                for round in 0..300 {
                    let dying = membership("node-d");
                    renew_as(&d, &dying, &[], 0).await;
                    if round % 2 == 0 {
                        let marks = renew_as(&b, &remover, &[], 0).await.marks;
                        let run_out: Vec<_> =
                            marks.into_iter().filter(|(n, _)| n == "node-d").collect();
                        let after = renew_as(&b, &remover, &run_out, 0).await.view;
                        assert!(after.members.iter().all(|m| m.node != "node-d"));
                    } else {
                        dying.leave(&d).await;
                    }
                }
            })
        };

        let mut since = 0;
        let mut renewals = 0;
        let mut seen_with_d = (false, false);
        while !churn.is_finished() {
            let view = renew_as(&a, &observer, &[], since).await.view;
            renewals += 1;
            since = view.version;
            let read: Vec<&str> = view.members.iter().map(|m| m.node.as_str()).collect();
            let logged: String = a
                .query_one(
                    "SELECT members FROM warden_membership_log WHERE version = $1",
                    &[&i64::try_from(view.version).unwrap()],
                )
                .await
                .unwrap()
                .get(0);
            let logged: Vec<(String, String, i64)> = serde_json::from_str(&logged).unwrap();
            let logged: Vec<&str> = logged.iter().map(|(n, _, _)| n.as_str()).collect();
            assert_eq!(
                read, logged,
                "renewal {renewals} read version {} with other members than it was logged with",
                view.version
            );
            let with_d = read.contains(&"node-d");
            seen_with_d = (seen_with_d.0 || with_d, seen_with_d.1 || !with_d);
        }
        churn.await.expect("the churn of node-d ran through");
        assert!(
            renewals >= 100,
            "only {renewals} renewals watched the churn"
        );
        assert_eq!(
            seen_with_d,
            (true, true),
            "the observer saw versions both with node-d and without it"
        );
    }
}
