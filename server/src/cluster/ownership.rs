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
//! A [`SlotTable`] also carries the takeover fence of every slot this node
//! took over: requests signed before it are refused, because the slot's
//! previous owner may have accepted them (DESIGN.md, Scale-out).

use std::hash::Hasher;

use siphasher::sip::SipHasher13;

use crate::engine::{SLOTS, Slot};

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

/// The node owning `slot` among `nodes` (ties, which the hash makes
/// theoretical, go to the smaller name). `None` without nodes.
pub fn owner<'a>(nodes: impl IntoIterator<Item = &'a str>, slot: Slot) -> Option<&'a str> {
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

/// The owner of every slot under one membership version, and this node's
/// takeover fences.
#[derive(Debug, Clone)]
pub struct SlotTable {
    pub version: u64,
    /// Members by name, with the address peers reach them on.
    pub nodes: Vec<(String, String)>,
    /// Index into `nodes` for each slot.
    owners: Vec<u16>,
    /// Which index is this node (`None` if it is not a member).
    me: Option<u16>,
    /// Per slot: Unix seconds; requests signed at or before it are refused
    /// here (0: no fence).
    fences: Vec<u32>,
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
        }
    }

    /// The table for `nodes` (name, address) at `version`, as seen by `me`.
    /// Slots that this node owns now but did not own in `before` get a
    /// fence at `fence_secs` (and keep any older fence that is higher).
    /// With `all_new`, every slot this node owns is treated as taken over:
    /// when it cannot know who owned them meanwhile (it lost its lease, or
    /// versions were skipped).
    pub fn build(
        version: u64,
        mut nodes: Vec<(String, String)>,
        me: &str,
        before: &SlotTable,
        all_new: bool,
        fence_secs: u32,
    ) -> Self {
        nodes.sort();
        nodes.dedup_by(|a, b| a.0 == b.0);
        let hashers: Vec<SipHasher13> = nodes.iter().map(|(n, _)| node_hasher(n)).collect();
        let me_index = nodes.iter().position(|(n, _)| n == me).map(|i| i as u16);
        let mut owners = Vec::with_capacity(if nodes.is_empty() { 0 } else { SLOTS });
        let mut fences = before.fences.clone();
        if !nodes.is_empty() {
            for slot in 0..SLOTS {
                let slot = slot as Slot;
                // max by weight; on a tie the earlier (smaller) name wins.
                let mut best = 0usize;
                let mut best_weight = weight(&hashers[0], slot);
                for (i, h) in hashers.iter().enumerate().skip(1) {
                    let w = weight(h, slot);
                    if w > best_weight {
                        best = i;
                        best_weight = w;
                    }
                }
                owners.push(best as u16);
                let mine = Some(best as u16) == me_index;
                if mine && (all_new || before.owner_name(slot) != Some(me)) {
                    let f = &mut fences[usize::from(slot)];
                    *f = (*f).max(fence_secs);
                }
            }
        }
        Self {
            version,
            nodes,
            owners,
            me: me_index,
            fences,
        }
    }

    fn owner_index(&self, slot: Slot) -> Option<u16> {
        self.owners.get(usize::from(slot)).copied()
    }

    /// The name of the node owning `slot`.
    pub fn owner_name(&self, slot: Slot) -> Option<&str> {
        self.owner_index(slot)
            .map(|i| self.nodes[usize::from(i)].0.as_str())
    }

    /// The owner of `slot`: its index (for grouping) and address.
    pub fn owner(&self, slot: Slot) -> Option<(u16, &str)> {
        self.owner_index(slot)
            .map(|i| (i, self.nodes[usize::from(i)].1.as_str()))
    }

    pub fn is_mine(&self, slot: Slot) -> bool {
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

    /// The highest takeover fence on a slot this node owns (Unix seconds,
    /// 0 without any): requests signed up to it are refused for some slots.
    pub fn highest_fence(&self) -> u32 {
        (0..self.owners.len())
            .filter(|&s| self.is_mine(s as Slot))
            .map(|s| self.fences[s])
            .max()
            .unwrap_or(0)
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
            .map(|(n, _)| n.clone())
            .zip(counts)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(names: &[&str]) -> Vec<(String, String)> {
        names
            .iter()
            .map(|n| (n.to_string(), format!("{n}:1")))
            .collect()
    }

    const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

    #[test]
    fn every_node_computes_the_same_owner_whatever_the_order() {
        let forward = SlotTable::build(1, members(&NODES), "node-a", &SlotTable::empty(), false, 0);
        let mut reversed = NODES;
        reversed.reverse();
        let backward = SlotTable::build(
            1,
            members(&reversed),
            "node-c",
            &SlotTable::empty(),
            false,
            0,
        );
        for slot in 0..=Slot::MAX {
            assert_eq!(forward.owner_name(slot), backward.owner_name(slot));
            assert_eq!(forward.owner_name(slot), owner(NODES, slot));
        }
        assert_eq!(owner([], 7), None);
    }

    #[test]
    fn slots_spread_over_the_members() {
        let t = SlotTable::build(1, members(&NODES), "node-a", &SlotTable::empty(), false, 0);
        for (node, n) in t.count_owned(0..=Slot::MAX) {
            assert!((20_000..23_700).contains(&n), "{node} owns {n} of 65536");
        }
    }

    #[test]
    fn when_a_member_leaves_only_its_slots_move_and_only_they_are_fenced() {
        let three = SlotTable::build(1, members(&NODES), "node-a", &SlotTable::empty(), false, 0);
        let two = SlotTable::build(2, members(&NODES[..2]), "node-a", &three, false, 1000);
        for slot in 0..=Slot::MAX {
            let before = three.owner_name(slot).unwrap();
            let after = two.owner_name(slot).unwrap();
            if before != "node-c" {
                assert_eq!(before, after, "slot {slot} moved although its owner stayed");
            }
            let taken_over = before == "node-c" && after == "node-a";
            assert_eq!(two.fenced(slot, 1000), taken_over, "slot {slot}");
            assert!(!two.fenced(slot, 1001));
        }
    }

    #[test]
    fn a_node_that_lost_its_lease_fences_everything_it_owns() {
        let t1 = SlotTable::build(1, members(&NODES), "node-a", &SlotTable::empty(), false, 0);
        let t3 = SlotTable::build(3, members(&NODES), "node-a", &t1, true, 500);
        for slot in 0..=Slot::MAX {
            assert_eq!(t3.fenced(slot, 500), t3.is_mine(slot));
        }
        let mut t = t3.clone();
        t.forget_fences_before(501);
        assert!((0..=Slot::MAX).all(|s| !t.fenced(s, 0)));
    }
}
