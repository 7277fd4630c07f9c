//! From the command line to the model the servers hold: the optimizer and its
//! hyperparameters, the schedule, and the compression preset of the one
//! parameter group the built-in tasks use.

use ps_client::Encoding;
use ps_client::compress::Compression;
use ps_client::spec::{
    AdamWConfig, BlockOrder, FrugalConfig, FrugalMode, GradClip, GroupConfig, IndexRule, LrSchedule, Mode, ModelSpec,
    OptimizerConfig, Projection, SgdConfig, SignConfig, StepContract, SubsetNormConfig, Subsets,
    SubspaceMomentumConfig, SvdSolver,
};

use super::args::{
    CompressionArg, GradClipArg, ModeArg, OptimizerArg, PullEncoding, ScheduleArg, SvdSolverArg, TrainArgs,
};

/// The compression preset `--compression` names, with the run's rates.
pub fn compression(args: &TrainArgs) -> Compression {
    match args.compression {
        CompressionArg::None => Compression::None,
        CompressionArg::Bf16 => Compression::Bf16,
        CompressionArg::F16 => Compression::F16,
        CompressionArg::SignMv => {
            Compression::SignumVote { lr: args.lr, momentum: args.momentum, weight_decay: args.weight_decay }
        }
        CompressionArg::SignEf => Compression::ErrorFeedback { lr: args.lr, weight_decay: args.weight_decay },
    }
}

/// The encoding `--pull-encoding` names.
pub fn pull_encoding(arg: PullEncoding) -> Encoding {
    match arg {
        PullEncoding::F32 => Encoding::F32,
        PullEncoding::Bf16 => Encoding::Bf16,
        PullEncoding::F16 => Encoding::F16,
    }
}

fn optimizer(args: &TrainArgs) -> OptimizerConfig {
    // Hyperparameters are f32 on the shards, as the weights are.
    let (lr, weight_decay) = (args.lr as f32, args.weight_decay as f32);
    let frugal = |mode| {
        OptimizerConfig::Frugal(FrugalConfig {
            lr,
            weight_decay,
            density: args.density as f32,
            update_gap: args.update_gap,
            mode,
            projectable_patterns: args.projectable.clone(),
            seed: args.seed,
            ..Default::default()
        })
    };
    let subset_norm = |beta1: f32, beta2: f32, subsets| {
        OptimizerConfig::SubsetNorm(SubsetNormConfig {
            lr,
            beta1,
            beta2,
            eps: 1e-6,
            correct_bias: beta2 < 1.0,
            weight_decay,
            subsets,
            ..Default::default()
        })
    };
    let subspace = |adaptive, projection| {
        OptimizerConfig::SubspaceMomentum(SubspaceMomentumConfig {
            lr,
            rank: args.subspace_rank as usize,
            update_gap: args.update_gap,
            projection,
            adaptive,
            correct_bias: adaptive,
            weight_decay,
            seed: args.seed,
            ..Default::default()
        })
    };
    let sign = |beta1, lion| OptimizerConfig::Sign(SignConfig { lr, beta1, weight_decay, lion, ..Default::default() });
    let momentum = args.momentum as f32;
    let solver = match args.svd_solver {
        SvdSolverArg::Exact => SvdSolver::Exact,
        SvdSolverArg::Randomized => SvdSolver::Randomized,
    };
    match args.optimizer {
        OptimizerArg::Adamw => OptimizerConfig::AdamW(AdamWConfig { lr, weight_decay, ..Default::default() }),
        OptimizerArg::Adam => {
            OptimizerConfig::AdamW(AdamWConfig { lr, weight_decay, decoupled: false, ..Default::default() })
        }
        OptimizerArg::Sgd => OptimizerConfig::Sgd(SgdConfig { lr, momentum, weight_decay, ..Default::default() }),
        OptimizerArg::AdagradNorm => subset_norm(0.0, 1.0, Subsets::Whole),
        OptimizerArg::AdagradSn => subset_norm(0.0, 1.0, Subsets::Heuristic),
        OptimizerArg::AdamSn => subset_norm(0.9, 0.999, Subsets::Heuristic),
        OptimizerArg::SgdSm => subspace(false, Projection::Index(IndexRule::TopK)),
        OptimizerArg::AdamSnSm => subspace(true, Projection::Svd(solver)),
        OptimizerArg::Frugal => frugal(FrugalMode::Block { order: BlockOrder::Descending }),
        OptimizerArg::FrugalColumns => frugal(FrugalMode::Columns),
        OptimizerArg::FrugalSvd => frugal(FrugalMode::Svd(solver)),
        OptimizerArg::Signsgd => sign(0.0, false),
        OptimizerArg::Signum => sign(momentum, false),
        OptimizerArg::Lion => sign(0.9, true),
    }
}

fn schedule(args: &TrainArgs) -> LrSchedule {
    let warmup = args.warmup.unwrap_or(args.steps / 10);
    match args.schedule {
        ScheduleArg::Constant => LrSchedule::Constant,
        ScheduleArg::Cosine => LrSchedule::WarmupCosine { warmup, total: args.steps, min_factor: 0.1 },
        ScheduleArg::Wsd => {
            LrSchedule::WarmupStableDecay { warmup, total: args.steps, decay: args.steps / 5, min_factor: 0.0 }
        }
    }
}

/// The consistency mode `--mode` (and `--staleness`) names.
pub fn mode(args: &TrainArgs) -> Mode {
    match args.mode {
        ModeArg::Sync => Mode::Sync,
        ModeArg::Async => Mode::Async,
        ModeArg::BoundedStaleness => Mode::BoundedStaleness { staleness: args.staleness },
        ModeArg::Federated => Mode::Federated,
    }
}

/// The model the worker registers: the task's tensors in one group with the
/// chosen optimizer, schedule and compression preset.
pub fn model_spec(args: &TrainArgs, compression: Compression) -> ModelSpec {
    let group = GroupConfig { schedule: schedule(args), ..GroupConfig::new("all", &["*"], optimizer(args)) };
    let name = args.model.clone().unwrap_or_else(|| args.task.model_name().to_string());
    ModelSpec {
        mode: mode(args),
        max_grad_norm: args.max_grad_norm,
        grad_clip: match args.grad_clip {
            GradClipArg::Mean => GradClip::Mean,
            GradClipArg::PerWorker => GradClip::PerWorker,
        },
        contract: StepContract {
            // The servers hold step 0 until this many workers pushed it, whatever joins first.
            min_workers: match args.mode {
                ModeArg::Sync | ModeArg::BoundedStaleness => args.min_workers.unwrap_or(args.world_size) as u32,
                ModeArg::Async | ModeArg::Federated => 0,
            },
            step_deadline: args.step_deadline.filter(|_| args.mode != ModeArg::Async),
            quorum: args.quorum,
            max_workers: 0,
        },
        ..ModelSpec::new(name, args.task.tensor_specs(args.seed), vec![compression.configure(group)])
    }
}
