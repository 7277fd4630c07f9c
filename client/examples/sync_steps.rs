//! A Rust worker that does nothing but sync steps (pull, then push fixed
//! random gradients) and prints the seconds per step: the Rust side of the
//! Python-client benchmark (`client/python/benches/workers.py`) and the worker
//! of the network test bed (`deploy/netbed/netbed.py`).
//!
//! Usage: `sync_steps SHARDS MODEL WORKER RANK STEPS WARMUP [OPTIONS]`, on a
//! model someone else registered, or with `--register PARAMS` on one it
//! registers itself (every worker registers the same spec; the servers keep
//! one). Options:
//!
//! - `--register PARAMS`: an SGD model of PARAMS parameters (one tensor `w`, 1024 columns);
//! - `--compression none|bf16|sign-mv|sign-ef`: its push encoding, as `worker train --compression`;
//! - `--pull-encoding f32|bf16|f16`: the encoding this worker pulls;
//! - `--workers N`: step 0 waits for N workers (default 1).
//!
//! It prints one JSON line: seconds per step after the warm-up, the final
//! version, the payload bytes, and an FNV-1a hash of the final weights, so two
//! runs can be compared bit for bit. `PS_LOCAL` picks the local channel mode.

use std::time::{Duration, Instant};

use ps_client::compress::Compression;
use ps_client::spec::{Encoding, GroupConfig, Init, ModelSpec, OptimizerConfig, StepContract, TensorSpec};
use ps_client::{ClientConfig, PsClient, StepOutcome, Tensors};

const USAGE: &str = "usage: sync_steps SHARDS MODEL WORKER RANK STEPS WARMUP \
    [--register PARAMS] [--compression none|bf16|sign-mv|sign-ef] [--pull-encoding f32|bf16|f16] [--workers N]";
const COLUMNS: u64 = 1024;
const LR: f64 = 1e-3;

/// What the optional flags ask for.
struct Options {
    register: Option<u64>,
    compression: Compression,
    pull_encoding: Encoding,
    workers: u32,
}

fn options(flags: &[String]) -> Result<Options, Box<dyn std::error::Error>> {
    let mut options =
        Options { register: None, compression: Compression::None, pull_encoding: Encoding::F32, workers: 1 };
    let mut flags = flags.iter();
    while let Some(flag) = flags.next() {
        let value = flags.next().ok_or_else(|| format!("{flag} needs a value; {USAGE}"))?;
        match flag.as_str() {
            "--register" => options.register = Some(value.parse()?),
            "--workers" => options.workers = value.parse()?,
            "--compression" => {
                options.compression = match value.as_str() {
                    "none" => Compression::None,
                    "bf16" => Compression::Bf16,
                    "sign-mv" => Compression::SignumVote { lr: LR, momentum: 0.0, weight_decay: 0.0 },
                    "sign-ef" => Compression::ErrorFeedback { lr: LR, weight_decay: 0.0 },
                    other => return Err(format!("unknown compression '{other}'; {USAGE}").into()),
                }
            }
            "--pull-encoding" => {
                options.pull_encoding = match value.as_str() {
                    "f32" => Encoding::F32,
                    "bf16" => Encoding::Bf16,
                    "f16" => Encoding::F16,
                    other => return Err(format!("unknown pull encoding '{other}'; {USAGE}").into()),
                }
            }
            other => return Err(format!("unknown option '{other}'; {USAGE}").into()),
        }
    }
    Ok(options)
}

fn spec(name: &str, params: u64, options: &Options) -> ModelSpec {
    let rows = params.div_ceil(COLUMNS).max(1);
    let group = options.compression.configure(GroupConfig::new("all", &["*"], OptimizerConfig::sgd(LR as f32)));
    ModelSpec {
        contract: StepContract { min_workers: options.workers, ..Default::default() },
        ..ModelSpec::new(name, vec![TensorSpec::new("w", &[rows, COLUMNS], Init::Zeros)], vec![group])
    }
}

/// FNV-1a over the bits of every value, tensors in name order.
fn weights_hash(weights: &Tensors) -> u64 {
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for name in names {
        for value in &weights[name] {
            for byte in value.to_bits().to_le_bytes() {
                hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    hash
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, shards, model, worker, rank, steps, warmup, flags @ ..] = args.as_slice() else {
        return Err(USAGE.into());
    };
    let (rank, steps, warmup): (u32, u64, u64) = (rank.parse()?, steps.parse()?, warmup.parse()?);
    let options = options(flags)?;
    let mut config = ClientConfig::new(shards.split(',').map(str::to_string).collect());
    // PS_LOCAL=off|socket|segments picks how shards on this host are reached (default: segments).
    if let Ok(mode) = std::env::var("PS_LOCAL") {
        config.local = mode.parse()?;
    }
    let client = PsClient::connect(config)?;
    client.wait_ready(Duration::from_secs(60)).await?;
    let model = match options.register {
        Some(params) => client.register(&spec(model, params, &options), &Tensors::new()).await?,
        None => client.model(model).await?,
    }
    .with_pull_encoding(options.pull_encoding);
    let mut compressor = options.compression.compressor();
    let joined = model.join_as(worker, Some(rank)).await?;
    let heartbeat = model.spawn_heartbeat(worker);
    // Random gradients made once: the benchmark times the transport and the servers, not a generator.
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(rank);
    let grads: Tensors = model
        .tensors()
        .iter()
        .map(|t| {
            let values = (0..t.len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect();
            (t.name.clone(), values)
        })
        .collect();
    let mut weights = Tensors::new();
    let (mut bytes_pushed, mut bytes_pulled) = (0u64, 0u64);
    let mut step = joined.version;
    let mut timed = None;
    while step < steps {
        if step == warmup {
            timed = Some((Instant::now(), step));
        }
        bytes_pulled += model.pull_into(&mut weights, step, Duration::ZERO).await?.1;
        match model.push_step(worker, step, compressor.prepare(&grads)).await? {
            StepOutcome::Pushed(summary) => bytes_pushed += summary.bytes,
            // Dropped from the run (its lease expired while its link was down): follow the model.
            StepOutcome::Resync { version } | StepOutcome::RolledBack { version } => {
                step = version;
                continue;
            }
        }
        step += 1;
    }
    let (version, _) = model.pull_into(&mut weights, step, Duration::ZERO).await?;
    let (started, from) = timed.ok_or("fewer steps than the warm-up")?;
    heartbeat.abort();
    model.leave(worker).await?;
    println!(
        "{{\"seconds_per_step\": {}, \"version\": {version}, \"bytes_pushed\": {bytes_pushed}, \
         \"bytes_pulled\": {bytes_pulled}, \"weights_fnv\": \"{:016x}\"}}",
        started.elapsed().as_secs_f64() / (step - from).max(1) as f64,
        weights_hash(&weights)
    );
    Ok(())
}
