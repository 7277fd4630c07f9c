//! The gRPC service: decodes requests, validates them against the registry,
//! hands heavy work to the blocking pool and encodes replies. No optimizer
//! math lives here.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use prost::Message;
use ps_proto::pb::{self, Encoding, TensorChunk};
use ps_proto::{chunk, codec};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::assemble::{self, Assembler, Purpose};
use super::auth::require_admin;
use super::convert;
use super::peers::Peers;
use super::recovery::Durability;
use crate::error::ServerError;
use crate::federated::Algorithm;
use crate::limits::{CHUNK_OVERHEAD_BYTES, Limits, ShardBounds};
use crate::local::LocalChannel;
use crate::metrics as m;
use crate::spec::{Mode, ModelSpec, check_name};
use crate::store::{Block, BlockUpdate, Closing, DropReason, Model, Registry, WaitFailure};

const DEFAULT_PULL_TIMEOUT: Duration = Duration::from_secs(60);
/// Chunks a pull encodes ahead of what its client has read.
const PULL_CHUNKS_AHEAD: usize = 2;

/// The `paramserver.v1.ParameterServer` implementation of one shard.
#[derive(Clone)]
pub struct ParameterService {
    pub(super) registry: Arc<Registry>,
    pub(super) peers: Peers,
    pub(super) durability: Arc<Durability>,
    pub(super) bounds: Arc<ShardBounds>,
    /// Notified by the Shutdown RPC; `serve` stops as on SIGTERM.
    pub(super) shutdown: Arc<tokio::sync::Notify>,
    /// The local channel, when the shard serves one.
    pub(super) local: Option<Arc<LocalChannel>>,
}

impl ParameterService {
    /// A service over `registry`, reaching the other shards through `peers`,
    /// writing checkpoints as `durability` says, within `limits`.
    pub fn new(registry: Arc<Registry>, peers: Peers, durability: Durability, limits: Limits) -> Self {
        Self {
            registry,
            peers,
            durability: Arc::new(durability),
            bounds: Arc::new(ShardBounds::new(limits)),
            shutdown: Arc::default(),
            local: None,
        }
    }

    /// The same service, also serving `local` clients.
    pub fn with_local(mut self, local: Arc<LocalChannel>) -> Self {
        self.local = Some(local);
        self
    }

    fn local(&self) -> Result<&Arc<LocalChannel>, ServerError> {
        self.local.as_ref().ok_or(ServerError::NoLocalChannel)
    }

    /// The limits and what is held against them.
    pub fn bounds(&self) -> &ShardBounds {
        &self.bounds
    }

    /// The models this shard serves.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }
}

/// Counts and logs a failed RPC, passing the result through.
pub(super) fn observe<T>(method: &'static str, result: Result<T, Status>) -> Result<T, Status> {
    if let Err(status) = &result {
        metrics::counter!(m::RPC_ERRORS, "method" => method, "code" => format!("{:?}", status.code())).increment(1);
        tracing::warn!(method, code = ?status.code(), message = status.message(), "request rejected");
    }
    result
}

/// Runs `work` on the blocking pool, off the reactor.
pub(super) async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, ServerError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| ServerError::Internal(e.to_string()))
}

fn check_worker_name(worker: &str) -> Result<(), ServerError> {
    Ok(check_name("worker", worker)?)
}

/// Bytes a staged chunk holds: its payload (the codec keeps it from pinning
/// more), its tensor name and the bookkeeping around them.
fn held_bytes(chunk: &TensorChunk) -> u64 {
    chunk.payload.len() as u64 + chunk.tensor.len() as u64 + CHUNK_OVERHEAD_BYTES
}

/// The time limits of one client stream: idle between messages, and open in all.
struct StreamClock {
    method: &'static str,
    started: Instant,
    idle: Duration,
    total: Duration,
}

impl StreamClock {
    fn start(method: &'static str, limits: &Limits) -> Self {
        Self { method, started: Instant::now(), idle: limits.stream_idle_timeout, total: limits.max_stream_duration }
    }

    /// The stream's next message, or an error once it idled or lasted too long.
    async fn next<T>(&self, stream: &mut Streaming<T>) -> Result<Option<T>, Status> {
        self.within(stream.message()).await
    }

    /// What `next` gives (the next message), or an error once the stream idled or lasted too long.
    async fn within<T>(&self, next: impl Future<Output = Result<Option<T>, Status>>) -> Result<Option<T>, Status> {
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

impl ParameterService {
    async fn register(
        &self,
        request: Request<Streaming<pb::RegisterModelRequest>>,
    ) -> Result<pb::RegisterModelResponse, Status> {
        let _slot = self.bounds.streams.open("RegisterModel")?;
        let limits = &self.bounds.limits;
        let clock = StreamClock::start("RegisterModel", limits);
        let mut stream = request.into_inner();
        let spec = match clock.next(&mut stream).await?.and_then(|m| m.item) {
            Some(pb::register_model_request::Item::Spec(spec)) => {
                let bytes = spec.encoded_len();
                if bytes > limits.max_spec_bytes {
                    return Err(ServerError::LimitExceeded {
                        what: format!(
                            "the model spec takes {bytes} bytes, over the limit of {}",
                            limits.max_spec_bytes
                        ),
                        flag: "--max-spec-bytes",
                    }
                    .into());
                }
                ModelSpec::try_from(spec)?
            }
            _ => return Err(ServerError::SpecNotFirst.into()),
        };
        if let Some(model) = self.registry.existing(&spec)? {
            tracing::info!(model = model.name(), "model already registered with the same spec");
            return Ok(pb::RegisterModelResponse {
                created: false,
                layout: Some(convert::model_layout(&self.registry.identity, &model)),
            });
        }
        // Everything the model will take is checked before any of it is allocated.
        let footprint = limits.check_model(&spec, self.registry.num_shards())?;
        self.refuse_fork(&spec.name).await?;
        let reservation = self.bounds.models.reserve(limits, &spec.name, footprint)?;
        let (shard, shards, lease) = (self.registry.identity.index, self.registry.num_shards(), self.registry.lease);
        let plan = self.durability.plan();
        let identity = self.registry.identity.clone();
        let model = blocking(move || {
            check_layout_fits(&identity, &spec)?;
            Ok::<_, ServerError>(Model::new(spec, shard, shards, lease).with_checkpoints(1, plan))
        })
        .await??;
        let mut assembler = Assembler::new(&model, Purpose::Weights);
        let mut staging = self.bounds.registration_staging(footprint);
        while let Some(message) = clock.next(&mut stream).await? {
            match message.item {
                Some(pb::register_model_request::Item::Values(chunk)) => {
                    staging.take(held_bytes(&chunk))?;
                    assembler.add(chunk)?
                }
                _ => return Err(ServerError::SpecRepeated.into()),
            }
        }
        let staged = assembler.finish()?;
        let model = blocking(move || {
            let values = assemble::decode(&model, staged)?;
            model.install_initial_values(values)?;
            Ok::<_, ServerError>(model)
        })
        .await??;
        drop(staging);
        let (created, model) = self.registry.insert(model)?;
        if created {
            reservation.keep();
        }
        if created && model.checkpoints.enabled() {
            // Version 0 is the point every rollback can go back to.
            let first = model.clone();
            blocking(move || first.schedule_checkpoint(0, false)).await??;
        }
        tracing::info!(
            model = model.name(),
            created,
            mode = model.spec.options.mode.as_str(),
            tensors = model.spec.tensors.len(),
            blocks = model.local_blocks().len(),
            "model registered"
        );
        let layout = convert::model_layout(&self.registry.identity, &model);
        Ok(pb::RegisterModelResponse { created, layout: Some(layout) })
    }

    /// Takes one worker's push, reading its messages from `stream`.
    pub(super) async fn push(&self, mut stream: impl PushMessages) -> Result<pb::PushGradientsResponse, Status> {
        let _slot = self.bounds.streams.open("PushGradients")?;
        let clock = StreamClock::start("PushGradients", &self.bounds.limits);
        let Some(first) = clock.within(stream.next_chunk()).await? else {
            return Err(ServerError::EmptyPush.into());
        };
        let (model_name, worker, step) = (first.model.clone(), first.worker_id.clone(), first.step);
        let model = self.push_target(&model_name, &worker, first.epoch)?;
        let mut assembler = Assembler::new(&model, Purpose::Gradients);
        let mut staging = self.bounds.stream_staging();
        let mut next = Some(first);
        while let Some(message) = next {
            if message.model != model_name || message.worker_id != worker || message.step != step {
                return Err(ServerError::MixedPush {
                    first_model: model_name,
                    first_worker: worker,
                    first_step: step,
                    model: message.model,
                    worker: message.worker_id,
                    step: message.step,
                }
                .into());
            }
            let chunk = message.chunk.ok_or(ServerError::PushWithoutChunk)?;
            staging.take(held_bytes(&chunk))?;
            assembler.add(chunk)?;
            next = clock.within(stream.next_chunk()).await?;
        }
        let traffic = assembler.traffic().clone();
        let staged = assembler.finish()?;
        let committed = model.clone();
        let outcome = blocking(move || committed.commit_push(&worker, step, staged)).await??;
        drop(staging);
        record_traffic(&model_name, traffic, TRANSPORT_GRPC);
        tracing::debug!(model = model_name, step, ?outcome, "push committed");
        Ok(pb::PushGradientsResponse {
            blocks_accepted: outcome.accepted,
            blocks_duplicate: outcome.duplicate,
            blocks_updated: outcome.updated,
        })
    }

    /// A pull's request as `next` reads it, within the stream time limits, so a
    /// client that opens a pull and never sends its request holds nothing for long.
    pub(super) async fn pull_request(
        &self,
        next: impl Future<Output = Result<Option<pb::PullWeightsRequest>, Status>>,
    ) -> Result<pb::PullWeightsRequest, Status> {
        StreamClock::start("PullWeights", &self.bounds.limits)
            .within(next)
            .await?
            .ok_or_else(|| Status::invalid_argument("the PullWeights call carried no request message"))
    }

    pub(super) fn pull(&self, request: pb::PullWeightsRequest) -> Result<WeightStream, Status> {
        tracing::debug!(model = request.model, min_version = request.min_version, "pull");
        let slot = self.bounds.streams.open("PullWeights")?;
        let model = self.registry.get(&request.model)?;
        model.check_epoch(request.epoch)?;
        let wanted: Option<HashSet<usize>> = if request.tensors.is_empty() {
            None
        } else {
            Some(request.tensors.iter().map(|t| model.tensor_index(t)).collect::<Result<_, _>>()?)
        };
        let limits = &self.bounds.limits;
        let timeout = pull_wait(request.timeout_ms, limits);
        let idle = limits.stream_idle_timeout;
        let bounds = self.bounds.clone();
        let min_version = request.min_version;
        let control = match pb::WeightPart::try_from(request.part) {
            Ok(pb::WeightPart::Parameters) => false,
            Ok(pb::WeightPart::ControlVariate) => {
                if model.rounds()?.config().algorithm != Algorithm::Scaffold {
                    return Err(ServerError::RoundCommit(format!(
                        "model '{}' keeps no control variate (only SCAFFOLD models do)",
                        model.name()
                    ))
                    .into());
                }
                true
            }
            Err(_) => return Err(ServerError::PullEncoding(request.part).into()),
        };
        let encoding = match codec::encoding_from_i32(request.encoding) {
            Ok(e @ (Encoding::F32 | Encoding::Bf16 | Encoding::F16)) => e,
            _ => return Err(ServerError::PullEncoding(request.encoding).into()),
        };
        // What the response holds lives as long as the response, not the task
        // that fills it: a client that stops reading keeps its stream slot and
        // its share of the send budget until its stream is gone.
        let hold = Arc::new(parking_lot::Mutex::new(PullHold { _stream: slot, sending: None }));
        // Chunks ahead in the channel, one waiting to enter it, and what tonic and
        // HTTP/2 buffer; a shard's share of a small model needs no more than itself
        // (cached, so a pull walks no block list on the reactor).
        let buffer_bytes = codec::payload_len(encoding, model.local_elements())
            .min((PULL_CHUNKS_AHEAD as u64 + 3) * ps_proto::transport::CHUNK_BYTES as u64);
        let (tx, rx) = mpsc::channel(PULL_CHUNKS_AHEAD);
        let filler = hold.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut sent = 0u64;
            // The blocks are walked in place: a copy of the list per pull would
            // cost thousands of open long polls a copy each.
            for index in 0..model.local_blocks().len() {
                let block = model.local_blocks()[index].clone();
                if wanted.as_ref().is_some_and(|w| !w.contains(&block.tensor)) {
                    continue;
                }
                let remaining = timeout.saturating_sub(started.elapsed());
                // A client that went away ends the wait at once, not at its timeout.
                let waited = tokio::select! {
                    waited = block.wait_for_version(min_version, remaining) => waited,
                    _ = tx.closed() => return,
                };
                if let Err(failure) = waited {
                    let error = wait_error(&model, &block, failure, min_version, started);
                    let status = Status::from(error);
                    observe::<()>("PullWeights", Err(status.clone())).ok();
                    let _ = tokio::time::timeout(idle, tx.send(Err(status))).await;
                    return;
                }
                if filler.lock().sending.is_none() {
                    let share = tokio::select! {
                        share = bounds.sending.hold(buffer_bytes) => share,
                        _ = tx.closed() => return,
                        _ = tokio::time::sleep(idle) => {
                            let busy = ServerError::Busy {
                                what: format!(
                                    "pulls hold {} of send buffers, the most this shard gives them",
                                    crate::limits::human_bytes(bounds.sending.held())
                                ),
                                flag: "--max-sending-bytes",
                            };
                            let _ = tokio::time::timeout(idle, tx.send(Err(Status::from(busy)))).await;
                            return;
                        }
                    };
                    filler.lock().sending = Some(share);
                }
                let snapshot_of = block.clone();
                let read = move || if control { snapshot_of.global_snapshot() } else { snapshot_of.snapshot() };
                let Ok((version, values)) = blocking(read).await else { return };
                let tensor = &model.spec.tensors[block.tensor].name;
                let checkpoint = model.checkpoints.marks(version);
                for chunk in chunk::encode_shared_block(tensor, block.index, values, encoding, 0.0) {
                    sent += chunk.payload.len() as u64;
                    let message = Ok(pb::WeightChunk { version, chunk: Some(chunk), checkpoint });
                    match tokio::time::timeout(idle, tx.send(message)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return, // the client went away
                        Err(_) => {
                            // A client that reads nothing would hold the snapshot and chunks for ever.
                            tracing::warn!(
                                model = model.name(),
                                "pull cut: its client read nothing for {idle:?} (--stream-idle-timeout)"
                            );
                            return;
                        }
                    }
                }
            }
            metrics::counter!(m::BYTES_SENT, "model" => model.name().to_string(), "encoding" => codec::encoding_label(encoding), "transport" => TRANSPORT_GRPC).increment(sent);
        });
        Ok(Box::pin(tokio_stream::StreamExt::map(ReceiverStream::new(rx), move |item| {
            let _held_until_the_response_ends = &hold;
            item
        })))
    }

    /// The model a push names, once the worker may push to it.
    fn push_target(&self, model_name: &str, worker: &str, epoch: u64) -> Result<Arc<Model>, ServerError> {
        check_worker_name(worker)?;
        let model = self.registry.get(model_name)?;
        if model.spec.options.mode == Mode::Federated {
            return Err(ServerError::FederatedModel(model_name.to_string()));
        }
        model.check_epoch(epoch)?;
        if !model.membership.is_live(worker) {
            return Err(model.not_a_member(worker));
        }
        Ok(model)
    }

    async fn push_local(&self, request: pb::LocalPushRequest) -> Result<pb::PushGradientsResponse, Status> {
        let local = self.local()?;
        let _slot = self.bounds.streams.open("PushLocal")?;
        let model = self.push_target(&request.model, &request.worker_id, request.epoch)?;
        let segment = local.attached(&request.segment)?;
        if request.chunks.is_empty() {
            return Err(ServerError::EmptyPush.into());
        }
        // Everything the push will hold is counted before a byte is read.
        let mut staging = self.bounds.stream_staging();
        for local_chunk in &request.chunks {
            let chunk = local_chunk.chunk.as_ref().ok_or(ServerError::PushWithoutChunk)?;
            let bytes = local_chunk.payload_bytes;
            if bytes > ps_proto::transport::MAX_CHUNK_PAYLOAD_BYTES as u64 {
                return Err(ServerError::ChunkTooLarge {
                    bytes: bytes as usize,
                    limit: ps_proto::transport::MAX_CHUNK_PAYLOAD_BYTES,
                }
                .into());
            }
            if !chunk.payload.is_empty() {
                return Err(ServerError::BadSegment {
                    segment: request.segment.clone(),
                    problem: format!(
                        "tensor '{}' block {}: a local chunk's payload lies in the segment; its own payload must be empty",
                        chunk.tensor, chunk.block
                    ),
                }
                .into());
            }
            staging.take(bytes + chunk.tensor.len() as u64 + CHUNK_OVERHEAD_BYTES)?;
        }
        let (model_name, worker, step) = (request.model.clone(), request.worker_id.clone(), request.step);
        let id = request.segment.clone();
        let committed = model.clone();
        let (outcome, traffic) = blocking(move || {
            use rayon::prelude::*;
            let chunks = request
                .chunks
                .into_par_iter()
                .map(|local_chunk| read_local_chunk(&segment, &id, local_chunk))
                .collect::<Result<Vec<_>, _>>()?;
            let mut assembler = Assembler::new(&committed, Purpose::Gradients);
            for chunk in chunks {
                assembler.add(chunk)?;
            }
            let traffic = assembler.traffic().clone();
            let staged = assembler.finish()?;
            Ok::<_, ServerError>((committed.commit_push(&worker, step, staged)?, traffic))
        })
        .await??;
        drop(staging);
        record_traffic(&model_name, traffic, TRANSPORT_SEGMENT);
        tracing::debug!(model = model_name, step, ?outcome, "local push committed");
        Ok(pb::PushGradientsResponse {
            blocks_accepted: outcome.accepted,
            blocks_duplicate: outcome.duplicate,
            blocks_updated: outcome.updated,
        })
    }

    async fn pull_local(&self, request: pb::LocalPullRequest) -> Result<pb::LocalPullResponse, Status> {
        let local = self.local()?;
        let _slot = self.bounds.streams.open("PullLocal")?;
        let model = self.registry.get(&request.model)?;
        model.check_epoch(request.epoch)?;
        let timeout = pull_wait(request.timeout_ms, &self.bounds.limits);
        let started = Instant::now();
        for block in model.local_blocks() {
            let remaining = timeout.saturating_sub(started.elapsed());
            if let Err(failure) = block.wait_for_version(request.min_version, remaining).await {
                return Err(wait_error(&model, block, failure, request.min_version, started).into());
            }
        }
        let segment = local.weights_segment(&model)?;
        let published = model.clone();
        let id = segment.id.clone();
        let publication = blocking(move || segment.publish(&published))
            .await?
            .map_err(|e| ServerError::Internal(format!("publishing the weights of '{}': {e}", model.name())))?;
        let checkpoint = publication.versions.iter().any(|&v| model.checkpoints.marks(v));
        let blocks = model
            .local_blocks()
            .iter()
            .zip(publication.versions.iter().zip(&publication.offsets))
            .map(|(block, (&version, &offset))| pb::LocalBlock {
                tensor: model.spec.tensors[block.tensor].name.clone(),
                block: block.index,
                version,
                offset,
                length: block.len as u64,
            })
            .collect();
        let bytes = model.local_elements() * 4;
        metrics::counter!(m::BYTES_SENT, "model" => model.name().to_string(), "encoding" => "f32", "transport" => TRANSPORT_SEGMENT).increment(bytes);
        Ok(pb::LocalPullResponse {
            segment: id,
            slot: publication.slot,
            sequence: publication.sequence,
            blocks,
            checkpoint,
        })
    }

    async fn round_task(&self, request: pb::GetRoundTaskRequest) -> Result<pb::RoundTask, Status> {
        let model = self.registry.get(&request.model)?;
        model.check_epoch(request.epoch)?;
        let _slot = self.bounds.streams.open("GetRoundTask")?;
        let timeout = match request.timeout_ms {
            0 => DEFAULT_PULL_TIMEOUT,
            ms => Duration::from_millis(ms),
        }
        .min(self.bounds.limits.max_wait);
        let task = model.round_task(request.client, request.after_round, timeout).await?;
        Ok(convert::round_task(model.rounds()?.config(), &task))
    }

    async fn push_round(
        &self,
        request: Request<Streaming<pb::RoundUpdateChunk>>,
    ) -> Result<pb::PushRoundUpdateResponse, Status> {
        let _slot = self.bounds.streams.open("PushRoundUpdate")?;
        let clock = StreamClock::start("PushRoundUpdate", &self.bounds.limits);
        let mut stream = request.into_inner();
        let Some(first) = clock.next(&mut stream).await? else {
            return Err(ServerError::EmptyPush.into());
        };
        let (model_name, client, round) = (first.model.clone(), first.client, first.round);
        let model = self.registry.get(&model_name)?;
        model.rounds()?;
        model.check_epoch(first.epoch)?;
        let mut deltas = Assembler::new(&model, Purpose::Gradients);
        let mut controls = Assembler::new(&model, Purpose::Gradients);
        let mut staging = self.bounds.stream_staging();
        let mut next = Some(first);
        while let Some(message) = next {
            if message.model != model_name || message.client != client || message.round != round {
                return Err(ServerError::MixedPush {
                    first_model: model_name,
                    first_worker: format!("client {client}"),
                    first_step: round,
                    model: message.model,
                    worker: format!("client {}", message.client),
                    step: message.round,
                }
                .into());
            }
            let chunk = message.chunk.ok_or(ServerError::PushWithoutChunk)?;
            staging.take(held_bytes(&chunk))?;
            match pb::RoundPart::try_from(message.part) {
                Ok(pb::RoundPart::Delta) => deltas.add(chunk)?,
                Ok(pb::RoundPart::Control) => controls.add(chunk)?,
                Err(_) => {
                    return Err(ServerError::RoundParts {
                        tensor: chunk.tensor,
                        block: chunk.block,
                        problem: format!("unknown part {}", message.part),
                    }
                    .into());
                }
            }
            next = clock.next(&mut stream).await?;
        }
        let mut traffic = deltas.traffic().clone();
        for (encoding, t) in controls.traffic() {
            let sum = traffic.entry(*encoding).or_default();
            sum.wire_bytes += t.wire_bytes;
            sum.f32_bytes += t.f32_bytes;
        }
        let (deltas, controls) = (deltas.finish()?, controls.finish()?);
        let staged = model.clone();
        let (accepted, duplicate) = blocking(move || {
            let mut controls: std::collections::HashMap<(usize, u32), Vec<f32>> =
                assemble::decode_unchecked(controls).into_iter().map(|(b, v)| ((b.tensor, b.index), v)).collect();
            let mut updates: Vec<BlockUpdate> = assemble::decode_unchecked(deltas)
                .into_iter()
                .map(|(block, delta)| {
                    let control = controls.remove(&(block.tensor, block.index));
                    (block, delta, control)
                })
                .collect();
            if let Some(((tensor, index), _)) = controls.into_iter().next() {
                // A control part without its delta: refused as a whole.
                let name = staged.spec.tensors[tensor].name.clone();
                return Err(ServerError::RoundParts {
                    tensor: name,
                    block: index,
                    problem: "a control part without its delta".into(),
                });
            }
            updates.sort_by_key(|(b, _, _)| (b.tensor, b.index));
            staged.stage_round_update(client, round, updates)
        })
        .await??;
        drop(staging);
        record_traffic(&model_name, traffic, TRANSPORT_GRPC);
        tracing::debug!(model = model_name, client, round, accepted, duplicate, "round update held");
        Ok(pb::PushRoundUpdateResponse { blocks_accepted: accepted, blocks_duplicate: duplicate })
    }

    async fn complete(&self, request: pb::CompleteRoundRequest) -> Result<pb::CompleteRoundResponse, Status> {
        let model = self.registry.get(&request.model)?;
        let rounds = model.rounds()?;
        model.check_epoch(request.epoch)?;
        let (client, round) = (request.client, request.round);
        if !rounds.is_coordinator() {
            model.check_round_update(client, round)?;
            // Peers ask this for every client: read the cohort, not every block's statistics.
            let cohort_size = rounds.cohort_size();
            return Ok(pb::CompleteRoundResponse { contributions: 0, cohort_size });
        }
        model.check_round_update(client, round)?;
        self.peers.check_round_update(model.name(), client, round).await?;
        let (contributions, cohort_size, closing) = model.complete_round(client, round)?;
        if let Some(closing) = closing {
            close_round(&self.peers, model, closing).await?;
        }
        Ok(pb::CompleteRoundResponse { contributions, cohort_size })
    }

    async fn commit(&self, request: pb::CommitRoundRequest) -> Result<pb::CommitRoundResponse, Status> {
        let model = self.registry.get(&request.model)?;
        if model.rounds()?.is_coordinator() {
            return Err(ServerError::RoundCommit("shard 0 decides rounds; it takes no CommitRound".into()).into());
        }
        blocking(move || model.apply_round(request.round, &request.clients)).await??;
        Ok(pb::CommitRoundResponse {})
    }

    fn status(&self, request: pb::GetStatusRequest) -> Result<pb::GetStatusResponse, Status> {
        let models =
            if request.model.is_empty() { self.registry.models() } else { vec![self.registry.get(&request.model)?] };
        let models = models.iter().map(|model| convert::model_status(model)).collect();
        Ok(pb::GetStatusResponse {
            shard_index: self.registry.identity.index,
            num_shards: self.registry.num_shards(),
            models,
            limits: Some(convert::shard_limits(&self.bounds)),
            local: self.local.as_ref().map(|local| local.advertised()),
        })
    }
}

/// Reads one chunk's payload out of a local segment. A segment that ends
/// before the range it names is refused (it may have been truncated by its
/// client); nothing is applied.
fn read_local_chunk(
    segment: &std::fs::File,
    id: &str,
    local_chunk: pb::LocalChunk,
) -> Result<TensorChunk, ServerError> {
    use std::os::unix::fs::FileExt;
    let mut chunk = local_chunk.chunk.ok_or(ServerError::PushWithoutChunk)?;
    let mut payload = vec![0u8; local_chunk.payload_bytes as usize];
    segment.read_exact_at(&mut payload, local_chunk.segment_offset).map_err(|e| ServerError::BadSegment {
        segment: id.to_string(),
        problem: format!(
            "tensor '{}' block {}: bytes {}..{} cannot be read ({e}); the segment may be shorter than the ranges named",
            chunk.tensor,
            chunk.block,
            local_chunk.segment_offset,
            local_chunk.segment_offset.saturating_add(local_chunk.payload_bytes)
        ),
    })?;
    chunk.payload = payload.into();
    Ok(chunk)
}

/// What a wait for `min_version` that failed tells the client.
fn wait_error(model: &Model, block: &Block, failure: WaitFailure, min_version: u64, started: Instant) -> ServerError {
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
fn pull_wait(timeout_ms: u64, limits: &Limits) -> Duration {
    match timeout_ms {
        0 => DEFAULT_PULL_TIMEOUT,
        ms => Duration::from_millis(ms),
    }
    .min(limits.max_wait)
}

/// What one pull response holds while it exists.
struct PullHold {
    _stream: tokio::sync::OwnedSemaphorePermit,
    sending: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Refuses a model whose layout would not fit in one reply: the registration
/// would succeed, and every GetLayout of it fail.
fn check_layout_fits(identity: &crate::store::ShardIdentity, spec: &ModelSpec) -> Result<(), ServerError> {
    let bytes = convert::layout(identity, spec, &spec.plan(identity.addresses.len() as u32)).encoded_len();
    if bytes > ps_proto::transport::MAX_MESSAGE_BYTES {
        return Err(ServerError::LimitExceeded {
            what: format!(
                "the layout of model '{}' would take {bytes} bytes, more than one gRPC message holds ({}); \
                 use fewer blocks (a larger max_block_elements) or shorter tensor names",
                spec.name,
                ps_proto::transport::MAX_MESSAGE_BYTES
            ),
            flag: "--max-model-blocks",
        });
    }
    Ok(())
}

/// Applies a round shard 0 closed on its own blocks, then sends it to every peer.
pub(super) async fn close_round(peers: &Peers, model: Arc<Model>, closing: Closing) -> Result<(), ServerError> {
    let applied = model.clone();
    let commit = closing.clone();
    blocking(move || applied.apply_round(commit.round, &commit.clients)).await??;
    peers.share_commit(model.name(), &closing);
    Ok(())
}

/// The `transport` label of traffic over gRPC (TCP or the local Unix socket).
const TRANSPORT_GRPC: &str = "grpc";
/// The `transport` label of traffic through memory segments.
const TRANSPORT_SEGMENT: &str = "segment";

fn record_traffic(
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

pub(super) type WeightStream = Pin<Box<dyn Stream<Item = Result<pb::WeightChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::parameter_server_server::ParameterServer for ParameterService {
    async fn register_model(
        &self,
        request: Request<Streaming<pb::RegisterModelRequest>>,
    ) -> Result<Response<pb::RegisterModelResponse>, Status> {
        let result = match require_admin(&request, "RegisterModel") {
            Ok(()) => self.register(request).await,
            Err(denied) => Err(denied),
        };
        observe("RegisterModel", result).map(Response::new)
    }

    async fn get_layout(&self, request: Request<pb::GetLayoutRequest>) -> Result<Response<pb::Layout>, Status> {
        let result = self
            .registry
            .get(&request.get_ref().model)
            .map(|model| convert::model_layout(&self.registry.identity, &model));
        observe("GetLayout", result.map_err(Status::from)).map(Response::new)
    }

    async fn plan_layout(&self, request: Request<pb::PlanLayoutRequest>) -> Result<Response<pb::Layout>, Status> {
        let service = self.clone();
        let plan = move || {
            let wire = request.into_inner().spec.ok_or(ServerError::InvalidSpec("PlanLayout needs a spec".into()))?;
            let spec = ModelSpec::try_from(wire)?;
            service.bounds.limits.check_model(&spec, service.registry.num_shards())?;
            let identity = &service.registry.identity;
            Ok::<_, ServerError>(convert::layout(identity, &spec, &spec.plan(service.registry.num_shards())))
        };
        // Validation and placement are linear in the tensors and blocks: not on the reactor.
        let result = blocking(plan).await.and_then(|r| r).map_err(Status::from);
        observe("PlanLayout", result).map(Response::new)
    }

    async fn join_worker(
        &self,
        request: Request<pb::JoinWorkerRequest>,
    ) -> Result<Response<pb::JoinWorkerResponse>, Status> {
        let request = request.into_inner();
        let result =
            (|| {
                check_worker_name(&request.worker_id)?;
                let model = self.registry.get(&request.model)?;
                model.check_serving()?;
                let rank = model.membership.join(&request.worker_id, request.rank).map_err(|reason| {
                    ServerError::Join { model: request.model.clone(), worker: request.worker_id.clone(), reason }
                })?;
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
            if !model.membership.heartbeat(&request.worker_id) {
                return Err(model.not_a_member(&request.worker_id));
            }
            Ok(pb::HeartbeatResponse { lease_ms: model.membership.lease().as_millis() as u64 })
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
                return Err(model.not_a_member(&request.worker_id));
            }
            // A peer that dropped the worker says why, so every shard counts it the same.
            let told = match pb::LeaveReason::try_from(request.reason) {
                Ok(pb::LeaveReason::LeaseExpired) => Some(DropReason::LeaseExpired),
                Ok(pb::LeaveReason::MissedDeadline) => Some(DropReason::MissedDeadline),
                _ => None,
            };
            match told {
                Some(why) => {
                    model.count_drops(why, 1);
                    tracing::warn!(
                        model = request.model,
                        worker = request.worker_id,
                        ?why,
                        "worker dropped by a peer shard"
                    );
                }
                None => tracing::info!(model = request.model, worker = request.worker_id, "worker left"),
            }
            // Steps that were waiting only for this worker can complete now.
            blocking(move || model.complete_ready_steps()).await?;
            Ok(pb::LeaveWorkerResponse {})
        };
        observe("LeaveWorker", result.await.map_err(Status::from)).map(Response::new)
    }

    // A shard serves PushGradients and PullWeights through `hand_route`, so these two
    // are not reached there; the generated trait needs them, and they run the same code.
    async fn push_gradients(
        &self,
        request: Request<Streaming<pb::GradientChunk>>,
    ) -> Result<Response<pb::PushGradientsResponse>, Status> {
        observe("PushGradients", self.push(request.into_inner()).await).map(Response::new)
    }

    type PullWeightsStream = WeightStream;

    async fn pull_weights(
        &self,
        request: Request<pb::PullWeightsRequest>,
    ) -> Result<Response<Self::PullWeightsStream>, Status> {
        observe("PullWeights", self.pull(request.into_inner())).map(Response::new)
    }

    async fn push_local(
        &self,
        request: Request<pb::LocalPushRequest>,
    ) -> Result<Response<pb::PushGradientsResponse>, Status> {
        observe("PushLocal", self.push_local(request.into_inner()).await).map(Response::new)
    }

    async fn pull_local(
        &self,
        request: Request<pb::LocalPullRequest>,
    ) -> Result<Response<pb::LocalPullResponse>, Status> {
        observe("PullLocal", self.pull_local(request.into_inner()).await).map(Response::new)
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        // The status locks every block, which a running update may hold: not on the reactor.
        let service = self.clone();
        let result = blocking(move || service.status(request.into_inner())).await.map_err(Status::from).and_then(|r| r);
        observe("GetStatus", result).map(Response::new)
    }

    async fn get_round_task(
        &self,
        request: Request<pb::GetRoundTaskRequest>,
    ) -> Result<Response<pb::RoundTask>, Status> {
        observe("GetRoundTask", self.round_task(request.into_inner()).await).map(Response::new)
    }

    async fn push_round_update(
        &self,
        request: Request<Streaming<pb::RoundUpdateChunk>>,
    ) -> Result<Response<pb::PushRoundUpdateResponse>, Status> {
        observe("PushRoundUpdate", self.push_round(request).await).map(Response::new)
    }

    async fn complete_round(
        &self,
        request: Request<pb::CompleteRoundRequest>,
    ) -> Result<Response<pb::CompleteRoundResponse>, Status> {
        observe("CompleteRound", self.complete(request.into_inner()).await).map(Response::new)
    }

    async fn commit_round(
        &self,
        request: Request<pb::CommitRoundRequest>,
    ) -> Result<Response<pb::CommitRoundResponse>, Status> {
        let result = match require_admin(&request, "CommitRound") {
            Ok(()) => self.commit(request.into_inner()).await,
            Err(denied) => Err(denied),
        };
        observe("CommitRound", result).map(Response::new)
    }

    async fn checkpoint(
        &self,
        request: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointResponse>, Status> {
        let result = match require_admin(&request, "Checkpoint") {
            Ok(()) => self.checkpoint_model(request.into_inner()).await.map_err(Status::from),
            Err(denied) => Err(denied),
        };
        observe("Checkpoint", result).map(Response::new)
    }

    async fn list_checkpoints(
        &self,
        request: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        let result = match require_admin(&request, "ListCheckpoints") {
            Ok(()) => {
                let service = self.clone();
                blocking(move || service.checkpoints_held(&request.into_inner().model)).await.map_err(Status::from)
            }
            Err(denied) => Err(denied),
        };
        observe("ListCheckpoints", result).map(Response::new)
    }

    async fn rollback(&self, request: Request<pb::RollbackRequest>) -> Result<Response<pb::RollbackResponse>, Status> {
        let result = match require_admin(&request, "Rollback") {
            Ok(()) => self.roll_back(request.into_inner()).await.map_err(Status::from),
            Err(denied) => Err(denied),
        };
        observe("Rollback", result).map(Response::new)
    }

    async fn shutdown(&self, request: Request<pb::ShutdownRequest>) -> Result<Response<pb::ShutdownResponse>, Status> {
        observe("Shutdown", require_admin(&request, "Shutdown"))?;
        tracing::info!("shutdown asked over gRPC");
        // Stored if `serve` is not waiting yet, so the request is never lost.
        self.shutdown.notify_one();
        Ok(Response::new(pb::ShutdownResponse {}))
    }
}
