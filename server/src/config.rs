//! Command-line and environment configuration of a shard.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use ps_proto::tls::{ClientTls, read_pem};

use crate::limits::{self, Limits};

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
    /// Index of this shard in --shards; "hostname" takes the number at the end of the
    /// host name (a StatefulSet pod's ordinal, as in paramserver-3).
    #[arg(long, env = "PS_SHARD_INDEX", default_value = "0", value_parser = ps_proto::cluster::parse_shard_index)]
    pub shard_index: u32,
    /// Addresses of all shards, comma-separated, in index order. Workers use the same list.
    /// An entry such as ps-{0..3}.ps:50051 names shards 0 to 3, and so does ps-{0..<4}.ps:50051.
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
    /// Worker token: every RPC needs `authorization: Bearer <token>` (prefer the
    /// environment or --auth-token-file: a command line is visible to every user).
    #[arg(long, env = "PS_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// Read the worker token from this file (a mounted secret).
    #[arg(long, env = "PS_AUTH_TOKEN_FILE", conflicts_with = "auth_token")]
    pub auth_token_file: Option<std::path::PathBuf>,
    /// Admin token: RegisterModel, Checkpoint, Shutdown and the calls between
    /// shards need it; it may make every other call too.
    #[arg(long, env = "PS_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Read the admin token from this file.
    #[arg(long, env = "PS_ADMIN_TOKEN_FILE", conflicts_with = "admin_token")]
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Token that GET /metrics needs (`authorization: Bearer <token>`); none: metrics are open.
    #[arg(long, env = "PS_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// Read the metrics token from this file.
    #[arg(long, env = "PS_METRICS_TOKEN_FILE", conflicts_with = "metrics_token")]
    pub metrics_token_file: Option<std::path::PathBuf>,
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
    /// Serve clients on this host through this directory: gRPC on DIR/grpc.sock and memory
    /// segments on DIR/segments.sock (created if missing; its permissions decide who may
    /// connect). Clients find it in GetStatus and fall back to TCP when they cannot reach it.
    #[arg(long, env = "PS_LOCAL_DIR")]
    pub local_dir: Option<PathBuf>,
    /// Limits on what clients can make the shard hold.
    #[command(flatten)]
    pub limits: LimitArgs,
    /// TLS.
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// TLS of the gRPC port (the metrics port stays plain HTTP; see the README).
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "TLS")]
pub struct TlsArgs {
    /// Serve gRPC over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "PS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(long, env = "PS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS).
    #[arg(long, env = "PS_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// CA that signed the other shards' certificates (default: --tls-client-ca); this
    /// shard presents --tls-cert to them.
    #[arg(long, env = "PS_TLS_CA", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
}

/// A shard's TLS material, read at start.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// Certificate chain (PEM).
    pub cert_pem: Vec<u8>,
    /// Its private key (PEM).
    pub key_pem: Vec<u8>,
    /// CA of client certificates, when they are required.
    pub client_ca_pem: Option<Vec<u8>>,
    /// How this shard reaches its peers.
    pub peers: ClientTls,
}

impl TlsArgs {
    /// Reads the files; none given: plaintext.
    pub fn resolve(&self) -> Result<Option<ServerTls>, ConfigError> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else { return Ok(None) };
        let cert_pem = read_pem("--tls-cert", cert)?;
        let key_pem = read_pem("--tls-key", key)?;
        let client_ca_pem = self.tls_client_ca.as_deref().map(|p| read_pem("--tls-client-ca", p)).transpose()?;
        let peer_ca = match &self.tls_ca {
            Some(path) => read_pem("--tls-ca", path)?,
            None => client_ca_pem.clone().ok_or_else(|| {
                ConfigError::Limit(
                    "TLS needs the CA that signed the other shards' certificates: give --tls-ca (or --tls-client-ca)"
                        .into(),
                )
            })?,
        };
        let peers = ClientTls { ca_pem: peer_ca, identity: Some((cert_pem.clone(), key_pem.clone())), domain: None };
        Ok(Some(ServerTls { cert_pem, key_pem, client_ca_pem, peers }))
    }
}

/// The flags of [`Limits`]; past one, a request gets RESOURCE_EXHAUSTED naming it.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Limits (past one, a request gets RESOURCE_EXHAUSTED naming the flag)")]
pub struct LimitArgs {
    /// Models this shard holds at most.
    #[arg(long, env = "PS_MAX_MODELS", default_value_t = 64)]
    pub max_models: usize,
    /// Elements one model may have (over all shards).
    #[arg(long, env = "PS_MAX_MODEL_ELEMENTS", default_value_t = 1 << 32)]
    pub max_model_elements: u64,
    /// Blocks one model may be split into (over all shards).
    #[arg(long, env = "PS_MAX_MODEL_BLOCKS", default_value_t = 1 << 20)]
    pub max_model_blocks: u64,
    /// Smallest max_block_elements a registration may ask for.
    #[arg(long, env = "PS_MIN_BLOCK_ELEMENTS", default_value_t = 1)]
    pub min_block_elements: u64,
    /// Memory the models of this shard may take, estimated from above at registration
    /// (e.g. 12GiB; default: 3/4 of the machine's or the container's memory).
    #[arg(long, env = "PS_MEMORY_LIMIT", value_parser = limits::parse_bytes)]
    pub memory_limit: Option<u64>,
    /// Largest encoded model spec a registration may send (at most 4 MiB).
    #[arg(long, env = "PS_MAX_SPEC_BYTES", default_value = "4MiB", value_parser = limits::parse_bytes)]
    pub max_spec_bytes: u64,
    /// Bytes one push stream may hold before it commits.
    #[arg(long, env = "PS_MAX_STREAM_BYTES", default_value = "1GiB", value_parser = limits::parse_bytes)]
    pub max_stream_bytes: u64,
    /// Bytes all in-flight pushes may hold together (default: 1/4 of --memory-limit, 64 MiB to 8 GiB).
    #[arg(long, env = "PS_MAX_STAGED_BYTES", value_parser = limits::parse_bytes)]
    pub max_staged_bytes: Option<u64>,
    /// Bytes the buffers of sending pulls may hold together; further pulls wait their turn
    /// (default: 1/4 of --memory-limit, 64 MiB to 8 GiB).
    #[arg(long, env = "PS_MAX_SENDING_BYTES", value_parser = limits::parse_bytes)]
    pub max_sending_bytes: Option<u64>,
    /// Streams (pushes, pulls, registrations, round tasks) open on this shard at once.
    #[arg(long, env = "PS_MAX_STREAMS", default_value_t = 4096)]
    pub max_streams: usize,
    /// Concurrent HTTP/2 streams per connection (further ones wait in the client).
    #[arg(long, env = "PS_MAX_STREAMS_PER_CONNECTION", default_value_t = 256)]
    pub max_streams_per_connection: u32,
    /// Longest wait of a pull or round-task long poll, whatever timeout_ms the client asks.
    #[arg(long, env = "PS_MAX_WAIT", default_value = "120s", value_parser = humantime::parse_duration)]
    pub max_wait: Duration,
    /// A push that sends nothing, or a pull whose client reads nothing, for this long is cut.
    #[arg(long, env = "PS_STREAM_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub stream_idle_timeout: Duration,
    /// A push or registration stream open longer than this is cut.
    #[arg(long, env = "PS_MAX_STREAM_DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub max_stream_duration: Duration,
    /// HTTP/2 keepalive ping interval that detects dead peers (0s: off).
    #[arg(long, env = "PS_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,
    /// A connection whose ping goes unanswered this long is closed.
    #[arg(long, env = "PS_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,
}

impl LimitArgs {
    /// The limits these flags set.
    pub fn resolve(&self) -> Result<Limits, ConfigError> {
        let memory_bytes = self.memory_limit.unwrap_or_else(limits::default_memory_bytes);
        if self.max_spec_bytes > (4 << 20) {
            return Err(ConfigError::Limit("--max-spec-bytes is at most 4MiB (the largest gRPC message)".into()));
        }
        if self.max_streams == 0 || self.max_streams_per_connection == 0 {
            return Err(ConfigError::Limit("--max-streams and --max-streams-per-connection must be at least 1".into()));
        }
        Ok(Limits {
            max_models: self.max_models,
            max_model_elements: self.max_model_elements,
            max_model_blocks: self.max_model_blocks,
            min_block_elements: self.min_block_elements,
            memory_bytes,
            max_spec_bytes: self.max_spec_bytes as usize,
            max_stream_bytes: self.max_stream_bytes,
            max_staged_bytes: self.max_staged_bytes.unwrap_or(limits::default_buffer_bytes(memory_bytes)),
            max_sending_bytes: self.max_sending_bytes.unwrap_or(limits::default_buffer_bytes(memory_bytes)),
            max_streams: self.max_streams,
            max_streams_per_connection: self.max_streams_per_connection,
            max_wait: self.max_wait,
            stream_idle_timeout: self.stream_idle_timeout,
            max_stream_duration: self.max_stream_duration,
            keepalive_interval: self.keepalive_interval,
            keepalive_timeout: self.keepalive_timeout,
        })
    }
}

/// A configuration that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A shard range that cannot be expanded.
    #[error("--shards: {0}")]
    ShardRange(String),
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
    /// A token file cannot be read.
    #[error("{flag} {path}: {reason}")]
    TokenFile {
        /// The flag.
        flag: &'static str,
        /// The file.
        path: String,
        /// Why it cannot be used.
        reason: std::io::Error,
    },
    /// A limit flag that cannot work.
    #[error("{0}")]
    Limit(String),
    /// A TLS file cannot be read.
    #[error(transparent)]
    Tls(#[from] ps_proto::tls::TlsSetupError),
}

/// The tokens a shard accepts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tokens {
    /// Token of workers (`--auth-token-file`).
    pub worker: Option<String>,
    /// Token of operators and peer shards (`--admin-token-file`).
    pub admin: Option<String>,
}

impl Tokens {
    /// The token this shard sends to its peers: the admin token when there is one.
    pub fn for_peers(&self) -> Option<&str> {
        self.admin.as_deref().or(self.worker.as_deref())
    }
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
    /// Bearer tokens required, if any.
    pub tokens: Tokens,
    /// Token the metrics endpoint requires, if any.
    pub metrics_token: Option<String>,
    /// TLS of the gRPC port; none: plaintext.
    pub tls: Option<ServerTls>,
    /// Checkpoint settings.
    pub checkpoints: CheckpointOptions,
    /// What clients may make the shard hold.
    pub limits: Limits,
    /// The local channel's directory; none: TCP only.
    pub local_dir: Option<PathBuf>,
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

/// A token given directly (environment) or in a file; empty means none.
fn token(
    given: Option<String>,
    file: Option<&std::path::Path>,
    flag: &'static str,
) -> Result<Option<String>, ConfigError> {
    let token = match file {
        Some(path) => Some(ps_proto::cluster::read_token_file(path).map_err(|reason| ConfigError::TokenFile {
            flag,
            path: path.display().to_string(),
            reason,
        })?),
        None => given,
    };
    Ok(token.filter(|t| !t.is_empty()))
}

/// A shard index, or "hostname": the ordinal at the end of this host's name.
impl ServerArgs {
    /// Checks the arguments and returns the serve options, the gRPC address and the metrics address.
    pub fn resolve(mut self) -> Result<(ServerOptions, SocketAddr, Option<SocketAddr>), ConfigError> {
        self.shards = ps_proto::cluster::expand_shards(&self.shards).map_err(ConfigError::ShardRange)?;
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
        let tokens = Tokens {
            worker: token(self.auth_token, self.auth_token_file.as_deref(), "--auth-token-file")?,
            admin: token(self.admin_token, self.admin_token_file.as_deref(), "--admin-token-file")?,
        };
        let metrics_token = token(self.metrics_token, self.metrics_token_file.as_deref(), "--metrics-token-file")?;
        let limits = self.limits.resolve()?;
        let tls = self.tls.resolve()?;
        let options = ServerOptions {
            limits,
            shard_index: self.shard_index,
            shards: self.shards,
            lease: self.lease,
            tokens,
            metrics_token,
            tls,
            checkpoints: CheckpointOptions {
                dir: self.checkpoint_dir,
                every: self.checkpoint_every,
                interval: self.checkpoint_interval,
                keep: self.checkpoint_keep,
                shutdown_grace: self.shutdown_grace,
                allow_fresh_rejoin: self.allow_fresh_rejoin,
            },
            local_dir: self.local_dir,
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
        let ranged =
            ServerArgs::try_parse_from(["server", "--shard-index", "2", "--shards", "ps-{0..3}.ps:7000"]).unwrap();
        let (options, listen, _) = ranged.resolve().unwrap();
        assert_eq!(options.shards.len(), 4);
        assert_eq!((options.shards[2].as_str(), listen.port()), ("ps-2.ps:7000", 7000));
        let bad = ServerArgs::try_parse_from(["server", "--shard-index", "2", "--shards", "a:1,b:2"]).unwrap();
        assert!(bad.resolve().is_err());
    }

    #[test]
    fn the_token_can_come_from_a_file_but_not_from_both() {
        let file = std::env::temp_dir().join(format!("ps-server-token-{}", std::process::id()));
        std::fs::write(&file, "s3cret\n").unwrap();
        let path = file.to_str().unwrap();
        let args = ServerArgs::try_parse_from(["server", "--metrics-addr", "off", "--auth-token-file", path]).unwrap();
        assert_eq!(args.resolve().unwrap().0.tokens.worker.as_deref(), Some("s3cret"));
        let both = ["server", "--auth-token", "x", "--auth-token-file", path];
        assert!(ServerArgs::try_parse_from(both).is_err(), "one source of the token at a time");
        std::fs::remove_file(&file).unwrap();
        let gone = ServerArgs::try_parse_from(["server", "--metrics-addr", "off", "--auth-token-file", path]).unwrap();
        assert!(gone.resolve().unwrap_err().to_string().contains("--auth-token-file"));
    }
}
