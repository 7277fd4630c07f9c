//! The standard gRPC health service on real `server` processes: SERVING once a
//! shard is ready for traffic, NOT_SERVING while a restarted shard restores its
//! checkpoint and waits for its peers to agree on where to continue.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ps_client::{ClientConfig, ClientError, PsClient};
use ps_testkit::{ServerProcess, free_port};

use crate::cluster::*;

fn start(index: usize, addrs: &[String], root: &Path) -> ServerProcess {
    let (index_arg, shards) = (index.to_string(), addrs.join(","));
    let checkpoints = root.join(format!("shard-{index}"));
    #[rustfmt::skip]
    let args = [
        "--shard-index", &index_arg, "--shards", &shards, "--metrics-addr", "off",
        "--checkpoint-dir", checkpoints.to_str().unwrap(), "--lease", "5s",
    ];
    let log = root.join(format!("shard-{index}.log"));
    ServerProcess::spawn_logged(Path::new(env!("CARGO_BIN_EXE_server")), &args, &log).unwrap()
}

/// Polls until every shard's health reads `wanted`, or panics after `within`.
async fn wait_for(client: &PsClient, wanted: &[bool], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let serving = client.serving().await;
        if serving.as_deref().ok() == Some(wanted) {
            return;
        }
        assert!(Instant::now() < deadline, "health {serving:?} never became {wanted:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_while_a_restarted_shard_waits_for_its_peers() {
    let root: PathBuf = std::env::temp_dir().join(format!("ps-health-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let addrs: Vec<String> = (0..2).map(|_| format!("127.0.0.1:{}", free_port().unwrap())).collect();
    let mut shards = vec![start(0, &addrs, &root), start(1, &addrs, &root)];
    let client = PsClient::connect(ClientConfig::new(addrs.clone())).unwrap();
    wait_for(&client, &[true, true], Duration::from_secs(30)).await;
    let spec = small_spec("health");
    client.register(&spec, &initial_values(&spec, 1)).await.unwrap();
    client.checkpoint("health", true, Duration::from_secs(30)).await.unwrap();

    // Both shards die; shard 0 comes back alone, restores, and cannot agree with anyone.
    shards.clear();
    shards.push(start(0, &addrs, &root));
    let alone = PsClient::connect(ClientConfig::new(vec![addrs[0].clone()])).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while alone.serving().await.is_err() {
        assert!(Instant::now() < deadline, "the restarted shard never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..10 {
        assert_eq!(alone.serving().await.unwrap(), vec![false], "a shard that is still recovering is not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // One shard asked alone (`ctl health --shard`), and a shard the list does not have.
    assert!(!alone.shard_serving(0).await.unwrap());
    assert!(matches!(alone.shard_serving(1).await, Err(ClientError::NoSuchShard { shard: 1, shards: 1 })));
    // Its peer returns: they agree on the checkpoint, and both serve.
    shards.push(start(1, &addrs, &root));
    wait_for(&client, &[true, true], Duration::from_secs(60)).await;
    let status = client.status("health").await.unwrap();
    assert!(status.iter().all(|s| s.models.iter().all(|m| !m.recovering)), "serving means recovered");
}
