//! End to end: only clients with a certificate from the configured CA can
//! call, and clients verify the server too.

#[path = "support/mod.rs"]
mod support;

use support::Server;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use warden::dev::Ca;
use warden_client::proto::Reason;
use warden_client::{Client, Tls};

async fn call_with(server: &Server, config: ClientTlsConfig) -> Result<(), String> {
    let channel = Channel::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(config)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut client = Client::from_channel(channel);
    let req = server.signer().check_request("GET", "/", "", b"");
    client
        .check(req)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn dev_ca(server: &Server) -> Certificate {
    Certificate::from_pem(std::fs::read(server.dir.join("ca.pem")).unwrap())
}

#[tokio::test]
async fn a_client_without_a_certificate_cannot_call() {
    let server = Server::dev();
    let config = ClientTlsConfig::new()
        .ca_certificate(dev_ca(&server))
        .domain_name("localhost");
    assert!(call_with(&server, config).await.is_err());
}

#[tokio::test]
async fn a_client_with_a_certificate_from_another_ca_cannot_call() {
    let server = Server::dev();
    let other = Ca::new("some other CA").unwrap();
    let (cert, key) = other
        .client_cert("intruder", &["spiffe://evil/gateway"])
        .unwrap();
    let config = ClientTlsConfig::new()
        .ca_certificate(dev_ca(&server))
        .identity(Identity::from_pem(cert, key))
        .domain_name("localhost");
    assert!(call_with(&server, config).await.is_err());
    server.wait_for_log("tls_handshake_failed");
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_server_ca_refuses_to_talk() {
    let server = Server::dev();
    let dir = &server.dir;
    let other = Ca::new("not the server's CA").unwrap();
    let tls = Tls::from_pem(
        other.cert_pem().into_bytes(),
        std::fs::read(dir.join("client.pem")).unwrap(),
        std::fs::read(dir.join("client-key.pem")).unwrap(),
    );
    let result = match Client::connect(&server.addr, tls).await {
        Ok(mut c) => c
            .check(server.signer().check_request("GET", "/", "", b""))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(result.is_err());
}

#[tokio::test]
async fn plaintext_clients_cannot_call_an_mtls_server() {
    let server = Server::dev();
    let result = match Client::connect_plaintext(&server.addr).await {
        Ok(mut c) => c
            .check(server.signer().check_request("GET", "/", "", b""))
            .await
            .map(|_| ()),
        Err(_) => Ok(()).and(Err(tonic::Status::unavailable("no connection"))),
    };
    assert!(result.is_err());
}

#[tokio::test]
async fn the_server_name_can_differ_from_the_address() {
    let server = Server::dev();
    // Connect by IP, verify the certificate's DNS name.
    let tls = server.tls().with_server_name("localhost");
    let mut client = Client::connect(&server.addr, tls).await.unwrap();
    let r = client
        .check(server.signer().check_request("GET", "/", "", b""))
        .await
        .unwrap();
    assert_eq!(r.reason(), Reason::Ok);
    // A name the certificate does not carry is refused.
    let tls = server.tls().with_server_name("warden.example");
    let refused = match Client::connect(&server.addr, tls).await {
        Ok(mut c) => c
            .check(server.signer().check_request("GET", "/", "", b""))
            .await
            .is_err(),
        Err(_) => true,
    };
    assert!(refused);
}
