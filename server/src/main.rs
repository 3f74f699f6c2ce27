//! The `warden` command: `serve` runs the server, `check` signs one request
//! and asks a running server about it.
#![forbid(unsafe_code)]

mod admin_cli;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use admin_cli::{
    AuditCommand, ClusterCommand, ConnArgs, KeysCommand, PoliciesCommand, StoreCommand,
    WebhooksCommand,
};
use clap::{Args, Parser, Subcommand};
use warden::config::{Config, DEFAULT_LISTEN};
use warden::dev;
use warden::server::{Bound, ServeError, shutdown_signal};
use warden_client::Client;
use warden_client::proto::{Decision, LimitRequest, Reason};
use warden_client::reason_name;
use warden_client::signing::Signer;

/// Exit code for a bad command line or config: the operator must fix input.
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "warden",
    version,
    about = "Atomic rate limiting, freshness, replay and signature checks over mTLS gRPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Sign one request with a key and ask a running server to check it.
    Check(CheckArgs),
    /// Work with config files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage API keys (admin API).
    Keys {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage rate-limit policies (admin API).
    Policies {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        command: PoliciesCommand,
    },
    /// Read and verify the audit log (admin API).
    Audit {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The cluster as a node sees it (admin API).
    Cluster {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Outbound webhooks: sign a payload so the app never holds the secret.
    Webhooks {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        command: WebhooksCommand,
    },
    /// Offline operations on the key store.
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file (TLS files included) without serving. Exit 0
    /// when it is valid, 2 with one line naming the problem when not.
    Check {
        /// The config file.
        file: PathBuf,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Development mode: make (or reuse) a throwaway CA, certificates and a
    /// demo key in --dev-dir, then serve mTLS on loopback.
    #[arg(long, conflicts_with = "config")]
    dev: bool,
    /// Where --dev keeps its files.
    #[arg(long, default_value = dev::DEFAULT_DIR)]
    dev_dir: PathBuf,
    /// Config file (TOML); see README.
    #[arg(long, required_unless_present = "dev")]
    config: Option<PathBuf>,
    /// Address to listen on; overrides the config file.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Where to serve Prometheus metrics and HTTP probes (plain HTTP), or
    /// "off"; overrides the config file. Default 127.0.0.1:9464.
    #[arg(long)]
    metrics_listen: Option<String>,
}

#[derive(Args)]
struct CheckArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The API key id to sign with (default: the demo key).
    #[arg(long)]
    key_id: Option<String>,
    /// Environment variable holding the signing secret (default: the demo key's).
    #[arg(long)]
    secret_env: Option<String>,
    #[arg(long, default_value = "GET")]
    method: String,
    #[arg(long, default_value = "/hello")]
    path: String,
    #[arg(long, default_value = "")]
    query: String,
    #[arg(long, default_value = "")]
    body: String,
    /// Extra limit as POLICY=DESCRIPTOR, e.g. per-ip=203.0.113.7. Repeatable.
    #[arg(long = "limit")]
    limits: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    // WARDEN_WORKER_THREADS overrides tokio's default (one per core).
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = std::env::var("WARDEN_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
    {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warden: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => exit(serve(args).await),
            Command::Check(args) => exit(args.conn.within(check(&args)).await),
            Command::Config(ConfigCommand::Check { file }) => exit(config_check(&file)),
            Command::Keys { conn, command } => {
                exit(conn.within(admin_cli::keys(&conn, command)).await)
            }
            Command::Policies { conn, command } => {
                exit(conn.within(admin_cli::policies(&conn, command)).await)
            }
            Command::Audit { conn, command } if command.is_offline() => {
                exit(admin_cli::audit(&conn, command).await)
            }
            Command::Audit { conn, command } => {
                exit(conn.within(admin_cli::audit(&conn, command)).await)
            }
            Command::Cluster { conn, command } => {
                exit(conn.within(admin_cli::cluster(&conn, command)).await)
            }
            Command::Webhooks { conn, command } => {
                exit(conn.within(admin_cli::webhooks(&conn, command)).await)
            }
            Command::Store(command) => exit(admin_cli::store(command).await),
        }
    });
    // Dropping the runtime would wait for its blocking threads without
    // end, and one may be stuck in a write to a disk that hangs (the clock
    // mark's, say): every write that was acknowledged was awaited before
    // this point, so what is left may be abandoned, and the process ends.
    runtime.shutdown_timeout(EXIT_GRACE);
    code
}

/// How long blocking work still under way at exit may hold the process.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// JSON lines when stderr is not a terminal (log shippers), text otherwise.
/// `RUST_LOG` overrides the default `info` level.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.init();
    } else {
        builder.json().flatten_event(true).init();
    }
}

/// Why a command failed, for its exit code: the operator's input was wrong
/// (a bad flag, config, certificate or master key: exit 2), or something at
/// run time failed (a port in use, a server that cannot be reached: exit 1).
/// Mapped to an exit code in one place, `main`.
#[derive(Debug)]
enum Failure {
    Usage(String),
    Runtime(String),
}

fn usage(msg: impl std::fmt::Display) -> Failure {
    Failure::Usage(msg.to_string())
}

fn runtime(msg: impl std::fmt::Display) -> Failure {
    Failure::Runtime(msg.to_string())
}

impl From<ServeError> for Failure {
    fn from(e: ServeError) -> Self {
        match e {
            ServeError::Bind { .. }
            | ServeError::DrainTimeout
            | ServeError::Reflection(_)
            | ServeError::Runtime(_)
            | ServeError::Cluster(_)
            // Another process has the directory: as a port in use.
            | ServeError::Store(warden::store::StoreError::InUse(_)) => runtime(e),
            ServeError::Tls(_)
            | ServeError::Store(_)
            | ServeError::Keys(_)
            | ServeError::Audit(_)
            | ServeError::ClockMark(_)
            | ServeError::FenceRecord(_) => usage(e),
        }
    }
}

/// The exit code of a command's result (commands that answer "no" without
/// failing, like a denied `warden check`, return `Ok(ExitCode::FAILURE)`).
fn exit(result: Result<ExitCode, Failure>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(Failure::Usage(msg)) => {
            eprintln!("warden: {msg}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Runtime(msg)) => {
            eprintln!("warden: {msg}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<ExitCode, Failure> {
    let mut dev_setup = None;
    let mut config = if args.dev {
        let listen = args
            .listen
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default"));
        match dev::prepare(&args.dev_dir, listen) {
            Ok(setup) => {
                let config = setup.config.clone();
                dev_setup = Some(setup);
                config
            }
            Err(e) => return Err(usage(e)),
        }
    } else {
        let path = args
            .config
            .as_deref()
            .expect("clap requires --config without --dev");
        Config::load(path).map_err(|e| usage(format!("invalid config: {e}")))?
    };
    if let Some(listen) = args.listen {
        if config.tls.is_none() && !listen.ip().is_loopback() {
            return Err(usage(
                "--listen: plaintext is only allowed on a loopback address",
            ));
        }
        config.listen = listen;
    }
    if let Some(text) = &args.metrics_listen {
        config.server.metrics_listen =
            warden::config::parse_metrics_listen("--metrics-listen", text).map_err(usage)?;
    }

    let bound = Bound::bind(&config).await?;
    let addr = bound
        .local_addr()
        .map_err(|e| runtime(format!("cannot read the bound address: {e}")))?;
    let metrics = match bound.metrics_addr() {
        Some(metrics_addr) => match warden::metrics::install() {
            Ok(handle) => {
                tracing::info!(event = "metrics_listening", addr = %metrics_addr, "metrics at http://{metrics_addr}/metrics");
                println!("metrics on {metrics_addr} (/metrics, /readyz, /livez)");
                Some(handle)
            }
            Err(e) => return Err(runtime(format!("cannot set up metrics: {e}"))),
        },
        None => None,
    };
    if let Some(setup) = dev_setup.as_mut() {
        dev::record_address(setup, addr).map_err(runtime)?;
        print_dev_banner(setup, addr);
    }
    // What a listener serves, as its line on stdout says.
    let transport = |tls: bool| {
        if tls {
            "mTLS"
        } else {
            "PLAINTEXT, loopback only"
        }
    };
    let mode = transport(bound.is_tls());
    if let Some((forward_auth, tls)) = bound.forward_auth_addr() {
        let mode = transport(tls);
        tracing::info!(event = "forward_auth_listening", addr = %forward_auth, mode, "forward auth is serving");
        println!("forward auth on {forward_auth} ({mode})");
    }
    tracing::info!(event = "listening", %addr, mode, "warden is serving");
    // Tests and scripts wait for this exact line on stdout.
    println!("listening on {addr} ({mode})");

    match bound.serve(shutdown_signal(), metrics).await {
        Ok(()) => {
            tracing::info!(event = "stopped", "warden stopped");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            tracing::error!(event = "server_failed", error = %e, "warden stopped with an error");
            Err(runtime(e))
        }
    }
}

fn config_check(file: &Path) -> Result<ExitCode, Failure> {
    let config = Config::load(file).map_err(|e| usage(format!("invalid config: {e}")))?;
    if let Some(paths) = &config.tls
        && let Err(e) = warden::tls::TlsReloader::new(paths.clone())
    {
        return Err(usage(format!("invalid config: {e}")));
    }
    println!(
        "{}: valid ({} keys, {} policies, {} caller rules, {})",
        file.display(),
        config.keys.len(),
        config.policies.len(),
        config.authz.callers.len(),
        if config.tls.is_some() {
            "mTLS"
        } else {
            "plaintext on loopback"
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn print_dev_banner(setup: &dev::DevSetup, addr: SocketAddr) {
    let dir = setup.dir.display();
    println!("warden dev mode (throwaway certificates; do not use in production)");
    println!(
        "  CA, server and client certificates: {dir}/ca.pem, server.pem, client.pem (+ *-key.pem)"
    );
    println!(
        "  demo key: {dir}/demo-key.json (key id {}, policy \"demo\": 100 requests per minute)",
        setup.demo.key_id
    );
    println!("  try it from another terminal:");
    println!(
        "    cargo run --release -q -p warden-server -- check --dev-dir {dir} --method POST --path /orders --body '{{\"qty\":1}}'"
    );
    println!("  server address: {addr}");
}

async fn check(args: &CheckArgs) -> Result<ExitCode, Failure> {
    let demo = args.conn.demo();
    let target = args.conn.target().map_err(usage)?;
    let (key_id, secret) = match (&args.key_id, &args.secret_env, &demo) {
        (Some(id), Some(var), _) => match std::env::var(var) {
            Ok(s) => (id.clone(), s),
            Err(_) => {
                return Err(usage(format!(
                    "--secret-env: environment variable {var} is not set"
                )));
            }
        },
        (None, None, Ok(d)) => (d.key_id.clone(), d.secret.clone()),
        (Some(_), None, _) | (None, Some(_), _) => {
            return Err(usage("give --key-id and --secret-env together"));
        }
        (None, None, Err(e)) => return Err(usage(format!("no key given and {e}"))),
    };
    let tls = args.conn.tls().map_err(usage)?;
    let mut limits = Vec::new();
    for l in &args.limits {
        let Some((policy, descriptor)) = l.split_once('=') else {
            return Err(usage(format!("--limit {l:?}: expected POLICY=DESCRIPTOR")));
        };
        limits.push(LimitRequest {
            policy: policy.to_owned(),
            descriptor: descriptor.to_owned(),
        });
    }
    // The client's own deadline is the command's.
    let mut client = Client::connect(&target, tls)
        .await
        .map_err(runtime)?
        .with_timeout(args.conn.timeout);
    let signer = Signer::new(key_id, secret.into_bytes());
    let mut request =
        signer.check_request(&args.method, &args.path, &args.query, args.body.as_bytes());
    request.limits = limits;
    match client.check(request).await {
        Ok(r) => {
            println!(
                "decision:    {}",
                if r.decision() == Decision::Allow {
                    "ALLOW"
                } else {
                    "DENY"
                }
            );
            println!("reason:      {}", reason_name(r.reason()));
            println!("http status: {}", r.http_status);
            if !r.message.is_empty() {
                println!("message:     {}", r.message);
            }
            if r.retry_after_ms > 0 {
                println!("retry after: {} ms", r.retry_after_ms);
            }
            for l in &r.limits {
                println!(
                    "limit {}: {} of {} left, full again in {} ms",
                    l.name, l.remaining, l.limit, l.reset_after_ms
                );
            }
            let mut headers: Vec<_> = r.headers.iter().collect();
            headers.sort();
            for (k, v) in headers {
                println!("header {k}: {v}");
            }
            if let Some(c) = &r.caller {
                println!(
                    "caller:      key {} owner {:?} scopes {:?}",
                    c.key_id, c.owner, c.scopes
                );
            }
            // A denial is an answer, not a failure; scripts see it as 1.
            Ok(if r.reason() == Reason::Ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Err(status) => Err(runtime(format!(
            "check failed: {}",
            admin_cli::failed_call_text(&status)
        ))),
    }
}

#[cfg(test)]
mod tests {
    /// clap checks a command line's definition only when it is parsed:
    /// this checks every subcommand at once (two flags with one name, say).
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
