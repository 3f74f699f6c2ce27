//! End to end: what an operator sees and relies on — metrics, health and
//! reflection, drain, anomaly alerts, load shedding, limits, and logs that
//! never carry a secret.

use crate::support;

use std::time::Duration;

use support::{BIN, ConfigDir, SECRET, Server};
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use warden_client::proto::{CheckRequest, Decision, Reason};
use warden_client::signing::{Signer, check_request_from, unix_now};
use warden_client::{Tls, channel};

const KEYS: &str = r#"
[[policies]]
name = "plenty"
limit = 100000
period = "1s"

[[keys]]
id = "wk_victim"
policies = ["plenty"]
secrets = [{ value = "test-secret-0123456789abcdefghijklmnopqrstuvwxyz" }]

[[keys]]
id = "wk_bystander"
policies = ["plenty"]
secrets = [{ value = "test-secret-0123456789abcdefghijklmnopqrstuvwxyz" }]
"#;

fn request(key: &str) -> CheckRequest {
    Signer::new(key, SECRET).check_request("GET", "/x", "", b"")
}

fn forged(key: &str) -> CheckRequest {
    Signer::new(key, "forged-secret-0123456789abcdefghijklmnop").check_request("GET", "/x", "", b"")
}

/// The value of the first sample whose line starts with `prefix`.
fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A connection is served on one thread, start to end; a new one goes to
/// the thread serving the fewest, so that busy connections are not piled
/// on one core while another idles, and a thread a closed connection
/// freed takes the next one.
#[tokio::test]
async fn a_new_connection_goes_to_the_serving_thread_serving_the_fewest() {
    let server = Server::dev_with_env(&[("WARDEN_SERVING_THREADS", "2")]);
    assert_eq!(support::per_serving_thread(&server, 2), [0, 0]);
    let mut first = server.client().await;
    first
        .check(server.signer().check_request("GET", "/", "", b""))
        .await
        .unwrap();
    let mut second = server.client().await;
    second
        .check(server.signer().check_request("GET", "/", "", b""))
        .await
        .unwrap();
    assert_eq!(support::per_serving_thread(&server, 2), [1, 1]);

    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while support::per_serving_thread(&server, 2) != [0, 1] {
        assert!(
            std::time::Instant::now() < deadline,
            "the closed connection is still counted: {:?}",
            support::per_serving_thread(&server, 2)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut third = server.client().await;
    let answer = third
        .check(server.signer().check_request("GET", "/", "", b""))
        .await
        .unwrap();
    assert_eq!(answer.decision(), Decision::Allow, "{answer:?}");
    assert_eq!(support::per_serving_thread(&server, 2), [1, 1]);
    // Both threads answer: the second connection still does.
    let answer = second
        .check(server.signer().check_request("GET", "/", "", b""))
        .await
        .unwrap();
    assert_eq!(answer.decision(), Decision::Allow, "{answer:?}");
}

/// `WARDEN_SERVING_THREADS=0` serves every connection on the main
/// runtime, as before serving threads: checks are answered, and a stop
/// drains and exits cleanly. (Multi-threaded: the client's connection task
/// runs while the test thread waits for the exit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_serving_threads_the_main_runtime_serves_and_drains() {
    let mut server = Server::dev_with_env(&[("WARDEN_SERVING_THREADS", "0")]);
    let mut client = server.client().await;
    let answer = client
        .check(server.signer().check_request("GET", "/", "", b""))
        .await
        .unwrap();
    assert_eq!(answer.decision(), Decision::Allow, "{answer:?}");
    assert!(
        !server
            .http_get("/metrics")
            .1
            .contains("warden_serving_thread_connections{")
    );
    let status = server.terminate();
    assert!(status.success(), "{status:?}; stderr:\n{}", server.logs());
}

#[tokio::test]
async fn metrics_scrape_parses_and_moves_with_traffic() {
    let server = Server::dev();
    let mut client = server.client().await;
    client
        .check(server.signer().check_request("GET", "/", "", b""))
        .await
        .unwrap();
    let (status, before) = server.http_get("/metrics");
    assert_eq!(status, 200);
    // Every sample line is `name{labels} value` with a numeric value.
    for line in before
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "unparsable sample: {line}");
    }
    let allow = "warden_checks_total{decision=\"allow\",reason=\"ok\"}";
    assert_eq!(sample(&before, allow), 1.0, "{before}");
    // Set at start: the demo key, and the default nonce bound.
    assert_eq!(sample(&before, "warden_api_keys "), 1.0, "{before}");
    assert_eq!(sample(&before, "warden_nonce_capacity "), 1e7, "{before}");
    for _ in 0..3 {
        client
            .check(server.signer().check_request("GET", "/", "", b""))
            .await
            .unwrap();
    }
    let replay = server.signer().check_request("GET", "/", "", b"");
    client.check(replay.clone()).await.unwrap();
    client.check(replay).await.unwrap();
    let (_, after) = server.http_get("/metrics");
    assert_eq!(sample(&after, allow), 5.0, "{after}");
    assert_eq!(
        sample(
            &after,
            "warden_checks_total{decision=\"deny\",reason=\"replay\"}"
        ),
        1.0
    );
    assert!(
        sample(&after, "warden_rpc_duration_seconds_count{rpc=\"Check\"}") >= 6.0,
        "{after}"
    );
    assert!(
        after.contains("warden_cert_expiry_seconds{what=\"server\""),
        "{after}"
    );
}

#[tokio::test]
async fn tls_handshake_failures_are_counted_by_cause() {
    let server = Server::dev();
    let no_cert = Tls::from_pem(
        std::fs::read(server.dir.join("ca.pem")).unwrap(),
        vec![],
        vec![],
    );
    if let Ok(c) = channel(&server.addr, no_cert).await {
        let _ = warden_client::Client::from_channel(c)
            .check(request("k"))
            .await;
    }
    let other = warden::dev::Ca::new("other").unwrap();
    let (cert, key) = other.client_cert("x", &["spiffe://x/y"]).unwrap();
    let tls = Tls::from_pem(
        std::fs::read(server.dir.join("ca.pem")).unwrap(),
        cert.into_bytes(),
        key.into_bytes(),
    );
    if let Ok(c) = channel(&server.addr, tls).await {
        let _ = warden_client::Client::from_channel(c)
            .check(request("k"))
            .await;
    }
    server.wait_for_log("unknown_ca");
    let (_, metrics) = server.http_get("/metrics");
    assert!(
        sample(
            &metrics,
            "warden_tls_handshake_failures_total{cause=\"unknown_ca\"}"
        ) >= 1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn health_and_reflection_answer_over_mtls() {
    let server = Server::dev();
    let ch = channel(&server.addr, server.tls()).await.unwrap();
    let mut health = HealthClient::new(ch.clone());
    for service in ["", "warden.v1.Warden"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(ch);
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([ask]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"warden.v1.Warden".to_owned())
            && names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
    assert_eq!(server.http_get("/readyz").0, 200);
    assert_eq!(server.http_get("/livez").0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_reports_not_serving_and_lets_in_flight_calls_finish() {
    let dir = ConfigDir::new();
    let mut server = dir.start(&format!(
        "[server]\ndrain_delay = \"1s\"\ndrain_timeout = \"10s\"\n{KEYS}"
    ));
    let ch = channel(&server.addr, Tls::from_dev_dir(dir.path()).unwrap())
        .await
        .unwrap();
    let mut health = HealthClient::new(ch.clone());
    let mut stub = warden_client::Client::from_channel(ch);

    // An open stream: an in-flight call that outlives the signal.
    let (tx, mut answers) = support::open_stream(&mut stub, 4).await;
    tx.send(request("wk_victim")).await.unwrap();
    assert_eq!(answers.next().await.unwrap().unwrap().reason(), Reason::Ok);

    server.signal("TERM");
    server.wait_for_log("\"event\":\"draining\"");
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::NotServing);
    assert_eq!(server.http_get("/readyz").0, 503);

    // Past the drain delay the in-flight stream still gets its answers...
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tx.send(request("wk_victim")).await.unwrap();
    assert_eq!(answers.next().await.unwrap().unwrap().reason(), Reason::Ok);
    // ...and once it ends, the server exits cleanly.
    drop(tx);
    assert!(answers.next().await.is_none());
    let status = tokio::task::spawn_blocking(move || server.wait_exit())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_flood_of_bad_signatures_raises_one_alert_per_window_and_spares_other_keys() {
    let dir = ConfigDir::new();
    let server = dir.start(&format!(
        "[check]\nfailure_limit = 1000\n\n[alerts]\nwindow = \"1h\"\nbad_signatures = 10\n{KEYS}"
    ));
    let mut client = dir.client(&server).await;
    for i in 0..100 {
        let r = client.check(forged("wk_victim")).await.unwrap();
        assert_eq!(r.reason(), Reason::Unauthenticated);
        if i % 10 == 0 {
            // Other keys' checks keep being answered, correctly, meanwhile.
            assert_eq!(
                client
                    .check(request("wk_bystander"))
                    .await
                    .unwrap()
                    .reason(),
                Reason::Ok
            );
        }
    }
    let logs = server.wait_for_log("\"event\":\"anomaly_alert\"");
    // Give a late duplicate the chance to show up before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = server.logs().max(logs);
    let key_alerts = logs
        .lines()
        .filter(|l| {
            l.contains("\"event\":\"anomaly_alert\"") && l.contains("\"subject\":\"wk_victim\"")
        })
        .count();
    assert_eq!(key_alerts, 1, "{logs}");
    assert!(logs.contains("\"kind\":\"bad_signature\""));
    assert!(!logs.contains("\"subject\":\"wk_bystander\""));
    let (_, metrics) = server.http_get("/metrics");
    assert_eq!(
        sample(
            &metrics,
            "warden_alerts_total{kind=\"bad_signature\",subject_kind=\"key\"}"
        ),
        1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn past_the_inflight_bound_calls_are_shed_at_once_while_admitted_calls_proceed() {
    let dir = ConfigDir::new();
    let server = dir.start(&format!("[server]\nmax_inflight = 2\n{KEYS}"));
    let mut client = dir.client(&server).await;
    // Two open streams hold both slots.
    let mut streams = Vec::new();
    for _ in 0..2 {
        streams.push(support::open_stream(&mut client, 4).await);
    }
    // A third call is refused, not queued (a queued call would hang here).
    let shed = tokio::time::timeout(Duration::from_secs(5), client.check(request("wk_victim")))
        .await
        .expect("a shed call must not wait for a slot");
    let status = shed.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(status.message(), "server overloaded; retry with backoff");
    // The admitted streams keep working.
    for (tx, answers) in streams.iter_mut() {
        tx.send(request("wk_victim")).await.unwrap();
        assert_eq!(answers.next().await.unwrap().unwrap().reason(), Reason::Ok);
    }
    drop(streams);
    // Once they end, there is room again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        client.check(request("wk_victim")).await.unwrap().reason(),
        Reason::Ok
    );
    let (_, metrics) = server.http_get("/metrics");
    assert!(
        sample(&metrics, "warden_shed_total{cause=\"server_busy\"}") >= 1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn one_connection_cannot_take_more_than_its_share_of_calls() {
    let dir = ConfigDir::new();
    let server = dir.start(&format!("[server]\nmax_calls_per_connection = 2\n{KEYS}"));
    let mut greedy = dir.client(&server).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(support::open_stream(&mut greedy, 4).await);
    }
    let status = greedy.check(request("wk_victim")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(
        status.message(),
        "too many concurrent calls on this connection"
    );
    // Another connection is unaffected.
    let mut other = dir.client(&server).await;
    assert_eq!(
        other.check(request("wk_bystander")).await.unwrap().reason(),
        Reason::Ok
    );
}

#[tokio::test]
async fn an_oversized_message_is_refused() {
    let dir = ConfigDir::new();
    let server = dir.start(&format!("[check]\nmax_body_bytes = 1024\n{KEYS}"));
    let mut client = dir.client(&server).await;
    let body = vec![b'x'; 200 * 1024];
    let h = Signer::new("wk_victim", SECRET).sign_at(
        unix_now(),
        "oversized_nonce_0001",
        "POST",
        "/",
        "",
        &body,
    );
    let status = client
        .check(check_request_from(&h, "warden-v1", "POST", "/", "", &body))
        .await
        .unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{status:?}"
    );
    // The connection and server are fine afterwards.
    assert_eq!(
        client.check(request("wk_victim")).await.unwrap().reason(),
        Reason::Ok
    );
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let dir = ConfigDir::new();
    let config = dir.write_config(&format!("[server]\nidle_timeout = \"1s\"\n{KEYS}"));
    let server = Server::with_config_logging(&config, "warden=debug,info");
    let mut client = dir.client(&server).await;
    assert_eq!(
        client.check(request("wk_victim")).await.unwrap().reason(),
        Reason::Ok
    );
    server.wait_for_log("\"event\":\"idle_close\"");
    // The client notices the closed connection and reconnects by itself.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        client.check(request("wk_victim")).await.unwrap().reason(),
        Reason::Ok
    );
}

#[tokio::test]
async fn secrets_signatures_and_bodies_never_reach_the_log() {
    let dir = ConfigDir::new();
    let config = dir.write_config(&format!(
        "[alerts]\nbad_signatures = 1\nreplays = 1\n{KEYS}"
    ));
    // The most verbose logging warden has.
    let server = Server::with_config_logging(&config, "trace");
    let mut client = dir.client(&server).await;
    let body_marker = "BODY-MARKER-must-not-be-logged";
    let signer = Signer::new("wk_victim", SECRET);
    let mut signatures = Vec::new();
    let mut send = async |req: CheckRequest| {
        signatures.push(req.signature.clone());
        let _ = client.check(req).await;
    };
    // Allowed, replayed, forged, unknown key, tampered, malformed, stale.
    let ok = signer.check_request("POST", "/pay", "card=4111", body_marker.as_bytes());
    send(ok.clone()).await;
    send(ok.clone()).await;
    send(
        Signer::new("wk_victim", "forged-secret-0123456789abcdefghijklmnop").check_request(
            "POST",
            "/pay",
            "",
            body_marker.as_bytes(),
        ),
    )
    .await;
    send(Signer::new("wk_nobody", SECRET).check_request(
        "POST",
        "/pay",
        "",
        body_marker.as_bytes(),
    ))
    .await;
    let mut tampered = signer.check_request("POST", "/pay", "", body_marker.as_bytes());
    tampered.body = format!("{body_marker}-changed").into_bytes().into();
    send(tampered).await;
    let mut malformed = signer.check_request("POST", "/pay", "", body_marker.as_bytes());
    malformed.nonce = format!("{body_marker}!");
    send(malformed).await;
    let h = signer.sign_at(
        unix_now() - 3600,
        "stale_nonce_00000001",
        "POST",
        "/pay",
        "",
        body_marker.as_bytes(),
    );
    send(check_request_from(
        &h,
        "warden-v1",
        "POST",
        "/pay",
        "",
        body_marker.as_bytes(),
    ))
    .await;
    // A bearer API key that does not exist, and a malformed one.
    let api_key = "wak_APIKEY-MARKER-must-not-be-logged-0123456789";
    let bearer = |key: &str| CheckRequest {
        api_key: key.into(),
        method: "GET".into(),
        path: "/".into(),
        ..Default::default()
    };
    send(bearer(api_key)).await;
    send(bearer(&format!("{api_key} with spaces"))).await;
    // A TLS failure and a reload failure, too.
    let _ = channel(
        &server.addr,
        Tls::from_pem(dir.ca.cert_pem().into_bytes(), vec![], vec![]),
    )
    .await;
    std::fs::write(
        dir.path().join("server-key.pem"),
        format!("-----BEGIN PRIVATE KEY-----\n{SECRET}\n-----END PRIVATE KEY-----\n"),
    )
    .unwrap();
    server.wait_for_log("tls_reload_failed");
    server.wait_for_log("anomaly_alert");

    let logs = server.logs();
    assert!(logs.contains("check_denied"), "the denials were logged");
    for line in logs.lines() {
        if let Err(twice) = keys_once(line) {
            panic!("{twice:?} twice in a log line (strict JSON parsers refuse it): {line}");
        }
    }
    assert!(!logs.contains(SECRET), "secret in the log");
    assert!(!logs.contains(body_marker), "body in the log");
    assert!(!logs.contains("card=4111"), "query in the log");
    assert!(!logs.contains("APIKEY-MARKER"), "API key in the log");
    for sig in signatures.iter().filter(|s| !s.is_empty()) {
        assert!(!logs.contains(sig.as_str()), "signature {sig} in the log");
    }
}

/// Whether a log line is a JSON object with each key once; the key given
/// twice if not. (serde_json keeps the last of two keys silently;
/// Elasticsearch, for one, refuses the document.)
fn keys_once(line: &str) -> Result<(), String> {
    use serde::de::{Deserializer, MapAccess, Visitor};
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Result<(), String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut twice = Ok(());
            while let Some((key, _)) = map.next_entry::<String, serde::de::IgnoredAny>()? {
                if !seen.insert(key.clone()) {
                    twice = Err(key);
                }
            }
            Ok(twice)
        }
    }
    serde_json::Deserializer::from_str(line)
        .deserialize_map(Keys)
        .unwrap_or_else(|e| Err(format!("not a JSON object: {e}")))
}

/// A client flooding warden with requests it knows will be refused cannot
/// make it write a log line for each: at most `max_denial_log_lines` a
/// second are written, every other denial is counted, and how many were
/// not written is logged with the first line of a later second. Before
/// session 42 every denial was a line: 16 MB of logs a second at 60,000
/// refusals a second.
#[tokio::test]
async fn a_flood_of_denied_checks_writes_a_bounded_number_of_log_lines() {
    let dir = ConfigDir::new();
    let server = dir.start(&format!(
        "[server]\nmax_denial_log_lines = 5\n\n[[policies]]\nname = \"one\"\nlimit = 1\nperiod = \"1h\"\n\n[[keys]]\nid = \"wk_flooder\"\npolicies = [\"one\"]\nsecrets = [{{ value = \"{SECRET}\" }}]\n"
    ));
    let mut client = dir.client(&server).await;
    let answer = client.check(request("wk_flooder")).await.unwrap();
    assert_eq!(answer.reason(), Reason::Ok, "{answer:?}");

    let flood = 300;
    let started = std::time::Instant::now();
    for _ in 0..flood {
        let answer = client.check(request("wk_flooder")).await.unwrap();
        assert_eq!(answer.reason(), Reason::RateLimited, "{answer:?}");
    }
    let flood_seconds = started.elapsed().as_secs() + 1;
    // A second later, the next denial is logged, after the count of those
    // that were not.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let answer = client.check(request("wk_flooder")).await.unwrap();
    assert_eq!(answer.reason(), Reason::RateLimited, "{answer:?}");
    server.wait_for_log("check_denials_not_logged");

    let logs = server.logs();
    let events = |event: &str| {
        logs.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["event"] == event)
            .collect::<Vec<_>>()
    };
    let written = events("check_denied").len() as u64;
    let reported: u64 = events("check_denials_not_logged")
        .iter()
        .map(|l| l["skipped"].as_u64().unwrap())
        .sum();
    let (_, metrics) = server.http_get("/metrics");
    let skipped = sample(&metrics, "warden_denial_log_lines_skipped_total") as u64;
    let denied = sample(
        &metrics,
        "warden_checks_total{decision=\"deny\",reason=\"rate_limited\"}",
    ) as u64;
    assert_eq!(denied, flood + 1, "every denial is still counted");
    assert_eq!(written + skipped, flood + 1, "{written} written");
    assert!(
        written <= 5 * (flood_seconds + 1),
        "{written} lines in {flood_seconds} s and one more"
    );
    assert_eq!(reported, skipped, "the skipped lines are all reported");
    assert!(skipped > 0);
}

#[test]
fn config_check_validates_without_serving() {
    let dir = ConfigDir::new();
    let good = dir.write_config(KEYS);
    let out = std::process::Command::new(BIN)
        .args(["config", "check", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid (2 keys, 1 policies"));

    std::fs::write(dir.path().join("server.pem"), "garbage").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["config", "check", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.pem"));
}

/// A peer that vanishes without closing its connection (its host powered
/// off, a partition) leaves nothing to close it on warden's side: every
/// accepted connection has the kernel's TCP keepalive armed, which probes
/// it after 30 s without traffic. Read from the kernel's own table of
/// connections (`/proc/net/tcp`: timer 2 is keepalive), for the server's
/// side of a connection this test opened and left silent. The gRPC and
/// forward-auth ports share the accept loop that arms it.
#[tokio::test]
async fn every_accepted_connection_has_tcp_keepalive_armed() {
    let server = Server::dev();
    let addr: std::net::SocketAddr = server.addr.parse().unwrap();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let ours = stream.local_addr().unwrap();
    let ticks_per_second: u64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(100);
    // The kernel's spelling of an IPv4 address and port: the address's
    // bytes as a little-endian number, the port big-endian, in hex.
    let spelled = |a: std::net::SocketAddr| match a {
        std::net::SocketAddr::V4(v4) => {
            format!(
                "{:08X}:{:04X}",
                u32::from_le_bytes(v4.ip().octets()),
                v4.port()
            )
        }
        other => panic!("the test server listens on IPv4, not {other}"),
    };
    let (local, remote) = (spelled(addr), spelled(ours));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let row = loop {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        let row = table
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 5 && f[1] == local && f[2] == remote)
            .map(|f| format!("{} {}", f[3], f[5]));
        // Armed once the server has accepted the connection: established
        // (state 01), with timer 2 running.
        if row.as_deref().is_some_and(|r| r.starts_with("01 02:"))
            || std::time::Instant::now() > deadline
        {
            break row;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let row = row.unwrap_or_else(|| panic!("no {local} {remote} in /proc/net/tcp"));
    let (state_and_timer, when) = row.split_once(':').unwrap();
    assert_eq!(
        state_and_timer, "01 02",
        "the server's side of a silent connection is not established with a keepalive timer (state, timer:when): {row}"
    );
    let seconds = u64::from_str_radix(when, 16).unwrap() / ticks_per_second;
    assert!(
        (20..=30).contains(&seconds),
        "the first keepalive probe is due in {seconds} s, not within 30 s of the last traffic: {row}"
    );
    drop(stream);
}

/// The outside attack's finding: 21,000 half-open TCP connections (no
/// certificate needed) exhausted file descriptors — failed accepts, a
/// failed certificate reload, new connections waiting up to 2 s. Under an
/// open-file limit of 512, flood the server with connections that never
/// start a handshake, from one address, while a normal client on another
/// address keeps calling, opens new connections, and a certificate reload
/// and the metrics listener keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_half_open_connections_starves_nothing() {
    let dir = ConfigDir::new();
    let config = dir.write_config(&format!(
        "[server]\nhandshake_timeout = \"2s\"\nmax_handshakes_per_address = 16\n{KEYS}"
    ));
    let server = Server::with_config_fd_limit(&config, 512);
    let addr: std::net::SocketAddr = server.addr.parse().unwrap();
    let tls = Tls::from_dev_dir(dir.path()).unwrap();
    let mut client = warden_client::Client::connect(&server.addr, tls.clone())
        .await
        .unwrap();

    // 1,500 connections from 127.0.0.2 that never say a word.
    let mut flood = Vec::new();
    for _ in 0..1_500 {
        // The test's own descriptor limit ends the flood early, if lower.
        let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
            break;
        };
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        if let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_secs(1), socket.connect(addr)).await
        {
            flood.push(stream);
        }
    }
    assert!(flood.len() >= 600, "only {} connections made", flood.len());

    // The established client keeps its latency, and new connections from
    // another address are served at once.
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let started = std::time::Instant::now();
        if i % 4 == 0 {
            let mut fresh = warden_client::Client::connect(&server.addr, tls.clone())
                .await
                .expect("a new connection during the flood");
            assert_eq!(
                fresh.check(request("wk_victim")).await.unwrap().reason(),
                Reason::Ok
            );
        } else {
            assert_eq!(
                client.check(request("wk_victim")).await.unwrap().reason(),
                Reason::Ok
            );
        }
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(1500),
        "slowest call {slowest:?}"
    );

    // A certificate reload still finds a descriptor.
    reload_server_certificate(&dir, &server);
    assert!(
        !server.logs().contains("accept_failed"),
        "{}",
        server.logs()
    );

    let (status, metrics) = server.http_get("/metrics");
    assert_eq!(status, 200);
    assert!(
        sample(
            &metrics,
            "warden_connections_refused_total{cause=\"max_handshakes_per_address\"}"
        ) >= (flood.len() / 2) as f64,
        "{metrics}"
    );
    server.wait_for_log("\"event\":\"connection_refused\"");
    drop(flood);
}

/// The metrics listener is plain HTTP, and in Kubernetes it listens on
/// every address so that Prometheus can scrape it: anything that reaches
/// the pod can connect. A flood of idle connections to it must take
/// neither the descriptors nor the connections the gRPC port needs, nor
/// the one a certificate reload needs; and the connections it holds idle
/// are closed, so that scrapes are answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_to_the_metrics_listener_starves_nothing() {
    let dir = ConfigDir::new();
    let server = Server::with_config_fd_limit(&dir.write_config(KEYS), 512);
    let metrics: std::net::SocketAddr = server.metrics_addr.parse().unwrap();
    let mut flood = support::idle_connections(metrics, 1_500).await;
    assert!(flood.len() >= 300, "only {} connections made", flood.len());
    // New gRPC connections are served and checked during the flood.
    let tls = Tls::from_dev_dir(dir.path()).unwrap();
    for _ in 0..3 {
        let mut fresh = tokio::time::timeout(
            Duration::from_secs(10),
            warden_client::Client::connect(&server.addr, tls.clone()),
        )
        .await
        .expect("a new gRPC connection during the flood")
        .unwrap();
        assert_eq!(
            fresh.check(request("wk_victim")).await.unwrap().reason(),
            Reason::Ok
        );
    }
    // A certificate reload still finds a descriptor.
    reload_server_certificate(&dir, &server);
    // The first connections took the listener's places. Having sent
    // nothing, they are closed after its header timeout (10 s) without the
    // flood's help, and a scrape is answered again while the flood still
    // holds the rest of its sockets.
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::io::AsyncReadExt::read(&mut flood[0], &mut byte),
    )
    .await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "an idle metrics connection was kept: {closed:?}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let addr = server.metrics_addr.clone();
        let status = tokio::task::spawn_blocking(move || scrape_status(&addr))
            .await
            .unwrap();
        if status == Some(200) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no scrape answered after the flood"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // All but the listener's 64 places were closed at once, and counted.
    let refused = support::metric(
        &server,
        "warden_connections_refused_total{cause=\"metrics_connections\"}",
    );
    assert!(refused >= flood.len() as u64 - 64, "{refused} refused");
    drop(flood);
}

/// Writes a new server certificate and waits for the server to take it up:
/// a reload must find a descriptor and succeed.
fn reload_server_certificate(dir: &ConfigDir, server: &Server) {
    let (cert, key) = dir.ca.server_cert(&["localhost", "127.0.0.1"]).unwrap();
    std::fs::write(dir.path().join("server-key.pem"), key).unwrap();
    std::fs::write(dir.path().join("server.pem"), cert).unwrap();
    server.wait_for_log("tls_reloaded");
    assert!(
        !server.logs().contains("tls_reload_failed"),
        "{}",
        server.logs()
    );
}

/// The status of one `GET /metrics`, or `None` if the connection failed.
fn scrape_status(addr: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        tcp,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// An HTTP/2 client that writes frames by hand over mTLS, to send what a
/// well-behaved client library never would.
struct RawH2 {
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
}

/// Frame types and flags used below (RFC 9113, section 6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const END_STREAM: u8 = 0x1;
/// GOAWAY's error code when a peer misbehaves (RFC 9113, section 7).
const ENHANCE_YOUR_CALM: u32 = 0xb;

impl RawH2 {
    async fn connect(server: &Server) -> Self {
        use rustls::pki_types::ServerName;
        use tokio::io::AsyncWriteExt;
        let mut config = support::client_tls_config(&server.dir, rustls::DEFAULT_VERSIONS);
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        // The preface and an empty SETTINGS frame.
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(frame(0x4, 0, 0, &[]));
        tls.write_all(&hello).await.unwrap();
        Self { tls }
    }

    /// Writes `frames` in writes of 100, until the server stops reading.
    async fn send(&mut self, frames: impl Iterator<Item = Vec<u8>>) {
        use tokio::io::AsyncWriteExt;
        let mut frames = frames.peekable();
        while frames.peek().is_some() {
            let batch: Vec<u8> = frames.by_ref().take(100).flatten().collect();
            if self.tls.write_all(&batch).await.is_err() {
                return;
            }
        }
    }

    /// Reads frames until the server's GOAWAY (its error code), the end of
    /// the connection, or `within`.
    async fn goaway(&mut self, within: Duration) -> Option<u32> {
        use tokio::io::AsyncReadExt;
        let read = async {
            loop {
                let mut head = [0u8; 9];
                self.tls.read_exact(&mut head).await.ok()?;
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut payload = vec![0u8; len];
                self.tls.read_exact(&mut payload).await.ok()?;
                if head[3] == GOAWAY {
                    return Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
                }
            }
        };
        tokio::time::timeout(within, read).await.ok().flatten()
    }
}

/// One frame as read: its type, flags, stream and payload.
struct ReadFrame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl RawH2 {
    /// Reads frames until one for which `last` holds (returned with all
    /// before it), the end of the connection or `within` (then `None`).
    async fn frames_until(
        &mut self,
        last: impl Fn(&ReadFrame) -> bool,
        within: Duration,
    ) -> Option<Vec<ReadFrame>> {
        use tokio::io::AsyncReadExt;
        let read = async {
            let mut frames = Vec::new();
            loop {
                let mut head = [0u8; 9];
                self.tls.read_exact(&mut head).await.ok()?;
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut payload = vec![0u8; len];
                self.tls.read_exact(&mut payload).await.ok()?;
                let stream = u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff;
                let frame = ReadFrame {
                    kind: head[3],
                    flags: head[4],
                    stream,
                    payload,
                };
                let done = last(&frame);
                frames.push(frame);
                if done {
                    return Some(frames);
                }
            }
        };
        tokio::time::timeout(within, read).await.ok().flatten()
    }
}

/// A header `x-pad` of 1,000 bytes, as an HPACK literal not indexed.
fn pad_header() -> Vec<u8> {
    let mut pad = vec![0x00, 5];
    pad.extend(b"x-pad");
    // Its length, 1,000, as an HPACK integer: 127 in the 7-bit prefix, then
    // 873 in groups of seven bits, low first.
    pad.extend([0x7f, 0x80 | (873 % 128) as u8, (873 / 128) as u8]);
    pad.extend([b'a'; 1_000]);
    pad
}

/// A `Check` call's header block. HPACK without the dynamic table:
/// :method POST and :scheme https from the static table, the rest as
/// literals not indexed.
fn check_headers() -> Vec<u8> {
    let mut block = vec![0x83, 0x87];
    for (name_index, value) in [(0x04, "/warden.v1.Warden/Check"), (0x01, "localhost")] {
        block.push(name_index);
        block.push(value.len() as u8);
        block.extend(value.as_bytes());
    }
    // content-type is static entry 31: 15 in the 4-bit prefix, then 16.
    block.extend([0x0f, 0x10, 16]);
    block.extend(b"application/grpc");
    block.extend([0x00, 2]);
    block.extend(b"te");
    block.push(8);
    block.extend(b"trailers");
    block
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

/// `count` `Check` calls opened (their bodies never sent), each followed
/// by `then(its stream id)`.
fn calls_followed_by(count: u32, then: impl Fn(u32) -> Vec<u8>) -> impl Iterator<Item = Vec<u8>> {
    (0..count).map(move |i| {
        let id = 2 * i + 1;
        let mut frames = frame(HEADERS, END_HEADERS, id, &check_headers());
        frames.extend(then(id));
        frames
    })
}

/// Sends `frames` on a connection of their own: the server must close it
/// (GOAWAY `ENHANCE_YOUR_CALM`) and go on serving a new client.
async fn assert_cut_off(server: &Server, frames: impl Iterator<Item = Vec<u8>>) {
    let mut h2 = RawH2::connect(server).await;
    h2.send(frames).await;
    assert_eq!(
        h2.goaway(Duration::from_secs(10)).await,
        Some(ENHANCE_YOUR_CALM)
    );
    let mut client = server.client().await;
    let request = server.signer().check_request("GET", "/", "", b"");
    assert_eq!(client.check(request).await.unwrap().reason(), Reason::Ok);
}

/// HTTP/2 "rapid reset" (CVE-2023-44487): a client opens calls and cancels
/// each at once. Cancelled calls do not count against the stream limit, so
/// without a bound the server starts work for calls without end while the
/// client pays for nothing. The server must close such a connection, and
/// serve everyone else as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_cancels_every_call_it_opens_is_disconnected() {
    let server = Server::dev();
    server.wait_past_fence();
    const CANCEL: u32 = 0x8;
    let calls = calls_followed_by(20_000, |id| frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
    assert_cut_off(&server, calls).await;
}

/// HTTP/2 "MadeYouReset" (CVE-2025-8671): a client makes the server reset
/// each call it opens, here with a window update past the flow-control
/// limit. A reset the server makes counts against no stream limit either,
/// so the server must bound these too and close such a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_makes_the_server_reset_every_call_is_disconnected() {
    let server = Server::dev();
    server.wait_past_fence();
    let calls = calls_followed_by(20_000, |id| {
        frame(WINDOW_UPDATE, 0, id, &0x7fff_ffffu32.to_be_bytes())
    });
    assert_cut_off(&server, calls).await;
}

/// HTTP/2 "CONTINUATION flood" (2024): one call's headers that never end,
/// frame after frame. The server must not buffer them without bound, and
/// must close the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_never_end_are_cut_off() {
    let server = Server::dev();
    server.wait_past_fence();
    // 10 MB of headers in all.
    let pad = pad_header();
    let first = frame(HEADERS, 0, 1, &check_headers());
    let rest = (0..10_000).map(|_| frame(CONTINUATION, 0, 1, &pad));
    assert_cut_off(&server, std::iter::once(first).chain(rest)).await;
}

/// A call whose headers are past the bound warden announces (16 KiB of
/// header list, in its SETTINGS) is refused, and only that call: the next
/// call on the same connection is checked and answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_past_the_bound_refuse_their_call_and_the_connection_serves_on() {
    let server = Server::dev();
    server.wait_past_fence();
    let mut h2 = RawH2::connect(&server).await;
    // Stream 1: 20 KB of headers, in two frames of 10 KB (each within the
    // frame size; more frames than a full header list needs are a flood).
    let mut first = check_headers();
    first.extend(pad_header().repeat(10));
    let mut frames = vec![
        frame(HEADERS, 0, 1, &first),
        frame(CONTINUATION, END_HEADERS, 1, &pad_header().repeat(10)),
    ];
    // Stream 3: a plain signed check.
    let request = server.signer().check_request("GET", "/", "", b"");
    let body = grpc_message(&prost::Message::encode_to_vec(&request));
    frames.push(frame(HEADERS, END_HEADERS, 3, &check_headers()));
    frames.push(frame(DATA, END_STREAM, 3, &body));
    h2.send(frames.into_iter()).await;

    let answered = |f: &ReadFrame| f.kind == HEADERS && f.stream == 3 && f.flags & END_STREAM != 0;
    let frames = h2
        .frames_until(answered, Duration::from_secs(10))
        .await
        .expect("the call after the refused one was never answered");
    // Stream 1 is answered `431 Request Header Fields Too Large` and
    // nothing else: HPACK's `:status` (static entry 8) with the value "431"
    // in Huffman code, the stream ended with it (no message, no check).
    const STATUS_431: [u8; 5] = [0x48, 0x83, 0x69, 0x90, 0xff];
    let refused: Vec<_> = frames
        .iter()
        .filter(|f| f.stream == 1 && f.kind != RST_STREAM)
        .map(|f| (f.kind, f.flags & END_STREAM, &f.payload[..]))
        .collect();
    assert_eq!(refused, [(HEADERS, END_STREAM, &STATUS_431[..])]);
    assert!(
        !frames.iter().any(|f| f.kind == GOAWAY),
        "the connection was closed"
    );
    let data: Vec<u8> = frames
        .iter()
        .filter(|f| f.kind == DATA && f.stream == 3)
        .flat_map(|f| f.payload.clone())
        .collect();
    assert!(data.len() > 5, "no answer on the call after: {data:?}");
    let answer: warden_client::proto::CheckResponse = prost::Message::decode(&data[5..]).unwrap();
    assert_eq!(answer.reason(), Reason::Ok, "{answer:?}");
}

/// HTTP/2 empty-frame flood (CVE-2019-9518): DATA frames that carry
/// nothing, each one work for the server and none for the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_empty_data_frames_is_cut_off() {
    let server = Server::dev();
    server.wait_past_fence();
    let first = frame(HEADERS, END_HEADERS, 1, &check_headers());
    let rest = (0..200_000).map(|_| frame(DATA, 0, 1, &[]));
    assert_cut_off(&server, std::iter::once(first).chain(rest)).await;
}

/// An HTTP/2 connection over mTLS with h2's own client, which keeps to
/// flow control: for sending requests part way and no further.
async fn h2_connect(server: &Server) -> h2::client::SendRequest<bytes::Bytes> {
    use rustls::pki_types::ServerName;
    let mut config = support::client_tls_config(&server.dir, rustls::DEFAULT_VERSIONS);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (send, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    send
}

/// Opens a call to `path` and sends `data`, without ending the request.
async fn h2_open(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    path: &str,
    data: bytes::Bytes,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let request = http::Request::post(format!("https://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut ready = send.clone().ready().await.unwrap();
    let (response, mut body) = ready.send_request(request, false).unwrap();
    if !data.is_empty() {
        body.reserve_capacity(data.len());
        body.send_data(data, false).unwrap();
    }
    (response, body)
}

/// A gRPC message's prefix declaring `len` bytes, and `sent` of them.
fn message_part(len: u32, sent: usize) -> bytes::Bytes {
    let mut part = vec![0];
    part.extend(len.to_be_bytes());
    part.extend(vec![b'x'; sent]);
    part.into()
}

/// `message` as one uncompressed gRPC message: its prefix, then itself.
fn grpc_message(message: &[u8]) -> Vec<u8> {
    let mut framed = vec![0];
    framed.extend((message.len() as u32).to_be_bytes());
    framed.extend(message);
    framed
}

/// The call's gRPC status, from its headers or its trailers.
async fn grpc_status(response: h2::client::ResponseFuture) -> Option<String> {
    let response = response.await.ok()?;
    let status = |h: &http::HeaderMap| h.get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
    if let Some(code) = status(response.headers()) {
        return Some(code);
    }
    let mut body = response.into_body();
    while body.data().await.transpose().ok()?.is_some() {}
    status(&body.trailers().await.ok()??)
}

/// Requests sent most of the way and then no further, each holding what
/// it sent in the reader's memory: past `max_waiting_request_bytes` they
/// are refused at once (RESOURCE_EXHAUSTED), and the ones within it are
/// cut at `request_read_timeout` (DEADLINE_EXCEEDED), not held for the
/// life of the connection. Checks go on being answered on the same
/// connection meanwhile. Without the bounds, every one of them waits
/// forever (the test fails at its own deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_stop_arriving_are_bounded_in_memory_and_in_time() {
    let dir = ConfigDir::new();
    // 4 MiB: the least allowed, the largest message any call accepts.
    let server = dir.start(&format!(
        "[server]\nrequest_read_timeout = \"2s\"\nmax_waiting_request_bytes = 4194304\n{KEYS}"
    ));
    let mut send = h2_connect(&server).await;
    let opened = std::time::Instant::now();
    // Eight checks of 1,000,000 bytes, 600,000 of each sent: seven would
    // hold more than 4 MiB.
    let mut calls = Vec::new();
    for _ in 0..8 {
        calls.push(
            h2_open(
                &mut send,
                "/warden.v1.Warden/Check",
                message_part(1_000_000, 600_000),
            )
            .await,
        );
    }
    // A check sent whole on the same connection is answered meanwhile.
    let mut client = dir.client(&server).await;
    assert_eq!(
        client.check(request("wk_victim")).await.unwrap().reason(),
        Reason::Ok
    );

    let mut refused = 0;
    let mut cut = 0;
    for (response, _body) in calls {
        let status = tokio::time::timeout(Duration::from_secs(20), grpc_status(response))
            .await
            .expect("a request that stopped arriving was held past its bound");
        match status.as_deref() {
            // RESOURCE_EXHAUSTED
            Some("8") => refused += 1,
            // DEADLINE_EXCEEDED, never before the timeout.
            Some("4") => {
                assert!(opened.elapsed() >= Duration::from_millis(1900));
                cut += 1;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(refused >= 2, "{refused} refused, {cut} cut");
    assert_eq!(refused + cut, 8);
    assert_eq!(
        support::metric(&server, "warden_request_reads_cut_total{cause=\"memory\"}"),
        refused
    );
    assert_eq!(
        support::metric(&server, "warden_request_reads_cut_total{cause=\"timeout\"}"),
        cut
    );
    // All given back: a request as large as the bound arrives again in full.
    let body = vec![b'y'; 900 * 1024];
    let h = Signer::new("wk_victim", SECRET).sign_at(
        unix_now(),
        "large_after_cuts_0001",
        "POST",
        "/",
        "",
        &body,
    );
    assert_eq!(
        client
            .check(check_request_from(&h, "warden-v1", "POST", "/", "", &body))
            .await
            .unwrap()
            .reason(),
        Reason::Ok
    );
}

/// A `CheckStream` that waits between its messages is idle, not late:
/// past `request_read_timeout` it is still open and its next check is
/// answered. A message left half sent on it is cut at the timeout, and so
/// is an admin call's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_idle_between_messages_is_never_cut_but_a_half_sent_message_is() {
    let dir = ConfigDir::new();
    let server = dir.start(&format!(
        "[[callers]]\nidentity = \"spiffe://test/gateway\"\nroles = [\"check\", \"admin\"]\n\n[server]\nrequest_read_timeout = \"1s\"\n{KEYS}"
    ));
    let mut send = h2_connect(&server).await;
    let whole =
        |key: &str| bytes::Bytes::from(grpc_message(&prost::Message::encode_to_vec(&request(key))));
    let (response, mut body) = h2_open(
        &mut send,
        "/warden.v1.Warden/CheckStream",
        whole("wk_victim"),
    )
    .await;
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    let mut answers = response.into_body();
    let answer = |data: bytes::Bytes| -> Reason {
        let message: warden_client::proto::CheckResponse =
            prost::Message::decode(&data[5..]).unwrap();
        message.reason()
    };
    let first = answers.data().await.unwrap().unwrap();
    answers
        .flow_control()
        .release_capacity(first.len())
        .unwrap();
    assert_eq!(answer(first), Reason::Ok);
    // Three timeouts between messages.
    tokio::time::sleep(Duration::from_secs(3)).await;
    body.reserve_capacity(1024);
    body.send_data(whole("wk_bystander"), false).unwrap();
    let second = answers.data().await.unwrap().unwrap();
    answers
        .flow_control()
        .release_capacity(second.len())
        .unwrap();
    assert_eq!(answer(second), Reason::Ok);
    // Half a message, then nothing: the stream ends DEADLINE_EXCEEDED.
    body.send_data(message_part(100, 50), false).unwrap();
    let sent = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while answers.data().await.transpose().unwrap().is_some() {}
        answers.trailers().await.unwrap()
    })
    .await
    .expect("a half-sent message was waited for past its bound")
    .unwrap();
    assert_eq!(ended["grpc-status"], "4", "{ended:?}");
    assert!(sent.elapsed() >= Duration::from_millis(900));

    // A call that tonic's generated services read (here an admin call) is
    // held to the same bound.
    let (response, _body) = h2_open(
        &mut send,
        "/warden.v1.Admin/ListKeys",
        message_part(100, 50),
    )
    .await;
    let status = tokio::time::timeout(Duration::from_secs(10), grpc_status(response))
        .await
        .expect("a half-sent admin call was waited for past its bound");
    assert_eq!(status.as_deref(), Some("4"));
}

/// A server that stops answering (SIGSTOP: a hung process, or a host gone
/// without closing its connections) reads nothing, so only the client can
/// end the wait: a check gets `DEADLINE_EXCEEDED` at the client's
/// deadline, not never, and the same client is answered once the server
/// runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_costs_a_check_its_deadline_not_forever() {
    let server = Server::dev();
    server.wait_past_fence();
    let mut client = server
        .client()
        .await
        .with_timeout(Duration::from_millis(500));
    let signer = server.signer();
    let check = |client: &mut warden_client::Client| {
        let request = signer.check_request("GET", "/", "", b"");
        let mut client = client.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(10), client.check(request))
                .await
                .expect("the check never ended")
        }
    };
    assert_eq!(check(&mut client).await.unwrap().reason(), Reason::Ok);
    server.signal("STOP");
    let paused = check(&mut client).await;
    server.signal("CONT");
    assert_eq!(paused.unwrap_err().code(), tonic::Code::DeadlineExceeded);
    assert_eq!(check(&mut client).await.unwrap().reason(), Reason::Ok);
}

/// With several nodes, one that stops answering costs the call sent to it
/// its deadline (not retried elsewhere: it may have decided), and the
/// calls after it go to the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_answering_costs_one_deadline_then_is_passed_over() {
    let dir = ConfigDir::new();
    let (a, b) = (dir.start(KEYS), dir.start(KEYS));
    a.wait_past_fence();
    b.wait_past_fence();
    let tls = Tls::from_dev_dir(dir.path()).unwrap();
    let client = warden_client::Client::connect_cluster(&[&a.addr, &b.addr], tls)
        .unwrap()
        .with_timeout(Duration::from_millis(500));
    let check = || {
        let mut client = client.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(10), client.check(request("wk_victim")))
                .await
                .expect("the check never ended")
                .map(|answer| answer.reason())
        }
    };
    for _ in 0..4 {
        assert_eq!(check().await.unwrap(), Reason::Ok);
    }
    a.signal("STOP");
    let mut answers = Vec::new();
    for _ in 0..10 {
        answers.push(check().await.map_err(|status| status.code()));
    }
    a.signal("CONT");
    let timed_out = answers
        .iter()
        .filter(|a| **a == Err(tonic::Code::DeadlineExceeded))
        .count();
    assert!(timed_out <= 1, "{answers:?}");
    assert_eq!(
        answers.iter().filter(|a| **a == Ok(Reason::Ok)).count(),
        answers.len() - timed_out,
        "{answers:?}"
    );
}

/// A node killed while a call waits on it: the connection breaks under the
/// call, and the call goes on to the next node (as for a node that was
/// never there), whatever tonic calls the broken connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_a_call_hands_the_call_to_the_next() {
    let dir = ConfigDir::new();
    let (a, b) = (dir.start(KEYS), dir.start(KEYS));
    a.wait_past_fence();
    b.wait_past_fence();
    let tls = Tls::from_dev_dir(dir.path()).unwrap();
    let mut client = warden_client::Client::connect_cluster(&[&a.addr, &b.addr], tls)
        .unwrap()
        .with_timeout(Duration::from_secs(20));
    // One call to each node: both connected, and the next call goes to `a`.
    for _ in 0..2 {
        let answer = client.check(request("wk_victim")).await.unwrap();
        assert_eq!(answer.reason(), Reason::Ok);
    }
    a.signal("STOP");
    let call = tokio::spawn(async move { client.check(request("wk_victim")).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.signal("KILL");
    let answer = tokio::time::timeout(Duration::from_secs(15), call)
        .await
        .expect("the call never ended")
        .unwrap();
    assert_eq!(answer.unwrap().reason(), Reason::Ok);
}
