//! Worker-side state kept at the versions the servers checkpoint. A rollback
//! (a shard restarted from its checkpoint) sends the run back to one of them;
//! a worker that restores what it had there (residual, momentum, data
//! position) redoes the steps since exactly as the first time.

use std::collections::BTreeMap;

use crate::model::Weights;

/// Versions of state kept by default: more than the servers keep checkpoints (3).
pub const DEFAULT_KEPT: usize = 8;

/// A worker's own state (any `Clone` value) at the last few checkpointed versions.
#[derive(Clone, Debug)]
pub struct ResumePoints<T> {
    by_version: BTreeMap<u64, T>,
    kept: usize,
}

impl<T: Clone> Default for ResumePoints<T> {
    fn default() -> Self {
        Self::new(DEFAULT_KEPT)
    }
}

impl<T: Clone> ResumePoints<T> {
    /// Keeps the state of the last `kept` checkpointed versions.
    pub fn new(kept: usize) -> Self {
        Self { by_version: BTreeMap::new(), kept: kept.max(1) }
    }

    /// Call after each pull of the step's weights, before computing the step:
    /// keeps the state `state` gives if the servers checkpoint this version (or
    /// `always`, for the version a worker starts at); otherwise `state` is not called.
    pub fn record(&mut self, weights: &Weights, always: bool, state: impl FnOnce() -> T) {
        if weights.checkpoint || always {
            self.by_version.insert(weights.version, state());
            while self.by_version.len() > self.kept {
                self.by_version.pop_first();
            }
        }
    }

    /// The state kept at `version`, after a rollback there; later ones are
    /// dropped (they belong to the abandoned run). None if it was not kept.
    pub fn rewind(&mut self, version: u64) -> Option<T> {
        self.by_version.retain(|v, _| *v <= version);
        self.by_version.get(&version).cloned()
    }

    /// Versions kept, ascending.
    pub fn versions(&self) -> Vec<u64> {
        self.by_version.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tensors;

    fn pulled(version: u64, checkpoint: bool) -> Weights {
        Weights { version, newest: version, tensors: Tensors::new(), bytes: 0, checkpoint, overflow_steps: 0 }
    }

    #[test]
    fn marked_versions_are_kept_and_a_rewind_drops_the_later_ones() {
        let mut points = ResumePoints::new(3);
        points.record(&pulled(0, false), true, || "start");
        for v in 1..=12 {
            points.record(&pulled(v, v % 5 == 0), false, || "state");
        }
        assert_eq!(points.versions(), vec![0, 5, 10]);
        points.record(&pulled(15, true), false, || "fifteen");
        assert_eq!(points.versions(), vec![5, 10, 15], "the oldest goes");
        assert_eq!(points.rewind(10), Some("state"));
        assert_eq!(points.versions(), vec![5, 10]);
        assert_eq!(points.rewind(7), None, "7 was never checkpointed");
    }
}
