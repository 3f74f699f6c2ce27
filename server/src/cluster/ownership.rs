//! Who owns a piece of state: rendezvous (highest-random-weight) hashing
//! over the live members. Every node computes the same owner from the same
//! membership, with no table to agree on; when a member leaves, only the
//! state it owned moves, and spreads over the others.
//!
//! The weight is SHA-256 over the node name and the state's owner (a key id,
//! or a policy and descriptor): fixed, so all nodes agree, and not steerable
//! into one node by a client choosing descriptors.

use sha2::{Digest, Sha256};

fn weight(node: &str, owner: &[u8]) -> u64 {
    let mut h = Sha256::new();
    h.update((node.len() as u64).to_le_bytes());
    h.update(node.as_bytes());
    h.update(owner);
    let digest = h.finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// The node owning `owner` among `nodes` (ties, which SHA-256 makes
/// theoretical, go to the smaller name). `None` without nodes.
pub fn owner<'a>(nodes: impl IntoIterator<Item = &'a str>, owner: &[u8]) -> Option<&'a str> {
    nodes
        .into_iter()
        .map(|node| (weight(node, owner), std::cmp::Reverse(node), node))
        .max()
        .map(|(_, _, node)| node)
}

/// The owner of an API key's state: its policies, nonces and failure budget.
pub fn key_owner<'a>(nodes: impl IntoIterator<Item = &'a str>, key_id: &str) -> Option<&'a str> {
    owner(nodes, &[b"key\0".as_slice(), key_id.as_bytes()].concat())
}

/// The owner of a request limit's state: its (policy, descriptor).
pub fn limit_owner<'a>(
    nodes: impl IntoIterator<Item = &'a str>,
    policy: &str,
    descriptor: &str,
) -> Option<&'a str> {
    let mut id = b"limit\0".to_vec();
    id.extend((policy.len() as u64).to_le_bytes());
    id.extend(policy.as_bytes());
    id.extend(descriptor.as_bytes());
    owner(nodes, &id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

    #[test]
    fn every_node_computes_the_same_owner_whatever_the_order() {
        for i in 0..200 {
            let id = format!("wk_{i}");
            let forward = key_owner(NODES, &id);
            let backward = key_owner(NODES.iter().rev().copied(), &id);
            assert_eq!(forward, backward);
            assert!(forward.is_some());
        }
        assert_eq!(key_owner([], "k"), None);
    }

    #[test]
    fn keys_spread_over_the_members() {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for i in 0..3000 {
            *counts
                .entry(key_owner(NODES, &format!("wk_{i}")).unwrap())
                .or_default() += 1;
        }
        for node in NODES {
            let n = counts[node];
            assert!((800..1200).contains(&n), "{node} owns {n} of 3000");
        }
    }

    #[test]
    fn when_a_member_leaves_only_its_keys_move() {
        for i in 0..1000 {
            let id = format!("wk_{i}");
            let before = key_owner(NODES, &id).unwrap();
            let after = key_owner(["node-a", "node-b"], &id).unwrap();
            if before != "node-c" {
                assert_eq!(before, after, "{id} moved although its owner stayed");
            }
        }
    }

    #[test]
    fn key_and_limit_owners_are_computed_apart() {
        // The same text as a key id and as a descriptor is two owners' business.
        let moved = (0..200)
            .filter(|i| {
                let text = format!("x{i}");
                key_owner(NODES, &text) != limit_owner(NODES, "per-ip", &text)
            })
            .count();
        assert!(moved > 50);
    }
}
