//! One block of a tensor stored on this shard: its weights, optimizer state
//! and the step it is collecting, behind one lock, plus a version channel
//! that long-polling pulls wait on without taking the lock.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};
use tokio::sync::watch;

use crate::optim::Optimizer;

/// One block of a tensor stored on this shard.
pub struct Block {
    /// Index of the tensor in the spec.
    pub tensor: usize,
    /// Block index within the tensor.
    pub index: u32,
    /// Elements in the block.
    pub len: usize,
    /// Parameter group of the tensor.
    pub group: usize,
    state: Mutex<BlockState>,
    version: watch::Sender<u64>,
    /// Set once an optimizer update panicked; read without the lock by waiting pulls.
    failed: AtomicBool,
    /// Set when a rollback replaced the model this block belongs to.
    retired: AtomicBool,
}

/// Why a wait for a version ended without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitFailure {
    /// The time ran out at this version.
    TimedOut {
        /// The version the block was still at.
        version: u64,
    },
    /// The block's optimizer failed: the version will not come.
    OptimizerFailed,
    /// The model was rolled back to a checkpoint and this copy retired.
    Retired,
}

/// What the block's lock guards.
pub(super) struct BlockState {
    /// Shared with pulls being encoded and checkpoints being written, which
    /// hold it without the lock; an update copies it only if one still does.
    pub(super) params: Arc<Vec<f32>>,
    pub(super) version: u64,
    /// Sync steps that left the block as it was (no push had a gradient for
    /// it); the optimizer counts `version - skipped_steps` updates.
    pub(super) skipped_steps: u64,
    /// Of those, the steps skipped because a worker's gradient overflowed
    /// (`ENCODING_OVERFLOW`); pulls report it so the workers lower their loss scale.
    pub(super) overflow_steps: u64,
    pub(super) optimizer: Box<dyn Optimizer>,
    /// Steps being collected, by step: only the block's version in sync mode,
    /// up to `staleness` steps beyond it in bounded-staleness mode.
    pub(super) pending: BTreeMap<u64, PendingStep>,
    /// Workers counted in the last applied sync step, to recognise retries of it.
    pub(super) last_contributors: Vec<String>,
    /// Async mode: the last step each worker pushed.
    pub(super) last_async_step: HashMap<String, u64>,
    /// A complete sync step waiting for the model's gradient norm (`GRAD_CLIP_MEAN`).
    pub(super) awaiting: Option<AwaitingNorm>,
    /// A step whose update failed, with its gradient kept.
    pub(super) failed: Option<FailedStep>,
    /// Federated mode: the open round's client updates received, by client id.
    pub(super) round_updates: BTreeMap<u32, RoundUpdate>,
    /// Federated mode: global state next to the weights (SCAFFOLD's c, or
    /// FedSpeed's sum of h over all clients); empty otherwise.
    pub(super) global: Vec<f32>,
}

/// One client's decoded update of one block for the open round.
pub(super) struct RoundUpdate {
    pub(super) delta: Vec<f32>,
    pub(super) control: Option<Vec<f32>>,
}

impl RoundUpdate {
    pub(super) fn bytes(&self) -> usize {
        4 * (self.delta.len() + self.control.as_ref().map_or(0, Vec::len))
    }
}

/// A complete step's mean gradient, held until the norm over every shard's
/// blocks is known (see `model::clip`).
pub(super) struct AwaitingNorm {
    pub(super) step: u64,
    /// None when no push of the step had a gradient for the block, or one
    /// overflowed (`overflow`): the step is skipped.
    pub(super) gradient: Option<Vec<f32>>,
    pub(super) overflow: bool,
    pub(super) lr_scale: f64,
    pub(super) contributors: Vec<String>,
}

/// A step whose optimizer update panicked. Its mean gradient is kept (a
/// checkpoint restore or an operator can replay it); the block takes no more
/// pushes, since its optimizer state may be half-updated.
pub(super) struct FailedStep {
    pub(super) step: u64,
    pub(super) gradient: Vec<f32>,
    pub(super) reason: String,
}

/// Gradients of the current sync step that have arrived so far.
pub(super) struct PendingStep {
    pub(super) accumulated: Accumulated,
    pub(super) contributors: Vec<String>,
    /// When its first push arrived, on the shard's running time (`clock`).
    pub(super) started: Instant,
    /// How many pushes had a gradient (or a buffer's values) for the block
    /// (not `ENCODING_NO_GRADIENT`).
    pub(super) valued: usize,
    /// Whether any push said its gradient overflowed: the step is skipped.
    pub(super) overflow: bool,
    /// The learning-rate scale every push of the step carries (1 when none does).
    pub(super) lr_scale: f64,
}

/// What a sync step accumulates, so that the step never depends on the order
/// the pushes arrive in: decoded values summed in f32 while a step has at most
/// two of them (f32 addition is commutative), in f64 from a third on (the sum
/// of a few f32 values is exact there), or sign votes in small integers. The
/// choice is made at the second push from the live members; a worker joining
/// after it adds a third value to an f32 sum, correct but order-dependent.
pub(super) enum Accumulated {
    Sum(Vec<f32>),
    WideSum(Vec<f64>),
    Votes(Vec<i16>),
}

impl Accumulated {
    /// Bytes the sum holds: 4 per element in f32, 8 in f64, 2 per sign vote.
    pub(super) fn bytes(&self) -> usize {
        match self {
            Accumulated::Sum(sum) => 4 * sum.len(),
            Accumulated::WideSum(sum) => 8 * sum.len(),
            Accumulated::Votes(votes) => 2 * votes.len(),
        }
    }

    /// Moves an f32 sum of one push into f64 (exactly), before more are added.
    pub(super) fn widen(&mut self) {
        if let Accumulated::Sum(sum) = self {
            *self = Accumulated::WideSum(sum.iter().map(|&g| f64::from(g)).collect());
        }
    }
}

/// One block's gradient from one push, validated but still encoded, so it can
/// be decoded straight into the aggregation buffer without another copy.
pub trait BlockGradient: Send + Sync {
    /// The block it belongs to.
    fn block(&self) -> &Arc<Block>;
    /// The first element (within the block) that decodes to NaN or ±inf, if any.
    fn first_non_finite(&self) -> Option<u64>;
    /// False when the push says the worker has no gradient for the block in
    /// this step (`ENCODING_NO_GRADIENT`); it then decodes to zeros.
    fn has_gradient(&self) -> bool {
        true
    }
    /// True when the worker found inf or NaN in its gradient of this step
    /// (`ENCODING_OVERFLOW`): the step is skipped everywhere.
    fn overflow(&self) -> bool {
        false
    }
    /// Overwrites `out` (the block's length) with the gradient.
    fn write_into(&self, out: &mut [f32]);
    /// Adds the gradient to `out` (the block's length).
    fn add_into(&self, out: &mut [f32]);
    /// Adds the gradient to f64 sums (the block's length).
    fn add_into_wide(&self, out: &mut [f64]);
    /// Adds +1/-1 per element to sign vote counters (sign payloads only).
    fn add_votes(&self, votes: &mut [i16]);
}

impl Block {
    /// A block at version 0 with these weights and optimizer.
    pub(super) fn new(
        tensor: usize,
        index: u32,
        group: usize,
        params: Vec<f32>,
        optimizer: Box<dyn Optimizer>,
    ) -> Self {
        Self {
            tensor,
            index,
            len: params.len(),
            group,
            state: Mutex::new(BlockState {
                params: Arc::new(params),
                version: 0,
                skipped_steps: 0,
                overflow_steps: 0,
                optimizer,
                pending: BTreeMap::new(),
                last_contributors: Vec::new(),
                last_async_step: HashMap::new(),
                awaiting: None,
                failed: None,
                round_updates: BTreeMap::new(),
                global: Vec::new(),
            }),
            version: watch::Sender::new(0),
            failed: AtomicBool::new(false),
            retired: AtomicBool::new(false),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, BlockState> {
        self.state.lock()
    }

    /// Tells waiting pulls about a new version (the caller holds the lock).
    pub(super) fn announce(&self, version: u64) {
        self.version.send_replace(version);
    }

    /// Updates applied to this block, read without its lock.
    pub fn version(&self) -> u64 {
        *self.version.borrow()
    }

    /// Records a failed update and wakes every pull waiting on the block.
    pub(super) fn mark_failed(&self) {
        self.failed.store(true, Ordering::Release);
        self.version.send_modify(|_| {});
    }

    /// Retires the block and wakes every pull waiting on it.
    pub(super) fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.version.send_modify(|_| {});
    }

    /// The step whose update failed and why, if one did.
    pub fn failure(&self) -> Option<(u64, String)> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.state.lock().failed.as_ref().map(|f| (f.step, f.reason.clone()))
    }

    /// The mean gradient of the step whose update failed, kept for a checkpoint
    /// or an operator to replay.
    pub fn failed_gradient(&self) -> Option<Vec<f32>> {
        self.state.lock().failed.as_ref().map(|f| f.gradient.clone())
    }

    /// Replaces the optimizer, to make it fail in tests of the failure path.
    #[cfg(test)]
    pub(super) fn replace_optimizer(&self, optimizer: Box<dyn Optimizer>) {
        self.state.lock().optimizer = optimizer;
    }

    /// Waits until the block has at least `min_version` updates, or says why not.
    pub async fn wait_for_version(&self, min_version: u64, timeout: Duration) -> Result<(), WaitFailure> {
        let mut rx = self.version.subscribe();
        let stopped = || self.failed.load(Ordering::Acquire) || self.retired.load(Ordering::Acquire);
        let done = |v: &u64| *v >= min_version || stopped();
        let reached = matches!(tokio::time::timeout(timeout, rx.wait_for(done)).await, Ok(Ok(_)));
        let version = *rx.borrow();
        if self.retired.load(Ordering::Acquire) {
            Err(WaitFailure::Retired)
        } else if version >= min_version {
            Ok(())
        } else if reached || self.failed.load(Ordering::Acquire) {
            Err(WaitFailure::OptimizerFailed)
        } else {
            Err(WaitFailure::TimedOut { version })
        }
    }

    /// The block's current version and its weights, shared (the next update copies them if they are still held).
    pub fn snapshot(&self) -> (u64, Arc<Vec<f32>>) {
        let state = self.state.lock();
        (state.version, state.params.clone())
    }

    /// What a pull sends of the block: its version, the steps skipped for an
    /// overflow up to it, and its weights, read together.
    pub fn pull_view(&self) -> (u64, u64, Arc<Vec<f32>>) {
        let state = self.state.lock();
        (state.version, state.overflow_steps, state.params.clone())
    }

    /// The block's version and a copy of its federated global state (SCAFFOLD's c).
    pub fn global_snapshot(&self) -> (u64, Arc<Vec<f32>>) {
        let state = self.state.lock();
        (state.version, Arc::new(state.global.clone()))
    }

    /// Optimizer state bytes this block holds.
    pub fn state_bytes(&self) -> usize {
        self.state.lock().optimizer.state_bytes()
    }

    /// Optimizer state bytes and the bytes of gradients of steps not yet
    /// applied (sums being collected, a step waiting for the model's norm, a
    /// failed step's kept gradient), under one lock.
    pub fn held_bytes(&self) -> (usize, usize) {
        let state = self.state.lock();
        let pending: usize = state.pending.values().map(|p| p.accumulated.bytes()).sum();
        let awaiting = state.awaiting.as_ref().and_then(|a| a.gradient.as_ref()).map_or(0, |g| 4 * g.len());
        let failed = state.failed.as_ref().map_or(0, |f| 4 * f.gradient.len());
        (state.optimizer.state_bytes(), pending + awaiting + failed)
    }
}

/// A gradient already decoded, for tests of the store.
#[cfg(test)]
pub struct DecodedGradient(pub Arc<Block>, pub Vec<f32>);

#[cfg(test)]
impl BlockGradient for DecodedGradient {
    fn block(&self) -> &Arc<Block> {
        &self.0
    }
    fn first_non_finite(&self) -> Option<u64> {
        None
    }
    fn write_into(&self, out: &mut [f32]) {
        out.copy_from_slice(&self.1);
    }
    fn add_into(&self, out: &mut [f32]) {
        out.iter_mut().zip(&self.1).for_each(|(o, g)| *o += g);
    }
    fn add_into_wide(&self, out: &mut [f64]) {
        out.iter_mut().zip(&self.1).for_each(|(o, g)| *o += f64::from(*g));
    }
    fn add_votes(&self, _: &mut [i16]) {}
}

/// A push without values, for tests of the store: it has no gradient for
/// the block (`ENCODING_NO_GRADIENT`), or its gradient overflowed
/// (`ENCODING_OVERFLOW`, `overflow` set).
#[cfg(test)]
pub struct NoGradient {
    /// The block.
    pub block: Arc<Block>,
    /// Whether the worker's gradient overflowed.
    pub overflow: bool,
}

#[cfg(test)]
impl BlockGradient for NoGradient {
    fn block(&self) -> &Arc<Block> {
        &self.block
    }
    fn first_non_finite(&self) -> Option<u64> {
        None
    }
    fn has_gradient(&self) -> bool {
        false
    }
    fn overflow(&self) -> bool {
        self.overflow
    }
    fn write_into(&self, out: &mut [f32]) {
        out.fill(0.0);
    }
    fn add_into(&self, out: &mut [f32]) {
        out.iter_mut().for_each(|o| *o += 0.0);
    }
    fn add_into_wide(&self, _: &mut [f64]) {}
    fn add_votes(&self, _: &mut [i16]) {}
}

/// Pushes of different kinds in one test push.
#[cfg(test)]
impl BlockGradient for Box<dyn BlockGradient> {
    fn block(&self) -> &Arc<Block> {
        (**self).block()
    }
    fn first_non_finite(&self) -> Option<u64> {
        (**self).first_non_finite()
    }
    fn has_gradient(&self) -> bool {
        (**self).has_gradient()
    }
    fn overflow(&self) -> bool {
        (**self).overflow()
    }
    fn write_into(&self, out: &mut [f32]) {
        (**self).write_into(out)
    }
    fn add_into(&self, out: &mut [f32]) {
        (**self).add_into(out)
    }
    fn add_into_wide(&self, out: &mut [f64]) {
        (**self).add_into_wide(out)
    }
    fn add_votes(&self, votes: &mut [i16]) {
        (**self).add_votes(votes)
    }
}
