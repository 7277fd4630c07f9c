//! The training worker: built-in tasks in candle ([`task`], over [`data`]),
//! the pull-compute-push loop ([`train`]), and the local launcher that starts
//! shards and workers as processes ([`demo`], and [`experiment`] on top of it),
//! and federated clients ([`federated`]).

pub mod data;
pub mod demo;
pub mod experiment;
pub mod federated;
pub mod task;
pub mod train;
