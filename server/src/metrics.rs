//! Metric names, their descriptions, and the Prometheus exporter. Every
//! metric the server records is named here, so the README's table and the
//! code cannot drift apart silently.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use ps_proto::cluster::same_secret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Push RPCs that committed (counter; labels: model).
pub const PUSHES: &str = "ps_pushes_total";
/// Blocks received in pushes (counter; labels: model, result = accepted | duplicate).
pub const PUSH_BLOCKS: &str = "ps_push_blocks_total";
/// Payload bytes received in pushes (counter; labels: model, encoding, transport = grpc | segment).
pub const BYTES_RECEIVED: &str = "ps_bytes_received_total";
/// What the received payloads would have taken as f32 (counter; labels: model, encoding).
pub const BYTES_RECEIVED_F32: &str = "ps_bytes_received_f32_equivalent_total";
/// f32 bytes / wire bytes of the last push, per encoding (gauge; labels: model, encoding).
pub const COMPRESSION_RATIO: &str = "ps_push_compression_ratio";
/// Payload bytes sent in pulls (counter; labels: model, encoding, transport = grpc | segment).
pub const BYTES_SENT: &str = "ps_bytes_sent_total";
/// Local clients connected to the segment socket (gauge).
pub const LOCAL_CLIENTS: &str = "ps_local_clients";
/// Push segments attached by local clients (gauge).
pub const LOCAL_SEGMENTS: &str = "ps_local_segments";
/// Bytes of the weights segments published for local pulls (gauge).
pub const LOCAL_WEIGHTS_BYTES: &str = "ps_local_weights_segment_bytes";
/// Seconds one block's optimizer step took (histogram; labels: model, group).
pub const UPDATE_SECONDS: &str = "ps_update_seconds";
/// Seconds a step spent choosing a block's subspace, at the steps that choose one (histogram; labels: model, group).
pub const SELECTION_SECONDS: &str = "ps_subspace_selection_seconds";
/// Block steps that no push had a gradient for, which left the block as it was (counter; labels: model).
pub const SKIPPED_BLOCK_STEPS: &str = "ps_skipped_block_steps_total";
/// The L2 norm of the last step's mean gradient over the whole model, `GRAD_CLIP_MEAN` only (gauge; labels: model).
pub const GRAD_NORM: &str = "ps_grad_norm";
/// Steps whose mean gradient was scaled down to `max_grad_norm` (counter; labels: model).
pub const CLIPPED_STEPS: &str = "ps_clipped_steps_total";
/// Block steps skipped because a worker's gradient overflowed (`ENCODING_OVERFLOW`; counter; labels: model).
pub const OVERFLOW_BLOCK_STEPS: &str = "ps_overflow_block_steps_total";
/// Seconds from a block's first push of a step to its update (histogram; labels: model).
pub const BARRIER_WAIT_SECONDS: &str = "ps_barrier_wait_seconds";
/// Versions between a gradient's base and the block at apply time, async mode (histogram; labels: model).
pub const STALENESS: &str = "ps_staleness_versions";
/// Workers with a live lease (gauge; labels: model).
pub const LIVE_WORKERS: &str = "ps_live_workers";
/// Workers dropped because their lease expired (counter; labels: model).
pub const WORKERS_EXPIRED: &str = "ps_workers_expired_total";
/// Members dropped because they had not pushed a step by its deadline (counter; labels: model).
pub const WORKERS_DROPPED_LATE: &str = "ps_workers_dropped_late_total";
/// Lowest block version on this shard (gauge; labels: model).
pub const MODEL_VERSION: &str = "ps_model_version";
/// Optimizer state bytes on this shard (gauge; labels: model, group, optimizer).
pub const OPTIMIZER_STATE_BYTES: &str = "optimizer_state_bytes";
/// Bytes of gradients of steps not yet applied, sums being collected (gauge; labels: model, group).
pub const PENDING_GRADIENT_BYTES: &str = "ps_pending_gradient_bytes";
/// Parameters stored on this shard (gauge; labels: model).
pub const PARAMETERS: &str = "ps_parameters";
/// Pushes and registrations refused for a NaN or infinite value (counter; labels: model).
pub const NON_FINITE: &str = "ps_non_finite_rejected_total";
/// Optimizer updates that panicked (counter; labels: model, group).
pub const OPTIMIZER_FAILURES: &str = "ps_optimizer_failures_total";
/// The federated round open on this shard (gauge; labels: model).
pub const FED_ROUND: &str = "ps_fed_round";
/// Clients selected for the open round (gauge; labels: model).
pub const FED_COHORT: &str = "ps_fed_cohort_size";
/// Client updates a round aggregated (counter; labels: model).
pub const FED_CONTRIBUTIONS: &str = "ps_fed_contributions_total";
/// Selected clients left out of a round at its deadline (counter; labels: model).
pub const FED_STRAGGLERS: &str = "ps_fed_stragglers_dropped_total";
/// Round deadlines extended for want of the quorum (counter; labels: model).
pub const FED_EXTENDED: &str = "ps_fed_rounds_extended_total";
/// Seconds from a round's opening to its commit on this shard (histogram; labels: model).
pub const FED_ROUND_SECONDS: &str = "ps_fed_round_seconds";
/// Bytes of global federated state: SCAFFOLD's c or FedSpeed's sum of h (gauge; labels: model).
pub const FED_STATE_BYTES: &str = "ps_fed_server_state_bytes";
/// RPCs that failed (counter; labels: method, code).
pub const RPC_ERRORS: &str = "ps_rpc_errors_total";
/// Checkpoints written or failed (counter; labels: model, result).
pub const CHECKPOINTS: &str = "ps_checkpoints_total";
/// Time to write one checkpoint (histogram; labels: model).
pub const CHECKPOINT_SECONDS: &str = "ps_checkpoint_write_seconds";
/// Version of the newest checkpoint written (gauge; labels: model).
pub const CHECKPOINT_VERSION: &str = "ps_checkpoint_version";
/// The newest checkpoint version every shard holds, as this shard learned it (gauge; labels: model).
pub const CHECKPOINT_COMMON_VERSION: &str = "ps_checkpoint_common_version";
/// 1 while this shard's newest checkpoint write failed, else 0 (gauge; labels: model).
pub const CHECKPOINT_FAILING: &str = "ps_checkpoint_failing";
/// The model's epoch: one more after each rollback to a checkpoint (gauge; labels: model).
pub const EPOCH: &str = "ps_model_epoch";
/// Rollbacks to a checkpoint (counter; labels: model).
pub const ROLLBACKS: &str = "ps_rollbacks_total";
/// Blocks this shard is fetching from their old owners in an online reshard (gauge; labels: model).
pub const BLOCKS_MOVING: &str = "ps_blocks_moving";
/// Blocks this shard took over from another shard in online reshards (counter; labels: model).
pub const BLOCKS_MOVED: &str = "ps_blocks_moved_total";
/// Bytes of blocks this shard received from other shards in online reshards (counter; labels: model).
pub const BYTES_MOVED: &str = "ps_reshard_bytes_moved_total";
/// Online reshards this shard switched to a new shard list in (counter).
pub const RESHARDS: &str = "ps_reshards_total";
/// The shards in the shard list this shard serves (gauge).
pub const SHARDS: &str = "ps_shards";

const SECONDS_BUCKETS: &[f64] = &[1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0];
const STALENESS_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The recorder could not be installed.
    #[error(transparent)]
    Recorder(#[from] BuildError),
    /// The address cannot be listened on.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Serves `GET /metrics` on `addr` (requiring `authorization: Bearer <token>`
/// when a token is given) and registers every metric's description. Must be
/// called inside a Tokio runtime.
pub async fn install_exporter(addr: SocketAddr, token: Option<String>) -> Result<SocketAddr, MetricsError> {
    let listener = TcpListener::bind(addr).await.map_err(|source| MetricsError::Listen { addr, source })?;
    let bound = listener.local_addr().map_err(|source| MetricsError::Listen { addr, source })?;
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(STALENESS.into()), STALENESS_BUCKETS)?
        .install_recorder()?;
    describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    let token: Option<Arc<str>> = token.map(Arc::from);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let (handle, token) = (handle.clone(), token.clone());
            tokio::spawn(async move {
                // A scraper that stalls is dropped rather than held.
                let _ = tokio::time::timeout(Duration::from_secs(10), answer_scrape(stream, &handle, token.as_deref()))
                    .await;
            });
        }
    });
    Ok(bound)
}

/// Largest request head the metrics endpoint reads.
const MAX_SCRAPE_REQUEST_BYTES: usize = 8 << 10;

/// Answers one HTTP/1 request on the metrics port, then closes the connection.
async fn answer_scrape(mut stream: TcpStream, handle: &PrometheusHandle, token: Option<&str>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_SCRAPE_REQUEST_BYTES {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let (status, body) = scrape_reply(&head, token, || handle.render());
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
        body.len(),
        if status.starts_with("401") { "WWW-Authenticate: Bearer\r\n" } else { "" }
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// The status line and body for a request head: the metrics, or why not.
fn scrape_reply(head: &str, token: Option<&str>, render: impl FnOnce() -> String) -> (&'static str, String) {
    let mut lines = head.split("\r\n");
    let mut request = lines.next().unwrap_or_default().split_whitespace();
    let (method, path) = (request.next().unwrap_or_default(), request.next().unwrap_or_default());
    if method != "GET" || (path != "/metrics" && !path.starts_with("/metrics?")) {
        return ("404 Not Found", "only GET /metrics is served here\n".into());
    }
    if let Some(expected) = token {
        let given = lines.find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim().eq_ignore_ascii_case("authorization").then(|| value.trim())
        });
        let accepted = given.and_then(|v| v.strip_prefix("Bearer ")).is_some_and(|t| same_secret(t, expected));
        if !accepted {
            return ("401 Unauthorized", "this metrics endpoint needs 'Authorization: Bearer <token>'\n".into());
        }
    }
    ("200 OK", render())
}

fn describe() {
    describe_counter!(PUSHES, "Push RPCs that committed");
    describe_counter!(PUSH_BLOCKS, "Blocks received in pushes, by result");
    describe_counter!(BYTES_RECEIVED, Unit::Bytes, "Payload bytes received in pushes");
    describe_counter!(BYTES_RECEIVED_F32, Unit::Bytes, "What the received payloads would have taken as f32");
    describe_gauge!(COMPRESSION_RATIO, "f32 bytes over wire bytes of the last push, per encoding");
    describe_counter!(BYTES_SENT, Unit::Bytes, "Payload bytes sent in pulls");
    describe_histogram!(UPDATE_SECONDS, Unit::Seconds, "Time of one block's optimizer step");
    describe_histogram!(
        SELECTION_SECONDS,
        Unit::Seconds,
        "Time a step spent choosing a block's subspace (FRUGAL, Subspace-Momentum), part of the update time"
    );
    describe_histogram!(BARRIER_WAIT_SECONDS, Unit::Seconds, "Time from a block's first push of a step to its update");
    describe_counter!(
        SKIPPED_BLOCK_STEPS,
        "Block steps no push had a gradient for (weights and optimizer state left as they were)"
    );
    describe_gauge!(GRAD_NORM, "L2 norm of the last step's mean gradient over the whole model (GRAD_CLIP_MEAN)");
    describe_counter!(CLIPPED_STEPS, "Steps whose mean gradient was scaled down to max_grad_norm");
    describe_counter!(
        OVERFLOW_BLOCK_STEPS,
        "Block steps skipped because a worker's gradient overflowed (mixed precision's loss scale)"
    );
    describe_histogram!(STALENESS, "Versions between a gradient's base and the block at apply time (async)");
    describe_gauge!(LIVE_WORKERS, "Workers with a live lease");
    describe_gauge!(LOCAL_CLIENTS, "Local clients connected to the segment socket");
    describe_gauge!(LOCAL_SEGMENTS, "Push segments attached by local clients");
    describe_gauge!(LOCAL_WEIGHTS_BYTES, Unit::Bytes, "Bytes of the weights segments published for local pulls");
    describe_counter!(WORKERS_EXPIRED, "Workers dropped because their lease expired");
    describe_counter!(WORKERS_DROPPED_LATE, "Members dropped because they had not pushed a step by its deadline");
    describe_gauge!(MODEL_VERSION, "Lowest block version on this shard");
    describe_gauge!(OPTIMIZER_STATE_BYTES, Unit::Bytes, "Optimizer state bytes on this shard");
    describe_gauge!(
        PENDING_GRADIENT_BYTES,
        Unit::Bytes,
        "Bytes of gradients of steps not yet applied on this shard (sums being collected)"
    );
    describe_gauge!(PARAMETERS, "Parameters stored on this shard");
    describe_counter!(NON_FINITE, "Pushes and registrations refused for a NaN or infinite value");
    describe_counter!(OPTIMIZER_FAILURES, "Optimizer updates that panicked; the block stops taking pushes");
    describe_gauge!(FED_ROUND, "The federated round open on this shard");
    describe_gauge!(FED_COHORT, "Clients selected for the open federated round");
    describe_counter!(FED_CONTRIBUTIONS, "Client updates aggregated by federated rounds");
    describe_counter!(FED_STRAGGLERS, "Selected clients left out of a federated round at its deadline");
    describe_counter!(FED_EXTENDED, "Federated round deadlines extended for want of the quorum");
    describe_histogram!(FED_ROUND_SECONDS, Unit::Seconds, "Time from a federated round's opening to its commit");
    describe_gauge!(FED_STATE_BYTES, Unit::Bytes, "Bytes of global federated state on this shard");
    describe_counter!(RPC_ERRORS, "RPCs that failed, by gRPC code");
    describe_counter!(CHECKPOINTS, "Checkpoints written or failed");
    describe_histogram!(CHECKPOINT_SECONDS, Unit::Seconds, "Time to write one checkpoint");
    describe_gauge!(CHECKPOINT_VERSION, "Version of the newest checkpoint written");
    describe_gauge!(
        CHECKPOINT_COMMON_VERSION,
        "Newest checkpoint version every shard holds: where a recovery goes back to"
    );
    describe_gauge!(
        CHECKPOINT_FAILING,
        "1 while this shard's newest checkpoint write failed (a full or read-only disk)"
    );
    describe_gauge!(EPOCH, "The model's epoch (one more after each rollback to a checkpoint)");
    describe_counter!(ROLLBACKS, "Rollbacks of the model to a checkpoint");
    describe_gauge!(BLOCKS_MOVING, "Blocks being fetched from their old owners in an online reshard");
    describe_counter!(BLOCKS_MOVED, "Blocks taken over from another shard in online reshards");
    describe_counter!(BYTES_MOVED, Unit::Bytes, "Bytes of blocks received from other shards in online reshards");
    describe_counter!(RESHARDS, "Online reshards this shard switched to a new shard list in");
    describe_gauge!(SHARDS, "Shards in the shard list this shard serves");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrapes_need_the_token_when_one_is_set() {
        let get = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        let with = "GET /metrics HTTP/1.1\r\nauthorization: Bearer t0k\r\n\r\n";
        let wrong = "GET /metrics HTTP/1.1\r\nAuthorization: Bearer nope\r\n\r\n";
        let render = || "ps_up 1\n".to_string();
        assert_eq!(scrape_reply(get, None, render).0, "200 OK");
        assert_eq!(scrape_reply(get, Some("t0k"), render).0, "401 Unauthorized");
        assert_eq!(scrape_reply(wrong, Some("t0k"), render).0, "401 Unauthorized");
        assert_eq!(scrape_reply(with, Some("t0k"), render), ("200 OK", "ps_up 1\n".to_string()));
        assert_eq!(scrape_reply("POST /metrics HTTP/1.1\r\n\r\n", None, render).0, "404 Not Found");
        assert_eq!(scrape_reply("GET /admin HTTP/1.1\r\n\r\n", None, render).0, "404 Not Found");
    }
}
