//! The memory of used nonces. A nonce is remembered until the moment its
//! request would be stale anyway (`timestamp + skew`); after that the
//! freshness check rejects a replay on its own, so the entry can go.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};

use super::StateKey;
use super::clock::Nanos;

/// A nonce's state id without its top byte. That byte names an id's pool
/// (see [`super::pools`]) and is the same for every nonce (`Pool::KEYS`:
/// nonces are the key's own state, never counted against a pool), so the 7
/// bytes kept are the whole of it. Byte arrays are not padded: beside the
/// 3-byte forget time an entry is 10 bytes, most of what a remembered nonce
/// costs (a `u64` there would pad the entry to 16). It hashes as the `u64`
/// it stands for, one `write_u64` that [`IdHasher`] takes as it is.
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

/// Hashes a nonce's id for the map. The id is already the output of a
/// keyed SipHash, so hashing it again would only cost time: it is its own
/// hash (rotated, see `write_u64`).
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not used for u64 keys; a plain FNV-1a keeps it correct for others.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, id: u64) {
        // The top byte of a nonce's id is its pool, 0 for every nonce;
        // hashbrown filters candidates by the top 7 bits and places by the
        // low ones, so move hash bits into both ends.
        self.0 = id.rotate_right(8);
    }
}

/// How far ahead of now a forget time may be: half the range of its 24
/// bits (97 days). Forget times are at most 30 days ahead (the longest
/// replay window the configuration accepts), and further ones are brought
/// back to this, which never shortens a memory the freshness check needs.
const MAX_AHEAD_SECS: u32 = (1 << 23) - 1;

/// The second a nonce may be forgotten, kept as its low 24 bits (as bytes,
/// for the reason above) and read against the current second by their
/// wrapping difference: ahead of now by less than half the range means
/// still remembered. That reading is exact for every live entry, because no
/// forget time is more than [`MAX_AHEAD_SECS`] ahead; an entry forgotten
/// for longer than that without a sweep (sweeps run every few seconds) would
/// read as remembered again: a refused request, never an accepted replay.
#[derive(Clone, Copy, Debug)]
struct ForgetAt([u8; 3]);

/// Seconds as 24 bits.
const MASK: u32 = (1 << 24) - 1;

impl ForgetAt {
    /// `secs` (Unix seconds) as seen at `now`: at most [`MAX_AHEAD_SECS`]
    /// ahead, and a time already past as `now` itself (past either way).
    fn new(secs: u64, now: u32) -> Self {
        let ahead = secs
            .saturating_sub(u64::from(now))
            .min(u64::from(MAX_AHEAD_SECS)) as u32;
        let [a, b, c, _] = (now.wrapping_add(ahead) & MASK).to_le_bytes();
        Self([a, b, c])
    }

    /// Seconds from `now` to this forget time, negative when it has passed.
    fn ahead_of(self, now: u32) -> i32 {
        let [a, b, c] = self.0;
        let low = u32::from_le_bytes([a, b, c, 0]);
        // Sign-extend the 24-bit wrapping difference.
        ((low.wrapping_sub(now) & MASK) << 8) as i32 >> 8
    }

    /// Still remembered at `now`: its second has not begun yet.
    fn is_ahead_of(self, now: u32) -> bool {
        self.ahead_of(now) > 0
    }

    /// The whole Unix second, given the current one.
    fn secs(self, now: u32) -> u32 {
        now.wrapping_add_signed(self.ahead_of(now))
    }
}

/// The current second, as the forget times are compared with it: a forget
/// second `f` is still ahead of `now` exactly when `f > floor(now)`.
fn second(now: Nanos) -> u32 {
    now.whole_secs() as u32
}

/// One shard's remembered nonces: key → the second it may be forgotten
/// (rounded up; request timestamps are whole seconds anyway, and 3 bytes
/// keep an entry at 10).
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
            Some(forget_at) if forget_at.is_ahead_of(second(now)) => Claim::Seen,
            _ => Claim::Fresh,
        }
    }

    /// Remembers `key` until `forget_at`. Call only after [`Self::probe`]
    /// answered `Fresh` under the same lock. Returns whether the set grew
    /// (false when an expired entry was replaced).
    pub fn insert(&mut self, key: StateKey, forget_at: Nanos, now: Nanos) -> bool {
        let forget_at = ForgetAt::new(forget_at.ceil_secs(), second(now));
        self.entries
            .insert(NonceId::new(key.id), forget_at)
            .is_none()
    }

    /// Forgets `key` (a reservation given back). Returns whether it was
    /// there.
    pub fn remove(&mut self, key: StateKey) -> bool {
        self.entries.remove(&NonceId::new(key.id)).is_some()
    }

    /// Gives `take` every nonce whose id `wanted` names, with the second
    /// it may be forgotten; removed when `remove` (a handover), else kept
    /// (a checkpoint). How many were given.
    pub fn gather(
        &mut self,
        wanted: impl Fn(u64) -> bool,
        now: Nanos,
        remove: bool,
        mut take: impl FnMut(u64, u32),
    ) -> usize {
        let now = second(now);
        let mut given = 0;
        self.entries.retain(|&id, &mut forget_at| {
            if wanted(id.get()) {
                take(id.get(), forget_at.secs(now));
                given += 1;
                !remove
            } else {
                true
            }
        });
        given
    }

    /// Remembers `key` until `forget_at_secs` or its own expiry, whichever
    /// is later (state handed over). Returns whether the set grew.
    pub fn merge(&mut self, key: StateKey, forget_at_secs: u32, now: Nanos) -> bool {
        let now = second(now);
        let handed = ForgetAt::new(u64::from(forget_at_secs), now);
        match self.entries.get_mut(&NonceId::new(key.id)) {
            Some(at) => {
                if handed.ahead_of(now) > at.ahead_of(now) {
                    *at = handed;
                }
                false
            }
            None => {
                self.entries.insert(NonceId::new(key.id), handed);
                true
            }
        }
    }

    /// Drops every nonce that may be forgotten at `now`; returns how many.
    pub fn sweep(&mut self, now: Nanos) -> usize {
        let before = self.entries.len();
        let now = second(now);
        self.entries
            .retain(|_, forget_at| forget_at.is_ahead_of(now));
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
fn shrink_if_sparse<K: Eq + Hash, V, S: BuildHasher>(map: &mut HashMap<K, V, S>) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: Nanos = Nanos::from_secs(1);

    /// The nonces `wanted` names, taken out of `set` as a handover does.
    fn taken(set: &mut NonceSet, wanted: impl Fn(u64) -> bool, now: Nanos) -> Vec<(u64, u32)> {
        let mut taken = Vec::new();
        let given = set.gather(wanted, now, true, |id, at| taken.push((id, at)));
        assert_eq!(given, taken.len());
        taken
    }

    /// Around the time this runs: Unix seconds whose low 24 bits are
    /// nothing special.
    const T0: Nanos = Nanos::from_secs(1_764_450_000);

    fn key(id: u64) -> StateKey {
        StateKey { id, shard: 0 }
    }

    #[test]
    fn a_remembered_nonce_costs_a_ten_byte_entry_and_keeps_every_id_bit() {
        assert_eq!(std::mem::size_of::<(NonceId, ForgetAt)>(), 10);
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
        // Ids that differ in any one byte are different entries.
        let mut set = NonceSet::new();
        for byte in 0..7 {
            assert!(set.insert(key(1 << (8 * byte)), T0 + 100 * SEC, T0));
        }
        assert_eq!(set.len(), 7);
        assert_eq!(set.probe(key(3), T0), Claim::Fresh);
        assert_eq!(set.probe(key(1 << 48), T0), Claim::Seen);
        // Handed over and taken back, an id and its whole forget second
        // come out as they went in.
        let at = T0.whole_secs() as u32 + 200;
        assert!(set.merge(key(0x0012_3456_789a_bcde), at, T0));
        let taken = taken(&mut set, |id| id == 0x0012_3456_789a_bcde, T0 + 10 * SEC);
        assert_eq!(taken, vec![(0x0012_3456_789a_bcde, at)]);
    }

    #[test]
    fn a_nonce_is_remembered_until_its_forget_time_and_not_after() {
        let mut set = NonceSet::new();
        assert_eq!(set.probe(key(1), T0), Claim::Fresh);
        assert!(set.insert(key(1), T0 + 100 * SEC, T0));
        assert_eq!(
            set.probe(key(1), T0 + 100 * SEC - Nanos::new(1)),
            Claim::Seen
        );
        assert_eq!(set.probe(key(1), T0 + 100 * SEC), Claim::Fresh);
        assert!(
            !set.insert(key(1), T0 + 200 * SEC, T0 + 100 * SEC),
            "replacing an expired entry does not grow the set"
        );
        assert_eq!(set.sweep(T0 + 200 * SEC), 1);
        assert!(set.is_empty());
    }

    #[test]
    fn a_forget_time_between_seconds_is_rounded_up_never_down() {
        let mut set = NonceSet::new();
        set.insert(key(7), T0 + 10 * SEC + Nanos::new(1), T0);
        assert_eq!(
            set.probe(key(7), T0 + 10 * SEC + Nanos::new(1)),
            Claim::Seen
        );
        assert_eq!(set.probe(key(7), T0 + 11 * SEC), Claim::Fresh);
    }

    #[test]
    fn forget_times_read_right_across_the_wrap_of_their_24_bits() {
        // The second before the low 24 bits wrap to zero, and the longest
        // replay window the configuration allows (30 days) beyond it.
        let wrap = Nanos::from_secs((T0.whole_secs() | u64::from(MASK)) + 1);
        let mut set = NonceSet::new();
        let month = 30 * 86_400 * SEC;
        let now = wrap - SEC;
        assert!(set.insert(key(1), now + month, now));
        for later in [now, wrap, wrap + SEC, now + month - Nanos::new(1)] {
            assert_eq!(set.probe(key(1), later), Claim::Seen, "{later:?}");
        }
        assert_eq!(set.probe(key(1), now + month), Claim::Fresh);
        assert_eq!(set.sweep(wrap + SEC), 0);
        assert_eq!(set.sweep(now + month), 1);
        // Merged and taken back across the wrap: the whole second.
        let at = (now + month).whole_secs() as u32;
        set.merge(key(2), at, now);
        assert_eq!(taken(&mut set, |_| true, wrap + 5 * SEC), vec![(2, at)]);
    }

    #[test]
    fn a_forget_time_too_far_ahead_is_brought_back_not_wrapped_into_the_past() {
        // Nothing in the configuration produces one; if it came (a peer's
        // clock), it must not wrap into a time already past.
        let mut set = NonceSet::new();
        let far = T0 + Nanos::from_secs(u64::from(MASK) + 10);
        assert!(set.insert(key(1), far, T0));
        assert_eq!(set.probe(key(1), T0 + 86_400 * 90 * SEC), Claim::Seen);
        assert!(set.merge(key(2), u32::MAX, T0));
        assert_eq!(set.probe(key(2), T0 + 86_400 * 90 * SEC), Claim::Seen);
        // And one long past is past, whatever its low bits.
        for past in [0, 1 << 23, T0.whole_secs() as u32 - 1] {
            set.merge(key(3), past, T0);
            assert_eq!(set.probe(key(3), T0), Claim::Fresh, "{past}");
        }
    }

    #[test]
    fn a_merge_keeps_the_later_forget_time_on_either_side_of_the_wrap() {
        let wrap = (T0.whole_secs() | u64::from(MASK)) + 1;
        let now = Nanos::from_secs(wrap - 100);
        let (before, after) = ((wrap - 10) as u32, (wrap + 10) as u32);
        let mut set = NonceSet::new();
        assert!(set.merge(key(1), before, now));
        assert!(!set.merge(key(1), after, now));
        assert!(!set.merge(key(1), before, now));
        assert_eq!(taken(&mut set, |_| true, now), vec![(1, after)]);
    }

    proptest! {
        #[test]
        fn nonce_set_matches_a_model_that_never_forgets(
            start in prop_oneof![Just(0u64), Just(u64::from(MASK) - 500), 0u64..(1 << 32) - 100_000_000],
            ops in proptest::collection::vec((0u64..20, 0u64..50, 1u64..200, any::<bool>()), 1..300),
        ) {
            // The model keeps every insert forever, as whole seconds, and
            // asks "is there one whose forget time is still ahead?"; sweeps
            // and the 24-bit wrap must not change answers.
            let mut set = NonceSet::new();
            let mut model: Vec<(u64, Nanos)> = Vec::new();
            let mut now = Nanos::from_secs(start);
            for (id, step, ttl, sweep) in ops {
                now += step * SEC;
                if sweep {
                    set.sweep(now);
                }
                let seen = model.iter().any(|&(k, forget_at)| k == id && forget_at > now);
                let claim = set.probe(key(id), now);
                prop_assert_eq!(claim == Claim::Seen, seen);
                if claim == Claim::Fresh {
                    set.insert(key(id), now + ttl * SEC, now);
                    model.push((id, now + ttl * SEC));
                }
            }
        }
    }
}
