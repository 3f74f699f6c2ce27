//! How warden reaches PostgreSQL (the shared key store and the cluster's
//! coordinator): every connection it opens, over TLS when the URL asks for
//! it, and the tables it needs, created when missing.

use std::path::Path;

use tokio_postgres::Socket;
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

/// A connection's task: poll it (spawn it) for its client to be answered.
pub type Connection =
    tokio_postgres::Connection<Socket, <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream>;

/// Connects as `url` says. With `sslmode=require` (or libpq's `verify-ca`
/// or `verify-full`), over TLS, the server's certificate and name verified
/// against the CA certificates in the PEM file named by `sslrootcert`, as
/// libpq's `verify-full` does; a certificate that does not verify is no
/// connection. Otherwise in plain text, as before TLS was offered (a
/// server with TLS on and a certificate nobody can verify, Debian's
/// default, keeps working for a URL that does not ask for TLS).
///
/// Errors are an operator's to read: the cause, never the URL (which may
/// hold a password).
pub async fn connect(url: &str) -> Result<(tokio_postgres::Client, Connection), String> {
    let (mut config, root_file) = parse(url)?;
    let roots = match config.get_ssl_mode() {
        SslMode::Require => {
            let Some(root_file) = root_file else {
                return Err(
                    "sslmode=require needs sslrootcert=FILE in the PostgreSQL URL: \
                     the CA certificate (PEM) the database's certificate is verified by"
                        .into(),
                );
            };
            roots(Path::new(&root_file)).map_err(|e| format!("sslrootcert {root_file}: {e}"))?
        }
        _ => {
            // No TLS is negotiated, so these roots are never used.
            config.ssl_mode(SslMode::Disable);
            rustls::RootCertStore::empty()
        }
    };
    // ring, as on warden's own TLS ports.
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS to PostgreSQL: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config
        .connect(MakeRustlsConnect::new(tls))
        .await
        .map_err(|e| warden_client::error_chain(&e))
}

/// The CA certificates in the PEM file at `path`.
fn roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| format!("not a PEM certificate file ({e})"))?;
        roots
            .add(cert)
            .map_err(|e| format!("unusable CA certificate ({e})"))?;
    }
    if roots.is_empty() {
        return Err("contains no certificate".into());
    }
    Ok(roots)
}

/// `url` as tokio-postgres reads it, and the `sslrootcert` it does not
/// read. libpq's `verify-ca` and `verify-full` are read as `require`, which
/// warden always verifies fully.
fn parse(url: &str) -> Result<(tokio_postgres::Config, Option<String>), String> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut root_file = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslrootcert", file)) => root_file = Some(file.to_owned()),
            Some(("sslmode", "verify-ca" | "verify-full")) => kept.push("sslmode=require"),
            _ => kept.push(pair),
        }
    }
    let url = match kept.is_empty() {
        true => base.to_owned(),
        false => format!("{base}?{}", kept.join("&")),
    };
    let config = url
        .parse()
        .map_err(|e| format!("the PostgreSQL URL: {}", warden_client::error_chain(&e)))?;
    Ok((config, root_file))
}

/// A set of warden's tables in PostgreSQL.
pub struct Tables {
    /// Reads every column of them and fails if one is missing (reads
    /// nothing, and needs nothing but the rights warden uses them with).
    pub read: &'static str,
    /// Creates what is missing of them.
    pub create: &'static str,
}

/// The advisory lock a warden process holds while it creates what is
/// missing of its tables ("warden" in ASCII).
const TABLES_LOCK: i64 = 0x7761_7264_656e;

/// Makes sure `tables` are all there, creating what is missing. When
/// nothing is, nothing is created, so a role that may only read and write
/// warden's tables serves once they were made (`warden store
/// create-tables`, as a role that may create them).
///
/// What is missing is created as one transaction under [`TABLES_LOCK`]:
/// PostgreSQL's `IF NOT EXISTS` does not hold between sessions, and of two
/// creating one table at once, the second fails on a unique index of the
/// catalog ("duplicate key value violates unique constraint"). Until session
/// 59, nodes started together on an empty database (a cluster deployed at
/// once) exited at start that way, all but one.
pub async fn create_missing(
    client: &tokio_postgres::Client,
    tables: &Tables,
) -> Result<(), String> {
    use tokio_postgres::error::SqlState;
    use warden_client::error_chain;
    let missing = |e: &tokio_postgres::Error| {
        matches!(
            e.code(),
            Some(&SqlState::UNDEFINED_TABLE | &SqlState::UNDEFINED_COLUMN)
        )
    };
    match client.batch_execute(tables.read).await {
        Ok(()) => return Ok(()),
        Err(e) if missing(&e) => {}
        Err(e) => return Err(format!("reading warden's tables: {}", error_chain(&e))),
    }
    // One query of several statements is one transaction, run through by
    // the server without waiting on this client: the lock is held for
    // milliseconds, even if this process is paused meanwhile.
    let created = client
        .batch_execute(&format!(
            "SELECT pg_advisory_xact_lock({TABLES_LOCK});\n{}",
            tables.create
        ))
        .await;
    created.map_err(|e| match e.code() {
        Some(&SqlState::INSUFFICIENT_PRIVILEGE) => format!(
            "warden's tables are missing or older than this version, and this role may not \
             create them ({}): run `warden store create-tables` once as a role that may \
             (the database's owner), then start warden again",
            error_chain(&e)
        ),
        _ => format!("creating warden's tables: {}", error_chain(&e)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_asking_for_verification_is_read_as_require_with_its_root_file() {
        for mode in ["require", "verify-ca", "verify-full"] {
            let (config, root) = parse(&format!(
                "postgres://warden@db.internal:5432/warden?sslmode={mode}&sslrootcert=/etc/db-ca.pem&connect_timeout=5"
            ))
            .unwrap();
            assert_eq!(config.get_ssl_mode(), SslMode::Require, "{mode}");
            assert_eq!(root.as_deref(), Some("/etc/db-ca.pem"));
            assert_eq!(
                config.get_connect_timeout(),
                Some(&std::time::Duration::from_secs(5))
            );
        }
        let (config, root) = parse("postgres://warden@db.internal/warden").unwrap();
        assert_eq!(config.get_ssl_mode(), SslMode::Prefer);
        assert_eq!(root, None);
    }

    #[tokio::test]
    async fn require_without_a_root_file_is_refused_before_connecting() {
        let Err(e) = connect("postgres://warden@127.0.0.1:1/warden?sslmode=require").await else {
            panic!("connected");
        };
        assert!(e.contains("sslrootcert=FILE"), "{e}");
    }

    #[tokio::test]
    async fn a_root_file_without_a_certificate_is_refused_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("ca.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        for (file, said) in [
            (empty, "contains no certificate"),
            (dir.path().join("absent.pem"), "No such file"),
        ] {
            let url = format!(
                "postgres://warden@127.0.0.1:1/warden?sslmode=verify-full&sslrootcert={}",
                file.display()
            );
            let Err(e) = connect(&url).await else {
                panic!("connected");
            };
            assert!(e.contains("sslrootcert") && e.contains(said), "{e}");
        }
    }

    #[test]
    fn an_unreadable_url_names_no_password() {
        let e =
            parse("postgres://warden:hunter2@db.internal/warden?sslmode=sometimes").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
