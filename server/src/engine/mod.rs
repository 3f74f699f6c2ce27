//! The engine: in-memory, synchronous, clock-injected state behind `Check`.
//!
//! It knows nothing of gRPC, keys or signatures. It holds token buckets,
//! window counters and remembered nonces in shards, and decides one request
//! against all of them atomically: [`Engine::decide`] locks every shard the
//! request touches, in ascending shard order (so two requests can never
//! deadlock), evaluates everything, and stores the outcome only if every part
//! passed.
//!
//! State is addressed by [`StateKey`]: a 64-bit keyed hash of what the state
//! counts, plus the shard of its *owner* (an API key id, or a request-limit
//! descriptor), so that all state of one key lives in one shard. 64 bits keep
//! a map entry at 16 bytes: the top byte names the entry's [`Pool`] (see
//! [`pools`]: what bounds client-made state), the next 16 bits are the
//! owner's [`Slot`] (which decides the shard here and the owning node in a
//! cluster), the low 40 bits hash owner and parts together. The hash is
//! keyed (SipHash-1-3; per process, or per cluster from the master key so
//! that every node computes the same ids), so a client cannot aim
//! collisions, and a chance collision is harmless in practice (two limits of
//! one pool sharing a bucket with probability ~n²/2⁵⁷ — 7·10⁻⁶ at a million
//! active entries — or a false REPLAY, never a false accept).

pub mod clock;
pub mod gcra;
pub mod nonce;
pub mod pools;
mod table;
pub mod window;

use std::hash::Hasher;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::{Mutex, MutexGuard};
use siphasher::sip::SipHasher13;
use smallvec::SmallVec;

pub use clock::{Clock, FakeClock, ForwardOnly, Nanos, SystemClock};
pub use gcra::{Gcra, LimitStep};
pub use nonce::{Claim, NonceSet};
use pools::{Full, PoolTable};
pub use pools::{Pool, PoolStats};
use table::Table;
pub use window::{Window, WindowKind, WindowState};

/// Where a piece of state lives: its hashed identity and its shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StateKey {
    pub id: u64,
    pub shard: u32,
}

/// Which of 65,536 groups an owner's state falls in: all state of one API
/// key (or one request-limit descriptor) shares a slot. A cluster assigns
/// slots, not keys, to nodes, so that a node can tell from an id alone who
/// owns it (and hand state over).
pub type Slot = u16;

/// How many slots there are.
pub const SLOTS: usize = 1 << 16;

const SLOT_SHIFT: u32 = 40;
const HASH_BITS: u64 = (1 << SLOT_SHIFT) - 1;

impl StateKey {
    /// The slot of the owner this state belongs to.
    pub fn slot(&self) -> Slot {
        slot_of(self.id)
    }
}

/// The slot carried in a state id.
pub fn slot_of(id: u64) -> Slot {
    (id >> SLOT_SHIFT) as Slot
}

/// The 16-byte secret state ids are keyed with. Every node of a cluster
/// must use the same one (derived from the shared master key); a single
/// process may use a random one.
#[derive(Clone, Copy)]
pub struct StateSeed([u8; 16]);

impl StateSeed {
    pub fn random() -> Self {
        Self(crate::crypto::random_bytes::<16>())
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    fn hasher(&self) -> SipHasher13 {
        SipHasher13::new_with_key(&self.0)
    }
}

impl std::fmt::Debug for StateSeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateSeed(..)")
    }
}

/// One rate-limit algorithm with its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Gcra(Gcra),
    Window(Window),
}

impl Limit {
    /// The policy's limit per period, as reported to clients.
    pub fn limit(&self) -> u64 {
        match self {
            Limit::Gcra(g) => g.limit(),
            Limit::Window(w) => w.limit(),
        }
    }
}

/// A replay key: the state id of a nonce (or of a `ts-body` signature, or
/// a webhook delivery), and 16 more bits of the same keyed hash. Why: all
/// of one API key's replay keys share its slot, so their ids differ in 40
/// bits only, and a request whose 40 bits matched a remembered one of the
/// same key was refused as a replay though it was new (one a 36 s at
/// 10,000 requests a second on one key, one an hour at 1,000). With the
/// 16 more they differ in 56.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayKey {
    pub key: StateKey,
    /// Never 0 when computed; 0 ([`ReplayKey::ANY`]) for one that came
    /// without it (from a node of the version before, or a state saved by
    /// it), which matches any.
    pub extra: u16,
}

impl ReplayKey {
    /// The extra bits of a replay key that came without them: it matches
    /// every replay key of its id, as every one did before they existed.
    pub const ANY: u16 = 0;

    /// A replay key that came as an id and its extra bits (0 when the
    /// sender had none).
    pub fn placed(engine: &Engine, id: u64, extra: u32) -> Self {
        Self {
            key: engine.placed(id),
            extra: Self::extra_from_wire(extra),
        }
    }

    /// Extra bits as they came on the wire or from a file: 0 from a sender
    /// of the version before, and any that no replay key has, match any.
    pub fn extra_from_wire(extra: u32) -> u16 {
        u16::try_from(extra).unwrap_or(Self::ANY)
    }
}

/// One request, as the engine sees it.
#[derive(Debug)]
pub struct Request<'a> {
    /// The replay key and when it may be forgotten, if the request has one.
    pub nonce: Option<(ReplayKey, Nanos)>,
    /// Every limit the request counts against.
    pub limits: &'a [(StateKey, Limit)],
    /// Tokens taken from every limit.
    pub cost: u64,
    /// False for a dry run: decide, but store nothing.
    pub commit: bool,
}

/// One piece of state as it moves between cluster nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A remembered nonce, its extra bits ([`ReplayKey`]) and the second it
    /// may be forgotten.
    Nonce {
        id: u64,
        extra: u16,
        forget_at_secs: u32,
    },
    /// A GCRA bucket's theoretical arrival time.
    Bucket { id: u64, tat: Nanos },
    /// A window's counts.
    Window { id: u64, state: WindowState },
}

impl Entry {
    pub fn id(&self) -> u64 {
        match *self {
            Entry::Nonce { id, .. } | Entry::Bucket { id, .. } | Entry::Window { id, .. } => id,
        }
    }
}

/// The verdict on one limit, without the state to store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitVerdict {
    pub allowed: bool,
    pub remaining: u64,
    pub reset_after: Nanos,
    pub retry_after: Option<Nanos>,
}

/// The engine's decision on a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The nonce was already used. Limits were not looked at.
    Replay,
    /// The nonce is new but there is no room left to remember it (the
    /// global nonce bound is reached); refusing is the only safe answer.
    NonceSetFull,
    /// A limit needs a new entry in a full pool and none could be evicted
    /// to make room. Nothing was stored.
    StateFull(Pool),
    /// Limits were evaluated; `allowed` when all of them passed. State was
    /// stored only if allowed and the request asked to commit.
    Limited { allowed: bool, limits: Verdicts },
}

/// The verdicts of one request's limits, in order; inline for the usual
/// handful, so a decision allocates nothing.
pub type Verdicts = SmallVec<[LimitVerdict; 4]>;

/// A GCRA bucket as a shard holds it: 16 bytes.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    id: u64,
    tat: Nanos,
}

impl Bucket {
    /// A TAT of 0 would read as a vacant slot; it is kept as 1 ns, which
    /// means the same (a full bucket) at every time after that nanosecond
    /// of 1970.
    fn new(id: u64, tat: Nanos) -> Self {
        Self {
            id,
            tat: tat.max(Nanos::new(1)),
        }
    }
}

impl table::Record for Bucket {
    const VACANT: Self = Bucket {
        id: 0,
        tat: Nanos::ZERO,
    };
    fn is_vacant(&self) -> bool {
        self.tat == Nanos::ZERO
    }
    fn id(&self) -> u64 {
        self.id
    }
}

/// A window's counts as a shard holds them.
#[derive(Clone, Copy, Debug)]
struct Counts {
    id: u64,
    state: WindowState,
}

impl Counts {
    /// Like a bucket's TAT, an `idle_at` of 0 is kept as 1 ns: idle either
    /// way.
    fn new(id: u64, mut state: WindowState) -> Self {
        state.idle_at = state.idle_at.max(Nanos::new(1));
        Self { id, state }
    }
}

impl table::Record for Counts {
    const VACANT: Self = Counts {
        id: 0,
        state: WindowState {
            index: 0,
            idle_at: Nanos::ZERO,
            prev: 0,
            cur: 0,
        },
    };
    fn is_vacant(&self) -> bool {
        self.state.idle_at == Nanos::ZERO
    }
    fn id(&self) -> u64 {
        self.id
    }
}

/// One shard: everything owned by the keys that hash to it.
#[derive(Debug)]
struct Shard {
    buckets: Table<Bucket>,
    windows: Table<Counts>,
    nonces: NonceSet,
    /// When this shard last swept itself because the nonce bound was hit.
    /// Such sweeps are rate-limited so a full set cannot turn every request
    /// into a scan of the shard.
    last_pressure_sweep: Nanos,
}

/// The state a limit's decision would store, and whether the limit held an
/// entry when it was decided (its shard stays locked until it is stored).
#[derive(Clone, Copy)]
enum Next {
    Bucket(Nanos, bool),
    Window(WindowState, bool),
}

impl Next {
    fn existed(&self) -> bool {
        match *self {
            Next::Bucket(_, existed) | Next::Window(_, existed) => existed,
        }
    }
}

/// What losing an entry forgives, to choose the one to evict: any bucket
/// before any window, a bucket by the time until it is full again, a
/// window by the requests it counts (then the sooner idle).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Worth {
    Bucket(Nanos),
    Window(u64, Nanos),
}

impl Shard {
    /// Every entry held here.
    fn len(&self) -> usize {
        self.buckets.len() + self.windows.len() + self.nonces.len()
    }

    /// Of the entries sampled here that are `wanted`, the one whose loss
    /// forgives the least, and how many were sampled.
    fn cheapest(&self, wanted: impl Fn(u64) -> bool, now: Nanos) -> Option<(usize, Worth, u64)> {
        let mut seen = 0;
        let bucket = self
            .buckets
            .iter()
            .take(EVICTION_SCAN / 2)
            .filter(|b| wanted(b.id))
            .take(EVICTION_SAMPLE)
            .inspect(|_| seen += 1)
            .map(|b| (Worth::Bucket(b.tat.saturating_sub(now)), b.id))
            .min();
        // Any bucket forgives less than any window: no need to look.
        if let Some((worth, id)) = bucket {
            return Some((seen, worth, id));
        }
        let window = self
            .windows
            .iter()
            .take(EVICTION_SCAN / 2)
            .filter(|c| wanted(c.id))
            .take(EVICTION_SAMPLE)
            .inspect(|_| seen += 1)
            .map(|c| {
                let w = &c.state;
                let counted = u64::from(w.cur) + u64::from(w.prev);
                (Worth::Window(counted, w.idle_at), c.id)
            })
            .min();
        window.map(|(worth, id)| (seen, worth, id))
    }

    /// One limit's verdict on `cost` at `now`, and the state to store if the
    /// whole request passes: the one place GCRA and windows are told apart.
    /// Also says whether the limit has an entry already, so that storing
    /// needs no second look to know whether a pool grows. Inlined: returned
    /// through memory, its result was read back before it was written.
    #[inline(always)]
    fn decide(&self, key: StateKey, limit: Limit, now: Nanos, cost: u64) -> (LimitVerdict, Next) {
        match limit {
            Limit::Gcra(g) => {
                let held = self.buckets.get(key.id).map(|b| b.tat);
                let v = g.decide(held, now, cost);
                (strip(&v), Next::Bucket(v.next, held.is_some()))
            }
            Limit::Window(w) => {
                let held = self.windows.get(key.id).map(|c| c.state);
                let v = w.decide(held, now, cost);
                (strip(&v), Next::Window(v.next, held.is_some()))
            }
        }
    }
}

/// Minimum time between two sweeps of one shard under nonce pressure.
const PRESSURE_SWEEP_EVERY: Nanos = Nanos::from_millis(100);
/// Making room in a full pool: entries looked at, at most, and candidates
/// compared. Bounded so a full pool costs a new entry microseconds, not a
/// scan of the shard.
const EVICTION_SCAN: usize = 4096;
const EVICTION_SAMPLE: usize = 32;
/// Other shards sampled, at most, when a new entry's own shard holds
/// fewer than [`EVICTION_SAMPLE`] of a full pool.
const EVICTION_SHARDS: usize = 4;

/// How much state the engine holds, for metrics and memory checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Occupancy {
    pub buckets: usize,
    pub windows: usize,
    pub nonces: usize,
}

/// The sharded state and the one way to change it.
#[derive(Debug)]
pub struct Engine {
    shards: Box<[Mutex<Shard>]>,
    seed: StateSeed,
    /// Nonces remembered across all shards, and the most allowed.
    nonce_count: AtomicUsize,
    nonce_capacity: usize,
    pools: PoolTable,
}

impl Engine {
    /// `shards` is rounded up to a power of two; `nonce_capacity` bounds the
    /// nonces remembered across all shards together. State ids are keyed
    /// with a random seed.
    pub fn new(shards: usize, nonce_capacity: usize) -> Self {
        Self::with_seed(shards, nonce_capacity, StateSeed::random())
    }

    /// Like [`Self::new`], with the seed state ids are keyed with (the same
    /// on every node of a cluster). At most [`SLOTS`] shards.
    pub fn with_seed(shards: usize, nonce_capacity: usize, seed: StateSeed) -> Self {
        let count = shards.clamp(1, SLOTS).next_power_of_two();
        let shards = (0..count)
            .map(|_| {
                Mutex::new(Shard {
                    buckets: Table::new(),
                    windows: Table::new(),
                    nonces: NonceSet::new(),
                    last_pressure_sweep: Nanos::ZERO,
                })
            })
            .collect();
        Self {
            shards,
            seed,
            nonce_count: AtomicUsize::new(0),
            nonce_capacity,
            pools: PoolTable::new(usize::MAX),
        }
    }

    /// The seed state ids are keyed with.
    pub fn seed(&self) -> StateSeed {
        self.seed
    }

    /// The pools of client-made state: their caps, counts and names.
    pub fn pools(&self) -> &PoolTable {
        &self.pools
    }

    /// The key of a piece of state: `owner` (an API key id or a descriptor)
    /// and `parts` say what it counts; `owner` alone decides the shard. Parts are length-prefixed, so ("ab","c") and
    /// ("a","bc") differ. The hash is keyed per process, so clients cannot
    /// aim collisions.
    pub fn key(&self, owner: &[u8], parts: &[&[u8]]) -> StateKey {
        self.key_in(Pool::KEYS, owner, parts)
    }

    /// Like [`Self::key`], for state that belongs to `pool`.
    pub fn key_in(&self, pool: Pool, owner: &[u8], parts: &[&[u8]]) -> StateKey {
        self.hashed(pool, owner, parts).0
    }

    /// The replay key of `parts` (a nonce, a signature, a delivery id)
    /// under `owner` (the API key or webhook source): [`Self::key`] and the
    /// next 16 bits of the same hash.
    pub fn replay_key(&self, owner: &[u8], parts: &[&[u8]]) -> ReplayKey {
        let (key, hash) = self.hashed(Pool::KEYS, owner, parts);
        let extra = (hash >> SLOT_SHIFT) as u16;
        ReplayKey {
            key,
            // 0 stands for "came without": a computed 0 is told as 1.
            extra: extra.max(1),
        }
    }

    /// The key of `parts` under `owner` in `pool`, and the whole keyed hash
    /// its id took its low bits from.
    fn hashed(&self, pool: Pool, owner: &[u8], parts: &[&[u8]]) -> (StateKey, u64) {
        // One keyed hash: the owner's prefix decides the slot (and so the
        // shard), the whole (owner and parts) the id, so the owner is
        // hashed once.
        let mut h = self.seed.hasher();
        h.write_u64(owner.len() as u64);
        h.write(owner);
        let slot = (h.clone().finish() >> 48) as Slot;
        for part in parts {
            h.write_u64(part.len() as u64);
            h.write(part);
        }
        let hash = h.finish();
        let id = (u64::from(slot) << SLOT_SHIFT) | (hash & HASH_BITS);
        (self.placed(pool.tag(id)), hash)
    }

    /// The key of a state id computed elsewhere (by another node with the
    /// same seed): its shard follows from its slot.
    pub fn placed(&self, id: u64) -> StateKey {
        let shard_mask = self.shards.len() as u32 - 1;
        StateKey {
            id,
            shard: u32::from(slot_of(id)) & shard_mask,
        }
    }

    /// Decides `request` at `now`, atomically across every shard it touches.
    pub fn decide(&self, now: Nanos, request: &Request<'_>) -> Outcome {
        // Requests touch a handful of shards: keep the bookkeeping on the
        // stack (this is the hot path).
        // Built in place with pushes, not collected: a collected SmallVec is
        // moved out of the iterator's frame, and that copy (read back before
        // its stores land) cost more than the lock.
        let mut locked: SmallVec<[u32; 8]> = SmallVec::new();
        if let Some((replay, _)) = &request.nonce {
            locked.push(replay.key.shard);
        }
        for (key, _) in request.limits {
            locked.push(key.shard);
        }
        if locked.len() > 1 {
            locked.sort_unstable();
            locked.dedup();
        }
        // Ascending order: the one rule that keeps multi-shard locking
        // deadlock-free.
        let mut guards: SmallVec<[MutexGuard<'_, Shard>; 8]> = SmallVec::new();
        for &i in &locked {
            guards.push(self.shards[i as usize].lock());
        }
        let shard = |k: &StateKey| -> usize {
            locked
                .binary_search(&k.shard)
                .expect("every touched shard is locked")
        };

        if let Some((replay, _)) = &request.nonce {
            let i = shard(&replay.key);
            if guards[i].nonces.probe(*replay, now) == Claim::Seen {
                return Outcome::Replay;
            }
            if request.commit && self.nonce_count.load(Ordering::Relaxed) >= self.nonce_capacity {
                let s = &mut guards[i];
                if now.saturating_sub(s.last_pressure_sweep) >= PRESSURE_SWEEP_EVERY {
                    s.last_pressure_sweep = now;
                    let removed = s.nonces.sweep_all(now);
                    self.nonce_count.fetch_sub(removed, Ordering::Relaxed);
                }
                if self.nonce_count.load(Ordering::Relaxed) >= self.nonce_capacity {
                    return Outcome::NonceSetFull;
                }
            }
        }

        let mut verdicts = Verdicts::new();
        let mut updates: SmallVec<[Next; 8]> = SmallVec::new();
        for (key, limit) in request.limits {
            let (verdict, next) = guards[shard(key)].decide(*key, *limit, now, request.cost);
            verdicts.push(verdict);
            updates.push(next);
        }
        let allowed = verdicts.iter().all(|v| v.allowed);
        if !allowed {
            // Nothing is taken, so limits that would have passed report their
            // state as it stays: a cost-0 look.
            for ((key, limit), verdict) in request.limits.iter().zip(verdicts.iter_mut()) {
                if verdict.allowed {
                    let (untouched, _) = guards[shard(key)].decide(*key, *limit, now, 0);
                    verdict.remaining = untouched.remaining;
                    verdict.reset_after = untouched.reset_after;
                }
            }
        }

        if allowed && request.commit {
            // Room for every new entry in a counted pool first: a request
            // that cannot be stored whole is stored not at all.
            let mut reserved: SmallVec<[Pool; 8]> = SmallVec::new();
            for ((key, _), next) in request.limits.iter().zip(&updates) {
                let pool = Pool::of(key.id);
                if next.existed() || !pool.is_counted() || reserved.contains(&pool) {
                    continue;
                }
                let s = &mut guards[shard(key)];
                if let Some(full) = self.pools.full(pool)
                    && !self.make_room(s, &locked, key.shard, full, pool, now)
                {
                    self.pools.note_refusal(pool);
                    for &p in &reserved {
                        self.pools.removed(p);
                    }
                    return Outcome::StateFull(pool);
                }
                self.pools.added(pool);
                reserved.push(pool);
            }
            if let Some((replay, forget_at)) = &request.nonce {
                let i = shard(&replay.key);
                if guards[i].nonces.insert(*replay, *forget_at, now) {
                    self.nonce_count.fetch_add(1, Ordering::Relaxed);
                }
            }
            // By reference: moving `updates` into the loop copied all of it.
            for ((key, _), next) in request.limits.iter().zip(&updates) {
                let i = shard(key);
                let s = &mut guards[i];
                let new = match *next {
                    Next::Bucket(tat, _) => s.buckets.insert(Bucket::new(key.id, tat)).is_none(),
                    Next::Window(state, _) => {
                        s.windows.insert(Counts::new(key.id, state)).is_none()
                    }
                };
                // Reserved above, once per pool; a second new entry of the
                // same pool in one request is counted here.
                let pool = Pool::of(key.id);
                if new && pool.is_counted() {
                    match reserved.iter().position(|&p| p == pool) {
                        Some(at) => {
                            reserved.swap_remove(at);
                        }
                        None => self.pools.added(pool),
                    }
                }
            }
        }
        Outcome::Limited {
            allowed,
            limits: verdicts,
        }
    }

    /// Forgets a replay key, so that its request may be accepted once more:
    /// a `Forget`, for a delivery whose processing failed. Whether it was
    /// remembered.
    pub fn forget(&self, replay: ReplayKey) -> bool {
        let removed = self.shards[replay.key.shard as usize]
            .lock()
            .nonces
            .remove(replay);
        self.nonce_count.fetch_sub(removed, Ordering::Relaxed);
        removed > 0
    }

    /// Gives back what a committed, allowed `request` took at `taken_at`: its
    /// nonce is forgotten and its cost returned to every limit. For a check
    /// spanning cluster nodes that took its share here and was then refused
    /// elsewhere (or never confirmed). Requests taken since keep theirs: a
    /// bucket's TAT moves back by the cost, a window's count drops by it in
    /// the window it was counted in (or, one window later, in the previous
    /// count); an older window has no trace of it left.
    pub fn refund(&self, taken_at: Nanos, request: &Request<'_>) {
        let mut touched: SmallVec<[u32; 8]> = request
            .nonce
            .iter()
            .map(|(r, _)| r.key.shard)
            .chain(request.limits.iter().map(|(k, _)| k.shard))
            .collect();
        touched.sort_unstable();
        touched.dedup();
        let mut guards: SmallVec<[MutexGuard<'_, Shard>; 8]> = touched
            .iter()
            .map(|&i| self.shards[i as usize].lock())
            .collect();
        let shard = |k: &StateKey| touched.binary_search(&k.shard).expect("locked");
        if let Some((replay, _)) = &request.nonce {
            let removed = guards[shard(&replay.key)].nonces.remove(*replay);
            self.nonce_count.fetch_sub(removed, Ordering::Relaxed);
        }
        for (key, limit) in request.limits {
            let s = &mut guards[shard(key)];
            match limit {
                Limit::Gcra(g) => {
                    if let Some(b) = s.buckets.get_mut(key.id) {
                        let tat = b
                            .tat
                            .saturating_sub(g.interval().saturating_mul(request.cost));
                        *b = Bucket::new(key.id, tat);
                    }
                }
                Limit::Window(w) => {
                    if let Some(c) = s.windows.get_mut(key.id) {
                        let mut state = c.state;
                        w.refund(&mut state, taken_at, request.cost);
                        *c = Counts::new(key.id, state);
                    }
                }
            }
        }
    }

    /// Makes room in a full pool (any counted pool when the global cap is
    /// full) by evicting, of the entries sampled, the one whose loss
    /// forgives the least: the bucket closest to full again, or the window
    /// with the fewest requests counted. Whether room was made.
    ///
    /// Sampled from `own`, the locked shard the new entry goes to, and,
    /// while fewer than [`EVICTION_SAMPLE`] were found, from up to
    /// [`EVICTION_SHARDS`] other shards holding some (`near` their order
    /// on from `own`'s index, `held` skipped: already locked by the
    /// caller). A pool capped low spreads a few entries over each shard:
    /// sampled from one shard alone, a spent limit that happened to be the
    /// only one of its pool there was evicted by the next junk entry to
    /// land there, and the flood bought it a fresh window. `try_lock` for
    /// the others, so the one lock order rule still holds: nothing ever
    /// waits here.
    fn make_room(
        &self,
        own: &mut Shard,
        held: &[u32],
        near: u32,
        full: Full,
        pool: Pool,
        now: Nanos,
    ) -> bool {
        let wanted = |id: u64| match full {
            Full::Pool => Pool::of(id) == pool,
            Full::Total => Pool::of(id).is_counted(),
        };
        let (mut found, mut best) = match own.cheapest(wanted, now) {
            Some((seen, worth, id)) => (seen, Some((worth, None, id))),
            None => (0, None),
        };
        let mut others: SmallVec<[MutexGuard<'_, Shard>; EVICTION_SHARDS]> = SmallVec::new();
        let count = self.shards.len() as u32;
        for i in (1..count)
            .map(|step| (near + step) % count)
            .filter(|i| held.binary_search(i).is_err())
        {
            if found >= EVICTION_SAMPLE || others.len() == EVICTION_SHARDS {
                break;
            }
            let Some(other) = self.shards[i as usize].try_lock() else {
                continue;
            };
            if let Some((seen, worth, id)) = other.cheapest(wanted, now) {
                found += seen;
                if best.is_none_or(|(least, _, _)| worth < least) {
                    best = Some((worth, Some(others.len()), id));
                }
                others.push(other);
            }
        }
        let Some((_, at, id)) = best else {
            return false;
        };
        let shard = match at {
            None => own,
            Some(k) => &mut *others[k],
        };
        if shard.buckets.remove(id).is_none() {
            shard.windows.remove(id);
        }
        self.pools.removed(Pool::of(id));
        self.pools.note_eviction(Pool::of(id));
        true
    }

    /// Drops all state that no longer matters at `now`: full buckets, aged-out
    /// windows and forgettable nonces. Locks one shard at a time, briefly.
    ///
    /// Nonces past their time in a table it visited in the last few
    /// seconds stay until the next visit ([`NonceSet::sweep`]), except when
    /// the nonces held come near the capacity: a check refused for room
    /// sweeps only its own shard, and a hot key's shard cannot make room
    /// that the other shards hold.
    pub fn sweep(&self, now: Nanos) -> Occupancy {
        let mut removed = Occupancy::default();
        let pools = &self.pools;
        let near_capacity = self.nonce_count.load(Ordering::Relaxed) >= self.nonce_capacity / 8 * 7;
        for shard in self.shards.iter() {
            let mut s = shard.lock();
            let before = (s.buckets.len(), s.windows.len());
            let forget = |id: u64| {
                pools.removed(Pool::of(id));
                false
            };
            s.buckets
                .retain(|b| !Gcra::is_idle(b.tat, now) || forget(b.id));
            s.windows
                .retain(|c| !Window::is_idle(&c.state, now) || forget(c.id));
            s.buckets.shrink_if_sparse();
            s.windows.shrink_if_sparse();
            removed.buckets += before.0 - s.buckets.len();
            removed.windows += before.1 - s.windows.len();
            let nonces = if near_capacity {
                s.nonces.sweep_all(now)
            } else {
                s.nonces.sweep(now)
            };
            self.nonce_count.fetch_sub(nonces, Ordering::Relaxed);
            removed.nonces += nonces;
        }
        removed
    }

    /// Removes and returns every entry whose slot `wanted` names, as one
    /// list: for tests. A node's handover and a process's save take them
    /// a shard at a time instead ([`Self::take_each`]).
    #[cfg(test)]
    pub fn take_slots(&self, wanted: impl Fn(Slot) -> bool, now: Nanos) -> Vec<Entry> {
        let mut taken = Vec::new();
        self.gather(wanted, now, true, |shard| taken.extend_from_slice(shard));
        taken
    }

    /// Removes every entry whose slot `wanted` names, handing them to
    /// `each` a shard at a time: a process's final save, or the state a
    /// cluster node hands to the slots' new owners, written or batched as
    /// it is taken. The caller makes sure no check writes to those slots
    /// meanwhile.
    pub fn take_each(&self, wanted: impl Fn(Slot) -> bool, now: Nanos, each: impl FnMut(&[Entry])) {
        self.gather(wanted, now, true, each)
    }

    /// Every entry, left in place, handed to `each` a shard at a time: a
    /// checkpoint of the state while checks go on. One shard at a time, so
    /// it is no single moment's state, but each entry is one the engine
    /// held (see `saved_state`).
    pub fn copy_each(&self, now: Nanos, each: impl FnMut(&[Entry])) {
        self.gather(|_| true, now, false, each)
    }

    /// Walks the shards one at a time and hands `each` what one holds of
    /// the slots `wanted` names, removed when `remove`. One list serves
    /// every shard, so a walk over the whole state holds a copy of its
    /// largest shard, never of all of it: a checkpoint of a 192 MB state
    /// once took 580 MB more at its peak, every `save_state_every`.
    fn gather(
        &self,
        wanted: impl Fn(Slot) -> bool,
        now: Nanos,
        remove: bool,
        mut each: impl FnMut(&[Entry]),
    ) {
        let mut here: Vec<Entry> = Vec::new();
        for shard in self.shards.iter() {
            // The list is sized, and its fresh pages touched, before the
            // walk: faulted in under the lock, they held checks on this
            // shard up to 1.4-2.9 ms at 11M entries, against 0.8-1.0 ms for
            // the walk alone. Room to spare for what arrives between the
            // two locks.
            let held = shard.lock().len();
            let room = held + held / 8 + 64;
            here.clear();
            if here.capacity() < room {
                // Exact: grown by doubling, the list would hold (and touch)
                // up to twice the largest shard.
                here.reserve_exact(room);
                here.resize(
                    here.capacity(),
                    Entry::Nonce {
                        id: 0,
                        extra: 0,
                        forget_at_secs: 0,
                    },
                );
                here.clear();
            }
            let mut s = shard.lock();
            let pools = &self.pools;
            s.buckets.retain(|&mut Bucket { id, tat }| {
                if !wanted(slot_of(id)) {
                    return true;
                }
                here.push(Entry::Bucket { id, tat });
                if remove {
                    pools.removed(Pool::of(id));
                }
                !remove
            });
            s.windows.retain(|&mut Counts { id, state }| {
                if !wanted(slot_of(id)) {
                    return true;
                }
                here.push(Entry::Window { id, state });
                if remove {
                    pools.removed(Pool::of(id));
                }
                !remove
            });
            let nonces_before = s.nonces.len();
            s.nonces.gather(
                |id| wanted(slot_of(id)),
                now,
                remove,
                |id, extra, forget_at_secs| {
                    here.push(Entry::Nonce {
                        id,
                        extra,
                        forget_at_secs,
                    })
                },
            );
            let nonces = nonces_before - s.nonces.len();
            drop(s);
            self.nonce_count.fetch_sub(nonces, Ordering::Relaxed);
            each(&here);
        }
    }

    /// Merges entries handed over by another node, or taken back from a
    /// saved state (with ids tagged with this engine's pools). What is
    /// already here and says more wins: the later TAT, the later nonce
    /// expiry, the larger window counts.
    ///
    /// The caps hold whatever arrives. A new bucket or window in a full
    /// pool gets its room as a request's does, by evicting the sampled
    /// entry whose loss forgives the least; if none can be, it is dropped.
    /// So a pool an attacker filled with junk before a rolling restart
    /// gives up its junk, not the limits clients spent on the node that
    /// left (dropped, each admitted its burst once more). Without the
    /// caps, nodes at their caps that left one by one handed the last one
    /// several caps' worth. One that no longer says anything (a bucket
    /// full again, an idle window) is not stored at all. Nonces are kept
    /// whatever the capacity: one dropped could be replayed. Returns how
    /// many entries were lost for the caps (evicted or dropped).
    pub fn import(&self, entries: &[Entry], now: Nanos) -> usize {
        let mut dropped = 0;
        for entry in entries {
            let key = self.placed(entry.id());
            let pool = Pool::of(entry.id());
            let mut s = self.shards[key.shard as usize].lock();
            // At a full pool, one entry is lost for the caps either way:
            // the one evicted, or this one.
            let mut no_room = |s: &mut Shard| {
                let Some(full) = self.pools.full(pool) else {
                    return false;
                };
                dropped += 1;
                !self.make_room(s, &[key.shard], key.shard, full, pool, now)
            };
            let new = match *entry {
                Entry::Bucket { id, tat } => {
                    if let Some(here) = s.buckets.get_mut(id) {
                        here.tat = here.tat.max(tat);
                        false
                    } else if Gcra::is_idle(tat, now) || no_room(&mut s) {
                        false
                    } else {
                        s.buckets.insert(Bucket::new(id, tat)).is_none()
                    }
                }
                Entry::Window { id, state } => {
                    if let Some(here) = s.windows.get_mut(id) {
                        let w = &mut here.state;
                        if w.index == state.index {
                            w.prev = w.prev.max(state.prev);
                            w.cur = w.cur.max(state.cur);
                        } else if w.index < state.index {
                            *here = Counts::new(id, state);
                        }
                        false
                    } else if Window::is_idle(&state, now) || no_room(&mut s) {
                        false
                    } else {
                        s.windows.insert(Counts::new(id, state)).is_none()
                    }
                }
                Entry::Nonce {
                    extra,
                    forget_at_secs,
                    ..
                } => {
                    if s.nonces
                        .merge(ReplayKey { key, extra }, forget_at_secs, now)
                    {
                        self.nonce_count.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
            };
            if new && pool.is_counted() {
                self.pools.added(pool);
            }
        }
        dropped
    }

    /// What is held right now.
    pub fn occupancy(&self) -> Occupancy {
        let mut total = Occupancy::default();
        for shard in self.shards.iter() {
            let s = shard.lock();
            total.buckets += s.buckets.len();
            total.windows += s.windows.len();
            total.nonces += s.nonces.len();
        }
        total
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }
}

fn strip<S>(v: &LimitStep<S>) -> LimitVerdict {
    LimitVerdict {
        allowed: v.allowed,
        remaining: v.remaining,
        reset_after: v.reset_after,
        retry_after: v.retry_after,
    }
}

#[cfg(test)]
mod tests;
