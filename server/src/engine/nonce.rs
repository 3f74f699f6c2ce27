//! The memory of used nonces. A nonce is remembered until the moment its
//! request would be stale anyway (`timestamp + skew`); after that the
//! freshness check rejects a replay on its own, so the entry can go.

use std::collections::HashMap;

use super::StateKey;
use super::clock::Nanos;

/// One shard's remembered nonces: key → the time it may be forgotten.
/// Bounded: when full (after dropping expired entries) it refuses new
/// nonces instead of forgetting live ones, because forgetting a live nonce
/// would re-open a replay window.
#[derive(Debug)]
pub struct NonceSet {
    entries: HashMap<u128, Nanos>,
    capacity: usize,
}

/// What claiming a nonce would do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Unseen: the request may proceed and the nonce be stored.
    Fresh,
    /// Seen and still remembered: a replay.
    Seen,
    /// Unseen, but there is no room to remember it.
    Full,
}

impl NonceSet {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            capacity,
        }
    }

    /// Whether `key` could be claimed now, without storing it.
    pub fn probe(&mut self, key: StateKey, now: Nanos) -> Claim {
        match self.entries.get(&key.id) {
            Some(&forget_at) if forget_at > now => Claim::Seen,
            Some(_) => Claim::Fresh,
            None if self.entries.len() < self.capacity => Claim::Fresh,
            None => {
                self.sweep(now);
                if self.entries.len() < self.capacity {
                    Claim::Fresh
                } else {
                    Claim::Full
                }
            }
        }
    }

    /// Stores `key` until `forget_at`. Call only after [`Self::probe`]
    /// answered `Fresh` under the same lock.
    pub fn insert(&mut self, key: StateKey, forget_at: Nanos) {
        self.entries.insert(key.id, forget_at);
    }

    /// Drops every nonce that may be forgotten at `now`; returns how many.
    pub fn sweep(&mut self, now: Nanos) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, forget_at| *forget_at > now);
        shrink_if_sparse(&mut self.entries);
        before - self.entries.len()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Gives memory back after a burst, so memory follows the active keys.
pub(super) fn shrink_if_sparse<V>(map: &mut HashMap<u128, V>) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(id: u128) -> StateKey {
        StateKey { id, shard: 0 }
    }

    #[test]
    fn a_nonce_is_remembered_until_its_forget_time_and_not_after() {
        let mut set = NonceSet::new(10);
        assert_eq!(set.probe(key(1), 0), Claim::Fresh);
        set.insert(key(1), 100);
        assert_eq!(set.probe(key(1), 99), Claim::Seen);
        assert_eq!(set.probe(key(1), 100), Claim::Fresh);
        assert_eq!(set.sweep(100), 1);
        assert!(set.is_empty());
    }

    #[test]
    fn a_full_set_refuses_rather_than_forgetting_live_nonces() {
        let mut set = NonceSet::new(2);
        set.insert(key(1), 100);
        set.insert(key(2), 50);
        assert_eq!(set.probe(key(3), 10), Claim::Full);
        assert_eq!(set.probe(key(1), 10), Claim::Seen);
        // Once one expires there is room again.
        assert_eq!(set.probe(key(3), 50), Claim::Fresh);
        assert_eq!(set.len(), 1);
    }

    proptest! {
        #[test]
        fn nonce_set_matches_a_model_that_never_forgets(
            ops in proptest::collection::vec((0u128..20, 0u64..50, 1u64..200, any::<bool>()), 1..300),
        ) {
            // The model keeps every insert forever and asks "is there one
            // whose forget time is still ahead?"; sweeps must not change answers.
            let mut set = NonceSet::new(usize::MAX);
            let mut model: Vec<(u128, u64)> = Vec::new();
            let mut now = 0u64;
            for (id, step, ttl, sweep) in ops {
                now += step;
                if sweep {
                    set.sweep(now);
                }
                let seen = model.iter().any(|&(k, forget_at)| k == id && forget_at > now);
                let claim = set.probe(key(id), now);
                prop_assert_eq!(claim == Claim::Seen, seen);
                if claim == Claim::Fresh {
                    set.insert(key(id), now + ttl);
                    model.push((id, now + ttl));
                }
            }
        }
    }
}
