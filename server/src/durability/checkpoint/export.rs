//! A model's weights and buffers put back together from every shard's
//! checkpoint at one version, with no shard running: the `state_dict` a
//! PyTorch user loads, written as one safetensors file of the spec's tensors
//! in their own shapes (`ctl export`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use prost::Message;
use ps_proto::pb;

use super::format::{self, FormatError, ShapedHeader};
use super::{CheckpointError, CheckpointStore, escape, read_manifest, version_dir, versions_in};
use crate::store::ModelSnapshot;

/// Why the checkpoints do not make one model.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A checkpoint could not be read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A directory holds no checkpoint of the model.
    #[error("{dir} holds no checkpoint of model '{model}' (is it a shard's --checkpoint-dir?)")]
    NoCheckpoint {
        /// The directory.
        dir: PathBuf,
        /// The model.
        model: String,
    },
    /// The directories are not the shards of one cluster, each once.
    #[error("{0}")]
    Shards(String),
    /// No version is held by every shard (or the one asked for is not).
    #[error("{0}")]
    Version(String),
    /// The parts do not add up to the spec's tensors.
    #[error("{0}")]
    Inconsistent(String),
    /// Writing the file failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// One tensor of the model, whole.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportedTensor {
    /// Its name in the spec.
    pub name: String,
    /// Its shape in the spec.
    pub shape: Vec<u64>,
    /// Its values, row-major.
    pub values: Vec<f32>,
}

/// A model's tensors at one version, in spec order.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportedModel {
    /// The model.
    pub model: String,
    /// The version every tensor is at.
    pub version: u64,
    /// Shards the checkpoints came from.
    pub num_shards: u32,
    /// The tensors.
    pub tensors: Vec<ExportedTensor>,
}

/// Which shard of how many wrote the checkpoints of `model` under `root`, read
/// from the newest manifest there.
fn shard_of(root: &Path, model: &str) -> Result<(u32, u32), ExportError> {
    let model_dir = root.join(escape(model));
    let newest = versions_in(&model_dir).pop();
    let newest =
        newest.ok_or_else(|| ExportError::NoCheckpoint { dir: root.to_path_buf(), model: model.to_string() })?;
    let manifest = read_manifest(&version_dir(&model_dir, newest))?;
    Ok((manifest.shard, manifest.num_shards))
}

/// Every shard's checkpoint of a model at one version.
pub struct ClusterCheckpoint {
    /// The version every shard's part is at.
    pub version: u64,
    /// The shards that wrote it.
    pub num_shards: u32,
    /// Each shard's part, in shard order.
    pub snapshots: Vec<ModelSnapshot>,
}

/// Reads the checkpoint of `model` at `version` (default: the newest version
/// every shard holds) from each shard's checkpoint directory, one per shard
/// in any order, and assembles its tensors.
pub fn assemble(dirs: &[PathBuf], model: &str, version: Option<u64>) -> Result<ExportedModel, ExportError> {
    let cluster = load_cluster(dirs, model, version)?;
    let tensors = join_blocks(&cluster.snapshots)?;
    Ok(ExportedModel { model: model.to_string(), version: cluster.version, num_shards: cluster.num_shards, tensors })
}

/// Reads every shard's checkpoint of `model` at `version` (default: the
/// newest version every shard holds intact) from the shards' checkpoint
/// directories, one per shard in any order; refuses directories that are not
/// exactly the shards of one cluster.
pub fn load_cluster(dirs: &[PathBuf], model: &str, version: Option<u64>) -> Result<ClusterCheckpoint, ExportError> {
    let mut stores = BTreeMap::new();
    let mut counts = BTreeSet::new();
    for dir in dirs {
        let (shard, num_shards) = shard_of(dir, model)?;
        counts.insert(num_shards);
        let store = CheckpointStore::new(dir.clone(), usize::MAX, shard, num_shards)?;
        if let Some((other, _)) = stores.insert(shard, (dir.clone(), store)) {
            return Err(ExportError::Shards(format!(
                "{} and {} both hold shard {shard}'s checkpoints; give each shard's directory once",
                other.display(),
                dir.display()
            )));
        }
    }
    let num_shards = match counts.into_iter().collect::<Vec<_>>()[..] {
        [n] => n,
        [] => return Err(ExportError::Shards("no checkpoint directory given".into())),
        ref several => {
            return Err(ExportError::Shards(format!(
                "the directories were written by clusters of {several:?} shards; give the directories of one cluster"
            )));
        }
    };
    let missing: Vec<u32> = (0..num_shards).filter(|s| !stores.contains_key(s)).collect();
    if !missing.is_empty() {
        return Err(ExportError::Shards(format!(
            "the model was checkpointed by {num_shards} shards; the directories of shards {missing:?} are missing"
        )));
    }
    let held: Vec<BTreeSet<u64>> =
        stores.values().map(|(_, store)| store.versions(model).into_iter().collect()).collect();
    let common = held.iter().skip(1).fold(held[0].clone(), |all, v| all.intersection(v).copied().collect());
    let version = match version {
        Some(v) if common.contains(&v) => v,
        Some(v) => {
            return Err(ExportError::Version(format!(
                "version {v} of '{model}' is not held intact by every shard; these are: {:?}",
                common.iter().collect::<Vec<_>>()
            )));
        }
        None => *common
            .last()
            .ok_or_else(|| ExportError::Version(format!("no version of '{model}' is held intact by every shard")))?,
    };
    let snapshots =
        stores.values().map(|(_, store)| store.load(model, version)).collect::<Result<Vec<_>, CheckpointError>>()?;
    if snapshots.iter().any(|s| s.spec != snapshots[0].spec) {
        return Err(ExportError::Inconsistent("the shards' checkpoints hold different specs of the model".into()));
    }
    Ok(ClusterCheckpoint { version, num_shards, snapshots })
}

/// The spec a cluster checkpoint was registered with.
pub(super) fn decode_spec(snapshot: &ModelSnapshot) -> Result<pb::ModelSpec, ExportError> {
    pb::ModelSpec::decode(snapshot.spec.as_slice())
        .map_err(|e| ExportError::Inconsistent(format!("the checkpoint's spec.pb does not decode: {e}")))
}

/// Puts every tensor's blocks, from whichever shard holds them, back in order.
fn join_blocks(snapshots: &[ModelSnapshot]) -> Result<Vec<ExportedTensor>, ExportError> {
    let inconsistent = |m: String| ExportError::Inconsistent(m);
    let spec = decode_spec(&snapshots[0])?;
    let mut parts: BTreeMap<&str, BTreeMap<u32, &[f32]>> = BTreeMap::new();
    for block in snapshots.iter().flat_map(|s| &s.blocks) {
        parts.entry(block.tensor.as_str()).or_default().insert(block.block, block.params.as_slice());
    }
    spec.tensors
        .iter()
        .map(|tensor| {
            let blocks = parts.remove(tensor.name.as_str()).unwrap_or_default();
            let elements: u64 = tensor.shape.iter().product();
            if blocks.keys().copied().ne(0..blocks.len() as u32) {
                return Err(inconsistent(format!(
                    "tensor '{}' has blocks {:?} in the checkpoints, not 0 to n - 1",
                    tensor.name,
                    blocks.keys().collect::<Vec<_>>()
                )));
            }
            let values: Vec<f32> = blocks.values().flat_map(|b| b.iter().copied()).collect();
            if values.len() as u64 != elements {
                return Err(inconsistent(format!(
                    "tensor '{}' of shape {:?} has {} values in the checkpoints",
                    tensor.name,
                    tensor.shape,
                    values.len()
                )));
            }
            Ok(ExportedTensor { name: tensor.name.clone(), shape: tensor.shape.clone(), values })
        })
        .collect()
}

/// Writes the tensors as a safetensors file (F32, their own shapes; the
/// header's metadata names the model and version), through a temporary file
/// renamed into place.
pub fn write_safetensors(model: &ExportedModel, path: &Path) -> Result<(), ExportError> {
    let failed = |source| ExportError::Write { path: path.to_path_buf(), source };
    let metadata: BTreeMap<String, String> = [
        ("format".to_string(), "pt".to_string()),
        ("model".to_string(), model.model.clone()),
        ("version".to_string(), model.version.to_string()),
    ]
    .into();
    let headers: Vec<ShapedHeader<'_>> =
        model.tensors.iter().map(|t| (t.name.as_str(), "F32", t.shape.clone())).collect();
    let partial = path.with_extension("partial");
    let write = || -> std::io::Result<()> {
        let mut out = BufWriter::new(File::create(&partial)?);
        format::write_shaped_header(&mut out, &headers, Some(&metadata)).map_err(|e| match e {
            FormatError::Io(error) => error,
            other => std::io::Error::other(other.to_string()),
        })?;
        for tensor in &model.tensors {
            out.write_all(bytemuck::cast_slice(&tensor.values))?;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(&partial, path)
    };
    write().map_err(failed)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ps_proto::api::{self, GroupConfig, Init, OptimizerConfig, TensorSpec};

    use super::*;
    use crate::spec::ModelSpec;
    use crate::store::{DecodedGradient, Model};

    fn temp_dir(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ps-export-{label}-{}", std::process::id()));
        fs::remove_dir_all(&dir).ok();
        dir
    }

    /// Shard `shard` of 2 of a model whose tensors are split in blocks of 8
    /// elements (so both shards hold parts of "w"), after two AdamW steps.
    fn trained_shard(shard: u32) -> Model {
        let tensors = vec![
            TensorSpec::new("w", &[6, 4], Init::Constant(0.5)),
            TensorSpec::new("b", &[3], Init::Constant(-1.0)),
            TensorSpec::new("bn.num_batches_tracked", &[], Init::Constant(0.0)),
        ];
        let mut spec =
            api::ModelSpec::new("m", tensors, vec![GroupConfig::new("all", &["*"], OptimizerConfig::adamw(0.1))]);
        spec.max_block_elements = 8;
        // As a registration makes it: the checkpoint keeps the spec's canonical wire form.
        let spec = ModelSpec::try_from(pb::ModelSpec::from(&spec)).unwrap();
        let model = Model::new(spec, shard, 2, Duration::from_secs(60));
        model.membership.join("w0", Some(0)).unwrap();
        for step in 0..2u64 {
            let grads: Vec<_> = model
                .local_blocks()
                .iter()
                .map(|b| DecodedGradient(b.clone(), (0..b.len).map(|i| (i as f32 - step as f32) * 0.25).collect()))
                .collect();
            model.commit_push("w0", step, 1.0, grads).unwrap();
        }
        model
    }

    fn checkpoint(model: &Model, dir: &Path, shard: u32) {
        let store = CheckpointStore::new(dir.to_path_buf(), 3, shard, 2).unwrap();
        store.write(model.snapshot_now().expect("every block at one version")).unwrap();
    }

    #[test]
    fn the_shards_checkpoints_make_the_whole_model_in_its_shapes() {
        let (root, shards) = (temp_dir("whole"), [trained_shard(0), trained_shard(1)]);
        let dirs = [root.join("shard-1"), root.join("shard-0")];
        checkpoint(&shards[1], &dirs[0], 1);
        checkpoint(&shards[0], &dirs[1], 0);
        let exported = assemble(&dirs, "m", None).unwrap();
        assert_eq!((exported.version, exported.num_shards), (2, 2));
        let names: Vec<_> = exported.tensors.iter().map(|t| (t.name.as_str(), t.shape.clone())).collect();
        assert_eq!(names, [("w", vec![6, 4]), ("b", vec![3]), ("bn.num_batches_tracked", vec![])]);
        for tensor in &exported.tensors {
            let mut expected = Vec::new();
            for index in 0.. {
                let Some(block) = shards.iter().find_map(|s| s.block(&tensor.name, index).ok()) else { break };
                expected.extend_from_slice(&block.snapshot().1);
            }
            assert_eq!(tensor.values, expected, "{}", tensor.name);
        }
        let w = &exported.tensors[0];
        assert!(shards.iter().all(|s| s.local_blocks().iter().any(|b| b.tensor == 0)), "w is split over both");
        assert_ne!(w.values[0], 0.5, "trained values, not the initial ones");

        let file = root.join("m.safetensors");
        write_safetensors(&exported, &file).unwrap();
        let bytes = fs::read(&file).unwrap();
        assert_eq!(u64::from_le_bytes(bytes[..8].try_into().unwrap()) % 8, 0, "the data is 8-byte aligned");
        let read = super::super::format::read_tensors(&mut bytes.as_slice(), bytes.len() as u64).unwrap();
        assert_eq!(read["w"], super::super::format::Values::F32(w.values.clone()));
        fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn a_missing_shard_or_version_is_named() {
        let (root, shard) = (temp_dir("missing"), trained_shard(0));
        let dir = root.join("shard-0");
        checkpoint(&shard, &dir, 0);
        let error = assemble(std::slice::from_ref(&dir), "m", None).unwrap_err().to_string();
        assert!(error.contains("shards [1] are missing"), "{error}");
        let error = assemble(&[dir.clone(), dir.clone()], "m", None).unwrap_err().to_string();
        assert!(error.contains("both hold shard 0"), "{error}");
        let other = trained_shard(1);
        checkpoint(&other, &root.join("shard-1"), 1);
        let error = assemble(&[dir.clone(), root.join("shard-1")], "m", Some(1)).unwrap_err().to_string();
        assert!(error.contains("version 1 of 'm' is not held") && error.contains("[2]"), "{error}");
        let error = assemble(&[root.join("nowhere")], "m", None).unwrap_err().to_string();
        assert!(error.contains("holds no checkpoint of model 'm'"), "{error}");
        fs::remove_dir_all(&root).ok();
    }
}
