//! The worker's Prometheus metrics: names, and the exporter on `--metrics-addr`.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

/// Steps this worker pushed (counter).
pub const STEPS: &str = "ps_worker_steps_total";
/// Training loss of the last minibatch (gauge).
pub const LOSS: &str = "ps_worker_loss";
/// Gradient payload bytes pushed (counter).
pub const BYTES_PUSHED: &str = "ps_worker_bytes_pushed_total";
/// Weight payload bytes pulled (counter).
pub const BYTES_PULLED: &str = "ps_worker_bytes_pulled_total";
/// Seconds of one pull-compute-push step (histogram).
pub const STEP_SECONDS: &str = "ps_worker_step_seconds";

/// Serves this worker's `/metrics` on `addr`.
pub fn install_exporter(addr: SocketAddr) -> Result<(), BuildError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Full(STEP_SECONDS.into()), &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0])?
        .install()
}
