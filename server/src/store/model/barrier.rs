//! How pushes become updates, per consistency mode. Sync: each block sums
//! (or counts the sign votes of) the pushes of a step and runs the optimizer
//! once every live worker has pushed, so a dead worker never hangs a step
//! once its lease expires. Async: each push is applied on arrival and its
//! staleness recorded. A push is identified by (worker, step, block), so a
//! retry is acknowledged and never counted twice. A push may say it has no
//! gradient for a block (a frozen parameter, one the step did not use): it
//! counts as zeros in the mean, and a step none of whose pushes had a
//! gradient leaves the block as it was, as torch.optim skips such a parameter.

use std::collections::BTreeSet;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use ps_proto::codec;
use rayon::prelude::*;

use super::{DropReason, Model};
use crate::error::ServerError;
use crate::metrics as m;
use crate::optim::StepContext;
use crate::store::block::{Accumulated, AwaitingNorm, Block, BlockGradient, BlockState, FailedStep, PendingStep};
use crate::store::clock;
use ps_proto::api::{Aggregation, BufferSync, Mode, OptimizerConfig};

enum Disposition {
    Accept,
    Duplicate,
}

/// What one push did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PushOutcome {
    /// Blocks counted.
    pub accepted: u32,
    /// Blocks already counted before (retries).
    pub duplicate: u32,
    /// Blocks whose update ran.
    pub updated: u32,
}

impl Model {
    /// Commits one worker's push for `step`: all blocks are checked first, so
    /// an invalid push changes nothing; then every accepted block is added to
    /// its step, and blocks whose barrier is complete are updated, in parallel.
    /// `lr_scale` multiplies the step's learning rate (1 when the push carried
    /// none); in sync and bounded-staleness mode every push of a step must carry
    /// the same one.
    pub fn commit_push<G: BlockGradient>(
        &self,
        worker: &str,
        step: u64,
        lr_scale: f64,
        blocks: Vec<G>,
    ) -> Result<PushOutcome, ServerError> {
        if self.spec.options.mode == Mode::Federated {
            return Err(ServerError::FederatedModel(self.spec.name.clone()));
        }
        // A copy retired by a rollback takes nothing; the retry reaches the restored copy.
        self.check_serving()?;
        // Held for the whole commit, so a hold is placed between pushes, never inside one.
        let hold = self.hold.read();
        self.check_hold(*hold, step)?;
        if !self.membership.is_live(worker) {
            return Err(self.not_a_member(worker));
        }
        for gradient in &blocks {
            let block = gradient.block();
            self.check_buffer_source(gradient, worker)?;
            self.classify(block, &block.lock(), worker, step, lr_scale)?;
        }
        // Scanned before anything is added, so one bad value leaves every block as it was.
        if let Some((block, index)) =
            blocks.par_iter().find_map_first(|g| g.first_non_finite().map(|index| (g.block(), index)))
        {
            return Err(self.non_finite(block, index, "a pushed gradient"));
        }
        let live = self.live_ids();
        let touched: Vec<_> = blocks.iter().map(|g| g.block().clone()).collect();
        let mut outcome = blocks
            .into_par_iter()
            .map(|gradient| self.apply_one(&gradient, worker, step, lr_scale, &live))
            .reduce(PushOutcome::default, |a, b| PushOutcome {
                accepted: a.accepted + b.accepted,
                duplicate: a.duplicate + b.duplicate,
                updated: a.updated + b.updated,
            });
        self.pushes.fetch_add(1, Ordering::Relaxed);
        let model = self.spec.name.clone();
        metrics::counter!(m::PUSHES, "model" => model.clone()).increment(1);
        metrics::counter!(m::PUSH_BLOCKS, "model" => model.clone(), "result" => "accepted")
            .increment(u64::from(outcome.accepted));
        metrics::counter!(m::PUSH_BLOCKS, "model" => model, "result" => "duplicate")
            .increment(u64::from(outcome.duplicate));
        if outcome.updated > 0 {
            self.publish_version();
            self.flush_checkpoints();
        }
        // This push may have completed this shard's part of a step's norm, and the peers' were in.
        outcome.updated += self.apply_ready_norms();
        // This push completed a step whose update failed: say so rather than let the worker wait.
        if let Some((block, (step, reason))) = touched.iter().find_map(|b| b.failure().map(|f| (b, f))) {
            return Err(ServerError::OptimizerFailed {
                tensor: self.spec.tensors[block.tensor].name.clone(),
                block: block.index,
                step,
                reason,
            });
        }
        Ok(outcome)
    }

    /// A buffer group that takes rank 0's values refuses values from any other rank.
    fn check_buffer_source(&self, gradient: &impl BlockGradient, worker: &str) -> Result<(), ServerError> {
        let block = gradient.block();
        let broadcast =
            matches!(self.spec.groups[block.group].optimizer, OptimizerConfig::Buffer(BufferSync::Broadcast));
        if !broadcast || !gradient.has_gradient() {
            return Ok(());
        }
        match self.membership.rank(worker) {
            Some(0) | None => Ok(()),
            Some(rank) => Err(ServerError::BufferNotFromRankZero {
                worker: worker.to_string(),
                rank,
                tensor: self.spec.tensors[block.tensor].name.clone(),
            }),
        }
    }

    pub(super) fn live_ids(&self) -> Vec<String> {
        self.membership.live().into_iter().map(|(id, _)| id).collect()
    }

    fn classify(
        &self,
        block: &Block,
        state: &BlockState,
        worker: &str,
        step: u64,
        lr_scale: f64,
    ) -> Result<Disposition, ServerError> {
        let tensor = || self.spec.tensors[block.tensor].name.clone();
        if let Some(failed) = &state.failed {
            return Err(ServerError::OptimizerFailed {
                tensor: tensor(),
                block: block.index,
                step: failed.step,
                reason: failed.reason.clone(),
            });
        }
        let version = state.version;
        let ahead = self.spec.options.mode.window().unwrap_or(0);
        if step > version + ahead {
            return Err(ServerError::FutureStep { tensor: tensor(), block: block.index, step, version, ahead });
        }
        let has_pushed = |contributors: &[String]| contributors.iter().any(|w| w == worker);
        let counted = match self.spec.options.mode {
            // Complete and waiting for the norm: a retry, or a worker the step went ahead without.
            Mode::Sync | Mode::BoundedStaleness { .. } if state.awaiting.as_ref().is_some_and(|a| a.step == step) => {
                if !state.awaiting.as_ref().is_some_and(|a| has_pushed(&a.contributors)) {
                    return Err(ServerError::StaleStep {
                        tensor: tensor(),
                        block: block.index,
                        step,
                        version: step + 1,
                    });
                }
                true
            }
            Mode::Sync | Mode::BoundedStaleness { .. } if step >= version => match state.pending.get(&step) {
                Some(pending) if has_pushed(&pending.contributors) => true,
                // Compared bit for bit: the update must not depend on which push came first.
                Some(pending) if pending.lr_scale.to_bits() != lr_scale.to_bits() => {
                    return Err(ServerError::LrScaleMismatch {
                        worker: worker.to_string(),
                        tensor: tensor(),
                        block: block.index,
                        step,
                        pushed: lr_scale,
                        first: pending.lr_scale,
                    });
                }
                _ => false,
            },
            Mode::Sync | Mode::BoundedStaleness { .. }
                if step + 1 == version && has_pushed(&state.last_contributors) =>
            {
                true
            }
            Mode::Sync | Mode::BoundedStaleness { .. } => {
                return Err(ServerError::StaleStep { tensor: tensor(), block: block.index, step, version });
            }
            Mode::Federated => return Err(ServerError::FederatedModel(self.spec.name.clone())),
            Mode::Async => match state.last_async_step.get(worker) {
                Some(&last) if last == step => true,
                Some(&last) if last > step => {
                    return Err(ServerError::StepWentBack {
                        worker: worker.to_string(),
                        tensor: tensor(),
                        block: block.index,
                        step,
                        last,
                    });
                }
                _ => false,
            },
        };
        Ok(if counted { Disposition::Duplicate } else { Disposition::Accept })
    }

    fn apply_one(
        &self,
        gradient: &impl BlockGradient,
        worker: &str,
        step: u64,
        lr_scale: f64,
        live: &[String],
    ) -> PushOutcome {
        let block = gradient.block();
        let mut state = block.lock();
        // Re-check under the lock: between the check and now, an expired lease
        // may have completed this step without us; then the gradient is not counted.
        match self.classify(block, &state, worker, step, lr_scale) {
            Ok(Disposition::Accept) => {}
            Ok(Disposition::Duplicate) | Err(_) => return PushOutcome { duplicate: 1, ..Default::default() },
        }
        let mut outcome = PushOutcome { accepted: 1, ..Default::default() };
        match self.spec.options.mode {
            Mode::Federated => {}
            Mode::Async => {
                let staleness = state.version - step;
                metrics::histogram!(m::STALENESS, "model" => self.spec.name.clone()).record(staleness as f64);
                state.last_async_step.insert(worker.to_string(), step);
                if !gradient.has_gradient() {
                    return outcome;
                }
                let mut grad = vec![0.0; block.len];
                gradient.write_into(&mut grad);
                if self.update(block, &mut state, grad, lr_scale) {
                    outcome.updated = 1;
                }
            }
            Mode::Sync | Mode::BoundedStaleness { .. } => {
                let expected = self.expected_pushes(step, live);
                match state.pending.get_mut(&step) {
                    Some(pending) => {
                        // A third push is coming: from here on the sum is kept exact.
                        if pending.contributors.len() == 1 && expected > 2 {
                            pending.accumulated.widen();
                        }
                        match &mut pending.accumulated {
                            Accumulated::Sum(sum) => gradient.add_into(sum),
                            Accumulated::WideSum(sum) => gradient.add_into_wide(sum),
                            Accumulated::Votes(votes) => gradient.add_votes(votes),
                        }
                        pending.contributors.push(worker.to_string());
                        pending.valued += usize::from(gradient.has_gradient());
                        pending.overflow |= gradient.overflow();
                    }
                    None => {
                        let accumulated = match self.spec.groups[block.group].aggregation {
                            Aggregation::Mean => {
                                let mut sum = vec![0.0; block.len];
                                gradient.write_into(&mut sum);
                                Accumulated::Sum(sum)
                            }
                            Aggregation::MajorityVote => {
                                let mut votes = vec![0i16; block.len];
                                gradient.add_votes(&mut votes);
                                Accumulated::Votes(votes)
                            }
                        };
                        let started = clock::now();
                        let pending = PendingStep {
                            accumulated,
                            contributors: vec![worker.to_string()],
                            started,
                            valued: usize::from(gradient.has_gradient()),
                            overflow: gradient.overflow(),
                            lr_scale,
                        };
                        state.pending.insert(step, pending);
                    }
                }
                if self.try_complete(block, &mut state, live) {
                    outcome.updated = 1;
                }
            }
        }
        outcome
    }

    /// Drops the members that have not pushed a step whose deadline has passed,
    /// if the step has its quorum (and, for step 0, its minimum of workers),
    /// and completes the steps that waited only for them. Returns the ids
    /// dropped. Locks every block: call it from the blocking pool.
    pub fn drop_stragglers(&self) -> Vec<String> {
        let Some(deadline) = self.spec.options.contract.step_deadline else { return Vec::new() };
        let live = self.live_ids();
        let needed = |version: u64| {
            let quorum = self.spec.options.contract.quorum as usize;
            if version == 0 { quorum.max(self.spec.options.contract.min_workers as usize) } else { quorum }
        };
        let mut late = BTreeSet::new();
        for block in &self.local_order {
            let state = block.lock();
            // Only the step at the block's version can complete; later ones wait for it.
            let Some(pending) = state.pending.get(&state.version) else { continue };
            if clock::since(pending.started) >= deadline && pending.contributors.len() >= needed(state.version) {
                late.extend(live.iter().filter(|w| !pending.contributors.contains(w)).cloned());
            }
        }
        let dropped: Vec<String> = late.into_iter().filter(|w| self.membership.leave(w)).collect();
        if !dropped.is_empty() {
            self.count_drops(DropReason::MissedDeadline, dropped.len());
            self.complete_ready_steps();
        }
        dropped
    }

    /// Runs the update of every step, from the block's version on, whose
    /// pushes are complete (every live worker pushed it, and step 0's minimum);
    /// true if at least one ran.
    pub(super) fn try_complete(&self, block: &Block, state: &mut BlockState, live: &[String]) -> bool {
        let mut ran = false;
        while self.step_ready(state, live) {
            let Some(pending) = state.pending.remove(&state.version) else { break };
            if self.clips_mean(block) {
                // The update waits for the norm over every shard (`clip`).
                let awaiting = self.complete_mean(state.version, block, pending);
                self.await_norm(block, state, awaiting);
                break;
            }
            if !self.apply_step(block, state, pending) {
                break;
            }
            ran = true;
        }
        ran
    }

    /// How many pushes `step` waits for: the live members, and for step 0 at
    /// least the spec's minimum.
    fn expected_pushes(&self, step: u64, live: &[String]) -> usize {
        let minimum = if step == 0 { self.spec.options.contract.min_workers as usize } else { 0 };
        live.len().max(minimum)
    }

    fn step_ready(&self, state: &BlockState, live: &[String]) -> bool {
        if state.failed.is_some() || state.awaiting.is_some() {
            return false;
        }
        let Some(pending) = state.pending.get(&state.version) else { return false };
        live.iter().all(|w| pending.contributors.contains(w))
            && (state.version > 0 || pending.contributors.len() >= self.spec.options.contract.min_workers as usize)
    }

    /// Averages (or votes) the step's pushes and runs the optimizer once;
    /// false if the update failed.
    fn apply_step(&self, block: &Block, state: &mut BlockState, pending: PendingStep) -> bool {
        let AwaitingNorm { gradient, lr_scale, contributors, overflow, .. } =
            self.complete_mean(state.version, block, pending);
        // Set before the update, so a checkpoint taken at the new version holds them.
        state.last_contributors = contributors;
        match gradient {
            Some(gradient) => self.update(block, state, gradient, lr_scale),
            None => {
                self.skip(block, state, overflow);
                true
            }
        }
    }

    /// The step's mean (or vote), None when no push had a gradient. A buffer
    /// group's mean is over the pushes with values only (a gradient's counts
    /// the others as zeros, as DDP's all-reduce does).
    fn complete_mean(&self, step: u64, block: &Block, pending: PendingStep) -> AwaitingNorm {
        let PendingStep { accumulated, contributors, started, valued, overflow, lr_scale } = pending;
        metrics::histogram!(m::BARRIER_WAIT_SECONDS, "model" => self.spec.name.clone())
            .record(clock::since(started).as_secs_f64());
        if valued == 0 || overflow {
            return AwaitingNorm { step, gradient: None, overflow, lr_scale, contributors };
        }
        let count = if self.spec.groups[block.group].optimizer.is_buffer() { valued } else { contributors.len() };
        let gradient = match accumulated {
            Accumulated::Sum(mut sum) => {
                // One or two values: the mean is exact up to its one rounding, whatever the order.
                // The mean of one push is that push: no pass over it.
                if count > 1 {
                    let scale = 1.0 / count as f32;
                    for g in sum.iter_mut() {
                        *g *= scale;
                    }
                }
                sum
            }
            Accumulated::WideSum(sum) => {
                let count = count as f64;
                sum.iter().map(|g| (g / count) as f32).collect()
            }
            Accumulated::Votes(votes) => {
                let mut signs = vec![0.0; votes.len()];
                codec::votes_to_signs(&votes, &mut signs);
                signs
            }
        };
        AwaitingNorm { step, gradient: Some(gradient), overflow: false, lr_scale, contributors }
    }

    /// Runs the optimizer once. No input is known to make one panic (every
    /// selection is validated at registration), but if one does, the step's
    /// gradient is kept, the block stops taking pushes, and the shard serves on.
    /// `lr_scale` is the push's own factor on top of the group's schedule.
    pub(super) fn update(&self, block: &Block, state: &mut BlockState, grad: Vec<f32>, lr_scale: f64) -> bool {
        let started = Instant::now();
        let group = &self.spec.groups[block.group];
        // The schedule follows the run's steps; the optimizer's count, the block's updates.
        let scheduled = group.schedule.factor(state.version + 1);
        let ctx = StepContext {
            t: state.version + 1 - state.skipped_steps,
            // Exact for the default scale of 1: the schedule's factor as it is.
            lr_scale: (f64::from(scheduled) * lr_scale) as f32,
        };
        let BlockState { params, optimizer, .. } = state;
        // A checkpoint still writing the weights or moments of the last version keeps its copy.
        let shared_params = Arc::get_mut(params).is_none();
        let params = Arc::make_mut(params);
        if optimizer.unshare() | shared_params {
            self.checkpoints.held_up(started.elapsed());
        }
        let stepped = panic::catch_unwind(AssertUnwindSafe(|| optimizer.step(params, &grad, &ctx)));
        if let Err(payload) = stepped {
            let reason = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_string());
            let tensor = &self.spec.tensors[block.tensor].name;
            tracing::error!(
                model = self.spec.name,
                tensor,
                block = block.index,
                step = state.version,
                reason,
                "optimizer update failed; the block stops taking pushes"
            );
            metrics::counter!(m::OPTIMIZER_FAILURES, "model" => self.spec.name.clone(), "group" => group.name.clone())
                .increment(1);
            state.failed = Some(FailedStep { step: state.version, gradient: grad, reason });
            block.mark_failed();
            return false;
        }
        if let Some(selection) = state.optimizer.take_selection_time() {
            metrics::histogram!(m::SELECTION_SECONDS, "model" => self.spec.name.clone(), "group" => group.name.clone())
                .record(selection.as_secs_f64());
        }
        self.advance(block, state);
        metrics::histogram!(m::UPDATE_SECONDS, "model" => self.spec.name.clone(), "group" => group.name.clone())
            .record(started.elapsed().as_secs_f64());
        true
    }

    /// A step in which no worker had a gradient for the block, or one's
    /// overflowed: its weights and optimizer state stay as they are, and only
    /// its version advances.
    pub(super) fn skip(&self, block: &Block, state: &mut BlockState, overflow: bool) {
        state.skipped_steps += 1;
        if overflow {
            state.overflow_steps += 1;
            metrics::counter!(m::OVERFLOW_BLOCK_STEPS, "model" => self.spec.name.clone()).increment(1);
        }
        self.advance(block, state);
        metrics::counter!(m::SKIPPED_BLOCK_STEPS, "model" => self.spec.name.clone()).increment(1);
    }

    /// The block is at its next version: pulls waiting for it are woken and a
    /// checkpoint of that version gets its copy.
    fn advance(&self, block: &Block, state: &mut BlockState) {
        state.version += 1;
        block.announce(state.version);
        self.capture(block, state);
    }

    /// Re-checks every pending sync step against the current live workers.
    pub fn complete_ready_steps(&self) -> u32 {
        let live = self.live_ids();
        let mut updated =
            self.local_order.par_iter().filter(|block| self.try_complete(block, &mut block.lock(), &live)).count()
                as u32;
        updated += self.apply_ready_norms();
        if updated > 0 {
            self.publish_version();
            self.flush_checkpoints();
        }
        self.publish_gauges();
        updated
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use ps_proto::api::{self, GroupConfig, Init, TensorSpec};

    use super::*;
    use crate::optim::{Optimizer, OptimizerConfig, OptimizerState, StateError};
    use crate::spec::ModelSpec;
    use crate::store::{DecodedGradient, NoGradient, WaitFailure};

    /// An optimizer that fails, as a bug in one would.
    struct Failing;

    impl Optimizer for Failing {
        fn step(&mut self, _: &mut [f32], _: &[f32], _: &StepContext) {
            panic!("index out of range in a test optimizer");
        }
        fn state_bytes(&self) -> usize {
            0
        }
        fn state(&self) -> Vec<(&'static str, Vec<f32>)> {
            Vec::new()
        }
        fn export_state(&self) -> OptimizerState {
            OptimizerState::default()
        }
        fn import_state(&mut self, _: &OptimizerState) -> Result<(), StateError> {
            Ok(())
        }
    }

    /// Pushes of one step from several workers, some without a gradient.
    enum Pushed {
        Values(Vec<f32>),
        Nothing,
    }

    fn push_step(model: &Model, block: &Arc<Block>, step: u64, pushes: Vec<(&str, Pushed)>) {
        for (worker, pushed) in pushes {
            match pushed {
                Pushed::Values(values) => {
                    model.commit_push(worker, step, 1.0, vec![DecodedGradient(block.clone(), values)]).unwrap();
                }
                Pushed::Nothing => {
                    model
                        .commit_push(worker, step, 1.0, vec![NoGradient { block: block.clone(), overflow: false }])
                        .unwrap();
                }
            }
        }
    }

    /// An AdamW model of one 4-element block with members "a" and "b", and
    /// the same AdamW on its own to compute what the block must hold.
    fn adamw_pair() -> (Model, Arc<Block>, Box<dyn Optimizer>) {
        let group = GroupConfig::new("all", &["*"], OptimizerConfig::adamw(0.1));
        let tensor = TensorSpec::new("w", &[4], Init::Constant(1.0));
        let spec = ModelSpec::new(api::ModelSpec::new("m", vec![tensor], vec![group]), Vec::new()).unwrap();
        let model = Model::new(spec, 0, 1, Duration::from_secs(60));
        model.membership.join("a", None).unwrap();
        model.membership.join("b", None).unwrap();
        let block = model.local_blocks()[0].clone();
        let dims = crate::optim::Dims { rows: 4, cols: 1 };
        let slice = crate::optim::SliceInfo { name: "w", dims, matrix: false, projectable: None };
        (model, block, crate::optim::build(&OptimizerConfig::adamw(0.1), &slice))
    }

    #[test]
    fn a_step_without_any_gradient_leaves_the_block_and_adam_counts_only_its_updates() {
        let (model, block, mut adam) = adamw_pair();
        // As torch.optim would: step 1 on (g + 0) / 2, nothing at step 2, step 3 with t = 2.
        let mut expected = vec![1.0f32; 4];
        let g = vec![0.5, -1.0, 2.0, 0.25];
        push_step(&model, &block, 0, vec![("a", Pushed::Values(g.clone())), ("b", Pushed::Nothing)]);
        let half: Vec<f32> = g.iter().map(|v| v * 0.5).collect();
        adam.step(&mut expected, &half, &StepContext { t: 1, lr_scale: 1.0 });
        assert_eq!(block.snapshot(), (1, Arc::new(expected.clone())), "the missing part counts as zeros");
        let state_before = block.lock().optimizer.export_state();
        push_step(&model, &block, 1, vec![("b", Pushed::Nothing), ("a", Pushed::Nothing)]);
        assert_eq!(block.snapshot(), (2, Arc::new(expected.clone())), "no gradient anywhere: weights kept");
        assert_eq!(block.lock().optimizer.export_state(), state_before, "and the moments too");
        push_step(&model, &block, 2, vec![("a", Pushed::Values(g.clone())), ("b", Pushed::Values(g.clone()))]);
        adam.step(&mut expected, &g, &StepContext { t: 2, lr_scale: 1.0 });
        let (version, params) = block.snapshot();
        assert_eq!(version, 3);
        assert_eq!(
            params.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            expected.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "the third step is the block's second update"
        );
    }

    fn model() -> Model {
        let group = GroupConfig::new("all", &["*"], OptimizerConfig::sgd(0.1));
        let tensor = TensorSpec::new("w", &[4], Init::Constant(1.0));
        let spec = ModelSpec::new(api::ModelSpec::new("m", vec![tensor], vec![group]), Vec::new()).unwrap();
        Model::new(spec, 0, 1, Duration::from_secs(60))
    }

    #[tokio::test]
    async fn a_failing_update_keeps_the_gradient_and_takes_the_block_out_of_service() {
        let model = model();
        let block = model.local_blocks()[0].clone();
        block.replace_optimizer(Box::new(Failing));
        model.membership.join("a", None).unwrap();
        model.membership.join("b", None).unwrap();
        model.commit_push("a", 0, 1.0, vec![DecodedGradient(block.clone(), vec![1.0, 2.0, 3.0, 4.0])]).unwrap();
        let failed =
            model.commit_push("b", 0, 1.0, vec![DecodedGradient(block.clone(), vec![3.0, 2.0, 1.0, 0.0])]).unwrap_err();
        assert!(matches!(failed, ServerError::OptimizerFailed { step: 0, .. }), "{failed}");
        assert!(failed.to_string().contains("index out of range in a test optimizer"), "{failed}");
        // Nothing was lost or half-applied: the mean gradient is kept, the weights and version untouched.
        assert_eq!(block.failed_gradient(), Some(vec![2.0, 2.0, 2.0, 2.0]));
        assert_eq!(block.snapshot(), (0, Arc::new(vec![1.0; 4])));
        // Later pushes and waiting pulls are told at once instead of hanging.
        let again = model.commit_push("a", 0, 1.0, vec![DecodedGradient(block.clone(), vec![0.0; 4])]).unwrap_err();
        assert!(matches!(again, ServerError::OptimizerFailed { .. }), "{again}");
        let waited = block.wait_for_version(1, Duration::from_secs(30)).await;
        assert_eq!(waited, Err(WaitFailure::OptimizerFailed));
    }

    #[test]
    fn a_step_does_not_depend_on_the_order_its_pushes_arrive_in() {
        // In f32, (1e8 + 1) - 1e8 is 0 but (1e8 - 1e8) + 1 is 1: the order would show.
        let pushes = [("a", 1e8f32), ("b", 1.0), ("c", -1e8)];
        let run = |order: [usize; 3]| {
            let model = model();
            for (worker, _) in &pushes {
                model.membership.join(worker, None).unwrap();
            }
            let block = model.local_blocks()[0].clone();
            for i in order {
                let (worker, value) = pushes[i];
                model.commit_push(worker, 0, 1.0, vec![DecodedGradient(block.clone(), vec![value; 4])]).unwrap();
            }
            block.snapshot().1.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
        };
        let first = run([0, 1, 2]);
        for order in [[2, 0, 1], [1, 2, 0], [0, 2, 1]] {
            assert_eq!(run(order), first, "{order:?}");
        }
        // The step used the exact mean 1/3 (lr 0.1 from 1.0), not the 0 an f32 sum gives in some orders.
        assert_eq!(first[0], (1.0f32 - 0.1 * (1.0 / 3.0)).to_bits());
    }

    #[test]
    fn a_pushed_lr_scale_multiplies_the_step_and_every_push_of_it_must_agree() {
        let model = model();
        model.membership.join("a", None).unwrap();
        model.membership.join("b", None).unwrap();
        let block = model.local_blocks()[0].clone();
        let g = vec![1.0f32, -2.0, 0.5, 4.0];
        model.commit_push("a", 0, 0.5, vec![DecodedGradient(block.clone(), g.clone())]).unwrap();
        let refused = model.commit_push("b", 0, 0.25, vec![DecodedGradient(block.clone(), g.clone())]).unwrap_err();
        assert!(matches!(refused, ServerError::LrScaleMismatch { step: 0, .. }), "{refused}");
        assert!(refused.to_string().contains("first push carried 0.5"), "{refused}");
        assert_eq!(block.snapshot(), (0, Arc::new(vec![1.0; 4])), "the refused push changed nothing");
        model.commit_push("b", 0, 0.5, vec![DecodedGradient(block.clone(), g.clone())]).unwrap();
        let lr = (f64::from(0.1f32) * 0.5) as f32;
        let expected: Vec<f32> = g.iter().map(|v| 1.0 - lr * v).collect();
        assert_eq!(block.snapshot(), (1, Arc::new(expected.clone())), "SGD with lr 0.1 x 0.5");
        // A scale of 0 (a warmup's first step) is an update with lr 0, as torch's would be.
        model.commit_push("a", 1, 0.0, vec![DecodedGradient(block.clone(), g.clone())]).unwrap();
        model.commit_push("b", 1, 0.0, vec![DecodedGradient(block.clone(), g)]).unwrap();
        assert_eq!(block.snapshot(), (2, Arc::new(expected)));
    }

    #[test]
    fn one_workers_overflow_skips_the_step_for_all_and_is_counted() {
        let (model, block, mut adam) = adamw_pair();
        let g = vec![0.5f32, -1.0, 2.0, 0.25];
        let fresh = block.lock().optimizer.export_state();
        model.commit_push("a", 0, 1.0, vec![DecodedGradient(block.clone(), g.clone())]).unwrap();
        model.commit_push("b", 0, 1.0, vec![NoGradient { block: block.clone(), overflow: true }]).unwrap();
        assert_eq!(block.pull_view(), (1, 1, Arc::new(vec![1.0; 4])), "skipped and counted");
        assert_eq!(block.lock().optimizer.export_state(), fresh, "AdamW has not stepped");
        // The next clean step is AdamW's first: t = 1, as torch's after a skipped scaler.step().
        model.commit_push("a", 1, 1.0, vec![DecodedGradient(block.clone(), g.clone())]).unwrap();
        model.commit_push("b", 1, 1.0, vec![DecodedGradient(block.clone(), g.clone())]).unwrap();
        let mut expected = vec![1.0f32; 4];
        adam.step(&mut expected, &g, &StepContext { t: 1, lr_scale: 1.0 });
        assert_eq!(block.pull_view(), (2, 1, Arc::new(expected)));
    }
}
