//! The command-line flags every client binary shares for reaching secured
//! shards: tokens (from a file or the environment, so they stay off the
//! command line) and TLS. Behind the `cli` feature.

use std::path::PathBuf;

use ps_proto::tls::ClientTls;

use crate::config::{ClientConfig, bearer_token};

/// Tokens and TLS of a client, as flags.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct AccessArgs {
    /// Worker token for the shards (prefer PS_AUTH_TOKEN or --auth-token-file: a command line is visible to every user).
    #[arg(long, env = "PS_AUTH_TOKEN", hide_env_values = true, global = true)]
    pub auth_token: Option<String>,
    /// Read the worker token from this file (a mounted secret).
    #[arg(long, env = "PS_AUTH_TOKEN_FILE", global = true)]
    pub auth_token_file: Option<PathBuf>,
    /// Admin token (register, checkpoint, shutdown), from the environment only.
    #[arg(skip = std::env::var("PS_ADMIN_TOKEN").ok())]
    pub admin_token: Option<String>,
    /// Read the admin token from this file.
    #[arg(long, env = "PS_ADMIN_TOKEN_FILE", global = true)]
    pub admin_token_file: Option<PathBuf>,
    /// Connect with TLS, trusting the CA in this PEM file.
    #[arg(long, env = "PS_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for shards that require one (mutual TLS).
    #[arg(long, env = "PS_TLS_CLIENT_CERT", requires = "tls_client_key", global = true)]
    pub tls_client_cert: Option<PathBuf>,
    /// Key of --tls-client-cert (PEM).
    #[arg(long, env = "PS_TLS_CLIENT_KEY", requires = "tls_client_cert", global = true)]
    pub tls_client_key: Option<PathBuf>,
    /// Check the shards' certificates against this name instead of each address's host.
    #[arg(long, env = "PS_TLS_DOMAIN", global = true)]
    pub tls_domain: Option<String>,
    /// Shards on this host (server --local-dir): "segments" moves gradients and weights
    /// through shared memory, "socket" uses gRPC over their Unix socket, "off" only the network.
    #[arg(long, env = "PS_LOCAL", default_value_t = crate::LocalMode::Segments, global = true)]
    pub local: crate::LocalMode,
}

/// Why the access flags cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// A token file cannot be read.
    #[error("{flag}: {source}")]
    TokenFile {
        /// The flag.
        flag: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A TLS file cannot be used.
    #[error(transparent)]
    Tls(#[from] ps_proto::tls::TlsSetupError),
    /// TLS flags without the CA.
    #[error("--tls-client-cert and --tls-domain need --tls-ca")]
    NoCa,
}

impl AccessArgs {
    /// Sets the tokens and TLS of `config` from these flags.
    pub fn apply(&self, config: &mut ClientConfig) -> Result<(), AccessError> {
        config.auth_token = bearer_token(self.auth_token.clone(), self.auth_token_file.as_deref())
            .map_err(|source| AccessError::TokenFile { flag: "--auth-token-file", source })?;
        config.admin_token = bearer_token(self.admin_token.clone(), self.admin_token_file.as_deref())
            .map_err(|source| AccessError::TokenFile { flag: "--admin-token-file", source })?;
        config.tls = match &self.tls_ca {
            Some(ca) => {
                let mut tls =
                    ClientTls::from_files(ca, self.tls_client_cert.as_deref(), self.tls_client_key.as_deref())?;
                tls.domain = self.tls_domain.clone();
                Some(tls)
            }
            None if self.tls_client_cert.is_some() || self.tls_domain.is_some() => return Err(AccessError::NoCa),
            None => None,
        };
        config.local = self.local;
        Ok(())
    }

    /// A client configuration for `shards` with these flags applied.
    pub fn config(&self, shards: Vec<String>) -> Result<ClientConfig, AccessError> {
        let mut config = ClientConfig::new(shards);
        self.apply(&mut config)?;
        Ok(config)
    }
}
