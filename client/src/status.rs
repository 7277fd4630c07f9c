//! What a shard reports about its models, in the client's own types.

use ps_proto::pb;

use crate::spec::Mode;

/// A shard's limits and what it holds against them (the wire message as is).
pub use ps_proto::pb::ShardLimits;

/// One shard's status.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardStatus {
    /// The shard's index.
    pub shard_index: u32,
    /// Shards in its cluster.
    pub num_shards: u32,
    /// Its models, by name.
    pub models: Vec<ModelStatus>,
    /// Its limits and what is held against them (absent from servers before limits existed).
    pub limits: Option<ShardLimits>,
}

/// A model's state on one shard.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelStatus {
    /// Model name.
    pub name: String,
    /// Consistency mode.
    pub mode: Mode,
    /// Lowest block version on the shard.
    pub min_version: u64,
    /// Highest block version on the shard.
    pub max_version: u64,
    /// Blocks on the shard.
    pub blocks: u32,
    /// Parameters on the shard.
    pub parameters: u64,
    /// Push RPCs committed.
    pub pushes: u64,
    /// Workers with a live lease.
    pub live_workers: Vec<WorkerStatus>,
    /// Per-group optimizer and state.
    pub groups: Vec<GroupStatus>,
    /// Workers dropped for an expired lease.
    pub workers_expired: u64,
    /// Members dropped because they had not pushed a step by its deadline.
    pub workers_dropped_late: u64,
    /// Federated models: the round state on this shard.
    pub federated: Option<FederatedStatus>,
    /// The model's epoch (one more after each rollback to a checkpoint).
    pub epoch: u64,
    /// The newest checkpoint this shard wrote (0: none yet).
    pub checkpoint_version: u64,
    /// The shard is restoring the model after a restart.
    pub recovering: bool,
    /// The newest checkpoint every shard holds, as this shard learned it (0: none yet).
    pub common_checkpoint_version: u64,
    /// Why this shard's newest checkpoint write failed (empty while they succeed).
    pub checkpoint_error: String,
}

/// A federated model's rounds on one shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FederatedStatus {
    /// "fedavg", "fedprox", "scaffold" or "fedspeed".
    pub algorithm: String,
    /// The open round.
    pub round: u64,
    /// Clients selected in it.
    pub cohort_size: u32,
    /// Shard 0: clients counted so far; other shards: clients whose update is held.
    pub contributions: u32,
    /// Selected clients left out at a deadline, over all rounds.
    pub stragglers_dropped: u64,
    /// Deadlines extended for want of the quorum.
    pub rounds_extended: u64,
    /// Bytes of global federated state (SCAFFOLD's c, FedSpeed's sum of h).
    pub server_state_bytes: u64,
    /// Bytes of client updates held for the open round.
    pub staged_bytes: u64,
    /// All rounds of the run are applied.
    pub finished: bool,
}

/// A live worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerStatus {
    /// Worker id.
    pub worker_id: String,
    /// Milliseconds since its last heartbeat.
    pub last_heartbeat_ms_ago: u64,
}

/// A parameter group on one shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupStatus {
    /// Group name.
    pub name: String,
    /// Optimizer mode and hyperparameters, readable.
    pub optimizer: String,
    /// Tensors in the group (all shards).
    pub tensors: u32,
    /// Parameters of the group on this shard.
    pub parameters: u64,
    /// Optimizer state bytes of the group on this shard.
    pub state_bytes: u64,
    /// Bytes of gradients of steps not yet applied held by the group on this shard.
    pub pending_bytes: u64,
}

impl From<pb::GetStatusResponse> for ShardStatus {
    fn from(wire: pb::GetStatusResponse) -> Self {
        ShardStatus {
            shard_index: wire.shard_index,
            num_shards: wire.num_shards,
            limits: wire.limits,
            models: wire
                .models
                .into_iter()
                .map(|m| ModelStatus {
                    name: m.name,
                    mode: Mode::from_wire(m.mode, m.staleness).unwrap_or_default(),
                    min_version: m.min_version,
                    max_version: m.max_version,
                    blocks: m.blocks,
                    parameters: m.parameters,
                    live_workers: m
                        .live_workers
                        .into_iter()
                        .map(|w| WorkerStatus {
                            worker_id: w.worker_id,
                            last_heartbeat_ms_ago: w.last_heartbeat_ms_ago,
                        })
                        .collect(),
                    groups: m
                        .groups
                        .into_iter()
                        .map(|g| GroupStatus {
                            name: g.name,
                            optimizer: g.optimizer,
                            tensors: g.tensors,
                            parameters: g.parameters,
                            state_bytes: g.state_bytes,
                            pending_bytes: g.pending_bytes,
                        })
                        .collect(),
                    pushes: m.pushes,
                    workers_expired: m.workers_expired,
                    workers_dropped_late: m.workers_dropped_late,
                    federated: m.federated.map(|f| FederatedStatus {
                        algorithm: f.algorithm,
                        round: f.round,
                        cohort_size: f.cohort_size,
                        contributions: f.contributions,
                        stragglers_dropped: f.stragglers_dropped,
                        rounds_extended: f.rounds_extended,
                        server_state_bytes: f.server_state_bytes,
                        staged_bytes: f.staged_bytes,
                        finished: f.finished,
                    }),
                    epoch: m.epoch,
                    checkpoint_version: m.checkpoint_version,
                    common_checkpoint_version: m.common_checkpoint_version,
                    checkpoint_error: m.checkpoint_error,
                    recovering: m.recovering,
                })
                .collect(),
        }
    }
}
