//! TLS on the client side of a connection to a shard, shared by the client
//! library and by shards talking to their peers: which CA to trust, which
//! certificate to present for mutual TLS, and the endpoint built from them
//! with the transport settings of [`crate::transport`].

use std::path::Path;
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::transport::{CLIENT_MAX_FRAME_BYTES, CONNECTION_WINDOW_BYTES, STREAM_WINDOW_BYTES};

/// PEM material of a TLS client.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// CA certificate(s) that signed the shards' certificates.
    pub ca_pem: Vec<u8>,
    /// Certificate and key presented to shards that require client certificates.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Name to check the shards' certificates against, instead of the host of each address.
    pub domain: Option<String>,
}

/// Why TLS settings or an address cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A PEM file cannot be read.
    #[error("{flag} {path}: {source}")]
    File {
        /// The flag that named it.
        flag: &'static str,
        /// The file.
        path: String,
        /// Why it cannot be read.
        source: std::io::Error,
    },
    /// A certificate without its key, or the other way round.
    #[error("a client certificate needs its key and the key its certificate (--tls-client-cert with --tls-client-key)")]
    HalfIdentity,
    /// The address or the TLS configuration is not usable.
    #[error("address '{address}': {reason}")]
    Endpoint {
        /// The address.
        address: String,
        /// Why.
        reason: String,
    },
}

/// Reads a PEM file named by `flag`.
pub fn read_pem(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|source| TlsSetupError::File { flag, path: path.display().to_string(), source })
}

impl ClientTls {
    /// TLS trusting the CA in `ca`, presenting `cert`/`key` if both are given.
    pub fn from_files(ca: &Path, cert: Option<&Path>, key: Option<&Path>) -> Result<Self, TlsSetupError> {
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((read_pem("--tls-client-cert", cert)?, read_pem("--tls-client-key", key)?)),
            (None, None) => None,
            _ => return Err(TlsSetupError::HalfIdentity),
        };
        Ok(Self { ca_pem: read_pem("--tls-ca", ca)?, identity, domain: None })
    }
}

/// An endpoint for a shard at `address` (`host:port`, or a URI), with the
/// shared HTTP/2 windows and frame size, TLS when `tls` is given.
pub fn endpoint(address: &str, tls: Option<&ClientTls>) -> Result<Endpoint, TlsSetupError> {
    let bad = |reason: String| TlsSetupError::Endpoint { address: address.to_string(), reason };
    let uri = match (address.contains("://"), tls.is_some()) {
        (true, _) => address.to_string(),
        (false, true) => format!("https://{address}"),
        (false, false) => format!("http://{address}"),
    };
    let mut endpoint = Endpoint::from_shared(uri)
        .map_err(|e| bad(e.to_string()))?
        .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
        .max_frame_size(Some(CLIENT_MAX_FRAME_BYTES))
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
        if let Some((cert, key)) = &tls.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &tls.domain {
            config = config.domain_name(domain.clone());
        }
        endpoint = endpoint.tls_config(config).map_err(|e| bad(format!("TLS settings: {e}")))?;
    }
    Ok(endpoint)
}
