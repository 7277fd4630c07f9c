//! Optimizer math over plain slices. Nothing here knows about gRPC, blocks or
//! shards: an optimizer instance owns the state of one contiguous slice of
//! parameters (a block, or a whole tensor for the modes that need its shape)
//! and updates it from one aggregated gradient.

mod adam;
mod frugal;
pub mod linalg;
mod projector;
mod schedule;
mod sgd;
mod sign;
mod subset_norm;
mod subspace;

pub use adam::{AdamW, AdamWConfig, Moments};
pub use frugal::{BlockOrder, Frugal, FrugalConfig, FrugalMode, GroupPosition, InactiveRule};
pub use linalg::Dims;
pub use projector::Projector;
pub use schedule::LrSchedule;
pub use sgd::{Sgd, SgdConfig};
pub use sign::{Sign, SignConfig};
pub use subset_norm::{SubsetNorm, SubsetNormConfig, Subsets};
pub use subspace::{IndexRule, Projection, SubspaceMomentum, SubspaceMomentumConfig};

/// Per-step inputs that are the same for every block of a group.
#[derive(Clone, Copy, Debug)]
pub struct StepContext {
    /// Step counter, 1-based, incremented before the update that uses it.
    pub t: u64,
    /// Multiplies the configured learning rate (1.0 without a schedule).
    pub lr_scale: f32,
}

/// One optimizer instance: the state for one parameter slice and its update rule.
pub trait Optimizer: Send {
    /// Applies one update to `param` from `grad` (same length as `param`).
    fn step(&mut self, param: &mut [f32], grad: &[f32], ctx: &StepContext);
    /// Bytes of optimizer state this instance holds (or will hold once stepping).
    fn state_bytes(&self) -> usize;
    /// Named state buffers, for tests and checkpoints.
    fn state(&self) -> Vec<(&'static str, Vec<f32>)>;
}

/// What an optimizer instance is built for.
#[derive(Clone, Debug)]
pub struct SliceInfo<'a> {
    /// Tensor name (salts seeded random choices).
    pub name: &'a str,
    /// Row-major view of the slice: rows × (product of the other dimensions).
    pub dims: Dims,
    /// Whether the tensor has two or more dimensions.
    pub matrix: bool,
    /// FRUGAL: the tensor's position among its group's projectable tensors, if it is one.
    pub projectable: Option<GroupPosition>,
}

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
}

/// Invalid hyperparameters.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), ConfigError> {
    if ok { Ok(()) } else { Err(ConfigError(what())) }
}

fn check_lr(lr: f32) -> Result<(), ConfigError> {
    check(lr.is_finite() && lr > 0.0, || format!("lr must be a finite number > 0, got {lr}"))
}

fn check_unit(name: &str, value: f32) -> Result<(), ConfigError> {
    check((0.0..1.0).contains(&value), || format!("{name} must be in [0, 1), got {value}"))
}

fn check_non_negative(name: &str, value: f32) -> Result<(), ConfigError> {
    check(value.is_finite() && value >= 0.0, || format!("{name} must be a finite number >= 0, got {value}"))
}

fn check_eps(eps: f32) -> Result<(), ConfigError> {
    check(eps.is_finite() && eps >= 0.0, || format!("eps must be >= 0, got {eps}"))
}

impl OptimizerConfig {
    /// Rejects hyperparameters the update rule cannot use.
    pub fn validate(&self) -> Result<(), ConfigError> {
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
                    !(c.mode == FrugalMode::Svd && c.density >= 1.0 && c.inactive_rule == InactiveRule::SignSgd),
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
        }
    }

    /// Creates the optimizer for one slice.
    pub fn build(&self, slice: &SliceInfo) -> Box<dyn Optimizer> {
        let len = slice.dims.rows * slice.dims.cols;
        match self {
            OptimizerConfig::Sgd(c) => Box::new(Sgd::new(c.clone(), len)),
            OptimizerConfig::AdamW(c) => Box::new(AdamW::new(c.clone(), len)),
            OptimizerConfig::SubsetNorm(c) => Box::new(SubsetNorm::new(c.clone(), slice.dims, slice.matrix)),
            OptimizerConfig::SubspaceMomentum(c) if slice.matrix => {
                Box::new(SubspaceMomentum::new(c.clone(), slice.dims, slice.name))
            }
            OptimizerConfig::SubspaceMomentum(c) => {
                // 1-D tensors keep the full momentum (the whole vector is the subspace).
                let full =
                    SubspaceMomentumConfig { rank: len, projection: Projection::Index(IndexRule::TopK), ..c.clone() };
                Box::new(SubspaceMomentum::new(full, slice.dims, slice.name))
            }
            OptimizerConfig::Frugal(c) => match slice.projectable {
                Some(position) => Box::new(Frugal::new(c.clone(), slice.dims, position, slice.name)),
                None => Box::new(AdamW::new(
                    AdamWConfig {
                        lr: c.lr,
                        beta1: c.beta1,
                        beta2: c.beta2,
                        eps: c.eps,
                        weight_decay: c.weight_decay,
                        decoupled: true,
                    },
                    len,
                )),
            },
            OptimizerConfig::Sign(c) => Box::new(Sign::new(c.clone(), len)),
        }
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
                FrugalMode::Svd => "frugal_svd",
            },
            OptimizerConfig::Sign(c) if c.lion => "lion",
            OptimizerConfig::Sign(c) if c.beta1 > 0.0 => "signum",
            OptimizerConfig::Sign(_) => "signsgd",
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
