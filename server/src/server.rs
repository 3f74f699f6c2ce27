//! Listening, the TLS handshake, health, the background sweep, and graceful
//! shutdown.
//!
//! Connections are accepted here rather than by tonic so that the handshake
//! runs on its own task (a slow client cannot hold up `accept`), so that the
//! caller identity is read from the client certificate once per connection,
//! and so that idle connections can be closed.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use warden_client::proto::admin_server::AdminServer;
use warden_client::proto::peer_server::PeerServer;

use crate::alerts::Alerts;
use crate::audit::AuditLog;
use crate::check::Checker;
use crate::cluster::peer::PeerService;
use crate::cluster::{ClusterState, Membership};
use crate::config::{Config, DEFAULT_MAX_MESSAGE_BYTES, ServerSettings};
use crate::conn::{Conn, ConnState, arm_keepalive, monotonic_ms};
use crate::direct_route::Direct;
use crate::engine::{Clock, Nanos, StateSeed, SystemClock};
use crate::gate::{FORWARD_AUTH_SHARE, Gate, Refusal};
use crate::gateway::ext_authz::ExtAuthz;
use crate::gateway::forward_auth::{Caller, Endpoint};
use crate::gateway::ratelimit::EnvoyRateLimit;
use crate::key_admin::{KeyAdmin, load_key, rebuild_keys};
use crate::keys::KeyRing;
use crate::log_budget::LineBudget;
use crate::request_wait::RequestWaits;
use crate::saved_state::{Handover, NotWhole};
use crate::service::Admission;
use crate::service::admin::{AdminOnly, AdminService};
use crate::service::stream::CheckStreams;
use crate::service::unary::Unary;
use crate::service::warden::WardenService;
use crate::serving::{Admitted, Destination, Handshake, Port, Serve, Servers, ServingThreads};
use crate::store::{Store, StoreChange};
use crate::tls::{Protocol, TlsReloader};
use tonic::service::Routes;
use warden_client::proto::warden_server::WardenServer;

/// How often idle state is swept out of the engine.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// The gRPC service name health is reported for (besides "", the server).
const SERVICE_NAME: &str = "warden.v1.Warden";

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot set up gRPC reflection: {0}")]
    Reflection(String),
    #[error("cannot start the serving threads: {0}")]
    Runtime(io::Error),
    #[error("in-flight calls did not finish within the drain timeout")]
    DrainTimeout,
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Keys(#[from] crate::keys::RingError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error("cluster: {0}")]
    Cluster(String),
    #[error(transparent)]
    ClockMark(#[from] crate::clock_mark::MarkError),
    #[error(transparent)]
    FenceRecord(#[from] crate::fence_record::FenceRecordError),
}

/// Serving status, for gRPC health and the HTTP readiness probe alike.
#[derive(Clone)]
struct Health {
    reporter: HealthReporter,
    ready: Arc<AtomicBool>,
}

impl Health {
    async fn set(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
        self.reporter.set_service_status(SERVICE_NAME, status).await;
        self.ready.store(serving, Ordering::SeqCst);
        metrics::gauge!("warden_ready").set(if serving { 1.0 } else { 0.0 });
    }
}

/// Everything a server runs on, built once from the config: the store and
/// audit log, the keys and the check pipeline, the alert counters, the TLS
/// material and the connection bounds. One place constructs it; `serve`
/// only wires it to listeners and tasks.
pub struct App {
    config: Config,
    clock: Arc<dyn Clock>,
    tls: Option<Arc<TlsReloader>>,
    gate: Arc<Gate>,
    /// `Some` with `[forward_auth]`: its listener's own share of the
    /// connection bound.
    forward_auth_gate: Option<Arc<Gate>>,
    store: Option<Arc<Store>>,
    audit: Option<Arc<AuditLog>>,
    checker: Arc<Checker>,
    alerts: Arc<Alerts>,
    /// `Some` with `[cluster]`.
    membership: Option<Arc<Membership>>,
    /// `Some` with `[cluster]`: routing of state steps to their owners.
    cluster: Option<Arc<ClusterState>>,
    /// `Some` with a store: keeps the clock within the mark on disk, and
    /// writes the time it stopped at when stopped (or dropped), after the
    /// last answer.
    clock_mark: Option<crate::clock_mark::Keeper<crate::engine::clock::SystemTimeAsIs>>,
}

impl App {
    pub async fn build(config: &Config) -> Result<Self, ServeError> {
        let fd_limit = crate::gate::raise_fd_limit();
        let mut gate = Gate::new(&config.server, fd_limit);
        let forward_auth_gate = config
            .forward_auth
            .as_ref()
            .map(|_| Arc::new(gate.set_aside(FORWARD_AUTH_SHARE)));
        let gate = Arc::new(gate);
        tracing::debug!(
            fd_limit,
            max_connections = gate.max_connections(),
            "connection bounds"
        );
        let tls = match &config.tls {
            Some(paths) => Some(Arc::new(TlsReloader::new(paths.clone())?)),
            None => None,
        };
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let store = match &config.store {
            Some(settings) => Some(Arc::new(Store::open(settings).await?)),
            None => None,
        };
        // Before anything reads the time for a fence: the clock holds from
        // the previous process's mark (see clock_mark).
        let clock_mark = match &store {
            Some(store) => Some(crate::clock_mark::Keeper::arm(
                store.dir(),
                SystemClock::wall(),
            )?),
            None => None,
        };
        let audit = match &store {
            Some(store) => Some(Arc::new(AuditLog::open(
                store.dir(),
                store.master(),
                config.audit.clone(),
            )?)),
            None => None,
        };
        let keys = KeyRing::build(&config.policies, &config.keys, store.as_deref())?;
        let coordinator = match (&config.cluster, &config.store) {
            (Some(cluster), Some(store)) => store.postgres_url.clone().map(|url| (cluster, url)),
            _ => None,
        };
        // What a single process stopped before this one saved (a cluster
        // node's state went to the other nodes instead).
        let saved = match (&store, &coordinator) {
            (Some(store), None) => crate::saved_state::open(store.dir(), store.master()),
            (Some(store), Some(_)) => {
                crate::saved_state::not_taken_back(store.dir());
                None
            }
            _ => None,
        };
        // Every node of a cluster keys state ids alike; a single process
        // as the one that saved its state did.
        let seed = match (&coordinator, &saved) {
            (Some((_, url)), _) => crate::cluster::membership::state_seed(url)
                .await
                .map_err(|e| ServeError::Cluster(format!("cannot read the state seed: {e}")))?,
            (None, Some(saved)) => saved.seed(),
            (None, None) => StateSeed::random(),
        };
        // The process before may have accepted further ahead (a future
        // skew lowered since): the fence covers what it recorded, and this
        // process records its own before it serves (see fence_record).
        let predecessor = match (&store, &clock_mark) {
            (Some(store), Some(mark)) => {
                crate::fence_record::read(store.dir(), mark.previous().map(|m| m.until))?
            }
            _ => None,
        };
        let mut checker = Checker::with_seed(
            config.check.clone(),
            keys,
            config.authz.clone(),
            clock.clone(),
            seed,
            predecessor,
        );
        // A saved state that cannot be read is set aside with a warning.
        // One handed over whole lets this process keep its saver's fence.
        let restoring = std::time::Instant::now();
        let mut handed_over = false;
        let afterwards = match &config.store {
            Some(store) if !store.save_state_every.is_zero() => {
                crate::saved_state::Afterwards::LeaveToTheFirstCheckpoint
            }
            _ => crate::saved_state::Afterwards::Remove,
        };
        if let Some(Ok(restored)) =
            saved.map(|s| s.restore(checker.engine(), clock.now(), afterwards))
        {
            let fence = Handover::fence_after(
                restored.handover,
                clock_mark.as_ref().and_then(|m| m.previous()),
                config.check.past_skew,
            );
            if let Ok(fence) = fence {
                checker.go_on_behind(fence);
                handed_over = true;
            }
            tracing::info!(
                event = "state_restored",
                entries = restored.entries,
                dropped_for_caps = restored.dropped,
                ms = restoring.elapsed().as_millis() as u64,
                fence = checker.fence().first_second(),
                fence_kept = handed_over,
                why_fenced = fence.err().map(NotWhole::as_str),
                "took back the rate-limit state the previous process saved"
            );
        }
        let checker = Arc::new(checker);
        if let Some(store) = &store {
            crate::fence_record::write(store.dir(), config.check.future_skew, checker.fence())?;
            if let Some(p) = predecessor
                && !handed_over
                && checker.fence()
                    > crate::freshness::Fence::after(clock.now(), config.check.future_skew)
            {
                tracing::warn!(
                    event = "fence_behind_previous_skew",
                    previous_future_skew_s = p.future_skew.as_secs(),
                    future_skew_s = config.check.future_skew.as_secs(),
                    fence = checker.fence().first_second(),
                    "the previous process accepted requests further ahead (check.future_skew was lowered): they are refused, and fresh ones wait for this later fence this once"
                );
            }
        }
        let alerts = Arc::new(Alerts::new(config.alerts.clone(), clock.clone()));
        let membership = coordinator.map(|(cluster, url)| {
            Membership::new(
                cluster.clone(),
                url,
                config.check.past_skew,
                config.check.future_skew,
                checker.fence(),
            )
        });
        let cluster = match (&membership, &config.cluster) {
            (Some(m), Some(settings)) => {
                let tls = match &settings.peer_tls {
                    Some(p) => Some(
                        warden_client::Tls::from_files(&p.ca, &p.cert, &p.key).map_err(|e| {
                            ServeError::Cluster(format!("cannot read the peer certificate: {e}"))
                        })?,
                    ),
                    None => None,
                };
                let state = Arc::new(ClusterState::new(m.clone(), checker.clone(), tls));
                // Failure budgets are shared too: charged at their owner.
                let charge = Arc::downgrade(&state);
                checker.charge_failures_to(Box::new(move |key, limit| {
                    if let Some(state) = charge.upgrade() {
                        state.charge_failure(key, limit);
                    }
                }));
                Some(state)
            }
            _ => None,
        };
        Ok(Self {
            config: config.clone(),
            clock,
            tls,
            gate,
            forward_auth_gate,
            store,
            audit,
            checker,
            alerts,
            membership,
            cluster,
            clock_mark,
        })
    }
}

/// A bound, not yet serving server: binding first lets the caller learn the
/// real ports (for `127.0.0.1:0`) before traffic arrives.
pub struct Bound {
    app: App,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    forward_auth_listener: Option<TcpListener>,
}

impl Bound {
    /// Builds the [`App`] and binds the listen (and metrics) addresses.
    pub async fn bind(config: &Config) -> Result<Self, ServeError> {
        let app = App::build(config).await?;
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })
        };
        let listener = bind(config.listen).await?;
        let metrics_listener = match config.server.metrics_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let forward_auth_listener = match &config.forward_auth {
            Some(f) => Some(bind(f.listen).await?),
            None => None,
        };
        Ok(Self {
            app,
            listener,
            metrics_listener,
            forward_auth_listener,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The forward-auth port's address (with `[forward_auth]`), and
    /// whether it serves mTLS.
    pub fn forward_auth_addr(&self) -> Option<(SocketAddr, bool)> {
        let listener = self.forward_auth_listener.as_ref()?;
        let tls = self.app.config.forward_auth.as_ref().is_some_and(|f| f.tls);
        listener.local_addr().ok().map(|addr| (addr, tls))
    }

    pub fn is_tls(&self) -> bool {
        self.app.tls.is_some()
    }

    /// Serves until `shutdown` resolves, then drains: health turns
    /// NOT_SERVING, new calls are still served for `drain_delay` (so load
    /// balancers can stop sending), then listening stops and in-flight calls
    /// get `drain_timeout` to finish.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        metrics: Option<PrometheusHandle>,
    ) -> Result<(), ServeError> {
        let Bound {
            mut app,
            listener,
            metrics_listener,
            forward_auth_listener,
        } = self;
        let settings = app.config.server.clone();
        // The recorder is installed by now (it is not yet while the app is
        // built): gauges that change only with keys or config, set once.
        metrics::gauge!("warden_api_keys").set(app.checker.keys().key_count() as f64);
        metrics::gauge!("warden_nonce_capacity").set(app.checker.settings().nonce_capacity as f64);
        if app.cluster.is_some() {
            crate::metrics::zero_cluster_counters();
        }
        // Loops that hold nothing to flush: stopped together at the end.
        let mut background = JoinSet::new();
        let audit_writer = app.audit.as_ref().map(|a| a.start_writer());
        // A single process checkpoints its rate-limit state while it
        // serves, and saves it whole when it stops.
        let state_writer = Arc::new(crate::saved_state::Writer::default());
        if let (None, Some(store), Some(settings)) = (&app.cluster, &app.store, &app.config.store)
            && !settings.save_state_every.is_zero()
        {
            background.spawn(keep_checkpoints(
                store.clone(),
                app.checker.clone(),
                app.clock.clone(),
                state_writer.clone(),
                settings.save_state_every,
            ));
        }
        // A shared store: other processes' changes take effect here too.
        if let Some(store) = app.store.clone().filter(|s| s.is_shared()) {
            let (checker, config) = (app.checker.clone(), app.config.clone());
            let watched = store.clone();
            background.spawn(crate::store::watch_postgres(watched, move |change| {
                let (checker, config, store) = (checker.clone(), config.clone(), store.clone());
                async move {
                    let loaded = match change {
                        StoreChange::Key(record) => load_key(checker, store, *record).await,
                        StoreChange::Everything => {
                            rebuild_keys(checker, store, config.policies.clone(), config.keys.clone())
                                .await
                        }
                    };
                    if let Err(e) = loaded {
                        tracing::error!(event = "keys_rebuild_failed", error = %e, "stored keys could not be loaded");
                    }
                }
            }));
        }
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let health = Health {
            reporter,
            ready: Arc::new(AtomicBool::new(false)),
        };
        health.set(false).await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(warden_client::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;

        let (stop_metrics_tx, stop_metrics_rx) = oneshot::channel::<()>();
        let metrics_task = match (metrics_listener, metrics) {
            (Some(listener), Some(handle)) => Some(tokio::spawn(crate::metrics::serve(
                listener,
                handle,
                health.ready.clone(),
                async {
                    let _ = stop_metrics_rx.await;
                },
            ))),
            _ => None,
        };

        let max_message = app.checker.settings().max_message();
        let waits = RequestWaits::new(
            settings.request_read_timeout,
            settings.max_waiting_request_bytes,
        );
        if let Some(tls) = app.tls.clone() {
            background.spawn(tls.watch());
        }
        // Every listener's gate: the gauge of open connections counts them
        // all, against the bound they share out.
        let gates = std::iter::once(app.gate.clone())
            .chain(app.forward_auth_gate.clone())
            .collect();
        background.spawn(sweep_loop(
            app.checker.clone(),
            app.alerts.clone(),
            app.clock.clone(),
            gates,
        ));
        // The node's lease: kept until shutdown, then given up.
        let (leave_tx, leave_rx) = oneshot::channel::<()>();
        let membership_task = app
            .membership
            .clone()
            .map(|m| tokio::spawn(m.run(leave_rx)));
        // Requests signed before the restart fence are STALE, so the server
        // only reports SERVING once the fence second has begun (and, in a
        // cluster, once it holds a lease and answers for all its slots).
        let starting = {
            let (health, fence, clock) = (health.clone(), app.checker.fence(), app.clock.clone());
            let membership = app.membership.clone();
            background.spawn(async move {
                fence.opened(&*clock).await;
                if let Some(m) = membership {
                    m.joined().await;
                    // Slots taken over on joining are fenced, and those
                    // other members hold wait for their handovers (given up
                    // on after two lease TTLs): ready once requests signed
                    // now pass everywhere on this node.
                    while !m
                        .table()
                        .answers_all_it_owns(crate::engine::clock::unix_secs())
                    {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                health.set(true).await;
            })
        };

        let admin = AdminOnly::new(
            AdminServer::new(AdminService::new(
                KeyAdmin::new(
                    app.checker.clone(),
                    app.store.clone(),
                    app.audit.clone(),
                    app.config.policies.clone(),
                    app.config.keys.clone(),
                ),
                app.membership.clone(),
            )),
            app.config.authz.clone(),
            app.audit.clone(),
        );
        let admission = Admission::new(settings.max_inflight);
        // Set once the drain delay is over: long-lived streams end.
        let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
        let forward_auth_closing = closing_rx.clone();
        let checks = WardenService::new(
            app.checker.clone(),
            app.cluster.clone(),
            app.alerts.clone(),
            app.audit.clone(),
            admission.clone(),
            LineBudget::new(settings.max_denial_log_lines),
        );
        // The forward-auth port: its connections come through an accept
        // loop like the gRPC port's, under a share of the connection bound
        // of their own (a flood of idle ones, from any local process on
        // loopback, is closed at its bound instead of taking what the gRPC
        // port needs), and are served on the serving threads too.
        let (forward_auth, forward_auth_serve) = match (
            forward_auth_listener,
            app.config.forward_auth.clone(),
            app.forward_auth_gate.clone(),
        ) {
            (Some(listener), Some(forward), Some(gate)) => {
                // Over mTLS, the same handshake limits and caller
                // identities as the gRPC port.
                let tls = match (&app.tls, forward.tls) {
                    (Some(tls), true) => Some((tls.clone(), Protocol::Http1)),
                    _ => None,
                };
                let caller = match tls {
                    Some(_) => Caller::Certificate,
                    None => Caller::Configured(crate::check::CallerIdentity(
                        forward.identity.as_deref().map(Into::into),
                    )),
                };
                let endpoint = Arc::new(Endpoint {
                    service: checks.clone(),
                    settings: forward,
                    gateway: app.config.gateway.clone(),
                    caller,
                });
                let serve: Arc<Serve> = Arc::new(move |incoming, drained| {
                    Box::pin(crate::gateway::forward_auth::serve(
                        incoming,
                        drained,
                        endpoint.clone(),
                    ))
                });
                (Some((listener, tls, gate)), Some(serve))
            }
            _ => (None, None),
        };
        // The Envoy faces share the Check pipeline and the in-flight bound.
        // The calls made once per request are read and answered by `Unary`,
        // every other call (and any unusual framing) by tonic's generated
        // service on the same handler.
        let ext_authz = Arc::new(ExtAuthz::new(
            checks.clone(),
            app.config.gateway.clone(),
            app.config.authz.clone(),
            admission.clone(),
        ));
        let ext_authz = Unary::new(
            ext_authz.clone(),
            AuthorizationServer::from_arc(ext_authz).max_decoding_message_size(max_message),
            max_message,
        );
        let ratelimit = app.config.envoy_ratelimit.clone().map(|settings| {
            for rule in settings.rules.rules() {
                app.checker.engine().pools().policy(&rule.policy);
            }
            let ratelimit = Arc::new(EnvoyRateLimit::new(
                checks.clone(),
                settings,
                app.config.authz.clone(),
                admission.clone(),
            ));
            // tonic's default limit, which this service has always had.
            Unary::new(
                ratelimit.clone(),
                RateLimitServiceServer::from_arc(ratelimit),
                DEFAULT_MAX_MESSAGE_BYTES,
            )
        });
        let checks = Arc::new(checks);
        let service = CheckStreams::new(
            checks.clone(),
            Unary::new(
                checks.clone(),
                WardenServer::from_arc(checks).max_decoding_message_size(max_message),
                max_message,
            ),
            max_message,
        );
        let peer = app.cluster.clone().map(|state| {
            background.spawn(expire_reservations(state.clone()));
            background.spawn(state.clone().hand_over_lost_slots());
            background.spawn(state.clone().keep_vouched());
            PeerServer::new(PeerService::new(
                state,
                app.config.authz.clone(),
                closing_rx,
            ))
        });

        let (draining_tx, draining_rx) = oneshot::channel::<()>();
        let drain = {
            let health = health.clone();
            let delay = settings.drain_delay;
            // A node whose name another live process holds shuts down too.
            let refused = app.membership.clone();
            async move {
                match refused {
                    Some(m) => tokio::select! {
                        _ = shutdown => {}
                        _ = m.name_refused() => {}
                    },
                    None => shutdown.await,
                }
                starting.abort();
                health.set(false).await;
                tracing::info!(
                    event = "draining",
                    delay_ms = delay.as_millis() as u64,
                    "shutting down: NOT_SERVING, finishing in-flight calls"
                );
                let _ = draining_tx.send(());
                tokio::time::sleep(delay).await;
                // Peers' long-lived streams end now, so that they do not
                // wait out the drain timeout like a call in flight.
                let _ = closing_tx.send(true);
            }
        };
        let max_streams = u32::try_from(settings.max_calls_per_connection * 2).unwrap_or(u32::MAX);
        let mut routes = Routes::new(health_service)
            .add_service(reflection)
            .add_service(admin);
        if let Some(peer) = peer {
            routes = routes.add_service(peer);
        }
        // The services called once per request skip the router.
        let calls = Direct::new(
            service,
            Direct::new(ext_authz, Direct::optional(ratelimit, routes.prepare())),
        );
        let serve: Arc<Serve> = Arc::new(move |incoming, drained| {
            Box::pin(crate::http2::serve(
                incoming,
                drained,
                calls.clone(),
                max_streams,
                waits.clone(),
            ))
        });
        // WARDEN_SERVING_THREADS=0: every connection on the main runtime's
        // work-stealing workers, as before serving threads (to compare).
        let threads = match crate::serving::thread_count() {
            0 => None,
            n => {
                let servers = Servers {
                    grpc: serve.clone(),
                    forward_auth: forward_auth_serve.clone(),
                };
                Some(ServingThreads::start(n, servers).map_err(ServeError::Runtime)?)
            }
        };
        // Where each port's accept loop hands its connections: the serving
        // threads, or a channel to a server on the main runtime.
        let destination = |port| match &threads {
            Some(threads) => (Destination::Threads(threads.clone(), port), None),
            None => {
                let (tx, rx) = mpsc::channel::<io::Result<Conn>>(128);
                (Destination::Here(tx), Some(rx))
            }
        };
        tracing::debug!(
            event = "serving_threads",
            threads = threads.as_ref().map_or(0, |t| t.count()),
            "serving"
        );
        let (grpc_destination, grpc_on_main) = destination(Port::Grpc);
        background.spawn(accept_loop(
            listener,
            app.tls.clone().map(|tls| (tls, Protocol::Grpc)),
            grpc_destination,
            settings.clone(),
            app.gate.clone(),
        ));
        let forward_auth_on_main = forward_auth.and_then(|(listener, tls, gate)| {
            let (destination, on_main) = destination(Port::ForwardAuth);
            background.spawn(accept_loop(
                listener,
                tls,
                destination,
                settings.clone(),
                gate,
            ));
            on_main
        });
        let server = async {
            match &threads {
                Some(threads) => {
                    drain.await;
                    threads.drain();
                    threads.drained().await
                }
                None => {
                    let conns = grpc_on_main.expect("a channel when no serving threads");
                    let grpc = serve(ReceiverStream::new(conns), Box::pin(drain));
                    // Drained with the gRPC port, once the drain delay is
                    // over.
                    let forward_auth = async {
                        if let (Some(conns), Some(serve)) =
                            (forward_auth_on_main, &forward_auth_serve)
                        {
                            let mut closing = forward_auth_closing;
                            let closed = Box::pin(async move {
                                let _ = closing.wait_for(|closing| *closing).await;
                            });
                            serve(ReceiverStream::new(conns), closed).await
                        }
                    };
                    futures_util::future::join(grpc, forward_auth).await;
                }
            }
        };

        // Both ports' calls, which check and so change state, are answered
        // within the deadline, or the state saved is not whole.
        let deadline = settings.drain_delay + settings.drain_timeout;
        let result = tokio::select! {
            () = server => Ok(()),
            _ = async {
                if draining_rx.await.is_ok() {
                    tokio::time::sleep(deadline).await;
                } else {
                    std::future::pending::<()>().await;
                }
            } => Err(ServeError::DrainTimeout),
        };
        let drained = result.is_ok();
        background.shutdown().await;
        // The last call is answered: hand the state over, then give the
        // lease up (the next owners serve it without a fence).
        if let Some(cluster) = &app.cluster
            && tokio::time::timeout(Duration::from_secs(10), cluster.leave())
                .await
                .is_err()
        {
            tracing::warn!(
                event = "cluster_handoff_failed",
                "handing state over timed out"
            );
        }
        if let Some(task) = membership_task {
            let _ = leave_tx.send(());
            let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
        }
        // A single process keeps its state for the next one; whole (every
        // call answered, the final clock mark written), the next one goes
        // on behind this one's fence.
        if let (None, Some(store)) = (&app.cluster, &app.store) {
            let mark = app.clock_mark.take().and_then(|keeper| keeper.stop());
            let handover = mark
                .filter(|_| drained)
                .map(|mark| Handover::new(mark, app.checker.fence(), app.config.check.past_skew));
            let started = std::time::Instant::now();
            let engine = app.checker.engine();
            let now = app.clock.now();
            match state_writer.save(store.dir(), store.master(), engine, now, handover) {
                Ok(entries) => tracing::info!(
                    event = "state_saved",
                    entries,
                    whole = handover.is_some(),
                    ms = started.elapsed().as_millis() as u64,
                    "saved the rate-limit state for the next process"
                ),
                Err(e) => tracing::warn!(
                    event = "state_save_failed",
                    error = %e,
                    "could not save the rate-limit state: the next process starts with full limits"
                ),
            }
        }
        let _ = stop_metrics_tx.send(());
        if let (Some(audit), Some(writer)) = (&app.audit, audit_writer) {
            // Queued denial records are written before exit.
            audit.close_queue();
            let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
        }
        if let Some(m) = metrics_task {
            let _ = m.await;
        }
        // Last: tasks that calls spawned (a cluster link made on demand)
        // ran on their connection's thread until now.
        if let Some(threads) = &threads {
            threads.stop().await;
        }
        if let Some(m) = app.membership.as_ref().filter(|m| m.name_is_taken()) {
            return Err(ServeError::Cluster(format!(
                "node name {:?} is held by another live warden process; give each node a name of its own ([cluster] node)",
                m.node()
            )));
        }
        result
    }
}

/// Writes a checkpoint of the rate-limit state at once (what was just taken
/// back, were the process to crash soon) and every `every` after, so that a
/// crash loses only what changed since the last one (`saved_state`). A
/// checkpoint that fails is counted and logged (once, until one is written
/// again); it never stops checks.
async fn keep_checkpoints(
    store: Arc<Store>,
    checker: Arc<Checker>,
    clock: Arc<dyn Clock>,
    writer: Arc<crate::saved_state::Writer>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let started = std::time::Instant::now();
        let written = tokio::task::spawn_blocking({
            let (store, checker, clock, writer) = (
                store.clone(),
                checker.clone(),
                clock.clone(),
                writer.clone(),
            );
            move || writer.checkpoint(store.dir(), store.master(), checker.engine(), clock.now())
        })
        .await
        .unwrap_or_else(|e| Some(Err(io::Error::other(e))));
        match written {
            // The final save was written: nothing more to keep.
            None => return,
            Some(Ok(entries)) => {
                metrics::counter!("warden_state_checkpoints_total").increment(1);
                metrics::histogram!("warden_state_checkpoint_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::gauge!("warden_state_checkpoint_entries").set(entries as f64);
                if std::mem::take(&mut failing) {
                    tracing::info!(
                        event = "state_checkpoint_written",
                        "a checkpoint of the rate-limit state is written again"
                    );
                }
                tracing::debug!(
                    event = "state_checkpointed",
                    entries,
                    ms = started.elapsed().as_millis() as u64,
                    "checkpoint of the rate-limit state written"
                );
            }
            Some(Err(e)) => {
                metrics::counter!("warden_durable_write_failures_total", "what" => "state")
                    .increment(1);
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(
                        event = "state_checkpoint_failed",
                        error = %e,
                        "cannot write a checkpoint of the rate-limit state: warden serves on, but a crash now loses what limits and lockouts were spent since the last one"
                    );
                }
            }
        }
    }
}

/// Whether a warning of the accept loop, whose last time is kept in
/// `last_ms`, may be written now: one every 10 s at most, since what
/// happens to every accepted connection happens as often as a flood
/// connects, and must not become a flood of log lines.
fn may_warn(last_ms: &AtomicU64) -> bool {
    // 0 means never warned (the monotonic clock starts at 0, hence max(1)).
    let now = monotonic_ms().max(1);
    let before = last_ms.load(Ordering::Relaxed);
    (before == 0 || now.saturating_sub(before) >= 10_000)
        && last_ms
            .compare_exchange(before, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Closes a connection over a bound at once, counted, with one warning per
/// cause every 10 s at most ([`may_warn`]).
fn refuse(refusal: Refusal, remote: SocketAddr) {
    static LAST_WARNED_MS: [AtomicU64; 3] =
        [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
    metrics::counter!("warden_connections_refused_total", "cause" => refusal.name()).increment(1);
    if may_warn(&LAST_WARNED_MS[refusal as usize]) {
        tracing::warn!(
            event = "connection_refused",
            cause = refusal.name(),
            %remote,
            "closing new connections over a bound (see warden_connections_refused_total)"
        );
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<(Arc<TlsReloader>, Protocol)>,
    destination: Destination,
    settings: ServerSettings,
    gate: Arc<Gate>,
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
        let slot = match gate.open() {
            Ok(slot) => slot,
            Err(refusal) => {
                refuse(refusal, remote);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        if let Err(e) = arm_keepalive(&tcp) {
            // Served all the same: a vanished peer's connection is then
            // closed by `idle_timeout`.
            static LAST_WARNED_MS: AtomicU64 = AtomicU64::new(0);
            if may_warn(&LAST_WARNED_MS) {
                tracing::warn!(event = "keepalive_not_armed", error = %e, %remote, "TCP keepalive could not be set on an accepted connection");
            }
        }
        let handshake = match &tls {
            None => None,
            Some((tls, protocol)) => match gate.handshake(remote.ip()) {
                // Each handshake uses the configuration current at accept
                // time, so a reload affects new connections only.
                Ok(slot) => Some(Handshake {
                    acceptor: tls.acceptor(*protocol),
                    allow_cn: tls.allow_cn_identity(),
                    timeout: settings.handshake_timeout,
                    slot,
                }),
                Err(refusal) => {
                    refuse(refusal, remote);
                    continue;
                }
            },
        };
        let state = Arc::new(ConnState::new(settings.max_calls_per_connection));
        let admitted = match Admitted::new(
            tcp,
            remote,
            slot,
            state,
            settings.idle_timeout,
            handshake,
        ) {
            Ok(admitted) => admitted,
            Err(e) => {
                tracing::warn!(event = "accept_failed", error = %e, "accepted connection could not be served");
                continue;
            }
        };
        if !destination.place(admitted) {
            return;
        }
    }
}

/// Gives back cluster reservations that were never settled.
async fn expire_reservations(state: Arc<ClusterState>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        state.expire_reservations();
    }
}

async fn sweep_loop(
    checker: Arc<Checker>,
    alerts: Arc<Alerts>,
    clock: Arc<dyn Clock>,
    gates: Vec<Arc<Gate>>,
) {
    let mut last_pools = HashMap::new();
    // Held from the start: from the previous process's clock mark, which
    // was reported then; the warning below is for steps while serving.
    let mut was_held = SystemClock::held_back() >= Nanos::from_secs(1);
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let scheduled = tick.tick().await;
        let started = Instant::now();
        metrics::gauge!("warden_sweep_lag_seconds")
            .set(started.saturating_duration_since(scheduled).as_secs_f64());
        let removed = checker.engine().sweep(clock.now());
        alerts.sweep();
        metrics::histogram!("warden_sweep_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        let held = checker.engine().occupancy();
        metrics::gauge!("warden_state_entries", "kind" => "bucket").set(held.buckets as f64);
        metrics::gauge!("warden_state_entries", "kind" => "window").set(held.windows as f64);
        metrics::gauge!("warden_state_entries", "kind" => "nonce").set(held.nonces as f64);
        report_pools(&checker, &mut last_pools);
        let open: usize = gates.iter().map(|g| g.open_connections()).sum();
        metrics::gauge!("warden_open_connections").set(open as f64);
        let held_back = SystemClock::held_back();
        metrics::gauge!("warden_clock_held_seconds").set(Duration::from(held_back).as_secs_f64());
        let is_held = held_back >= Nanos::from_secs(1);
        if is_held && !was_held {
            tracing::warn!(
                event = "clock_held",
                held_ms = held_back.ceil_millis(),
                "the system clock went back; warden's clock holds at the latest time it showed until the system clock catches up (README: Lifecycle)"
            );
        }
        was_held = is_held;
        tracing::trace!(?removed, ?held, "swept idle state");
    }
}

/// Pool counts as metrics, and one warning per pool and minute while a pool
/// is evicting or refusing: a full pool means someone is making state
/// faster than it ages out, or a cap is too small.
fn report_pools(
    checker: &Checker,
    last: &mut HashMap<String, (u64, u64, Option<std::time::Instant>)>,
) {
    for pool in checker.engine().pools().stats() {
        let name = pool.name.clone();
        metrics::gauge!("warden_state_pool_entries", "pool" => name.clone())
            .set(pool.entries as f64);
        metrics::counter!("warden_state_evictions_total", "pool" => name.clone())
            .absolute(pool.evicted);
        metrics::counter!("warden_state_refusals_total", "pool" => name.clone())
            .absolute(pool.refused);
        let now = std::time::Instant::now();
        // `None`: not warned about yet.
        let (evicted, refused, warned) = last.entry(name).or_insert((0, 0, None));
        let busy = pool.evicted > *evicted || pool.refused > *refused;
        if busy && warned.is_none_or(|w| now.duration_since(w) >= Duration::from_secs(60)) {
            tracing::warn!(
                event = "state_pool_full",
                pool = %pool.name,
                entries = pool.entries,
                cap = pool.cap.map_or("-".to_owned(), |c| c.to_string()),
                evicted = pool.evicted - *evicted,
                refused = pool.refused - *refused,
                "a state pool is full: evicting the entries that forgive least (see README, Bounded state)"
            );
            *warned = Some(now);
            (*evicted, *refused) = (pool.evicted, pool.refused);
        }
    }
}

/// Resolves on SIGTERM or ctrl-c.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
