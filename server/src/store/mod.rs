//! The block store: every model this shard serves, its blocks with their
//! weights and optimizer state, the workers' membership, and the rules that
//! turn pushes into updates in each consistency mode. Everything here is
//! synchronous and may be heavy; the RPC layer calls it from the blocking
//! pool, never from a reactor thread. Nothing here knows gRPC.

mod barrier;
mod block;
mod membership;
mod model;
mod registry;
mod rounds;
mod snapshot;

pub use barrier::PushOutcome;
#[cfg(test)]
pub use block::DecodedGradient;
pub use block::{Block, BlockGradient, WaitFailure};
pub use membership::{JoinError, MAX_RANK, Membership};
pub use model::{DropReason, GroupStats, Model};
pub use registry::{Registry, ShardIdentity};
pub use rounds::{BlockUpdate, Closing, RoundStats, Rounds, Task};
pub use snapshot::{BlockSnapshot, CheckpointPlan, CheckpointSink, ModelSnapshot, WriteReport};
