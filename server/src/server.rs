//! Listening, the TLS handshake, the background sweep and graceful shutdown.
//!
//! Connections are accepted here rather than by tonic so that the handshake
//! runs on its own task (a slow client cannot hold up `accept`) and so that
//! the caller identity is read from the client certificate once per
//! connection, not once per call.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use warden_client::proto::warden_server::WardenServer;

use crate::check::Checker;
use crate::config::Config;
use crate::engine::{Clock, SystemClock};
use crate::keys::KeyRing;
use crate::service::warden::WardenService;
use crate::tls::TlsReloader;

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often idle state is swept out of the engine.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Room in a CheckRequest beyond the body for the other fields.
const MESSAGE_OVERHEAD: usize = 64 * 1024;

/// What the services know about the connection a call came on.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// The verified client certificate's identity; `None` in plaintext mode.
    pub identity: Option<Arc<str>>,
}

/// An accepted connection: mTLS, or plaintext on loopback when explicitly
/// configured.
pub enum Conn {
    Tls(Box<TlsStream<TcpStream>>, PeerInfo),
    Plain(TcpStream, PeerInfo),
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            Conn::Tls(_, p) | Conn::Plain(_, p) => p.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Plain(s, _) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A bound, not yet serving server: binding first lets the caller learn the
/// real port (for `--listen 127.0.0.1:0`) before traffic arrives.
pub struct Bound {
    listener: TcpListener,
    tls: Option<Arc<TlsReloader>>,
    checker: Arc<Checker>,
    clock: Arc<dyn Clock>,
}

impl Bound {
    /// Loads TLS material and binds the listen address.
    pub async fn bind(config: &Config) -> Result<Self, ServeError> {
        let tls = match &config.tls {
            Some(paths) => Some(Arc::new(TlsReloader::new(paths.clone())?)),
            None => None,
        };
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServeError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let keys = KeyRing::new(&config.policies, &config.keys);
        let checker = Arc::new(Checker::new(
            config.check.clone(),
            keys,
            config.authz.clone(),
            clock.clone(),
        ));
        Ok(Self {
            listener,
            tls,
            checker,
            clock,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Serves until `shutdown` resolves, then stops accepting and lets
    /// in-flight calls finish.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let max_message = self.checker.settings().max_body_bytes + MESSAGE_OVERHEAD;
        let (conns_tx, conns_rx) = mpsc::channel::<io::Result<Conn>>(128);
        let watcher = self.tls.clone().map(|tls| tokio::spawn(tls.watch()));
        let accept = tokio::spawn(accept_loop(self.listener, self.tls, conns_tx));
        let sweeper = tokio::spawn(sweep_loop(self.checker.clone(), self.clock.clone()));

        let service = WardenServer::new(WardenService::new(self.checker))
            .max_decoding_message_size(max_message);
        let result = tonic::transport::Server::builder()
            // Finds dead peers (e.g. a gateway host that vanished) so their
            // connections do not linger forever.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(service)
            .serve_with_incoming_shutdown(ReceiverStream::new(conns_rx), shutdown)
            .await;
        accept.abort();
        sweeper.abort();
        if let Some(w) = watcher {
            w.abort();
        }
        Ok(result?)
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<TlsReloader>>,
    conns: mpsc::Sender<io::Result<Conn>>,
) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Typically out of file descriptors: back off instead of
                // spinning, and keep serving the connections we have.
                tracing::warn!(event = "accept_failed", error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let conns = conns.clone();
        let Some(tls) = tls.clone() else {
            let peer = PeerInfo {
                remote,
                identity: None,
            };
            if conns.send(Ok(Conn::Plain(tcp, peer))).await.is_err() {
                return;
            }
            continue;
        };
        // Each handshake uses the configuration current at accept time, so
        // a reload affects new connections only.
        let acceptor = tls.acceptor();
        let allow_cn = tls.allow_cn_identity();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let identity = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .and_then(|cert| crate::tls::identity(cert, allow_cn))
                        .map(Arc::from);
                    let peer = PeerInfo { remote, identity };
                    let _ = conns.send(Ok(Conn::Tls(Box::new(tls), peer))).await;
                }
                Ok(Err(e)) => {
                    tracing::info!(event = "tls_handshake_failed", %remote, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    tracing::info!(event = "tls_handshake_failed", %remote, error = "timed out", "TLS handshake failed");
                }
            }
        });
    }
}

async fn sweep_loop(checker: Arc<Checker>, clock: Arc<dyn Clock>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let removed = checker.engine().sweep(clock.now());
        tracing::trace!(?removed, "swept idle state");
    }
}

/// Resolves on SIGTERM or ctrl-c.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
