//! `GRAD_CLIP_MEAN`: each sync step's mean gradient clipped by its L2 norm
//! over the whole model, as `clip_grad_norm_` after DDP's all-reduce clips it.
//! No shard holds the whole gradient, so the norm is put together from parts.
//! A block whose step is complete computes its mean, adds the sum of its
//! squares to this shard's part of the step, and waits
//! ([`AwaitingNorm`]). Once every local block of the step has reported, this
//! shard's part goes to the peers through the model's outbox (the RPC layer
//! sends it); once every shard's part is in, the total, summed in shard order
//! so that every shard gets the same bits, gives the factor, and every waiting
//! block is scaled and updated. Majority-vote blocks take no part (a scale
//! does not change a vote), nor do buffers (values, not gradients).

use std::collections::BTreeMap;

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
    /// The sum over its blocks, in block order, of the squares of the step's mean gradient.
    pub sum_of_squares: f64,
}

/// The parts of the steps' norms that have arrived.
#[derive(Debug, Default)]
pub(crate) struct NormExchange {
    steps: BTreeMap<u64, StepParts>,
}

#[derive(Debug, Default)]
struct StepParts {
    /// This shard's blocks, by (tensor, block): block order.
    blocks: BTreeMap<(usize, u32), f64>,
    /// Each shard's whole part, this one's included once its blocks are all in.
    shards: BTreeMap<u32, f64>,
}

impl NormExchange {
    /// Records one local block's part of `step`; returns this shard's sum when
    /// that completes it (`blocks` local blocks take part).
    fn add_block(&mut self, step: u64, key: (usize, u32), sum_of_squares: f64, blocks: usize) -> Option<f64> {
        let parts = self.steps.entry(step).or_default();
        parts.blocks.insert(key, sum_of_squares);
        (parts.blocks.len() == blocks).then(|| parts.blocks.values().sum())
    }

    /// Records a shard's part of `step`; a part heard again is kept as first heard.
    fn add_shard(&mut self, step: u64, shard: u32, sum_of_squares: f64) {
        self.steps.entry(step).or_default().shards.entry(shard).or_insert(sum_of_squares);
    }

    /// Removes the lowest step whose every shard's part is in; returns it with
    /// the total sum of squares, added in shard order.
    fn take_complete(&mut self, shards: &[u32]) -> Option<(u64, f64)> {
        let (&step, parts) = self.steps.iter().next()?;
        if !shards.iter().all(|s| parts.shards.contains_key(s)) {
            return None;
        }
        let total = shards.iter().map(|s| parts.shards[s]).sum();
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
        if let Some(part) = exchange.add_block(step, (block.tensor, block.index), sum_of_squares, self.norm_blocks) {
            exchange.add_shard(step, self.shard, part);
            self.send_part(NormPart {
                model: self.spec.name.clone(),
                epoch: self.epoch(),
                step,
                shard: self.shard,
                sum_of_squares: part,
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

    /// A peer's part of a step's norm; updates the blocks if it was the last
    /// part missing. Locks blocks: call it off the reactor.
    pub fn receive_norm(&self, step: u64, shard: u32, sum_of_squares: f64) -> Result<u32, ServerError> {
        self.check_serving()?;
        if !self.norm_shards.contains(&shard) || !sum_of_squares.is_finite() || sum_of_squares < 0.0 {
            return Err(ServerError::BadNormPart { model: self.spec.name.clone(), shard, step });
        }
        let (low, high) = self.version_range();
        let ahead = self.spec.options.mode.window().unwrap_or(0);
        if step > high + ahead {
            return Err(ServerError::FutureNormPart { model: self.spec.name.clone(), step, version: high });
        }
        // A part of a step every block is past: heard before; nothing to do.
        if step >= low {
            self.norms.lock().add_shard(step, shard, sum_of_squares);
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
    fn a_step_is_complete_once_every_shard_is_in_and_the_total_is_summed_in_shard_order() {
        let mut exchange = NormExchange::default();
        assert_eq!(exchange.add_block(4, (0, 1), 2.0, 2), None, "one of two local blocks");
        assert_eq!(exchange.add_block(4, (0, 0), 1.0, 2), Some(3.0));
        exchange.add_shard(4, 0, 3.0);
        assert_eq!(exchange.take_complete(&[0, 1]), None, "shard 1 is missing");
        exchange.add_shard(4, 1, 1e-17);
        exchange.add_shard(4, 1, 5.0);
        assert_eq!(exchange.take_complete(&[0, 1]), Some((4, 3.0 + 1e-17)), "the first part heard is kept");
        assert_eq!(exchange.take_complete(&[0, 1]), None, "taken once");
    }

    #[test]
    fn the_factor_is_clip_grad_norms() {
        assert_eq!(clip_factor(25.0, 1.0), Some((1.0 / (5.0 + 1e-6)) as f32));
        assert_eq!(clip_factor(0.25, 1.0), None);
    }
}
