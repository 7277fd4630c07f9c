//! Push + pull of a 64M-parameter (256 MB f32) model over loopback gRPC,
//! against raw loopback TCP moving the same bytes in the same run.
//!
//! Run: `cargo bench -p ps-server --bench transport` (PS_BENCH_PARAMS and
//! PS_BENCH_ROUNDS override the size and the number of rounds).

use std::time::{Duration, Instant};

use ps_client::proto::{self, InitKind, InitRule, ModelSpec, OptimizerConfig, ParamGroup, TensorSpec};
use ps_client::{ClientConfig, PsClient, Tensors};
use ps_server::ServerOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// The same allocator as the binaries: it keeps freed blocks for reuse instead
// of returning them to the kernel, which then has to fault and zero fresh pages.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn rate(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64() / 1e6
}

/// Sends `bytes` to a loopback peer and receives `bytes` back, as a push and a pull would.
async fn raw_tcp_round(bytes: usize) -> (Duration, Duration) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        socket.set_nodelay(true).unwrap();
        let mut buffer = vec![0u8; 2 << 20];
        let mut received = 0;
        while received < bytes {
            received += socket.read(&mut buffer).await.unwrap();
        }
        socket.write_all(&[1]).await.unwrap();
        let payload = vec![7u8; 2 << 20];
        let mut sent = 0;
        while sent < bytes {
            let n = payload.len().min(bytes - sent);
            socket.write_all(&payload[..n]).await.unwrap();
            sent += n;
        }
    });
    let mut socket = TcpStream::connect(addr).await.unwrap();
    socket.set_nodelay(true).unwrap();
    let payload = vec![3u8; 2 << 20];
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        let n = payload.len().min(bytes - sent);
        socket.write_all(&payload[..n]).await.unwrap();
        sent += n;
    }
    let mut ack = [0u8; 1];
    socket.read_exact(&mut ack).await.unwrap();
    let push = start.elapsed();
    let start = Instant::now();
    let mut buffer = vec![0u8; 2 << 20];
    let mut received = 0;
    while received < bytes {
        received += socket.read(&mut buffer).await.unwrap();
    }
    let pull = start.elapsed();
    server.await.unwrap();
    (push, pull)
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

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let options =
        ServerOptions { shard_index: 0, shards: vec![addr.clone()], lease: Duration::from_secs(600), auth_token: None };
    tokio::spawn(ps_server::serve(options, listener, std::future::pending()));
    let client = PsClient::connect(ClientConfig::new(vec![addr])).unwrap();
    client.wait_ready(Duration::from_secs(10)).await.unwrap();
    let spec = ModelSpec {
        name: "bench".into(),
        tensors: vec![TensorSpec {
            name: "w".into(),
            shape: vec![rows as u64, cols as u64],
            init: Some(InitRule { kind: InitKind::Zeros as i32, ..Default::default() }),
        }],
        groups: vec![ParamGroup {
            name: "all".into(),
            patterns: vec!["*".into()],
            optimizer: Some(OptimizerConfig {
                kind: Some(proto::optimizer_config::Kind::Sgd(proto::SgdConfig { lr: 1e-6, ..Default::default() })),
            }),
            ..Default::default()
        }],
        mode: proto::ConsistencyMode::Sync as i32,
        max_block_elements: 0,
        max_grad_norm: 0.0,
    };
    let model = client.register(spec, &Tensors::new()).await.unwrap();
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
        let (push, pull) = raw_tcp_round(bytes).await;
        tcp_push.push(push);
        tcp_pull.push(pull);
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
