//! A connection reads a burst of requests a slice per turn, so the answers
//! to the first of them leave while the rest are being checked.
//!
//! A serving thread runs a connection's task (HTTP/2 framing) and the tasks
//! of its calls. Left alone, the connection's task reads everything the
//! socket holds before any call runs: a gateway that sends 64 requests at
//! once gets all 64 answers in one write, after the last one is checked,
//! and sends its next requests only then. The thread sits idle while the
//! gateway reads and writes, and the gateway while the thread checks. With
//! h2load's one connection and 64 calls in flight, measured: one sleep of
//! the serving thread per 64 calls, busy 82 % of the time.
//!
//! [`ReadInSlices`] makes each read cost a share of tokio's cooperative
//! budget, which the scheduler hands a task afresh each time it polls it.
//! Once a turn has read [`READS_PER_TURN`] slices of at most
//! [`SLICE_BYTES`], the next read returns `Pending` and tokio polls the
//! task again after the calls already woken have run; the answers they
//! finished go out on that turn while the gateway sends more. Measured
//! with h2load, one connection: 74–81k → 89–96k calls/s, the serving
//! thread busy all the time (`benches/HISTORY.md`, session 37).
//!
//! Writes are never charged: the budget a turn's reads spent must not hold
//! back the answers that turn would send. Nothing is dropped or reordered;
//! a slice only moves the rest of a burst to the next turn. Outside a tokio
//! task there is no budget, and reads are sliced by size only.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::coop;

/// The most one read takes.
pub const SLICE_BYTES: usize = 4 * 1024;

/// Reads a connection's task makes per turn, at most. Five slices of 4 KiB
/// are about 17 signed checks with 1 KiB bodies: small enough that a burst
/// of 64 is answered in four parts, large enough that a burst of 16 (one of
/// four connections with 64 calls in flight between them) is read in one
/// turn. Slices of 24 KiB or more per turn no longer let answers leave
/// early under h2load: the writes' [`Coalescing`] waits up to three turns
/// while answers keep coming.
///
/// [`Coalescing`]: warden_client::Coalescing
pub const READS_PER_TURN: u32 = 5;

/// tokio gives a task this much budget each time it polls it (tokio's
/// `Budget::initial`, not public). A read costs its share of it, less the
/// unit the socket's own read takes.
const TOKIO_BUDGET: u32 = 128;
const UNITS_PER_READ: u32 = TOKIO_BUDGET / READS_PER_TURN - 1;

/// A byte stream whose reads are sliced per turn (see the module's
/// documentation).
#[derive(Debug)]
pub struct ReadInSlices<S> {
    inner: S,
}

impl<S> ReadInSlices<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

/// Spends `units` of the task's budget; `Pending` (with the task woken for
/// its next turn) once it is spent.
fn spend(cx: &mut Context<'_>, units: u32) -> Poll<()> {
    for _ in 0..units {
        ready!(coop::poll_proceed(cx)).made_progress();
    }
    Poll::Ready(())
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadInSlices<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let inner = &mut self.get_mut().inner;
        ready!(spend(cx, UNITS_PER_READ));
        if buf.remaining() <= SLICE_BYTES {
            return Pin::new(inner).poll_read(cx, buf);
        }
        // Into this thread's slice, then copied: hyper hands over memory not
        // yet written, and a slice of it would have to be zeroed first, 4
        // KiB on every read, most of which find nothing and return Pending
        // (unsafe code, forbidden here, could skip it). A copy costs only
        // what a read brings.
        SCRATCH.with_borrow_mut(|scratch| {
            let mut slice = ReadBuf::new(scratch);
            let polled = Pin::new(inner).poll_read(cx, &mut slice);
            buf.put_slice(slice.filled());
            polled
        })
    }
}

thread_local! {
    /// Where a slice is read before it is copied to the caller's buffer:
    /// one per thread, written by one read at a time (a read never reads
    /// again from within).
    static SCRATCH: std::cell::RefCell<[u8; SLICE_BYTES]> =
        const { std::cell::RefCell::new([0; SLICE_BYTES]) };
}

/// Polls `f` with no budget to spend, as tokio's `unconstrained` does.
fn uncharged<T>(cx: &mut Context<'_>, f: impl FnMut(&mut Context<'_>) -> Poll<T>) -> Poll<T> {
    std::pin::pin!(coop::unconstrained(std::future::poll_fn(f))).poll(cx)
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadInSlices<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let inner = &mut self.get_mut().inner;
        uncharged(cx, |cx| Pin::new(&mut *inner).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let inner = &mut self.get_mut().inner;
        uncharged(cx, |cx| Pin::new(&mut *inner).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let inner = &mut self.get_mut().inner;
        uncharged(cx, |cx| Pin::new(&mut *inner).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let inner = &mut self.get_mut().inner;
        uncharged(cx, |cx| Pin::new(&mut *inner).poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    const BURST: usize = 100 * 1024;

    fn burst() -> Vec<u8> {
        (0..BURST).map(|i| (i % 251) as u8).collect()
    }

    /// A connection whose peer sent a burst and closed: what it sent.
    async fn a_burst_sent_and_closed() -> (ReadInSlices<DuplexStream>, Vec<u8>) {
        let (mut peer, conn) = tokio::io::duplex(2 * BURST);
        let sent = burst();
        peer.write_all(&sent).await.unwrap();
        (ReadInSlices::new(conn), sent)
    }

    /// Reads what one turn of the task may read: until a read is `Pending`.
    fn read_one_turn(
        conn: &mut ReadInSlices<DuplexStream>,
        cx: &mut Context<'_>,
        into: &mut Vec<u8>,
    ) -> usize {
        let mut got = 0;
        loop {
            let mut space = vec![0u8; 64 * 1024];
            let mut buf = ReadBuf::new(&mut space);
            match Pin::new(&mut *conn).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return got,
                Poll::Ready(Ok(())) => {
                    got += buf.filled().len();
                    into.extend_from_slice(buf.filled());
                }
                Poll::Ready(Err(e)) => panic!("read failed: {e}"),
                Poll::Pending => return got,
            }
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_turn_reads_at_most_its_slices_and_the_next_turn_goes_on_where_it_stopped() {
        let (mut conn, sent) = a_burst_sent_and_closed().await;

        let mut received = Vec::new();
        let mut turns = Vec::new();
        while received.len() < BURST {
            let read =
                std::future::poll_fn(|cx| Poll::Ready(read_one_turn(&mut conn, cx, &mut received)))
                    .await;
            turns.push(read);
            // The next turn, as the scheduler would give it.
            tokio::task::yield_now().await;
            assert!(turns.len() < 1000, "no progress: {turns:?}");
        }
        let per_turn = SLICE_BYTES * READS_PER_TURN as usize;
        assert!(
            turns.iter().all(|&t| t <= per_turn),
            "a turn read more than {per_turn} bytes: {turns:?}"
        );
        assert!(turns.len() >= BURST / per_turn, "{turns:?}");
        assert_eq!(received, sent, "every byte, in order, once");
    }

    /// hyper reads into memory not yet written (`ReadBuf::uninit`): a
    /// sliced read hands back exactly the bytes that arrived, in order,
    /// and marks no more than those as filled.
    #[tokio::test(flavor = "current_thread")]
    async fn a_read_into_unwritten_memory_gets_every_byte_and_only_those() {
        let (mut conn, sent) = a_burst_sent_and_closed().await;

        let mut received = Vec::new();
        loop {
            let mut space = [std::mem::MaybeUninit::<u8>::uninit(); 16 * 1024];
            let mut buf = ReadBuf::uninit(&mut space);
            std::future::poll_fn(|cx| Pin::new(&mut conn).poll_read(cx, &mut buf))
                .await
                .unwrap();
            let read = buf.filled().len();
            assert!(read <= SLICE_BYTES, "a read took {read} bytes");
            assert_eq!(
                buf.initialized().len(),
                read,
                "only what arrived is written"
            );
            if read == 0 {
                break;
            }
            received.extend_from_slice(buf.filled());
        }
        assert_eq!(received, sent, "every byte, in order, once");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_write_goes_out_on_a_turn_whose_reads_spent_the_budget() {
        let (mut peer, conn) = tokio::io::duplex(2 * BURST);
        let mut conn = ReadInSlices::new(conn);
        peer.write_all(&burst()).await.unwrap();

        let wrote = std::future::poll_fn(|cx| {
            let mut sink = Vec::new();
            read_one_turn(&mut conn, cx, &mut sink);
            // The reads are refused now; the answer is not.
            let mut buf = [0u8; 1];
            assert!(
                Pin::new(&mut conn)
                    .poll_read(cx, &mut ReadBuf::new(&mut buf))
                    .is_pending()
            );
            let written = Pin::new(&mut conn).poll_write(cx, b"answer");
            let flushed = Pin::new(&mut conn).poll_flush(cx);
            Poll::Ready((written, flushed))
        })
        .await;
        assert!(matches!(wrote.0, Poll::Ready(Ok(6))), "{:?}", wrote.0);
        assert!(matches!(wrote.1, Poll::Ready(Ok(()))), "{:?}", wrote.1);
        let mut answer = [0u8; 6];
        peer.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"answer");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_read_into_a_small_buffer_is_not_sliced_further() {
        let (mut peer, conn) = tokio::io::duplex(1024);
        let mut conn = ReadInSlices::new(conn);
        peer.write_all(b"0123456789").await.unwrap();
        let mut small = [0u8; 4];
        conn.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"0123");
    }
}
