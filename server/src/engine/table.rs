//! The table a shard keeps its state in: an open-addressing hash table
//! (Robin Hood, linear probing) that grows by a quarter, not by doubling.
//!
//! Why not `std`'s `HashMap` (hashbrown): its tables double, so right after
//! a growth half the slots are empty, and for most counts of entries a
//! third or more are. At a million rate-limit keys that was 2^21 slots of
//! 17 bytes (16 for the entry, one control byte): 35.6 bytes per key for
//! 16 bytes of state. Here a table is between 68 % and 85 % full once it
//! holds more than a few entries, and a slot is the entry alone: 18.8 to
//! 23.5 bytes per 16-byte entry, whatever the count.
//!
//! What makes that safe at 85 %: Robin Hood placement keeps every entry
//! close to where its id hashes (an entry that has travelled further from
//! home takes the slot of one that has travelled less), so a lookup, found
//! or not, reads a few neighbouring slots (one or two cache lines); a
//! lookup for an absent id stops at the first entry nearer home than it
//! would be. Removal shifts the entries behind back by one (no tombstones,
//! so a table that sees endless inserts and removals never degrades). Ids
//! are keyed hashes (see [`super::StateKey`]), so clients cannot aim ids
//! at one neighbourhood of slots.
//!
//! An unused slot holds [`Record::VACANT`], a value no stored entry takes
//! (each entry type names the field that says so), so a slot needs no
//! control byte.
//!
//! The price is paid on a lookup for an id that is absent from a table too
//! large for the CPU's caches: hashbrown answers it from its control bytes
//! (a seventeenth of its memory, so usually cached), this table from the
//! slots themselves (at 5 million entries, measured here: 55–64 ns against
//! 27 ns), and growing by a quarter moves each entry about four times, not
//! once (17 ns per entry moved). That is why remembered nonces stay in
//! hashbrown ([`super::nonce`]): every genuine request looks up a nonce
//! that is not there, and their tables grow with traffic. Rate-limit state
//! is mostly found (a client's bucket exists while it is active) and its
//! count is what memory per client is made of.

/// What a [`Table`] can hold: a `Copy` entry that carries its own id.
pub trait Record: Copy {
    /// An unused slot. No entry stored in a table is ever vacant.
    const VACANT: Self;

    fn is_vacant(&self) -> bool;

    /// The id the entry is found by: a keyed hash, so its bits are random.
    fn id(&self) -> u64;
}

/// The most a table is filled, as `FILL_NUM / FILL_DEN` (85 %).
const FILL_NUM: usize = 17;
const FILL_DEN: usize = 20;
/// The slots of the first allocation.
const MIN_SLOTS: usize = 16;
/// The multiplier of a table with no slots yet (any odd one would do).
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// A set of entries, by id. See the module documentation.
#[derive(Debug)]
pub struct Table<E> {
    slots: Box<[E]>,
    len: usize,
    /// Odd, picks each id's home ([`Self::home`]); drawn afresh each time
    /// the slots are allocated. Why not one constant: with it, every table
    /// keeps its entries in the same order (of `id × constant`), so the
    /// entries of one table inserted in its slot order into another that
    /// is still growing (a cluster handover, a saved state taken back)
    /// arrive in the order of their homes there too, and pile up in the
    /// first part of it: each insert walked the whole pile. Taking back a
    /// million buckets took 16 s instead of well under one.
    multiplier: u64,
}

impl<E: Record> Default for Table<E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E: Record> Table<E> {
    /// An empty table; it allocates on the first insert.
    pub fn new() -> Self {
        Self {
            slots: Box::new([]),
            len: 0,
            multiplier: GOLDEN,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Slots allocated: what the table costs is this many entries.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn get(&self, id: u64) -> Option<&E> {
        self.find(id).map(|at| &self.slots[at])
    }

    /// The entry of `id`, to change in place. Its id must stay the same
    /// and it must not become vacant.
    pub fn get_mut(&mut self, id: u64) -> Option<&mut E> {
        self.find(id).map(|at| &mut self.slots[at])
    }

    /// Stores `entry`, replacing the one with its id. Returns the replaced
    /// entry, `None` when the table grew by one.
    pub fn insert(&mut self, entry: E) -> Option<E> {
        debug_assert!(!entry.is_vacant(), "a vacant entry cannot be stored");
        if let Some(at) = self.find(entry.id()) {
            return Some(std::mem::replace(&mut self.slots[at], entry));
        }
        if (self.len + 1) * FILL_DEN > self.slots.len() * FILL_NUM {
            let grown = (self.slots.len() + self.slots.len() / 4).max(MIN_SLOTS);
            self.rebuild(grown);
        }
        self.place(entry);
        None
    }

    /// Removes the entry of `id` and returns it.
    pub fn remove(&mut self, id: u64) -> Option<E> {
        let at = self.find(id)?;
        Some(self.remove_at(at))
    }

    /// Keeps the entries for which `keep` answers true (it may change them,
    /// but not their ids) and removes the others. `keep` sees every entry
    /// exactly once.
    pub fn retain(&mut self, mut keep: impl FnMut(&mut E) -> bool) {
        if self.len == 0 {
            return;
        }
        // Start just after a vacant slot: removal shifts entries back
        // towards their home, never across a vacant slot, so no entry moves
        // from the part still to visit into the part visited, and the
        // vacant slot where the walk ends stays vacant.
        let end = self
            .slots
            .iter()
            .position(E::is_vacant)
            .expect("a table is never full");
        let mut at = self.next(end);
        while at != end {
            if self.slots[at].is_vacant() || keep(&mut self.slots[at]) {
                at = self.next(at);
            } else {
                // The entry shifted into `at`, if any, is still to visit.
                self.remove_at(at);
            }
        }
    }

    /// Every entry, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = &E> {
        self.slots.iter().filter(|e| !e.is_vacant())
    }

    /// Gives memory back when at most a quarter of the slots are used (after
    /// a burst has been swept), so memory follows the active keys.
    pub fn shrink_if_sparse(&mut self) {
        if self.slots.len() > 4 * MIN_SLOTS && self.len < self.slots.len() / 4 {
            // Two thirds full: room to grow before the next rebuild.
            self.rebuild((self.len * 3 / 2).max(MIN_SLOTS));
        }
    }

    /// Where `id` hashes to. Ids are keyed hashes, but their top bits (pool
    /// and slot) are shared by many entries of one shard: the multiply
    /// carries every low bit into the high bits, which then pick the slot
    /// (a multiply-shift, as the slot count is not a power of two).
    fn home(&self, id: u64) -> usize {
        let mixed = id.wrapping_mul(self.multiplier);
        ((u128::from(mixed) * self.slots.len() as u128) >> 64) as usize
    }

    fn next(&self, at: usize) -> usize {
        if at + 1 == self.slots.len() {
            0
        } else {
            at + 1
        }
    }

    /// How far the entry at `at` sits from its home.
    fn distance(&self, at: usize) -> usize {
        let home = self.home(self.slots[at].id());
        if at >= home {
            at - home
        } else {
            at + self.slots.len() - home
        }
    }

    fn find(&self, id: u64) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let mut at = self.home(id);
        let mut travelled = 0;
        loop {
            let here = &self.slots[at];
            if here.is_vacant() {
                return None;
            }
            if here.id() == id {
                return Some(at);
            }
            // Had `id` been stored, it would have taken this slot from an
            // entry that travelled less.
            if self.distance(at) < travelled {
                return None;
            }
            travelled += 1;
            at = self.next(at);
        }
    }

    /// Places an entry whose id is not in the table, which has room.
    fn place(&mut self, mut entry: E) {
        let mut at = self.home(entry.id());
        let mut travelled = 0;
        loop {
            if self.slots[at].is_vacant() {
                self.slots[at] = entry;
                self.len += 1;
                return;
            }
            let theirs = self.distance(at);
            if theirs < travelled {
                // Robin Hood: the entry nearer its home moves on instead.
                std::mem::swap(&mut self.slots[at], &mut entry);
                travelled = theirs;
            }
            travelled += 1;
            at = self.next(at);
        }
    }

    /// Removes the entry at `at`: the entries after it that are away from
    /// home move back by one, up to a vacant slot or an entry at home.
    fn remove_at(&mut self, at: usize) -> E {
        let removed = self.slots[at];
        let mut hole = at;
        loop {
            let next = self.next(hole);
            if self.slots[next].is_vacant() || self.distance(next) == 0 {
                break;
            }
            self.slots[hole] = self.slots[next];
            hole = next;
        }
        self.slots[hole] = E::VACANT;
        self.len -= 1;
        removed
    }

    /// Moves every entry into a table of `slots` slots, under a new
    /// multiplier (so they arrive there in no particular order either).
    fn rebuild(&mut self, slots: usize) {
        debug_assert!(self.len * FILL_DEN <= slots * FILL_NUM);
        let old = std::mem::replace(&mut self.slots, vec![E::VACANT; slots].into_boxed_slice());
        self.len = 0;
        self.multiplier = u64::from_le_bytes(crate::crypto::random_bytes::<8>()) | 1;
        for entry in old.iter().filter(|e| !e.is_vacant()) {
            self.place(*entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// An entry for tests: vacant when its value is 0.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct Pair {
        id: u64,
        value: u64,
    }

    impl Record for Pair {
        const VACANT: Self = Pair { id: 0, value: 0 };
        fn is_vacant(&self) -> bool {
            self.value == 0
        }
        fn id(&self) -> u64 {
            self.id
        }
    }

    fn pair(id: u64, value: u64) -> Pair {
        Pair { id, value }
    }

    /// The `i`th of a run of ids whose bits look random, as the keyed hashes
    /// a table holds do (splitmix64's finalizer, a bijection). Not
    /// `i × constant`: those ids are evenly spread by construction, and two
    /// tables' multipliers can line up on such a sequence (1 % of random
    /// pairs piled an entry 100–310 slots from home in the test below),
    /// which keyed hashes never give.
    fn random_looking(i: u64) -> u64 {
        let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Every entry is reachable from its home without crossing a vacant
    /// slot, and no entry sits further from home than the one after it
    /// by more than one step (the Robin Hood order removal relies on).
    fn assert_well_formed(t: &Table<Pair>) {
        let n = t.slots.len();
        assert_eq!(t.iter().count(), t.len);
        assert!(t.len * FILL_DEN <= n * FILL_NUM || n == 0);
        for at in 0..n {
            if t.slots[at].is_vacant() {
                continue;
            }
            let d = t.distance(at);
            for back in 1..=d {
                assert!(!t.slots[(at + n - back) % n].is_vacant());
            }
            let next = (at + 1) % n;
            if !t.slots[next].is_vacant() {
                assert!(t.distance(next) <= d + 1);
            }
            assert_eq!(t.find(t.slots[at].id), Some(at));
        }
    }

    #[test]
    fn an_entry_costs_its_own_size_and_the_table_stays_at_least_two_thirds_full() {
        let mut t = Table::new();
        for id in 1..=1_000_000u64 {
            t.insert(pair(id.wrapping_mul(0x2545_f491_4f6c_dd1d), 1));
            if id > 1000 {
                let fill = t.len() as f64 / t.capacity() as f64;
                assert!((0.67..=0.85).contains(&fill), "{fill} at {id}");
            }
        }
        assert_eq!(std::mem::size_of::<Pair>(), 16);
    }

    #[test]
    fn a_sparse_table_gives_memory_back() {
        let mut t = Table::new();
        for id in 1..=10_000u64 {
            t.insert(pair(id, 1));
        }
        let big = t.capacity();
        t.retain(|e| e.id <= 100);
        t.shrink_if_sparse();
        assert!(t.capacity() < big / 10, "{} of {big}", t.capacity());
        assert_eq!(t.len(), 100);
        assert!((1..=100).all(|id| t.get(id).is_some()));
        assert_well_formed(&t);
    }

    /// The entries of one table, inserted in its slot order into another
    /// that grows as they come (a cluster handover, a saved state taken
    /// back), stay near their homes there. With one multiplier for every
    /// table they came in the order of their homes and piled up: the
    /// farthest sat thousands of slots from home, and each insert walked
    /// the pile.
    #[test]
    fn entries_taken_from_another_table_in_its_order_stay_near_home() {
        let mut from = Table::new();
        for id in 1..=50_000u64 {
            from.insert(pair(random_looking(id), 1));
        }
        let farthest = |t: &Table<Pair>| {
            (0..t.slots.len())
                .filter(|&at| !t.slots[at].is_vacant())
                .map(|at| t.distance(at))
                .max()
                .unwrap()
        };
        let mut into = Table::new();
        for (i, entry) in from.iter().enumerate() {
            into.insert(*entry);
            // A tenth in, and at the end: the pile, if any, is largest
            // while the table is young.
            if i + 1 == 5_000 || i + 1 == 50_000 {
                let far = farthest(&into);
                assert!(far < 100, "{} in, an entry {far} slots from home", i + 1);
            }
        }
        assert_eq!(into.len(), 50_000);
        assert_well_formed(&into);
    }

    #[test]
    fn retain_sees_every_entry_once_across_the_wrap() {
        // Thirteen ids (the most 16 slots take) that all hash to the last
        // two slots, so the cluster wraps round to the front.
        let mut t = Table::new();
        t.rebuild(MIN_SLOTS);
        let ids: Vec<u64> = (1..)
            .filter(|&id| t.home(id) >= MIN_SLOTS - 2)
            .take(13)
            .collect();
        for &id in &ids {
            t.insert(pair(id, id));
        }
        assert_eq!(t.capacity(), MIN_SLOTS);
        assert!((0..MIN_SLOTS - 2).any(|at| !t.slots[at].is_vacant()));
        assert_well_formed(&t);
        let mut seen = Vec::new();
        t.retain(|e| {
            seen.push(e.id);
            e.id % 3 != 0
        });
        seen.sort_unstable();
        assert_eq!(seen, ids);
        assert_eq!(t.len(), ids.iter().filter(|&&id| id % 3 != 0).count());
        assert!(ids.iter().all(|&id| t.get(id).is_some() == (id % 3 != 0)));
        assert_well_formed(&t);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64, u64),
        Remove(u64),
        Change(u64, u64),
        RetainBelow(u64),
        Shrink,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few distinct ids, so operations meet; values never 0 (vacant).
        let id = 0u64..48;
        prop_oneof![
            4 => (id.clone(), 1u64..1000).prop_map(|(i, v)| Op::Insert(i, v)),
            2 => id.clone().prop_map(Op::Remove),
            1 => (id, 1u64..1000).prop_map(|(i, v)| Op::Change(i, v)),
            1 => (1u64..1000).prop_map(Op::RetainBelow),
            1 => Just(Op::Shrink),
        ]
    }

    proptest! {
        /// Against a `HashMap`, with ids whose homes crowd together (the
        /// small id range multiplied into a few neighbourhoods) so that
        /// clusters, wrap-around and displacement all happen.
        #[test]
        fn the_table_behaves_as_a_map(
            ops in proptest::collection::vec(op(), 1..300),
            spread in prop_oneof![Just(1u64), Just(1 << 60), any::<u64>()],
        ) {
            let mut t = Table::new();
            let mut model: HashMap<u64, u64> = HashMap::new();
            let id_of = |i: u64| i.wrapping_mul(spread);
            for op in ops {
                match op {
                    Op::Insert(i, v) => {
                        let old = t.insert(pair(id_of(i), v)).map(|e| e.value);
                        prop_assert_eq!(old, model.insert(id_of(i), v));
                    }
                    Op::Remove(i) => {
                        let old = t.remove(id_of(i)).map(|e| e.value);
                        prop_assert_eq!(old, model.remove(&id_of(i)));
                    }
                    Op::Change(i, v) => {
                        if let Some(e) = t.get_mut(id_of(i)) {
                            e.value = v;
                        }
                        if let Some(m) = model.get_mut(&id_of(i)) {
                            *m = v;
                        }
                    }
                    Op::RetainBelow(limit) => {
                        let mut seen = 0;
                        t.retain(|e| { seen += 1; e.value < limit });
                        prop_assert_eq!(seen, model.len());
                        model.retain(|_, v| *v < limit);
                    }
                    Op::Shrink => t.shrink_if_sparse(),
                }
                prop_assert_eq!(t.len(), model.len());
                for i in 0..48 {
                    prop_assert_eq!(t.get(id_of(i)).map(|e| e.value), model.get(&id_of(i)).copied());
                }
                assert_well_formed(&t);
            }
        }
    }
}
