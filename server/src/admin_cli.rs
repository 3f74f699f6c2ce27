//! `warden keys | policies | audit | cluster | webhooks | store`: the admin
//! API (and webhook signing) from the command
//! line. Human-readable output by default, `--json` for scripts. Connection
//! flags default to the `serve --dev` directory, whose client certificate
//! holds the admin role.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Serialize;
use tonic::transport::Channel;
use warden::model::parse_duration;
use warden_client::proto::admin_client::AdminClient;
use warden_client::proto::warden_client::WardenClient;
use warden_client::proto::{
    AddSecretRequest, AuditRecord, ClusterStatusRequest, CreateKeyRequest, GetKeyRequest, KeyInfo,
    KeyKind, ListAuditRequest, ListKeysRequest, ListPoliciesRequest, LocateLimit,
    LocateStateRequest, PolicyInfo, RevokeRequest, SecretFormat, SignWebhookRequest, StringList,
    UpdateKeyRequest, VerifyAuditRequest, locate_state_request,
};
use warden_client::{Tls, channel};

use crate::{Failure, runtime, usage};

/// Where the server is and which certificate to present.
#[derive(Args, Clone, Debug)]
pub struct ConnArgs {
    /// `serve --dev` directory: default address (demo-key.json) and files.
    #[arg(long, default_value = warden::dev::DEFAULT_DIR, global = true)]
    pub dev_dir: PathBuf,
    /// Server address host:port.
    #[arg(long, env = "WARDEN_TARGET", global = true)]
    pub target: Option<String>,
    /// CA bundle that signed the server certificate (PEM).
    #[arg(long, env = "WARDEN_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, env = "WARDEN_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long = "key", env = "WARDEN_KEY", global = true)]
    pub client_key: Option<PathBuf>,
    /// How long to wait for the server before giving up (a hung server
    /// reads nothing): "60s", "10m". A change not answered in time may
    /// have been made.
    #[arg(long, env = "WARDEN_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration, global = true)]
    pub timeout: std::time::Duration,
}

impl ConnArgs {
    /// `command` (one that talks to the server) within `--timeout`.
    pub async fn within(
        &self,
        command: impl std::future::Future<Output = Result<ExitCode, Failure>>,
    ) -> Result<ExitCode, Failure> {
        match tokio::time::timeout(self.timeout, command).await {
            Ok(done) => done,
            Err(_) => Err(runtime(format!(
                "no answer from warden within {} (--timeout); a change, if this command makes one, may have been made",
                humantime::format_duration(self.timeout)
            ))),
        }
    }

    /// The dev directory's `demo-key.json`.
    pub fn demo(&self) -> Result<warden::dev::DemoKey, String> {
        let path = self.dev_dir.join("demo-key.json");
        let bytes =
            std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is not a demo key file: {e}", path.display()))
    }

    pub fn target(&self) -> Result<String, String> {
        match &self.target {
            Some(t) => Ok(t.clone()),
            None => self
                .demo()
                .map(|d| d.address)
                .map_err(|e| format!("no --target given and {e}")),
        }
    }

    pub fn tls(&self) -> Result<Tls, String> {
        let dir = &self.dev_dir;
        Tls::from_files(
            self.ca.clone().unwrap_or_else(|| dir.join("ca.pem")),
            self.cert.clone().unwrap_or_else(|| dir.join("client.pem")),
            self.client_key
                .clone()
                .unwrap_or_else(|| dir.join("client-key.pem")),
        )
        .map_err(|e| e.to_string())
    }

    pub async fn channel(&self) -> Result<Channel, String> {
        channel(&self.target()?, self.tls()?)
            .await
            .map_err(|e| e.to_string())
    }
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a key; prints its secret (or bearer API key) once.
    Create(KeyCreateArgs),
    /// List keys (all pages).
    List(KeyListArgs),
    /// Show one key (never its secrets).
    Show(KeyShowArgs),
    /// Add a new secret; the old ones stay valid for --grace.
    Rotate(KeyRotateArgs),
    /// Revoke a key, or one of its secrets with --secret.
    Revoke(KeyRevokeArgs),
    /// Replace scopes, routes, bound identities or policies of a key.
    Update(KeyUpdateArgs),
}

#[derive(Args)]
pub struct KeyCreateArgs {
    #[arg(long, default_value = "")]
    pub owner: String,
    /// Key id (default: generated).
    #[arg(long)]
    pub id: Option<String>,
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    #[arg(long = "policy")]
    pub policies: Vec<String>,
    /// "METHOD /path" the key may call (repeatable; default: any).
    #[arg(long = "route")]
    pub routes: Vec<String>,
    /// Client identity the key is bound to (repeatable).
    #[arg(long = "bind")]
    pub bound_identities: Vec<String>,
    /// A bearer API key instead of an HMAC signing secret.
    #[arg(long)]
    pub bearer: bool,
    #[command(flatten)]
    pub secret: SecretArgs,
    #[arg(long)]
    pub json: bool,
}

/// Where an HMAC key's new secret comes from.
#[derive(Args)]
pub struct SecretArgs {
    /// Store the secret read from standard input (one line) instead of
    /// generating one: a webhook provider's signing secret (Stripe's
    /// whsec_..., GitHub's, Slack's). Never echoed back.
    #[arg(long, conflicts_with = "secret_format")]
    pub secret_stdin: bool,
    /// The form of a generated secret: "warden" (wsk_ + hex, default) or
    /// "whsec" (a Standard Webhooks secret, for signing outbound webhooks).
    #[arg(long, value_parser = ["warden", "whsec"])]
    pub secret_format: Option<String>,
}

impl SecretArgs {
    /// The request fields (secret, secret_format); reads stdin if asked.
    fn fields(&self) -> Result<(String, i32), Failure> {
        let format = match self.secret_format.as_deref() {
            Some("whsec") => SecretFormat::Whsec,
            _ => SecretFormat::Warden,
        } as i32;
        if !self.secret_stdin {
            return Ok((String::new(), format));
        }
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| usage(format!("cannot read the secret from stdin: {e}")))?;
        let secret = line.trim_end_matches(['\r', '\n']).to_owned();
        if secret.is_empty() {
            return Err(usage("--secret-stdin: standard input held no secret"));
        }
        Ok((secret, format))
    }
}

#[derive(Args)]
pub struct KeyListArgs {
    #[arg(long)]
    pub owner: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct KeyShowArgs {
    pub key_id: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct KeyRotateArgs {
    pub key_id: String,
    /// How long the old secrets stay valid, e.g. "24h"; "0s" ends them now.
    #[arg(long, default_value = "24h")]
    pub grace: String,
    #[command(flatten)]
    pub secret: SecretArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct KeyRevokeArgs {
    pub key_id: String,
    #[arg(long)]
    pub secret: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct KeyUpdateArgs {
    pub key_id: String,
    /// Comma-separated; "" clears.
    #[arg(long)]
    pub scopes: Option<String>,
    #[arg(long)]
    pub routes: Option<String>,
    #[arg(long)]
    pub bind: Option<String>,
    #[arg(long)]
    pub policies: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum WebhooksCommand {
    /// Sign an outbound webhook payload with a key (needs the "sign" role)
    /// and print the headers to send with it.
    Sign(WebhookSignArgs),
}

#[derive(Args)]
pub struct WebhookSignArgs {
    /// The key whose active secrets sign.
    #[arg(long)]
    pub key_id: String,
    /// "standard-webhooks" or "stripe".
    #[arg(long, value_parser = ["standard-webhooks", "stripe"])]
    pub scheme: String,
    /// The payload file (default: standard input), sent byte for byte.
    #[arg(long)]
    pub payload_file: Option<PathBuf>,
    /// Standard Webhooks message id (default: generated).
    #[arg(long)]
    pub id: Option<String>,
    #[arg(long)]
    pub json: bool,
}

pub async fn webhooks(conn: &ConnArgs, command: WebhooksCommand) -> Result<ExitCode, Failure> {
    let WebhooksCommand::Sign(args) = command;
    let payload = match &args.payload_file {
        Some(path) => std::fs::read(path)
            .map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?,
        None => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                .map_err(|e| usage(format!("cannot read the payload from stdin: {e}")))?;
            buf
        }
    };
    let mut client = match conn.channel().await {
        Ok(c) => WardenClient::new(c),
        Err(e) => return Err(runtime(e)),
    };
    let signed = match client
        .sign_webhook(SignWebhookRequest {
            key_id: args.key_id,
            scheme: args.scheme,
            payload,
            message_id: args.id.unwrap_or_default(),
            timestamp: 0,
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => return Err(s.into()),
    };
    let headers: BTreeMap<&str, &str> = signed
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    if args.json {
        print_json(&headers);
    } else {
        for (name, value) in headers {
            println!("{name}: {value}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
pub enum PoliciesCommand {
    /// Create or replace a policy.
    Put(PolicyPutArgs),
    List(PolicyListArgs),
}

#[derive(Args)]
pub struct PolicyPutArgs {
    pub name: String,
    #[arg(long)]
    pub limit: u64,
    #[arg(long)]
    pub period: String,
    /// "gcra", "sliding_window" or "fixed_window".
    #[arg(long, default_value = "gcra")]
    pub algorithm: String,
    #[arg(long, default_value_t = 0)]
    pub burst: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct PolicyListArgs {
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// The newest records.
    Tail {
        #[arg(short = 'n', default_value_t = 20)]
        count: usize,
        #[arg(long = "key-id")]
        key_id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Check the hash chain (every rotated file); exit 0 when intact, 1
    /// naming the first broken record when not. Without --file or
    /// --store-dir the server verifies its own log.
    Verify {
        /// Verify this one file offline (a rotated or copied file; its first
        /// record's link to earlier ones is taken as given).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Verify offline: the store directory holding the audit files and
        /// `audit.key` (with --file: where the chain key is; default
        /// <dev-dir>/store).
        #[arg(long)]
        store_dir: Option<PathBuf>,
        /// The master key the chain key is sealed under (default:
        /// <dev-dir>/master.key if it exists, else $WARDEN_MASTER_KEY).
        #[arg(long)]
        master_key_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Members, membership version, lease ages and keys owned.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Which node owns a key's state, a request limit's, or an end
    /// client's failure budget; and, asked of that node, whether it still
    /// waits for that state to be handed over.
    #[command(group(clap::ArgGroup::new("what").required(true)
        .args(["key_id", "limit", "client_address", "client_identity"])))]
    Locate {
        /// An API key id.
        #[arg(long)]
        key_id: Option<String>,
        /// A request limit, as POLICY:DESCRIPTOR.
        #[arg(long)]
        limit: Option<String>,
        /// An end client's address, as the gateway forwards it: where its
        /// failed attempts are counted.
        #[arg(long)]
        client_address: Option<String>,
        /// An end client's identity, as the gateway forwards it.
        #[arg(long)]
        client_identity: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Re-encrypt every stored secret under a new master key. Stop the
    /// server first; start it again with the new key.
    RotateMasterKey {
        /// The store directory (embedded store). With --postgres-url-env: a
        /// node's store directory, whose audit chain key is re-sealed too
        /// (run once per node directory).
        #[arg(long, required_unless_present = "postgres_url_env")]
        dir: Option<PathBuf>,
        /// Environment variable holding the PostgreSQL URL (shared store).
        /// Stop every node first.
        #[arg(long)]
        postgres_url_env: Option<String>,
        /// File with the current master key (default: $WARDEN_MASTER_KEY).
        #[arg(long)]
        old_key_file: Option<PathBuf>,
        /// File with the new master key (64 hex characters). Created with a
        /// fresh random key (mode 0600) if it does not exist.
        #[arg(long)]
        new_key_file: PathBuf,
    },
    /// Create what is missing of warden's tables in a PostgreSQL database
    /// (the key store's and the cluster's), and exit. Run it as a role
    /// that may create tables (the database's owner); warden itself can
    /// then run as a role that may only read and write them.
    CreateTables {
        /// Environment variable holding the PostgreSQL URL.
        #[arg(long)]
        postgres_url_env: String,
    },
}

/// What an operator reads when a call fails: the message with its causes,
/// and where the connection broke under the call (which is how a server
/// refusing this client's certificate shows on the client's side in TLS
/// 1.3: after the handshake, often with no reason given), where to look.
pub fn failed_call_text(status: &tonic::Status) -> String {
    let text = warden_client::status_text(status);
    match warden_client::connection_broke(status) {
        true => format!(
            "{text}; the connection broke. If every call ends so, the server \
             may not accept this client certificate (--cert): its log says why \
             (event=tls_handshake_failed)"
        ),
        false => text,
    }
}

/// A refusal from the server: what the operator asked for was wrong (exit
/// 2), or the call failed (exit 1).
impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        let text = failed_call_text(&s);
        match s.code() {
            tonic::Code::InvalidArgument
            | tonic::Code::NotFound
            | tonic::Code::AlreadyExists
            | tonic::Code::FailedPrecondition => usage(text),
            _ => runtime(text),
        }
    }
}

/// `--json` output: epochs for times, names for kinds; derived, so the
/// output changes only when these structs do.
#[derive(Serialize)]
struct KeyView<'a> {
    key_id: &'a str,
    owner: &'a str,
    kind: &'static str,
    scopes: &'a [String],
    policies: &'a [String],
    routes: &'a [String],
    bound_identities: &'a [String],
    revoked: bool,
    created_at: i64,
    source: &'a str,
    secrets: Vec<SecretView<'a>>,
}

#[derive(Serialize)]
struct SecretView<'a> {
    secret_id: &'a str,
    created_at: i64,
    valid_until: i64,
    revoked: bool,
}

impl<'a> From<&'a KeyInfo> for KeyView<'a> {
    fn from(k: &'a KeyInfo) -> Self {
        Self {
            key_id: &k.key_id,
            owner: &k.owner,
            kind: if k.kind == KeyKind::Bearer as i32 {
                "bearer"
            } else {
                "hmac"
            },
            scopes: &k.scopes,
            policies: &k.policies,
            routes: &k.routes,
            bound_identities: &k.bound_identities,
            revoked: k.revoked,
            created_at: k.created_at,
            source: &k.source,
            secrets: k
                .secrets
                .iter()
                .map(|s| SecretView {
                    secret_id: &s.secret_id,
                    created_at: s.created_at,
                    valid_until: s.valid_until,
                    revoked: s.revoked,
                })
                .collect(),
        }
    }
}

/// A new key with its credential, shown once.
#[derive(Serialize)]
struct CreatedView<'a> {
    #[serde(flatten)]
    key: KeyView<'a>,
    #[serde(skip_serializing_if = "str::is_empty")]
    secret_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    secret: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    api_key: &'a str,
}

#[derive(Serialize)]
struct RotatedView<'a> {
    key_id: Option<&'a str>,
    secret_id: &'a str,
    secret: &'a str,
    old_valid_until: i64,
}

#[derive(Serialize)]
struct PolicyView<'a> {
    name: &'a str,
    algorithm: &'a str,
    limit: u64,
    period: &'a str,
    burst: u64,
}

#[derive(Serialize)]
struct RecordView<'a> {
    seq: u64,
    time_ms: i64,
    actor: &'a str,
    action: &'a str,
    key_id: &'a str,
    detail: &'a str,
    hash: &'a str,
}

fn print_json(value: &impl Serialize) {
    println!("{}", serde_json::to_string(value).expect("views serialize"));
}

fn key_json(k: &KeyInfo) -> KeyView<'_> {
    KeyView::from(k)
}

fn print_key(k: &KeyInfo) {
    let kind = if k.kind == KeyKind::Bearer as i32 {
        "bearer"
    } else {
        "hmac"
    };
    let state = if k.revoked { "REVOKED" } else { "active" };
    println!(
        "{}  ({kind}, {state}, owner {:?}, from {})",
        k.key_id, k.owner, k.source
    );
    let list = |l: &[String]| {
        if l.is_empty() {
            "-".to_owned()
        } else {
            l.join(", ")
        }
    };
    println!("  scopes:   {}", list(&k.scopes));
    println!("  policies: {}", list(&k.policies));
    println!("  routes:   {}", list(&k.routes));
    println!("  bound to: {}", list(&k.bound_identities));
    for s in &k.secrets {
        let until = if s.valid_until > 0 {
            format!("valid until {}", rfc3339(s.valid_until))
        } else {
            "no expiry".into()
        };
        let state = if s.revoked { "revoked" } else { until.as_str() };
        println!(
            "  secret {} (created {}, {state})",
            s.secret_id,
            rfc3339(s.created_at)
        );
    }
}

/// Unix seconds as an RFC 3339 UTC time, e.g. `2026-11-29T10:46:08Z`, for
/// people; `--json` keeps the epoch numbers for scripts.
fn rfc3339(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Unix milliseconds as RFC 3339 with milliseconds.
fn rfc3339_ms(ms: i64) -> String {
    let secs = rfc3339(ms.div_euclid(1000));
    format!("{}.{:03}Z", &secs[..secs.len() - 1], ms.rem_euclid(1000))
}

fn split(list: Option<String>) -> Option<StringList> {
    list.map(|l| StringList {
        values: l
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

pub async fn keys(conn: &ConnArgs, command: KeysCommand) -> Result<ExitCode, Failure> {
    let mut admin = match conn.channel().await {
        Ok(c) => AdminClient::new(c),
        Err(e) => return Err(runtime(e)),
    };
    match command {
        KeysCommand::Create(args) => create_key(&mut admin, args).await?,
        KeysCommand::List(args) => list_keys(&mut admin, args).await?,
        KeysCommand::Show(args) => show_key(&mut admin, args).await?,
        KeysCommand::Rotate(args) => rotate_key(&mut admin, args).await?,
        KeysCommand::Revoke(args) => revoke_key(&mut admin, args).await?,
        KeysCommand::Update(args) => update_key(&mut admin, args).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn create_key(admin: &mut AdminClient<Channel>, args: KeyCreateArgs) -> Result<(), Failure> {
    let KeyCreateArgs {
        owner,
        id,
        scopes,
        policies,
        routes,
        bound_identities,
        bearer,
        secret,
        json,
    } = args;
    let (given, secret_format) = secret.fields()?;
    let imported = !given.is_empty();
    let request = CreateKeyRequest {
        key_id: id.unwrap_or_default(),
        owner,
        scopes,
        policies,
        routes,
        bound_identities,
        kind: if bearer {
            KeyKind::Bearer
        } else {
            KeyKind::Hmac
        } as i32,
        secret: given,
        secret_format,
    };
    let r = match admin.create_key(request).await {
        Ok(r) => r.into_inner(),
        Err(s) => return Err(s.into()),
    };
    let key = r.key.unwrap_or_default();
    if json {
        print_json(&CreatedView {
            key: KeyView::from(&key),
            secret_id: &r.secret_id,
            secret: &r.secret,
            api_key: &r.api_key,
        });
    } else {
        print_key(&key);
        if bearer {
            println!("\napi key (shown once, store it now): {}", r.api_key);
        } else if imported {
            println!("\nsecret {}: stored, sealed", r.secret_id);
        } else {
            println!("\nsecret (shown once, store it now): {}", r.secret);
        }
    }
    Ok(())
}

async fn list_keys(admin: &mut AdminClient<Channel>, args: KeyListArgs) -> Result<(), Failure> {
    let KeyListArgs { owner, json } = args;
    let mut token = String::new();
    let mut all = Vec::new();
    loop {
        let request = ListKeysRequest {
            page_size: 500,
            page_token: token,
            owner: owner.clone().unwrap_or_default(),
        };
        let page = match admin.list_keys(request).await {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(s.into()),
        };
        all.extend(page.keys);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    if json {
        print_json(&all.iter().map(key_json).collect::<Vec<_>>());
    } else {
        for k in &all {
            let state = if k.revoked { "revoked" } else { "active" };
            println!(
                "{:<40} {:<8} {:<24} {}",
                k.key_id,
                state,
                k.owner,
                k.policies.join(",")
            );
        }
        println!("{} keys", all.len());
    }
    Ok(())
}

async fn show_key(admin: &mut AdminClient<Channel>, args: KeyShowArgs) -> Result<(), Failure> {
    let KeyShowArgs { key_id, json } = args;
    match admin.get_key(GetKeyRequest { key_id }).await {
        Ok(r) if json => print_json(&key_json(&r.into_inner())),
        Ok(r) => print_key(&r.into_inner()),
        Err(s) => return Err(s.into()),
    };
    Ok(())
}

async fn rotate_key(admin: &mut AdminClient<Channel>, args: KeyRotateArgs) -> Result<(), Failure> {
    let KeyRotateArgs {
        key_id,
        grace,
        secret,
        json,
    } = args;
    let (given, secret_format) = secret.fields()?;
    let imported = !given.is_empty();
    let grace = match parse_duration("--grace", &grace) {
        Ok(g) => g,
        Err(e) => return Err(usage(e)),
    };
    let until = warden_client::signing::unix_now() + grace.as_secs() as i64;
    let r = match admin
        .add_secret(AddSecretRequest {
            key_id,
            old_valid_until: until.max(1),
            secret: given,
            secret_format,
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => return Err(s.into()),
    };
    if json {
        print_json(&RotatedView {
            key_id: r.key.as_ref().map(|k| k.key_id.as_str()),
            secret_id: &r.secret_id,
            secret: &r.secret,
            old_valid_until: until,
        });
    } else if imported {
        println!("new secret {}: stored, sealed", r.secret_id);
        println!("the previous secrets stay valid until {}", rfc3339(until));
    } else {
        println!(
            "new secret {} (shown once, store it now): {}",
            r.secret_id, r.secret
        );
        println!("the previous secrets stay valid until {}", rfc3339(until));
    }
    Ok(())
}

async fn revoke_key(admin: &mut AdminClient<Channel>, args: KeyRevokeArgs) -> Result<(), Failure> {
    let KeyRevokeArgs {
        key_id,
        secret,
        json,
    } = args;
    match admin
        .revoke(RevokeRequest {
            key_id,
            secret_id: secret.unwrap_or_default(),
        })
        .await
    {
        Ok(r) if json => print_json(&key_json(&r.into_inner())),
        Ok(r) => {
            let k = r.into_inner();
            println!("revoked; effective for the next check");
            print_key(&k);
        }
        Err(s) => return Err(s.into()),
    }
    Ok(())
}

async fn update_key(admin: &mut AdminClient<Channel>, args: KeyUpdateArgs) -> Result<(), Failure> {
    let KeyUpdateArgs {
        key_id,
        scopes,
        routes,
        bind,
        policies,
        json,
    } = args;
    let request = UpdateKeyRequest {
        key_id,
        scopes: split(scopes),
        routes: split(routes),
        bound_identities: split(bind),
        policies: split(policies),
    };
    match admin.update_key(request).await {
        Ok(r) if json => print_json(&key_json(&r.into_inner())),
        Ok(r) => print_key(&r.into_inner()),
        Err(s) => return Err(s.into()),
    }
    Ok(())
}

fn policy_json(p: &PolicyInfo) -> PolicyView<'_> {
    PolicyView {
        name: &p.name,
        algorithm: &p.algorithm,
        limit: p.limit,
        period: &p.period,
        burst: p.burst,
    }
}

pub async fn policies(conn: &ConnArgs, command: PoliciesCommand) -> Result<ExitCode, Failure> {
    let mut admin = match conn.channel().await {
        Ok(c) => AdminClient::new(c),
        Err(e) => return Err(runtime(e)),
    };
    match command {
        PoliciesCommand::Put(args) => put_policy(&mut admin, args).await?,
        PoliciesCommand::List(args) => list_policies(&mut admin, args).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn put_policy(admin: &mut AdminClient<Channel>, args: PolicyPutArgs) -> Result<(), Failure> {
    let PolicyPutArgs {
        name,
        limit,
        period,
        algorithm,
        burst,
        json,
    } = args;
    match admin
        .put_policy(PolicyInfo {
            name,
            algorithm,
            limit,
            period,
            burst,
        })
        .await
    {
        Ok(r) if json => print_json(&policy_json(&r.into_inner())),
        Ok(r) => {
            let p = r.into_inner();
            println!(
                "policy {}: {} per {} ({})",
                p.name, p.limit, p.period, p.algorithm
            );
        }
        Err(s) => return Err(s.into()),
    }
    Ok(())
}

async fn list_policies(
    admin: &mut AdminClient<Channel>,
    args: PolicyListArgs,
) -> Result<(), Failure> {
    let PolicyListArgs { json } = args;
    match admin.list_policies(ListPoliciesRequest {}).await {
        Ok(r) => {
            let list = r.into_inner().policies;
            if json {
                print_json(&list.iter().map(policy_json).collect::<Vec<_>>());
            } else {
                for p in &list {
                    let burst = if p.burst > 0 {
                        format!(", burst {}", p.burst)
                    } else {
                        String::new()
                    };
                    println!(
                        "{:<24} {} per {} ({}{burst})",
                        p.name, p.limit, p.period, p.algorithm
                    );
                }
            }
        }
        Err(s) => return Err(s.into()),
    };
    Ok(())
}

/// Every audit record the server has, oldest first.
/// The newest `count` records (of one key, when given), oldest first:
/// read from the end, a page at a time, so a tail of a large log reads
/// only what it prints (and what the key filter passes over).
async fn newest_records(
    admin: &mut AdminClient<Channel>,
    key_id: &str,
    count: usize,
) -> Result<Vec<AuditRecord>, tonic::Status> {
    let mut token = String::new();
    let mut out = Vec::new();
    while out.len() < count {
        let request = ListAuditRequest {
            page_size: u32::try_from(count - out.len())
                .unwrap_or(u32::MAX)
                .min(1000),
            page_token: token,
            key_id: key_id.to_owned(),
            newest_first: true,
            ..Default::default()
        };
        let page = admin.list_audit(request).await?.into_inner();
        out.extend(page.records);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    out.truncate(count);
    out.reverse();
    Ok(out)
}

fn record_json(r: &AuditRecord) -> RecordView<'_> {
    RecordView {
        seq: r.seq,
        time_ms: r.time_ms,
        actor: &r.actor,
        action: &r.action,
        key_id: &r.key_id,
        detail: &r.detail,
        hash: &r.hash,
    }
}

impl AuditCommand {
    /// Reads files here, without the server (no `--timeout`: a long log
    /// takes as long as it takes).
    pub fn is_offline(&self) -> bool {
        matches!(self, AuditCommand::Verify { file, store_dir, .. } if file.is_some() || store_dir.is_some())
    }
}

pub async fn audit(conn: &ConnArgs, command: AuditCommand) -> Result<ExitCode, Failure> {
    match command {
        AuditCommand::Verify {
            file: None,
            store_dir: None,
            master_key_file: _,
        } => {
            let mut admin = match conn.channel().await {
                Ok(c) => AdminClient::new(c),
                Err(e) => return Err(runtime(e)),
            };
            match admin.verify_audit(VerifyAuditRequest {}).await {
                Ok(r) => {
                    let r = r.into_inner();
                    if r.intact {
                        report(Ok(warden::audit::Intact {
                            records: r.records,
                            unkeyed: r.unkeyed_records,
                            first_seq: 1,
                        }))
                    } else {
                        eprintln!("audit log BROKEN at {}", r.broken);
                        Ok(ExitCode::FAILURE)
                    }
                }
                Err(s) => Err(s.into()),
            }
        }
        AuditCommand::Verify {
            file,
            store_dir,
            master_key_file,
        } => {
            let store_dir = store_dir.unwrap_or_else(|| conn.dev_dir.join("store"));
            let master = match offline_master_key(conn, master_key_file) {
                Ok(m) => m,
                Err(e) => return Err(usage(e)),
            };
            let verified = match file {
                None => warden::audit::verify_dir(&store_dir, &master),
                Some(file) => warden::audit::verify_file(&file, &store_dir, &master),
            };
            match verified {
                Ok(result) => report(result),
                Err(e) => Err(runtime(e)),
            }
        }
        AuditCommand::Tail {
            count,
            key_id,
            json,
        } => {
            let mut admin = match conn.channel().await {
                Ok(c) => AdminClient::new(c),
                Err(e) => return Err(runtime(e)),
            };
            let records =
                match newest_records(&mut admin, key_id.as_deref().unwrap_or(""), count).await {
                    Ok(r) => r,
                    Err(s) => return Err(s.into()),
                };
            for r in &records {
                if json {
                    print_json(&record_json(r));
                } else {
                    println!(
                        "#{:<6} {} {:<14} key={:<24} by {}  {}",
                        r.seq,
                        rfc3339_ms(r.time_ms),
                        r.action,
                        r.key_id,
                        r.actor,
                        r.detail
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn report(
    result: Result<warden::audit::Intact, warden::audit::Broken>,
) -> Result<ExitCode, Failure> {
    match result {
        Ok(intact) => {
            let unkeyed = match intact.unkeyed {
                0 => String::new(),
                n => format!(" ({n} from before the chain was keyed, vouched for by it)"),
            };
            println!(
                "audit log intact: {} records{unkeyed}, every hash links",
                intact.records
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(b) => {
            eprintln!("audit log BROKEN at {b}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The master key for offline verification: the given file, the dev
/// directory's, or $WARDEN_MASTER_KEY.
fn offline_master_key(
    conn: &ConnArgs,
    file: Option<PathBuf>,
) -> Result<warden::crypto::MasterKey, String> {
    let dev = conn.dev_dir.join("master.key");
    let file = file.or_else(|| dev.exists().then_some(dev));
    match file {
        Some(f) => warden::crypto::MasterKey::from_file(&f).map_err(|e| e.to_string()),
        None => std::env::var("WARDEN_MASTER_KEY")
            .map_err(|_| "no --master-key-file and WARDEN_MASTER_KEY is not set".to_owned())
            .and_then(|t| warden::crypto::MasterKey::from_hex(&t).map_err(|e| e.to_string())),
    }
}

pub async fn store(command: StoreCommand) -> Result<ExitCode, Failure> {
    let (dir, postgres_url_env, old_key_file, new_key_file) = match command {
        StoreCommand::RotateMasterKey {
            dir,
            postgres_url_env,
            old_key_file,
            new_key_file,
        } => (dir, postgres_url_env, old_key_file, new_key_file),
        StoreCommand::CreateTables { postgres_url_env } => {
            return create_tables(&postgres_url_env).await;
        }
    };
    let old = match &old_key_file {
        Some(f) => warden::crypto::MasterKey::from_file(f).map_err(|e| e.to_string()),
        None => std::env::var("WARDEN_MASTER_KEY")
            .map_err(|_| "no --old-key-file and WARDEN_MASTER_KEY is not set".to_owned())
            .and_then(|t| warden::crypto::MasterKey::from_hex(&t).map_err(|e| e.to_string())),
    };
    let old = match old {
        Ok(k) => k,
        Err(e) => return Err(usage(format!("current master key: {e}"))),
    };
    if !new_key_file.exists() {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&new_key_file)
            .and_then(|mut f| {
                f.write_all(warden::crypto::MasterKey::generate_hex().as_bytes())
                    .and_then(|_| f.sync_all())
            });
        if let Err(e) = created {
            return Err(runtime(format!(
                "cannot create {}: {e}",
                new_key_file.display()
            )));
        }
    }
    let new = match warden::crypto::MasterKey::from_file(&new_key_file) {
        Ok(k) => k,
        Err(e) => return Err(usage(format!("new master key: {e}"))),
    };
    use warden::store::RotationTarget;
    let url = match &postgres_url_env {
        Some(var) => Some(std::env::var(var).map_err(|_| {
            usage(format!(
                "--postgres-url-env: environment variable {var} is not set"
            ))
        })?),
        None => None,
    };
    let target = match (&dir, &url) {
        (Some(dir), None) => RotationTarget::Journal(dir),
        (node_dir, Some(url)) => RotationTarget::Database {
            url,
            node_dir: node_dir.as_deref(),
        },
        (None, None) => return Err(usage("give --dir or --postgres-url-env")),
    };
    let rotated = warden::store::rotate_master_key(target, &old, &new).await;
    match rotated {
        Ok(rotated) => {
            let store = match rotated.secrets {
                Some(n) => format!("re-encrypted {n} secrets"),
                None => "the store was already under the new master key".to_owned(),
            };
            let audit = if rotated.audit_key {
                "; re-sealed the audit chain key"
            } else {
                ""
            };
            println!(
                "{store}{audit}; start warden with the new master key ({})",
                new_key_file.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(runtime(e)),
    }
}

/// `warden store create-tables`.
async fn create_tables(url_env: &str) -> Result<ExitCode, Failure> {
    let url = std::env::var(url_env).map_err(|_| {
        usage(format!(
            "--postgres-url-env: environment variable {url_env} is not set"
        ))
    })?;
    let created = async {
        let (client, connection) = warden::postgres::connect(&url)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let connection = tokio::spawn(connection);
        warden::postgres::create_missing(&client, &warden::store::TABLES).await?;
        warden::cluster::membership::prepare_tables(&client).await?;
        drop(client);
        let _ = connection.await;
        Ok::<_, String>(())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(60), created).await {
        Ok(Ok(())) => {
            println!(
                "warden's tables are in place. A role that serves needs SELECT, INSERT, \
                 UPDATE and DELETE on warden_meta, warden_keys, warden_policies, \
                 warden_members and warden_membership_log, and USAGE on the sequence \
                 warden_renewals; nothing more"
            );
            Ok(ExitCode::SUCCESS)
        }
        Ok(Err(e)) => Err(runtime(e)),
        Err(_) => Err(runtime("PostgreSQL did not answer within 60 s")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_950_368), "2026-11-29T11:06:08Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339_ms(1_795_950_368_042), "2026-11-29T11:06:08.042Z");
    }
}

#[derive(Serialize)]
struct MemberView<'a> {
    node: &'a str,
    advertise: &'a str,
    lease_left_ms: u64,
    joined_at_ms: i64,
    keys_owned: u64,
    clock_ahead_ms: Option<i64>,
}

#[derive(Serialize)]
struct AwaitedView<'a> {
    node: &'a str,
    slots: u32,
}

#[derive(Serialize)]
struct ClusterView<'a> {
    node: &'a str,
    version: u64,
    coordinator_ok: bool,
    members: Vec<MemberView<'a>>,
    awaiting: Vec<AwaitedView<'a>>,
    awaiting_for_ms: u64,
}

pub async fn cluster(conn: &ConnArgs, command: ClusterCommand) -> Result<ExitCode, Failure> {
    match command {
        ClusterCommand::Status { json } => cluster_status(conn, json).await,
        ClusterCommand::Locate {
            key_id,
            limit,
            client_address,
            client_identity,
            json,
        } => {
            let of = match (key_id, limit, client_address, client_identity) {
                (Some(key), ..) => locate_state_request::Of::KeyId(key),
                (_, Some(limit), ..) => {
                    let (policy, descriptor) = limit
                        .split_once(':')
                        .ok_or_else(|| usage("--limit: give POLICY:DESCRIPTOR"))?;
                    locate_state_request::Of::Limit(LocateLimit {
                        policy: policy.to_owned(),
                        descriptor: descriptor.to_owned(),
                    })
                }
                (_, _, Some(address), _) => locate_state_request::Of::ClientAddress(address),
                (_, _, _, Some(identity)) => locate_state_request::Of::ClientIdentity(identity),
                _ => {
                    return Err(usage(
                        "give --key-id, --limit, --client-address or --client-identity",
                    ));
                }
            };
            locate(conn, of, json).await
        }
    }
}

async fn locate(
    conn: &ConnArgs,
    of: locate_state_request::Of,
    json: bool,
) -> Result<ExitCode, Failure> {
    let mut admin = AdminClient::new(conn.channel().await.map_err(runtime)?);
    let found = admin
        .locate_state(LocateStateRequest { of: Some(of) })
        .await?
        .into_inner();
    if json {
        print_json(&serde_json::json!({
            "node": found.node,
            "slot": found.slot,
            "version": found.version,
            "awaiting": found.awaiting,
        }));
    } else {
        println!(
            "slot {} is owned by {} (membership version {})",
            found.slot,
            if found.node.is_empty() {
                "nobody"
            } else {
                &found.node
            },
            found.version
        );
        if !found.awaiting.is_empty() {
            println!(
                "{} waits for {} to hand it over, and answers for it once handed",
                found.node,
                found.awaiting.join(", ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn cluster_status(conn: &ConnArgs, json: bool) -> Result<ExitCode, Failure> {
    let mut admin = AdminClient::new(conn.channel().await.map_err(runtime)?);
    let status = admin
        .cluster_status(ClusterStatusRequest {})
        .await?
        .into_inner();
    if json {
        print_json(&ClusterView {
            node: &status.node,
            version: status.version,
            coordinator_ok: status.coordinator_ok,
            members: status
                .members
                .iter()
                .map(|m| MemberView {
                    node: &m.node,
                    advertise: &m.advertise,
                    lease_left_ms: m.lease_left_ms,
                    joined_at_ms: m.joined_at_ms,
                    keys_owned: m.keys_owned,
                    clock_ahead_ms: m.clock_ahead_ms,
                })
                .collect(),
            awaiting: status
                .awaiting
                .iter()
                .map(|a| AwaitedView {
                    node: &a.node,
                    slots: a.slots,
                })
                .collect(),
            awaiting_for_ms: status.awaiting_for_ms,
        });
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "cluster as seen by {}: membership version {}, coordinator {}",
        status.node,
        status.version,
        if status.coordinator_ok {
            "reachable"
        } else {
            "UNREACHABLE (last membership seen)"
        }
    );
    for m in &status.members {
        let clock = match m.clock_ahead_ms {
            Some(ms) => format!("clock {:+.3} s", ms as f64 / 1000.0),
            None => "clock not reported".to_owned(),
        };
        println!(
            "  {:<24} {:<24} lease {:>5} ms left  joined {}  owns {} keys  {clock} against the database",
            m.node,
            m.advertise,
            m.lease_left_ms,
            rfc3339_ms(m.joined_at_ms),
            m.keys_owned
        );
    }
    for a in &status.awaiting {
        println!(
            "  waiting {:.1} s for {} to hand over {} slots (this node is not ready until it has; one that never does is given up on)",
            status.awaiting_for_ms as f64 / 1000.0,
            a.node,
            a.slots
        );
    }
    Ok(ExitCode::SUCCESS)
}
