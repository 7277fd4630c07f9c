//! Client library of the parameter server. It routes every block to the shard
//! that owns it, streams pushes and pulls in chunks over all shards at once,
//! and retries transient failures; pushes are idempotent on the server
//! (keyed by worker, step and block), so a retry never counts twice.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ps_client::ClientError> {
//! use ps_client::{ClientConfig, PsClient};
//! let client = PsClient::connect(ClientConfig::new(vec!["127.0.0.1:50051".into()]))?;
//! let model = client.model("mlp").await?;
//! model.join("worker-0").await?;
//! let weights = model.pull(0).await?;
//! // ... compute gradients with the same names and lengths as weights.tensors ...
//! model.push("worker-0", 0, &weights.tensors).await?;
//! # Ok(()) }
//! ```

pub mod compress;
mod error;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::try_join_all;
use ps_proto::codec;
use ps_proto::pb::{self, Encoding};
use ps_proto::transport::{
    CHUNK_BYTES, CONNECTION_WINDOW_BYTES, MAX_FRAME_BYTES, MAX_MESSAGE_BYTES, STREAM_WINDOW_BYTES,
};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

pub use error::ClientError;
pub use ps_proto::pb as proto;

/// Named f32 tensors, flat in row-major order.
pub type Tensors = BTreeMap<String, Vec<f32>>;

/// How to reach the shards.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Shard addresses (`host:port`), in shard-index order.
    pub shards: Vec<String>,
    /// Bearer token sent with every RPC.
    pub auth_token: Option<String>,
    /// Attempts per RPC on transient failures (unavailable, reset connection).
    pub attempts: u32,
    /// Delay before the first retry; doubles each time.
    pub retry_backoff: Duration,
}

impl ClientConfig {
    /// Defaults: no token, 5 attempts starting at 100 ms backoff.
    pub fn new(shards: Vec<String>) -> Self {
        Self { shards, auth_token: None, attempts: 5, retry_backoff: Duration::from_millis(100) }
    }
}

#[derive(Clone)]
struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type ShardStub = pb::parameter_server_client::ParameterServerClient<InterceptedService<Channel, BearerToken>>;

/// A connection to every shard of a cluster.
#[derive(Clone)]
pub struct PsClient {
    shards: Arc<Vec<ShardStub>>,
    config: Arc<ClientConfig>,
}

fn transient(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled)
}

impl PsClient {
    /// Sets up (lazy) connections to every shard; nothing is sent yet.
    pub fn connect(config: ClientConfig) -> Result<Self, ClientError> {
        if config.shards.is_empty() {
            return Err(ClientError::Config("at least one shard address is needed".into()));
        }
        let token = match &config.auth_token {
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse()
                    .map_err(|_| ClientError::Config("the auth token must be printable ASCII".into()))?,
            ),
            None => None,
        };
        let shards = config
            .shards
            .iter()
            .map(|addr| {
                let uri = if addr.contains("://") { addr.clone() } else { format!("http://{addr}") };
                let channel = Endpoint::from_shared(uri)
                    .map_err(|e| ClientError::Config(format!("bad shard address '{addr}': {e}")))?
                    .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
                    .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
                    .max_frame_size(Some(MAX_FRAME_BYTES))
                    .tcp_nodelay(true)
                    .connect_timeout(Duration::from_secs(5))
                    .connect_lazy();
                Ok(pb::parameter_server_client::ParameterServerClient::with_interceptor(
                    channel,
                    BearerToken(token.clone()),
                )
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES))
            })
            .collect::<Result<Vec<_>, ClientError>>()?;
        Ok(Self { shards: Arc::new(shards), config: Arc::new(config) })
    }

    /// Number of shards.
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    fn stub(&self, shard: usize) -> ShardStub {
        self.shards[shard].clone()
    }

    /// Runs `call` against one shard, retrying transient failures with backoff.
    async fn retry<T, F, Fut>(&self, shard: usize, mut call: F) -> Result<T, ClientError>
    where
        F: FnMut(ShardStub) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut delay = self.config.retry_backoff;
        let mut attempt = 1;
        loop {
            match call(self.stub(shard)).await {
                Ok(value) => return Ok(value),
                Err(status) if transient(&status) && attempt < self.config.attempts => {
                    tracing::debug!(shard, attempt, code = ?status.code(), "retrying: {}", status.message());
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                Err(status) => return Err(ClientError::Rpc { shard, status }),
            }
        }
    }

    /// Waits until every shard answers, for at most `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        for shard in 0..self.shards.len() {
            loop {
                match self.stub(shard).get_status(pb::GetStatusRequest::default()).await {
                    Ok(_) => break,
                    Err(status) if transient(&status) && tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(status) => return Err(ClientError::Rpc { shard, status }),
                }
            }
        }
        Ok(())
    }

    /// Registers a model on every shard. `values` must hold the initial values
    /// of every tensor whose init rule is PROVIDED. Registering an identical
    /// spec again succeeds and returns the existing model.
    pub async fn register(&self, spec: pb::ModelSpec, values: &Tensors) -> Result<ModelHandle, ClientError> {
        let shapes: Vec<&[u64]> = spec.tensors.iter().map(|t| t.shape.as_slice()).collect();
        let limits = ps_proto::layout::block_limits(&spec);
        let plan = ps_proto::layout::plan(&shapes, &limits, self.shards.len() as u32);
        let mut provided: HashMap<usize, &[f32]> = HashMap::new();
        for (index, tensor) in spec.tensors.iter().enumerate() {
            if tensor.init.as_ref().is_some_and(|i| i.kind == pb::InitKind::Provided as i32) {
                let data = values.get(&tensor.name).ok_or_else(|| ClientError::MissingTensor(tensor.name.clone()))?;
                check_len(&tensor.name, ps_proto::layout::num_elements(&tensor.shape), data)?;
                provided.insert(index, data);
            }
        }
        let calls = (0..self.shards.len()).map(|shard| {
            let mut messages =
                vec![pb::RegisterModelRequest { item: Some(pb::register_model_request::Item::Spec(spec.clone())) }];
            for block in plan.iter().filter(|b| b.shard as usize == shard) {
                if let Some(data) = provided.get(&block.tensor) {
                    let name = &spec.tensors[block.tensor].name;
                    for chunk in block_chunks(name, block.block, data, (block.offset, block.length), Encoding::F32, 0.0)
                    {
                        messages.push(pb::RegisterModelRequest {
                            item: Some(pb::register_model_request::Item::Values(chunk)),
                        });
                    }
                }
            }
            self.retry(shard, move |mut stub| {
                let messages = messages.clone();
                async move { stub.register_model(tokio_stream::iter(messages)).await.map(|r| r.into_inner()) }
            })
        });
        let replies = try_join_all(calls).await?;
        let layout = replies.into_iter().next().and_then(|r| r.layout).ok_or(ClientError::NoLayout)?;
        ModelHandle::new(self.clone(), layout)
    }

    /// Opens a registered model by name.
    pub async fn model(&self, name: &str) -> Result<ModelHandle, ClientError> {
        let request = pb::GetLayoutRequest { model: name.to_string() };
        let layout = self.retry(0, |mut stub| {
            let request = request.clone();
            async move { stub.get_layout(request).await.map(|r| r.into_inner()) }
        });
        ModelHandle::new(self.clone(), layout.await?)
    }

    /// Status of every shard, in shard order (`model` empty: all models).
    pub async fn status(&self, model: &str) -> Result<Vec<pb::GetStatusResponse>, ClientError> {
        let request = pb::GetStatusRequest { model: model.to_string() };
        try_join_all((0..self.shards.len()).map(|shard| {
            let request = request.clone();
            self.retry(shard, move |mut stub| {
                let request = request.clone();
                async move { stub.get_status(request).await.map(|r| r.into_inner()) }
            })
        }))
        .await
    }
}

fn check_len(tensor: &str, expected: u64, data: &[f32]) -> Result<(), ClientError> {
    if data.len() as u64 != expected {
        return Err(ClientError::WrongLength { tensor: tensor.to_string(), expected, actual: data.len() as u64 });
    }
    Ok(())
}

/// Encodes one block of a tensor as chunks of at most [`CHUNK_BYTES`]. Each
/// chunk is encoded on its own, so no buffer the size of the tensor is made.
fn block_chunks(
    tensor: &str,
    block: u32,
    data: &[f32],
    (offset, length): (u64, u64),
    encoding: Encoding,
    scale: f32,
) -> Vec<pb::TensorChunk> {
    let values = &data[offset as usize..(offset + length) as usize];
    // Whole elements per chunk; for sign1 a multiple of 32, as the format requires.
    let per_chunk = (CHUNK_BYTES as u64 * 8 / (codec::payload_len(encoding, 32) * 8 / 32)) as usize;
    values
        .chunks(per_chunk)
        .enumerate()
        .map(|(i, part)| pb::TensorChunk {
            tensor: tensor.to_string(),
            block,
            offset: (i * per_chunk) as u64,
            length: part.len() as u64,
            encoding: encoding as i32,
            payload: codec::encode(encoding, part),
            scale,
        })
        .collect()
}

/// One tensor of a model as the layout describes it.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<u64>,
    /// Elements.
    pub len: usize,
    /// Its blocks, in order.
    pub blocks: Vec<pb::BlockPlacement>,
    /// The encoding its pushes use (its group's preferred one).
    pub encoding: Encoding,
    /// How the servers combine the workers' pushes of this tensor.
    pub aggregation: pb::Aggregation,
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

/// A registered model: its layout and the operations of a worker on it.
#[derive(Clone)]
pub struct ModelHandle {
    client: PsClient,
    layout: Arc<pb::Layout>,
    tensors: Arc<Vec<TensorInfo>>,
    index: Arc<HashMap<String, usize>>,
    pull_encoding: Encoding,
}

impl std::fmt::Debug for ModelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelHandle").field("model", &self.layout.model).field("shards", &self.layout.shards).finish()
    }
}

impl ModelHandle {
    fn new(client: PsClient, layout: pb::Layout) -> Result<Self, ClientError> {
        if layout.shards.len() != client.num_shards() {
            return Err(ClientError::Config(format!(
                "the servers are configured with {} shards ({:?}) but this client was given {}",
                layout.shards.len(),
                layout.shards,
                client.num_shards()
            )));
        }
        let mut tensors: Vec<TensorInfo> = layout
            .tensors
            .iter()
            .map(|t| {
                let group = layout.groups.iter().find(|g| g.name == t.group);
                let encoding = group
                    .and_then(|g| g.push_encodings.first())
                    .map_or(Ok(Encoding::F32), |e| codec::encoding_from_i32(*e))
                    .map_err(|e| ClientError::Protocol(e.to_string()))?;
                Ok(TensorInfo {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    len: ps_proto::layout::num_elements(&t.shape) as usize,
                    blocks: Vec::new(),
                    encoding,
                    aggregation: group.map_or(pb::Aggregation::Mean, |g| g.aggregation()),
                })
            })
            .collect::<Result<_, ClientError>>()?;
        let index: HashMap<String, usize> = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        for block in &layout.blocks {
            let at = *index.get(&block.tensor).ok_or(ClientError::NoLayout)?;
            tensors[at].blocks.push(block.clone());
        }
        Ok(Self {
            client,
            layout: Arc::new(layout),
            tensors: Arc::new(tensors),
            index: Arc::new(index),
            pull_encoding: Encoding::F32,
        })
    }

    /// The same model, pulling weights in `encoding` (f32, bf16 or f16): half
    /// the bytes for workers that compute in half precision.
    pub fn with_pull_encoding(mut self, encoding: Encoding) -> Self {
        self.pull_encoding = encoding;
        self
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.layout.model
    }

    /// The layout as the servers reported it.
    pub fn layout(&self) -> &pb::Layout {
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

    /// Joins the worker on every shard; returns the version to start from and
    /// the rank shard 0 assigned.
    pub async fn join(&self, worker: &str) -> Result<Joined, ClientError> {
        let request = pb::JoinWorkerRequest { model: self.name().to_string(), worker_id: worker.to_string() };
        let replies = self
            .on_every_shard(|mut stub| {
                let request = request.clone();
                async move { stub.join_worker(request).await.map(|r| r.into_inner()) }
            })
            .await?;
        Ok(Joined {
            version: replies.iter().map(|r| r.version).min().unwrap_or(0),
            rank: replies.first().map_or(0, |r| r.rank),
        })
    }

    /// Renews the worker's lease on every shard; the worker rejoins where the lease had expired.
    pub async fn heartbeat(&self, worker: &str) -> Result<Duration, ClientError> {
        let request = pb::HeartbeatRequest { model: self.name().to_string(), worker_id: worker.to_string() };
        let mut lease = Duration::MAX;
        for shard in 0..self.client.num_shards() {
            let request = request.clone();
            let reply = self
                .client
                .retry(shard, move |mut stub| {
                    let request = request.clone();
                    async move { stub.heartbeat(request).await.map(|r| r.into_inner()) }
                })
                .await;
            match reply {
                Ok(reply) => lease = lease.min(Duration::from_millis(reply.lease_ms)),
                Err(ClientError::Rpc { status, .. }) if status.code() == Code::NotFound => {
                    tracing::warn!(worker, shard, "lease had expired; joining again");
                    let join = pb::JoinWorkerRequest { model: self.name().to_string(), worker_id: worker.to_string() };
                    let reply = self
                        .client
                        .retry(shard, move |mut stub| {
                            let join = join.clone();
                            async move { stub.join_worker(join).await.map(|r| r.into_inner()) }
                        })
                        .await?;
                    lease = lease.min(Duration::from_millis(reply.lease_ms));
                }
                Err(other) => return Err(other),
            }
        }
        Ok(lease)
    }

    /// Heart-beats in the background at a third of the lease until the handle is dropped or aborted.
    pub fn spawn_heartbeat(&self, worker: &str) -> tokio::task::JoinHandle<()> {
        let (model, worker) = (self.clone(), worker.to_string());
        tokio::spawn(async move {
            let mut period = Duration::from_secs(1);
            loop {
                match model.heartbeat(&worker).await {
                    Ok(lease) => period = (lease / 3).max(Duration::from_millis(10)),
                    Err(error) => tracing::warn!(worker, %error, "heartbeat failed"),
                }
                tokio::time::sleep(period).await;
            }
        })
    }

    /// Leaves the model on every shard, so no barrier waits for this worker.
    pub async fn leave(&self, worker: &str) -> Result<(), ClientError> {
        let request = pb::LeaveWorkerRequest { model: self.name().to_string(), worker_id: worker.to_string() };
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
        let mut per_shard: Vec<Vec<pb::GradientChunk>> = vec![Vec::new(); self.client.num_shards()];
        let mut bytes_total = 0u64;
        for name in grads.keys() {
            if !self.index.contains_key(name) {
                return Err(ClientError::UnknownTensor(name.clone()));
            }
        }
        for tensor in self.tensors.iter() {
            let data = grads.get(&tensor.name).ok_or_else(|| ClientError::MissingTensor(tensor.name.clone()))?;
            check_len(&tensor.name, tensor.len as u64, data)?;
            let scale = if tensor.encoding == Encoding::Sign1 { codec::mean_abs(data) } else { 0.0 };
            for block in &tensor.blocks {
                let range = (block.offset, block.length);
                for chunk in block_chunks(&tensor.name, block.block, data, range, tensor.encoding, scale) {
                    bytes_total += chunk.payload.len() as u64;
                    per_shard[block.shard as usize].push(pb::GradientChunk {
                        model: self.name().to_string(),
                        worker_id: worker.to_string(),
                        step,
                        chunk: Some(chunk),
                    });
                }
            }
        }
        let calls =
            per_shard.into_iter().enumerate().filter(|(_, chunks)| !chunks.is_empty()).map(|(shard, chunks)| {
                self.client.retry(shard, move |mut stub| {
                    let chunks = chunks.clone();
                    async move { stub.push_gradients(tokio_stream::iter(chunks)).await.map(|r| r.into_inner()) }
                })
            });
        let replies = try_join_all(calls).await?;
        Ok(replies.iter().fold(PushSummary { bytes: bytes_total, ..Default::default() }, |sum, r| PushSummary {
            accepted: sum.accepted + r.blocks_accepted,
            duplicate: sum.duplicate + r.blocks_duplicate,
            updated: sum.updated + r.blocks_updated,
            bytes: sum.bytes,
        }))
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
        let (version, bytes) = self.pull_into(&mut tensors, min_version, timeout).await?;
        Ok(Weights { version, tensors, bytes })
    }

    /// Pulls into `tensors`, reusing its buffers (a training loop avoids
    /// allocating the model's size every step). Tensors missing from the map
    /// are added; returns the lowest block version and the payload bytes.
    pub async fn pull_into(
        &self,
        tensors: &mut Tensors,
        min_version: u64,
        timeout: Duration,
    ) -> Result<(u64, u64), ClientError> {
        let request = pb::PullWeightsRequest {
            model: self.name().to_string(),
            min_version,
            tensors: Vec::new(),
            timeout_ms: timeout.as_millis() as u64,
            encoding: self.pull_encoding as i32,
        };
        let shards_with_blocks: Vec<usize> = (0..self.client.num_shards())
            .filter(|&s| self.layout.blocks.iter().any(|b| b.shard as usize == s))
            .collect();
        let parts = try_join_all(shards_with_blocks.into_iter().map(|shard| {
            let request = request.clone();
            self.client.retry(shard, move |mut stub| {
                let request = request.clone();
                async move {
                    let mut stream = stub.pull_weights(request).await?.into_inner();
                    let mut chunks = Vec::new();
                    while let Some(chunk) = stream.message().await? {
                        chunks.push(chunk);
                    }
                    Ok(chunks)
                }
            })
        }))
        .await?;
        for info in self.tensors.iter() {
            tensors.entry(info.name.clone()).or_default().resize(info.len, 0.0);
        }
        let mut received: HashMap<(usize, u32), u64> = HashMap::new();
        let mut version = u64::MAX;
        let mut bytes = 0u64;
        for chunk in parts.into_iter().flatten() {
            version = version.min(chunk.version);
            let data = chunk.chunk.ok_or(ClientError::Protocol("weight message without a chunk".into()))?;
            bytes += data.payload.len() as u64;
            let at = *self.index.get(&data.tensor).ok_or_else(|| ClientError::UnknownTensor(data.tensor.clone()))?;
            let info = &self.tensors[at];
            let block = info.blocks.get(data.block as usize).ok_or_else(|| {
                ClientError::Protocol(format!("tensor '{}' has no block {}", data.tensor, data.block))
            })?;
            let end = data.offset.saturating_add(data.length);
            if end > block.length {
                return Err(ClientError::Protocol(format!(
                    "chunk past the end of '{}' block {}",
                    data.tensor, data.block
                )));
            }
            let start = (block.offset + data.offset) as usize;
            let encoding = codec::encoding_from_i32(data.encoding).map_err(|e| ClientError::Protocol(e.to_string()))?;
            let out = &mut tensors.get_mut(&data.tensor).expect("tensor allocated above")
                [start..start + data.length as usize];
            codec::decode_into(encoding, &data.payload, data.scale, out)
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            *received.entry((at, data.block)).or_default() += data.length;
        }
        for (at, info) in self.tensors.iter().enumerate() {
            for block in &info.blocks {
                if received.get(&(at, block.block)).copied().unwrap_or(0) != block.length {
                    return Err(ClientError::Protocol(format!(
                        "pull returned incomplete block {} of '{}'",
                        block.block, info.name
                    )));
                }
            }
        }
        Ok((if version == u64::MAX { 0 } else { version }, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(max_grad_norm: f64) -> ModelHandle {
        let client = PsClient::connect(ClientConfig::new(vec!["127.0.0.1:1".into()])).unwrap();
        let layout = pb::Layout {
            model: "m".into(),
            shards: vec!["127.0.0.1:1".into()],
            tensors: vec![pb::TensorLayout { name: "w".into(), shape: vec![2], group: "g".into() }],
            max_grad_norm,
            ..Default::default()
        };
        ModelHandle::new(client, layout).unwrap()
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
}
