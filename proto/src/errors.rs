//! Machine-readable error kinds. A shard attaches one as metadata to the
//! errors a client is expected to recover from, so clients react to the kind
//! rather than parse messages (several kinds share a gRPC code: a stale step
//! and a block on another shard are both FAILED_PRECONDITION).

/// Trailing metadata key whose value is one of the kinds below.
pub const ERROR_KIND_HEADER: &str = "ps-error";

/// The step was applied without this worker (its lease expired): rejoin and
/// continue from the current version. Code FAILED_PRECONDITION.
pub const STALE_STEP: &str = "stale-step";

/// The step is ahead of the block: pull that version first. Code FAILED_PRECONDITION.
pub const FUTURE_STEP: &str = "future-step";

/// The worker is not a live member (never joined, left, or its lease expired):
/// join again. Code NOT_FOUND.
pub const UNKNOWN_WORKER: &str = "unknown-worker";

/// Another member holds the rank the worker asked for. Code ALREADY_EXISTS.
pub const RANK_TAKEN: &str = "rank-taken";

/// The model is not registered on this shard. Code NOT_FOUND.
pub const UNKNOWN_MODEL: &str = "unknown-model";

/// The federated round was applied without this client's update: ask for the
/// next task. Code FAILED_PRECONDITION.
pub const ROUND_CLOSED: &str = "round-closed";

/// The federated round is not open on this shard yet: pull the previous
/// round's model from it first. Code FAILED_PRECONDITION.
pub const FUTURE_ROUND: &str = "future-round";

/// The model was rolled back to a checkpoint under a new epoch: restore the
/// worker-side state of the resume version and continue from it. Code FAILED_PRECONDITION.
pub const EPOCH_CHANGED: &str = "epoch-changed";

/// Trailing metadata key of an epoch-changed error: the new epoch.
pub const EPOCH_HEADER: &str = "ps-epoch";

/// Trailing metadata key of an epoch-changed error: the version to continue from.
pub const RESUME_VERSION_HEADER: &str = "ps-resume-version";

/// The shard is restoring a checkpoint after a restart: retry. Code UNAVAILABLE.
pub const RECOVERING: &str = "recovering";

/// The shard is changing the shard list (online resharding) and holds the
/// model at a step boundary: retry. Code UNAVAILABLE.
pub const RESHARDING: &str = "resharding";

/// Reshard HOLD: the run is past the step boundary asked for (or counts
/// pushes of a later step) on this shard; choose a later one. Code FAILED_PRECONDITION.
pub const BOUNDARY_PASSED: &str = "boundary-passed";

/// The request was made for a shard list the cluster has left: read the new
/// list from the `ps-shards` metadata (or `GetLayout` of any shard), connect
/// to it and retry. Code FAILED_PRECONDITION.
pub const LAYOUT_CHANGED: &str = "layout-changed";

/// Trailing metadata key of a layout-changed error: the shard list now, comma-separated.
pub const SHARDS_HEADER: &str = "ps-shards";

/// A limit on what the shard holds at once (bytes staged by pushes, open
/// streams) is reached: retry with backoff. Code RESOURCE_EXHAUSTED.
pub const BUSY: &str = "busy";

/// Registering the model afresh would lose a run: the shard restarted without
/// the model its peers train (registering it would fork it), or it holds
/// checkpoints of the model that it could not restore. Code FAILED_PRECONDITION.
pub const NOT_RESTORED: &str = "not-restored";
