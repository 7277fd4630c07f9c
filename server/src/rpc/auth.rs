//! Bearer-token authentication for every RPC of a shard.

use std::sync::Arc;

use ps_proto::cluster::same_secret;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Checks the `authorization: Bearer <token>` header when a token is configured.
#[derive(Clone)]
pub struct BearerAuth {
    expected: Option<Arc<str>>,
}

impl BearerAuth {
    /// Requires `token` on every request; `None` lets every request through.
    pub fn new(token: Option<&str>) -> Self {
        Self { expected: token.map(Arc::from) }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else { return Ok(request) };
        match request.metadata().get("authorization").and_then(|v| v.to_str().ok()) {
            Some(value) if value.strip_prefix("Bearer ").is_some_and(|given| same_secret(given, expected)) => {
                Ok(request)
            }
            Some(_) => Err(Status::unauthenticated("the bearer token does not match this server's --auth-token")),
            None => Err(Status::unauthenticated(
                "missing 'authorization: Bearer <token>' header; this server requires --auth-token",
            )),
        }
    }
}
