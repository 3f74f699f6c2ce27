//! Properties of the sharded engine as a whole: atomic commit, exactly one
//! winner in replay races, eviction that follows the active keys.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

const SEC: Nanos = Nanos::from_secs(1);

fn gcra(limit: u64, burst: u64) -> Limit {
    Limit::Gcra(Gcra::new(limit, SEC, burst))
}

#[test]
fn a_denied_request_takes_no_tokens_and_stores_no_nonce() {
    let engine = Engine::new(8, 1000);
    let plenty = (engine.key(b"k", &[b"plenty"]), gcra(100, 100));
    let scarce = (engine.key(b"other", &[b"scarce"]), gcra(1, 1));
    let nonce = engine.replay_key(b"k", &[b"nonce", b"n1"]);

    // Use up the scarce limit.
    let first = Request {
        nonce: None,
        limits: &[scarce],
        cost: 1,
        commit: true,
    };
    assert!(matches!(
        engine.decide(Nanos::ZERO, &first),
        Outcome::Limited { allowed: true, .. }
    ));

    let both = [plenty, scarce];
    let denied = Request {
        nonce: Some((nonce, 10 * SEC)),
        limits: &both,
        cost: 1,
        commit: true,
    };
    let Outcome::Limited {
        allowed: false,
        limits,
    } = engine.decide(Nanos::ZERO, &denied)
    else {
        panic!("expected a denial");
    };
    assert!(limits[0].allowed && !limits[1].allowed);
    // It reports the plenty limit as it stays: untouched.
    assert_eq!(limits[0].remaining, 100);

    // The plenty limit still has all 100 tokens and the nonce is unused.
    let probe = Request {
        nonce: Some((nonce, 10 * SEC)),
        limits: &[plenty],
        cost: 1,
        commit: false,
    };
    let Outcome::Limited {
        allowed: true,
        limits,
    } = engine.decide(Nanos::ZERO, &probe)
    else {
        panic!("nonce must not have been stored");
    };
    assert_eq!(limits[0].remaining, 99);
}

#[test]
fn a_dry_run_changes_nothing() {
    let engine = Engine::new(4, 100);
    let limit = (engine.key(b"k", &[b"p"]), gcra(1, 1));
    let nonce = engine.replay_key(b"k", &[b"n"]);
    let dry = Request {
        nonce: Some((nonce, SEC)),
        limits: &[limit],
        cost: 1,
        commit: false,
    };
    for _ in 0..3 {
        assert!(matches!(
            engine.decide(Nanos::ZERO, &dry),
            Outcome::Limited { allowed: true, .. }
        ));
    }
    assert_eq!(engine.occupancy(), Occupancy::default());
}

#[test]
fn a_replayed_nonce_is_refused_until_it_may_be_forgotten() {
    let engine = Engine::new(4, 100);
    let nonce = engine.replay_key(b"k", &[b"n"]);
    let req = Request {
        nonce: Some((nonce, 5 * SEC)),
        limits: &[],
        cost: 1,
        commit: true,
    };
    assert!(matches!(
        engine.decide(Nanos::ZERO, &req),
        Outcome::Limited { allowed: true, .. }
    ));
    assert_eq!(
        engine.decide(5 * SEC - Nanos::new(1), &req),
        Outcome::Replay
    );
    engine.sweep(5 * SEC);
    assert_eq!(engine.occupancy().nonces, 0);
}

#[test]
fn concurrent_identical_requests_have_exactly_one_winner() {
    for round in 0..20u8 {
        let engine = Arc::new(Engine::new(16, 10_000));
        let wins = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (engine, wins) = (engine.clone(), wins.clone());
                std::thread::spawn(move || {
                    let limits = [
                        (engine.key(b"k", &[b"p"]), gcra(1000, 1000)),
                        (engine.key(b"d", &[b"q"]), gcra(1000, 1000)),
                    ];
                    let nonce = engine.replay_key(b"k", &[b"nonce", &[round]]);
                    let req = Request {
                        nonce: Some((nonce, SEC)),
                        limits: &limits,
                        cost: 1,
                        commit: true,
                    };
                    if matches!(
                        engine.decide(Nanos::ZERO, &req),
                        Outcome::Limited { allowed: true, .. }
                    ) {
                        wins.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(wins.load(Ordering::SeqCst), 1);
    }
}

#[test]
fn requests_locking_shards_in_opposite_orders_do_not_deadlock() {
    let engine = Arc::new(Engine::new(64, 10));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                for i in 0..2_000u32 {
                    let a = (
                        engine.key(&i.to_le_bytes(), &[b"a"]),
                        gcra(1_000_000, 1_000_000),
                    );
                    let b = (
                        engine.key(&(i + 7).to_le_bytes(), &[b"b"]),
                        gcra(1_000_000, 1_000_000),
                    );
                    let limits = if t % 2 == 0 { [a, b] } else { [b, a] };
                    engine.decide(
                        Nanos::ZERO,
                        &Request {
                            nonce: None,
                            limits: &limits,
                            cost: 1,
                            commit: true,
                        },
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn memory_follows_active_keys_not_every_key_ever_seen() {
    let engine = Engine::new(8, 100_000);
    let window = Limit::Window(Window::new(WindowKind::Sliding, 10, SEC));
    for i in 0..10_000u32 {
        let limits = [
            (engine.key(&i.to_le_bytes(), &[b"g"]), gcra(10, 10)),
            (engine.key(&i.to_le_bytes(), &[b"w"]), window),
        ];
        let nonce = engine.replay_key(&i.to_le_bytes(), &[b"n"]);
        engine.decide(
            Nanos::ZERO,
            &Request {
                nonce: Some((nonce, SEC)),
                limits: &limits,
                cost: 1,
                commit: true,
            },
        );
    }
    assert_eq!(
        engine.occupancy(),
        Occupancy {
            buckets: 10_000,
            windows: 10_000,
            nonces: 10_000
        }
    );
    // One refill interval later the buckets are full again and nonces expired;
    // sliding windows need two whole periods.
    engine.sweep(SEC);
    assert_eq!(
        engine.occupancy(),
        Occupancy {
            buckets: 0,
            windows: 10_000,
            nonces: 0
        }
    );
    engine.sweep(2 * SEC);
    assert_eq!(engine.occupancy(), Occupancy::default());
}

#[test]
fn a_full_nonce_set_refuses_new_nonces() {
    let engine = Engine::new(1, 2);
    for n in [b"1", b"2"] {
        let req = Request {
            nonce: Some((engine.replay_key(b"k", &[n]), SEC)),
            limits: &[],
            cost: 1,
            commit: true,
        };
        assert!(matches!(
            engine.decide(Nanos::ZERO, &req),
            Outcome::Limited { allowed: true, .. }
        ));
    }
    let req = Request {
        nonce: Some((engine.replay_key(b"k", &[b"3"]), SEC)),
        limits: &[],
        cost: 1,
        commit: true,
    };
    assert_eq!(engine.decide(Nanos::ZERO, &req), Outcome::NonceSetFull);
    assert!(matches!(
        engine.decide(SEC, &req),
        Outcome::Limited { allowed: true, .. }
    ));
}

/// The background sweep leaves nonces a few seconds past their time in a
/// table it has just visited. The attack on that: a set at its capacity
/// refusing genuine requests for room those nonces take. The check that
/// finds the set full sweeps its own shard in full; a check whose own
/// shard holds none of them is refused until the next background sweep,
/// which sweeps in full once the set is near its capacity.
#[test]
fn nonces_held_past_their_time_never_keep_a_full_set_full() {
    let remember = |engine: &Engine, replay: ReplayKey, now: Nanos, forget_at: Nanos| {
        engine.decide(
            now,
            &Request {
                nonce: Some((replay, forget_at)),
                limits: &[],
                cost: 1,
                commit: true,
            },
        )
    };
    // A full set of 8 at 9 s: three of the hot key's nonces past their
    // time (6 s) in a table the sweep at 5 s visited, so passed over
    // until 10 s at the soonest (the pause is 5 to 10 s by slot, and the
    // slot comes from the engine's random seed), five live.
    let now = 9 * SEC;
    let full = || {
        let engine = Engine::new(2, 8);
        let hot = |n: u32| engine.replay_key(b"hot", &[n.to_le_bytes().as_slice()]);
        for n in 0..4 {
            assert!(allowed(&remember(&engine, hot(n), Nanos::ZERO, 6 * SEC)));
        }
        assert!(allowed(&remember(&engine, hot(4), Nanos::ZERO, 5 * SEC)));
        assert_eq!(engine.sweep(5 * SEC).nonces, 1);
        assert_eq!(engine.sweep(now).nonces, 0, "held, not yet swept");
        // Held, not remembered: their requests are not replays.
        assert!(allowed(&remember(&engine, hot(0), now, 100 * SEC)));
        for n in 5..9 {
            assert!(allowed(&remember(&engine, hot(n), now, 100 * SEC)));
        }
        assert_eq!(engine.occupancy().nonces, 8, "three held, five live");
        engine
    };

    // The hot key's own check makes room at once.
    let engine = full();
    let hot = engine.replay_key(b"hot", &[b"another"]);
    assert!(allowed(&remember(&engine, hot, now, 100 * SEC)));
    assert_eq!(engine.occupancy().nonces, 6, "the three held went");

    // Another key's shard has nothing to give: it is refused until the
    // background sweep, which, near capacity, sweeps the paused tables.
    let engine = full();
    let shard = engine.replay_key(b"hot", &[b"any"]).key.shard;
    let cold = (0..)
        .map(|i| engine.replay_key(format!("cold-{i}").as_bytes(), &[b"n"]))
        .find(|r| r.key.shard != shard)
        .unwrap();
    assert_eq!(
        remember(&engine, cold, now, 100 * SEC),
        Outcome::NonceSetFull
    );
    assert_eq!(engine.sweep(now).nonces, 3, "near capacity: in full");
    assert!(allowed(&remember(&engine, cold, now, 100 * SEC)));
}

/// A handover takes a slot's nonces past their time out with the rest
/// (not handed, since they say nothing): the count the capacity is judged
/// by drops by all of them, or the set would stay full of nothing.
#[test]
fn a_handover_counts_off_the_nonces_past_their_time_it_drops() {
    let engine = Engine::new(2, 100);
    for (n, forget_at) in [(0u32, 10 * SEC), (1, 10 * SEC), (2, 100 * SEC)] {
        let replay = engine.replay_key(b"k", &[n.to_le_bytes().as_slice()]);
        let req = Request {
            nonce: Some((replay, forget_at)),
            limits: &[],
            cost: 1,
            commit: true,
        };
        assert!(allowed(&engine.decide(Nanos::ZERO, &req)));
    }
    let handed = engine.take_slots(|_| true, 20 * SEC);
    assert_eq!(handed.len(), 1, "only the one still remembered");
    assert_eq!(engine.occupancy().nonces, 0);
    let taking = Engine::new(2, 100);
    taking.import(&handed, 20 * SEC);
    assert_eq!(taking.occupancy().nonces, 1);
}

#[test]
fn state_keys_separate_their_parts() {
    let engine = Engine::new(4, 1);
    assert_ne!(
        engine.key(b"o", &[b"ab", b"c"]),
        engine.key(b"o", &[b"a", b"bc"])
    );
    assert_eq!(
        engine.key(b"o", &[b"x"]).shard,
        engine.key(b"o", &[b"y"]).shard
    );
}

fn window(limit: u64, period_secs: u64) -> Limit {
    Limit::Window(Window::new(WindowKind::Sliding, limit, period_secs * SEC))
}

/// One request against one request limit of `pool` for `descriptor`.
fn hit(engine: &Engine, pool: Pool, descriptor: &str, limit: Limit, now: Nanos) -> Outcome {
    let limits = [(
        engine.key_in(pool, descriptor.as_bytes(), &[b"limit"]),
        limit,
    )];
    engine.decide(
        now,
        &Request {
            nonce: None,
            limits: &limits,
            cost: 1,
            commit: true,
        },
    )
}

fn allowed(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Limited { allowed: true, .. })
}

/// Entries per pool as the maps hold them, to hold the counts against.
fn held_in(engine: &Engine, pool: Pool) -> usize {
    engine
        .shards
        .iter()
        .map(|s| {
            let s = s.lock();
            s.buckets
                .iter()
                .map(|b| b.id)
                .chain(s.windows.iter().map(|c| c.id))
                .filter(|&id| Pool::of(id) == pool)
                .count()
        })
        .sum()
}

#[test]
fn a_flood_of_junk_descriptors_never_grows_a_pool_past_its_cap() {
    let engine = Engine::new(8, 1000);
    let login = engine.pools().policy("login-per-ip");
    engine.pools().set_cap(login, Some(200));
    let limit = window(3, 3600);
    for i in 0..20_000 {
        assert!(allowed(&hit(
            &engine,
            login,
            &format!("junk-{i}"),
            limit,
            SEC
        )));
    }
    assert_eq!(held_in(&engine, login), 200);
    let stats = engine.pools().stats();
    let s = stats.iter().find(|s| s.name == "login-per-ip").unwrap();
    assert_eq!((s.entries, s.cap), (200, Some(200)));
    assert_eq!(s.evicted, 20_000 - 200);
}

#[test]
fn eviction_takes_junk_before_a_descriptor_that_has_spent_its_limit() {
    let engine = Engine::new(1, 1000);
    let login = engine.pools().policy("login");
    engine.pools().set_cap(login, Some(16));
    let limit = window(3, 3600);
    for _ in 0..3 {
        assert!(allowed(&hit(&engine, login, "victim-ip", limit, SEC)));
    }
    assert!(!allowed(&hit(&engine, login, "victim-ip", limit, SEC)));
    // Junk of one request each: always cheaper to forget than the victim.
    for i in 0..5_000 {
        hit(&engine, login, &format!("junk-{i}"), limit, SEC);
    }
    assert!(
        !allowed(&hit(&engine, login, "victim-ip", limit, SEC)),
        "the flood bought the spent descriptor a fresh window"
    );
}

/// The same flood against a pool capped low for its shards: about one
/// entry of it per shard. Sampled from the new entry's shard alone, the
/// spent descriptor, often the only one of its pool there, was the one
/// evicted by the next junk entry to land there (session 26's cluster
/// test found it through a handover).
#[test]
fn eviction_takes_junk_before_a_spent_limit_in_a_pool_thinly_spread_over_shards() {
    for round in 0..20 {
        let engine = Engine::new(64, 1000);
        let login = engine.pools().policy("login");
        engine.pools().set_cap(login, Some(64));
        let limit = window(3, 3600);
        let victim = format!("victim-{round}");
        for _ in 0..3 {
            assert!(allowed(&hit(&engine, login, &victim, limit, SEC)));
        }
        for i in 0..2_000 {
            hit(&engine, login, &format!("junk-{i}"), limit, SEC);
        }
        assert!(
            !allowed(&hit(&engine, login, &victim, limit, SEC)),
            "round {round}: the flood bought the spent descriptor a fresh window"
        );
        assert_eq!(held_in(&engine, login), 64);
    }
}

#[test]
fn the_global_cap_bounds_all_pools_together_and_key_state_is_never_counted() {
    let engine = Engine::new(4, 1000);
    engine.pools().set_total_cap(100);
    let a = engine.pools().policy("a");
    let b = engine.pools().policy("b");
    for i in 0..1_000 {
        hit(&engine, a, &format!("a{i}"), gcra(10, 10), SEC);
        hit(&engine, b, &format!("b{i}"), window(10, 60), SEC);
        // A key's own policy state: bounded by the keys, never evicted.
        hit(&engine, Pool::KEYS, &format!("key{i}"), gcra(10, 10), SEC);
    }
    assert!(engine.pools().total() <= 100);
    assert_eq!(
        held_in(&engine, a) + held_in(&engine, b),
        engine.pools().total()
    );
    assert_eq!(held_in(&engine, Pool::KEYS), 1_000);
}

/// A pool capped at one entry that holds it, and a descriptor whose entry
/// would live in another shard than that one: the pool, the shard of its
/// entry, the descriptor.
fn one_entry_pool_held_elsewhere(engine: &Engine) -> (Pool, u32, String) {
    let p = engine.pools().policy("p");
    engine.pools().set_cap(p, Some(1));
    assert!(allowed(&hit(engine, p, "first", gcra(5, 5), SEC)));
    let first_shard = engine.key_in(p, b"first", &[]).shard;
    let other = (0..)
        .map(|i| format!("d{i}"))
        .find(|d| engine.key_in(p, d.as_bytes(), &[]).shard != first_shard)
        .unwrap();
    (p, first_shard, other)
}

#[test]
fn a_full_pool_makes_room_in_another_shard_when_its_own_holds_none_of_it() {
    // One entry allowed, and it lives in another shard than the new one.
    let engine = Engine::new(64, 1000);
    let (p, _, other) = one_entry_pool_held_elsewhere(&engine);
    assert!(allowed(&hit(&engine, p, &other, gcra(5, 5), SEC)));
    assert_eq!(held_in(&engine, p), 1, "the cap holds");
    assert_eq!(
        engine
            .pools()
            .stats()
            .iter()
            .find(|s| s.name == "p")
            .unwrap()
            .evicted,
        1
    );
}

#[test]
fn when_nothing_can_be_evicted_the_request_is_refused_and_stores_nothing() {
    // One entry allowed, in a pool whose only entry lives in another shard,
    // and that shard busy at this moment (held by another request).
    let engine = Engine::new(64, 1000);
    let (p, first_shard, other) = one_entry_pool_held_elsewhere(&engine);
    let busy = engine.shards[first_shard as usize].lock();
    // The nonce's shard must not be the busy one: the request would wait
    // for it, and this thread holds it (with a random seed, one run in 64
    // hung here).
    let nonce = (0..)
        .map(|i| engine.replay_key(format!("k{i}").as_bytes(), &[b"nonce", b"n"]))
        .find(|r| r.key.shard != first_shard)
        .unwrap();
    let limits = [(engine.key_in(p, other.as_bytes(), &[b"limit"]), gcra(5, 5))];
    let outcome = engine.decide(
        SEC,
        &Request {
            nonce: Some((nonce, 100 * SEC)),
            limits: &limits,
            cost: 1,
            commit: true,
        },
    );
    drop(busy);
    assert_eq!(outcome, Outcome::StateFull(p));
    assert_eq!(
        engine.occupancy().nonces,
        0,
        "refused requests store no nonce"
    );
    assert_eq!(held_in(&engine, p), 1);
    assert_eq!(
        engine
            .pools()
            .stats()
            .iter()
            .find(|s| s.name == "p")
            .unwrap()
            .refused,
        1
    );
}

proptest::proptest! {
    /// Whatever mix of requests, evictions and sweeps, the counts the caps
    /// are judged by match what the maps hold.
    #[test]
    fn pool_counts_always_match_the_entries_held(
        ops in proptest::collection::vec((0u8..3, 0u16..64, 0u64..3), 1..400),
        cap in 1usize..40,
    ) {
        let engine = Engine::new(4, 1000);
        let a = engine.pools().policy("a");
        let b = engine.pools().policy("b");
        engine.pools().set_cap(a, Some(cap));
        engine.pools().set_total_cap(50);
        let mut now = SEC;
        for (what, d, step) in ops {
            now += step * SEC / 2;
            match what {
                0 => { hit(&engine, a, &format!("{d}"), gcra(2, 2), now); }
                1 => { hit(&engine, b, &format!("{d}"), window(2, 3), now); }
                _ => { engine.sweep(now); }
            }
            let (ha, hb) = (held_in(&engine, a), held_in(&engine, b));
            proptest::prop_assert!(ha <= cap);
            proptest::prop_assert!(ha + hb <= 50);
            proptest::prop_assert_eq!(ha + hb, engine.pools().total());
        }
    }
}

#[test]
fn state_given_back_to_the_first_instant_stays_in_its_table() {
    // A bucket refunded to a TAT of 0 would look like an unused slot of
    // the table: it is kept as 1 ns, which means the same, and stays
    // counted and findable.
    let engine = Engine::new(1, 100);
    let bucket = (engine.key(b"k", &[b"g"]), gcra(10, 1));
    let take = Request {
        nonce: None,
        limits: &[bucket],
        cost: 1,
        commit: true,
    };
    assert!(allowed(&engine.decide(Nanos::ZERO, &take)));
    assert!(
        !allowed(&engine.decide(Nanos::ZERO, &take)),
        "the burst of 1 is spent"
    );
    engine.refund(Nanos::ZERO, &take);
    assert_eq!(engine.occupancy().buckets, 1);
    // One nanosecond later the refunded bucket is full again.
    assert!(allowed(&engine.decide(Nanos::new(1), &take)));
}

/// State handed over (or taken back from a saved state) keeps to the caps:
/// new buckets and windows past their pool's cap cost an entry each (one
/// evicted, or the new one dropped), counted,
/// ones that no longer say anything are not stored at all, and what is
/// already here is still merged. Nonces are all kept, past the capacity
/// too: a nonce dropped is a request that can be replayed.
/// The attack on a handover: a pool filled with junk (one request per
/// descriptor) on the node that takes a spent limit over. The spent limit
/// takes a junk entry's place, as a request's new entry does, rather than
/// being dropped to start afresh: before session 26 a flood ahead of a
/// rolling restart bought every spent descriptor a fresh window.
#[test]
fn a_spent_limit_handed_to_a_pool_full_of_junk_evicts_junk_and_stays_spent() {
    let seed = StateSeed::random();
    let leaving = Engine::with_seed(4, 1000, seed);
    let taking = Engine::with_seed(4, 1000, seed);
    let (from, login) = (
        leaving.pools().policy("login"),
        taking.pools().policy("login"),
    );
    taking.pools().set_cap(login, Some(64));
    let limit = window(3, 3600);
    for _ in 0..3 {
        assert!(allowed(&hit(&leaving, from, "victim-ip", limit, SEC)));
    }
    for i in 0..1_000 {
        hit(&taking, login, &format!("junk-{i}"), limit, SEC);
    }
    assert_eq!(held_in(&taking, login), 64);

    let handed = leaving.take_slots(|_| true, SEC);
    assert_eq!(taking.import(&handed, SEC), 1, "one entry lost for the cap");
    assert_eq!(held_in(&taking, login), 64, "the cap holds");
    assert!(
        !allowed(&hit(&taking, login, "victim-ip", limit, SEC)),
        "the handover bought the spent descriptor a fresh window"
    );
}

#[test]
fn imported_state_keeps_to_the_caps_but_never_drops_a_nonce() {
    let engine = Engine::new(4, 2);
    let pool = engine.pools().policy("p");
    engine.pools().set_cap(pool, Some(2));
    let now = Nanos::from_secs(1_000);
    let later = now.saturating_add(Nanos::from_secs(60));
    let bucket = |i: u32| engine.key_in(pool, b"", &[&i.to_be_bytes()]).id;
    let window = |i: u32, idle_at: Nanos| Entry::Window {
        id: bucket(100 + i),
        state: WindowState {
            index: 0,
            idle_at,
            prev: 0,
            cur: 1,
        },
    };

    let five: Vec<Entry> = (0..5)
        .map(|i| Entry::Bucket {
            id: bucket(i),
            tat: later,
        })
        .collect();
    assert_eq!(engine.import(&five, now), 3, "past the cap of 2");
    assert_eq!(held_in(&engine, pool), 2);
    // In place of a bucket (which forgives the least: one request each).
    assert_eq!(engine.import(&[window(1, later)], now), 1);
    // Nothing to say: not stored, and not counted as dropped.
    let idle = [
        Entry::Bucket {
            id: bucket(9),
            tat: now,
        },
        window(2, now),
    ];
    assert_eq!(engine.import(&idle, now), 0);
    assert_eq!(held_in(&engine, pool), 2);
    // What is here is merged, at the cap or not.
    let much_later = later.saturating_add(Nanos::from_secs(60));
    let raised: Vec<Entry> = five
        .iter()
        .map(|e| Entry::Bucket {
            id: e.id(),
            tat: much_later,
        })
        .collect();
    // The one bucket held is merged, and each of the four others costs
    // one; five when one of those evicts it before its turn.
    assert!((4..=5).contains(&engine.import(&raised, now)));
    let held = engine.take_slots(|_| true, now);
    assert_eq!(held.len(), 2, "{held:?}");
    assert!(
        held.iter().all(|e| match e {
            Entry::Bucket { tat, .. } => *tat == much_later,
            Entry::Window { .. } => true,
            Entry::Nonce { .. } => false,
        }),
        "{held:?}"
    );

    // Five nonces, a capacity of two: all five kept, each a replay.
    let nonce = |i: u32| engine.replay_key(b"k", &[b"nonce", &i.to_be_bytes()]);
    let nonces: Vec<Entry> = (0..5)
        .map(|i| Entry::Nonce {
            id: nonce(i).key.id,
            extra: nonce(i).extra,
            forget_at_secs: 2_000,
        })
        .collect();
    assert_eq!(engine.import(&nonces, now), 0);
    for i in 0..5 {
        let again = Request {
            nonce: Some((nonce(i), later)),
            limits: &[],
            cost: 1,
            commit: true,
        };
        assert_eq!(engine.decide(now, &again), Outcome::Replay, "nonce {i}");
    }
}

#[test]
fn state_ids_are_those_every_earlier_build_computed() {
    // The nodes of a cluster upgraded one at a time must agree on every id
    // (and so on every slot and owner): a change of how ids are hashed
    // would split a mixed cluster's state. This value is pinned.
    let engine = Engine::with_seed(4, 10, StateSeed::from_bytes([7; 16]));
    let id = engine.key(b"bench-key", &[b"nonce", b"n-1"]).id;
    assert_eq!(id, 25_442_318_793_035_327);
    // And a replay key's extra bits (session 28), the same way.
    let replay = engine.replay_key(b"bench-key", &[b"nonce", b"n-1"]);
    assert_eq!((replay.key.id, replay.extra), (id, 34_757));
}
