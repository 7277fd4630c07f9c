//! How a client reaches the shards.

use std::path::Path;
use std::time::Duration;

/// How to reach the shards.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Shard addresses (`host:port`), in shard-index order.
    pub shards: Vec<String>,
    /// Bearer token sent with every RPC (the worker token).
    pub auth_token: Option<String>,
    /// Token sent instead with the admin calls (register, checkpoint, shutdown);
    /// none: they send `auth_token`.
    pub admin_token: Option<String>,
    /// TLS to the shards; none: plaintext.
    pub tls: Option<ps_proto::tls::ClientTls>,
    /// Attempts per RPC on transient failures (unavailable, reset connection).
    pub attempts: u32,
    /// Delay before the first retry; doubles each time.
    pub retry_backoff: Duration,
    /// How shards on this host are reached (see [`crate::LocalMode`]).
    pub local: crate::LocalMode,
}

/// The bearer token to use: the one read from `file` if given (a mounted
/// secret), else `token`; an empty token means none.
pub fn bearer_token(token: Option<String>, file: Option<&Path>) -> std::io::Result<Option<String>> {
    let token = match file {
        Some(path) => Some(ps_proto::cluster::read_token_file(path)?),
        None => token,
    };
    Ok(token.filter(|t| !t.is_empty()))
}

impl ClientConfig {
    /// Defaults: no token, 20 attempts starting at 100 ms backoff (about 30 s
    /// in all, so a shard that restarts from its checkpoint is waited for).
    pub fn new(shards: Vec<String>) -> Self {
        Self {
            shards,
            auth_token: None,
            admin_token: None,
            tls: None,
            attempts: 20,
            retry_backoff: Duration::from_millis(100),
            local: crate::LocalMode::default(),
        }
    }
}
