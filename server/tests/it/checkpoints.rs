//! Checkpoints through the API: one version on every shard (at once when no
//! worker trains, ahead of the run when one does), and requests of another
//! epoch refused with the point to resume from, changing nothing.

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
