//! The pipeline with an injected clock: every time boundary is tested to the
//! second (or nanosecond) without sleeping.

use std::sync::Arc;
use std::time::Duration;

use warden_client::proto::{CheckRequest, CheckResponse, LimitRequest};
use warden_client::signing::{Signer, check_request_from};

use super::*;
use crate::auth::{CallerRule, ClientRule};
use crate::engine::{Entry, FakeClock, ForwardOnly, Window, WindowKind};
use crate::keys::KeyRing;
use crate::model::{Pattern, Secret};
use crate::route::Route;

/// A named change to a request, for table-driven tests.
type Mutation = (&'static str, fn(&mut CheckRequest));

const SEC: Nanos = Nanos::from_secs(1);
const SECRET: &str = "pipeline-test-secret-0123456789abcdef";
/// The server starts half a second into this second; with the default 5 s
/// future skew the fence is START + 6.
const START: i64 = 1_764_000_000;

struct Fixture {
    clock: Arc<FakeClock>,
    checker: Checker,
    signer: Signer,
    counter: std::cell::Cell<u32>,
}

fn policy(name: &str, limit: Limit, period: Duration) -> Policy {
    Policy::new(name.into(), limit, period, None)
}

fn key(id: &str, policies: &[&str], routes: &[&str]) -> KeyConfig {
    KeyConfig {
        id: id.into(),
        owner: "acme".into(),
        scopes: vec!["orders:write".into()],
        policies: policies.iter().map(|p| p.to_string()).collect(),
        secrets: vec![Secret::new(SECRET.as_bytes().to_vec())],
        routes: routes.iter().map(|r| Route::parse(r).unwrap()).collect(),
        bound_identities: Vec::new(),
        revoked: false,
    }
}

impl Fixture {
    fn engine_is_untouched(&self) -> bool {
        self.checker.engine().occupancy() == crate::engine::Occupancy::default()
    }

    fn new() -> Self {
        Self::with(
            CheckSettings {
                failure_limit: 3,
                ..CheckSettings::default()
            },
            &[],
        )
    }

    fn with(settings: CheckSettings, routes: &[&str]) -> Self {
        let clock = Arc::new(FakeClock::new(START as u64 * SEC + SEC / 2));
        let policies = [
            policy(
                "three",
                Limit::Gcra(Gcra::new(3, 3 * SEC, 3)),
                Duration::from_secs(3),
            ),
            policy(
                "window",
                Limit::Window(Window::new(WindowKind::Fixed, 100, 60 * SEC)),
                Duration::from_secs(60),
            ),
        ];
        let keys = [
            key("k1", &["three"], routes),
            KeyConfig {
                revoked: true,
                ..key("revoked", &["three"], &[])
            },
            KeyConfig {
                bound_identities: vec![Pattern::new("spiffe://partner/billing").unwrap()],
                ..key("kbound", &[], &[])
            },
        ];
        let future_skew = settings.future_skew;
        // As the server reads its clock: never back.
        let checker = Checker::new(
            settings,
            KeyRing::new(&policies, &keys),
            authz(),
            Arc::new(ForwardOnly::new(clock.clone())),
        );
        // Start in the fence second: the first in which anything is fresh.
        clock.advance(future_skew + Duration::from_secs(1));
        Self {
            clock,
            checker,
            signer: Signer::new("k1", SECRET),
            counter: 0.into(),
        }
    }

    fn now_secs(&self) -> i64 {
        (self.clock.now() / SEC) as i64
    }

    fn nonce(&self) -> String {
        self.counter.set(self.counter.get() + 1);
        format!("nonce-{:016}", self.counter.get())
    }

    /// A request signed at `ts` with a fresh nonce.
    fn at(&self, ts: i64) -> CheckRequest {
        let h = self
            .signer
            .sign_at(ts, &self.nonce(), "POST", "/orders", "a=1", b"{}");
        check_request_from(&h, "warden-v1", "POST", "/orders", "a=1", b"{}")
    }

    fn now(&self) -> CheckRequest {
        self.at(self.now_secs())
    }

    fn check(&self, req: &CheckRequest) -> CheckResponse {
        self.checker.check(req, &gateway()).unwrap().response
    }
}

/// The gateway may check for keys starting with "k" and use the "window"
/// policy, and forward client identities; the app may only check.
fn authz() -> Authz {
    let rule = |id: &str, roles: &[Role], prefixes: &[&str]| CallerRule {
        identity: Pattern::caller(id).unwrap(),
        roles: roles.iter().copied().collect(),
        key_prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
        policies: Some(["window".to_owned()].into()),
    };
    Authz {
        callers: vec![
            rule(
                "spiffe://test/gateway",
                &[Role::Check, Role::ForwardIdentity],
                &["k", "revoked", "nobody"],
            ),
            rule("spiffe://test/app", &[Role::Check], &[]),
            rule("spiffe://test/admin", &[Role::Admin], &[]),
        ],
        clients: vec![ClientRule {
            identity: Pattern::new("spiffe://partner/*").unwrap(),
            routes: vec![Route::parse("POST /webhooks/*").unwrap()],
        }],
        plaintext: false,
    }
}

fn caller(id: &str) -> CallerIdentity {
    CallerIdentity(Some(Arc::from(id)))
}

fn gateway() -> CallerIdentity {
    caller("spiffe://test/gateway")
}

fn reason(r: &CheckResponse) -> Reason {
    r.reason()
}

#[test]
fn the_fence_covers_the_start_second_and_the_future_skew() {
    let f = Fixture::new();
    assert_eq!(f.checker.fence().first_second(), START + 6);
    assert_eq!(f.now_secs(), START + 6);
}

#[test]
fn a_request_signed_before_the_fence_is_stale_even_within_the_skew() {
    let f = Fixture::new();
    let fence = f.checker.fence().first_second();
    let stale = f.check(&f.at(fence - 1));
    assert_eq!(reason(&stale), Reason::Stale);
    assert!(stale.message.contains("started"), "{}", stale.message);
    assert_eq!(reason(&f.check(&f.at(fence))), Reason::Ok);
}

/// The hole an outside attack found: a request signed a few seconds ahead
/// (a client clock running fast) was allowed, and after a restart allowed
/// again. Whatever its timestamp within the window, the second process
/// refuses it, at any time after its start.
#[test]
fn a_request_signed_ahead_is_never_allowed_again_after_a_restart() {
    for ahead in 0..=5 {
        let first = Fixture::new();
        let req = first.at(first.now_secs() + ahead);
        assert_eq!(reason(&first.check(&req)), Reason::Ok, "+{ahead}s");
        // A restart right away (kill -9: no state survives), and later ones.
        for restart_after in [0u64, 1, 2, 5, 6, 30, 299] {
            let second = Fixture::new();
            second.clock.set(first.clock.now() + restart_after * SEC);
            let fresh = Checker::new(
                CheckSettings::default(),
                KeyRing::new(&[], &[key("k1", &[], &[])]),
                authz(),
                second.clock.clone(),
            );
            for later in [0u64, 1, 3, 6, 60, 400] {
                second
                    .clock
                    .set(first.clock.now() + (restart_after + later) * SEC);
                let r = fresh.check(&req, &gateway()).unwrap().response;
                assert_ne!(
                    reason(&r),
                    Reason::Ok,
                    "+{ahead}s, restart after {restart_after}s, {later}s later"
                );
            }
        }
    }
}

#[test]
fn a_correct_clock_is_served_again_within_the_future_skew_after_a_restart() {
    let f = Fixture::new();
    // Fixture::new started at START + 0.5 and is now at the fence second.
    let opens = f.checker.fence().opens_at();
    assert!(opens - START as u64 * SEC <= 6 * SEC);
    assert_eq!(reason(&f.check(&f.now())), Reason::Ok);
}

/// Just after a start, a correct clock's request is refused as signed
/// before the fence, and told when signing again will pass: the moment
/// the fence opens, to the millisecond. Once it has opened, a request
/// signed before it is told nothing of the kind: it never passes.
#[test]
fn a_request_refused_before_the_fence_opens_is_told_when_it_opens() {
    let f = Fixture::new();
    // Back to 1.25 s after the start, before the fence (START + 6).
    f.clock.set(START as u64 * SEC + SEC + SEC / 4);
    let r = f.check(&f.now());
    assert_eq!(reason(&r), Reason::Stale);
    let opens = f.checker.fence().opens_at();
    assert_eq!(r.retry_after_ms, (opens - f.clock.now()).ceil_millis());
    assert_eq!(r.retry_after_ms, 4_750);
    assert_eq!(r.headers.get("Retry-After").map(String::as_str), Some("5"));
    // Signed again when told: allowed.
    f.clock.set(opens);
    assert_eq!(reason(&f.check(&f.now())), Reason::Ok);
    // Signed before the fence, sent after it opened: refused for good.
    let before = f.at(START + 1);
    let r = f.check(&before);
    assert_eq!(reason(&r), Reason::Stale);
    assert_no_retry_time(&r);
}

/// A denial with no time to wait for: none would let it pass.
fn assert_no_retry_time(r: &CheckResponse) {
    assert_eq!(r.retry_after_ms, 0, "{r:?}");
    assert!(!r.headers.contains_key("Retry-After"), "{r:?}");
}

/// In a cluster, the key's owner may refuse a step under its takeover
/// fence and say when that fence opens: the answer passes the wait on,
/// as a rate-limited one does. An owner that says nothing (of an earlier
/// version, or a fence already open) leaves the answer without one.
#[test]
fn a_request_refused_under_an_owners_takeover_fence_is_told_when_it_opens() {
    let f = Fixture::new();
    let pending = || match f.checker.begin(&f.now(), &gateway()).unwrap() {
        Step::State(pending) => pending,
        Step::Done(answer) => panic!("decided without its state: {:?}", answer.response),
    };
    let wait = 2 * SEC + SEC / 4;
    let told = pending()
        .finish(Err(Stale::TakenOver {
            retry_after: Some(wait),
        }))
        .unwrap()
        .response;
    assert_eq!(reason(&told), Reason::Stale);
    assert_eq!(told.retry_after_ms, 2_250);
    assert_eq!(
        told.headers.get("Retry-After").map(String::as_str),
        Some("3")
    );

    let untold = pending()
        .finish(Err(Stale::TakenOver { retry_after: None }))
        .unwrap()
        .response;
    assert_eq!(reason(&untold), Reason::Stale);
    assert_no_retry_time(&untold);
}

#[test]
fn freshness_holds_exactly_to_the_skew_in_both_directions() {
    let f = Fixture::new();
    f.clock.advance(Duration::from_secs(1000));
    let now = f.now_secs();
    for (ts, expected) in [
        (now - 300, Reason::Ok),
        (now - 301, Reason::Stale),
        (now + 5, Reason::Ok),
        (now + 6, Reason::Stale),
        (now + 300, Reason::Stale),
    ] {
        // A fresh checker each time, so rate limits play no part.
        let g = Fixture::new();
        g.clock.advance(Duration::from_secs(1000));
        assert_eq!(reason(&g.check(&g.at(ts))), expected, "offset {}", ts - now);
    }
}

#[test]
fn a_replay_is_refused_until_the_request_is_stale_so_it_never_passes() {
    let f = Fixture::new();
    let req = f.now();
    let ts = req.timestamp;
    assert_eq!(reason(&f.check(&req)), Reason::Ok);
    // Up to the last nanosecond of freshness the nonce is remembered...
    f.clock.set((ts as u64 + 300 + 1) * SEC - Nanos::new(1));
    assert_eq!(reason(&f.check(&req)), Reason::Replay);
    // ...and from the moment it is forgotten the request is stale.
    f.clock.set((ts as u64 + 300 + 1) * SEC);
    f.checker.engine().sweep(f.clock.now());
    assert_eq!(f.checker.engine().occupancy().nonces, 0);
    assert_eq!(reason(&f.check(&req)), Reason::Stale);
}

/// The system clock stepped back by five minutes after a request's nonce
/// was forgotten: read as it is, the request would be fresh again and
/// pass a second time, and the key's limit state would sit five minutes
/// in the future. The server's clock holds instead.
#[test]
fn a_clock_stepped_back_brings_no_forgotten_request_back() {
    let f = Fixture::new();
    let req = f.now();
    let ts = req.timestamp as u64;
    assert_eq!(reason(&f.check(&req)), Reason::Ok);
    f.clock.set((ts + 301) * SEC);
    f.checker.engine().sweep(f.checker.now());
    assert_eq!(f.checker.engine().occupancy().nonces, 0);

    f.clock.set(ts * SEC + SEC / 2);
    assert_eq!(reason(&f.check(&req)), Reason::Stale);
    // Requests signed by clients' clocks, which did not step back, pass.
    let held = f.at((ts + 301) as i64);
    assert_eq!(reason(&f.check(&held)), Reason::Ok);
}

#[test]
fn rate_limit_retry_after_is_exact_and_a_denial_stores_nothing() {
    let f = Fixture::new();
    for _ in 0..3 {
        assert_eq!(reason(&f.check(&f.now())), Reason::Ok);
    }
    let denied_req = f.now();
    let denied = f.check(&denied_req);
    assert_eq!(reason(&denied), Reason::RateLimited);
    assert_eq!(denied.http_status, 429);
    assert_eq!(denied.retry_after_ms, 1000);
    assert_eq!(denied.headers["Retry-After"], "1");
    assert_eq!(denied.limits[0].remaining, 0);
    f.clock.advance(Duration::from_millis(999));
    assert_eq!(reason(&f.check(&denied_req)), Reason::RateLimited);
    f.clock.advance(Duration::from_millis(1));
    // The same request, nonce and all: the denials stored nothing.
    let allowed = f.check(&denied_req);
    assert_eq!(reason(&allowed), Reason::Ok);
    assert_eq!(allowed.limits[0].remaining, 0);
}

#[test]
fn request_limits_are_shared_across_keys_and_reported_by_name() {
    let f = Fixture::new();
    let mut req = f.now();
    req.limits = vec![LimitRequest {
        policy: "window".into(),
        descriptor: "ip:1".into(),
    }];
    let r = f.check(&req);
    assert_eq!(reason(&r), Reason::Ok);
    assert_eq!(r.limits[1].name, "window:ip:1");
    assert_eq!(r.limits[1].remaining, 99);
    assert!(r.headers["RateLimit"].contains("\"window\";r=99"));
    assert!(
        !r.headers["RateLimit"].contains("ip:1"),
        "descriptors are not echoed to clients"
    );
}

#[test]
fn a_cost_above_the_burst_is_refused_without_a_retry_time() {
    let f = Fixture::new();
    let mut req = f.now();
    req.cost = 4;
    let r = f.check(&req);
    assert_eq!(reason(&r), Reason::RateLimited);
    assert_no_retry_time(&r);
}

#[test]
fn a_dry_run_answers_but_changes_nothing() {
    let f = Fixture::new();
    let mut req = f.now();
    req.dry_run = true;
    for _ in 0..5 {
        assert_eq!(reason(&f.check(&req)), Reason::Ok);
    }
    assert_eq!(
        f.checker.engine().occupancy(),
        crate::engine::Occupancy::default()
    );
    req.dry_run = false;
    assert_eq!(reason(&f.check(&req)), Reason::Ok);
}

impl Fixture {
    /// A request for k1 signed with the wrong secret.
    fn forged(&self) -> CheckRequest {
        let wrong = Signer::new("k1", "wrong-secret-0123456789abcdefghijklmn");
        let h = wrong.sign_at(self.now_secs(), &self.nonce(), "GET", "/", "", b"");
        check_request_from(&h, "warden-v1", "GET", "/", "", b"")
    }
}

fn from_address(mut req: CheckRequest, address: &str) -> CheckRequest {
    req.client_address = address.into();
    req
}

fn from_client(mut req: CheckRequest, identity: &str) -> CheckRequest {
    req.client_identity = identity.into();
    req
}

#[test]
fn a_source_that_spent_its_failure_budget_is_locked_out_and_refills() {
    let f = Fixture::new();
    for _ in 0..3 {
        let r = f.check(&from_address(f.forged(), "203.0.113.7"));
        assert_eq!(reason(&r), Reason::Unauthenticated);
    }
    // That address is refused before anything is verified, even when it
    // finally signs correctly: guessing from it has stopped.
    let locked = f.check(&from_address(f.now(), "203.0.113.7"));
    assert_eq!(reason(&locked), Reason::LockedOut);
    // 3 failures per 60 s: one comes back every 20 s.
    assert_eq!(locked.retry_after_ms, 20_000);
    f.clock.advance(Duration::from_secs(20));
    assert_eq!(
        reason(&f.check(&from_address(f.now(), "203.0.113.7"))),
        Reason::Ok
    );
}

#[test]
fn failures_naming_a_key_never_lock_out_its_owner() {
    let f = Fixture::new();
    // An attacker who knows only the public key id, from one address, from
    // many addresses, as a forwarded client, and with nothing forwarded.
    for i in 0..50 {
        f.check(&from_address(f.forged(), "198.51.100.1"));
        f.check(&from_address(f.forged(), &format!("198.51.100.{}", i + 2)));
        f.check(&from_client(f.forged(), "spiffe://attacker/x"));
        f.check(&f.forged());
    }
    // The owner, from its own address, from no address behind the same
    // gateway, and as a forwarded client: served.
    for req in [
        from_address(f.now(), "192.0.2.10"),
        f.now(),
        from_client(f.now(), "spiffe://other/owner"),
    ] {
        let r = f.check(&req);
        assert_eq!(reason(&r), Reason::Ok, "{}", r.message);
        f.clock.advance(Duration::from_secs(1));
    }
}

#[test]
fn with_only_the_caller_known_failures_are_locked_out_but_genuine_requests_pass() {
    let f = Fixture::new();
    for _ in 0..3 {
        assert_eq!(reason(&f.check(&f.forged())), Reason::Unauthenticated);
    }
    let locked = f.check(&f.forged());
    assert_eq!(reason(&locked), Reason::LockedOut);
    assert!(locked.retry_after_ms > 0);
    assert_eq!(reason(&f.check(&f.now())), Reason::Ok);
}

#[test]
fn an_ipv6_source_is_charged_by_its_64_prefix() {
    let f = Fixture::new();
    for i in 0..3 {
        let r = f.check(&from_address(f.forged(), &format!("2001:db8:1:2::{i:x}")));
        assert_eq!(reason(&r), Reason::Unauthenticated);
    }
    let same_64 = f.check(&from_address(f.now(), "2001:db8:1:2:ffff::1"));
    assert_eq!(reason(&same_64), Reason::LockedOut);
    let other_64 = f.check(&from_address(f.now(), "2001:db8:1:3::1"));
    assert_eq!(reason(&other_64), Reason::Ok);
}

/// `warden cluster locate --client-address/--client-identity` names the
/// slot of the budget a source's failures spend, as it is counted: by the
/// identity when one is forwarded, an IPv6 address by its /64, an
/// IPv4-mapped one as IPv4. The budget is in that slot.
#[test]
fn the_located_failure_budget_is_the_one_a_source_spends() {
    let f = Fixture::new();
    // Taken out to be counted, as a handover takes a slot's state.
    let failures = |slot| {
        f.checker
            .engine()
            .take_slots(|s| s == slot, f.clock.now())
            .iter()
            .filter(|e| matches!(e, Entry::Bucket { id, .. } if Pool::of(*id) == Pool::FAILURES))
            .count()
    };
    for (identity, address, also) in [
        ("", "198.51.100.7", "::ffff:198.51.100.7"),
        ("", "2001:db8:1:2::9", "2001:db8:1:2:ffff::1"),
        ("spiffe://partner/x", "198.51.100.8", "203.0.113.9"),
    ] {
        let slot = f.checker.failure_slot(identity, address).unwrap();
        assert_eq!(f.checker.failure_slot(identity, also), Some(slot));
        assert_eq!(failures(slot), 0);
        let r = f.check(&from_client(from_address(f.forged(), address), identity));
        assert_eq!(reason(&r), Reason::Unauthenticated);
        assert_eq!(failures(slot), 1, "{identity} {address}");
    }
    assert_ne!(
        f.checker.failure_slot("", "198.51.100.7"),
        f.checker.failure_slot("spiffe://partner/x", "198.51.100.7")
    );
    for (identity, address) in [
        ("", ""),
        ("", "not-an-ip"),
        ("bad\n", ""),
        ("", "1.2.3.4:80"),
    ] {
        assert_eq!(
            f.checker.failure_slot(identity, address),
            None,
            "{identity:?} {address:?}"
        );
    }
}

#[test]
fn a_client_address_must_be_an_ip_address() {
    let f = Fixture::new();
    for bad in ["not-an-ip", "203.0.113.7:80", "1.2.3.4.5", &"1".repeat(65)] {
        let r = f.check(&from_address(f.now(), bad));
        assert_eq!(reason(&r), Reason::Malformed, "{bad}");
        assert!(r.message.starts_with("client_address:"));
    }
}

proptest::proptest! {
    /// Whatever others send — forgeries from any source, under any key id —
    /// a correctly signed request from a source that did not fail itself is
    /// never refused LOCKED_OUT.
    #[test]
    fn a_genuine_request_is_never_locked_out_by_someone_elses_failures(
        attacks in proptest::collection::vec((0u8..4, 0u8..8), 0..80),
        victim in 0u8..3,
    ) {
        let f = Fixture::new();
        for (kind, n) in attacks {
            let forged = f.forged();
            let req = match kind {
                0 => from_address(forged, &format!("198.51.100.{n}")),
                1 => from_client(forged, &format!("spiffe://attacker/{n}")),
                2 => from_address(forged, &format!("2001:db8:{n}::1")),
                _ => forged,
            };
            f.check(&req);
        }
        let genuine = match victim {
            0 => from_address(f.now(), "192.0.2.200"),
            1 => from_client(f.now(), "spiffe://other/victim"),
            _ => f.now(),
        };
        let r = f.check(&genuine);
        proptest::prop_assert_eq!(reason(&r), Reason::Ok, "{}", r.message);
    }
}

#[test]
fn good_requests_do_not_spend_the_failure_budget() {
    let f = Fixture::with(
        CheckSettings {
            failure_limit: 1,
            ..CheckSettings::default()
        },
        &[],
    );
    for _ in 0..3 {
        assert_eq!(reason(&f.check(&f.now())), Reason::Ok);
        f.clock.advance(Duration::from_secs(1));
    }
}

#[test]
fn unknown_revoked_and_forged_answers_are_identical() {
    let f = Fixture::new();
    let answer = |id: &str, secret: &str| {
        let h = Signer::new(id, secret).sign_at(f.now_secs(), &f.nonce(), "GET", "/", "", b"");
        f.check(&check_request_from(&h, "warden-v1", "GET", "/", "", b""))
    };
    let unknown = answer("nobody", SECRET);
    assert_eq!(reason(&unknown), Reason::Unauthenticated);
    assert_eq!(unknown, answer("revoked", SECRET));
    assert_eq!(unknown, answer("k1", "forged-secret-0123456789abcdefghijk"));
}

#[test]
fn a_stale_request_to_an_unknown_key_does_not_reveal_that_the_key_is_unknown() {
    // Verification comes before freshness, so a stale request only says
    // STALE when its signature is genuine.
    let f = Fixture::new();
    let h = Signer::new("nobody", SECRET).sign_at(
        f.now_secs() - 10_000,
        &f.nonce(),
        "GET",
        "/",
        "",
        b"",
    );
    let r = f.check(&check_request_from(&h, "warden-v1", "GET", "/", "", b""));
    assert_eq!(reason(&r), Reason::Unauthenticated);
    assert_eq!(
        reason(&f.check(&f.at(f.now_secs() - 10_000))),
        Reason::Stale
    );
}

#[test]
fn routes_restrict_a_key_to_what_it_may_call() {
    let f = Fixture::with(CheckSettings::default(), &["POST /webhooks/*"]);
    let sign = |method: &str, path: &str| {
        let h = f
            .signer
            .sign_at(f.now_secs(), &f.nonce(), method, path, "", b"");
        f.check(&check_request_from(&h, "warden-v1", method, path, "", b""))
    };
    assert_eq!(reason(&sign("POST", "/webhooks/billing")), Reason::Ok);
    let r = sign("POST", "/orders");
    assert_eq!(reason(&r), Reason::Forbidden);
    assert_eq!(r.http_status, 403);
    assert_eq!(reason(&sign("get", "/webhooks/billing")), Reason::Forbidden);
}

#[test]
fn ts_body_uses_the_signature_as_its_replay_key() {
    let f = Fixture::new();
    let body = br#"{"event":"invoice.paid"}"#;
    let h = f.signer.sign_ts_body_at(f.now_secs(), body);
    let req = check_request_from(&h, "ts-body", "POST", "/webhooks", "", body);
    assert_eq!(reason(&f.check(&req)), Reason::Ok);
    assert_eq!(reason(&f.check(&req)), Reason::Replay);
    let mut tampered = req.clone();
    tampered.body = br#"{"event":"invoice.void"}"#.to_vec().into();
    assert_eq!(reason(&f.check(&tampered)), Reason::Unauthenticated);
}

#[test]
fn a_body_hash_verifies_like_the_body() {
    let f = Fixture::new();
    let mut req = f.now();
    req.body_sha256 = warden_client::signing::body_sha256(&req.body).to_vec();
    req.body.clear();
    assert_eq!(reason(&f.check(&req)), Reason::Ok);
}

#[test]
fn malformed_requests_name_the_field_and_change_no_state() {
    let f = Fixture::new();
    let breakers: [Mutation; 12] = [
        ("key_id", |r| r.key_id = "x".repeat(129)),
        ("method", |r| r.method = "PO ST".into()),
        ("path", |r| r.path = "/a\r\nb".into()),
        ("query", |r| r.query = "a=\n".into()),
        ("scheme", |r| r.scheme = "v2".into()),
        ("body", |r| r.body = vec![0; 1024 * 1024 + 1].into()),
        ("body_sha256", |r| r.body_sha256 = vec![1; 32]),
        ("timestamp", |r| r.timestamp = -5),
        ("nonce", |r| r.nonce = "a".repeat(65)),
        ("signature", |r| r.signature.push('0')),
        ("limits", |r| {
            r.limits = vec![
                LimitRequest {
                    policy: "window".into(),
                    descriptor: "d".into()
                };
                2
            ]
        }),
        ("request_id", |r| r.request_id = "id with spaces".into()),
    ];
    for (field, breaks) in breakers {
        let mut req = f.now();
        breaks(&mut req);
        let r = f.check(&req);
        assert_eq!(reason(&r), Reason::Malformed, "{field}");
        assert_eq!(r.http_status, 400);
        assert!(r.message.starts_with(field), "{field}: {}", r.message);
    }
    assert_eq!(
        f.checker.engine().occupancy(),
        crate::engine::Occupancy::default()
    );
}

#[test]
fn a_caller_without_the_check_role_is_refused_before_anything_else() {
    let f = Fixture::new();
    let mut req = f.now();
    req.nonce = "malformed!".into();
    for who in ["spiffe://test/admin", "spiffe://stranger/gw"] {
        let err = f.checker.check(&req, &caller(who)).unwrap_err();
        assert_eq!(
            err,
            CheckError::PermissionDenied("this client certificate may not call Check")
        );
    }
    assert_eq!(
        f.checker.check(&req, &CallerIdentity(None)).unwrap_err(),
        CheckError::PermissionDenied("this client certificate may not call Check")
    );
}

#[test]
fn a_caller_may_be_limited_to_key_prefixes_and_policies() {
    let f = Fixture::new();
    let h = Signer::new("other", SECRET).sign_at(f.now_secs(), &f.nonce(), "GET", "/", "", b"");
    let req = check_request_from(&h, "warden-v1", "GET", "/", "", b"");
    assert!(matches!(
        f.checker.check(&req, &gateway()),
        Err(CheckError::PermissionDenied(_))
    ));
    let mut req = f.now();
    req.limits = vec![LimitRequest {
        policy: "three".into(),
        descriptor: "ip:1".into(),
    }];
    assert!(matches!(
        f.checker.check(&req, &gateway()),
        Err(CheckError::PermissionDenied(_))
    ));
    assert!(f.engine_is_untouched());
}

#[test]
fn only_forwarders_may_pass_on_a_client_identity() {
    let f = Fixture::new();
    let mut req = f.now();
    req.client_identity = "CN=alice,O=Acme".into();
    let err = f
        .checker
        .check(&req, &caller("spiffe://test/app"))
        .unwrap_err();
    assert_eq!(
        err,
        CheckError::PermissionDenied("this client certificate may not forward client identities")
    );
    assert_eq!(reason(&f.check(&req)), Reason::Ok);
}

#[test]
fn a_bound_key_is_forbidden_from_any_other_client_identity() {
    let f = Fixture::new();
    let bound = Signer::new("kbound", SECRET);
    let send = |client: &str, path: &str| {
        let h = bound.sign_at(f.now_secs(), &f.nonce(), "POST", path, "", b"");
        let mut req = check_request_from(&h, "warden-v1", "POST", path, "", b"");
        req.client_identity = client.into();
        f.check(&req)
    };
    assert_eq!(
        reason(&send("spiffe://partner/billing", "/webhooks/billing")),
        Reason::Ok
    );
    let other = send("spiffe://partner/shipping", "/webhooks/billing");
    assert_eq!(reason(&other), Reason::Forbidden);
    assert_eq!(other.http_status, 403);
    // Without a forwarded identity the gateway's own identity is the client.
    assert_eq!(reason(&send("", "/webhooks/billing")), Reason::Forbidden);
}

#[test]
fn client_route_rules_apply_to_the_effective_client_identity() {
    let f = Fixture::new();
    let mut req = f.now();
    req.client_identity = "spiffe://partner/shipping".into();
    // k1 requests go to POST /orders; partners may only POST /webhooks/*.
    assert_eq!(reason(&f.check(&req)), Reason::Forbidden);
}

#[test]
fn failure_budgets_of_a_spray_of_sources_stay_within_their_cap() {
    let f = Fixture::with(
        CheckSettings {
            failure_limit: 3,
            max_failure_sources: 100,
            ..CheckSettings::default()
        },
        &[],
    );
    for i in 0..5_000u32 {
        let [a, b, c, d] = (0x0a00_0000 + i).to_be_bytes();
        f.check(&from_address(f.forged(), &format!("{a}.{b}.{c}.{d}")));
    }
    let failures = f
        .checker
        .engine()
        .pools()
        .stats()
        .into_iter()
        .find(|s| s.name == "failures")
        .unwrap();
    assert!(failures.entries <= 100, "{failures:?}");
    assert_eq!(reason(&f.check(&f.now())), Reason::Ok);
}

/// Callers that fail open when warden is unreachable tell these two
/// refusals apart by their messages (the Python client does), and must
/// fail closed on them: changing a message would open them again.
#[test]
fn the_full_state_refusals_keep_the_messages_callers_know_them_by() {
    assert_eq!(
        CheckError::ReplayCacheFull.to_string(),
        "the replay cache is full; retry later"
    );
    assert_eq!(
        CheckError::StateFull(Pool::KEYS).to_string(),
        "rate-limit state is full; retry later"
    );
}
