//! Federated round latency: 8 clients, FedAvg, 2 shards on loopback gRPC,
//! local work close to zero (`w ← 0.999·w + 1e-3·(client + 1)`), so a round
//! is the protocol and the bytes: every client pulls the model and pushes its
//! delta. Printed next to the wire floor, raw loopback TCP moving the same
//! bytes over 8 connections in the same run, and, when `PS_FLOWER_PYTHON`
//! names a Python with `flwr[simulation]`, next to Flower's simulation engine
//! running the same workload (`server/benches/flower_rounds.py`).
//!
//! Run: `cargo bench -p ps-server --bench federated` (PS_BENCH_SIZES, a comma
//! list of parameter counts, and PS_BENCH_ROUNDS override the defaults).

use std::time::{Duration, Instant};

use futures::future::try_join_all;
use ps_client::federated::{ClientState, RoundOutcome, train_round};
use ps_client::spec::{Algorithm, RoundConfig};
use ps_client::spec::{GroupConfig, Init, ModelSpec, OptimizerConfig, TensorSpec};
use ps_client::{ModelHandle, Tensors};
use ps_testkit::{Cluster, env_or, raw_tcp};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CLIENTS: u32 = 8;

async fn one_round(model: &ModelHandle, round: u64) -> Result<(), ps_client::ClientError> {
    let clients = (0..CLIENTS).map(|client| async move {
        let task = model.next_task(client, round - 1).await?;
        let mut state = ClientState::new(client);
        let outcome = train_round(model, &task, &mut state, |w, _| {
            let shift = 1e-3 * (client as f32 + 1.0);
            w.values_mut().flatten().for_each(|v| *v = 0.999 * *v + shift);
        })
        .await?;
        assert!(matches!(outcome, RoundOutcome::Counted { .. }), "{outcome:?}");
        Ok::<_, ps_client::ClientError>(())
    });
    try_join_all(clients).await.map(|_| ())
}

fn flower(params: usize, rounds: usize) -> Option<f64> {
    let python = std::env::var("PS_FLOWER_PYTHON").ok()?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/flower_rounds.py");
    let output = std::process::Command::new(python)
        .args([script, &params.to_string(), &CLIENTS.to_string(), &rounds.to_string()])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let seconds = text.lines().find_map(|l| l.strip_prefix("SECONDS_PER_ROUND "))?.trim().parse().ok();
    if seconds.is_none() {
        eprintln!("flower run failed:\n{}", String::from_utf8_lossy(&output.stderr));
    }
    seconds
}

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = std::env::var("PS_BENCH_SIZES")
        .unwrap_or_else(|_| "1048576,10485760".into())
        .split(',')
        .map(|s| s.trim().parse().expect("PS_BENCH_SIZES: parameter counts"))
        .collect();
    let rounds = env_or("PS_BENCH_ROUNDS", 5);
    println!("federated round benchmark: {CLIENTS} clients, FedAvg, 2 shards, loopback, best of {rounds} rounds");
    println!(
        "{:>11} {:>12} {:>14} {:>12} {:>14} {:>14}",
        "parameters", "s/round", "wire floor s", "floor ratio", "flower s/round", "flower / ours"
    );
    let cluster = Cluster::start(2, Duration::from_secs(600)).await;
    for (index, &params) in sizes.iter().enumerate() {
        let cols = 1024;
        let rows = params.div_ceil(cols);
        let mut config = RoundConfig::new(Algorithm::FedAvg, CLIENTS, 0.1);
        config.rounds = Some(rounds as u64 + 1);
        let spec = ModelSpec::new(
            format!("fed-bench-{index}"),
            vec![TensorSpec::new("w", &[rows as u64, cols as u64], Init::Zeros)],
            vec![GroupConfig::new("all", &["*"], OptimizerConfig::sgd(1.0))],
        )
        .with_rounds(config);
        let model = cluster.client().register(&spec, &Tensors::new()).await.expect("registering");
        // Round 1 warms up connections and allocations.
        one_round(&model, 1).await.expect("round 1");
        let mut ours = Duration::MAX;
        let mut floor = Duration::MAX;
        let bytes = rows * cols * 4;
        for round in 2..=rounds as u64 + 1 {
            let started = Instant::now();
            one_round(&model, round).await.expect("a round");
            ours = ours.min(started.elapsed());
            // The same bytes as raw TCP: each client receives the model and sends its delta.
            let tcp = raw_tcp(CLIENTS as usize, bytes, bytes).await;
            floor = floor.min(tcp.up + tcp.down);
        }
        let flower = flower(rows * cols, rounds);
        println!(
            "{:>11} {:>12.3} {:>14.3} {:>12.2} {:>14} {:>14}",
            rows * cols,
            ours.as_secs_f64(),
            floor.as_secs_f64(),
            ours.as_secs_f64() / floor.as_secs_f64(),
            flower.map_or("-".into(), |f| format!("{f:.3}")),
            flower.map_or("-".into(), |f| format!("{:.1}x", f / ours.as_secs_f64())),
        );
    }
}
