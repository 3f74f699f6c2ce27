//! `warden serve --dev`: a throwaway CA, server and client certificates and a
//! demo key in one directory, so that the very first run is already mTLS.
//!
//! Re-running reuses what is there; only the address in `demo-key.json` is
//! rewritten. The certificate helpers are public because tests use them to
//! make CAs and certificates of their own.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use serde::{Deserialize, Serialize};

use std::collections::HashSet;

use crate::auth::{Authz, CallerRule, Role};
use crate::config::{AlertSettings, CheckSettings, Config, ServerSettings, TlsPaths};
use crate::engine::clock::duration_nanos;
use crate::engine::{Gcra, Limit, Window, WindowKind};
use crate::model::{KeyConfig, Pattern, Policy, Secret};
use crate::store::{MasterKeySource, StoreSettings};

pub const DEFAULT_DIR: &str = "./warden-dev";
/// The identity of the dev client certificate; it holds every role.
pub const DEV_CLIENT_ID: &str = "spiffe://warden.dev/client";

/// The demo key file, `demo-key.json`. The HMAC key is the UTF-8 bytes of
/// `secret`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DemoKey {
    pub address: String,
    pub key_id: String,
    pub secret: String,
    /// The policy the demo key counts against.
    #[serde(default)]
    pub policy: String,
}

/// A CA that can issue certificates (tests use it too).
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2036, 1, 1);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Self { issuer })
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses).
    /// Returns (certificate PEM, key PEM).
    pub fn server_cert(&self, names: &[&str]) -> Result<(String, String), rcgen::Error> {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("warden"),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// Issues a client certificate with the given subject CN and SANs
    /// (`spiffe://...` strings become URI SANs, others DNS SANs).
    pub fn client_cert(&self, cn: &str, sans: &[&str]) -> Result<(String, String), rcgen::Error> {
        self.client_cert_with(cn, sans, None, false)
    }

    /// Like [`Self::client_cert`], with a chosen serial number (to revoke it
    /// later) and optionally already expired.
    pub fn client_cert_with(
        &self,
        cn: &str,
        sans: &[&str],
        serial: Option<u64>,
        expired: bool,
    ) -> Result<(String, String), rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        for san in sans {
            // "dns:" forces a DNS SAN (tests of malformed names).
            params
                .subject_alt_names
                .push(if let Some(dns) = san.strip_prefix("dns:") {
                    SanType::DnsName(dns.try_into()?)
                } else if san.contains("://") {
                    SanType::URI((*san).try_into()?)
                } else {
                    SanType::DnsName((*san).try_into()?)
                });
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = serial.map(rcgen::SerialNumber::from);
        if expired {
            let key = KeyPair::generate()?;
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
            let cert = params.signed_by(&key, &self.issuer)?;
            return Ok((cert.pem(), key.serialize_pem()));
        }
        self.issue(params)
    }

    /// A CRL (PEM) revoking the certificates with these serial numbers.
    pub fn crl(&self, revoked: &[u64]) -> Result<String, rcgen::Error> {
        let params = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2024, 1, 1),
            next_update: rcgen::date_time_ymd(2036, 1, 1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|&serial| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(serial),
                    revocation_time: rcgen::date_time_ymd(2024, 6, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer)?.pem()
    }

    fn issue(&self, mut params: CertificateParams) -> Result<(String, String), rcgen::Error> {
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2036, 1, 1);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// What `serve --dev` set up.
#[derive(Debug)]
pub struct DevSetup {
    pub dir: PathBuf,
    pub config: Config,
    pub demo: DemoKey,
}

/// Why the dev directory could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("dev directory {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot generate dev certificates: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("{path} is not a valid demo key file: {source}")]
    DemoKey {
        path: String,
        source: serde_json::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DevError + '_ {
    move |source| DevError::Io {
        path: path.display().to_string(),
        source,
    }
}

const FILES: [&str; 5] = [
    "ca.pem",
    "server.pem",
    "server-key.pem",
    "client.pem",
    "client-key.pem",
];

/// Creates (or reuses) the dev directory and returns the config to serve.
pub fn prepare(dir: &Path, listen: SocketAddr) -> Result<DevSetup, DevError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    if !FILES.iter().all(|f| dir.join(f).exists()) {
        let ca = Ca::new("warden dev CA")?;
        let (server, server_key) = ca.server_cert(&["localhost", "127.0.0.1"])?;
        let (client, client_key) = ca.client_cert("warden-dev-client", &[DEV_CLIENT_ID])?;
        write_file(&dir.join("ca.pem"), ca.cert_pem().as_bytes())?;
        write_file(&dir.join("server.pem"), server.as_bytes())?;
        write_file(&dir.join("server-key.pem"), server_key.as_bytes())?;
        write_file(&dir.join("client.pem"), client.as_bytes())?;
        write_file(&dir.join("client-key.pem"), client_key.as_bytes())?;
    }
    // The dev store's master key lives beside it: fine for a throwaway dev
    // setup, never for production (use an environment variable or a file
    // on another volume).
    if !dir.join("master.key").exists() {
        write_file(
            &dir.join("master.key"),
            crate::crypto::MasterKey::generate_hex().as_bytes(),
        )?;
    }

    let demo_path = dir.join("demo-key.json");
    let demo = match std::fs::read(&demo_path) {
        Ok(bytes) => {
            serde_json::from_slice::<DemoKey>(&bytes).map_err(|source| DevError::DemoKey {
                path: demo_path.display().to_string(),
                source,
            })?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => DemoKey {
            address: listen.to_string(),
            key_id: format!("wk_demo_{}", crate::crypto::random_hex(4)),
            secret: format!("wsk_{}", crate::crypto::random_hex(32)),
            policy: "demo".to_owned(),
        },
        Err(e) => return Err(io(&demo_path)(e)),
    };

    let policies = vec![
        Policy::new(
            "demo".to_owned(),
            Limit::Gcra(Gcra::new(100, duration_nanos(Duration::from_secs(60)), 100)),
            Duration::from_secs(60),
            None,
        ),
        Policy::new(
            "per-ip".to_owned(),
            Limit::Window(Window::new(
                WindowKind::Sliding,
                30,
                duration_nanos(Duration::from_secs(60)),
            )),
            Duration::from_secs(60),
            None,
        ),
    ];
    let key = KeyConfig {
        id: demo.key_id.clone(),
        owner: "demo".to_owned(),
        scopes: vec!["demo".to_owned()],
        policies: vec!["demo".to_owned()],
        secrets: vec![Secret::new(demo.secret.clone().into_bytes())],
        routes: Vec::new(),
        bound_identities: Vec::new(),
        revoked: false,
    };
    let config = Config {
        listen,
        tls: Some(TlsPaths::new(
            dir.join("server.pem"),
            dir.join("server-key.pem"),
            dir.join("ca.pem"),
        )),
        check: CheckSettings::default(),
        server: ServerSettings::default(),
        alerts: AlertSettings::default(),
        // Denial tallies written every second, so a developer sees them at
        // once (production: one record per subject per minute).
        audit: crate::audit::AuditSettings {
            denial_window: std::time::Duration::from_secs(1),
            ..crate::audit::AuditSettings::default()
        },
        store: Some(StoreSettings {
            dir: dir.join("store"),
            master_key: MasterKeySource::File(dir.join("master.key")),
            postgres_url: None,
            save_state_every: crate::store::SAVE_STATE_EVERY,
        }),
        cluster: None,
        forward_auth: None,
        gateway: Default::default(),
        envoy_ratelimit: None,
        policies,
        keys: vec![key],
        // The dev client certificate may do everything.
        authz: Authz {
            callers: vec![CallerRule {
                identity: Pattern::caller(DEV_CLIENT_ID).expect("valid pattern"),
                roles: HashSet::from([Role::Check, Role::Admin, Role::ForwardIdentity, Role::Sign]),
                key_prefixes: Vec::new(),
                policies: None,
            }],
            clients: Vec::new(),
            plaintext: false,
        },
    };
    Ok(DevSetup {
        dir: dir.to_owned(),
        config,
        demo,
    })
}

/// Records the address actually bound (the port may have been 0).
pub fn record_address(setup: &mut DevSetup, address: SocketAddr) -> Result<(), DevError> {
    setup.demo.address = address.to_string();
    let json = serde_json::to_vec_pretty(&setup.demo).expect("plain struct serializes");
    write_file(&setup.dir.join("demo-key.json"), &json)
}

/// Writes a file readable by its owner only, atomically (see
/// [`crate::private_file::replace`]).
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), DevError> {
    crate::private_file::replace(path, bytes).map_err(io(path))
}
