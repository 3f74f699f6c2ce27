//! End to end: keys managed through the admin API and the `warden` CLI, the
//! durable store, secrets at rest, and the hash-chained audit log.

use crate::support;

use std::process::{Command, Output};
use std::time::Duration;

use support::{BIN, ConfigDir, SECRET, Server};
use warden_client::proto::{CheckRequest, Reason};
use warden_client::signing::Signer;

/// Runs `warden ARGS --dev-dir DIR` against a dev server.
fn cli(server: &Server, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .args(["--dev-dir", server.dir.to_str().unwrap()])
        .output()
        .expect("run warden")
}

fn ok_json(out: Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

/// Creates an HMAC key with the demo policy; returns (key_id, secret).
fn create_key(server: &Server, owner: &str) -> (String, String) {
    let v = ok_json(cli(
        server,
        &[
            "keys", "create", "--owner", owner, "--policy", "demo", "--json",
        ],
    ));
    (
        v["key_id"].as_str().unwrap().to_owned(),
        v["secret"].as_str().unwrap().to_owned(),
    )
}

async fn check(server: &Server, req: CheckRequest) -> Reason {
    server.client().await.check(req).await.unwrap().reason()
}

/// Sends `requests` down one `CheckStream`; how many were answered.
async fn check_all(client: &mut warden_client::Client, requests: Vec<CheckRequest>) -> usize {
    support::stream_all(client, requests).await.len()
}

fn signed(key_id: &str, secret: &str) -> CheckRequest {
    Signer::new(key_id, secret).check_request("POST", "/orders", "", b"{}")
}

#[tokio::test]
async fn create_sign_check_then_revoke_is_effective_on_the_next_check() {
    let server = Server::dev();
    let (id, secret) = create_key(&server, "billing");
    assert!(id.starts_with("wk_") && secret.starts_with("wsk_"));
    assert_eq!(check(&server, signed(&id, &secret)).await, Reason::Ok);

    let out = cli(&server, &["keys", "revoke", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        check(&server, signed(&id, &secret)).await,
        Reason::Unauthenticated
    );
    let shown = ok_json(cli(&server, &["keys", "show", &id, "--json"]));
    assert_eq!(shown["revoked"], true);
    // Durable writes are timed for operators.
    let (_, metrics) = server.http_get("/metrics");
    assert!(
        metrics.contains("warden_store_write_seconds_count{what=\"store\"} 2"),
        "{metrics}"
    );
    // Two admin changes, and maybe the denial tally of a window.
    let audit_writes = metrics
        .lines()
        .find(|l| l.starts_with("warden_store_write_seconds_count{what=\"audit\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!((2..=3).contains(&audit_writes), "{metrics}");
    // Each change loaded its key alone; the demo key is left.
    assert!(
        metrics.contains("warden_key_changes_seconds_count{change=\"key\"} 2"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("warden_key_changes_seconds_count{change=\"all\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("\nwarden_api_keys 1\n"), "{metrics}");
    assert!(
        shown.get("secret").is_none(),
        "show never returns secrets: {shown}"
    );
}

#[tokio::test]
async fn rotation_keeps_both_secrets_valid_during_the_grace_and_only_the_new_one_after() {
    let server = Server::dev();
    let (id, old) = create_key(&server, "rotating");
    let v = ok_json(cli(
        &server,
        &["keys", "rotate", &id, "--grace", "2s", "--json"],
    ));
    let new = v["secret"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert_eq!(check(&server, signed(&id, &old)).await, Reason::Ok);
    assert_eq!(check(&server, signed(&id, &new)).await, Reason::Ok);
    // Past the grace period (whole seconds, inclusive) the old one stops.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert_eq!(
        check(&server, signed(&id, &old)).await,
        Reason::Unauthenticated
    );
    assert_eq!(check(&server, signed(&id, &new)).await, Reason::Ok);
}

#[tokio::test]
async fn bearer_keys_check_by_api_key_and_are_stored_only_as_a_hash() {
    let server = Server::dev();
    let v = ok_json(cli(
        &server,
        &[
            "keys", "create", "--owner", "mobile", "--bearer", "--policy", "demo", "--json",
        ],
    ));
    let api_key = v["api_key"].as_str().unwrap().to_owned();
    let id = v["key_id"].as_str().unwrap().to_owned();
    let bearer = |key: &str| CheckRequest {
        api_key: key.to_owned(),
        method: "GET".into(),
        path: "/feed".into(),
        ..Default::default()
    };
    let mut client = server.client().await;
    let r = client.check(bearer(&api_key)).await.unwrap();
    assert_eq!(r.reason(), Reason::Ok);
    assert_eq!(r.caller.unwrap().key_id, id);
    assert_eq!(r.limits[0].name, "demo");
    let wrong = client
        .check(bearer(
            "wak_0000000000000000000000000000000000000000000000000000000000000000",
        ))
        .await
        .unwrap();
    assert_eq!(wrong.reason(), Reason::Unauthenticated);
    // A flood of bad API keys through the same gateway (no address passed)
    // and from one address: the valid key keeps working from anywhere else.
    for i in 0..40 {
        let mut bad = bearer(&format!("wak_{i:064}"));
        if i % 2 == 0 {
            bad.client_address = "198.51.100.9".into();
        }
        client.check(bad).await.unwrap();
    }
    assert_eq!(
        client.check(bearer(&api_key)).await.unwrap().reason(),
        Reason::Ok
    );
    let mut elsewhere = bearer(&api_key);
    elsewhere.client_address = "192.0.2.44".into();
    assert_eq!(client.check(elsewhere).await.unwrap().reason(), Reason::Ok);
    let mut attacker = bearer(&api_key);
    attacker.client_address = "198.51.100.9".into();
    assert_eq!(
        client.check(attacker).await.unwrap().reason(),
        Reason::LockedOut
    );
    let stored = std::fs::read(server.dir.join("store/store.jsonl")).unwrap();
    assert!(!String::from_utf8_lossy(&stored).contains(&api_key));
    // Revoked, the API key is refused at the next check: the key leaves the
    // bearer index with the key index (one key's change, not a rebuild).
    let out = cli(&server, &["keys", "revoke", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut elsewhere = bearer(&api_key);
    elsewhere.client_address = "192.0.2.45".into();
    assert_eq!(
        client.check(elsewhere).await.unwrap().reason(),
        Reason::Unauthenticated
    );
}

#[tokio::test]
async fn the_store_and_audit_log_never_contain_a_secret_in_clear() {
    let server = Server::dev();
    let (id, secret) = create_key(&server, "a");
    let rotated = ok_json(cli(&server, &["keys", "rotate", &id, "--json"]));
    let rotated = rotated["secret"].as_str().unwrap().to_owned();
    check(
        &server,
        signed(&id, "wrong-secret-0123456789abcdefghijklmnop"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for file in ["store/store.jsonl", "store/audit.log"] {
        let bytes = std::fs::read(server.dir.join(file)).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for s in [&secret, &rotated] {
            assert!(!text.contains(s.as_str()), "{file} contains a secret");
            // Not even without the prefix, or hex-encoded.
            assert!(
                !text.contains(&s[4..]) && !text.contains(&hex::encode(s.as_bytes())),
                "{file}"
            );
        }
    }
    assert!(!server.logs().contains(&secret));
}

#[tokio::test]
async fn an_acknowledged_create_survives_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut first = Server::dev_in(&dir);
    let (id, secret) = create_key(&first, "durable");
    first.kill();
    let second = Server::dev_in(&dir);
    assert_eq!(check(&second, signed(&id, &secret)).await, Reason::Ok);
    let out = cli(&second, &["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A disk that fills up while warden serves (a file-size limit: a write
/// past it fails partway, as on a full disk). The journal fills first,
/// then the audit log. Every admin change from then on fails whole, with
/// a clear error: a revoke that cannot be recorded does not take effect.
/// Checks go on. After kill -9 the restarted server has every
/// acknowledged key and none whose creation failed, the audit chain
/// verifies, and neither file holds a partial line.
#[tokio::test]
async fn a_disk_that_fills_up_fails_changes_whole_and_breaks_neither_the_journal_nor_the_audit_chain()
 {
    use warden_client::proto::admin_client::AdminClient;
    use warden_client::proto::{CreateKeyRequest, RevokeRequest};

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut first = Server::dev_in(&dir);
    let (kept, kept_secret) = create_key(&first, "before");
    first.terminate();
    let journal = dir.join("store/store.jsonl");
    let audit = dir.join("store/audit.log");
    let largest = [&journal, &audit]
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .max()
        .unwrap();

    let mut full = Server::dev_in_with_file_size_limit(&dir, largest + 8 * 1024);
    let channel = warden_client::channel(&full.addr, full.tls())
        .await
        .unwrap();
    let mut admin = AdminClient::new(channel);
    let (mut acknowledged, mut refused) = (Vec::new(), Vec::new());
    for n in 0..400 {
        let id = format!("full-{n}");
        let created = admin
            .create_key(CreateKeyRequest {
                key_id: id.clone(),
                owner: "full".into(),
                policies: vec!["demo".into()],
                ..Default::default()
            })
            .await;
        match created {
            Ok(answer) => acknowledged.push((id, answer.into_inner().secret)),
            Err(status) => {
                // What the caller sees names no file and no OS error.
                assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
                assert_eq!(
                    status.message(),
                    "the change could not be stored; see the server log"
                );
                refused.push(id);
                if full.logs().contains(r#""what":"audit""#) {
                    break;
                }
            }
        }
    }
    let logs = full.logs();
    assert!(
        logs.contains(r#""what":"store key""#) && logs.contains(r#""what":"audit""#),
        "the journal and then the audit log should have filled up: {} created, {} refused\n{logs}",
        acknowledged.len(),
        refused.len()
    );
    assert!(!acknowledged.is_empty());
    let metrics = full.http_get("/metrics").1;
    for what in ["store", "audit"] {
        let series = format!("warden_durable_write_failures_total{{what=\"{what}\"}} ");
        let failures: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        assert!(
            failures >= 1.0,
            "{what} write failures are counted:\n{metrics}"
        );
    }

    // A revoke that cannot be recorded is not made.
    let revoke = admin
        .revoke(RevokeRequest {
            key_id: kept.clone(),
            secret_id: String::new(),
        })
        .await;
    assert_eq!(revoke.unwrap_err().code(), tonic::Code::Internal);
    assert_eq!(check(&full, signed(&kept, &kept_secret)).await, Reason::Ok);
    for (id, secret) in &acknowledged {
        assert_eq!(check(&full, signed(id, secret)).await, Reason::Ok, "{id}");
    }

    // Room again: changes go through on the same process, no restart,
    // onto whole records.
    full.lift_file_size_limit();
    let after = admin
        .create_key(CreateKeyRequest {
            key_id: "after-room".into(),
            owner: "full".into(),
            policies: vec!["demo".into()],
            ..Default::default()
        })
        .await
        .expect("a change once there is room")
        .into_inner()
        .secret;
    assert_eq!(check(&full, signed("after-room", &after)).await, Reason::Ok);
    acknowledged.push(("after-room".into(), after));
    let out = cli(&full, &["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    full.kill();

    for path in [&journal, &audit] {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(
            text.ends_with('\n'),
            "{} ends in a partial line",
            path.display()
        );
        for line in text.lines() {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("{}: {e}: {line}", path.display()));
        }
    }
    let second = Server::dev_in(&dir);
    let out = cli(&second, &["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        check(&second, signed(&kept, &kept_secret)).await,
        Reason::Ok
    );
    for (id, secret) in &acknowledged {
        assert_eq!(check(&second, signed(id, secret)).await, Reason::Ok, "{id}");
    }
    for id in &refused {
        let out = cli(&second, &["keys", "show", id, "--json"]);
        assert!(!out.status.success(), "{id} was refused but exists");
    }
    // The journal filled first: its refused creation was recorded, and so
    // was its failure.
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first_refused = records
        .iter()
        .position(|r| r["action"] == "key.create" && r["key_id"] == refused[0].as_str())
        .expect("the first refused creation was recorded before it was tried");
    assert_eq!(records[first_refused + 1]["action"], "change.failed");
    for (id, _) in &acknowledged {
        assert!(
            records
                .iter()
                .any(|r| r["action"] == "key.create" && r["key_id"] == id.as_str()),
            "{id} was created unrecorded"
        );
    }
    // With room again, changes go through.
    create_key(&second, "after");
}

/// The audit log's disk fills up while the key store's still has room
/// (a file-size limit below the audit log's size). A revoke then fails
/// whole: the key keeps working, and keeps working after a restart.
/// Stored first and audited second, the revoke would sit in the store
/// unrecorded, take effect only at the next start, and the admin would
/// have been told it failed.
// Multi-threaded: the test blocks while warden drains, and the client's
// connection must still answer its GOAWAY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_that_cannot_be_recorded_is_not_made() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut first = Server::dev_in(&dir);
    let (id, secret) = create_key(&first, "kept");
    // A thousand junk key ids make a thousand denial records: an audit
    // log far larger than the journal.
    let forged = "forged-secret-0123456789abcdefghijklmno";
    let flood: Vec<CheckRequest> = (0..1_000)
        .map(|i| signed(&format!("wk_junk_{i}"), forged))
        .collect();
    assert_eq!(check_all(&mut first.client().await, flood).await, 1_000);
    assert!(first.terminate().success());
    let journal = std::fs::metadata(dir.join("store/store.jsonl"))
        .unwrap()
        .len();
    let audit = std::fs::metadata(dir.join("store/audit.log"))
        .unwrap()
        .len();
    let limit = journal + 64 * 1024;
    assert!(
        audit > 2 * limit,
        "audit log {audit} B, journal {journal} B"
    );

    let mut full = Server::dev_in_with_file_size_limit(&dir, limit);
    let out = cli(&full, &["keys", "revoke", &id]);
    assert!(!out.status.success(), "the revoke was acknowledged");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the change could not be stored"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(full.logs().contains(r#""what":"audit""#), "{}", full.logs());
    assert_eq!(check(&full, signed(&id, &secret)).await, Reason::Ok);
    // A denial's tally cannot be written either: lost, and counted. (From
    // another source: the flood's is locked out, across the restart too.)
    let mut denied = signed("wk_junk", forged);
    denied.client_address = "203.0.113.9".into();
    assert_eq!(check(&full, denied).await, Reason::Unauthenticated);
    assert!(
        full.http_get("/metrics")
            .1
            .contains(r#"warden_durable_write_failures_total{what="audit"} 1"#),
        "the refused revoke's audit write is counted"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !full
        .http_get("/metrics")
        .1
        .contains(r#"warden_audit_dropped_total{cause="write_failed"} 1"#)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            full.http_get("/metrics").1
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    full.kill();

    let second = Server::dev_in(&dir);
    assert_eq!(check(&second, signed(&id, &secret)).await, Reason::Ok);
    let info = ok_json(cli(&second, &["keys", "show", &id, "--json"]));
    assert_eq!(info["revoked"], false, "{info}");
    assert!(cli(&second, &["audit", "verify"]).status.success());
}

/// A long-running server whose key changes over and over: the journal is
/// compacted while it serves, the key works on, and after kill -9 the
/// restarted server has the key as it was last acknowledged.
#[tokio::test]
async fn a_journal_compacted_while_serving_keeps_every_acknowledged_change_through_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut first = Server::dev_in(&dir);
    let (id, secret) = create_key(&first, "durable");
    let channel = warden_client::channel(&first.addr, first.tls())
        .await
        .unwrap();
    let mut admin = warden_client::proto::admin_client::AdminClient::new(channel);
    let scopes = |n: usize| warden_client::proto::StringList {
        values: vec![format!("scope-{n}")],
    };
    // More superseded lines than the 1,000 that tip a journal over.
    const CHANGES: usize = 1_100;
    for n in 1..=CHANGES {
        admin
            .update_key(warden_client::proto::UpdateKeyRequest {
                key_id: id.clone(),
                scopes: Some(scopes(n)),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    first.wait_for_log("\"event\":\"store_compacted\"");
    let journal = std::fs::read_to_string(dir.join("store/store.jsonl")).unwrap();
    assert!(
        journal.lines().count() < CHANGES - 1_000 + 10,
        "{} lines after {CHANGES} changes of one key",
        journal.lines().count()
    );
    assert_eq!(check(&first, signed(&id, &secret)).await, Reason::Ok);
    first.kill();

    let second = Server::dev_in(&dir);
    assert_eq!(check(&second, signed(&id, &secret)).await, Reason::Ok);
    let info = ok_json(cli(&second, &["keys", "show", &id, "--json"]));
    assert_eq!(
        info["scopes"],
        serde_json::json!([format!("scope-{CHANGES}")])
    );
}

#[tokio::test]
async fn audit_verify_passes_untouched_and_names_the_first_broken_record_after_tampering() {
    let server = Server::dev();
    for owner in ["a", "b", "c", "d"] {
        create_key(&server, owner);
    }
    let out = cli(&server, &["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("4 records"));
    // The tail is the newest records, oldest of them first.
    let out = cli(&server, &["audit", "tail", "-n", "2", "--json"]);
    let tail: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let details: Vec<&str> = tail.iter().map(|r| r["detail"].as_str().unwrap()).collect();
    assert_eq!(details, ["kind=hmac owner=c", "kind=hmac owner=d"]);

    let log = server.dir.join("store/audit.log");
    let original = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    let edited = original.replacen("owner=b", "owner=x", 1);
    let deleted = [lines[0], lines[2], lines[3]].join("\n") + "\n";
    let reordered = [lines[0], lines[2], lines[1], lines[3]].join("\n") + "\n";
    for (what, text, broken_at) in [
        ("edited", edited, 2),
        ("deleted", deleted, 2),
        ("reordered", reordered, 2),
    ] {
        // Offline, on a copy of the file...
        let copy = server.dir.join(format!("audit-{what}.log"));
        std::fs::write(&copy, &text).unwrap();
        let out = cli(
            &server,
            &["audit", "verify", "--file", copy.to_str().unwrap()],
        );
        assert!(!out.status.success(), "{what} was not detected");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("BROKEN at record {broken_at}")),
            "{what}: {stderr}"
        );
        // ...and through the server, on the live file.
        std::fs::write(&log, &text).unwrap();
        let out = cli(&server, &["audit", "verify"]);
        assert!(
            !out.status.success(),
            "{what} was not detected through the API"
        );
        std::fs::write(&log, &original).unwrap();
    }
    assert!(cli(&server, &["audit", "verify"]).status.success());
}

#[tokio::test]
async fn security_denials_are_audited() {
    let server = Server::dev();
    let (id, secret) = create_key(&server, "audited");
    check(
        &server,
        signed(&id, "forged-secret-0123456789abcdefghijklmno"),
    )
    .await;
    let replay = signed(&id, &secret);
    check(&server, replay.clone()).await;
    for _ in 0..50 {
        check(&server, replay.clone()).await;
    }
    // Denials are tallied per subject and written once per window (1 s
    // under serve --dev).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let out = cli(&server, &["audit", "tail", "--key-id", &id, "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let details: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let denied: Vec<&str> = details
        .iter()
        .filter(|r| r["action"] == "check.denied")
        .map(|r| r["detail"].as_str().unwrap())
        .collect();
    // One record per subject and window, with the count: 50 replays are a
    // record or two (the window may turn meanwhile), not 50.
    let total = |reason: &str| -> u64 {
        denied
            .iter()
            .filter_map(|d| d.strip_prefix(&format!("reason={reason} count=")))
            .filter_map(|rest| rest.split(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert!(denied.len() <= 3, "{text}");
    assert_eq!(total("unauthenticated"), 1, "{text}");
    assert_eq!(total("replay"), 50, "{text}");
    assert!(denied.iter().all(|d| d.ends_with("source=-")), "{text}");
    assert!(
        details
            .iter()
            .all(|r| r["actor"] == "spiffe://warden.dev/client")
    );
    assert!(cli(&server, &["audit", "verify"]).status.success());
}

#[tokio::test]
async fn key_listing_pages_are_stable_while_keys_are_created() {
    let server = Server::dev();
    let mut created: Vec<String> = (0..25)
        .map(|i| {
            let v = ok_json(cli(
                &server,
                &[
                    "keys",
                    "create",
                    "--id",
                    &format!("wk_page_{i:02}"),
                    "--json",
                ],
            ));
            v["key_id"].as_str().unwrap().to_owned()
        })
        .collect();
    created.sort();

    let channel = warden_client::channel(&server.addr, server.tls())
        .await
        .unwrap();
    let mut admin = warden_client::proto::admin_client::AdminClient::new(channel);
    let mut seen = Vec::new();
    let mut token = String::new();
    for round in 0.. {
        let page = admin
            .list_keys(warden_client::proto::ListKeysRequest {
                page_size: 7,
                page_token: token,
                owner: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.keys.into_iter().map(|k| k.key_id));
        // Keys created between pages, before and after the cursor.
        ok_json(cli(
            &server,
            &[
                "keys",
                "create",
                "--id",
                &format!("wk_page_{round:02}a"),
                "--json",
            ],
        ));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "pages come in key id order");
    sorted.dedup();
    assert_eq!(sorted.len(), seen.len(), "no key appears twice");
    for id in &created {
        assert!(seen.contains(id), "{id} was skipped");
    }
}

#[tokio::test]
async fn listing_by_owner_pages_through_that_owners_keys_and_no_others() {
    let server = Server::dev();
    // Interleaved in id order with other owners' keys, so a page that
    // stopped at the wrong key or let another owner's through would show.
    let mut acme = Vec::new();
    for i in 0..9 {
        let owner = if i % 3 == 0 { "acme" } else { "globex" };
        let id = format!("wk_owner_{i:02}");
        ok_json(cli(
            &server,
            &["keys", "create", "--id", &id, "--owner", owner, "--json"],
        ));
        if owner == "acme" {
            acme.push(id);
        }
    }
    let channel = warden_client::channel(&server.addr, server.tls())
        .await
        .unwrap();
    let mut admin = warden_client::proto::admin_client::AdminClient::new(channel);
    let mut list = async |owner: &str, page_size| {
        let (mut seen, mut token, mut pages) = (Vec::new(), String::new(), 0);
        loop {
            let page = admin
                .list_keys(warden_client::proto::ListKeysRequest {
                    page_size,
                    page_token: token,
                    owner: owner.into(),
                })
                .await
                .unwrap()
                .into_inner();
            pages += 1;
            assert!(page.keys.iter().all(|k| k.owner == owner), "{page:?}");
            seen.extend(page.keys.into_iter().map(|k| k.key_id));
            if page.next_page_token.is_empty() {
                return (seen, pages);
            }
            token = page.next_page_token;
        }
    };
    assert_eq!(list("acme", 2).await, (acme.clone(), 2));
    assert_eq!(list("acme", 3).await.0, acme);
    assert_eq!(list("globex", 100).await.0.len(), 6);
    assert_eq!(list("nobody", 10).await, (vec![], 1));
}

#[tokio::test]
async fn a_caller_without_the_admin_role_is_permission_denied() {
    let dir = ConfigDir::new();
    dir.write_master_key();
    let server = dir.start("[store]\ndir = \"store\"\nmaster_key_file = \"master.key\"\n");
    let out = dir.cli(&server, &["keys", "create", "--owner", "x"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PermissionDenied"), "{stderr}");
    server.wait_for_log("\"rpc\":\"CreateKey\"");
}

#[tokio::test]
async fn keys_from_the_config_file_are_listed_but_read_only() {
    let dir = ConfigDir::new();
    dir.write_master_key();
    let server = dir.start(&format!(
        "[[callers]]\nidentity = \"spiffe://test/gateway\"\nroles = [\"check\", \"admin\"]\n\n[store]\ndir = \"store\"\nmaster_key_file = \"master.key\"\n\n[[keys]]\nid = \"wk_from_config\"\nsecrets = [{{ value = \"{SECRET}\" }}]\n"
    ));
    let run = |args: &[&str]| dir.cli(&server, args);
    let list = ok_json(run(&["keys", "list", "--json"]));
    assert_eq!(list[0]["key_id"], "wk_from_config");
    assert_eq!(list[0]["source"], "config");
    let out = run(&["keys", "revoke", "wk_from_config"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("config file"));
}

#[tokio::test]
async fn rotating_the_master_key_keeps_every_key_working() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut first = Server::dev_in(&dir);
    let (id, secret) = create_key(&first, "kept");
    first.terminate();

    let new_key = tmp.path().join("new.key");
    let out = Command::new(BIN)
        .args([
            "store",
            "rotate-master-key",
            "--dir",
            dir.join("store").to_str().unwrap(),
        ])
        .args(["--old-key-file", dir.join("master.key").to_str().unwrap()])
        .args(["--new-key-file", new_key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The dev server reads dev-dir/master.key: the old key no longer opens
    // the store, so starting with it must fail clearly...
    let refused = Command::new(BIN)
        .args(support::dev_args(&dir))
        .args(["--metrics-listen", "off"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("another master key"));
    // ...and with the new key everything works as before.
    std::fs::copy(&new_key, dir.join("master.key")).unwrap();
    let second = Server::dev_in(&dir);
    assert_eq!(check(&second, signed(&id, &secret)).await, Reason::Ok);
}

/// Two processes on one store directory would each keep their own keys (a
/// key revoked through one works on in the other) and their own nonces (a
/// request accepted by one is accepted by the other), and write one journal
/// and audit chain over each other. The second is refused before it reads
/// anything, as is a master-key rotation while warden serves.
#[tokio::test]
async fn a_second_process_on_one_store_directory_is_refused_and_the_first_serves_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut first = Server::dev_in(&dir);
    let (id, secret) = create_key(&first, "kept");
    let accepted = signed(&id, &secret);
    assert_eq!(check(&first, accepted.clone()).await, Reason::Ok);
    let journal = std::fs::read(dir.join("store/store.jsonl")).unwrap();
    let audit = std::fs::read(dir.join("store/audit.log")).unwrap();

    let within = Duration::from_secs(20);
    let second = support::output_within(
        Command::new(BIN)
            .args(support::dev_args(&dir))
            .args(["--metrics-listen", "127.0.0.1:0"]),
        within,
    );
    let stderr = String::from_utf8_lossy(&second.stderr);
    // As a port in use: another process has it, the config is fine.
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is in use by another warden process")
            && stderr.contains(&format!("(pid {})", first.pid())),
        "{stderr}"
    );

    let rotation = support::output_within(
        Command::new(BIN)
            .args(["store", "rotate-master-key", "--dir"])
            .arg(dir.join("store"))
            .arg("--old-key-file")
            .arg(dir.join("master.key"))
            .arg("--new-key-file")
            .arg(tmp.path().join("new.key")),
        within,
    );
    let stderr = String::from_utf8_lossy(&rotation.stderr);
    assert!(!rotation.status.success(), "{stderr}");
    assert!(
        stderr.contains("is in use by another warden process"),
        "{stderr}"
    );

    // Neither wrote a byte, and the first serves on as before.
    assert_eq!(
        std::fs::read(dir.join("store/store.jsonl")).unwrap(),
        journal
    );
    assert_eq!(std::fs::read(dir.join("store/audit.log")).unwrap(), audit);
    assert_eq!(check(&first, accepted.clone()).await, Reason::Replay);
    assert_eq!(check(&first, signed(&id, &secret)).await, Reason::Ok);

    // Killed, it leaves nothing stale: the directory is free at once.
    first.kill();
    let next = Server::dev_in(&dir);
    assert_ne!(check(&next, accepted).await, Reason::Ok);
    assert_eq!(check(&next, signed(&id, &secret)).await, Reason::Ok);
}

/// The outside attack's finding: every denial appended one record (616,000
/// records, 189 MB in one short attack). Denials are tallied per subject and
/// window now, and a spray of junk subjects is bounded per window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_denials_makes_a_bounded_number_of_audit_records() {
    let dir = ConfigDir::new();
    dir.write_master_key();
    let mut server = dir.start(&format!(
        "[[callers]]\nidentity = \"spiffe://test/gateway\"\nroles = [\"check\", \"admin\"]\n\n\
         [store]\ndir = \"store\"\nmaster_key_file = \"master.key\"\n\n\
         [audit]\ndenial_window = \"1h\"\nmax_denial_subjects = 100\n\n\
         [[keys]]\nid = \"wk_flooded\"\nsecrets = [{{ value = \"{SECRET}\" }}]\n"
    ));
    // 3,000 forged requests for one key and 3,000 junk key ids.
    let forged = "forged-secret-0123456789abcdefghijklmno";
    let flood: Vec<CheckRequest> = (0..3_000)
        .flat_map(|i| {
            [
                signed("wk_flooded", forged),
                signed(&format!("wk_junk_{i}"), forged),
            ]
        })
        .collect();
    assert_eq!(
        check_all(&mut dir.client(&server).await, flood).await,
        6_000
    );
    // The window's tallies are written at the latest on shutdown.
    assert!(server.terminate().success());
    let text = std::fs::read_to_string(dir.path().join("store/audit.log")).unwrap();
    let denied: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("check.denied"))
        .collect();
    // 100 subjects apart, the rest summed under "*"; and the alerts.
    assert!(denied.len() <= 102, "{} denial records", denied.len());
    let count = |l: &&str| -> u64 {
        l.split("count=")
            .nth(1)
            .and_then(|c| c.split(' ').next())
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    };
    // Every denial is counted: the key's (unauthenticated, then locked out
    // once the gateway's budget is spent) and all the junk.
    let flooded: u64 = denied
        .iter()
        .filter(|l| l.contains("\"key_id\":\"wk_flooded\""))
        .map(count)
        .sum();
    assert_eq!(flooded, 3_000, "{text}");
    assert_eq!(denied.iter().map(count).sum::<u64>(), 6_000);
    assert!(text.len() < 100_000, "{} bytes", text.len());
}

/// The outside attack's finding: replacing audit.log (copy + rename) made
/// the server keep writing to the deleted file, so an acknowledged change
/// was missing on disk while `audit verify` said intact. And the files were
/// readable by anyone.
#[tokio::test]
async fn a_replaced_audit_file_is_followed_and_the_change_lands_on_disk() {
    use std::os::unix::fs::PermissionsExt;
    let server = Server::dev();
    create_key(&server, "before");
    let store = server.dir.join("store");
    let log = store.join("audit.log");
    let copy = store.join("audit.log.copy");
    std::fs::copy(&log, &copy).unwrap();
    std::fs::rename(&copy, &log).unwrap();
    let (after_replace, _) = create_key(&server, "after-replace");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&after_replace),
        "the change went to the deleted file"
    );
    assert!(text.contains("audit.reopened"));
    let out = cli(&server, &["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.wait_for_log("\"event\":\"audit_file_tampered\"");

    for file in ["audit.log", "audit.key", "store.jsonl"] {
        let mode = std::fs::metadata(store.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
}

/// Rewriting a record and recomputing the chain without the chain key (as
/// anyone could with the old, unkeyed SHA-256 chain) fails verification,
/// through the server and offline.
#[tokio::test]
async fn a_recomputed_chain_fails_verification() {
    let server = Server::dev();
    for owner in ["a", "b", "c"] {
        create_key(&server, owner);
    }
    let log = server.dir.join("store/audit.log");
    let original = std::fs::read_to_string(&log).unwrap();
    let mut records: Vec<warden::audit::Record> = original
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    records[1].detail = records[1].detail.replace("owner=b", "owner=x");
    let forger = warden::audit::ChainKey::new([42; 32]);
    for i in 1..records.len() {
        records[i].prev_hash = records[i - 1].hash.clone();
        records[i].hash = warden::audit::record_hash(&forger, &records[i]);
    }
    let forged: String = records
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
    std::fs::write(&log, forged).unwrap();
    let out = cli(&server, &["audit", "verify"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("BROKEN at record 2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let offline = cli(
        &server,
        &[
            "audit",
            "verify",
            "--store-dir",
            server.dir.join("store").to_str().unwrap(),
        ],
    );
    assert!(!offline.status.success());
    std::fs::write(&log, original).unwrap();
    assert!(cli(&server, &["audit", "verify"]).status.success());
}

/// A key whose policy has since left the config file can still be revoked:
/// a revocation must never depend on unrelated fields being valid.
#[tokio::test]
async fn a_key_whose_policy_was_removed_can_still_be_revoked() {
    let dir = ConfigDir::new();
    dir.write_master_key();
    let store = "[[callers]]\nidentity = \"spiffe://test/gateway\"\nroles = [\"check\", \"admin\"]\n\n[store]\ndir = \"store\"\nmaster_key_file = \"master.key\"\n";
    let mut server = dir.start(&format!(
        "{store}\n[[policies]]\nname = \"gone-soon\"\nlimit = 10\nperiod = \"1m\"\n"
    ));
    let out = dir.cli(
        &server,
        &[
            "keys",
            "create",
            "--owner",
            "o",
            "--policy",
            "gone-soon",
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = ok_json(out)["key_id"].as_str().unwrap().to_owned();
    assert!(server.terminate().success());

    let server = dir.start(store);
    let out = dir.cli(&server, &["keys", "revoke", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = ok_json(dir.cli(&server, &["keys", "show", &id, "--json"]));
    assert_eq!(shown["revoked"], true);
}

/// At 3 a.m. "transport error" tells an operator nothing. The CLI says
/// where it tried to connect and why it could not: nothing listening, or
/// a server whose certificate the given CA did not sign.
#[test]
fn the_cli_says_why_it_cannot_connect() {
    let server = Server::dev();
    let other = Server::dev();
    let stderr = |args: &[&str]| {
        let out = cli(&server, args);
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let closed = support::free_port();
    let target = format!("127.0.0.1:{closed}");
    let text = stderr(&["keys", "list", "--target", &target]);
    assert!(
        text.contains(&format!("cannot connect to warden at {target}"))
            && text.contains("Connection refused"),
        "{text}"
    );
    // This server's dev CA did not sign the other server's certificate.
    let text = stderr(&["keys", "list", "--target", &other.addr]);
    assert!(
        text.contains(&other.addr) && text.contains("invalid peer certificate"),
        "{text}"
    );
}

/// A server that hangs (SIGSTOP) reads nothing: the CLI gives up at
/// `--timeout`, says so, and says that a change may have been made.
#[test]
fn the_cli_gives_up_on_a_hung_server_at_its_timeout() {
    let server = Server::dev();
    server.signal("STOP");
    let started = std::time::Instant::now();
    let mut child = Command::new(BIN)
        .args(["keys", "create", "--owner", "hung", "--timeout", "1s"])
        .args(["--dev-dir", server.dir.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            server.signal("CONT");
            panic!("the CLI did not give up");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    server.signal("CONT");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("within 1s (--timeout)") && stderr.contains("may have been made"),
        "{stderr}"
    );
}
