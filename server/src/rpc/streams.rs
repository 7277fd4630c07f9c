//! What every RPC family shares about streams and traffic: the time limits
//! of a client stream, where a push's messages come from, the bytes a staged
//! chunk holds, the wait a pull may ask for and what a failed wait tells the
//! client, and the traffic counters.

use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::Stream;
use ps_proto::codec;
use ps_proto::pb::{self, Encoding, TensorChunk};
use tonic::{Status, Streaming};

use super::assemble;
use crate::error::ServerError;
use crate::limits::{CHUNK_OVERHEAD_BYTES, Limits};
use crate::metrics as m;
use crate::spec::check_name;
use crate::store::{Block, Model, WaitFailure};

/// The wait of a pull or a round-task poll that names none.
pub(super) const DEFAULT_PULL_TIMEOUT: Duration = Duration::from_secs(60);

/// A pull's answer: its chunks as they are encoded, or the status that ends it.
pub(super) type WeightStream = Pin<Box<dyn Stream<Item = Result<pb::WeightChunk, Status>> + Send>>;

/// Refuses a worker name that is not a name.
pub(super) fn check_worker_name(worker: &str) -> Result<(), ServerError> {
    Ok(check_name("worker", worker)?)
}

/// Bytes a staged chunk holds: its payload (the codec keeps it from pinning
/// more), its tensor name and the bookkeeping around them.
pub(super) fn held_bytes(chunk: &TensorChunk) -> u64 {
    chunk.payload.len() as u64 + chunk.tensor.len() as u64 + CHUNK_OVERHEAD_BYTES
}

/// The time limits of one client stream: idle between messages, and open in all.
pub(super) struct StreamClock {
    method: &'static str,
    started: Instant,
    idle: Duration,
    total: Duration,
}

impl StreamClock {
    pub(super) fn start(method: &'static str, limits: &Limits) -> Self {
        Self { method, started: Instant::now(), idle: limits.stream_idle_timeout, total: limits.max_stream_duration }
    }

    /// The stream's next message, or an error once it idled or lasted too long.
    pub(super) async fn next<T>(&self, stream: &mut Streaming<T>) -> Result<Option<T>, Status> {
        self.within(stream.message()).await
    }

    /// What `next` gives (the next message), or an error once the stream idled or lasted too long.
    pub(super) async fn within<T>(
        &self,
        next: impl Future<Output = Result<Option<T>, Status>>,
    ) -> Result<Option<T>, Status> {
        let left = self.total.saturating_sub(self.started.elapsed());
        match tokio::time::timeout(self.idle.min(left), next).await {
            Ok(Ok(message)) => Ok(message),
            Ok(Err(status)) => Err(too_large_is_exhausted(status)),
            Err(_) if left <= self.idle => Err(ServerError::StreamTimeout(format!(
                "{} stream open longer than {:?} (--max-stream-duration); it is closed and nothing of it was applied",
                self.method, self.total
            ))
            .into()),
            Err(_) => Err(ServerError::StreamTimeout(format!(
                "{} stream sent nothing for {:?} (--stream-idle-timeout); it is closed and nothing of it was applied",
                self.method, self.idle
            ))
            .into()),
        }
    }
}

/// Where a push's messages come from: tonic's stream (the generated method)
/// or the request body read by hand (`hand_route`, what the shard serves).
pub(super) trait PushMessages: Send {
    /// The next message, `None` once the client closed the stream.
    fn next_chunk(&mut self) -> impl Future<Output = Result<Option<pb::GradientChunk>, Status>> + Send;
}

impl PushMessages for Streaming<pb::GradientChunk> {
    async fn next_chunk(&mut self) -> Result<Option<pb::GradientChunk>, Status> {
        self.message().await
    }
}

/// tonic refuses an oversized message with OUT_OF_RANGE; it is a size limit, so say so.
fn too_large_is_exhausted(status: Status) -> Status {
    if status.code() == tonic::Code::OutOfRange && status.message().contains("message length too large") {
        return message_too_large(status.message());
    }
    status
}

/// A message over the size limit, as `what` describes it, and what a message may carry.
pub(super) fn message_too_large(what: &str) -> Status {
    Status::resource_exhausted(format!(
        "{what}; a message carries one chunk of at most {} bytes of payload",
        ps_proto::transport::MAX_CHUNK_PAYLOAD_BYTES
    ))
}

/// What a wait for `min_version` that failed tells the client.
pub(super) fn wait_error(
    model: &Model,
    block: &Block,
    failure: WaitFailure,
    min_version: u64,
    started: Instant,
) -> ServerError {
    let tensor = model.spec.tensors[block.tensor].name.clone();
    match (failure, block.failure()) {
        // The retry reaches the restored copy, which answers epoch-changed.
        (WaitFailure::Retired, _) => ServerError::Recovering(model.name().to_string()),
        (WaitFailure::OptimizerFailed, Some((step, reason))) => {
            ServerError::OptimizerFailed { tensor, block: block.index, step, reason }
        }
        (WaitFailure::TimedOut { .. }, _) | (_, None) => ServerError::PullTimeout {
            tensor,
            block: block.index,
            wanted: min_version,
            version: match failure {
                WaitFailure::TimedOut { version } => version,
                WaitFailure::OptimizerFailed | WaitFailure::Retired => block.version(),
            },
            waited_ms: started.elapsed().as_millis() as u64,
        },
    }
}

/// The wait a pull asked for, within the shard's ceiling.
pub(super) fn pull_wait(timeout_ms: u64, limits: &Limits) -> Duration {
    match timeout_ms {
        0 => DEFAULT_PULL_TIMEOUT,
        ms => Duration::from_millis(ms),
    }
    .min(limits.max_wait)
}

/// The `transport` label of traffic over gRPC (TCP or the local Unix socket).
pub(super) const TRANSPORT_GRPC: &str = "grpc";
/// The `transport` label of traffic through memory segments.
pub(super) const TRANSPORT_SEGMENT: &str = "segment";

pub(super) fn record_traffic(
    model: &str,
    traffic: std::collections::HashMap<Encoding, assemble::Traffic>,
    transport: &'static str,
) {
    for (encoding, t) in traffic {
        let label = codec::encoding_label(encoding);
        metrics::counter!(m::BYTES_RECEIVED, "model" => model.to_string(), "encoding" => label, "transport" => transport)
            .increment(t.wire_bytes);
        metrics::counter!(m::BYTES_RECEIVED_F32, "model" => model.to_string(), "encoding" => label)
            .increment(t.f32_bytes);
        if t.wire_bytes > 0 {
            metrics::gauge!(m::COMPRESSION_RATIO, "model" => model.to_string(), "encoding" => label)
                .set(t.f32_bytes as f64 / t.wire_bytes as f64);
        }
    }
}

/// The learning-rate scale a push carries, checked: unset means 1.
pub(super) fn lr_scale(value: Option<f64>) -> Result<f64, ServerError> {
    match value {
        None => Ok(1.0),
        Some(scale) if scale.is_finite() && (0.0..=MAX_LR_SCALE).contains(&scale) => Ok(scale),
        Some(scale) => Err(ServerError::BadLrScale(scale)),
    }
}

/// The largest learning-rate scale a push may carry: far above any schedule's
/// factor, low enough that a mistaken one (a step count, a raw lr) is caught.
const MAX_LR_SCALE: f64 = 1e6;
