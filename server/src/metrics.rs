//! Prometheus metrics on their own plain-HTTP listener (`/metrics`), away
//! from the gRPC port so that scraping needs no client certificate and
//! cannot compete with checks for the mTLS listener.
//!
//! The metric names are documented in README ("Metrics").

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

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
        "Denial audit records dropped because the queue was full."
    );
    describe_gauge!("warden_api_keys", "API keys loaded.");
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
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(event = "metrics_failed", error = %e, "metrics listener failed");
    }
}
