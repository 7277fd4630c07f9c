//! One registered model on one shard: the layout, this shard's blocks and
//! how to find them, the membership, registration-time values, and the numbers
//! the status RPC and the gauges report. Its other parts are children of this
//! folder: how pushes become updates (`barrier`), federated rounds
//! (`rounds`), and which versions are checkpointed and how blocks are copied
//! at them (`snapshot`).

mod barrier;
#[cfg(test)]
mod buffer_tests;
mod clip;
mod moving;
mod rounds;
mod snapshot;

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ps_proto::layout::{self, BlockPlan};
use rayon::prelude::*;

pub use self::barrier::PushOutcome;
pub use self::clip::NormPart;
pub use self::rounds::{BlockUpdate, Closing, RoundStats, Rounds};
pub use self::snapshot::{BlockSnapshot, CheckpointPlan, CheckpointSink, ModelSnapshot, WriteReport};
use super::block::Block;
use super::membership::Membership;
use crate::error::ServerError;
use crate::metrics as m;
use crate::optim::{self, Dims, SliceInfo};
use ps_proto::api::Init;

use crate::spec::{ModelSpec, fill_initial};

/// Why a worker was dropped from a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Its lease expired.
    LeaseExpired,
    /// It had not pushed a step by the step's deadline.
    MissedDeadline,
}

/// Per-group numbers for the status RPC.
#[derive(Debug, Clone, Default)]
pub struct GroupStats {
    /// Tensors in the group (all shards).
    pub tensors: u32,
    /// Parameters of the group on this shard.
    pub parameters: u64,
    /// Optimizer state bytes of the group on this shard.
    pub state_bytes: u64,
    /// Bytes of gradients of steps not yet applied, held by the group's blocks on this shard.
    pub pending_bytes: u64,
}

/// A new block of `b` with its optimizer, its weights initialized by the
/// tensor's rule (or left at zero, untouched, for one whose values will be
/// installed), and its federated state.
fn fresh_block(spec: &ModelSpec, b: &BlockPlan, initialize: bool) -> Block {
    let tensor = &spec.tensors[b.tensor];
    let group = &spec.groups[tensor.group];
    let mut params = vec![0.0; b.length as usize];
    if initialize {
        fill_initial(&tensor.init, &tensor.name, b.offset, &mut params);
    }
    let optimizer = optim::build(
        &group.optimizer,
        &SliceInfo {
            name: &tensor.name,
            dims: Dims { rows: b.rows as usize, cols: layout::row_length(&tensor.shape) as usize },
            matrix: tensor.shape.len() >= 2,
            projectable: tensor.projectable,
        },
    );
    let block = Block::new(b.tensor, b.block, tensor.group, params, optimizer);
    if let Some(rounds) = &spec.federated {
        block.lock().global = vec![0.0; rounds.global_state_len(b.length as usize)];
    }
    block
}

/// A registered model: the validated spec, the layout, this shard's blocks and the membership.
pub struct Model {
    /// The validated spec.
    pub spec: ModelSpec,
    /// Every block of the model, in tensor then block order.
    pub plan: Vec<BlockPlan>,
    /// Workers of this model.
    pub membership: Membership,
    pub(super) shard: u32,
    pub(super) num_shards: u32,
    /// The model's epoch: 1 at registration, one more after each rollback to a checkpoint.
    epoch: AtomicU64,
    /// Which versions are checkpointed, and the snapshots under way.
    pub checkpoints: Arc<CheckpointPlan>,
    /// Set while a restarted shard agrees with its peers on the version to continue from.
    recovering: AtomicBool,
    /// Set when a rollback replaced this copy of the model.
    retired: AtomicBool,
    /// Federated mode: the round state.
    pub(super) rounds: Option<Rounds>,
    tensor_index: HashMap<String, usize>,
    tensor_blocks: Vec<Range<usize>>,
    local: HashMap<(usize, u32), Arc<Block>>,
    pub(super) local_order: Vec<Arc<Block>>,
    /// Elements of the blocks on this shard.
    local_elements: u64,
    pub(super) pushes: AtomicU64,
    workers_expired: AtomicU64,
    pub(super) workers_dropped_late: AtomicU64,
    /// `GRAD_CLIP_MEAN`: the parts of the steps' norms heard so far.
    norms: parking_lot::Mutex<clip::NormExchange>,
    /// Where this shard's parts of the norms go to be sent to the peers (set by the registry).
    outbox: OnceLock<tokio::sync::mpsc::UnboundedSender<NormPart>>,
    /// The shards whose blocks take part in the norm, in index order.
    norm_shards: Vec<u32>,
    /// The local blocks that take part in the norm.
    norm_blocks: usize,
    /// Online reshard: the version the model is held at (no push of a later
    /// step is taken). Pushes hold it shared for their whole commit.
    hold: parking_lot::RwLock<Option<u64>>,
}

impl Model {
    /// Lays out the model and allocates and initializes this shard's blocks.
    pub fn new(spec: ModelSpec, shard: u32, num_shards: u32, lease: Duration) -> Self {
        let fresh = |spec: &ModelSpec, b: &BlockPlan| Ok(Arc::new(fresh_block(spec, b, true)));
        match Self::with_blocks(spec, shard, num_shards, lease, fresh) {
            Ok(model) => model,
            Err(never) => unreachable!("a fresh block cannot fail: {never}"),
        }
    }

    /// Lays out the model and takes each of this shard's blocks from `source`.
    pub(super) fn with_blocks(
        spec: ModelSpec,
        shard: u32,
        num_shards: u32,
        lease: Duration,
        source: impl Fn(&ModelSpec, &BlockPlan) -> Result<Arc<Block>, ServerError> + Sync,
    ) -> Result<Self, ServerError> {
        let plan = spec.plan(num_shards);
        let mut tensor_blocks = vec![0..0; spec.tensors.len()];
        for (i, block) in plan.iter().enumerate() {
            let range: &mut Range<usize> = &mut tensor_blocks[block.tensor];
            if range.end == 0 {
                range.start = i;
            }
            range.end = i + 1;
        }
        let local_plans: Vec<&BlockPlan> = plan.iter().filter(|b| b.shard == shard).collect();
        let local_order: Vec<Arc<Block>> =
            local_plans.par_iter().map(|b| source(&spec, b)).collect::<Result<_, ServerError>>()?;
        let local = local_order.iter().map(|b| ((b.tensor, b.index), b.clone())).collect();
        let tensor_index = spec.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        let cap = (spec.options.contract.max_workers > 0).then_some(spec.options.contract.max_workers as usize);
        let membership = Membership::new(lease, cap);
        let rounds = spec.federated.clone().map(|config| Rounds::new(config, shard));
        let norm_shards = clip::norm_shards(&spec, &plan);
        let norm_blocks = local_order.iter().filter(|b| spec.groups[b.group].clipped()).count();
        let model = Self {
            spec,
            plan,
            membership,
            shard,
            num_shards,
            epoch: AtomicU64::new(1),
            checkpoints: Arc::new(CheckpointPlan::new(0, None)),
            recovering: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            rounds,
            tensor_index,
            tensor_blocks,
            local,
            local_elements: local_order.iter().map(|b| b.len as u64).sum(),
            local_order,
            pushes: AtomicU64::new(0),
            workers_expired: AtomicU64::new(0),
            workers_dropped_late: AtomicU64::new(0),
            norms: parking_lot::Mutex::default(),
            outbox: OnceLock::new(),
            norm_shards,
            norm_blocks,
            hold: parking_lot::RwLock::new(None),
        };
        model.publish_gauges();
        Ok(model)
    }

    /// Sets the epoch and the checkpoint plan (before the model is shared).
    pub fn with_checkpoints(mut self, epoch: u64, checkpoints: Arc<CheckpointPlan>) -> Self {
        self.epoch = AtomicU64::new(epoch);
        self.checkpoints = checkpoints;
        self
    }

    /// Gives the model the channel its parts of the steps' norms leave through (once).
    pub fn set_outbox(&self, outbox: tokio::sync::mpsc::UnboundedSender<NormPart>) {
        let _ = self.outbox.set(outbox);
    }

    /// The model's epoch: 1 at registration, one more after each rollback to a checkpoint.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Ends recovery of a copy restored at exactly the agreed version: it continues under `epoch`.
    pub fn resume_as(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Release);
        self.set_recovering(false);
    }

    /// Whether the shard is still agreeing with its peers on the version to continue from.
    pub fn is_recovering(&self) -> bool {
        self.recovering.load(Ordering::Acquire)
    }

    /// Marks the model as recovering (requests are refused) or done.
    pub fn set_recovering(&self, recovering: bool) {
        self.recovering.store(recovering, Ordering::Release);
    }

    /// Refuses requests while the shard is recovering the model or a rollback
    /// replaced this copy (the retry reaches the restored one).
    pub fn check_serving(&self) -> Result<(), ServerError> {
        if self.is_recovering() || self.is_retired() {
            return Err(ServerError::Recovering(self.spec.name.clone()));
        }
        Ok(())
    }

    /// As [`Model::check_serving`], and refuses requests of another epoch (`sent` 0 skips that check).
    pub fn check_epoch(&self, sent: u64) -> Result<(), ServerError> {
        self.check_serving()?;
        let epoch = self.epoch();
        if sent != 0 && sent != epoch {
            return Err(ServerError::EpochChanged {
                model: self.spec.name.clone(),
                sent,
                epoch,
                version: self.version_range().0,
            });
        }
        Ok(())
    }

    /// Takes the model out of service after a rollback replaced it: waiting
    /// pulls wake and are told the epoch changed.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.checkpoints.retire();
        for block in &self.local_order {
            block.retire();
        }
        if let Some(rounds) = &self.rounds {
            rounds.wake();
        }
    }

    /// Whether a rollback replaced this copy of the model.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// The number of shards this copy of the model is laid out for.
    pub fn num_shards(&self) -> u32 {
        self.num_shards
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// This shard's blocks in tensor then block order.
    pub fn local_blocks(&self) -> &[Arc<Block>] {
        &self.local_order
    }

    /// Elements of the blocks on this shard.
    pub fn local_elements(&self) -> u64 {
        self.local_elements
    }

    /// The error for a worker that is not a live member of this model.
    pub fn not_a_member(&self, worker: &str) -> ServerError {
        ServerError::UnknownWorker { model: self.spec.name.clone(), worker: worker.to_string() }
    }

    /// Index of a tensor by name.
    pub fn tensor_index(&self, tensor: &str) -> Result<usize, ServerError> {
        self.tensor_index
            .get(tensor)
            .copied()
            .ok_or_else(|| ServerError::UnknownTensor { model: self.spec.name.clone(), tensor: tensor.to_string() })
    }

    /// This shard's block of a tensor, or why it is not here.
    pub fn block(&self, tensor: &str, block: u32) -> Result<&Arc<Block>, ServerError> {
        let t = self.tensor_index(tensor)?;
        if let Some(found) = self.local.get(&(t, block)) {
            return Ok(found);
        }
        let range = self.tensor_blocks[t].clone();
        let blocks = range.len() as u32;
        match self.plan.get(range.start + block as usize).filter(|_| block < blocks) {
            Some(plan) => {
                Err(ServerError::WrongShard { tensor: tensor.to_string(), block, owner: plan.shard, shard: self.shard })
            }
            None => Err(ServerError::UnknownBlock { tensor: tensor.to_string(), block, blocks }),
        }
    }

    /// Installs registration-time values (before the model is shared), after
    /// checking that every PROVIDED block of this shard got its values.
    pub fn install_initial_values(&self, values: Vec<(Arc<Block>, Vec<f32>)>) -> Result<(), ServerError> {
        let provided: HashSet<(usize, u32)> = values.iter().map(|(b, _)| (b.tensor, b.index)).collect();
        if let Some(missing) = self
            .local_order
            .iter()
            .find(|b| self.spec.tensors[b.tensor].init == Init::Provided && !provided.contains(&(b.tensor, b.index)))
        {
            return Err(ServerError::MissingValues {
                tensor: self.spec.tensors[missing.tensor].name.clone(),
                block: missing.index,
            });
        }
        for (block, data) in values {
            debug_assert_eq!(data.len(), block.len);
            block.lock().params = Arc::new(data);
        }
        Ok(())
    }

    /// The error for a NaN or infinite value in `block`, counted in the metrics.
    pub fn non_finite(&self, block: &Block, index: u64, what: &'static str) -> ServerError {
        metrics::counter!(m::NON_FINITE, "model" => self.spec.name.clone()).increment(1);
        ServerError::NonFinite { tensor: self.spec.tensors[block.tensor].name.clone(), block: block.index, index, what }
    }

    /// Removes expired workers and completes every step that was only waiting
    /// for them. Returns the ids dropped.
    pub fn expire_workers(&self) -> Vec<String> {
        let expired = self.membership.expire();
        if !expired.is_empty() {
            self.count_drops(DropReason::LeaseExpired, expired.len());
            self.complete_ready_steps();
        }
        expired
    }

    /// Counts workers dropped for `why`, here or (told by a peer) on another shard.
    pub fn count_drops(&self, why: DropReason, workers: usize) {
        let (counter, metric) = match why {
            DropReason::LeaseExpired => (&self.workers_expired, m::WORKERS_EXPIRED),
            DropReason::MissedDeadline => (&self.workers_dropped_late, m::WORKERS_DROPPED_LATE),
        };
        counter.fetch_add(workers as u64, Ordering::Relaxed);
        metrics::counter!(metric, "model" => self.spec.name.clone()).increment(workers as u64);
    }

    /// Lowest and highest block version on this shard.
    pub fn version_range(&self) -> (u64, u64) {
        let versions = self.local_order.iter().map(|b| b.version());
        let (min, max) = versions.fold((u64::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)));
        if self.local_order.is_empty() { (0, 0) } else { (min, max) }
    }

    /// Per-group tensor counts, parameters, optimizer state bytes and pending gradient bytes on this shard.
    pub fn group_stats(&self) -> Vec<GroupStats> {
        let mut stats = vec![GroupStats::default(); self.spec.groups.len()];
        for tensor in &self.spec.tensors {
            stats[tensor.group].tensors += 1;
        }
        for block in &self.local_order {
            let entry = &mut stats[block.group];
            entry.parameters += block.len as u64;
            let (state, pending) = block.held_bytes();
            entry.state_bytes += state as u64;
            entry.pending_bytes += pending as u64;
        }
        stats
    }

    /// Push RPCs committed, workers expired, and workers dropped at a step deadline so far.
    pub fn counters(&self) -> (u64, u64, u64) {
        (
            self.pushes.load(Ordering::Relaxed),
            self.workers_expired.load(Ordering::Relaxed),
            self.workers_dropped_late.load(Ordering::Relaxed),
        )
    }

    pub(super) fn publish_version(&self) {
        metrics::gauge!(m::MODEL_VERSION, "model" => self.spec.name.clone()).set(self.version_range().0 as f64);
    }

    /// Refreshes the live-worker gauge (cheap: no block is locked).
    pub fn publish_live_workers(&self) {
        metrics::gauge!(m::LIVE_WORKERS, "model" => self.spec.name.clone()).set(self.membership.live().len() as f64);
    }

    /// Refreshes the gauges that describe the model's size and membership.
    /// Locks every block: call it from the blocking pool.
    pub fn publish_gauges(&self) {
        let model = self.spec.name.clone();
        self.publish_live_workers();
        metrics::gauge!(m::PARAMETERS, "model" => model.clone()).set(self.local_elements as f64);
        for (group, stats) in self.spec.groups.iter().zip(self.group_stats()) {
            metrics::gauge!(m::OPTIMIZER_STATE_BYTES, "model" => model.clone(), "group" => group.name.clone(), "optimizer" => group.optimizer.mode())
                .set(stats.state_bytes as f64);
            metrics::gauge!(m::PENDING_GRADIENT_BYTES, "model" => model.clone(), "group" => group.name.clone())
                .set(stats.pending_bytes as f64);
        }
        if let Some(rounds) = &self.rounds {
            let global: usize = self.local_order.iter().map(|b| 4 * b.lock().global.len()).sum();
            metrics::gauge!(m::FED_STATE_BYTES, "model" => model.clone()).set(global as f64);
            rounds.publish(&model);
        }
        self.publish_version();
    }
}
