use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::optim::tests::{modes, pseudo_random};
use ps_proto::api::{self, GroupConfig, Init, TensorSpec};

use crate::optim::{OptimizerConfig, SgdConfig};
use crate::spec::ModelSpec;
use crate::store::{BlockGradient, CheckpointPlan, CheckpointSink, DecodedGradient as Grad, Model, NoGradient};

fn temp_dir(label: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("ps-ckpt-{label}-{}-{:?}", std::process::id(), std::thread::current().id()));
    fs::remove_dir_all(&dir).ok();
    dir
}

/// Three matrices (two tall, one wide) in one group with `optimizer`; FRUGAL
/// groups mark all three projectable, so the block order rotates through them.
fn spec(optimizer: OptimizerConfig) -> ModelSpec {
    try_spec(optimizer).unwrap()
}

fn try_spec(mut optimizer: OptimizerConfig) -> Result<ModelSpec, crate::error::ServerError> {
    if let OptimizerConfig::Frugal(c) = &mut optimizer {
        c.projectable_patterns = vec!["*".into()];
    }
    let tensor = |name: &str, shape: &[u64]| TensorSpec::new(name, shape, Init::Constant(0.5));
    let tensors = vec![tensor("a.weight", &[6, 4]), tensor("b.weight", &[6, 4]), tensor("c.weight", &[4, 6])];
    ModelSpec::new(api::ModelSpec::new("m", tensors, vec![GroupConfig::new("all", &["*"], optimizer)]), Vec::new())
}

fn model(spec: &ModelSpec) -> Model {
    let model = Model::new(spec.clone(), 0, 1, Duration::from_secs(60));
    model.membership.join("w", Some(0)).unwrap();
    model
}

/// One step of pseudo-random gradients; at step 1 the first block has none, so the
/// optimizer's count of its updates falls one behind the version (and must be restored).
fn step(model: &Model, t: u64) {
    let grads: Vec<Box<dyn BlockGradient>> = model
        .local_blocks()
        .iter()
        .enumerate()
        .map(|(i, b)| -> Box<dyn BlockGradient> {
            if t == 1 && i == 0 {
                Box::new(NoGradient { block: b.clone(), overflow: false })
            } else {
                Box::new(Grad(b.clone(), pseudo_random(t * 16 + i as u64, b.len)))
            }
        })
        .collect();
    model.commit_push("w", t, 1.0, grads).unwrap();
}

fn bits_of(model: &Model) -> Vec<(u64, Vec<u32>, crate::optim::OptimizerState)> {
    let snapshot = model.snapshot_now().expect("every block at one version");
    snapshot
        .blocks
        .into_iter()
        .map(|b| (b.version, b.params.iter().map(|x| x.to_bits()).collect(), b.optimizer))
        .collect()
}

/// Steps a model three times, writes it to disk, restores it into a fresh
/// model, and steps both three more times: the restored one must match the
/// uninterrupted one bit for bit, state included.
fn round_trip(label: &str) {
    let (_, config, _) = modes().into_iter().find(|(name, _, _)| *name == label).expect("a mode of the table");
    let spec = match try_spec(config) {
        Ok(spec) => spec,
        Err(refused) => {
            // Some optimizer variants exist only below the spec (a FRUGAL schedule in columns mode):
            // no registration can hold one, so no checkpoint can.
            assert!(label == "frugal columns schedule", "{label}: {refused}");
            return;
        }
    };
    let original = model(&spec);
    for t in 0..3 {
        step(&original, t);
    }
    let dir = temp_dir(&label.replace(' ', "-"));
    let store = CheckpointStore::new(dir.clone(), 2, 0, 1).unwrap();
    let snapshot = original.snapshot_now().unwrap();
    assert_eq!(snapshot.version, 3);
    store.write(snapshot.clone()).unwrap();
    let loaded = store.load("m", 3).unwrap();
    assert_eq!(loaded.blocks, snapshot.blocks, "{label}: what was read is what was written");
    let restored = Model::new(spec.clone(), 0, 1, Duration::from_secs(60));
    restored.restore(&loaded).unwrap();
    assert!(restored.membership.is_live("w"), "{label}: members come back");
    for t in 3..6 {
        step(&original, t);
        step(&restored, t);
    }
    assert_eq!(bits_of(&restored), bits_of(&original), "{label}");
    assert_eq!(snapshot.blocks, loaded.blocks, "{label}: updates after the snapshot copied what it shared");
    fs::remove_dir_all(dir).ok();
}

macro_rules! every_mode_round_trips {
    ($($test:ident => $label:literal,)*) => {
        $(
            #[test]
            fn $test() {
                round_trip($label);
            }
        )*

        #[test]
        fn the_round_trip_tests_cover_every_mode_of_the_table() {
            let covered = [$($label),*];
            for (label, _, _) in modes() {
                assert!(covered.contains(&label), "no checkpoint round trip for '{label}'");
            }
        }
    };
}

every_mode_round_trips! {
    sgd_round_trips => "sgd",
    sgd_momentum_round_trips => "sgd momentum",
    sgd_nesterov_round_trips => "sgd nesterov",
    adamw_round_trips => "adamw",
    adam_l2_round_trips => "adam-l2",
    adagrad_norm_round_trips => "adagrad-norm",
    adagrad_sn_round_trips => "adagrad-sn",
    adam_sn_round_trips => "adam-sn",
    adam_sn_columns_round_trips => "adam-sn columns",
    sgd_sm_uniform_round_trips => "sgd-sm uniform",
    sgd_sm_topk_round_trips => "sgd-sm topk",
    sgd_sm_topk_columns_round_trips => "sgd-sm topk columns",
    sgd_sm_schedule_round_trips => "sgd-sm schedule",
    adam_sn_sm_svd_round_trips => "adam-sn-sm svd",
    adam_sn_sm_svd_left_round_trips => "adam-sn-sm svd left",
    adam_sn_sm_randomized_svd_round_trips => "adam-sn-sm randomized svd",
    adam_sn_sm_randomized_svd_left_round_trips => "adam-sn-sm randomized svd left",
    frugal_block_ascending_round_trips => "frugal block ascending",
    frugal_block_descending_round_trips => "frugal block descending",
    frugal_block_inactive_round_trips => "frugal block inactive at export",
    frugal_block_random_round_trips => "frugal block random",
    frugal_block_kept_statistics_round_trips => "frugal block kept statistics",
    frugal_columns_round_trips => "frugal columns",
    frugal_columns_schedule_round_trips => "frugal columns schedule",
    frugal_svd_round_trips => "frugal svd",
    frugal_svd_left_round_trips => "frugal svd left",
    frugal_randomized_svd_round_trips => "frugal randomized svd",
    frugal_randomized_svd_left_round_trips => "frugal randomized svd left",
    frugal_regular_tensor_round_trips => "frugal regular tensor",
    signsgd_round_trips => "signsgd",
    signum_round_trips => "signum",
    lion_round_trips => "lion",
}

fn sgd_model() -> (ModelSpec, Model) {
    let spec = spec(OptimizerConfig::Sgd(SgdConfig { lr: 0.1, momentum: 0.9, ..Default::default() }));
    let model = model(&spec);
    (spec, model)
}

#[test]
fn a_torn_or_corrupt_checkpoint_falls_back_to_the_one_before() {
    let (_, model) = sgd_model();
    let dir = temp_dir("torn");
    let store = CheckpointStore::new(dir.clone(), 5, 0, 1).unwrap();
    for t in 0..2 {
        step(&model, t);
        store.write(model.snapshot_now().unwrap()).unwrap();
    }
    assert_eq!(store.versions("m"), vec![1, 2]);
    let newest = dir.join("m").join("v000000000002").join(TENSORS);
    let intact = fs::read(&newest).unwrap();
    // Truncated: the sizes disagree with the manifest, so it is not even listed as complete.
    fs::write(&newest, &intact[..intact.len() - 10]).unwrap();
    assert_eq!(store.versions("m"), vec![1]);
    assert_eq!(store.load_newest("m").unwrap().version, 1);
    // One flipped bit: same size, wrong checksum.
    let mut flipped = intact.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x10;
    fs::write(&newest, &flipped).unwrap();
    let error = store.load("m", 2).unwrap_err().to_string();
    assert!(error.contains("checksum"), "{error}");
    assert_eq!(store.load_newest("m").unwrap().version, 1);
    // A manifest cut short does not parse.
    fs::write(&newest, &intact).unwrap();
    let manifest = dir.join("m").join("v000000000002").join(MANIFEST);
    let text = fs::read(&manifest).unwrap();
    fs::write(&manifest, &text[..text.len() / 2]).unwrap();
    assert_eq!(store.load_newest("m").unwrap().version, 1);
    fs::remove_dir_all(dir).ok();
}

#[test]
fn a_version_written_again_replaces_the_old_copy_whole() {
    let (_, model) = sgd_model();
    let dir = temp_dir("rewrite");
    let store = CheckpointStore::new(dir.clone(), 5, 0, 1).unwrap();
    step(&model, 0);
    let first = model.snapshot_now().unwrap();
    store.write(first.clone()).unwrap();
    // Another copy of the same version with other contents (a rollback recomputed it differently).
    let mut second = first.clone();
    second.epoch += 1;
    store.write(second).unwrap();
    assert_eq!(store.versions("m"), vec![1]);
    assert_eq!(store.load_newest("m").unwrap().epoch, first.epoch + 1);
    let names: Vec<String> =
        fs::read_dir(dir.join("m")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["v000000000001".to_string()], "the old copy is gone, no partial is left");
    fs::remove_dir_all(dir).ok();
}

#[test]
fn another_shards_checkpoint_is_refused_and_old_versions_are_pruned() {
    let (_, model) = sgd_model();
    let dir = temp_dir("prune");
    let store = CheckpointStore::new(dir.clone(), 2, 0, 1).unwrap();
    // Version 3 is the one the shards hold in common by the time it is written.
    store.commit("m", 3, false);
    for t in 0..4 {
        step(&model, t);
        store.write(model.snapshot_now().unwrap()).unwrap();
    }
    assert_eq!(store.versions("m"), vec![3, 4], "only the newest two are kept");
    let other = CheckpointStore::new(dir.clone(), 2, 1, 2).unwrap();
    let error = other.load("m", 4).unwrap_err().to_string();
    assert!(error.contains("shard 0 of 1"), "{error}");
    assert_eq!(store.models(), vec!["m".to_string()]);
    // After a rollback to 3, version 4 belongs to the abandoned run.
    store.discard_after("m", 3);
    assert_eq!(store.versions("m"), vec![3]);
    fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn a_write_for_a_model_that_was_rolled_back_meanwhile_is_discarded() {
    let (spec, _) = sgd_model();
    let dir = temp_dir("retired");
    let store = CheckpointStore::new(dir.clone(), 3, 0, 1).unwrap();
    let writer = CheckpointWriter::start(store.clone()).unwrap();
    let plan = Arc::new(CheckpointPlan::new(0, Some(writer as Arc<dyn CheckpointSink>)));
    let model = Model::new(spec, 0, 1, Duration::from_secs(60)).with_checkpoints(1, plan.clone());
    model.schedule_checkpoint(0, false).unwrap();
    assert!(plan.wait_written(0, Duration::from_secs(10)).await.unwrap().is_ok());
    model.membership.join("w", Some(0)).unwrap();
    step(&model, 0);
    // A rollback replaces the model while its checkpoint of version 1 is being written:
    // the write is discarded, not left for a later recovery to pick.
    model.retire();
    model.schedule_checkpoint(1, false).unwrap();
    let result = plan.wait_written(1, Duration::from_secs(10)).await.unwrap();
    assert!(result.unwrap_err().contains("rolled back"));
    assert_eq!(store.versions("m"), vec![0]);
    fs::remove_dir_all(dir).ok();
}

/// One full disk and one crash must not lose the run: a shard keeps the
/// versions pinned for the cluster whatever `keep` says, and until one is
/// committed (pinned on every shard), its oldest version (0, which all write first).
#[test]
fn pinned_versions_are_kept_past_the_newest_k_until_a_newer_one_is_committed() {
    let (_, model) = sgd_model();
    let dir = temp_dir("common");
    let store = CheckpointStore::new(dir.clone(), 2, 0, 1).unwrap();
    let write_through = |steps: std::ops::Range<u64>| {
        for t in steps {
            step(&model, t);
            store.write(model.snapshot_now().unwrap()).unwrap();
        }
    };
    write_through(0..4);
    assert_eq!(store.versions("m"), vec![1, 3, 4], "no common version known yet: the oldest stays");
    // Shard 0 asks to pin 3, which is on disk, and 2, which is not.
    assert!(store.pin("m", 3));
    assert!(!store.pin("m", 2), "a version no longer on disk cannot be pinned");
    // Another shard's writes fail from here on, and this one writes on.
    write_through(4..8);
    assert_eq!(store.versions("m"), vec![1, 3, 7, 8], "pinned, not yet committed: the oldest stays too");
    store.commit("m", 3, false);
    write_through(8..9);
    assert_eq!(store.versions("m"), vec![3, 8, 9], "the committed version is kept, the newest two beside it");
    // A newer version pinned, then a late message of an older commit: nothing is let go.
    assert!(store.pin("m", 9));
    store.commit("m", 1, false);
    assert_eq!(store.committed("m"), Some(3));
    write_through(9..11);
    assert_eq!(store.versions("m"), vec![3, 9, 10, 11]);
    store.commit("m", 9, false);
    write_through(11..12);
    assert_eq!(store.versions("m"), vec![9, 11, 12], "a newer committed version lets the older one go");
    // A rollback to 9: what came after is discarded, and so are the pins past it.
    assert!(store.pin("m", 12));
    store.discard_after("m", 9);
    store.commit("m", 9, true);
    assert_eq!(store.versions("m"), vec![9]);
    write_through(12..15);
    assert_eq!(store.versions("m"), vec![9, 14, 15], "the version rolled back to is kept, no other pin is");
    fs::remove_dir_all(dir).ok();
}

#[test]
fn model_names_become_one_path_component() {
    assert_eq!(escape("digits-mlp_v1.2"), "digits-mlp_v1.2");
    assert_eq!(escape("a/b c"), "a%2Fb%20c");
    assert_eq!(escape(".."), "%2E.");
}

/// Collects snapshots instead of writing them, and says they were written.
#[derive(Default)]
struct Collect(parking_lot::Mutex<Vec<ModelSnapshot>>);

impl CheckpointSink for Collect {
    fn submit(&self, snapshot: ModelSnapshot, plan: Arc<CheckpointPlan>) {
        let version = snapshot.version;
        self.0.lock().push(snapshot);
        plan.finished(
            version,
            Ok(WriteReport { version, path: String::new(), seconds: 0.0, bytes: 0, copy_seconds: 0.0 }),
        );
    }
}

#[test]
fn blocks_are_copied_at_the_checkpoint_version_and_scheduled_versions_are_marked() {
    let (spec, _) = sgd_model();
    let sink = Arc::new(Collect::default());
    let plan = Arc::new(CheckpointPlan::new(2, Some(sink.clone() as Arc<dyn CheckpointSink>)));
    let model = Model::new(spec, 0, 1, Duration::from_secs(60)).with_checkpoints(1, plan);
    model.membership.join("w", Some(0)).unwrap();
    model.membership.join("v", Some(1)).unwrap();
    model_pair_step(&model, 0);
    assert!(sink.0.lock().is_empty(), "version 1 is not a multiple of 2");
    model_pair_step(&model, 1);
    {
        let taken = sink.0.lock();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].version, 2);
        assert!(taken[0].blocks.iter().all(|b| b.version == 2));
        assert_eq!(taken[0].members, vec![("w".to_string(), 0), ("v".to_string(), 1)]);
        assert!(taken[0].blocks.iter().all(|b| b.last_contributors.len() == 2), "the retry facts are kept");
    }
    assert!(model.checkpoints.marks(2) && model.checkpoints.marks(4) && !model.checkpoints.marks(3));
    // On demand: version 5 is scheduled ahead, marked, and taken when the blocks get there.
    model.schedule_checkpoint(5, true).unwrap();
    assert!(model.checkpoints.marks(5));
    for t in 2..5 {
        model_pair_step(&model, t);
    }
    let versions: Vec<u64> = sink.0.lock().iter().map(|s| s.version).collect();
    assert_eq!(versions, vec![2, 4, 5]);
    // A version the blocks have passed cannot be scheduled.
    assert!(model.schedule_checkpoint(3, false).is_err());
    // While workers train, a version the blocks are at may have been pulled unmarked already.
    model.membership.leave("v");
    model_pair_step_one(&model, 5);
    model_pair_step_one(&model, 6);
    assert!(model.schedule_checkpoint(7, true).is_err());
    assert!(!model.checkpoints.marks(7), "a refused version is not left marked");
    // Idle at the current version: taken at once.
    model.schedule_checkpoint(7, false).unwrap();
    let versions: Vec<u64> = sink.0.lock().iter().map(|s| s.version).collect();
    assert_eq!(versions, vec![2, 4, 5, 6, 7]);
    model.schedule_checkpoint(7, false).unwrap();
    assert_eq!(sink.0.lock().len(), 5, "already written");
}

/// One sync step pushed by "w" alone (the only member left).
fn model_pair_step_one(model: &Model, t: u64) {
    let grads = model.local_blocks().iter().map(|b| Grad(b.clone(), pseudo_random(t, b.len))).collect();
    model.commit_push("w", t, 1.0, grads).unwrap();
}

/// One sync step with both members pushing.
fn model_pair_step(model: &Model, t: u64) {
    for worker in ["w", "v"] {
        let grads = model.local_blocks().iter().map(|b| Grad(b.clone(), pseudo_random(t, b.len))).collect();
        model.commit_push(worker, t, 1.0, grads).unwrap();
    }
}
