//! The block store: every model this shard serves, its blocks with their
//! weights and optimizer state, the workers' membership, and the rules that
//! turn pushes into updates in each consistency mode. Everything here is
//! synchronous and may be heavy; the RPC layer calls it from the blocking
//! pool, never from a reactor thread. Nothing here knows gRPC.

mod block;
pub mod clock;
mod cluster;
mod membership;
mod model;
mod registry;

pub use block::{Block, BlockGradient, WaitFailure};
#[cfg(test)]
pub use block::{DecodedGradient, NoGradient};
pub use cluster::{Addressed, Cluster, ListChange, ShardIdentity};
pub use membership::{JoinError, MAX_RANK, Membership};
pub use model::PushOutcome;
pub use model::{
    BlockSnapshot, BlockUpdate, CheckpointPlan, CheckpointSink, Closing, DropReason, GroupStats, Model, ModelSnapshot,
    NormPart, RoundStats, Rounds, WriteReport,
};
pub use registry::Registry;

/// Runs `work` on the blocking pool, off the reactor: how the async layers
/// call into the store (and anything else heavy).
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, crate::error::ServerError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| crate::error::ServerError::Internal(e.to_string()))
}
