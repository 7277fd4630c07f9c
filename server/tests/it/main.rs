//! Cross-process tests of the server: real shards on loopback gRPC, driven by
//! the client library and by raw gRPC messages.

mod abuse;
mod checkpoints;
mod cluster;
mod compression;
mod fed_replay;
mod federated;
mod health;
mod local_channel;
mod membership;
mod optim_replay;
mod security;
mod sync_equivalence;
mod validation;
mod vectors;
