//! Mutual TLS: the server's rustls configuration, and the caller identity
//! read once per connection from the verified client certificate.
//!
//! Every client must present a certificate that chains to the configured
//! client CA bundle (and is not revoked, when CRLs are configured); there is
//! no "optional client auth" mode. TLS 1.3, and 1.2 only when configured.
//! Certificates, CA bundle and CRLs reload without a restart.

use std::path::Path;
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::TlsPaths;

/// Why TLS could not be set up. Messages name the file, never key bytes.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: String, what: String },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn invalid(path: &Path, what: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        path: path.display().to_string(),
        what: what.into(),
    }
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(invalid(path, "contains no certificate"));
    }
    Ok(certs)
}

fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|_| invalid(path, "not a PEM private key file"))?
        .ok_or_else(|| invalid(path, "contains no private key"))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Everything read from disk for one TLS configuration.
struct Loaded {
    config: Arc<rustls::ServerConfig>,
    /// SHA-256 over every file's bytes: a reload only swaps when it changed.
    fingerprint: [u8; 32],
}

fn load(paths: &TlsPaths) -> Result<Loaded, TlsError> {
    let mut fingerprint = Sha256::new();
    let mut read_all = |path: &Path| -> Result<Vec<u8>, TlsError> {
        let bytes = read(path)?;
        fingerprint.update(path.as_os_str().as_encoded_bytes());
        fingerprint.update(&bytes);
        Ok(bytes)
    };
    let cert_pem = read_all(&paths.cert)?;
    let key_pem = read_all(&paths.key)?;
    let ca_pem = read_all(&paths.client_ca)?;
    let mut crl_pems = Vec::with_capacity(paths.crls.len());
    for crl in &paths.crls {
        crl_pems.push((crl, read_all(crl)?));
    }
    let fingerprint = fingerprint.finalize().into();

    let chain = certs(&paths.cert, &cert_pem)?;
    let key = private_key(&paths.key, &key_pem)?;
    let cas = certs(&paths.client_ca, &ca_pem)?;
    let mut roots = RootCertStore::empty();
    for ca in &cas {
        roots
            .add(ca.clone())
            .map_err(|e| invalid(&paths.client_ca, format!("unusable CA certificate ({e})")))?;
    }
    let mut crls = Vec::new();
    for (path, pem) in &crl_pems {
        let found = rustls_pemfile::crls(&mut pem.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(path, format!("not a PEM CRL file ({e})")))?;
        if found.is_empty() {
            return Err(invalid(path, "contains no CRL"));
        }
        crls.extend(found);
    }
    let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    if !crls.is_empty() {
        // Revocation is checked for the client's own certificate; a client
        // whose issuer has no CRL configured is refused (unknown status).
        verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
    }
    let verifier = verifier.build().map_err(|e| {
        invalid(
            &paths.client_ca,
            format!("cannot verify clients with it ({e})"),
        )
    })?;
    let versions: &[&'static rustls::SupportedProtocolVersion] = if paths.allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| invalid(&paths.cert, e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key)
        .map_err(|e| invalid(&paths.key, format!("does not match the certificate ({e})")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    warn_on_expiry(paths, &chain[..1], &cas);
    Ok(Loaded {
        config: Arc::new(config),
        fingerprint,
    })
}

/// Logs a warning for every certificate (the server's own, and each client
/// CA) that expires within the configured warning period.
fn warn_on_expiry(paths: &TlsPaths, server: &[CertificateDer<'_>], cas: &[CertificateDer<'_>]) {
    let now = warden_client::signing::unix_now();
    let warn_secs = paths.expiry_warning.as_secs() as i64;
    let labelled = server
        .iter()
        .map(|c| ("server certificate", &paths.cert, c))
        .chain(cas.iter().map(|c| ("client CA", &paths.client_ca, c)));
    for (what, path, der) in labelled {
        let Ok((_, cert)) = X509Certificate::from_der(der.as_ref()) else {
            continue;
        };
        let not_after = cert.validity().not_after.timestamp();
        let days_left = (not_after - now).div_euclid(86_400);
        let subject = cert.subject().to_string();
        let label = if what == "server certificate" {
            "server"
        } else {
            "client_ca"
        };
        metrics::gauge!("warden_cert_expiry_seconds", "what" => label, "subject" => subject.clone()).set((not_after - now) as f64);
        if not_after <= now {
            tracing::error!(event = "cert_expired", what, file = %path.display(), %subject, "certificate has expired");
        } else if not_after - now <= warn_secs {
            tracing::warn!(event = "cert_expiring", what, file = %path.display(), %subject, days_left, "certificate expires soon");
        }
    }
}

/// What a listener speaks over TLS, announced by ALPN: gRPC needs HTTP/2;
/// the forward-auth endpoint is HTTP/1.1, which is what nginx, Caddy and
/// Traefik send to an auth endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    Http1,
}

/// The live TLS configuration: new connections use the current one, and a
/// reload swaps it without touching established connections. A reload that
/// fails keeps the old configuration serving.
pub struct TlsReloader {
    paths: TlsPaths,
    current: RwLock<(Arc<rustls::ServerConfig>, [u8; 32])>,
}

/// What a reload attempt did.
#[derive(Debug)]
pub enum Reload {
    Unchanged,
    Reloaded,
    Failed(TlsError),
}

impl TlsReloader {
    /// Loads the configuration for the first time; errors are fatal here.
    pub fn new(paths: TlsPaths) -> Result<Self, TlsError> {
        let loaded = load(&paths)?;
        Ok(Self {
            paths,
            current: RwLock::new((loaded.config, loaded.fingerprint)),
        })
    }

    /// The configuration for the next handshake of a `protocol` listener.
    pub fn acceptor(&self, protocol: Protocol) -> tokio_rustls::TlsAcceptor {
        let config = self.current.read().0.clone();
        match protocol {
            Protocol::Grpc => tokio_rustls::TlsAcceptor::from(config),
            Protocol::Http1 => {
                let mut config = (*config).clone();
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                tokio_rustls::TlsAcceptor::from(Arc::new(config))
            }
        }
    }

    pub fn allow_cn_identity(&self) -> bool {
        self.paths.allow_cn_identity
    }

    /// Re-reads the files; swaps when they changed (or always, if `force`).
    pub fn reload(&self, force: bool) -> Reload {
        match load(&self.paths) {
            Ok(loaded) => {
                let mut current = self.current.write();
                if !force && current.1 == loaded.fingerprint {
                    return Reload::Unchanged;
                }
                *current = (loaded.config, loaded.fingerprint);
                Reload::Reloaded
            }
            Err(e) => Reload::Failed(e),
        }
    }

    /// Reloads on file changes (polled every `reload_interval`) and on
    /// SIGHUP, logging every outcome but "unchanged". Runs until dropped.
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.paths.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        // The failure last logged, so a broken file is reported once, not
        // every interval.
        let mut last_error: Option<String> = None;
        loop {
            let force = tokio::select! {
                _ = tick.tick() => false,
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            };
            match self.reload(force) {
                Reload::Unchanged => {}
                Reload::Reloaded => {
                    last_error = None;
                    metrics::counter!("warden_tls_reloads_total", "result" => "ok").increment(1);
                    tracing::info!(
                        event = "tls_reloaded",
                        trigger = if force { "sighup" } else { "file change" },
                        "TLS certificates reloaded"
                    );
                }
                Reload::Failed(e) => {
                    metrics::counter!("warden_tls_reloads_total", "result" => "failed")
                        .increment(1);
                    let text = e.to_string();
                    if force || last_error.as_deref() != Some(text.as_str()) {
                        tracing::error!(event = "tls_reload_failed", error = %text, "TLS reload failed; still serving the previous certificates");
                    }
                    last_error = Some(text);
                }
            }
        }
    }
}

/// A short, stable label for why a handshake failed, for metrics and logs.
pub fn failure_cause(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                "connection_closed"
            }
            _ => "io",
        };
    };
    match tls {
        Error::NoCertificatesPresented => "no_client_certificate",
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "expired",
        Error::InvalidCertificate(CertificateError::Revoked) => "revoked",
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_ca",
        Error::InvalidCertificate(CertificateError::UnknownRevocationStatus) => {
            "unknown_revocation_status"
        }
        Error::InvalidCertificate(_) => "invalid_certificate",
        Error::PeerIncompatible(_) => "incompatible",
        Error::AlertReceived(_) => "alert_received",
        _ => "protocol",
    }
}

/// The caller identity of a verified client certificate: its SPIFFE URI SAN,
/// else its first DNS SAN, else (only when `allow_cn`) its subject CN,
/// written `CN=<name>`. Each kind is validated, so the text alone says which
/// kind it is ([`crate::model::IdentityKind`]): a DNS SAN that is not a DNS
/// name (say, one spelled `spiffe://t.test/admin`) is no identity at all.
pub fn identity(cert: &CertificateDer<'_>, allow_cn: bool) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let mut dns = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) if is_spiffe_id(uri) => {
                    return Some((*uri).to_owned());
                }
                GeneralName::DNSName(name) if dns.is_none() && is_dns_name(name) => {
                    dns = Some(name.to_ascii_lowercase())
                }
                _ => {}
            }
        }
    }
    if dns.is_some() || !allow_cn {
        return dns;
    }
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|cn| !cn.is_empty() && !cn.chars().any(char::is_control))
        .map(|cn| format!("CN={cn}"))
}

/// A SPIFFE ID: `spiffe://` + a trust domain of `[a-z0-9.-_]` + a path of
/// segments of `[A-Za-z0-9.-_]` (SPIFFE-ID spec, section 2).
fn is_spiffe_id(uri: &str) -> bool {
    let Some(rest) = uri.strip_prefix("spiffe://") else {
        return false;
    };
    let (domain, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    !domain.is_empty()
        && domain.len() <= 255
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        && uri.len() <= 2048
        && path.split('/').skip(1).all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        })
}

/// A DNS host name: dot-separated labels of letters, digits and inner
/// hyphens, 1 to 63 bytes each, 253 in all. No wildcards: a client
/// certificate names one host.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::Ca;

    fn der(pem: &str) -> CertificateDer<'static> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
    }

    #[test]
    fn identity_prefers_spiffe_then_dns_then_cn_only_when_allowed() {
        let ca = Ca::new("id CA").unwrap();
        let (both, _) = ca
            .client_cert("cn-name", &["gw.internal", "spiffe://prod/gw"])
            .unwrap();
        assert_eq!(
            identity(&der(&both), false).as_deref(),
            Some("spiffe://prod/gw")
        );
        let (dns, _) = ca.client_cert("cn-name", &["gw.internal"]).unwrap();
        assert_eq!(identity(&der(&dns), true).as_deref(), Some("gw.internal"));
        let (cn_only, _) = ca.client_cert("cn-name", &[]).unwrap();
        assert_eq!(identity(&der(&cn_only), false), None);
        assert_eq!(
            identity(&der(&cn_only), true).as_deref(),
            Some("CN=cn-name")
        );
    }

    #[test]
    fn a_dns_san_spelled_like_a_spiffe_id_is_no_identity() {
        let ca = Ca::new("id CA").unwrap();
        let (cert, _) = ca
            .client_cert("spiffe://t.test/admin", &["dns:spiffe://t.test/admin"])
            .unwrap();
        assert_eq!(identity(&der(&cert), false), None);
        // Allowed CNs are marked as such, whatever they spell.
        assert_eq!(
            identity(&der(&cert), true).as_deref(),
            Some("CN=spiffe://t.test/admin")
        );
        let (bad_spiffe, _) = ca.client_cert("x", &["spiffe://T.TEST/../admin"]).unwrap();
        assert_eq!(identity(&der(&bad_spiffe), false), None);
        for ok in ["gw.internal", "a-b.c", "x"] {
            assert!(is_dns_name(ok), "{ok}");
        }
        for bad in ["spiffe://t/a", "*.x", "-a.b", "a..b", "a b", "CN=x", ""] {
            assert!(!is_dns_name(bad), "{bad}");
        }
    }

    #[test]
    fn a_non_spiffe_uri_is_not_an_identity() {
        let ca = Ca::new("id CA").unwrap();
        let (cert, _) = ca.client_cert("cn", &["https://example.com/x"]).unwrap();
        assert_eq!(identity(&der(&cert), false), None);
    }
}
