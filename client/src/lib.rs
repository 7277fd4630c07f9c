//! Client library of the parameter server. It routes every block to the shard
//! that owns it, streams pushes and pulls in chunks over all shards at once,
//! and retries transient failures; pushes are idempotent on the server
//! (keyed by worker, step and block), so a retry never counts twice.
//!
//! Modules: [`spec`] (the model a client registers: the API's own types,
//! from `ps_proto::api`), [`layout`] and [`status`] (what the servers
//! report), [`compress`] (compression presets and the worker-side state they
//! keep), [`federated`] (round tasks, deltas, the local step rules and client
//! state), [`resume`] (worker state kept at checkpointed versions, for
//! rollbacks), the connections to the shards ([`Shards`]), and the client
//! ([`PsClient`]) and model ([`ModelHandle`]) handles built on them.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ps_client::ClientError> {
//! use ps_client::spec::{GroupConfig, Init, ModelSpec, OptimizerConfig, TensorSpec};
//! use ps_client::{ClientConfig, PsClient, Tensors};
//! let client = PsClient::connect(ClientConfig::new(vec!["127.0.0.1:50051".into()]))?;
//! let spec = ModelSpec::new(
//!     "mlp",
//!     vec![TensorSpec::new("fc.weight", &[10, 64], Init::Normal { mean: 0.0, std: 0.1, seed: 1 })],
//!     vec![GroupConfig::new("all", &["*"], OptimizerConfig::adamw(1e-3))],
//! );
//! let model = client.register(&spec, &Tensors::new()).await?;
//! model.join("worker-0").await?;
//! let weights = model.pull(0).await?;
//! // ... compute gradients with the same names and lengths as weights.tensors ...
//! model.push("worker-0", 0, &weights.tensors).await?;
//! // A trainer with fresh gradients every step can hand them over instead:
//! // f32 tensors then go to the socket without being copied into messages.
//! model.push_owned("worker-0", 1, weights.tensors).await?;
//! # Ok(()) }
//! ```

#[cfg(feature = "cli")]
pub mod access;
pub mod compress;
mod config;
mod connection;
mod error;
pub mod federated;
pub mod layout;
mod local;
mod model;
pub mod resize;
pub mod resume;
mod shards;
pub mod state_file;
pub mod status;
mod stub;

/// The model a client registers, in the API's own types (one definition,
/// shared with the shards: `ps_proto::api`).
pub use ps_proto::api as spec;
/// The machine-readable error kinds of [`ClientError::kind`].
pub use ps_proto::errors;

use std::collections::BTreeMap;

pub use config::{ClientConfig, bearer_token};
pub use connection::PsClient;
pub use error::{ClientError, ProtocolError};
pub use layout::{Layout, TensorInfo};
pub use local::LocalMode;
pub use model::{Joined, ModelHandle, PullInfo, PushOptions, PushSummary, StepOutcome, Weights};
pub use shards::Shards;
pub use spec::{Encoding, ModelSpec};
pub use status::ShardStatus;

/// Named f32 tensors, flat in row-major order.
pub type Tensors = BTreeMap<String, Vec<f32>>;
