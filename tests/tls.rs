//! End to end: only clients with a certificate from the configured CA can
//! call, and clients verify the server too.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

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

#[tokio::test]
async fn tls_material_that_does_not_parse_is_a_clear_error_at_setup() {
    let server = Server::dev();
    let dir = &server.dir;
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let cases = [
        (
            Tls::from_pem(
                b"not a pem".to_vec(),
                read("client.pem"),
                read("client-key.pem"),
            ),
            "CA certificate",
        ),
        (
            Tls::from_pem(read("ca.pem"), b"".to_vec(), read("client-key.pem")),
            "client certificate",
        ),
        (
            Tls::from_pem(read("ca.pem"), read("client.pem"), read("client.pem")),
            "client key",
        ),
    ];
    for (tls, what) in cases {
        match Client::connect(&server.addr, tls).await {
            Ok(_) => panic!("{what}: accepted"),
            Err(e) => {
                let message = e.to_string();
                assert!(message.contains(what), "{what}: {message}");
                assert!(!message.contains("PRIVATE KEY"), "{message}");
            }
        }
    }
}

/// A loopback relay between a client and `upstream` that counts the reads
/// it makes on the client's side: one per write the client made, since a
/// small write arrives whole. Plain threads, so that it reads as soon as
/// bytes arrive, whatever the client's runtime is doing.
fn counting_relay(upstream: String) -> (String, Arc<AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let reads = Arc::new(AtomicUsize::new(0));
    let counted = reads.clone();
    std::thread::spawn(move || {
        let (mut from_client, _) = listener.accept().unwrap();
        let mut to_server = std::net::TcpStream::connect(upstream).unwrap();
        let (mut from_server, mut to_client) = (
            to_server.try_clone().unwrap(),
            from_client.try_clone().unwrap(),
        );
        std::thread::spawn(move || std::io::copy(&mut from_server, &mut to_client));
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n @ 1..) = from_client.read(&mut buf) {
            counted.fetch_add(1, Ordering::SeqCst);
            if to_server.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    (addr, reads)
}

#[tokio::test]
async fn a_request_leaves_the_client_in_one_write() {
    // hyper writes a request's HEADERS and its DATA frame separately; the
    // client's connections hold them for one turn and send them together,
    // so the server wakes once per call. Over a relay that counts what
    // arrives: one read per call.
    let server = Server::dev();
    let (relay, reads) = counting_relay(server.addr.clone());
    let tls = server.tls().with_server_name("localhost");
    let mut client = Client::connect(&relay, tls).await.unwrap();
    let body = vec![b'x'; 1024];
    let signer = server.signer();
    // The first call settles the connection (SETTINGS and their ACKs).
    let first = client
        .check(signer.check_request("POST", "/orders", "", &body))
        .await;
    assert_eq!(first.unwrap().reason(), Reason::Ok);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let before = reads.load(Ordering::SeqCst);
    for _ in 0..20 {
        let answer = client
            .check(signer.check_request("POST", "/orders", "", &body))
            .await
            .unwrap();
        assert_eq!(answer.reason(), Reason::Ok);
    }
    let after = reads.load(Ordering::SeqCst);
    assert_eq!(after - before, 20, "writes for 20 calls");
}

#[tokio::test]
async fn the_channels_connection_carries_grpc_spoken_in_http2_directly() {
    // `mtls_stream` is what the channel runs on, for a caller with its own
    // HTTP/2 (warden-bench --client h2): a `Check` sent on it in h2 frames
    // is decided like any other, and a server the caller does not trust
    // is refused before a byte of HTTP/2.
    use bytes::{BufMut, Bytes, BytesMut};
    use prost::Message;
    let server = Server::dev();
    let io = warden_client::mtls_stream(&server.addr, &server.tls())
        .await
        .unwrap();
    let (send, connection) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::post(format!("https://{}/warden.v1.Warden/Check", server.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let check = server.signer().check_request("POST", "/orders", "", b"{}");
    let mut message = BytesMut::new();
    message.put_u8(0);
    message.put_u32(check.encoded_len() as u32);
    check.encode(&mut message).unwrap();
    let mut send = send.ready().await.unwrap();
    let (response, mut body) = send.send_request(request, false).unwrap();
    body.send_data(message.freeze(), true).unwrap();
    let mut answer = response.await.unwrap().into_body();
    let mut received = BytesMut::new();
    while let Some(chunk) = answer.data().await {
        received.extend_from_slice(&chunk.unwrap());
    }
    let trailers = answer.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    let received: Bytes = received.freeze();
    assert_eq!(received[0], 0, "uncompressed");
    let decided = warden_client::proto::CheckResponse::decode(&received[5..]).unwrap();
    assert_eq!(decided.reason(), Reason::Ok);

    let stranger = Ca::new("not the server's CA").unwrap();
    let dir = &server.dir;
    let untrusting = Tls::from_pem(
        stranger.cert_pem().into_bytes(),
        std::fs::read(dir.join("client.pem")).unwrap(),
        std::fs::read(dir.join("client-key.pem")).unwrap(),
    );
    let refused = warden_client::mtls_stream(&server.addr, &untrusting).await;
    let Err(e @ warden_client::Error::Open { .. }) = refused else {
        panic!("connected to a server whose CA is not trusted");
    };
    assert!(e.to_string().contains("certificate"), "{e}");
}

#[tokio::test]
async fn a_server_that_never_answers_the_handshake_fails_the_connection_in_time() {
    // A listener that accepts and then says nothing: without a deadline
    // `mtls_stream` would wait for its TLS answer for ever.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().take(1).collect();
        std::thread::sleep(std::time::Duration::from_secs(30));
        drop(held);
    });
    let server = Server::dev();
    let started = std::time::Instant::now();
    let result = warden_client::mtls_stream(&addr, &server.tls()).await;
    let waited = started.elapsed();
    let Err(e @ warden_client::Error::Open { .. }) = result else {
        panic!("a silent listener gave a connection");
    };
    assert!(e.to_string().contains("no connection within"), "{e}");
    assert!(waited < std::time::Duration::from_secs(15), "{waited:?}");
}
