//! How a client reaches the shards.

use std::time::Duration;

/// How to reach the shards.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Shard addresses (`host:port`), in shard-index order.
    pub shards: Vec<String>,
    /// Bearer token sent with every RPC.
    pub auth_token: Option<String>,
    /// Attempts per RPC on transient failures (unavailable, reset connection).
    pub attempts: u32,
    /// Delay before the first retry; doubles each time.
    pub retry_backoff: Duration,
}

impl ClientConfig {
    /// Defaults: no token, 5 attempts starting at 100 ms backoff.
    pub fn new(shards: Vec<String>) -> Self {
        Self { shards, auth_token: None, attempts: 5, retry_backoff: Duration::from_millis(100) }
    }
}
