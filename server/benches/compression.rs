//! Wire encodings on a 25M-parameter model with 4 workers in sync mode: bytes
//! on the wire per step and seconds per step for each encoding, next to raw
//! loopback TCP moving the same bytes in the same run.
//!
//! Run: `cargo bench -p ps-server --bench compression` (PS_BENCH_PARAMS and
//! PS_BENCH_ROUNDS override the size and the number of measured steps).

use std::time::{Duration, Instant};

use futures::future::join_all;
use ps_client::spec::{Aggregation, Encoding, GroupConfig, Init, ModelSpec, OptimizerConfig, TensorSpec};
use ps_client::{ClientConfig, PsClient, Tensors};
use ps_testkit::{Cluster, env_or, raw_tcp};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const WORKERS: usize = 4;

fn spec(name: &str, rows: usize, cols: usize, encoding: Encoding, aggregation: Aggregation) -> ModelSpec {
    let group = GroupConfig {
        push_encodings: vec![encoding],
        aggregation,
        ..GroupConfig::new("all", &["*"], OptimizerConfig::sgd(1e-6))
    };
    ModelSpec::new(name, vec![TensorSpec::new("w", &[rows as u64, cols as u64], Init::Zeros)], vec![group])
}

#[tokio::main]
async fn main() {
    let params = env_or("PS_BENCH_PARAMS", 25 << 20);
    let rounds = env_or("PS_BENCH_ROUNDS", 3);
    let cols = 1024;
    let rows = params / cols;
    let params = rows * cols;
    println!(
        "compression benchmark: {params} parameters, {WORKERS} workers, sync, 1 shard, loopback, best of {rounds} steps"
    );

    let cluster = Cluster::start(1, Duration::from_secs(600)).await;
    // One connection per worker, as separate worker processes would have.
    let clients: Vec<PsClient> =
        (0..WORKERS).map(|_| PsClient::connect(ClientConfig::new(cluster.addrs.clone())).unwrap()).collect();
    let grads: Vec<Tensors> = (0..WORKERS)
        .map(|k| {
            let values = (0..params).map(|i| ((i * 7 + k * 13) % 17) as f32 / 17.0 - 0.5).collect();
            [("w".to_string(), values)].into_iter().collect()
        })
        .collect();

    println!(
        "{:<14} {:>14} {:>9} {:>12} {:>12} {:>12} {:>8}",
        "push encoding", "push B/step", "vs f32", "push s/step", "step s", "raw TCP s", "ratio"
    );
    let cases = [
        ("f32", Encoding::F32, Aggregation::Mean),
        ("bf16", Encoding::Bf16, Aggregation::Mean),
        ("f16", Encoding::F16, Aggregation::Mean),
        ("sign1 vote", Encoding::Sign1, Aggregation::MajorityVote),
        ("sign1 mean", Encoding::Sign1, Aggregation::Mean),
    ];
    let mut f32_bytes = 0u64;
    for (label, encoding, aggregation) in cases {
        let name = format!("bench-{}", label.replace(' ', "-"));
        let no_values = Tensors::new();
        let model_spec = spec(&name, rows, cols, encoding, aggregation);
        let models: Vec<_> = join_all(clients.iter().map(|c| c.register(&model_spec, &no_values)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        for (k, model) in models.iter().enumerate() {
            model.join(&format!("worker-{k}")).await.unwrap();
        }
        let mut weights: Vec<Tensors> = vec![Tensors::new(); WORKERS];
        let (mut best_push, mut best_step) = (Duration::MAX, Duration::MAX);
        let (mut push_bytes, mut pull_bytes) = (0u64, 0u64);
        for step in 0..=rounds as u64 {
            let start = Instant::now();
            let pushes = models.iter().zip(&grads).enumerate().map(|(k, (m, g))| {
                let worker = format!("worker-{k}");
                async move { m.push(&worker, step, g).await.unwrap() }
            });
            push_bytes = join_all(pushes).await.iter().map(|s| s.bytes).sum();
            let pushed = start.elapsed();
            let pulls = models.iter().zip(weights.iter_mut()).map(|(m, w)| m.pull_into(w, step + 1, Duration::ZERO));
            pull_bytes = join_all(pulls).await.into_iter().map(|r| r.unwrap().1).sum();
            if step > 0 {
                best_push = best_push.min(pushed);
                best_step = best_step.min(start.elapsed());
            }
        }
        if encoding == Encoding::F32 {
            f32_bytes = push_bytes;
        }
        let times =
            raw_tcp(WORKERS, (push_bytes / WORKERS as u64) as usize, (pull_bytes / WORKERS as u64) as usize).await;
        let tcp = times.up + times.down;
        println!(
            "{:<14} {:>14} {:>8.1}x {:>12.3} {:>12.3} {:>12.3} {:>8.2}",
            label,
            push_bytes,
            f32_bytes as f64 / push_bytes as f64,
            best_push.as_secs_f64(),
            best_step.as_secs_f64(),
            tcp.as_secs_f64(),
            tcp.as_secs_f64() / best_step.as_secs_f64()
        );
    }
    println!("push B/step: payload bytes of all workers' pushes in one step; step s: push + f32 pull by every worker;");
    println!(
        "raw TCP s: the same push and pull bytes over {WORKERS} plain loopback connections; ratio = raw TCP s / step s"
    );
}
