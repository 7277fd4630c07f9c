//! One model's part in an online reshard: held at a step boundary (no push
//! for a later step is taken, so every block stops at one version), and
//! copies of its blocks at that version for the shards that hold them under
//! the new layout (this one included).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::snapshot::install_block;
use super::{BlockSnapshot, Model, ModelSnapshot, fresh_block};
use crate::error::ServerError;
use crate::spec::ModelSpec;
use crate::store::block::Block;

/// Why a model cannot be held at a version.
fn passed(model: &Model, version: u64, why: String) -> ServerError {
    passed_in(&model.spec, version, why)
}

impl Model {
    /// Stops the model at `version`: from now on no push for step `version`
    /// or later is taken (they are refused with `resharding`; clients retry),
    /// so every block stops once it gets there. Fails, holding nothing, where
    /// a block is past `version` or already counts pushes of such a step.
    pub fn hold_at(&self, version: u64) -> Result<(), ServerError> {
        let passed = |model: &Model, version: u64, reason: String| ServerError::BoundaryPassed {
            model: model.spec.name.clone(),
            version,
            reason,
        };
        let mut hold = self.hold.write();
        if hold.is_some_and(|held| held != version) {
            return Err(passed(self, version, format!("the model is already held at version {}", hold.unwrap_or(0))));
        }
        for block in &self.local_order {
            let state = block.lock();
            let tensor = &self.spec.tensors[block.tensor].name;
            let awaiting = state.awaiting.as_ref().map(|a| a.step);
            let counted = state.pending.keys().copied().chain(awaiting).filter(|step| *step >= version).max();
            if state.version > version {
                return Err(passed(
                    self,
                    version,
                    format!("block {} of '{tensor}' is at version {} already", block.index, state.version),
                ));
            }
            if let Some(step) = counted {
                return Err(passed(
                    self,
                    version,
                    format!("block {} of '{tensor}' has taken pushes of step {step} already", block.index),
                ));
            }
        }
        *hold = Some(version);
        Ok(())
    }

    /// Takes pushes of every step again (an aborted reshard).
    pub fn release_hold(&self) {
        *self.hold.write() = None;
    }

    /// The version the model is held at, if it is.
    pub fn held_at(&self) -> Option<u64> {
        *self.hold.read()
    }

    /// Refuses a push of `step` while the model is `held` before it.
    pub(super) fn check_hold(&self, held: Option<u64>, step: u64) -> Result<(), ServerError> {
        match held {
            Some(version) if step >= version => Err(passed(
                self,
                version,
                "the shards are moving blocks between them at this step boundary; retry shortly".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Refuses a push of `step` at once while the model is held before it (the
    /// commit checks again, under the hold's lock).
    pub fn refuse_if_held(&self, step: u64) -> Result<(), ServerError> {
        self.check_hold(self.held_at(), step)
    }

    /// Whether every block of this shard is at the version the model is held at.
    pub fn reached_hold(&self) -> bool {
        let Some(version) = self.held_at() else { return false };
        self.local_order.iter().all(|b| {
            let state = b.lock();
            state.version == version && state.awaiting.is_none() && state.pending.is_empty()
        })
    }

    /// Copies of the blocks `wanted` (tensor name, block index), with the spec
    /// and the members, for a shard that takes them over. Only while the model
    /// is held at `version` and every block is there, so the copies are the
    /// blocks at `version` and stay so.
    pub fn copies_at(&self, version: u64, wanted: &[(String, u32)]) -> Result<ModelSnapshot, ServerError> {
        if self.held_at() != Some(version) || !self.reached_hold() {
            return Err(passed(
                self,
                version,
                format!("this shard does not hold the model at version {version}; its blocks cannot be copied at it"),
            ));
        }
        let started = Instant::now();
        let mut blocks = Vec::with_capacity(wanted.len());
        for (tensor, index) in wanted {
            let block = self.block(tensor, *index)?;
            blocks.push(self.block_snapshot(block, &block.lock()));
        }
        Ok(self.snapshot_of(version, blocks, started.elapsed().as_secs_f64()))
    }
}

impl Model {
    /// This shard's part of a model under the layout of `num_shards` shards, at
    /// `version`: every block this shard holds in `kept` (its copy under the old
    /// layout, held at `version`) is carried over as it is, not copied; the
    /// others come from `received`, installed as a checkpoint's blocks are.
    /// `members` join with their ranks. Not yet shared.
    #[allow(clippy::too_many_arguments)]
    pub fn assembled(
        spec: ModelSpec,
        shard: u32,
        num_shards: u32,
        lease: Duration,
        version: u64,
        kept: Option<&Model>,
        received: Vec<BlockSnapshot>,
        members: &[(String, u32)],
    ) -> Result<Model, ServerError> {
        let count = received.len();
        let received: HashMap<(String, u32), BlockSnapshot> =
            received.into_iter().map(|b| ((b.tensor.clone(), b.block), b)).collect();
        let fail = |spec: &ModelSpec, why: String| passed_in(spec, version, why);
        let model = Model::with_blocks(spec, shard, num_shards, lease, |spec, b| {
            let name = &spec.tensors[b.tensor].name;
            if let Some(saved) = received.get(&(name.clone(), b.block)) {
                if saved.version != version {
                    return Err(fail(
                        spec,
                        format!("block {} of '{name}' arrived at version {}", b.block, saved.version),
                    ));
                }
                let block = fresh_block(spec, b, false);
                install_block(&block, saved).map_err(|e| fail(spec, format!("block {} of '{name}': {e}", b.block)))?;
                return Ok(Arc::new(block));
            }
            match kept.and_then(|m| m.local.get(&(b.tensor, b.block))) {
                Some(block) if block.version() == version => Ok(block.clone()),
                _ => Err(fail(spec, format!("block {} of '{name}' was neither received nor held here", b.block))),
            }
        })?;
        let installed = model.local_order.iter().filter(|b| !kept.is_some_and(|k| k.holds(b))).count();
        if installed != count {
            return Err(fail(&model.spec, format!("{count} blocks arrived, {installed} of them are this shard's")));
        }
        for (worker, rank) in members {
            model
                .membership
                .join(worker, Some(*rank))
                .map_err(|e| fail(&model.spec, format!("member '{worker}': {e}")))?;
        }
        model.publish_live_workers();
        Ok(model)
    }

    /// Whether `block` (the very block, not a copy) is one of this copy's.
    fn holds(&self, block: &Arc<Block>) -> bool {
        self.local.get(&(block.tensor, block.index)).is_some_and(|own| Arc::ptr_eq(own, block))
    }

    /// Takes this copy out of service after an online reshard replaced it with
    /// `next`: as [`Model::retire`], except that the blocks `next` carried over
    /// stay in service there.
    pub fn retire_into(&self, next: &Model) {
        self.retired.store(true, Ordering::Release);
        self.checkpoints.retire();
        for block in self.local_order.iter().filter(|b| !next.holds(b)) {
            block.retire();
        }
    }
}

fn passed_in(spec: &ModelSpec, version: u64, why: String) -> ServerError {
    let reason = format!("online reshard at version {version}: {why}");
    ServerError::Resharding { model: spec.name.clone(), version, reason }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ps_proto::api::{self, GroupConfig, Init, OptimizerConfig, TensorSpec};
    use ps_proto::pb;

    use super::*;
    use crate::spec::ModelSpec;
    use crate::store::DecodedGradient;

    fn model() -> Model {
        let tensors = vec![TensorSpec::new("w", &[4, 3], Init::Constant(0.5))];
        let groups = vec![GroupConfig::new("all", &["*"], OptimizerConfig::adamw(0.01))];
        let spec = ModelSpec::try_from(pb::ModelSpec::from(&api::ModelSpec::new("m", tensors, groups))).unwrap();
        let model = Model::new(spec, 0, 1, Duration::from_secs(60));
        for (worker, rank) in [("w0", 0), ("w1", 1)] {
            model.membership.join(worker, Some(rank)).unwrap();
        }
        model
    }

    fn push(model: &Model, worker: &str, step: u64) -> Result<(), ServerError> {
        let grads = model.local_blocks().iter().map(|b| DecodedGradient(b.clone(), vec![0.25; b.len])).collect();
        model.commit_push(worker, step, 1.0, grads).map(|_| ())
    }

    fn step(model: &Model, step: u64) {
        push(model, "w0", step).unwrap();
        push(model, "w1", step).unwrap();
    }

    #[test]
    fn a_held_model_takes_the_steps_before_the_boundary_and_refuses_the_rest() {
        let model = model();
        step(&model, 0);
        let passed = model.hold_at(0).unwrap_err();
        assert!(matches!(passed, ServerError::BoundaryPassed { version: 0, .. }), "{passed}");
        model.hold_at(2).unwrap();
        assert!(!model.reached_hold());
        assert!(model.copies_at(2, &[]).is_err(), "copied before the blocks got there");
        step(&model, 1);
        let refused = push(&model, "w0", 2).unwrap_err();
        assert!(matches!(refused, ServerError::Resharding { version: 2, .. }), "{refused}");
        assert!(model.reached_hold());
        let copies = model.copies_at(2, &[("w".to_string(), 0)]).unwrap();
        assert_eq!((copies.version, copies.blocks.len(), copies.members.len()), (2, 1, 2));
        assert_eq!(copies.blocks[0].version, 2);
        assert!(model.copies_at(3, &[]).is_err());
        assert!(model.hold_at(3).is_err(), "held at two versions");
        model.release_hold();
        step(&model, 2);
        assert_eq!(model.version_range(), (3, 3));
    }

    #[test]
    fn a_boundary_with_a_counted_push_past_it_is_refused() {
        let model = model();
        step(&model, 0);
        push(&model, "w0", 1).unwrap();
        let passed = model.hold_at(1).unwrap_err();
        assert!(passed.to_string().contains("has taken pushes of step 1"), "{passed}");
        assert_eq!(model.held_at(), None);
        model.hold_at(2).unwrap();
        push(&model, "w1", 1).unwrap();
        assert!(model.reached_hold());
    }
}
