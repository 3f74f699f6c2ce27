//! Prometheus metrics on their own plain-HTTP listener (`/metrics`), away
//! from the gRPC port so that scraping needs no client certificate and
//! cannot compete with checks for the mTLS listener.
//!
//! The metric names are documented in README ("Metrics").

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Connections the metrics listener keeps open at once. Prometheus and the
/// kubelet's probes need a few. The listener is plain HTTP, and in
/// Kubernetes it listens on every address, so anything that reaches the
/// pod can connect: unbounded, a flood of idle connections took every
/// descriptor the process had, and the gRPC port could accept nothing.
/// This bound sits inside the 256 descriptors kept in reserve beside
/// `max_connections`. Past it a connection is closed at once.
const MAX_CONNECTIONS: usize = 64;
/// How long a metrics connection may take to send a request's head, the
/// wait between requests of a kept-alive connection included: one that
/// sends nothing gives its place back. Prometheus and the kubelet open a
/// new connection when the one they kept was closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Between accept errors (out of descriptors), so as not to spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Latency buckets (seconds) for RPC histograms: 50 µs to 1 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Installs the process-wide recorder. Call once, before serving.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "warden_checks_total",
        "Checks answered, by decision and reason."
    );
    describe_histogram!(
        "warden_rpc_duration_seconds",
        "Time to answer one check, by RPC."
    );
    describe_gauge!("warden_inflight_calls", "Calls being served right now.");
    describe_counter!(
        "warden_shed_total",
        "Calls refused at once because of load, by cause."
    );
    describe_counter!(
        "warden_request_reads_cut_total",
        "Calls ended because their request did not arrive in time or the memory for requests being waited for was full, by cause."
    );
    describe_counter!(
        "warden_denial_log_lines_skipped_total",
        "Denied checks not logged: past [server] max_denial_log_lines a second."
    );
    describe_counter!(
        "warden_caller_denied_total",
        "Calls refused because the caller lacks a role."
    );
    describe_gauge!(
        "warden_state_entries",
        "Entries held in memory, by kind (bucket, window, nonce)."
    );
    describe_gauge!(
        "warden_sweep_lag_seconds",
        "How late the last background sweep started."
    );
    describe_histogram!(
        "warden_sweep_duration_seconds",
        "Time one sweep of all shards took."
    );
    describe_counter!(
        "warden_tls_handshake_failures_total",
        "Failed TLS handshakes, by cause."
    );
    describe_counter!(
        "warden_tls_reloads_total",
        "TLS reload attempts that changed or failed, by result."
    );
    describe_gauge!(
        "warden_cert_expiry_seconds",
        "Seconds until a certificate expires, by what."
    );
    describe_counter!(
        "warden_alerts_total",
        "Anomaly alerts raised, by kind and subject kind."
    );
    describe_histogram!(
        "warden_store_write_seconds",
        "Durable writes (fsync included) to the key store and audit log."
    );
    describe_counter!(
        "warden_audit_dropped_total",
        "Background audit records (denial tallies, alerts) lost: the queue was full, or the write failed."
    );
    describe_counter!(
        "warden_durable_write_failures_total",
        "Writes to the key store, the audit log, the clock mark or a state checkpoint that failed (a full disk?): the admin change was refused, background audit records lost, a clock mark failed or came late, or a crash would lose more rate-limit state."
    );
    describe_counter!(
        "warden_state_checkpoints_total",
        "Checkpoints of the rate-limit state written (a single process with [store])."
    );
    describe_histogram!(
        "warden_state_checkpoint_seconds",
        "Time to copy the rate-limit state and write its checkpoint (fsync included)."
    );
    describe_gauge!(
        "warden_state_checkpoint_entries",
        "Entries (buckets, windows, failure budgets, nonces) in the last checkpoint written."
    );
    describe_gauge!(
        "warden_clock_held_seconds",
        "How far the system clock is behind the time warden holds (it never goes back): zero unless the system clock stepped back."
    );
    describe_gauge!("warden_api_keys", "API keys loaded.");
    describe_histogram!(
        "warden_key_changes_seconds",
        "Time to make a key change effective: one key, or all (a policy change)."
    );
    describe_gauge!(
        "warden_ready",
        "1 while serving, 0 while starting (before the restart fence) or draining."
    );
    describe_gauge!(
        "warden_nonce_capacity",
        "The most nonces remembered at once (check.nonce_capacity)."
    );
    describe_counter!(
        "warden_check_errors_total",
        "Checks refused with a gRPC error rather than answered, by cause."
    );
    describe_counter!(
        "warden_audit_tampered_total",
        "Audit log files found replaced, removed or truncated under the server."
    );
    describe_counter!(
        "warden_connections_refused_total",
        "New connections closed at once over a bound, by cause."
    );
    describe_gauge!(
        "warden_open_connections",
        "Client connections open, handshaking or established."
    );
    describe_gauge!(
        "warden_serving_thread_connections",
        "gRPC connections open (handshaking or established) on each serving thread."
    );
    describe_gauge!(
        "warden_state_pool_entries",
        "Request-limit entries and failure budgets held, by pool."
    );
    describe_counter!(
        "warden_state_evictions_total",
        "Entries evicted from a full pool, by pool."
    );
    describe_counter!(
        "warden_state_refusals_total",
        "Checks refused because a pool was full and nothing could be evicted."
    );
    describe_counter!(
        "warden_alert_subjects_evicted_total",
        "Alert subjects evicted from a full table."
    );
    zero_counters();
}

/// Counters that dashboards and alert rules read, created at zero so that a
/// series exists before the first event (`rate()` and `increase()` over a
/// series that appears only with its first event miss that event).
fn zero_counters() {
    use metrics::counter;
    for cause in ["server_busy", "connection_limit"] {
        counter!("warden_shed_total", "cause" => cause).absolute(0);
    }
    for cause in [
        "replay_cache_full",
        "state_full",
        "permission_denied",
        "unavailable",
    ] {
        counter!("warden_check_errors_total", "cause" => cause).absolute(0);
    }
    for cause in ["timeout", "memory"] {
        counter!("warden_request_reads_cut_total", "cause" => cause).absolute(0);
    }
    for cause in [
        "max_connections",
        "max_handshakes",
        "max_handshakes_per_address",
        "metrics_connections",
    ] {
        counter!("warden_connections_refused_total", "cause" => cause).absolute(0);
    }
    for what in ["replaced", "removed", "truncated"] {
        counter!("warden_audit_tampered_total", "what" => what).absolute(0);
    }
    for kind in ["bad_signature", "replay", "lockout", "rate_limited"] {
        for subject_kind in ["key", "caller"] {
            counter!("warden_alerts_total", "kind" => kind, "subject_kind" => subject_kind)
                .absolute(0);
        }
    }
    for result in ["ok", "failed"] {
        counter!("warden_tls_reloads_total", "result" => result).absolute(0);
    }
    counter!("warden_tls_handshake_failures_total", "cause" => "timeout").absolute(0);
    for cause in ["queue_full", "write_failed"] {
        counter!("warden_audit_dropped_total", "cause" => cause).absolute(0);
    }
    for what in ["store", "audit", "clock_mark", "state"] {
        counter!("warden_durable_write_failures_total", "what" => what).absolute(0);
    }
    metrics::gauge!("warden_clock_held_seconds").set(0.0);
    counter!("warden_caller_denied_total").absolute(0);
    counter!("warden_denial_log_lines_skipped_total").absolute(0);
    counter!("warden_alert_subjects_evicted_total").absolute(0);
}

/// The cluster's counters, created at zero on a node with `[cluster]`
/// (a single process exports none of them).
pub fn zero_cluster_counters() {
    use metrics::counter;
    for result in ["sent", "failed"] {
        counter!("warden_cluster_handoffs_total", "result" => result).absolute(0);
    }
    for route in ["local", "forwarded"] {
        counter!("warden_cluster_state_steps_total", "route" => route).absolute(0);
    }
    for name in [
        "warden_cluster_forward_errors_total",
        "warden_cluster_reroutes_total",
        "warden_cluster_not_owner_total",
        "warden_cluster_rebalances_total",
        "warden_cluster_handoff_entries_received_total",
        "warden_cluster_handoff_entries_dropped_total",
        "warden_cluster_reservations_expired_total",
        "warden_cluster_settle_failures_total",
        "warden_cluster_vouch_refused_total",
        "warden_cluster_failure_charges_lost_total",
        "warden_cluster_coordinator_errors_total",
    ] {
        counter!(name).absolute(0);
    }
}

/// Serves until `shutdown` resolves: `/metrics` (Prometheus text format),
/// `/livez` (200 while the process runs) and `/readyz` (200 while SERVING,
/// 503 while starting or draining) for probes that cannot speak mTLS gRPC,
/// such as Kubernetes HTTP probes.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    ready: Arc<AtomicBool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        handle.render(),
                    )
                }
            }),
        )
        .route("/livez", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let serving = ready.load(Ordering::SeqCst);
                async move {
                    if serving {
                        (StatusCode::OK, "serving\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not serving\n")
                    }
                }
            }),
        );
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let open = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(event = "metrics_accept_failed", error = %e, "metrics listener could not accept");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            metrics::counter!("warden_connections_refused_total", "cause" => "metrics_connections")
                .increment(1);
            continue;
        };
        let served = open.watch(
            http1.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone())),
        );
        tokio::spawn(async move {
            // A client gone or too slow: its own business.
            let _ = served.await;
            drop(place);
        });
    }
    // Scrapes in flight are answered; kept-alive connections are closed.
    open.shutdown().await;
}
