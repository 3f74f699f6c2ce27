//! End to end: the command line, config errors, plaintext rules, shutdown.

use crate::support;

use std::process::Command;

use support::{BIN, ConfigDir, SECRET, Server};
use warden_client::Client;
use warden_client::proto::Reason;
use warden_client::signing::Signer;

fn serve_config(text: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("warden.toml");
    std::fs::write(&path, text).unwrap();
    Command::new(BIN)
        .args(["serve", "--config", path.to_str().unwrap()])
        .output()
        .unwrap()
}

#[test]
fn an_invalid_config_exits_2_with_one_line_naming_the_field() {
    let cases = [
        (
            "insecure_plaintext = true\n[[policies]]\nname = \"p\"\nlimit = 0\nperiod = \"1s\"\n",
            "policies[0].limit",
        ),
        (
            "insecure_plaintext = true\n[[policies]]\nname = \"p\"\nlimit = 1\nperiod = \"1s\"\nburst = \"x\"\n",
            "burst",
        ),
        (
            "insecure_plaintext = true\nlisten = \"127.0.0.1:0\"\nbogus = 1\n",
            "bogus",
        ),
        (
            "insecure_plaintext = true\n[[keys]]\nid = \"k\"\nsecrets = [{ env = \"WARDEN_TEST_UNSET_VAR\" }]\n",
            "keys[0].secrets[0]",
        ),
        (
            "listen = \"10.1.2.3:9000\"\ninsecure_plaintext = true\n",
            "insecure_plaintext",
        ),
        (
            "[[callers]]\nidentity = \"spiffe://x/gw\"\nroles = [\"check\"]\n[tls]\ncert = \"missing.pem\"\nkey = \"missing-key.pem\"\nclient_ca = \"ca.pem\"\n",
            "missing.pem",
        ),
        (
            "[tls]\ncert = \"a.pem\"\nkey = \"b.pem\"\nclient_ca = \"ca.pem\"\n",
            "callers",
        ),
    ];
    for (text, field) in cases {
        let out = serve_config(text);
        assert_eq!(out.status.code(), Some(2), "{text}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(field), "{stderr:?} should name {field}");
    }
}

#[test]
fn a_secret_in_a_rejected_config_is_never_echoed() {
    let out = serve_config(
        "insecure_plaintext = true\n[[keys]]\nid = \"bad id\"\nsecrets = [{ value = \"hunter2-hunter2-hunter2-hunter2-hunter2\" }]\n",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("hunter2"));
}

#[tokio::test]
async fn plaintext_serves_on_loopback_when_explicitly_configured() {
    let dir = ConfigDir::new();
    let path = dir.path().join("plain.toml");
    std::fs::write(
        &path,
        format!("listen = \"127.0.0.1:0\"\ninsecure_plaintext = true\n[[keys]]\nid = \"k\"\nsecrets = [{{ value = \"{SECRET}\" }}]\n"),
    )
    .unwrap();
    let server = Server::with_config(&path);
    let mut client = Client::connect_plaintext(&server.addr).await.unwrap();
    let r = client
        .check(Signer::new("k", SECRET).check_request("GET", "/", "", b""))
        .await
        .unwrap();
    assert_eq!(r.reason(), Reason::Ok);
}

// Multi-threaded: the client's connection task must keep running while the
// test thread blocks waiting for the exit, as it would in a real gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_server_cleanly_while_a_client_is_connected() {
    let mut server = Server::dev();
    let mut client = server.client().await;
    assert_eq!(
        client
            .check(server.signer().check_request("GET", "/", "", b""))
            .await
            .unwrap()
            .reason(),
        Reason::Ok
    );
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn serve_without_dev_or_config_is_a_usage_error() {
    let out = Command::new(BIN).arg("serve").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// A valid config that cannot be served (the port is taken) is a run-time
/// failure, exit 1 — not a usage error, which would send the operator to
/// look for a mistake in the file.
#[test]
fn a_port_in_use_exits_1_not_2() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = serve_config(&format!(
        "listen = \"127.0.0.1:{port}\"\ninsecure_plaintext = true\n[server]\nmetrics_listen = \"off\"\n"
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot listen"), "{stderr}");
}
