//! The wire side of the parameter server, shared by servers and clients: the
//! generated gRPC types, the chunk codecs and chunking, the block placement
//! function, the cluster-identity metadata and the transport settings. Both sides must agree on all of these, so they live in
//! exactly one place.

pub mod api;
pub mod chunk;
pub mod cluster;
pub mod codec;
pub mod errors;
pub mod frame;
pub mod layout;
pub mod local;
pub mod message_reader;
pub mod tls;
pub mod transport;
pub mod units;
pub mod wire_codec;

/// Generated protobuf messages and gRPC stubs of `paramserver.v1`.
#[allow(missing_docs)]
pub mod pb {
    tonic::include_proto!("paramserver.v1");
}

pub use pb::parameter_server_client::ParameterServerClient;
pub use pb::parameter_server_server::{ParameterServer, ParameterServerServer};
pub use tonic;

/// The service name a shard reports in `grpc.health.v1` (beside "", the whole shard).
pub const HEALTH_SERVICE_NAME: &str = "paramserver.v1.ParameterServer";

/// The HTTP/2 path of `PushGradients`, which the Rust client frames and the shard reads by hand.
pub const PUSH_GRADIENTS_PATH: &str = "/paramserver.v1.ParameterServer/PushGradients";

/// The HTTP/2 path of `PullWeights`, whose responses the shard frames by hand.
pub const PULL_WEIGHTS_PATH: &str = "/paramserver.v1.ParameterServer/PullWeights";
