//! A registered model as a worker uses it: membership with leases, pushes
//! routed block by block to their shards, pulls into reusable buffers, and
//! the global-norm clipping the model's spec asks for.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::try_join_all;
use ps_proto::transport::PUSH_STREAM_BYTES;
use ps_proto::{chunk, codec, errors, frame, pb};
use tonic::{Code, Status};

use crate::Tensors;
use crate::connection::{PsClient, ShardStub};
use crate::error::{ClientError, ProtocolError};
use crate::layout::{Layout, TensorInfo};
use crate::local::{LocalShard, PushSegment, WeightsFile};
use crate::spec::Encoding;

pub(crate) fn check_len(tensor: &str, expected: u64, data: &[f32]) -> Result<(), ClientError> {
    if data.len() as u64 != expected {
        return Err(ClientError::WrongLength { tensor: tensor.to_string(), expected, actual: data.len() as u64 });
    }
    Ok(())
}

/// Weights read from the servers.
#[derive(Clone, Debug)]
pub struct Weights {
    /// Lowest block version among the blocks read.
    pub version: u64,
    /// The tensors.
    pub tensors: Tensors,
    /// Payload bytes received.
    pub bytes: u64,
    /// The servers checkpoint this version: a worker with state of its own
    /// (error-feedback residual, data position) saves it now, before computing
    /// the step at this version, to restore it if the model is rolled back here.
    pub checkpoint: bool,
}

/// What joining a model returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Joined {
    /// The lowest block version: the step to start from.
    pub version: u64,
    /// The rank shard 0 assigned (smallest free among current members).
    pub rank: u32,
}

/// What a push did, summed over shards.
#[derive(Clone, Copy, Debug, Default)]
pub struct PushSummary {
    /// Blocks counted.
    pub accepted: u32,
    /// Blocks that were already counted (retries).
    pub duplicate: u32,
    /// Blocks whose update this push completed.
    pub updated: u32,
    /// Payload bytes sent.
    pub bytes: u64,
}

/// What [`ModelHandle::push_step`] did.
#[derive(Clone, Copy, Debug)]
pub enum StepOutcome {
    /// The push was taken (possibly after joining again).
    Pushed(PushSummary),
    /// The step went ahead without this worker; continue from `version`.
    Resync {
        /// The version to pull and push next.
        version: u64,
    },
    /// The model was rolled back to its checkpoint at `version` (a shard
    /// restarted): restore the worker state saved there, then continue from it.
    RolledBack {
        /// The version to pull and push next.
        version: u64,
    },
}

/// What a pull read, beside the values.
#[derive(Clone, Copy, Debug, Default)]
pub struct PullInfo {
    /// Lowest block version among the blocks read.
    pub version: u64,
    /// Payload bytes received.
    pub bytes: u64,
    /// Whether a shard marked the version as checkpointed.
    pub checkpoint: bool,
}

/// A registered model: its layout and the operations of a worker on it.
#[derive(Clone)]
pub struct ModelHandle {
    client: PsClient,
    layout: Arc<Layout>,
    tensors: Arc<Vec<TensorInfo>>,
    index: Arc<HashMap<String, usize>>,
    pull_encoding: Encoding,
    /// The rank each worker of this handle joined with, so a rejoin asks for it again.
    ranks: Arc<Mutex<HashMap<String, u32>>>,
    /// The model's epoch as this handle last learned it; sent with every push and pull.
    epoch: Arc<AtomicU64>,
    /// Per shard: the segment this handle pushes through when the shard is local.
    push_segments: Arc<Vec<tokio::sync::Mutex<Option<PushSegment>>>>,
    /// Per shard: the model's weights segment there, once opened.
    weights_files: Arc<Vec<Mutex<Option<Arc<WeightsFile>>>>>,
}

impl std::fmt::Debug for ModelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelHandle").field("model", &self.layout.model).field("shards", &self.layout.shards).finish()
    }
}

impl ModelHandle {
    pub(crate) fn new(client: PsClient, layout: Layout) -> Result<Self, ClientError> {
        if layout.shards.len() != client.num_shards() {
            return Err(ClientError::ShardCountMismatch { servers: layout.shards, client: client.num_shards() });
        }
        let tensors = layout.tensor_infos()?;
        let index: HashMap<String, usize> = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        let shards = client.num_shards();
        Ok(Self {
            client,
            tensors: Arc::new(tensors),
            index: Arc::new(index),
            pull_encoding: Encoding::F32,
            ranks: Arc::default(),
            epoch: Arc::new(AtomicU64::new(layout.epoch)),
            push_segments: Arc::new((0..shards).map(|_| Default::default()).collect()),
            weights_files: Arc::new((0..shards).map(|_| Default::default()).collect()),
            layout: Arc::new(layout),
        })
    }

    /// The same model, pulling weights in `encoding` (f32, bf16 or f16): half
    /// the bytes for workers that compute in half precision.
    pub fn with_pull_encoding(mut self, encoding: Encoding) -> Self {
        self.pull_encoding = encoding;
        self
    }

    /// The model's epoch as this handle knows it.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// If `error` says the model was rolled back, adopts the new epoch and
    /// returns the version to continue from (after restoring the worker state
    /// saved there).
    pub fn rolled_back(&self, error: &ClientError) -> Option<u64> {
        let (epoch, version) = error.rollback()?;
        self.epoch.fetch_max(epoch, Ordering::AcqRel);
        tracing::warn!(
            model = self.name(),
            epoch,
            version,
            "the model was rolled back to a checkpoint; resuming there"
        );
        Some(version)
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.layout.model
    }

    /// The layout as the servers reported it.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The tensors in spec order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The client this model was opened with.
    pub fn client(&self) -> &PsClient {
        &self.client
    }

    async fn on_every_shard<T, F, Fut>(&self, call: F) -> Result<Vec<T>, ClientError>
    where
        F: Fn(ShardStub) -> Fut + Clone,
        Fut: Future<Output = Result<T, Status>>,
    {
        try_join_all((0..self.client.num_shards()).map(|shard| self.client.retry(shard, call.clone()))).await
    }

    /// Joins the worker on every shard with the smallest free rank (or the rank
    /// it held before, when it rejoins); see [`ModelHandle::join_as`].
    pub async fn join(&self, worker: &str) -> Result<Joined, ClientError> {
        self.join_as(worker, None).await
    }

    /// Joins the worker on every shard, asking for `rank` (None: the rank this
    /// handle saw it hold, else the smallest free one). Shard 0 decides the
    /// rank and the other shards are asked for the same, so ranks agree
    /// everywhere. Returns the version to start from (the lowest over the
    /// shards that hold blocks of the model) and the rank.
    pub async fn join_as(&self, worker: &str, rank: Option<u32>) -> Result<Joined, ClientError> {
        let asked = rank.or_else(|| self.known_rank(worker));
        let first = self.join_shard(0, worker, asked).await?;
        self.ranks.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(worker.to_string(), first.rank);
        let rest = (1..self.client.num_shards()).map(|shard| self.join_shard(shard, worker, Some(first.rank)));
        let mut replies = vec![first];
        replies.extend(try_join_all(rest).await?);
        // A shard that holds no block of the model has no version to report (it says 0).
        let holds_blocks = |shard: usize| self.layout.blocks.iter().any(|b| b.shard as usize == shard);
        let version =
            replies.iter().enumerate().filter(|(shard, _)| holds_blocks(*shard)).map(|(_, r)| r.version).min();
        Ok(Joined { version: version.unwrap_or(0), rank: first.rank })
    }

    fn known_rank(&self, worker: &str) -> Option<u32> {
        self.ranks.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(worker).copied()
    }

    async fn join_shard(
        &self,
        shard: usize,
        worker: &str,
        rank: Option<u32>,
    ) -> Result<pb::JoinWorkerResponse, ClientError> {
        let request = pb::JoinWorkerRequest { model: self.name().to_string(), worker_id: worker.to_string(), rank };
        self.client
            .retry(shard, move |mut stub| {
                let request = request.clone();
                async move { stub.join_worker(request).await.map(|r| r.into_inner()) }
            })
            .await
    }

    /// Renews the worker's lease on every shard at once (each with retries);
    /// the worker rejoins where the lease had expired. Returns the shortest lease.
    pub async fn heartbeat(&self, worker: &str) -> Result<Duration, ClientError> {
        let beats = (0..self.client.num_shards()).map(|shard| self.heartbeat_shard(shard, worker, true));
        let mut lease = Duration::MAX;
        for beat in futures::future::join_all(beats).await {
            lease = lease.min(beat?);
        }
        Ok(lease)
    }

    /// One shard's heartbeat (with the client's retries if `retry`); joins again if the lease had expired.
    async fn heartbeat_shard(&self, shard: usize, worker: &str, retry: bool) -> Result<Duration, ClientError> {
        let request = pb::HeartbeatRequest { model: self.name().to_string(), worker_id: worker.to_string() };
        let reply = if retry {
            self.client
                .retry(shard, move |mut stub| {
                    let request = request.clone();
                    async move { stub.heartbeat(request).await.map(|r| r.into_inner()) }
                })
                .await
        } else {
            let mut stub = self.client.stub(shard);
            stub.heartbeat(request).await.map(|r| r.into_inner()).map_err(|status| ClientError::Rpc { shard, status })
        };
        match reply {
            Ok(reply) => Ok(Duration::from_millis(reply.lease_ms)),
            Err(ClientError::Rpc { status, .. }) if status.code() == Code::NotFound => {
                tracing::warn!(
                    worker,
                    shard,
                    "no longer a member (lease expired, or dropped at a step deadline); joining again"
                );
                let reply = self.join_shard(shard, worker, self.known_rank(worker)).await?;
                Ok(Duration::from_millis(reply.lease_ms))
            }
            Err(other) => Err(other),
        }
    }

    /// Heart-beats every shard at a third of the lease, each shard on its own
    /// schedule (a shard that is down or restarting does not delay the others,
    /// whose leases keep running), until the handle is dropped or aborted.
    pub fn spawn_heartbeat(&self, worker: &str) -> tokio::task::JoinHandle<()> {
        let (model, worker) = (self.clone(), worker.to_string());
        tokio::spawn(async move {
            let beats = (0..model.client.num_shards()).map(|shard| {
                let (model, worker) = (&model, &worker);
                async move {
                    let mut period = Duration::from_secs(1);
                    loop {
                        match model.heartbeat_shard(shard, worker, false).await {
                            Ok(lease) => period = (lease / 3).max(Duration::from_millis(10)),
                            Err(error) => tracing::warn!(worker, shard, %error, "heartbeat failed"),
                        }
                        tokio::time::sleep(period).await;
                    }
                }
            });
            futures::future::join_all(beats).await;
        })
    }

    /// Leaves the model on every shard, so no barrier waits for this worker.
    pub async fn leave(&self, worker: &str) -> Result<(), ClientError> {
        let request = pb::LeaveWorkerRequest {
            model: self.name().to_string(),
            worker_id: worker.to_string(),
            reason: pb::LeaveReason::Left as i32,
        };
        self.on_every_shard(|mut stub| {
            let request = request.clone();
            async move { stub.leave_worker(request).await.map(|r| r.into_inner()) }
        })
        .await?;
        Ok(())
    }

    /// Pushes one step's gradients (every tensor, full length) to all shards
    /// at once, each tensor in its group's preferred encoding; sign1 sends the
    /// signs with the tensor's mean absolute value as the scale. Transient
    /// failures are retried; the server ignores blocks it already counted, so
    /// a retry is safe.
    pub async fn push(&self, worker: &str, step: u64, grads: &Tensors) -> Result<PushSummary, ClientError> {
        self.push_gradients(worker, step, Gradients::Lent(grads)).await
    }

    /// Pushes as [`ModelHandle::push`] does, taking the gradients: over gRPC,
    /// tensors sent as f32 go to the socket from where they lie instead of
    /// being copied into each message first. For a trainer that makes fresh
    /// gradients every step; they are freed when the push is done (unless the
    /// caller keeps a clone of the `Arc`).
    pub async fn push_owned(
        &self,
        worker: &str,
        step: u64,
        grads: impl Into<Arc<Tensors>>,
    ) -> Result<PushSummary, ClientError> {
        self.push_gradients(worker, step, Gradients::Owned(&grads.into())).await
    }

    /// The push behind [`ModelHandle::push`] and [`ModelHandle::push_owned`].
    async fn push_gradients(
        &self,
        worker: &str,
        step: u64,
        gradients: Gradients<'_>,
    ) -> Result<PushSummary, ClientError> {
        let grads = gradients.tensors();
        for name in grads.keys() {
            if !self.index.contains_key(name) {
                return Err(ClientError::UnknownTensor(name.clone()));
            }
        }
        let mut scales = Vec::with_capacity(self.tensors.len());
        for tensor in self.tensors.iter() {
            let data = grads.get(&tensor.name).ok_or_else(|| ClientError::MissingTensor(tensor.name.clone()))?;
            check_len(&tensor.name, tensor.len as u64, data)?;
            scales.push(if tensor.encoding == Encoding::Sign1 { codec::mean_abs(data) } else { 0.0 });
        }
        let push = PushRequest { worker, step, gradients, scales: &scales };
        let replies =
            try_join_all(self.shards_with_blocks().into_iter().map(|shard| self.push_shard(shard, &push))).await?;
        Ok(replies.iter().flat_map(|(replies, _)| replies).fold(
            PushSummary { bytes: replies.iter().map(|(_, bytes)| bytes).sum(), ..Default::default() },
            |sum, r| PushSummary {
                accepted: sum.accepted + r.blocks_accepted,
                duplicate: sum.duplicate + r.blocks_duplicate,
                updated: sum.updated + r.blocks_updated,
                bytes: sum.bytes,
            },
        ))
    }

    /// The shards that hold blocks of this model.
    fn shards_with_blocks(&self) -> Vec<usize> {
        (0..self.client.num_shards()).filter(|&s| self.layout.blocks.iter().any(|b| b.shard as usize == s)).collect()
    }

    /// This shard's blocks of every tensor, with the tensor's index.
    fn blocks_on(&self, shard: usize) -> impl Iterator<Item = (usize, &crate::layout::BlockPlan)> {
        self.tensors
            .iter()
            .enumerate()
            .flat_map(move |(at, t)| t.blocks.iter().filter(move |b| b.shard as usize == shard).map(move |b| (at, b)))
    }

    /// Pushes one shard's blocks: through a memory segment when the shard is on
    /// this host, otherwise (or when the local channel fails) over gRPC.
    async fn push_shard(
        &self,
        shard: usize,
        push: &PushRequest<'_>,
    ) -> Result<(Vec<pb::PushGradientsResponse>, u64), ClientError> {
        if let Some(local) = self.client.local_shard(shard).await.filter(|local| local.segments) {
            match self.push_local(shard, &local, push).await {
                Ok(done) => return Ok(done),
                Err(LocalFailure::Channel(why)) => self.client.leave_local(shard, &why),
                Err(LocalFailure::Server(error)) => return Err(error),
            }
        }
        self.push_grpc(shard, push).await
    }

    async fn push_grpc(
        &self,
        shard: usize,
        push: &PushRequest<'_>,
    ) -> Result<(Vec<pb::PushGradientsResponse>, u64), ClientError> {
        // Streams of whole blocks, each within the shards' per-stream limit.
        let mut streams: Vec<PushStream> = Vec::new();
        for (at, block) in self.blocks_on(shard) {
            let block_bytes = codec::payload_len(self.tensors[at].encoding.to_wire(), block.length);
            match streams.last() {
                Some(last) if last.bytes + block_bytes <= PUSH_STREAM_BYTES as u64 => {}
                _ => streams.push(PushStream::default()),
            }
            let stream = streams.last_mut().expect("a stream was just ensured");
            stream.bytes += block_bytes;
            stream.blocks.push((at, block));
        }
        let bytes_total = streams.iter().map(|s| s.bytes).sum();
        let calls = streams.iter().map(|stream| {
            self.client.retry(shard, move |mut stub| async move {
                // Chunks are framed (`frame`: one copy, from the caller's
                // floats, or none for f32 gradients handed over) as the stream
                // takes them, so the first is on the wire while the rest are
                // still floats, and no copy of the whole push is ever held. A
                // retry frames them again.
                let (sender, receiver) = tokio::sync::mpsc::channel(PUSH_CHUNKS_AHEAD);
                let call = stub.frames(tokio_stream::wrappers::ReceiverStream::new(receiver));
                let feed = self.feed_push(stream, push, sender);
                tokio::pin!(call, feed);
                // A call that ends first (the server refused the push part-way)
                // ends the feeding with it, whether or not its stream was dropped.
                tokio::select! {
                    reply = &mut call => reply,
                    () = &mut feed => call.await,
                }
            })
        });
        Ok((try_join_all(calls).await?, bytes_total))
    }

    /// Frames one push stream's blocks chunk by chunk into `sender`; stops
    /// early when the call ended (the server answered or the stream broke).
    async fn feed_push(
        &self,
        stream: &PushStream<'_>,
        push: &PushRequest<'_>,
        sender: tokio::sync::mpsc::Sender<bytes::Bytes>,
    ) {
        let header =
            frame::PushHeader { model: self.name(), worker: push.worker, step: push.step, epoch: self.epoch() };
        for &(at, block) in &stream.blocks {
            let tensor = &self.tensors[at];
            let range = block.offset as usize..(block.offset + block.length) as usize;
            let encoding = tensor.encoding.to_wire();
            let frames: Box<dyn Iterator<Item = bytes::Bytes> + Send + '_> = match push.gradients {
                // f32 on the wire is the memory layout here: the values go out as they lie.
                Gradients::Owned(grads) if encoding == pb::Encoding::F32 && cfg!(target_endian = "little") => {
                    let values = bytes::Bytes::from_owner(PushedValues {
                        grads: grads.clone(),
                        tensor: tensor.name.clone(),
                        range,
                    });
                    Box::new(frame::f32_block_pieces(header, &tensor.name, block.block, values))
                }
                _ => {
                    let values = &push.gradients.tensors()[&tensor.name][range];
                    Box::new(frame::block_frames(header, &tensor.name, block.block, values, encoding, push.scales[at]))
                }
            };
            for frame in frames {
                if sender.send(frame).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Writes the shard's payloads into this handle's segment for it (made or
    /// grown as needed), then names them in PushLocal calls.
    async fn push_local(
        &self,
        shard: usize,
        local: &Arc<LocalShard>,
        push: &PushRequest<'_>,
    ) -> Result<(Vec<pb::PushGradientsResponse>, u64), LocalFailure> {
        let mut held = self.push_segments[shard].lock().await;
        let mut planned = Vec::new();
        let mut bytes = 0u64;
        for (at, block) in self.blocks_on(shard) {
            let tensor = &self.tensors[at];
            let encoding = tensor.encoding.to_wire();
            let values =
                &push.gradients.tensors()[&tensor.name][block.offset as usize..(block.offset + block.length) as usize];
            let per_chunk = chunk::elements_per_chunk(encoding);
            for (i, part) in values.chunks(per_chunk).enumerate() {
                let payload_bytes = codec::payload_len(encoding, part.len() as u64);
                let header = pb::TensorChunk {
                    tensor: tensor.name.clone(),
                    block: block.block,
                    offset: (i * per_chunk) as u64,
                    length: part.len() as u64,
                    encoding: encoding as i32,
                    payload: Default::default(),
                    scale: push.scales[at],
                };
                planned.push((pb::LocalChunk { chunk: Some(header), segment_offset: bytes, payload_bytes }, part));
                bytes += payload_bytes;
            }
        }
        if held.as_ref().is_none_or(|segment| segment.bytes < bytes) {
            let size = bytes.next_multiple_of(1 << 20).max(1 << 20);
            // The segment socket waits for the shard: not on the reactor.
            let attaching = local.clone();
            let attached = tokio::task::spawn_blocking(move || attaching.attach(size))
                .await
                .map_err(|e| LocalFailure::Channel(e.to_string()))?;
            *held = Some(attached.map_err(|e| LocalFailure::Channel(e.to_string()))?);
        }
        let segment = held.as_ref().expect("a segment was just attached");
        for (local_chunk, part) in &planned {
            let at = local_chunk.segment_offset;
            let written = match local_chunk.chunk.as_ref().map(|c| c.encoding) {
                Some(e) if e == pb::Encoding::F32 as i32 => ps_proto::local::write_f32s(&segment.file, at, part),
                Some(e) => {
                    let encoding = codec::encoding_from_i32(e).map_err(|e| LocalFailure::Channel(e.to_string()))?;
                    std::os::unix::fs::FileExt::write_all_at(&segment.file, &codec::encode(encoding, part), at)
                }
                None => Ok(()),
            };
            written.map_err(|e| LocalFailure::Channel(format!("writing the push segment: {e}")))?;
        }
        let mut requests: Vec<pb::LocalPushRequest> = Vec::new();
        let mut request_bytes = 0u64;
        for (local_chunk, _) in planned {
            let full = requests.last().is_none_or(|r| {
                request_bytes + local_chunk.payload_bytes > PUSH_STREAM_BYTES as u64
                    || r.chunks.len() >= MAX_LOCAL_CHUNKS
            });
            if full {
                request_bytes = 0;
                requests.push(pb::LocalPushRequest {
                    model: self.name().to_string(),
                    worker_id: push.worker.to_string(),
                    step: push.step,
                    epoch: self.epoch(),
                    segment: segment.id.clone(),
                    chunks: Vec::new(),
                });
            }
            request_bytes += local_chunk.payload_bytes;
            requests.last_mut().expect("a request was just ensured").chunks.push(local_chunk);
        }
        let calls = requests.into_iter().map(|request| {
            self.client.retry(shard, move |mut stub| {
                let request = request.clone();
                async move { stub.push_local(request).await.map(|r| r.into_inner()) }
            })
        });
        match try_join_all(calls).await {
            Ok(replies) => Ok((replies, bytes)),
            // The shard no longer knows the segment: its socket connection broke (a restart).
            Err(ClientError::Rpc { status, .. })
                if status.code() == Code::NotFound && status.message().starts_with("segment '") =>
            {
                *held = None;
                Err(LocalFailure::Channel(status.message().to_string()))
            }
            Err(error) => Err(LocalFailure::Server(error)),
        }
    }

    /// Pushes one step as [`ModelHandle::push`] does, and recovers from a lost
    /// lease: a worker the shards no longer count joins again and the push is
    /// retried once; a step that was applied without it comes back as
    /// [`StepOutcome::Resync`] with the version to continue from (pull it, then
    /// push that step). The worker's compression state is the caller's and is
    /// kept as it is.
    pub async fn push_step(&self, worker: &str, step: u64, grads: &Tensors) -> Result<StepOutcome, ClientError> {
        self.push_step_gradients(worker, step, Gradients::Lent(grads)).await
    }

    /// [`ModelHandle::push_step`], taking the gradients as [`ModelHandle::push_owned`] does.
    pub async fn push_step_owned(
        &self,
        worker: &str,
        step: u64,
        grads: impl Into<Arc<Tensors>>,
    ) -> Result<StepOutcome, ClientError> {
        self.push_step_gradients(worker, step, Gradients::Owned(&grads.into())).await
    }

    /// The step behind [`ModelHandle::push_step`] and [`ModelHandle::push_step_owned`].
    async fn push_step_gradients(
        &self,
        worker: &str,
        step: u64,
        gradients: Gradients<'_>,
    ) -> Result<StepOutcome, ClientError> {
        let mut rejoined = false;
        loop {
            match self.push_gradients(worker, step, gradients).await {
                Ok(summary) => return Ok(StepOutcome::Pushed(summary)),
                Err(error) if error.kind() == Some(errors::UNKNOWN_WORKER) && !rejoined => {
                    tracing::warn!(
                        worker,
                        step,
                        "no longer a member of '{}' (lease expired?); joining again",
                        self.name()
                    );
                    self.join(worker).await?;
                    rejoined = true;
                }
                Err(error) if error.kind() == Some(errors::STALE_STEP) => {
                    // join is idempotent for a member and reports where the model is now.
                    let version = self.join(worker).await?.version;
                    tracing::warn!(
                        worker,
                        step,
                        version,
                        "step {step} was applied without this worker; resuming at version {version}"
                    );
                    return Ok(StepOutcome::Resync { version });
                }
                Err(error) => match self.rolled_back(&error) {
                    Some(version) => return Ok(StepOutcome::RolledBack { version }),
                    None => return Err(error),
                },
            }
        }
    }

    /// Scales `grads` so that their L2 norm over all tensors is at most the
    /// model's `max_grad_norm` (when it is set); returns the norm before.
    /// Call it on the raw gradient, before any compression: the shards never
    /// hold a whole gradient, so this is where the global norm is known.
    pub fn clip_to_max_norm(&self, grads: &mut Tensors) -> f64 {
        let norm = grads.values().flatten().map(|g| f64::from(*g) * f64::from(*g)).sum::<f64>().sqrt();
        if self.layout.max_grad_norm > 0.0 && norm > self.layout.max_grad_norm {
            let scale = (self.layout.max_grad_norm / (norm + 1e-6)) as f32;
            grads.values_mut().flatten().for_each(|g| *g *= scale);
        }
        norm
    }

    /// Pulls every tensor once each block has at least `min_version` updates
    /// (waiting up to 60 s on the server).
    pub async fn pull(&self, min_version: u64) -> Result<Weights, ClientError> {
        self.pull_with_timeout(min_version, Duration::ZERO).await
    }

    /// As [`ModelHandle::pull`] with an explicit server-side wait limit (zero: the server's default).
    pub async fn pull_with_timeout(&self, min_version: u64, timeout: Duration) -> Result<Weights, ClientError> {
        let mut tensors = Tensors::new();
        let info = self.pull_part_into(&mut tensors, min_version, timeout, pb::WeightPart::Parameters).await?;
        Ok(Weights { version: info.version, tensors, bytes: info.bytes, checkpoint: info.checkpoint })
    }

    /// Pulls into `tensors`, reusing its buffers (a training loop avoids
    /// allocating the model's size every step). Tensors missing from the map
    /// are added; returns the lowest block version and the payload bytes.
    /// Chunks are decoded as they arrive, so after an error the tensors may
    /// hold part of the newer values: pull again before using them.
    pub async fn pull_into(
        &self,
        tensors: &mut Tensors,
        min_version: u64,
        timeout: Duration,
    ) -> Result<(u64, u64), ClientError> {
        let info = self.pull_part_into(tensors, min_version, timeout, pb::WeightPart::Parameters).await?;
        Ok((info.version, info.bytes))
    }

    pub(crate) async fn pull_part_into(
        &self,
        tensors: &mut Tensors,
        min_version: u64,
        timeout: Duration,
        part: pb::WeightPart,
    ) -> Result<PullInfo, ClientError> {
        let request = pb::PullWeightsRequest {
            model: self.name().to_string(),
            min_version,
            tensors: Vec::new(),
            timeout_ms: timeout.as_millis() as u64,
            encoding: self.pull_encoding.to_wire() as i32,
            part: part as i32,
            epoch: self.epoch(),
        };
        // Segments hold f32 parameters; other pulls take gRPC (over the local socket where there is one).
        let segments_serve = part == pb::WeightPart::Parameters && self.pull_encoding.to_wire() == pb::Encoding::F32;
        for info in self.tensors.iter() {
            tensors.entry(info.name.clone()).or_default().resize(info.len, 0.0);
        }
        // Every shard writes its own blocks' slices as its chunks arrive, so
        // decoding overlaps receiving and no received chunk is kept.
        let mut slices = self.slices_by_shard(tensors);
        let reads = try_join_all(self.shards_with_blocks().into_iter().map(|shard| {
            let slices = std::mem::take(&mut slices[shard]);
            let request = &request;
            async move { self.pull_shard(shard, request, slices, segments_serve).await }
        }))
        .await?;
        let mut read = PullInfo { version: u64::MAX, bytes: 0, checkpoint: false };
        let mut received: HashMap<(usize, u32), u64> = HashMap::new();
        for shard in reads {
            read.version = read.version.min(shard.version);
            read.bytes += shard.bytes;
            read.checkpoint |= shard.checkpoint;
            received.extend(shard.received);
        }
        for (at, info) in self.tensors.iter().enumerate() {
            for block in &info.blocks {
                if received.get(&(at, block.block)).copied().unwrap_or(0) != block.length {
                    return Err(ProtocolError::IncompleteBlock { tensor: info.name.clone(), block: block.block }.into());
                }
            }
        }
        if read.version == u64::MAX {
            read.version = 0;
        }
        Ok(read)
    }

    /// The caller's tensors (sized to the layout) cut into one slice per
    /// block, grouped by the shard that serves the block.
    fn slices_by_shard<'t>(&self, tensors: &'t mut Tensors) -> Vec<BlockSlices<'t>> {
        let mut by_shard: Vec<BlockSlices<'t>> = (0..self.client.num_shards()).map(|_| HashMap::new()).collect();
        for (name, values) in tensors.iter_mut() {
            let Some(&at) = self.index.get(name) else { continue };
            // The blocks tile the tensor in order on listed shards (`Layout::tensor_infos` checked it).
            let mut rest: &'t mut [f32] = values.as_mut_slice();
            for block in &self.tensors[at].blocks {
                let (mine, tail) = std::mem::take(&mut rest).split_at_mut(block.length as usize);
                rest = tail;
                by_shard[block.shard as usize].insert((at, block.block), mine);
            }
        }
        by_shard
    }

    /// Reads one shard's blocks: from its weights segment when it is on this
    /// host and serves f32, otherwise (or when the local channel fails) over gRPC.
    async fn pull_shard(
        &self,
        shard: usize,
        request: &pb::PullWeightsRequest,
        mut slices: BlockSlices<'_>,
        segments_serve: bool,
    ) -> Result<ShardRead, ClientError> {
        if segments_serve && let Some(local) = self.client.local_shard(shard).await.filter(|l| l.segments) {
            match self.pull_local_reply(shard, request).await {
                Ok(reply) => return self.read_local_shard(shard, &local, reply, request, &mut slices).await,
                // No room for the weights segment (--memory-limit): a gRPC pull needs none.
                Err(ClientError::Rpc { status, .. }) if status.code() == Code::ResourceExhausted => {
                    self.client.leave_local(shard, status.message());
                }
                Err(error) => return Err(error),
            }
        }
        self.pull_chunks_into(shard, request, &mut slices).await
    }

    /// Copies the blocks a local pull reply names out of the shard's weights
    /// segment; asks again when they were rewritten while read, and falls
    /// back to gRPC when the segment cannot be read.
    async fn read_local_shard(
        &self,
        shard: usize,
        local: &Arc<LocalShard>,
        mut reply: pb::LocalPullResponse,
        request: &pb::PullWeightsRequest,
        slices: &mut BlockSlices<'_>,
    ) -> Result<ShardRead, ClientError> {
        let mut attempts = 0;
        loop {
            let outcome = match self.weights_file(shard, local, &reply.segment).await {
                Ok(file) => self.read_local(&file, &reply, slices),
                Err(failure) => Err(failure),
            };
            match outcome {
                Ok(true) => {
                    let mut read = ShardRead { checkpoint: reply.checkpoint, ..ShardRead::default() };
                    for block in &reply.blocks {
                        read.version = read.version.min(block.version);
                        read.bytes += block.length * 4;
                        let at = self.index[&block.tensor];
                        *read.received.entry((at, block.block)).or_default() += block.length;
                    }
                    return Ok(read);
                }
                // Rewritten while read (a reader this slow is rare): ask again, then give up on it.
                Ok(false) if attempts < LOCAL_READ_ATTEMPTS => {
                    attempts += 1;
                    reply = self.pull_local_reply(shard, request).await?;
                }
                outcome => {
                    if let Err(LocalFailure::Channel(why)) = &outcome {
                        self.client.leave_local(shard, why);
                    }
                    if let Err(LocalFailure::Server(error)) = outcome {
                        return Err(error);
                    }
                    return self.pull_chunks_into(shard, request, slices).await;
                }
            }
        }
    }

    /// Streams one shard's blocks over gRPC, decoding each chunk into its
    /// block's slice as it arrives. A retried stream starts its count over.
    async fn pull_chunks_into(
        &self,
        shard: usize,
        request: &pb::PullWeightsRequest,
        slices: &mut BlockSlices<'_>,
    ) -> Result<ShardRead, ClientError> {
        // Each attempt of the retry borrows the slices in turn; the closure
        // that makes the attempts can only lend them through a lock.
        let slices = &tokio::sync::Mutex::new(slices);
        self.client
            .retry(shard, move |mut stub| {
                let request = request.clone();
                async move {
                    let mut slices = slices.lock().await;
                    let mut read = ShardRead::default();
                    let mut stream = stub.pull_weights_by_hand(&request).await?;
                    while let Some(chunk) = stream.message::<pb::WeightChunk>().await? {
                        if let Err(error) = self.decode_chunk(chunk, &mut slices, &mut read) {
                            return Ok(Err(error));
                        }
                    }
                    Ok(Ok(read))
                }
            })
            .await?
    }

    async fn pull_local_reply(
        &self,
        shard: usize,
        request: &pb::PullWeightsRequest,
    ) -> Result<pb::LocalPullResponse, ClientError> {
        let local = pb::LocalPullRequest {
            model: request.model.clone(),
            min_version: request.min_version,
            timeout_ms: request.timeout_ms,
            epoch: request.epoch,
        };
        self.client
            .retry(shard, move |mut stub| {
                let local = local.clone();
                async move { stub.pull_local(local).await.map(|r| r.into_inner()) }
            })
            .await
    }

    /// The model's weights segment on `shard`, as the reply names it: cached,
    /// or asked for on the segment socket (off the reactor: it waits for the shard).
    async fn weights_file(
        &self,
        shard: usize,
        local: &Arc<LocalShard>,
        segment: &str,
    ) -> Result<Arc<WeightsFile>, LocalFailure> {
        let cached = || self.weights_files[shard].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(file) = cached().as_ref().filter(|file| file.id == segment) {
            return Ok(file.clone());
        }
        let (asking, model) = (local.clone(), self.name().to_string());
        let opened = tokio::task::spawn_blocking(move || asking.open_weights(&model))
            .await
            .map_err(|e| LocalFailure::Channel(e.to_string()))?
            .map_err(|e| LocalFailure::Channel(e.to_string()))?;
        if opened.id != segment {
            return Err(LocalFailure::Channel(format!(
                "the shard published segment {segment} but opened {}",
                opened.id
            )));
        }
        let opened = Arc::new(opened);
        *cached() = Some(opened.clone());
        Ok(opened)
    }

    /// Reads a shard's published blocks straight into their slices; false when
    /// the shard rewrote the slot meanwhile (the values read are then torn).
    fn read_local(
        &self,
        file: &WeightsFile,
        reply: &pb::LocalPullResponse,
        slices: &mut BlockSlices<'_>,
    ) -> Result<bool, LocalFailure> {
        for published in &reply.blocks {
            let Some(&at) = self.index.get(&published.tensor) else {
                return Err(LocalFailure::Server(ClientError::UnknownTensor(published.tensor.clone())));
            };
            // Only this shard's blocks have a slice here.
            let out = slices.get_mut(&(at, published.block)).filter(|out| out.len() as u64 == published.length);
            let Some(out) = out else {
                let error = ProtocolError::UnknownBlock { tensor: published.tensor.clone(), block: published.block };
                return Err(LocalFailure::Server(error.into()));
            };
            ps_proto::local::read_f32s(&file.file, published.offset, out)
                .map_err(|e| LocalFailure::Channel(format!("reading the weights segment: {e}")))?;
        }
        // The values were read before the sequence number is: a rewrite that
        // overlapped them has moved it by then.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let sequence = ps_proto::local::read_sequence(&file.file, reply.slot)
            .map_err(|e| LocalFailure::Channel(format!("reading the weights segment: {e}")))?;
        Ok(sequence == reply.sequence)
    }

    /// Checks one received chunk against the layout and decodes it into its block's slice.
    fn decode_chunk(
        &self,
        chunk: pb::WeightChunk,
        slices: &mut BlockSlices<'_>,
        read: &mut ShardRead,
    ) -> Result<(), ClientError> {
        read.version = read.version.min(chunk.version);
        read.checkpoint |= chunk.checkpoint;
        let data = chunk.chunk.ok_or(ProtocolError::MissingChunk)?;
        read.bytes += data.payload.len() as u64;
        let at = *self.index.get(&data.tensor).ok_or_else(|| ClientError::UnknownTensor(data.tensor.clone()))?;
        let Some(out) = slices.get_mut(&(at, data.block)) else {
            return Err(ProtocolError::UnknownBlock { tensor: data.tensor, block: data.block }.into());
        };
        let end = data.offset.saturating_add(data.length);
        if end > out.len() as u64 {
            return Err(ProtocolError::PastEnd { tensor: data.tensor, block: data.block }.into());
        }
        let encoding = codec::encoding_from_i32(data.encoding).map_err(ProtocolError::from)?;
        codec::decode_into(encoding, &data.payload, data.scale, &mut out[data.offset as usize..end as usize])
            .map_err(ProtocolError::from)?;
        *read.received.entry((at, data.block)).or_default() += data.length;
        Ok(())
    }
}

/// Chunks one local push request names at most (its message stays far below the 5 MiB limit).
const MAX_LOCAL_CHUNKS: usize = 16_384;
/// Times a pull asks a shard again when its slot was rewritten during the read.
const LOCAL_READ_ATTEMPTS: u32 = 3;

/// One push as every shard's part of it sees it.
struct PushRequest<'a> {
    worker: &'a str,
    step: u64,
    gradients: Gradients<'a>,
    /// Per tensor: the sign1 scale (mean absolute value), else 0.
    scales: &'a [f32],
}

/// A push's gradients: lent by the caller (copied into each message), or
/// handed over (f32 tensors then go out from where they lie).
#[derive(Clone, Copy)]
enum Gradients<'a> {
    Lent(&'a Tensors),
    Owned(&'a Arc<Tensors>),
}

impl<'a> Gradients<'a> {
    fn tensors(self) -> &'a Tensors {
        match self {
            Gradients::Lent(tensors) => tensors,
            Gradients::Owned(tensors) => tensors,
        }
    }
}

/// One block of a push's own gradients as bytes, alive as long as a frame that sends them.
struct PushedValues {
    grads: Arc<Tensors>,
    tensor: String,
    range: std::ops::Range<usize>,
}

impl AsRef<[u8]> for PushedValues {
    fn as_ref(&self) -> &[u8] {
        // The push checked every tensor's name and length before it framed any.
        let values = self.grads.get(&self.tensor).and_then(|values| values.get(self.range.clone()));
        bytemuck::cast_slice(values.unwrap_or_default())
    }
}

/// Why the local channel could not finish a request.
enum LocalFailure {
    /// The channel itself failed (socket, segment): TCP will do.
    Channel(String),
    /// The shard refused the request; over TCP it would too.
    Server(ClientError),
}

/// The caller's tensors as one slice per block (tensor index, block), for one shard's blocks.
type BlockSlices<'t> = HashMap<(usize, u32), &'t mut [f32]>;

/// What one shard's part of a pull read.
struct ShardRead {
    /// Lowest version among its blocks.
    version: u64,
    /// Payload bytes.
    bytes: u64,
    /// Whether it marked the version as checkpointed.
    checkpoint: bool,
    /// Elements received per (tensor index, block).
    received: HashMap<(usize, u32), u64>,
}

impl Default for ShardRead {
    fn default() -> Self {
        Self { version: u64::MAX, bytes: 0, checkpoint: false, received: HashMap::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClientConfig;

    fn handle(max_grad_norm: f64) -> ModelHandle {
        let client = PsClient::connect(ClientConfig::new(vec!["127.0.0.1:1".into()])).unwrap();
        let layout = pb::Layout {
            model: "m".into(),
            shards: vec!["127.0.0.1:1".into()],
            tensors: vec![pb::TensorLayout { name: "w".into(), shape: vec![2], group: "g".into() }],
            max_grad_norm,
            ..Default::default()
        };
        ModelHandle::new(client, layout.try_into().unwrap()).unwrap()
    }

    #[tokio::test]
    async fn clipping_scales_the_whole_gradient_to_the_model_norm() {
        let mut grads: Tensors = [("w".to_string(), vec![3.0f32, 4.0])].into_iter().collect();
        assert_eq!(handle(1.0).clip_to_max_norm(&mut grads), 5.0);
        assert!((grads["w"][0] - 0.6).abs() < 1e-6 && (grads["w"][1] - 0.8).abs() < 1e-6);
        let mut small: Tensors = [("w".to_string(), vec![0.3f32, 0.4])].into_iter().collect();
        handle(1.0).clip_to_max_norm(&mut small);
        assert_eq!(small["w"], vec![0.3, 0.4], "a gradient under the limit is left alone");
        let mut unlimited: Tensors = [("w".to_string(), vec![30.0f32, 40.0])].into_iter().collect();
        handle(0.0).clip_to_max_norm(&mut unlimited);
        assert_eq!(unlimited["w"], vec![30.0, 40.0]);
    }

    fn placement(tensor: &str, block: u32, shard: u32, row_start: u64, rows: u64, cols: u64) -> pb::BlockPlacement {
        pb::BlockPlacement {
            tensor: tensor.into(),
            block,
            shard,
            row_start,
            rows,
            offset: row_start * cols,
            length: rows * cols,
        }
    }

    #[tokio::test]
    async fn a_pull_cuts_the_tensors_into_one_slice_per_block_of_each_shard() {
        let shards = vec!["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        let client = PsClient::connect(ClientConfig::new(shards.clone())).unwrap();
        let layout = pb::Layout {
            model: "m".into(),
            shards,
            tensors: vec![
                pb::TensorLayout { name: "a".into(), shape: vec![4, 3], group: "g".into() },
                pb::TensorLayout { name: "b".into(), shape: vec![2], group: "g".into() },
            ],
            blocks: vec![placement("a", 0, 0, 0, 2, 3), placement("a", 1, 1, 2, 2, 3), placement("b", 0, 1, 0, 1, 2)],
            ..Default::default()
        };
        let model = ModelHandle::new(client, layout.try_into().unwrap()).unwrap();
        let mut tensors: Tensors =
            [("a".to_string(), vec![0.0; 12]), ("b".to_string(), vec![0.0; 2]), ("extra".to_string(), vec![7.0])]
                .into_iter()
                .collect();
        let mut slices = model.slices_by_shard(&mut tensors);
        let lengths = |shard: &BlockSlices<'_>| {
            let mut l: Vec<_> = shard.iter().map(|(key, slice)| (*key, slice.len())).collect();
            l.sort();
            l
        };
        assert_eq!(lengths(&slices[0]), vec![((0, 0), 6)]);
        assert_eq!(lengths(&slices[1]), vec![((0, 1), 6), ((1, 0), 2)]);
        for (shard, blocks) in slices.iter_mut().enumerate() {
            for ((tensor, block), slice) in blocks.iter_mut() {
                slice.fill((100 * shard + 10 * tensor + *block as usize) as f32);
            }
        }
        drop(slices);
        assert_eq!(tensors["a"], [0.0; 6].into_iter().chain([101.0; 6]).collect::<Vec<f32>>());
        assert_eq!(tensors["b"], vec![110.0, 110.0]);
        assert_eq!(tensors["extra"], vec![7.0], "a tensor the model does not have is left alone");
    }
}

/// The blocks of one push stream (with their tensor's index) and their payload bytes.
#[derive(Default)]
struct PushStream<'a> {
    blocks: Vec<(usize, &'a crate::layout::BlockPlan)>,
    bytes: u64,
}

/// Encoded chunks a push stream keeps ready ahead of the one being sent.
const PUSH_CHUNKS_AHEAD: usize = 2;
