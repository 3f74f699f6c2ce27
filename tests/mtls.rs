//! End to end: caller identity and authorization from client certificates,
//! revocation, expiry, certificate-bound keys, and certificate rotation
//! without a restart — all over real TLS against the real binary.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::{ConfigDir, SECRET, Server};
use warden::dev::Ca;
use warden_client::proto::{CheckRequest, Reason};
use warden_client::signing::Signer;
use warden_client::{Client, Tls};

pub(crate) const KEYS: &str = r#"
[[policies]]
name = "plenty"
limit = 100000
period = "1s"

[[keys]]
id = "wk_open"
policies = ["plenty"]
secrets = [{ value = "test-secret-0123456789abcdefghijklmnopqrstuvwxyz" }]

[[keys]]
id = "wk_bound"
secrets = [{ value = "test-secret-0123456789abcdefghijklmnopqrstuvwxyz" }]
bound_identities = ["spiffe://partner/billing"]

[[keys]]
id = "wk_webhook"
secrets = [{ value = "test-secret-0123456789abcdefghijklmnopqrstuvwxyz" }]
routes = ["POST /webhooks/billing"]
"#;

pub(crate) const CALLERS: &str = r#"
[[callers]]
identity = "spiffe://test/gateway"
roles = ["check", "forward-identity"]

[[callers]]
identity = "spiffe://test/app"
roles = ["check"]

[[callers]]
identity = "*.gateways.internal"
roles = ["check"]

[[callers]]
identity = "CN=legacy-gateway"
roles = ["check"]

[[callers]]
identity = "spiffe://test/admin-only"
roles = ["admin"]
"#;

fn request(key: &str, method: &str, path: &str) -> CheckRequest {
    Signer::new(key, SECRET).check_request(method, path, "", b"")
}

async fn connect(server: &Server, tls: Tls) -> Result<Client, String> {
    Client::connect(&server.addr, tls)
        .await
        .map_err(|e| e.to_string())
}

/// One call; `Err` when the call failed at the TLS or gRPC level.
async fn call(server: &Server, tls: Tls, req: CheckRequest) -> Result<Reason, tonic::Status> {
    let mut client = match connect(server, tls).await {
        Ok(c) => c,
        Err(e) => return Err(tonic::Status::unavailable(e)),
    };
    client.check(req).await.map(|r| r.reason())
}

#[tokio::test]
async fn identities_come_from_spiffe_then_dns_then_cn_only_when_allowed() {
    let dir = ConfigDir::new();
    let server = dir.start(&format!("{CALLERS}{KEYS}"));
    let ok = request("wk_open", "GET", "/");
    let spiffe = dir.client_tls(
        "spiffe",
        "ignored-cn",
        &["gw.gateways.internal", "spiffe://test/app"],
    );
    assert_eq!(call(&server, spiffe, ok.clone()).await.unwrap(), Reason::Ok);
    let dns = dir.client_tls("dns", "ignored-cn", &["edge-1.gateways.internal"]);
    assert_eq!(
        call(&server, dns, request("wk_open", "GET", "/"))
            .await
            .unwrap(),
        Reason::Ok
    );
    // CN-only certificates have no identity unless the config allows CNs.
    let cn = dir.client_tls("cn", "legacy-gateway", &[]);
    let status = call(&server, cn, request("wk_open", "GET", "/"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    drop(server);

    let server = Server::with_config(
        &dir.write_config_with(&format!("{CALLERS}{KEYS}"), "allow_cn_identity = true\n"),
    );
    let cn = dir.client_tls("cn", "legacy-gateway", &[]);
    assert_eq!(
        call(&server, cn, request("wk_open", "GET", "/"))
            .await
            .unwrap(),
        Reason::Ok
    );
}

/// The outside attack's finding: a certificate whose only SAN was the DNS
/// name `spiffe://test/gateway` was taken as that SPIFFE identity. A DNS SAN
/// must be a DNS name, and a CN (when allowed) is a CN, whatever it spells.
#[tokio::test]
async fn no_certificate_passes_as_an_identity_of_another_kind() {
    let dir = ConfigDir::new();
    let server = Server::with_config(
        &dir.write_config_with(&format!("{CALLERS}{KEYS}"), "allow_cn_identity = true\n"),
    );
    for (name, cn, sans) in [
        ("dns-spiffe", "x", &["dns:spiffe://test/gateway"][..]),
        ("cn-spiffe", "spiffe://test/gateway", &[][..]),
        ("cn-dns", "a.gateways.internal", &[][..]),
    ] {
        let tls = dir.client_tls(name, cn, sans);
        let status = call(&server, tls, request("wk_open", "GET", "/"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{name}");
    }
    // The genuine kinds still work.
    let dns = dir.client_tls("dns", "x", &["a.gateways.internal"]);
    assert_eq!(
        call(&server, dns, request("wk_open", "GET", "/"))
            .await
            .unwrap(),
        Reason::Ok
    );
}

#[tokio::test]
async fn a_caller_without_the_check_role_is_permission_denied_and_logged() {
    let dir = ConfigDir::new();
    let server = dir.start(&format!("{CALLERS}{KEYS}"));
    for (name, id) in [
        ("admin", "spiffe://test/admin-only"),
        ("stranger", "spiffe://elsewhere/gw"),
    ] {
        let tls = dir.client_tls(name, "x", &[id]);
        let status = call(&server, tls, request("wk_open", "GET", "/"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{id}");
        assert_eq!(
            status.message(),
            "this client certificate may not call Check"
        );
    }
    // Both refusals are logged, with the caller's identity.
    let logs = server.wait_for_log("\"caller\":\"spiffe://elsewhere/gw\"");
    assert_eq!(
        logs.matches("\"event\":\"caller_denied\"").count(),
        2,
        "{logs}"
    );
}

#[tokio::test]
async fn a_forwarded_identity_is_only_accepted_from_forwarders() {
    let dir = ConfigDir::new();
    let server = dir.start(&format!("{CALLERS}{KEYS}"));
    let mut req = request("wk_bound", "POST", "/webhooks/billing");
    req.client_identity = "spiffe://partner/billing".into();
    let app = dir.client_tls("app", "x", &["spiffe://test/app"]);
    let status = call(&server, app, req.clone()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    // The refused call stored nothing: the gateway may still use the nonce.
    let gateway = Tls::from_dev_dir(dir.path()).unwrap();
    assert_eq!(call(&server, gateway, req).await.unwrap(), Reason::Ok);
}

#[tokio::test]
async fn a_certificate_bound_key_is_forbidden_from_any_other_identity() {
    let dir = ConfigDir::new();
    let server = dir.start(&format!("{CALLERS}{KEYS}"));
    let gateway = || Tls::from_dev_dir(dir.path()).unwrap();
    let mut other = request("wk_bound", "POST", "/webhooks/billing");
    other.client_identity = "spiffe://partner/shipping".into();
    assert_eq!(
        call(&server, gateway(), other).await.unwrap(),
        Reason::Forbidden
    );
    // With no forwarded identity, the caller's own identity is the client.
    let direct = request("wk_bound", "POST", "/webhooks/billing");
    assert_eq!(
        call(&server, gateway(), direct).await.unwrap(),
        Reason::Forbidden
    );
    let mut right = request("wk_bound", "POST", "/webhooks/billing");
    right.client_identity = "spiffe://partner/billing".into();
    assert_eq!(call(&server, gateway(), right).await.unwrap(), Reason::Ok);
}

#[tokio::test]
async fn a_route_restricted_key_is_forbidden_elsewhere() {
    let dir = ConfigDir::new();
    let server = dir.start(&format!("{CALLERS}{KEYS}"));
    let mut client = dir.client(&server).await;
    let r = client
        .check(request("wk_webhook", "POST", "/webhooks/shipping"))
        .await
        .unwrap();
    assert_eq!(r.reason(), Reason::Forbidden);
    assert_eq!(r.http_status, 403);
    let r = client
        .check(request("wk_webhook", "GET", "/webhooks/billing"))
        .await
        .unwrap();
    assert_eq!(r.reason(), Reason::Forbidden);
    let r = client
        .check(request("wk_webhook", "POST", "/webhooks/billing"))
        .await
        .unwrap();
    assert_eq!(r.reason(), Reason::Ok);
}

#[tokio::test]
async fn client_rules_limit_what_an_end_client_identity_may_call() {
    let dir = ConfigDir::new();
    let rules = "[[clients]]\nidentity = \"spiffe://partner/*\"\nroutes = [\"POST /webhooks/*\"]\n";
    let server = dir.start(&format!("{CALLERS}{KEYS}{rules}"));
    let mut client = dir.client(&server).await;
    let mut req = request("wk_open", "GET", "/admin");
    req.client_identity = "spiffe://partner/billing".into();
    assert_eq!(client.check(req).await.unwrap().reason(), Reason::Forbidden);
    let mut req = request("wk_open", "POST", "/webhooks/x");
    req.client_identity = "spiffe://partner/billing".into();
    assert_eq!(client.check(req).await.unwrap().reason(), Reason::Ok);
}

#[tokio::test]
async fn no_spelling_of_a_path_takes_a_key_or_a_client_past_its_routes() {
    // A client limited to `POST /webhooks/*` and a key limited to
    // `POST /webhooks/billing`, trying paths that a proxy or framework
    // behind the gateway may resolve elsewhere: a dot segment, plain or
    // percent-encoded, between slashes, encoded slashes or backslashes, or
    // followed by a path parameter (`..;/`), which servlet containers
    // (Tomcat, Jetty, Spring Boot) drop before they remove dot segments.
    let dir = ConfigDir::new();
    let rules = "[[clients]]\nidentity = \"spiffe://partner/*\"\nroutes = [\"POST /webhooks/*\"]\n";
    let server = dir.start(&format!("{CALLERS}{KEYS}{rules}"));
    let mut client = dir.client(&server).await;
    let as_partner = |key: &str, path: &str| {
        let mut req = request(key, "POST", path);
        req.client_identity = "spiffe://partner/billing".into();
        req
    };
    let climbing = [
        "/webhooks/../admin",
        "/webhooks/%2e%2e/admin",
        "/webhooks/.%2E/admin",
        "/webhooks/x%2F..%2F..%2Fadmin",
        "/webhooks/x%2f..%2f..%2fadmin",
        "/webhooks/x\\..\\..\\admin",
        "/webhooks/x%5C..%5C..%5Cadmin",
        "/webhooks/./../admin",
        "/webhooks/billing/..",
        "/webhooks/x/..;/admin",
        "/webhooks/..;jsessionid=0/admin",
        "/webhooks/x/.;/..;x=1/admin",
        "/webhooks/%2e%2e;/admin",
        "/webhooks/..%3B/admin",
    ];
    for path in climbing {
        for req in [
            as_partner("wk_open", path),
            request("wk_webhook", "POST", path),
        ] {
            let r = client.check(req.clone()).await.unwrap();
            assert_eq!(r.reason(), Reason::Malformed, "{path}: {r:?}");
            assert_eq!(r.http_status, 400);
            // Refused before anything was looked up or stored: the nonce is
            // still unused.
            let mut fixed = req;
            fixed.path = "/webhooks/billing".into();
            fixed.signature = Signer::new(&fixed.key_id, SECRET)
                .sign_at(
                    fixed.timestamp,
                    &fixed.nonce,
                    "POST",
                    "/webhooks/billing",
                    "",
                    b"",
                )
                .signature;
            assert_eq!(
                client.check(fixed).await.unwrap().reason(),
                Reason::Ok,
                "{path}"
            );
        }
    }
    // Spellings that name the allowed route, as the application reads them,
    // are allowed; their neighbours are not.
    for path in [
        "/webhooks/%62illing",
        "//webhooks/billing",
        "/webhooks//billing",
    ] {
        let r = client
            .check(request("wk_webhook", "POST", path))
            .await
            .unwrap();
        assert_eq!(r.reason(), Reason::Ok, "{path}");
        let r = client.check(as_partner("wk_open", path)).await.unwrap();
        assert_eq!(r.reason(), Reason::Ok, "{path}");
    }
    for path in [
        "/webhooks/billing%2Fx",
        "/webhook%73/billing/x",
        "/%77ebhooks/x",
        // A servlet container reads it as the allowed route; an application
        // that keeps path parameters (Django) as another path: a rule must
        // hold for every reading.
        "/webhooks/billing;x=1",
    ] {
        let r = client
            .check(request("wk_webhook", "POST", path))
            .await
            .unwrap();
        assert_eq!(r.reason(), Reason::Forbidden, "{path}");
    }
    for path in ["/admin", "/webhooks", "/%61dmin"] {
        let r = client.check(as_partner("wk_open", path)).await.unwrap();
        assert_eq!(r.reason(), Reason::Forbidden, "{path}");
    }
}

#[tokio::test]
async fn expired_and_revoked_client_certificates_cannot_connect() {
    let dir = ConfigDir::new();
    let (revoked, revoked_key) = dir
        .ca
        .client_cert_with("r", &["spiffe://test/app"], Some(4242), false)
        .unwrap();
    let (kept, kept_key) = dir
        .ca
        .client_cert_with("k", &["spiffe://test/app"], Some(4343), false)
        .unwrap();
    let (expired, expired_key) = dir
        .ca
        .client_cert_with("e", &["spiffe://test/app"], Some(4444), true)
        .unwrap();
    std::fs::write(
        dir.path().join("revoked.crl.pem"),
        dir.ca.crl(&[4242]).unwrap(),
    )
    .unwrap();
    let server = Server::with_config(&dir.write_config_with(
        &format!("{CALLERS}{KEYS}"),
        "crls = [\"revoked.crl.pem\"]\n",
    ));
    let tls = |cert: &str, key: &str| {
        Tls::from_pem(
            dir.ca.cert_pem().into_bytes(),
            cert.as_bytes().to_vec(),
            key.as_bytes().to_vec(),
        )
    };
    assert_eq!(
        call(
            &server,
            tls(&kept, &kept_key),
            request("wk_open", "GET", "/")
        )
        .await
        .unwrap(),
        Reason::Ok
    );
    assert!(
        call(
            &server,
            tls(&revoked, &revoked_key),
            request("wk_open", "GET", "/")
        )
        .await
        .is_err()
    );
    assert!(
        call(
            &server,
            tls(&expired, &expired_key),
            request("wk_open", "GET", "/")
        )
        .await
        .is_err()
    );
    server.wait_for_log("tls_handshake_failed");
}

#[tokio::test]
async fn a_client_from_another_ca_cannot_connect_to_a_configured_server() {
    let dir = ConfigDir::new();
    let server = dir.start(&format!("{CALLERS}{KEYS}"));
    let other = Ca::new("other").unwrap();
    let (cert, key) = other.client_cert("x", &["spiffe://test/gateway"]).unwrap();
    let tls = Tls::from_pem(
        dir.ca.cert_pem().into_bytes(),
        cert.into_bytes(),
        key.into_bytes(),
    );
    assert!(
        call(&server, tls, request("wk_open", "GET", "/"))
            .await
            .is_err()
    );
}

/// Writes a file the way deploy tools do: a new file renamed into place.
fn replace_file(path: &std::path::Path, contents: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_server_cert_and_ca_on_disk_drops_no_calls() {
    let dir = ConfigDir::new();
    let server = dir.start(&format!("{CALLERS}{KEYS}"));

    // A client that keeps calling over its one connection the whole time.
    let mut steady = dir.client(&server).await;
    let (done, ok, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let worker = {
        let (done, ok, failed) = (done.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                match steady.check(request("wk_open", "GET", "/steady")).await {
                    Ok(r) if r.reason() == Reason::Ok => ok.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // Rotate: a new CA signs a new server certificate; the client CA bundle
    // trusts both CAs during the changeover.
    let new_ca = Ca::new("rotated CA").unwrap();
    let (server_cert, server_key) = new_ca.server_cert(&["localhost", "127.0.0.1"]).unwrap();
    replace_file(
        &dir.path().join("ca.pem"),
        &format!("{}{}", dir.ca.cert_pem(), new_ca.cert_pem()),
    );
    replace_file(&dir.path().join("server-key.pem"), &server_key);
    replace_file(&dir.path().join("server.pem"), &server_cert);

    // New connections see the new certificate: a client trusting only the
    // new CA (with a certificate from it) gets through...
    let (cert, key) = new_ca
        .client_cert("gw", &["spiffe://test/gateway"])
        .unwrap();
    let new_tls = Tls::from_pem(
        new_ca.cert_pem().into_bytes(),
        cert.into_bytes(),
        key.into_bytes(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Reason::Ok) =
            call(&server, new_tls.clone(), request("wk_open", "GET", "/new")).await
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served; logs:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...and one trusting only the old CA no longer does.
    let old_only = Tls::from_pem(
        dir.ca.cert_pem().into_bytes(),
        std::fs::read(dir.path().join("client.pem")).unwrap(),
        std::fs::read(dir.path().join("client-key.pem")).unwrap(),
    );
    assert!(
        call(&server, old_only, request("wk_open", "GET", "/old"))
            .await
            .is_err()
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    done.store(true, Ordering::SeqCst);
    worker.await.unwrap();
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "calls failed during rotation"
    );
    assert!(ok.load(Ordering::SeqCst) > 10);
    assert!(server.logs().contains("tls_reloaded"));
}

#[tokio::test]
async fn a_corrupt_certificate_is_rejected_and_the_old_one_keeps_serving() {
    let dir = ConfigDir::new();
    let server = dir.start(&format!("{CALLERS}{KEYS}"));
    replace_file(
        &dir.path().join("server.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    );
    server.wait_for_log("tls_reload_failed");
    // The log line names the file, and the old certificate still serves new
    // connections.
    assert!(server.logs().contains("server.pem"));
    let mut client = dir.client(&server).await;
    assert_eq!(
        client
            .check(request("wk_open", "GET", "/"))
            .await
            .unwrap()
            .reason(),
        Reason::Ok
    );
}

/// A bare TLS handshake from a client that offers only `versions`.
async fn handshake(
    server: &Server,
    dir: &ConfigDir,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> bool {
    use rustls::pki_types::ServerName;
    let config = support::client_tls_config(dir.path(), versions);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let Ok(mut tls) = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
    else {
        return false;
    };
    // TLS 1.3 reports client-auth failures only after the handshake: make
    // the server read and answer once.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut buf = [0u8; 9];
    tls.read_exact(&mut buf).await.is_ok()
}

#[tokio::test]
async fn tls_1_2_is_refused_unless_configured() {
    let dir = ConfigDir::new();
    let server = dir.start(&format!("{CALLERS}{KEYS}"));
    assert!(handshake(&server, &dir, &[&rustls::version::TLS13]).await);
    assert!(!handshake(&server, &dir, &[&rustls::version::TLS12]).await);
    drop(server);
    let server = Server::with_config(
        &dir.write_config_with(&format!("{CALLERS}{KEYS}"), "min_version = \"1.2\"\n"),
    );
    assert!(handshake(&server, &dir, &[&rustls::version::TLS12]).await);
}

#[tokio::test]
async fn certificates_close_to_expiry_are_warned_about_at_start() {
    let dir = ConfigDir::new();
    // The test certificates expire in 2036: inside a 100-year warning window.
    let server = Server::with_config(
        &dir.write_config_with(&format!("{CALLERS}{KEYS}"), "expiry_warning = \"36500d\"\n"),
    );
    let logs = server.wait_for_log("\"event\":\"cert_expiring\"");
    assert!(logs.contains("server certificate"), "{logs}");
    assert!(logs.contains("client CA"), "{logs}");
}

#[tokio::test]
async fn sighup_reloads_at_once() {
    let dir = ConfigDir::new();
    // File polling practically off: only the signal can trigger the reload.
    let config = dir
        .write_config_with(&format!("{CALLERS}{KEYS}"), "")
        .to_string_lossy()
        .into_owned();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("reload_interval = \"200ms\"", "reload_interval = \"1h\"");
    std::fs::write(&config, text).unwrap();
    let server = Server::with_config(std::path::Path::new(&config));

    let new_ca = Ca::new("after sighup").unwrap();
    let (cert, key) = new_ca.server_cert(&["localhost", "127.0.0.1"]).unwrap();
    replace_file(
        &dir.path().join("ca.pem"),
        &format!("{}{}", dir.ca.cert_pem(), new_ca.cert_pem()),
    );
    replace_file(&dir.path().join("server-key.pem"), &key);
    replace_file(&dir.path().join("server.pem"), &cert);
    server.signal("HUP");
    server.wait_for_log("\"trigger\":\"sighup\"");
    let (client_cert, client_key) = new_ca
        .client_cert("gw", &["spiffe://test/gateway"])
        .unwrap();
    let tls = Tls::from_pem(
        new_ca.cert_pem().into_bytes(),
        client_cert.into_bytes(),
        client_key.into_bytes(),
    );
    assert_eq!(
        call(&server, tls, request("wk_open", "GET", "/"))
            .await
            .unwrap(),
        Reason::Ok
    );
}
