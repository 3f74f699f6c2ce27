//! End to end: checks through a three-node cluster on a throwaway
//! PostgreSQL, each node a real `warden` process over mTLS, the nodes
//! calling each other with their own `peer` certificates. What a cluster
//! promises, and the attacks on it:
//!
//! - a limit is one limit, however requests are spread over the nodes;
//! - of identical requests sent to every node at once, exactly one wins;
//! - a check whose key lives on one node and whose request limit on
//!   another takes nothing anywhere when it is denied, nor when its key's
//!   owner leaves while the check waits on the other (its retry is allowed,
//!   not refused as a replay of itself);
//! - a node killed with -9: nothing it accepted (even signed seconds ahead,
//!   under a larger future skew than theirs) is accepted again by the
//!   survivors, and its keys are served again within the lease TTL plus the
//!   takeover fence;
//! - a node paused (SIGSTOP) past its lease never answers for a key it no
//!   longer owns when it wakes up;
//! - a rolling restart of all three under load (each node hands its state
//!   over on SIGTERM and takes it back on joining) admits nothing extra,
//!   refuses no fresh request and lets no replay through;
//! - only the `peer` role reaches the peer service: a gateway's certificate
//!   is refused on every call, and changes nothing;
//! - clocks: an owner's, a dead owner's and the database's, ahead or back,
//!   let no request through twice, and the database's decides no lease.
//!
//! Needs `WARDEN_TEST_POSTGRES_URL` (`bash tests/run` sets it).

use crate::support;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;

use support::{ConfigDir, SECRET, Server, fresh_database, metric};
use warden_client::proto::{CheckRequest, CheckResponse, LimitRequest, Reason};
use warden_client::signing::{Signer, new_nonce, unix_now};
use warden_client::{Client, signing::check_request_from};

const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

const POLICIES: &str = r#"
[[policies]]
name = "hundred"
limit = 100
period = "1h"

[[policies]]
name = "five"
limit = 5
period = "1h"

[[policies]]
name = "per-ip"
algorithm = "sliding_window"
limit = 3
period = "1h"

[[policies]]
name = "plenty"
limit = 100000
period = "1h"

[[keys]]
id = "wk_hundred"
policies = ["hundred"]
secrets = [{ value = "test-secret-0123456789abcdefghijklmnopqrstuvwxyz" }]

[[keys]]
id = "wk_five"
policies = ["five"]
secrets = [{ value = "test-secret-0123456789abcdefghijklmnopqrstuvwxyz" }]
"#;

/// Three nodes (or fewer) of one cluster, with the keys they share.
struct Cluster {
    dir: ConfigDir,
    configs: Vec<PathBuf>,
    nodes: Vec<Option<Server>>,
    /// The logs of nodes restarted since, for a failure's message.
    past_logs: Vec<String>,
    /// libfaketime, when each node has a wall clock of its own
    /// ([`Self::set_clock`]).
    faketime: Option<PathBuf>,
}

impl Cluster {
    /// Writes the configs (2 s leases; `extra` keys and policies) and
    /// starts every node side by side, then waits until all are ready and
    /// see all three.
    fn start(url: &str, extra: &str) -> Self {
        let dir = ConfigDir::new();
        let configs =
            support::cluster_configs(&dir, url, &NODES, "2s", &format!("{POLICIES}\n{extra}"));
        Self::start_from(dir, configs)
    }

    /// Starts a node per config in `configs`, as [`Self::start`] does.
    fn start_from(dir: ConfigDir, configs: Vec<PathBuf>) -> Self {
        Self::start_nodes(dir, configs, None)
    }

    /// As [`Self::start`] on a fresh database, each node with a wall clock
    /// of its own, the real time until [`Self::set_clock`] moves it;
    /// `None` (the test is skipped) without PostgreSQL or libfaketime.
    async fn start_with_clocks(extra: &str) -> Option<Self> {
        let url = fresh_database().await?;
        let faketime = support::libfaketime()?;
        let dir = ConfigDir::new();
        let configs =
            support::cluster_configs(&dir, &url, &NODES, "2s", &format!("{POLICIES}\n{extra}"));
        for node in NODES {
            std::fs::write(dir.path().join(format!("clock-{node}")), "+0\n").unwrap();
        }
        Some(Self::start_nodes(dir, configs, Some(faketime)))
    }

    fn start_nodes(dir: ConfigDir, configs: Vec<PathBuf>, faketime: Option<PathBuf>) -> Self {
        let mut cluster = Self {
            dir,
            configs,
            nodes: Vec::new(),
            past_logs: Vec::new(),
            faketime,
        };
        cluster.nodes = (0..cluster.configs.len())
            .map(|i| Some(cluster.spawn(i)))
            .collect();
        for node in cluster.nodes.iter().flatten() {
            node.wait_past_fence();
        }
        for i in 0..NODES.len() {
            cluster.wait_members(i, &NODES);
        }
        // Every node ready again after the last join (its takeover fences).
        for node in cluster.nodes.iter().flatten() {
            node.wait_past_fence();
        }
        cluster
    }

    /// SIGTERM node `i`, wait for it to exit, start it again with the same
    /// config, and wait until it is ready and every node sees all three.
    fn restart(&mut self, i: usize) {
        self.stop(i);
        self.rejoin(i);
    }

    /// SIGTERM node `i`, wait for it to exit and for the others to see it
    /// gone.
    fn stop(&mut self, i: usize) {
        let mut old = self.nodes[i].take().expect("running");
        assert!(old.terminate().success(), "{}", old.logs());
        self.past_logs.push(old.logs());
        // As an orchestrator replacing a member does, the new process
        // starts once the others have seen the old one go. A member that
        // misses the departure (it sees the node leave and come back in
        // one refresh) cannot know who owned its slots meanwhile and
        // fences them: safe, but it refuses fresh requests for a few
        // seconds (README, Operating a cluster).
        let others: Vec<&str> = (0..NODES.len())
            .filter(|&j| j != i)
            .map(|j| NODES[j])
            .collect();
        for j in (0..NODES.len()).filter(|&j| j != i) {
            self.wait_members(j, &others);
        }
    }

    /// Starts node `i` (not running) again with its config, and waits until
    /// it is ready and every node sees all three.
    fn rejoin(&mut self, i: usize) {
        let node = self.spawn(i);
        node.wait_past_fence();
        self.nodes[i] = Some(node);
        for j in 0..NODES.len() {
            self.wait_members(j, &NODES);
        }
    }

    /// Kills node `i` with -9: gone from the cluster, as a crash leaves it.
    fn kill(&mut self, i: usize) {
        self.nodes[i].as_mut().expect("running").kill();
        self.nodes[i] = None;
    }

    /// The key `signer` names is accepted by its owner, forwarded through
    /// the first survivor and sent to it directly, once for each of
    /// `aheads` (seconds ahead of now); then the owner is killed (-9).
    async fn kill_owner_after_accepting(&mut self, signer: &Signer, aheads: &[i64]) -> DeadOwner {
        let victim = index_of(&self.locate(0, &["--key-id", signer.key_id()]));
        let survivors: Vec<usize> = (0..NODES.len()).filter(|&i| i != victim).collect();
        let mut through = self.client(survivors[0]).await;
        let mut direct = self.client(victim).await;
        let accepted = accept_through(&mut [&mut through, &mut direct], signer, aheads).await;
        let killed_at = Instant::now();
        self.kill(victim);
        DeadOwner {
            victim,
            survivors,
            through,
            accepted,
            killed_at,
        }
    }

    /// Node `i`'s process, returning once it listens.
    fn spawn(&self, i: usize) -> Server {
        match &self.faketime {
            None => Server::with_config_unready(&self.configs[i], "info"),
            Some(faketime) => {
                Server::with_config_and_clock_unready(&self.configs[i], &self.clock(i), faketime)
            }
        }
    }

    fn clock(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("clock-{}", NODES[i]))
    }

    /// Sets node `i`'s wall clock `ahead_secs` ahead of the real time, and
    /// waits (10 s) until every other node reports it, measured against the
    /// database's clock: libfaketime reads the offset again every second,
    /// and the node reports it at its next renewal after that.
    fn set_clock(&self, i: usize, ahead_secs: i64) {
        assert!(self.faketime.is_some(), "started with clocks of their own");
        support::write_clock(&self.clock(i), ahead_secs);
        let deadline = Instant::now() + Duration::from_secs(10);
        for j in (0..NODES.len()).filter(|&j| j != i && self.nodes[j].is_some()) {
            loop {
                let s = self.status(j);
                let reported = s["members"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|m| m["node"] == NODES[i])
                    .and_then(|m| m["clock_ahead_ms"].as_i64());
                if reported.is_some_and(|ms| (ms - ahead_secs * 1000).abs() < 1_000) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {j} never saw {}'s clock {ahead_secs} s ahead: {s}",
                    NODES[i]
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Every node's cluster events (joins, hand-offs, fences), restarted
    /// ones' included: what a failed test needs to say why.
    fn cluster_events(&self) -> String {
        let current = self.nodes.iter().flatten().map(Server::logs);
        self.past_logs
            .iter()
            .cloned()
            .chain(current)
            .flat_map(|log| {
                log.lines()
                    .filter(|l| l.contains("\"event\":\"cluster_"))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn node(&self, i: usize) -> &Server {
        self.nodes[i].as_ref().expect("node is running")
    }

    /// Node `i`'s config for a second process under the same node name:
    /// another port and store directory (`NODE-tag`), changed further by
    /// `edit`, and written beside the others.
    fn same_name_config(
        &self,
        i: usize,
        tag: &str,
        edit: impl FnOnce(String) -> String,
    ) -> PathBuf {
        let node = NODES[i];
        let original = std::fs::read_to_string(&self.configs[i]).unwrap();
        let port = self.node(i).addr.rsplit_once(':').unwrap().1.to_owned();
        let copy = original
            .replace(
                &format!("127.0.0.1:{port}"),
                &format!("127.0.0.1:{}", support::free_port()),
            )
            .replace(
                &format!("dir = \"{node}\""),
                &format!("dir = \"{node}-{tag}\""),
            );
        assert_ne!(copy, original);
        let path = self.dir.path().join(format!("{node}-{tag}.toml"));
        std::fs::write(&path, edit(copy)).unwrap();
        path
    }

    fn status(&self, i: usize) -> serde_json::Value {
        let out = self.dir.cli(self.node(i), &["cluster", "status", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Waits (10 s) until node `i` sees exactly `members`.
    fn wait_members(&self, i: usize, members: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.status(i);
            let seen: Vec<&str> = s["members"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["node"].as_str().unwrap())
                .collect();
            if seen == members {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} never saw {members:?}: {s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The node owning a key's state (`--key-id`) or a limit's (`--limit`).
    fn locate(&self, through: usize, what: &[&str]) -> String {
        self.located(through, what)["node"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// `warden cluster locate --json` through node `through`: the owner of
    /// `what`, its slot, and the members the answering node still waits
    /// for to hand that slot over.
    fn located(&self, through: usize, what: &[&str]) -> serde_json::Value {
        let mut args = vec!["cluster", "locate", "--json"];
        args.extend_from_slice(what);
        let out = self.dir.cli(self.node(through), &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    async fn client(&self, i: usize) -> Client {
        self.dir.client(self.node(i)).await
    }

    async fn clients(&self) -> Vec<Client> {
        let mut clients = Vec::new();
        for i in 0..self.nodes.len() {
            if self.nodes[i].is_some() {
                clients.push(self.client(i).await);
            }
        }
        clients
    }
}

fn index_of(node: &str) -> usize {
    NODES.iter().position(|n| *n == node).unwrap()
}

fn reason(r: &CheckResponse) -> Reason {
    Reason::try_from(r.reason).unwrap()
}

fn signed(signer: &Signer, timestamp: i64) -> CheckRequest {
    let headers = signer.sign_at(timestamp, &new_nonce(), "GET", "/a", "", b"");
    check_request_from(&headers, "warden-v1", "GET", "/a", "", b"")
}

fn with_limit(mut req: CheckRequest, policy: &str, descriptor: &str) -> CheckRequest {
    req.limits.push(LimitRequest {
        policy: policy.into(),
        descriptor: descriptor.into(),
    });
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_is_shared_by_all_nodes_and_admits_exactly_its_limit() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let cluster = Cluster::start(&url, "");
    let mut clients = cluster.clients().await;
    let signer = Signer::new("wk_hundred", SECRET);
    let mut allowed = 0;
    let mut limited = 0;
    // Round robin over the three nodes: 150 requests, a 100 per hour limit.
    for i in 0..150 {
        let client = &mut clients[i % 3];
        let r = client.check(signed(&signer, unix_now())).await.unwrap();
        match reason(&r) {
            Reason::Ok => allowed += 1,
            Reason::RateLimited => limited += 1,
            other => panic!("unexpected {other:?}: {r:?}"),
        }
    }
    assert_eq!((allowed, limited), (100, 50));

    // A request limit too: one descriptor, spread over the nodes.
    let mut per_ip = 0;
    for i in 0..12 {
        let req = with_limit(signed(&signer, unix_now()), "per-ip", "ip:198.51.100.1");
        let r = clients[i % 3].check(req).await.unwrap();
        // The key's own limit is spent: every request is limited, and none
        // took from the per-ip limit.
        assert_eq!(reason(&r), Reason::RateLimited, "{r:?}");
        per_ip = r.limits[1].remaining;
    }
    assert_eq!(per_ip, 3, "denied requests took from the per-ip limit");

    // The owner of the key answered for all: the others forwarded.
    let owner = cluster.locate(0, &["--key-id", "wk_hundred"]);
    let forwarded: u64 = (0..3)
        .filter(|&i| NODES[i] != owner)
        .map(|i| {
            metric(
                cluster.node(i),
                "warden_cluster_state_steps_total{route=\"forwarded\"}",
            )
        })
        .sum();
    assert!(forwarded >= 100, "forwarded {forwarded}");

    // Every cluster series the alert rules read is exported by a node.
    let rules = include_str!("../server/deploy/prometheus/warden-rules.yml");
    let (_, exported) = cluster.node(0).http_get("/metrics");
    let mut read: Vec<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("warden_cluster_"))
        .collect();
    read.sort();
    read.dedup();
    assert!(!read.is_empty());
    for metric in read {
        assert!(
            exported.lines().any(|l| l.starts_with(metric)),
            "the alert rules read {metric}, which a cluster node does not export"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_identical_requests_sent_to_every_node_at_once_exactly_one_is_allowed() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let cluster = Cluster::start(&url, "");
    let clients = cluster.clients().await;
    let signer = Signer::new("wk_hundred", SECRET);
    // One owner for the whole step, then a step spread over two owners
    // (the key on one node, the request limit on another).
    let key_owner = cluster.locate(0, &["--key-id", "wk_hundred"]);
    let elsewhere = (0..)
        .map(|i| format!("ip:192.0.2.{i}"))
        .find(|d| cluster.locate(0, &["--limit", &format!("plenty:{d}")]) != key_owner)
        .unwrap();
    for (what, req) in [
        ("one owner", signed(&signer, unix_now())),
        (
            "two owners",
            with_limit(signed(&signer, unix_now()), "plenty", &elsewhere),
        ),
    ] {
        let mut tasks = Vec::new();
        for i in 0..200 {
            let mut client = clients[i % 3].clone();
            let req = req.clone();
            tasks.push(tokio::spawn(async move { client.check(req).await }));
        }
        let mut reasons = Vec::new();
        for t in tasks {
            reasons.push(reason(&t.await.unwrap().unwrap()));
        }
        let ok = reasons.iter().filter(|r| **r == Reason::Ok).count();
        let replays = reasons.iter().filter(|r| **r == Reason::Replay).count();
        assert_eq!((ok, replays), (1, 199), "{what}: {reasons:?}");
    }

    // CheckStream through a node that does not own the key: its steps are
    // forwarded too, and what it accepted is a replay at the owner.
    let through = (0..3).find(|&i| NODES[i] != key_owner).unwrap();
    let (first, second) = (signed(&signer, unix_now()), signed(&signer, unix_now()));
    let answers: Vec<Reason> = cluster
        .client(through)
        .await
        .stub()
        .check_stream(tokio_stream::iter(vec![
            first.clone(),
            second.clone(),
            first,
        ]))
        .await
        .unwrap()
        .into_inner()
        .map(|r| reason(&r.unwrap()))
        .collect()
        .await;
    assert_eq!(answers, [Reason::Ok, Reason::Ok, Reason::Replay]);
    let at_owner = cluster
        .client(index_of(&key_owner))
        .await
        .check(second)
        .await
        .unwrap();
    assert_eq!(reason(&at_owner), Reason::Replay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_check_spanning_two_owners_takes_nothing_anywhere() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let cluster = Cluster::start(&url, "");
    let mut client = cluster.client(0).await;
    let signer = Signer::new("wk_five", SECRET);
    let key_owner = cluster.locate(0, &["--key-id", "wk_five"]);
    let elsewhere: Vec<String> = (0..)
        .map(|i| format!("ip:203.0.113.{i}"))
        .filter(|d| cluster.locate(0, &["--limit", &format!("per-ip:{d}")]) != key_owner)
        .take(3)
        .collect();
    let (d1, d2, d3) = (&elsewhere[0], &elsewhere[1], &elsewhere[2]);
    let check = |d: &str| with_limit(signed(&signer, unix_now()), "per-ip", d);

    // d1: three allowed (its per-ip limit), taking three of the key's five.
    for _ in 0..3 {
        let r = client.check(check(d1)).await.unwrap();
        assert_eq!(reason(&r), Reason::Ok, "{r:?}");
    }
    // Refused by the per-ip limit on its node: the key's node keeps its two.
    for _ in 0..10 {
        let r = client.check(check(d1)).await.unwrap();
        assert_eq!(reason(&r), Reason::RateLimited, "{r:?}");
        assert_eq!(
            r.limits[0].remaining, 2,
            "a denial took from the key: {r:?}"
        );
    }
    // d2: the key's last two go; then the key refuses and d2 keeps its one.
    for _ in 0..2 {
        let r = client.check(check(d2)).await.unwrap();
        assert_eq!(reason(&r), Reason::Ok, "{r:?}");
    }
    for _ in 0..5 {
        let r = client.check(check(d2)).await.unwrap();
        assert_eq!(reason(&r), Reason::RateLimited, "{r:?}");
        assert_eq!(r.limits[1].remaining, 1, "a denial took from d2: {r:?}");
    }
    let r = client.check(check(d3)).await.unwrap();
    assert_eq!(reason(&r), Reason::RateLimited);
    assert_eq!(r.limits[1].remaining, 3, "a denial took from d3: {r:?}");
    // A denied request stored no nonce anywhere: sent again, it is judged
    // on its limits again, not refused as a replay.
    let req = check(d3);
    for _ in 0..2 {
        let r = client.check(req.clone()).await.unwrap();
        assert_eq!(reason(&r), Reason::RateLimited, "{r:?}");
    }
}

/// A check whose key and request limit have two owners holds the key's
/// part (its nonce, its token) at the key's owner under a reservation until
/// the other owner answers. If the key's owner leaves (SIGTERM, a rolling
/// restart) meanwhile, nothing can settle that reservation any more: what
/// it holds must be given back before the state is handed over. Otherwise
/// the next owner keeps the nonce, and the client's retry of a request that
/// was never allowed (UNAVAILABLE says "send it again") is refused as a
/// replay of itself.
///
/// The limit's owner is paused (SIGSTOP), so that every check waits on it
/// for its peer deadline, holding its reservation at the key's owner, while
/// the key's owner leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_held_while_its_keys_owner_leaves_is_allowed_when_sent_again() {
    let Some(url) = fresh_database().await else {
        return;
    };
    // Long leases: the paused node stays a member throughout, so every
    // check spans two owners until it wakes.
    let dir = ConfigDir::new();
    let configs = support::cluster_configs(&dir, &url, &NODES, "30s", POLICIES);
    let mut cluster = Cluster::start_from(dir, configs);
    let signer = Signer::new("wk_hundred", SECRET);
    let key = ["--key-id", "wk_hundred"];

    let owner = index_of(&cluster.locate(0, &key));
    let descriptors: Vec<(String, String)> = (0..24)
        .map(|i| {
            let d = format!("ip:198.51.100.{i}");
            let at = cluster.locate(0, &["--limit", &format!("plenty:{d}")]);
            (d, at)
        })
        .collect();
    // Where the key goes when its owner leaves: seen by its leaving once.
    cluster.stop(owner);
    let heir = index_of(&cluster.locate((owner + 1) % 3, &key));
    cluster.rejoin(owner);
    assert_eq!(cluster.locate(heir, &key), NODES[owner]);
    let sleeper = (0..NODES.len()).find(|&i| i != owner && i != heir).unwrap();
    let descriptor = descriptors
        .iter()
        .find(|(_, at)| at == NODES[sleeper])
        .map(|(d, _)| d.clone())
        .expect("a descriptor owned by the node to pause");
    let check = || with_limit(signed(&signer, unix_now()), "plenty", &descriptor);

    // Through the heir, which stays: allowed while both owners answer.
    let mut client = cluster
        .client(heir)
        .await
        .with_timeout(Duration::from_secs(60));
    let r = client.check(check()).await.unwrap();
    assert_eq!(reason(&r), Reason::Ok, "{r:?}");

    cluster.node(sleeper).signal("STOP");
    let mut in_flight = Vec::new();
    for _ in 0..10 {
        let req = check();
        let mut c = client.clone();
        let sent = req.clone();
        in_flight.push((req, tokio::spawn(async move { c.check(sent).await })));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // The key's owner leaves with reservations held; once it has closed
    // its listener nothing can settle them, so the paused node may wake.
    let mut leaving = cluster.nodes[owner].take().expect("running");
    leaving.signal("TERM");
    leaving.wait_for_log("\"event\":\"draining\"");
    std::thread::sleep(Duration::from_secs(1));
    cluster.node(sleeper).signal("CONT");
    assert!(leaving.wait_exit().success(), "{}", leaving.logs());
    let owner_log = leaving.logs();
    cluster.past_logs.push(owner_log.clone());

    // Every request, sent again while it is not decided (as a client does
    // on UNAVAILABLE), is allowed: none was allowed before, so none is a
    // replay.
    for (req, answer) in in_flight {
        let mut answer = answer.await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(status) = &answer {
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
            assert!(
                Instant::now() < deadline,
                "never decided: {status}; events:\n{}",
                cluster.cluster_events()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            answer = client.check(req.clone()).await;
        }
        let r = answer.unwrap();
        assert_eq!(
            reason(&r),
            Reason::Ok,
            "a request never allowed was refused: {r:?}; events:\n{}",
            cluster.cluster_events()
        );
    }
    // The case this test is for happened: the owner left holding
    // reservations nobody could settle.
    assert!(
        owner_log.contains("\"event\":\"cluster_reservations_given_back\""),
        "the owner held no reservation when it left; its log:\n{owner_log}"
    );
}

/// The peer service carries the state steps nodes send each other: a
/// caller that could reach it could store or forget nonces, take or give
/// back rate limits, hand state over in another node's name or keep a node
/// serving on a membership it should have left. A gateway's certificate,
/// from the cluster's own CA and allowed to check, forward identities and
/// administer, is refused on every call, and nothing changes: what it
/// accepted stays a replay, and fresh requests pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_peers_may_call_the_peer_service_and_a_gateway_that_tries_changes_nothing() {
    use warden_client::proto::peer_client::PeerClient;
    use warden_client::proto::{
        HandOffBatch, Settlement, StateNonce, StateStep, TaggedStep, VouchRequest,
    };
    let Some(url) = fresh_database().await else {
        return;
    };
    let cluster = Cluster::start(&url, "");
    let signer = Signer::new("wk_hundred", SECRET);
    let owner = index_of(&cluster.locate(0, &["--key-id", "wk_hundred"]));
    let mut client = cluster.client(owner).await;
    let accepted = signed(&signer, unix_now());
    let r = client.check(accepted.clone()).await.unwrap();
    assert_eq!(reason(&r), Reason::Ok, "{r:?}");

    let node = cluster.node(owner);
    let version = cluster.status(owner)["version"].as_u64().unwrap();
    let dir = cluster.dir.path();
    let peer_as = |cert: &str| {
        warden_client::Tls::from_files(
            dir.join("ca.pem"),
            dir.join(format!("{cert}.pem")),
            dir.join(format!("{cert}-key.pem")),
        )
        .unwrap()
    };
    let step = StateStep {
        version,
        nonce: Some(StateNonce {
            id: 1,
            forget_at_ns: u64::MAX,
            extra: 1,
        }),
        limits: Vec::new(),
        cost: 1,
        commit: true,
        timestamp: unix_now(),
        forget: false,
    };
    let vouch = VouchRequest {
        node: NODES[owner].into(),
        version,
    };

    // The node's own certificate may (PostgreSQL is reachable, so the
    // answer is no): the calls below reach the service, and only the
    // role stops them.
    let channel = warden_client::channel(&node.addr, peer_as("node"))
        .await
        .unwrap();
    let granted = PeerClient::new(channel)
        .vouch(vouch.clone())
        .await
        .expect("a peer may call")
        .into_inner()
        .granted;
    assert!(!granted);

    let denied_before = metric(node, "warden_caller_denied_total");
    let channel = warden_client::channel(&node.addr, peer_as("client"))
        .await
        .unwrap();
    let mut gateway = PeerClient::new(channel);
    let mut answers = vec![
        ("Reserve", gateway.reserve(step.clone()).await.map(drop)),
        ("Vouch", gateway.vouch(vouch).await.map(drop)),
        (
            "Settle",
            gateway
                .settle(Settlement {
                    reservation: 1,
                    commit: true,
                })
                .await
                .map(drop),
        ),
        (
            "HandOff",
            gateway
                .hand_off(HandOffBatch {
                    from: NODES[(owner + 1) % 3].into(),
                    version,
                    last: true,
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
    ];
    let stream = tokio_stream::iter([TaggedStep {
        tag: 1,
        step: Some(step),
    }]);
    let decided = match gateway.decide_stream(stream).await {
        Ok(answers) => answers.into_inner().message().await.map(drop),
        Err(status) => Err(status),
    };
    answers.push(("DecideStream", decided));
    for (call, answer) in answers {
        let status = answer.expect_err(call);
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "{call}: {status}"
        );
    }
    assert_eq!(
        metric(node, "warden_caller_denied_total") - denied_before,
        5,
        "every refusal is counted"
    );

    // Nothing changed: the accepted request is still a replay everywhere,
    // and fresh ones pass.
    let mut clients = cluster.clients().await;
    assert_eq!(
        replay_all(&mut clients, std::slice::from_ref(&accepted)).await,
        3
    );
    let r = client.check(signed(&signer, unix_now())).await.unwrap();
    assert_eq!(reason(&r), Reason::Ok, "{r:?}");
}

/// Replays every request in `accepted` to every live node; each must be
/// refused (REPLAY or STALE) or fail (UNAVAILABLE while the key moves),
/// never allowed.
async fn replay_all(clients: &mut [Client], accepted: &[CheckRequest]) -> usize {
    let mut refused = 0;
    for req in accepted {
        for client in clients.iter_mut() {
            match client.check(req.clone()).await {
                Ok(r) => {
                    assert_ne!(reason(&r), Reason::Ok, "a replay was accepted: {r:?}");
                    assert!(
                        matches!(reason(&r), Reason::Replay | Reason::Stale),
                        "{r:?}"
                    );
                    refused += 1;
                }
                Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status}"),
            }
        }
    }
    refused
}

/// A key's owner killed after accepting requests
/// ([`Cluster::kill_owner_after_accepting`]).
struct DeadOwner {
    victim: usize,
    survivors: Vec<usize>,
    /// A client of the first survivor.
    through: Client,
    /// Requests the owner accepted before it died.
    accepted: Vec<CheckRequest>,
    killed_at: Instant,
}

/// For each of `aheads` (seconds ahead of now), a request accepted through
/// each of `clients` in turn: to be replayed.
async fn accept_through(
    clients: &mut [&mut Client],
    signer: &Signer,
    aheads: &[i64],
) -> Vec<CheckRequest> {
    let mut accepted = Vec::new();
    for &ahead in aheads {
        for client in clients.iter_mut() {
            let req = signed(signer, unix_now() + ahead);
            let r = client.check(req.clone()).await.unwrap();
            assert_eq!(reason(&r), Reason::Ok, "{r:?}");
            accepted.push(req);
        }
    }
    accepted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_load_lets_nothing_it_accepted_through_again() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let mut cluster = Cluster::start(&url, "");
    let signer = Signer::new("wk_hundred", SECRET);
    // Accepted by the victim (forwarded to it, and sent to it directly),
    // some signed a few seconds ahead of the clocks (future_skew is 5 s).
    let DeadOwner {
        survivors,
        accepted,
        killed_at,
        ..
    } = cluster
        .kill_owner_after_accepting(&signer, &[0, 0, 1, 3, 5])
        .await;

    // While its lease runs out, and after the survivors took its slots:
    // every accepted request is refused everywhere.
    let mut survivors_clients = cluster.clients().await;
    replay_all(&mut survivors_clients, &accepted).await;

    // The key is served again within the lease TTL plus the takeover
    // fence (2 s + 5 s future skew + 1 s renewal + 1 s), with margin; and
    // while the fence holds, a fresh request is told when it opens.
    let served_again =
        served_when_told(&cluster, &mut survivors_clients[0], &signer, killed_at).await;
    assert!(served_again < Duration::from_secs(15), "{served_again:?}");
    // Still refused after the takeover: the fence covers them all.
    let refused = replay_all(&mut survivors_clients, &accepted).await;
    assert_eq!(refused, accepted.len() * survivors.len());
    // Once moved, checks succeed without errors.
    for i in 0..20 {
        let r = survivors_clients[i % 2]
            .check(signed(&signer, unix_now()))
            .await
            .unwrap();
        assert_eq!(reason(&r), Reason::Ok, "{r:?}");
    }
}

/// A node killed (-9) and started again only after the others took its
/// slots and removed its lease joins as a new member, and the survivors
/// hand its slots back. The requests it accepted before it died are in
/// nobody's nonces (the survivors refused them under their takeover
/// fence): each must still be refused, wherever it is sent. Until session
/// 17 the fence stayed behind, and one was accepted again through another
/// node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_after_its_lease_was_removed_accepts_nothing_it_accepted_before() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let mut cluster = Cluster::start(&url, "");
    let signer = Signer::new("wk_hundred", SECRET);
    let DeadOwner {
        victim,
        survivors,
        mut through,
        accepted,
        killed_at,
    } = cluster
        .kill_owner_after_accepting(&signer, &[0, 1, 3, 5])
        .await;
    // The survivors take its slots, behind their fence, and remove its
    // lease: there is no row left for the new process to follow.
    taken_over(&cluster, &mut through, &signer, killed_at).await;
    let names: Vec<&str> = survivors.iter().map(|&i| NODES[i]).collect();
    for &i in &survivors {
        cluster.wait_members(i, &names);
    }
    cluster.rejoin(victim);
    assert_eq!(
        cluster.locate(survivors[0], &["--key-id", "wk_hundred"]),
        NODES[victim]
    );
    let mut clients = cluster.clients().await;
    let refused = replay_all(&mut clients, &accepted).await;
    assert_eq!(refused, accepted.len() * NODES.len());
    // And it serves the key.
    taken_over(&cluster, &mut clients[victim], &signer, Instant::now()).await;
}

/// A node dies, a survivor takes its key behind a takeover fence, and then
/// that survivor is restarted (SIGTERM: a rolling deploy after the crash,
/// within the past skew). It hands the key to the last node, and the fence
/// must go with it: what the dead node accepted is in nobody's nonces, and
/// the last node's own restart fence is long past. Until session 17 the
/// fence stayed behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_fence_goes_with_the_key_when_its_new_owner_leaves() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let mut cluster = Cluster::start(&url, "");
    let signer = Signer::new("wk_hundred", SECRET);
    let DeadOwner {
        survivors,
        mut through,
        accepted,
        killed_at,
        ..
    } = cluster
        .kill_owner_after_accepting(&signer, &[0, 1, 3, 5])
        .await;
    taken_over(&cluster, &mut through, &signer, killed_at).await;
    let heir = index_of(&cluster.locate(survivors[0], &["--key-id", "wk_hundred"]));
    let last = survivors.iter().copied().find(|&i| i != heir).unwrap();

    let mut leaving = cluster.nodes[heir].take().expect("running");
    assert!(leaving.terminate().success(), "{}", leaving.logs());
    cluster.wait_members(last, &[NODES[last]]);
    let mut to_last = cluster.client(last).await;
    taken_over(&cluster, &mut to_last, &signer, Instant::now()).await;
    let refused = replay_all(&mut [to_last], &accepted).await;
    assert_eq!(refused, accepted.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_paused_past_its_lease_never_answers_for_a_key_it_lost() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let cluster = Cluster::start(&url, "");
    let signer = Signer::new("wk_hundred", SECRET);
    let sleeper = index_of(&cluster.locate(0, &["--key-id", "wk_hundred"]));
    let other = (sleeper + 1) % 3;
    let mut awake = cluster.client(other).await;
    let mut to_sleeper = cluster.client(sleeper).await;

    // A loaded machine throughout: the woken node's tasks are preempted
    // at any point, which once let a check in between its renewed lease
    // and its new (fenced) table.
    let busy = Arc::new(AtomicBool::new(true));
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let busy = busy.clone();
            std::thread::spawn(move || {
                while busy.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let paused_at = cluster.status(other)["version"].as_i64().unwrap();
    cluster.node(sleeper).signal("STOP");
    // Its lease (2 s) runs out; the others take its slots and, after the
    // fence, serve the key.
    let (taken, _) = taken_over(&cluster, &mut awake, &signer, Instant::now()).await;
    let new_owner = cluster.locate(other, &["--key-id", "wk_hundred"]);
    // Failed once in a full suite on a loaded machine (session 14), never
    // alone: say what the nodes saw, should it fail again.
    assert_ne!(
        new_owner,
        NODES[sleeper],
        "node {other} allowed the key's check, yet names the paused node its owner; its status: {}\nevents:\n{}",
        cluster.status(other),
        cluster.cluster_events()
    );

    // Sent to the paused node, queued in its socket, answered on waking:
    // it must not accept a request the new owner accepted.
    let replay = {
        let req = taken.clone();
        tokio::spawn(async move { to_sleeper.check(req).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.node(sleeper).signal("CONT");
    let answered = replay.await.unwrap();
    busy.store(false, Ordering::Relaxed);
    for hog in hogs {
        hog.join().unwrap();
    }
    match answered {
        Ok(r) => assert!(
            matches!(reason(&r), Reason::Replay | Reason::Stale),
            "the woken node answered {r:?}"
        ),
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status}"),
    }
    // Nor afterwards, directly or through the others.
    let mut clients = cluster.clients().await;
    replay_all(&mut clients, std::slice::from_ref(&taken)).await;
    // On waking, its first renewal judged the others' leases by what it had
    // seen of them before the pause: unrenewed for longer than a lease, by
    // its clock. They had renewed all along, and stayed members: a lease is
    // removed only if it still shows the renewal that was judged.
    cluster.wait_members(other, &NODES);
    let since_the_pause = support::membership_log(&url)
        .await
        .into_iter()
        .filter(|(version, _)| *version >= paused_at);
    for (version, members) in since_the_pause {
        for (i, node) in NODES.iter().enumerate() {
            assert!(
                i == sleeper || members.iter().any(|m| m == node),
                "{node}, awake throughout, is not in version {version}: {members:?}; events:\n{}",
                cluster.cluster_events()
            );
        }
    }
}

/// The first fresh request `signer`'s key allows through `client`, and how
/// long after `since` it came, sending one every 200 ms: once the key's
/// owner is gone, the others take it over and serve it after the takeover
/// fence. Fails 30 s after `since`, with what the nodes did.
async fn taken_over(
    cluster: &Cluster,
    client: &mut Client,
    signer: &Signer,
    since: Instant,
) -> (CheckRequest, Duration) {
    taken_over_within(cluster, client, signer, since, Duration::from_secs(30)).await
}

/// As [`taken_over`], taking the answers at their word: a fresh request
/// refused under the takeover fence is told when the fence opens
/// (`retry_after_ms` and `Retry-After`), and signed again then, it is
/// allowed. How long after `since` that came. Fails if no answer was
/// refused so (the fence was never seen: nothing tested).
async fn served_when_told(
    cluster: &Cluster,
    client: &mut Client,
    signer: &Signer,
    since: Instant,
) -> Duration {
    loop {
        let answer = client.check(signed(signer, unix_now())).await;
        if let Ok(r) = &answer {
            assert_ne!(reason(r), Reason::Ok, "served before its fence was seen");
        }
        if let Ok(told) = &answer
            && reason(told) == Reason::Stale
        {
            assert!(
                told.retry_after_ms > 0 && told.headers.contains_key("Retry-After"),
                "refused under the takeover fence, not told when it opens: {told:?}"
            );
            tokio::time::sleep(Duration::from_millis(told.retry_after_ms)).await;
            let again = client.check(signed(signer, unix_now())).await.unwrap();
            assert_eq!(
                reason(&again),
                Reason::Ok,
                "signed again when told ({told:?}): {again:?}"
            );
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "the key was never served again (last answer: {answer:?}); events:\n{}",
            cluster.cluster_events()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How long the takeover after a database clock step back may take (see
/// its test).
const STEP_BACK_TAKEOVER: Duration = Duration::from_secs(50);

/// [`taken_over`], failing only once `limit` has passed since `since`.
async fn taken_over_within(
    cluster: &Cluster,
    client: &mut Client,
    signer: &Signer,
    since: Instant,
    limit: Duration,
) -> (CheckRequest, Duration) {
    loop {
        let req = signed(signer, unix_now());
        let answer = client.check(req.clone()).await;
        if let Ok(r) = &answer
            && reason(r) == Reason::Ok
        {
            return (req, since.elapsed());
        }
        assert!(
            since.elapsed() < limit,
            "the key was never served again (last answer: {answer:?}); events:\n{}",
            cluster.cluster_events()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A node paused between two statements of its lease renewal (a
/// transaction it drives one statement at a time) leaves PostgreSQL a
/// session idle in a transaction, holding its lease row's lock. Without a
/// bound on that, the others' sweep of run-out leases waited behind it:
/// nobody renewed, and the paused node stayed a member for as long as it
/// was paused.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_paused_inside_its_renewal_holds_no_other_node_up() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let cluster = Cluster::start(&url, "");
    let (pg, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let sleeper = index_of(&cluster.locate(0, &["--key-id", "wk_hundred"]));
    let session = format!("warden membership {}", NODES[sleeper]);
    // Pause it, and look: inside its renewal, or resume and try again.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut attempt = 0u64;
    loop {
        cluster.node(sleeper).signal("STOP");
        let inside = pg
            .query(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = $1 AND state = 'idle in transaction'",
                &[&session],
            )
            .await
            .unwrap();
        if !inside.is_empty() {
            break;
        }
        cluster.node(sleeper).signal("CONT");
        assert!(
            Instant::now() < deadline,
            "never caught {session} inside a transaction"
        );
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(1 + attempt * 7 % 23)).await;
    }
    // The others drop it (its lease is 2 s) and serve its key after the
    // takeover fence.
    let awake: Vec<usize> = (0..3).filter(|&i| i != sleeper).collect();
    let members: Vec<&str> = awake.iter().map(|&i| NODES[i]).collect();
    for &i in &awake {
        cluster.wait_members(i, &members);
    }
    let signer = Signer::new("wk_hundred", SECRET);
    let mut client = cluster.client(awake[0]).await;
    taken_over(&cluster, &mut client, &signer, Instant::now()).await;
    cluster.node(sleeper).signal("CONT");
}

/// Each node judges a timestamp by its own wall clock. A key's owner whose
/// clock runs ahead forgets a nonce (at its timestamp plus the past skew)
/// that long before a node with a correct clock stops taking the request
/// as fresh: sent through that node, a request near the end of its window
/// could then be replayed again and again. The owner judges the timestamp
/// by the clock that keeps the nonce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_whose_clock_runs_ahead_lets_no_request_through_twice() {
    // A past skew of 10 s, so that a request near the end of its window
    // is still above the restart fence of nodes just started.
    let started = unix_now();
    let Some(cluster) = Cluster::start_with_clocks("[check]\npast_skew = \"10s\"\n").await else {
        return;
    };
    let owner = index_of(&cluster.locate(0, &["--key-id", "wk_hundred"]));
    let through = (owner + 1) % 3;
    let signer = Signer::new("wk_hundred", SECRET);
    let mut client = cluster.client(through).await;
    cluster.set_clock(owner, 12);
    // Every node says so, and that the others' clocks agree.
    let seen = cluster.status(through);
    assert!(
        seen["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["node"] != NODES[owner])
            .all(|m| m["clock_ahead_ms"].as_i64().unwrap().abs() < 1_000),
        "{seen}"
    );
    let event = "\"event\":\"cluster_clock_skew\"";
    let logs = cluster.node(through).wait_for_log(event);
    let warning = logs.lines().find(|l| l.contains(event)).unwrap();
    assert!(
        warning.contains(&format!("\"node\":\"{}\"", NODES[owner])),
        "{warning}"
    );

    // Signed 3 s before it leaves the window: fresh by the correct clocks
    // (and above their restart fence: start + future skew + 1); forgotten
    // at once by the owner's.
    while unix_now() - 7 < started + 7 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let late = signed(&signer, unix_now() - 7);
    let first = client.check(late.clone()).await.unwrap();
    let again = client.check(late.clone()).await.unwrap();
    assert!(
        reason(&again) != Reason::Ok,
        "the same request was allowed twice (first: {:?}): {again:?}",
        reason(&first)
    );
    assert_eq!(reason(&first), Reason::Stale, "{first:?}");
    assert_eq!(reason(&again), Reason::Stale, "{again:?}");

    // A request fresh by both clocks (4 s ahead of the correct ones, 8 s
    // behind the owner's) is served once, wherever it is sent.
    let now = signed(&signer, unix_now() + 4);
    let r = client.check(now.clone()).await.unwrap();
    assert_eq!(reason(&r), Reason::Ok, "{r:?}");
    let mut clients = cluster.clients().await;
    replay_all(&mut clients, std::slice::from_ref(&now)).await;
}

/// A GitHub webhook delivery carries no signed time: its id is remembered
/// for `webhook_replay_window` from when it was first seen. Reckoned from
/// the receiving node's clock, an owner whose clock ran ahead by more than
/// the window stored it already forgotten, and the delivery was accepted
/// as often as it was sent. The owner reckons the window by its own clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_delivery_is_accepted_once_whatever_the_owners_clock() {
    let Some(cluster) =
        Cluster::start_with_clocks("[check]\nwebhook_replay_window = \"60s\"\n").await
    else {
        return;
    };
    let owner = index_of(&cluster.locate(0, &["--key-id", "wk_hundred"]));
    let through = (owner + 1) % 3;
    let mut client = cluster.client(through).await;
    cluster.set_clock(owner, 90);

    let body = br#"{"zen":"Design for failure."}"#;
    let headers = crate::webhooks::github(SECRET, body, &new_nonce());
    let delivery = crate::webhooks::delivery("wk_hundred", "github", &headers, body);
    let first = client.check(delivery.clone()).await.unwrap();
    assert_eq!(reason(&first), Reason::Ok, "{first:?}");
    for _ in 0..3 {
        let again = client.check(delivery.clone()).await.unwrap();
        assert_eq!(reason(&again), Reason::Replay, "{again:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_forgotten_through_any_node_is_forgotten_at_its_owner() {
    // The delivery's replay key lives at the key's owner: a Forget that
    // reached only the node it was sent to would forget nothing there.
    let Some(url) = fresh_database().await else {
        return;
    };
    let cluster = Cluster::start(&url, "");
    let owner = index_of(&cluster.locate(0, &["--key-id", "wk_hundred"]));
    let (through, forgetter) = ((owner + 1) % 3, (owner + 2) % 3);
    let mut client = cluster.client(through).await;
    let mut other = cluster.client(forgetter).await;

    let body = br#"{"action":"opened"}"#;
    let headers = crate::webhooks::github(SECRET, body, &new_nonce());
    let delivery = crate::webhooks::delivery("wk_hundred", "github", &headers, body);
    assert_eq!(
        reason(&client.check(delivery.clone()).await.unwrap()),
        Reason::Ok
    );
    assert_eq!(
        reason(&client.check(delivery.clone()).await.unwrap()),
        Reason::Replay
    );
    let r = other.forget(delivery.clone()).await.unwrap();
    assert_eq!(reason(&r), Reason::Ok, "{r:?}");
    // Accepted once more, through any node, and once only.
    assert_eq!(
        reason(&other.check(delivery.clone()).await.unwrap()),
        Reason::Ok
    );
    assert_eq!(
        reason(&client.check(delivery.clone()).await.unwrap()),
        Reason::Replay
    );
    let mut at_owner = cluster.client(owner).await;
    assert_eq!(
        reason(&at_owner.check(delivery).await.unwrap()),
        Reason::Replay
    );
}

/// A key's owner accepts timestamps up to its own clock plus the future
/// skew. If it dies, the next owner fences by its clock what the dead one
/// may have accepted: with the dead node's clock ahead, a request it
/// accepted (from a client whose clock runs ahead as well) lay above that
/// fence, and once fresh at the survivors it was accepted again. The fence
/// covers how far the previous owners' clocks ran ahead of this node's, as
/// each node measures its own against the database's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_owner_whose_clock_ran_ahead_leaves_nothing_it_accepted_to_replay() {
    let Some(mut cluster) = Cluster::start_with_clocks("").await else {
        return;
    };
    let signer = Signer::new("wk_hundred", SECRET);
    let victim = index_of(&cluster.locate(0, &["--key-id", "wk_hundred"]));
    cluster.set_clock(victim, 10);

    // Signed 12 s ahead: within the future skew (5 s) of the victim's
    // clock, which is 10 s ahead.
    accept_ahead_kill_and_replay(&mut cluster, victim, &signer, 12, Duration::from_secs(30)).await;
}

/// The nodes of a cluster need not share one `future_skew`: during a
/// change of config rolled out one node at a time, some run the old and
/// some the new. A key's owner running a larger skew than the node that
/// takes its key over accepted requests signed further ahead than the
/// taker's own skew reaches. The takeover fence reaches as far as the
/// largest skew any member announced, so what the dead owner accepted stays
/// refused, however long it is sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_owner_with_a_larger_future_skew_leaves_nothing_it_accepted_to_replay() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let mut cluster = Cluster::start(&url, "");
    let signer = Signer::new("wk_hundred", SECRET);
    let victim = index_of(&cluster.locate(0, &["--key-id", "wk_hundred"]));
    let survivors: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
    // The owner comes back with a 12 s future skew; the others keep 5 s.
    cluster.stop(victim);
    let config = cluster.configs[victim].clone();
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(!text.contains("[check]"), "{text}");
    std::fs::write(&config, format!("{text}\n[check]\nfuture_skew = \"12s\"\n")).unwrap();
    cluster.rejoin(victim);
    assert_eq!(
        cluster.locate(survivors[0], &["--key-id", "wk_hundred"]),
        NODES[victim]
    );

    // Signed 11 s ahead: within the owner's skew, past the survivors'.
    accept_ahead_kill_and_replay(&mut cluster, victim, &signer, 11, Duration::from_secs(40)).await;
}

/// A request signed `ahead` seconds ahead is accepted by the key's owner
/// `victim`, which is then killed (-9). It is sent again through the
/// survivors until it is fresh by their clocks and they have taken the key
/// over: never accepted. Fails if that has not come within `limit`.
async fn accept_ahead_kill_and_replay(
    cluster: &mut Cluster,
    victim: usize,
    signer: &Signer,
    ahead: i64,
    limit: Duration,
) {
    let mut direct = cluster.client(victim).await;
    let accepted = signed(signer, unix_now() + ahead);
    let r = direct.check(accepted.clone()).await.unwrap();
    assert_eq!(reason(&r), Reason::Ok, "{r:?}");
    cluster.kill(victim);

    let mut clients = Vec::new();
    for i in (0..NODES.len()).filter(|&i| i != victim) {
        clients.push(cluster.client(i).await);
    }
    let deadline = Instant::now() + limit;
    let mut taken_over = false;
    while !taken_over || unix_now() <= accepted.timestamp {
        assert!(
            Instant::now() < deadline,
            "the key was never taken over:\n{}",
            cluster.cluster_events()
        );
        replay_all(&mut clients, std::slice::from_ref(&accepted)).await;
        if !taken_over && let Ok(r) = clients[0].check(signed(signer, unix_now())).await {
            taken_over = reason(&r) == Reason::Ok;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The database's clock leaps ahead (an NTP step on its host) by five
/// leases while checks flow. Leases once ran out by that clock, so every
/// live lease looked run out at once: the nodes rejoined and fenced what
/// they owned, and fresh requests were refused for about 9 s. Leases are
/// judged by each node's monotonic clock now: nothing is refused, the
/// membership does not change, and nothing accepted before or during the
/// leap is accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_clock_leaping_ahead_refuses_nothing_fresh_and_admits_no_replay() {
    let Some((pg, cluster)) = cluster_on_a_database_with_its_own_clock() else {
        return;
    };
    let signer = Signer::new("wk_plenty", SECRET);
    let mut clients = cluster.clients().await;
    let mut tally = Tally::default();
    for i in 0..30 {
        let req = signed(&signer, unix_now());
        let answer = clients[i % 3].check(req.clone()).await;
        tally.count(req, answer.map(|r| reason(&r)));
    }
    assert_eq!(tally.accepted.len(), 30);
    let version = cluster.status(0)["version"].clone();

    pg.set_clock(10);
    let leapt = Instant::now();
    while leapt.elapsed() < Duration::from_secs(12) {
        for client in clients.iter_mut() {
            let req = signed(&signer, unix_now());
            let answer = client.check(req.clone()).await;
            tally.count(req, answer.map(|r| reason(&r)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        (tally.stale, tally.errors),
        (0, 0),
        "fresh requests were refused after the leap (stale, errors); events:\n{}",
        cluster.cluster_events()
    );
    for i in 0..3 {
        assert_eq!(
            cluster.status(i)["version"],
            version,
            "node {i}: the membership changed; events:\n{}",
            cluster.cluster_events()
        );
    }
    // Every request accepted, before the leap or after it, is refused
    // through every node.
    let replayed = replay_all(&mut clients, &tally.accepted).await;
    assert_eq!(replayed, tally.accepted.len() * 3);
}

/// The database's clock steps back an hour just as a node dies (killed
/// with -9, its last renewal taken on the clock before the step). Judged
/// by the database's clock, its lease would have lived on for the hour,
/// and its keys gone unanswered as long; judged by the survivors' own
/// clocks, it runs out in one lease TTL, and they serve its keys again
/// behind the takeover fence, as after any death, letting nothing it
/// accepted through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_dying_as_the_database_clock_steps_back_is_taken_over_in_seconds() {
    let Some((pg, mut cluster)) = cluster_on_a_database_with_its_own_clock() else {
        return;
    };
    let signer = Signer::new("wk_hundred", SECRET);
    let victim = index_of(&cluster.locate(0, &["--key-id", "wk_hundred"]));
    let mut direct = cluster.client(victim).await;
    let accepted = accept_through(&mut [&mut direct], &signer, &[0; 5]).await;
    let killed_at = Instant::now();
    cluster.kill(victim);
    pg.set_clock(-3600);

    let mut clients = cluster.clients().await;
    let (_, served_again) = taken_over_within(
        &cluster,
        &mut clients[0],
        &signer,
        killed_at,
        STEP_BACK_TAKEOVER,
    )
    .await;
    // As after any death (about 11 s: a lease TTL, a renewal or two and
    // the takeover fence); the point is seconds, not the hour of the step.
    // The bound leaves room for an artifact of the test's clock: under
    // libfaketime, PostgreSQL's timer signal handler appears to read the
    // real clock now and then, which after a step back is ahead of the
    // faked one, so it ends a membership session as idle in transaction
    // mid-renewal (never with the clock at +0, measured). Each such end restarts the
    // whole lease of healthy renewals a node waits for before sweeping,
    // and on a loaded machine that took 24 s once. A real clock step is
    // seen alike by the handler and the session.
    assert!(
        served_again < STEP_BACK_TAKEOVER,
        "served again {served_again:?} after the kill; events:\n{}",
        cluster.cluster_events()
    );
    let refused = replay_all(&mut clients, &accepted).await;
    assert_eq!(refused, accepted.len() * 2);
}

/// PostgreSQL stops answering for longer than a lease (every connection
/// hangs), and a node dies meanwhile (kill -9). Without it no member can
/// confirm for the others, so every node stops answering at its lease's end
/// (README, Running a cluster). When PostgreSQL answers again, the nodes
/// that lived through it hold their leases still, as nobody could have
/// removed them: they serve their own keys again at their first renewal,
/// neither rejoining nor fencing (once, their leases had run out by the
/// database's clock meanwhile, and they refused fresh requests for their
/// own keys for seconds more). The dead node's lease runs out a TTL later,
/// its keys are served behind the takeover fence, and nothing it accepted
/// is accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_database_outage_the_nodes_that_lived_through_it_serve_at_once() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let (proxy, through_proxy) = support::Proxy::to_database(&url).await;
    // Twelve keys: with six, all were the victim's one run in 243
    // (three nodes), and the test found no key to keep.
    let keys: String = (0..12)
        .map(|i| {
            format!(
                "[[keys]]\nid = \"wk_p{i}\"\npolicies = [\"plenty\"]\nsecrets = [{{ value = \"{SECRET}\" }}]\n"
            )
        })
        .collect();
    let mut cluster = Cluster::start(&through_proxy, &keys);
    let owners: Vec<usize> = (0..12)
        .map(|i| index_of(&cluster.locate(0, &["--key-id", &format!("wk_p{i}")])))
        .collect();
    let victim = owners[0];
    let kept = (1..12)
        .find(|&i| owners[i] != victim)
        .expect("a key owned by another node");
    let survivor = owners[kept];
    let (dead_key, live_key) = (
        Signer::new("wk_p0", SECRET),
        Signer::new(format!("wk_p{kept}"), SECRET),
    );
    let joined = |cluster: &Cluster| -> Vec<serde_json::Value> {
        let s = cluster.status(survivor);
        s["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["node"] != NODES[victim])
            .map(|m| m["joined_at_ms"].clone())
            .collect()
    };
    let joined_before = joined(&cluster);
    let mut to_victim = cluster.client(victim).await;
    let accepted = accept_through(&mut [&mut to_victim], &dead_key, &[0; 5]).await;

    proxy.freeze();
    cluster.kill(victim);
    let mut to_survivor = cluster.client(survivor).await;
    // Past the lease (2 s): the survivor stops answering, having nobody to
    // confirm for it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let r = to_survivor.check(signed(&live_key, unix_now())).await;
    assert!(
        r.is_err(),
        "served with nobody to confirm its membership: {r:?}"
    );

    proxy.thaw();
    let thawed = Instant::now();
    let mut stale = 0;
    let served_again = loop {
        match to_survivor.check(signed(&live_key, unix_now())).await {
            Ok(r) if reason(&r) == Reason::Ok => break thawed.elapsed(),
            Ok(r) if reason(&r) == Reason::Stale => stale += 1,
            Ok(r) => panic!("unexpected {r:?}"),
            Err(_) => {}
        }
        assert!(
            thawed.elapsed() < Duration::from_secs(20),
            "the survivor never served its own key again; events:\n{}",
            cluster.cluster_events()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        stale == 0 && served_again < Duration::from_secs(5),
        "its own key, after the outage: {stale} STALE, served again after {served_again:?}; events:\n{}",
        cluster.cluster_events()
    );

    // The dead node goes a lease later; its key is served behind the
    // fence, and what it accepted stays refused.
    let mut clients = cluster.clients().await;
    let (_, served_again) = taken_over(&cluster, &mut clients[0], &dead_key, thawed).await;
    assert!(served_again < Duration::from_secs(20), "{served_again:?}");
    assert_eq!(
        replay_all(&mut clients, &accepted).await,
        accepted.len() * 2
    );
    assert_eq!(
        joined(&cluster),
        joined_before,
        "the nodes that lived through the outage rejoined"
    );
}

/// A fresh PostgreSQL of the test's own, whose clock [`support::OwnPostgres::set_clock`]
/// moves, and a cluster on it with a key of plenty; `None` (skipped)
/// without PostgreSQL or libfaketime.
fn cluster_on_a_database_with_its_own_clock() -> Option<(support::OwnPostgres, Cluster)> {
    if std::env::var("WARDEN_TEST_POSTGRES_URL").is_err() {
        assert!(
            std::env::var("CI").is_err(),
            "bash tests/run sets up PostgreSQL in CI"
        );
        return None;
    }
    let pg = support::OwnPostgres::start_with_clock()?;
    let plenty = format!(
        "[[keys]]\nid = \"wk_plenty\"\npolicies = [\"plenty\"]\nsecrets = [{{ value = \"{SECRET}\" }}]\n"
    );
    let cluster = Cluster::start(&pg.url, &plenty);
    Some((pg, cluster))
}

/// What a stream of fresh requests got.
#[derive(Default)]
struct Tally {
    accepted: Vec<CheckRequest>,
    limited: usize,
    stale: usize,
    errors: usize,
}

impl Tally {
    fn count(&mut self, req: CheckRequest, answer: Result<Reason, tonic::Status>) {
        match answer {
            Ok(Reason::Ok) => self.accepted.push(req),
            Ok(Reason::RateLimited) => self.limited += 1,
            Ok(Reason::Stale) => self.stale += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => self.errors += 1,
        }
    }

    /// `count` fresh requests, round robin over the running nodes.
    async fn send(&mut self, cluster: &Cluster, signer: &Signer, count: usize) {
        let mut clients = cluster.clients().await;
        for i in 0..count {
            let n = clients.len();
            let req = spread(signer, i);
            let answer = clients[i % n].check(req.clone()).await;
            self.count(req, answer.map(|r| reason(&r)));
        }
    }
}

/// A fresh request for `signer`'s key, the `i`th of a run: every other one
/// also counts against a request limit of one of eight addresses, whose
/// owners differ, so that many of them span two owners (reserved, then
/// settled) and the rest are one step on one owner.
fn spread(signer: &Signer, i: usize) -> CheckRequest {
    let req = signed(signer, unix_now());
    if i.is_multiple_of(2) {
        return req;
    }
    with_limit(req, "plenty", &format!("ip:192.0.2.{}", i / 2 % 8))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_admits_nothing_extra_refuses_nothing_fresh_and_no_replay() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let mut cluster = Cluster::start(&url, "");
    let signer = Signer::new("wk_hundred", SECRET);
    let owner = index_of(&cluster.locate(0, &["--key-id", "wk_hundred"]));
    assert!(
        (0..8).any(
            |d| cluster.locate(0, &["--limit", &format!("plenty:ip:192.0.2.{d}")]) != NODES[owner]
        ),
        "no request of the run would span two owners"
    );
    let mut tally = Tally::default();
    tally.send(&cluster, &signer, 20).await;
    // The key's owner first, then the others.
    for i in [owner, (owner + 1) % 3, (owner + 2) % 3] {
        // Load on the other two while the node drains, hands its state
        // over, leaves, comes back and takes its slots back...
        let load = {
            let mut clients = Vec::new();
            for j in (0..3).filter(|&j| j != i) {
                clients.push(cluster.client(j).await);
            }
            let signer = signer.clone();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for k in 0..40 {
                    let req = spread(&signer, k);
                    let r = clients[k % 2].check(req.clone()).await;
                    answers.push((req, r.map(|r| reason(&r))));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                answers
            })
        };
        cluster.restart(i);
        for (req, answer) in load.await.unwrap() {
            tally.count(req, answer);
        }
        // ...and on all three once it is back.
        tally.send(&cluster, &signer, 10).await;
    }
    // Until the limit is certainly reached.
    tally.send(&cluster, &signer, 60).await;
    assert_eq!(
        tally.accepted.len(),
        100,
        "admitted (limited {}, errors {})",
        tally.limited,
        tally.errors
    );
    assert_eq!(
        tally.stale,
        0,
        "fresh requests refused as stale; the nodes' cluster events:\n{}",
        cluster.cluster_events()
    );
    let mut clients = cluster.clients().await;
    replay_all(&mut clients, &tally.accepted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_all_nodes_does_not_notice_one_going_away() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let mut cluster = Cluster::start(&url, "");
    let signer = Signer::new("wk_hundred", SECRET);
    let owner = index_of(&cluster.locate(0, &["--key-id", "wk_hundred"]));
    let addrs: Vec<String> = (0..3).map(|i| cluster.node(i).addr.clone()).collect();
    let targets: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let tls = warden_client::Tls::from_dev_dir(cluster.dir.path()).unwrap();
    let mut client = Client::connect_cluster(&targets, tls).unwrap();
    for _ in 0..9 {
        let r = client.check(signed(&signer, unix_now())).await.unwrap();
        assert_eq!(reason(&r), Reason::Ok, "{r:?}");
    }
    // A node that does not own the key goes away (kill -9): every call
    // still lands, on the others.
    let gone = (owner + 1) % 3;
    cluster.nodes[gone].as_mut().unwrap().kill();
    for _ in 0..30 {
        let r = client.check(signed(&signer, unix_now())).await.unwrap();
        assert_eq!(reason(&r), Reason::Ok, "{r:?}");
    }
}

/// Two processes given one node name (a config copied to a second host)
/// would each answer for the same slots with state of its own, and each
/// accept what the other accepted. The second is refused before it writes
/// anything: it finds the name's lease renewed by a live process, logs
/// why and exits with an error, while the first serves on untouched. A
/// process under the name of one killed with -9 (its lease row still
/// there, renewed by nobody) joins after watching it for a lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_name_already_held_by_a_live_process_is_refused_and_the_holder_serves_on() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let mut cluster = Cluster::start(&url, "");
    let signer = Signer::new("wk_hundred", SECRET);
    let owner = index_of(&cluster.locate(0, &["--key-id", "wk_hundred"]));
    let node = NODES[owner];
    let copy_path = cluster.same_name_config(owner, "copy", |text| text);

    let mut to_owner = cluster.client(owner).await;
    let mut second = Server::with_config_unready(&copy_path, "info");
    let started = Instant::now();
    let mut served = 0;
    while started.elapsed() < Duration::from_secs(4) {
        let r = to_owner.check(signed(&signer, unix_now())).await.unwrap();
        assert_eq!(reason(&r), Reason::Ok, "the holder stopped serving: {r:?}");
        served += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = second.wait_exit();
    let logs = second.logs();
    assert!(
        !status.success(),
        "the second process under {node} kept running:\n{logs}"
    );
    assert!(
        logs.contains("\"event\":\"cluster_node_name_in_use\"")
            && logs.contains("is held by another live warden process"),
        "{logs}"
    );
    assert!(served > 20);
    assert!(
        !cluster
            .node(owner)
            .logs()
            .contains("cluster_node_name_in_use"),
        "the holder was disturbed:\n{}",
        cluster.node(owner).logs()
    );
    cluster.wait_members(owner, &NODES);

    // Killed with -9 and started again at once: its lease row is there,
    // renewed by nobody, so the new process joins after watching it.
    let accepted = signed(&signer, unix_now());
    let r = to_owner.check(accepted.clone()).await.unwrap();
    assert_eq!(reason(&r), Reason::Ok, "{r:?}");
    cluster.nodes[owner].as_mut().unwrap().kill();
    let restarted = Server::with_config_unready(&cluster.configs[owner], "info");
    restarted.wait_past_fence();
    assert!(
        restarted
            .logs()
            .contains("\"event\":\"cluster_name_watch\""),
        "{}",
        restarted.logs()
    );
    cluster.nodes[owner] = Some(restarted);
    for i in 0..3 {
        cluster.wait_members(i, &NODES);
    }
    let mut to_owner = cluster.client(owner).await;
    let (_, _) = taken_over(&cluster, &mut to_owner, &signer, Instant::now()).await;
    let mut clients = cluster.clients().await;
    replay_all(&mut clients, std::slice::from_ref(&accepted)).await;
}

/// A node cut off from PostgreSQL answers until its lease runs out by its
/// own clock (a 10 s lease here: 9 s after its last renewal began). A
/// replacement started under its name meanwhile (an orchestrator that
/// gave up on it) finds its lease row, waits until nobody renews it, and
/// joins with the name's slots. Its restart fence covers only timestamps
/// up to its own start plus the future skew; the old process accepted
/// requests signed seconds later than that. So the replacement fences the
/// slots it takes from its predecessor, and nothing the old process
/// accepted is accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_under_the_name_of_a_cut_off_node_accepts_nothing_it_accepted() {
    let Some(url) = fresh_database().await else {
        return;
    };
    // Each node reaches PostgreSQL through a proxy of its own.
    let mut proxies = Vec::new();
    let dir = ConfigDir::new();
    let configs = support::cluster_configs(&dir, &url, &NODES, "10s", POLICIES);
    for config in &configs {
        let (proxy, through) = support::Proxy::to_database(&url).await;
        let text = std::fs::read_to_string(config).unwrap();
        std::fs::write(config, text.replace(&url, &through)).unwrap();
        proxies.push(proxy);
    }
    let mut cluster = Cluster::start_from(dir, configs);
    let signer = Signer::new("wk_hundred", SECRET);
    let owner = index_of(&cluster.locate(0, &["--key-id", "wk_hundred"]));
    let replacement_path = cluster.same_name_config(owner, "next", |text| {
        text.lines()
            .map(|l| match l.split_once("postgres://") {
                // Straight to the database, not through the cut proxy.
                Some((head, _)) => format!("{head}{url}\""),
                None => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    });

    let mut to_old = cluster.client(owner).await;
    proxies[owner].cut();
    let cut = Instant::now();
    let next = Server::with_config_unready(&replacement_path, "info");
    // The old process answers on until its lease runs out by its clock:
    // requests signed 4 s ahead (future skew 5 s), as a client whose
    // clock runs ahead sends them.
    let mut accepted = Vec::new();
    let mut last_accepted = Duration::ZERO;
    while cut.elapsed() < Duration::from_secs(15) {
        let req = signed(&signer, unix_now() + 4);
        if let Ok(r) = to_old.check(req.clone()).await
            && reason(&r) == Reason::Ok
        {
            accepted.push(req);
            last_accepted = cut.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        last_accepted > Duration::from_secs(3),
        "the old process stopped answering {last_accepted:?} after the cut: this test needs it to answer past the replacement's restart fence"
    );

    next.wait_past_fence();
    assert!(
        next.logs().contains("\"event\":\"cluster_name_watch\""),
        "{}",
        next.logs()
    );
    let old = cluster.nodes[owner].replace(next);
    for i in 0..3 {
        cluster.wait_members(i, &NODES);
    }
    let mut clients = cluster.clients().await;
    assert_eq!(
        replay_all(&mut clients, &accepted).await,
        accepted.len() * 3,
        "a node did not answer; events:\n{}",
        cluster.cluster_events()
    );
    drop(old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_postgresql_alone_stops_before_the_others_take_its_keys() {
    let Some(url) = fresh_database().await else {
        return;
    };
    // node-c reaches PostgreSQL through a proxy; the others directly.
    let (proxy, through_proxy) = support::Proxy::to_database(&url).await;
    let dir = ConfigDir::new();
    let configs = support::cluster_configs(&dir, &url, &NODES, "2s", POLICIES);
    let config = std::fs::read_to_string(&configs[2]).unwrap();
    std::fs::write(&configs[2], config.replace(&url, &through_proxy)).unwrap();
    let cluster = Cluster::start_from(dir, configs);
    // A key whose state node-c owns (created in the shared store).
    let (key_id, secret) = loop {
        let out = cluster.dir.cli(
            cluster.node(0),
            &["keys", "create", "--owner", "cut", "--json"],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let k: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let id = k["key_id"].as_str().unwrap().to_owned();
        if cluster.locate(0, &["--key-id", &id]) == "node-c" {
            break (id, k["secret"].as_str().unwrap().to_owned());
        }
    };
    let signer = Signer::new(key_id, secret);
    let mut to_c = cluster.client(2).await;
    let mut to_a = cluster.client(0).await;
    // Both sides know the key (the store's NOTIFY reached them).
    for client in [&mut to_a, &mut to_c] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = client.check(signed(&signer, unix_now())).await.unwrap();
            if reason(&r) == Reason::Ok {
                break;
            }
            assert!(Instant::now() < deadline, "{r:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    proxy.cut();
    let cut_at = Instant::now();
    // node-c keeps receiving checks for its key, node-a too; node-c must
    // stop accepting before node-a's side takes the key over.
    let mut accepted_by_c = Vec::new();
    let mut accepted_by_a = Vec::new();
    let mut c_stopped = None;
    let mut last_c_ok = Duration::ZERO;
    while cut_at.elapsed() < Duration::from_secs(14) {
        let req = signed(&signer, unix_now());
        if let Ok(r) = to_c.check(req.clone()).await {
            if reason(&r) == Reason::Ok {
                assert!(
                    c_stopped.is_none(),
                    "node-c accepted again after it had stopped"
                );
                accepted_by_c.push(req);
                last_c_ok = cut_at.elapsed();
            }
        } else if c_stopped.is_none() {
            c_stopped = Some(cut_at.elapsed());
        }
        let req = signed(&signer, unix_now());
        if let Ok(r) = to_a.check(req.clone()).await
            && reason(&r) == Reason::Ok
        {
            accepted_by_a.push(req);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c_stopped.expect("node-c never stopped answering for its key");
    // Its lease is 2 s from its last renewal (every 400 ms): it accepts
    // nothing after that, before the others may expire it. (Checks sent to
    // it meanwhile wait up to a lease TTL for an owner, then fail.)
    // (2.5 s: the lease's 1.8 s after the last renewal before the cut, and
    // the time an answer takes to come back on a loaded machine.)
    assert!(
        last_c_ok < Duration::from_millis(2500),
        "accepted until {last_c_ok:?}"
    );
    assert!(!accepted_by_a.is_empty(), "node-a never served the key");
    // No request accepted on one side is accepted on the other.
    replay_all(std::slice::from_mut(&mut to_a), &accepted_by_c).await;
    // (A sample: each waits on node-c for an owner it no longer has.)
    let sample = accepted_by_a
        .iter()
        .take(3)
        .chain(accepted_by_a.iter().rev().take(3));
    for req in sample {
        if let Ok(r) = to_c.check(req.clone()).await {
            assert_ne!(
                reason(&r),
                Reason::Ok,
                "node-c accepted a request node-a accepted"
            );
        }
    }
    // It says so.
    let (_, metrics) = cluster.node(2).http_get("/metrics");
    assert!(
        metrics.contains("warden_cluster_coordinator_ok 0"),
        "{metrics}"
    );
}

/// `req` as a gateway sends it for an end client at `address`.
fn from_address(mut req: CheckRequest, address: &str) -> CheckRequest {
    req.client_address = address.into();
    req
}

/// Sends requests signed by `genuine` from `source` through `client` until
/// one is refused `LOCKED_OUT`, each allowed until then: a spent failure
/// budget reaches a node a round trip after the charge that spent it. Fails
/// the test past `deadline`.
async fn until_locked_out(
    client: &mut Client,
    genuine: &Signer,
    source: &str,
    deadline: Instant,
    cluster: &Cluster,
) {
    loop {
        let r = client
            .check(from_address(signed(genuine, unix_now()), source))
            .await
            .unwrap();
        if reason(&r) == Reason::LockedOut {
            return;
        }
        assert_eq!(reason(&r), Reason::Ok, "{r:?}");
        assert!(
            Instant::now() < deadline,
            "{source} was never locked out through this node: {r:?}\n{}",
            cluster.cluster_events()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_budget_is_one_budget_however_guesses_are_spread_over_the_nodes() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let cluster = Cluster::start(
        &url,
        "[check]\nfailure_limit = 3\nfailure_period = \"1h\"\n",
    );
    let mut clients = cluster.clients().await;
    let genuine = Signer::new("wk_hundred", SECRET);
    let guesser = Signer::new("wk_hundred", "a-wrong-secret-0123456789abcdefghijklmnop");
    // Three guesses from one address, one per node: one budget of three.
    for client in clients.iter_mut() {
        let r = client
            .check(from_address(signed(&guesser, unix_now()), "198.51.100.77"))
            .await
            .unwrap();
        assert_eq!(reason(&r), Reason::Unauthenticated, "{r:?}");
    }
    // The owner spreads the spent budget to every node (a round trip after
    // the answers; a few seconds at most on a loaded machine).
    let deadline = Instant::now() + Duration::from_secs(5);
    for client in clients.iter_mut() {
        // Even a correct signature from that source is refused then: a
        // guesser cannot tell a hit from a miss while locked out.
        until_locked_out(client, &genuine, "198.51.100.77", deadline, &cluster).await;
        // Others are not affected.
        let r = client
            .check(from_address(signed(&genuine, unix_now()), "198.51.100.78"))
            .await
            .unwrap();
        assert_eq!(reason(&r), Reason::Ok, "{r:?}");
    }
}

/// A flood of bad signatures, while the node owning most of their failure
/// budgets does not answer (paused): each failure is charged at its
/// budget's owner after its check was answered, so nothing but a bound
/// keeps the charges waiting on that owner from piling up. They stay
/// within `MAX_FAILURE_CHARGES` (past it they are dropped, and counted),
/// the node goes on answering, and once the owner is back nothing is left
/// waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_charges_to_an_owner_that_does_not_answer_stay_within_their_bound() {
    const MAX_FAILURE_CHARGES: u64 = 1024;
    let Some(url) = fresh_database().await else {
        return;
    };
    // Long leases: the paused node stays the owner of its budgets. A failure
    // limit no flood reaches: the guesses of the one source below are
    // answered as guesses, not locked out, once the paused node wakes and
    // takes the charges still on their way.
    let dir = ConfigDir::new();
    let configs = support::cluster_configs(
        &dir,
        &url,
        &NODES,
        "30s",
        &format!("{POLICIES}\n[check]\nfailure_limit = 1000000\n"),
    );
    let cluster = Cluster::start_from(dir, configs);
    let (entry, sleeper) = (0, 1);
    let guesser = Signer::new("wk_hundred", "a-wrong-secret-0123456789abcdefghijklmnop");

    // A charge to the paused node waits out its call's deadline (1 s), so
    // the bound is reached only while more than 1,024 a second go its way.
    // Guesses each from a source of their own send it a third of the flood,
    // one stream's worth in a debug build (~3,100 a second): at the line,
    // and on a busy machine short of it. So every other guess comes from
    // one source the paused node owns: two thirds of the flood go its way,
    // a sixth to the node that answers. The flood goes on until the first
    // charge is dropped.
    let hot = (1..=254)
        .map(|i| format!("192.0.2.{i}"))
        .find(|address| cluster.locate(entry, &["--client-address", address]) == NODES[sleeper])
        .expect("an address whose failure budget the paused node owns");
    cluster.node(sleeper).signal("STOP");
    let mut client = cluster.client(entry).await;
    let (tx, mut answers) = support::open_stream(&mut client, 1024).await;
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut req = signed(&guesser, unix_now());
                // Every other guess from `hot`, the rest each from a source
                // of its own (an IPv6 /64 is one source).
                let n = sent + 1;
                req.client_address = if n.is_multiple_of(2) {
                    hot.clone()
                } else {
                    format!("10.{}.{}.{}", n >> 16 & 255, n >> 8 & 255, n & 255)
                };
                if tx.send(req).await.is_err() {
                    break;
                }
                sent += 1;
            }
            sent
        }
    });
    let counting = tokio::spawn(async move {
        let mut refused = 0u64;
        while let Ok(Some(r)) = answers.message().await {
            assert_eq!(reason(&r), Reason::Unauthenticated, "{r:?}");
            refused += 1;
        }
        refused
    });
    let to = |node: usize| format!("{{to=\"{}\"}}", NODES[node]);
    let at_entry =
        |name: &str, node: usize| metric(cluster.node(entry), &format!("{name}{}", to(node)));
    let in_flight = |node: usize| at_entry("warden_cluster_failure_charges_in_flight", node);
    let dropped = |node: usize| at_entry("warden_cluster_failure_charges_dropped_total", node);
    let mut most = 0;
    // Well within the paused node's 30 s lease: it stays the owner.
    let until = Instant::now() + Duration::from_secs(15);
    while dropped(sleeper) == 0 && Instant::now() < until {
        most = most.max(in_flight(sleeper));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A second more at the bound: it holds under the flood.
    let at_bound = Instant::now() + Duration::from_secs(1);
    while Instant::now() < at_bound {
        most = most.max(in_flight(sleeper));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let sent = flooding.await.unwrap();
    assert!(
        most <= MAX_FAILURE_CHARGES,
        "{most} failure charges on their way to the paused node at once"
    );
    // The flood reached the bound: the test shows the bound holding.
    assert!(
        dropped(sleeper) > 0,
        "no charge was dropped of {sent} in 15 s (most in flight {most})"
    );
    // The owner that answers is not held up by the one that does not.
    let awake = 3 - entry - sleeper;
    assert_eq!(
        dropped(awake),
        0,
        "charges to the node that answers were dropped"
    );

    // The node answered throughout and answers genuine requests now.
    let genuine = Signer::new("wk_hundred", SECRET);
    let mut other = cluster.client(entry).await;
    cluster.node(sleeper).signal("CONT");
    let r = other.check(signed(&genuine, unix_now())).await.unwrap();
    assert_eq!(reason(&r), Reason::Ok, "{r:?}");
    let refused = counting.await.unwrap();
    assert_eq!(refused, sent, "every guess answered");
    let deadline = Instant::now() + Duration::from_secs(10);
    while in_flight(sleeper) > 0 {
        assert!(Instant::now() < deadline, "failure charges still waiting");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A failure charged while its budget's owner waits for that slot's
/// handover (a member paused as a third node joins) is not lost: the new
/// owner answers "not mine" until the state arrives, the charge follows
/// the slot, and once the handover comes the source is locked out as if
/// nothing had moved. A rebalance is no window for free guesses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_charged_while_its_owner_awaits_a_handover_is_counted_once_the_owner_serves() {
    let Some(url) = fresh_database().await else {
        return;
    };
    // Long leases: the paused member stays one while the third joins
    // (after its restart fence, ~6 s), and a charge may wait one TTL.
    let dir = ConfigDir::new();
    let extra = "[check]\nfailure_limit = 3\nfailure_period = \"1h\"\n";
    let configs =
        support::cluster_configs(&dir, &url, &NODES, "30s", &format!("{POLICIES}\n{extra}"));
    let mut cluster = Cluster {
        dir,
        configs,
        nodes: vec![None, None, None],
        past_logs: Vec::new(),
        faketime: None,
    };
    let (entry, sleeper, joiner) = (0, 1, 2);
    for i in [entry, sleeper] {
        let node = cluster.spawn(i);
        node.wait_past_fence();
        cluster.nodes[i] = Some(node);
    }
    for i in [entry, sleeper] {
        cluster.wait_members(i, &NODES[..2]);
    }

    cluster.node(sleeper).signal("STOP");
    let paused = Instant::now();
    cluster.nodes[joiner] = Some(cluster.spawn(joiner));
    cluster.wait_members(joiner, &NODES);
    cluster.wait_members(entry, &NODES);
    // Sources whose budgets are the joiner's and wait for the paused node.
    let locate = |address: &str| cluster.located(joiner, &["--client-address", address]);
    let awaited = |found: &serde_json::Value| {
        found["node"] == NODES[joiner]
            && found["awaiting"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n == NODES[sleeper])
    };
    let sources: Vec<String> = (1..=250)
        .map(|i| format!("198.51.100.{i}"))
        .filter(|a| awaited(&locate(a)))
        .take(3)
        .collect();
    assert_eq!(
        sources.len(),
        3,
        "no budget of the joiner's awaits the paused node"
    );
    let text = cluster.dir.cli(
        cluster.node(joiner),
        &["cluster", "locate", "--client-address", &sources[0]],
    );
    let text = String::from_utf8_lossy(&text.stdout);
    // node-a may still be named too, if its handover has not come yet.
    let waits = text.lines().find(|l| l.starts_with("node-c waits for "));
    assert!(
        text.contains("is owned by node-c")
            && waits.is_some_and(|l| l.contains("node-b")
                && l.ends_with("to hand it over, and answers for it once handed")),
        "{text}"
    );
    let bad = cluster.dir.cli(
        cluster.node(joiner),
        &["cluster", "locate", "--client-address", "198.51.100.1:443"],
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("must be an IPv4 or IPv6 address"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // Three guesses from each, through the node that is awake: answered at
    // once; the charges wait for their owner.
    let mut client = cluster.client(entry).await;
    let guesser = Signer::new("wk_hundred", "a-wrong-secret-0123456789abcdefghijklmnop");
    for source in &sources {
        for _ in 0..3 {
            let r = client
                .check(from_address(signed(&guesser, unix_now()), source))
                .await
                .unwrap();
            assert_eq!(reason(&r), Reason::Unauthenticated, "{r:?}");
        }
    }
    let waiting = format!(
        "warden_cluster_failure_charges_in_flight{{to=\"{}\"}}",
        NODES[joiner]
    );
    assert!(
        metric(cluster.node(entry), &waiting) > 0,
        "no charge waits for the joiner"
    );
    assert!(
        sources.iter().all(|a| awaited(&locate(a))),
        "handed over already"
    );
    assert!(
        paused.elapsed() < Duration::from_secs(24),
        "the paused node's lease may have run out: its slots would be fenced, not handed over"
    );

    cluster.node(sleeper).signal("CONT");
    cluster
        .node(joiner)
        .wait_past_fence_within(Duration::from_secs(20));
    assert!(sources.iter().all(|a| !awaited(&locate(a))));
    assert!(
        cluster
            .node(joiner)
            .logs()
            .contains(r#""event":"cluster_handed_over","from":"node-b""#),
        "{}",
        cluster.cluster_events()
    );
    // Every guess counted: each source is locked out, at its owner and
    // through the node it guessed through, even with the right secret.
    let genuine = Signer::new("wk_hundred", SECRET);
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in [joiner, entry] {
        let mut client = cluster.client(i).await;
        for source in &sources {
            until_locked_out(&mut client, &genuine, source, deadline, &cluster).await;
        }
    }
    assert_eq!(
        metric(
            cluster.node(entry),
            "warden_cluster_failure_charges_lost_total"
        ),
        0
    );
    assert_eq!(metric(cluster.node(entry), &waiting), 0);
}

/// The Envoy rate limit service through a cluster: one YAML limit is one
/// limit whichever node Envoy asks, and a request over one descriptor's
/// limit takes nothing from another descriptor's, even when their counters
/// live on different nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envoy_rate_limit_is_one_limit_whichever_node_envoy_asks() {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;

    let Some(url) = fresh_database().await else {
        return;
    };
    let dir = ConfigDir::new();
    std::fs::write(
        dir.path().join("ratelimit.yaml"),
        "domain: shop\ndescriptors:\n  - key: tenant\n    rate_limit: { unit: hour, requests_per_unit: 20 }\n  - key: remote_address\n    rate_limit: { unit: hour, requests_per_unit: 1000 }\n",
    )
    .unwrap();
    let configs = support::cluster_configs(
        &dir,
        &url,
        &NODES,
        "2s",
        &format!("{POLICIES}\n[envoy_ratelimit]\nconfig = [\"ratelimit.yaml\"]\n"),
    );
    let cluster = Cluster::start_from(dir, configs);
    let mut envoys = Vec::new();
    for i in 0..3 {
        let channel = warden_client::channel(
            &cluster.node(i).addr,
            warden_client::Tls::from_dev_dir(cluster.dir.path()).unwrap(),
        )
        .await
        .unwrap();
        envoys.push(RateLimitServiceClient::new(channel));
    }
    let request = |descriptors: &[(&str, &str)]| RateLimitRequest {
        domain: "shop".into(),
        descriptors: descriptors
            .iter()
            .map(|(k, v)| RateLimitDescriptor {
                entries: vec![Entry {
                    key: (*k).into(),
                    value: (*v).into(),
                }],
                ..Default::default()
            })
            .collect(),
        hits_addend: 0,
    };
    // Fixed hourly windows: keep every request inside one.
    let left = 3600 - unix_now() % 3600;
    if left < 30 {
        tokio::time::sleep(Duration::from_secs(left as u64 + 1)).await;
    }
    let (mut ok, mut over) = (0, 0);
    for i in 0..30 {
        let r = envoys[i % 3]
            .should_rate_limit(request(&[("tenant", "acme")]))
            .await
            .unwrap()
            .into_inner();
        match Code::try_from(r.overall_code).unwrap() {
            Code::Ok => ok += 1,
            Code::OverLimit => over += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((ok, over), (20, 10));
    // Over the tenant's limit: the address's counter is not touched, on
    // whichever node it lives.
    for i in 0..6 {
        let r = envoys[i % 3]
            .should_rate_limit(request(&[
                ("tenant", "acme"),
                ("remote_address", "203.0.113.9"),
            ]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.overall_code, Code::OverLimit as i32);
    }
    let r = envoys[1]
        .should_rate_limit(request(&[("remote_address", "203.0.113.9")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.overall_code, r.statuses[0].limit_remaining),
        (Code::Ok as i32, 999)
    );
}

/// The attack on a rolling restart: every node's state cap filled with
/// junk descriptors (one request each), then the owner of a spent limit
/// restarted. Its window, handed to a node whose pool is full, takes a
/// junk entry's place, as a request's new entry would: the limit stays
/// spent on the way out and on the way back, and no node holds more than
/// its cap. Until session 26 the handed window was the one dropped, and
/// the flood bought the spent limit a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_junk_flood_ahead_of_a_rolling_restart_frees_no_spent_limit() {
    const CAP: u64 = 200;
    let Some(url) = fresh_database().await else {
        return;
    };
    let mut cluster = Cluster::start(
        &url,
        &format!(
            "[[policies]]\nname = \"login\"\nalgorithm = \"sliding_window\"\nlimit = 3\nperiod = \"1d\"\nmax_entries = {CAP}\n\n\
             [[keys]]\nid = \"wk_flood\"\nsecrets = [{{ value = \"{SECRET}\" }}]\n"
        ),
    );
    let signer = Signer::new("wk_flood", SECRET);
    let login = |descriptor: &str| with_limit(signed(&signer, unix_now()), "login", descriptor);
    let victim = "ip:192.0.2.1";
    let mut clients = cluster.clients().await;
    for client in clients.iter_mut() {
        let r = client.check(login(victim)).await.unwrap();
        assert_eq!(reason(&r), Reason::Ok, "{r:?}");
    }
    let spent = clients[0].check(login(victim)).await.unwrap();
    assert_eq!(reason(&spent), Reason::RateLimited, "{spent:?}");

    // Through every node, far past every node's cap.
    for (n, client) in clients.iter_mut().enumerate() {
        let flood: Vec<CheckRequest> = (0..1_500)
            .map(|i| login(&format!("ip:junk-{n}-{i}")))
            .collect();
        let answers = support::stream_all(client, flood).await;
        assert!(
            answers
                .iter()
                .all(|a| a.as_ref().is_ok_and(|a| reason(a) == Reason::Ok)),
            "{:?}",
            answers.iter().find(|a| a.is_err())
        );
    }

    let still = clients[1].check(login(victim)).await.unwrap();
    assert_eq!(
        reason(&still),
        Reason::RateLimited,
        "after the flood: {still:?}"
    );
    let owner = index_of(&cluster.locate(0, &["--limit", &format!("login:{victim}")]));
    cluster.stop(owner);
    for j in (0..NODES.len()).filter(|&j| j != owner) {
        let r = cluster.client(j).await.check(login(victim)).await.unwrap();
        assert_eq!(
            reason(&r),
            Reason::RateLimited,
            "the handover bought the spent limit a fresh window: {r:?}"
        );
    }
    cluster.rejoin(owner);
    let mut held = 0;
    let mut lost = 0;
    for (j, node) in NODES.iter().enumerate() {
        let r = cluster.client(j).await.check(login(victim)).await.unwrap();
        assert_eq!(reason(&r), Reason::RateLimited, "back: {r:?}");
        let here = metric(cluster.node(j), "warden_state_pool_entries{pool=\"login\"}");
        assert!(here <= CAP, "{node} holds {here}");
        held += here;
        lost += metric(
            cluster.node(j),
            "warden_cluster_handoff_entries_dropped_total",
        );
    }
    assert!(held > 0, "no pool metric");
    assert!(lost > 0, "the handovers never met a full pool");
}
