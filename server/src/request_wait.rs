//! How long, and with how much memory, warden waits for a request that has
//! begun to arrive.
//!
//! A call's request reaches warden as HTTP/2 DATA frames, and whatever
//! reads it (warden's unary reader, tonic's decoder) keeps what has come
//! until the message is whole: up to the largest message accepted, 1 MiB
//! and more. A client that sends most of a message and then nothing holds
//! that memory, and its call, for as long as its connection lives. With
//! 256 streams to a connection, one client could make warden hold about
//! 280 MiB per connection it opens. The bounds here end that:
//!
//! - **time**: a unary call's request must end, and a streamed call's
//!   message must be whole, within `[server] request_read_timeout` of the
//!   first time warden had to wait for more of it. A `CheckStream` waiting
//!   between messages is not waiting for a request, and is never cut.
//! - **memory**: what every call together holds of requests not yet whole,
//!   while warden waits for the rest, stays within `[server]
//!   max_waiting_request_bytes`. A call that would go past it is refused
//!   with `RESOURCE_EXHAUSTED`; calls whose requests come whole cost
//!   nothing here.
//!
//! A request that arrives whole before warden reads it (the usual check,
//! one frame) never waits: no timer is set and nothing is counted, so the
//! bounds cost the usual call nothing.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;
use tonic::Status;

/// The methods whose request is a stream of messages (client or
/// bidirectional streaming). Every other call's request is one message,
/// which must end in time. Pinned against the served protos by a test.
const STREAMED: [&str; 4] = [
    "/warden.v1.Warden/CheckStream",
    "/warden.v1.Peer/DecideStream",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// A gRPC message's prefix: a compressed flag and a 4-byte length.
pub const PREFIX: usize = 5;

/// What every call's waiting request shares: the two bounds, and the bytes
/// held against the memory bound right now.
#[derive(Debug)]
pub struct RequestWaits {
    timeout: Duration,
    max_bytes: usize,
    held: AtomicUsize,
}

impl RequestWaits {
    pub fn new(timeout: Duration, max_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            timeout,
            max_bytes,
            held: AtomicUsize::new(0),
        })
    }

    /// `body`, the request of a call to `path`, read within the bounds.
    pub fn bound<B>(self: &Arc<Self>, path: &str, body: B) -> Arriving<B> {
        Arriving {
            body,
            waits: self.clone(),
            streamed: STREAMED.contains(&path),
            message: Message::default(),
            held: 0,
            reserved: 0,
            timer: None,
            failed: false,
        }
    }

    /// Takes `bytes` more of the memory bound, or nothing if they do not fit.
    fn reserve(&self, bytes: usize) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes)
                    .filter(|&after| after <= self.max_bytes)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Bytes of requests held while warden waits for the rest (for tests).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

/// Where a streamed request is in its current message, so that only the
/// bytes of a message not yet whole count as held.
#[derive(Debug, Default)]
struct Message {
    prefix: [u8; PREFIX],
    /// Bytes of the prefix read so far (0: between messages).
    prefix_read: usize,
    /// Bytes of the message's payload still to come.
    remaining: usize,
    /// Bytes of this message read so far, its prefix included.
    read: usize,
}

impl Message {
    /// Follows `data` through the framing; returns whether a message was
    /// made whole by it (the bytes of the next one, if it began, are in
    /// `read`).
    fn advance(&mut self, mut data: &[u8]) -> bool {
        let mut completed = false;
        while !data.is_empty() {
            if self.prefix_read < PREFIX {
                let n = (PREFIX - self.prefix_read).min(data.len());
                self.prefix[self.prefix_read..self.prefix_read + n].copy_from_slice(&data[..n]);
                self.prefix_read += n;
                self.read += n;
                data = &data[n..];
                if self.prefix_read == PREFIX {
                    let [_, a, b, c, d] = self.prefix;
                    self.remaining = u32::from_be_bytes([a, b, c, d]) as usize;
                }
            } else {
                let n = self.remaining.min(data.len());
                self.remaining -= n;
                self.read += n;
                data = &data[n..];
            }
            if self.prefix_read == PREFIX && self.remaining == 0 {
                *self = Message::default();
                completed = true;
            }
        }
        completed
    }
}

/// A call's request body, read within [`RequestWaits`]' bounds. Past a
/// bound it yields one error (the call's answer) and then ends.
pub struct Arriving<B> {
    body: B,
    waits: Arc<RequestWaits>,
    /// A stream of messages, or one message that ends the request.
    streamed: bool,
    message: Message,
    /// Bytes the reader above holds of what is not yet whole: a unary
    /// call's whole request so far, a stream's current message.
    held: usize,
    /// Of the memory bound, what this call has taken.
    reserved: usize,
    /// Set the first time the reader had to wait for the part now coming.
    timer: Option<Pin<Box<Sleep>>>,
    failed: bool,
}

impl<B> Arriving<B> {
    fn give_back(&mut self) {
        if self.reserved > 0 {
            self.waits.release(self.reserved);
            self.reserved = 0;
        }
    }

    /// What the reader is told when a bound is passed; it answers the call
    /// with it, so it says which bound without naming anything internal.
    fn cut(
        &mut self,
        status: Status,
        cause: &'static str,
    ) -> Poll<Option<Result<Frame<B::Data>, Status>>>
    where
        B: Body,
    {
        metrics::counter!("warden_request_reads_cut_total", "cause" => cause).increment(1);
        self.failed = true;
        self.timer = None;
        self.give_back();
        Poll::Ready(Some(Err(status)))
    }
}

impl<B> Drop for Arriving<B> {
    fn drop(&mut self) {
        self.give_back();
    }
}

impl<B> Body for Arriving<B>
where
    B: Body + Unpin,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = B::Data;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, Status>>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let chunk = data.chunk();
                    // A Bytes frame is one chunk; anything else is counted
                    // by its length, as a unary request is.
                    if this.streamed && chunk.len() == data.remaining() {
                        if this.message.advance(chunk) {
                            // A message is whole: the reader has it. The
                            // next one, if it began, is waited for afresh.
                            this.timer = None;
                            this.give_back();
                        }
                        this.held = this.message.read;
                    } else {
                        this.held = this.held.saturating_add(data.remaining());
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.give_back();
                Poll::Ready(Some(Err(Status::from_error(e.into()))))
            }
            Poll::Ready(None) => {
                this.timer = None;
                this.give_back();
                Poll::Ready(None)
            }
            Poll::Pending => {
                // Between a stream's messages nothing is being waited for.
                if this.streamed && this.held == 0 {
                    return Poll::Pending;
                }
                if this.held > this.reserved {
                    if !this.waits.reserve(this.held - this.reserved) {
                        return this.cut(
                            Status::resource_exhausted(
                                "too many requests are arriving at once; retry",
                            ),
                            "memory",
                        );
                    }
                    this.reserved = this.held;
                }
                let timeout = this.waits.timeout;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if timer.as_mut().poll(cx).is_ready() {
                    return this.cut(
                        Status::deadline_exceeded(format!(
                            "the request did not arrive within {} (server.request_read_timeout)",
                            humantime::format_duration(timeout)
                        )),
                        "timeout",
                    );
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.failed {
            SizeHint::with_exact(0)
        } else {
            self.body.size_hint()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, Bytes, BytesMut};
    use http_body_util::BodyExt;
    use std::collections::VecDeque;
    use std::future::poll_fn;

    /// A body fed by the test: each poll takes the next step, `None` in the
    /// script being a wait (Pending) and the end of the script the end.
    struct Script {
        steps: VecDeque<Option<Bytes>>,
    }

    impl Body for Script {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            match self.steps.pop_front() {
                None => Poll::Ready(None),
                Some(Some(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
                Some(None) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
            }
        }
    }

    fn script(steps: impl IntoIterator<Item = Option<Bytes>>) -> Script {
        Script {
            steps: steps.into_iter().collect(),
        }
    }

    fn framed(message: &[u8]) -> Bytes {
        let mut framed = BytesMut::new();
        framed.put_u8(0);
        framed.put_u32(message.len() as u32);
        framed.put_slice(message);
        framed.freeze()
    }

    /// One poll of `body`, as its reader would make it.
    async fn poll_once<B: Body + Unpin>(
        body: &mut B,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await
    }

    /// Polls `body` once: it must give a frame of data.
    async fn reads<B: Body<Error = Status> + Unpin>(body: &mut B) {
        let polled = poll_once(body).await;
        assert!(matches!(polled, Poll::Ready(Some(Ok(_)))), "no frame read");
    }

    /// Polls `body` once: it must wait.
    async fn is_waited_for<B: Body<Error = Status> + Unpin>(body: &mut B) {
        assert!(poll_once(body).await.is_pending(), "did not wait");
    }

    fn code<D>(polled: Poll<Option<Result<Frame<D>, Status>>>) -> Option<tonic::Code> {
        match polled {
            Poll::Ready(Some(Err(status))) => Some(status.code()),
            _ => None,
        }
    }

    const UNARY: &str = "/warden.v1.Warden/Check";
    const STREAM: &str = "/warden.v1.Warden/CheckStream";

    /// The usual check: its one frame is there when it is read, so nothing
    /// is reserved and no timer is set, whatever the memory bound.
    #[tokio::test]
    async fn a_request_that_arrives_whole_costs_nothing_of_either_bound() {
        let waits = RequestWaits::new(Duration::from_secs(10), 0);
        let whole = framed(&[7; 1024]);
        let mut body = waits.bound(UNARY, script([Some(whole.clone())]));
        let read = (&mut body).collect().await.unwrap().to_bytes();
        assert_eq!(read, whole);
        assert!(body.timer.is_none());
        assert_eq!(waits.held(), 0);
    }

    /// A unary request cut short takes of the memory bound what it holds
    /// while it waits, gives it back when it ends, and one that would pass
    /// the bound is refused, with the others' share left as it was.
    #[tokio::test(start_paused = true)]
    async fn a_waiting_request_holds_its_bytes_against_the_bound_and_past_it_is_refused() {
        let waits = RequestWaits::new(Duration::from_secs(10), 1500);
        let part = Bytes::from(vec![0; 1000]);
        let mut first = waits.bound(UNARY, script([Some(part.clone()), None, None]));
        reads(&mut first).await;
        is_waited_for(&mut first).await;
        assert_eq!(waits.held(), 1000);
        let mut second = waits.bound(UNARY, script([Some(part.clone()), None]));
        reads(&mut second).await;
        assert_eq!(
            code(poll_once(&mut second).await),
            Some(tonic::Code::ResourceExhausted)
        );
        // Once refused, the call's request ends; the first still holds its own.
        assert!(matches!(poll_once(&mut second).await, Poll::Ready(None)));
        assert_eq!(waits.held(), 1000);
        drop(first);
        assert_eq!(waits.held(), 0, "a call dropped gives its bytes back");
    }

    /// A unary request that stops coming is cut at the timeout, counted
    /// from the first wait, however it drips: a frame now and then does
    /// not restart the clock.
    #[tokio::test(start_paused = true)]
    async fn a_request_that_drips_is_cut_at_the_timeout_from_its_first_wait() {
        let waits = RequestWaits::new(Duration::from_secs(10), 1 << 20);
        let mut steps = Vec::new();
        for _ in 0..100 {
            steps.push(Some(Bytes::from_static(b"x")));
            steps.push(None);
        }
        let mut body = waits.bound(UNARY, script(steps));
        let started = tokio::time::Instant::now();
        let mut cut = None;
        while cut.is_none() {
            match poll_once(&mut body).await {
                Poll::Pending => tokio::time::sleep(Duration::from_secs(1)).await,
                Poll::Ready(Some(Ok(_))) => {}
                polled => cut = Some(code(polled)),
            }
        }
        assert_eq!(cut, Some(Some(tonic::Code::DeadlineExceeded)));
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert_eq!(waits.held(), 0);
    }

    /// A request with no data at all that never ends is cut too: its call
    /// holds a stream, if not memory.
    #[tokio::test(start_paused = true)]
    async fn a_unary_request_that_never_starts_is_cut_at_the_timeout() {
        let waits = RequestWaits::new(Duration::from_secs(2), 1 << 20);
        let mut body = waits.bound(UNARY, script([None, None, None, None]));
        is_waited_for(&mut body).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            code(poll_once(&mut body).await),
            Some(tonic::Code::DeadlineExceeded)
        );
    }

    /// A stream between messages is idle, not late: it is never cut, and
    /// holds nothing. Inside a message it is held to the same bounds, and
    /// a message made whole gives its bytes back.
    #[tokio::test(start_paused = true)]
    async fn a_stream_is_bound_inside_a_message_and_free_between_them() {
        let waits = RequestWaits::new(Duration::from_secs(10), 1 << 20);
        let message = framed(&[1; 300]);
        let mut body = waits.bound(
            STREAM,
            script([
                Some(message.clone()),
                None,
                None,
                Some(message.slice(..100)),
                None,
                Some(message.slice(100..)),
                None,
                Some(message.slice(..3)),
                None,
                None,
            ]),
        );
        reads(&mut body).await;
        // A minute between messages: not cut.
        is_waited_for(&mut body).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        is_waited_for(&mut body).await;
        assert_eq!(waits.held(), 0);
        // Half a message, then a wait: held, and timed.
        reads(&mut body).await;
        is_waited_for(&mut body).await;
        assert_eq!(waits.held(), 100);
        assert!(body.timer.is_some());
        // The rest: whole again, given back.
        reads(&mut body).await;
        assert_eq!(waits.held(), 0);
        assert!(body.timer.is_none());
        is_waited_for(&mut body).await;
        // Three bytes of a prefix, then nothing: cut at the timeout.
        reads(&mut body).await;
        is_waited_for(&mut body).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(
            code(poll_once(&mut body).await),
            Some(tonic::Code::DeadlineExceeded)
        );
        assert_eq!(waits.held(), 0);
    }

    /// A message that began in the frame that ended the one before gets
    /// the whole timeout: the clock of the message before does not carry
    /// over to it.
    #[tokio::test(start_paused = true)]
    async fn each_message_of_a_stream_is_timed_from_its_own_first_wait() {
        let waits = RequestWaits::new(Duration::from_secs(10), 1 << 20);
        let message = framed(&[1; 300]);
        let mut end_and_start = BytesMut::from(&message[100..]);
        end_and_start.extend_from_slice(&message[..50]);
        let mut body = waits.bound(
            STREAM,
            script([
                Some(message.slice(..100)),
                None,
                Some(end_and_start.freeze()),
                None,
                None,
                None,
            ]),
        );
        reads(&mut body).await;
        is_waited_for(&mut body).await;
        // Nine of the first message's ten seconds, then its end and the
        // next one's start.
        tokio::time::sleep(Duration::from_secs(9)).await;
        reads(&mut body).await;
        is_waited_for(&mut body).await;
        assert_eq!(waits.held(), 50);
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(
            poll_once(&mut body).await.is_pending(),
            "cut by the clock of the message before"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            code(poll_once(&mut body).await),
            Some(tonic::Code::DeadlineExceeded)
        );
    }

    #[test]
    fn a_streams_framing_is_followed_across_frames_and_messages() {
        let mut message = Message::default();
        let a = framed(b"abc");
        let b = framed(b"");
        let mut two = BytesMut::from(&a[..]);
        two.extend_from_slice(&b);
        // Two whole messages (one empty) in one frame: between messages.
        assert!(message.advance(&two));
        assert_eq!(message.read, 0);
        // A prefix split over frames, then its payload.
        assert!(!message.advance(&a[..2]));
        assert!(!message.advance(&a[2..6]));
        assert_eq!(message.read, 6);
        assert!(message.advance(&a[6..]));
        assert_eq!(message.read, 0);
        // A message's end and the next one's start in one frame.
        let mut joined = BytesMut::from(&a[..]);
        joined.extend_from_slice(&a[..4]);
        assert!(message.advance(&joined));
        assert_eq!(message.read, 4);
    }

    /// Every method whose request is a stream is in `STREAMED`, and every
    /// method in it is one: a streamed method missing from it would have
    /// its open streams cut as late requests.
    #[test]
    fn streamed_is_exactly_the_served_methods_with_a_streamed_request() {
        use prost::Message as _;
        let mut streamed = Vec::new();
        for encoded in [
            warden_client::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ] {
            let set = prost_types::FileDescriptorSet::decode(encoded).unwrap();
            for file in set.file {
                for service in &file.service {
                    for method in &service.method {
                        if method.client_streaming() {
                            streamed.push(format!(
                                "/{}.{}/{}",
                                file.package(),
                                service.name(),
                                method.name()
                            ));
                        }
                    }
                }
            }
        }
        streamed.sort();
        let mut listed: Vec<_> = STREAMED.iter().map(|s| s.to_string()).collect();
        listed.sort();
        assert_eq!(streamed, listed);
    }
}
