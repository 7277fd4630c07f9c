//! A worker's heartbeat that fails (a cut link, a restarting shard) is tried
//! again within a fraction of its period, not a whole period later. The chaos
//! soak found the cost of waiting: two short cuts (451 and 571 ms, each far
//! under the 3 s lease) each took one beat, the lease ran out on the boundary
//! of the third, and a step went ahead without a live worker.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ps_client::spec::{GroupConfig, Init, ModelSpec, OptimizerConfig, TensorSpec};
use ps_client::{ClientConfig, LocalMode, PsClient, Tensors};
use ps_testkit::chaos::proxy::LinkProxy;
use ps_testkit::{ServerProcess, free_port};

/// The lease; beats go every third of it.
const LEASE: Duration = Duration::from_secs(9);

fn server_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_worker")).with_file_name(format!("server{}", std::env::consts::EXE_SUFFIX))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_heartbeat_is_tried_again_soon_after_the_link_is_back() {
    let port = free_port().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let lease = format!("{}ms", LEASE.as_millis());
    let args = ["--shard-index", "0", "--shards", &addr, "--metrics-addr", "off", "--lease", &lease];
    let _shard = ServerProcess::spawn(&server_binary(), &args, &[]).expect("a shard");
    let proxy = LinkProxy::start(addr.parse().unwrap()).await.unwrap();
    let direct = |target: String| {
        let mut config = ClientConfig::new(vec![target]);
        config.local = LocalMode::Off;
        PsClient::connect(config).unwrap()
    };
    let observer = direct(addr.clone());
    observer.wait_ready(Duration::from_secs(30)).await.unwrap();
    let spec = ModelSpec::new(
        "beats",
        vec![TensorSpec::new("w", &[4], Init::Constant(0.0))],
        vec![GroupConfig::new("all", &["*"], OptimizerConfig::sgd(0.1))],
    );
    let worker = direct(proxy.addr.to_string());
    let model = worker.register(&spec, &Tensors::new()).await.unwrap();
    model.join("w").await.unwrap();
    let beating = model.spawn_heartbeat("w");
    let since_beat = || async {
        let status = observer.status("beats").await.unwrap();
        let live = &status[0].models[0].live_workers;
        Duration::from_millis(live.iter().find(|w| w.worker_id == "w").expect("a live member").last_heartbeat_ms_ago)
    };
    // Cut right after a beat, for longer than the period: the next beat fails inside the cut.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = since_beat().await;
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = since_beat().await;
        if now < last {
            break;
        }
        last = now;
        assert!(Instant::now() < deadline, "no heartbeat arrived");
    }
    proxy.cut(true);
    let period = LEASE / 3;
    tokio::time::sleep(period + Duration::from_secs(1)).await;
    assert!(since_beat().await >= period, "the beat inside the cut failed");
    proxy.cut(false);
    let restored = Instant::now();
    // Waiting a whole period after the failed beat, the next one would come a
    // period after it, 2 s from now; tried again soon, it comes well before.
    while since_beat().await > Duration::from_millis(500) {
        assert!(
            restored.elapsed() < Duration::from_millis(1200),
            "no heartbeat within 1.2 s of the link coming back (the period is {period:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    beating.abort();
}
