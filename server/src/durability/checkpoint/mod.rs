//! Checkpoints on disk. Each shard writes its part of a model at a version
//! into `<dir>/<model>/v<version>/`: `tensors.safetensors` (weights, optimizer
//! buffers and counters, federated global state), `spec.pb` (the registration)
//! and `manifest.json` (the version, epoch, membership, the facts retries need,
//! and a CRC-32 and size of each file). A checkpoint is written into a
//! temporary directory, every file and the directory are fsynced, and only then
//! is it renamed into place (and the parent fsynced), so a crash leaves either
//! the whole checkpoint or none. Reading checks sizes and checksums; a torn or
//! corrupt checkpoint is skipped for the previous one, with a log line.

pub mod export;
pub mod format;
mod layout;
mod online;
pub mod reshard;
pub mod wire;
mod writer;

pub use self::layout::ForeignCheckpoints;
pub use self::writer::CheckpointWriter;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use self::format::{Checksummed, ChecksummedReader, Slice, TensorHeader, Values};
use crate::optim::OptimizerState;
use crate::store::{BlockSnapshot, ModelSnapshot, WriteReport};

const FORMAT: &str = "ps-checkpoint/1";
const TENSORS: &str = "tensors.safetensors";
const SPEC: &str = "spec.pb";
const MANIFEST: &str = "manifest.json";

/// Under a checkpoint directory, where a reshard in place keeps what it replaced.
pub const BEFORE_RESHARD: &str = ".before-reshard";

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The checkpoint is torn, corrupt or not this shard's.
    #[error("{path}: {reason}")]
    Invalid {
        /// The checkpoint directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The directory holds checkpoints written by another shard or cluster size.
    #[error("{}", layout::describe_foreign(root, *shard, *num_shards, found))]
    OtherLayout {
        /// The checkpoint directory.
        root: PathBuf,
        /// This shard's index.
        shard: u32,
        /// This cluster's shard count.
        num_shards: u32,
        /// What was found, per model and layout.
        found: Vec<ForeignCheckpoints>,
    },
    /// No checkpoint of the model at that version.
    #[error("no checkpoint of model '{model}' at version {version} in {dir}")]
    Missing {
        /// Model name.
        model: String,
        /// Version asked for.
        version: u64,
        /// The checkpoint directory.
        dir: PathBuf,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

#[derive(Serialize, Deserialize)]
struct FileSum {
    bytes: u64,
    crc32: u32,
}

#[derive(Serialize, Deserialize)]
struct BlockEntry {
    tensor: String,
    block: u32,
    version: u64,
    /// Absent in checkpoints written before steps could be skipped: none were.
    #[serde(default)]
    skipped_steps: u64,
    /// Absent in checkpoints written before overflowed steps were skipped: none were.
    #[serde(default)]
    overflow_steps: u64,
    last_contributors: Vec<String>,
    async_steps: Vec<(String, u64)>,
    buffers: Vec<String>,
    integers: Vec<String>,
    global: bool,
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: String,
    model: String,
    shard: u32,
    num_shards: u32,
    version: u64,
    epoch: u64,
    written_unix_ms: u64,
    members: Vec<(String, u32)>,
    last_included: Vec<(u32, u64)>,
    blocks: Vec<BlockEntry>,
    files: BTreeMap<String, FileSum>,
}

/// A directory name for a model: its name with every byte outside
/// `[A-Za-z0-9._-]` written as `%XX`, so any model name is one path component.
fn escape(model: &str) -> String {
    let mut out = String::new();
    for byte in model.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    match out.strip_prefix('.') {
        Some(rest) => format!("%2E{rest}"),
        None => out,
    }
}

fn version_dir(model_dir: &Path, version: u64) -> PathBuf {
    model_dir.join(format!("v{version:012}"))
}

/// The versions under a model's directory that have a manifest, ascending.
fn versions_in(model_dir: &Path) -> Vec<u64> {
    let Ok(read) = fs::read_dir(model_dir) else { return Vec::new() };
    let mut versions: Vec<u64> = read
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix('v')).and_then(|v| v.parse().ok()))
        .filter(|v| version_dir(model_dir, *v).join(MANIFEST).is_file())
        .collect();
    versions.sort_unstable();
    versions
}

/// A version directory's manifest as written, not yet checked against a shard.
/// Moves the checkpoints of `model` under `dir` to
/// `.before-reshard/<aside_name>/` (numbered when that is taken: a second
/// reshard at the same version, there and back, keeps both sets); returns
/// where they went, or None when there were none.
fn set_aside(dir: &Path, model: &str, aside_name: &str) -> Result<Option<PathBuf>, CheckpointError> {
    let current = dir.join(escape(model));
    if !current.exists() {
        return Ok(None);
    }
    let aside = (0..)
        .map(|n| match n {
            0 => dir.join(BEFORE_RESHARD).join(aside_name),
            n => dir.join(BEFORE_RESHARD).join(format!("{aside_name}.{n}")),
        })
        .find(|candidate| !candidate.join(escape(model)).exists())
        .expect("some numbered name is free");
    fs::create_dir_all(&aside).map_err(io_error(&aside))?;
    let moved_to = aside.join(escape(model));
    fs::rename(&current, &moved_to).map_err(io_error(&moved_to))?;
    Ok(Some(moved_to))
}

impl Manifest {
    /// The manifest of `snapshot`, whose blocks `entries` describe, written now.
    fn of(snapshot: &ModelSnapshot, entries: Vec<BlockEntry>, files: BTreeMap<String, FileSum>) -> Self {
        Self {
            format: FORMAT.into(),
            model: snapshot.model.clone(),
            shard: snapshot.shard,
            num_shards: snapshot.num_shards,
            version: snapshot.version,
            epoch: snapshot.epoch,
            written_unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            members: snapshot.members.clone(),
            last_included: snapshot.last_included.clone(),
            blocks: entries,
            files,
        }
    }
}

impl BlockEntry {
    fn of(block: &BlockSnapshot) -> Self {
        Self {
            tensor: block.tensor.clone(),
            block: block.block,
            version: block.version,
            skipped_steps: block.skipped_steps,
            overflow_steps: block.overflow_steps,
            last_contributors: block.last_contributors.clone(),
            async_steps: block.async_steps.clone(),
            buffers: block.optimizer.buffers.keys().cloned().collect(),
            integers: block.optimizer.integers.keys().cloned().collect(),
            global: !block.global.is_empty(),
        }
    }
}

fn read_manifest(dir: &Path) -> Result<Manifest, CheckpointError> {
    let path = dir.join(MANIFEST);
    let text = fs::read(&path).map_err(io_error(&path))?;
    serde_json::from_slice(&text).map_err(|e| CheckpointError::Invalid {
        path: dir.to_path_buf(),
        reason: format!("manifest.json does not parse: {e}"),
    })
}

/// A snapshot from a checkpoint's manifest, spec and tensors (read from files
/// or received from a peer), checking that every tensor the manifest names is there.
fn snapshot_of(
    manifest: Manifest,
    spec: Vec<u8>,
    mut tensors: BTreeMap<String, Values>,
    invalid: impl Fn(String) -> CheckpointError,
) -> Result<ModelSnapshot, CheckpointError> {
    let mut take_f32 = |key: String| match tensors.remove(&key) {
        Some(Values::F32(v)) => Ok(v),
        _ => Err(invalid(format!("{TENSORS} lacks f32 tensor '{key}'"))),
    };
    let mut blocks = Vec::with_capacity(manifest.blocks.len());
    let mut integer_keys = Vec::new();
    for entry in &manifest.blocks {
        let mut block = BlockSnapshot {
            tensor: entry.tensor.clone(),
            block: entry.block,
            version: entry.version,
            skipped_steps: entry.skipped_steps,
            overflow_steps: entry.overflow_steps,
            params: Arc::default(),
            optimizer: OptimizerState::default(),
            global: Vec::new(),
            last_contributors: entry.last_contributors.clone(),
            async_steps: entry.async_steps.clone(),
        };
        block.params = Arc::new(take_f32(tensor_key(&block, "params"))?);
        for field in &entry.buffers {
            let values = take_f32(tensor_key(&block, &format!("buffer/{field}")))?;
            block.optimizer.buffers.insert(field.clone(), Arc::new(values.into()));
        }
        if entry.global {
            block.global = take_f32(tensor_key(&block, "global"))?;
        }
        integer_keys.push(entry.integers.clone());
        blocks.push(block);
    }
    for (block, fields) in blocks.iter_mut().zip(integer_keys) {
        for field in fields {
            let key = tensor_key(block, &format!("integer/{field}"));
            match tensors.remove(&key) {
                Some(Values::U64(v)) => {
                    block.optimizer.integers.insert(field, v);
                }
                _ => return Err(invalid(format!("{TENSORS} lacks u64 tensor '{key}'"))),
            }
        }
    }
    Ok(ModelSnapshot {
        model: manifest.model,
        spec,
        shard: manifest.shard,
        num_shards: manifest.num_shards,
        version: manifest.version,
        epoch: manifest.epoch,
        members: manifest.members,
        last_included: manifest.last_included,
        blocks,
        copy_seconds: 0.0,
    })
}

fn tensor_key(block: &BlockSnapshot, part: &str) -> String {
    format!("{}#{}/{part}", block.tensor, block.block)
}

/// A block's tensors in file order: weights, optimizer buffers and integers, global state.
fn block_tensors(block: &BlockSnapshot) -> Vec<(String, Slice<'_>)> {
    let mut tensors = vec![(tensor_key(block, "params"), Slice::F32(&block.params))];
    for (field, values) in &block.optimizer.buffers {
        tensors.push((tensor_key(block, &format!("buffer/{field}")), Slice::F32(values)));
    }
    for (field, values) in &block.optimizer.integers {
        tensors.push((tensor_key(block, &format!("integer/{field}")), Slice::U64(values)));
    }
    if !block.global.is_empty() {
        tensors.push((tensor_key(block, "global"), Slice::F32(&block.global)));
    }
    tensors
}

fn sync_dir(path: &Path) -> Result<(), CheckpointError> {
    File::open(path).and_then(|d| d.sync_all()).map_err(io_error(path))
}

/// The checkpoints of one shard: a directory and how many versions to keep per model.
#[derive(Clone, Debug)]
pub struct CheckpointStore {
    root: PathBuf,
    keep: usize,
    shard: u32,
    /// The cluster's size, which an online reshard changes.
    num_shards: Arc<std::sync::atomic::AtomicU32>,
    /// Per model, the versions kept for the cluster whatever `keep` says.
    pins: Arc<parking_lot::Mutex<std::collections::HashMap<String, Pins>>>,
}

/// The versions of one model kept for the cluster. Shard 0 asks every shard
/// to pin the newest version they all hold, and only once every shard has
/// pinned it tells them it is committed, which lets the older pins go: so at
/// every moment some version is pinned on every shard, however the shards'
/// own writes and pruning interleave (a shard whose writes fail stops at an
/// old version, which the others pruned long ago unless pinned).
#[derive(Debug, Default)]
struct Pins {
    /// Pinned versions: the committed one and any asked for since.
    held: BTreeSet<u64>,
    /// The newest version every shard is known to have pinned. Until one is,
    /// the oldest version on disk is kept too (at first version 0 or the
    /// restored one, which every shard holds).
    committed: Option<u64>,
    /// Versions being deleted by a prune, which can no longer be pinned.
    doomed: BTreeSet<u64>,
}

impl CheckpointStore {
    /// Checkpoints of shard `shard` of `num_shards` under `root`, keeping the newest `keep` per model.
    pub fn new(root: PathBuf, keep: usize, shard: u32, num_shards: u32) -> Result<Self, CheckpointError> {
        fs::create_dir_all(&root).map_err(io_error(&root))?;
        let num_shards = Arc::new(std::sync::atomic::AtomicU32::new(num_shards));
        Ok(Self { root, keep: keep.max(1), shard, num_shards, pins: Arc::default() })
    }

    pub(super) fn count(&self) -> u32 {
        self.num_shards.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Keeps `version` of `model` from pruning if it is on disk and not being
    /// deleted (checked under the same lock as pruning); true if it is pinned.
    pub fn pin(&self, model: &str, version: u64) -> bool {
        let mut pins = self.pins.lock();
        let entry = pins.entry(model.to_string()).or_default();
        if entry.doomed.contains(&version) || !self.listed(model).contains(&version) {
            return false;
        }
        entry.held.insert(version);
        true
    }

    /// Records that every shard has pinned `version` (or, after a rollback to
    /// it, holds it): it is the cluster's recovery point, and the pins of older
    /// versions are let go. After a rollback it may be older than the committed
    /// one; the versions past it are gone, and so are their pins.
    pub fn commit(&self, model: &str, version: u64, rolled_back: bool) {
        let mut pins = self.pins.lock();
        let entry = pins.entry(model.to_string()).or_default();
        if !rolled_back && entry.committed.is_some_and(|committed| committed > version) {
            return; // a late message of an older commit
        }
        entry.held.insert(version);
        entry.held.retain(|&v| if rolled_back { v == version } else { v >= version });
        entry.committed = Some(version);
    }

    /// The version of `model` committed as the cluster's recovery point, if one is.
    pub fn committed(&self, model: &str) -> Option<u64> {
        self.pins.lock().get(model).and_then(|p| p.committed)
    }

    /// The directory checkpoints go to.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn model_dir(&self, model: &str) -> PathBuf {
        self.root.join(escape(model))
    }

    fn version_dir(&self, model: &str, version: u64) -> PathBuf {
        version_dir(&self.model_dir(model), version)
    }

    /// Writes a snapshot atomically and prunes old versions; returns what it
    /// wrote. Each block is dropped once written, so the state it shares with
    /// the live model goes back to it (and needs no copy at its next update).
    pub fn write(&self, snapshot: ModelSnapshot) -> Result<WriteReport, CheckpointError> {
        let started = Instant::now();
        let model_dir = self.model_dir(&snapshot.model);
        fs::create_dir_all(&model_dir).map_err(io_error(&model_dir))?;
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let partial = model_dir.join(format!(".partial-v{:012}-{nanos}", snapshot.version));
        fs::create_dir(&partial).map_err(io_error(&partial))?;
        let (model, version, copy_seconds) = (snapshot.model.clone(), snapshot.version, snapshot.copy_seconds);
        let result = self.write_into(&partial, snapshot);
        let bytes = match result {
            Ok(bytes) => bytes,
            Err(error) => {
                fs::remove_dir_all(&partial).ok();
                return Err(error);
            }
        };
        let target = self.version_dir(&model, version);
        replace_dir(&partial, &target)?;
        sync_dir(&model_dir)?;
        self.prune(&model);
        Ok(WriteReport {
            version,
            path: target.display().to_string(),
            seconds: started.elapsed().as_secs_f64(),
            bytes,
            copy_seconds,
        })
    }

    fn write_into(&self, dir: &Path, mut snapshot: ModelSnapshot) -> Result<u64, CheckpointError> {
        let mut files = BTreeMap::new();
        let mut entries = Vec::with_capacity(snapshot.blocks.len());
        let mut headers: Vec<TensorHeader> = Vec::new();
        for block in &snapshot.blocks {
            for (name, values) in block_tensors(block) {
                headers.push((name, values.dtype(), values.len()));
            }
            entries.push(BlockEntry::of(block));
        }
        let path = dir.join(TENSORS);
        let file = File::create(&path).map_err(io_error(&path))?;
        let mut out = Checksummed::new(BufWriter::with_capacity(4 << 20, file));
        format::write_header(&mut out, &headers)
            .map_err(|e| CheckpointError::Invalid { path: path.clone(), reason: e.to_string() })?;
        for block in std::mem::take(&mut snapshot.blocks) {
            for (_, values) in block_tensors(&block) {
                out.write_all(values.bytes()).map_err(io_error(&path))?;
            }
        }
        let (buffered, crc32, bytes) = out.finish();
        let file = buffered.into_inner().map_err(|e| io_error(&path)(e.into_error()))?;
        file.sync_all().map_err(io_error(&path))?;
        files.insert(TENSORS.to_string(), FileSum { bytes, crc32 });

        let spec_path = dir.join(SPEC);
        write_small(&spec_path, &snapshot.spec)?;
        files.insert(
            SPEC.to_string(),
            FileSum { bytes: snapshot.spec.len() as u64, crc32: crc32fast::hash(&snapshot.spec) },
        );

        let manifest = Manifest::of(&snapshot, entries, files);
        let text = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| CheckpointError::Invalid { path: dir.to_path_buf(), reason: format!("manifest: {e}") })?;
        write_small(&dir.join(MANIFEST), &text)?;
        sync_dir(dir)?;
        Ok(bytes + snapshot.spec.len() as u64 + text.len() as u64)
    }

    fn prune(&self, model: &str) {
        let dir = self.model_dir(model);
        // Chosen under the pins' lock and marked, so no pin lands on a version
        // being deleted; deleted outside it, so a pin never waits on the disk.
        let doomed: Vec<u64> = {
            let mut pins = self.pins.lock();
            let entry = pins.entry(model.to_string()).or_default();
            let versions = self.listed(model);
            let oldest = if entry.committed.is_none() { versions.first().copied() } else { None };
            let doomed: Vec<u64> = versions
                .iter()
                .rev()
                .skip(self.keep)
                .filter(|v| !entry.held.contains(v) && Some(**v) != oldest)
                .copied()
                .collect();
            entry.doomed.extend(&doomed);
            doomed
        };
        for version in &doomed {
            let path = self.version_dir(model, *version);
            if let Err(error) = fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), %error, "could not remove an old checkpoint");
            }
        }
        if let Some(entry) = self.pins.lock().get_mut(model) {
            entry.doomed.retain(|v| !doomed.contains(v));
        }
        // Leftovers of writes that a crash interrupted.
        if let Ok(read) = fs::read_dir(&dir) {
            for entry in read.flatten() {
                if entry.file_name().to_string_lossy().starts_with(".partial-") {
                    fs::remove_dir_all(entry.path()).ok();
                }
            }
        }
    }

    /// Deletes the checkpoints of `model` past `version` (after a rollback to it).
    pub fn discard_after(&self, model: &str, version: u64) {
        for later in self.listed(model).into_iter().filter(|v| *v > version) {
            self.discard(model, later);
        }
    }

    /// Deletes one checkpoint.
    pub fn discard(&self, model: &str, version: u64) {
        let path = self.version_dir(model, version);
        match fs::remove_dir_all(&path) {
            Ok(()) => tracing::info!(model, version, "checkpoint of an abandoned run discarded"),
            Err(error) => tracing::warn!(path = %path.display(), %error, "could not remove a checkpoint"),
        }
    }

    /// Versions with a checkpoint directory that has a manifest, ascending (not yet verified).
    fn listed(&self, model: &str) -> Vec<u64> {
        versions_in(&self.model_dir(model))
    }

    /// Versions of a model whose checkpoint looks complete (manifest readable,
    /// files of the recorded sizes), ascending. Checksums are checked on load.
    pub fn versions(&self, model: &str) -> Vec<u64> {
        self.listed(model).into_iter().filter(|v| self.manifest(model, *v).is_ok()).collect()
    }

    fn manifest(&self, model: &str, version: u64) -> Result<Manifest, CheckpointError> {
        let dir = self.version_dir(model, version);
        let invalid = |reason: String| CheckpointError::Invalid { path: dir.clone(), reason };
        let manifest = read_manifest(&dir)?;
        if manifest.format != FORMAT {
            return Err(invalid(format!("format '{}', expected '{FORMAT}'", manifest.format)));
        }
        if manifest.model != model || manifest.version != version {
            return Err(invalid(format!("holds model '{}' version {}", manifest.model, manifest.version)));
        }
        if (manifest.shard, manifest.num_shards) != (self.shard, self.count()) {
            return Err(invalid(format!(
                "written by shard {} of {}, this is shard {} of {}",
                manifest.shard,
                manifest.num_shards,
                self.shard,
                self.count()
            )));
        }
        for (name, sum) in &manifest.files {
            let size = fs::metadata(dir.join(name)).map(|m| m.len()).map_err(io_error(&dir.join(name)))?;
            if size != sum.bytes {
                return Err(invalid(format!("{name} has {size} bytes, the manifest says {}", sum.bytes)));
            }
        }
        for required in [TENSORS, SPEC] {
            if !manifest.files.contains_key(required) {
                return Err(invalid(format!("the manifest lists no {required}")));
            }
        }
        Ok(manifest)
    }

    /// Reads and verifies the checkpoint of `model` at `version`.
    pub fn load(&self, model: &str, version: u64) -> Result<ModelSnapshot, CheckpointError> {
        let dir = self.version_dir(model, version);
        if !dir.join(MANIFEST).is_file() {
            return Err(CheckpointError::Missing { model: model.into(), version, dir: self.root.clone() });
        }
        let invalid = |reason: String| CheckpointError::Invalid { path: dir.clone(), reason };
        let manifest = self.manifest(model, version)?;
        let spec_path = dir.join(SPEC);
        let spec = fs::read(&spec_path).map_err(io_error(&spec_path))?;
        if crc32fast::hash(&spec) != manifest.files[SPEC].crc32 {
            return Err(invalid("spec.pb does not match its checksum".into()));
        }
        let path = dir.join(TENSORS);
        let expected = &manifest.files[TENSORS];
        let file = File::open(&path).map_err(io_error(&path))?;
        let mut reader = ChecksummedReader::new(BufReader::with_capacity(4 << 20, file));
        let tensors =
            format::read_tensors(&mut reader, expected.bytes).map_err(|e| invalid(format!("{TENSORS}: {e}")))?;
        let crc = reader.finish().map_err(io_error(&path))?;
        if crc != expected.crc32 {
            return Err(invalid(format!(
                "{TENSORS} does not match its checksum (CRC-32 {crc:08x}, manifest {:08x})",
                expected.crc32
            )));
        }
        snapshot_of(manifest, spec, tensors, invalid)
    }

    /// The newest checkpoint of `model` that reads back intact; a torn or
    /// corrupt one is logged and the one before it tried. Err: no version
    /// reads back, with what was wrong with each, newest first.
    pub fn load_newest(&self, model: &str) -> Result<ModelSnapshot, Vec<(u64, CheckpointError)>> {
        let mut failures = Vec::new();
        for version in self.listed(model).into_iter().rev() {
            match self.load(model, version) {
                Ok(snapshot) => return Ok(snapshot),
                Err(error) => {
                    tracing::error!(
                        model,
                        version,
                        %error,
                        "checkpoint is torn or corrupt; falling back to the one before it"
                    );
                    failures.push((version, error));
                }
            }
        }
        Err(failures)
    }

    /// Names of the models with a checkpoint directory.
    pub fn models(&self) -> Vec<String> {
        let Ok(read) = fs::read_dir(&self.root) else { return Vec::new() };
        let mut names: Vec<String> = read
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| {
                fs::read_dir(e.path()).ok()?.flatten().find_map(|v| {
                    let text = fs::read(v.path().join(MANIFEST)).ok()?;
                    serde_json::from_slice::<Manifest>(&text).ok().map(|m| m.model)
                })
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// Puts the complete directory `partial` at `target`. The same version can be
/// written again (twice in a row, or after a rollback); then the two are
/// swapped in one atomic exchange and the old copy, now at `partial`, is
/// removed, so a crash at any point leaves a complete copy at `target` (removing
/// the old one first left, when a shard was killed in between, an empty
/// directory and no intact checkpoint of that version). A file system without
/// the exchange falls back to remove-then-rename.
fn replace_dir(partial: &Path, target: &Path) -> Result<(), CheckpointError> {
    if !target.exists() {
        return fs::rename(partial, target).map_err(io_error(target));
    }
    let cwd = rustix::fs::CWD;
    match rustix::fs::renameat_with(cwd, partial, cwd, target, rustix::fs::RenameFlags::EXCHANGE) {
        Ok(()) => {
            fs::remove_dir_all(partial).ok();
            Ok(())
        }
        Err(error) => {
            tracing::warn!(%error, path = %target.display(), "no atomic exchange here; replacing the checkpoint by removal");
            fs::remove_dir_all(target).map_err(io_error(target))?;
            fs::rename(partial, target).map_err(io_error(target))
        }
    }
}

fn write_small(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut file = File::create(path).map_err(io_error(path))?;
    file.write_all(bytes).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))
}

#[cfg(test)]
mod tests;
