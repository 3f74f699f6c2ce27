//! Who owns a piece of state: rendezvous (highest-random-weight) hashing of
//! its [`Slot`] over the live members. Every node computes the same owner
//! from the same membership, with no table to agree on; when a member
//! leaves, only the slots it owned move, and spread over the others.
//!
//! State is owned by slot, not by key id: a slot is part of every state id
//! (see [`crate::engine`]), so a node can tell the owner of any entry it
//! holds. The weight is SipHash-1-3 under a fixed, public key over the node
//! name and the slot: all nodes agree, and the keyed state hash keeps
//! clients from steering their descriptors into one slot.
//!
//! A [`SlotTable`] also says, for every slot this node took over, how it
//! took it over: from a previous owner that is still alive, it waits for
//! that owner to hand the slot's state over (the owner stops answering for
//! it first) and does not answer for it until then; from one that left on
//! SIGTERM having handed everything over, it just serves; from one that
//! died (or when it cannot know who owned the slot meanwhile), it puts a
//! takeover fence on the slot: requests signed before it are refused,
//! because the previous owner may have accepted them (DESIGN.md,
//! Scale-out).

use std::collections::HashMap;
use std::hash::Hasher;
use std::time::Instant;

use siphasher::sip::SipHasher13;

use crate::engine::{SLOTS, Slot};
use crate::freshness::Fence;

const WEIGHT_KEY: &[u8; 16] = b"warden-slots-v1\0";

/// Hashing of one node's name, kept to weigh all slots against it.
fn node_hasher(node: &str) -> SipHasher13 {
    let mut h = SipHasher13::new_with_key(WEIGHT_KEY);
    h.write_u64(node.len() as u64);
    h.write(node.as_bytes());
    h
}

fn weight(node: &SipHasher13, slot: Slot) -> u64 {
    let mut h = *node;
    h.write_u16(slot);
    h.finish()
}

/// Which of `hashers` (nodes in name order) owns `slot`: the heaviest,
/// the earlier (smaller name) on a tie, which the hash makes theoretical.
fn heaviest(hashers: &[SipHasher13], slot: Slot) -> usize {
    let mut best = 0;
    let mut best_weight = weight(&hashers[0], slot);
    for (i, h) in hashers.iter().enumerate().skip(1) {
        let w = weight(h, slot);
        if w > best_weight {
            best = i;
            best_weight = w;
        }
    }
    best
}

/// Raises `slot`'s fence in `fences` to `secs` (never lowers it).
fn raise_fence(fences: &mut [u32], slot: Slot, secs: u32) {
    let f = &mut fences[usize::from(slot)];
    *f = (*f).max(secs);
}

/// One member as a table knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// Where peers reach it.
    pub address: String,
    /// When this incarnation joined (Unix ms): a restarted node is a new
    /// one, even under the same name.
    pub joined_at_ms: i64,
}

/// The owner of every slot under one membership version, and how this
/// node took over the slots it owns.
#[derive(Debug, Clone)]
pub struct SlotTable {
    pub version: u64,
    /// Members, by name.
    pub nodes: Vec<Node>,
    /// Index into `nodes` for each slot.
    owners: Vec<u16>,
    /// Which index is this node (`None` if it is not a member).
    me: Option<u16>,
    /// Per slot: Unix seconds; requests signed at or before it are refused
    /// here (0: no fence).
    fences: Vec<u32>,
    /// On joining: the members that have not yet handed over what they
    /// hold of this node's slots, with those slots.
    awaiting: Vec<(String, Vec<Slot>)>,
    /// Per slot: how many members it still waits for (0: answered for).
    blocked: Vec<u8>,
    /// Since when, for giving up on a member that never sends.
    pub awaiting_since: Option<Instant>,
}

/// How this node takes over the slots that become its own in a new table.
#[derive(Debug, Clone, Copy)]
pub struct Takeover<'a> {
    /// Unix seconds of the fence for slots whose previous owner died.
    pub fence_secs: u32,
    /// The previous owners are unknown (this node lost its lease, or
    /// membership versions were skipped): fence everything taken over.
    pub unknown: bool,
    /// Nodes that have handed over what they held of this node's slots:
    /// `u64::MAX` for nodes that left the cluster, another value for a
    /// handover to this node on its joining.
    pub handed: &'a HashMap<String, u64>,
}

impl SlotTable {
    /// A table with no members: nobody owns anything.
    pub fn empty() -> Self {
        Self {
            version: 0,
            nodes: Vec::new(),
            owners: Vec::new(),
            me: None,
            fences: vec![0; SLOTS],
            awaiting: Vec::new(),
            blocked: vec![0; SLOTS],
            awaiting_since: None,
        }
    }

    /// The table for `nodes` at `version`, as seen by `me`, following
    /// `before`. With rendezvous hashing a join moves slots only to the
    /// joiner and a departure only from the one leaving, so:
    ///
    /// - on this node's first table with other members, it owns slots they
    ///   served until now: it waits for each of them to hand over what it
    ///   holds of them, and answers for none until then;
    /// - slots that become its own later were the departed node's: served
    ///   at once if it handed everything over on its way out (SIGTERM),
    ///   else behind a takeover fence at `fence_secs` (it died);
    /// - with `takeover.unknown`, everything newly its own is fenced (on a
    ///   first table too: a predecessor under this node's name may have
    ///   answered for those slots after this process started).
    pub fn build(
        version: u64,
        mut nodes: Vec<Node>,
        me: &str,
        before: &SlotTable,
        takeover: Takeover<'_>,
    ) -> Self {
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        nodes.dedup_by(|a, b| a.name == b.name);
        let hashers: Vec<SipHasher13> = nodes.iter().map(|n| node_hasher(&n.name)).collect();
        let me_index = nodes.iter().position(|n| n.name == me).map(|i| i as u16);
        let first = before.nodes.is_empty();
        let count = if nodes.is_empty() { 0 } else { SLOTS };
        let mut owners = Vec::with_capacity(count);
        let mut fences = before.fences.clone();
        let mut blocked = if first {
            vec![0; SLOTS]
        } else {
            before.blocked.clone()
        };
        // Who this node waits for on joining: every other member it has not
        // heard from yet.
        let waits_for: Vec<&str> = if first {
            nodes
                .iter()
                .map(|n| n.name.as_str())
                .filter(|n| *n != me && !takeover.handed.contains_key(*n))
                .collect()
        } else {
            Vec::new()
        };
        let mut mine = Vec::new();
        for slot in 0..count {
            let slot = slot as Slot;
            let best = heaviest(&hashers, slot);
            owners.push(best as u16);
            if Some(best as u16) != me_index {
                blocked[usize::from(slot)] = 0;
                continue;
            }
            if first {
                mine.push(slot);
                blocked[usize::from(slot)] = waits_for.len() as u8;
                if takeover.unknown {
                    raise_fence(&mut fences, slot, takeover.fence_secs);
                }
                continue;
            }
            let previous = before.owner_name(slot);
            let taken_over = takeover.unknown || previous != Some(me);
            let handed = previous.is_some_and(|p| takeover.handed.get(p) == Some(&u64::MAX));
            if taken_over && (takeover.unknown || !handed) {
                raise_fence(&mut fences, slot, takeover.fence_secs);
            }
        }
        let awaiting: Vec<(String, Vec<Slot>)> = if first {
            waits_for
                .iter()
                .map(|n| ((*n).to_owned(), mine.clone()))
                .collect()
        } else {
            before.awaiting.clone()
        };
        let awaiting_since = if awaiting.is_empty() {
            None
        } else {
            Some(before.awaiting_since.unwrap_or_else(Instant::now))
        };
        let mut table = Self {
            version,
            nodes,
            owners,
            me: me_index,
            fences,
            awaiting,
            blocked,
            awaiting_since,
        };
        // Slots awaited from members that are gone: fenced, not awaited.
        let gone: Vec<String> = table
            .awaited()
            .filter(|n| !table.nodes.iter().any(|m| m.name == *n))
            .map(str::to_owned)
            .collect();
        for n in gone {
            table.stop_awaiting(&n, Some(takeover.fence_secs));
        }
        table
    }

    /// Stops waiting for `from`: it handed over what it held. `fence`:
    /// give up on it instead (it never sent), fencing its slots at
    /// `fence_secs`.
    pub fn handed_over(&self, from: &str, fence: Option<u32>) -> Option<Self> {
        let mut t = self.clone();
        t.stop_awaiting(from, fence).then_some(t)
    }

    /// [`Self::handed_over`] in place; whether `from` was awaited.
    pub fn stop_awaiting(&mut self, from: &str, fence: Option<u32>) -> bool {
        let Some(at) = self.awaiting.iter().position(|(n, _)| n == from) else {
            return false;
        };
        let (_, slots) = self.awaiting.swap_remove(at);
        for slot in slots {
            let b = &mut self.blocked[usize::from(slot)];
            *b = b.saturating_sub(1);
            if let Some(secs) = fence {
                raise_fence(&mut self.fences, slot, secs);
            }
        }
        if self.awaiting.is_empty() {
            self.awaiting_since = None;
        }
        true
    }

    /// The members this node still waits for.
    pub fn awaited(&self) -> impl Iterator<Item = &str> {
        self.awaited_slots().map(|(n, _)| n)
    }

    /// The members this node still waits for, each with how many of this
    /// node's slots it holds.
    pub fn awaited_slots(&self) -> impl Iterator<Item = (&str, usize)> {
        self.awaiting.iter().map(|(n, s)| (n.as_str(), s.len()))
    }

    /// The members this node still waits for to hand `slot` over (none
    /// for a slot it does not own).
    pub fn awaited_for(&self, slot: Slot) -> impl Iterator<Item = &str> {
        self.awaiting
            .iter()
            .filter(move |(_, slots)| slots.contains(&slot))
            .map(|(n, _)| n.as_str())
    }

    /// Whether this node answers for every slot it owns for requests
    /// signed at `now_secs`: no slot waits for a handover, and no fence
    /// on them is still closed. Until then it is not ready.
    pub fn answers_all_it_owns(&self, now_secs: u64) -> bool {
        self.awaiting.is_empty() && now_secs > u64::from(self.highest_fence())
    }

    /// Members of this table that are new since `before` (joined, or
    /// restarted under the same name), other than `me`.
    pub fn joined_since<'a>(&'a self, before: &'a SlotTable) -> impl Iterator<Item = &'a Node> {
        self.nodes.iter().filter(move |n| {
            Some(n.name.as_str()) != self.me.map(|i| self.nodes[usize::from(i)].name.as_str())
                && !before
                    .nodes
                    .iter()
                    .any(|b| b.name == n.name && b.joined_at_ms == n.joined_at_ms)
        })
    }

    fn owner_index(&self, slot: Slot) -> Option<u16> {
        self.owners.get(usize::from(slot)).copied()
    }

    /// The member owning `slot`.
    pub fn owner_node(&self, slot: Slot) -> Option<&Node> {
        self.owner_index(slot).map(|i| &self.nodes[usize::from(i)])
    }

    /// The name of the node owning `slot`.
    pub fn owner_name(&self, slot: Slot) -> Option<&str> {
        self.owner_node(slot).map(|n| n.name.as_str())
    }

    /// The owner of `slot`: its index (for grouping) and address.
    pub fn owner(&self, slot: Slot) -> Option<(u16, &str)> {
        self.owner_index(slot)
            .map(|i| (i, self.nodes[usize::from(i)].address.as_str()))
    }

    /// Whether this node answers for `slot` now: it owns it and is not
    /// waiting for its state.
    pub fn is_mine(&self, slot: Slot) -> bool {
        self.owns(slot) && self.blocked[usize::from(slot)] == 0
    }

    /// Whether this node owns `slot` under this membership (answering for
    /// it or not yet).
    pub fn owns(&self, slot: Slot) -> bool {
        self.me.is_some() && self.owner_index(slot) == self.me
    }

    pub fn me(&self) -> Option<u16> {
        self.me
    }

    /// Whether a request signed at `timestamp` falls under the takeover
    /// fence of `slot`.
    pub fn fenced(&self, slot: Slot, timestamp: i64) -> bool {
        let fence = self.fences[usize::from(slot)];
        fence != 0 && timestamp <= i64::from(fence)
    }

    /// The takeover fence a request signed at `timestamp` falls under, of
    /// those on `slots`: the one that opens last.
    pub fn fence_over(&self, slots: &[Slot], timestamp: i64) -> Option<Fence> {
        slots
            .iter()
            .filter(|&&slot| self.fenced(slot, timestamp))
            .map(|&slot| Fence::at(i64::from(self.fences[usize::from(slot)]) + 1))
            .max()
    }

    /// The highest takeover fence on a slot this node owns (Unix seconds,
    /// 0 without any): requests signed up to it are refused for some slots.
    pub fn highest_fence(&self) -> u32 {
        (0..self.owners.len())
            .filter(|&s| self.owns(s as Slot))
            .map(|s| self.fences[s])
            .max()
            .unwrap_or(0)
    }

    /// The fences on `slots`, grouped by fence (Unix seconds): what the
    /// next owner of those slots must refuse too.
    pub fn fences_on(&self, slots: impl IntoIterator<Item = Slot>) -> Vec<(u32, Vec<Slot>)> {
        let mut by_fence: std::collections::BTreeMap<u32, Vec<Slot>> = Default::default();
        for slot in slots {
            let fence = self.fences[usize::from(slot)];
            if fence != 0 {
                by_fence.entry(fence).or_default().push(slot);
            }
        }
        by_fence.into_iter().collect()
    }

    /// Raises the fence of each of `slots` to `secs` (never lowers one).
    pub fn raise_fences(&mut self, secs: u32, slots: impl IntoIterator<Item = Slot>) {
        for slot in slots {
            raise_fence(&mut self.fences, slot, secs);
        }
    }

    /// Whether any fence is below `secs` (and so could be forgotten).
    pub fn fences_before(&self, secs: u32) -> bool {
        self.fences.iter().any(|&f| f != 0 && f < secs)
    }

    /// Drops fences that no fresh request can fall under any more.
    pub fn forget_fences_before(&mut self, secs: u32) {
        for f in &mut self.fences {
            if *f != 0 && *f < secs {
                *f = 0;
            }
        }
    }

    /// How many of `slots` each member owns, by name.
    pub fn count_owned(&self, slots: impl IntoIterator<Item = Slot>) -> Vec<(String, u64)> {
        let mut counts = vec![0u64; self.nodes.len()];
        for slot in slots {
            if let Some(i) = self.owner_index(slot) {
                counts[usize::from(i)] += 1;
            }
        }
        self.nodes
            .iter()
            .map(|n| n.name.clone())
            .zip(counts)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model to check tables against, written apart from them: the node
    /// owning `slot` among `nodes`, the smaller name on a tie.
    fn owner<'a>(nodes: impl IntoIterator<Item = &'a str>, slot: Slot) -> Option<&'a str> {
        nodes
            .into_iter()
            .map(|node| {
                (
                    weight(&node_hasher(node), slot),
                    std::cmp::Reverse(node),
                    node,
                )
            })
            .max()
            .map(|(_, _, node)| node)
    }

    fn members(names: &[&str]) -> Vec<Node> {
        names
            .iter()
            .map(|n| Node {
                name: n.to_string(),
                address: format!("{n}:1"),
                joined_at_ms: 1,
            })
            .collect()
    }

    const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

    fn takeover(fence_secs: u32, unknown: bool, handed: &HashMap<String, u64>) -> Takeover<'_> {
        Takeover {
            fence_secs,
            unknown,
            handed,
        }
    }

    fn table(version: u64, names: &[&str], me: &str, before: &SlotTable, fence: u32) -> SlotTable {
        SlotTable::build(
            version,
            members(names),
            me,
            before,
            takeover(fence, false, &HashMap::new()),
        )
    }

    /// A's table with all three, after B and C handed over to it.
    fn settled(me: &str) -> SlotTable {
        let mut t = table(3, &NODES, me, &SlotTable::empty(), 0);
        for n in NODES.iter().filter(|n| **n != me) {
            t = t.handed_over(n, None).unwrap();
        }
        t
    }

    #[test]
    fn every_node_computes_the_same_owner_whatever_the_order() {
        let forward = table(1, &NODES, "node-a", &SlotTable::empty(), 0);
        let mut reversed = NODES;
        reversed.reverse();
        let backward = table(1, &reversed, "node-c", &SlotTable::empty(), 0);
        for slot in 0..=Slot::MAX {
            assert_eq!(forward.owner_name(slot), backward.owner_name(slot));
            assert_eq!(forward.owner_name(slot), owner(NODES, slot));
        }
        assert_eq!(owner([], 7), None);
    }

    #[test]
    fn slots_spread_over_the_members() {
        let t = table(1, &NODES, "node-a", &SlotTable::empty(), 0);
        for (node, n) in t.count_owned(0..=Slot::MAX) {
            assert!((20_000..23_700).contains(&n), "{node} owns {n} of 65536");
        }
    }

    #[test]
    fn slots_of_a_member_that_died_move_alone_and_are_fenced() {
        let three = settled("node-a");
        let two = table(4, &NODES[..2], "node-a", &three, 1000);
        for slot in 0..=Slot::MAX {
            let before = three.owner_name(slot).unwrap();
            let after = two.owner_name(slot).unwrap();
            if before != "node-c" {
                assert_eq!(before, after, "slot {slot} moved although its owner stayed");
            }
            let taken_over = before == "node-c" && after == "node-a";
            assert_eq!(two.fenced(slot, 1000), taken_over, "slot {slot}");
            assert!(!two.fenced(slot, 1001));
            assert_eq!(two.is_mine(slot), after == "node-a");
        }
    }

    #[test]
    fn a_member_that_left_having_handed_over_leaves_no_fence() {
        let three = settled("node-a");
        let handed = HashMap::from([("node-c".to_owned(), u64::MAX)]);
        let two = SlotTable::build(
            4,
            members(&NODES[..2]),
            "node-a",
            &three,
            takeover(1000, false, &handed),
        );
        assert!((0..=Slot::MAX).all(|s| !two.fenced(s, 1)));
        assert!((0..=Slot::MAX).all(|s| two.is_mine(s) == (two.owner_name(s) == Some("node-a"))));
    }

    #[test]
    fn a_joining_node_waits_for_every_member_then_serves_unfenced() {
        let joined = table(3, &NODES, "node-b", &SlotTable::empty(), 1000);
        let owned: Vec<Slot> = (0..=Slot::MAX).filter(|&s| joined.owns(s)).collect();
        assert!(!owned.is_empty());
        assert!(
            owned
                .iter()
                .all(|&s| !joined.is_mine(s) && !joined.fenced(s, 1000))
        );
        let mut awaited: Vec<(&str, usize)> = joined.awaited_slots().collect();
        awaited.sort();
        assert_eq!(awaited, [("node-a", owned.len()), ("node-c", owned.len())]);
        assert!(
            !joined.answers_all_it_owns(1001),
            "not ready while awaiting"
        );
        let half = joined.handed_over("node-a", None).unwrap();
        assert!(
            owned.iter().all(|&s| !half.is_mine(s)),
            "one of two is not enough"
        );
        assert!(!half.answers_all_it_owns(1001));
        let served = half.handed_over("node-c", None).unwrap();
        assert!(
            owned
                .iter()
                .all(|&s| served.is_mine(s) && !served.fenced(s, 1000))
        );
        assert!(served.answers_all_it_owns(1001));
        // Given up on: served, but fenced.
        let fenced = half.handed_over("node-c", Some(1000)).unwrap();
        assert!(
            owned
                .iter()
                .all(|&s| fenced.is_mine(s) && fenced.fenced(s, 1000))
        );
        assert!(
            !fenced.answers_all_it_owns(1000),
            "not ready behind the fence"
        );
        assert!(fenced.answers_all_it_owns(1001));
        // A member that handed over before the table was built is not awaited.
        let early = HashMap::from([("node-a".to_owned(), 3)]);
        let t = SlotTable::build(
            3,
            members(&NODES),
            "node-b",
            &SlotTable::empty(),
            takeover(0, false, &early),
        );
        assert_eq!(t.awaited().collect::<Vec<_>>(), ["node-c"]);
        // The members see the joiner as new, and only it.
        let old = settled("node-a");
        let before = table(2, &["node-a", "node-c"], "node-a", &old, 0);
        let after = table(3, &NODES, "node-a", &before, 0);
        assert_eq!(
            after
                .joined_since(&before)
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>(),
            ["node-b"]
        );
        assert!(owned.iter().all(|&s| !after.owns(s)));
    }

    #[test]
    fn a_restarted_node_is_new_to_the_others() {
        let before = settled("node-a");
        let mut again = members(&NODES);
        again[2].joined_at_ms = 2;
        let after = SlotTable::build(
            5,
            again,
            "node-a",
            &before,
            takeover(0, false, &HashMap::new()),
        );
        assert_eq!(
            after
                .joined_since(&before)
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>(),
            ["node-c"]
        );
    }

    #[test]
    fn a_node_that_lost_its_lease_fences_everything_it_owns() {
        let t1 = settled("node-a");
        let t3 = SlotTable::build(
            5,
            members(&NODES),
            "node-a",
            &t1,
            takeover(500, true, &HashMap::new()),
        );
        for slot in 0..=Slot::MAX {
            assert_eq!(t3.fenced(slot, 500), t3.owns(slot));
        }
        let mut t = t3.clone();
        t.forget_fences_before(501);
        assert!((0..=Slot::MAX).all(|s| !t.fenced(s, 0)));
    }

    /// A request under several takeover fences waits for the one that
    /// opens last; a fence it was signed after holds it no more.
    #[test]
    fn a_request_under_several_fences_waits_for_the_last_to_open() {
        let mut t = SlotTable::empty();
        t.raise_fences(700, [1]);
        t.raise_fences(900, [2]);
        assert_eq!(t.fence_over(&[0, 1, 2], 700), Some(Fence::at(901)));
        assert_eq!(t.fence_over(&[0, 1], 700), Some(Fence::at(701)));
        assert_eq!(t.fence_over(&[1, 2], 800), Some(Fence::at(901)));
        assert_eq!(t.fence_over(&[1, 2], 901), None);
        assert_eq!(t.fence_over(&[0], 1), None);
    }

    /// What a new owner must refuse travels with the slots: the fences
    /// come out grouped by time, and raising them never lowers one.
    #[test]
    fn fences_handed_over_are_raised_never_lowered() {
        let mut sender = SlotTable::empty();
        sender.raise_fences(700, [1, 2]);
        sender.raise_fences(900, [3]);
        assert_eq!(
            sender.fences_on([0, 1, 2, 3]),
            vec![(700, vec![1, 2]), (900, vec![3])]
        );
        let mut receiver = SlotTable::empty();
        receiver.raise_fences(800, [1, 3]);
        for (secs, slots) in sender.fences_on([1, 2, 3]) {
            receiver.raise_fences(secs, slots);
        }
        assert!(receiver.fenced(1, 800) && !receiver.fenced(1, 801));
        assert!(receiver.fenced(2, 700) && !receiver.fenced(2, 701));
        assert!(receiver.fenced(3, 900) && !receiver.fenced(3, 901));
        assert!(!receiver.fenced(0, 1));
    }
}
