//! The server's error table: one enum for everything a request can do wrong,
//! each variant with a message a user can act on. The gRPC code of each
//! variant is assigned in exactly one place, `rpc::convert`.

use ps_proto::api::SpecError;
use ps_proto::codec::CodecError;

use crate::spec::NameError;
use crate::store::JoinError;

/// Everything a request can do wrong, with a message a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The model name is not registered on this shard.
    #[error("model '{0}' is not registered; call RegisterModel first")]
    UnknownModel(String),
    /// The tensor name is not part of the model.
    #[error("model '{model}' has no tensor '{tensor}'")]
    UnknownTensor {
        /// Model name.
        model: String,
        /// Tensor name.
        tensor: String,
    },
    /// A request would take the shard past one of its limits.
    #[error("{what} (limit set by {flag})")]
    LimitExceeded {
        /// What was asked and the limit it passes.
        what: String,
        /// The server flag that sets the limit.
        flag: &'static str,
    },
    /// A limit on what the shard holds at once is reached; it passes when other requests finish.
    #[error("{what} (limit set by {flag}); retry with backoff")]
    Busy {
        /// What is held and the limit.
        what: String,
        /// The server flag that sets the limit.
        flag: &'static str,
    },
    /// A stream sent nothing for too long, or stayed open too long.
    #[error("{0}")]
    StreamTimeout(String),
    /// The block index is past the tensor's last block.
    #[error("tensor '{tensor}' has {blocks} blocks; block {block} does not exist")]
    UnknownBlock {
        /// Tensor name.
        tensor: String,
        /// Block asked for.
        block: u32,
        /// Blocks the tensor has.
        blocks: u32,
    },
    /// The block exists but another shard owns it.
    #[error("block {block} of tensor '{tensor}' lives on shard {owner}, not on shard {shard}; route by GetLayout")]
    WrongShard {
        /// Tensor name.
        tensor: String,
        /// Block index.
        block: u32,
        /// The owning shard.
        owner: u32,
        /// This shard.
        shard: u32,
    },
    /// The model spec is malformed.
    #[error("invalid model spec: {0}")]
    InvalidSpec(String),
    /// The model exists with another spec.
    #[error("model '{0}' is already registered with a different spec; use another name or restart the shards")]
    SpecConflict(String),
    /// The worker is not a live member.
    #[error(
        "worker '{worker}' is not a live member of model '{model}' (never joined, left, or its lease expired); call JoinWorker"
    )]
    UnknownWorker {
        /// Model name.
        model: String,
        /// Worker id.
        worker: String,
    },
    /// A worker that may not join.
    #[error("worker '{worker}' cannot join model '{model}': {reason}")]
    Join {
        /// Model name.
        model: String,
        /// Worker id.
        worker: String,
        /// Why.
        reason: JoinError,
    },
    /// A worker name breaks the naming rule.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// A RegisterModel stream that does not start with the spec.
    #[error("the first RegisterModel message must carry the spec")]
    SpecNotFirst,
    /// A RegisterModel stream with a second spec.
    #[error("only the first RegisterModel message may carry a spec")]
    SpecRepeated,
    /// Registration values for a tensor with an init rule.
    #[error("tensor '{tensor}' has an init rule; values are accepted only for INIT_KIND_PROVIDED tensors")]
    ValuesNotProvided {
        /// Tensor name.
        tensor: String,
    },
    /// A PROVIDED tensor whose values did not come.
    #[error("tensor '{tensor}' is INIT_KIND_PROVIDED but no values came for its block {block} (owned by this shard)")]
    MissingValues {
        /// Tensor name.
        tensor: String,
        /// Block index.
        block: u32,
    },
    /// A push stream without any message.
    #[error("empty push stream")]
    EmptyPush,
    /// A push message without its chunk.
    #[error("push message without a chunk")]
    PushWithoutChunk,
    /// A local push or pull on a shard that serves no local channel.
    #[error("this shard serves no local channel (start it with --local-dir); use PushGradients and PullWeights")]
    NoLocalChannel,
    /// A local push naming a segment this shard does not know.
    #[error(
        "segment '{0}' is not attached on this shard (attach it on the segment socket; segments are forgotten when the connection that attached them closes)"
    )]
    UnknownSegment(String),
    /// A local push whose segment does not hold what it names.
    #[error("segment '{segment}': {problem}")]
    BadSegment {
        /// The segment id.
        segment: String,
        /// What is wrong.
        problem: String,
    },
    /// Chunks of one push that name different models, workers or steps.
    #[error(
        "every chunk of one push must name the same model, worker and step; got ({model}, {worker}, {step}) after ({first_model}, {first_worker}, {first_step})"
    )]
    MixedPush {
        /// The first chunk's model.
        first_model: String,
        /// The first chunk's worker.
        first_worker: String,
        /// The first chunk's step.
        first_step: u64,
        /// This chunk's model.
        model: String,
        /// This chunk's worker.
        worker: String,
        /// This chunk's step.
        step: u64,
    },
    /// A learning-rate scale that is negative, not finite, or too large.
    #[error(
        "lr_scale {0} is not allowed; it multiplies the step's learning rate and must be finite, from 0 to 1e6 (leave it unset for 1)"
    )]
    BadLrScale(f64),
    /// Chunks of one push that carry different learning-rate scales.
    #[error("every chunk of one push must carry the same lr_scale; got {got:?} after {first:?}")]
    MixedLrScale {
        /// The first chunk's scale.
        first: Option<f64>,
        /// This chunk's scale.
        got: Option<f64>,
    },
    /// A push whose learning-rate scale differs from the one its step's first push carried.
    #[error(
        "worker '{worker}' pushed step {step} of tensor '{tensor}' block {block} with lr_scale {pushed}, but the step's first push carried {first}; every worker must set the same scale for a step (derive it from the step number, as a scheduler stepped once per step does); nothing was applied"
    )]
    LrScaleMismatch {
        /// Worker id.
        worker: String,
        /// Tensor name.
        tensor: String,
        /// Block index.
        block: u32,
        /// Step pushed.
        step: u64,
        /// The scale this push carried.
        pushed: f64,
        /// The scale of the step's first push.
        first: f64,
    },
    /// Buffer values from a worker other than rank 0 for a group that takes rank 0's (`BUFFER_SYNC_BROADCAST`).
    #[error(
        "worker '{worker}' (rank {rank}) pushed values for buffer '{tensor}', whose group takes rank 0's values only (BUFFER_SYNC_BROADCAST); push ENCODING_NO_GRADIENT for it from the other ranks, or use BUFFER_SYNC_MEAN; nothing was applied"
    )]
    BufferNotFromRankZero {
        /// Worker id.
        worker: String,
        /// Its rank.
        rank: u32,
        /// Tensor name.
        tensor: String,
    },
    /// A part of a step's norm from a shard that holds no part of it, naming other blocks, or not sums of squares.
    #[error(
        "shard {shard} sent a part of step {step}'s gradient norm of model '{model}' that does not fit: it holds no blocks of the norm, it names other blocks than the ones it holds (each once, in tensor then block order), or a value is not a finite sum of squares"
    )]
    BadNormPart {
        /// The model.
        model: String,
        /// The sending shard.
        shard: u32,
        /// The step.
        step: u64,
    },
    /// A part of a step's norm for a step no block of this shard can be at yet.
    #[error(
        "a part of step {step}'s gradient norm of model '{model}' came before this shard could take it (its blocks are at version {version} at most); send it again later"
    )]
    FutureNormPart {
        /// The model.
        model: String,
        /// The step.
        step: u64,
        /// This shard's highest block version.
        version: u64,
    },
    /// An async worker whose steps go backwards.
    #[error(
        "worker '{worker}' pushed step {step} for tensor '{tensor}' block {block} after step {last}; steps of one worker must not go back"
    )]
    StepWentBack {
        /// Worker id.
        worker: String,
        /// Tensor name.
        tensor: String,
        /// Block index.
        block: u32,
        /// Step pushed.
        step: u64,
        /// The last step this worker pushed for the block.
        last: u64,
    },
    /// A pushed gradient or registered value that decodes to NaN or ±inf.
    #[error(
        "element {index} of tensor '{tensor}' block {block} is NaN or infinite after decoding {what}; nothing was applied. Values must be finite: look for a diverged loss, or for f16 overflow (f16 saturates to inf above 65504: clip, scale, or push bf16)"
    )]
    NonFinite {
        /// Tensor name.
        tensor: String,
        /// Block index.
        block: u32,
        /// Element within the block.
        index: u64,
        /// What was decoded (a push's gradient, or registration values).
        what: &'static str,
    },
    /// A pull in an encoding weights are not sent in.
    #[error("pull encoding {0} is not available; use ENCODING_F32, ENCODING_BF16 or ENCODING_F16")]
    PullEncoding(i32),
    /// A chunk that does not fit its block or stream.
    #[error("{problem}")]
    Chunk {
        /// What is wrong with it.
        problem: ChunkProblem,
    },
    /// A chunk is larger than the server accepts.
    #[error("chunk of {bytes} bytes exceeds the limit of {limit} bytes; split it into smaller chunks")]
    ChunkTooLarge {
        /// Payload bytes received.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// A payload does not decode.
    #[error("bad payload for tensor '{tensor}' block {block}: {source}")]
    BadPayload {
        /// Tensor name.
        tensor: String,
        /// Block index.
        block: u32,
        /// What is wrong with it.
        source: CodecError,
    },
    /// The pushed step was already completed without this worker.
    #[error(
        "step {step} of tensor '{tensor}' block {block} is already applied (block is at version {version}); pull version {version} and push step {version}"
    )]
    StaleStep {
        /// Tensor name.
        tensor: String,
        /// Block index.
        block: u32,
        /// Step pushed.
        step: u64,
        /// Current version of the block.
        version: u64,
    },
    /// The pushed step is further ahead of the block's version than the mode allows.
    #[error(
        "step {step} of tensor '{tensor}' block {block} is ahead of the block (version {version}; pushes may be {ahead} steps ahead); pull version {} first",
        .step - .ahead
    )]
    FutureStep {
        /// Tensor name.
        tensor: String,
        /// Block index.
        block: u32,
        /// Step pushed.
        step: u64,
        /// Current version of the block.
        version: u64,
        /// How far ahead a push may be (the staleness bound; 0 in sync and async mode).
        ahead: u64,
    },
    /// A gradient push or join for a federated model.
    #[error("model '{0}' is federated: clients push round updates (GetRoundTask, PushRoundUpdate), not gradients")]
    FederatedModel(String),
    /// A federated request for a model in another mode.
    #[error("model '{0}' is not federated; rounds exist only in CONSISTENCY_MODE_FEDERATED")]
    NotFederated(String),
    /// A client id outside the population.
    #[error("client {client} does not exist: model '{model}' has clients 0..{clients}")]
    UnknownClient {
        /// Model name.
        model: String,
        /// Client id.
        client: u32,
        /// The population N.
        clients: u32,
    },
    /// An update for a round that is already applied.
    #[error(
        "round {round} of model '{model}' is closed (round {open} is open); the update was not counted: ask GetRoundTask for the next round"
    )]
    RoundClosed {
        /// Model name.
        model: String,
        /// Round pushed.
        round: u64,
        /// The open round.
        open: u64,
    },
    /// An update or commit for a round that is not open yet on this shard.
    #[error("round {round} of model '{model}' is not open on this shard (round {open} is); pull version {} first", .round - 1)]
    FutureRound {
        /// Model name.
        model: String,
        /// Round asked for.
        round: u64,
        /// The open round.
        open: u64,
    },
    /// The run's last round is applied.
    #[error("model '{model}' finished its {rounds} rounds; no round {round}")]
    RunFinished {
        /// Model name.
        model: String,
        /// Rounds of the run.
        rounds: u64,
        /// Round asked for.
        round: u64,
    },
    /// A client that the round did not select.
    #[error("client {client} is not selected in round {round} of model '{model}'; ask GetRoundTask for the next round")]
    NotSelected {
        /// Model name.
        model: String,
        /// Client id.
        client: u32,
        /// Round.
        round: u64,
    },
    /// A round update whose parts do not match what the algorithm needs.
    #[error("round update for tensor '{tensor}' block {block}: {problem}")]
    RoundParts {
        /// Tensor name.
        tensor: String,
        /// Block index.
        block: u32,
        /// What is wrong.
        problem: String,
    },
    /// A shard lacks part of a client's update for a round.
    #[error(
        "shard {shard} holds no update of client {client} for round {round} of tensor '{tensor}' block {block}; push it there first"
    )]
    MissingRoundUpdate {
        /// Shard index.
        shard: u32,
        /// Client id.
        client: u32,
        /// Round.
        round: u64,
        /// Tensor name.
        tensor: String,
        /// Block index.
        block: u32,
    },
    /// A round commit sent to the shard that decides rounds, or one that differs from what was applied.
    #[error("{0}")]
    RoundCommit(String),
    /// A peer shard could not be asked.
    #[error("shard {shard} could not be reached to check the update: {message}")]
    PeerUnavailable {
        /// Peer index.
        shard: u32,
        /// What went wrong.
        message: String,
    },
    /// The round waited too long.
    #[error("no round after {after} of model '{model}' opened within {waited_ms} ms")]
    TaskTimeout {
        /// Model name.
        model: String,
        /// The round the client had handled.
        after: u64,
        /// Milliseconds waited.
        waited_ms: u64,
    },
    /// A pull waited too long for a version.
    #[error(
        "timed out after {waited_ms} ms waiting for tensor '{tensor}' block {block} to reach version {wanted} (it is at {version}); are all workers pushing?"
    )]
    PullTimeout {
        /// Tensor name.
        tensor: String,
        /// Block index.
        block: u32,
        /// Version asked for.
        wanted: u64,
        /// Version reached.
        version: u64,
        /// How long the pull waited.
        waited_ms: u64,
    },
    /// An optimizer update panicked; the block is out of service.
    #[error(
        "the optimizer failed on step {step} of tensor '{tensor}' block {block} ({reason}); the step's mean gradient is kept on the shard and the block takes no more pushes: see the shard's log"
    )]
    OptimizerFailed {
        /// Tensor name.
        tensor: String,
        /// Block index.
        block: u32,
        /// The step whose update failed.
        step: u64,
        /// The panic message.
        reason: String,
    },
    /// A failure inside the server.
    #[error("internal error: {0}")]
    Internal(String),
    /// The request was made in an older epoch of the model: it was rolled back to a checkpoint since.
    #[error(
        "model '{model}' was rolled back to its checkpoint at version {version} (epoch {epoch}; the request was for epoch {sent}): restore the worker state saved at version {version} and continue from it"
    )]
    EpochChanged {
        /// Model name.
        model: String,
        /// The epoch the request carried.
        sent: u64,
        /// The model's epoch now.
        epoch: u64,
        /// The version the model continues from.
        version: u64,
    },
    /// An online reshard holds the model at a step boundary, or cannot hold it there.
    #[error("model '{model}': {reason}")]
    Resharding {
        /// Model name.
        model: String,
        /// The version of the step boundary.
        version: u64,
        /// What happened.
        reason: String,
    },
    /// An online reshard cannot hold the model at a version the run has passed.
    #[error("model '{model}': online reshard at version {version}: {reason}")]
    BoundaryPassed {
        /// Model name.
        model: String,
        /// The version asked for.
        version: u64,
        /// Where the run is.
        reason: String,
    },
    /// A phase of an online reshard cannot run on this shard.
    #[error("online reshard: {0}")]
    Reshard(String),
    /// The shard is restoring the model from a checkpoint.
    #[error(
        "shard is recovering model '{0}' from its checkpoint and agreeing with its peers on the version to continue from; retry shortly"
    )]
    Recovering(String),
    /// Registering would fork a model that the peers are training.
    #[error(
        "model '{model}' is at version {version} on shard {peer}, but this shard holds no copy of it (it restarted without its checkpoints); registering it afresh would fork the model. Restart this shard with its --checkpoint-dir, or with --allow-fresh-rejoin to discard the run"
    )]
    NotRestored {
        /// Model name.
        model: String,
        /// The peer that holds it.
        peer: u32,
        /// The peer's version.
        version: u64,
    },
    /// The shard holds checkpoints of the model that it could not restore.
    #[error(
        "shard {shard} holds checkpoints of model '{model}' in {dir} but could not restore them: {reason}. Registering it afresh would train it from step 0 and prune them, so it is refused. Repair or restore those files and restart the shard, or move the model's directory out of {dir} to start it afresh"
    )]
    Unrestorable {
        /// Model name.
        model: String,
        /// This shard.
        shard: u32,
        /// The checkpoint directory.
        dir: String,
        /// What was wrong with each version.
        reason: String,
    },
    /// Checkpoints need a directory.
    #[error("this shard runs without --checkpoint-dir, so it cannot write or restore checkpoints")]
    NoCheckpointDir,
    /// A checkpoint could not be written, read or agreed on.
    #[error("checkpoint of model '{model}': {reason}")]
    Checkpoint {
        /// Model name.
        model: String,
        /// What went wrong.
        reason: String,
    },
    /// A checkpoint was asked for but not reached in time.
    #[error(
        "checkpoint of model '{model}' at version {version} not written within {waited_ms} ms (the run is at version {at}); it is still scheduled"
    )]
    CheckpointPending {
        /// Model name.
        model: String,
        /// Scheduled version.
        version: u64,
        /// The shard's lowest block version.
        at: u64,
        /// How long the request waited.
        waited_ms: u64,
    },
}

/// What is wrong with one chunk of a push or registration stream (the block is
/// named in each message, as `tensor 'w' block 3`).
#[derive(Debug, thiserror::Error)]
pub enum ChunkProblem {
    /// Initial values must be numbers.
    #[error("initial values for {at} must be f32, bf16 or f16, not sign1")]
    SignsAsValues {
        /// The block.
        at: String,
    },
    /// A no-gradient chunk where only values belong (initial values, round updates).
    #[error(
        "{at} has no values (ENCODING_NO_GRADIENT or ENCODING_OVERFLOW), which only a gradient push may send; {what} carry values"
    )]
    NoGradientNotHere {
        /// The block.
        at: String,
        /// What the stream carries.
        what: &'static str,
    },
    /// A no-gradient chunk that is not the whole block.
    #[error(
        "a no-gradient or overflow chunk covers the whole block: {at} got one for elements {offset}..{end} of {len}; send one chunk with offset 0 and length {len}"
    )]
    PartialNoGradient {
        /// The block.
        at: String,
        /// Its first element.
        offset: u64,
        /// One past its last element.
        end: u64,
        /// Elements of the block.
        len: u64,
    },
    /// The group does not accept this encoding.
    #[error("encoding {encoding} is not allowed for {at} (group '{group}' accepts: {allowed})")]
    EncodingNotAllowed {
        /// The block.
        at: String,
        /// The encoding used.
        encoding: &'static str,
        /// The tensor's group.
        group: String,
        /// What the group accepts.
        allowed: String,
    },
    /// A sign1 chunk that does not start on a sign word.
    #[error("sign1 chunk for {at} starts at element {offset}; sign1 chunks must start at a multiple of {word}")]
    MisalignedSigns {
        /// The block.
        at: String,
        /// Its first element.
        offset: u64,
        /// Elements per sign word.
        word: u64,
    },
    /// A chunk whose encoding or scale differs from its block's first chunk.
    #[error("every chunk of {at} must use the same encoding and scale as its first chunk")]
    MixedEncoding {
        /// The block.
        at: String,
    },
    /// A chunk without elements.
    #[error("empty chunk for {at}")]
    Empty {
        /// The block.
        at: String,
    },
    /// More chunks after the block was complete.
    #[error("duplicate chunk for {at}: all {len} elements were already received in this stream")]
    Duplicate {
        /// The block.
        at: String,
        /// Elements of the block.
        len: u64,
    },
    /// A chunk that does not start where the previous one ended.
    #[error(
        "out-of-order chunk for {at}: it starts at element {offset} but {received} elements were received so far; send each block's chunks once, in order"
    )]
    OutOfOrder {
        /// The block.
        at: String,
        /// Its first element.
        offset: u64,
        /// Elements received before it.
        received: u64,
    },
    /// A chunk past the end of its block.
    #[error("chunk for {at} covers elements {offset}..{end} but the block has {len} elements (wrong shape?)")]
    PastEnd {
        /// The block.
        at: String,
        /// Its first element.
        offset: u64,
        /// One past its last element.
        end: u64,
        /// Elements of the block.
        len: u64,
    },
    /// A block whose stream ended early.
    #[error("incomplete block: {at} got {received} of {len} elements before the stream ended")]
    Incomplete {
        /// The block.
        at: String,
        /// Elements received.
        received: u64,
        /// Elements of the block.
        len: u64,
    },
}

/// A value the API refuses is a malformed spec.
impl From<SpecError> for ServerError {
    fn from(error: SpecError) -> Self {
        ServerError::InvalidSpec(error.0)
    }
}
