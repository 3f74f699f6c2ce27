//! End to end: two warden processes sharing one PostgreSQL key store. A key
//! created or revoked through one is effective in the other.
//!
//! Needs `WARDEN_TEST_POSTGRES_URL` (a superuser URL; `bash tests/run`
//! starts a throwaway PostgreSQL and sets it). Each test makes its own
//! database.

use crate::support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::{ConfigDir, Server, fresh_database};
use warden_client::proto::{CheckRequest, Reason};
use warden_client::signing::Signer;
use warden_client::{Client, Tls};

/// Config files for two nodes: same certificates, master key and database,
/// each its own directory for the audit log.
fn node_configs(dir: &ConfigDir, url: &str) -> [PathBuf; 2] {
    dir.write_master_key();
    let rest = format!(
        "[[callers]]\nidentity = \"spiffe://test/gateway\"\nroles = [\"check\", \"admin\"]\n\n[store]\ndir = \"NODE\"\nmaster_key_file = \"master.key\"\npostgres_url = \"{url}\"\n"
    );
    let template = std::fs::read_to_string(dir.write_config(&rest)).unwrap();
    ["node-a", "node-b"].map(|node| {
        let path = dir.path().join(format!("{node}.toml"));
        std::fs::write(&path, template.replace("\"NODE\"", &format!("\"{node}\""))).unwrap();
        path
    })
}

async fn check(dir: &ConfigDir, server: &Server, key_id: &str, secret: &str) -> Reason {
    let mut client = Client::connect(&server.addr, Tls::from_dev_dir(dir.path()).unwrap())
        .await
        .unwrap();
    let req: CheckRequest = Signer::new(key_id, secret).check_request("GET", "/", "", b"");
    client.check(req).await.unwrap().reason()
}

/// Polls until `want`, for at most two seconds (a change reaches the other
/// node through PostgreSQL's NOTIFY, in milliseconds).
async fn eventually(dir: &ConfigDir, server: &Server, key_id: &str, secret: &str, want: Reason) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let got = check(dir, server, key_id, secret).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "still {got:?}, wanted {want:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two nodes on a fresh database; `None` without PostgreSQL.
async fn two_nodes() -> Option<(ConfigDir, Server, Server)> {
    let url = fresh_database().await?;
    let dir = ConfigDir::new();
    let [a_conf, b_conf] = node_configs(&dir, &url);
    let (a, b) = (Server::with_config(&a_conf), Server::with_config(&b_conf));
    Some((dir, a, b))
}

/// The CLI's output against `server`, once it has succeeded.
fn cli_ok(dir: &ConfigDir, server: &Server, args: &[&str]) -> Vec<u8> {
    let out = dir.cli(server, args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The id and secret `keys create --json` printed.
fn created_key(stdout: &[u8]) -> (String, String) {
    let created: serde_json::Value = serde_json::from_slice(stdout).unwrap();
    let field = |name: &str| created[name].as_str().unwrap().to_owned();
    (field("key_id"), field("secret"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_created_and_revoked_through_one_node_take_effect_in_the_other() {
    let Some((dir, a, b)) = two_nodes().await else {
        return;
    };
    let (id, secret) = created_key(&cli_ok(
        &dir,
        &a,
        &["keys", "create", "--owner", "shared", "--json"],
    ));
    let (id, secret) = (id.as_str(), secret.as_str());
    assert_eq!(check(&dir, &a, id, secret).await, Reason::Ok);
    eventually(&dir, &b, id, secret, Reason::Ok).await;

    cli_ok(&dir, &a, &["keys", "revoke", id]);
    // On the node that made the change: the very next check.
    assert_eq!(check(&dir, &a, id, secret).await, Reason::Unauthenticated);
    // On the other node: as soon as the notification arrives.
    eventually(&dir, &b, id, secret, Reason::Unauthenticated).await;
}

/// A policy change is announced apart from any key: the other node must
/// rebuild every key that counts against it (a key change there reloads
/// only that key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_changed_through_one_node_limits_its_keys_in_the_other() {
    let Some((dir, a, b)) = two_nodes().await else {
        return;
    };
    let put = |limit: &str| {
        cli_ok(
            &dir,
            &a,
            &[
                "policies", "put", "shared", "--limit", limit, "--period", "1h",
            ],
        )
    };
    put("100000");
    let (id, secret) = created_key(&cli_ok(
        &dir,
        &a,
        &[
            "keys", "create", "--owner", "shared", "--policy", "shared", "--json",
        ],
    ));
    eventually(&dir, &b, &id, &secret, Reason::Ok).await;

    // Down to one an hour: node b has let at least one through already.
    put("1");
    eventually(&dir, &b, &id, &secret, Reason::RateLimited).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_create_in_postgres_survives_kill_9_and_secrets_are_sealed() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let dir = ConfigDir::new();
    let [a_conf, _] = node_configs(&dir, &url);
    let mut a = Server::with_config(&a_conf);
    let (id, secret) = created_key(&cli_ok(
        &dir,
        &a,
        &["keys", "create", "--owner", "durable", "--json"],
    ));
    a.kill();

    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let row = client
        .query_one("SELECT record FROM warden_keys WHERE id = $1", &[&id])
        .await
        .unwrap();
    let record: String = row.get(0);
    assert!(
        !record.contains(&secret) && !record.contains(&secret[4..]),
        "a secret is stored in clear"
    );

    let a = Server::with_config(&a_conf);
    assert_eq!(check(&dir, &a, &id, &secret).await, Reason::Ok);
}

/// The shared store is rotated once, and every node's audit chain key
/// with it: the command is run once per node directory, as the README
/// says. The runs after the first find the store already under the new
/// key and re-seal only their node's chain key (before, they failed on
/// the store, and those nodes could not start again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_master_key_of_the_shared_store_keeps_keys_working() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let dir = ConfigDir::new();
    let [a_conf, b_conf] = node_configs(&dir, &url);
    let mut a = Server::with_config(&a_conf);
    let mut b = Server::with_config(&b_conf);
    let (id, secret) = created_key(&cli_ok(
        &dir,
        &a,
        &["keys", "create", "--owner", "rotated", "--json"],
    ));
    a.terminate();
    b.terminate();

    let new_key = dir.path().join("new.key");
    let rotate = |node: &str| {
        let out = std::process::Command::new(support::BIN)
            .args([
                "store",
                "rotate-master-key",
                "--postgres-url-env",
                "ROTATE_URL",
                // The node's directory: its audit chain key is re-sealed too.
                "--dir",
                dir.path().join(node).to_str().unwrap(),
            ])
            .args([
                "--old-key-file",
                dir.path().join("master.key").to_str().unwrap(),
            ])
            .args(["--new-key-file", new_key.to_str().unwrap()])
            .env("ROTATE_URL", &url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{node}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = rotate("node-a");
    assert!(
        first.contains("re-encrypted 1 secrets") && first.contains("re-sealed the audit chain key"),
        "{first}"
    );
    let second = rotate("node-b");
    assert!(
        second.contains("already under the new master key")
            && second.contains("re-sealed the audit chain key"),
        "{second}"
    );
    // The old key no longer opens the store...
    let refused = std::process::Command::new(support::BIN)
        .args([
            "serve",
            "--config",
            a_conf.to_str().unwrap(),
            "--metrics-listen",
            "off",
        ])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("another master key"));
    // ...the new one does, on both nodes, and the key still verifies.
    std::fs::copy(&new_key, dir.path().join("master.key")).unwrap();
    let a = Server::with_config(&a_conf);
    let b = Server::with_config(&b_conf);
    assert_eq!(check(&dir, &a, &id, &secret).await, Reason::Ok);
    assert_eq!(check(&dir, &b, &id, &secret).await, Reason::Ok);
}

/// A database restart (maintenance, a failover) closes every connection to
/// it. Checks never needed it; admin changes must work again as soon as
/// the database is back, through the node that made them and on the other
/// node too, without restarting warden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_costs_admin_changes_nothing_once_it_is_back() {
    if std::env::var("WARDEN_TEST_POSTGRES_URL").is_err() {
        return;
    }
    let Some(pg) = support::OwnPostgres::start() else {
        return;
    };
    let dir = ConfigDir::new();
    let [a_conf, b_conf] = node_configs(&dir, &pg.url);
    let (a, b) = (Server::with_config(&a_conf), Server::with_config(&b_conf));
    a.wait_past_fence();
    b.wait_past_fence();
    let create = |owner: &str| {
        let out = dir.cli(&a, &["keys", "create", "--owner", owner, "--json"]);
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            a.logs()
        );
        let key: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let text = |f: &str| key[f].as_str().unwrap().to_owned();
        (text("key_id"), text("secret"))
    };
    let (before_id, before_secret) = create("before");
    eventually(&dir, &b, &before_id, &before_secret, Reason::Ok).await;

    pg.restart();
    // Checks go on from memory.
    assert_eq!(
        check(&dir, &a, &before_id, &before_secret).await,
        Reason::Ok
    );
    // The first change after the restart is made, and reaches the other
    // node once its change feed has reconnected (it tries every second).
    let (id, secret) = create("after");
    assert_eq!(check(&dir, &a, &id, &secret).await, Reason::Ok);
    let deadline = Instant::now() + Duration::from_secs(10);
    while check(&dir, &b, &id, &secret).await != Reason::Ok {
        assert!(Instant::now() < deadline, "node b never saw the new key");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A database that stops answering (hung, or a network that drops
/// everything) must not hold admin changes for as long as TCP keeps the
/// connection open: the change fails within warden's bound, says that it
/// may have been made (it was sent), is audited so, and changes work again
/// once the database answers, without restarting warden. Checks never
/// needed the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_stops_answering_bounds_admin_changes_and_says_they_may_have_been_made() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let (proxy, through_proxy) = support::Proxy::to_database(&url).await;
    let dir = ConfigDir::new();
    let [a_conf, _] = node_configs(&dir, &through_proxy);
    let a = Server::with_config(&a_conf);
    a.wait_past_fence();
    let cli = |args: &[&str]| dir.cli_within(&a, args, Duration::from_secs(30));
    let create = |owner: &str| cli(&["keys", "create", "--owner", owner, "--json"]);
    let out = create("before");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (id, secret) = (
        key["key_id"].as_str().unwrap(),
        key["secret"].as_str().unwrap(),
    );

    proxy.freeze();
    assert_eq!(check(&dir, &a, id, secret).await, Reason::Ok);
    let out = create("during");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("it may have been made"), "{stderr}");
    assert!(stderr.contains("DeadlineExceeded"), "{stderr}");
    a.wait_for_log("\"event\":\"admin_unconfirmed\"");

    proxy.thaw();
    let out = create("after");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&["audit", "tail", "--json"]);
    let audit = String::from_utf8_lossy(&out.stdout);
    assert!(audit.contains("change.unconfirmed"), "{audit}");
    assert!(cli(&["audit", "verify"]).status.success());
}

/// A node whose connections to the database silently stop carrying
/// anything (the database host gone without a word, then a failover to
/// another) must not go on trusting what it loaded: its change feed
/// notices that it hears nothing, reconnects, and loads everything, so a
/// key revoked through another node meanwhile stops working there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_reaches_a_node_whose_change_feed_went_silent() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let (proxy, through_proxy) = support::Proxy::to_database(&url).await;
    let dir = ConfigDir::new();
    let [a_conf, b_conf] = node_configs(&dir, &url);
    // Node b reaches the database through the proxy; node a directly.
    let config = std::fs::read_to_string(&b_conf).unwrap();
    std::fs::write(&b_conf, config.replace(&url, &through_proxy)).unwrap();
    let (a, b) = (Server::with_config(&a_conf), Server::with_config(&b_conf));
    a.wait_past_fence();
    b.wait_past_fence();
    let (id, secret) = created_key(&cli_ok(
        &dir,
        &a,
        &["keys", "create", "--owner", "shared", "--json"],
    ));
    eventually(&dir, &b, &id, &secret, Reason::Ok).await;

    proxy.strand();
    cli_ok(&dir, &a, &["keys", "revoke", &id]);
    assert_eq!(check(&dir, &a, &id, &secret).await, Reason::Unauthenticated);
    let deadline = Instant::now() + Duration::from_secs(40);
    while check(&dir, &b, &id, &secret).await != Reason::Unauthenticated {
        assert!(
            Instant::now() < deadline,
            "node b still accepts a key revoked through node a:\n{}",
            b.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    b.wait_for_log("\"event\":\"store_listen_lost\"");
}
