//! A check's state step across the cluster: sent by the node that received
//! the check to the nodes owning its parts, and decided there.
//!
//! The receiving node has done everything stateless (validation,
//! authorization, signature, freshness, route). What is left — the replay
//! key and the rate limits — is split by owner ([`SlotTable`]). Each owner
//! judges the timestamp again by its own clock before it decides: the
//! nonce is forgotten by that clock, and the receiving node's may differ
//! (README, Clocks in a cluster).
//!
//! - **One owner** (the usual case: a key's nonce and policies share its
//!   slot): one step on the open `DecideStream` to that node, atomic there
//!   exactly as on a single node. When the owner is this node, no hop.
//! - **Several owners** (a key on A, a per-IP limit on B): two phases.
//!   `Reserve` on every owner decides its part and, if it passes, takes it
//!   and holds it under a reservation; then `Settle` keeps every part (all
//!   passed) or gives back every part that was taken (any was refused). A
//!   denied request therefore takes nothing anywhere, and of two identical
//!   requests exactly one wins: the first to reserve the nonce holds it, the
//!   second sees REPLAY. A reservation not settled within
//!   [`RESERVATION_TIMEOUT`] is given back by its owner. A slot's state is
//!   handed to a new owner only once no reservation holds it, so that what
//!   is given back goes with the state, not to a node that no longer has
//!   it. The receiving node
//!   answers ALLOW only after every owner acknowledged its commit; if one
//!   did not, the answer is UNAVAILABLE (never an ALLOW that a lost nonce
//!   could let through twice).
//!
//! Bounds if a node dies mid-check: if the receiving node dies between
//! reserve and settle, owners give the reservations back after the timeout
//! (the client got no answer, so nothing was admitted; tokens are held up
//! to 2 s meanwhile). If it dies after some commits, the committed parts
//! stay taken although the client got no ALLOW: under-admission by at most
//! the cost of the checks it had in flight. If an owner dies, its slots'
//! counters start afresh on their next owner (over-admission of at most one
//! period's limit per limit and failover) and the takeover fence there
//! refuses every request the dead owner may have accepted.
//!
//! An owner answers only for slots it owns in its own current membership,
//! and only while its lease is valid ([`super::Membership::may_serve`]);
//! otherwise it says NOT_OWNER and the receiving node routes again with a
//! fresher membership, for up to one lease TTL, before giving up with
//! UNAVAILABLE.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use smallvec::SmallVec;
use tonic::transport::Channel;
use warden_client::Tls;
use warden_client::proto::peer_client::PeerClient;
use warden_client::proto::state_limit::Limit as WireLimit;
use warden_client::proto::state_verdict::Outcome as WireOutcome;
use warden_client::proto::{
    GcraLimit, HandOffBatch, HandedBucket, HandedNonce, HandedWindow, LimitVerdict as WireVerdict,
    Settlement, SlotFences, StateLimit, StateNonce, StateStep, StateVerdict, VouchRequest,
    WindowLimit,
};

use super::Membership;
use super::link::PeerLink;
use super::ownership::{Node, SlotTable};
use crate::check::{Checker, Pending};
use crate::engine::{
    Engine, Entry, Gcra, Limit, LimitVerdict, Nanos, Outcome, Pool, ReplayKey, Request, Slot,
    StateKey, Verdicts, Window, WindowKind, WindowState, slot_of,
};
use crate::freshness::{Fence, Stale};

/// How long an owner holds a reservation before giving it back by itself.
pub const RESERVATION_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one call to a peer may take.
const PEER_CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause before routing again after a NOT_OWNER or an unreachable owner.
const REROUTE_PAUSE: Duration = Duration::from_millis(50);
/// Failure charges (and spent budgets) on their way to one other node, at
/// most. A charge is sent after its check was answered, so nothing else
/// bounds how many wait at once; each waits up to two peer deadlines while
/// its owner does not answer (a paused or dying node), and a flood of bad
/// signatures would pile them up without end. Past this, a charge to that
/// node is dropped and counted
/// (`warden_cluster_failure_charges_dropped_total{to}`): it would most
/// likely have been lost anyway, and the sources it was for get a few more
/// guesses while their owner does not answer. Charges to other nodes, and
/// to this one, are not held up.
pub const MAX_FAILURE_CHARGES: usize = 1024;

/// The owners could not decide in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

/// How one routing attempt ended.
enum Attempt {
    Decided(Result<Outcome, Stale>),
    /// An owner was not (or no longer) the owner, or unreachable: nothing
    /// is held; route again with a fresher membership.
    Reroute,
    /// An owner did not confirm a commit: give up rather than answer.
    Unconfirmed,
}

/// What one owner said about its part.
enum PartAnswer {
    Verdict(StateVerdict),
    /// The call failed (unreachable, timed out): route again.
    Failed,
}

/// A part taken under a reservation, given back unless settled in time.
struct Reservation {
    /// The slots its state lies in: none of them is handed over while it
    /// is held, or its refund would miss the state it gives back to.
    slots: SmallVec<[Slot; 4]>,
    taken_at: Nanos,
    nonce: Option<(ReplayKey, Nanos)>,
    limits: Vec<(StateKey, Limit)>,
    cost: u64,
    expires: Instant,
}

/// This node's side of the cluster's state: routing state steps to their
/// owners, and deciding the parts it owns.
pub struct ClusterState {
    membership: Arc<Membership>,
    checker: Arc<Checker>,
    tls: Option<Tls>,
    peers: Mutex<HashMap<String, PeerClient<Channel>>>,
    /// One open `DecideStream` per peer, for one-owner steps.
    links: Mutex<HashMap<String, Arc<PeerLink>>>,
    reservations: Mutex<HashMap<u64, Reservation>>,
    /// Woken whenever reservations are settled or given back.
    released: tokio::sync::Notify,
    /// Room for failure charges in flight to each other node, by name
    /// ([`MAX_FAILURE_CHARGES`]).
    failure_charges: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    /// The membership's tables, in order, subscribed to before the first.
    tables: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Arc<SlotTable>>>>,
}

impl std::fmt::Debug for ClusterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterState")
            .field("node", &self.membership.node())
            .finish_non_exhaustive()
    }
}

/// One owner's share of a state step: its index among the members, its
/// address, and which of the step's parts (by position) it holds.
struct Share {
    owner: u16,
    address: String,
    nonce: bool,
    limits: SmallVec<[usize; 4]>,
}

impl ClusterState {
    pub fn new(membership: Arc<Membership>, checker: Arc<Checker>, tls: Option<Tls>) -> Self {
        let tables = Mutex::new(Some(membership.table_changes()));
        Self {
            tables,
            membership,
            checker,
            tls,
            peers: Mutex::new(HashMap::new()),
            links: Mutex::new(HashMap::new()),
            reservations: Mutex::new(HashMap::new()),
            released: tokio::sync::Notify::new(),
            failure_charges: Mutex::new(HashMap::new()),
        }
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// Decides `pending` on the nodes that own its parts.
    pub async fn decide(&self, pending: &Pending) -> Result<Result<Outcome, Stale>, Unavailable> {
        let deadline = Instant::now() + self.membership.lease_ttl();
        loop {
            let table = self.membership.table();
            match self.try_decide(&table, pending).await {
                Attempt::Decided(decided) => return Ok(decided),
                Attempt::Unconfirmed => return Err(Unavailable),
                Attempt::Reroute => {}
            }
            if !rerouted(deadline).await {
                return Err(Unavailable);
            }
        }
    }

    /// Forgets `pending`'s replay key at the node that owns it (a
    /// `Forget`). Only its nonce is looked at.
    pub async fn forget(&self, pending: &Pending) -> Result<(), Unavailable> {
        let deadline = Instant::now() + self.membership.lease_ttl();
        let nonce_only = pending.nonce_only();
        loop {
            let table = self.membership.table();
            if let Some([share]) = shares(&table, &nonce_only).as_deref() {
                let step = StateStep {
                    forget: true,
                    ..self.step(&table, &nonce_only, share)
                };
                match self.call(&table, share, step, Phase::Decide).await {
                    PartAnswer::Verdict(v) => match v.outcome() {
                        WireOutcome::Forgotten => return Ok(()),
                        WireOutcome::NotOwner | WireOutcome::Unspecified => {}
                        other => {
                            // Decided as a dry run: an owner of a version
                            // before forget steps.
                            tracing::warn!(
                                event = "forget_not_understood",
                                peer = %share.address,
                                answer = ?other,
                                "the owner of a replay key did not forget it; is it running an older version?"
                            );
                            return Err(Unavailable);
                        }
                    },
                    PartAnswer::Failed => {}
                }
            }
            if !rerouted(deadline).await {
                return Err(Unavailable);
            }
        }
    }

    /// One attempt under `table`.
    async fn try_decide(&self, table: &SlotTable, pending: &Pending) -> Attempt {
        let Some(shares) = shares(table, pending) else {
            return Attempt::Reroute;
        };
        if shares.len() == 1 {
            let step = self.step(table, pending, &shares[0]);
            return match self.call(table, &shares[0], step, Phase::Decide).await {
                PartAnswer::Verdict(v) => self.outcome_of(&v),
                PartAnswer::Failed => Attempt::Reroute,
            };
        }
        let phase = if pending.commit {
            Phase::Reserve
        } else {
            Phase::Decide
        };
        let calls = shares.iter().map(|share| {
            let step = self.step(table, pending, share);
            self.call(table, share, step, phase)
        });
        let answers = futures_util::future::join_all(calls).await;
        let taken: Vec<(&Share, u64)> = shares
            .iter()
            .zip(&answers)
            .filter_map(|(share, a)| match a {
                PartAnswer::Verdict(v) if v.reservation != 0 => Some((share, v.reservation)),
                _ => None,
            })
            .collect();
        let verdicts: Option<Vec<&StateVerdict>> = answers
            .iter()
            .map(|a| match a {
                PartAnswer::Verdict(v) if v.outcome() != WireOutcome::NotOwner => Some(v),
                _ => None,
            })
            .collect();
        let Some(verdicts) = verdicts else {
            self.settle_all(table, &taken, false).await;
            return Attempt::Reroute;
        };
        // Refusals in the order one engine would find them: the fence, the
        // nonce, then room, then limits.
        let first_refusal = [
            WireOutcome::Fenced,
            WireOutcome::TooOld,
            WireOutcome::TooFarAhead,
            WireOutcome::Replay,
            WireOutcome::NonceSetFull,
            WireOutcome::StateFull,
        ]
        .into_iter()
        .find_map(|o| verdicts.iter().find(|v| v.outcome() == o));
        let allowed = first_refusal.is_none() && verdicts.iter().all(|v| v.allowed);
        if !pending.commit || !allowed {
            self.settle_all(table, &taken, false).await;
        } else if !self.settle_all(table, &taken, true).await {
            // A part could not be confirmed: its owner may have given it
            // back, nonce included, so an ALLOW could be replayed.
            metrics::counter!("warden_cluster_settle_failures_total").increment(1);
            return Attempt::Unconfirmed;
        }
        if let Some(refusal) = first_refusal {
            return self.outcome_of(refusal);
        }
        // Parts given back report what their limits hold without them.
        let released = !allowed;
        let mut parts: Vec<Option<LimitVerdict>> = vec![None; pending.limits.len()];
        for (share, v) in shares.iter().zip(&verdicts) {
            for (&at, w) in share.limits.iter().zip(&v.limits) {
                let mut verdict = limit_verdict(w);
                if released && v.allowed {
                    let limit = pending.limits[at].1.limit();
                    verdict.remaining = (verdict.remaining + pending.cost).min(limit);
                }
                parts[at] = Some(verdict);
            }
        }
        match parts.into_iter().collect::<Option<Verdicts>>() {
            Some(limits) => Attempt::Decided(Ok(Outcome::Limited { allowed, limits })),
            // An owner answered fewer verdicts than it was sent limits.
            None => Attempt::Reroute,
        }
    }

    /// The outcome of a one-owner step (or a refusal) from its verdict.
    fn outcome_of(&self, v: &StateVerdict) -> Attempt {
        Attempt::Decided(Ok(match v.outcome() {
            WireOutcome::Fenced => {
                return Attempt::Decided(Err(Stale::TakenOver {
                    retry_after: v.retry_after_ns.map(Nanos::new),
                }));
            }
            WireOutcome::TooOld => return Attempt::Decided(Err(Stale::TooOld)),
            WireOutcome::TooFarAhead => return Attempt::Decided(Err(Stale::TooFarAhead)),
            WireOutcome::Replay => Outcome::Replay,
            WireOutcome::NonceSetFull => Outcome::NonceSetFull,
            WireOutcome::StateFull => Outcome::StateFull(
                checked_pool(&v.pool)
                    .and_then(|p| self.checker.engine().pools().from_wire_name(p))
                    .unwrap_or(crate::engine::Pool::FAILURES),
            ),
            WireOutcome::Limited => Outcome::Limited {
                allowed: v.allowed,
                limits: v.limits.iter().map(limit_verdict).collect(),
            },
            // Not an answer to a step that decides: route it again.
            WireOutcome::NotOwner | WireOutcome::Unspecified | WireOutcome::Forgotten => {
                return Attempt::Reroute;
            }
        }))
    }

    /// Keeps (or gives back) every reservation in `taken`; whether every
    /// owner confirmed.
    async fn settle_all(&self, table: &SlotTable, taken: &[(&Share, u64)], commit: bool) -> bool {
        let calls = taken.iter().map(|(share, reservation)| async move {
            if Some(share.owner) == table.me() {
                return self.settle(*reservation, commit);
            }
            let Some(mut client) = self.peer(&share.address) else {
                return false;
            };
            let settlement = Settlement {
                reservation: *reservation,
                commit,
            };
            answered(
                PEER_CALL_TIMEOUT,
                client.settle(request(settlement, PEER_CALL_TIMEOUT)),
            )
            .await
            .is_some_and(|s| s.found)
        });
        futures_util::future::join_all(calls)
            .await
            .into_iter()
            .all(|ok| ok)
    }

    /// One limit as a step carries it (its pool by name: pool numbers
    /// differ between nodes).
    fn wire_state_limit(&self, (key, limit): (StateKey, Limit)) -> StateLimit {
        StateLimit {
            id: key.id,
            pool: self.checker.engine().pools().wire_name(Pool::of(key.id)),
            limit: Some(wire_limit(limit)),
        }
    }

    /// The wire form of one share of `pending`.
    fn step(&self, table: &SlotTable, pending: &Pending, share: &Share) -> StateStep {
        StateStep {
            version: table.version,
            nonce: pending
                .nonce
                .filter(|_| share.nonce)
                .map(|(r, at)| StateNonce {
                    id: r.key.id,
                    forget_at_ns: at.get(),
                    extra: u32::from(r.extra),
                }),
            limits: share
                .limits
                .iter()
                .map(|&i| self.wire_state_limit(pending.limits[i]))
                .collect(),
            cost: pending.cost,
            commit: pending.commit,
            timestamp: pending.timestamp.unwrap_or(0),
            forget: false,
        }
    }

    /// Sends one share to its owner (or decides it here).
    async fn call(
        &self,
        table: &SlotTable,
        share: &Share,
        step: StateStep,
        phase: Phase,
    ) -> PartAnswer {
        if Some(share.owner) == table.me() {
            metrics::counter!("warden_cluster_state_steps_total", "route" => "local").increment(1);
            return PartAnswer::Verdict(self.serve(&step, phase));
        }
        let started = Instant::now();
        let verdict = match phase {
            Phase::Decide => match self.link(&share.address) {
                Some(link) => link.decide(step, PEER_CALL_TIMEOUT).await,
                None => None,
            },
            Phase::Reserve => match self.peer(&share.address) {
                Some(mut client) => {
                    answered(
                        PEER_CALL_TIMEOUT,
                        client.reserve(request(step, PEER_CALL_TIMEOUT)),
                    )
                    .await
                }
                None => None,
            },
        };
        metrics::histogram!("warden_cluster_forward_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        match verdict {
            Some(v) => {
                metrics::counter!("warden_cluster_state_steps_total", "route" => "forwarded")
                    .increment(1);
                PartAnswer::Verdict(v)
            }
            None => {
                metrics::counter!("warden_cluster_forward_errors_total").increment(1);
                tracing::debug!(peer = %share.address, "state step to a peer failed");
                PartAnswer::Failed
            }
        }
    }

    /// The open stream to the peer at `address` (a new one if the last
    /// broke).
    fn link(&self, address: &str) -> Option<Arc<PeerLink>> {
        let mut links = self.links.lock();
        if let Some(link) = links.get(address).filter(|l| !l.is_broken()) {
            return Some(link.clone());
        }
        let link = PeerLink::open(self.peer(address)?);
        links.insert(address.to_owned(), link.clone());
        Some(link)
    }

    /// A client for the peer at `address`, connected on first use.
    fn peer(&self, address: &str) -> Option<PeerClient<Channel>> {
        let mut peers = self.peers.lock();
        if let Some(client) = peers.get(address) {
            return Some(client.clone());
        }
        let channel = warden_client::lazy_channel(address, self.tls.as_ref()).ok()?;
        let client = PeerClient::new(channel);
        peers.insert(address.to_owned(), client.clone());
        Some(client)
    }

    /// The owner's side: decides `step` if every part of it is this node's
    /// now; under [`Phase::Reserve`] what passes is taken and held.
    pub fn serve(&self, step: &StateStep, phase: Phase) -> StateVerdict {
        // Held until decided: a new table (and a handover of what it moves
        // away) waits for this step.
        let table = self.membership.table_guard();
        let refuse = |outcome: WireOutcome| StateVerdict {
            outcome: outcome as i32,
            version: table.version,
            ..Default::default()
        };
        let ids = step
            .nonce
            .iter()
            .map(|n| n.id)
            .chain(step.limits.iter().map(|l| l.id));
        let mut slots: SmallVec<[u16; 8]> = ids.map(slot_of).collect();
        if slots.is_empty() {
            return refuse(WireOutcome::NotOwner);
        }
        if !self.membership.may_serve() || !slots.iter().all(|&s| table.is_mine(s)) {
            metrics::counter!("warden_cluster_not_owner_total").increment(1);
            return refuse(WireOutcome::NotOwner);
        }
        slots.dedup();
        let engine = self.checker.engine();
        if step.forget {
            // Forgetting lets nothing in by itself: a request sent again is
            // judged whole, fences and skews included, when it comes.
            if let Some(n) = &step.nonce {
                engine.forget(ReplayKey::placed(engine, n.id, n.extra));
            }
            return refuse(WireOutcome::Forgotten);
        }
        let now = self.checker.now();
        let fenced = |fence: Fence| StateVerdict {
            retry_after_ns: fence.opens_in(now).map(Nanos::get),
            ..refuse(WireOutcome::Fenced)
        };
        if step.timestamp != 0 {
            if let Some(fence) = table.fence_over(&slots, step.timestamp) {
                return fenced(fence);
            }
            // Judged again here, by the clock that keeps the nonce: the
            // node that let it through judged by its own. And under this
            // process's restart fence: signed before it, a process before
            // this one under its name may have accepted it, whichever node
            // it came through.
            let freshness = self.checker.freshness();
            if let Err(stale) = freshness.judge(step.timestamp, now) {
                metrics::counter!("warden_cluster_stale_at_owner_total").increment(1);
                return match stale {
                    Stale::BeforeFence => fenced(freshness.fence()),
                    Stale::TooFarAhead => refuse(WireOutcome::TooFarAhead),
                    _ => refuse(WireOutcome::TooOld),
                };
            }
        }
        let Some(limits) = step
            .limits
            .iter()
            .map(|l| {
                let pool = engine.pools().from_wire_name(checked_pool(&l.pool)?)?;
                let limit = limit_from_wire(l.limit.as_ref()?)?;
                Some((engine.placed(pool.tag(l.id)), limit))
            })
            .collect::<Option<Vec<_>>>()
        else {
            return refuse(WireOutcome::Unspecified);
        };
        let nonce = step.nonce.as_ref().map(|n| {
            let mut forget_at = Nanos::new(n.forget_at_ns);
            if step.timestamp == 0 {
                // Without a signed time, the sender reckoned the window
                // from its own clock; reckoned from this one, which keeps
                // the nonce, it may not end sooner.
                forget_at = forget_at.max(self.checker.unsigned_forget_at(now));
            }
            (ReplayKey::placed(engine, n.id, n.extra), forget_at)
        });
        let cost = step.cost.max(1);
        let outcome = engine.decide(
            now,
            &Request {
                nonce,
                limits: &limits,
                cost,
                commit: step.commit,
            },
        );
        let mut verdict = wire_verdict(&outcome, engine);
        verdict.version = table.version;
        if let (Phase::Reserve, true, Outcome::Limited { allowed: true, .. }) =
            (phase, step.commit, &outcome)
        {
            let mut held = self.reservations.lock();
            let id = loop {
                let id = u64::from_le_bytes(crate::crypto::random_bytes::<8>());
                if id != 0 && !held.contains_key(&id) {
                    break id;
                }
            };
            held.insert(
                id,
                Reservation {
                    slots: slots.iter().copied().collect(),
                    taken_at: now,
                    nonce,
                    limits,
                    cost,
                    expires: Instant::now() + RESERVATION_TIMEOUT,
                },
            );
            verdict.reservation = id;
        }
        verdict
    }

    /// Keeps or gives back a reservation; whether it was still held.
    pub fn settle(&self, reservation: u64, commit: bool) -> bool {
        let Some(r) = self.reservations.lock().remove(&reservation) else {
            return false;
        };
        if !commit {
            self.give_back(&r);
        }
        self.released.notify_waiters();
        true
    }

    fn give_back(&self, r: &Reservation) {
        self.checker.engine().refund(
            r.taken_at,
            &Request {
                nonce: r.nonce,
                limits: &r.limits,
                cost: r.cost,
                commit: true,
            },
        );
    }

    /// Gives back reservations nobody settled in time; run every so often.
    pub fn expire_reservations(&self) {
        let now = Instant::now();
        let expired = self.give_back_where(|r| r.expires <= now);
        if expired > 0 {
            metrics::counter!("warden_cluster_reservations_expired_total")
                .increment(expired as u64);
        }
    }

    /// Gives back (and stops holding) every reservation `which` picks; how
    /// many.
    fn give_back_where(&self, mut which: impl FnMut(&Reservation) -> bool) -> usize {
        let picked: Vec<Reservation> = self
            .reservations
            .lock()
            .extract_if(|_, r| which(r))
            .map(|(_, r)| r)
            .collect();
        for r in &picked {
            self.give_back(r);
        }
        if !picked.is_empty() {
            self.released.notify_waiters();
        }
        picked.len()
    }

    /// Waits until no reservation holds state in a slot `moving` names:
    /// each is settled by its check, or given back at its timeout (2 s at
    /// most). A slot's state is handed over only then, so that a check
    /// refused meanwhile gives back to the state that moves, not to nothing
    /// here: the next owner would keep the nonce and tokens of a request
    /// that was never allowed, and refuse the client's retry as a replay.
    async fn reservations_released(&self, moving: impl Fn(Slot) -> bool) {
        let mut logged = false;
        loop {
            // Made before looking, so that a release in between wakes it.
            let released = self.released.notified();
            let (held, last_expiry) = {
                let reservations = self.reservations.lock();
                let held = reservations
                    .values()
                    .filter(|r| r.slots.iter().any(|&s| moving(s)));
                (held.clone().count(), held.map(|r| r.expires).max())
            };
            let Some(last_expiry) = last_expiry else {
                return;
            };
            if !logged {
                logged = true;
                tracing::info!(
                    event = "cluster_handoff_awaits_reservations",
                    held,
                    "checks in flight hold state of slots leaving this node; handing them over once they are settled"
                );
            }
            let until = tokio::time::Instant::from_std(last_expiry);
            if tokio::time::timeout_at(until, released).await.is_err() {
                self.expire_reservations();
            }
        }
    }
}

impl ClusterState {
    /// Hands over, after every membership change, the state of the slots
    /// this node no longer owns to their new owners. Runs until shutdown.
    pub async fn hand_over_lost_slots(self: Arc<Self>) {
        let Some(mut tables) = self.tables.lock().take() else {
            return;
        };
        let mut before = Arc::new(SlotTable::empty());
        while let Some(now) = tables.recv().await {
            if self.membership.is_leaving() {
                return;
            }
            // What this node no longer owns, and whatever it holds of a
            // joiner's slots (handed to it by a node that left, say): a
            // joiner waits for every member's handover.
            let joiners: Vec<&Node> = now.joined_since(&before).collect();
            let moved = |slot: Slot| {
                (before.owns(slot) && !now.owns(slot))
                    || now
                        .owner_name(slot)
                        .is_some_and(|o| joiners.iter().any(|j| j.name == o))
            };
            // Every joiner hears from this node, even with nothing to hand.
            let receivers: BTreeMap<String, String> = (0..=Slot::MAX)
                .filter(|&s| moved(s))
                .filter_map(|s| now.owner_node(s))
                .chain(joiners.iter().copied())
                .map(|n| (n.name.clone(), n.address.clone()))
                .collect();
            if !receivers.is_empty() {
                // Answers for them have stopped (the new table is in place),
                // but checks decided under the old one may still hold them.
                self.reservations_released(moved).await;
                let fences = now.fences_on((0..=Slot::MAX).filter(|&s| moved(s)));
                let (batches, _) = self.take_batches(&now, moved, now.version);
                self.send_batches(receivers, batches, &now, fences, now.version)
                    .await;
            }
            before = now;
        }
    }

    /// On the way out (SIGTERM, after the last call was answered): answers
    /// for nothing more, and hands everything to the slots' next owners.
    /// Returns once every one of them acknowledged (or gave up on).
    pub async fn leave(&self) {
        let without = self.membership.start_leaving();
        let receivers: BTreeMap<String, String> = without
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.address.clone()))
            .collect();
        if receivers.is_empty() {
            return;
        }
        // The listener is closed, so no check can settle what it reserved
        // here: given back now, before the state goes. A check that had
        // all its parts answers UNAVAILABLE, as its commit here fails.
        let given_back = self.give_back_where(|_| true);
        if given_back > 0 {
            tracing::info!(
                event = "cluster_reservations_given_back",
                count = given_back,
                "gave back the parts of checks in flight before handing state over"
            );
        }
        let (batches, count) = self.take_batches(&without, |_| true, 0);
        // Every fence it holds goes to the slot's next owner; fences are
        // forgotten once no fresh request can fall under them.
        let fences = without.fences_on(0..=Slot::MAX);
        self.send_batches(receivers, batches, &without, fences, 0)
            .await;
        tracing::info!(
            event = "cluster_handed_over_all",
            entries = count,
            "handed this node's state to the next owners"
        );
    }

    /// Takes the entries of the slots `wanted` names out of the engine, in
    /// batches for the owner of each under `table` (by name); how many were
    /// taken. Straight into the batches, a shard at a time: a list of
    /// every entry first held the state a second time, and more, at the
    /// moment a node leaves (a rolling restart), where an OOM kill loses
    /// all of it.
    fn take_batches(
        &self,
        table: &SlotTable,
        wanted: impl Fn(Slot) -> bool,
        version: u64,
    ) -> (BTreeMap<String, Vec<HandOffBatch>>, usize) {
        let names = self.checker.engine().pools().wire_names();
        let mut batches: BTreeMap<String, Vec<HandOffBatch>> = BTreeMap::new();
        let mut count = 0;
        self.checker
            .engine()
            .take_each(wanted, self.checker.now(), |entries| {
                count += entries.len();
                for &entry in entries {
                    let Some(owner) = table.owner_name(slot_of(entry.id())) else {
                        continue;
                    };
                    let list = batches.entry(owner.to_owned()).or_default();
                    if list.last().is_none_or(|b| batch_len(b) >= HANDOFF_BATCH) {
                        list.push(HandOffBatch {
                            from: self.membership.node().to_owned(),
                            version,
                            ..Default::default()
                        });
                    }
                    add_entry(list.last_mut().expect("pushed above"), entry, &names);
                }
            });
        (batches, count)
    }

    /// Sends their `batches` to the nodes in `receivers` (name → address),
    /// and to each a last batch, with the `fences` of the slots it takes
    /// under `table`.
    async fn send_batches(
        &self,
        receivers: BTreeMap<String, String>,
        mut batches: BTreeMap<String, Vec<HandOffBatch>>,
        table: &SlotTable,
        fences: Vec<(u32, Vec<Slot>)>,
        version: u64,
    ) {
        let mut fences_for: BTreeMap<&str, Vec<SlotFences>> = BTreeMap::new();
        for (fence_secs, slots) in fences {
            let mut by_owner: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
            for slot in slots {
                if let Some(owner) = table.owner_name(slot) {
                    by_owner.entry(owner).or_default().push(u32::from(slot));
                }
            }
            for (owner, slots) in by_owner {
                fences_for
                    .entry(owner)
                    .or_default()
                    .push(SlotFences { fence_secs, slots });
            }
        }
        let sends = receivers.into_iter().map(|(node, address)| {
            let mut list = batches.remove(&node).unwrap_or_default();
            if list.is_empty() {
                list.push(HandOffBatch {
                    from: self.membership.node().to_owned(),
                    version,
                    ..Default::default()
                });
            }
            let last = list.last_mut().expect("one at least");
            last.last = true;
            last.fences = fences_for.remove(node.as_str()).unwrap_or_default();
            async move {
                let entries: usize = list.iter().map(batch_len).sum();
                for batch in list {
                    if !self.send_batch(&address, batch).await {
                        metrics::counter!("warden_cluster_handoffs_total", "result" => "failed").increment(1);
                        tracing::warn!(event = "cluster_handoff_failed", to = %node, "could not hand state over; the new owner will serve it behind the takeover fence");
                        return;
                    }
                }
                metrics::counter!("warden_cluster_handoffs_total", "result" => "sent").increment(1);
                tracing::info!(event = "cluster_handoff_sent", to = %node, entries, "handed state over");
            }
        });
        futures_util::future::join_all(sends).await;
    }

    /// One batch, retried for up to a lease TTL.
    async fn send_batch(&self, address: &str, batch: HandOffBatch) -> bool {
        let deadline = Instant::now() + self.membership.lease_ttl();
        while Instant::now() < deadline {
            if let Some(mut client) = self.peer(address) {
                let call = client.hand_off(request(batch.clone(), HANDOFF_CALL_TIMEOUT));
                if answered(HANDOFF_CALL_TIMEOUT, call).await.is_some() {
                    return true;
                }
            }
            tokio::time::sleep(REROUTE_PAUSE).await;
        }
        false
    }

    /// The receiving side: state from a previous owner, merged; on its last
    /// batch, its slots are answered for. `Err` for entries that are not
    /// well formed (nothing of the batch is kept then).
    pub fn receive(&self, batch: &HandOffBatch) -> Result<(), &'static str> {
        let engine = self.checker.engine();
        let entries = entries_of(batch, engine)?;
        let mut fences = Vec::with_capacity(batch.fences.len());
        for f in &batch.fences {
            let slots = f
                .slots
                .iter()
                .map(|&s| Slot::try_from(s).map_err(|_| "fences: not a slot"))
                .collect::<Result<Vec<Slot>, _>>()?;
            fences.push((f.fence_secs, slots));
        }
        // Before anything of these slots can be answered for here.
        self.membership.raise_fences(&fences);
        let dropped = engine.import(&entries, self.checker.now());
        metrics::counter!("warden_cluster_handoff_entries_received_total")
            .increment(entries.len() as u64);
        metrics::counter!("warden_cluster_handoff_entries_dropped_total").increment(dropped as u64);
        if batch.last {
            let version = if batch.version == 0 {
                u64::MAX
            } else {
                batch.version
            };
            self.membership.handed_over(&batch.from, version);
        }
        Ok(())
    }
}

impl ClusterState {
    /// While the coordinator is unreachable, asks every other member once
    /// per renewal interval to confirm that nobody can change the
    /// membership; with all of them confirming, this node serves on (see
    /// [`Membership::vouch_for`]). Runs until shutdown.
    pub async fn keep_vouched(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.membership.renew_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !self.membership.coordinator_unreachable() {
                continue;
            }
            let table = self.membership.table();
            let me = self.membership.node().to_owned();
            let asked = Instant::now();
            let others: Vec<&str> = table
                .nodes
                .iter()
                .filter(|n| n.name != me)
                .map(|n| n.address.as_str())
                .collect();
            if others.is_empty() {
                continue;
            }
            let this = &self;
            let asks = others.iter().map(|address| {
                let ask = VouchRequest {
                    node: me.clone(),
                    version: table.version,
                };
                async move {
                    let Some(mut client) = this.peer(address) else {
                        return false;
                    };
                    answered(
                        PEER_CALL_TIMEOUT,
                        client.vouch(request(ask, PEER_CALL_TIMEOUT)),
                    )
                    .await
                    .is_some_and(|r| r.granted)
                }
            });
            let granted = futures_util::future::join_all(asks).await;
            if granted.iter().all(|g| *g) {
                self.membership.vouched(asked);
            } else {
                metrics::counter!("warden_cluster_vouch_refused_total").increment(1);
            }
        }
    }
}

impl ClusterState {
    /// Charges one failure to the failure budget `key` at its owning node,
    /// in the background (the answer to the failed request does not depend
    /// on it). When the charge spends the budget, every other node is told
    /// the budget's state, so each one refuses the source before
    /// verification from then on, exactly as the owner does. Bound: the
    /// failures that arrive at other nodes between the charge that spends
    /// the budget and that message (a round trip) are not refused early.
    /// At most [`MAX_FAILURE_CHARGES`] are on their way to one node at
    /// once (this one included); past that a charge to it is dropped, and
    /// counted.
    pub fn charge_failure(self: &Arc<Self>, key: StateKey, limit: Limit) {
        let table = self.membership.table();
        let Some((owner, _)) = table.owner(key.slot()) else {
            return;
        };
        // This node's own budgets too: a charge waits while its owner is
        // not serving the slot, and that may be this node.
        let Some(room) = self.room_for(&table.nodes[usize::from(owner)].name) else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            this.send_charge(key, limit).await;
            drop(room);
        });
    }

    /// Room for one more charge on its way to `node`, counted in
    /// `warden_cluster_failure_charges_in_flight{to}` while it is held;
    /// `None` (counted as dropped) when [`MAX_FAILURE_CHARGES`] are.
    fn room_for(&self, node: &str) -> Option<ChargeRoom> {
        let room = self
            .failure_charges
            .lock()
            .entry(node.to_owned())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_FAILURE_CHARGES)))
            .clone();
        let Ok(permit) = room.try_acquire_owned() else {
            metrics::counter!("warden_cluster_failure_charges_dropped_total", "to" => node.to_owned())
                .increment(1);
            return None;
        };
        let in_flight =
            metrics::gauge!("warden_cluster_failure_charges_in_flight", "to" => node.to_owned());
        in_flight.increment(1.0);
        Some(ChargeRoom {
            _permit: permit,
            in_flight,
        })
    }

    /// One failure charge to the owner of `key`, and a spent budget to
    /// every other node: one attempt each, where there is room (a node that
    /// misses it learns it from the owner at its next charge).
    ///
    /// An owner that answers "not mine" (a table changing, its state still
    /// being handed over) took nothing, so the charge follows the slot to
    /// its owner, as a check's step does, within one lease TTL. A call that
    /// failed is not sent again: the owner may have taken it, and a failure
    /// charged twice would lock an innocent client out sooner.
    async fn send_charge(&self, key: StateKey, limit: Limit) {
        let deadline = Instant::now() + self.membership.lease_ttl();
        let (table, owner, v) = loop {
            let table = self.membership.table();
            if let Some((owner, _)) = table.owner(key.slot()) {
                let share = Share {
                    owner,
                    address: table.nodes[usize::from(owner)].address.clone(),
                    nonce: false,
                    limits: SmallVec::from_slice(&[0]),
                };
                let step = StateStep {
                    version: table.version,
                    nonce: None,
                    limits: vec![self.wire_state_limit((key, limit))],
                    cost: 1,
                    commit: true,
                    timestamp: 0,
                    forget: false,
                };
                match self.call(&table, &share, step, Phase::Decide).await {
                    PartAnswer::Verdict(v) if v.outcome() == WireOutcome::NotOwner => {}
                    PartAnswer::Verdict(v) => break (table, owner, v),
                    PartAnswer::Failed => {
                        metrics::counter!("warden_cluster_failure_charges_lost_total").increment(1);
                        return;
                    }
                }
            }
            if !rerouted(deadline).await {
                metrics::counter!("warden_cluster_failure_charges_lost_total").increment(1);
                return;
            }
        };
        let spent = v.outcome() == WireOutcome::Limited
            && v.limits
                .first()
                .is_some_and(|l| !l.allowed || l.remaining == 0);
        if !spent {
            return;
        }
        // The budget's TAT as the owner holds it (reset_after = TAT - now).
        let now = self.checker.now();
        let tat = now.saturating_add(Nanos::new(v.limits[0].reset_after_ns));
        if Some(owner) != table.me() {
            self.checker
                .engine()
                .import(&[Entry::Bucket { id: key.id, tat }], now);
        }
        let batch = HandOffBatch {
            from: self.membership.node().to_owned(),
            version: table.version,
            buckets: vec![HandedBucket {
                id: key.id,
                pool: self.checker.engine().pools().wire_name(Pool::of(key.id)),
                tat_ns: tat.get(),
            }],
            last: false,
            ..Default::default()
        };
        // Every other node but the owner, which holds it already.
        let others = table
            .nodes
            .iter()
            .enumerate()
            .filter(|&(i, _)| Some(i as u16) != table.me() && i != usize::from(owner));
        let sends = others.filter_map(|(_, node)| {
            let room = self.room_for(&node.name)?;
            let mut client = self.peer(&node.address)?;
            let batch = batch.clone();
            Some(async move {
                let call = client.hand_off(request(batch, PEER_CALL_TIMEOUT));
                answered(PEER_CALL_TIMEOUT, call).await;
                drop(room);
            })
        });
        futures_util::future::join_all(sends).await;
    }
}

/// A failure charge's room on its way to one node (see
/// [`ClusterState::room_for`]).
struct ChargeRoom {
    _permit: tokio::sync::OwnedSemaphorePermit,
    in_flight: metrics::Gauge,
}

impl Drop for ChargeRoom {
    fn drop(&mut self) {
        self.in_flight.decrement(1.0);
    }
}

/// A call to a peer carrying `timeout` as its deadline.
fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// The answer to a peer call, or `None` if it failed or did not come
/// within `timeout`. The deadline is enforced here too: a paused peer
/// accepts connections but answers nothing.
async fn answered<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Option<T> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(answer)) => Some(answer.into_inner()),
        Ok(Err(status)) => {
            tracing::debug!(code = ?status.code(), "peer call failed");
            None
        }
        Err(_) => None,
    }
}

/// Entries per handover batch (a few hundred KiB on the wire), and per
/// batch of a saved state (`saved_state`).
pub const HANDOFF_BATCH: usize = 8192;
const HANDOFF_CALL_TIMEOUT: Duration = Duration::from_secs(5);

fn batch_len(b: &HandOffBatch) -> usize {
    b.nonces.len() + b.buckets.len() + b.windows.len()
}

/// Adds `entry` to `batch` in its wire form. Pools go by name (`names`:
/// [`crate::engine::pools::PoolTable::wire_names`]): the receiver, or the next
/// process, may number them differently.
pub fn add_entry(batch: &mut HandOffBatch, entry: Entry, names: &[String]) {
    let pool = |id: u64| names[Pool::of(id).index()].clone();
    match entry {
        Entry::Nonce {
            id,
            extra,
            forget_at_secs,
        } => batch.nonces.push(HandedNonce {
            id,
            forget_at_secs,
            extra: u32::from(extra),
        }),
        Entry::Bucket { id, tat } => batch.buckets.push(HandedBucket {
            id,
            pool: pool(id),
            tat_ns: tat.get(),
        }),
        Entry::Window { id, state } => batch.windows.push(HandedWindow {
            id,
            pool: pool(id),
            index: state.index,
            idle_at_ns: state.idle_at.get(),
            prev: state.prev,
            cur: state.cur,
        }),
    }
}

/// The entries of `batch`, in `engine`'s pools. `Err` for a pool that is
/// not well formed (then none of the batch should be kept).
pub fn entries_of(batch: &HandOffBatch, engine: &Engine) -> Result<Vec<Entry>, &'static str> {
    let pools = engine.pools();
    let pool = |name: &str| {
        checked_pool(name)
            .and_then(|n| pools.from_wire_name(n))
            .ok_or("pool: not a pool name")
    };
    let mut entries = Vec::with_capacity(batch_len(batch));
    for n in &batch.nonces {
        entries.push(Entry::Nonce {
            id: Pool::KEYS.tag(n.id),
            extra: ReplayKey::extra_from_wire(n.extra),
            forget_at_secs: n.forget_at_secs,
        });
    }
    for b in &batch.buckets {
        entries.push(Entry::Bucket {
            id: pool(&b.pool)?.tag(b.id),
            tat: Nanos::new(b.tat_ns),
        });
    }
    for w in &batch.windows {
        entries.push(Entry::Window {
            id: pool(&w.pool)?.tag(w.id),
            state: WindowState {
                index: w.index,
                idle_at: Nanos::new(w.idle_at_ns),
                prev: w.prev,
                cur: w.cur,
            },
        });
    }
    Ok(entries)
}

/// Whether an owner holds what it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Decide and store (all of the step is this owner's).
    Decide,
    /// Decide, take and hold until settled.
    Reserve,
}

/// Splits `pending` by owner; `None` when a slot has no owner (no members).
fn shares(table: &SlotTable, pending: &Pending) -> Option<SmallVec<[Share; 2]>> {
    let mut shares: SmallVec<[Share; 2]> = SmallVec::new();
    let mut share_of = |slot: u16| -> Option<usize> {
        let (owner, address) = table.owner(slot)?;
        Some(match shares.iter().position(|s| s.owner == owner) {
            Some(i) => i,
            None => {
                shares.push(Share {
                    owner,
                    address: address.to_owned(),
                    nonce: false,
                    limits: SmallVec::new(),
                });
                shares.len() - 1
            }
        })
    };
    let mut placed: SmallVec<[(usize, Option<usize>); 8]> = SmallVec::new();
    if let Some((replay, _)) = pending.nonce {
        placed.push((share_of(replay.key.slot())?, None));
    }
    for (i, (key, _)) in pending.limits.iter().enumerate() {
        placed.push((share_of(key.slot())?, Some(i)));
    }
    for (share, part) in placed {
        match part {
            None => shares[share].nonce = true,
            Some(i) => shares[share].limits.push(i),
        }
    }
    Some(shares)
}

/// Between two attempts at a slot's owner (none serving it, or one that
/// answered "not mine"): counts the reroute and waits [`REROUTE_PAUSE`] for
/// the table to settle; `false`, without waiting, once `deadline` passed.
async fn rerouted(deadline: Instant) -> bool {
    metrics::counter!("warden_cluster_reroutes_total").increment(1);
    if Instant::now() >= deadline {
        return false;
    }
    tokio::time::sleep(REROUTE_PAUSE).await;
    true
}

/// A pool name from a peer, if it is one a node could have sent: a policy
/// pool must name a valid policy.
fn checked_pool(name: &str) -> Option<&str> {
    match name.strip_prefix("policy:") {
        Some(policy) if !crate::model::is_valid_name(policy) => None,
        _ => Some(name),
    }
}

fn limit_verdict(w: &WireVerdict) -> LimitVerdict {
    LimitVerdict {
        allowed: w.allowed,
        remaining: w.remaining,
        reset_after: Nanos::new(w.reset_after_ns),
        retry_after: w.retry_after_ns.map(Nanos::new),
    }
}

fn wire_verdict(outcome: &Outcome, engine: &crate::engine::Engine) -> StateVerdict {
    let mut v = StateVerdict::default();
    match outcome {
        Outcome::Replay => v.outcome = WireOutcome::Replay as i32,
        Outcome::NonceSetFull => v.outcome = WireOutcome::NonceSetFull as i32,
        Outcome::StateFull(pool) => {
            v.outcome = WireOutcome::StateFull as i32;
            v.pool = engine.pools().wire_name(*pool);
        }
        Outcome::Limited { allowed, limits } => {
            v.outcome = WireOutcome::Limited as i32;
            v.allowed = *allowed;
            v.limits = limits
                .iter()
                .map(|l| WireVerdict {
                    allowed: l.allowed,
                    remaining: l.remaining,
                    reset_after_ns: l.reset_after.get(),
                    retry_after_ns: l.retry_after.map(|n| n.get()),
                })
                .collect();
        }
    }
    v
}

fn wire_limit(limit: Limit) -> WireLimit {
    match limit {
        Limit::Gcra(g) => WireLimit::Gcra(GcraLimit {
            limit: g.limit(),
            period_ns: g.period().get(),
            burst: g.burst(),
        }),
        Limit::Window(w) => WireLimit::Window(WindowLimit {
            sliding: w.kind() == WindowKind::Sliding,
            limit: w.limit(),
            period_ns: w.period().get(),
        }),
    }
}

/// A limit from the wire, if its parameters are ones a policy can have.
fn limit_from_wire(limit: &WireLimit) -> Option<Limit> {
    match limit {
        WireLimit::Gcra(g) if g.limit > 0 && g.period_ns > 0 && g.burst > 0 => Some(Limit::Gcra(
            Gcra::new(g.limit, Nanos::new(g.period_ns), g.burst),
        )),
        WireLimit::Window(w)
            if w.limit > 0 && w.limit <= u64::from(u32::MAX) && w.period_ns > 0 =>
        {
            let kind = if w.sliding {
                WindowKind::Sliding
            } else {
                WindowKind::Fixed
            };
            Some(Limit::Window(Window::new(
                kind,
                w.limit,
                Nanos::new(w.period_ns),
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Authz;
    use crate::config::{CheckSettings, ClusterSettings};
    use crate::engine::{FakeClock, ForwardOnly};
    use crate::freshness::Fence;
    use crate::keys::KeyRing;

    fn state() -> Arc<ClusterState> {
        state_on(Arc::new(FakeClock::new(Nanos::from_secs(1_764_000_000))))
    }

    fn state_on(clock: Arc<FakeClock>) -> Arc<ClusterState> {
        let checker = Checker::new(
            CheckSettings::default(),
            KeyRing::new(&[], &[]),
            Authz {
                callers: Vec::new(),
                clients: Vec::new(),
                plaintext: false,
            },
            Arc::new(ForwardOnly::new(clock)),
        );
        let membership = Membership::new(
            ClusterSettings {
                node: "node-a".into(),
                advertise: "node-a:1".into(),
                lease_ttl: Duration::from_secs(2),
                peer_tls: None,
            },
            String::new(),
            Duration::from_secs(300),
            Duration::from_secs(5),
            Fence::after(Nanos::ZERO, Duration::from_secs(5)),
        );
        Arc::new(ClusterState::new(membership, Arc::new(checker), None))
    }

    /// A nonce in `slot` taken here for a check spanning several owners,
    /// held under a reservation until `expires`, as [`ClusterState::serve`]
    /// holds it; the reservation's id.
    fn reserve(state: &ClusterState, slot: Slot, expires: Instant) -> u64 {
        let engine = state.checker.engine();
        let now = state.checker.now();
        let nonce = Some((
            ReplayKey::placed(engine, (u64::from(slot) << 40) | 12345, 1),
            now.saturating_add(Nanos::from_secs(300)),
        ));
        let request = Request {
            nonce,
            limits: &[],
            cost: 1,
            commit: true,
        };
        assert!(matches!(
            engine.decide(now, &request),
            Outcome::Limited { allowed: true, .. }
        ));
        let id = u64::from(slot) + 1;
        state.reservations.lock().insert(
            id,
            Reservation {
                slots: [slot].into_iter().collect(),
                taken_at: now,
                nonce,
                limits: Vec::new(),
                cost: 1,
                expires,
            },
        );
        id
    }

    /// What leaves with `slot` once nothing holds it any more.
    async fn hand_over(state: &Arc<ClusterState>, slot: Slot) -> Vec<Entry> {
        state.reservations_released(|s| s == slot).await;
        state
            .checker
            .engine()
            .take_slots(|s| s == slot, state.checker.now())
    }

    /// Node A back among B and C, on a lease: it owns its slots but serves
    /// none of them before B and C have handed their state over
    /// ([`handovers_arrive`]).
    fn awaiting_handovers() -> Arc<ClusterState> {
        use crate::cluster::membership::tests::{THREE, view};
        let state = state();
        state
            .membership
            .update_table(&view(3, &THREE), true, Vec::new());
        state.membership.vouched(Instant::now());
        state
    }

    fn handovers_arrive(state: &ClusterState) {
        state.membership.handed_over("node-b", 3);
        state.membership.handed_over("node-c", 3);
    }

    /// Node A, settled among B and C (both handed over), its clock at the
    /// real time (takeover fences are reckoned from it), then B gone: a
    /// slot A took from B, behind the takeover fence (its last fenced
    /// second), and one it kept.
    struct TookOverFromB {
        state: Arc<ClusterState>,
        clock: Arc<FakeClock>,
        taken: Slot,
        fence: i64,
        kept: Slot,
    }

    fn took_over_from_b() -> TookOverFromB {
        use crate::cluster::membership::tests::{THREE, view};
        let clock = Arc::new(FakeClock::new(Nanos::from_secs(
            crate::engine::clock::unix_secs(),
        )));
        let state = state_on(clock.clone());
        let members = &state.membership;
        members.update_table(&view(3, &THREE), true, Vec::new());
        handovers_arrive(&state);
        let settled = members.table();
        members.update_table(&view(4, &[("node-a", 1), ("node-c", 1)]), false, Vec::new());
        members.vouched(Instant::now());
        let table = members.table();
        let taken = (0..=Slot::MAX)
            .find(|&s| table.is_mine(s) && !settled.owns(s))
            .expect("A took some of B's slots");
        let kept = (0..=Slot::MAX)
            .find(|&s| table.is_mine(s) && settled.owns(s))
            .expect("A kept its own");
        let [(fence, _)] = table.fences_on([taken, kept])[..] else {
            panic!("one fence, on the taken slot only");
        };
        TookOverFromB {
            state,
            clock,
            taken,
            fence: i64::from(fence),
            kept,
        }
    }

    /// A nonce in `slot`.
    fn nonce_in(slot: Slot) -> u64 {
        (u64::from(slot) << 40) | 12345
    }

    /// A step deciding only the nonce `id`, signed at `timestamp`.
    fn nonce_step(id: u64, timestamp: i64) -> StateStep {
        StateStep {
            nonce: Some(StateNonce {
                id,
                forget_at_ns: u64::MAX,
                extra: 1,
            }),
            commit: true,
            timestamp,
            ..Default::default()
        }
    }

    /// Failure budgets (of sources by address) in the slots node A owns.
    fn own_failure_budgets(state: &ClusterState) -> impl Iterator<Item = StateKey> + '_ {
        let table = state.membership.table();
        let engine = state.checker.engine();
        (0u32..)
            .map(|i| engine.key_in(Pool::FAILURES, &i.to_be_bytes(), &[b"failures:address"]))
            .filter(move |k| table.owns(k.slot()))
    }

    /// A budget that one failure spends.
    fn one_failure() -> Limit {
        Limit::Gcra(Gcra::new(1, Nanos::from_secs(3600), 1))
    }

    /// Whether the budget `key` ([`one_failure`]) is spent here: a look,
    /// which takes nothing.
    fn spent(state: &ClusterState, key: StateKey) -> bool {
        let look = Request {
            nonce: None,
            limits: &[(key, one_failure())],
            cost: 1,
            commit: false,
        };
        let now = state.checker.now();
        matches!(
            state.checker.engine().decide(now, &look),
            Outcome::Limited { allowed: false, .. }
        )
    }

    /// A failure charged to an owner that is still being handed its
    /// slot's state (it answers "not mine", having taken nothing) is not
    /// lost: it follows the slot, and is counted once the owner serves it.
    /// A rebalance is no window for free guesses.
    #[tokio::test]
    async fn a_failure_charged_while_its_owner_awaits_the_handover_is_counted_once_it_serves() {
        let state = awaiting_handovers();
        let key = own_failure_budgets(&state).next().unwrap();
        assert!(
            !state.membership.table().is_mine(key.slot()),
            "awaiting its handover"
        );

        let charging = tokio::spawn({
            let state = state.clone();
            async move { state.send_charge(key, one_failure()).await }
        });
        tokio::time::sleep(REROUTE_PAUSE * 3).await;
        assert!(!charging.is_finished(), "the charge was given up");
        assert!(!spent(&state, key), "charged before the slot was served");

        handovers_arrive(&state);
        assert!(state.membership.table().is_mine(key.slot()));
        tokio::time::timeout(Duration::from_secs(1), charging)
            .await
            .expect("the charge follows the slot at once")
            .unwrap();
        assert!(spent(&state, key), "the failure was not counted");
    }

    /// Charges waiting for their owner are bounded when the owner is this
    /// node too: a flood of bad signatures while this node is not serving
    /// its own slots (awaiting a handover) holds at most
    /// [`MAX_FAILURE_CHARGES`], and they all land once it serves.
    #[tokio::test]
    async fn charges_waiting_for_this_node_to_serve_its_own_slots_stay_within_their_bound() {
        let state = awaiting_handovers();
        let keys: Vec<StateKey> = own_failure_budgets(&state)
            .take(MAX_FAILURE_CHARGES + 100)
            .collect();
        for &key in &keys {
            state.charge_failure(key, one_failure());
        }
        let room = state
            .failure_charges
            .lock()
            .get("node-a")
            .cloned()
            .expect("charges to this node are bounded");
        tokio::time::sleep(REROUTE_PAUSE * 2).await;
        assert_eq!(room.available_permits(), 0, "every room is taken");

        handovers_arrive(&state);
        let deadline = Instant::now() + Duration::from_secs(5);
        while room.available_permits() < MAX_FAILURE_CHARGES {
            assert!(Instant::now() < deadline, "charges still waiting");
            tokio::time::sleep(REROUTE_PAUSE).await;
        }
        let charged = keys.iter().filter(|&&key| spent(&state, key)).count();
        assert_eq!(
            charged, MAX_FAILURE_CHARGES,
            "those past the bound were dropped"
        );
    }

    /// A node that took a key over refuses what was signed up to its
    /// takeover fence, fresh requests from correct clocks included: they
    /// are told when the fence opens, to the nanosecond of this node's
    /// clock, and signed again then they pass. Once the fence has opened,
    /// a request signed before it is refused with nothing to wait for.
    #[test]
    fn a_step_refused_under_a_takeover_fence_is_told_when_the_fence_opens() {
        let TookOverFromB {
            state,
            clock,
            taken,
            fence,
            ..
        } = took_over_from_b();
        let now = state.checker.now();
        let signed_now = now.whole_secs() as i64;
        assert!(signed_now <= fence);
        let refused = state.serve(&nonce_step(nonce_in(taken), signed_now), Phase::Decide);
        assert_eq!(refused.outcome(), WireOutcome::Fenced);
        let opens = Nanos::from_secs((fence + 1) as u64);
        assert_eq!(refused.retry_after_ns, Some((opens - now).get()));

        clock.set(opens);
        let again = state.serve(&nonce_step(nonce_in(taken), fence + 1), Phase::Decide);
        assert_eq!(again.outcome(), WireOutcome::Limited);
        assert!(again.allowed);
        let late = state.serve(&nonce_step(nonce_in(taken) + 1, fence), Phase::Decide);
        assert_eq!(late.outcome(), WireOutcome::Fenced);
        assert_eq!(late.retry_after_ns, None);
    }

    /// An owner's own restart fence refuses a step the same way, with the
    /// same promise: a request signed before it is told when it opens.
    #[test]
    fn a_step_refused_under_the_owners_restart_fence_is_told_when_it_opens() {
        let TookOverFromB { state, kept, .. } = took_over_from_b();
        let now = state.checker.now();
        let restart = state.checker.freshness().fence();
        let refused = state.serve(
            &nonce_step(nonce_in(kept), now.whole_secs() as i64),
            Phase::Decide,
        );
        assert_eq!(refused.outcome(), WireOutcome::Fenced);
        assert_eq!(
            refused.retry_after_ns,
            Some((restart.opens_at() - now).get())
        );
        assert!(refused.retry_after_ns.is_some_and(|ns| ns > 0));
    }

    #[tokio::test]
    async fn a_slot_moves_only_once_the_checks_holding_it_are_settled_so_a_refusal_takes_nothing() {
        let state = state();
        let held = reserve(&state, 7, Instant::now() + RESERVATION_TIMEOUT);
        let moving = tokio::spawn({
            let state = state.clone();
            async move { hand_over(&state, 7).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!moving.is_finished(), "handed over while a check held it");
        // The check is refused elsewhere: its part here is given back.
        assert!(state.settle(held, false));
        let handed = moving.await.unwrap();
        assert!(
            handed.is_empty(),
            "the next owner got the nonce of a request never allowed: {handed:?}"
        );
    }

    #[tokio::test]
    async fn a_reservation_nobody_settles_holds_its_slot_until_its_timeout_and_only_its_own() {
        let state = state();
        let started = Instant::now();
        reserve(&state, 7, started + Duration::from_millis(200));
        let elsewhere = reserve(&state, 8, started + RESERVATION_TIMEOUT);
        let handed = hand_over(&state, 7).await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < RESERVATION_TIMEOUT,
            "waited {waited:?}"
        );
        assert!(handed.is_empty(), "{handed:?}");
        // The other slot's reservation still holds its own part.
        assert!(state.settle(elsewhere, true));
        assert_eq!(
            state
                .checker
                .engine()
                .take_slots(|s| s == 8, state.checker.now())
                .len(),
            1
        );
    }
}
