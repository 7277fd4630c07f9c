//! Consistent snapshots of a model for checkpoints. A checkpoint is taken at
//! one version: each block is copied under its lock at the moment its update
//! to that version is applied (or at once, when a block is already there), so
//! every block of the snapshot is exactly at that version, whatever the other
//! blocks do meanwhile. Once every block of this shard is copied, the snapshot
//! goes to the writer, which writes it off the hot path; training waits only
//! for the copies. Every shard picks the same versions (multiples of
//! `--checkpoint-every`, and versions scheduled by shard 0), so the shards'
//! checkpoints of one version form one model. Nothing here touches files.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;

use super::Model;
use crate::error::ServerError;
use crate::optim::OptimizerState;
use crate::store::block::{Block, BlockState};

/// One block as it was at the snapshot's version.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockSnapshot {
    /// Tensor name.
    pub tensor: String,
    /// Block index within the tensor.
    pub block: u32,
    /// Updates applied to the block.
    pub version: u64,
    /// Steps of those that no push had a gradient for (they left the block as it was).
    pub skipped_steps: u64,
    /// Of those, the steps a worker's overflow skipped.
    pub overflow_steps: u64,
    /// The weights (shared with the block until its next update).
    pub params: Arc<Vec<f32>>,
    /// The optimizer's state.
    pub optimizer: OptimizerState,
    /// Federated global state (SCAFFOLD's c, FedSpeed's sum of h); empty otherwise.
    pub global: Vec<f32>,
    /// Workers counted in the step that produced this version, to recognise its retries.
    pub last_contributors: Vec<String>,
    /// Async mode: the last step each worker pushed.
    pub async_steps: Vec<(String, u64)>,
}

/// One model's part on this shard at one version: what a checkpoint holds.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSnapshot {
    /// Model name.
    pub model: String,
    /// The registration's spec in its canonical wire form.
    pub spec: Vec<u8>,
    /// This shard and the cluster size the layout was made for.
    pub shard: u32,
    /// Shards in the cluster.
    pub num_shards: u32,
    /// The version every block is at.
    pub version: u64,
    /// The model's epoch when the snapshot was taken.
    pub epoch: u64,
    /// Members and their ranks.
    pub members: Vec<(String, u32)>,
    /// Federated: the last round that included each client.
    pub last_included: Vec<(u32, u64)>,
    /// This shard's blocks, in tensor then block order.
    pub blocks: Vec<BlockSnapshot>,
    /// Time the blocks were held to copy them, summed over blocks.
    pub copy_seconds: f64,
}

/// Where finished snapshots go (the checkpoint writer).
pub trait CheckpointSink: Send + Sync {
    /// Takes a snapshot to write; reports back through `plan`.
    fn submit(&self, snapshot: ModelSnapshot, plan: Arc<CheckpointPlan>);
}

/// What the writer did with one snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteReport {
    /// The version written.
    pub version: u64,
    /// Where it was written.
    pub path: String,
    /// Seconds the write took.
    pub seconds: f64,
    /// Bytes written.
    pub bytes: u64,
    /// Seconds the blocks were held to copy them, summed over blocks.
    pub copy_seconds: f64,
}

#[derive(Default)]
struct Capture {
    blocks: BTreeMap<(usize, u32), BlockSnapshot>,
    copy: Duration,
}

#[derive(Default)]
struct PlanState {
    /// Versions scheduled on demand (beside the multiples of `every`).
    targets: BTreeSet<u64>,
    /// Snapshots being collected, by version.
    captures: BTreeMap<u64, Capture>,
    /// Versions written (or found on disk), newest last.
    written: BTreeMap<u64, Result<WriteReport, String>>,
    /// Versions handed to the writer and not written yet.
    submitted: BTreeSet<u64>,
}

/// Which versions of a model are checkpointed, and the snapshots under way.
pub struct CheckpointPlan {
    every: u64,
    sink: Option<Arc<dyn CheckpointSink>>,
    state: Mutex<PlanState>,
    /// Bumped after every write (or failed write), so waiters look again.
    writes: watch::Sender<u64>,
    /// Time updates spent copying state a checkpoint still held, since the last write finished.
    held_up_nanos: AtomicU64,
    /// Set when a rollback replaced the model: what is still being written belongs to the abandoned run.
    retired: AtomicBool,
    /// Set once a version outside the multiples of `every` was scheduled or found on disk; until
    /// then every block update and pull decides without taking the lock.
    irregular: AtomicBool,
    /// The newest version every shard holds, as this shard last learned it.
    common: AtomicU64,
}

impl CheckpointPlan {
    /// A plan that checkpoints every `every` versions (0: only when scheduled) into `sink`;
    /// without a sink nothing is checkpointed.
    pub fn new(every: u64, sink: Option<Arc<dyn CheckpointSink>>) -> Self {
        Self {
            every,
            sink,
            state: Mutex::new(PlanState::default()),
            writes: watch::Sender::new(0),
            held_up_nanos: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            irregular: AtomicBool::new(false),
            common: AtomicU64::new(0),
        }
    }

    /// Versions that are multiples of this are checkpointed (0: none).
    pub fn every(&self) -> u64 {
        if self.sink.is_some() { self.every } else { 0 }
    }

    /// Whether checkpoints are written at all.
    pub fn enabled(&self) -> bool {
        self.sink.is_some()
    }

    fn periodic(&self, version: u64) -> bool {
        self.every > 0 && version.is_multiple_of(self.every)
    }

    /// Whether `version` is to be checkpointed.
    pub fn wants(&self, version: u64) -> bool {
        self.sink.is_some()
            && (self.periodic(version)
                || (self.irregular.load(Ordering::Acquire) && self.state.lock().targets.contains(&version)))
    }

    /// Whether pulls of `version` tell the worker to save its state: it is
    /// checkpointed, scheduled, or already written.
    pub fn marks(&self, version: u64) -> bool {
        if self.sink.is_none() {
            return false;
        }
        if self.periodic(version) {
            return true;
        }
        if !self.irregular.load(Ordering::Acquire) {
            return false;
        }
        let state = self.state.lock();
        state.targets.contains(&version) || state.written.contains_key(&version)
    }

    /// Records versions already on disk (after a restore), so their pulls are marked.
    pub fn note_on_disk(&self, versions: &[u64]) {
        if versions.iter().any(|v| !self.periodic(*v)) {
            self.irregular.store(true, Ordering::Release);
        }
        let mut state = self.state.lock();
        for &version in versions {
            let found = WriteReport { version, path: String::new(), seconds: 0.0, bytes: 0, copy_seconds: 0.0 };
            state.written.entry(version).or_insert(Ok(found));
        }
    }

    /// Whether a scheduled version is still to be written.
    pub fn has_pending(&self) -> bool {
        !self.state.lock().targets.is_empty()
    }

    /// The write of `version`, once it is done, and its result.
    pub fn written(&self, version: u64) -> Option<Result<WriteReport, String>> {
        self.state.lock().written.get(&version).cloned()
    }

    /// The newest version written successfully in this process.
    pub fn newest_written(&self) -> Option<WriteReport> {
        self.state.lock().written.values().rev().find_map(|r| r.as_ref().ok().cloned())
    }

    /// The newest write, if it failed: its version and why (a full disk, a
    /// read-only one). Cleared by the next write that succeeds.
    pub fn failing(&self) -> Option<(u64, String)> {
        match self.state.lock().written.last_key_value() {
            Some((version, Err(reason))) => Some((*version, reason.clone())),
            _ => None,
        }
    }

    /// Records the newest version every shard holds, as this shard last learned it.
    pub fn set_common(&self, version: u64) {
        self.common.store(version, Ordering::Release);
    }

    /// The newest version every shard holds, as this shard last learned it (0: none yet).
    pub fn common(&self) -> u64 {
        self.common.load(Ordering::Acquire)
    }

    /// Marks the plan's model as replaced by a rollback.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    /// Whether a rollback replaced the plan's model.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Records time an update spent copying state that a checkpoint still held.
    pub fn held_up(&self, time: Duration) {
        self.held_up_nanos.fetch_add(time.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Called by the writer when a snapshot is on disk (or failed to get there).
    pub fn finished(&self, version: u64, result: Result<WriteReport, String>) {
        // Copies made while this snapshot was being written count as its cost to training.
        let copies = Duration::from_nanos(self.held_up_nanos.swap(0, Ordering::Relaxed)).as_secs_f64();
        let result = result.map(|report| WriteReport { copy_seconds: report.copy_seconds + copies, ..report });
        let mut state = self.state.lock();
        state.targets.remove(&version);
        state.submitted.remove(&version);
        state.written.insert(version, result);
        // Marks for old versions are kept only as long as a rollback could go there.
        while state.written.len() > 64 {
            state.written.pop_first();
        }
        drop(state);
        self.writes.send_modify(|n| *n += 1);
    }

    /// Waits until every snapshot handed to the writer is written (or failed),
    /// or `timeout` passes; returns whether none is left.
    pub async fn settle(&self, timeout: Duration) -> bool {
        let mut rx = self.writes.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.state.lock().submitted.is_empty() {
                return true;
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return false;
            }
        }
    }

    /// Waits until `version` is written or `timeout` passes.
    pub async fn wait_written(&self, version: u64, timeout: Duration) -> Option<Result<WriteReport, String>> {
        let mut rx = self.writes.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(result) = self.written(version) {
                return Some(result);
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return None;
            }
        }
    }

    fn add(&self, version: u64, key: (usize, u32), block: BlockSnapshot, copy: Duration) {
        let mut state = self.state.lock();
        let capture = state.captures.entry(version).or_default();
        capture.copy += copy;
        capture.blocks.insert(key, block);
    }

    fn has(&self, version: u64, key: (usize, u32)) -> bool {
        self.state.lock().captures.get(&version).is_some_and(|c| c.blocks.contains_key(&key))
    }
}

/// Puts a saved block's weights (shared, not copied), optimizer state, federated
/// state and retry facts into `block`, which must be of its length.
pub(super) fn install_block(block: &Block, saved: &BlockSnapshot) -> Result<(), String> {
    let mut state = block.lock();
    if saved.params.len() != block.len || saved.global.len() != state.global.len() {
        return Err("the saved block has the wrong length".into());
    }
    state.optimizer.import_state(&saved.optimizer).map_err(|e| e.to_string())?;
    state.params = saved.params.clone();
    state.global.copy_from_slice(&saved.global);
    state.version = saved.version;
    state.skipped_steps = saved.skipped_steps;
    state.overflow_steps = saved.overflow_steps;
    state.last_contributors = saved.last_contributors.clone();
    state.last_async_step = saved.async_steps.iter().cloned().collect();
    block.announce(saved.version);
    Ok(())
}

impl Model {
    /// This copy's part of the model at `version`, made of `blocks`.
    pub(super) fn snapshot_of(&self, version: u64, blocks: Vec<BlockSnapshot>, copy_seconds: f64) -> ModelSnapshot {
        ModelSnapshot {
            model: self.spec.name.clone(),
            spec: self.spec.fingerprint.clone(),
            shard: self.shard,
            num_shards: self.num_shards,
            version,
            epoch: self.epoch(),
            members: self.membership.ranks(),
            last_included: self.rounds.as_ref().map(|r| r.last_included()).unwrap_or_default(),
            blocks,
            copy_seconds,
        }
    }

    pub(super) fn block_snapshot(&self, block: &Block, state: &BlockState) -> BlockSnapshot {
        BlockSnapshot {
            tensor: self.spec.tensors[block.tensor].name.clone(),
            block: block.index,
            version: state.version,
            skipped_steps: state.skipped_steps,
            overflow_steps: state.overflow_steps,
            params: state.params.clone(),
            optimizer: state.optimizer.export_state(),
            global: state.global.clone(),
            last_contributors: state.last_contributors.clone(),
            async_steps: state.last_async_step.iter().map(|(w, s)| (w.clone(), *s)).collect(),
        }
    }

    /// Copies `block` into the snapshot of its version if that version is
    /// checkpointed. Called under the block's lock right after an update.
    pub(super) fn capture(&self, block: &Block, state: &BlockState) {
        if !self.checkpoints.wants(state.version) {
            return;
        }
        let started = Instant::now();
        let snapshot = self.block_snapshot(block, state);
        self.checkpoints.add(state.version, (block.tensor, block.index), snapshot, started.elapsed());
    }

    /// Hands every snapshot that has all of this shard's blocks to the writer.
    /// Called after updates, outside any block lock.
    pub fn flush_checkpoints(&self) {
        let Some(sink) = &self.checkpoints.sink else { return };
        let complete: Vec<(u64, Capture)> = {
            let mut state = self.checkpoints.state.lock();
            let ready: Vec<u64> = state
                .captures
                .iter()
                .filter(|(_, c)| c.blocks.len() == self.local_order.len())
                .map(|(v, _)| *v)
                .collect();
            ready.into_iter().filter_map(|v| state.captures.remove(&v).map(|c| (v, c))).collect()
        };
        if !complete.is_empty() {
            self.checkpoints.state.lock().submitted.extend(complete.iter().map(|(v, _)| *v));
        }
        for (version, capture) in complete {
            let blocks = capture.blocks.into_values().collect();
            let snapshot = self.snapshot_of(version, blocks, capture.copy.as_secs_f64());
            sink.submit(snapshot, self.checkpoints.clone());
        }
    }

    /// Schedules a checkpoint at `version`: blocks already there are copied
    /// now, the others when they get there. Fails (changing nothing) if a
    /// block is already past it or, with `ahead`, already at it: while workers
    /// train, one of them may have pulled that version before it was marked,
    /// and would have no state saved for it.
    pub fn schedule_checkpoint(&self, version: u64, ahead: bool) -> Result<(), ServerError> {
        if !self.checkpoints.enabled() {
            return Err(ServerError::NoCheckpointDir);
        }
        // This copy is about to be replaced by an online reshard and would never write a
        // version past the hold; the request is retried and reaches the new copy.
        if let Some(held) = self.held_at() {
            let reason = format!(
                "held at version {held} while blocks move between shards (online reshard); the checkpoint is \
                 scheduled once the move ends: retry"
            );
            return Err(ServerError::Resharding { model: self.spec.name.clone(), version: held, reason });
        }
        if self.checkpoints.written(version).is_some_and(|r| r.is_ok()) {
            return Ok(());
        }
        // Marked first: a block that gets there from now on is copied and its pulls marked.
        self.checkpoints.irregular.store(true, Ordering::Release);
        let already = !self.checkpoints.state.lock().targets.insert(version);
        let (lowest, highest) = self.version_range();
        if highest > version || (ahead && highest == version) {
            if !already {
                self.checkpoints.state.lock().targets.remove(&version);
            }
            return Err(ServerError::Checkpoint {
                model: self.spec.name.clone(),
                reason: format!("version {version} has passed on this shard (its blocks are at {lowest}..={highest})"),
            });
        }
        for block in &self.local_order {
            let state = block.lock();
            if state.version == version && !self.checkpoints.has(version, (block.tensor, block.index)) {
                self.capture(block, &state);
            }
        }
        if self.local_order.is_empty() {
            self.checkpoints.state.lock().captures.entry(version).or_default();
        }
        self.flush_checkpoints();
        Ok(())
    }

    /// Installs a snapshot's blocks, membership and round state into this
    /// freshly built model (before it is shared). Every block must be present.
    pub fn restore(&self, snapshot: &ModelSnapshot) -> Result<(), ServerError> {
        let fail = |reason: String| ServerError::Checkpoint { model: self.spec.name.clone(), reason };
        let mut by_key: BTreeMap<(&str, u32), &BlockSnapshot> = BTreeMap::new();
        for block in &snapshot.blocks {
            by_key.insert((block.tensor.as_str(), block.block), block);
        }
        if by_key.len() != self.local_order.len() {
            return Err(fail(format!(
                "the checkpoint holds {} blocks, this shard owns {}",
                by_key.len(),
                self.local_order.len()
            )));
        }
        for block in &self.local_order {
            let name = &self.spec.tensors[block.tensor].name;
            let saved = by_key
                .get(&(name.as_str(), block.index))
                .ok_or_else(|| fail(format!("block {} of tensor '{name}' is missing", block.index)))?;
            install_block(block, saved).map_err(|e| fail(format!("block {} of tensor '{name}': {e}", block.index)))?;
        }
        for (worker, rank) in &snapshot.members {
            // Restored members get a fresh lease; one that is gone expires as usual.
            self.membership.join(worker, Some(*rank)).map_err(|e| fail(format!("member '{worker}': {e}")))?;
        }
        if let Some(rounds) = &self.rounds {
            rounds.restore(snapshot.version, &snapshot.last_included);
        }
        self.publish_gauges();
        Ok(())
    }

    /// A snapshot of every block as it is now, for a model whose blocks are all
    /// at one version with nothing pending (one held for an online reshard, or
    /// not yet shared); None when the versions differ.
    pub fn snapshot_now(&self) -> Option<ModelSnapshot> {
        let (lowest, highest) = self.version_range();
        if lowest != highest {
            return None;
        }
        let started = Instant::now();
        let blocks = self.local_order.iter().map(|block| self.block_snapshot(block, &block.lock())).collect();
        Some(self.snapshot_of(lowest, blocks, started.elapsed().as_secs_f64()))
    }
}
