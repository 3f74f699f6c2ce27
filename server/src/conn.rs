//! One accepted connection, as the server and the services share it: the
//! stream (mTLS, or plaintext on loopback when explicitly configured), who is
//! on the other end, its calls in flight, its idle timer, and its place in
//! its serving thread's count.
//!
//! The server and the serving threads accept and handshake; the services
//! read [`PeerInfo`] from each call. All depend on this module, it on none
//! of them.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;

use crate::gate::ConnectionSlot;
use crate::read_slices::ReadInSlices;

/// Milliseconds since this process first asked, on the monotonic clock.
pub fn monotonic_ms() -> u64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// How a connection whose peer vanished is found: the peer's host powered
/// off, or a partition between them, leaves nothing to close the
/// connection. The kernel's TCP keepalive probes a connection after
/// [`KEEPALIVE_IDLE`] without traffic, every [`KEEPALIVE_INTERVAL`] after
/// that, and drops it after [`KEEPALIVE_PROBES`] unanswered probes; data left
/// unacknowledged for [`UNACKNOWLEDGED_FOR`] drops it too (`TCP_USER_TIMEOUT`).
///
/// Until session 46 hyper's HTTP/2 pings did this for gRPC connections. The
/// pings' bookkeeping (a lock and a clock read per frame, a timer polled
/// with the connection) was 1.4 % of the server's samples under h2load.
/// The kernel's probes cost nothing per call, and cover the forward-auth
/// port too.
///
/// The pings also found a peer process that hangs while its host still
/// answers. Such a connection is now closed by `idle_timeout`, or, with
/// answers it has not read, when the process wakes or dies. Until then it
/// holds at most its connection's call limit, the bound that a client
/// that stops reading on purpose (and answers pings) always met.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_PROBES: u32 = 3;
pub const UNACKNOWLEDGED_FOR: Duration = Duration::from_secs(60);

/// Arms [`KEEPALIVE_IDLE`]'s probes on an accepted connection.
pub fn arm_keepalive(tcp: &TcpStream) -> io::Result<()> {
    use rustix::net::sockopt;
    sockopt::set_socket_keepalive(tcp, true)?;
    sockopt::set_tcp_keepidle(tcp, KEEPALIVE_IDLE)?;
    sockopt::set_tcp_keepintvl(tcp, KEEPALIVE_INTERVAL)?;
    sockopt::set_tcp_keepcnt(tcp, KEEPALIVE_PROBES)?;
    sockopt::set_tcp_user_timeout(tcp, UNACKNOWLEDGED_FOR.as_millis() as u32)?;
    Ok(())
}

/// Per-connection state the services share with the connection itself.
#[derive(Debug)]
pub struct ConnState {
    /// Calls in flight on this connection (see `Admission`).
    pub calls: Arc<Semaphore>,
    max_calls: usize,
    last_activity_ms: AtomicU64,
}

impl ConnState {
    pub fn new(max_calls: usize) -> Self {
        Self {
            calls: Arc::new(Semaphore::new(max_calls)),
            max_calls,
            last_activity_ms: AtomicU64::new(monotonic_ms()),
        }
    }

    /// Records that a call started or ended now.
    pub fn touch(&self) {
        self.last_activity_ms
            .store(monotonic_ms(), Ordering::Relaxed);
    }

    /// How long the connection has had no call in flight, if it has none.
    fn idle_for(&self) -> Option<Duration> {
        (self.calls.available_permits() == self.max_calls).then(|| {
            Duration::from_millis(
                monotonic_ms().saturating_sub(self.last_activity_ms.load(Ordering::Relaxed)),
            )
        })
    }
}

/// Held by an open connection: its place in its serving thread's count
/// (and in `warden_serving_thread_connections`).
#[derive(Debug)]
pub struct OpenOnLane {
    open: Arc<AtomicUsize>,
    thread: usize,
}

impl OpenOnLane {
    pub fn take(open: &Arc<AtomicUsize>, thread: usize) -> Self {
        let now = open.fetch_add(1, Ordering::Relaxed) + 1;
        connections_gauge(thread).set(now as f64);
        Self {
            open: open.clone(),
            thread,
        }
    }
}

impl Drop for OpenOnLane {
    fn drop(&mut self) {
        let now = self.open.fetch_sub(1, Ordering::Relaxed) - 1;
        connections_gauge(self.thread).set(now as f64);
    }
}

/// `warden_serving_thread_connections` of one serving thread.
pub fn connections_gauge(thread: usize) -> metrics::Gauge {
    metrics::gauge!("warden_serving_thread_connections", "thread" => thread.to_string())
}

/// What the services know about the connection a call came on.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// The verified client certificate's identity; `None` in plaintext mode
    /// or when the certificate carries no usable identity.
    pub identity: Option<Arc<str>>,
    pub conn: Arc<ConnState>,
}

pub enum Io {
    Tls(Box<TlsStream<TcpStream>>),
    Plain(TcpStream),
}

/// An accepted connection: mTLS, or plaintext on loopback when explicitly
/// configured. It closes itself after `idle_timeout` without calls (HTTP/2
/// pings do not count as activity). Its writes are [`Coalescing`]: answers
/// that finish together leave in one write (a fifth less server CPU per
/// call under load, measured with h2load). Its reads are [`ReadInSlices`]:
/// a burst of requests is read a slice per turn, so the first answers leave
/// while the rest are checked.
///
/// [`Coalescing`]: warden_client::Coalescing
pub struct Conn {
    io: ReadInSlices<warden_client::Coalescing<Io>>,
    peer: PeerInfo,
    idle_timeout: Duration,
    idle_timer: Pin<Box<Sleep>>,
    /// Frees the connection's place under `max_connections` when dropped.
    _slot: ConnectionSlot,
    /// Frees its place in its serving thread's count (gRPC connections).
    _lane: Option<OpenOnLane>,
}

impl Conn {
    pub fn new(
        io: Io,
        peer: PeerInfo,
        idle_timeout: Duration,
        slot: ConnectionSlot,
        lane: Option<OpenOnLane>,
    ) -> Self {
        Self {
            io: ReadInSlices::new(warden_client::Coalescing::new(io)),
            peer,
            idle_timeout,
            idle_timer: Box::pin(tokio::time::sleep(idle_timeout)),
            _slot: slot,
            _lane: lane,
        }
    }

    /// Who is on the other end: put in each of its calls' requests.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// Whether the idle timer says to close; re-arms it otherwise.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> bool {
        while self.idle_timer.as_mut().poll(cx).is_ready() {
            match self.peer.conn.idle_for() {
                Some(idle) if idle >= self.idle_timeout => return true,
                Some(idle) => self
                    .idle_timer
                    .as_mut()
                    .reset(Instant::now() + (self.idle_timeout - idle)),
                None => self
                    .idle_timer
                    .as_mut()
                    .reset(Instant::now() + self.idle_timeout),
            }
        }
        false
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if polled.is_pending() && this.poll_idle(cx) {
            tracing::debug!(event = "idle_close", remote = %this.peer.remote, "closing idle connection");
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout")));
        }
        polled
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::sockopt;

    /// The e2e test (`every_accepted_connection_has_tcp_keepalive_armed`)
    /// sees only what the kernel's table of connections shows: the
    /// keepalive timer and its first probe. This reads every option back
    /// from the socket, so a wrong interval, probe count or user timeout
    /// (which decide how soon a vanished peer is dropped) fails here.
    #[tokio::test]
    async fn keepalive_is_armed_with_every_bound_a_vanished_peer_is_dropped_by() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (accepted, _) = accepted.unwrap();
        assert!(
            !sockopt::socket_keepalive(&accepted).unwrap(),
            "off before arming"
        );

        arm_keepalive(&accepted).unwrap();

        assert!(sockopt::socket_keepalive(&accepted).unwrap());
        assert_eq!(sockopt::tcp_keepidle(&accepted).unwrap(), KEEPALIVE_IDLE);
        assert_eq!(
            sockopt::tcp_keepintvl(&accepted).unwrap(),
            KEEPALIVE_INTERVAL
        );
        assert_eq!(sockopt::tcp_keepcnt(&accepted).unwrap(), KEEPALIVE_PROBES);
        assert_eq!(
            u128::from(sockopt::tcp_user_timeout(&accepted).unwrap()),
            UNACKNOWLEDGED_FOR.as_millis()
        );
        // A vanished peer is dropped within about a minute: the last probe
        // goes unanswered 30 + 3 x 10 s after the last traffic.
        assert_eq!(
            KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_PROBES,
            UNACKNOWLEDGED_FOR
        );
    }
}
