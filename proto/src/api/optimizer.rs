//! Which optimizer a parameter group uses, with its hyperparameters: the
//! values a client asks for and the shards' update rules run with (the math
//! lives with the shards). `Default` gives each mode's documented defaults,
//! which are also what a zero on the wire means.

use super::{SpecError, refuse};

/// Which optimizer a parameter group uses, with its hyperparameters.
#[derive(Clone, Debug, PartialEq)]
pub enum OptimizerConfig {
    /// SGD with optional (Nesterov) momentum.
    Sgd(SgdConfig),
    /// Adam / AdamW.
    AdamW(AdamWConfig),
    /// AdaGrad-Norm, AdaGradSN, AdamSN.
    SubsetNorm(SubsetNormConfig),
    /// SGD-SM, AdamSNSM.
    SubspaceMomentum(SubspaceMomentumConfig),
    /// FRUGAL (projectable tensors; the others get AdamW with the same hyperparameters).
    Frugal(FrugalConfig),
    /// signSGD, Signum, Lion.
    Sign(SignConfig),
    /// Not trained: module buffers, each step set to the mean of the values pushed.
    Buffer(BufferSync),
}

/// How the workers' module buffers become the one the shards keep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BufferSync {
    /// Rank 0's values, as DDP's `broadcast_buffers`; the other ranks push none.
    #[default]
    Broadcast,
    /// The mean of every worker's values.
    Mean,
}

/// Hyperparameters of SGD, as torch.optim.SGD.
#[derive(Clone, Debug, PartialEq)]
pub struct SgdConfig {
    /// Learning rate η.
    pub lr: f32,
    /// Momentum μ; 0 keeps no state.
    pub momentum: f32,
    /// Dampening τ of the momentum.
    pub dampening: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 weight decay λ, added to the gradient.
    pub weight_decay: f32,
}

/// Plain SGD at lr 1e-3 (the wire has no default lr: zero is rejected).
impl Default for SgdConfig {
    fn default() -> Self {
        Self { lr: 1e-3, momentum: 0.0, dampening: 0.0, nesterov: false, weight_decay: 0.0 }
    }
}

/// Hyperparameters of Adam / AdamW.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate η.
    pub lr: f32,
    /// First-moment decay β1.
    pub beta1: f32,
    /// Second-moment decay β2.
    pub beta2: f32,
    /// ε added to the bias-corrected root of `v`.
    pub eps: f32,
    /// Weight decay λ.
    pub weight_decay: f32,
    /// Decoupled decay (AdamW) if true, L2 decay added to the gradient (Adam) if false.
    pub decoupled: bool,
    /// Steps after which `v` and its bias correction stop changing (1-bit Adam's
    /// freeze, for 1-bit pushes with error feedback); 0 never freezes.
    pub freeze_variance_after: u64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: true,
            freeze_variance_after: 0,
        }
    }
}

/// How the coordinates of a tensor are grouped by Subset-Norm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Subsets {
    /// Rows if `m >= n`, else columns; coordinate-wise for 1-D tensors.
    #[default]
    Heuristic,
    /// One subset per row (state `(m, 1)`).
    Rows,
    /// One subset per column (state `(1, n)`).
    Columns,
    /// One subset per coordinate (plain Adam / AdaGrad).
    Coordinates,
    /// The whole tensor is one subset (AdaGrad-Norm).
    Whole,
    /// Contiguous row-major chunks of `k` coordinates; a negative `-c` means
    /// `k = floor(sqrt(numel) / c)`; `k` falls back to the largest divisor of numel.
    Chunks(i64),
}

/// Hyperparameters of the Subset-Norm family.
#[derive(Clone, Debug, PartialEq)]
pub struct SubsetNormConfig {
    /// Learning rate η.
    pub lr: f32,
    /// Momentum β1; 0 keeps no momentum (AdaGradSN, RMSPropSN).
    pub beta1: f32,
    /// β2 < 1: exponential average (AdamSN); 1: plain sum (AdaGradSN).
    pub beta2: f32,
    /// ε added to the root (HF placement).
    pub eps: f32,
    /// Multiply η by sqrt(1-β2^t)/(1-β1^t).
    pub correct_bias: bool,
    /// Decoupled decay applied after the step, on the new weights.
    pub weight_decay: f32,
    /// How coordinates are grouped.
    pub subsets: Subsets,
    /// AdaGrad-Norm's initial accumulator b0².
    pub initial_accumulator: f32,
}

/// AdaGradSN (β2 = 1, no momentum) over the heuristic subsets at lr 1e-3. The
/// wire takes β2 from here when it is zero; a usable config also needs ε > 0
/// or an initial accumulator.
impl Default for SubsetNormConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.0,
            beta2: 1.0,
            eps: 0.0,
            correct_bias: false,
            weight_decay: 0.0,
            subsets: Subsets::Heuristic,
            initial_accumulator: 0.0,
        }
    }
}

/// How Subspace-Momentum's kept rows or columns are chosen.
#[derive(Clone, Debug, PartialEq)]
pub enum IndexRule {
    /// Uniformly at random (seeded).
    Uniform,
    /// The rows or columns with the largest L2 norm.
    TopK,
    /// Given: the k-th re-selection uses entry k (the last one repeats).
    Schedule(Vec<Vec<usize>>),
}

/// Which projector spans Subspace-Momentum's subspace.
#[derive(Clone, Debug, PartialEq)]
pub enum Projection {
    /// Whole rows (m ≥ n) or columns (m < n).
    Index(IndexRule),
    /// Top singular vectors of the gradient: right factor if m ≥ n, else left.
    Svd(SvdSolver),
}

/// How the svd projections (Subspace-Momentum's and FRUGAL's) find the top
/// singular subspace of a gradient.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SvdSolver {
    /// A full SVD, as the reference code's `torch.linalg.svd`.
    #[default]
    Exact,
    /// A seeded randomized range finder (rank + 10 probes, two power
    /// iterations): a few products with the gradient instead of a full SVD,
    /// an approximation of the same subspace.
    Randomized,
}

/// Hyperparameters of SGD-SM and AdamSNSM.
#[derive(Clone, Debug, PartialEq)]
pub struct SubspaceMomentumConfig {
    /// Learning rate η.
    pub lr: f32,
    /// Momentum β1 of the subspace momentum.
    pub beta1: f32,
    /// β2 of the Subset-Norm denominator (AdamSNSM).
    pub beta2: f32,
    /// ε of the denominator (AdamSNSM).
    pub eps: f32,
    /// Subspace rank r.
    pub rank: usize,
    /// Re-selection period T.
    pub update_gap: u64,
    /// The projector.
    pub projection: Projection,
    /// AdamSNSM if true (SN denominator and bias factor), SGD-SM if false.
    pub adaptive: bool,
    /// SN subsets of the denominator (AdamSNSM).
    pub subsets: Subsets,
    /// Bias factor sqrt(1-β2^t)/(1-β1^t) on the whole update (AdamSNSM).
    pub correct_bias: bool,
    /// Decoupled decay after the step.
    pub weight_decay: f32,
    /// Seed of random selections.
    pub seed: u64,
}

/// SGD-SM with a rank-8 top-k row/column subspace re-chosen every 200 steps.
/// The wire takes β1, β2, ε and the update gap from here when they are zero;
/// lr and rank have no default there.
impl Default for SubspaceMomentumConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            rank: 8,
            update_gap: 200,
            projection: Projection::Index(IndexRule::TopK),
            adaptive: false,
            subsets: Subsets::Heuristic,
            correct_bias: false,
            weight_decay: 0.0,
            seed: 0,
        }
    }
}

/// How FRUGAL's state-full subspace is chosen.
#[derive(Clone, Debug, PartialEq)]
pub enum FrugalMode {
    /// Whole tensors: round(ρ·N) of the group's N projectable tensors are active.
    Block {
        /// Order of the moving window of active tensors.
        order: BlockOrder,
    },
    /// k = floor(ρ·n) random columns of each tensor.
    Columns,
    /// Top singular subspace of the gradient, rank round(ρ·n) (m ≥ n, right) or round(ρ·m) (left).
    Svd(SvdSolver),
}

/// Which tensors are active in each period of FRUGAL's block mode.
#[derive(Clone, Debug, PartialEq)]
pub enum BlockOrder {
    /// A window of consecutive tensors moving forward.
    Ascending,
    /// A window moving backward, starting from the last tensor (the C4 scripts' choice).
    Descending,
    /// A uniformly random subset each period (seeded).
    Random,
}

/// FRUGAL's rule for the state-free part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InactiveRule {
    /// `sign0` of the residual.
    SignSgd,
    /// The residual itself.
    Sgd,
    /// Nothing.
    Frozen,
}

/// Hyperparameters of FRUGAL.
#[derive(Clone, Debug, PartialEq)]
pub struct FrugalConfig {
    /// Learning rate η.
    pub lr: f32,
    /// Adam β1.
    pub beta1: f32,
    /// Adam β2.
    pub beta2: f32,
    /// Adam ε (PyTorch placement).
    pub eps: f32,
    /// Multiplicative decay before the update, on every projectable tensor.
    pub weight_decay: f32,
    /// ρ: the state-full fraction.
    pub density: f32,
    /// Re-selection period T.
    pub update_gap: u64,
    /// Scales η for both parts.
    pub proj_lr_scale: f32,
    /// Further scales η for the state-free part.
    pub inactive_lr_scale: f32,
    /// The state-free rule.
    pub inactive_rule: InactiveRule,
    /// Restart Adam at every re-selection.
    pub reset_statistics: bool,
    /// How the subspace is chosen.
    pub mode: FrugalMode,
    /// Seed of random selections.
    pub seed: u64,
    /// Which of the group's tensors are projectable, by glob; empty: FRUGAL's
    /// name rule (2-D attention and MLP weights).
    pub projectable_patterns: Vec<String>,
    /// Injected selections of block mode, one entry per period (the last
    /// repeats): active positions among the group's projectable tensors.
    pub schedule: Option<Vec<Vec<usize>>>,
}

/// Block FRUGAL with a quarter of the tensors state-full, the window moving
/// backward, and signSGD on the rest. The wire takes β1, β2, ε, the update gap
/// and the lr scales from here when they are zero; lr has no default there.
impl Default for FrugalConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            density: 0.25,
            update_gap: 200,
            proj_lr_scale: 1.0,
            inactive_lr_scale: 1.0,
            inactive_rule: InactiveRule::SignSgd,
            reset_statistics: true,
            mode: FrugalMode::Block { order: BlockOrder::Descending },
            seed: 0,
            projectable_patterns: Vec::new(),
            schedule: None,
        }
    }
}

/// Hyperparameters of signSGD (β = 0), Signum and Lion.
#[derive(Clone, Debug, PartialEq)]
pub struct SignConfig {
    /// Learning rate η.
    pub lr: f32,
    /// Signum momentum β (0: signSGD); Lion's β1, which interpolates the update.
    pub beta1: f32,
    /// Lion's β2, the decay of its momentum buffer (unused by Signum).
    pub beta2: f32,
    /// Weight decay λ: added to the sign for signSGD/Signum, decoupled for Lion.
    pub weight_decay: f32,
    /// Lion's rule if true, Signum's if false.
    pub lion: bool,
}

/// Lion's β2 when the wire leaves it at zero (the Lion paper's choice).
pub const LION_DEFAULT_BETA2: f32 = 0.99;

/// signSGD at lr 1e-3. β2 stays 0 because only Lion reads it; a Lion config
/// whose β2 is zero on the wire gets [`LION_DEFAULT_BETA2`] instead.
impl Default for SignConfig {
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.0, beta2: 0.0, weight_decay: 0.0, lion: false }
    }
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), SpecError> {
    if ok { Ok(()) } else { refuse(what()) }
}

fn check_lr(lr: f32) -> Result<(), SpecError> {
    check(lr.is_finite() && lr > 0.0, || format!("lr must be a finite number > 0, got {lr}"))
}

fn check_unit(name: &str, value: f32) -> Result<(), SpecError> {
    check((0.0..1.0).contains(&value), || format!("{name} must be in [0, 1), got {value}"))
}

fn check_non_negative(name: &str, value: f32) -> Result<(), SpecError> {
    check(value.is_finite() && value >= 0.0, || format!("{name} must be a finite number >= 0, got {value}"))
}

fn check_eps(eps: f32) -> Result<(), SpecError> {
    check(eps.is_finite() && eps >= 0.0, || format!("eps must be >= 0, got {eps}"))
}

impl OptimizerConfig {
    /// Plain SGD without momentum.
    pub fn sgd(lr: f32) -> Self {
        OptimizerConfig::Sgd(SgdConfig { lr, ..Default::default() })
    }

    /// AdamW with default betas and eps.
    pub fn adamw(lr: f32) -> Self {
        OptimizerConfig::AdamW(AdamWConfig { lr, ..Default::default() })
    }

    /// The configured learning rate.
    pub fn lr(&self) -> f32 {
        match self {
            OptimizerConfig::Sgd(c) => c.lr,
            OptimizerConfig::AdamW(c) => c.lr,
            OptimizerConfig::SubsetNorm(c) => c.lr,
            OptimizerConfig::SubspaceMomentum(c) => c.lr,
            OptimizerConfig::Frugal(c) => c.lr,
            OptimizerConfig::Sign(c) => c.lr,
            OptimizerConfig::Buffer(_) => 0.0,
        }
    }

    /// Whether the update needs the whole tensor in one slice (row/column statistics, SVDs, per-tensor selections).
    pub fn needs_whole_tensor(&self) -> bool {
        match self {
            OptimizerConfig::SubsetNorm(c) => c.subsets != Subsets::Coordinates,
            OptimizerConfig::SubspaceMomentum(_) | OptimizerConfig::Frugal(_) => true,
            OptimizerConfig::Sgd(_)
            | OptimizerConfig::AdamW(_)
            | OptimizerConfig::Sign(_)
            | OptimizerConfig::Buffer(_) => false,
        }
    }

    /// Rejects hyperparameters the update rule cannot use.
    pub fn validate(&self) -> Result<(), SpecError> {
        match self {
            OptimizerConfig::Sgd(c) => {
                check_lr(c.lr)?;
                check_non_negative("momentum", c.momentum)?;
                check_non_negative("weight_decay", c.weight_decay)?;
                check_unit("dampening", c.dampening)?;
                check(!c.nesterov || (c.momentum > 0.0 && c.dampening == 0.0), || {
                    "nesterov needs momentum > 0 and dampening = 0".to_string()
                })
            }
            OptimizerConfig::AdamW(c) => {
                check_lr(c.lr)?;
                check_unit("beta1", c.beta1)?;
                check_unit("beta2", c.beta2)?;
                check(c.eps.is_finite() && c.eps > 0.0, || format!("eps must be > 0, got {}", c.eps))?;
                check_non_negative("weight_decay", c.weight_decay)
            }
            OptimizerConfig::SubsetNorm(c) => {
                check_lr(c.lr)?;
                check_unit("beta1", c.beta1)?;
                check(c.beta2 > 0.0 && c.beta2 <= 1.0, || format!("beta2 must be in (0, 1], got {}", c.beta2))?;
                check_eps(c.eps)?;
                check_non_negative("weight_decay", c.weight_decay)?;
                check_non_negative("initial_accumulator", c.initial_accumulator)?;
                check(c.eps > 0.0 || c.initial_accumulator > 0.0 || c.subsets == Subsets::Whole, || {
                    "eps = 0 divides by zero on a subset whose gradient is zero; use eps > 0".into()
                })
            }
            OptimizerConfig::SubspaceMomentum(c) => {
                check_lr(c.lr)?;
                check_unit("beta1", c.beta1)?;
                check(c.beta2 > 0.0 && c.beta2 <= 1.0, || format!("beta2 must be in (0, 1], got {}", c.beta2))?;
                check_eps(c.eps)?;
                check(c.rank > 0, || "rank must be > 0".into())?;
                check(c.update_gap > 0, || "update_gap must be > 0".into())?;
                check_non_negative("weight_decay", c.weight_decay)
            }
            OptimizerConfig::Frugal(c) => {
                check_lr(c.lr)?;
                check_unit("beta1", c.beta1)?;
                check_unit("beta2", c.beta2)?;
                check(c.eps.is_finite() && c.eps > 0.0, || format!("eps must be > 0, got {}", c.eps))?;
                check((0.0..=1.0).contains(&c.density), || format!("density must be in [0, 1], got {}", c.density))?;
                check(c.update_gap > 0, || "update_gap must be > 0".into())?;
                check_non_negative("weight_decay", c.weight_decay)?;
                check_non_negative("proj_lr_scale", c.proj_lr_scale)?;
                check_non_negative("inactive_lr_scale", c.inactive_lr_scale)?;
                // A full-rank SVD leaves only rounding noise, which sign() would blow up to ±η.
                check(
                    !(matches!(c.mode, FrugalMode::Svd(_))
                        && c.density >= 1.0
                        && c.inactive_rule == InactiveRule::SignSgd),
                    || {
                        "FRUGAL svd with density 1 and the sign rule steps on rounding noise; lower density or use sgd"
                            .into()
                    },
                )
            }
            OptimizerConfig::Sign(c) => {
                check_lr(c.lr)?;
                check_unit("beta1", c.beta1)?;
                check_unit("beta2", c.beta2)?;
                check_non_negative("weight_decay", c.weight_decay)
            }
            OptimizerConfig::Buffer(_) => Ok(()),
        }
    }

    /// Whether the group holds module buffers rather than trained tensors.
    pub fn is_buffer(&self) -> bool {
        matches!(self, OptimizerConfig::Buffer(_))
    }

    /// Short mode name, used as a metric label.
    pub fn mode(&self) -> &'static str {
        match self {
            OptimizerConfig::Sgd(_) => "sgd",
            OptimizerConfig::AdamW(c) if c.decoupled => "adamw",
            OptimizerConfig::AdamW(_) => "adam_l2",
            OptimizerConfig::SubsetNorm(c) if c.subsets == Subsets::Whole => "adagrad_norm",
            OptimizerConfig::SubsetNorm(c) if c.beta2 >= 1.0 => "adagrad_sn",
            OptimizerConfig::SubsetNorm(_) => "adam_sn",
            OptimizerConfig::SubspaceMomentum(c) if c.adaptive => "adam_sn_sm",
            OptimizerConfig::SubspaceMomentum(_) => "sgd_sm",
            OptimizerConfig::Frugal(c) => match c.mode {
                FrugalMode::Block { .. } => "frugal_block",
                FrugalMode::Columns => "frugal_columns",
                FrugalMode::Svd(_) => "frugal_svd",
            },
            OptimizerConfig::Sign(c) if c.lion => "lion",
            OptimizerConfig::Sign(c) if c.beta1 > 0.0 => "signum",
            OptimizerConfig::Sign(_) => "signsgd",
            OptimizerConfig::Buffer(BufferSync::Broadcast) => "buffer_broadcast",
            OptimizerConfig::Buffer(BufferSync::Mean) => "buffer_mean",
        }
    }

    /// Human-readable description with the hyperparameters.
    pub fn describe(&self) -> String {
        match self {
            OptimizerConfig::Sgd(c) => format!(
                "sgd(lr={}, momentum={}, dampening={}, nesterov={}, weight_decay={})",
                c.lr, c.momentum, c.dampening, c.nesterov, c.weight_decay
            ),
            OptimizerConfig::AdamW(c) => format!(
                "{}(lr={}, betas=({}, {}), eps={}, weight_decay={})",
                self.mode(),
                c.lr,
                c.beta1,
                c.beta2,
                c.eps,
                c.weight_decay
            ),
            other => format!("{}({other:?})", self.mode()),
        }
    }
}
