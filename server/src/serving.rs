//! Serving threads: each accepted gRPC connection is served on one thread,
//! from its TLS handshake to its last call, by a runtime of that thread's
//! own.
//!
//! Why not tokio's work-stealing runtime, which served every connection
//! before: there a call's HTTP/2 stream, its handler and its connection
//! wake one another across worker threads, and an idle worker is woken for
//! work another is about to do. Measured with h2load on the 2-core machine
//! this was built on (signed `Check`, 64 in flight), that cost a call 15–19
//! µs of server CPU with two workers against 10–11 µs with one, for no more
//! throughput (`benches/HISTORY.md`, session 34). A thread per core keeps
//! the one-worker cost and still uses every core, one connection at a time:
//! a new connection goes to the thread serving the fewest.
//!
//! The forward-auth port's connections (nginx `auth_request` and the
//! like) are served the same way, by a server of their own on each thread
//! ([`Port`]): on the main runtime's workers an answer cost 19.5–20.0 µs
//! of server CPU against 14.6–14.8 µs here (h2load over HTTP/1.1, 16
//! connections, a signed request over its limit; `benches/HISTORY.md`,
//! session 42).
//!
//! What runs where: the accept loops and the background loops stay on the
//! process's main runtime. A task a call spawns runs on its connection's
//! thread, which is why a thread keeps its runtime until the whole process
//! is done ([`ServingThreads::stop`]), not only until its servers have
//! drained.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use hyper_util::server::graceful::{GracefulConnection, GracefulShutdown};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::conn::{Conn, ConnState, Io, OpenOnLane, PeerInfo, connections_gauge};
use crate::gate::{ConnectionSlot, HandshakeSlot};

/// A connection let in by the accept loop (under `max_connections`, its
/// handshake counted), not yet established: what a serving thread, or the
/// main runtime for the forward-auth port, makes a [`Conn`] of.
pub struct Admitted {
    /// Taken off the accepting runtime, so that the runtime establishing
    /// it is the one that waits on it.
    tcp: std::net::TcpStream,
    remote: SocketAddr,
    slot: ConnectionSlot,
    state: Arc<ConnState>,
    idle_timeout: Duration,
    tls: Option<Handshake>,
    /// Counts the connection on its serving thread while it is open.
    lane: Option<OpenOnLane>,
}

/// A TLS handshake still to make, with the configuration current when
/// the connection was accepted (a reload affects new connections only).
pub struct Handshake {
    pub acceptor: TlsAcceptor,
    pub allow_cn: bool,
    pub timeout: Duration,
    /// Frees the handshake's place under `max_handshakes` when dropped.
    pub slot: HandshakeSlot,
}

impl Admitted {
    pub fn new(
        tcp: tokio::net::TcpStream,
        remote: SocketAddr,
        slot: ConnectionSlot,
        state: Arc<ConnState>,
        idle_timeout: Duration,
        tls: Option<Handshake>,
    ) -> io::Result<Self> {
        Ok(Self {
            tcp: tcp.into_std()?,
            remote,
            slot,
            state,
            idle_timeout,
            tls,
            lane: None,
        })
    }

    /// The connection, ready for calls: on the runtime this runs on. `None`
    /// when its handshake failed or timed out (logged and counted here).
    pub async fn establish(self) -> Option<Conn> {
        let tcp = match tokio::net::TcpStream::from_std(self.tcp) {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::warn!(event = "accept_failed", error = %e, "accepted connection could not be served");
                return None;
            }
        };
        let remote = self.remote;
        let (io, identity) = match self.tls {
            None => (Io::Plain(tcp), None),
            Some(handshake) => {
                let accepted =
                    tokio::time::timeout(handshake.timeout, handshake.acceptor.accept(tcp)).await;
                drop(handshake.slot);
                match accepted {
                    Ok(Ok(stream)) => {
                        let identity = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .and_then(|cert| crate::tls::identity(cert, handshake.allow_cn))
                            .map(Arc::from);
                        (Io::Tls(Box::new(stream)), identity)
                    }
                    Ok(Err(e)) => {
                        let cause = crate::tls::failure_cause(&e);
                        handshake_failed(cause);
                        tracing::info!(event = "tls_handshake_failed", %remote, cause, error = %e, "TLS handshake failed");
                        return None;
                    }
                    Err(_) => {
                        handshake_failed("timeout");
                        tracing::info!(event = "tls_handshake_failed", %remote, cause = "timeout", "TLS handshake failed");
                        return None;
                    }
                }
            }
        };
        let peer = PeerInfo {
            remote,
            identity,
            conn: self.state,
        };
        Some(Conn::new(io, peer, self.idle_timeout, self.slot, self.lane))
    }
}

/// Counts a failed handshake; called before the failure is logged, so that
/// whoever reads the log line finds it counted (a test that scraped the
/// metrics on seeing the line once found the counter still at 0).
fn handshake_failed(cause: &'static str) {
    metrics::counter!("warden_tls_handshake_failures_total", "cause" => cause).increment(1);
}

/// Which port a connection came in on, and so which of a serving thread's
/// servers serves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// gRPC: checks, admin, health, peers, Envoy's services.
    Grpc,
    /// HTTP/1.1 forward auth for nginx, Caddy and Traefik.
    ForwardAuth,
}

/// Where the accept loop hands what it admits.
#[derive(Clone)]
pub enum Destination {
    /// Established on the accepting runtime and served by one server
    /// there, from this channel (`WARDEN_SERVING_THREADS=0`).
    Here(mpsc::Sender<io::Result<Conn>>),
    /// Established and served, by the server of this port, on the serving
    /// thread with the fewest open connections.
    Threads(Arc<ServingThreads>, Port),
}

impl Destination {
    /// Hands `admitted` over; false once nothing serves this destination
    /// any more (the accept loop then ends).
    pub fn place(&self, admitted: Admitted) -> bool {
        match self {
            Destination::Here(conns) => {
                if conns.is_closed() {
                    return false;
                }
                let conns = conns.clone();
                tokio::spawn(async move {
                    if let Some(conn) = admitted.establish().await {
                        let _ = conns.send(Ok(conn)).await;
                    }
                });
                true
            }
            Destination::Threads(threads, port) => threads.place(admitted, *port),
        }
    }
}

/// One server's future on a serving thread: given the thread's incoming
/// connections and the signal to drain, serves until drained.
pub type Serve = dyn Fn(
        ReceiverStream<io::Result<Conn>>,
        Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Pin<Box<dyn Future<Output = ()>>>
    + Send
    + Sync;

/// A serving thread's servers, one per port.
#[derive(Clone)]
pub struct Servers {
    pub grpc: Arc<Serve>,
    /// `Some` with `[forward_auth]`.
    pub forward_auth: Option<Arc<Serve>>,
}

/// The serving threads (see the module's doc comment).
pub struct ServingThreads {
    lanes: Vec<Lane>,
    draining: watch::Sender<bool>,
}

struct Lane {
    /// Unbounded here: the gate bounds what the accept loops admit.
    admitted: mpsc::UnboundedSender<(Port, Admitted)>,
    open: Arc<AtomicUsize>,
    /// Told once the thread's servers have drained.
    served: std::sync::Mutex<Option<oneshot::Receiver<()>>>,
    /// Told when the process is done: the thread then drops its runtime.
    stop: std::sync::Mutex<Option<oneshot::Sender<()>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl ServingThreads {
    /// `count` threads, each serving what it is given with `servers`.
    pub fn start(count: usize, servers: Servers) -> io::Result<Arc<Self>> {
        let (draining, _) = watch::channel(false);
        let mut lanes = Vec::with_capacity(count);
        for n in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (admitted_tx, mut admitted_rx) = mpsc::unbounded_channel::<(Port, Admitted)>();
            let (served_tx, served_rx) = oneshot::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let drain = draining.subscribe();
            let servers = servers.clone();
            let thread = std::thread::Builder::new()
                .name(format!("warden-serving-{n}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        let (grpc_tx, grpc_rx) = mpsc::channel::<io::Result<Conn>>(128);
                        let (forward_tx, forward_rx) = mpsc::channel::<io::Result<Conn>>(128);
                        tokio::spawn(async move {
                            while let Some((port, admitted)) = admitted_rx.recv().await {
                                let conns = match port {
                                    Port::Grpc => grpc_tx.clone(),
                                    Port::ForwardAuth => forward_tx.clone(),
                                };
                                tokio::spawn(async move {
                                    if let Some(conn) = admitted.establish().await {
                                        let _ = conns.send(Ok(conn)).await;
                                    }
                                });
                            }
                        });
                        let drained = |mut drain: watch::Receiver<bool>| {
                            Box::pin(async move {
                                let _ = drain.wait_for(|draining| *draining).await;
                            })
                        };
                        let grpc =
                            (servers.grpc)(ReceiverStream::new(grpc_rx), drained(drain.clone()));
                        let forward_auth = async {
                            if let Some(serve) = &servers.forward_auth {
                                serve(ReceiverStream::new(forward_rx), drained(drain)).await;
                            }
                        };
                        let mut stop = stop_rx;
                        tokio::select! {
                            _ = futures_util::future::join(grpc, forward_auth) => {
                                let _ = served_tx.send(());
                                let _ = stop.await;
                            }
                            _ = &mut stop => {}
                        }
                    });
                    // Tasks still running (a call past the drain timeout)
                    // end with the process.
                    runtime.shutdown_timeout(Duration::from_secs(1));
                })?;
            connections_gauge(n).set(0.0);
            lanes.push(Lane {
                admitted: admitted_tx,
                open: Arc::new(AtomicUsize::new(0)),
                served: std::sync::Mutex::new(Some(served_rx)),
                stop: std::sync::Mutex::new(Some(stop_tx)),
                thread: std::sync::Mutex::new(Some(thread)),
            });
        }
        Ok(Arc::new(Self { lanes, draining }))
    }

    /// How many threads serve.
    pub fn count(&self) -> usize {
        self.lanes.len()
    }

    /// Hands `admitted` to the thread serving the fewest connections, of
    /// either port.
    fn place(&self, mut admitted: Admitted, port: Port) -> bool {
        let thread = fewest_open(self.lanes.iter().map(|l| l.open.load(Ordering::Relaxed)));
        let lane = &self.lanes[thread];
        admitted.lane = Some(OpenOnLane::take(&lane.open, thread));
        lane.admitted.send((port, admitted)).is_ok()
    }

    /// Every thread stops accepting and drains its connections (HTTP/2
    /// GOAWAY, HTTP/1.1 closed after the answer in flight; calls in flight
    /// finish).
    pub fn drain(&self) {
        let _ = self.draining.send(true);
    }

    /// Once every thread's servers have drained.
    pub async fn drained(&self) {
        let served: Vec<_> = self
            .lanes
            .iter()
            .filter_map(|lane| lane.served.lock().ok().and_then(|mut s| s.take()))
            .collect();
        for lane in served {
            let _ = lane.await;
        }
    }

    /// Ends the threads and their runtimes, with anything still running on
    /// them: when the process is done.
    pub async fn stop(&self) {
        let mut threads = Vec::new();
        for lane in &self.lanes {
            if let Some(stop) = lane.stop.lock().ok().and_then(|mut s| s.take()) {
                let _ = stop.send(());
            }
            if let Some(thread) = lane.thread.lock().ok().and_then(|mut t| t.take()) {
                threads.push(thread);
            }
        }
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// Serves each connection from `incoming` with `serve` until `drain`
/// completes; then takes no more, tells each open one to finish (HTTP/2
/// GOAWAY, or HTTP/1.1 closing after the answer in flight) and returns once
/// all are closed. The caller bounds how long that may take. The one loop
/// of both ports' servers.
pub async fn serve_connections<C>(
    incoming: ReceiverStream<io::Result<Conn>>,
    drain: impl Future<Output = ()>,
    mut serve: impl FnMut(Conn) -> C,
) where
    C: GracefulConnection + Send + 'static,
    C::Error: std::fmt::Display,
{
    let open = GracefulShutdown::new();
    let mut incoming = incoming;
    let mut drain = std::pin::pin!(drain);
    loop {
        let conn = tokio::select! {
            _ = &mut drain => break,
            conn = incoming.next() => conn,
        };
        let conn = match conn {
            Some(Ok(conn)) => conn,
            Some(Err(_)) => continue,
            None => break,
        };
        let served = open.watch(serve(conn));
        tokio::spawn(async move {
            if let Err(e) = served.await {
                // A client that closes mid-answer, a protocol error: the
                // connection's business, not the server's.
                tracing::debug!(event = "connection_ended", error = %e, "connection ended with an error");
            }
        });
    }
    // No new connections from here: the ones handed over before the drain
    // are closed with the rest.
    drop(incoming);
    open.shutdown().await;
}

/// The index of the smallest count, the first of equals.
fn fewest_open(counts: impl Iterator<Item = usize>) -> usize {
    counts
        .enumerate()
        .min_by_key(|&(i, n)| (n, i))
        .map_or(0, |(i, _)| i)
}

/// How many serving threads: `WARDEN_SERVING_THREADS`, or one per core.
/// 0 serves every connection on the main runtime instead.
pub fn thread_count() -> usize {
    std::env::var("WARDEN_SERVING_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_connection_goes_to_the_thread_serving_the_fewest() {
        assert_eq!(fewest_open([3, 1, 2].into_iter()), 1);
        assert_eq!(fewest_open([0, 0].into_iter()), 0);
        assert_eq!(fewest_open([2, 1, 1].into_iter()), 1);
        assert_eq!(fewest_open(std::iter::empty()), 0);
    }
}
