//! End to end: a unary `Check` is read and answered by warden itself (not
//! by tonic's generic unary service) when it is one plain message, and any
//! other framing is answered exactly as tonic answers it. Requests are
//! framed by hand, over a real HTTP/2 connection with mTLS, as a client
//! other than warden's own may frame them.

use crate::mtls::{CALLERS, KEYS};
use crate::support;

use std::collections::VecDeque;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use http_body_util::BodyExt;
use prost::Message;
use support::{ConfigDir, SECRET, Server};
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use warden_client::proto::{CheckRequest, CheckResponse, Decision, Reason};
use warden_client::signing::Signer;

/// The path of warden's unary `Check`.
const CHECK: &str = "/warden.v1.Warden/Check";

/// A connection to `server` with the dev client certificate.
pub(crate) async fn channel(server: &Server) -> Channel {
    channel_as(server, &server.dir, "client").await
}

/// A connection to `server` with the certificate `NAME.pem` of `dir`.
pub(crate) async fn channel_as(server: &Server, dir: &Path, name: &str) -> Channel {
    let read = |file: &str| std::fs::read(dir.join(file)).unwrap();
    let config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(
            read(&format!("{name}.pem")),
            read(&format!("{name}-key.pem")),
        ))
        .domain_name("localhost");
    Channel::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(config)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A request body of the given frames, each sent as it is.
struct Frames(VecDeque<Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}

/// What came back, every part of it.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: http::StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) trailers: Option<HeaderMap>,
}

impl Answer {
    /// The gRPC status, from the trailers or, trailers-only, the headers.
    pub(crate) fn grpc_status(&self) -> String {
        let from = self.trailers.as_ref().unwrap_or(&self.headers);
        from.get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    }

    /// The gRPC message, percent-decoded as gRPC sends it.
    pub(crate) fn grpc_message(&self) -> String {
        let from = self.trailers.as_ref().unwrap_or(&self.headers);
        let sent = from
            .get("grpc-message")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        let mut message = Vec::new();
        let mut bytes = sent.iter();
        while let Some(&b) = bytes.next() {
            if b == b'%' {
                let hex = [*bytes.next().unwrap(), *bytes.next().unwrap()];
                let hex = std::str::from_utf8(&hex).unwrap();
                message.push(u8::from_str_radix(hex, 16).unwrap());
            } else {
                message.push(b);
            }
        }
        String::from_utf8(message).unwrap()
    }

    /// The one answer in the body.
    fn response(&self) -> CheckResponse {
        self.message()
    }

    /// The one message in the body.
    pub(crate) fn message<T: Message + Default>(&self) -> T {
        assert_eq!(self.body[0], 0, "an uncompressed message");
        let len = u32::from_be_bytes(self.body[1..5].try_into().unwrap()) as usize;
        assert_eq!(self.body.len(), 5 + len, "exactly one message");
        T::decode(&self.body[5..]).unwrap()
    }

    /// The headers, sorted, to compare across calls. They hold nothing
    /// that changes from call to call: gRPC answers carry no `date`.
    pub(crate) fn sorted_headers(&self) -> Vec<(String, String)> {
        let mut headers: Vec<_> = self
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        headers.sort();
        headers
    }
}

/// A `Check` whose body is `frames`, with `headers` besides the usual ones.
async fn call(
    channel: &mut Channel,
    frames: Vec<Frame<Bytes>>,
    headers: &[(&str, &str)],
) -> Answer {
    call_to(channel, CHECK, frames, headers).await
}

/// A call to the method at `path` whose body is `frames`, with `headers`
/// besides the usual ones.
pub(crate) async fn call_to(
    channel: &mut Channel,
    path: &str,
    frames: Vec<Frame<Bytes>>,
    headers: &[(&str, &str)],
) -> Answer {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Body::new(Frames(frames.into()))).unwrap();
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .unwrap();
    let response = channel.call(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

/// `message` to `path` by warden's own unary path (one plain message) and
/// by tonic's (the same message followed by request trailers), whose
/// answers must be the same in every part.
pub(crate) async fn both_paths(
    channel: &mut Channel,
    path: &str,
    message: &[u8],
) -> (Answer, Answer) {
    let framed = framed(0, message);
    let ours = call_to(channel, path, vec![data(framed.clone())], &[]).await;
    let tonics = call_to(channel, path, vec![data(framed), trailers()], &[]).await;
    assert_eq!(ours.status, tonics.status);
    assert_eq!(ours.sorted_headers(), tonics.sorted_headers());
    assert!(!ours.headers.contains_key("date"), "{:?}", ours.headers);
    assert_eq!(ours.grpc_status(), tonics.grpc_status());
    assert_eq!(ours.grpc_message(), tonics.grpc_message());
    assert_eq!(ours.body, tonics.body);
    assert_eq!(ours.trailers, tonics.trailers);
    (ours, tonics)
}

/// `message` as one gRPC message: flag, length, bytes.
pub(crate) fn framed(flag: u8, message: &[u8]) -> Bytes {
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(flag);
    framed.put_u32(message.len() as u32);
    framed.put_slice(message);
    framed.freeze()
}

pub(crate) fn data(bytes: impl Into<Bytes>) -> Frame<Bytes> {
    Frame::data(bytes.into())
}

/// Request trailers: a body that ends with them is not the plain case,
/// and goes to tonic's own unary service.
pub(crate) fn trailers() -> Frame<Bytes> {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-trace", HeaderValue::from_static("1"));
    Frame::trailers(trailers)
}

/// A dry-run check: answered alike however often it is asked (it takes
/// nothing and remembers no nonce), so two paths' answers can be compared.
pub(crate) fn dry_run(server: &Server) -> CheckRequest {
    let mut request = server
        .signer()
        .check_request("POST", "/orders", "", b"{\"n\":1}");
    request.dry_run = true;
    request
}

#[tokio::test]
async fn a_plain_check_is_answered_exactly_as_tonic_answers_it() {
    let server = Server::dev();
    server.wait_past_fence();
    let mut channel = channel(&server).await;
    let (ours, tonics) = both_paths(&mut channel, CHECK, &dry_run(&server).encode_to_vec()).await;

    assert_eq!(ours.status, http::StatusCode::OK);
    assert_eq!(ours.grpc_status(), "0");
    let answer = ours.response();
    assert_eq!(answer.decision(), Decision::Allow, "{answer:?}");
    assert_eq!(answer.reason(), Reason::Ok);
    assert_eq!(ours.status, tonics.status);
    assert_eq!(ours.response(), tonics.response());
    assert_eq!(
        ours.trailers.as_ref().map(HeaderMap::len),
        Some(1),
        "grpc-status alone: {:?}",
        ours.trailers
    );
}

#[tokio::test]
async fn a_message_split_over_frames_is_answered_whole() {
    let server = Server::dev();
    server.wait_past_fence();
    let mut channel = channel(&server).await;
    let message = framed(0, &dry_run(&server).encode_to_vec());
    // The prefix split in two, then the message a byte at a time for a while.
    let mut frames = vec![data(message.slice(..2)), data(message.slice(2..5))];
    frames.extend((5..40).map(|i| data(message.slice(i..i + 1))));
    frames.push(data(message.slice(40..)));
    frames.push(data(Bytes::new()));
    let answer = call(&mut channel, frames, &[]).await;
    assert_eq!(answer.grpc_status(), "0");
    assert_eq!(answer.response().decision(), Decision::Allow);
}

#[tokio::test]
async fn a_denial_is_the_same_answer_on_both_paths() {
    let server = Server::dev();
    server.wait_past_fence();
    let mut channel = channel(&server).await;
    let mut unknown = dry_run(&server);
    unknown.key_id = "wk_nobody_at_all".into();
    let (ours, tonics) = both_paths(&mut channel, CHECK, &unknown.encode_to_vec()).await;
    assert_eq!(ours.grpc_status(), "0");
    assert_eq!(ours.response().decision(), Decision::Deny);
    assert_eq!(ours.response(), tonics.response());
}

#[tokio::test]
async fn a_refused_call_is_the_same_trailers_only_answer_on_both_paths() {
    // A caller whose certificate may not call Check.
    let dir = ConfigDir::new();
    let server = dir.start(&format!("{CALLERS}{KEYS}"));
    server.wait_past_fence();
    dir.client_tls("admin", "x", &["spiffe://test/admin-only"]);
    let mut channel = channel_as(&server, dir.path(), "admin").await;
    let mut request = Signer::new("wk_open", SECRET).check_request("GET", "/", "", b"");
    request.dry_run = true;
    let (ours, _) = both_paths(&mut channel, CHECK, &request.encode_to_vec()).await;
    assert_eq!(ours.status, http::StatusCode::OK);
    assert_eq!(ours.grpc_status(), "7", "PERMISSION_DENIED: {ours:?}");
    assert_eq!(
        ours.grpc_message(),
        "this client certificate may not call Check"
    );
    assert!(ours.body.is_empty() && ours.trailers.is_none(), "{ours:?}");
}

#[tokio::test]
async fn odd_framings_are_answered_as_tonic_answers_them_and_check_nothing() {
    let server = Server::dev();
    server.wait_past_fence();
    let mut channel = channel(&server).await;
    let request = dry_run(&server).encode_to_vec();

    // No message at all.
    let empty = call(&mut channel, vec![], &[]).await;
    assert_eq!(empty.grpc_status(), "13", "INTERNAL: {empty:?}");
    assert_eq!(empty.grpc_message(), "Missing request message.");

    // The compressed flag, with no compression named.
    let flagged = call(&mut channel, vec![data(framed(1, &request))], &[]).await;
    assert_eq!(flagged.grpc_status(), "13", "INTERNAL: {flagged:?}");
    assert!(flagged.body.is_empty());

    // A compression warden does not accept.
    let gzip = call(
        &mut channel,
        vec![data(framed(0, &request))],
        &[("grpc-encoding", "gzip")],
    )
    .await;
    assert_eq!(gzip.grpc_status(), "12", "UNIMPLEMENTED: {gzip:?}");

    // A message cut short: the prefix names more than the body holds.
    let whole = framed(0, &request);
    let cut = call(
        &mut channel,
        vec![data(whole.slice(..whole.len() - 1))],
        &[],
    )
    .await;
    assert_eq!(cut.grpc_status(), "13", "INTERNAL: {cut:?}");
    assert!(cut.body.is_empty());

    // A length past the limit (the dev server's is its body limit plus the
    // message's fields): refused from the prefix, before the rest is read.
    let mut huge = BytesMut::new();
    huge.put_u8(0);
    huge.put_u32(64 << 20);
    huge.put_slice(&[0; 4096]);
    let huge = call(&mut channel, vec![data(huge.freeze())], &[]).await;
    assert_eq!(huge.grpc_status(), "11", "OUT_OF_RANGE: {huge:?}");

    // Not a CheckRequest: answered in-band as MALFORMED, as ever.
    let garbage = call(&mut channel, vec![data(framed(0, &[0x1a, 0x7f]))], &[]).await;
    assert_eq!(garbage.grpc_status(), "0");
    assert_eq!(garbage.response().reason(), Reason::Malformed);

    // The connection still answers a plain check after all that.
    let fine = call(&mut channel, vec![data(framed(0, &request))], &[]).await;
    assert_eq!(fine.response().decision(), Decision::Allow);
}

#[tokio::test]
async fn only_the_first_of_two_messages_is_checked_on_either_path() {
    // tonic's unary service answers the first message and reads past the
    // rest; warden's own path hands such a body to it. Two different
    // requests, so the answer shows which one was checked.
    let server = Server::dev();
    server.wait_past_fence();
    let mut channel = channel(&server).await;
    let first = dry_run(&server);
    let mut second = dry_run(&server);
    second.key_id = "wk_nobody_at_all".into();
    let mut body = BytesMut::new();
    body.put_slice(&framed(0, &first.encode_to_vec()));
    body.put_slice(&framed(0, &second.encode_to_vec()));
    let answer = call(&mut channel, vec![data(body.freeze())], &[]).await;
    assert_eq!(answer.grpc_status(), "0");
    assert_eq!(answer.response().decision(), Decision::Allow);
}

/// `bytes` in DATA frames of at most `size` bytes.
fn in_frames(bytes: &Bytes, size: usize) -> Vec<Frame<Bytes>> {
    (0..bytes.len())
        .step_by(size)
        .map(|at| data(bytes.slice(at..(at + size).min(bytes.len()))))
        .collect()
}

#[tokio::test]
async fn a_body_past_the_limit_goes_to_tonic_whole_what_was_read_then_the_rest() {
    // The limit: 1 KiB of body plus the fields' room (65,536 bytes).
    let dir = ConfigDir::new();
    let server = dir.start(&format!("[check]\nmax_body_bytes = 1024\n{CALLERS}{KEYS}"));
    server.wait_past_fence();
    let mut channel = channel_as(&server, dir.path(), "client").await;
    let signer = Signer::new("wk_open", SECRET);

    // One real 70,000-byte message: refused from its prefix.
    let huge = framed(0, &vec![0x42; 70_000]);
    let refused = call(&mut channel, in_frames(&huge, 16 * 1024), &[]).await;
    assert_eq!(refused.grpc_status(), "11", "OUT_OF_RANGE: {refused:?}");
    assert!(refused.body.is_empty(), "{refused:?}");

    // Two messages within the limit each, 70 KB together, in 4 KiB frames:
    // warden stops reading past the limit, with the second message's last
    // bytes still to come. tonic answers the first (its body is over
    // max_body_bytes: MALFORMED, in-band) only if it is handed those bytes
    // too; without them the second message is cut short (INTERNAL).
    let mut first = signer.check_request("POST", "/", "", &vec![b'a'; 60_000]);
    first.dry_run = true;
    let mut second = signer.check_request("POST", "/", "", &vec![b'b'; 9_900]);
    second.dry_run = true;
    let mut body = BytesMut::new();
    body.put_slice(&framed(0, &first.encode_to_vec()));
    body.put_slice(&framed(0, &second.encode_to_vec()));
    let body = body.freeze();
    // Reading stops at the first 4 KiB frame past 5 + 66,560 bytes.
    let read_until = ((5 + 66_560) / 4096 + 1) * 4096;
    assert!(
        body.len() > read_until,
        "the rest holds data: {}",
        body.len()
    );
    let answer = call(&mut channel, in_frames(&body, 4096), &[]).await;
    assert_eq!(answer.grpc_status(), "0", "{answer:?}");
    assert_eq!(answer.response().reason(), Reason::Malformed);

    // The connection still answers a plain check after both.
    let mut request = signer.check_request("GET", "/", "", b"");
    request.dry_run = true;
    let fine = call(
        &mut channel,
        vec![data(framed(0, &request.encode_to_vec()))],
        &[],
    )
    .await;
    assert_eq!(fine.grpc_status(), "0", "{fine:?}");
    assert_eq!(fine.response().decision(), Decision::Allow);
}
