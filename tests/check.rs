//! End to end: the real `warden` binary, real mTLS, the `Check` contract.

use crate::support;

use std::collections::HashSet;
use std::time::Duration;

use support::{ConfigDir, RawCodec, SECRET, Server};
use warden_client::proto::{CheckRequest, CheckResponse, Decision, LimitRequest, Reason};
use warden_client::signing::{Signer, check_request_from, unix_now};

/// A named change to a request, for table-driven tests.
type Mutation = (&'static str, fn(&mut CheckRequest));

fn assert_reason(r: &CheckResponse, reason: Reason) {
    assert_eq!(r.reason(), reason, "response: {r:?}");
    let expected = if reason == Reason::Ok {
        Decision::Allow
    } else {
        Decision::Deny
    };
    assert_eq!(r.decision(), expected, "response: {r:?}");
}

#[tokio::test]
async fn a_valid_signed_request_is_allowed_and_names_the_caller() {
    let server = Server::dev();
    let mut client = server.client().await;
    let signer = server.signer();
    let r = client
        .check(signer.check_request("POST", "/v1/orders", "b=2&a=1", br#"{"qty":1}"#))
        .await
        .unwrap();
    assert_reason(&r, Reason::Ok);
    assert_eq!(r.http_status, 200);
    let caller = r.caller.unwrap();
    assert_eq!(caller.key_id, signer.key_id());
    assert_eq!(caller.owner, "demo");
    assert_eq!(r.limits[0].name, "demo");
    assert_eq!(r.limits[0].remaining, 99);
    assert!(r.headers["RateLimit-Policy"].contains("\"demo\";q=100;w=60"));
}

#[tokio::test]
async fn tampering_with_any_signed_part_is_unauthenticated() {
    let server = Server::dev();
    let mut client = server.client().await;
    let signer = server.signer();
    let tampers: [Mutation; 6] = [
        ("body", |r| r.body = b"{\"qty\":1000}".to_vec().into()),
        ("path", |r| r.path = "/v1/admin".into()),
        ("query", |r| r.query = "b=2&a=2".into()),
        ("method", |r| r.method = "DELETE".into()),
        ("timestamp", |r| r.timestamp -= 1),
        ("signature", |r| {
            r.signature = r.signature.chars().rev().collect()
        }),
    ];
    for (what, tamper) in tampers {
        let mut req = signer.check_request("POST", "/v1/orders", "a=1&b=2", b"{\"qty\":1}");
        tamper(&mut req);
        let r = client.check(req).await.unwrap();
        assert_reason(&r, Reason::Unauthenticated);
        assert_eq!(r.http_status, 401, "{what}");
        assert!(r.caller.is_none());
    }
    // Reordering the query is not tampering: it is signed canonically.
    let mut req = signer.check_request("POST", "/v1/orders", "a=1&b=2", b"{\"qty\":1}");
    req.query = "b=2&a=1".into();
    assert_reason(&client.check(req).await.unwrap(), Reason::Ok);
}

#[tokio::test]
async fn old_and_future_timestamps_are_stale() {
    let server = Server::dev();
    let mut client = server.client().await;
    let signer = server.signer();
    for offset in [-301, 301, -100_000] {
        let r = client
            .check(signed_ahead(&signer, offset, "GET", "/x", b""))
            .await
            .unwrap();
        assert_reason(&r, Reason::Stale);
        assert_eq!(r.http_status, 401);
    }
}

#[tokio::test]
async fn a_replayed_nonce_is_refused() {
    let server = Server::dev();
    let mut client = server.client().await;
    let req = server.signer().check_request("POST", "/pay", "", b"100");
    assert_reason(&client.check(req.clone()).await.unwrap(), Reason::Ok);
    let r = client.check(req).await.unwrap();
    assert_reason(&r, Reason::Replay);
    assert_eq!(r.http_status, 401);
}

#[tokio::test]
async fn a_thousand_concurrent_identical_requests_have_exactly_one_winner() {
    let server = Server::dev();
    // Several connections, so the race crosses HTTP/2 connections and threads.
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(server.client().await);
    }
    let req = server
        .signer()
        .check_request("POST", "/transfer", "", b"{\"amount\":5}");
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            let req = req.clone();
            tokio::spawn(async move { client.check(req).await.unwrap() })
        })
        .collect();
    let mut reasons = Vec::new();
    for t in tasks {
        reasons.push(t.await.unwrap().reason());
    }
    assert_eq!(reasons.iter().filter(|r| **r == Reason::Ok).count(), 1);
    assert_eq!(
        reasons.iter().filter(|r| **r == Reason::Replay).count(),
        999
    );
}

const TIGHT: &str = r#"
[[policies]]
name = "tight"
limit = 5
period = "1s"

[[policies]]
name = "plenty"
algorithm = "sliding_window"
limit = 1000
period = "1m"

[[keys]]
id = "wk_tight"
owner = "acme"
scopes = ["orders:write"]
policies = ["tight"]
secrets = [{ value = "test-secret-0123456789abcdefghijklmnopqrstuvwxyz" }]
"#;

#[tokio::test]
async fn exhausting_a_policy_is_rate_limited_and_a_denial_takes_nothing() {
    let dir = ConfigDir::new();
    let server = dir.start(TIGHT);
    let mut client = dir.client(&server).await;
    let signer = Signer::new("wk_tight", SECRET);
    let with_plenty = |mut r: CheckRequest| {
        r.limits = vec![LimitRequest {
            policy: "plenty".into(),
            descriptor: "ip:203.0.113.7".into(),
        }];
        r
    };

    for expected_remaining in (0..5).rev() {
        let r = client
            .check(with_plenty(signer.check_request("GET", "/a", "", b"")))
            .await
            .unwrap();
        assert_reason(&r, Reason::Ok);
        assert_eq!(r.limits[0].remaining, expected_remaining);
    }
    let denied_req = with_plenty(signer.check_request("GET", "/a", "", b""));
    let denied = client.check(denied_req.clone()).await.unwrap();
    assert_reason(&denied, Reason::RateLimited);
    assert_eq!(denied.http_status, 429);
    // 5 per second: one token every 200 ms.
    assert!(
        denied.retry_after_ms > 0 && denied.retry_after_ms <= 200,
        "{denied:?}"
    );
    assert_eq!(denied.headers["Retry-After"], "1");
    assert_eq!(denied.limits[0].remaining, 0);
    // The plenty limit allowed it, but the denial took nothing from it.
    assert!(denied.limits[1].name.starts_with("plenty"));
    assert_eq!(denied.limits[1].remaining, 995);

    // After retry_after the very same request (same nonce) is allowed: the
    // denial stored no nonce and took no token.
    tokio::time::sleep(Duration::from_millis(denied.retry_after_ms + 20)).await;
    let r = client.check(denied_req).await.unwrap();
    assert_reason(&r, Reason::Ok);
    assert_eq!(r.limits[1].remaining, 994);
}

#[tokio::test]
async fn malformed_requests_get_a_safe_400_and_change_nothing() {
    let dir = ConfigDir::new();
    let server = dir.start(&format!("[check]\nmax_body_bytes = 1024\n{TIGHT}"));
    let mut client = dir.client(&server).await;
    let signer = Signer::new("wk_tight", SECRET);
    let nonce = "reused_nonce_0123456789";

    let cases: [Mutation; 13] = [
        ("body", |r| r.body = vec![b'x'; 1025].into()),
        ("nonce", |r| r.nonce = "short".into()),
        ("signature", |r| r.signature = "zz".into()),
        ("scheme", |r| r.scheme = "warden-v9".into()),
        ("path", |r| r.path = "no-slash".into()),
        ("path", |r| r.path = "/a\nwarden-v1".into()),
        ("path", |r| r.path = "/a#x".into()),
        ("path", |r| r.path = "/x/..;/a".into()),
        ("query", |r| r.query = "a=1#x".into()),
        ("body_sha256", |r| r.body_sha256 = vec![0; 31]),
        ("limits", |r| {
            r.limits = vec![LimitRequest {
                policy: "nope".into(),
                descriptor: "x".into(),
            }]
        }),
        ("key_id", |r| r.key_id = "bad key".into()),
        ("cost", |r| r.cost = 2_000_000),
    ];
    for (field, breaks) in cases {
        let h = signer.sign_at(unix_now(), nonce, "POST", "/a", "", b"ok");
        let mut req = check_request_from(&h, "warden-v1", "POST", "/a", "", b"ok");
        breaks(&mut req);
        let r = client.check(req).await.unwrap();
        assert_reason(&r, Reason::Malformed);
        assert_eq!(r.http_status, 400);
        assert!(r.message.starts_with(field), "{field}: {:?}", r.message);
        assert!(!r.message.contains(SECRET) && r.message.len() < 120);
    }
    // Nothing was stored: the nonce is still unused and all 5 tokens are there.
    let h = signer.sign_at(unix_now(), nonce, "POST", "/a", "", b"ok");
    let r = client
        .check(check_request_from(&h, "warden-v1", "POST", "/a", "", b"ok"))
        .await
        .unwrap();
    assert_reason(&r, Reason::Ok);
    assert_eq!(r.limits[0].remaining, 4);
}

#[tokio::test]
async fn a_request_signed_before_a_restart_is_stale_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut first = Server::dev_in(&dir);
    let mut client = first.client().await;
    let req = first.signer().check_request("POST", "/pay", "", b"1");
    assert_reason(&client.check(req.clone()).await.unwrap(), Reason::Ok);
    first.kill();

    // The new process has no memory of the nonce; the fence must catch it.
    let second = Server::dev_in(&dir);
    assert_eq!(
        second.demo().key_id,
        first.demo().key_id,
        "the dev directory is reused"
    );
    let mut client = second.client().await;
    let r = client.check(req).await.unwrap();
    assert_reason(&r, Reason::Stale);
    // Fresh requests are fine.
    let fresh = second.signer().check_request("POST", "/pay", "", b"1");
    assert_reason(&client.check(fresh).await.unwrap(), Reason::Ok);
}

/// A request signed `ahead` seconds from now (behind when negative).
fn signed_ahead(
    signer: &Signer,
    ahead: i64,
    method: &str,
    path: &str,
    body: &[u8],
) -> CheckRequest {
    let h = signer.sign_at(
        unix_now() + ahead,
        &warden_client::signing::new_nonce(),
        method,
        path,
        "",
        body,
    );
    check_request_from(&h, "warden-v1", method, path, "", body)
}

/// A `POST /pay` signed `ahead` seconds from now.
fn pay_signed(signer: &Signer, ahead: i64) -> CheckRequest {
    signed_ahead(signer, ahead, "POST", "/pay", b"1")
}

/// One request signed at each of `aheads`, each accepted: to be replayed.
async fn accept_each(
    client: &mut warden_client::Client,
    signer: &Signer,
    aheads: &[i64],
) -> Vec<CheckRequest> {
    let mut accepted = Vec::new();
    for &ahead in aheads {
        let req = pay_signed(signer, ahead);
        assert_reason(&client.check(req.clone()).await.unwrap(), Reason::Ok);
        accepted.push(req);
    }
    accepted
}

/// The outside attack's finding: a request signed a few seconds ahead of the
/// server's clock was allowed, and after a restart (kill -9 or SIGTERM)
/// allowed again. Every such request must be refused by the next process,
/// and fresh requests served again within the future skew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_is_allowed_twice_across_restarts_whatever_its_timestamp() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut server = Server::dev_in(&dir);
    let signer = server.signer();
    let signed = |ahead: i64| pay_signed(&signer, ahead);
    let mut client = server.client().await;
    let mut accepted = accept_each(&mut client, &signer, &[0, 1, 3, 5]).await;
    // Further ahead than the future skew (5 s by default) is refused at once.
    for ahead in [7, 30, 299] {
        let r = client.check(signed(ahead)).await.unwrap();
        assert_reason(&r, Reason::Stale);
        assert!(r.message.contains("ahead"), "{}", r.message);
    }

    for how in ["KILL", "TERM", "KILL"] {
        if how == "KILL" {
            server.kill();
        } else {
            assert!(server.terminate().success());
        }
        let started = std::time::Instant::now();
        server = Server::dev_in(&dir);
        // Ready (and so serving fresh requests) within the future skew plus
        // the start second (6 s), plus up to 2 s after a crash (the clock
        // mark's lookahead), with room for the process to start.
        let limit = Duration::from_secs(if how == "KILL" { 12 } else { 10 });
        assert!(
            started.elapsed() < limit,
            "ready after {:?}",
            started.elapsed()
        );
        let mut client = server.client().await;
        for req in &accepted {
            let r = client.check(req.clone()).await.unwrap();
            assert_ne!(r.reason(), Reason::Ok, "replayed after {how}: {r:?}");
        }
        let fresh = signed(0);
        assert_reason(&client.check(fresh.clone()).await.unwrap(), Reason::Ok);
        accepted.push(fresh);
        let ahead = signed(4);
        assert_reason(&client.check(ahead.clone()).await.unwrap(), Reason::Ok);
        accepted.push(ahead);
    }
}

/// A single process with a store, whose key `wk_three` is allowed three
/// requests an hour and whose sources three failed signatures an hour;
/// `store` adds to `[store]`.
fn three_an_hour(dir: &ConfigDir, store: &str) -> std::path::PathBuf {
    dir.write_master_key();
    dir.write_config(&format!(
        "[check]\nfailure_limit = 3\nfailure_period = \"1h\"\n\n[store]\ndir = \"store\"\nmaster_key_file = \"master.key\"\n{store}\n\
         [[policies]]\nname = \"three\"\nlimit = 3\nperiod = \"1h\"\n\n\
         [[keys]]\nid = \"wk_three\"\npolicies = [\"three\"]\nsecrets = [{{ value = \"{SECRET}\" }}]\n"
    ))
}

/// The client of `wk_three` ([`three_an_hour`]), and a source guessing its
/// signatures.
struct Spender {
    signer: Signer,
    guesser: Signer,
}

impl Spender {
    fn new() -> Self {
        Self {
            signer: Signer::new("wk_three", SECRET),
            guesser: Signer::new("wk_three", "not-the-secret-0123456789abcdefghijkl"),
        }
    }

    fn genuine(&self) -> CheckRequest {
        self.signer.check_request("GET", "/a", "", b"")
    }

    /// `req` as the guesser's source sends it.
    fn from_guesser(mut req: CheckRequest) -> CheckRequest {
        req.client_address = "203.0.113.66".into();
        req
    }

    /// Spends the key's limit and locks the guesser's source out: the
    /// requests accepted, and the answer to the first one past the limit.
    async fn spend_and_lock_out(
        &self,
        client: &mut warden_client::Client,
    ) -> (Vec<CheckRequest>, CheckResponse) {
        let mut accepted = Vec::new();
        for _ in 0..3 {
            let req = self.genuine();
            assert_reason(&client.check(req.clone()).await.unwrap(), Reason::Ok);
            accepted.push(req);
        }
        let spent = client.check(self.genuine()).await.unwrap();
        assert_reason(&spent, Reason::RateLimited);
        for _ in 0..4 {
            let guess = Self::from_guesser(self.guesser.check_request("GET", "/a", "", b""));
            client.check(guess).await.unwrap();
        }
        let locked = client
            .check(Self::from_guesser(self.genuine()))
            .await
            .unwrap();
        assert_reason(&locked, Reason::LockedOut);
        (accepted, spent)
    }
}

/// A single process stopped with SIGTERM (a deploy, a config change)
/// saves its rate-limit state, and the next one takes it back before it
/// serves: a spent limit stays spent, and a source locked out for guessing
/// signatures stays locked out. Until session 25 every restart gave each
/// limit its burst again and each guesser a fresh budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_keeps_every_limit_spent_and_every_source_locked_out() {
    let dir = ConfigDir::new();
    let config = three_an_hour(&dir, "");
    let client_of = Spender::new();
    let mut first = Server::with_config(&config);
    let mut client = dir.client(&first).await;
    let (_, spent) = client_of.spend_and_lock_out(&mut client).await;
    assert!(first.terminate().success(), "{}", first.logs());
    assert!(
        first.logs().contains("\"event\":\"state_saved\""),
        "{}",
        first.logs()
    );

    let second = Server::with_config(&config);
    assert!(
        second.logs().contains("\"event\":\"state_restored\""),
        "{}",
        second.logs()
    );
    let mut client = dir.client(&second).await;
    let still_spent = client.check(client_of.genuine()).await.unwrap();
    assert_reason(&still_spent, Reason::RateLimited);
    assert!(
        still_spent.retry_after_ms > 0 && still_spent.retry_after_ms <= spent.retry_after_ms,
        "{still_spent:?} after {spent:?}"
    );
    let still_locked = client
        .check(Spender::from_guesser(client_of.genuine()))
        .await
        .unwrap();
    assert_reason(&still_locked, Reason::LockedOut);
}

/// A process killed (-9) saves nothing, but its last checkpoint holds
/// what it had spent: the next process keeps those limits spent and those
/// sources locked out, behind its fence. Until session 26 a crash gave
/// every limit its burst again and every guesser a fresh budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_keeps_every_limit_and_lockout_its_last_checkpoint_held() {
    let dir = ConfigDir::new();
    let config = three_an_hour(&dir, "save_state_every = \"1s\"\n");
    let client_of = Spender::new();
    let mut first = Server::with_config(&config);
    let mut client = dir.client(&first).await;
    let (accepted, _) = client_of.spend_and_lock_out(&mut client).await;
    checkpoint_after_now(&first).await;
    // It held a replay key per accepted request, the key's bucket and the
    // guesser's failure budget at least.
    let held = support::metric(&first, "warden_state_checkpoint_entries");
    assert!(held >= accepted.len() as u64 + 2, "{held}");
    first.kill();

    let second = Server::with_config_unready(&config, "info");
    let mut client = dir.client(&second).await;
    // Behind its fence, as after any crash.
    let r = client.check(client_of.genuine()).await.unwrap();
    assert_reason(&r, Reason::Stale);
    assert_spent_and_locked_out(&dir, &second, &client_of, &accepted, NOT_WHOLE).await;
}

/// What a process after a crash says of a checkpoint it took back.
const NOT_WHOLE: &str = "did not say it was whole";

/// Waits until `server` has written a checkpoint begun after this call:
/// the next one but one.
async fn checkpoint_after_now(server: &Server) {
    let now = support::metric(server, "warden_state_checkpoints_total");
    checkpoints_written(server, now + 2).await;
}

/// Waits until `server` has written `count` checkpoints.
async fn checkpoints_written(server: &Server, count: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while support::metric(server, "warden_state_checkpoints_total") < count {
        assert!(std::time::Instant::now() < deadline, "{}", server.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Past its fence, `server` took back the state `spender` left, not as
/// whole (`why_fenced`): the key's limit still spent, the guesser still
/// locked out, and no `accepted` request allowed again.
async fn assert_spent_and_locked_out(
    dir: &ConfigDir,
    server: &Server,
    spender: &Spender,
    accepted: &[CheckRequest],
    why_fenced: &str,
) {
    server.wait_past_fence_within(Duration::from_secs(30));
    let mut client = dir.client(server).await;
    let r = client.check(spender.genuine()).await.unwrap();
    assert_reason(&r, Reason::RateLimited);
    assert_reason(
        &client
            .check(Spender::from_guesser(spender.genuine()))
            .await
            .unwrap(),
        Reason::LockedOut,
    );
    for req in accepted {
        assert_ne!(
            client.check(req.clone()).await.unwrap().reason(),
            Reason::Ok
        );
    }
    assert_restored(server, false, why_fenced);
}

/// A kill in the middle of writing a checkpoint leaves a torn temporary
/// file beside the last whole one. The next process takes back the whole
/// one, and its own checkpoints replace the torn file rather than write
/// over the start of it: a longer torn file written over would leave its
/// tail in the next checkpoint, which the process after could not read
/// (it would start with every limit full again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_cut_short_by_a_crash_leaves_the_one_before_it_to_the_next_process() {
    let dir = ConfigDir::new();
    let config = three_an_hour(&dir, "save_state_every = \"1s\"\n");
    let client_of = Spender::new();
    let mut first = Server::with_config(&config);
    let mut client = dir.client(&first).await;
    let (accepted, _) = client_of.spend_and_lock_out(&mut client).await;
    checkpoint_after_now(&first).await;
    first.kill();
    let whole = std::fs::read(dir.path().join("store/state.saved")).unwrap();
    let torn = dir.path().join("store/state.saved.tmp");
    let mut junk = whole[..whole.len() / 2].to_vec();
    junk.resize(whole.len() * 4 + 4096, 0x5a);
    std::fs::write(&torn, &junk).unwrap();

    // One checkpoint only, the one a process writes as it starts: the one
    // written where the torn file lay.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("= \"1s\"", "= \"1h\"")).unwrap();
    let mut second = Server::with_config_unready(&config, "info");
    assert_spent_and_locked_out(&dir, &second, &client_of, &accepted, NOT_WHOLE).await;
    checkpoints_written(&second, 1).await;
    second.kill();
    assert!(
        !torn.exists(),
        "no checkpoint of its own replaced the torn file"
    );

    let third = Server::with_config_unready(&config, "info");
    assert_spent_and_locked_out(&dir, &third, &client_of, &accepted, NOT_WHOLE).await;
    assert!(
        !third.logs().contains("saved_state_unreadable"),
        "{}",
        third.logs()
    );
}

/// A process that took a saved state back and crashed before any
/// checkpoint of its own was written (here every checkpoint fails: the
/// temporary file's name is taken by a directory, as a full disk would
/// fail them) leaves that state to the next process. Until session 28 the
/// file was removed as it was taken back, and the next process found
/// nothing: every limit full, every guesser a fresh budget. The state the
/// next one takes back says it was whole; it must not lift the fence,
/// since the process in between accepted requests of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_first_checkpoint_leaves_the_state_taken_back_to_the_next_process() {
    let dir = ConfigDir::new();
    // A second key, unlimited, for the process in between to accept.
    let config = three_an_hour(
        &dir,
        &format!(
            "save_state_every = \"1s\"\n\n[[keys]]\nid = \"wk_pay\"\nsecrets = [{{ value = \"{SECRET}\" }}]\n"
        ),
    );
    let client_of = Spender::new();
    let mut first = Server::with_config(&config);
    let mut client = dir.client(&first).await;
    let (mut accepted, _) = client_of.spend_and_lock_out(&mut client).await;
    assert!(first.terminate().success(), "{}", first.logs());
    std::fs::create_dir(dir.path().join("store/state.saved.tmp")).unwrap();

    let mut second = Server::with_config(&config);
    let mut client = dir.client(&second).await;
    // Whole: no fence, so it accepts at once what the next must refuse.
    let fresh = Signer::new("wk_pay", SECRET).check_request("GET", "/a", "", b"");
    assert_reason(&client.check(fresh.clone()).await.unwrap(), Reason::Ok);
    accepted.push(fresh);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !second
        .logs()
        .contains("\"event\":\"state_checkpoint_failed\"")
    {
        assert!(std::time::Instant::now() < deadline, "{}", second.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    second.kill();

    let third = Server::with_config_unready(&config, "info");
    assert_spent_and_locked_out(&dir, &third, &client_of, &accepted, "another process ran").await;
}

/// A real kill (-9) in the middle of writing a checkpoint, its temporary
/// file half written, leaves the file before it whole: the next process
/// takes back every entry, and refuses as replays the requests they
/// remember. A saved state of 400,000 replay keys makes the write long
/// enough to be caught in; a kill that lands after the rename is tried
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_in_the_middle_of_writing_a_checkpoint_leaves_the_file_before_it_whole() {
    use warden::engine::{Engine, Entry, Nanos};
    const KEPT: u64 = 400_000;
    let nonce = |i: u64| format!("kill-mid-write-{i:08}");
    let dir = ConfigDir::new();
    let config = single_process_config(&dir, "");
    let signer = Signer::new("wk_pay", SECRET);
    let mut first = Server::with_config(&config);
    assert!(first.terminate().success(), "{}", first.logs());

    // The replay keys of KEPT requests, saved as a process stopping would.
    let store = dir.path().join("store");
    let master = warden::crypto::MasterKey::from_hex(
        std::fs::read_to_string(dir.path().join("master.key"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    let now = warden_client::signing::unix_now() as u64;
    let engine = Engine::new(64, 2 * KEPT as usize);
    let entries: Vec<Entry> = (0..KEPT)
        .map(|i| {
            let replay = engine.replay_key(b"wk_pay", &[b"nonce", nonce(i).as_bytes()]);
            Entry::Nonce {
                id: replay.key.id,
                extra: replay.extra,
                forget_at_secs: (now + 3600) as u32,
            }
        })
        .collect();
    assert_eq!(engine.import(&entries, Nanos::from_secs(now)), 0);
    // Every one (until session 28 two of one key's nonces were told apart
    // by 40 bits, and in about one run in seven two of these matched).
    let held =
        warden::saved_state::save(&store, &master, &engine, Nanos::from_secs(now), None).unwrap();
    assert_eq!(held, KEPT as usize);
    drop((engine, entries));

    // Each process writes a checkpoint as soon as it serves.
    let torn = store.join("state.saved.tmp");
    let mut caught = false;
    let file_now = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(store.join("state.saved")).map_or(0, |m| m.ino())
    };
    for _ in 0..5 {
        let before = file_now();
        let mut server = Server::with_config_unready(&config, "info");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        // Until the temporary file is being written, or has been renamed
        // over the file already (missed: tried again).
        while std::fs::metadata(&torn).map_or(0, |m| m.len()) == 0
            && file_now() == before
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_micros(200));
        }
        server.kill();
        if std::fs::metadata(&torn).is_ok_and(|m| m.len() > 0) {
            caught = true;
            break;
        }
    }
    assert!(
        caught,
        "no kill landed in the middle of a checkpoint in five tries"
    );

    let last = Server::with_config_unready(&config, "info");
    let logs = last.wait_for_log("\"event\":\"state_restored\"");
    assert!(
        logs.contains(&format!("\"entries\":{held}")) && !logs.contains("saved_state_unreadable"),
        "{logs}"
    );
    last.wait_past_fence_within(Duration::from_secs(30));
    let mut client = dir.client(&last).await;
    let signed = |nonce: &str| {
        let headers = signer.sign_at(
            warden_client::signing::unix_now(),
            nonce,
            "POST",
            "/pay",
            "",
            b"1",
        );
        warden_client::signing::check_request_from(
            &headers,
            warden_client::signing::SCHEME_WARDEN_V1,
            "POST",
            "/pay",
            "",
            b"1",
        )
    };
    for i in [0, KEPT / 2, KEPT - 1] {
        let r = client.check(signed(&nonce(i))).await.unwrap();
        assert_reason(&r, Reason::Replay);
    }
    let r = client.check(signed(&nonce(KEPT))).await.unwrap();
    assert_reason(&r, Reason::Ok);
}

/// `server` took a saved state back, and kept the fence of the process
/// that saved it or not (then saying `why`).
fn assert_restored(server: &Server, fence_kept: bool, why: &str) {
    let logs = server.logs();
    let restored = logs
        .lines()
        .find(|l| l.contains("\"event\":\"state_restored\""))
        .unwrap_or_else(|| panic!("no state taken back:\n{logs}"));
    assert!(
        restored.contains(&format!("\"fence_kept\":{fence_kept}")) && restored.contains(why),
        "{restored}"
    );
}

/// A single process with a store and one key (`wk_pay`), with `server`
/// settings of its own.
fn single_process_config(dir: &ConfigDir, server: &str) -> std::path::PathBuf {
    dir.write_master_key();
    dir.write_config(&format!(
        "[server]\n{server}\n[store]\ndir = \"store\"\nmaster_key_file = \"master.key\"\n\n[[keys]]\nid = \"wk_pay\"\nsecrets = [{{ value = \"{SECRET}\" }}]\n"
    ))
}

/// A graceful restart hands the whole state over: the next process keeps
/// the fence of the one before and serves fresh requests at once (until
/// session 26 they were STALE for the future skew after every deploy),
/// and every request the one before accepted, ahead of its clock too, is a
/// replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_serves_fresh_requests_at_once_and_lets_no_request_in_twice() {
    let dir = ConfigDir::new();
    let config = single_process_config(&dir, "");
    let signer = Signer::new("wk_pay", SECRET);
    let mut first = Server::with_config(&config);
    let mut client = dir.client(&first).await;
    let accepted = accept_each(&mut client, &signer, &[0, 4]).await;
    assert!(first.terminate().success(), "{}", first.logs());
    assert!(first.logs().contains("\"whole\":true"), "{}", first.logs());

    let second = Server::with_config_unready(&config, "info");
    let mut client = dir.client(&second).await;
    // Signed in the second it started: below a fence counted from there.
    let fresh = pay_signed(&signer, 0);
    assert_reason(&client.check(fresh.clone()).await.unwrap(), Reason::Ok);
    for req in accepted.iter().chain([&fresh]) {
        assert_reason(&client.check(req.clone()).await.unwrap(), Reason::Replay);
    }
    assert_restored(&second, true, "");
}

/// The attack on that handover: the saved state copied aside, and put
/// back after another process took it back, accepted requests and was
/// killed. Their replay keys are not in the file, so it must lift no
/// fence: the next process fences as after a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_state_put_back_after_another_process_ran_lifts_no_fence() {
    let dir = ConfigDir::new();
    let config = single_process_config(&dir, "");
    let saved = dir.path().join("store/state.saved");
    let copy = dir.path().join("state.saved.copy");
    let signer = Signer::new("wk_pay", SECRET);
    let mut first = Server::with_config(&config);
    let mut client = dir.client(&first).await;
    let mut accepted = accept_each(&mut client, &signer, &[0]).await;
    assert!(first.terminate().success(), "{}", first.logs());
    std::fs::copy(&saved, &copy).unwrap();

    let mut second = Server::with_config_unready(&config, "info");
    let mut client = dir.client(&second).await;
    accepted.extend(accept_each(&mut client, &signer, &[0, 4]).await);
    second.kill();
    std::fs::copy(&copy, &saved).unwrap();

    let third = Server::with_config_unready(&config, "info");
    let mut client = dir.client(&third).await;
    for req in &accepted {
        let r = client.check(req.clone()).await.unwrap();
        assert_ne!(r.reason(), Reason::Ok, "replayed: {r:?}");
    }
    let r = client.check(pay_signed(&signer, 0)).await.unwrap();
    assert_reason(&r, Reason::Stale);
    assert_restored(&third, false, "another process ran");
}

/// The seal says whole; the entries under it were changed (a replay key
/// taken out, as an attacker with the directory would): set aside, with a
/// warning, and the process serves behind a fence as after a crash. Never
/// a reason not to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_state_changed_on_disk_is_set_aside_and_lifts_no_fence() {
    let dir = ConfigDir::new();
    let config = single_process_config(&dir, "");
    let saved = dir.path().join("store/state.saved");
    let signer = Signer::new("wk_pay", SECRET);
    let mut first = Server::with_config(&config);
    let mut client = dir.client(&first).await;
    let accepted = accept_each(&mut client, &signer, &[0]).await;
    assert!(first.terminate().success(), "{}", first.logs());
    // The last byte of the entries: the file ends in a line break, its
    // seal, and the break before that.
    let mut bytes = std::fs::read(&saved).unwrap();
    let seal_break = bytes[..bytes.len() - 1]
        .iter()
        .rposition(|&b| b == b'\n')
        .unwrap();
    bytes[seal_break - 1] ^= 0x01;
    std::fs::write(&saved, &bytes).unwrap();

    let second = Server::with_config_unready(&config, "info");
    let mut client = dir.client(&second).await;
    let r = client.check(accepted[0].clone()).await.unwrap();
    assert_ne!(r.reason(), Reason::Ok, "replayed: {r:?}");
    assert_reason(
        &client.check(pay_signed(&signer, 0)).await.unwrap(),
        Reason::Stale,
    );
    let logs = second.logs();
    assert!(
        logs.contains("\"event\":\"saved_state_unreadable\"")
            && logs.contains("not those it was saved with"),
        "{logs}"
    );
    assert!(dir.path().join("store/state.saved.unreadable").exists());
}

/// A drain that times out may leave a call changing state after the save:
/// the state is taken back, but not as whole, and the fence stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_saved_after_a_drain_that_timed_out_lifts_no_fence() {
    use futures::StreamExt;
    let dir = ConfigDir::new();
    let config = single_process_config(&dir, "drain_delay = \"0s\"\ndrain_timeout = \"1s\"\n");
    let signer = Signer::new("wk_pay", SECRET);
    let mut first = Server::with_config(&config);
    let mut client = dir.client(&first).await;
    // A stream left open: a call in flight past the drain timeout.
    let (tx, mut answers) = support::open_stream(&mut client, 4).await;
    let accepted = pay_signed(&signer, 0);
    tx.send(accepted.clone()).await.unwrap();
    assert_reason(&answers.next().await.unwrap().unwrap(), Reason::Ok);
    let status = tokio::task::spawn_blocking(move || {
        let status = first.terminate();
        (status, first.logs())
    })
    .await
    .unwrap();
    assert!(!status.0.success(), "{}", status.1);
    assert!(status.1.contains("\"whole\":false"), "{}", status.1);
    drop(tx);

    let second = Server::with_config_unready(&config, "info");
    let mut client = dir.client(&second).await;
    assert_reason(
        &client.check(pay_signed(&signer, 0)).await.unwrap(),
        Reason::Stale,
    );
    assert_ne!(client.check(accepted).await.unwrap().reason(), Reason::Ok);
    assert_restored(&second, false, "did not say it was whole");
}

/// An operator lowers `future_skew` and restarts warden (or it crashes and
/// comes back on the new config). The process before accepted requests
/// signed up to its own, larger skew ahead of its clock; a fence that
/// covered only the new skew let them be accepted again once the clock
/// came within the new skew of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_future_skew_lowered_across_a_restart_lets_nothing_accepted_before_it_through() {
    let dir = ConfigDir::new();
    dir.write_master_key();
    let config = |future_skew: &str| {
        dir.write_config(&format!(
            "[check]\nfuture_skew = \"{future_skew}\"\n\n[store]\ndir = \"store\"\nmaster_key_file = \"master.key\"\n\n[[keys]]\nid = \"wk_ahead\"\nsecrets = [{{ value = \"{SECRET}\" }}]\n"
        ))
    };
    let mut first = Server::with_config(&config("20s"));
    let signer = Signer::new("wk_ahead", SECRET);
    let mut client = dir.client(&first).await;
    // A client whose clock runs 15 s ahead: within the skew of the day.
    let ahead = pay_signed(&signer, 15);
    let signed_at = unix_now() + 15;
    assert_reason(&client.check(ahead.clone()).await.unwrap(), Reason::Ok);
    first.kill();

    let second = Server::with_config_unready(&config("5s"), "info");
    // Before its fence opens (the old skew's, about 20 s away), a request
    // signed now is refused, and told when signing again will pass.
    let r = dir
        .client(&second)
        .await
        .check(pay_signed(&signer, 0))
        .await
        .unwrap();
    assert_reason(&r, Reason::Stale);
    assert!(
        (10_000..=25_000).contains(&r.retry_after_ms),
        "{}",
        r.retry_after_ms
    );
    second.wait_past_fence_within(Duration::from_secs(60));
    let mut client = dir.client(&second).await;
    // Replayed once the new clock is within its new skew of the request,
    // and after: refused as signed before this process, for good.
    while unix_now() + 5 < signed_at + 1 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for _ in 0..2 {
        let r = client.check(ahead.clone()).await.unwrap();
        assert_reason(&r, Reason::Stale);
        assert!(
            r.message.contains("before this server started"),
            "{}",
            r.message
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_reason(
        &client.check(pay_signed(&signer, 0)).await.unwrap(),
        Reason::Ok,
    );
    assert!(
        second
            .logs()
            .contains("\"event\":\"fence_behind_previous_skew\""),
        "{}",
        second.logs()
    );
    drop(second);

    // A record warden did not write refuses the start, naming the file.
    std::fs::write(dir.path().join("store/fence.json"), "{\"fence\":").unwrap();
    let stderr = support::refused_start(&config("5s"));
    assert!(
        stderr.contains("fence.json") && stderr.contains("remove it only if"),
        "{stderr}"
    );
}

/// The restart fence counts from the previous process's clock mark, not
/// from a system clock that may have been set back across the restart (a
/// VM booted before NTP set its clock, a clock set by hand, a spoofed NTP
/// server and a crash).
#[tokio::test]
async fn a_clock_set_back_across_a_crash_lets_nothing_accepted_before_it_through() {
    let Some(faketime) = support::libfaketime() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut server = Server::dev_in(&dir);
    let signer = server.signer();
    let signed = |ahead: i64| pay_signed(&signer, ahead);
    let mut client = server.client().await;
    let accepted = accept_each(&mut client, &signer, &[0, 2, 4, 5]).await;
    server.kill();

    // The machine comes back with its clock 10 s behind.
    let clock = tmp.path().join("clock");
    support::write_clock(&clock, -10);
    let restarted = std::time::Instant::now();
    let server = Server::dev_in_with_clock_unready(&dir, &clock, &faketime);
    let mut client = server.client().await;
    let mut ready_after = None;
    while restarted.elapsed() < Duration::from_secs(40) {
        // Every request accepted before the crash is refused as signed
        // before this process's fence: for good, not as "ahead of the
        // clock", which would pass once the clock had caught up with it.
        for req in &accepted {
            let r = client.check(req.clone()).await.unwrap();
            assert_reason(&r, Reason::Stale);
            assert!(
                r.message.contains("before this server started"),
                "after {:?}: {}",
                restarted.elapsed(),
                r.message
            );
        }
        match ready_after {
            None if server.http_get("/readyz").0 == 200 => {
                ready_after = Some(restarted.elapsed());
            }
            // Replayed for a while after it is ready, as its clock runs on.
            Some(ready) if restarted.elapsed() > ready + Duration::from_secs(3) => break,
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ready = ready_after.expect("never ready");
    // Held until its clock passed the mark (10 s behind), then the fence.
    assert!(ready > Duration::from_secs(10), "ready after {ready:?}");
    assert!(
        server.logs().contains("clock_behind_mark"),
        "{}",
        server.logs()
    );
    // A client on the machine's clock, as it is now, is served.
    assert_reason(&client.check(signed(-10)).await.unwrap(), Reason::Ok);
}

/// The clock mark is written to disk twice a second, and the clock never
/// shows a time the mark does not cover. A store disk that hangs or fails
/// (a stalled network volume, a dying drive) must not stop the clock, and
/// so every check, with it: warden serves on (fresh requests allowed), and
/// counts and logs each late or failed mark; once the disk works again, the
/// mark is written again. A process whose mark hangs still stops on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_disk_that_hangs_or_fails_stops_no_check_and_no_shutdown() {
    let trouble = support::DiskTrouble::build();
    let tmp = tempfile::tempdir().unwrap();
    let mut server =
        Server::dev_in_with_disk_trouble(&tmp.path().join("dev"), &trouble, "/clock.mark");
    let signer = server.signer();
    let mut client = server.client().await;
    let failures = |server: &Server| {
        support::metric(
            server,
            "warden_durable_write_failures_total{what=\"clock_mark\"}",
        )
    };
    // Fresh requests, one every 200 ms for `how_long`: each allowed.
    async fn served_throughout(
        client: &mut warden_client::Client,
        signer: &Signer,
        how_long: Duration,
    ) {
        let started = std::time::Instant::now();
        while started.elapsed() < how_long {
            let r = client.check(pay_signed(signer, 0)).await.unwrap();
            assert_eq!(
                r.reason(),
                Reason::Ok,
                "after {:?} of disk trouble: {r:?}",
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    served_throughout(&mut client, &signer, Duration::from_secs(1)).await;
    assert_eq!(failures(&server), 0);

    // A disk that hangs: past the mark's lookahead (2 s) and the future
    // skew (5 s), a clock held at the last mark would refuse them all.
    trouble.hang();
    served_throughout(&mut client, &signer, Duration::from_secs(10)).await;
    assert!(failures(&server) >= 1, "a late mark was not counted");
    server.wait_for_log("\"event\":\"clock_mark_write_failed\"");

    // A disk that fails (the hung write ends with EIO, and so does each
    // write after it).
    trouble.fail();
    let failed_before = failures(&server);
    served_throughout(&mut client, &signer, Duration::from_secs(3)).await;
    assert!(
        failures(&server) > failed_before,
        "failed marks were not counted"
    );

    // It works again: the mark is written again.
    trouble.heal();
    server.wait_for_log("\"event\":\"clock_mark_written\"");
    served_throughout(&mut client, &signer, Duration::from_secs(1)).await;

    // A mark that hangs holds no shutdown up: the final mark is given up
    // after 2 s.
    trouble.hang();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stopping = std::time::Instant::now();
    assert!(server.terminate().success(), "{}", server.logs());
    assert!(
        stopping.elapsed() < Duration::from_secs(8),
        "SIGTERM took {:?} with the disk hung",
        stopping.elapsed()
    );
}

/// A process that does not run for a while (SIGSTOP, a VM paused or
/// migrated, a machine starved of CPU) wakes with its clock held at the
/// last mark it wrote, seconds behind: the clock mark's task has not run
/// either. The requests waiting for it, and the first ones after, are
/// signed by correct clocks and must be served, not refused as "ahead of
/// the server clock" until the mark's task gets its turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_paused_longer_than_the_future_skew_serves_fresh_requests_when_it_wakes() {
    let server = Server::dev();
    let signer = server.signer();
    let mut client = server.client().await;
    assert_reason(
        &client.check(pay_signed(&signer, 0)).await.unwrap(),
        Reason::Ok,
    );

    server.signal("STOP");
    // Past the mark's lookahead (2 s), the future skew (5 s) and a second.
    tokio::time::sleep(Duration::from_secs(9)).await;
    // Signed now, and in the server's socket before it wakes.
    let waiting: Vec<_> = (0..4)
        .map(|_| {
            let mut client = client.clone();
            let req = pay_signed(&signer, 0);
            tokio::spawn(async move { client.check(req).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.signal("CONT");
    for answer in waiting {
        assert_reason(&answer.await.unwrap().unwrap(), Reason::Ok);
    }
    assert_reason(
        &client.check(pay_signed(&signer, 0)).await.unwrap(),
        Reason::Ok,
    );
    server.wait_for_log("\"event\":\"process_stalled\"");
}

#[tokio::test]
async fn check_stream_answers_every_request_in_order() {
    let server = Server::dev();
    let mut client = server.client().await;
    let signer = server.signer();
    let valid = signer.check_request("GET", "/s", "", b"");
    let mut bad = signer.check_request("GET", "/s", "", b"");
    bad.path = "/other".into();
    let mut malformed = signer.check_request("GET", "/s", "", b"");
    malformed.nonce = "!".into();
    let batch = vec![
        valid.clone(),
        bad,
        valid,
        malformed,
        signer.check_request("GET", "/t", "", b""),
    ];
    let expected = [
        Reason::Ok,
        Reason::Unauthenticated,
        Reason::Replay,
        Reason::Malformed,
        Reason::Ok,
    ];
    let reasons: Vec<Reason> = support::stream_all(&mut client, batch)
        .await
        .into_iter()
        .map(|r| r.unwrap().reason())
        .collect();
    assert_eq!(reasons, expected);
}

/// A client that sends and never reads its answers must not make the
/// server read (and hold) its requests without end: requests are read only
/// as answers are taken, and answers only as the client's window allows.
#[tokio::test]
async fn a_client_that_never_reads_its_answers_stops_being_read() {
    use futures::StreamExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    let server = Server::dev();
    let mut client = server.client().await;
    let signer = server.signer();
    let (tx, mut answers) = support::open_stream(&mut client, 1).await;
    // Replays of one request after the first: the cheapest to answer.
    let request = signer.check_request("POST", "/s", "", &[b'x'; 1024]);
    let sent = Arc::new(AtomicU64::new(0));
    let sender = {
        let sent = sent.clone();
        tokio::spawn(async move {
            while tx.send(request.clone()).await.is_ok() {
                sent.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // The answers are not read: the requests taken must stop growing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = sent.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still taking requests after 30 s without a single answer read: {now}"
        );
        last = now;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        sent.load(Ordering::Relaxed),
        last,
        "requests were read again with no answer taken"
    );
    // Bounded by the HTTP/2 windows (the client's for answers, the
    // server's for requests), not by what the client cares to send.
    assert!(
        last < 200_000,
        "{last} requests taken from a client that reads nothing"
    );
    // It was back-pressure, not a dead stream: reading answers lets
    // requests in again, and they are answered in order.
    let first = answers.next().await.unwrap().unwrap();
    assert_eq!(first.reason(), Reason::Ok);
    for _ in 0..1000 {
        assert_eq!(
            answers.next().await.unwrap().unwrap().reason(),
            Reason::Replay
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        sent.load(Ordering::Relaxed) > last,
        "reading answers did not let requests in"
    );
    sender.abort();
    // The server is fine and serves others.
    let mut other = server.client().await;
    let fresh = signer.check_request("GET", "/other", "", b"");
    assert_eq!(other.check(fresh).await.unwrap().reason(), Reason::Ok);
}

/// The outside attack's finding: knowing only a public key id, one bad
/// signature every few seconds kept the key's owner locked out. Failures are
/// charged to their source now: the attacker's address is locked out, the
/// owner is not — from its own address, or through the same gateway.
#[tokio::test]
async fn failures_lock_out_their_source_never_the_key_they_name() {
    let dir = ConfigDir::new();
    let server = dir.start(&format!(
        "[check]\nfailure_limit = 3\nfailure_period = \"1m\"\n{TIGHT}\n[[keys]]\nid = \"wk_other\"\nsecrets = [{{ value = \"{SECRET}\" }}]\n"
    ));
    let mut client = dir.client(&server).await;
    let from = |mut req: CheckRequest, address: &str| {
        req.client_address = address.into();
        req
    };
    let wrong = Signer::new("wk_tight", "not-the-secret-0123456789abcdefghijkl");
    for _ in 0..10 {
        let r = client
            .check(from(
                wrong.check_request("GET", "/a", "", b""),
                "203.0.113.66",
            ))
            .await
            .unwrap();
        assert!(
            matches!(r.reason(), Reason::Unauthenticated | Reason::LockedOut),
            "{r:?}"
        );
    }
    // The attacker's address is refused even with the right secret...
    let right = Signer::new("wk_tight", SECRET);
    let r = client
        .check(from(
            right.check_request("GET", "/a", "", b""),
            "203.0.113.66",
        ))
        .await
        .unwrap();
    assert_reason(&r, Reason::LockedOut);
    assert_eq!(r.http_status, 429);
    assert!(r.retry_after_ms > 0 && r.retry_after_ms <= 20_000, "{r:?}");
    // ...while the owner is served from its own address and through the
    // gateway with no address at all.
    for address in ["192.0.2.10", ""] {
        let r = client
            .check(from(right.check_request("GET", "/a", "", b""), address))
            .await
            .unwrap();
        assert_reason(&r, Reason::Ok);
    }
    // With nothing finer than the gateway known, failures are answered
    // LOCKED_OUT once its budget is spent, and genuine requests still pass.
    for _ in 0..5 {
        client
            .check(wrong.check_request("GET", "/a", "", b""))
            .await
            .unwrap();
    }
    let r = client
        .check(wrong.check_request("GET", "/a", "", b""))
        .await
        .unwrap();
    assert_reason(&r, Reason::LockedOut);
    let other = Signer::new("wk_other", SECRET);
    assert_reason(
        &client
            .check(other.check_request("GET", "/a", "", b""))
            .await
            .unwrap(),
        Reason::Ok,
    );
}

#[tokio::test]
async fn unknown_and_revoked_keys_get_the_same_answer() {
    let dir = ConfigDir::new();
    let server = dir.start(&format!(
        "{TIGHT}\n[[keys]]\nid = \"wk_revoked\"\nrevoked = true\nsecrets = [{{ value = \"{SECRET}\" }}]\n"
    ));
    let mut client = dir.client(&server).await;
    let revoked = client
        .check(Signer::new("wk_revoked", SECRET).check_request("GET", "/a", "", b""))
        .await
        .unwrap();
    let unknown = client
        .check(Signer::new("wk_nobody", SECRET).check_request("GET", "/a", "", b""))
        .await
        .unwrap();
    let bad_sig = client
        .check(
            Signer::new("wk_tight", "wrong-secret-0123456789abcdefghijklmno")
                .check_request("GET", "/a", "", b""),
        )
        .await
        .unwrap();
    assert_reason(&revoked, Reason::Unauthenticated);
    assert_eq!(revoked, unknown);
    assert_eq!(revoked, bad_sig);
}

#[tokio::test]
async fn denials_are_logged_without_signatures_or_secrets() {
    let server = Server::dev();
    let mut client = server.client().await;
    let signer = server.signer();
    let mut req = signer.check_request("POST", "/x", "", b"body-bytes-that-must-not-be-logged");
    req.request_id = "req-123".into();
    let signature = req.signature.clone();
    client.check(req.clone()).await.unwrap();
    client.check(req).await.unwrap(); // replay: a logged denial
    let mut seen = HashSet::new();
    for _ in 0..100 {
        let logs = server.logs();
        if logs.contains("req-123") {
            seen.insert(logs);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = seen.into_iter().next().expect("the denial was logged");
    assert!(
        logs.contains("\"reason\":\"replay\"") && logs.contains(signer.key_id()),
        "{logs}"
    );
    assert!(!logs.contains(&signature));
    assert!(!logs.contains(&server.demo().secret));
    assert!(!logs.contains("body-bytes-that-must-not-be-logged"));
}

/// The outside attack's finding: one undecodable message (invalid UTF-8 in
/// a string field) ended the whole CheckStream with INTERNAL, losing the
/// requests behind it. It is answered in-band now, and the stream goes on.
#[tokio::test]
async fn an_undecodable_message_is_malformed_and_the_stream_goes_on() {
    use futures::StreamExt;
    use prost::Message;

    let server = Server::dev();
    let signer = server.signer();
    let valid = |path: &str| signer.check_request("GET", path, "", b"").encode_to_vec();
    // Field 3 (path) with bytes that are not UTF-8, then a valid key id.
    let mut broken = vec![0x1a, 0x03, b'/', 0xff, 0xfe];
    broken.extend(
        CheckRequest {
            key_id: signer.key_id().into(),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let batch = vec![
        valid("/one"),
        broken.clone(),
        valid("/two"),
        vec![0x1a, 0x7f],
        valid("/three"),
    ];

    let channel = warden_client::channel(&server.addr, server.tls())
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/warden.v1.Warden/CheckStream");
    let answers = grpc
        .streaming(
            tonic::Request::new(tokio_stream::iter(batch)),
            path,
            RawCodec::<CheckResponse>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    let answers: Vec<CheckResponse> = answers.map(|r| r.unwrap()).collect().await;
    let reasons: Vec<Reason> = answers.iter().map(|r| r.reason()).collect();
    assert_eq!(
        reasons,
        [
            Reason::Ok,
            Reason::Malformed,
            Reason::Ok,
            Reason::Malformed,
            Reason::Ok
        ]
    );
    assert_eq!(answers[1].message, "path: not valid UTF-8");
    assert_eq!(answers[1].http_status, 400);

    // The unary call answers the same way instead of failing.
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/warden.v1.Warden/Check");
    let r = grpc
        .unary(tonic::Request::new(broken), path, RawCodec::default())
        .await
        .unwrap()
        .into_inner();
    assert_reason(&r, Reason::Malformed);
}

/// Bounded memory, attacked: a flood of fresh nonces fills the replay
/// memory (`nonce_capacity`). Then a new nonce is refused as a whole
/// (RESOURCE_EXHAUSTED, a plain message) and takes no token; a replay of a
/// remembered one is still a REPLAY, never let through because the memory
/// is full (nonces are never evicted); and once the flood's nonces may be
/// forgotten, new requests are accepted again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_replay_memory_refuses_new_nonces_and_still_refuses_every_replay() {
    let dir = ConfigDir::new();
    let server = dir.start(
        r#"
[check]
nonce_capacity = 40
past_skew = "2s"
future_skew = "1s"

[[policies]]
name = "plenty"
limit = 1000
period = "1d"

[[keys]]
id = "wk_full"
policies = ["plenty"]
secrets = [{ value = "test-secret-0123456789abcdefghijklmnopqrstuvwxyz" }]
"#,
    );
    let mut client = dir.client(&server).await;
    let signer = Signer::new("wk_full", SECRET);
    let flood: Vec<CheckRequest> = (0..40)
        .map(|_| signer.check_request("POST", "/pay", "", b"1"))
        .collect();
    let answers = support::stream_all(&mut client, flood.clone()).await;
    for a in &answers {
        assert_reason(a.as_ref().unwrap(), Reason::Ok);
    }

    let remaining = |r: CheckResponse| r.limits[0].remaining;
    let dry_run = |signer: &Signer| {
        let mut dry = signer.check_request("POST", "/pay", "", b"1");
        dry.dry_run = true;
        dry
    };
    let before = remaining(client.check(dry_run(&signer)).await.unwrap());
    // A dry run answers as if it had been taken.
    assert_eq!(before, 1000 - 40 - 1);
    for _ in 0..3 {
        let refused = client
            .check(signer.check_request("POST", "/pay", "", b"1"))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert_eq!(refused.message(), "the replay cache is full; retry later");
    }
    for replay in [&flood[0], &flood[39]] {
        let r = client.check(replay.clone()).await.unwrap();
        assert_reason(&r, Reason::Replay);
    }
    server.wait_for_log("\"event\":\"replay_cache_full\"");
    // The refusals took no token (a day's limit: none comes back
    // meanwhile).
    let after = client.check(dry_run(&signer)).await.unwrap();
    assert_reason(&after, Reason::Ok);
    assert_eq!(remaining(after), before);

    // The flood's nonces run out (timestamp + 2 s); the memory makes room
    // by itself, and a replay of them is stale from then on.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match client
            .check(signer.check_request("POST", "/pay", "", b"1"))
            .await
        {
            Ok(r) => {
                assert_reason(&r, Reason::Ok);
                break;
            }
            Err(refused) => assert_eq!(refused.code(), tonic::Code::ResourceExhausted),
        }
        assert!(std::time::Instant::now() < deadline, "never accepted again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = client.check(flood[0].clone()).await.unwrap();
    assert_reason(&r, Reason::Stale);
}

/// The outside attack's finding: request limits with attacker-chosen
/// descriptors on long-period policies grew memory without bound. A capped
/// policy holds at most its cap; the flood evicts its own junk, not a
/// descriptor that has spent its limit; the operator is told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_junk_descriptors_stays_within_the_cap_and_frees_no_spent_limit() {
    let dir = ConfigDir::new();
    let server = dir.start(
        r#"
[[policies]]
name = "login-per-ip"
algorithm = "sliding_window"
limit = 3
period = "1d"
max_entries = 500

[[keys]]
id = "wk_flood"
secrets = [{ value = "test-secret-0123456789abcdefghijklmnopqrstuvwxyz" }]
"#,
    );
    let mut client = dir.client(&server).await;
    let signer = Signer::new("wk_flood", SECRET);
    let login = |descriptor: String| {
        let mut req = signer.check_request("POST", "/login", "", b"");
        req.limits = vec![LimitRequest {
            policy: "login-per-ip".into(),
            descriptor,
        }];
        req
    };
    for _ in 0..3 {
        let r = client.check(login("ip:192.0.2.1".into())).await.unwrap();
        assert_reason(&r, Reason::Ok);
    }
    assert_reason(
        &client.check(login("ip:192.0.2.1".into())).await.unwrap(),
        Reason::RateLimited,
    );

    let flood: Vec<CheckRequest> = (0..5_000).map(|i| login(format!("ip:junk-{i}"))).collect();
    let answers = support::stream_all(&mut client, flood).await;
    assert!(
        answers
            .iter()
            .all(|a| a.as_ref().unwrap().reason() == Reason::Ok)
    );

    assert_reason(
        &client.check(login("ip:192.0.2.1".into())).await.unwrap(),
        Reason::RateLimited,
    );
    server.wait_for_log("\"event\":\"state_pool_full\"");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, metrics) = server.http_get("/metrics");
        let held = metrics
            .lines()
            .find(|l| l.starts_with("warden_state_pool_entries{pool=\"login-per-ip\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(held) = held {
            assert!(held <= 500.0, "{held} entries held");
            assert!(metrics.contains("warden_state_evictions_total{pool=\"login-per-ip\"}"));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no pool metric:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
