//! A model's checkpoint of N shards rewritten for M shards with nothing
//! running (`ctl reshard`), so a job can continue on another shard count.
//!
//! Blocks do not depend on the shard count: a tensor is split by its group's
//! block limit (the model's `max_block_elements`, or the whole tensor where
//! the optimizer needs it — Subset-Norm's row and column statistics,
//! Subspace-Momentum's projector, FRUGAL's subspace), and the placement only
//! says which shard holds each block. So every block moves whole, with its
//! weights, optimizer buffers and counters, federated global state and retry
//! facts, and nothing is recomputed: the resharded run's math is the run's
//! math. (The norm `max_grad_norm` clips by is summed over blocks in
//! (tensor, block) order on every shard, so it does not depend on placement.)
//!
//! The new directories may be the old ones (a StatefulSet's claims, a compose
//! file's named volumes): the new checkpoints are first written beside the
//! old ones, then, directory by directory, the model's old checkpoints are
//! moved under `.before-reshard/` and the new ones put in their place. An
//! interruption leaves each directory old, new, or (between its two renames)
//! empty of the model, and a shard started on such a mix refuses to start or
//! to register the model (the layout check and `not-restored`), so it is
//! never silently trained afresh.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use super::export::{ExportError, decode_spec, load_cluster};
use super::{CheckpointError, CheckpointStore, escape, io_error, set_aside, sync_dir, versions_in};
use crate::error::ServerError;
use crate::spec::ModelSpec;
use crate::store::{BlockSnapshot, ModelSnapshot};

/// Why the checkpoints could not be resharded.
#[derive(Debug, thiserror::Error)]
pub enum ReshardError {
    /// The old checkpoints do not make one model at one version.
    #[error(transparent)]
    Read(#[from] ExportError),
    /// The new directories cannot take the new checkpoints.
    #[error("{0}")]
    Target(String),
    /// The checkpoint's spec is not one this server accepts.
    #[error("the checkpoint's spec: {0}")]
    Spec(#[from] ServerError),
    /// Writing a new checkpoint failed.
    #[error(transparent)]
    Write(#[from] CheckpointError),
}

/// What a reshard did.
#[derive(Debug, Clone, PartialEq)]
pub struct ReshardReport {
    /// The model.
    pub model: String,
    /// The version resharded (every new shard's checkpoint is at it).
    pub version: u64,
    /// Shards before.
    pub from_shards: u32,
    /// Shards after.
    pub to_shards: u32,
    /// Blocks in the model.
    pub blocks: usize,
    /// Blocks whose shard index changed.
    pub moved: usize,
    /// Bytes written, over every new directory.
    pub bytes: u64,
    /// Each new shard's checkpoint, in shard order.
    pub written: Vec<String>,
    /// Where the old checkpoints of the model went in directories that were
    /// rewritten in place (to go back: move them back, and the new ones out).
    pub set_aside: Vec<String>,
}

pub use super::BEFORE_RESHARD;

/// Reads the checkpoint of `model` at `version` (default: the newest every
/// old shard holds intact) from `from` (each old shard's directory, once, in
/// any order) and writes it for `to.len()` shards, shard `i` into `to[i]`.
/// A new directory is an old one, or holds no checkpoint of the model.
pub fn reshard(
    from: &[PathBuf],
    to: &[PathBuf],
    model: &str,
    version: Option<u64>,
) -> Result<ReshardReport, ReshardError> {
    check_targets(from, to, model)?;
    let cluster = load_cluster(from, model, version)?;
    let spec = ModelSpec::try_from(decode_spec(&cluster.snapshots[0])?)?;
    let to_shards = to.len() as u32;
    let shared = SharedFacts::of(&cluster.snapshots)?;
    let mut blocks: BTreeMap<(String, u32), (u32, BlockSnapshot)> = BTreeMap::new();
    for snapshot in cluster.snapshots {
        let shard = snapshot.shard;
        for block in snapshot.blocks {
            blocks.insert((block.tensor.clone(), block.block), (shard, block));
        }
    }
    let plan = spec.plan(to_shards);
    if plan.len() != blocks.len() {
        return Err(ExportError::Inconsistent(format!(
            "the checkpoints hold {} blocks of '{model}', its spec makes {}",
            blocks.len(),
            plan.len()
        ))
        .into());
    }
    let mut parts: Vec<Vec<BlockSnapshot>> = (0..to_shards).map(|_| Vec::new()).collect();
    let mut moved = 0;
    // The plan is in tensor then block order: each new part is in the order a snapshot keeps.
    for placed in &plan {
        let name = &spec.tensors[placed.tensor].name;
        let (old_shard, block) = blocks.remove(&(name.clone(), placed.block)).ok_or_else(|| {
            ExportError::Inconsistent(format!("block {} of tensor '{name}' is in no shard's checkpoint", placed.block))
        })?;
        if block.params.len() as u64 != placed.length {
            return Err(ExportError::Inconsistent(format!(
                "block {} of tensor '{name}' has {} values, the spec's layout {}",
                placed.block,
                block.params.len(),
                placed.length
            ))
            .into());
        }
        moved += usize::from(old_shard != placed.shard);
        parts[placed.shard as usize].push(block);
    }
    let mut report = ReshardReport {
        model: model.to_string(),
        version: cluster.version,
        from_shards: cluster.num_shards,
        to_shards,
        blocks: plan.len(),
        moved,
        bytes: 0,
        written: Vec::new(),
        set_aside: Vec::new(),
    };
    // Everything is written before anything old is moved: a failed write leaves the old checkpoints as they were.
    let staged: Vec<PathBuf> = to.iter().map(|dir| dir.join(format!(".reshard-staging-{}", escape(model)))).collect();
    for stage in &staged {
        if stage.exists() {
            fs::remove_dir_all(stage).map_err(io_error(stage))?;
        }
    }
    for (shard, (stage, blocks)) in staged.iter().zip(parts).enumerate() {
        let written = CheckpointStore::new(stage.clone(), usize::MAX, shard as u32, to_shards).and_then(|store| {
            store.write(ModelSnapshot {
                model: model.to_string(),
                spec: shared.spec.clone(),
                shard: shard as u32,
                num_shards: to_shards,
                version: cluster.version,
                epoch: shared.epoch,
                members: shared.members.clone(),
                last_included: shared.last_included.clone(),
                blocks,
                copy_seconds: 0.0,
            })
        });
        match written {
            Ok(written) => report.bytes += written.bytes,
            Err(error) => {
                for stage in &staged {
                    fs::remove_dir_all(stage).ok();
                }
                return Err(error.into());
            }
        }
    }
    let aside_name = format!("{}-shards-v{}", cluster.num_shards, cluster.version);
    for (dir, stage) in to.iter().zip(&staged) {
        let current = dir.join(escape(model));
        if let Some(moved_to) = set_aside(dir, model, &aside_name)? {
            report.set_aside.push(moved_to.display().to_string());
        }
        fs::rename(stage.join(escape(model)), &current).map_err(io_error(&current))?;
        fs::remove_dir_all(stage).map_err(io_error(stage))?;
        sync_dir(dir)?;
        report.written.push(current.display().to_string());
    }
    Ok(report)
}

fn canonical(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

/// The model-wide facts every shard's part carries, put together.
struct SharedFacts {
    spec: Vec<u8>,
    epoch: u64,
    members: Vec<(String, u32)>,
    last_included: Vec<(u32, u64)>,
}

impl SharedFacts {
    /// Members are the union over the shards (a worker that joined one shard
    /// just before the checkpoint joins every new one; a lapsed one expires as
    /// usual); a federated client's last included round is the latest any
    /// shard recorded; the epoch the highest.
    fn of(snapshots: &[ModelSnapshot]) -> Result<Self, ReshardError> {
        let mut ranks: BTreeMap<&str, u32> = BTreeMap::new();
        let mut last_included: BTreeMap<u32, u64> = BTreeMap::new();
        for snapshot in snapshots {
            for (worker, rank) in &snapshot.members {
                if let Some(other) = ranks.insert(worker, *rank)
                    && other != *rank
                {
                    return Err(ExportError::Inconsistent(format!(
                        "worker '{worker}' holds rank {other} on one shard and {rank} on another"
                    ))
                    .into());
                }
            }
            for &(client, round) in &snapshot.last_included {
                let latest = last_included.entry(client).or_default();
                *latest = (*latest).max(round);
            }
        }
        let mut members: Vec<(String, u32)> = ranks.into_iter().map(|(w, r)| (w.to_string(), r)).collect();
        members.sort_by_key(|(worker, rank)| (*rank, worker.clone()));
        Ok(Self {
            spec: snapshots[0].spec.clone(),
            epoch: snapshots.iter().map(|s| s.epoch).max().unwrap_or(1),
            members,
            last_included: last_included.into_iter().collect(),
        })
    }
}

/// The new directories: at least one, each once, and each either an old one
/// (rewritten in place) or holding no checkpoint of the model (it would mix
/// two runs).
fn check_targets(from: &[PathBuf], to: &[PathBuf], model: &str) -> Result<(), ReshardError> {
    let target = |m: String| Err(ReshardError::Target(m));
    if to.is_empty() {
        return target("give one --to directory per new shard, in shard order".into());
    }
    let old: BTreeSet<PathBuf> = from.iter().map(|p| canonical(p)).collect();
    let mut seen = BTreeSet::new();
    for dir in to {
        let key = canonical(dir);
        if !seen.insert(key.clone()) {
            return target(format!("{} is given twice; each new shard needs its own directory", dir.display()));
        }
        if !old.contains(&key) && !versions_in(&dir.join(escape(model))).is_empty() {
            return target(format!(
                "{} already holds checkpoints of model '{model}'; give empty directories (or move those away)",
                dir.display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ps_proto::api::{self, FrugalConfig, GroupConfig, Init, OptimizerConfig, SubspaceMomentumConfig, TensorSpec};
    use ps_proto::pb;

    use super::*;
    use crate::store::{DecodedGradient, Model};

    fn temp_dir(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ps-reshard-{label}-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        dir
    }

    /// A model of three matrices and a bias in blocks of 16 elements where the
    /// optimizer allows (so tensors split over shards), one group per mode
    /// under test.
    fn spec(optimizer: OptimizerConfig) -> ModelSpec {
        let tensors = vec![
            TensorSpec::new("layers.0.q_proj.weight", &[8, 6], Init::Uniform { center: 0.0, half_width: 0.5, seed: 1 }),
            TensorSpec::new(
                "layers.0.up_proj.weight",
                &[12, 6],
                Init::Uniform { center: 0.0, half_width: 0.5, seed: 2 },
            ),
            TensorSpec::new(
                "layers.0.down_proj.weight",
                &[6, 12],
                Init::Uniform { center: 0.0, half_width: 0.5, seed: 3 },
            ),
            TensorSpec::new("head.bias", &[10], Init::Constant(0.1)),
        ];
        let groups = vec![
            GroupConfig::new("matrices", &["layers.*"], optimizer),
            GroupConfig::new("rest", &["*"], OptimizerConfig::adamw(0.01)),
        ];
        let mut spec = api::ModelSpec::new("m", tensors, groups);
        spec.max_block_elements = 16;
        ModelSpec::try_from(pb::ModelSpec::from(&spec)).unwrap()
    }

    /// A deterministic gradient for every element of a tensor at a step.
    fn gradient(tensor: usize, block: u32, len: usize, step: u64) -> Vec<f32> {
        let start = (tensor * 1000 + block as usize * 100) as f32;
        (0..len).map(|i| ((start + i as f32) * 0.37 + step as f32 * 1.3).sin() * 0.5).collect()
    }

    /// Every shard of a cluster takes one step of the same whole-model gradient.
    fn step(shards: &[Model], step: u64) {
        for model in shards {
            let grads: Vec<_> = model
                .local_blocks()
                .iter()
                .map(|b| DecodedGradient(b.clone(), gradient(b.tensor, b.index, b.len, step)))
                .collect();
            model.commit_push("w0", step, 1.0, grads).unwrap();
        }
    }

    fn cluster(spec: &ModelSpec, num_shards: u32) -> Vec<Model> {
        (0..num_shards)
            .map(|shard| {
                let model = Model::new(spec.clone(), shard, num_shards, Duration::from_secs(60));
                model.membership.join("w0", Some(0)).unwrap();
                model
            })
            .collect()
    }

    fn restored(spec: &ModelSpec, dirs: &[PathBuf]) -> Vec<Model> {
        let num_shards = dirs.len() as u32;
        dirs.iter()
            .enumerate()
            .map(|(shard, dir)| {
                let store = CheckpointStore::new(dir.clone(), 3, shard as u32, num_shards).unwrap();
                store.check_layout().unwrap();
                let snapshot = store.load_newest("m").unwrap();
                let model = Model::new(spec.clone(), shard as u32, num_shards, Duration::from_secs(60));
                model.restore(&snapshot).unwrap();
                model
            })
            .collect()
    }

    fn checkpoint(shards: &[Model], root: &Path, label: &str) -> Vec<PathBuf> {
        shards
            .iter()
            .enumerate()
            .map(|(shard, model)| {
                let dir = root.join(format!("{label}-{shard}"));
                let store = CheckpointStore::new(dir.clone(), 3, shard as u32, shards.len() as u32).unwrap();
                store.write(model.snapshot_now().expect("every block at one version")).unwrap();
                dir
            })
            .collect()
    }

    /// An AdamW model after one step on 2 shards, checkpointed into
    /// `<root>/<prefix>-0` and `-1`: the root, the spec, the shards and the directories.
    fn one_adamw_step_on_two_shards(label: &str, prefix: &str) -> (PathBuf, ModelSpec, Vec<Model>, Vec<PathBuf>) {
        let root = temp_dir(label);
        let spec = spec(OptimizerConfig::adamw(0.01));
        let run = cluster(&spec, 2);
        step(&run, 0);
        let dirs = checkpoint(&run, &root, prefix);
        (root, spec, run, dirs)
    }

    /// Every block's weights as bits, by (tensor, block), whichever shard holds it.
    fn bits(shards: &[Model]) -> BTreeMap<(usize, u32), Vec<u32>> {
        shards
            .iter()
            .flat_map(|m| m.local_blocks().iter().map(|b| ((b.tensor, b.index), b.snapshot().1)).collect::<Vec<_>>())
            .map(|(key, values)| (key, values.iter().map(|x| x.to_bits()).collect()))
            .collect()
    }

    /// Trains on 2 shards, reshards to 3 (in place: the old directories are
    /// shards 0 and 1 of the new cluster), trains, reshards back to 2 into new
    /// directories, trains; the weights equal, bit for bit, those of the run
    /// that stayed on 2.
    fn resharded_run_matches(label: &str, optimizer: OptimizerConfig) {
        let root = temp_dir(label);
        let spec = spec(optimizer);
        let reference = cluster(&spec, 2);
        for s in 0..12 {
            step(&reference, s);
        }
        let mut run = cluster(&spec, 2);
        for s in 0..4 {
            step(&run, s);
        }
        let old = checkpoint(&run, &root, "two");
        let three = [old[0].clone(), old[1].clone(), root.join("three-2")];
        let report = reshard(&old, &three, "m", None).unwrap();
        assert_eq!((report.version, report.from_shards, report.to_shards), (4, 2, 3));
        assert!(report.moved > 0, "some block changed shard: {report:?}");
        assert_eq!(report.set_aside.len(), 2, "{report:?}");
        for dir in &old {
            let aside = dir.join(BEFORE_RESHARD).join("2-shards-v4").join("m");
            assert_eq!(versions_in(&aside), [4], "the old checkpoint is kept aside in {}", aside.display());
            assert!(!fs::read_dir(dir).unwrap().flatten().any(|e| e.file_name().to_string_lossy().contains("staging")));
        }
        run = restored(&spec, &three);
        assert!(run.iter().all(|m| !m.local_blocks().is_empty()), "every new shard holds blocks");
        for s in 4..8 {
            step(&run, s);
        }
        let three_later = checkpoint(&run, &root, "three-later");
        let two: Vec<PathBuf> = (0..2).map(|i| root.join(format!("two-again-{i}"))).collect();
        reshard(&three_later, &two, "m", None).unwrap();
        run = restored(&spec, &two);
        for s in 8..12 {
            step(&run, s);
        }
        let (got, want) = (bits(&run), bits(&reference));
        assert_eq!(got.len(), want.len());
        for (key, values) in &want {
            assert_eq!(&got[key], values, "{label}: block {key:?} differs from the run that was never resharded");
        }
        std::fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn adamw_resharded_2_3_2_is_bit_identical() {
        resharded_run_matches("adamw", OptimizerConfig::adamw(0.01));
    }

    #[test]
    fn frugal_resharded_2_3_2_is_bit_identical() {
        let config = FrugalConfig { lr: 0.01, density: 0.34, update_gap: 3, ..Default::default() };
        resharded_run_matches("frugal", OptimizerConfig::Frugal(config));
    }

    #[test]
    fn adam_sn_sm_resharded_2_3_2_is_bit_identical() {
        let config = SubspaceMomentumConfig {
            lr: 0.01,
            rank: 2,
            update_gap: 3,
            projection: api::Projection::Svd(api::SvdSolver::Exact),
            adaptive: true,
            ..Default::default()
        };
        resharded_run_matches("adamsnsm", OptimizerConfig::SubspaceMomentum(config));
    }

    #[test]
    fn there_and_back_in_place_at_one_version_keeps_every_old_set_and_the_weights() {
        let (root, spec, run, two) = one_adamw_step_on_two_shards("back", "shard");
        let three = [two[0].clone(), two[1].clone(), root.join("shard-2")];
        reshard(&two, &three, "m", None).unwrap();
        let report = reshard(&three, &two, "m", None).unwrap();
        assert_eq!((report.from_shards, report.to_shards, report.version), (3, 2, 1));
        assert_eq!(bits(&restored(&spec, &two)), bits(&run), "back where it started");
        // Shard 2's old directory still holds the first 3-shard checkpoint, which is refused as a target.
        let error = reshard(&two, &three, "m", None).unwrap_err().to_string();
        assert!(error.contains("shard-2 already holds checkpoints"), "{error}");
        let three = [two[0].clone(), two[1].clone(), root.join("shard-2-again")];
        reshard(&two, &three, "m", None).unwrap();
        let mut aside: Vec<_> =
            fs::read_dir(two[0].join(BEFORE_RESHARD)).unwrap().flatten().map(|e| e.file_name()).collect();
        aside.sort();
        assert_eq!(aside, ["2-shards-v1", "2-shards-v1.1", "3-shards-v1"], "every old set is kept");
        assert_eq!(bits(&restored(&spec, &three)), bits(&run));
        std::fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn members_are_the_union_over_the_shards_and_a_rank_held_twice_is_refused() {
        let (root, _, run, _) = one_adamw_step_on_two_shards("members", "two");
        let mut parts: Vec<ModelSnapshot> = run.iter().map(|m| m.snapshot_now().unwrap()).collect();
        parts[0].members.push(("late".into(), 1));
        parts[1].last_included = vec![(3, 7)];
        parts[0].last_included = vec![(3, 5), (4, 2)];
        let facts = SharedFacts::of(&parts).unwrap();
        assert_eq!(facts.members, [("w0".to_string(), 0), ("late".to_string(), 1)]);
        assert_eq!(facts.last_included, [(3, 7), (4, 2)], "each client's latest round");
        parts[1].members.push(("late".into(), 2));
        let error = SharedFacts::of(&parts).err().unwrap().to_string();
        assert!(error.contains("worker 'late' holds rank 1 on one shard and 2 on another"), "{error}");
        std::fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn bad_targets_are_refused_and_nothing_is_written() {
        let (root, _, _, old) = one_adamw_step_on_two_shards("targets", "two");
        let error = reshard(&old, &[root.join("a"), root.join("a")], "m", None).unwrap_err().to_string();
        assert!(error.contains("given twice"), "{error}");
        let error = reshard(&old, &[], "m", None).unwrap_err().to_string();
        assert!(error.contains("one --to directory per new shard"), "{error}");
        let error = reshard(&old[..1], &[root.join("a")], "m", None).unwrap_err().to_string();
        assert!(error.contains("shards [1] are missing"), "{error}");
        assert!(!root.join("a").exists(), "nothing written for a refused reshard");
        // A new shard's write fails (its directory is a file): the others' staged writes are removed.
        std::fs::write(root.join("not-a-dir"), b"x").unwrap();
        let error = reshard(&old, &[old[0].clone(), old[1].clone(), root.join("not-a-dir")], "m", None).unwrap_err();
        assert!(error.to_string().contains("not-a-dir"), "{error}");
        for dir in &old {
            let left: Vec<_> = fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name()).collect();
            assert_eq!(left, ["m"], "{}: only the old checkpoints, untouched", dir.display());
            assert_eq!(versions_in(&dir.join("m")), [1]);
        }
        let done = [root.join("b")];
        reshard(&old, &done, "m", None).unwrap();
        let error = reshard(&old, &done, "m", None).unwrap_err().to_string();
        assert!(error.contains("already holds checkpoints of model 'm'"), "{error}");
        let (versions, before) = (versions_in(&old[0].join("m")), fs::read_dir(&old[0]).unwrap().count());
        assert_eq!((versions, before), (vec![1], 1), "a refused reshard leaves the old directories as they were");
        std::fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn a_shard_on_a_directory_of_another_layout_refuses_to_start_and_says_what_to_do() {
        let (root, _, _, old) = one_adamw_step_on_two_shards("layout", "two");
        let store = CheckpointStore::new(old[0].clone(), 3, 0, 3).unwrap();
        let error = store.check_layout().unwrap_err().to_string();
        assert!(error.contains("model 'm' versions [1] written by shard 0 of 2"), "{error}");
        assert!(error.contains("this shard (shard 0 of 3)") && error.contains("ctl reshard"), "{error}");
        let swapped = CheckpointStore::new(old[1].clone(), 3, 0, 2).unwrap();
        let error = swapped.check_layout().unwrap_err().to_string();
        assert!(error.contains("written by shard 1 of 2") && error.contains("swapped"), "{error}");
        assert!(CheckpointStore::new(old[1].clone(), 3, 1, 2).unwrap().check_layout().is_ok());
        std::fs::remove_dir_all(&root).ok();
    }
}
