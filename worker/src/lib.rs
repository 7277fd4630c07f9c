//! The training worker: candle models and data ([`task`], [`data`]), the
//! pull-compute-push loop ([`train`]), and the local launcher that starts
//! shards and workers as processes ([`demo`]).

pub mod data;
pub mod demo;
pub mod experiment;
pub mod lm;
pub mod task;
pub mod train;
