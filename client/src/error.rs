//! Errors of the client library.

use tonic::Status;

/// What can go wrong talking to the parameter server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The client configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// A shard answered with an error (after retries, if it was transient).
    #[error("shard {shard}: {} ({:?})", status.message(), status.code())]
    Rpc {
        /// The shard index.
        shard: usize,
        /// The gRPC status.
        status: Status,
    },
    /// A tensor the model has is missing from the argument.
    #[error("tensor '{0}' is missing: pass every tensor of the model")]
    MissingTensor(String),
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
    /// A server reply did not fit the layout.
    #[error("protocol: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The gRPC status, if a shard returned one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            ClientError::Rpc { status, .. } => Some(status),
            _ => None,
        }
    }
}
