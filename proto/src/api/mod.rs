//! The domain values both sides of the wire share, each defined once: the
//! consistency mode and step contract, tensor init rules, optimizer
//! configurations with their learning-rate schedules, federated round
//! configurations, and the model spec that carries them. Each converts to its
//! `paramserver.v1` message, and back with the `.proto`'s "zero means the
//! default" rules applied and the value checked, so the Rust client builds
//! exactly what a shard validates, and a registration that leaves a field at
//! zero and one that sends the default are the same registration.
//!
//! Encodings and aggregations need no type of their own: the generated
//! [`pb::Encoding`](crate::pb::Encoding) and [`pb::Aggregation`](crate::pb::Aggregation)
//! are plain enums.

mod init;
mod mode;
mod optimizer;
mod optimizer_wire;
mod rounds;
mod schedule;
mod spec;

pub use init::Init;
pub use mode::{MAX_STALENESS, MIN_STEP_DEADLINE, Mode, StepContract};
pub use optimizer::{
    AdamWConfig, BlockOrder, BufferSync, FrugalConfig, FrugalMode, InactiveRule, IndexRule, LION_DEFAULT_BETA2,
    OptimizerConfig, Projection, SgdConfig, SignConfig, SubsetNormConfig, Subsets, SubspaceMomentumConfig, SvdSolver,
};
pub use rounds::{Algorithm, ClientRule, HPool, MAX_CLIENTS, RoundConfig, RoundTask, Selection};
pub use schedule::LrSchedule;
pub use spec::{GradClip, GroupConfig, ModelSpec, TensorSpec};

pub use crate::pb::{Aggregation, Encoding};

/// A value the API refuses, with a message that says what to change.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

impl SpecError {
    /// The same error with `context` before its message (`group 'x': ...`).
    pub fn within(self, context: impl std::fmt::Display) -> Self {
        SpecError(format!("{context}: {}", self.0))
    }
}

/// Shorthand for a refusal.
fn refuse<T>(message: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError(message.into()))
}

/// A wire value where zero means "the default".
fn or_default(value: f64, default: f32) -> f32 {
    if value == 0.0 { default } else { value as f32 }
}

/// A wire count where zero means "the default".
fn or_default_count(value: u64, default: u64) -> u64 {
    if value == 0 { default } else { value }
}
