//! Errors of the client library.

use tonic::Status;

/// What can go wrong talking to the parameter server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No shard addresses were given.
    #[error("configuration: at least one shard address is needed")]
    NoShards,
    /// A shard address that does not parse as a URI.
    #[error("configuration: bad shard address '{address}': {reason}")]
    BadAddress {
        /// The address given.
        address: String,
        /// Why it does not parse.
        reason: String,
    },
    /// A token that cannot go in a header.
    #[error("configuration: the auth token must be printable ASCII")]
    BadToken,
    /// The servers and the client disagree on the shard list.
    #[error("configuration: the servers are configured with {} shards ({servers:?}) but this client was given {client}", servers.len())]
    ShardCountMismatch {
        /// The shard list the servers report.
        servers: Vec<String>,
        /// How many shards the client was given.
        client: usize,
    },
    /// A shard index past the end of the shard list.
    #[error("configuration: there is no shard {shard}: the shard list has {shards}")]
    NoSuchShard {
        /// The index asked for.
        shard: usize,
        /// How many shards the list has.
        shards: usize,
    },
    /// A shard answered with an error (after retries, if it was transient).
    #[error("shard {shard}: {} ({:?})", status.message(), status.code())]
    Rpc {
        /// The shard index.
        shard: usize,
        /// The gRPC status.
        status: Status,
    },
    /// An online reshard (`resize`) failed in one of its phases.
    #[error("{}", resize_failure(phase, *aborted, source))]
    Resize {
        /// The phase: PREPARE, HOLD, ADOPT or SWITCH.
        phase: &'static str,
        /// Whether the shards were told to abort (they serve the old list again).
        aborted: bool,
        /// What failed.
        source: Box<ClientError>,
    },
    /// A tensor the model has is missing from the argument.
    #[error(
        "tensor '{0}' is missing: pass every tensor of the model (one without a gradient this step goes in push_partial's no_gradient)"
    )]
    MissingTensor(String),
    /// A tensor given both a gradient and as having none.
    #[error("tensor '{0}' has a gradient and is also named as having none; pass it in one of the two")]
    GradientAndNoGradient(String),
    /// A tensor the model does not have.
    #[error("the model has no tensor '{0}'")]
    UnknownTensor(String),
    /// A tensor of the wrong size.
    #[error("tensor '{tensor}' has {actual} elements; the model's shape needs {expected}")]
    WrongLength {
        /// Tensor name.
        tensor: String,
        /// Elements expected.
        expected: u64,
        /// Elements given.
        actual: u64,
    },
    /// The servers returned no layout.
    #[error("the servers returned no usable layout")]
    NoLayout,
    /// The client's state directory could not be read or written.
    #[error("client state: {0}")]
    State(String),
    /// A server reply that does not fit the model's layout.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
}

fn resize_failure(phase: &str, aborted: bool, source: &ClientError) -> String {
    let outcome = if aborted {
        "the change was aborted: every shard serves the old shard list and takes pushes again"
    } else {
        "the switch did not reach every shard, so some serve the new list and others the old one and training \
         cannot go on: stop the job and restart it from its checkpoints (docs/resharding.md, \"When a resize fails\")"
    };
    format!("online reshard failed in {phase} ({outcome}): {source}")
}

impl ClientError {
    /// The gRPC status, if a shard returned one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            ClientError::Rpc { status, .. } => Some(status),
            ClientError::Resize { source, .. } => source.status(),
            _ => None,
        }
    }

    /// The machine-readable kind a shard attached (`ps_proto::errors`), if any.
    pub fn kind(&self) -> Option<&str> {
        self.status()?.metadata().get(ps_proto::errors::ERROR_KIND_HEADER)?.to_str().ok()
    }

    /// For a layout-changed error: the shard list the cluster serves now.
    pub fn new_shard_list(&self) -> Option<Vec<String>> {
        if self.kind() != Some(ps_proto::errors::LAYOUT_CHANGED) {
            return None;
        }
        let list = self.status()?.metadata().get(ps_proto::errors::SHARDS_HEADER)?.to_str().ok()?;
        Some(list.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect())
    }

    /// For an epoch-changed error: the model's new epoch and the version it continues from.
    pub fn rollback(&self) -> Option<(u64, u64)> {
        if self.kind() != Some(ps_proto::errors::EPOCH_CHANGED) {
            return None;
        }
        let metadata = self.status()?.metadata();
        let number = |key: &str| metadata.get(key)?.to_str().ok()?.parse::<u64>().ok();
        Some((number(ps_proto::errors::EPOCH_HEADER)?, number(ps_proto::errors::RESUME_VERSION_HEADER)?))
    }
}

/// A reply of the servers that does not fit the protocol or the layout.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// A payload that does not decode.
    #[error(transparent)]
    Codec(#[from] ps_proto::codec::CodecError),
    /// A setting the servers reported that the API does not accept.
    #[error("the servers reported {0}")]
    Spec(#[from] ps_proto::api::SpecError),
    /// A layout block that names a tensor the layout does not list.
    #[error("layout names unknown tensor '{0}'")]
    LayoutTensor(String),
    /// Layout blocks of a tensor that are not listed in order.
    #[error("layout blocks of '{0}' out of order")]
    LayoutOrder(String),
    /// A layout block that does not follow the one before it within its
    /// tensor, or that names a shard the layout does not list.
    #[error(
        "layout block {block} of '{tensor}' does not continue its tensor's blocks within its elements on a listed shard"
    )]
    LayoutBlock {
        /// The tensor.
        tensor: String,
        /// The block.
        block: u32,
    },
    /// A weight message without its chunk.
    #[error("weight message without a chunk")]
    MissingChunk,
    /// A reply lacks a field the protocol requires.
    #[error("reply without its '{0}' field")]
    MissingField(&'static str),
    /// A chunk of a block the tensor does not have.
    #[error("tensor '{tensor}' has no block {block}")]
    UnknownBlock {
        /// Tensor name.
        tensor: String,
        /// Block index.
        block: u32,
    },
    /// A chunk past the end of its block.
    #[error("chunk past the end of '{tensor}' block {block}")]
    PastEnd {
        /// Tensor name.
        tensor: String,
        /// Block index.
        block: u32,
    },
    /// A pull that ended before a block was complete.
    #[error("pull returned incomplete block {block} of '{tensor}'")]
    IncompleteBlock {
        /// Tensor name.
        tensor: String,
        /// Block index.
        block: u32,
    },
}
