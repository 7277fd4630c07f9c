//! One block of a tensor stored on this shard: its weights, optimizer state
//! and the step it is collecting, behind one lock, plus a version channel
//! that long-polling pulls wait on without taking the lock.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
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
}

/// What the block's lock guards.
pub(super) struct BlockState {
    pub(super) params: Vec<f32>,
    pub(super) version: u64,
    pub(super) optimizer: Box<dyn Optimizer>,
    /// Steps being collected, by step: only the block's version in sync mode,
    /// up to `staleness` steps beyond it in bounded-staleness mode.
    pub(super) pending: BTreeMap<u64, PendingStep>,
    /// Workers counted in the last applied sync step, to recognise retries of it.
    pub(super) last_contributors: Vec<String>,
    /// Async mode: the last step each worker pushed.
    pub(super) last_async_step: HashMap<String, u64>,
}

/// Gradients of the current sync step that have arrived so far.
pub(super) struct PendingStep {
    pub(super) accumulated: Accumulated,
    pub(super) contributors: Vec<String>,
    pub(super) started: Instant,
}

/// What a sync step accumulates: decoded values, or sign votes in small integers.
pub(super) enum Accumulated {
    Sum(Vec<f32>),
    Votes(Vec<i16>),
}

/// One block's gradient from one push, validated but still encoded, so it can
/// be decoded straight into the aggregation buffer without another copy.
pub trait BlockGradient: Send + Sync {
    /// The block it belongs to.
    fn block(&self) -> &Arc<Block>;
    /// The first element (within the block) that decodes to NaN or ±inf, if any.
    fn first_non_finite(&self) -> Option<u64>;
    /// Overwrites `out` (the block's length) with the gradient.
    fn write_into(&self, out: &mut [f32]);
    /// Adds the gradient to `out` (the block's length).
    fn add_into(&self, out: &mut [f32]);
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
                params,
                version: 0,
                optimizer,
                pending: BTreeMap::new(),
                last_contributors: Vec::new(),
                last_async_step: HashMap::new(),
            }),
            version: watch::Sender::new(0),
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

    /// Waits until the block has at least `min_version` updates; on timeout,
    /// returns the version it was still at.
    pub async fn wait_for_version(&self, min_version: u64, timeout: Duration) -> Result<(), u64> {
        let mut rx = self.version.subscribe();
        let reached = matches!(tokio::time::timeout(timeout, rx.wait_for(|v| *v >= min_version)).await, Ok(Ok(_)));
        if reached { Ok(()) } else { Err(*rx.borrow()) }
    }

    /// The block's current version and a copy of its weights.
    pub fn snapshot(&self) -> (u64, Vec<f32>) {
        let state = self.state.lock();
        (state.version, state.params.clone())
    }

    /// Optimizer state bytes this block holds.
    pub fn state_bytes(&self) -> usize {
        self.state.lock().optimizer.state_bytes()
    }
}
