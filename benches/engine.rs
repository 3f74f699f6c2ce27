//! Criterion micro-benchmarks of the engine and the in-process pipeline.
//!
//! `cargo bench -p warden-benches` (about a minute). Measurement times are
//! short on purpose so the whole run stays bounded on a 2-core machine.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use warden::auth::Authz;
use warden::check::{CallerIdentity, Checker};
use warden::config::CheckSettings;
use warden::engine::{
    Clock, Engine, FakeClock, Gcra, Limit, Nanos, Request, SystemClock, Window, WindowKind,
};
use warden::keys::KeyRing;
use warden::model::{KeyConfig, Policy, Secret};
use warden::signing::verify;
use warden_client::proto::LimitRequest;
use warden_client::signing::{Signer, hmac_sha256};

const SEC: Nanos = Nanos::from_secs(1);

fn engine(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(1));
    // Room for every nonce the run inserts: this measures inserts, not the
    // full-set refusal.
    let engine = Engine::new(64, 1 << 28);
    let gcra = Limit::Gcra(Gcra::new(1_000_000, SEC, 1_000_000));
    let sliding = Limit::Window(Window::new(WindowKind::Sliding, 1_000_000, SEC));
    let fixed = Limit::Window(Window::new(WindowKind::Fixed, 1_000_000, SEC));
    for (name, limit) in [
        ("gcra", gcra),
        ("sliding_window", sliding),
        ("fixed_window", fixed),
    ] {
        let limits = [(engine.key(b"key-1", &[name.as_bytes()]), limit)];
        let mut now = Nanos::ZERO;
        group.bench_function(BenchmarkId::new("decide", name), |b| {
            b.iter(|| {
                now += Nanos::new(1_000);
                black_box(engine.decide(
                    now,
                    &Request {
                        nonce: None,
                        limits: &limits,
                        cost: 1,
                        commit: true,
                    },
                ))
            })
        });
    }
    let mut n = 0u64;
    group.bench_function("nonce_insert_and_lookup", |b| {
        b.iter(|| {
            n += 1;
            let key = engine.replay_key(b"key-1", &[b"nonce", &n.to_le_bytes()]);
            black_box(engine.decide(
                Nanos::new(n),
                &Request {
                    nonce: Some((key, Nanos::new(n) + 300 * SEC)),
                    limits: &[],
                    cost: 1,
                    commit: true,
                },
            ))
        })
    });
    group.finish();
}

/// A new descriptor's window in a full pool (a flood of junk): the cost of
/// making room, in a pool capped low (about three entries per shard, so
/// the sample reaches into other shards) and in one capped high.
fn full_pool(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(1));
    let limit = Limit::Window(Window::new(WindowKind::Sliding, 3, 3600 * SEC));
    for cap in [200usize, 100_000] {
        let engine = Engine::new(64, 1024);
        let pool = engine.pools().policy("login");
        engine.pools().set_cap(pool, Some(cap));
        let mut n = 0u64;
        let hit = |n: u64| {
            let limits = [(engine.key_in(pool, &n.to_le_bytes(), &[b"limit"]), limit)];
            engine.decide(
                SEC,
                &Request {
                    nonce: None,
                    limits: &limits,
                    cost: 1,
                    commit: true,
                },
            )
        };
        while n < cap as u64 {
            n += 1;
            hit(n);
        }
        group.bench_function(BenchmarkId::new("new_entry_in_a_full_pool", cap), |b| {
            b.iter(|| {
                n += 1;
                black_box(hit(n))
            })
        });
    }
    group.finish();
}

/// The `governor` crate's keyed GCRA limiter, as the reference for ours.
fn governor_reference(c: &mut Criterion) {
    use governor::{Quota, RateLimiter};
    use std::num::NonZeroU32;
    let limiter = RateLimiter::keyed(Quota::per_second(
        NonZeroU32::new(1_000_000).expect("non-zero"),
    ));
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(1));
    group.bench_function("governor_keyed_check", |b| {
        b.iter(|| black_box(limiter.check_key(&1u64)))
    });
    let engine = Engine::new(64, 1024);
    let limits = [(
        engine.key(b"key-1", &[b"gcra"]),
        Limit::Gcra(Gcra::new(1_000_000, SEC, 1_000_000)),
    )];
    let clock = warden::engine::SystemClock;
    group.bench_function("gcra_with_key_hash_and_clock", |b| {
        use warden::engine::Clock;
        b.iter(|| {
            let key = engine.key(b"key-1", &[b"gcra"]);
            black_box(key);
            black_box(engine.decide(
                clock.now(),
                &Request {
                    nonce: None,
                    limits: &limits,
                    cost: 1,
                    commit: true,
                },
            ))
        })
    });
    group.finish();
}

/// Two threads deciding at once, on one key (same shard, same lock) and on
/// different keys: the cost of contention.
fn contention(c: &mut Criterion) {
    let mut group = c.benchmark_group("contention_2_threads");
    group.throughput(Throughput::Elements(1));
    let engine = Arc::new(Engine::new(64, 1024));
    let gcra = Limit::Gcra(Gcra::new(u32::MAX as u64, SEC, u32::MAX as u64));
    for (name, same) in [("same_key", true), ("different_keys", false)] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = std::time::Instant::now();
                std::thread::scope(|s| {
                    for t in 0..2u8 {
                        let engine = engine.clone();
                        s.spawn(move || {
                            let owner = if same { [0u8] } else { [t] };
                            let limits = [(engine.key(&owner, &[b"gcra"]), gcra)];
                            for i in 0..iters / 2 {
                                black_box(engine.decide(
                                    Nanos::new(i),
                                    &Request {
                                        nonce: None,
                                        limits: &limits,
                                        cost: 1,
                                        commit: true,
                                    },
                                ));
                            }
                        });
                    }
                });
                start.elapsed()
            })
        });
    }
    group.finish();
}

fn hmac_verify(c: &mut Criterion) {
    let mut group = c.benchmark_group("hmac_verify");
    let secret = [Secret::new(
        b"bench-secret-0123456789abcdefghijklmnop".to_vec(),
    )];
    for size in [64usize, 1024, 64 * 1024] {
        let body = vec![7u8; size];
        let signature = hmac_sha256(secret[0].expose(), &body);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter(|| black_box(verify(&secret, &body, &signature)))
        });
    }
    group.finish();
}

fn full_check(c: &mut Criterion) {
    let policies = [
        Policy::new(
            "per-key".into(),
            Limit::Gcra(Gcra::new(u32::MAX as u64, SEC, u32::MAX as u64)),
            Duration::from_secs(1),
            None,
        ),
        Policy::new(
            "per-ip".into(),
            Limit::Window(Window::new(WindowKind::Sliding, u32::MAX as u64, SEC)),
            Duration::from_secs(1),
            None,
        ),
    ];
    let secret = "bench-secret-0123456789abcdefghijklmnop";
    let key = KeyConfig {
        id: "bench".into(),
        owner: "bench".into(),
        scopes: vec![],
        policies: vec!["per-key".into()],
        secrets: vec![Secret::new(secret.as_bytes().to_vec())],
        routes: vec![],
        bound_identities: vec![],
        revoked: false,
    };
    // Plaintext-mode authorization: every caller may check.
    let authz = Authz {
        plaintext: true,
        ..Authz::default()
    };
    let clock = Arc::new(FakeClock::new(SystemClock.now()));
    let checker = Checker::new(
        CheckSettings::default(),
        KeyRing::new(&policies, &[key]),
        authz,
        clock.clone(),
    );
    // Past the restart fence, as a server is a few seconds after its start;
    // every request is signed in this second.
    clock.advance(Duration::from_secs(
        CheckSettings::default().future_skew.as_secs() + 2,
    ));
    let ts = clock.now().whole_secs() as i64;
    let signer = Signer::new("bench", secret);
    let body = vec![b'x'; 1024];
    let caller = CallerIdentity::default();
    let mut i = 0u64;
    let mut group = c.benchmark_group("check");
    group.throughput(Throughput::Elements(1));
    // As a caller without a forwarded client, and as a gateway that
    // forwards the client's address (whose failure budget is looked at
    // before verification, so that a guessing client is refused early).
    for (name, address) in [
        ("signed_1KiB_2_policies", ""),
        ("signed_1KiB_2_policies_client_address", "198.51.100.4"),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    i += 1;
                    let h = signer.sign_at(
                        ts,
                        &format!("bench-nonce-{i:016}"),
                        "POST",
                        "/v1/orders",
                        "a=1&b=2",
                        &body,
                    );
                    let mut req = warden_client::signing::check_request_from(
                        &h,
                        "warden-v1",
                        "POST",
                        "/v1/orders",
                        "a=1&b=2",
                        &body,
                    );
                    req.limits = vec![LimitRequest {
                        policy: "per-ip".into(),
                        descriptor: "ip:203.0.113.7".into(),
                    }];
                    req.client_address = address.into();
                    req
                },
                |req| black_box(checker.check(&req, &caller)),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
        targets = engine, full_pool, governor_reference, contention, hmac_verify, full_check
}
criterion_main!(benches);
