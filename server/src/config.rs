//! Command-line and environment configuration of a shard.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Default lease of a worker without heartbeats.
pub const DEFAULT_LEASE: &str = "10s";
/// Default shard list: one local shard.
pub const DEFAULT_SHARDS: &str = "127.0.0.1:50051";
/// Default metrics address.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9100";

/// Options of one server shard; every flag has an environment variable.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "server",
    version,
    about = "Parameter-server shard: stores and updates a share of every model's blocks"
)]
pub struct ServerArgs {
    /// Index of this shard in --shards.
    #[arg(long, env = "PS_SHARD_INDEX", default_value_t = 0)]
    pub shard_index: u32,
    /// Addresses of all shards, comma-separated, in index order. Workers use the same list.
    #[arg(long, env = "PS_SHARDS", value_delimiter = ',', default_value = DEFAULT_SHARDS)]
    pub shards: Vec<String>,
    /// Address to listen on for gRPC (default: 0.0.0.0 and the port of this shard's entry in --shards).
    #[arg(long, env = "PS_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address of the Prometheus /metrics endpoint; "off" disables it.
    #[arg(long, env = "PS_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: String,
    /// A worker without a heartbeat for this long is dropped from the barrier (e.g. 10s, 500ms).
    #[arg(long, env = "PS_LEASE", default_value = DEFAULT_LEASE, value_parser = humantime::parse_duration)]
    pub lease: Duration,
    /// Require `authorization: Bearer <token>` on every RPC.
    #[arg(long, env = "PS_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// Read the token from this file instead (a mounted secret; keeps it off the command line).
    #[arg(long, env = "PS_AUTH_TOKEN_FILE", conflicts_with = "auth_token")]
    pub auth_token_file: Option<std::path::PathBuf>,
    /// Write checkpoints here, and restore the newest intact one at start (each shard its own directory).
    #[arg(long, env = "PS_CHECKPOINT_DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every model at versions that are multiples of this (0: only on demand, on a timer and on SIGTERM).
    #[arg(long, env = "PS_CHECKPOINT_EVERY", default_value_t = 100)]
    pub checkpoint_every: u64,
    /// Shard 0 also checkpoints every model that advanced, this often (e.g. 10m; 0s: off).
    #[arg(long, env = "PS_CHECKPOINT_INTERVAL", default_value = "0s", value_parser = humantime::parse_duration)]
    pub checkpoint_interval: Duration,
    /// Checkpoints kept per model; older ones are deleted.
    #[arg(long, env = "PS_CHECKPOINT_KEEP", default_value_t = 3)]
    pub checkpoint_keep: usize,
    /// On SIGTERM, wait this long for a last checkpoint that every shard writes at the same version.
    #[arg(long, env = "PS_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Accept registering a model that the peers hold although this shard has no copy of it
    /// (discards the run: only after restarting every shard fresh).
    #[arg(long, env = "PS_ALLOW_FRESH_REJOIN")]
    pub allow_fresh_rejoin: bool,
}

/// A configuration that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No shard addresses.
    #[error("--shards must name at least one shard")]
    NoShards,
    /// The shard index points past the list.
    #[error("--shard-index {index} is out of range for {shards} shards")]
    IndexOutOfRange {
        /// The index given.
        index: u32,
        /// Shards in the list.
        shards: usize,
    },
    /// This shard's address has no port to listen on.
    #[error("shard address '{0}' has no port; give --listen")]
    NoPort(String),
    /// The metrics address does not parse.
    #[error("--metrics-addr '{address}': {reason}")]
    MetricsAddress {
        /// What was given.
        address: String,
        /// Why it does not parse.
        reason: std::net::AddrParseError,
    },
    /// A lease too short to heartbeat within.
    #[error("--lease must be at least 50ms")]
    LeaseTooShort,
    /// The token file cannot be read.
    #[error("--auth-token-file {path}: {reason}")]
    TokenFile {
        /// The file.
        path: String,
        /// Why it cannot be used.
        reason: std::io::Error,
    },
}

/// What [`crate::serve`] needs, independent of how it was configured.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// This shard's index.
    pub shard_index: u32,
    /// All shard addresses.
    pub shards: Vec<String>,
    /// Worker lease.
    pub lease: Duration,
    /// Required bearer token, if any.
    pub auth_token: Option<String>,
    /// Checkpoint settings.
    pub checkpoints: CheckpointOptions,
}

/// Where and when checkpoints are written.
#[derive(Debug, Clone, Default)]
pub struct CheckpointOptions {
    /// The directory; none: no checkpoints.
    pub dir: Option<PathBuf>,
    /// Versions that are multiples of this are checkpointed (0: none).
    pub every: u64,
    /// Shard 0's timer (zero: off).
    pub interval: Duration,
    /// Checkpoints kept per model.
    pub keep: usize,
    /// Time a SIGTERM waits for the last checkpoint.
    pub shutdown_grace: Duration,
    /// Register models the peers hold even without a copy here.
    pub allow_fresh_rejoin: bool,
}

impl ServerArgs {
    /// Checks the arguments and returns the serve options, the gRPC address and the metrics address.
    pub fn resolve(self) -> Result<(ServerOptions, SocketAddr, Option<SocketAddr>), ConfigError> {
        if self.shards.is_empty() {
            return Err(ConfigError::NoShards);
        }
        let own = self
            .shards
            .get(self.shard_index as usize)
            .ok_or(ConfigError::IndexOutOfRange { index: self.shard_index, shards: self.shards.len() })?;
        let listen = match self.listen {
            Some(addr) => addr,
            None => {
                let port = own
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse::<u16>().ok())
                    .ok_or_else(|| ConfigError::NoPort(own.clone()))?;
                SocketAddr::from(([0, 0, 0, 0], port))
            }
        };
        let metrics = match self.metrics_addr.as_str() {
            "off" | "" => None,
            addr => {
                Some(addr.parse().map_err(|reason| ConfigError::MetricsAddress { address: addr.to_string(), reason })?)
            }
        };
        if self.lease < Duration::from_millis(50) {
            return Err(ConfigError::LeaseTooShort);
        }
        let auth_token = match &self.auth_token_file {
            Some(path) => Some(
                ps_proto::cluster::read_token_file(path)
                    .map_err(|reason| ConfigError::TokenFile { path: path.display().to_string(), reason })?,
            ),
            None => self.auth_token,
        };
        let options = ServerOptions {
            shard_index: self.shard_index,
            shards: self.shards,
            lease: self.lease,
            auth_token: auth_token.filter(|t| !t.is_empty()),
            checkpoints: CheckpointOptions {
                dir: self.checkpoint_dir,
                every: self.checkpoint_every,
                interval: self.checkpoint_interval,
                keep: self.checkpoint_keep,
                shutdown_grace: self.shutdown_grace,
                allow_fresh_rejoin: self.allow_fresh_rejoin,
            },
        };
        Ok((options, listen, metrics))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_port_comes_from_the_shard_list() {
        let args = ServerArgs::try_parse_from([
            "server",
            "--shard-index",
            "1",
            "--shards",
            "a:5000,b:5001",
            "--metrics-addr",
            "off",
        ])
        .unwrap();
        let (options, listen, metrics) = args.resolve().unwrap();
        assert_eq!(listen.port(), 5001);
        assert!(metrics.is_none());
        assert_eq!(options.shards.len(), 2);
        let bad = ServerArgs::try_parse_from(["server", "--shard-index", "2", "--shards", "a:1,b:2"]).unwrap();
        assert!(bad.resolve().is_err());
    }

    #[test]
    fn the_token_can_come_from_a_file_but_not_from_both() {
        let file = std::env::temp_dir().join(format!("ps-server-token-{}", std::process::id()));
        std::fs::write(&file, "s3cret\n").unwrap();
        let path = file.to_str().unwrap();
        let args = ServerArgs::try_parse_from(["server", "--metrics-addr", "off", "--auth-token-file", path]).unwrap();
        assert_eq!(args.resolve().unwrap().0.auth_token.as_deref(), Some("s3cret"));
        let both = ["server", "--auth-token", "x", "--auth-token-file", path];
        assert!(ServerArgs::try_parse_from(both).is_err(), "one source of the token at a time");
        std::fs::remove_file(&file).unwrap();
        let gone = ServerArgs::try_parse_from(["server", "--metrics-addr", "off", "--auth-token-file", path]).unwrap();
        assert!(gone.resolve().unwrap_err().to_string().contains("--auth-token-file"));
    }
}
