//! The connections under a channel: TCP, then mutual TLS, then
//! [`Coalescing`] writes, so that what HTTP/2 writes in one turn leaves in
//! one TLS record and one syscall.
//!
//! TLS is done here rather than by tonic because the coalescing has to sit
//! above it: below TLS it would hold the handshake's records too, and a
//! handshake waits for answers without flushing again.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tonic::codegen::http::Uri;

use crate::{Coalescing, Error, Tls};

/// Opens a channel's connections (see the module's documentation).
#[derive(Clone)]
pub(crate) struct Connector {
    tls: TlsConnector,
    server_name: ServerName<'static>,
}

impl Connector {
    /// `server_name`: the name warden's certificate must carry.
    pub(crate) fn new(tls: &Tls, server_name: &str) -> Result<Self, Error> {
        let mut roots = RootCertStore::empty();
        for ca in certs(&tls.ca_pem, "CA")? {
            roots
                .add(ca)
                .map_err(|e| Error::Tls(format!("CA certificate: {e}")))?;
        }
        let key = rustls_pemfile::private_key(&mut tls.key_pem.as_slice())
            .map_err(|e| Error::Tls(format!("client key: {e}")))?
            .ok_or_else(|| Error::Tls("client key: no private key in the PEM".into()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs(&tls.cert_pem, "client")?, key)
            .map_err(|e| Error::Tls(format!("client certificate: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| Error::Tls(format!("invalid server name {server_name:?}")))?;
        Ok(Self {
            tls: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }
}

fn certs(pem: &[u8], what: &str) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, Error> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("{what} certificate: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{what} certificate: no certificate in the PEM"
        )));
    }
    Ok(certs)
}

impl tonic::codegen::Service<Uri> for Connector {
    type Response = TokioIo<Coalescing<TlsStream<TcpStream>>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_matches(['[', ']'])
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            Ok(TokioIo::new(this.open(&host, port).await?))
        })
    }
}

impl Connector {
    /// One connection, TLS agreed on HTTP/2, ready for its preface.
    pub(crate) async fn open(
        &self,
        host: &str,
        port: u16,
    ) -> io::Result<Coalescing<TlsStream<TcpStream>>> {
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        let tls = self.tls.connect(self.server_name.clone(), tcp).await?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(io::Error::other("warden did not agree to HTTP/2 (ALPN h2)"));
        }
        Ok(Coalescing::new(tls))
    }
}
