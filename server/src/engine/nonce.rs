//! The memory of used nonces. A nonce is remembered until the moment its
//! request would be stale anyway (`timestamp + skew`); after that the
//! freshness check rejects a replay on its own, so the entry can go.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};

use super::clock::Nanos;

fn nanos(secs: u32) -> Nanos {
    Nanos::from_secs(u64::from(secs))
}
use super::{IdHasher, StateKey};

/// A nonce's state id without its top byte. That byte names an id's pool
/// (see [`super::pools`]) and is the same for every nonce (`Pool::KEYS`:
/// nonces are the key's own state, never counted against a pool), so the 7
/// bytes kept are the whole of it. Byte arrays are not padded: beside the
/// 4-byte forget time an entry is 11 bytes, most of what a remembered nonce
/// costs (a `u64` there would pad the entry to 16). It hashes as the `u64`
/// it stands for, so the map's id hasher applies unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NonceId([u8; 7]);

impl NonceId {
    fn new(id: u64) -> Self {
        let [a, b, c, d, e, f, g, _pool] = id.to_le_bytes();
        Self([a, b, c, d, e, f, g])
    }

    fn get(self) -> u64 {
        let [a, b, c, d, e, f, g] = self.0;
        u64::from_le_bytes([a, b, c, d, e, f, g, 0])
    }
}

impl Hash for NonceId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.get());
    }
}

/// The second a nonce may be forgotten, as bytes for the same reason.
#[derive(Clone, Copy, Debug)]
struct ForgetAt([u8; 4]);

impl ForgetAt {
    fn new(secs: u32) -> Self {
        Self(secs.to_le_bytes())
    }

    fn secs(self) -> u32 {
        u32::from_le_bytes(self.0)
    }
}

/// One shard's remembered nonces: key → the second it may be forgotten
/// (rounded up; request timestamps are whole seconds anyway, and 4 bytes
/// keep an entry at 11).
/// The bound on how many are remembered is global and kept by the engine
/// (one hot key's nonces all live in one shard, so a per-shard bound would
/// throttle exactly the busiest key).
#[derive(Debug, Default)]
pub struct NonceSet {
    entries: HashMap<NonceId, ForgetAt, BuildHasherDefault<IdHasher>>,
}

/// Whether a nonce has been used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Unseen (or seen so long ago that it may be forgotten).
    Fresh,
    /// Seen and still remembered: a replay.
    Seen,
}

impl NonceSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `key` is still remembered at `now`.
    pub fn probe(&self, key: StateKey, now: Nanos) -> Claim {
        match self.entries.get(&NonceId::new(key.id)) {
            Some(forget_at) if nanos(forget_at.secs()) > now => Claim::Seen,
            _ => Claim::Fresh,
        }
    }

    /// Remembers `key` until `forget_at`. Call only after [`Self::probe`]
    /// answered `Fresh` under the same lock. Returns whether the set grew
    /// (false when an expired entry was replaced).
    pub fn insert(&mut self, key: StateKey, forget_at: Nanos) -> bool {
        let secs = u32::try_from(forget_at.ceil_secs()).unwrap_or(u32::MAX);
        self.entries
            .insert(NonceId::new(key.id), ForgetAt::new(secs))
            .is_none()
    }

    /// Forgets `key` (a reservation given back). Returns whether it was
    /// there.
    pub fn remove(&mut self, key: StateKey) -> bool {
        self.entries.remove(&NonceId::new(key.id)).is_some()
    }

    /// Removes and returns the nonces whose id `wanted` names, with the
    /// second each may be forgotten.
    pub fn take(&mut self, wanted: impl Fn(u64) -> bool) -> Vec<(u64, u32)> {
        let mut taken = Vec::new();
        self.entries.retain(|&id, &mut forget_at| {
            if wanted(id.get()) {
                taken.push((id.get(), forget_at.secs()));
                false
            } else {
                true
            }
        });
        taken
    }

    /// Remembers `key` until `forget_at_secs` or its own expiry, whichever
    /// is later (state handed over). Returns whether the set grew.
    pub fn merge(&mut self, key: StateKey, forget_at_secs: u32) -> bool {
        match self.entries.get_mut(&NonceId::new(key.id)) {
            Some(at) => {
                *at = ForgetAt::new(at.secs().max(forget_at_secs));
                false
            }
            None => {
                self.entries
                    .insert(NonceId::new(key.id), ForgetAt::new(forget_at_secs));
                true
            }
        }
    }

    /// Drops every nonce that may be forgotten at `now`; returns how many.
    pub fn sweep(&mut self, now: Nanos) -> usize {
        let before = self.entries.len();
        self.entries
            .retain(|_, forget_at| nanos(forget_at.secs()) > now);
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
pub(super) fn shrink_if_sparse<K: Eq + Hash, V, S: BuildHasher>(map: &mut HashMap<K, V, S>) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_remembered_nonce_costs_an_eleven_byte_entry_and_keeps_every_id_bit() {
        assert_eq!(std::mem::size_of::<(NonceId, ForgetAt)>(), 11);
        // Every bit below the pool byte, which is 0 (Pool::KEYS) for every
        // nonce the engine makes.
        for id in [
            0,
            1,
            (1 << 56) - 1,
            0x00ff_ffff_0000_0001,
            0x0080_0000_0000_0000,
        ] {
            assert_eq!(NonceId::new(id).get(), id);
        }
        assert_eq!(ForgetAt::new(u32::MAX).secs(), u32::MAX);
        // Ids that differ in any one byte are different entries.
        let mut set = NonceSet::new();
        let at = Nanos::from_secs(100);
        for byte in 0..7 {
            assert!(set.insert(key(1 << (8 * byte)), at));
        }
        assert_eq!(set.len(), 7);
        assert_eq!(set.probe(key(3), Nanos::ZERO), Claim::Fresh);
        assert_eq!(set.probe(key(1 << 48), Nanos::ZERO), Claim::Seen);
        // Handed over and taken back, an id comes out as it went in.
        assert!(set.merge(key(0x0012_3456_789a_bcde), 200));
        let taken = set.take(|id| id == 0x0012_3456_789a_bcde);
        assert_eq!(taken, vec![(0x0012_3456_789a_bcde, 200)]);
    }

    const SEC: Nanos = Nanos::from_secs(1);

    fn key(id: u64) -> StateKey {
        StateKey { id, shard: 0 }
    }

    #[test]
    fn a_nonce_is_remembered_until_its_forget_time_and_not_after() {
        const S: Nanos = Nanos::from_secs(1);
        let mut set = NonceSet::new();
        assert_eq!(set.probe(key(1), Nanos::ZERO), Claim::Fresh);
        assert!(set.insert(key(1), 100 * S));
        assert_eq!(set.probe(key(1), 100 * S - Nanos::new(1)), Claim::Seen);
        assert_eq!(set.probe(key(1), 100 * S), Claim::Fresh);
        assert!(
            !set.insert(key(1), 200 * S),
            "replacing an expired entry does not grow the set"
        );
        assert_eq!(set.sweep(200 * S), 1);
        assert!(set.is_empty());
    }

    #[test]
    fn a_forget_time_between_seconds_is_rounded_up_never_down() {
        let mut set = NonceSet::new();
        set.insert(key(7), 10 * SEC + Nanos::new(1));
        assert_eq!(set.probe(key(7), 10 * SEC + Nanos::new(1)), Claim::Seen);
        assert_eq!(set.probe(key(7), 11 * SEC), Claim::Fresh);
    }

    proptest! {
        #[test]
        fn nonce_set_matches_a_model_that_never_forgets(
            ops in proptest::collection::vec((0u64..20, 0u64..50, 1u64..200, any::<bool>()), 1..300),
        ) {
            // The model keeps every insert forever and asks "is there one
            // whose forget time is still ahead?"; sweeps must not change answers.
            let mut set = NonceSet::new();
            let mut model: Vec<(u64, Nanos)> = Vec::new();
            let mut now = Nanos::ZERO;
            for (id, step, ttl, sweep) in ops {
                // Whole seconds, as the engine stores them.
                now += step * SEC;
                if sweep {
                    set.sweep(now);
                }
                let seen = model.iter().any(|&(k, forget_at)| k == id && forget_at > now);
                let claim = set.probe(key(id), now);
                prop_assert_eq!(claim == Claim::Seen, seen);
                if claim == Claim::Fresh {
                    set.insert(key(id), now + ttl * SEC);
                    model.push((id, now + ttl * SEC));
                }
            }
        }
    }
}
