//! Checkpoint write and restore of a 100M-parameter AdamW model on one shard,
//! next to this disk's sequential write and read speed measured in the same
//! run with the same buffer size and fsync. A real `server` process writes the
//! checkpoint (`ctl checkpoint`'s RPC, after one training step so the moments
//! are not zero), is killed with SIGKILL, and is started again on the same
//! directory; the restore time runs from that start until the shard serves the
//! model again. Also reported: how long training was held up by the
//! checkpoint (the blocks are copied under their locks; the write runs beside
//! training), as a share of the write time.
//!
//! Run: `cargo bench -p ps-server --bench checkpoint` (PS_BENCH_LAYERS changes
//! the number of 2048x2048 matrices, 24 by default; PS_BENCH_DIR the directory,
//! the system's temporary directory by default).
//!
//! The weights and Adam moments are shared with the snapshot, not copied: the
//! writer drops each block once written, and an update copies only what a
//! write still holds. So training is held up by the copies that are left.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ps_client::spec::{GroupConfig, Init, ModelSpec, OptimizerConfig, TensorSpec};
use ps_client::{ClientConfig, PsClient, Tensors};
use ps_testkit::{ServerProcess, free_port};

const SIDE: u64 = 2048;
const MODEL: &str = "checkpoint-bench";

fn spec(layers: usize) -> ModelSpec {
    let tensors: Vec<TensorSpec> = (0..layers)
        .map(|i| TensorSpec::new(format!("layers.{i}.weight"), &[SIDE, SIDE], Init::Zeros))
        .chain(std::iter::once(TensorSpec::new("norm.weight", &[SIDE], Init::Zeros)))
        .collect();
    ModelSpec::new(MODEL, tensors, vec![GroupConfig::new("all", &["*"], OptimizerConfig::adamw(1e-3))])
}

/// Writes `bytes` to a fresh file through the same 4 MiB buffer the checkpoint writer uses, then fsyncs: seconds.
fn disk_write(path: &Path, bytes: u64) -> f64 {
    let chunk = vec![0x5au8; 64 << 20];
    let started = Instant::now();
    let mut out = BufWriter::with_capacity(4 << 20, File::create(path).unwrap());
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        out.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    out.into_inner().unwrap().sync_all().unwrap();
    started.elapsed().as_secs_f64()
}

/// Reads a file through a 4 MiB buffer into one allocation, as a restore reads tensors: seconds.
fn disk_read(path: &Path) -> f64 {
    let started = Instant::now();
    let mut file = std::io::BufReader::with_capacity(4 << 20, File::open(path).unwrap());
    let mut all = Vec::new();
    file.read_to_end(&mut all).unwrap();
    std::hint::black_box(&all);
    started.elapsed().as_secs_f64()
}

fn start(addr: &str, dir: &Path, log: &Path) -> ServerProcess {
    let dir = dir.to_string_lossy().to_string();
    let args = [
        "--shards",
        addr,
        "--metrics-addr",
        "off",
        "--lease",
        "10m",
        "--checkpoint-dir",
        &dir,
        "--checkpoint-every",
        "0",
        "--checkpoint-keep",
        "1",
    ];
    ServerProcess::spawn_logged(Path::new(env!("CARGO_BIN_EXE_server")), &args, log).expect("starting the server")
}

/// Rounds of (disk baseline, checkpoint) measured back to back; the disk of a shared VM is noisy.
const ROUNDS: usize = 5;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    let layers: usize = std::env::var("PS_BENCH_LAYERS").ok().and_then(|v| v.parse().ok()).unwrap_or(24);
    let base: PathBuf = std::env::var_os("PS_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("ps-checkpoint-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let params = layers as u64 * SIDE * SIDE + SIDE;
    println!("checkpoint benchmark: {params} parameters, AdamW (weights + 2 moments), one shard, in {}", dir.display());

    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let log = dir.join("server.log");
    let checkpoints = dir.join("checkpoints");
    let mut server = start(&addr, &checkpoints, &log);
    let client = PsClient::connect(ClientConfig::new(vec![addr.clone()])).unwrap();
    client.wait_ready(Duration::from_secs(30)).await.unwrap();
    let model = client.register(&spec(layers), &Tensors::new()).await.unwrap();
    let grads: Tensors = model.tensors().iter().map(|t| (t.name.clone(), vec![1e-3f32; t.len])).collect();
    let baseline = dir.join("baseline.bin");
    println!(
        "{:<6} {:>12} {:>13} {:>7} {:>10} {:>11} {:>11} {:>12}",
        "round", "disk write s", "checkpoint s", "ratio", "held up s", "held/write", "step s", "step ckpt s"
    );
    let (mut ratios, mut shares, mut bytes) = (Vec::new(), Vec::new(), 0);
    // Warm-up, not reported: the first step allocates the moments, the first write
    // creates the files (no live worker: the checkpoint is taken at once).
    model.join("w").await.unwrap();
    model.push("w", 0, &grads).await.unwrap();
    model.leave("w").await.unwrap();
    client.checkpoint(MODEL, true, Duration::from_secs(600)).await.unwrap();
    model.join("w").await.unwrap();
    let mut step = 1u64;
    for round in 0..ROUNDS {
        // A step with no checkpoint in sight, for comparison.
        let started = Instant::now();
        model.push("w", step, &grads).await.unwrap();
        let plain = started.elapsed().as_secs_f64();
        step += 1;
        // With a live worker the checkpoint is scheduled two versions ahead and
        // taken inside a training step; the next steps run while it is written.
        let asking = client.clone();
        let checkpoint =
            tokio::spawn(async move { asking.checkpoint(MODEL, true, Duration::from_secs(600)).await.unwrap() });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut during = 0f64;
        for _ in 0..3 {
            let started = Instant::now();
            model.push("w", step, &grads).await.unwrap();
            during = during.max(started.elapsed().as_secs_f64());
            step += 1;
        }
        let written = checkpoint.await.unwrap();
        bytes = written.bytes;
        let disk = disk_write(&baseline, written.bytes);
        std::fs::remove_file(&baseline).ok();
        let ratio = disk / written.write_seconds;
        let share = written.copy_seconds / written.write_seconds;
        println!(
            "{:<6} {:>12.2} {:>13.2} {:>6.2}x {:>10.3} {:>10.1}% {:>11.2} {:>12.2}",
            round + 1,
            disk,
            written.write_seconds,
            ratio,
            written.copy_seconds,
            100.0 * share,
            plain,
            during
        );
        ratios.push(ratio);
        shares.push(share);
    }
    model.leave("w").await.unwrap();
    drop(grads);

    disk_write(&baseline, bytes);
    let read_baseline = disk_read(&baseline);
    std::fs::remove_file(&baseline).ok();
    server.signal("KILL").unwrap();
    server.wait_exit(Duration::from_secs(30)).unwrap();
    drop(server);
    let started = Instant::now();
    let _server = start(&addr, &checkpoints, &log);
    let client = PsClient::connect(ClientConfig::new(vec![addr])).unwrap();
    loop {
        if let Ok(status) = client.status(MODEL).await
            && let Some(m) = status[0].models.first()
            && !m.recovering
            && m.checkpoint_version > 0
            && m.min_version == m.checkpoint_version
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let restore = started.elapsed().as_secs_f64();
    let gb = bytes as f64 / 1e9;
    println!(
        "checkpoint of {gb:.2} GB: median {:.2}x the disk's sequential write+fsync rate; training held up copying blocks for a median {:.1}% of the write time",
        median(ratios),
        100.0 * median(shares)
    );
    println!(
        "restore (SIGKILL, then process start to serving the model): {restore:.2} s = {:.2} GB/s, {:.2}x the disk's sequential read ({read_baseline:.2} s)",
        gb / restore,
        read_baseline / restore
    );
    println!("held up: time training steps spent copying blocks for the checkpoint (under their locks), summed over");
    println!("blocks; step s: a step without a checkpoint; step ckpt s: the slowest of the three steps around it.");
    println!("(reads come from the page cache when the files were just written and memory is large, as here.)");
    std::fs::remove_dir_all(&dir).ok();
}
