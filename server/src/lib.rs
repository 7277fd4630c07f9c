//! A parameter-server shard: holds blocks of model weights and their optimizer
//! state, aggregates workers' gradient pushes in sync or async mode, and
//! serves weights to pulls over gRPC (`paramserver.v1`).
//!
//! Layers, each knowing nothing of the ones above it:
//!
//! - [`optim`]: optimizer math over plain slices (and [`random`], the seeded
//!   randomness it shares with weight init);
//! - [`federated`]: the rules of federated rounds (selection, merges);
//! - [`spec`]: what a model is, validated;
//! - [`store`]: blocks, aggregation, membership, the models of this shard;
//! - [`rpc`]: the gRPC service, wire conversions, chunk reassembly, auth;
//! - [`local`]: memory segments for clients on the shard's host.
//!
//! [`config`], [`error`] and [`metrics`] are shared by all of them.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod federated;
pub mod limits;
pub mod local;
pub mod metrics;
pub mod optim;
pub mod random;
pub mod rpc;
pub mod spec;
pub mod store;

pub use config::ServerOptions;
pub use error::ServerError;
pub use rpc::{ServeError, serve};
pub use store::{Registry, ShardIdentity};
