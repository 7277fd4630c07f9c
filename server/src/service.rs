//! The gRPC service: decodes requests, validates them against the registry,
//! hands heavy work to the blocking pool and encodes replies. No optimizer
//! math lives here.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use ps_proto::codec;
use ps_proto::pb::{self, Encoding};
use ps_proto::transport::CHUNK_BYTES;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::assemble::{self, Assembler, Purpose};
use crate::error::ServerError;
use crate::metrics as m;
use crate::model::Model;
use crate::registry::Registry;
use crate::spec::{ModelSpec, check_name};

const DEFAULT_PULL_TIMEOUT: Duration = Duration::from_secs(60);

/// The `paramserver.v1.ParameterServer` implementation of one shard.
#[derive(Clone)]
pub struct ParameterService {
    registry: Arc<Registry>,
}

impl ParameterService {
    /// A service over `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }
}

/// Counts and logs a failed RPC, passing the result through.
fn observe<T>(method: &'static str, result: Result<T, Status>) -> Result<T, Status> {
    if let Err(status) = &result {
        metrics::counter!(m::RPC_ERRORS, "method" => method, "code" => format!("{:?}", status.code())).increment(1);
        tracing::warn!(method, code = ?status.code(), message = status.message(), "request rejected");
    }
    result
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(work).await.map_err(|e| ServerError::Internal(e.to_string()).into())
}

fn check_worker_name(worker: &str) -> Result<(), ServerError> {
    check_name("worker", worker).map_err(ServerError::InvalidArgument)
}

impl ParameterService {
    async fn register(
        &self,
        request: Request<Streaming<pb::RegisterModelRequest>>,
    ) -> Result<pb::RegisterModelResponse, Status> {
        let mut stream = request.into_inner();
        let spec = match stream.message().await?.and_then(|m| m.item) {
            Some(pb::register_model_request::Item::Spec(spec)) => ModelSpec::from_proto(spec)?,
            _ => {
                return Err(
                    ServerError::InvalidArgument("the first RegisterModel message must carry the spec".into()).into()
                );
            }
        };
        if let Some(model) = self.registry.existing(&spec.canonical)? {
            tracing::info!(model = model.name(), "model already registered with the same spec");
            return Ok(pb::RegisterModelResponse { created: false, layout: Some(self.registry.layout(&model)) });
        }
        let (shard, shards, lease) = (self.registry.identity.index, self.registry.num_shards(), self.registry.lease);
        let model = blocking(move || Model::new(spec, shard, shards, lease)).await?;
        let mut assembler = Assembler::new(&model, Purpose::Weights);
        while let Some(message) = stream.message().await? {
            match message.item {
                Some(pb::register_model_request::Item::Values(chunk)) => {
                    let tensor = model.tensor_index(&chunk.tensor)?;
                    if !model.is_provided(tensor) {
                        return Err(ServerError::InvalidArgument(format!(
                            "tensor '{}' has an init rule; values are accepted only for INIT_KIND_PROVIDED tensors",
                            chunk.tensor
                        ))
                        .into());
                    }
                    assembler.add(chunk)?;
                }
                _ => {
                    return Err(ServerError::InvalidArgument(
                        "only the first RegisterModel message may carry a spec".into(),
                    )
                    .into());
                }
            }
        }
        let staged = assembler.finish()?;
        let values = blocking(move || assemble::decode(staged)).await?;
        let mut provided: HashSet<(usize, u32)> = HashSet::new();
        for (block, data) in values {
            provided.insert((block.tensor, block.index));
            model.set_initial(&block, data);
        }
        if let Some(missing) = model
            .local_blocks()
            .iter()
            .find(|b| model.is_provided(b.tensor) && !provided.contains(&(b.tensor, b.index)))
        {
            return Err(ServerError::InvalidArgument(format!(
                "tensor '{}' is INIT_KIND_PROVIDED but no values came for its block {} (owned by this shard)",
                model.spec.tensors[missing.tensor].name, missing.index
            ))
            .into());
        }
        let (created, model) = self.registry.insert(model)?;
        tracing::info!(
            model = model.name(),
            created,
            mode = model.spec.mode.as_str(),
            tensors = model.spec.tensors.len(),
            blocks = model.local_blocks().len(),
            "model registered"
        );
        Ok(pb::RegisterModelResponse { created, layout: Some(self.registry.layout(&model)) })
    }

    async fn push(&self, request: Request<Streaming<pb::GradientChunk>>) -> Result<pb::PushGradientsResponse, Status> {
        let mut stream = request.into_inner();
        let Some(first) = stream.message().await? else {
            return Err(ServerError::InvalidArgument("empty push stream".into()).into());
        };
        let (model_name, worker, step) = (first.model.clone(), first.worker_id.clone(), first.step);
        check_worker_name(&worker)?;
        let model = self.registry.get(&model_name)?;
        if !model.membership.is_live(&worker) {
            return Err(ServerError::UnknownWorker { model: model_name, worker }.into());
        }
        let mut assembler = Assembler::new(&model, Purpose::Gradients);
        let mut next = Some(first);
        while let Some(message) = next {
            if message.model != model_name || message.worker_id != worker || message.step != step {
                return Err(ServerError::InvalidArgument(format!(
                    "every chunk of one push must name the same model, worker and step; got ({}, {}, {}) after ({model_name}, {worker}, {step})",
                    message.model, message.worker_id, message.step
                ))
                .into());
            }
            let chunk =
                message.chunk.ok_or_else(|| ServerError::InvalidArgument("push message without a chunk".into()))?;
            assembler.add(chunk)?;
            next = stream.message().await?;
        }
        let traffic = assembler.traffic().clone();
        let staged = assembler.finish()?;
        let committed = model.clone();
        let outcome = blocking(move || committed.commit_push(&worker, step, staged)).await??;
        for (encoding, t) in traffic {
            let label = codec::encoding_label(encoding);
            metrics::counter!(m::BYTES_RECEIVED, "model" => model_name.clone(), "encoding" => label)
                .increment(t.wire_bytes);
            metrics::counter!(m::BYTES_RECEIVED_F32, "model" => model_name.clone(), "encoding" => label)
                .increment(t.f32_bytes);
            if t.wire_bytes > 0 {
                metrics::gauge!(m::COMPRESSION_RATIO, "model" => model_name.clone(), "encoding" => label)
                    .set(t.f32_bytes as f64 / t.wire_bytes as f64);
            }
        }
        tracing::debug!(model = model_name, step, ?outcome, "push committed");
        Ok(pb::PushGradientsResponse {
            blocks_accepted: outcome.accepted,
            blocks_duplicate: outcome.duplicate,
            blocks_updated: outcome.updated,
        })
    }

    fn pull(&self, request: pb::PullWeightsRequest) -> Result<WeightStream, Status> {
        tracing::debug!(model = request.model, min_version = request.min_version, "pull");
        let model = self.registry.get(&request.model)?;
        let wanted: Option<HashSet<usize>> = if request.tensors.is_empty() {
            None
        } else {
            Some(request.tensors.iter().map(|t| model.tensor_index(t)).collect::<Result<_, _>>()?)
        };
        let blocks: Vec<_> = model
            .local_blocks()
            .iter()
            .filter(|b| wanted.as_ref().is_none_or(|w| w.contains(&b.tensor)))
            .cloned()
            .collect();
        let timeout = match request.timeout_ms {
            0 => DEFAULT_PULL_TIMEOUT,
            ms => Duration::from_millis(ms),
        };
        let min_version = request.min_version;
        let encoding = match codec::encoding_from_i32(request.encoding) {
            Ok(e @ (Encoding::F32 | Encoding::Bf16 | Encoding::F16)) => e,
            _ => {
                return Err(ServerError::InvalidArgument(format!(
                    "pull encoding {} is not available; use ENCODING_F32, ENCODING_BF16 or ENCODING_F16",
                    request.encoding
                ))
                .into());
            }
        };
        let per_chunk = CHUNK_BYTES / codec::payload_len(encoding, 1) as usize;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let started = Instant::now();
            let mut sent = 0u64;
            for block in blocks {
                let remaining = timeout.saturating_sub(started.elapsed());
                if let Err(version) = Model::wait_for_version(&block, min_version, remaining).await {
                    let error = ServerError::PullTimeout {
                        tensor: model.spec.tensors[block.tensor].name.clone(),
                        block: block.index,
                        wanted: min_version,
                        version,
                        waited_ms: started.elapsed().as_millis() as u64,
                    };
                    let status = Status::from(error);
                    observe::<()>("PullWeights", Err(status.clone())).ok();
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                let snapshot_of = block.clone();
                let Ok((version, values)) = blocking(move || Model::snapshot(&snapshot_of)).await else { return };
                let tensor = model.spec.tensors[block.tensor].name.clone();
                for (i, part) in values.chunks(per_chunk).enumerate() {
                    let payload = codec::encode(encoding, part);
                    sent += payload.len() as u64;
                    let chunk = pb::TensorChunk {
                        tensor: tensor.clone(),
                        block: block.index,
                        offset: (i * per_chunk) as u64,
                        length: part.len() as u64,
                        encoding: encoding as i32,
                        payload,
                        scale: 0.0,
                    };
                    if tx.send(Ok(pb::WeightChunk { version, chunk: Some(chunk) })).await.is_err() {
                        return; // the client went away
                    }
                }
            }
            metrics::counter!(m::BYTES_SENT, "model" => model.name().to_string(), "encoding" => codec::encoding_label(encoding)).increment(sent);
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    fn status(&self, request: pb::GetStatusRequest) -> Result<pb::GetStatusResponse, Status> {
        let models =
            if request.model.is_empty() { self.registry.models() } else { vec![self.registry.get(&request.model)?] };
        let models = models
            .iter()
            .map(|model| {
                let (min_version, max_version) = model.version_range();
                let (pushes, workers_expired) = model.counters();
                pb::ModelStatus {
                    name: model.name().to_string(),
                    mode: model.spec.mode.to_proto() as i32,
                    min_version,
                    max_version,
                    blocks: model.local_blocks().len() as u32,
                    parameters: model.local_blocks().iter().map(|b| b.len as u64).sum(),
                    live_workers: model
                        .membership
                        .live()
                        .into_iter()
                        .map(|(worker_id, age)| pb::WorkerStatus {
                            worker_id,
                            last_heartbeat_ms_ago: age.as_millis() as u64,
                        })
                        .collect(),
                    groups: model
                        .spec
                        .groups
                        .iter()
                        .zip(model.group_stats())
                        .map(|(group, stats)| pb::GroupStatus {
                            name: group.name.clone(),
                            optimizer: group.optimizer.describe(),
                            tensors: stats.tensors,
                            parameters: stats.parameters,
                            state_bytes: stats.state_bytes,
                        })
                        .collect(),
                    pushes,
                    workers_expired,
                }
            })
            .collect();
        Ok(pb::GetStatusResponse {
            shard_index: self.registry.identity.index,
            num_shards: self.registry.num_shards(),
            models,
        })
    }
}

type WeightStream = Pin<Box<dyn Stream<Item = Result<pb::WeightChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::parameter_server_server::ParameterServer for ParameterService {
    async fn register_model(
        &self,
        request: Request<Streaming<pb::RegisterModelRequest>>,
    ) -> Result<Response<pb::RegisterModelResponse>, Status> {
        observe("RegisterModel", self.register(request).await).map(Response::new)
    }

    async fn get_layout(&self, request: Request<pb::GetLayoutRequest>) -> Result<Response<pb::Layout>, Status> {
        let result = self.registry.get(&request.get_ref().model).map(|model| self.registry.layout(&model));
        observe("GetLayout", result.map_err(Status::from)).map(Response::new)
    }

    async fn join_worker(
        &self,
        request: Request<pb::JoinWorkerRequest>,
    ) -> Result<Response<pb::JoinWorkerResponse>, Status> {
        let request = request.into_inner();
        let result = (|| {
            check_worker_name(&request.worker_id)?;
            let model = self.registry.get(&request.model)?;
            let rank = model.membership.join(&request.worker_id);
            model.publish_live_workers();
            tracing::info!(model = request.model, worker = request.worker_id, rank, "worker joined");
            Ok::<_, ServerError>(pb::JoinWorkerResponse {
                lease_ms: model.membership.lease().as_millis() as u64,
                version: model.version_range().0,
                rank,
            })
        })();
        observe("JoinWorker", result.map_err(Status::from)).map(Response::new)
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let request = request.into_inner();
        let result = self.registry.get(&request.model).and_then(|model| {
            if model.membership.heartbeat(&request.worker_id) {
                Ok(pb::HeartbeatResponse { lease_ms: model.membership.lease().as_millis() as u64 })
            } else {
                Err(ServerError::UnknownWorker { model: request.model.clone(), worker: request.worker_id.clone() })
            }
        });
        observe("Heartbeat", result.map_err(Status::from)).map(Response::new)
    }

    async fn leave_worker(
        &self,
        request: Request<pb::LeaveWorkerRequest>,
    ) -> Result<Response<pb::LeaveWorkerResponse>, Status> {
        let request = request.into_inner();
        let result = async {
            let model = self.registry.get(&request.model)?;
            if !model.membership.leave(&request.worker_id) {
                return Err(ServerError::UnknownWorker {
                    model: request.model.clone(),
                    worker: request.worker_id.clone(),
                });
            }
            tracing::info!(model = request.model, worker = request.worker_id, "worker left");
            // Steps that were waiting only for this worker can complete now.
            blocking(move || model.complete_ready_steps()).await.map_err(|s| ServerError::Internal(s.to_string()))?;
            Ok(pb::LeaveWorkerResponse {})
        };
        observe("LeaveWorker", result.await.map_err(Status::from)).map(Response::new)
    }

    async fn push_gradients(
        &self,
        request: Request<Streaming<pb::GradientChunk>>,
    ) -> Result<Response<pb::PushGradientsResponse>, Status> {
        observe("PushGradients", self.push(request).await).map(Response::new)
    }

    type PullWeightsStream = WeightStream;

    async fn pull_weights(
        &self,
        request: Request<pb::PullWeightsRequest>,
    ) -> Result<Response<Self::PullWeightsStream>, Status> {
        observe("PullWeights", self.pull(request.into_inner())).map(Response::new)
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        // The status locks every block, which a running update may hold: not on the reactor.
        let service = self.clone();
        let result = blocking(move || service.status(request.into_inner())).await.and_then(|r| r);
        observe("GetStatus", result).map(Response::new)
    }
}
