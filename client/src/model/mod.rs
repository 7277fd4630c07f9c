//! A registered model as a worker uses it, one concern per file: membership
//! with leases (`membership`), pushes routed block by block to their shards
//! (`push`), pulls into reusable buffers (`pull`), and the local channel's
//! shared-memory path for both (`local`). This file holds the handle and the
//! values its calls return.

mod local;
mod membership;
mod pull;
mod push;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::join_all;
use ps_proto::layout::BlockPlan;
use ps_proto::pb;
use tonic::Status;

use crate::Tensors;
use crate::config::ClientConfig;
use crate::error::ClientError;
use crate::layout::{Layout, TensorInfo};
use crate::local::{PushSegment, WeightsFile};
use crate::shards::Shards;
use crate::spec::Encoding;
use crate::stub::ShardStub;

/// Checks that `data` has the `expected` elements of `tensor`.
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
    /// Highest block version among the blocks read: equal to `version` when
    /// every block was read at one version (a pull returns blocks that moved
    /// past the version asked for as they are now).
    pub newest: u64,
    /// The tensors.
    pub tensors: Tensors,
    /// Payload bytes received.
    pub bytes: u64,
    /// The servers checkpoint this version: a worker with state of its own
    /// (error-feedback residual, data position) saves it now, before computing
    /// the step at this version, to restore it if the model is rolled back here.
    pub checkpoint: bool,
    /// Steps skipped because a worker's gradient overflowed
    /// (`ENCODING_OVERFLOW`), up to the newest block read: grown since the
    /// previous pull means the steps pushed in between were skipped.
    pub overflow_steps: u64,
}

impl Weights {
    /// The tensors a pull filled, with what it read.
    pub(crate) fn read(tensors: Tensors, info: PullInfo) -> Self {
        Self {
            version: info.version,
            newest: info.newest,
            tensors,
            bytes: info.bytes,
            checkpoint: info.checkpoint,
            overflow_steps: info.overflow_steps,
        }
    }
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
    /// Highest block version among the blocks read.
    pub newest: u64,
    /// Payload bytes received.
    pub bytes: u64,
    /// Whether a shard marked the version as checkpointed.
    pub checkpoint: bool,
    /// The most steps skipped for an overflow that a block read reported.
    pub overflow_steps: u64,
}

/// A registered model: its layout and the operations of a worker on it.
#[derive(Clone)]
pub struct ModelHandle {
    shards: Shards,
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
    pub(crate) fn new(shards: Shards, layout: Layout) -> Result<Self, ClientError> {
        if layout.shards.len() != shards.num_shards() {
            return Err(ClientError::ShardCountMismatch { servers: layout.shards, client: shards.num_shards() });
        }
        let tensors = layout.tensor_infos()?;
        let index: HashMap<String, usize> = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        let count = shards.num_shards();
        Ok(Self {
            shards,
            tensors: Arc::new(tensors),
            index: Arc::new(index),
            pull_encoding: Encoding::F32,
            ranks: Arc::default(),
            epoch: Arc::new(AtomicU64::new(layout.epoch)),
            push_segments: Arc::new((0..count).map(|_| Default::default()).collect()),
            weights_files: Arc::new((0..count).map(|_| Default::default()).collect()),
            layout: Arc::new(layout),
        })
    }

    /// Opens the registered model `name` on `shards` (its layout from shard 0).
    pub(crate) async fn open(shards: Shards, name: &str) -> Result<Self, ClientError> {
        let request = pb::GetLayoutRequest { model: name.to_string() };
        let layout = shards.retry(0, |mut stub| {
            let request = request.clone();
            async move { stub.get_layout(request).await.map(|r| r.into_inner()) }
        });
        Self::new(shards.clone(), layout.await?.try_into()?)
    }

    /// After a layout-changed error (an online reshard changed the shard
    /// list): the same model on the new list, with this handle's settings and
    /// the ranks it knows; None for any other error. The workers this handle
    /// joined are members there already (the shards carry them over), so the
    /// caller retries what failed with the new handle and heart-beats through it.
    pub async fn follow_new_layout(&self, error: &ClientError) -> Result<Option<Self>, ClientError> {
        let Some(list) = error.new_shard_list() else { return Ok(None) };
        let shards = Shards::connect(ClientConfig { shards: list, ..self.shards.config().clone() })?;
        let mut next = Self::open(shards, self.name()).await?.with_pull_encoding(self.pull_encoding);
        next.ranks = Arc::new(Mutex::new(self.ranks.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()));
        next.epoch.fetch_max(self.epoch(), Ordering::AcqRel);
        tracing::info!(
            model = self.name(),
            from = self.shards.num_shards(),
            to = next.shards.num_shards(),
            "the shard list changed (online reshard); continuing on the new one"
        );
        Ok(Some(next))
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

    /// As [`ModelHandle::rolled_back`], for a member `worker`: the version to
    /// continue from is the lowest over the shards now (joining again reports
    /// it and renews the membership). Right after the rollback that is the
    /// checkpoint's version; a worker that was away while the run went on
    /// resumes where the run is, never past a shard whose step now waits for it.
    pub async fn resume_after_rollback(&self, worker: &str, error: &ClientError) -> Result<Option<u64>, ClientError> {
        let Some(reported) = self.rolled_back(error) else { return Ok(None) };
        let lowest = self.join(worker).await?.version;
        Ok(Some(reported.min(lowest)))
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

    /// The connections this model was opened with.
    pub fn shards(&self) -> &Shards {
        &self.shards
    }

    /// Runs `call` on every shard (each with the client's retries) to its end,
    /// even where another shard failed: a call that changes membership must
    /// reach every shard it can. Returns the first error, if any.
    pub(super) async fn on_every_shard<T, F, Fut>(&self, call: F) -> Result<Vec<T>, ClientError>
    where
        F: Fn(ShardStub) -> Fut + Clone,
        Fut: Future<Output = Result<T, Status>>,
    {
        join_all((0..self.shards.num_shards()).map(|shard| self.shards.retry(shard, call.clone())))
            .await
            .into_iter()
            .collect()
    }

    /// The shards that hold blocks of this model.
    pub(super) fn shards_with_blocks(&self) -> Vec<usize> {
        (0..self.shards.num_shards()).filter(|&s| self.layout.blocks.iter().any(|b| b.shard as usize == s)).collect()
    }

    /// This shard's blocks of every tensor, with the tensor's index.
    pub(super) fn blocks_on(&self, shard: usize) -> impl Iterator<Item = (usize, &BlockPlan)> {
        self.tensors
            .iter()
            .enumerate()
            .flat_map(move |(at, t)| t.blocks.iter().filter(move |b| b.shard as usize == shard).map(move |b| (at, b)))
    }
}

/// One push as every shard's part of it sees it.
pub(super) struct PushRequest<'a> {
    pub(super) worker: &'a str,
    pub(super) step: u64,
    pub(super) gradients: Gradients<'a>,
    /// Per tensor: the sign1 scale (mean absolute value), else 0.
    pub(super) scales: &'a [f32],
    /// Tensors pushed as "no gradient" (`ENCODING_NO_GRADIENT`), absent from `gradients`.
    pub(super) no_gradient: &'a BTreeSet<String>,
    /// The worker's gradient overflowed: every block goes as `ENCODING_OVERFLOW`.
    pub(super) overflow: bool,
    /// The step's learning-rate scale (`GradientChunk.lr_scale`), if set.
    pub(super) lr_scale: Option<f64>,
}

/// What a push may say beyond its gradients.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PushOptions {
    /// Tensors with no gradient this step (a frozen parameter, or one the step
    /// did not use), pushed as `ENCODING_NO_GRADIENT` and absent from the
    /// gradients: the step's mean counts them as zeros, and a block no worker
    /// of the step had a gradient for keeps its weights and optimizer state.
    pub no_gradient: BTreeSet<String>,
    /// Multiplies the learning rate of this step's update (the group's lr and
    /// schedule factor), as a torch lr_scheduler sets the lr; `None` is 1.
    /// Every worker of a sync step must push the same scale.
    pub lr_scale: Option<f64>,
    /// The worker found inf or NaN in its gradient of this step (a loss scale
    /// that overflowed): every block goes as `ENCODING_OVERFLOW`, the
    /// gradients are not read, and the shards skip the step for every worker.
    pub overflow: bool,
}

impl PushRequest<'_> {
    /// How `tensor` goes on the wire in this push: its group's encoding, or none at all.
    pub(super) fn encoding(&self, tensor: &TensorInfo) -> Encoding {
        if self.overflow {
            Encoding::Overflow
        } else if self.no_gradient.contains(&tensor.name) {
            Encoding::NoGradient
        } else {
            tensor.encoding
        }
    }
}

/// A push's gradients: lent by the caller (copied into each message), or
/// handed over (f32 tensors then go out from where they lie).
#[derive(Clone, Copy)]
pub(super) enum Gradients<'a> {
    Lent(&'a Tensors),
    Owned(&'a Arc<Tensors>),
}

impl<'a> Gradients<'a> {
    pub(super) fn tensors(self) -> &'a Tensors {
        match self {
            Gradients::Lent(tensors) => tensors,
            Gradients::Owned(tensors) => tensors,
        }
    }
}

/// Why the local channel could not finish a request.
pub(super) enum LocalFailure {
    /// The channel itself failed (socket, segment): TCP will do.
    Channel(String),
    /// The shard refused the request; over TCP it would too.
    Server(ClientError),
}

/// The caller's tensors as one slice per block (tensor index, block), for one shard's blocks.
pub(super) type BlockSlices<'t> = HashMap<(usize, u32), &'t mut [f32]>;

/// What one shard's part of a pull read.
pub(super) struct ShardRead {
    /// Lowest version among its blocks.
    pub(super) version: u64,
    /// Highest version among its blocks.
    pub(super) newest: u64,
    /// Payload bytes.
    pub(super) bytes: u64,
    /// Whether it marked the version as checkpointed.
    pub(super) checkpoint: bool,
    /// The most steps skipped for an overflow among its blocks.
    pub(super) overflow_steps: u64,
    /// Elements received per (tensor index, block).
    pub(super) received: HashMap<(usize, u32), u64>,
}

impl Default for ShardRead {
    fn default() -> Self {
        Self { version: u64::MAX, newest: 0, bytes: 0, checkpoint: false, overflow_steps: 0, received: HashMap::new() }
    }
}
