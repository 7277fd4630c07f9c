//! The server's error table: one enum for everything a request can do wrong,
//! and the single place where each variant gets its gRPC status code.

use ps_proto::codec::CodecError;
use tonic::{Code, Status};

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
    /// A request field is malformed.
    #[error("{0}")]
    InvalidArgument(String),
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
    /// The pushed step is ahead of the block's version.
    #[error(
        "step {step} of tensor '{tensor}' block {block} is ahead of the block (version {version}); pull version {step} first"
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
    /// A failure inside the server.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<ServerError> for Status {
    fn from(error: ServerError) -> Self {
        let code = match &error {
            ServerError::UnknownModel(_)
            | ServerError::UnknownTensor { .. }
            | ServerError::UnknownBlock { .. }
            | ServerError::UnknownWorker { .. } => Code::NotFound,
            ServerError::WrongShard { .. } | ServerError::StaleStep { .. } | ServerError::FutureStep { .. } => {
                Code::FailedPrecondition
            }
            ServerError::InvalidSpec(_) | ServerError::InvalidArgument(_) | ServerError::BadPayload { .. } => {
                Code::InvalidArgument
            }
            ServerError::SpecConflict(_) => Code::AlreadyExists,
            ServerError::ChunkTooLarge { .. } => Code::ResourceExhausted,
            ServerError::PullTimeout { .. } => Code::DeadlineExceeded,
            ServerError::Internal(_) => Code::Internal,
        };
        Status::new(code, error.to_string())
    }
}
