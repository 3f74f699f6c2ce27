//! Properties of the sharded engine as a whole: atomic commit, exactly one
//! winner in replay races, eviction that follows the active keys.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

const SEC: u64 = 1_000_000_000;

fn gcra(limit: u64, burst: u64) -> Limit {
    Limit::Gcra(Gcra::new(limit, SEC, burst))
}

#[test]
fn a_denied_request_takes_no_tokens_and_stores_no_nonce() {
    let engine = Engine::new(8, 1000);
    let plenty = (engine.key(b"k", &[b"plenty"]), gcra(100, 100));
    let scarce = (engine.key(b"other", &[b"scarce"]), gcra(1, 1));
    let nonce = engine.key(b"k", &[b"nonce", b"n1"]);

    // Use up the scarce limit.
    let first = Request {
        nonce: None,
        limits: &[scarce],
        cost: 1,
        commit: true,
    };
    assert!(matches!(
        engine.decide(0, &first),
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
    } = engine.decide(0, &denied)
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
    } = engine.decide(0, &probe)
    else {
        panic!("nonce must not have been stored");
    };
    assert_eq!(limits[0].remaining, 99);
}

#[test]
fn a_dry_run_changes_nothing() {
    let engine = Engine::new(4, 100);
    let limit = (engine.key(b"k", &[b"p"]), gcra(1, 1));
    let nonce = engine.key(b"k", &[b"n"]);
    let dry = Request {
        nonce: Some((nonce, SEC)),
        limits: &[limit],
        cost: 1,
        commit: false,
    };
    for _ in 0..3 {
        assert!(matches!(
            engine.decide(0, &dry),
            Outcome::Limited { allowed: true, .. }
        ));
    }
    assert_eq!(engine.occupancy(), Occupancy::default());
}

#[test]
fn a_replayed_nonce_is_refused_until_it_may_be_forgotten() {
    let engine = Engine::new(4, 100);
    let nonce = engine.key(b"k", &[b"n"]);
    let req = Request {
        nonce: Some((nonce, 5 * SEC)),
        limits: &[],
        cost: 1,
        commit: true,
    };
    assert!(matches!(
        engine.decide(0, &req),
        Outcome::Limited { allowed: true, .. }
    ));
    assert_eq!(engine.decide(5 * SEC - 1, &req), Outcome::Replay);
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
                    let nonce = engine.key(b"k", &[b"nonce", &[round]]);
                    let req = Request {
                        nonce: Some((nonce, SEC)),
                        limits: &limits,
                        cost: 1,
                        commit: true,
                    };
                    if matches!(
                        engine.decide(0, &req),
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
                        0,
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
        let nonce = engine.key(&i.to_le_bytes(), &[b"n"]);
        engine.decide(
            0,
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
            nonce: Some((engine.key(b"k", &[n]), SEC)),
            limits: &[],
            cost: 1,
            commit: true,
        };
        assert!(matches!(
            engine.decide(0, &req),
            Outcome::Limited { allowed: true, .. }
        ));
    }
    let req = Request {
        nonce: Some((engine.key(b"k", &[b"3"]), SEC)),
        limits: &[],
        cost: 1,
        commit: true,
    };
    assert_eq!(engine.decide(0, &req), Outcome::NonceSetFull);
    assert!(matches!(
        engine.decide(SEC, &req),
        Outcome::Limited { allowed: true, .. }
    ));
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
