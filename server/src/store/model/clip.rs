//! `GRAD_CLIP_MEAN`: each sync step's mean gradient clipped by its L2 norm
//! over the whole model, as `clip_grad_norm_` after DDP's all-reduce clips it.
//! No shard holds the whole gradient, so the norm is put together from parts.
//! A block whose step is complete computes its mean, adds the sum of its
//! squares to this shard's part of the step, and waits
//! ([`AwaitingNorm`]). Once every local block of the step has reported, this
//! shard's part (each block's sum) goes to the peers through the model's
//! outbox (the RPC layer sends it); once every shard's part is in, the total,
//! the blocks' sums added in (tensor, block) order so that every shard gets
//! the same bits whatever the placement (a resharded run clips as the run it
//! continues), gives the factor, and every waiting block is scaled and updated. Majority-vote blocks take no part (a scale
//! does not change a vote), nor do buffers (values, not gradients).

use std::collections::{BTreeMap, BTreeSet};

use rayon::prelude::*;

use super::Model;
use crate::error::ServerError;
use crate::metrics as m;
use crate::store::block::{AwaitingNorm, Block, BlockState};

/// One shard's part of a step's norm, on its way to the peers.
#[derive(Clone, Debug, PartialEq)]
pub struct NormPart {
    /// The model.
    pub model: String,
    /// The model's epoch when the part was made.
    pub epoch: u64,
    /// The step.
    pub step: u64,
    /// The sending shard.
    pub shard: u32,
    /// Each of its blocks of the norm, by (tensor index, block), with the sum
    /// of the squares of its part of the step's mean gradient; in that order.
    pub blocks: Vec<((usize, u32), f64)>,
}

impl NormPart {
    /// The sum of the part's blocks, in block order (what the shard contributes; for logs).
    pub fn sum_of_squares(&self) -> f64 {
        self.blocks.iter().map(|(_, sum)| sum).sum()
    }
}

/// The parts of the steps' norms that have arrived.
#[derive(Debug, Default)]
pub(crate) struct NormExchange {
    steps: BTreeMap<u64, StepParts>,
}

#[derive(Debug, Default)]
struct StepParts {
    /// This shard's blocks heard so far, by (tensor, block).
    local: BTreeMap<(usize, u32), f64>,
    /// Every block of the shards whose whole part is in, this one's included
    /// once its blocks are all in, by (tensor, block).
    blocks: BTreeMap<(usize, u32), f64>,
    /// The shards whose whole part is in.
    shards: BTreeSet<u32>,
}

impl NormExchange {
    /// Records one local block's part of `step`; returns this shard's blocks
    /// when that completes its part (`blocks` local blocks take part).
    fn add_block(
        &mut self,
        step: u64,
        key: (usize, u32),
        sum_of_squares: f64,
        blocks: usize,
    ) -> Option<Vec<((usize, u32), f64)>> {
        let parts = self.steps.entry(step).or_default();
        parts.local.insert(key, sum_of_squares);
        (parts.local.len() == blocks).then(|| parts.local.iter().map(|(k, v)| (*k, *v)).collect())
    }

    /// Records a shard's part of `step`; a part heard again is kept as first heard.
    fn add_shard(&mut self, step: u64, shard: u32, blocks: &[((usize, u32), f64)]) {
        let parts = self.steps.entry(step).or_default();
        if parts.shards.insert(shard) {
            for (key, sum) in blocks {
                parts.blocks.entry(*key).or_insert(*sum);
            }
        }
    }

    /// Removes the lowest step whose every shard's part is in; returns it with
    /// the total sum of squares, its blocks added in (tensor, block) order.
    fn take_complete(&mut self, shards: &[u32]) -> Option<(u64, f64)> {
        let (&step, parts) = self.steps.iter().next()?;
        if !shards.iter().all(|s| parts.shards.contains(s)) {
            return None;
        }
        let total = parts.blocks.values().sum();
        self.steps.remove(&step);
        Some((step, total))
    }
}

/// The factor `clip_grad_norm_` scales by: `max_norm / (norm + 1e-6)` when the norm is above `max_norm`.
pub(crate) fn clip_factor(sum_of_squares: f64, max_norm: f64) -> Option<f32> {
    let norm = sum_of_squares.sqrt();
    (norm > max_norm).then(|| (max_norm / (norm + 1e-6)) as f32)
}

impl Model {
    /// Whether `block`'s steps wait for the model's norm before their update.
    pub(super) fn clips_mean(&self, block: &Block) -> bool {
        self.spec.options.shard_max_grad_norm > 0.0 && self.spec.groups[block.group].clipped()
    }

    /// Parks a complete step's mean gradient (None: no push had one) until the
    /// norm is known, and adds its part; this shard's part goes out once whole.
    pub(super) fn await_norm(&self, block: &Block, state: &mut BlockState, awaiting: AwaitingNorm) {
        let sum_of_squares =
            awaiting.gradient.as_ref().map_or(0.0, |g| g.iter().map(|&x| f64::from(x) * f64::from(x)).sum());
        let step = awaiting.step;
        state.awaiting = Some(awaiting);
        let mut exchange = self.norms.lock();
        if let Some(blocks) = exchange.add_block(step, (block.tensor, block.index), sum_of_squares, self.norm_blocks) {
            exchange.add_shard(step, self.shard, &blocks);
            self.send_part(NormPart {
                model: self.spec.name.clone(),
                epoch: self.epoch(),
                step,
                shard: self.shard,
                blocks,
            });
        }
    }

    /// The shards whose blocks take part in the norm of the steps, in index order.
    pub fn norm_shards(&self) -> &[u32] {
        &self.norm_shards
    }

    fn send_part(&self, part: NormPart) {
        // No outbox (a model not in a registry, as in unit tests): nobody to tell.
        if let Some(outbox) = self.outbox.get() {
            let _ = outbox.send(part);
        }
    }

    /// The blocks of the norm that `shard` holds, by (tensor, block), in that order.
    fn norm_blocks_of(&self, shard: u32) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.plan
            .iter()
            .filter(move |b| b.shard == shard && self.spec.groups[self.spec.tensors[b.tensor].group].clipped())
            .map(|b| (b.tensor, b.block))
    }

    /// A peer's part of a step's norm: each of its blocks of the norm, once, with
    /// a finite sum of squares. Updates the blocks if it was the last part
    /// missing. Locks blocks: call it off the reactor.
    pub fn receive_norm(&self, step: u64, shard: u32, blocks: &[((usize, u32), f64)]) -> Result<u32, ServerError> {
        self.check_serving()?;
        let fits = self.norm_shards.contains(&shard)
            && blocks.iter().all(|(_, sum)| sum.is_finite() && *sum >= 0.0)
            && blocks.iter().map(|(key, _)| *key).eq(self.norm_blocks_of(shard));
        if !fits {
            return Err(ServerError::BadNormPart { model: self.spec.name.clone(), shard, step });
        }
        let (low, high) = self.version_range();
        let ahead = self.spec.options.mode.window().unwrap_or(0);
        if step > high + ahead {
            return Err(ServerError::FutureNormPart { model: self.spec.name.clone(), step, version: high });
        }
        // A part of a step every block is past: heard before; nothing to do.
        if step >= low {
            self.norms.lock().add_shard(step, shard, blocks);
        }
        Ok(self.apply_ready_norms())
    }

    /// Updates the waiting blocks of every step whose norm is complete, then
    /// the steps that were waiting behind them; returns the blocks updated.
    pub(super) fn apply_ready_norms(&self) -> u32 {
        if self.spec.options.shard_max_grad_norm <= 0.0 {
            return 0;
        }
        let mut updated = 0;
        loop {
            let Some((step, total)) = self.norms.lock().take_complete(&self.norm_shards) else { break };
            let factor = clip_factor(total, self.spec.options.shard_max_grad_norm);
            metrics::gauge!(m::GRAD_NORM, "model" => self.spec.name.clone()).set(total.sqrt());
            if factor.is_some() {
                metrics::counter!(m::CLIPPED_STEPS, "model" => self.spec.name.clone()).increment(1);
            }
            let live = self.live_ids();
            updated += self
                .local_order
                .par_iter()
                .map(|block| {
                    let mut state = block.lock();
                    let waiting = state.awaiting.as_ref().is_some_and(|a| a.step == step);
                    let mut ran = 0;
                    if waiting && let Some(awaiting) = state.awaiting.take() {
                        ran += u32::from(self.apply_clipped(block, &mut state, awaiting, factor));
                        // A later step may have been complete behind this one (bounded staleness).
                        ran += u32::from(self.try_complete(block, &mut state, &live));
                    }
                    ran
                })
                .sum::<u32>();
        }
        if updated > 0 {
            self.publish_version();
            self.flush_checkpoints();
        }
        updated
    }

    fn apply_clipped(
        &self,
        block: &Block,
        state: &mut BlockState,
        awaiting: AwaitingNorm,
        factor: Option<f32>,
    ) -> bool {
        let AwaitingNorm { gradient, lr_scale, contributors, overflow, .. } = awaiting;
        state.last_contributors = contributors;
        let Some(mut gradient) = gradient else {
            self.skip(block, state, overflow);
            return true;
        };
        if let Some(factor) = factor {
            for g in gradient.iter_mut() {
                *g *= factor;
            }
        }
        self.update(block, state, gradient, lr_scale)
    }
}

/// The shards whose blocks take part in the norm of `model`'s steps, in index order.
pub(super) fn norm_shards(spec: &crate::spec::ModelSpec, plan: &[ps_proto::layout::BlockPlan]) -> Vec<u32> {
    let mut shards: Vec<u32> =
        plan.iter().filter(|b| spec.groups[spec.tensors[b.tensor].group].clipped()).map(|b| b.shard).collect();
    shards.sort_unstable();
    shards.dedup();
    shards
}

/// Unit tests of the exchange; the whole path is in `barrier`'s tests and `tests/it`.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_is_complete_once_every_shard_is_in_and_the_total_is_summed_in_block_order() {
        // Half an ulp of 1.0: lost when added to 1.0 alone, kept when two are added first.
        let tiny = f64::EPSILON / 2.0;
        let mut exchange = NormExchange::default();
        assert_eq!(exchange.add_block(4, (0, 2), tiny, 2), None, "one of two local blocks");
        let local = exchange.add_block(4, (0, 0), tiny, 2).unwrap();
        assert_eq!(local, [((0, 0), tiny), ((0, 2), tiny)], "this shard's blocks, in block order");
        exchange.add_shard(4, 0, &local);
        assert_eq!(exchange.take_complete(&[0, 1]), None, "shard 1 is missing");
        exchange.add_shard(4, 1, &[((0, 1), 1.0)]);
        exchange.add_shard(4, 1, &[((0, 1), 5.0)]);
        let (block_order, shard_order) = ((tiny + 1.0) + tiny, (tiny + tiny) + 1.0);
        assert_ne!(block_order, shard_order, "the order shows in the bits");
        assert_eq!(exchange.take_complete(&[0, 1]), Some((4, block_order)), "first heard kept, block order");
        assert_eq!(exchange.take_complete(&[0, 1]), None, "taken once");
    }

    #[test]
    fn a_peers_part_must_name_exactly_its_blocks_of_the_norm_with_finite_sums() {
        use std::time::Duration;

        use ps_proto::api::{self, GroupConfig, Init, OptimizerConfig, TensorSpec};

        let tensors = vec![TensorSpec::new("w", &[8], Init::Constant(1.0))];
        let groups = vec![GroupConfig::new("all", &["*"], OptimizerConfig::sgd(0.1))];
        let mut spec = api::ModelSpec::new("m", tensors, groups);
        spec.max_grad_norm = 1.0;
        spec.max_block_elements = 2;
        let spec = crate::spec::ModelSpec::new(spec, Vec::new()).unwrap();
        let model = Model::new(spec, 0, 2, Duration::from_secs(60));
        let (ours, theirs): (Vec<_>, Vec<_>) = (model.norm_blocks_of(0).collect(), model.norm_blocks_of(1).collect());
        assert_eq!((ours.len(), theirs.len()), (2, 2), "4 blocks of 2 over 2 shards");
        let part = |keys: &[(usize, u32)], sum: f64| keys.iter().map(|k| (*k, sum)).collect::<Vec<_>>();
        let reversed: Vec<_> = theirs.iter().rev().copied().collect();
        for bad in [part(&theirs[..1], 1.0), part(&ours, 1.0), part(&reversed, 1.0), part(&theirs, f64::NAN)] {
            let refused = model.receive_norm(0, 1, &bad);
            assert!(matches!(refused, Err(ServerError::BadNormPart { shard: 1, .. })), "{bad:?}: {refused:?}");
        }
        assert!(matches!(model.receive_norm(0, 1, &part(&theirs, -1.0)), Err(ServerError::BadNormPart { .. })));
        assert!(matches!(model.receive_norm(0, 5, &part(&theirs, 1.0)), Err(ServerError::BadNormPart { .. })));
        assert_eq!(model.receive_norm(0, 1, &part(&theirs, 1.0)).unwrap(), 0, "taken; this shard's part is missing");
    }

    #[test]
    fn the_factor_is_clip_grad_norms() {
        assert_eq!(clip_factor(25.0, 1.0), Some((1.0 / (5.0 + 1e-6)) as f32));
        assert_eq!(clip_factor(0.25, 1.0), None);
    }
}
