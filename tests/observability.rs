//! The operator's view, tested for real: the Prometheus alert rules pass
//! `promtool check rules` and their unit tests, the Prometheus Operator form
//! says the same, and a real Prometheus scraping a real warden — after a
//! burst of valid, forged and replayed checks — runs every dashboard query
//! with data to show, and every alert expression, whose every series exists.
//!
//! Needs `prometheus` and `promtool` (Debian's `prometheus` package; `bash
//! tests/run` installs it). Skipped without them, except in CI.

use crate::support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::Server;
use warden_client::proto::Reason;
use warden_client::signing::Signer;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");

/// `name` on the PATH, or `None` (a failure in CI) when it is not there.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "{name} must be installed in CI (bash tests/run installs Debian's prometheus)"
        );
        eprintln!("skipped: {name} is not installed; run bash tests/run");
    }
    found
}

fn rules_dir() -> PathBuf {
    Path::new(DEPLOY).join("prometheus")
}

#[test]
fn the_alert_rules_are_valid_and_their_unit_tests_pass() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    for args in [
        vec!["check", "rules", "warden-rules.yml"],
        vec!["test", "rules", "warden-rules.test.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(&args)
            .current_dir(rules_dir())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The Operator form is generated from the plain rules file; both must say
/// the same (make-prometheusrule.sh rewrites it).
#[test]
fn the_prometheusrule_says_what_the_rules_file_says() {
    let rules = std::fs::read_to_string(rules_dir().join("warden-rules.yml")).unwrap();
    let operator = std::fs::read_to_string(rules_dir().join("warden-prometheusrule.yaml")).unwrap();
    let groups: String = rules
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            if l.is_empty() {
                "\n".to_owned()
            } else {
                format!("  {l}\n")
            }
        })
        .collect();
    let body = operator.split_once("spec:\n").expect("a spec: line").1;
    assert_eq!(
        body, groups,
        "warden-prometheusrule.yaml is stale: run server/deploy/prometheus/make-prometheusrule.sh"
    );
}

/// A Prometheus process on a free port, scraping `target` every second.
struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(binary: &Path, target: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: warden\n    static_configs:\n      - targets: [\"{target}\"]\n",
                rules_dir().join("warden-rules.yml").display()
            ),
        )
        .unwrap();
        let port = support::free_port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    /// Runs an instant query; the `data.result` array, or the error text.
    fn query(&self, promql: &str) -> Result<Vec<serde_json::Value>, String> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let body = http_get(&self.addr, &path).map_err(|e| e.to_string())?;
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if v["status"] != "success" {
            return Err(body);
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until `promql` returns something.
    fn wait_for(&self, promql: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.query(promql).is_ok_and(|r| !r.is_empty()) {
            assert!(
                Instant::now() < deadline,
                "prometheus never answered {promql}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    tcp.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    // Prometheus answers with chunked encoding: join the chunks.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        return Ok(out);
    }
    Ok(body.to_owned())
}

/// Every `expr` of the dashboard, with Grafana's variables filled in.
fn dashboard_queries() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(Path::new(DEPLOY).join("grafana/warden-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*");
            out.push((panel["title"].as_str().unwrap().to_owned(), expr));
        }
    }
    out
}

/// Every alert of the rules file: (name, expression).
fn alert_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(rules_dir().join("warden-rules.yml")).unwrap();
    let mut out = Vec::new();
    let mut name = None;
    for line in text.lines().map(str::trim) {
        if let Some(n) = line.strip_prefix("- alert: ") {
            name = Some(n.to_owned());
        } else if let Some(expr) = line.strip_prefix("expr: ") {
            out.push((name.take().expect("expr after alert"), expr.to_owned()));
        }
    }
    out
}

/// The warden metric names an expression reads.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names: Vec<String> = expr
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("warden_"))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_and_alert_works_against_a_real_prometheus_and_warden() {
    let (Some(prometheus_bin), Some(_)) = (tool("prometheus"), tool("promtool")) else {
        return;
    };
    let server = Server::dev();
    let prometheus = Prometheus::start(&prometheus_bin, &server.metrics_addr);

    // A store write (for the store and audit latency panels)...
    let out = Command::new(support::BIN)
        .args(["keys", "create", "--owner", "dashboards", "--json"])
        .args(["--dev-dir", server.dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ...and a burst of valid, forged and replayed checks, over a few scrapes.
    let mut client = server.client().await;
    let signer = server.signer();
    let forger = Signer::new(signer.key_id(), "forged-secret-0123456789abcdefghijklmno");
    prometheus.wait_for("up{job=\"warden\"} == 1");
    for round in 0..6 {
        for _ in 0..5 {
            let valid = signer.check_request("GET", &format!("/r{round}"), "", b"");
            assert_eq!(
                client.check(valid.clone()).await.unwrap().reason(),
                Reason::Ok
            );
            assert_eq!(client.check(valid).await.unwrap().reason(), Reason::Replay);
            let forged = forger.check_request("GET", "/f", "", b"");
            client.check(forged).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    prometheus.wait_for("sum(rate(warden_checks_total{reason=\"replay\"}[1m])) > 0");

    let mut broken = Vec::new();
    for (panel, expr) in dashboard_queries() {
        match prometheus.query(&expr) {
            Ok(result) if !result.is_empty() => {}
            Ok(_) => broken.push(format!("panel {panel:?}: no data for {expr}")),
            Err(e) => broken.push(format!("panel {panel:?}: {expr} fails: {e}")),
        }
    }
    for (alert, expr) in alert_expressions() {
        if let Err(e) = prometheus.query(&expr) {
            broken.push(format!("alert {alert}: {expr} fails: {e}"));
        }
        // A single process exports no cluster metrics; tests/cluster_checks.rs
        // checks that a cluster node exports those the alerts read.
        for metric in metric_names(&expr)
            .into_iter()
            .filter(|m| !m.starts_with("warden_cluster_"))
        {
            let exists = format!("count({{__name__=~\"{metric}(_bucket|_count|_sum)?\"}})");
            if !prometheus.query(&exists).is_ok_and(|r| !r.is_empty()) {
                broken.push(format!(
                    "alert {alert}: reads {metric}, which warden does not export"
                ));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));

    // A healthy warden fires none of the availability alerts.
    for alert in ["WardenDown", "WardenNotReady", "WardenCheckErrors"] {
        let firing = prometheus
            .query(&format!("ALERTS{{alertname=\"{alert}\"}}"))
            .unwrap();
        assert!(firing.is_empty(), "{alert} fires: {firing:?}");
    }
}
