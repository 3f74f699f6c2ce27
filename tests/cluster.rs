//! End to end: three warden processes forming a cluster on a throwaway
//! PostgreSQL (the coordinator). Membership: every node sees the same
//! members and version; a killed node's lease runs out and it leaves the
//! membership, the version grows; a node stopped with SIGTERM leaves at
//! once. Checks through the cluster: tests/cluster_checks.rs.
//!
//! Needs `WARDEN_TEST_POSTGRES_URL` (`bash tests/run` sets it).

use crate::support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::{ConfigDir, OwnPostgres, Server, fresh_database};

/// Config files for `nodes`, sharing certificates, master key and database,
/// each with its own directory and a 2 s lease.
fn node_configs(dir: &ConfigDir, url: &str, nodes: &[&str]) -> Vec<PathBuf> {
    node_configs_with(dir, url, nodes, "2s")
}

fn node_configs_with(dir: &ConfigDir, url: &str, nodes: &[&str], ttl: &str) -> Vec<PathBuf> {
    support::cluster_configs(dir, url, nodes, ttl, "")
}

/// `warden cluster status --json` through `server`.
fn status(dir: &ConfigDir, server: &Server) -> serde_json::Value {
    let out = dir.cli(server, &["cluster", "status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn members(status: &serde_json::Value) -> Vec<String> {
    status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["node"].as_str().unwrap().to_owned())
        .collect()
}

/// Polls until `want` holds for the status seen through `server` (10 s).
fn eventually(
    dir: &ConfigDir,
    server: &Server,
    what: &str,
    want: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(dir, server);
        if want(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "never: {what}; last status {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A cluster deployed at once (a StatefulSet with parallel pods, `docker
/// compose up`) starts every node on an empty database at the same moment.
/// PostgreSQL's `CREATE TABLE IF NOT EXISTS` does not hold between two
/// sessions creating the same table at once (the second fails on a unique
/// index of the catalog), so before session 59 all but one node could exit
/// at start with "duplicate key value violates unique constraint" (in the
/// first round, five runs of five). Two rounds of four nodes, each on a
/// database of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_started_together_on_an_empty_database_all_join() {
    let nodes = ["node-a", "node-b", "node-c", "node-d"];
    for round in 0..2 {
        let Some(url) = fresh_database().await else {
            return;
        };
        let dir = ConfigDir::new();
        let configs = node_configs(&dir, &url, &nodes);
        let start = std::sync::Barrier::new(nodes.len());
        let servers: Vec<Server> = std::thread::scope(|scope| {
            let started: Vec<_> = configs
                .iter()
                .map(|config| {
                    let start = &start;
                    scope.spawn(move || {
                        start.wait();
                        Server::with_config_unready(config, "info")
                    })
                })
                .collect();
            started
                .into_iter()
                .map(|s| {
                    s.join()
                        .unwrap_or_else(|_| panic!("round {round}: a node did not start"))
                })
                .collect()
        });
        for server in &servers {
            server.wait_past_fence();
        }
        let seen = eventually(&dir, &servers[0], "four members", |s| members(s).len() == 4);
        assert_eq!(members(&seen), nodes, "round {round}");
    }
}

/// Least privilege: warden's database role may read and write warden's
/// tables and nothing more (no CREATE on the schema, owner of nothing).
/// Before the tables exist, a node under that role refuses to start and
/// says what to run; `warden store create-tables`, run once as the
/// database's owner, makes them; then nodes under that role join and serve
/// admin changes. Until session 59 every start ran `CREATE TABLE IF NOT
/// EXISTS` and `ALTER TABLE`, which such a role may not, so it never
/// started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_may_only_read_and_write_warden_s_tables_serves_once_they_are_made() {
    let Some(owner_url) = fresh_database().await else {
        return;
    };
    let role = format!(
        "warden_rw_{}",
        hex::encode(warden::crypto::random_bytes::<4>())
    );
    let (owner, connection) = tokio_postgres::connect(&owner_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    owner
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; REVOKE CREATE ON SCHEMA public FROM PUBLIC"
        ))
        .await
        .unwrap();
    let url = owner_url.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    assert_ne!(url, owner_url);
    let dir = ConfigDir::new();
    let configs = node_configs(&dir, &url, &["node-a", "node-b"]);

    let stderr = support::refused_start(&configs[0]);
    assert!(
        stderr.contains("may not create them") && stderr.contains("warden store create-tables"),
        "{stderr}"
    );

    let created = support::output_within(
        std::process::Command::new(support::BIN)
            .args([
                "store",
                "create-tables",
                "--postgres-url-env",
                "TEST_OWNER_URL",
            ])
            .env("TEST_OWNER_URL", &owner_url),
        Duration::from_secs(60),
    );
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    owner
        .batch_execute(&format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON warden_meta, warden_keys, warden_policies,
                 warden_members, warden_membership_log TO {role};
             GRANT USAGE ON SEQUENCE warden_renewals TO {role}"
        ))
        .await
        .unwrap();

    let a = Server::with_config(&configs[0]);
    let b = Server::with_config(&configs[1]);
    let seen = eventually(&dir, &b, "two members", |s| members(s).len() == 2);
    assert_eq!(members(&seen), ["node-a", "node-b"]);
    let out = dir.cli(&a, &["keys", "create", "--owner", "least", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = created["key_id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dir.cli(&b, &["keys", "show", id]).status.success() {
        assert!(Instant::now() < deadline, "the key never reached node-b");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// TLS to PostgreSQL: with `sslmode=require&sslrootcert=CA` in the URL,
/// every connection a node makes (the key store, its change feed, the
/// lease keeper and its listener) is TLS, and the database's certificate
/// is verified: a node given another CA, or a database without TLS,
/// refuses to start and says why.
/// Until session 59 warden spoke only plain text to PostgreSQL, and a URL
/// asking for TLS was refused ("no TLS implementation configured").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_to_a_database_that_asks_for_tls_is_tls_and_verified() {
    let ca = warden::dev::Ca::new("database ca").unwrap();
    let (cert, key) = ca.server_cert(&["127.0.0.1"]).unwrap();
    let Some(pg) = OwnPostgres::start_with_tls(&cert, &key) else {
        return;
    };
    let dir = ConfigDir::new();
    let (ours, other) = (
        dir.path().join("db-ca.pem"),
        dir.path().join("other-ca.pem"),
    );
    std::fs::write(&ours, ca.cert_pem()).unwrap();
    std::fs::write(&other, warden::dev::Ca::new("other").unwrap().cert_pem()).unwrap();
    let url = |root: &std::path::Path| {
        format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            pg.url,
            root.display()
        )
    };

    let stderr = support::refused_start(&node_configs(&dir, &url(&other), &["node-x"])[0]);
    assert!(stderr.contains("UnknownIssuer"), "{stderr}");

    // No falling back to plain text: a database without TLS (the suite's)
    // is no connection either, as a man in the middle would make it look.
    if let Some(plain) = fresh_database().await {
        let asked = format!("{plain}?sslmode=require&sslrootcert={}", ours.display());
        let stderr = support::refused_start(&node_configs(&dir, &asked, &["node-y"])[0]);
        assert!(stderr.contains("does not support TLS"), "{stderr}");
    }

    let configs = node_configs(&dir, &url(&ours), &["node-a"]);
    let a = Server::with_config(&configs[0]);
    let out = dir.cli(&a, &["keys", "create", "--owner", "over-tls", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(members(&status(&dir, &a)), ["node-a"]);

    // The test's own connection is plain text; every TLS one is warden's.
    let (client, connection) = tokio_postgres::connect(&pg.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    let (tls, plain): (i64, i64) = (row.get(0), row.get(1));
    assert!(tls >= 3, "{tls} connections over TLS");
    assert_eq!(plain, 0, "a connection of warden's in plain text");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_leave_and_agree_on_the_membership() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let dir = ConfigDir::new();
    let configs = node_configs(&dir, &url, &["node-a", "node-b", "node-c"]);
    let a = Server::with_config(&configs[0]);
    let mut b = Server::with_config(&configs[1]);
    let mut c = Server::with_config(&configs[2]);

    // Every node is ready only once it holds a lease, and all agree.
    let seen_by_a = eventually(&dir, &a, "three members", |s| members(s).len() == 3);
    assert_eq!(members(&seen_by_a), ["node-a", "node-b", "node-c"]);
    assert_eq!(seen_by_a["coordinator_ok"], true);
    let version = seen_by_a["version"].as_u64().unwrap();
    let seen_by_c = eventually(&dir, &c, "the same version", |s| s["version"] == version);
    assert_eq!(members(&seen_by_c), members(&seen_by_a));

    // Keys are owned, each by exactly one member.
    for i in 0..12 {
        dir.cli(
            &a,
            &["keys", "create", "--owner", &format!("o{i}"), "--json"],
        );
    }
    let s = eventually(&dir, &a, "keys owned", |s| {
        s["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["keys_owned"].as_u64().unwrap())
            .sum::<u64>()
            == 12
    });
    assert!(
        s["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["keys_owned"].as_u64().unwrap() > 0)
            .count()
            >= 2,
        "{s}"
    );

    // kill -9: the lease runs out (2 s) and the others see it gone.
    c.kill();
    let after_kill = eventually(&dir, &a, "node-c gone", |s| {
        members(s) == ["node-a", "node-b"]
    });
    assert!(after_kill["version"].as_u64().unwrap() > version);
    a.wait_for_log("\"event\":\"cluster_membership\"");

    // SIGTERM: the node gives its lease up on the way out.
    let before = after_kill["version"].as_u64().unwrap();
    assert!(b.terminate().success());
    let after_leave = status(&dir, &a);
    let after_leave = if members(&after_leave) == ["node-a"] {
        after_leave
    } else {
        // The leave is seen at a's next renewal (every 400 ms).
        eventually(&dir, &a, "node-b gone", |s| members(s) == ["node-a"])
    };
    assert!(after_leave["version"].as_u64().unwrap() > before);
    assert!(
        b.logs().contains("\"event\":\"cluster_left\""),
        "{}",
        b.logs()
    );

    // Every version's members are in the log, for a node that misses
    // versions to pass through them: each version once, none left out.
    let logged = support::membership_log(&url).await;
    let last = after_leave["version"].as_i64().unwrap();
    assert_eq!(
        logged.iter().map(|(v, _)| *v).collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>(),
        "{logged:?}"
    );
    let at = |v: u64| &logged[v as usize - 1].1;
    assert_eq!(at(version), &["node-a", "node-b", "node-c"]);
    assert_eq!(at(before), &["node-a", "node-b"]);
    assert_eq!(logged.last().unwrap().1, ["node-a"]);
}

#[test]
fn a_cluster_needs_the_postgresql_store() {
    let dir = ConfigDir::new();
    dir.write_master_key();
    let config = dir.write_config(
        "[store]\ndir = \"s\"\nmaster_key_file = \"master.key\"\n\n[cluster]\nnode = \"a\"\nadvertise = \"127.0.0.1:1\"\n",
    );
    let out = std::process::Command::new(support::BIN)
        .args(["serve", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cluster: needs a shared store"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// PostgreSQL stopped: the nodes keep serving checks on the keys they have
/// and on the last membership they saw, and say that the coordinator is
/// unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_coordinator_gone_nodes_keep_serving_on_the_last_membership() {
    if std::env::var("WARDEN_TEST_POSTGRES_URL").is_err() {
        assert!(
            std::env::var("CI").is_err(),
            "bash tests/run sets up PostgreSQL in CI"
        );
        return;
    }
    let Some(pg) = OwnPostgres::start() else {
        return;
    };
    let dir = ConfigDir::new();
    let configs = node_configs(&dir, &pg.url, &["node-x", "node-y"]);
    let x = Server::with_config(&configs[0]);
    let _y = Server::with_config(&configs[1]);
    let out = dir.cli(&x, &["keys", "create", "--owner", "kept", "--json"]);
    let key: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (id, secret) = (
        key["key_id"].as_str().unwrap().to_owned(),
        key["secret"].as_str().unwrap().to_owned(),
    );
    let before = eventually(&dir, &x, "two members", |s| members(s).len() == 2);

    pg.stop();
    let after = eventually(&dir, &x, "the coordinator reported lost", |s| {
        s["coordinator_ok"] == false
    });
    assert_eq!(
        members(&after),
        members(&before),
        "the last membership is kept"
    );
    assert_eq!(after["version"], before["version"]);
    x.wait_for_log("\"event\":\"cluster_coordinator_lost\"");
    let mut client = dir.client(&x).await;
    let signer = warden_client::signing::Signer::new(id, secret);
    let r = client
        .check(signer.check_request("GET", "/", "", b""))
        .await
        .unwrap();
    assert_eq!(r.reason(), warden_client::proto::Reason::Ok);
    assert_eq!(x.http_get("/readyz").0, 200, "still serving");
}

/// Changes are announced (NOTIFY) and heard (LISTEN): with a 20 s lease a
/// node renews only every 4 s, yet sees another node leave well before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departure_is_heard_at_once_not_at_the_next_renewal() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let dir = ConfigDir::new();
    let configs = node_configs_with(&dir, &url, &["node-p", "node-q"], "20s");
    let p = Server::with_config(&configs[0]);
    let mut q = Server::with_config(&configs[1]);
    eventually(&dir, &p, "two members", |s| members(s).len() == 2);
    // Right after p's own renewal, so its next tick is ~4 s away.
    p.wait_for_log("\"event\":\"cluster_membership\"");
    assert!(q.terminate().success());
    let left = Instant::now();
    let deadline = left + Duration::from_millis(2500);
    while members(&status(&dir, &p)) != ["node-p"] {
        assert!(
            Instant::now() < deadline,
            "the departure took longer than a notification: {:?}",
            left.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A node that joins while a member holding some of its slots does not
/// answer (paused) waits for that member's handover: it is not ready, and
/// `cluster status` names the member and how many slots it owes. Once the
/// member answers again, it hands them over and the new node is ready.
/// (One that never answers is given up on once its lease runs out; the
/// unit tests of `Membership` cover that.) Before session 32 the new node
/// was ready at once while checks of those slots waited, and a test that
/// paused a node right after its cluster was ready saw failure charges
/// pile up behind the missing handover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_is_not_ready_while_a_member_owes_it_a_handover() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let dir = ConfigDir::new();
    // The paused node stays a member (its lease holds 16 s at least)
    // while the third one joins (after its restart fence, ~6 s).
    let configs = node_configs_with(&dir, &url, &["node-a", "node-b", "node-c"], "20s");
    let a = Server::with_config(&configs[0]);
    let b = Server::with_config(&configs[1]);
    eventually(&dir, &a, "two members", |s| members(s).len() == 2);

    b.signal("STOP");
    let paused = Instant::now();
    let c = Server::with_config_unready(&configs[2], "info");
    let owed = |s: &serde_json::Value| -> Vec<(String, u64)> {
        s["awaiting"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let node = a["node"].as_str().unwrap().to_owned();
                (node, a["slots"].as_u64().unwrap())
            })
            .collect()
    };
    let waiting = eventually(&dir, &c, "node-c waits for node-b", |s| {
        owed(s).iter().any(|(n, _)| n == "node-b")
    });
    assert!(
        paused.elapsed() < Duration::from_secs(15),
        "node-b's lease may have run out already"
    );
    assert_eq!(members(&waiting), ["node-a", "node-b", "node-c"]);
    let (_, slots) = owed(&waiting)
        .into_iter()
        .find(|(n, _)| n == "node-b")
        .unwrap();
    assert!(slots > 0, "{waiting}");
    assert_eq!(
        c.http_get("/readyz").0,
        503,
        "ready while node-b owes it a handover"
    );
    let text = dir.cli(&c, &["cluster", "status"]).stdout;
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains(&format!("for node-b to hand over {slots} slots")),
        "{text}"
    );

    b.signal("CONT");
    c.wait_past_fence_within(Duration::from_secs(20));
    let ready = status(&dir, &c);
    assert_eq!(members(&ready), ["node-a", "node-b", "node-c"], "{ready}");
    assert!(owed(&ready).is_empty(), "{ready}");
    assert_eq!(ready["awaiting_for_ms"], 0, "{ready}");
    assert!(
        c.logs()
            .contains(r#""event":"cluster_handed_over","from":"node-b""#),
        "{}",
        c.logs()
    );
}
