//! Optimizer math over plain slices. Nothing here knows about gRPC, blocks or
//! shards: an optimizer instance owns the state of one contiguous slice of
//! parameters and updates it from one (already aggregated) gradient.

mod adamw;
mod sgd;

pub use adamw::{AdamW, AdamWConfig};
pub use sgd::{Sgd, SgdConfig};

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
    /// Bytes of optimizer state this instance holds.
    fn state_bytes(&self) -> usize;
    /// Named state buffers, for tests and checkpoints.
    fn state(&self) -> Vec<(&'static str, &[f32])>;
}

/// Which optimizer a parameter group uses, with its hyperparameters.
#[derive(Clone, Debug, PartialEq)]
pub enum OptimizerConfig {
    /// SGD with optional (Nesterov) momentum.
    Sgd(SgdConfig),
    /// AdamW, decoupled weight decay.
    AdamW(AdamWConfig),
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
        }
    }

    /// Creates the optimizer for a slice of `len` parameters.
    pub fn build(&self, len: usize) -> Box<dyn Optimizer> {
        match self {
            OptimizerConfig::Sgd(c) => Box::new(Sgd::new(c.clone(), len)),
            OptimizerConfig::AdamW(c) => Box::new(AdamW::new(c.clone(), len)),
        }
    }

    /// Short mode name, used as a metric label.
    pub fn mode(&self) -> &'static str {
        match self {
            OptimizerConfig::Sgd(_) => "sgd",
            OptimizerConfig::AdamW(_) => "adamw",
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
                "adamw(lr={}, betas=({}, {}), eps={}, weight_decay={})",
                c.lr, c.beta1, c.beta2, c.eps, c.weight_decay
            ),
        }
    }
}
