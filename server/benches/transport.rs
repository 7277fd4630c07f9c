//! Push + pull of a 64M-parameter (256 MB f32) model over loopback gRPC,
//! against raw loopback TCP moving the same bytes in the same run.
//!
//! Run: `cargo bench -p ps-server --bench transport` (PS_BENCH_PARAMS and
//! PS_BENCH_ROUNDS override the size and the number of rounds).

use std::time::{Duration, Instant};

use ps_client::Tensors;
use ps_client::spec::{GroupConfig, Init, ModelSpec, Optimizer, TensorSpec};
use ps_testkit::{Cluster, env_or, raw_tcp};

// The same allocator as the binaries: it keeps freed blocks for reuse instead
// of returning them to the kernel, which then has to fault and zero fresh pages.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rate(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64() / 1e6
}

#[tokio::main]
async fn main() {
    let params = env_or("PS_BENCH_PARAMS", 64 << 20);
    let rounds = env_or("PS_BENCH_ROUNDS", 3);
    let bytes = params * 4;
    let cols = 1024;
    let rows = params / cols;
    println!(
        "transport benchmark: {params} parameters ({:.0} MB f32), {rounds} rounds, 1 shard, 1 worker, loopback",
        bytes as f64 / 1e6
    );

    let cluster = Cluster::start(1, Duration::from_secs(600)).await;
    let client = cluster.client();
    let spec = ModelSpec::new(
        "bench",
        vec![TensorSpec::new("w", &[rows as u64, cols as u64], Init::Zeros)],
        vec![GroupConfig::new("all", &["*"], Optimizer::sgd(1e-6))],
    );
    let model = client.register(&spec, &Tensors::new()).await.unwrap();
    model.join("bench").await.unwrap();
    let grads: Tensors = [("w".to_string(), vec![0.5f32; rows * cols])].into_iter().collect();
    // Warm up connections and allocations.
    // The pull reuses one buffer, as a training loop does (`pull_into`).
    let mut weights = Tensors::new();
    model.push("bench", 0, &grads).await.unwrap();
    model.pull_into(&mut weights, 1, Duration::ZERO).await.unwrap();

    let (mut grpc_push, mut grpc_pull, mut tcp_push, mut tcp_pull) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds as u64 {
        let step = round + 1;
        let start = Instant::now();
        model.push("bench", step, &grads).await.unwrap();
        grpc_push.push(start.elapsed());
        let start = Instant::now();
        let (_, pulled) = model.pull_into(&mut weights, step + 1, Duration::ZERO).await.unwrap();
        grpc_pull.push(start.elapsed());
        assert_eq!(pulled as usize, bytes);
        let tcp = raw_tcp(1, bytes, bytes).await;
        tcp_push.push(tcp.up);
        tcp_pull.push(tcp.down);
    }
    let best = |v: &[Duration]| *v.iter().min().unwrap();
    let (gp, gl, tp, tl) = (best(&grpc_push), best(&grpc_pull), best(&tcp_push), best(&tcp_pull));
    println!("{:<28} {:>10} {:>10} {:>12}", "best of rounds", "push MB/s", "pull MB/s", "push+pull");
    println!(
        "{:<28} {:>10.0} {:>10.0} {:>10.0} MB/s",
        "raw loopback TCP",
        rate(bytes, tp),
        rate(bytes, tl),
        rate(2 * bytes, tp + tl)
    );
    println!(
        "{:<28} {:>10.0} {:>10.0} {:>10.0} MB/s",
        "gRPC push (+SGD) / pull",
        rate(bytes, gp),
        rate(bytes, gl),
        rate(2 * bytes, gp + gl)
    );
    println!(
        "ratio gRPC / raw TCP: push {:.2}, pull {:.2}, push+pull {:.2}",
        tp.as_secs_f64() / gp.as_secs_f64(),
        tl.as_secs_f64() / gl.as_secs_f64(),
        (tp + tl).as_secs_f64() / (gp + gl).as_secs_f64()
    );
}
