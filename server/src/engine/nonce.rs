//! The memory of used nonces. A nonce is remembered until the moment its
//! request would be stale anyway (`timestamp + skew`); after that the
//! freshness check rejects a replay on its own, so the entry can go.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};

use super::clock::Nanos;
use super::{ReplayKey, SLOT_SHIFT, Slot, slot_of};

/// A nonce's state id as its slot's table keeps it: the 40 bits of hash
/// below the slot. The slot is the table's ([`NonceSet`] keeps one table
/// per slot) and the top byte, which names an id's pool (see
/// [`super::pools`]), is the same for every nonce (`Pool::KEYS`: nonces
/// are the key's own state, never counted against a pool), so the 5 bytes
/// kept are the whole of it. Byte arrays are not padded: beside the extra
/// bits and the forget time an entry is 10 bytes, most of what a
/// remembered nonce costs (a `u64` there would pad it to 16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NonceId([u8; 5]);

impl NonceId {
    fn new(id: u64) -> Self {
        let [a, b, c, d, e, ..] = id.to_le_bytes();
        Self([a, b, c, d, e])
    }

    /// The 40 bits kept, as the low bits of a `u64`.
    fn bits(self) -> u64 {
        let [a, b, c, d, e] = self.0;
        u64::from_le_bytes([a, b, c, d, e, 0, 0, 0])
    }

    /// The whole state id, with the slot of the table it was found in.
    fn in_slot(self, slot: Slot) -> u64 {
        self.bits() | u64::from(slot) << SLOT_SHIFT
    }
}

impl Hash for NonceId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.bits());
    }
}

/// Hashes a nonce's id, or a slot, for the maps here. Both are already
/// bits of a keyed SipHash, so hashing them again would only cost time;
/// they are only spread so that hashbrown, which filters candidates by the
/// top 7 bits of a hash and places by the low ones, finds hash bits at
/// both ends.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not used for the keys here; a plain FNV-1a keeps it correct for
        // others.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, id: u64) {
        // 40 bits of hash: the low 7 go to the top, the rest place.
        self.0 = id.rotate_right(7);
    }

    fn write_u16(&mut self, slot: u16) {
        // 16 bits of hash: a multiply by an odd constant spreads them over
        // all 64.
        self.0 = u64::from(slot).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type Map<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

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

/// What is kept of a remembered nonce beside its id: when it may be
/// forgotten, and the extra bits of its replay key ([`ReplayKey`]).
#[derive(Clone, Copy, Debug)]
struct Remembered {
    forget_at: ForgetAt,
    extra: [u8; 2],
}

impl Remembered {
    fn extra(self) -> u16 {
        u16::from_le_bytes(self.extra)
    }
}

/// Whether two replay keys' extra bits name the same request: equal, or
/// either one came without them.
fn same_request(a: u16, b: u16) -> bool {
    a == b || a == ReplayKey::ANY || b == ReplayKey::ANY
}

/// How long, at most, the background sweep passes over a slot's table
/// after it visited it. Under a steady stream of requests nearly every
/// table has something run out every second, and a visit scans the whole
/// table to take a three-hundredth of it: 35–45 ms a second for ten
/// million nonces over every slot (`warden-bench memory`, "steady
/// sweep"). Visited every 5 to 10 s instead (by slot, so that the visits
/// are spread over the seconds rather than all made in one), a nonce may
/// be held up to 10 s past its time. Held, not remembered: a probe reads
/// it as forgotten and an insert of its id takes its place. That is at
/// most 10 s of requests more in memory, about 3 % at the 305 s a nonce
/// is remembered by default, and counted against the capacity, so a full
/// set sweeps without the pause ([`NonceSet::sweep_all`]) before it
/// refuses a nonce.
const SWEEP_PAUSE_SECS: i32 = 10;

/// The pause after a visit to `slot`'s table: 5 to 10 s.
fn sweep_pause(slot: Slot) -> i32 {
    SWEEP_PAUSE_SECS - i32::from(slot) % (SWEEP_PAUSE_SECS / 2 + 1)
}

/// One slot's remembered nonces: id → when it may be forgotten.
#[derive(Debug)]
struct SlotNonces {
    nonces: Map<NonceId, Remembered>,
    /// The background sweep passes over the table until this second: the
    /// earliest forget time in it, or, after a visit, at least
    /// [`SWEEP_PAUSE_SECS`] later. Tables are many and small, and visiting
    /// one costs a few cache misses whether or not anything in it is due.
    due: ForgetAt,
}

impl SlotNonces {
    fn new(due: ForgetAt) -> Self {
        Self {
            nonces: Map::default(),
            due,
        }
    }

    /// The table a nonce of `id` forgotten at `forget_at` is written to,
    /// made if need be, its `due` brought forward to `forget_at`: every
    /// write goes through here, or a sweep passing over the table would
    /// leave the nonce past its time (memory an attacker could fill with
    /// nonces that never go).
    fn writing(
        slots: &mut Map<Slot, SlotNonces>,
        id: u64,
        forget_at: ForgetAt,
        now: u32,
    ) -> &mut SlotNonces {
        let slot = slots
            .entry(slot_of(id))
            .or_insert_with(|| SlotNonces::new(forget_at));
        if forget_at.ahead_of(now) < slot.due.ahead_of(now) {
            slot.due = forget_at;
        }
        slot
    }

    /// Drops what may be forgotten at `now`, if `due` is no more than
    /// `passed_over` seconds ahead, and passes over the table for at
    /// least `pause` seconds after; returns how many it dropped. With
    /// `passed_over` at [`SWEEP_PAUSE_SECS`] every table that may hold a
    /// nonce past its time is visited: one whose `due` is further ahead
    /// than that was set to its earliest forget time (a visit sets at most
    /// `now` plus the pause, and a write only brings it forward).
    fn sweep(&mut self, now: u32, passed_over: i32, pause: i32) -> usize {
        if self.due.ahead_of(now) > passed_over {
            return 0;
        }
        let before = self.nonces.len();
        let mut next = i32::MAX;
        self.nonces.retain(|_, r| {
            let ahead = r.forget_at.ahead_of(now);
            if ahead > 0 {
                next = next.min(ahead);
            }
            ahead > 0
        });
        // The earliest forget time kept, or the pause if that is sooner
        // (an empty table is dropped).
        let next = next.max(pause);
        self.due = ForgetAt::new(u64::from(now) + next as u64, now);
        shrink_if_sparse(&mut self.nonces);
        before - self.nonces.len()
    }
}

/// One shard's remembered nonces: key → the second it may be forgotten
/// (rounded up; request timestamps are whole seconds anyway, and 3 bytes
/// keep an entry small).
///
/// They are kept in one table per slot (all nonces of one API key share
/// its slot), so that an entry need not keep the 16 bits of its slot: 10
/// bytes, not 12; about 18 bytes a nonce in all where one table per shard
/// took 22 (ten million nonces of a thousand keys), 21 when they are
/// spread over every slot. A table costs about 100 bytes beyond its
/// nonces, at most 65,536 of them in all (a few MB), and one that grows
/// copies one slot's nonces, not the shard's. What a sweep pays for
/// visiting many small tables it saves by passing over those with nothing
/// due (`SlotNonces::due`).
///
/// The bound on how many are remembered is global and kept by the engine
/// (one hot key's nonces all live in one shard, so a per-shard bound would
/// throttle exactly the busiest key).
#[derive(Debug, Default)]
pub struct NonceSet {
    slots: Map<Slot, SlotNonces>,
    /// Entries in `slots`' tables, all together.
    in_slots: usize,
    /// Replay keys whose id a remembered one of other extra bits has
    /// already: two of one API key's nonces whose 40 bits of hash match (a
    /// chance of one in 2^40 a pair; about one a 36 s at 10,000 requests a
    /// second on one key). Nearly always empty, and looked in only when
    /// not.
    shared_ids: HashMap<(u64, u16), ForgetAt>,
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

    /// Whether `replay` is still remembered at `now`.
    pub fn probe(&self, replay: ReplayKey, now: Nanos) -> Claim {
        let now = second(now);
        let id = replay.key.id;
        if let Some(r) = self
            .slots
            .get(&slot_of(id))
            .and_then(|slot| slot.nonces.get(&NonceId::new(id)))
            && r.forget_at.is_ahead_of(now)
            && same_request(r.extra(), replay.extra)
        {
            return Claim::Seen;
        }
        if !self.shared_ids.is_empty() {
            let seen = if replay.extra == ReplayKey::ANY {
                self.shared_ids
                    .iter()
                    .any(|(&(i, _), at)| i == id && at.is_ahead_of(now))
            } else {
                self.shared_ids
                    .get(&(id, replay.extra))
                    .is_some_and(|at| at.is_ahead_of(now))
            };
            if seen {
                return Claim::Seen;
            }
        }
        Claim::Fresh
    }

    /// Remembers `replay` until `forget_at`. Call only after [`Self::probe`]
    /// answered `Fresh` under the same lock. Returns whether the set grew
    /// (false when an expired entry was replaced).
    pub fn insert(&mut self, replay: ReplayKey, forget_at: Nanos, now: Nanos) -> bool {
        let now = second(now);
        let forget_at = ForgetAt::new(forget_at.ceil_secs(), now);
        let remembered = Remembered {
            forget_at,
            extra: replay.extra.to_le_bytes(),
        };
        let id = replay.key.id;
        let slot = SlotNonces::writing(&mut self.slots, id, forget_at, now);
        match slot.nonces.entry(NonceId::new(id)) {
            Entry::Vacant(v) => {
                v.insert(remembered);
                self.in_slots += 1;
                true
            }
            Entry::Occupied(mut o) if !o.get().forget_at.is_ahead_of(now) => {
                o.insert(remembered);
                false
            }
            // Remembered, and not this request (probe said so): another
            // request whose id is the same.
            Entry::Occupied(_) => self
                .shared_ids
                .insert((id, replay.extra), forget_at)
                .is_none(),
        }
    }

    /// Forgets `replay` (a reservation given back, a `Forget`): every
    /// remembered replay key it names (one; every one of its id for a key
    /// without extra bits). How many were there.
    pub fn remove(&mut self, replay: ReplayKey) -> usize {
        let id = replay.key.id;
        let mut removed = 0;
        if let Some(slot) = self.slots.get_mut(&slot_of(id))
            && let Entry::Occupied(o) = slot.nonces.entry(NonceId::new(id))
            && same_request(o.get().extra(), replay.extra)
        {
            o.remove();
            self.in_slots -= 1;
            removed += 1;
            if slot.nonces.is_empty() {
                self.slots.remove(&slot_of(id));
            }
        }
        if !self.shared_ids.is_empty() {
            let before = self.shared_ids.len();
            self.shared_ids
                .retain(|&(i, extra), _| i != id || !same_request(extra, replay.extra));
            removed += before - self.shared_ids.len();
        }
        removed
    }

    /// Gives `take` every nonce still remembered whose id `wanted` names,
    /// with its extra bits and the second it may be forgotten; removed
    /// when `remove` (a handover), else kept (a checkpoint). Ones past
    /// their time that no sweep has dropped yet are given to no one (and
    /// dropped when `remove`): they say nothing. How many were given.
    pub fn gather(
        &mut self,
        wanted: impl Fn(u64) -> bool,
        now: Nanos,
        remove: bool,
        mut take: impl FnMut(u64, u16, u32),
    ) -> usize {
        let now = second(now);
        let mut given = 0;
        // Whether to keep one entry, given to `take` if wanted and live.
        let mut keep = |id: u64, extra: u16, forget_at: ForgetAt| {
            if !wanted(id) {
                return true;
            }
            if forget_at.is_ahead_of(now) {
                take(id, extra, forget_at.secs(now));
                given += 1;
            }
            !remove
        };
        for (&slot, SlotNonces { nonces, .. }) in &mut self.slots {
            let before = nonces.len();
            nonces.retain(|&id, r| keep(id.in_slot(slot), r.extra(), r.forget_at));
            self.in_slots -= before - nonces.len();
        }
        self.shared_ids
            .retain(|&(id, extra), forget_at| keep(id, extra, *forget_at));
        if remove {
            self.drop_empty_slots();
        }
        given
    }

    /// Remembers `replay` until `forget_at_secs` or its own expiry,
    /// whichever is later (state handed over, or taken back). Returns
    /// whether the set grew. One already past its time is not written:
    /// it would refuse nothing, and only take room.
    pub fn merge(&mut self, replay: ReplayKey, forget_at_secs: u32, now: Nanos) -> bool {
        let now = second(now);
        let handed = ForgetAt::new(u64::from(forget_at_secs), now);
        if !handed.is_ahead_of(now) {
            return false;
        }
        let later = |at: &mut ForgetAt| {
            if handed.ahead_of(now) > at.ahead_of(now) {
                *at = handed;
            }
        };
        let id = replay.key.id;
        let handed_over = Remembered {
            forget_at: handed,
            extra: replay.extra.to_le_bytes(),
        };
        // Whatever the entry keeps, nothing earlier than `handed` is
        // written.
        let slot = SlotNonces::writing(&mut self.slots, id, handed, now);
        let r = match slot.nonces.entry(NonceId::new(id)) {
            Entry::Vacant(v) => {
                v.insert(handed_over);
                self.in_slots += 1;
                return true;
            }
            Entry::Occupied(o) => o.into_mut(),
        };
        match r {
            r if !r.forget_at.is_ahead_of(now) => {
                *r = handed_over;
                false
            }
            r if r.extra() == replay.extra => {
                later(&mut r.forget_at);
                false
            }
            // One of the two came without extra bits: the entry stands
            // for both (it refuses every request of its id, as both did).
            r if same_request(r.extra(), replay.extra) => {
                r.extra = ReplayKey::ANY.to_le_bytes();
                later(&mut r.forget_at);
                false
            }
            _ => match self.shared_ids.get_mut(&(id, replay.extra)) {
                Some(at) => {
                    later(at);
                    false
                }
                None => {
                    self.shared_ids.insert((id, replay.extra), handed);
                    true
                }
            },
        }
    }

    /// The background sweep: drops nonces that may be forgotten at `now`,
    /// passing over tables it visited in the last [`SWEEP_PAUSE_SECS`]
    /// (whose nonces past their time stay until the next visit); returns
    /// how many it dropped.
    pub fn sweep(&mut self, now: Nanos) -> usize {
        self.sweep_tables(now, 0)
    }

    /// Drops every nonce that may be forgotten at `now`, the paused tables'
    /// too: for a set at its capacity, which must not refuse a nonce for
    /// room that ones past their time take. Returns how many it dropped.
    pub fn sweep_all(&mut self, now: Nanos) -> usize {
        self.sweep_tables(now, SWEEP_PAUSE_SECS)
    }

    fn sweep_tables(&mut self, now: Nanos, passed_over: i32) -> usize {
        let before = self.len();
        let now = second(now);
        for (&slot, nonces) in self.slots.iter_mut() {
            self.in_slots -= nonces.sweep(now, passed_over, sweep_pause(slot));
        }
        self.drop_empty_slots();
        self.shared_ids
            .retain(|_, forget_at| forget_at.is_ahead_of(now));
        before - self.len()
    }

    /// Gives back the tables of slots that have no nonce left, so memory
    /// follows the keys in use.
    fn drop_empty_slots(&mut self) {
        self.slots.retain(|_, slot| !slot.nonces.is_empty());
        shrink_if_sparse(&mut self.slots);
    }

    pub fn len(&self) -> usize {
        self.in_slots + self.shared_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Gives memory back after a burst, so memory follows the active keys. A
/// table of 16 buckets or fewer is left as it is (a slot's table holds
/// its few nonces in about 200 bytes).
fn shrink_if_sparse<K: Eq + Hash, V, S: BuildHasher>(map: &mut HashMap<K, V, S>) {
    if map.capacity() > 16 && map.len() < map.capacity() / 4 {
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
        taken_with_extra(set, wanted, now)
            .into_iter()
            .map(|(id, _, at)| (id, at))
            .collect()
    }

    /// [`taken`], with each one's extra bits, in order.
    fn taken_with_extra(
        set: &mut NonceSet,
        wanted: impl Fn(u64) -> bool,
        now: Nanos,
    ) -> Vec<(u64, u16, u32)> {
        let mut taken = Vec::new();
        let given = set.gather(wanted, now, true, |id, extra, at| {
            taken.push((id, extra, at))
        });
        assert_eq!(given, taken.len());
        taken.sort_unstable();
        taken
    }

    /// Around the time this runs: Unix seconds whose low 24 bits are
    /// nothing special.
    const T0: Nanos = Nanos::from_secs(1_764_450_000);

    fn key(id: u64) -> ReplayKey {
        with_extra(id, 1)
    }

    fn with_extra(id: u64, extra: u16) -> ReplayKey {
        ReplayKey {
            key: crate::engine::StateKey { id, shard: 0 },
            extra,
        }
    }

    #[test]
    fn a_remembered_nonce_costs_a_ten_byte_entry_and_keeps_every_id_bit() {
        assert_eq!(std::mem::size_of::<(NonceId, Remembered)>(), 10);
        // Every bit below the pool byte, which is 0 (Pool::KEYS) for every
        // nonce the engine makes: 40 in the entry, 16 in its table's slot.
        for id in [
            0,
            1,
            (1 << 56) - 1,
            0x00ff_ffff_0000_0001,
            0x0080_0000_0000_0000,
        ] {
            assert_eq!(NonceId::new(id).in_slot(slot_of(id)), id);
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

    /// The slot bits an entry does not keep are its table's: two nonces
    /// whose low 40 bits match but whose slots differ (two API keys) are
    /// two nonces, however they are inserted, forgotten or handed over.
    #[test]
    fn nonces_of_different_slots_with_the_same_low_bits_are_different_nonces() {
        let low = 0x12_3456_789a;
        let (a, b) = (low | 3 << SLOT_SHIFT, low | 4 << SLOT_SHIFT);
        let later = T0 + 100 * SEC;
        let mut set = NonceSet::new();
        assert!(set.insert(key(a), later, T0));
        assert_eq!(set.probe(key(b), T0), Claim::Fresh);
        assert!(set.insert(key(b), later, T0));
        assert_eq!(set.len(), 2);
        assert_eq!(set.remove(key(a)), 1);
        assert!(!set.slots.contains_key(&3), "an empty slot's table goes");
        assert_eq!(set.probe(key(a), T0), Claim::Fresh);
        assert_eq!(set.probe(key(b), T0), Claim::Seen);
        // Handed over: b leaves with its own slot, and a merge into an
        // empty set puts it back in that slot, not another.
        assert!(set.merge(key(a), later.whole_secs() as u32, T0));
        assert_eq!(
            taken(&mut set, |id| slot_of(id) == 4, T0),
            vec![(b, later.whole_secs() as u32)]
        );
        assert_eq!(set.probe(key(b), T0), Claim::Fresh);
        assert_eq!(set.probe(key(a), T0), Claim::Seen);
        assert!(set.merge(key(b), later.whole_secs() as u32, T0));
        assert_eq!(set.probe(key(b), T0), Claim::Seen);
        assert_eq!(set.len(), 2);
        // Swept, both go, and so do their slots' tables.
        assert_eq!(set.sweep(later), 2);
        assert!(set.is_empty());
        assert!(set.slots.is_empty());
    }

    /// A sweep passes over a slot's table until its earliest forget time;
    /// a nonce written with an earlier one, inserted or handed over, must
    /// bring that forward, or it would outstay its time (memory an
    /// attacker could fill with nonces that never go).
    #[test]
    fn a_sweep_misses_nothing_due_in_a_slot_it_passes_over() {
        let (a, b) = (1 << SLOT_SHIFT, 2 << SLOT_SHIFT);
        let mut set = NonceSet::new();
        set.insert(key(a), T0 + 10 * SEC, T0);
        set.insert(key(b), T0 + 100 * SEC, T0);
        assert_eq!(set.sweep(T0 + 10 * SEC), 1);
        assert!(!set.slots.contains_key(&1), "an empty slot's table goes");
        set.insert(key(b + 1), T0 + 15 * SEC, T0 + 10 * SEC);
        assert_eq!(set.sweep(T0 + 15 * SEC), 1);
        set.merge(key(b + 2), (T0 + 20 * SEC).whole_secs() as u32, T0);
        assert_eq!(set.sweep(T0 + 20 * SEC), 1);
        assert_eq!(set.len(), 1);
        assert_eq!(set.sweep(T0 + 100 * SEC), 1);
        assert!(set.is_empty() && set.slots.is_empty());
    }

    /// Nonces past their time wait for a sweep (up to its pause, in a
    /// table it has just visited): a state handed over or saved in the
    /// meantime must not carry them, nor a taken-back one write them, or
    /// they would take room on the other side and count as remembered.
    #[test]
    fn a_handover_or_a_save_carries_no_nonce_past_its_time() {
        let mut set = NonceSet::new();
        let (past, live) = (T0 + 10 * SEC, T0 + 100 * SEC);
        set.insert(key(1), past, T0);
        set.insert(key(2), live, T0);
        set.insert(with_extra(3, 1), live, T0);
        set.insert(with_extra(3, 2), past, T0);
        let now = T0 + 20 * SEC;
        assert_eq!(set.len(), 4, "not swept yet");
        let everything = |_| true;
        let mut copied = Vec::new();
        let given = set.gather(everything, now, false, |k, e, at| copied.push((k, e, at)));
        let live_secs = live.whole_secs() as u32;
        assert_eq!(given, 2);
        copied.sort_unstable();
        assert_eq!(copied, vec![(2, 1, live_secs), (3, 1, live_secs)]);
        assert_eq!(set.len(), 4, "a copy leaves them to the sweep");
        let mut handed = Vec::new();
        assert_eq!(
            set.gather(everything, now, true, |k, e, at| handed.push((k, e, at))),
            2
        );
        handed.sort_unstable();
        assert_eq!(handed, copied);
        assert!(set.is_empty() && set.slots.is_empty(), "the rest dropped");
        // And one arriving past its time is not written.
        assert!(!set.merge(key(1), past.whole_secs() as u32, now));
        assert!(set.is_empty() && set.slots.is_empty());
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

    /// The attack on nobody: two requests of one API key whose ids match
    /// (40 bits of hash: one pair in 2^40) are two requests, not a replay.
    /// Until session 28 the second was refused as one.
    #[test]
    fn two_requests_whose_ids_match_are_told_apart_by_their_extra_bits() {
        let mut set = NonceSet::new();
        let later = T0 + 100 * SEC;
        assert!(set.insert(with_extra(5, 1), later, T0));
        assert_eq!(set.probe(with_extra(5, 2), T0), Claim::Fresh);
        assert!(set.insert(with_extra(5, 2), later, T0));
        assert_eq!(set.len(), 2);
        for extra in [1, 2] {
            assert_eq!(set.probe(with_extra(5, extra), T0), Claim::Seen);
        }
        assert_eq!(set.probe(with_extra(5, 3), T0), Claim::Fresh);
        // A reservation given back forgets its own request, not the other.
        assert_eq!(set.remove(with_extra(5, 2)), 1);
        assert_eq!(set.probe(with_extra(5, 2), T0), Claim::Fresh);
        assert_eq!(set.probe(with_extra(5, 1), T0), Claim::Seen);
        // One that expired lets its request through again, and not the
        // others; a sweep takes what expired, then the rest in their time.
        assert!(set.insert(with_extra(5, 2), T0 + 10 * SEC, T0));
        let then = T0 + 20 * SEC;
        assert_eq!(set.probe(with_extra(5, 2), then), Claim::Fresh);
        assert!(set.insert(with_extra(5, 3), later, then));
        assert_eq!(set.probe(with_extra(5, 3), then), Claim::Seen);
        assert_eq!(set.probe(with_extra(5, 1), then), Claim::Seen);
        assert_eq!(set.len(), 3);
        assert_eq!(set.sweep(then), 1);
        assert_eq!(set.sweep(later), 2);
        assert!(set.is_empty());
    }

    /// A replay key from a node of the version before (or a state it
    /// saved) has no extra bits: it matches every replay key of its id,
    /// either way round, as every one did before; nothing it stands for
    /// is let through twice.
    #[test]
    fn a_replay_key_without_extra_bits_matches_every_one_of_its_id() {
        let any = |id| with_extra(id, ReplayKey::ANY);
        let later = T0 + 100 * SEC;
        let mut set = NonceSet::new();
        set.insert(with_extra(5, 1), later, T0);
        set.insert(with_extra(5, 2), later, T0);
        assert_eq!(set.probe(any(5), T0), Claim::Seen);
        assert_eq!(set.probe(any(6), T0), Claim::Fresh);
        // Forgotten without extra bits: every one of the id.
        assert_eq!(set.remove(any(5)), 2);
        assert!(set.is_empty());

        // Handed over without them: refuses every request of its id.
        assert!(set.merge(any(7), (T0 + 50 * SEC).whole_secs() as u32, T0));
        assert_eq!(set.probe(with_extra(7, 9), T0), Claim::Seen);
        assert_eq!(set.remove(with_extra(7, 9)), 1);
        // Merged into one with them: the entry stands for both, until the
        // later of the two.
        set.insert(with_extra(8, 1), later, T0);
        assert!(!set.merge(any(8), (T0 + 200 * SEC).whole_secs() as u32, T0));
        assert_eq!(set.len(), 1);
        assert_eq!(set.probe(with_extra(8, 4), T0 + 150 * SEC), Claim::Seen);
        // Two with them whose ids match, handed over: both kept.
        assert!(set.merge(with_extra(9, 1), later.whole_secs() as u32, T0));
        assert!(set.merge(with_extra(9, 2), later.whole_secs() as u32, T0));
        assert!(!set.merge(with_extra(9, 2), later.whole_secs() as u32, T0));
        assert_eq!(
            taken_with_extra(&mut set, |id| id == 9, T0),
            vec![
                (9, 1, later.whole_secs() as u32),
                (9, 2, later.whole_secs() as u32)
            ]
        );
    }

    proptest! {
        #[test]
        fn nonce_set_matches_a_model_that_never_forgets(
            start in prop_oneof![Just(0u64), Just(u64::from(MASK) - 500), 0u64..(1 << 32) - 100_000_000],
            ops in proptest::collection::vec(
                (0u64..20, 0u16..4, 0u64..50, 1u64..200, 0u8..6),
                1..300,
            ),
        ) {
            // The model keeps every insert forever, as whole seconds, and
            // asks "is there one of this id, whose extra bits match (equal,
            // or either without: 0) and whose forget time is still
            // ahead?"; sweeps, forgets, handovers and the 24-bit wrap must
            // not change answers. The set's count must be what its own
            // answers add up to.
            let mut set = NonceSet::new();
            let mut model: Vec<(u64, u16, Nanos)> = Vec::new();
            let mut count = 0usize;
            let same_request = |a: u16, b: u16| a == b || a == 0 || b == 0;
            let mut now = Nanos::from_secs(start);
            for (n, extra, step, ttl, then) in ops {
                // Five slots, four ids in each that share their low bits
                // with those of the other slots.
                let id = (n / 5) | (n % 5) << SLOT_SHIFT;
                now += step * SEC;
                match then {
                    0 => {
                        count -= set.sweep(now);
                        // The background sweep may leave nonces up to the
                        // pause past their time, no older ones.
                        let held = model
                            .iter()
                            .filter(|&&(_, _, at)| at + SWEEP_PAUSE_SECS as u64 * SEC > now)
                            .count();
                        prop_assert!(set.len() <= held);
                    }
                    4 => {
                        count -= set.sweep_all(now);
                        // Swept in full, it leaves nothing that may be
                        // forgotten, though it passes over tables with
                        // nothing due.
                        let live = model.iter().filter(|&&(_, _, at)| at > now).count();
                        prop_assert_eq!(set.len(), live);
                    }
                    1 => {
                        let forgotten = set.remove(with_extra(id, extra));
                        count -= forgotten;
                        let before = model.len();
                        model.retain(|&(k, e, at)| {
                            k != id || !same_request(e, extra) || at <= now
                        });
                        // Entries past their time may go too (not swept
                        // yet); every live one it names must.
                        prop_assert!(forgotten >= before - model.len());
                        model.retain(|&(k, e, _)| k != id || !same_request(e, extra));
                    }
                    2 => {
                        // One slot handed over and back.
                        let mut out = Vec::new();
                        let before = set.len();
                        set.gather(
                            |k| slot_of(k) == slot_of(id),
                            now,
                            true,
                            |k, e, at| out.push((k, e, at)),
                        );
                        count -= before - set.len();
                        for (k, e, at) in out {
                            count += usize::from(set.merge(with_extra(k, e), at, now));
                        }
                    }
                    3 => {
                        // Everything checkpointed and restored into a new
                        // set.
                        let mut out = Vec::new();
                        let given = set.gather(|_| true, now, false, |k, e, at| out.push((k, e, at)));
                        // Every nonce still remembered, and only those.
                        let live = model.iter().filter(|&&(_, _, at)| at > now).count();
                        prop_assert_eq!(given, live);
                        set = NonceSet::new();
                        count = 0;
                        for (k, e, at) in out {
                            count += usize::from(set.merge(with_extra(k, e), at, now));
                        }
                    }
                    _ => {}
                }
                prop_assert_eq!(set.len(), count);
                let seen = model
                    .iter()
                    .any(|&(k, e, at)| k == id && same_request(e, extra) && at > now);
                let claim = set.probe(with_extra(id, extra), now);
                prop_assert_eq!(claim == Claim::Seen, seen);
                if claim == Claim::Fresh {
                    count += usize::from(set.insert(with_extra(id, extra), now + ttl * SEC, now));
                    model.push((id, extra, now + ttl * SEC));
                }
                prop_assert_eq!(set.len(), count);
                let live = model.iter().filter(|&&(_, _, at)| at > now).count();
                prop_assert!(set.len() >= live);
            }
        }
    }
}
