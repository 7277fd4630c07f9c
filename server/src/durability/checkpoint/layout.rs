//! Which shard and cluster size a checkpoint directory belongs to: a shard
//! refuses a directory that another shard index or shard count wrote, since
//! starting on it would train the model afresh and prune the run
//! (`ctl reshard` rewrites such checkpoints for another count).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use super::{CheckpointError, CheckpointStore, read_manifest, version_dir, versions_in};

/// Checkpoints of one model under a shard's directory that another shard, or a
/// cluster of another size, wrote: this shard cannot restore them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignCheckpoints {
    /// The model.
    pub model: String,
    /// The versions, ascending.
    pub versions: Vec<u64>,
    /// The shard that wrote them.
    pub shard: u32,
    /// The size of the cluster that wrote them.
    pub num_shards: u32,
}

/// What a shard found in its directory and what the operator can do about it.
pub(super) fn describe_foreign(root: &Path, shard: u32, num_shards: u32, found: &[ForeignCheckpoints]) -> String {
    let listed: Vec<String> = found
        .iter()
        .map(|f| {
            format!("model '{}' versions {:?} written by shard {} of {}", f.model, f.versions, f.shard, f.num_shards)
        })
        .collect();
    let mut text = format!(
        "{} holds checkpoints this shard (shard {shard} of {num_shards}) cannot restore: {}. Starting would register \
         the model afresh, train it from step 0 and prune these checkpoints, so the shard stops here. ",
        root.display(),
        listed.join("; ")
    );
    if found.iter().all(|f| f.num_shards == num_shards) {
        text.push_str(
            "The cluster size matches but the shard index does not: give each shard its own --checkpoint-dir \
             (are two directories swapped?). ",
        );
    } else {
        let sizes: Vec<String> =
            found.iter().map(|f| f.num_shards).collect::<BTreeSet<_>>().iter().map(u32::to_string).collect();
        let sizes = sizes.join(" or ");
        text.push_str(&format!(
            "To continue that run, start the cluster again with the {sizes} shards that wrote them, or rewrite them \
             for {num_shards} shards with `ctl reshard --model <model> --from <each old shard's directory> --to \
             <{num_shards} new directories>` and start each shard on its new directory. "
        ));
    }
    text.push_str("To start the model afresh instead, move its directory out of the checkpoint directory.");
    text
}

impl CheckpointStore {
    /// The checkpoints under this store's directory that another shard or
    /// cluster size wrote (by their manifests; unreadable ones are left to
    /// [`Self::load`]), per model and layout.
    pub fn foreign(&self) -> Vec<ForeignCheckpoints> {
        let Ok(read) = fs::read_dir(&self.root) else { return Vec::new() };
        let mut found: BTreeMap<(String, u32, u32), Vec<u64>> = BTreeMap::new();
        for model_dir in read.flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
            for version in versions_in(&model_dir) {
                let Ok(manifest) = read_manifest(&version_dir(&model_dir, version)) else { continue };
                if (manifest.shard, manifest.num_shards) != (self.shard, self.count()) {
                    found.entry((manifest.model, manifest.shard, manifest.num_shards)).or_default().push(version);
                }
            }
        }
        found
            .into_iter()
            .map(|((model, shard, num_shards), versions)| ForeignCheckpoints { model, versions, shard, num_shards })
            .collect()
    }

    /// Refuses a directory that holds checkpoints of another layout (see [`Self::foreign`]).
    pub fn check_layout(&self) -> Result<(), CheckpointError> {
        let found = self.foreign();
        if found.is_empty() {
            return Ok(());
        }
        Err(CheckpointError::OtherLayout {
            root: self.root.clone(),
            shard: self.shard,
            num_shards: self.count(),
            found,
        })
    }
}
