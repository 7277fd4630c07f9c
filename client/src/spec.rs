//! The model a client registers, in the client's own types: tensors with
//! their init rule, parameter groups with an optimizer, wire encodings and a
//! learning-rate schedule, and the consistency mode. They convert into the
//! wire messages of `paramserver.v1`; where a hyperparameter is 0 the servers
//! apply the optimizer's documented default (as the `.proto` says).

use std::time::Duration;

use ps_proto::pb;

use crate::federated::RoundConfig;

/// How a tensor's first values are made. Random rules are deterministic in
/// (seed, tensor name, element index), so they do not depend on the layout.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// All zeros.
    Zeros,
    /// Every element equals the value.
    Constant(f64),
    /// Normal with this mean and standard deviation.
    Normal {
        /// Mean.
        mean: f64,
        /// Standard deviation.
        std: f64,
        /// Seed.
        seed: u64,
    },
    /// Uniform on [center - half_width, center + half_width).
    Uniform {
        /// Center.
        center: f64,
        /// Half the width.
        half_width: f64,
        /// Seed.
        seed: u64,
    },
    /// The client sends the values with the registration.
    Provided,
}

/// One tensor of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    /// Unique name, e.g. `fc1.weight`.
    pub name: String,
    /// Row-major shape, outermost first (blocks split the first dimension).
    pub shape: Vec<u64>,
    /// How its values start.
    pub init: Init,
}

impl TensorSpec {
    /// A tensor with a name, shape and init rule.
    pub fn new(name: impl Into<String>, shape: &[u64], init: Init) -> Self {
        Self { name: name.into(), shape: shape.to_vec(), init }
    }
}

/// Encoding of gradients or weights on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// f32, 4 bytes per element.
    F32,
    /// bfloat16, 2 bytes per element.
    Bf16,
    /// IEEE half, 2 bytes per element.
    F16,
    /// One sign bit per element plus one f32 scale per chunk.
    Sign1,
}

impl Encoding {
    /// The wire enum (also what the codecs take).
    pub fn to_wire(self) -> pb::Encoding {
        match self {
            Encoding::F32 => pb::Encoding::F32,
            Encoding::Bf16 => pb::Encoding::Bf16,
            Encoding::F16 => pb::Encoding::F16,
            Encoding::Sign1 => pb::Encoding::Sign1,
        }
    }

    /// The client type of a wire encoding.
    pub fn from_wire(encoding: pb::Encoding) -> Self {
        match encoding {
            pb::Encoding::F32 => Encoding::F32,
            pb::Encoding::Bf16 => Encoding::Bf16,
            pb::Encoding::F16 => Encoding::F16,
            pb::Encoding::Sign1 => Encoding::Sign1,
        }
    }
}

/// How a sync step combines the workers' pushes of a block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Aggregation {
    /// The mean of the decoded pushes.
    #[default]
    Mean,
    /// Per element, the sign of the sum of the workers' sign bits (sign1 pushes, sync mode).
    MajorityVote,
}

impl Aggregation {
    fn to_wire(self) -> pb::Aggregation {
        match self {
            Aggregation::Mean => pb::Aggregation::Mean,
            Aggregation::MajorityVote => pb::Aggregation::MajorityVote,
        }
    }

    pub(crate) fn from_wire(aggregation: pb::Aggregation) -> Self {
        match aggregation {
            pb::Aggregation::Mean => Aggregation::Mean,
            pb::Aggregation::MajorityVote => Aggregation::MajorityVote,
        }
    }
}

/// How the pushes of several workers become updates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// One update per step from the mean of every live worker's gradient.
    #[default]
    Sync,
    /// Every push is applied as it arrives.
    Async,
    /// As sync, but a worker may push up to `staleness` steps ahead of the
    /// slowest: it computes step t on version t - staleness or newer.
    BoundedStaleness {
        /// How many steps ahead a worker may run.
        staleness: u64,
    },
    /// Federated rounds ([`ModelSpec::federated`] holds the round configuration).
    Federated,
}

impl Mode {
    fn to_wire(self) -> (pb::ConsistencyMode, u64) {
        match self {
            Mode::Sync => (pb::ConsistencyMode::Sync, 0),
            Mode::Async => (pb::ConsistencyMode::Async, 0),
            Mode::BoundedStaleness { staleness } => (pb::ConsistencyMode::BoundedStaleness, staleness),
            Mode::Federated => (pb::ConsistencyMode::Federated, 0),
        }
    }

    pub(crate) fn from_wire(value: i32, staleness: u64) -> Self {
        match pb::ConsistencyMode::try_from(value) {
            Ok(pb::ConsistencyMode::Async) => Mode::Async,
            Ok(pb::ConsistencyMode::BoundedStaleness) => Mode::BoundedStaleness { staleness },
            Ok(pb::ConsistencyMode::Federated) => Mode::Federated,
            _ => Mode::Sync,
        }
    }

    /// The version to pull before computing `step`: the step itself in sync
    /// mode, up to `staleness` older in bounded-staleness mode (async: any;
    /// federated: round `step + 1` trains version `step`).
    pub fn pull_version(self, step: u64) -> u64 {
        match self {
            Mode::Sync | Mode::Federated => step,
            Mode::Async => 0,
            Mode::BoundedStaleness { staleness } => step.saturating_sub(staleness),
        }
    }
}

/// A factor on the learning rate per step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Schedule {
    /// Factor 1.
    #[default]
    Constant,
    /// Linear warm-up from 0, then cosine decay to `min_factor` at `total` steps.
    WarmupCosine {
        /// Warm-up steps.
        warmup: u64,
        /// Steps until the end of the decay.
        total: u64,
        /// Factor at the end.
        min_factor: f64,
    },
    /// Linear warm-up, constant, then linear decay to `min_factor` over the last `decay` steps of `total`.
    WarmupStableDecay {
        /// Warm-up steps.
        warmup: u64,
        /// Steps until the end of the decay.
        total: u64,
        /// Steps of the final decay.
        decay: u64,
        /// Factor at the end.
        min_factor: f64,
    },
}

/// SGD with optional (Nesterov) momentum and L2 decay, as torch.optim.SGD.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sgd {
    /// Learning rate.
    pub lr: f64,
    /// Momentum (0: none).
    pub momentum: f64,
    /// Dampening of the momentum.
    pub dampening: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 weight decay.
    pub weight_decay: f64,
}

/// Adam with decoupled (AdamW) or L2 weight decay; 0 means the default for betas and eps.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AdamW {
    /// Learning rate.
    pub lr: f64,
    /// β1 (default 0.9).
    pub beta1: f64,
    /// β2 (default 0.999).
    pub beta2: f64,
    /// ε (default 1e-8).
    pub eps: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Adam-L2: add the decay to the gradient instead of decoupling it.
    pub l2_decay: bool,
}

/// How Subset-Norm groups coordinates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SubsetKind {
    /// Rows if out >= in, else columns; coordinate-wise for 1-D tensors.
    #[default]
    Heuristic,
    /// One subset per row.
    Rows,
    /// One subset per column.
    Columns,
    /// One subset per coordinate (plain Adam / AdaGrad).
    Coordinates,
    /// The whole tensor (AdaGrad-Norm).
    Whole,
    /// Contiguous chunks of `chunk_size` coordinates.
    Chunks,
}

impl SubsetKind {
    fn to_wire(self) -> pb::SubsetKind {
        match self {
            SubsetKind::Heuristic => pb::SubsetKind::Heuristic,
            SubsetKind::Rows => pb::SubsetKind::Rows,
            SubsetKind::Columns => pb::SubsetKind::Columns,
            SubsetKind::Coordinates => pb::SubsetKind::Coordinates,
            SubsetKind::Whole => pb::SubsetKind::Whole,
            SubsetKind::Chunks => pb::SubsetKind::Chunks,
        }
    }
}

/// AdaGrad-Norm, AdaGradSN and AdamSN (Subset-Norm step sizes).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SubsetNorm {
    /// Learning rate.
    pub lr: f64,
    /// Momentum β1 (0: none).
    pub beta1: f64,
    /// β2 < 1: exponential average (AdamSN); 1 or 0: plain sum (AdaGradSN).
    pub beta2: f64,
    /// ε added to the root.
    pub eps: f64,
    /// Multiply the step by sqrt(1-β2^t)/(1-β1^t).
    pub correct_bias: bool,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// How coordinates are grouped.
    pub subsets: SubsetKind,
    /// Chunk size for [`SubsetKind::Chunks`] (negative `-c`: sqrt(numel)/c).
    pub chunk_size: i64,
    /// AdaGrad-Norm's initial accumulator.
    pub initial_accumulator: f64,
}

/// Which projector spans Subspace-Momentum's subspace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Projection {
    /// Rows or columns with the largest norm.
    #[default]
    TopK,
    /// Uniformly random rows or columns (seeded).
    Uniform,
    /// Top singular vectors of the gradient.
    Svd,
}

/// SGD-SM and AdamSNSM (Subspace-Momentum); 0 means the default for betas, eps and update_gap.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SubspaceMomentum {
    /// Learning rate.
    pub lr: f64,
    /// Momentum β1 (default 0.9).
    pub beta1: f64,
    /// β2 of the Subset-Norm denominator (default 0.999).
    pub beta2: f64,
    /// ε of the denominator (default 1e-6).
    pub eps: f64,
    /// Subspace rank.
    pub rank: u32,
    /// Re-selection period (default 200).
    pub update_gap: u64,
    /// The projector.
    pub projection: Projection,
    /// AdamSNSM if true, SGD-SM if false.
    pub adaptive: bool,
    /// Subsets of the AdamSNSM denominator.
    pub subsets: SubsetKind,
    /// Bias factor on the whole update (AdamSNSM).
    pub correct_bias: bool,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Seed of random selections.
    pub seed: u64,
    /// Injected index selections, one per re-selection (the last repeats).
    pub indices_schedule: Vec<Vec<u32>>,
}

/// How FRUGAL chooses its state-full subspace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FrugalMode {
    /// Whole projectable tensors.
    #[default]
    Block,
    /// Random columns of each tensor.
    Columns,
    /// The top singular subspace of the gradient.
    Svd,
}

/// Order of the active tensors in FRUGAL's block mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BlockOrder {
    /// A window moving backward from the last tensor.
    #[default]
    Descending,
    /// A window moving forward.
    Ascending,
    /// A seeded random subset each period.
    Random,
}

/// FRUGAL's state-free rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InactiveRule {
    /// signSGD on the rest.
    #[default]
    SignSgd,
    /// SGD on the rest.
    Sgd,
    /// Nothing on the rest.
    None,
}

/// FRUGAL gradient splitting; 0 means the default for betas, eps, update_gap and the lr scales.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Frugal {
    /// Learning rate.
    pub lr: f64,
    /// Adam β1 (default 0.9).
    pub beta1: f64,
    /// Adam β2 (default 0.999).
    pub beta2: f64,
    /// Adam ε (default 1e-8).
    pub eps: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// ρ: the state-full fraction.
    pub density: f64,
    /// Re-selection period (default 200).
    pub update_gap: u64,
    /// Scale of η for both parts (default 1).
    pub proj_lr_scale: f64,
    /// Further scale of η for the state-free part (default 1).
    pub inactive_lr_scale: f64,
    /// The state-free rule.
    pub inactive_rule: InactiveRule,
    /// Keep Adam's statistics across re-selections.
    pub keep_statistics: bool,
    /// How the subspace is chosen.
    pub mode: FrugalMode,
    /// Order of block mode's active window.
    pub block_order: BlockOrder,
    /// Seed of random selections.
    pub seed: u64,
    /// Projectable tensors by glob (empty: FRUGAL's attention/MLP name rule).
    pub projectable_patterns: Vec<String>,
    /// Injected selections, one per period (block: tensor positions; columns: column indices).
    pub schedule: Vec<Vec<u32>>,
}

/// signSGD (β1 = 0), Signum, or Lion.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sign {
    /// Learning rate.
    pub lr: f64,
    /// Signum's momentum, Lion's β1.
    pub beta1: f64,
    /// Lion's β2 (default 0.99).
    pub beta2: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Lion's rule.
    pub lion: bool,
}

/// A parameter group's optimizer.
#[derive(Clone, Debug, PartialEq)]
pub enum Optimizer {
    /// SGD.
    Sgd(Sgd),
    /// Adam / AdamW.
    AdamW(AdamW),
    /// Subset-Norm.
    SubsetNorm(SubsetNorm),
    /// Subspace-Momentum.
    SubspaceMomentum(SubspaceMomentum),
    /// FRUGAL.
    Frugal(Frugal),
    /// signSGD / Signum / Lion.
    Sign(Sign),
}

impl Optimizer {
    /// Plain SGD without momentum.
    pub fn sgd(lr: f64) -> Self {
        Optimizer::Sgd(Sgd { lr, ..Default::default() })
    }

    /// AdamW with default betas and eps.
    pub fn adamw(lr: f64) -> Self {
        Optimizer::AdamW(AdamW { lr, ..Default::default() })
    }
}

/// A parameter group: the tensors whose names match a pattern share its settings.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupConfig {
    /// Group name.
    pub name: String,
    /// The optimizer the servers run.
    pub optimizer: Optimizer,
    /// Glob patterns ('*' matches any run of characters); the first group that matches a tensor takes it.
    pub patterns: Vec<String>,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Accepted push encodings, preferred first (empty: f32).
    pub push_encodings: Vec<Encoding>,
    /// How a sync step combines pushes.
    pub aggregation: Aggregation,
}

impl GroupConfig {
    /// A group of the tensors matching `patterns`, with f32 pushes averaged and a constant rate.
    pub fn new(name: impl Into<String>, patterns: &[&str], optimizer: Optimizer) -> Self {
        Self {
            name: name.into(),
            patterns: patterns.iter().map(|p| p.to_string()).collect(),
            optimizer,
            schedule: Schedule::Constant,
            push_encodings: Vec::new(),
            aggregation: Aggregation::Mean,
        }
    }
}

/// Everything the servers need to hold a model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// Model name.
    pub name: String,
    /// Tensors, in order.
    pub tensors: Vec<TensorSpec>,
    /// Parameter groups, in order.
    pub groups: Vec<GroupConfig>,
    /// Consistency mode.
    pub mode: Mode,
    /// Largest block in elements (0: the servers' default, 1 Mi).
    pub max_block_elements: u64,
    /// Global gradient-norm clipping the workers apply (0: off).
    pub max_grad_norm: f64,
    /// Who a step waits for and who may join.
    pub contract: StepContract,
    /// Federated mode: the round configuration (set with [`ModelSpec::with_rounds`]).
    pub federated: Option<RoundConfig>,
}

/// Who a step waits for and who may join (the defaults: no minimum, no
/// deadline, no cap; every step waits for every live member).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepContract {
    /// Sync modes: workers that must push step 0 before it is applied (0 or 1: no minimum).
    pub min_workers: u32,
    /// Sync modes: a step waits this long after its first push for the other
    /// members, then completes without them (they are dropped and must rejoin).
    pub step_deadline: Option<Duration>,
    /// Sync modes: pushes a step needs before its deadline may complete it (0 or 1: one).
    pub quorum: u32,
    /// The most members the model accepts (0: no cap).
    pub max_workers: u32,
}

impl ModelSpec {
    /// A sync-mode model with default block size, no clipping and no minimum of workers.
    pub fn new(name: impl Into<String>, tensors: Vec<TensorSpec>, groups: Vec<GroupConfig>) -> Self {
        Self {
            name: name.into(),
            tensors,
            groups,
            mode: Mode::Sync,
            max_block_elements: 0,
            max_grad_norm: 0.0,
            contract: StepContract::default(),
            federated: None,
        }
    }

    /// The same model trained in federated rounds with `config`; the groups'
    /// optimizers become the server optimizer (SGD with lr 1: the plain method).
    pub fn with_rounds(mut self, config: RoundConfig) -> Self {
        self.mode = Mode::Federated;
        self.federated = Some(config);
        self
    }
}

fn index_lists(lists: &[Vec<u32>]) -> Vec<pb::IndexList> {
    lists.iter().map(|l| pb::IndexList { indices: l.clone() }).collect()
}

impl From<&Init> for pb::InitRule {
    fn from(init: &Init) -> Self {
        let rule = |kind: pb::InitKind, value, scale, seed| pb::InitRule { kind: kind as i32, value, scale, seed };
        match *init {
            Init::Zeros => rule(pb::InitKind::Zeros, 0.0, 0.0, 0),
            Init::Constant(value) => rule(pb::InitKind::Constant, value, 0.0, 0),
            Init::Normal { mean, std, seed } => rule(pb::InitKind::Normal, mean, std, seed),
            Init::Uniform { center, half_width, seed } => rule(pb::InitKind::Uniform, center, half_width, seed),
            Init::Provided => rule(pb::InitKind::Provided, 0.0, 0.0, 0),
        }
    }
}

impl From<&Optimizer> for pb::OptimizerConfig {
    fn from(optimizer: &Optimizer) -> Self {
        use pb::optimizer_config::Kind;
        let kind = match optimizer {
            &Optimizer::Sgd(Sgd { lr, momentum, dampening, nesterov, weight_decay }) => {
                Kind::Sgd(pb::SgdConfig { lr, momentum, dampening, nesterov, weight_decay })
            }
            &Optimizer::AdamW(AdamW { lr, beta1, beta2, eps, weight_decay, l2_decay }) => {
                Kind::Adamw(pb::AdamWConfig { lr, beta1, beta2, eps, weight_decay, l2_decay })
            }
            Optimizer::SubsetNorm(c) => Kind::SubsetNorm(pb::SubsetNormConfig {
                lr: c.lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                correct_bias: c.correct_bias,
                weight_decay: c.weight_decay,
                subsets: c.subsets.to_wire() as i32,
                chunk_size: c.chunk_size,
                initial_accumulator: c.initial_accumulator,
            }),
            Optimizer::SubspaceMomentum(c) => Kind::SubspaceMomentum(pb::SubspaceMomentumConfig {
                lr: c.lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                rank: c.rank,
                update_gap: c.update_gap,
                projection: match c.projection {
                    Projection::TopK => pb::ProjectionKind::Topk,
                    Projection::Uniform => pb::ProjectionKind::Uniform,
                    Projection::Svd => pb::ProjectionKind::Svd,
                } as i32,
                adaptive: c.adaptive,
                subsets: c.subsets.to_wire() as i32,
                correct_bias: c.correct_bias,
                weight_decay: c.weight_decay,
                seed: c.seed,
                indices_schedule: index_lists(&c.indices_schedule),
            }),
            Optimizer::Frugal(c) => Kind::Frugal(pb::FrugalConfig {
                lr: c.lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: c.weight_decay,
                density: c.density,
                update_gap: c.update_gap,
                proj_lr_scale: c.proj_lr_scale,
                inactive_lr_scale: c.inactive_lr_scale,
                inactive_rule: match c.inactive_rule {
                    InactiveRule::SignSgd => pb::InactiveRule::SignSgd,
                    InactiveRule::Sgd => pb::InactiveRule::Sgd,
                    InactiveRule::None => pb::InactiveRule::None,
                } as i32,
                keep_statistics: c.keep_statistics,
                mode: match c.mode {
                    FrugalMode::Block => pb::FrugalMode::Block,
                    FrugalMode::Columns => pb::FrugalMode::Columns,
                    FrugalMode::Svd => pb::FrugalMode::Svd,
                } as i32,
                block_order: match c.block_order {
                    BlockOrder::Descending => pb::BlockOrder::Descending,
                    BlockOrder::Ascending => pb::BlockOrder::Ascending,
                    BlockOrder::Random => pb::BlockOrder::Random,
                } as i32,
                seed: c.seed,
                projectable_patterns: c.projectable_patterns.clone(),
                schedule: index_lists(&c.schedule),
            }),
            &Optimizer::Sign(Sign { lr, beta1, beta2, weight_decay, lion }) => {
                Kind::Sign(pb::SignConfig { lr, beta1, beta2, weight_decay, lion })
            }
        };
        pb::OptimizerConfig { kind: Some(kind) }
    }
}

impl From<&Schedule> for Option<pb::LrSchedule> {
    fn from(schedule: &Schedule) -> Self {
        match *schedule {
            Schedule::Constant => None,
            Schedule::WarmupCosine { warmup, total, min_factor } => Some(pb::LrSchedule {
                kind: pb::ScheduleKind::WarmupCosine as i32,
                warmup_steps: warmup,
                total_steps: total,
                decay_steps: 0,
                min_factor,
            }),
            Schedule::WarmupStableDecay { warmup, total, decay, min_factor } => Some(pb::LrSchedule {
                kind: pb::ScheduleKind::WarmupStableDecay as i32,
                warmup_steps: warmup,
                total_steps: total,
                decay_steps: decay,
                min_factor,
            }),
        }
    }
}

impl From<&ModelSpec> for pb::ModelSpec {
    fn from(spec: &ModelSpec) -> Self {
        pb::ModelSpec {
            name: spec.name.clone(),
            tensors: spec
                .tensors
                .iter()
                .map(|t| pb::TensorSpec { name: t.name.clone(), shape: t.shape.clone(), init: Some((&t.init).into()) })
                .collect(),
            groups: spec
                .groups
                .iter()
                .map(|g| pb::ParamGroup {
                    name: g.name.clone(),
                    patterns: g.patterns.clone(),
                    optimizer: Some((&g.optimizer).into()),
                    push_encodings: g.push_encodings.iter().map(|e| e.to_wire() as i32).collect(),
                    aggregation: g.aggregation.to_wire() as i32,
                    schedule: (&g.schedule).into(),
                })
                .collect(),
            mode: spec.mode.to_wire().0 as i32,
            staleness: spec.mode.to_wire().1,
            max_block_elements: spec.max_block_elements,
            max_grad_norm: spec.max_grad_norm,
            min_workers: spec.contract.min_workers,
            step_deadline_ms: spec.contract.step_deadline.map_or(0, |d| d.as_millis().max(1) as u64),
            quorum: spec.contract.quorum,
            max_workers: spec.contract.max_workers,
            federated: spec.federated.as_ref().map(RoundConfig::to_wire),
        }
    }
}
