//! `warden-bench`: the load generator, and the same workload through the
//! Redis recipe it replaces.
//!
//!     warden-bench --dev-dir ./warden-dev --duration 10s --concurrency 64 --json
//!     warden-bench --backend redis-lua --redis 127.0.0.1:6399 --duration 10s
//!     warden-bench memory --keys 1000000 --nonces 10000000 [--owners 1000] [--redis 127.0.0.1:6399]
//!     warden-bench frame --key-id K --secret S --check 127.0.0.1:50052 > check.bin
//!
//!     warden-bench host
//!
//! Closed loop by default (C workers, each with one request in flight, or a
//! window of them on a stream), each connection with its workers driven by
//! a thread of its own (`--shared-runtime`: one runtime for all), calling
//! warden through the Rust client's tonic stubs (`--client h2`: HTTP/2
//! spoken directly, about what a gateway's own codec costs); `--rate`
//! switches to an open loop at a fixed rate, with latency measured from
//! each request's scheduled start so a stalled server cannot hide its
//! stalls (no coordinated omission). Targets loopback addresses only, and
//! always stops by itself.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;

mod lean;

/// Quantiles of the latency curve in the JSON report (for
/// benches/plot_latency.py).
const PLOT_QUANTILES: &[f64] = &[
    0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0,
];
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::Semaphore;
use tonic::transport::Channel;
use warden_client::proto::admin_client::AdminClient;
use warden_client::proto::warden_client::WardenClient;
use warden_client::proto::{
    CheckRequest, CreateKeyRequest, KeyKind, ListKeysRequest, PolicyInfo, Reason,
};
use warden_client::signing::{
    Signer, body_sha256, check_request_from, hmac_sha256, unix_now, warden_v1_string_to_sign,
};
use warden_client::{Tls, channel};

#[derive(Parser)]
#[command(
    name = "warden-bench",
    about = "Load generator for warden, side by side with the Redis recipe"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    load: LoadArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Bytes per rate-limit key and per nonce: warden's engine vs Redis.
    Memory(MemoryArgs),
    /// One request that can be sent again and again and is decided in full
    /// each time (see --kind), as a gRPC message frame on stdout: the
    /// request body for h2load.
    Frame(FrameArgs),
    /// Creates keys one at a time through the admin API, as an
    /// administrator's tool does, and reports each batch's rate and
    /// latency: creating a key must cost the same at 100,000 keys as at 0.
    Keys(KeysArgs),
    /// How fast this host is today, for reading a run's numbers: HMAC-SHA256
    /// verification of 1 KiB, as criterion's `hmac_verify/1024`, in ns. The
    /// VM's host changes from day to day and runs up to twice as slow on
    /// some (620–660 ns on fast days); every benchmark script prints this
    /// first, so each run says which kind of day it had.
    Host,
}

#[derive(clap::Args)]
struct KeysArgs {
    /// `serve --dev` directory: address, certificates (admin role).
    #[arg(long, default_value = "./warden-dev")]
    dev_dir: PathBuf,
    /// warden address (default: from demo-key.json). Loopback only.
    #[arg(long)]
    target: Option<String>,
    /// Keys to create.
    #[arg(long, default_value_t = 20_000)]
    count: usize,
    /// Report after this many.
    #[arg(long, default_value_t = 5_000)]
    every: usize,
    /// Then create three keys of one more owner and time listing them by
    /// owner among all the others.
    #[arg(long)]
    time_listing: bool,
}

#[derive(clap::Args)]
struct FrameArgs {
    #[arg(long, value_enum, default_value_t = FrameKind::Check)]
    kind: FrameKind,
    /// The signing key (`check`, `ext-authz`).
    #[arg(long, default_value = "")]
    key_id: String,
    #[arg(long, default_value = "")]
    secret: String,
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// First send it to this plaintext warden and require the answer the
    /// kind promises, so a benchmark never measures the wrong answers.
    #[arg(long)]
    check: Option<String>,
}

/// Which call a frame is, and how it is answered every time it is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum FrameKind {
    /// warden's `Check`: a signed POST with a body of --body-bytes, as
    /// `dry_run`, so it is allowed every time, and decided in full.
    Check,
    /// Envoy's ext_authz `Check` of a signed POST with its body (as Envoy
    /// sends it with `with_request_body`), under a key whose one request
    /// an hour the check spends first: every call verifies the signature,
    /// looks the nonce up and decides the limit, and the refusal (429)
    /// stores nothing, so the next call is refused the same way, not as a
    /// replay (as compare.sh's forward-auth run).
    ExtAuthz,
    /// Envoy's `ShouldRateLimit` with two descriptors of domain `bench`
    /// (`remote_address`, and `generic_key` = `orders`), as Envoy's
    /// `rate_limits` actions send them: counted and OK every time under
    /// limits of a billion a second.
    RateLimit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// warden `Check` over mTLS.
    Warden,
    /// The Django recipe: INCR + EXPIRE + SET NX EX (pipelined) and an HMAC
    /// verify in the client.
    RedisRecipe,
    /// One EVAL (EVALSHA) Lua script doing rate + nonce atomically, HMAC in
    /// the client.
    RedisLua,
}

/// How warden-bench speaks gRPC to warden.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ClientKind {
    /// The Rust client's stubs on tonic's channel: what an application
    /// using `warden-client` pays per call.
    Tonic,
    /// HTTP/2 directly (see `lean.rs`): about what a gateway's own codec
    /// pays, so more of the shared cores is left to the server.
    H2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Unary,
    Stream,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Popularity {
    Uniform,
    Zipf,
}

#[derive(clap::Args, Clone)]
struct LoadArgs {
    /// `serve --dev` directory: address, certificates (admin role).
    #[arg(long, default_value = "./warden-dev")]
    dev_dir: PathBuf,
    /// warden address (default: from demo-key.json), or several nodes of
    /// a cluster separated by commas (connections are spread over them).
    /// Loopback only.
    #[arg(long)]
    target: Option<String>,
    #[arg(long, value_enum, default_value = "warden")]
    backend: Backend,
    #[arg(long, value_enum, default_value = "unary")]
    mode: Mode,
    /// Redis address for the redis-* backends. Loopback only.
    #[arg(long, default_value = "127.0.0.1:6379")]
    redis: String,
    /// Connections (HTTP/2 channels or Redis connections).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// How to speak gRPC to warden: the Rust client's tonic stubs, or
    /// HTTP/2 directly with as little client as a gateway's codec (the
    /// same mTLS connection under both).
    #[arg(long, value_enum, default_value = "tonic")]
    client: ClientKind,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Distinct API keys.
    #[arg(long, default_value_t = 100)]
    keys: usize,
    #[arg(long, value_enum, default_value = "uniform")]
    popularity: Popularity,
    /// Percentages: valid, replayed, bad signature, over limit.
    #[arg(long, default_value = "valid=100")]
    mix: String,
    /// How long to run, e.g. "10s".
    #[arg(long, default_value = "10s")]
    duration: String,
    /// Stop after this many requests instead.
    #[arg(long)]
    requests: Option<u64>,
    /// Open loop at this many requests per second.
    #[arg(long)]
    rate: Option<u64>,
    /// Request body size in bytes.
    #[arg(long, default_value_t = 256)]
    body_bytes: usize,
    /// pid of the server process, for its CPU and RSS; several (comma
    /// separated) for a cluster's nodes, summed.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Answers per CheckStream kept in flight (stream mode).
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Sign this many requests before the run and only send them during
    /// it; the run ends when they are all sent (or at --duration). The
    /// generator then does what a gateway does, forward requests its
    /// clients signed, and its own signing (SHA-256 of the body and an
    /// HMAC per request) no longer takes CPU from the server when both
    /// share a machine. ~0.5 KB of memory per request. Requests are
    /// stamped when signed: sign them after the server is ready (past its
    /// restart fence, as /readyz says) and send them within its past skew
    /// (300 s by default), or they come back STALE.
    #[arg(long)]
    presigned: Option<usize>,
    /// One JSON object on stdout instead of a report.
    #[arg(long)]
    json: bool,
    /// Drive every connection from one multi-threaded runtime, as before
    /// session 53, instead of a thread of its own per connection (a
    /// single-threaded runtime with that connection and its share of the
    /// requests in flight, as an Envoy worker owns its connections). The
    /// shared runtime hands calls between its threads: it took 42-46 µs of
    /// the generator's CPU per unary call against 33-37, and the server
    /// 34 against 27-33 (fewer calls per read). The open loop (--rate)
    /// paces from a thread of its own either way, and hands due requests
    /// to the shared runtime or to each connection's thread in turn.
    #[arg(long)]
    shared_runtime: bool,
}

#[derive(clap::Args)]
struct MemoryArgs {
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    #[arg(long, default_value_t = 10_000_000)]
    nonces: u64,
    /// How many API keys the nonces are spread over. Each key's nonces
    /// share one slot; as many keys as nonces spreads them over every
    /// slot, the costliest layout for warden's per-slot nonce tables.
    #[arg(long, default_value_t = 1_000)]
    owners: u64,
    /// Also measure Redis `used_memory` for the same data.
    #[arg(long)]
    redis: Option<String>,
    #[arg(long)]
    json: bool,
}

fn loopback_only(addr: &str) -> Result<(), String> {
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']))
        .unwrap_or(addr);
    let ok = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{addr}: warden-bench only targets loopback addresses"
        ))
    }
}

/// What one request is meant to exercise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Valid,
    Replay,
    BadSignature,
    OverLimit,
}

struct Mix(Vec<(Kind, u32)>);

impl Mix {
    fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        for piece in text.split(',').filter(|p| !p.is_empty()) {
            let (name, pct) = piece
                .split_once('=')
                .ok_or_else(|| format!("--mix: {piece:?} is not NAME=PERCENT"))?;
            let pct: u32 = pct
                .parse()
                .map_err(|_| format!("--mix: {pct:?} is not a number"))?;
            let kind = match name {
                "valid" => Kind::Valid,
                "replay" | "replayed" => Kind::Replay,
                "bad-signature" => Kind::BadSignature,
                "over-limit" => Kind::OverLimit,
                _ => return Err(format!("--mix: unknown kind {name:?}")),
            };
            parts.push((kind, pct));
        }
        if parts.iter().map(|(_, p)| p).sum::<u32>() != 100 {
            return Err("--mix: percentages must add up to 100".into());
        }
        Ok(Self(parts))
    }

    fn pick(&self, roll: u32) -> Kind {
        let mut acc = 0;
        for (kind, pct) in &self.0 {
            acc += pct;
            if roll % 100 < acc {
                return *kind;
            }
        }
        Kind::Valid
    }
}

/// xorshift64*: fast, seedable, good enough to pick keys.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Picks key indexes uniformly or with zipf(1) popularity.
struct KeyPicker {
    cdf: Option<Vec<f64>>,
    n: usize,
}

impl KeyPicker {
    fn new(n: usize, popularity: Popularity) -> Self {
        let cdf = (popularity == Popularity::Zipf).then(|| {
            let weights: Vec<f64> = (1..=n).map(|i| 1.0 / i as f64).collect();
            let total: f64 = weights.iter().sum();
            let mut acc = 0.0;
            weights
                .iter()
                .map(|w| {
                    acc += w / total;
                    acc
                })
                .collect()
        });
        Self { cdf, n }
    }

    fn pick(&self, rng: &mut Rng) -> usize {
        match &self.cdf {
            None => (rng.next() % self.n as u64) as usize,
            Some(cdf) => {
                let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
                cdf.partition_point(|&c| c < u).min(self.n - 1)
            }
        }
    }
}

/// The keys a run signs with.
struct Keys {
    keys: Vec<(String, String)>,
    /// A key whose policy is exhausted after its first request.
    tight: (String, String),
}

/// A request ready to send.
struct Planned {
    request: CheckRequest,
}

/// Builds requests of each kind; remembers some valid ones to replay.
struct Planner {
    keys: Arc<Keys>,
    picker: KeyPicker,
    mix: Mix,
    body: Vec<u8>,
    counter: AtomicU64,
    /// The last 1,024 kept, oldest first (a queue: dropping the oldest from
    /// a `Vec` moved the other 1,023, ~2 % of the generator's CPU).
    sent: Mutex<std::collections::VecDeque<CheckRequest>>,
}

impl Planner {
    fn plan(&self, rng: &mut Rng) -> Planned {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut kind = self.mix.pick((rng.next() % 100) as u32);
        if kind == Kind::Replay {
            let sent = self.sent.lock();
            if let Some(req) = sent.get((rng.next() as usize) % sent.len().max(1)) {
                return Planned {
                    request: req.clone(),
                };
            }
            kind = Kind::Valid;
        }
        let (id, secret) = match kind {
            Kind::OverLimit => self.keys.tight.clone(),
            _ => self.keys.keys[self.picker.pick(rng)].clone(),
        };
        let nonce = format!("bench{n:020}{:08x}", rng.next() as u32);
        let headers = Signer::new(id, secret).sign_at(
            unix_now(),
            &nonce,
            "POST",
            "/v1/orders",
            "a=1",
            &self.body,
        );
        let mut request = check_request_from(
            &headers,
            "warden-v1",
            "POST",
            "/v1/orders",
            "a=1",
            &self.body,
        );
        if kind == Kind::BadSignature {
            // A forger guessing at key ids: lockouts land on those ids, not
            // on the honest keys of the run.
            request.key_id = format!("wk_forged_{}", n % 64);
            request.signature = "0".repeat(64);
        }
        if kind == Kind::Valid && n.is_multiple_of(64) {
            let mut sent = self.sent.lock();
            if sent.len() >= 1024 {
                sent.pop_front();
            }
            sent.push_back(request.clone());
        }
        Planned { request }
    }
}

/// Requests signed before the run, one list per sender (lane), so that a
/// sender takes the next without contention and without a copy.
struct Presigned(Vec<Mutex<Vec<CheckRequest>>>);

impl Presigned {
    /// `count` requests from `planner`, spread evenly over `lanes`; lanes
    /// are signed in parallel on up to every core, as the run has not
    /// started.
    fn sign(planner: &Planner, count: usize, lanes: usize) -> Self {
        let lanes = lanes.max(1);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per_thread = lanes.div_ceil(threads);
        let mut signed: Vec<Vec<CheckRequest>> = Vec::with_capacity(lanes);
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..lanes)
                .collect::<Vec<_>>()
                .chunks(per_thread)
                .map(|chunk| {
                    let chunk = chunk.to_vec();
                    scope.spawn(move || {
                        chunk
                            .into_iter()
                            .map(|lane| {
                                let mut rng = Rng(0xC0FF_EE00 + lane as u64);
                                let n = count / lanes + usize::from(lane < count % lanes);
                                let mut list: Vec<CheckRequest> =
                                    (0..n).map(|_| planner.plan(&mut rng).request).collect();
                                // Sent from the back: the first signed goes first.
                                list.reverse();
                                list
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for h in handles {
                signed.extend(h.join().expect("signing thread"));
            }
        });
        Presigned(signed.into_iter().map(Mutex::new).collect())
    }

    fn next(&self, lane: usize) -> Option<CheckRequest> {
        self.0[lane % self.0.len()].lock().pop()
    }
}

/// Where a run's requests come from: signed as they are sent, or taken
/// from those signed before the run.
struct Source {
    planner: Planner,
    presigned: Option<Presigned>,
}

impl Source {
    /// The next request for sender `lane`; `None` once every pre-signed
    /// one is sent.
    fn next(&self, lane: usize, rng: &mut Rng) -> Option<CheckRequest> {
        match &self.presigned {
            Some(p) => p.next(lane),
            None => Some(self.planner.plan(rng).request),
        }
    }
}

/// A request's outcome: the answer's reason, or why there was none.
type Outcome = Result<&'static str, String>;

/// Outcome counts and latencies of a run.
struct Stats {
    hist: Mutex<Histogram<u64>>,
    outcomes: Mutex<HashMap<&'static str, u64>>,
    errors: AtomicU64,
    /// The first error's text, so a run with errors says what they were.
    first_error: Mutex<Option<String>>,
    done: AtomicU64,
}

impl Stats {
    fn new() -> Self {
        Self {
            hist: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")),
            outcomes: Mutex::new(HashMap::new()),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
            done: AtomicU64::new(0),
        }
    }

    /// The latency at quantile `q`, in milliseconds.
    fn ms(&self, q: f64) -> f64 {
        self.hist.lock().value_at_quantile(q) as f64 / 1000.0
    }

    fn record(&self, latency: Duration, outcome: Outcome) {
        match outcome {
            Ok(name) => {
                *self.outcomes.lock().entry(name).or_default() += 1;
                self.finished(latency);
            }
            Err(text) => self.record_error(latency, || text),
        }
    }

    /// An error, its text made only if it is the run's first: an open loop
    /// past its bound has one per unstarted request, and formatting each
    /// took CPU from the server when the machine was already full.
    fn record_error(&self, latency: Duration, text: impl FnOnce() -> String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.first_error.lock().get_or_insert_with(text);
        self.finished(latency);
    }

    fn finished(&self, latency: Duration) {
        let micros = (latency.as_micros() as u64).clamp(1, 60_000_000);
        let _ = self.hist.lock().record(micros);
        self.done.fetch_add(1, Ordering::Relaxed);
    }
}

fn reason_name(r: Reason) -> &'static str {
    warden_client::reason_name(r)
}

/// One request against whichever backend.
#[derive(Clone)]
enum Target {
    Warden(Vec<WardenClient<Channel>>),
    /// warden, spoken to in HTTP/2 directly (`--client h2`).
    Lean(Vec<lean::Lean>),
    Redis {
        conns: Vec<redis::aio::MultiplexedConnection>,
        secrets: Arc<HashMap<String, Vec<u8>>>,
        /// The atomic script, or `None` for the pipelined recipe.
        lua: Option<Arc<redis::Script>>,
    },
}

impl Target {
    /// One connection of this target's kind, opened on the calling thread's
    /// runtime, for a generator thread that drives its own (connection `c`
    /// of `--connections`, spread over a cluster's nodes as the shared
    /// ones are).
    async fn one_connection(&self, args: &LoadArgs, c: usize) -> Result<Target, String> {
        match self {
            Target::Warden(_) | Target::Lean(_) => warden_connections(args, c..c + 1).await,
            Target::Redis { secrets, lua, .. } => Ok(Target::Redis {
                conns: vec![redis_connection(args).await?],
                secrets: secrets.clone(),
                lua: lua.clone(),
            }),
        }
    }
}

/// Connections `range` of `--connections` to warden over mTLS, spread over
/// a cluster's nodes in turn, of the `--client` kind.
async fn warden_connections(
    args: &LoadArgs,
    range: std::ops::Range<usize>,
) -> Result<Target, String> {
    let targets = warden_targets(&args.dev_dir, args.target.as_deref())?;
    let tls = Tls::from_dev_dir(&args.dev_dir).map_err(|e| e.to_string())?;
    let (mut tonic, mut h2) = (Vec::new(), Vec::new());
    for c in range {
        let target = &targets[c % targets.len()];
        match args.client {
            ClientKind::Tonic => tonic.push(WardenClient::new(
                channel(target, tls.clone())
                    .await
                    .map_err(|e| e.to_string())?,
            )),
            ClientKind::H2 => h2.push(lean::Lean::connect(target, &tls).await?),
        }
    }
    Ok(match args.client {
        ClientKind::Tonic => Target::Warden(tonic),
        ClientKind::H2 => Target::Lean(h2),
    })
}

async fn redis_connection(args: &LoadArgs) -> Result<redis::aio::MultiplexedConnection, String> {
    redis::Client::open(format!("redis://{}/", args.redis))
        .map_err(|e| e.to_string())?
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("redis {}: {e}", args.redis))
}

/// A thread for each of `--connections`, each a single-threaded runtime
/// with one connection of `target`'s kind, as an Envoy worker owns its
/// connections: what runs on it (lanes, or the open loop's due requests)
/// is never handed between threads. Each runs until `stop`.
async fn connection_threads(
    target: &Target,
    args: &LoadArgs,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<(tokio::runtime::Handle, Target)>, String> {
    let mut threads = Vec::new();
    for c in 0..args.connections.max(1) {
        let (args, target, stop) = (args.clone(), target.clone(), stop.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let connected = target.one_connection(&args, c).await;
                let failed = connected.is_err();
                let _ = tx.send(connected.map(|t| (tokio::runtime::Handle::current(), t)));
                while !failed && !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        });
        threads.push(
            rx.await
                .map_err(|_| "a connection's thread ended".to_owned())??,
        );
    }
    Ok(threads)
}

/// What every lane of a closed-loop run shares: where requests come from,
/// where outcomes go, and when to stop.
#[derive(Clone)]
struct Run {
    source: Arc<Source>,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    started: Instant,
    duration: Duration,
    limit: u64,
    /// Answers kept in flight on each stream (`--window`).
    window: usize,
}

impl Run {
    fn going(&self) -> bool {
        self.started.elapsed() < self.duration
            && !self.stop.load(Ordering::Relaxed)
            && self.stats.done.load(Ordering::Relaxed) < self.limit
    }
}

/// One of the closed loop's `--concurrency` lanes: a request in flight at
/// a time (unary), or a stream with `--window` checks in flight.
async fn lane(run: Run, mode: Mode, w: usize, target: Target) {
    match (mode, target) {
        (Mode::Stream, Target::Warden(clients)) => {
            stream_lane(run, w, clients[w % clients.len()].clone()).await
        }
        (Mode::Stream, Target::Lean(conns)) => {
            lean_stream_lane(run, w, conns[w % conns.len()].clone()).await
        }
        (_, target) => unary_lane(run, w, target).await,
    }
}

async fn unary_lane(run: Run, w: usize, target: Target) {
    let mut rng = Rng(0xDEAD_BEEF + w as u64);
    while run.going() {
        let Some(request) = run.source.next(w, &mut rng) else {
            break;
        };
        let t = Instant::now();
        let outcome = target.send(w, request).await;
        run.stats.record(t.elapsed(), outcome);
    }
}

/// A stream lane's window: the checks sent and not yet answered, oldest
/// first (answers come back in order), and the room for more. The sender
/// waits for room; the reader counts each answer and makes room.
#[derive(Clone)]
struct Window {
    stats: Arc<Stats>,
    sent_at: Arc<Mutex<std::collections::VecDeque<Instant>>>,
    room: Arc<Semaphore>,
}

impl Window {
    fn new(run: &Run) -> Self {
        Self {
            stats: run.stats.clone(),
            sent_at: Arc::new(Mutex::new(std::collections::VecDeque::new())),
            room: Arc::new(Semaphore::new(run.window)),
        }
    }

    /// Waits for room for one more check; `false` once the answers ended.
    async fn wait_for_room(&self) -> bool {
        self.room.acquire().await.map(|p| p.forget()).is_ok()
    }

    /// Takes room for one more check if there is some now.
    fn take_room(&self) -> bool {
        self.room.try_acquire().map(|p| p.forget()).is_ok()
    }

    fn sent(&self) {
        self.sent_at.lock().push_back(Instant::now());
    }

    /// Counts the answer to the oldest check in flight.
    fn answered(&self, outcome: Outcome) {
        let at: Option<Instant> = self.sent_at.lock().pop_front();
        self.stats
            .record(at.map(|t| t.elapsed()).unwrap_or_default(), outcome);
        self.room.add_permits(1);
    }

    /// No more answers will come: the sender stops waiting for room.
    fn ended(&self) {
        self.room.close();
    }
}

async fn stream_lane(run: Run, w: usize, mut client: WardenClient<Channel>) {
    let mut rng = Rng(0x1234_5678 + w as u64);
    let (tx, rx) = tokio::sync::mpsc::channel::<CheckRequest>(run.window);
    let Ok(answers) = client
        .check_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    else {
        run.stats
            .record(Duration::ZERO, Err("CheckStream refused".into()));
        return;
    };
    let mut answers = answers.into_inner();
    let window = Window::new(&run);
    let reader = {
        let window = window.clone();
        tokio::spawn(async move {
            while let Some(answer) = answers.message().await.transpose() {
                window.answered(
                    answer
                        .map(|r| reason_name(r.reason()))
                        .map_err(|e| warden_client::status_text(&e)),
                );
            }
            window.ended();
        })
    };
    while run.going() && window.wait_for_room().await {
        let Some(request) = run.source.next(w, &mut rng) else {
            break;
        };
        window.sent();
        if tx.send(request).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = reader.await;
}

/// [`stream_lane`] on a connection spoken to in HTTP/2 directly: `--window`
/// checks in flight on one `CheckStream`, those the window has room for
/// sent together.
async fn lean_stream_lane(run: Run, w: usize, conn: lean::Lean) {
    let mut rng = Rng(0x1234_5678 + w as u64);
    let (mut requests, mut answers) = match conn.check_stream().await {
        Ok(call) => call,
        Err(lean::Failed(text)) => return run.stats.record(Duration::ZERO, Err(text)),
    };
    let window = Window::new(&run);
    let reader = {
        let window = window.clone();
        tokio::spawn(async move {
            loop {
                match answers.next().await {
                    Ok(Some(r)) => window.answered(Ok(reason_name(r.reason()))),
                    Ok(None) => break,
                    Err(lean::Failed(text)) => {
                        window.answered(Err(text));
                        break;
                    }
                }
            }
            window.ended();
        })
    };
    let mut ended = false;
    while !ended && run.going() && window.wait_for_room().await {
        // Every check the window has room for goes in one DATA frame, as
        // tonic sends what a stream has ready.
        let mut batch = bytes::BytesMut::new();
        loop {
            let Some(request) = run.source.next(w, &mut rng) else {
                ended = true;
                break;
            };
            window.sent();
            lean::append_frame(&mut batch, &request);
            if !run.going() || !window.take_room() {
                break;
            }
        }
        if !batch.is_empty() && requests.send_data(batch.freeze(), false).is_err() {
            break;
        }
    }
    let _ = requests.send_data(bytes::Bytes::new(), true);
    let _ = reader.await;
}

/// The rate + nonce logic of the Lua variant: one atomic round trip.
const LUA: &str = r#"
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) == false then return -1 end
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
if n > tonumber(ARGV[1]) then return -2 end
return n
"#;

/// The limit the Redis variants enforce: the same as warden's bench policy.
const BENCH_LIMIT: u64 = 1_000_000_000;

impl Target {
    async fn send(&self, worker: usize, req: CheckRequest) -> Outcome {
        match self {
            Target::Warden(clients) => {
                let mut c = clients[worker % clients.len()].clone();
                c.check(req)
                    .await
                    .map(|r| reason_name(r.into_inner().reason()))
                    .map_err(|e| warden_client::status_text(&e))
            }
            Target::Lean(conns) => conns[worker % conns.len()]
                .check(&req)
                .await
                .map(|r| reason_name(r.reason()))
                .map_err(|lean::Failed(text)| text),
            Target::Redis {
                conns,
                secrets,
                lua,
            } => {
                // What a Django app does: verify the HMAC itself...
                let Some(secret) = secrets.get(&req.key_id) else {
                    return Ok("unauthenticated");
                };
                let message = warden_v1_string_to_sign(
                    req.timestamp,
                    &req.nonce,
                    &req.method,
                    &req.path,
                    &req.query,
                    &body_sha256(&req.body),
                );
                let expected = hex::encode(hmac_sha256(secret, message.as_bytes()));
                if !constant_time_eq(expected.as_bytes(), req.signature.as_bytes()) {
                    return Ok("unauthenticated");
                }
                let mut conn = conns[worker % conns.len()].clone();
                let window = unix_now() / 60;
                let rl = format!("rl:{}:{window}", req.key_id);
                let nonce = format!("nonce:{}:{}", req.key_id, req.nonce);
                let limit = if req.key_id == "bench-tight" {
                    1
                } else {
                    BENCH_LIMIT
                };
                match lua {
                    // ...then either one pipelined round trip of the recipe...
                    None => {
                        let (n, _, fresh): (u64, i64, Option<String>) = redis::pipe()
                            .incr(&rl, 1)
                            .cmd("EXPIRE")
                            .arg(&rl)
                            .arg(60)
                            .arg("NX")
                            .cmd("SET")
                            .arg(&nonce)
                            .arg(1)
                            .arg("NX")
                            .arg("EX")
                            .arg(300)
                            .query_async(&mut conn)
                            .await
                            .map_err(|e| e.to_string())?;
                        Ok(if fresh.is_none() {
                            "replay"
                        } else if n > limit {
                            "rate_limited"
                        } else {
                            "ok"
                        })
                    }
                    // ...or one atomic script.
                    Some(script) => {
                        let r: i64 = script
                            .key(&rl)
                            .key(&nonce)
                            .arg(limit)
                            .arg(300)
                            .arg(60)
                            .invoke_async(&mut conn)
                            .await
                            .map_err(|e| e.to_string())?;
                        Ok(match r {
                            -1 => "replay",
                            -2 => "rate_limited",
                            _ => "ok",
                        })
                    }
                }
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn setup_warden(args: &LoadArgs) -> Result<(Target, Keys), String> {
    let targets = warden_targets(&args.dev_dir, args.target.as_deref())?;
    let target = targets[0].clone();
    let tls = Tls::from_dev_dir(&args.dev_dir).map_err(|e| e.to_string())?;
    let mut admin = AdminClient::new(channel(&target, tls).await.map_err(|e| e.to_string())?);
    for (name, limit, period) in [("bench", 1_000_000_000u64, "1s"), ("bench-tight", 1, "1h")] {
        admin
            .put_policy(PolicyInfo {
                name: name.into(),
                algorithm: "gcra".into(),
                limit,
                period: period.into(),
                burst: 0,
            })
            .await
            .map_err(|e| format!("creating policy {name}: {}", e.message()))?;
    }
    let mut keys = Vec::with_capacity(args.keys);
    for i in 0..args.keys + 1 {
        let policy = if i == args.keys {
            "bench-tight"
        } else {
            "bench"
        };
        let r = admin
            .create_key(CreateKeyRequest {
                owner: "warden-bench".into(),
                policies: vec![policy.into()],
                kind: KeyKind::Hmac as i32,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("creating keys: {}", e.message()))?
            .into_inner();
        keys.push((r.key.map(|k| k.key_id).unwrap_or_default(), r.secret));
    }
    let tight = keys.pop().expect("created");
    // With a thread per connection, each thread opens its own; this target
    // only says which kind.
    let connections = if args.shared_runtime {
        args.connections.max(1)
    } else {
        0
    };
    let target = warden_connections(args, 0..connections).await?;
    Ok((target, Keys { keys, tight }))
}

/// The addresses `--target` names, or the `serve --dev` server's.
fn warden_targets(dev_dir: &std::path::Path, target: Option<&str>) -> Result<Vec<String>, String> {
    let target = match target {
        Some(t) => t.to_owned(),
        None => {
            let demo: serde_json::Value = serde_json::from_slice(
                &std::fs::read(dev_dir.join("demo-key.json"))
                    .map_err(|e| format!("demo-key.json: {e}"))?,
            )
            .map_err(|e| e.to_string())?;
            demo["address"].as_str().unwrap_or_default().to_owned()
        }
    };
    let targets: Vec<String> = target.split(',').map(|t| t.trim().to_owned()).collect();
    for t in &targets {
        loopback_only(t)?;
    }
    Ok(targets)
}

async fn run_keys(args: KeysArgs) -> Result<(), String> {
    let targets = warden_targets(&args.dev_dir, args.target.as_deref())?;
    let tls = Tls::from_dev_dir(&args.dev_dir).map_err(|e| e.to_string())?;
    let mut admin = AdminClient::new(channel(&targets[0], tls).await.map_err(|e| e.to_string())?);
    let every = args.every.max(1);
    let mut batch = (Stats::new(), Instant::now());
    for created in 1..=args.count {
        let started = Instant::now();
        create_key(&mut admin, "warden-bench").await?;
        batch.0.record(started.elapsed(), Ok("created"));
        if created % every == 0 || created == args.count {
            let (stats, since) = std::mem::replace(&mut batch, (Stats::new(), Instant::now()));
            let count = stats.hist.lock().len();
            println!(
                "{created:>9} keys created by this run  {:>7.0} creates/s  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
                count as f64 / since.elapsed().as_secs_f64(),
                stats.ms(0.5),
                stats.ms(0.99),
                stats.ms(1.0)
            );
        }
    }
    match args.time_listing {
        true => time_owner_listing(&mut admin).await,
        false => Ok(()),
    }
}

/// How long listing one owner's few keys takes among all the others, as an
/// administrator's tool pages through a customer's keys: it must not grow
/// with the number of keys other owners hold.
async fn time_owner_listing(admin: &mut AdminClient<Channel>) -> Result<(), String> {
    const OWNER: &str = "warden-bench-listed";
    for _ in 0..3 {
        create_key(admin, OWNER).await?;
    }
    let stats = Stats::new();
    let mut listed = 0;
    for _ in 0..200 {
        let started = Instant::now();
        let page = admin
            .list_keys(ListKeysRequest {
                page_size: 100,
                owner: OWNER.into(),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("listing keys: {}", e.message()))?
            .into_inner();
        stats.record(started.elapsed(), Ok("listed"));
        listed = page.keys.len();
    }
    if listed < 3 {
        return Err(format!("listed {listed} of {OWNER}'s keys, created 3"));
    }
    println!(
        "listing {OWNER}'s {listed} keys (ListKeys by owner, 200 calls): p50 {:.2} ms  p99 {:.2} ms",
        stats.ms(0.5),
        stats.ms(0.99)
    );
    Ok(())
}

/// Creates one HMAC key of `owner`'s, as an administrator's tool does.
async fn create_key(admin: &mut AdminClient<Channel>, owner: &str) -> Result<(), String> {
    admin
        .create_key(CreateKeyRequest {
            owner: owner.into(),
            kind: KeyKind::Hmac as i32,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("creating a key: {}", e.message()))?;
    Ok(())
}

async fn setup_redis(args: &LoadArgs) -> Result<(Target, Keys), String> {
    loopback_only(&args.redis)?;
    // One to flush with; the rest only with the shared runtime (with a
    // thread per connection, each thread opens its own).
    let mut conns = vec![redis_connection(args).await?];
    while args.shared_runtime && conns.len() < args.connections.max(1) {
        conns.push(redis_connection(args).await?);
    }
    let mut secrets = HashMap::new();
    let mut keys = Vec::new();
    for i in 0..args.keys {
        let (id, secret) = (
            format!("bench-{i}"),
            format!("wsk_bench_secret_{i:08}_0123456789abcdef"),
        );
        secrets.insert(id.clone(), secret.clone().into_bytes());
        keys.push((id, secret));
    }
    let tight = (
        "bench-tight".to_owned(),
        "wsk_bench_tight_0123456789abcdefghij".to_owned(),
    );
    secrets.insert(tight.0.clone(), tight.1.clone().into_bytes());
    let lua = (args.backend == Backend::RedisLua).then(|| Arc::new(redis::Script::new(LUA)));
    let mut c = conns[0].clone();
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut c)
        .await
        .map_err(|e| e.to_string())?;
    Ok((
        Target::Redis {
            conns,
            secrets: Arc::new(secrets),
            lua,
        },
        Keys { keys, tight },
    ))
}

/// utime + stime of a process, in seconds, and its RSS in bytes.
fn process_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((ticks / 100.0, rss_kb * 1024))
}

async fn run_load(args: LoadArgs) -> Result<(), String> {
    let duration =
        humantime::parse_duration(&args.duration).map_err(|e| format!("--duration: {e}"))?;
    let mix = Mix::parse(&args.mix)?;
    let (target, keys) = match args.backend {
        Backend::Warden => setup_warden(&args).await?,
        _ => setup_redis(&args).await?,
    };
    let planner = Planner {
        picker: KeyPicker::new(keys.keys.len(), args.popularity),
        keys: Arc::new(keys),
        mix,
        body: vec![b'x'; args.body_bytes],
        counter: AtomicU64::new(0),
        sent: Mutex::new(std::collections::VecDeque::new()),
    };
    let presigned = args.presigned.map(|count| {
        // The open loop has one sender; the others one per worker.
        let lanes = if args.rate.is_some() {
            1
        } else {
            args.concurrency.max(1)
        };
        eprintln!("  signing {count} requests before the run");
        Presigned::sign(&planner, count, lanes)
    });
    let source = Arc::new(Source { planner, presigned });
    let stats = Arc::new(Stats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let limit = args.requests.unwrap_or(u64::MAX);
    // Connected before either side's CPU is read and the clock starts, so
    // that no run counts its TLS handshakes.
    let senders = if args.shared_runtime {
        vec![(tokio::runtime::Handle::current(), target.clone())]
    } else {
        connection_threads(&target, &args, &stop).await?
    };
    let usage = |pids: &[u32]| -> Option<(f64, u64)> {
        pids.iter()
            .map(|&p| process_usage(p))
            .try_fold((0.0, 0), |(c, r), u| u.map(|(c1, r1)| (c + c1, r + r1)))
    };
    let cpu_before = (!args.server_pid.is_empty())
        .then(|| usage(&args.server_pid))
        .flatten();
    // The generator's own CPU, so a run says how much of the machine the
    // client side took.
    let own_before = process_usage(std::process::id()).map(|(cpu, _)| cpu);
    let started = Instant::now();

    // Progress on stderr: every second interactively; with --json (stdout
    // is for the report) every 5 s, with the time left, so long runs are
    // never silent.
    let progress = {
        let (stats, stop, json) = (stats.clone(), stop.clone(), args.json);
        tokio::spawn(async move {
            let (mut last, mut tick) = (0, 0u64);
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                tick += 1;
                let done = stats.done.load(Ordering::Relaxed);
                let left = duration.saturating_sub(started.elapsed()).as_secs();
                if !json {
                    eprintln!(
                        "  {:>10} requests  {:>9} req/s  {} errors",
                        done,
                        done - last,
                        stats.errors.load(Ordering::Relaxed)
                    );
                } else if tick % 5 == 0 {
                    eprintln!(
                        "  {done} requests so far, {:.0} req/s, {left} s left",
                        done as f64 / started.elapsed().as_secs_f64()
                    );
                }
                last = done;
            }
        })
    };

    let run = Run {
        source: source.clone(),
        stats: stats.clone(),
        stop: stop.clone(),
        started,
        duration,
        limit,
        window: args.window.max(1),
    };
    let mut workers = Vec::new();
    match (args.rate, args.mode, &target) {
        (Some(rate), _, _) => {
            // Open loop: a request every 1/rate s, latency from its scheduled
            // start. Paced by a thread of its own, not tokio's timer: the
            // timer's 1 ms ticks would launch requests in bursts up to a
            // millisecond late, and that lateness (counted, rightly, from
            // the scheduled start) would be the generator's, not the
            // server's. A thread sleep wakes within tens of microseconds.
            let in_flight_bound = args.concurrency.max(1) * 4;
            let permits = Arc::new(Semaphore::new(in_flight_bound));
            let main = tokio::runtime::Handle::current();
            let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
            // Due requests go to the shared runtime, or to each connection's
            // thread in turn.
            let (source, stats, senders, stop) =
                (source.clone(), stats.clone(), senders.clone(), stop.clone());
            workers.push(tokio::task::spawn_blocking(move || {
                let mut turn = 0usize;
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
                let mut next = Instant::now();
                let mut i = 0u64;
                while i < limit && started.elapsed() < duration && !stop.load(Ordering::Relaxed) {
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    // Every request now due goes to the runtime in one
                    // hand-over: a sleep overshoots by tens of microseconds,
                    // more than the interval at high rates, and waking a
                    // worker per request cost the generator more CPU than
                    // the server spends on the call.
                    let mut due = Vec::new();
                    let now = Instant::now();
                    while next <= now && i < limit {
                        let scheduled = next;
                        next += interval;
                        match permits.clone().try_acquire_owned() {
                            Ok(permit) => {
                                let Some(request) = source.next(0, &mut rng) else {
                                    // All pre-signed requests are sent: the run ends.
                                    i = limit;
                                    break;
                                };
                                due.push((scheduled, permit, request, i as usize));
                                i += 1;
                            }
                            Err(_) => stats.record_error(scheduled.elapsed(), || {
                                format!("not started: {in_flight_bound} already in flight")
                            }),
                        }
                    }
                    if due.is_empty() {
                        continue;
                    }
                    let (runtime, target) = &senders[turn % senders.len()];
                    turn += 1;
                    let (stats, target) = (stats.clone(), target.clone());
                    runtime.spawn(async move {
                        for (scheduled, permit, request, worker) in due {
                            let (stats, target) = (stats.clone(), target.clone());
                            tokio::spawn(async move {
                                let outcome = target.send(worker, request).await;
                                stats.record(scheduled.elapsed(), outcome);
                                drop(permit);
                            });
                        }
                    });
                }
                // The calls still in flight are counted before the run ends
                // (a connection's thread drops what it has not finished).
                let _ = main.block_on(tokio::time::timeout(
                    Duration::from_secs(5),
                    permits.acquire_many(in_flight_bound as u32),
                ));
            }));
        }
        (None, Mode::Stream, Target::Redis { .. }) => {
            return Err("--mode stream is warden's CheckStream: use --backend warden".into());
        }
        (None, mode, _) => {
            for w in 0..args.concurrency.max(1) {
                let (runtime, target) = &senders[w % senders.len()];
                workers.push(runtime.spawn(lane(run.clone(), mode, w, target.clone())));
            }
        }
    }
    // A sender that panicked, or whose connection's runtime went away,
    // is an error of the run: ignored, its lane's share would go missing
    // from a run that reports no error.
    for w in workers {
        if let Err(e) = w.await {
            stats.record_error(Duration::ZERO, || format!("a sender ended early: {e}"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let _ = progress.await;

    let pct = |q: f64| stats.ms(q);
    let done = stats.done.load(Ordering::Relaxed);
    let errors = stats.errors.load(Ordering::Relaxed);
    let client_cpu = own_before.and_then(|cpu0| {
        process_usage(std::process::id()).map(|(cpu1, _)| (cpu1 - cpu0) / elapsed)
    });
    let server = cpu_before.and_then(|(cpu0, _)| {
        usage(&args.server_pid).map(|(cpu1, rss)| ((cpu1 - cpu0) / elapsed, rss))
    });
    let report = json!({
        "backend": format!("{:?}", args.backend),
        "mode": format!("{:?}", args.mode),
        "concurrency": args.concurrency,
        "connections": args.connections,
        "keys": args.keys,
        "presigned": args.presigned,
        "requests": done,
        "seconds": elapsed,
        "rps": done as f64 / elapsed,
        "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99), "p999_ms": pct(0.999),
        // The percentile curve, HDR style, for plots: [quantile, ms].
        "percentiles": PLOT_QUANTILES.iter().map(|&q| json!([q, pct(q)])).collect::<Vec<_>>(),
        "errors": errors,
        "first_error": *stats.first_error.lock(),
        "outcomes": *stats.outcomes.lock(),
        "server_cpu_cores": server.map(|s| s.0),
        "server_rss_bytes": server.map(|s| s.1),
        "client_cpu_cores": client_cpu,
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "{:?} {:?}: {done} requests in {elapsed:.1}s = {:.0} req/s, {errors} errors",
            args.backend,
            args.mode,
            done as f64 / elapsed
        );
        println!(
            "latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}",
            pct(0.5),
            pct(0.9),
            pct(0.99),
            pct(0.999)
        );
        println!("outcomes: {}", report["outcomes"]);
        if let Some(text) = &*stats.first_error.lock() {
            println!("first error: {text}");
        }
        if let Some((cores, rss)) = server {
            println!(
                "server: {cores:.2} cores, {:.1} MiB RSS",
                rss as f64 / 1048576.0
            );
        }
    }
    Ok(())
}

fn rss_bytes() -> u64 {
    process_usage(std::process::id())
        .map(|(_, rss)| rss)
        .unwrap_or(0)
}

/// What keeping this much state costs: a checkpoint (as a serving process
/// writes one, the state left in place), writing it all to `state.saved`
/// (as SIGTERM does, emptying `engine`), and reading it back into a fresh
/// engine (as the next start does).
fn saved_state_cost(
    engine: &warden::engine::Engine,
    now: warden::engine::Nanos,
) -> Result<serde_json::Value, String> {
    use warden::crypto::MasterKey;
    use warden::saved_state;
    let dir = std::env::temp_dir().join(format!("warden-bench-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let master = MasterKey::from_hex(&MasterKey::generate_hex()).map_err(|e| e.to_string())?;
    // A checkpoint first (the state left in place), as a serving process
    // writes one every `save_state_every`.
    // The copy alone: each of the 64 shards is locked for its share of it,
    // and checks on it wait. How long, a thread checking limits in every
    // shard meanwhile finds out; and how long the longest check takes as
    // long again beside a thread that only spins (this VM pauses a busy
    // vCPU for milliseconds when both are busy).
    let started = Instant::now();
    let (copied, longest_check) = longest_check_while(engine, now, || {
        let mut copied = 0;
        engine.copy_each(now, |entries| copied += entries.len());
        copied
    });
    let copy_time = started.elapsed();
    // Both cores busy, as during the copy: the VM pauses a vCPU only then.
    let ((), longest_check_alone) = longest_check_while(engine, now, || {
        let started = Instant::now();
        while started.elapsed() < copy_time {
            std::hint::spin_loop();
        }
    });
    let started = Instant::now();
    let (written, checkpoint_peak) =
        memory_taken_by(|| saved_state::checkpoint(&dir, &master, engine, now));
    written.map_err(|e| e.to_string())?;
    let checkpoint_ms = started.elapsed().as_millis();
    let started = Instant::now();
    let (saved, save_peak) =
        memory_taken_by(|| saved_state::save(&dir, &master, engine, now, None));
    let saved = saved.map_err(|e| e.to_string())?;
    let save_ms = started.elapsed().as_millis();
    let bytes = std::fs::metadata(dir.join(saved_state::FILE_NAME))
        .map_err(|e| e.to_string())?
        .len();
    // Reading it back: the peak over where memory stood, against what the
    // state it builds keeps once done (the rest is the reading's own).
    let before_restore = rss_bytes();
    let started = Instant::now();
    let (next, restore_peak) = memory_taken_by(|| {
        let opened = saved_state::open(&dir, &master).ok_or("the saved state did not open")?;
        let next = warden::engine::Engine::with_seed(64, saved + 1, opened.seed());
        let restored = opened
            .restore(&next, now, saved_state::Afterwards::Remove)
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((next, restored))
    });
    let restore_ms = started.elapsed().as_millis();
    let (next, restored) = next?;
    let restore_kept = rss_bytes().saturating_sub(before_restore);
    drop(next);
    let _ = std::fs::remove_dir_all(&dir);
    if restored.entries != saved || restored.dropped != 0 {
        return Err(format!("saved {saved} entries, restored {restored:?}"));
    }
    Ok(json!({
        "entries": saved,
        "bytes": bytes,
        "copied": copied,
        "copy_ms": copy_time.as_millis(),
        "longest_check_during_copy_ms": longest_check.as_secs_f64() * 1000.0,
        "longest_check_without_copy_ms": longest_check_alone.as_secs_f64() * 1000.0,
        "checkpoint_ms": checkpoint_ms,
        "checkpoint_peak_bytes": checkpoint_peak,
        "save_ms": save_ms,
        "save_peak_bytes": save_peak,
        "restore_ms": restore_ms,
        "restore_peak_bytes": restore_peak,
        "restore_kept_bytes": restore_kept
    }))
}

/// Runs `work`; what it returned, and how far the process's resident
/// memory rose above where it stood before (its peak, which the kernel
/// is told to forget first; 0 where it cannot be read).
fn memory_taken_by<T>(work: impl FnOnce() -> T) -> (T, u64) {
    let peak = || -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let kb = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()?;
        Some(kb * 1024)
    };
    // "5" resets the peak to the present resident size (Linux 4.0 on).
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = rss_bytes();
    let done = work();
    let risen = match (reset, peak()) {
        (true, Some(peak)) => peak.saturating_sub(before),
        _ => 0,
    };
    (done, risen)
}

/// Runs `work` while another thread checks limits in every shard of
/// `engine` (dry runs: nothing is stored); what `work` returned, and the
/// longest any one check took meanwhile.
fn longest_check_while<T>(
    engine: &warden::engine::Engine,
    now: warden::engine::Nanos,
    work: impl FnOnce() -> T,
) -> (T, Duration) {
    use warden::engine::{Gcra, Limit, Nanos, Request};
    let working = AtomicBool::new(true);
    std::thread::scope(|scope| {
        let checker = scope.spawn(|| {
            let limit = Limit::Gcra(Gcra::new(100, Nanos::from_secs(60), 100));
            let mut longest = Duration::ZERO;
            let mut i = 0u64;
            while working.load(Ordering::Relaxed) {
                let key = engine.key(&i.to_le_bytes(), &[b"probe"]);
                i += 1;
                let started = Instant::now();
                engine.decide(
                    now,
                    &Request {
                        nonce: None,
                        limits: &[(key, limit)],
                        cost: 1,
                        commit: false,
                    },
                );
                longest = longest.max(started.elapsed());
            }
            longest
        });
        let done = work();
        working.store(false, Ordering::Relaxed);
        (done, checker.join().expect("the checking thread"))
    })
}

/// The `i`th nonce's seconds to its forget time when they are spread as a
/// steady stream of requests leaves them: 1 to 300, mixed so that every
/// owner's nonces (`i % owners`) run out in every second.
fn spread_ttl(i: u64) -> u64 {
    1 + (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) % 300
}

async fn run_memory(args: MemoryArgs) -> Result<(), String> {
    use warden::engine::{Engine, Gcra, Limit, Nanos, Request};
    let engine = Engine::new(64, args.nonces as usize + 1);
    let gcra = Limit::Gcra(Gcra::new(100, Nanos::from_secs(60), 100));
    let now = Nanos::from_secs(1_000);
    let base = rss_bytes();
    for i in 0..args.keys {
        let key = engine.key(&i.to_le_bytes(), &[b"policy", b"standard"]);
        engine.decide(
            now,
            &Request {
                nonce: None,
                limits: &[(key, gcra)],
                cost: 1,
                commit: true,
            },
        );
    }
    let after_keys = rss_bytes();
    // Nonces remembered for 300 s from `now`, or, `spread`, for 1 to 300
    // s, as a steady stream of requests leaves them: a three-hundredth of
    // them may be forgotten each second.
    let remember_nonces = |engine: &Engine, spread: bool| {
        for i in 0..args.nonces {
            let key = engine.replay_key(
                &(i % args.owners.max(1)).to_le_bytes(),
                &[b"nonce", &i.to_le_bytes()],
            );
            let ttl = if spread { spread_ttl(i) } else { 300 };
            engine.decide(
                now,
                &Request {
                    nonce: Some((key, now + Nanos::from_secs(ttl))),
                    limits: &[],
                    cost: 1,
                    commit: true,
                },
            );
        }
    };
    remember_nonces(&engine, false);
    let after_nonces = rss_bytes();
    let per_key = (after_keys - base) as f64 / args.keys as f64;
    let per_nonce = (after_nonces - after_keys) as f64 / args.nonces as f64;
    // The background sweep (every second) at this state, when nothing has
    // run out yet: every entry is looked at, none removed.
    let started = Instant::now();
    let swept = engine.sweep(now);
    let sweep_ms = started.elapsed().as_secs_f64() * 1000.0;
    if swept.buckets + swept.windows + swept.nonces != 0 {
        return Err(format!("a sweep at the start removed {swept:?}"));
    }
    let mut report = json!({"keys": args.keys, "nonces": args.nonces, "owners": args.owners, "warden_bytes_per_key": per_key, "warden_bytes_per_nonce": per_nonce, "sweep_ms": sweep_ms});
    report["saved_state"] = saved_state_cost(&engine, now)?;
    // The sweep when every nonce may go (the save above took the state
    // out, so the nonces again): each is looked at and removed, as a
    // steady stream of requests makes every slot's table due.
    drop(engine);
    let engine = Engine::new(64, args.nonces as usize + 1);
    remember_nonces(&engine, false);
    let started = Instant::now();
    let swept = engine.sweep(now + Nanos::from_secs(300));
    report["sweep_all_due_ms"] = json!(started.elapsed().as_secs_f64() * 1000.0);
    if swept.nonces as u64 != args.nonces {
        return Err(format!(
            "a sweep after every nonce ran out removed {} of {}",
            swept.nonces, args.nonces
        ));
    }
    // The sweep a steady stream of requests costs each second: nonces
    // that run out over 300 s, swept a second at a time for 40 s. Since
    // session 30 a slot's table is visited every 5 to 10 s, so the first
    // sweep visits them all and the next ones about a seventh: seconds
    // 11 to 40 are the steady cost. Room for twice as many nonces, as a
    // server sized for its traffic has (one near its capacity sweeps
    // every table, as every sweep did until session 30).
    drop(engine);
    let engine = Engine::new(64, 2 * args.nonces as usize);
    remember_nonces(&engine, true);
    let mut each = Vec::new();
    let mut removed = 0u64;
    for second in 1..=40 {
        let started = Instant::now();
        removed += engine.sweep(now + Nanos::from_secs(second)).nonces as u64;
        each.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    // Never a nonce still to be remembered, and none held more than 10 s
    // past its time.
    let run_out_by = |s: u64| (0..args.nonces).filter(|&i| spread_ttl(i) <= s).count() as u64;
    let (most, least) = (run_out_by(40), run_out_by(30));
    if !(least..=most).contains(&removed) {
        return Err(format!(
            "40 steady sweeps removed {removed} nonces; {least} to {most} had run out 10 s before and at the end"
        ));
    }
    let steady = &each[10..];
    report["sweep_steady_ms"] = json!({
        "first": each[0],
        "mean": steady.iter().sum::<f64>() / steady.len() as f64,
        "max": steady.iter().cloned().fold(0.0, f64::max),
    });
    report["sweep_steady_removed"] = json!(removed);

    if let Some(addr) = &args.redis {
        loopback_only(addr)?;
        let client = redis::Client::open(format!("redis://{addr}/")).map_err(|e| e.to_string())?;
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        let used = |info: String| {
            info.lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let _: () = redis::cmd("FLUSHALL")
            .query_async(&mut c)
            .await
            .map_err(|e| e.to_string())?;
        let m0 = used(
            redis::cmd("INFO")
                .arg("memory")
                .query_async(&mut c)
                .await
                .map_err(|e| e.to_string())?,
        );
        // The recipe's state: a counter with a TTL per key and window...
        for chunk in (0..args.keys).collect::<Vec<_>>().chunks(10_000) {
            let mut pipe = redis::pipe();
            for i in chunk {
                pipe.cmd("SET")
                    .arg(format!("rl:wk_{i:016x}:29400000"))
                    .arg(1)
                    .arg("EX")
                    .arg(60)
                    .ignore();
            }
            let _: () = pipe.query_async(&mut c).await.map_err(|e| e.to_string())?;
        }
        let m1 = used(
            redis::cmd("INFO")
                .arg("memory")
                .query_async(&mut c)
                .await
                .map_err(|e| e.to_string())?,
        );
        // ...and a key with a TTL per nonce.
        for chunk in (0..args.nonces).collect::<Vec<_>>().chunks(10_000) {
            let mut pipe = redis::pipe();
            for i in chunk {
                pipe.cmd("SET")
                    .arg(format!("nonce:wk_{:016x}:{i:032x}", i % args.owners.max(1)))
                    .arg(1)
                    .arg("NX")
                    .arg("EX")
                    .arg(300)
                    .ignore();
            }
            let _: () = pipe.query_async(&mut c).await.map_err(|e| e.to_string())?;
        }
        let m2 = used(
            redis::cmd("INFO")
                .arg("memory")
                .query_async(&mut c)
                .await
                .map_err(|e| e.to_string())?,
        );
        let _: () = redis::cmd("FLUSHALL")
            .query_async(&mut c)
            .await
            .map_err(|e| e.to_string())?;
        report["redis_bytes_per_key"] = json!((m1 - m0) as f64 / args.keys as f64);
        report["redis_bytes_per_nonce"] = json!((m2 - m1) as f64 / args.nonces as f64);
    }
    if args.json {
        println!("{report}");
    } else {
        println!(
            "warden engine: {per_key:.1} bytes per rate-limit key, {per_nonce:.1} bytes per nonce ({} keys, {} nonces; {} MB in all)",
            args.keys,
            args.nonces,
            (after_nonces - base) >> 20
        );
        if report.get("redis_bytes_per_key").is_some() {
            println!(
                "redis:         {:.1} bytes per rate-limit key, {:.1} bytes per nonce",
                report["redis_bytes_per_key"], report["redis_bytes_per_nonce"]
            );
        }
        println!(
            "sweep:         {sweep_ms:.1} ms for all 64 shards, nothing yet run out; {:.1} ms when every nonce has",
            report["sweep_all_due_ms"].as_f64().unwrap_or(f64::NAN)
        );
        let steady = &report["sweep_steady_ms"];
        println!(
            "steady sweep:  {:.1} ms a second on average, {:.1} ms at most (seconds 11 to 40; the first {:.1} ms), nonces running out over 300 s ({} removed)",
            steady["mean"].as_f64().unwrap_or(f64::NAN),
            steady["max"].as_f64().unwrap_or(f64::NAN),
            steady["first"].as_f64().unwrap_or(f64::NAN),
            report["sweep_steady_removed"]
        );
        let saved = &report["saved_state"];
        println!(
            "state.saved:   {} entries, {} bytes, a checkpoint in {} ms (copied in {} ms, the longest check meanwhile {:.1} ms, {:.1} ms as long without; {} MB more memory at its peak), saved in {} ms ({} MB more), restored in {} ms ({} MB more at its peak, {} MB of it the state it built)",
            saved["entries"],
            saved["bytes"],
            saved["checkpoint_ms"],
            saved["copy_ms"],
            saved["longest_check_during_copy_ms"]
                .as_f64()
                .unwrap_or(f64::NAN),
            saved["longest_check_without_copy_ms"]
                .as_f64()
                .unwrap_or(f64::NAN),
            saved["checkpoint_peak_bytes"].as_u64().unwrap_or(0) >> 20,
            saved["save_ms"],
            saved["save_peak_bytes"].as_u64().unwrap_or(0) >> 20,
            saved["restore_ms"],
            saved["restore_peak_bytes"].as_u64().unwrap_or(0) >> 20,
            saved["restore_kept_bytes"].as_u64().unwrap_or(0) >> 20
        );
    }
    Ok(())
}

async fn run_frame(args: FrameArgs) -> Result<(), String> {
    use prost::Message;
    use std::io::Write;

    let channel = match &args.check {
        Some(addr) => {
            loopback_only(addr)?;
            Some(
                tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| e.to_string())?
                    .connect()
                    .await
                    .map_err(|e| format!("cannot reach {addr}: {e}"))?,
            )
        }
        None => None,
    };
    let message = match args.kind {
        FrameKind::Check => {
            let req = signed_check(&args);
            if let Some(channel) = channel {
                let answer = WardenClient::new(channel)
                    .check(req.clone())
                    .await
                    .map_err(|e| format!("check failed: {e}"))?
                    .into_inner();
                if answer.reason() != Reason::Ok {
                    return Err(format!("the frame is not allowed: {answer:?}"));
                }
            }
            req.encode_to_vec()
        }
        FrameKind::ExtAuthz => {
            let req = envoy_frames::ext_authz(&args);
            if let Some(channel) = channel {
                envoy_frames::ext_authz_refused_over_limit(channel, &args, &req).await?;
            }
            req.encode_to_vec()
        }
        FrameKind::RateLimit => {
            let req = envoy_frames::rate_limit();
            if let Some(channel) = channel {
                envoy_frames::rate_limit_ok(channel, &req).await?;
            }
            req.encode_to_vec()
        }
    };
    // gRPC framing: uncompressed flag, big-endian length, the message.
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    std::io::stdout()
        .write_all(&frame)
        .map_err(|e| e.to_string())
}

/// A POST of --body-bytes to /v1/orders and its signing headers, with a
/// fresh nonce: what every kind of frame asks about.
fn signed_post(args: &FrameArgs) -> (String, warden_client::signing::SignedHeaders) {
    let body = "x".repeat(args.body_bytes);
    let headers = Signer::new(args.key_id.as_str(), args.secret.as_bytes().to_vec()).sign_at(
        unix_now(),
        &warden_client::signing::new_nonce(),
        "POST",
        "/v1/orders",
        "",
        body.as_bytes(),
    );
    (body, headers)
}

/// warden's own `Check` of a signed POST, as `dry_run`.
fn signed_check(args: &FrameArgs) -> CheckRequest {
    let (body, headers) = signed_post(args);
    let body = body.as_bytes();
    let mut req = check_request_from(&headers, "warden-v1", "POST", "/v1/orders", "", body);
    req.dry_run = true;
    req
}

/// The frames of Envoy's two calls, as Envoy sends them
/// (`tests/fixtures/envoy` has what a real Envoy sent).
mod envoy_frames {
    use super::FrameArgs;
    use envoy_types::pb::envoy::config::core::v3::address::Address;
    use envoy_types::pb::envoy::config::core::v3::{Address as EnvoyAddress, SocketAddress};
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
        HttpRequest, Peer, Request,
    };
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
    use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
    use tonic::transport::Channel;

    const CLIENT: &str = "203.0.113.7";

    /// A signed POST, as Envoy's ext_authz filter asks about it.
    pub fn ext_authz(args: &FrameArgs) -> CheckRequest {
        let (body, signed) = super::signed_post(args);
        let mut headers: std::collections::HashMap<String, String> = [
            (":authority", "api.shop.example".to_owned()),
            (":method", "POST".to_owned()),
            (":path", "/v1/orders".to_owned()),
            (":scheme", "https".to_owned()),
            ("accept", "*/*".to_owned()),
            ("content-type", "application/json".to_owned()),
            ("content-length", body.len().to_string()),
            ("user-agent", "curl/8.5.0".to_owned()),
            ("x-forwarded-for", CLIENT.to_owned()),
            ("x-forwarded-proto", "https".to_owned()),
            (
                "x-request-id",
                "6f1f6b2c-3c0e-4d5a-9a53-1c1f0f7a9e21".to_owned(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (name, value) in signed.to_pairs() {
            headers.insert(name.to_ascii_lowercase(), value);
        }
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(Peer {
                    address: Some(EnvoyAddress {
                        address: Some(Address::SocketAddress(SocketAddress {
                            address: CLIENT.to_owned(),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                }),
                request: Some(Request {
                    http: Some(HttpRequest {
                        id: "13359530607844510314".to_owned(),
                        method: "POST".to_owned(),
                        headers,
                        path: "/v1/orders".to_owned(),
                        host: "api.shop.example".to_owned(),
                        scheme: "https".to_owned(),
                        protocol: "HTTP/1.1".to_owned(),
                        size: body.len() as i64,
                        body,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    /// Spends the key's one request with a request of its own, then
    /// requires `frame` to be refused as over the limit (429), so h2load
    /// measures that refusal and no other answer.
    pub async fn ext_authz_refused_over_limit(
        channel: Channel,
        args: &FrameArgs,
        frame: &CheckRequest,
    ) -> Result<(), String> {
        let mut client = AuthorizationClient::new(channel);
        client
            .check(ext_authz(args))
            .await
            .map_err(|e| format!("ext_authz failed: {e}"))?;
        let answer = client
            .check(frame.clone())
            .await
            .map_err(|e| format!("ext_authz failed: {e}"))?
            .into_inner();
        match &answer.http_response {
            Some(HttpResponse::DeniedResponse(denied))
                if denied.status.as_ref().map(|s| s.code) == Some(429) =>
            {
                Ok(())
            }
            _ => Err(format!(
                "the frame is not refused as over its limit: {answer:?}"
            )),
        }
    }

    /// Domain `bench`: the client's address, and one named route.
    pub fn rate_limit() -> RateLimitRequest {
        let descriptor = |key: &str, value: &str| RateLimitDescriptor {
            entries: vec![Entry {
                key: key.to_owned(),
                value: value.to_owned(),
            }],
            ..Default::default()
        };
        RateLimitRequest {
            domain: "bench".to_owned(),
            descriptors: vec![
                descriptor("remote_address", CLIENT),
                descriptor("generic_key", "orders"),
            ],
            hits_addend: 0,
        }
    }

    /// Requires `frame` to be answered OK, with a status per descriptor:
    /// both matched a limit.
    pub async fn rate_limit_ok(channel: Channel, frame: &RateLimitRequest) -> Result<(), String> {
        let answer = RateLimitServiceClient::new(channel)
            .should_rate_limit(frame.clone())
            .await
            .map_err(|e| format!("ShouldRateLimit failed: {e}"))?
            .into_inner();
        let limited = answer
            .statuses
            .iter()
            .filter(|s| s.current_limit.is_some())
            .count();
        if answer.overall_code() != Code::Ok || limited != frame.descriptors.len() {
            return Err(format!(
                "the frame is not OK under a limit per descriptor: {answer:?}"
            ));
        }
        Ok(())
    }
}

/// The median of 21 rounds of 20,000 verifications after 10 to warm up
/// (under a second in all): the median, so that one round the VM pauses
/// does not move it.
fn run_host() {
    let secret = [warden::model::Secret::new(
        b"bench-secret-0123456789abcdefghijklmnop".to_vec(),
    )];
    let body = vec![7u8; 1024];
    let signature = hmac_sha256(secret[0].expose(), &body);
    const PER_ROUND: u32 = 20_000;
    let mut rounds: Vec<f64> = (0..31)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..PER_ROUND {
                std::hint::black_box(warden::signing::verify(
                    &secret,
                    std::hint::black_box(&body),
                    &signature,
                ));
            }
            started.elapsed().as_nanos() as f64 / f64::from(PER_ROUND)
        })
        .skip(10)
        .collect();
    rounds.sort_by(f64::total_cmp);
    println!(
        "host: HMAC-SHA256 of 1 KiB verified in {:.0} ns (620-660 on fast days of this project's VM)",
        rounds[rounds.len() / 2]
    );
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Some(Command::Memory(args)) => run_memory(args).await,
            Some(Command::Frame(args)) => run_frame(args).await,
            Some(Command::Keys(args)) => run_keys(args).await,
            Some(Command::Host) => {
                run_host();
                Ok(())
            }
            None => run_load(cli.load).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warden-bench: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runs_errors_are_all_counted_and_only_the_first_is_written_out() {
        let stats = Stats::new();
        stats.record(Duration::from_micros(40), Ok("ok"));
        stats.record_error(Duration::from_micros(50), || "the first".to_string());
        for _ in 0..3 {
            stats.record_error(Duration::from_micros(60), || {
                panic!("an error's text made after the first")
            });
        }
        stats.record(Duration::from_micros(70), Err("a later one".to_string()));
        assert_eq!(stats.errors.load(Ordering::Relaxed), 5);
        assert_eq!(stats.done.load(Ordering::Relaxed), 6);
        assert_eq!(stats.first_error.lock().as_deref(), Some("the first"));
        assert_eq!(stats.outcomes.lock().get("ok"), Some(&1));
        assert_eq!(stats.hist.lock().len(), 6);
    }
}
