//! Checkpoints through the API: one version on every shard (at once when no
//! worker trains, ahead of the run when one does), and requests of another
//! epoch refused with the point to resume from, changing nothing, and a
//! worker back after a rollback resuming where every shard can take it.

use std::path::PathBuf;
use std::time::Duration;

use ps_proto::{errors, pb};

use crate::cluster::*;

fn temp_root(label: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("ps-it-checkpoints-{label}-{}", std::process::id()));
    std::fs::remove_dir_all(&root).ok();
    root
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_is_written_by_every_shard_at_one_version() {
    let root = temp_root("rpc");
    let cluster = Cluster::start_with_checkpoints(2, Duration::from_secs(30), &root, 0, Duration::ZERO).await;
    let (model, init) = register_small(&cluster, "ckpt").await;
    let client = cluster.client();
    model.join("a").await.unwrap();
    model.push("a", 0, &grads_like(&init, 1)).await.unwrap();
    model.leave("a").await.unwrap();
    // No live worker: the current version, at once.
    let written = client.checkpoint("ckpt", true, Duration::from_secs(30)).await.unwrap();
    assert_eq!(written.version, 1);
    assert!(PathBuf::from(&written.path).join("manifest.json").is_file(), "{}", written.path);
    assert!(written.bytes > 0 && written.write_seconds > 0.0);
    for shard in 0..2 {
        let dir = root.join(format!("shard-{shard}")).join("ckpt");
        assert!(dir.join("v000000000000").is_dir(), "registration wrote version 0 on shard {shard}");
        assert!(dir.join("v000000000001").is_dir(), "shard {shard} wrote version 1");
    }
    let status = client.status("ckpt").await.unwrap();
    assert!(status.iter().all(|s| s.models[0].checkpoint_version == 1 && s.models[0].epoch == 1), "{status:?}");
    // A live worker: two versions ahead, written when the run gets there.
    model.join("a").await.unwrap();
    let asking = client.clone();
    let pending = tokio::spawn(async move { asking.checkpoint("ckpt", true, Duration::from_secs(30)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    for step in 1..3 {
        let pulled = model.pull(step).await.unwrap();
        // Version 1 was written a moment ago; version 2 is not checkpointed.
        assert_eq!(pulled.checkpoint, step == 1, "version {step}");
        model.push("a", step, &grads_like(&init, step + 1)).await.unwrap();
    }
    let written = pending.await.unwrap().unwrap();
    assert_eq!(written.version, 3);
    assert!(model.pull(3).await.unwrap().checkpoint, "pulls of a checkpointed version are marked");
    for shard in 0..2 {
        assert!(root.join(format!("shard-{shard}")).join("ckpt").join("v000000000003").is_dir());
    }
    std::fs::remove_dir_all(&root).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_0_checkpoints_a_model_that_advanced_on_its_timer() {
    let root = temp_root("timer");
    let interval = Duration::from_millis(200);
    let cluster = Cluster::start_with_checkpoints(2, Duration::from_secs(30), &root, 0, interval).await;
    let (model, init) = register_small(&cluster, "timed").await;
    model.join("a").await.unwrap();
    model.push("a", 0, &grads_like(&init, 1)).await.unwrap();
    model.leave("a").await.unwrap();
    let client = cluster.client();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = client.status("timed").await.unwrap();
        if status.iter().all(|s| s.models[0].checkpoint_version == 1) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no timed checkpoint of version 1: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for shard in 0..2 {
        assert!(root.join(format!("shard-{shard}")).join("timed").join("v000000000001").is_dir());
    }
    std::fs::remove_dir_all(&root).ok();
}

/// Found by the chaos harness (a shard killed, then a peer's checkpoint disk
/// read-only, then another shard killed): after a rollback every shard holds
/// the version it went back to, and it must keep it until every shard holds a
/// newer one. A shard that pruned it to its newest `--checkpoint-keep` left no
/// version in common with the peer whose writes were failing, and the next
/// restart could not recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_version_rolled_back_to_is_kept_while_a_peer_writes_nothing() {
    let root = temp_root("kept");
    let cluster = Cluster::start_with_checkpoints(2, Duration::from_secs(30), &root, 5, Duration::ZERO).await;
    let (model, init) = register_small(&cluster, "kept").await;
    model.join("a").await.unwrap();
    for step in 0..12 {
        model.push("a", step, &grads_like(&init, step + 1)).await.unwrap();
    }
    let client = cluster.client();
    let written = |at: u64| {
        let client = client.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let status = client.status("kept").await.unwrap();
                if status.iter().all(|s| s.models[0].checkpoint_version >= at) {
                    return;
                }
                assert!(std::time::Instant::now() < deadline, "version {at} was not written: {status:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    written(10).await;
    for shard in 0..2 {
        let request = pb::RollbackRequest { model: "kept".into(), version: 10, epoch: 2 };
        cluster.raw(shard).await.rollback(request).await.unwrap();
    }
    // Shard 1's writes fail from here on (its model directory is a file).
    let dir = root.join("shard-1").join("kept");
    let aside = root.join("shard-1").join("kept.aside");
    std::fs::rename(&dir, &aside).unwrap();
    std::fs::write(&dir, b"not a directory").unwrap();
    let model = client.model("kept").await.unwrap();
    assert_eq!(model.epoch(), 2);
    for step in 10..40 {
        model.push("a", step, &grads_like(&init, step + 1)).await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while client.shard_status(0, "kept").await.unwrap().models[0].checkpoint_version < 40 {
        assert!(std::time::Instant::now() < deadline, "shard 0 did not write version 40");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::remove_file(&dir).unwrap();
    std::fs::rename(&aside, &dir).unwrap();
    let mut held = Vec::new();
    for shard in 0..2 {
        let request = pb::ListCheckpointsRequest { model: "kept".into(), ..Default::default() };
        held.push(cluster.raw(shard).await.list_checkpoints(request).await.unwrap().into_inner().versions);
    }
    assert!(held[0].contains(&40) && held[0].len() <= 4, "shard 0 keeps its newest 3 and one more: {held:?}");
    assert!(!held[1].iter().any(|v| *v > 10), "shard 1 wrote nothing after the rollback: {held:?}");
    let common: Vec<u64> = held[0].iter().filter(|v| held[1].contains(v)).copied().collect();
    assert_eq!(common.last(), Some(&10), "the version rolled back to is still held by both: {held:?}");
    std::fs::remove_dir_all(&root).ok();
}

/// Found by the chaos harness (a worker paused past its lease while a shard
/// restarted): the shard that answers `epoch-changed` reports its own version,
/// which may be a step past another shard's, whose step then waits for the
/// returning worker. Resuming at the reported version deadlocked the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_back_after_a_rollback_resumes_at_the_lowest_version_over_the_shards() {
    let cluster = Cluster::start(2, Duration::from_secs(30)).await;
    let (model, init) = register_small(&cluster, "away").await;
    model.join("a").await.unwrap();
    // "b" is back on shard 1 only (its heartbeat rejoined there first): step 0 waits for it there.
    let mut raw1 = cluster.raw(1).await;
    raw1.join_worker(pb::JoinWorkerRequest { model: "away".into(), worker_id: "b".into(), rank: None }).await.unwrap();
    model.push("a", 0, &grads_like(&init, 1)).await.unwrap();
    // Shard 0 went on to version 1; shard 1 is at 0, waiting for "b".
    let mut raw0 = cluster.raw(0).await;
    let request = pb::PullWeightsRequest { model: "away".into(), min_version: 0, epoch: 7, ..Default::default() };
    let error = ps_client::ClientError::Rpc { shard: 0, status: raw0.pull_weights(request).await.unwrap_err() };
    assert_eq!(error.rollback(), Some((1, 1)), "shard 0 reports its own version");
    let resume = model.resume_after_rollback("b", &error).await.unwrap();
    assert_eq!(resume, Some(0), "the version to continue from is shard 1's");
    // From there "b" completes shard 1's step; shard 0 says it went ahead, and both reach version 1.
    let pulled = model.pull(0).await.unwrap();
    assert_eq!((pulled.version, pulled.newest), (0, 1), "one shard's blocks were read past the version asked for");
    match model.push_step("b", 0, &grads_like(&init, 2)).await.unwrap() {
        ps_client::StepOutcome::Resync { version } => assert_eq!(version, 1),
        other => panic!("shard 0 had applied step 0 without 'b': {other:?}"),
    }
    let weights = model.pull_with_timeout(1, Duration::from_secs(10)).await.unwrap();
    assert_eq!((weights.version, weights.newest), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_of_another_epoch_is_refused_with_the_point_to_resume_from() {
    let cluster = Cluster::start(2, Duration::from_secs(30)).await;
    let (model, init) = register_small(&cluster, "epochs").await;
    assert_eq!(model.layout().epoch, 1);
    model.join("a").await.unwrap();
    model.push("a", 0, &grads_like(&init, 1)).await.unwrap();
    let before = bits(&model.pull(1).await.unwrap().tensors);
    let mut raw = cluster.raw(0).await;
    let request = pb::PullWeightsRequest { model: "epochs".into(), min_version: 1, epoch: 7, ..Default::default() };
    let status = raw.pull_weights(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let header = |key: &str| status.metadata().get(key).and_then(|v| v.to_str().ok()).map(str::to_string);
    assert_eq!(header(errors::ERROR_KIND_HEADER).as_deref(), Some(errors::EPOCH_CHANGED));
    assert_eq!(header(errors::EPOCH_HEADER).as_deref(), Some("1"));
    assert_eq!(header(errors::RESUME_VERSION_HEADER).as_deref(), Some("1"));
    assert!(status.message().contains("rolled back"), "{}", status.message());
    // A push of another epoch changes nothing.
    let block = model.layout().blocks.iter().find(|b| b.shard == 0).unwrap().clone();
    let tensor = model.layout().tensors[block.tensor].name.clone();
    let values = vec![1.0f32; block.length as usize];
    let chunks: Vec<pb::GradientChunk> =
        ps_proto::chunk::encode_block(&tensor, block.block, &values, pb::Encoding::F32, 0.0)
            .map(|chunk| pb::GradientChunk {
                model: "epochs".into(),
                worker_id: "a".into(),
                step: 1,
                chunk: Some(chunk),
                epoch: 2,
                lr_scale: None,
            })
            .collect();
    let status = raw.push_gradients(tokio_stream::iter(chunks)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{}", status.message());
    let error = ps_client::ClientError::Rpc { shard: 0, status };
    assert_eq!(error.rollback(), Some((1, 1)));
    assert_eq!(bits(&model.pull(1).await.unwrap().tensors), before);
    // Without a checkpoint directory there is nothing to write to.
    let refused = cluster.client().checkpoint("epochs", true, Duration::from_secs(5)).await.unwrap_err();
    assert_eq!(refused.status().unwrap().code(), tonic::Code::FailedPrecondition);
    assert!(refused.to_string().contains("--checkpoint-dir"), "{refused}");
}
