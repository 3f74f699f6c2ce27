//! `CheckStream`'s requests read without tonic's decoder.
//!
//! A gateway sends every check of its clients on one open stream, so what a
//! streamed check costs is what a gateway pays. tonic's decoder copies
//! every frame that arrives into a buffer of its own, then grows and
//! compacts that buffer as messages are taken from it: about 2,600 of a
//! streamed check's 23,000 instructions besides its hashing (callgrind,
//! `benches/instructions.sh`). [`Messages`] keeps the frames as they came
//! and takes each message as a slice of the frame it arrived in (the
//! request's `body` a slice of that slice); only a message split over two
//! frames is gathered into one piece. Each request is decoded into the
//! room of the one answered before it ([`Requests::give_back`]), so a
//! stream's strings are not allocated afresh for every check.
//!
//! It reads as tonic's decoder reads, with the same errors, so a client sees
//! no difference (`reads_every_body_as_tonics_decoder_reads_it`). The answers
//! are written by tonic's own encoder, as before. A stream whose messages
//! are compressed goes to tonic's generated service, which refuses it as it
//! always did.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::future::{Either, Ready, ready as answered};
use http::HeaderValue;
use http::header::CONTENT_TYPE;
use http_body::Body as _;
use prost::Message as _;
use tonic::body::Body;
use tonic::codec::{Codec as _, EncodeBody, SingleMessageCompressionOverride};
use tonic::codegen::Service;
use tonic::codegen::http::{Request, Response};
use tonic::server::NamedService;
use tonic::{Code, Status};
use warden_client::codec::{Codec, decode_check_request_into};
use warden_client::proto::{CheckRequest, CheckResponse};

use super::unary::uncompressed;
use super::warden::{Requests, WardenService};
use crate::request_wait::PREFIX;

/// `CheckStream`'s path.
const PATH: &str = "/warden.v1.Warden/CheckStream";

/// A generated service `G`, with `CheckStream` calls read by [`Messages`]
/// and answered by `checks`, and every other call answered by `G`.
pub struct CheckStreams<G> {
    checks: Arc<WardenService>,
    generic: G,
    /// The largest message accepted, as `G`'s `max_decoding_message_size`.
    limit: usize,
}

impl<G: Clone> Clone for CheckStreams<G> {
    fn clone(&self) -> Self {
        Self {
            checks: self.checks.clone(),
            generic: self.generic.clone(),
            limit: self.limit,
        }
    }
}

impl<G> CheckStreams<G> {
    /// `generic` must answer `CheckStream` with `checks`, with `limit` as
    /// its `max_decoding_message_size`.
    pub fn new(checks: Arc<WardenService>, generic: G, limit: usize) -> Self {
        Self {
            checks,
            generic,
            limit,
        }
    }
}

impl<G: NamedService> NamedService for CheckStreams<G> {
    const NAME: &'static str = G::NAME;
}

impl<G> Service<Request<Body>> for CheckStreams<G>
where
    G: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response<Body>, Infallible>>, G::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.generic.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if request.uri().path() != PATH || !uncompressed(request.headers()) {
            return Either::Right(self.generic.call(request));
        }
        let (parts, body) = request.into_parts();
        let messages = Messages::new(body, self.limit);
        let request = tonic::Request::from_http(Request::from_parts(parts, messages));
        Either::Left(answered(Ok(match self.checks.open_stream(request) {
            Ok(answers) => {
                // As tonic's generated service writes a stream's answers.
                let encoder = Codec::<CheckResponse, CheckRequest>::default().encoder();
                let body = EncodeBody::new_server(
                    encoder,
                    answers,
                    None,
                    SingleMessageCompressionOverride::default(),
                    None,
                );
                let mut response = Response::new(Body::new(body));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                response
            }
            Err(status) => status.into_http(),
        })))
    }
}

/// The requests of one stream, each decoded from a slice of the frame it
/// arrived in. Memory stays bounded as in tonic's decoder: a message is
/// taken as soon as it is whole, and no more is read until one is wanted,
/// so what is held is at most one message within the limit and a frame.
pub struct Messages {
    body: Body,
    /// What has arrived and is not yet taken, oldest first.
    received: VecDeque<Bytes>,
    /// Bytes in `received`.
    len: usize,
    /// The largest message accepted.
    limit: usize,
    /// The length the message being received announced, once its prefix
    /// has been taken.
    announced: Option<usize>,
    /// The body ended or failed, or a message was refused: nothing more.
    done: bool,
    /// The last request answered, whose room the next is decoded into.
    spare: CheckRequest,
}

/// The most room a spare request keeps, in its strings and lists: a
/// gateway's signed check needs a few hundred bytes. A stream that once
/// sent a request of megabytes does not hold their room while it is open.
const SPARE_ROOM: usize = 16 * 1024;

impl Messages {
    pub fn new(body: Body, limit: usize) -> Self {
        Self {
            body,
            received: VecDeque::new(),
            len: 0,
            limit,
            announced: None,
            done: false,
            spare: CheckRequest::default(),
        }
    }

    /// The next whole message, `None` until it has all arrived; an error
    /// for a prefix tonic's decoder refuses, with its words. A prefix is
    /// taken as soon as it has arrived, as tonic's decoder takes it: what
    /// is left when the body ends is what counts as cut short.
    fn next_message(&mut self) -> Result<Option<Bytes>, Status> {
        let len = match self.announced {
            Some(len) => len,
            None => {
                if self.len < PREFIX {
                    return Ok(None);
                }
                let prefix = self.take(PREFIX);
                let &[flag, a, b, c, d] = prefix.first_chunk::<PREFIX>().expect("a whole prefix");
                match flag {
                    0 => {}
                    // Compressed messages come only on a stream that said
                    // so in `grpc-encoding`, which is tonic's to refuse.
                    1 => {
                        return Err(Status::internal(
                            "protocol error: received message with compressed-flag but no grpc-encoding was specified",
                        ));
                    }
                    f => {
                        return Err(Status::internal(format!(
                            "protocol error: received message with invalid compression flag: {f} (valid flags are 0 and 1), while sending request"
                        )));
                    }
                }
                let len = u32::from_be_bytes([a, b, c, d]) as usize;
                if len > self.limit {
                    return Err(Status::out_of_range(format!(
                        "Error, decoded message length too large: found {len} bytes, the limit is: {} bytes",
                        self.limit
                    )));
                }
                self.announced = Some(len);
                len
            }
        };
        if self.len < len {
            return Ok(None);
        }
        self.announced = None;
        Ok(Some(self.take(len)))
    }

    /// Takes the first `n` bytes received (at most `self.len`): a slice of
    /// the frame they came in when they lie in one.
    fn take(&mut self, n: usize) -> Bytes {
        if n == 0 {
            return Bytes::new();
        }
        self.len -= n;
        let front = self
            .received
            .front_mut()
            .expect("taken no more than received");
        if front.len() >= n {
            let taken = front.split_to(n);
            if front.is_empty() {
                self.received.pop_front();
            }
            return taken;
        }
        let mut gathered = BytesMut::with_capacity(n);
        while gathered.len() < n {
            let front = self
                .received
                .front_mut()
                .expect("taken no more than received");
            let k = front.len().min(n - gathered.len());
            gathered.put_slice(&front[..k]);
            front.advance(k);
            if front.is_empty() {
                self.received.pop_front();
            }
        }
        gathered.freeze()
    }
}

impl futures_util::Stream for Messages {
    type Item = Result<CheckRequest, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.next_message() {
                // A message that does not decode is answered in-band, as
                // warden's codec answers it on tonic's path.
                Ok(Some(message)) => {
                    let spare = std::mem::take(&mut this.spare);
                    return Poll::Ready(Some(Ok(decode_check_request_into(spare, message))));
                }
                Ok(None) => {}
                Err(status) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(status)));
                }
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if !data.is_empty() {
                            this.len += data.len();
                            this.received.push_back(data);
                        }
                    }
                    // Trailers end a request stream; tonic's decoder
                    // drops what came before them of an unfinished message.
                    Err(_) => this.done = true,
                },
                // A client that cancels ends its stream.
                Some(Err(status)) if status.code() == Code::Cancelled => this.done = true,
                Some(Err(status)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(status)));
                }
                None => {
                    this.done = true;
                    if this.len > 0 {
                        return Poll::Ready(Some(Err(Status::internal(
                            "Unexpected EOF decoding stream.",
                        ))));
                    }
                }
            }
        }
    }
}

impl Requests for Messages {
    fn give_back(&mut self, mut request: CheckRequest) {
        if room(&request) <= SPARE_ROOM {
            // Emptied now, not at the next decode: its `body` is a slice of
            // the frame it came in, which an idle stream must not hold
            // (nor keep h2 from reusing its read buffer), and its limits'
            // and headers' strings go.
            request.clear();
            self.spare = request;
        }
    }
}

/// The room `request` holds in its strings and lists, in bytes (its `body`
/// is a slice of a frame, not room of its own).
fn room(request: &CheckRequest) -> usize {
    let CheckRequest {
        key_id,
        method,
        path,
        query,
        body: _,
        body_sha256,
        scheme,
        timestamp: _,
        nonce,
        signature,
        limits,
        cost: _,
        dry_run: _,
        request_id,
        client_identity,
        api_key,
        client_address,
        headers,
    } = request;
    let strings = [
        key_id,
        method,
        path,
        query,
        scheme,
        nonce,
        signature,
        request_id,
        client_identity,
        api_key,
        client_address,
    ];
    let limits = limits.capacity() * std::mem::size_of::<warden_client::proto::LimitRequest>()
        + limits
            .iter()
            .map(|l| l.policy.capacity() + l.descriptor.capacity())
            .sum::<usize>();
    let headers = headers.capacity() * std::mem::size_of::<(String, String)>()
        + headers
            .iter()
            .map(|(k, v)| k.capacity() + v.capacity())
            .sum::<usize>();
    strings.iter().map(|s| s.capacity()).sum::<usize>() + body_sha256.capacity() + limits + headers
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use http_body::Frame;
    use proptest::prelude::*;
    use prost::Message;
    use tonic::Streaming;

    use super::*;

    /// The largest message in these tests: small, so that it is crossed.
    const LIMIT: usize = 300;

    /// What comes of a body: each request, or the error that ended it.
    type Read = Vec<Result<CheckRequest, (Code, String)>>;

    /// A body of these frames, then its end.
    fn body(frames: Vec<Result<Frame<Bytes>, Status>>) -> Body {
        Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
    }

    /// Every request, up to and with the first error: a stream's answers
    /// end there (`OpenStream`), and tonic's decoder, polled again, may
    /// give the same error without end. Each request is given back once
    /// read, as `OpenStream` gives back each it answers.
    fn read_all<S: Requests>(mut stream: S) -> Read {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut read = Vec::new();
            while let Some(r) = stream.next().await {
                let failed = r.is_err();
                read.push(r.clone().map_err(|s| (s.code(), s.message().to_owned())));
                if let Ok(request) = r {
                    stream.give_back(request);
                }
                if failed {
                    break;
                }
            }
            read
        })
    }

    fn framed(flag: u8, len: u32, message: &[u8]) -> Vec<u8> {
        let mut framed = vec![flag];
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(message);
        framed
    }

    /// One message as a client might send it, or might get it wrong.
    #[derive(Clone, Debug)]
    enum Sent {
        /// A request that decodes.
        Request { key_id: String, body: Vec<u8> },
        /// Bytes that may not decode (answered in-band as malformed).
        Junk(Vec<u8>),
        /// A prefix with a flag other than 0.
        Flag(u8),
        /// A prefix announcing more than the limit.
        TooLarge,
    }

    fn sent() -> impl Strategy<Value = Sent> {
        prop_oneof![
            6 => ("[a-z_]{0,12}", prop::collection::vec(any::<u8>(), 0..400))
                .prop_map(|(key_id, body)| Sent::Request { key_id, body }),
            2 => prop::collection::vec(any::<u8>(), 0..40).prop_map(Sent::Junk),
            // An empty message is a request of every field left out.
            1 => Just(Sent::Junk(Vec::new())),
            1 => (1u8..=255).prop_map(Sent::Flag),
            1 => Just(Sent::TooLarge),
        ]
    }

    /// How the body ends.
    #[derive(Clone, Debug)]
    enum End {
        Clean,
        /// Its last `n` bytes never came.
        Cut(usize),
        Trailers,
        Failed,
        Cancelled,
    }

    fn end() -> impl Strategy<Value = End> {
        prop_oneof![
            4 => Just(End::Clean),
            2 => (1usize..400).prop_map(End::Cut),
            1 => Just(End::Trailers),
            1 => Just(End::Failed),
            1 => Just(End::Cancelled),
        ]
    }

    /// The bytes of the messages, split into frames at `cuts` (positions
    /// as fractions of the whole), then the end.
    fn frames(messages: &[Sent], cuts: &[f64], end: &End) -> Vec<Result<Frame<Bytes>, Status>> {
        let mut bytes = Vec::new();
        for m in messages {
            bytes.extend(match m {
                Sent::Request { key_id, body } => {
                    let request = CheckRequest {
                        key_id: key_id.clone(),
                        body: body.clone().into(),
                        ..CheckRequest::default()
                    };
                    let encoded = request.encode_to_vec();
                    framed(0, encoded.len() as u32, &encoded)
                }
                Sent::Junk(junk) => framed(0, junk.len() as u32, junk),
                Sent::Flag(flag) => framed(*flag, 3, b"abc"),
                Sent::TooLarge => framed(0, LIMIT as u32 + 1, &[0; 8]),
            });
        }
        if let End::Cut(n) = end {
            bytes.truncate(bytes.len().saturating_sub(*n));
        }
        let mut at: Vec<usize> = cuts
            .iter()
            .map(|c| (c * bytes.len() as f64) as usize)
            .collect();
        at.sort_unstable();
        let bytes = Bytes::from(bytes);
        let mut frames = Vec::new();
        let mut from = 0;
        for to in at.into_iter().chain([bytes.len()]) {
            frames.push(Ok(Frame::data(bytes.slice(from..to))));
            from = to;
        }
        match end {
            End::Trailers => frames.push(Ok(Frame::trailers(http::HeaderMap::new()))),
            End::Failed => frames.push(Err(Status::internal("the body failed"))),
            End::Cancelled => frames.push(Err(Status::cancelled("the client went away"))),
            End::Clean | End::Cut(_) => {}
        }
        frames
    }

    proptest! {
        /// Whatever a client sends, split into frames anywhere: the same
        /// requests, in the same order, and the same error, as tonic's
        /// decoder (with warden's codec) reads from it.
        #[test]
        fn reads_every_body_as_tonics_decoder_reads_it(
            messages in prop::collection::vec(sent(), 0..8),
            cuts in prop::collection::vec(0.0f64..1.0, 0..12),
            end in end(),
        ) {
            let ours = read_all(Messages::new(body(frames(&messages, &cuts, &end)), LIMIT));
            let tonics = read_all(Streaming::<CheckRequest>::new_request(
                Codec::<CheckResponse, CheckRequest>::default().decoder(),
                body(frames(&messages, &cuts, &end)),
                None,
                Some(LIMIT),
            ));
            prop_assert_eq!(ours, tonics);
        }
    }

    #[test]
    fn a_spare_request_keeps_no_more_room_than_a_gateways_check_needs() {
        let mut messages = Messages::new(body(Vec::new()), LIMIT);
        let frame = Bytes::from(vec![7; 200]);
        let check = CheckRequest {
            key_id: "gateway-key".into(),
            body: frame.slice(10..110),
            nonce: "n".repeat(64),
            signature: "0".repeat(64),
            ..CheckRequest::default()
        };
        messages.give_back(check);
        assert_eq!(messages.spare, CheckRequest::default(), "kept empty");
        assert!(frame.is_unique(), "the frame its body came in is let go");
        let kept =
            |m: &Messages| m.spare.nonce.capacity() >= 64 && m.spare.signature.capacity() >= 64;
        assert!(kept(&messages), "a check's room is kept");
        let large = CheckRequest {
            path: "/".repeat(SPARE_ROOM + 1),
            ..CheckRequest::default()
        };
        messages.give_back(large);
        assert!(
            messages.spare.path.capacity() <= SPARE_ROOM,
            "the large request was not kept"
        );
        assert!(kept(&messages));
        let many_headers = CheckRequest {
            headers: (0..1000)
                .map(|i| (format!("h{i}"), "v".repeat(20)))
                .collect(),
            ..CheckRequest::default()
        };
        messages.give_back(many_headers);
        assert!(
            messages.spare.headers.capacity() < 1000,
            "nor the one of many headers"
        );
        assert!(kept(&messages));
    }

    #[test]
    fn a_message_within_one_frame_is_a_slice_of_it_not_a_copy() {
        let request = CheckRequest {
            key_id: "k".into(),
            body: vec![7; 200].into(),
            ..CheckRequest::default()
        };
        let encoded = request.encode_to_vec();
        let mut frame = framed(0, encoded.len() as u32, &encoded);
        frame.extend(framed(0, encoded.len() as u32, &encoded));
        let frame = Bytes::from(frame);
        let within = frame.as_ptr_range();
        let read = read_all(Messages::new(
            body(vec![Ok(Frame::data(frame.clone()))]),
            LIMIT,
        ));
        assert_eq!(read.len(), 2);
        for r in read {
            let r = r.unwrap();
            assert_eq!(r, request);
            assert!(within.contains(&r.body.as_ptr()), "the body was copied");
        }
    }
}
