//! A parameter-server shard: holds blocks of model weights and their optimizer
//! state, aggregates workers' gradient pushes in sync or async mode, and
//! serves weights to pulls over gRPC (`paramserver.v1`).
//!
//! Layers, each knowing nothing of the ones above it:
//!
//! - [`rpc`]: the gRPC service (dispatch, one file per RPC family, wire
//!   conversions, chunk reassembly, auth) and the local channel beside it;
//! - [`durability`]: checkpoints on disk and the protocol that keeps every
//!   shard on one history (scheduling, recovery, rollback), talking to the
//!   other shards through [`peers`];
//! - [`store`]: blocks, aggregation, membership, rounds, the models of this shard;
//! - [`spec`]: what a model is, validated as a whole;
//! - [`optim`] and [`federated`]: the math over plain slices (optimizer update
//!   rules; federated cohorts and merges), with [`random`], the seeded
//!   randomness they share with weight init.
//!
//! [`config`], [`limits`], [`error`] and [`metrics`] are shared by all of them.
//! The values a registration carries (modes, optimizer configurations, round
//! configurations) are `ps_proto::api`'s, shared with the clients.

pub mod config;
pub mod durability;
pub mod error;
pub mod federated;
pub mod limits;
pub mod metrics;
pub mod optim;
pub mod peers;
pub mod random;
pub mod rpc;
pub mod spec;
pub mod store;

pub use config::ServerOptions;
pub use error::ServerError;
pub use rpc::{ServeError, serve};
pub use store::{Registry, ShardIdentity};
