//! The unary calls made once per request (warden's `Check`, Envoy's
//! ext_authz `Check` and `ShouldRateLimit`) read, answered and written
//! without tonic's generic unary machinery.
//!
//! Every request of a gateway or an app is one unary `Check`, and under
//! h2load (one connection, 64 calls in flight) the server spent about 13 µs
//! of CPU per call, against about 8 µs for the same connection answering a
//! fixed message through the same stack. Of the difference, the check
//! itself is about 2 µs; the rest was tonic's way of serving any unary
//! method: a decoder and an encoder with an 8 KiB buffer each, the request
//! copied into one and the answer into the other, a stream of one message
//! on each side, and the handler's future boxed inside a boxed future.
//!
//! [`Unary`] reads such a call's one message itself. When the request is
//! the usual one (one uncompressed message within the size limit, the body
//! ended, no trailers, a message that decodes), it decodes it from the
//! frame it arrived in (a `bytes` field is a slice of that frame), runs the
//! method's handler, the one tonic's generated service calls too, and
//! writes the answer as tonic would: the same headers, the same message,
//! the same trailers, and a refusal as the same trailers-only response.
//! Any other request (compressed, split over trailers, too large, empty,
//! more than one message, undecodable) is handed, with what was read of
//! it, to tonic's generated service, which answers it as it always did.
//! `CheckStream` is read by [`super::stream`]; every other method goes to
//! tonic untouched.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use http_body_util::BodyExt;
use prost::Message;
use smallvec::SmallVec;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

use crate::request_wait::PREFIX;

/// A unary method warden reads and answers itself: its path, how its
/// message is decoded, and its handler (the one its generated service
/// calls).
pub trait UnaryMethod: Send + Sync + 'static {
    type Request: Message + Default + Send + 'static;
    type Response: Message + 'static;
    /// `/<service>/<method>`.
    const PATH: &'static str;
    /// The call's message, or `None` to hand the call to the generated
    /// service, which answers an undecodable message as it always did.
    fn decode(message: Bytes) -> Option<Self::Request> {
        Self::Request::decode(message).ok()
    }
    fn answer(
        &self,
        request: tonic::Request<Self::Request>,
    ) -> impl Future<Output = Result<tonic::Response<Self::Response>, Status>> + Send;
}

/// A generated service `G`, with calls to `M::PATH` answered by [`answer`]
/// and every other call by `G`.
pub struct Unary<M, G> {
    method: Arc<M>,
    generic: G,
    /// The largest message accepted, as `G`'s `max_decoding_message_size`.
    limit: usize,
}

impl<M, G: Clone> Clone for Unary<M, G> {
    fn clone(&self) -> Self {
        Self {
            method: self.method.clone(),
            generic: self.generic.clone(),
            limit: self.limit,
        }
    }
}

impl<M, G> Unary<M, G> {
    /// `generic` must be built on the same handler as `method`, with
    /// `limit` as its `max_decoding_message_size`.
    pub fn new(method: Arc<M>, generic: G, limit: usize) -> Self {
        Self {
            method,
            generic,
            limit,
        }
    }
}

impl<M, G: NamedService> NamedService for Unary<M, G> {
    const NAME: &'static str = G::NAME;
}

impl<M, G> Service<Request<Body>> for Unary<M, G>
where
    M: UnaryMethod,
    G: Service<
            Request<Body>,
            Response = Response<Body>,
            Error = Infallible,
            Future = BoxFuture<Response<Body>, Infallible>,
        > + Clone
        + Send
        + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Response<Body>, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // As tonic's generated services, which are always ready (so is the
        // clone `answer` hands an unusual call to).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if request.uri().path() != M::PATH || !uncompressed(request.headers()) {
            return self.generic.call(request);
        }
        Box::pin(answer(
            self.method.clone(),
            self.generic.clone(),
            self.limit,
            request,
        ))
    }
}

/// Whether the request's messages are sent as they are (no `grpc-encoding`,
/// or `identity`); warden accepts no compression, and tonic answers a
/// compressed request with UNIMPLEMENTED.
pub(super) fn uncompressed(headers: &HeaderMap) -> bool {
    headers
        .get("grpc-encoding")
        .is_none_or(|encoding| encoding == "identity")
}

/// Reads the call's body, and answers it here when it is one plain message,
/// or hands it to tonic's service with what was read.
async fn answer<M: UnaryMethod, G>(
    method: Arc<M>,
    mut generic: G,
    limit: usize,
    request: Request<Body>,
) -> Result<Response<Body>, Infallible>
where
    G: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    let (parts, mut body) = request.into_parts();
    // Read until the body ends, a frame other than data comes (trailers),
    // or more has come than one message within the limit can be: memory
    // stays bounded by the limit and a frame, as in tonic's decoder.
    let mut read: SmallVec<[Frame<Bytes>; 2]> = SmallVec::new();
    let mut bytes = 0;
    let ended = loop {
        match body.frame().await {
            None => break true,
            // As tonic's decoder answers a body that failed.
            Some(Err(status)) => return Ok(status.into_http()),
            Some(Ok(frame)) => {
                let data = frame.data_ref().map(Bytes::len);
                read.push(frame);
                match data {
                    Some(len) => bytes += len,
                    None => break false,
                }
                if bytes > PREFIX + limit {
                    break false;
                }
            }
        }
    };
    let message = ended
        .then(|| one_message(&read, limit))
        .flatten()
        .and_then(M::decode);
    let Some(message) = message else {
        let rest = if ended { None } else { Some(body) };
        let request = Request::from_parts(parts, Body::new(Replay { read, rest }));
        return Ok(generic
            .call(request)
            .await
            .unwrap_or_else(|never| match never {}));
    };
    let request = tonic::Request::from_http(Request::from_parts(parts, message));
    Ok(match method.answer(request).await {
        Ok(response) => ok(response),
        Err(status) => status.into_http(),
    })
}

/// The message of a body that is exactly one uncompressed gRPC message of
/// at most `limit` bytes; `None` for anything else.
fn one_message(read: &[Frame<Bytes>], limit: usize) -> Option<Bytes> {
    let mut data = read
        .iter()
        .filter_map(Frame::data_ref)
        .filter(|d| !d.is_empty());
    let whole = match (data.next(), data.next()) {
        (None, _) => return None,
        // The usual case: the message in one frame, sliced, not copied.
        (Some(only), None) => only.clone(),
        (Some(first), Some(second)) => {
            let mut whole = BytesMut::from(&first[..]);
            whole.extend_from_slice(second);
            data.for_each(|d| whole.extend_from_slice(d));
            whole.freeze()
        }
    };
    let (&[flag, a, b, c, d], message) = whole.split_first_chunk::<PREFIX>()?;
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    (flag == 0 && len <= limit && message.len() == len).then(|| whole.slice(PREFIX..))
}

/// The answer as tonic writes a unary call's: the handler's metadata (none
/// of gRPC's own headers), `content-type: application/grpc`, the message,
/// then the trailer `grpc-status: 0`.
fn ok<T: Message>(response: tonic::Response<T>) -> Response<Body> {
    let (metadata, response, _) = response.into_parts();
    let len = response.encoded_len();
    let mut message = BytesMut::with_capacity(PREFIX + len);
    message.put_u8(0);
    // An answer is a few KiB at most (its messages are bounded).
    message.put_u32(u32::try_from(len).expect("an answer under 4 GiB"));
    response.encode_raw(&mut message);
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert(Status::GRPC_STATUS, HeaderValue::from_static("0"));
    let mut answer = Response::new(Body::new(OneMessage {
        message: Some(message.freeze()),
        trailers: Some(trailers),
    }));
    let headers = answer.headers_mut();
    if !metadata.is_empty() {
        *headers = metadata.into_headers();
        for reserved in ["te", "grpc-message", "grpc-message-type", "grpc-status"] {
            headers.remove(reserved);
        }
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    answer
}

/// A response body of one message and its trailers.
struct OneMessage {
    message: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl http_body::Body for OneMessage {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let frame = match self.message.take() {
            Some(message) => Some(Frame::data(message)),
            None => self.trailers.take().map(Frame::trailers),
        };
        Poll::Ready(frame.map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.message.is_none() && self.trailers.is_none()
    }
}

/// A request body handed on: the frames already read, then the rest.
struct Replay {
    read: SmallVec<[Frame<Bytes>; 2]>,
    rest: Option<Body>,
}

impl http_body::Body for Replay {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if !self.read.is_empty() {
            return Poll::Ready(Some(Ok(self.read.remove(0))));
        }
        match &mut self.rest {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.rest.as_ref().is_none_or(|rest| rest.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use warden_client::proto::CheckResponse;

    fn framed(flag: u8, message: &[u8]) -> Bytes {
        let mut framed = BytesMut::new();
        framed.put_u8(flag);
        framed.put_u32(message.len() as u32);
        framed.put_slice(message);
        framed.freeze()
    }

    fn data(bytes: Bytes) -> Frame<Bytes> {
        Frame::data(bytes)
    }

    /// A method no call reaches here: every body below is handed on.
    struct Unreached;

    impl UnaryMethod for Unreached {
        type Request = ();
        type Response = ();
        const PATH: &'static str = "/t.T/M";
        async fn answer(&self, _: tonic::Request<()>) -> Result<tonic::Response<()>, Status> {
            Err(Status::internal("not to be answered here"))
        }
    }

    /// A body of `frames` data frames of 4 KiB, counting the polls.
    struct Counted {
        frames: usize,
        polled: Arc<AtomicUsize>,
    }

    impl http_body::Body for Counted {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            let before = self.polled.fetch_add(1, Ordering::SeqCst);
            let frame = (before < self.frames).then(|| Ok(Frame::data(Bytes::from(vec![0; 4096]))));
            Poll::Ready(frame)
        }
    }

    /// Stands in for tonic's generated service: notes how many frames had
    /// been read when the call was handed to it, then reads the whole body
    /// and answers with how many bytes it got (`x-read`).
    #[derive(Clone)]
    struct ReadsAll {
        polled: Arc<AtomicUsize>,
        polled_when_handed: Arc<AtomicUsize>,
    }

    impl Service<Request<Body>> for ReadsAll {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = BoxFuture<Response<Body>, Infallible>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<Body>) -> Self::Future {
            let polled = self.polled.load(Ordering::SeqCst);
            self.polled_when_handed.store(polled, Ordering::SeqCst);
            Box::pin(async move {
                let body = request.into_body().collect().await.unwrap().to_bytes();
                let mut answer = Response::new(Body::empty());
                let read = HeaderValue::from(body.len());
                answer.headers_mut().insert("x-read", read);
                Ok(answer)
            })
        }
    }

    /// A body far past the limit (4 MiB against 64 KiB) is read only until
    /// it is past what one message within the limit can be, then handed on
    /// whole: what warden holds of a call's body is bounded by the limit
    /// and a frame, whatever the client sends. Fails if the reader reads on
    /// to the end (1,024 frames), or drops the rest.
    #[tokio::test]
    async fn a_body_past_the_limit_is_read_no_further_than_the_limit_and_a_frame() {
        let polled = Arc::new(AtomicUsize::new(0));
        let generic = ReadsAll {
            polled: polled.clone(),
            polled_when_handed: Arc::new(AtomicUsize::new(0)),
        };
        let body = Counted {
            frames: 1024,
            polled,
        };
        let request = Request::builder()
            .uri(Unreached::PATH)
            .body(Body::new(body))
            .unwrap();
        let answer = answer(Arc::new(Unreached), generic.clone(), 64 * 1024, request)
            .await
            .unwrap();
        // 17 frames of 4 KiB are the first past 5 bytes + 64 KiB.
        assert_eq!(generic.polled_when_handed.load(Ordering::SeqCst), 17);
        assert_eq!(answer.headers()["x-read"], HeaderValue::from(1024 * 4096));
    }

    #[test]
    fn an_answer_carries_the_handlers_metadata_but_never_grpcs_own_headers() {
        let mut response = tonic::Response::new(CheckResponse {
            message: "m".into(),
            ..Default::default()
        });
        let metadata = response.metadata_mut();
        metadata.insert("x-served-by", "warden".parse().unwrap());
        // A handler cannot forge the call's status or framing through them.
        metadata.insert("grpc-status", "5".parse().unwrap());
        metadata.insert("grpc-message", "forged".parse().unwrap());
        metadata.insert("content-type", "text/plain".parse().unwrap());
        let answer = ok(response);
        let headers = answer.headers();
        assert_eq!(headers["x-served-by"], "warden");
        assert_eq!(headers["content-type"], "application/grpc");
        assert!(headers.get("grpc-status").is_none(), "{headers:?}");
        assert!(headers.get("grpc-message").is_none(), "{headers:?}");
        assert_eq!(headers.len(), 2, "{headers:?}");
    }

    #[test]
    fn an_answer_without_metadata_has_only_its_content_type() {
        let answer = ok(tonic::Response::new(CheckResponse::default()));
        assert_eq!(answer.headers().len(), 1);
        assert_eq!(answer.headers()["content-type"], "application/grpc");
    }

    #[test]
    fn one_message_in_one_frame_is_sliced_from_it_not_copied() {
        let frame = framed(0, b"0123456789");
        let message = one_message(&[data(frame.clone())], 10).unwrap();
        assert_eq!(&message[..], b"0123456789");
        assert_eq!(message.as_ptr(), frame[PREFIX..].as_ptr());
    }

    #[test]
    fn one_message_over_several_frames_is_put_together() {
        let frame = framed(0, b"0123456789");
        let frames = [
            data(frame.slice(..3)),
            data(Bytes::new()),
            data(frame.slice(3..9)),
            data(frame.slice(9..)),
        ];
        assert_eq!(&one_message(&frames, 10).unwrap()[..], b"0123456789");
    }

    #[test]
    fn anything_but_one_whole_plain_message_within_the_limit_is_not_one_message() {
        let message = b"0123456789";
        let whole = framed(0, message);
        let mut two = BytesMut::from(&whole[..]);
        two.extend_from_slice(&whole);
        for (what, frames, limit) in [
            ("no data", vec![], 10),
            ("empty data", vec![data(Bytes::new())], 10),
            ("a prefix cut short", vec![data(whole.slice(..4))], 10),
            ("compressed", vec![data(framed(1, message))], 10),
            ("an unknown flag", vec![data(framed(2, message))], 10),
            ("over the limit", vec![data(whole.clone())], 9),
            ("cut short", vec![data(whole.slice(..whole.len() - 1))], 10),
            ("two messages", vec![data(two.freeze())], 100),
            (
                "a byte past the message",
                vec![data(whole.clone()), data(Bytes::from_static(b"x"))],
                100,
            ),
        ] {
            assert_eq!(one_message(&frames, limit), None, "{what}");
        }
        // An empty message is one message (a request with every field at
        // its default), as tonic decodes it.
        assert_eq!(one_message(&[data(framed(0, b""))], 10), Some(Bytes::new()));
    }

    /// Each unary call boxes this future and moves it in whole. With the
    /// check's own future inside it (the request, the pipeline's state,
    /// room for a cluster step) it was 3,688 bytes; a single node's check
    /// is now answered before `answer` awaits it (`Checked`).
    #[test]
    fn a_unary_calls_future_holds_no_check_pipeline() {
        use crate::service::warden::WardenService;
        use warden_client::proto::warden_server::WardenServer;
        fn size_of_output<F>(_: impl FnOnce() -> F) -> usize {
            std::mem::size_of::<F>()
        }
        fn never<T>() -> T {
            unreachable!("only the type is asked for")
        }
        let call = size_of_output(|| {
            answer::<WardenService, WardenServer<WardenService>>(never(), never(), 0, never())
        });
        assert!(call <= 1536, "a unary call's future is {call} bytes");
    }
}
