//! A shard's checkpoints across an online reshard. Before the switch, the
//! shard writes its part of each model under the new layout, at the version
//! the change is made at, into a staging directory beside the model's own
//! (`.reshard-staging-<model>`, under the new shard count); at the switch the
//! old layout's checkpoints move under `.before-reshard/` and the staged one
//! takes their place, so the directory holds a checkpoint a restart on the new
//! list restores at every moment but between two renames. An aborted change
//! removes the staging directory.

use std::fs;
use std::path::PathBuf;

use super::{CheckpointError, CheckpointStore, escape, io_error, set_aside, sync_dir};
use crate::store::ModelSnapshot;

impl CheckpointStore {
    fn staging(&self, model: &str) -> PathBuf {
        self.root.join(format!(".reshard-staging-{}", escape(model)))
    }

    /// Writes `snapshot` (this shard's part of a model under the new layout of
    /// `snapshot.num_shards` shards) into the model's staging directory.
    pub fn stage(&self, snapshot: ModelSnapshot) -> Result<u64, CheckpointError> {
        let staging = self.staging(&snapshot.model);
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io_error(&staging))?;
        }
        let store = CheckpointStore::new(staging, usize::MAX, self.shard, snapshot.num_shards)?;
        Ok(store.write(snapshot)?.bytes)
    }

    /// Forgets what [`Self::stage`] wrote for `model` (an aborted change).
    pub fn unstage(&self, model: &str) {
        let staging = self.staging(model);
        if staging.exists()
            && let Err(error) = fs::remove_dir_all(&staging)
        {
            tracing::warn!(path = %staging.display(), %error, "could not remove a staged checkpoint");
        }
    }

    /// The switch to `num_shards` shards: each model's checkpoints of the old
    /// layout (with the version the change was made at) go under
    /// `.before-reshard/<old count>-shards-v<version>-online/`, and its staged
    /// checkpoint, if any, takes their place; checkpoints are written for the
    /// new count from now on. Returns where the old ones went.
    pub fn relayout(&self, models: &[(String, u64)], num_shards: u32) -> Result<Vec<PathBuf>, CheckpointError> {
        let mut moved = Vec::new();
        for (model, version) in models {
            let aside_name = format!("{}-shards-v{version}-online", self.count());
            moved.extend(set_aside(&self.root, model, &aside_name)?);
            self.pins.lock().remove(model);
            let staged = self.staging(model).join(escape(model));
            if staged.exists() {
                let target = self.root.join(escape(model));
                fs::rename(&staged, &target).map_err(io_error(&target))?;
                let staging = self.staging(model);
                fs::remove_dir_all(&staging).map_err(io_error(&staging))?;
            }
        }
        self.num_shards.store(num_shards, std::sync::atomic::Ordering::Release);
        sync_dir(&self.root)?;
        Ok(moved)
    }
}
