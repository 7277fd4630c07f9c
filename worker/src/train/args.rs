//! The worker's command line: what `worker train` and `worker evaluate` take,
//! every flag with an environment variable for containers.

use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::task::TaskKind;

/// Consistency mode, as a command-line value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// One update per step from every live worker's gradient.
    Sync,
    /// Every push is applied on arrival.
    Async,
    /// Sync steps, but a worker may run up to --staleness steps ahead of the slowest.
    #[value(alias = "ssp")]
    BoundedStaleness,
    /// Federated rounds: this worker acts for a share of the federated clients
    /// (`worker federated` with `--client-ids auto`; its flags come from the PS_FED_* variables).
    Federated,
}

/// Which gradient --max-grad-norm clips, as a command-line value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GradClipArg {
    /// Each step's mean gradient, by the shards (as clip_grad_norm_ after DDP's all-reduce).
    Mean,
    /// Each worker's own gradient before it is pushed.
    PerWorker,
}

/// How the svd projections find the top singular subspace, as a command-line value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SvdSolverArg {
    /// A full SVD, as the reference code.
    Exact,
    /// A seeded randomized range finder: far less work at a low rank, an approximation.
    Randomized,
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
pub enum CompressionArg {
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
    /// Worker id on the servers (default: `worker-<rank>`, or the host name without --rank).
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
    /// Bounded-staleness mode: how many steps a worker may run ahead of the slowest.
    #[arg(long, env = "PS_STALENESS", default_value_t = 2)]
    pub staleness: u64,
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
    /// Sync mode: a step waits this long after its first push for the other workers, then
    /// goes ahead without them (they rejoin and resume); e.g. 30s. Default: wait for every live worker.
    #[arg(long, env = "PS_STEP_DEADLINE", value_parser = humantime::parse_duration)]
    pub step_deadline: Option<Duration>,
    /// Sync mode: pushes a step needs before its deadline may complete it.
    #[arg(long, env = "PS_QUORUM", default_value_t = 1)]
    pub quorum: u32,
    /// How long to wait for the servers and the other workers.
    #[arg(long, env = "PS_START_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    pub start_timeout: Duration,
    /// Tokens and TLS for the servers.
    #[command(flatten)]
    pub access: ps_client::access::AccessArgs,
    /// FRUGAL density ρ.
    #[arg(long, env = "PS_DENSITY", default_value_t = 0.25)]
    pub density: f64,
    /// Subspace rank of Subspace-Momentum.
    #[arg(long, env = "PS_SUBSPACE_RANK", default_value_t = 8)]
    pub subspace_rank: u32,
    /// Re-selection period T of FRUGAL and Subspace-Momentum.
    #[arg(long, env = "PS_UPDATE_GAP", default_value_t = 200)]
    pub update_gap: u64,
    /// How adam-sn-sm and frugal-svd compute their top singular subspace.
    #[arg(long, env = "PS_SVD_SOLVER", value_enum, default_value = "exact")]
    pub svd_solver: SvdSolverArg,
    /// FRUGAL projectable tensors (globs); empty: FRUGAL's name rule (attention and MLP weights).
    #[arg(long, env = "PS_PROJECTABLE", value_delimiter = ',')]
    pub projectable: Vec<String>,
    /// Learning-rate schedule over --steps.
    #[arg(long, env = "PS_SCHEDULE", value_enum, default_value = "constant")]
    pub schedule: ScheduleArg,
    /// Warm-up steps of the schedule (default: 10% of --steps).
    #[arg(long, env = "PS_WARMUP")]
    pub warmup: Option<u64>,
    /// Clip gradients to this global L2 norm (0: off); --grad-clip says which.
    #[arg(long, env = "PS_MAX_GRAD_NORM", default_value_t = 0.0)]
    pub max_grad_norm: f64,
    /// Which gradient --max-grad-norm clips: each step's mean (on the shards;
    /// async mode clips each push) or each worker's own.
    #[arg(long, env = "PS_GRAD_CLIP", value_enum, default_value = "mean")]
    pub grad_clip: GradClipArg,
    /// Gradient compression on the wire.
    #[arg(long, env = "PS_COMPRESSION", value_enum, default_value = "none")]
    pub compression: CompressionArg,
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
    /// Log every pulled version with the model's epoch and a hash of the
    /// weights (`pulled version=V newest=N epoch=E hash=H`, N the highest
    /// block version read), so a checker can tell whether a version was ever
    /// served with two contents.
    #[arg(long)]
    pub trace_pulls: bool,
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
    /// Tokens and TLS for the servers.
    #[command(flatten)]
    pub access: ps_client::access::AccessArgs,
}
