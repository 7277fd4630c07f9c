//! The worker's training loop: register (idempotently), join, then per step
//! pull the weights of that version, compute gradients on a local minibatch
//! and push them; finally evaluate and leave.

use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::Device;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use metrics_exporter_prometheus::Matcher;
use ps_client::Tensors;
use ps_client::compress::{ErrorFeedback, SignMomentum};
use ps_client::proto::{
    self, Aggregation, ConsistencyMode, Encoding, ModelSpec, OptimizerConfig, ParamGroup, optimizer_config::Kind,
};
use ps_client::{ClientConfig, PsClient};
use serde::{Deserialize, Serialize};

use crate::data::Batches;
use crate::task::TaskKind;

/// Consistency mode, as a command-line value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// One update per step from every live worker's gradient.
    Sync,
    /// Every push is applied on arrival.
    Async,
}

/// Optimizer, as a command-line value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OptimizerArg {
    /// AdamW.
    Adamw,
    /// Adam with L2 decay.
    Adam,
    /// SGD with momentum.
    Sgd,
    /// AdaGrad-Norm: one accumulator per tensor.
    AdagradNorm,
    /// AdaGrad with Subset-Norm (heuristic row/column subsets).
    AdagradSn,
    /// Adam with Subset-Norm (heuristic subsets).
    AdamSn,
    /// SGD with Subspace-Momentum (rank --rank, index projector).
    SgdSm,
    /// AdamSNSM: Subset-Norm with Subspace-Momentum (SVD projector).
    AdamSnSm,
    /// FRUGAL, block mode: round(--density · N) projectable tensors on AdamW, signSGD on the rest.
    Frugal,
    /// FRUGAL, columns mode.
    FrugalColumns,
    /// FRUGAL, SVD mode.
    FrugalSvd,
    /// signSGD.
    Signsgd,
    /// Signum (momentum --momentum).
    Signum,
    /// Lion (betas 0.9, 0.99).
    Lion,
}

/// Learning-rate schedule, as a command-line value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScheduleArg {
    /// Constant.
    Constant,
    /// Linear warm-up, then cosine decay to 10%.
    Cosine,
    /// Warm-up, stable, then linear decay over the last 20% of the steps.
    Wsd,
}

/// How gradients travel to the servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Compression {
    /// f32, 4 bytes per element.
    None,
    /// bfloat16, 2 bytes per element.
    Bf16,
    /// IEEE half, 2 bytes per element.
    F16,
    /// 1 bit per element; the servers take the majority vote of the signs and
    /// step `w -= lr (vote + wd w)`; each worker keeps Signum momentum (--momentum; 0 gives signSGD).
    SignMv,
    /// 1 bit per element plus a scale: error-feedback signSGD; each worker
    /// folds --lr in and keeps its residual, the servers subtract the mean.
    SignEf,
}

/// Encoding of pulled weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PullEncoding {
    /// f32.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

/// Options of one training worker; every flag has an environment variable.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Shard addresses, comma-separated, in index order (the servers' --shards).
    #[arg(long, env = "PS_SHARDS", value_delimiter = ',', default_value = "127.0.0.1:50051")]
    pub shards: Vec<String>,
    /// This worker's rank: which shard of the training data it uses. Without
    /// it, the servers assign the smallest free rank (for identical replicas).
    #[arg(long, env = "PS_WORKER_RANK")]
    pub rank: Option<usize>,
    /// Number of workers the data is split across.
    #[arg(long, env = "PS_WORLD_SIZE", default_value_t = 1)]
    pub world_size: usize,
    /// Worker id on the servers (default: worker-<rank>, or the host name without --rank).
    #[arg(long, env = "PS_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Built-in task to train.
    #[arg(long, env = "PS_TASK", value_enum, default_value = "digits")]
    pub task: TaskKind,
    /// Model name on the servers (default: the task's).
    #[arg(long, env = "PS_MODEL")]
    pub model: Option<String>,
    /// Consistency mode the model is registered with.
    #[arg(long, env = "PS_MODE", value_enum, default_value = "sync")]
    pub mode: ModeArg,
    /// Optimizer the model is registered with.
    #[arg(long, env = "PS_OPTIMIZER", value_enum, default_value = "adamw")]
    pub optimizer: OptimizerArg,
    /// Learning rate.
    #[arg(long, env = "PS_LR", default_value_t = 0.005)]
    pub lr: f64,
    /// SGD momentum.
    #[arg(long, env = "PS_MOMENTUM", default_value_t = 0.9)]
    pub momentum: f64,
    /// Weight decay.
    #[arg(long, env = "PS_WEIGHT_DECAY", default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Steps to train (the model version to reach).
    #[arg(long, env = "PS_STEPS", default_value_t = 500)]
    pub steps: u64,
    /// Examples per worker per step.
    #[arg(long, env = "PS_BATCH_SIZE", default_value_t = 32)]
    pub batch_size: usize,
    /// Seed of the weight initialization and minibatch order.
    #[arg(long, env = "PS_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Wait until this many workers have joined before the first step (default: --world-size).
    #[arg(long, env = "PS_MIN_WORKERS")]
    pub min_workers: Option<usize>,
    /// How long to wait for the servers and the other workers.
    #[arg(long, env = "PS_START_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    pub start_timeout: Duration,
    /// Bearer token for the servers.
    #[arg(long, env = "PS_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// FRUGAL density ρ.
    #[arg(long, env = "PS_DENSITY", default_value_t = 0.25)]
    pub density: f64,
    /// Subspace rank of Subspace-Momentum.
    #[arg(long, env = "PS_SUBSPACE_RANK", default_value_t = 8)]
    pub subspace_rank: u32,
    /// Re-selection period T of FRUGAL and Subspace-Momentum.
    #[arg(long, env = "PS_UPDATE_GAP", default_value_t = 200)]
    pub update_gap: u64,
    /// FRUGAL projectable tensors (globs); empty: FRUGAL's name rule (attention and MLP weights).
    #[arg(long, env = "PS_PROJECTABLE", value_delimiter = ',')]
    pub projectable: Vec<String>,
    /// Learning-rate schedule over --steps.
    #[arg(long, env = "PS_SCHEDULE", value_enum, default_value = "constant")]
    pub schedule: ScheduleArg,
    /// Warm-up steps of the schedule (default: 10% of --steps).
    #[arg(long, env = "PS_WARMUP")]
    pub warmup: Option<u64>,
    /// Clip each worker's gradient to this global L2 norm (0: off).
    #[arg(long, env = "PS_MAX_GRAD_NORM", default_value_t = 0.0)]
    pub max_grad_norm: f64,
    /// Gradient compression on the wire.
    #[arg(long, env = "PS_COMPRESSION", value_enum, default_value = "none")]
    pub compression: Compression,
    /// Encoding of the weights this worker pulls.
    #[arg(long, env = "PS_PULL_ENCODING", value_enum, default_value = "f32")]
    pub pull_encoding: PullEncoding,
    /// Keep the worker's compression state (Signum momentum or error-feedback
    /// residual) in this directory, so a restarted worker continues with it.
    #[arg(long, env = "PS_STATE_DIR")]
    pub state_dir: Option<std::path::PathBuf>,
    /// Serve this worker's Prometheus metrics here (e.g. 0.0.0.0:9101); off by default.
    #[arg(long, env = "PS_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Print a machine-readable `SUMMARY {json}` line at the end.
    #[arg(long)]
    pub summary_line: bool,
}

/// What a worker reports when it finishes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerSummary {
    /// Worker id.
    pub worker_id: String,
    /// Steps this worker pushed.
    pub steps: u64,
    /// Final model version.
    pub version: u64,
    /// Wall time of the training loop.
    pub seconds: f64,
    /// Mean training loss over the last 10 steps.
    pub train_loss: f32,
    /// Test-set loss of the final weights.
    pub test_loss: f32,
    /// Test-set accuracy of the final weights (classification).
    pub test_accuracy: Option<f32>,
    /// Examples in the test set.
    pub test_examples: usize,
    /// Gradient payload bytes pushed.
    pub bytes_pushed: u64,
    /// Weight payload bytes pulled.
    pub bytes_pulled: u64,
}

fn model_spec(args: &TrainArgs) -> ModelSpec {
    let sgd = |lr: f64, momentum: f64| {
        Kind::Sgd(proto::SgdConfig { lr, momentum, weight_decay: args.weight_decay, ..Default::default() })
    };
    let (lr, wd) = (args.lr, args.weight_decay);
    let frugal = |mode: proto::FrugalMode| {
        Kind::Frugal(proto::FrugalConfig {
            lr,
            weight_decay: wd,
            density: args.density,
            update_gap: args.update_gap,
            mode: mode as i32,
            projectable_patterns: args.projectable.clone(),
            seed: args.seed,
            ..Default::default()
        })
    };
    let subset_norm = |beta1: f64, beta2: f64, subsets: proto::SubsetKind| {
        Kind::SubsetNorm(proto::SubsetNormConfig {
            lr,
            beta1,
            beta2,
            eps: 1e-6,
            correct_bias: beta2 < 1.0,
            weight_decay: wd,
            subsets: subsets as i32,
            ..Default::default()
        })
    };
    let subspace = |adaptive: bool, projection: proto::ProjectionKind| {
        Kind::SubspaceMomentum(proto::SubspaceMomentumConfig {
            lr,
            rank: args.subspace_rank,
            update_gap: args.update_gap,
            projection: projection as i32,
            adaptive,
            correct_bias: adaptive,
            weight_decay: wd,
            seed: args.seed,
            ..Default::default()
        })
    };
    let sign = |beta1: f64, lion: bool| {
        Kind::Sign(proto::SignConfig { lr, beta1, weight_decay: wd, lion, ..Default::default() })
    };
    let requested = match args.optimizer {
        OptimizerArg::Adamw => Kind::Adamw(proto::AdamWConfig { lr, weight_decay: wd, ..Default::default() }),
        OptimizerArg::Adam => {
            Kind::Adamw(proto::AdamWConfig { lr, weight_decay: wd, l2_decay: true, ..Default::default() })
        }
        OptimizerArg::Sgd => sgd(lr, args.momentum),
        OptimizerArg::AdagradNorm => subset_norm(0.0, 1.0, proto::SubsetKind::Whole),
        OptimizerArg::AdagradSn => subset_norm(0.0, 1.0, proto::SubsetKind::Heuristic),
        OptimizerArg::AdamSn => subset_norm(0.9, 0.999, proto::SubsetKind::Heuristic),
        OptimizerArg::SgdSm => subspace(false, proto::ProjectionKind::Topk),
        OptimizerArg::AdamSnSm => subspace(true, proto::ProjectionKind::Svd),
        OptimizerArg::Frugal => frugal(proto::FrugalMode::Block),
        OptimizerArg::FrugalColumns => frugal(proto::FrugalMode::Columns),
        OptimizerArg::FrugalSvd => frugal(proto::FrugalMode::Svd),
        OptimizerArg::Signsgd => sign(0.0, false),
        OptimizerArg::Signum => sign(args.momentum, false),
        OptimizerArg::Lion => sign(0.9, true),
    };
    let warmup = args.warmup.unwrap_or(args.steps / 10);
    let schedule = match args.schedule {
        ScheduleArg::Constant => None,
        ScheduleArg::Cosine => Some(proto::LrSchedule {
            kind: proto::ScheduleKind::WarmupCosine as i32,
            warmup_steps: warmup,
            total_steps: args.steps,
            min_factor: 0.1,
            ..Default::default()
        }),
        ScheduleArg::Wsd => Some(proto::LrSchedule {
            kind: proto::ScheduleKind::WarmupStableDecay as i32,
            warmup_steps: warmup,
            total_steps: args.steps,
            decay_steps: args.steps / 5,
            min_factor: 0.0,
        }),
    };
    // The sign schemes fix the server's step: the vote is applied as w -= lr (v + wd w),
    // and error feedback already folded the learning rate into what it sends.
    let (kind, encodings, aggregation) = match args.compression {
        Compression::None => (requested, vec![Encoding::F32], Aggregation::Mean),
        Compression::Bf16 => (requested, vec![Encoding::Bf16, Encoding::F32], Aggregation::Mean),
        Compression::F16 => (requested, vec![Encoding::F16, Encoding::F32], Aggregation::Mean),
        Compression::SignMv => (sgd(args.lr, 0.0), vec![Encoding::Sign1], Aggregation::MajorityVote),
        Compression::SignEf => (sgd(1.0, 0.0), vec![Encoding::Sign1], Aggregation::Mean),
    };
    ModelSpec {
        name: args.model.clone().unwrap_or_else(|| args.task.model_name().to_string()),
        tensors: args.task.tensor_specs(args.seed),
        groups: vec![ParamGroup {
            name: "all".into(),
            patterns: vec!["*".into()],
            optimizer: Some(OptimizerConfig { kind: Some(kind) }),
            push_encodings: encodings.into_iter().map(|e| e as i32).collect(),
            aggregation: aggregation as i32,
            schedule,
        }],
        mode: match args.mode {
            ModeArg::Sync => ConsistencyMode::Sync,
            ModeArg::Async => ConsistencyMode::Async,
        } as i32,
        max_block_elements: 0,
        max_grad_norm: args.max_grad_norm,
    }
}

/// The worker-side half of a compressed optimizer.
enum Compressor {
    Plain,
    Vote(SignMomentum),
    ErrorFeedback(ErrorFeedback),
}

impl Compressor {
    fn new(args: &TrainArgs, worker: &str) -> anyhow::Result<Self> {
        let mut compressor = match args.compression {
            Compression::SignMv => Compressor::Vote(SignMomentum::new(args.momentum as f32)),
            Compression::SignEf => Compressor::ErrorFeedback(ErrorFeedback::new(args.lr as f32)),
            _ => Compressor::Plain,
        };
        if let Some(dir) = &args.state_dir {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let name = format!("{worker}.compression");
            let restored = match &mut compressor {
                Compressor::Plain => false,
                Compressor::Vote(m) => m.load(dir, &name)?,
                Compressor::ErrorFeedback(ef) => ef.load(dir, &name)?,
            };
            if restored {
                tracing::info!(worker, dir = %dir.display(), "restored the compression state");
            }
        }
        Ok(compressor)
    }

    /// What to push for these gradients.
    fn prepare(&mut self, grads: Tensors) -> Tensors {
        match self {
            Compressor::Plain => grads,
            Compressor::Vote(momentum) => momentum.update(&grads).clone(),
            Compressor::ErrorFeedback(ef) => ef.compress(&grads),
        }
    }

    fn save(&self, dir: &std::path::Path, worker: &str) -> std::io::Result<()> {
        let name = format!("{worker}.compression");
        match self {
            Compressor::Plain => Ok(()),
            Compressor::Vote(m) => m.save(dir, &name),
            Compressor::ErrorFeedback(ef) => ef.save(dir, &name),
        }
    }
}

fn device() -> anyhow::Result<Device> {
    #[cfg(feature = "cuda")]
    return Ok(Device::new_cuda(0)?);
    #[cfg(not(feature = "cuda"))]
    Ok(Device::Cpu)
}

/// Steps this worker pushed (counter).
pub const STEPS: &str = "ps_worker_steps_total";
/// Training loss of the last minibatch (gauge).
pub const LOSS: &str = "ps_worker_loss";
/// Gradient payload bytes pushed (counter).
pub const BYTES_PUSHED: &str = "ps_worker_bytes_pushed_total";
/// Weight payload bytes pulled (counter).
pub const BYTES_PULLED: &str = "ps_worker_bytes_pulled_total";
/// Seconds of one pull-compute-push step (histogram).
pub const STEP_SECONDS: &str = "ps_worker_step_seconds";

/// Trains until the model reaches `--steps` versions and returns the summary.
pub async fn run(args: TrainArgs) -> anyhow::Result<WorkerSummary> {
    let worker = args
        .worker_id
        .clone()
        .or_else(|| args.rank.map(|r| format!("worker-{r}")))
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| format!("worker-{}", std::process::id()));
    if let Some(addr) = args.metrics_addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .set_buckets_for_metric(
                Matcher::Full(STEP_SECONDS.into()),
                &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0],
            )?
            .install()
            .with_context(|| format!("serving worker metrics on {addr}"))?;
    }
    let mut config = ClientConfig::new(args.shards.clone());
    config.auth_token = args.auth_token.clone();
    let client = PsClient::connect(config)?;
    client.wait_ready(args.start_timeout).await.context("waiting for the server shards")?;
    let model = client.register(model_spec(&args), &Default::default()).await.context("registering the model")?;
    let model = model.with_pull_encoding(match args.pull_encoding {
        PullEncoding::F32 => Encoding::F32,
        PullEncoding::Bf16 => Encoding::Bf16,
        PullEncoding::F16 => Encoding::F16,
    });
    let mut compressor = Compressor::new(&args, &worker)?;
    let joined = model.join(&worker).await?;
    let heartbeat = model.spawn_heartbeat(&worker);
    let rank = args.rank.unwrap_or(joined.rank as usize);
    if rank >= args.world_size {
        model.leave(&worker).await.ok();
        anyhow::bail!(
            "rank {rank} is not below --world-size {}: more workers than the data is split for",
            args.world_size
        );
    }
    let task = crate::task::load(args.task, rank, args.world_size, device()?)?;
    let start = joined.version;
    wait_for_workers(&client, model.name(), args.min_workers.unwrap_or(args.world_size), args.start_timeout).await?;
    tracing::info!(worker, rank, model = model.name(), start, steps = args.steps, "training");

    let progress = ProgressBar::new(args.steps).with_position(start.min(args.steps));
    progress.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {msg} ({elapsed}, eta {eta})")?
            .progress_chars("=> "),
    );
    progress.set_prefix(worker.clone());
    let mut batches = Batches::new(task.train_len(), args.batch_size, args.seed ^ ((rank as u64 + 1) * 7919));
    let (mut bytes_pushed, mut bytes_pulled, mut losses) = (0u64, 0u64, Vec::new());
    let sync = args.mode == ModeArg::Sync;
    let started = Instant::now();
    let mut step = start;
    let mut pushed = 0;
    while step < args.steps {
        let step_started = Instant::now();
        let weights = model.pull(if sync { step } else { 0 }).await?;
        let weights_bytes = weights.bytes;
        bytes_pulled += weights.bytes;
        if !sync && weights.version >= args.steps {
            break;
        }
        let base = if sync { step } else { weights.version };
        let batch = batches.next_batch();
        let computing = task.clone();
        let (loss, grads) =
            tokio::task::spawn_blocking(move || computing.loss_and_grads(&weights.tensors, &batch)).await??;
        let mut grads = grads;
        model.clip_to_max_norm(&mut grads);
        let payload = compressor.prepare(grads);
        let summary = model.push(&worker, base, &payload).await?;
        metrics::counter!(STEPS).increment(1);
        metrics::gauge!(LOSS).set(f64::from(loss));
        metrics::counter!(BYTES_PUSHED).increment(summary.bytes);
        metrics::counter!(BYTES_PULLED).increment(weights_bytes);
        metrics::histogram!(STEP_SECONDS).record(step_started.elapsed().as_secs_f64());
        if let Some(dir) = &args.state_dir {
            // A file write with fsync: tell the runtime this thread blocks for a while.
            tokio::task::block_in_place(|| compressor.save(dir, &worker))
                .with_context(|| format!("saving the compression state in {}", dir.display()))?;
        }
        bytes_pushed += summary.bytes;
        losses.push(loss);
        pushed += 1;
        step = if sync { step + 1 } else { base + 1 };
        progress.set_position(step.min(args.steps));
        progress.set_message(format!("loss {loss:.4}"));
    }
    let seconds = started.elapsed().as_secs_f64();
    let final_weights = model.pull(if sync { args.steps } else { 0 }).await?;
    bytes_pulled += final_weights.bytes;
    let evaluation = task.evaluate(&final_weights.tensors)?;
    heartbeat.abort();
    model.leave(&worker).await?;
    progress.finish_and_clear();
    let tail = &losses[losses.len().saturating_sub(10)..];
    Ok(WorkerSummary {
        worker_id: worker,
        steps: pushed,
        version: final_weights.version,
        seconds,
        train_loss: if tail.is_empty() { f32::NAN } else { tail.iter().sum::<f32>() / tail.len() as f32 },
        test_loss: evaluation.loss,
        test_accuracy: evaluation.accuracy,
        test_examples: task.test_len(),
        bytes_pushed,
        bytes_pulled,
    })
}

async fn wait_for_workers(client: &PsClient, model: &str, wanted: usize, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = client.status(model).await?;
        let live = status.iter().flat_map(|s| s.models.iter()).map(|m| m.live_workers.len()).min().unwrap_or(0);
        if live >= wanted {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "only {live} of {wanted} workers joined within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Options of `worker evaluate`.
#[derive(Args, Debug, Clone)]
pub struct EvaluateArgs {
    /// Shard addresses, comma-separated, in index order.
    #[arg(long, env = "PS_SHARDS", value_delimiter = ',', default_value = "127.0.0.1:50051")]
    pub shards: Vec<String>,
    /// Built-in task whose test set to use.
    #[arg(long, env = "PS_TASK", value_enum, default_value = "digits")]
    pub task: TaskKind,
    /// Model name on the servers (default: the task's).
    #[arg(long, env = "PS_MODEL")]
    pub model: Option<String>,
    /// Wait until the model has at least this many updates.
    #[arg(long, default_value_t = 0)]
    pub min_version: u64,
    /// Exit with an error if the test accuracy is below this.
    #[arg(long, default_value_t = 0.0)]
    pub min_accuracy: f32,
    /// Bearer token for the servers.
    #[arg(long, env = "PS_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
}

/// Pulls the current weights and evaluates them on the task's test set.
pub async fn evaluate(args: EvaluateArgs) -> anyhow::Result<(u64, crate::task::Evaluation)> {
    let mut config = ClientConfig::new(args.shards.clone());
    config.auth_token = args.auth_token.clone();
    let client = PsClient::connect(config)?;
    let name = args.model.clone().unwrap_or_else(|| args.task.model_name().to_string());
    let model = client.model(&name).await.with_context(|| format!("opening model '{name}'"))?;
    let weights = model.pull(args.min_version).await?;
    let task = crate::task::load(args.task, 0, 1, device()?)?;
    let evaluation = task.evaluate(&weights.tensors)?;
    let accuracy = evaluation.accuracy.unwrap_or(f32::NAN);
    println!(
        "model {name} at version {}: test loss {:.4}, test accuracy {:.2}% ({} examples)",
        weights.version,
        evaluation.loss,
        accuracy * 100.0,
        task.test_len()
    );
    if args.min_accuracy > 0.0 && (accuracy.is_nan() || accuracy < args.min_accuracy) {
        anyhow::bail!("test accuracy {:.2}% is below the required {:.2}%", accuracy * 100.0, args.min_accuracy * 100.0);
    }
    Ok((weights.version, evaluation))
}
