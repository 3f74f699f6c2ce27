//! Bounds on the state clients can make the engine hold.
//!
//! An API key's own state (its policies' buckets and windows) is bounded by
//! the keys an admin created. Request limits are not: their descriptors
//! (an IP address, a user name) come from the request, so a client that can
//! vary them can grow memory without end; failure budgets, charged to the
//! source of a failure, likewise. Such state lives in a [`Pool`]: one per
//! request-limit policy and one for failure budgets, each with an optional
//! cap, and all of them under one global cap.
//!
//! When a new entry would exceed a cap, the engine makes room by evicting
//! the sampled entry of that pool (any pool for the global cap) whose loss
//! forgives the least: the bucket closest to full again, the window with
//! the fewest requests. The sample is taken from the new entry's shard
//! and, while that holds few of the pool, from a few other shards free at
//! that moment: a pool capped low holds only a few entries per shard. An
//! evicted bucket or window starts afresh if its descriptor comes back, so
//! a flood can buy back at most what the evicted entries held, and junk
//! entries made by one request each are the cheapest to lose. If no entry
//! can be evicted, the request is refused rather than counted against
//! nothing. Nonces are never evicted: forgetting one would allow a replay;
//! they have their own bound (`nonce_capacity`), where the engine refuses.
//!
//! The pool of an entry is kept in the top byte of its 64-bit id, so entries
//! stay 16 bytes and a sweep knows which count to lower.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::RwLock;

/// Which bounded group a piece of state belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pool(u8);

impl Pool {
    /// State owned by API keys: bounded by the keys themselves, never
    /// evicted, not counted.
    pub const KEYS: Pool = Pool(0);
    /// Failure budgets, by source.
    pub const FAILURES: Pool = Pool(1);
    /// Where policies beyond the first 253 share one count.
    const SHARED: Pool = Pool(255);
    const FIRST_POLICY: u8 = 2;

    pub fn index(self) -> usize {
        usize::from(self.0)
    }

    /// The pool an id was made for.
    pub fn of(id: u64) -> Pool {
        Pool((id >> 56) as u8)
    }

    /// `id` (a keyed hash) with the pool in its top byte.
    pub fn tag(self, id: u64) -> u64 {
        (id & ((1u64 << 56) - 1)) | (u64::from(self.0) << 56)
    }

    pub fn is_counted(self) -> bool {
        self != Pool::KEYS
    }
}

const POOLS: usize = 256;
/// "No cap".
const UNCAPPED: usize = usize::MAX;

/// How full one pool is, for metrics and alerts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolStats {
    pub name: String,
    pub entries: usize,
    pub cap: Option<usize>,
    /// Entries evicted to make room, since start.
    pub evicted: u64,
    /// Requests refused because no room could be made, since start.
    pub refused: u64,
}

/// The policies that have a pool of their own, both ways: policy `i` in
/// registration order has pool `FIRST_POLICY + i`.
#[derive(Debug, Default)]
struct Names {
    pools: HashMap<String, Pool>,
    in_order: Vec<String>,
}

impl Names {
    /// The policy name of `pool`, if it is a policy's own pool.
    fn of(&self, pool: Pool) -> Option<&str> {
        let i = pool.index().checked_sub(usize::from(Pool::FIRST_POLICY))?;
        self.in_order.get(i).map(String::as_str)
    }
}

/// Counts and caps of every pool.
#[derive(Debug)]
pub struct PoolTable {
    names: RwLock<Names>,
    caps: Box<[AtomicUsize]>,
    counts: Box<[AtomicUsize]>,
    evicted: Box<[AtomicU64]>,
    refused: Box<[AtomicU64]>,
    total: AtomicUsize,
    total_cap: AtomicUsize,
}

impl PoolTable {
    pub fn new(total_cap: usize) -> Self {
        let atomics = |v: usize| (0..POOLS).map(|_| AtomicUsize::new(v)).collect();
        let counters = || (0..POOLS).map(|_| AtomicU64::new(0)).collect();
        Self {
            names: RwLock::new(Names::default()),
            caps: atomics(UNCAPPED),
            counts: atomics(0),
            evicted: counters(),
            refused: counters(),
            total: AtomicUsize::new(0),
            total_cap: AtomicUsize::new(total_cap),
        }
    }

    /// The pool of a request-limit policy, made on first use. A name keeps
    /// its pool for the life of the process.
    pub fn policy(&self, name: &str) -> Pool {
        if let Some(&pool) = self.names.read().pools.get(name) {
            return pool;
        }
        let mut names = self.names.write();
        if let Some(&pool) = names.pools.get(name) {
            return pool;
        }
        let next = Pool::FIRST_POLICY as usize + names.in_order.len();
        if next >= Pool::SHARED.index() {
            return Pool::SHARED;
        }
        let pool = Pool(next as u8);
        names.pools.insert(name.to_owned(), pool);
        names.in_order.push(name.to_owned());
        pool
    }

    /// How a pool is named between cluster nodes, whose pool numbers differ:
    /// `keys`, `failures`, `policy:<name>` or `other-policies`.
    pub fn wire_name(&self, pool: Pool) -> String {
        match pool {
            Pool::KEYS => "keys".to_owned(),
            Pool::FAILURES => "failures".to_owned(),
            Pool::SHARED => "other-policies".to_owned(),
            _ => self
                .names
                .read()
                .of(pool)
                .map_or_else(|| "other-policies".to_owned(), |n| format!("policy:{n}")),
        }
    }

    /// [`Self::wire_name`] of every pool, indexed by pool number.
    pub fn wire_names(&self) -> Vec<String> {
        (0..=u8::MAX).map(|i| self.wire_name(Pool(i))).collect()
    }

    /// The pool a [`Self::wire_name`] stands for here; `None` when it is
    /// not one. A policy name is taken as it is: check it first.
    pub fn from_wire_name(&self, name: &str) -> Option<Pool> {
        match name {
            "keys" => Some(Pool::KEYS),
            "failures" => Some(Pool::FAILURES),
            "other-policies" => Some(Pool::SHARED),
            // The caller has checked the name is a policy name.
            _ => name.strip_prefix("policy:").map(|n| self.policy(n)),
        }
    }

    pub fn set_cap(&self, pool: Pool, cap: Option<usize>) {
        self.caps[pool.index()].store(cap.unwrap_or(UNCAPPED), Ordering::Relaxed);
    }

    pub fn set_total_cap(&self, cap: usize) {
        self.total_cap.store(cap, Ordering::Relaxed);
    }

    /// Whether one more entry of `pool` would exceed a cap, and which.
    pub fn full(&self, pool: Pool) -> Option<Full> {
        if !pool.is_counted() {
            return None;
        }
        if self.counts[pool.index()].load(Ordering::Relaxed)
            >= self.caps[pool.index()].load(Ordering::Relaxed)
        {
            return Some(Full::Pool);
        }
        (self.total.load(Ordering::Relaxed) >= self.total_cap.load(Ordering::Relaxed))
            .then_some(Full::Total)
    }

    pub fn added(&self, pool: Pool) {
        if pool.is_counted() {
            self.counts[pool.index()].fetch_add(1, Ordering::Relaxed);
            self.total.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn removed(&self, pool: Pool) {
        if pool.is_counted() {
            self.counts[pool.index()].fetch_sub(1, Ordering::Relaxed);
            self.total.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn note_eviction(&self, pool: Pool) {
        self.evicted[pool.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn note_refusal(&self, pool: Pool) {
        self.refused[pool.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Entries in counted pools, all together.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Every counted pool in use.
    pub fn stats(&self) -> Vec<PoolStats> {
        let names = self.names.read();
        let first = usize::from(Pool::FIRST_POLICY);
        let named = std::iter::once((Pool::FAILURES.index(), "failures".to_owned()))
            .chain((first..).zip(names.in_order.iter().cloned()))
            .chain(std::iter::once((
                Pool::SHARED.index(),
                "other-policies".to_owned(),
            )))
            .collect::<Vec<_>>();
        drop(names);
        named
            .into_iter()
            .map(|(i, name)| {
                let cap = self.caps[i].load(Ordering::Relaxed);
                PoolStats {
                    name,
                    entries: self.counts[i].load(Ordering::Relaxed),
                    cap: (cap != UNCAPPED).then_some(cap),
                    evicted: self.evicted[i].load(Ordering::Relaxed),
                    refused: self.refused[i].load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}

/// Which cap a new entry would exceed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// The pool's own cap: make room within the pool.
    Pool,
    /// The global cap: make room in any counted pool.
    Total,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_rides_in_the_top_byte_and_survives_any_id() {
        for id in [0, u64::MAX, 0x0123_4567_89ab_cdef] {
            let tagged = Pool::FAILURES.tag(id);
            assert_eq!(Pool::of(tagged), Pool::FAILURES);
            assert_eq!(tagged << 8, id << 8);
        }
        assert_eq!(Pool::of(Pool::KEYS.tag(u64::MAX)), Pool::KEYS);
    }

    #[test]
    fn policies_keep_their_pool_and_the_253rd_on_share_one() {
        let t = PoolTable::new(10);
        let a = t.policy("a");
        assert_eq!(t.policy("a"), a);
        assert_ne!(t.policy("b"), a);
        for i in 0..300 {
            t.policy(&format!("p{i}"));
        }
        assert_eq!(t.policy("p299"), Pool::SHARED);
        assert_eq!(t.policy("a"), a);
    }

    #[test]
    fn caps_are_per_pool_and_global() {
        let t = PoolTable::new(3);
        let p = t.policy("login");
        t.set_cap(p, Some(2));
        assert_eq!(t.full(p), None);
        t.added(p);
        t.added(p);
        assert_eq!(t.full(p), Some(Full::Pool));
        assert_eq!(t.full(Pool::FAILURES), None);
        t.added(Pool::FAILURES);
        assert_eq!(t.full(Pool::FAILURES), Some(Full::Total));
        assert_eq!(t.full(Pool::KEYS), None, "key state is never capped");
        t.removed(p);
        assert_eq!(t.full(p), None);
        assert_eq!(t.total(), 2);
        t.added(Pool::FAILURES);
        assert_eq!(t.full(p), Some(Full::Total));
    }
}
