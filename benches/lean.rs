//! warden's `Check` and `CheckStream` spoken in HTTP/2 directly (the `h2`
//! crate), for `warden-bench --client h2`.
//!
//! Why: on the 2-core machine the benchmarks run on, the generator and the
//! server share the cores, so every microsecond the generator spends per
//! call is one the server does not get. tonic's client passes each unary
//! call through a `Buffer` task, hyper's dispatch task and a future spawned
//! per request before h2 sees it; a gateway's own HTTP/2 codec (Envoy's, or
//! h2load's) does none of that. This client keeps only what gRPC needs: a
//! HEADERS frame, the length-prefixed message, and `grpc-status` read from
//! the trailers. It runs on one connection's thread (`connection_threads`),
//! so h2's connection lock is never contended: the reason session 41's
//! calls on hyper's connection, made from two threads, cost more than
//! tonic's.
//!
//! The connection under it is the Rust client's own (mutual TLS,
//! [`warden_client::Coalescing`] writes), so only the layers above HTTP/2
//! differ between `--client tonic` and `--client h2`.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use prost::Message;
use warden_client::Tls;
use warden_client::proto::{CheckRequest, CheckResponse};
use warden_client::signing::percent_decoded;

/// One HTTP/2 connection to warden, cheap to clone (clones share it).
#[derive(Clone)]
pub struct Lean {
    send: SendRequest<Bytes>,
    /// The two methods' URIs, parsed once (a clone shares their bytes).
    check: http::Uri,
    check_stream: http::Uri,
}

/// A gRPC call's failure, as the generator counts it: an error.
#[derive(Debug)]
pub struct Failed(pub String);

impl From<h2::Error> for Failed {
    fn from(e: h2::Error) -> Self {
        Failed(e.to_string())
    }
}

impl Lean {
    /// Connects to `target` over mTLS and drives the connection from a task
    /// of the calling thread's runtime.
    pub async fn connect(target: &str, tls: &Tls) -> Result<Self, String> {
        let io = warden_client::mtls_stream(target, tls)
            .await
            .map_err(|e| e.to_string())?;
        // hyper's windows, as tonic's client has them: the sizes decide
        // how often WINDOW_UPDATE frames go out, so both clients send the
        // same number.
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(2 * 1024 * 1024)
            .initial_connection_window_size(5 * 1024 * 1024)
            .handshake(io)
            .await
            .map_err(|e| format!("HTTP/2 handshake with {target}: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let uri = |method: &str| {
            http::Uri::try_from(format!("https://{target}/warden.v1.Warden/{method}"))
                .map_err(|e| format!("{target}: {e}"))
        };
        Ok(Self {
            send,
            check: uri("Check")?,
            check_stream: uri("CheckStream")?,
        })
    }

    /// Opens a call to `method`; the request's body is sent on the
    /// returned stream.
    async fn open(
        &self,
        method: &http::Uri,
    ) -> Result<(h2::client::ResponseFuture, SendStream<Bytes>), Failed> {
        let mut request = http::Request::new(());
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = method.clone();
        let headers = request.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        let mut send = self.send.clone().ready().await?;
        Ok(send.send_request(request, false)?)
    }

    /// One unary `Check`.
    pub async fn check(&self, request: &CheckRequest) -> Result<CheckResponse, Failed> {
        let (response, mut body) = self.open(&self.check).await?;
        body.send_data(frame(request), true)?;
        let response = response.await?;
        let mut answers = Answers::new(response);
        // An error status comes from the first `next` (no answer before
        // it) or the second (after one).
        let answer = answers.next().await?;
        if answers.next().await?.is_some() {
            return Err(Failed("a unary call with two answers".into()));
        }
        answer.ok_or_else(|| Failed("OK without an answer".into()))
    }

    /// A `CheckStream`: requests go on the returned [`SendStream`] (whole
    /// [`frame`]s, one or several to a DATA frame), answers come from
    /// [`Answers`].
    pub async fn check_stream(&self) -> Result<(SendStream<Bytes>, Answers), Failed> {
        let (response, body) = self.open(&self.check_stream).await?;
        let response = response.await?;
        if let Some((code, message)) = grpc_status(response.headers()) {
            return Err(Failed(format!(
                "stream refused: {message} (grpc-status {code})"
            )));
        }
        Ok((body, Answers::new(response)))
    }
}

/// A request as one gRPC message: uncompressed, its length, its bytes.
pub fn frame(request: &CheckRequest) -> Bytes {
    let mut buf = BytesMut::new();
    append_frame(&mut buf, request);
    buf.freeze()
}

/// [`frame`], appended to `buf`: several messages sent in one DATA frame
/// cost both sides one frame's work, as tonic sends what a stream has
/// ready.
pub fn append_frame(buf: &mut BytesMut, request: &CheckRequest) {
    let len = request.encoded_len();
    buf.reserve(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    request.encode(buf).expect("capacity reserved");
}

/// A call's `grpc-status` and `grpc-message`, if `headers` end it.
fn grpc_status(headers: &http::HeaderMap) -> Option<(u32, String)> {
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok()?.parse().ok())?;
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    Some((code, grpc_message(message)))
}

/// `grpc-message` as written: percent-encoded UTF-8 (gRPC over HTTP/2),
/// read with warden's one percent-decoder.
fn grpc_message(text: &str) -> String {
    String::from_utf8_lossy(&percent_decoded(text).collect::<Vec<u8>>()).into_owned()
}

/// The answers of one call, decoded as whole messages arrive however the
/// DATA frames cut them, and the status that ends the call.
pub struct Answers {
    body: RecvStream,
    buf: BytesMut,
    /// The status of a call answered with headers alone ("trailers only").
    trailers_only: Option<(u32, String)>,
    /// The call's status was read and was OK: every later `next` is `None`.
    ended: bool,
}

impl Answers {
    fn new(response: http::Response<RecvStream>) -> Self {
        let trailers_only = grpc_status(response.headers());
        Self {
            body: response.into_body(),
            buf: BytesMut::new(),
            trailers_only,
            ended: false,
        }
    }

    /// The next answer, or `None` once the call has ended with OK. A call
    /// that ends with another status (a stream refused part way, say
    /// RESOURCE_EXHAUSTED for a full nonce memory) is that error: read as
    /// the end, it once made a run of no answers and no errors.
    pub async fn next(&mut self) -> Result<Option<CheckResponse>, Failed> {
        loop {
            if let Some(answer) = take_message(&mut self.buf)? {
                return Ok(Some(answer));
            }
            if self.ended {
                return Ok(None);
            }
            match self.body.data().await {
                Some(chunk) => {
                    let chunk = chunk?;
                    let _ = self.body.flow_control().release_capacity(chunk.len());
                    self.buf.extend_from_slice(&chunk);
                }
                None if self.buf.is_empty() => {
                    // h2 gives the trailers only once every DATA frame is read.
                    let status = match self.trailers_only.take() {
                        Some(status) => Some(status),
                        None => self.body.trailers().await?.as_ref().and_then(grpc_status),
                    };
                    return match status {
                        Some((0, _)) => {
                            self.ended = true;
                            Ok(None)
                        }
                        Some((code, message)) => {
                            Err(Failed(format!("{message} (grpc-status {code})")))
                        }
                        None => Err(Failed("no grpc-status".into())),
                    };
                }
                None => return Err(Failed("the call ended inside a message".into())),
            }
        }
    }
}

/// The first whole message in `buf`, taken out of it; `None` while the
/// message is not whole yet.
fn take_message(buf: &mut BytesMut) -> Result<Option<CheckResponse>, Failed> {
    if buf.len() < 5 {
        return Ok(None);
    }
    if buf[0] != 0 {
        return Err(Failed("a compressed answer".into()));
    }
    let len = u32::from_be_bytes(buf[1..5].try_into().expect("4 bytes")) as usize;
    if buf.len() < 5 + len {
        return Ok(None);
    }
    buf.advance(5);
    CheckResponse::decode(buf.split_to(len))
        .map(Some)
        .map_err(|e| Failed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use warden_client::proto::Reason;

    fn answer(reason: i32, retry_after_ms: u64, header: &str) -> CheckResponse {
        CheckResponse {
            reason,
            retry_after_ms,
            headers: [("ratelimit".to_owned(), header.to_owned())].into(),
            ..Default::default()
        }
    }

    fn framed(answers: &[CheckResponse]) -> Vec<u8> {
        let mut wire = Vec::new();
        for a in answers {
            wire.push(0);
            wire.extend_from_slice(&(a.encoded_len() as u32).to_be_bytes());
            a.encode(&mut wire).expect("a Vec grows");
        }
        wire
    }

    proptest! {
        /// However the DATA frames cut the answers (inside the length
        /// prefix, inside a message, several in one frame), each comes out
        /// whole, in order, once.
        #[test]
        fn answers_come_out_whole_however_the_frames_cut_them(
            parts in prop::collection::vec((0i32..8, any::<u64>(), "[a-z0-9=;, ]{0,40}"), 0..12),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let answers: Vec<_> = parts.iter().map(|(r, ms, h)| answer(*r, *ms, h)).collect();
            let wire = framed(&answers);
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
            at.extend([0, wire.len()]);
            at.sort_unstable();
            let (mut buf, mut out) = (BytesMut::new(), Vec::new());
            for w in at.windows(2) {
                buf.extend_from_slice(&wire[w[0]..w[1]]);
                while let Some(a) = take_message(&mut buf).expect("well formed") {
                    out.push(a);
                }
            }
            prop_assert_eq!(out, answers);
            prop_assert!(buf.is_empty());
        }
    }

    #[test]
    fn a_message_cut_short_is_not_taken() {
        let wire = framed(&[answer(Reason::Ok as i32, 0, "limit=10")]);
        let mut buf = BytesMut::from(&wire[..wire.len() - 1]);
        assert!(take_message(&mut buf).expect("no error yet").is_none());
        assert_eq!(buf.len(), wire.len() - 1, "nothing consumed");
    }

    #[test]
    fn a_grpc_message_is_read_as_sent() {
        assert_eq!(
            grpc_message("the replay cache is full%3B retry later"),
            "the replay cache is full; retry later"
        );
        assert_eq!(grpc_message("caf%C3%A9 100%"), "café 100%");
        assert_eq!(grpc_message("%zz%4"), "%zz%4", "not an escape: kept");
    }

    #[test]
    fn a_compressed_answer_is_an_error_not_a_misread() {
        let mut wire = framed(&[answer(Reason::Ok as i32, 0, "")]);
        wire[0] = 1;
        assert!(take_message(&mut BytesMut::from(&wire[..])).is_err());
    }
}
