//! Bearer-token authentication for every RPC of a shard, with two roles.
//!
//! A shard may hold a worker token and an admin token. The admin token also
//! does everything a worker may; the calls that change what the shard serves
//! or how it stops (register, checkpoint, rollback, shutdown, and the
//! shard-to-shard round commits) need it. With only one of the two tokens
//! configured, that token guards what it names and the rest stays as without
//! tokens: a worker token alone guards everything, an admin token alone
//! guards only the admin calls.

use std::sync::Arc;

use ps_proto::cluster::same_secret;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::config::Tokens;

/// What the caller's token lets it do; the interceptor puts it in the request's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Push, pull, membership, rounds, status.
    Worker,
    /// Everything, including register, checkpoint, rollback and shutdown.
    Admin,
}

/// Checks the `authorization: Bearer <token>` header and records the caller's [`Role`].
#[derive(Clone)]
pub struct BearerAuth {
    worker: Option<Arc<str>>,
    admin: Option<Arc<str>>,
}

impl BearerAuth {
    /// Accepts `tokens`; with neither, every request is let through as admin.
    pub fn new(tokens: &Tokens) -> Self {
        Self { worker: tokens.worker.as_deref().map(Arc::from), admin: tokens.admin.as_deref().map(Arc::from) }
    }

    fn role(&self, given: Option<&str>) -> Result<Role, Status> {
        let anonymous = match (&self.worker, &self.admin) {
            (None, None) => return Ok(Role::Admin),
            (None, Some(_)) => Role::Worker,
            (Some(_), _) => {
                if given.is_none() {
                    return Err(Status::unauthenticated(
                        "missing 'authorization: Bearer <token>' header; this server requires a token \
                         (its --auth-token-file)",
                    ));
                }
                Role::Worker
            }
        };
        let Some(given) = given else { return Ok(anonymous) };
        // Both comparisons always run, so the time does not tell which token was close.
        let is_admin = self.admin.as_deref().is_some_and(|admin| same_secret(given, admin));
        let is_worker = self.worker.as_deref().is_some_and(|worker| same_secret(given, worker));
        match (is_admin, is_worker) {
            (true, _) => Ok(Role::Admin),
            // A single token (no admin token configured) is allowed everything.
            (false, true) if self.admin.is_none() => Ok(Role::Admin),
            (false, true) => Ok(Role::Worker),
            (false, false) => {
                Err(Status::unauthenticated("the bearer token matches neither this server's worker nor admin token"))
            }
        }
    }
}

impl BearerAuth {
    /// The role of a caller that sent `header` as its authorization value ("Bearer <token>").
    pub fn check_header(&self, header: Option<&str>) -> Result<Role, Status> {
        let given = match header {
            None => None,
            Some(value) => Some(
                value
                    .strip_prefix("Bearer ")
                    .ok_or_else(|| Status::unauthenticated("the authorization header must read 'Bearer <token>'"))?,
            ),
        };
        self.role(given)
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = match request.metadata().get("authorization").map(|value| value.to_str()) {
            None => None,
            Some(Ok(value)) => Some(value),
            Some(Err(_)) => return Err(Status::unauthenticated("the authorization header is not printable ASCII")),
        };
        let role = self.check_header(header)?;
        request.extensions_mut().insert(role);
        Ok(request)
    }
}

/// Refuses `method` unless the request carries the admin token.
pub fn require_admin<T>(request: &Request<T>, method: &str) -> Result<(), Status> {
    match request.extensions().get::<Role>() {
        Some(Role::Admin) => Ok(()),
        _ => Err(Status::permission_denied(format!(
            "{method} needs the admin token (the server's --admin-token-file); this request carries the worker token"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(worker: Option<&str>, admin: Option<&str>) -> BearerAuth {
        BearerAuth::new(&Tokens { worker: worker.map(str::to_string), admin: admin.map(str::to_string) })
    }

    #[test]
    fn roles_follow_the_tokens_configured() {
        let open = auth(None, None);
        assert_eq!(open.role(None).unwrap(), Role::Admin);
        let single = auth(Some("w"), None);
        assert_eq!(single.role(Some("w")).unwrap(), Role::Admin, "one token is allowed everything");
        assert!(single.role(None).is_err());
        assert!(single.role(Some("x")).is_err());
        let both = auth(Some("w"), Some("a"));
        assert_eq!(both.role(Some("w")).unwrap(), Role::Worker);
        assert_eq!(both.role(Some("a")).unwrap(), Role::Admin);
        assert_eq!(both.role(None).unwrap_err().code(), tonic::Code::Unauthenticated);
        let admin_only = auth(None, Some("a"));
        assert_eq!(admin_only.role(None).unwrap(), Role::Worker, "workers need no token");
        assert_eq!(admin_only.role(Some("a")).unwrap(), Role::Admin);
        assert!(admin_only.role(Some("w")).is_err());
    }

    #[test]
    fn admin_calls_need_the_admin_role() {
        let mut request = Request::new(());
        assert_eq!(require_admin(&request, "RegisterModel").unwrap_err().code(), tonic::Code::PermissionDenied);
        request.extensions_mut().insert(Role::Worker);
        let refused = require_admin(&request, "RegisterModel").unwrap_err();
        assert!(refused.message().contains("--admin-token-file"), "{}", refused.message());
        request.extensions_mut().insert(Role::Admin);
        require_admin(&request, "RegisterModel").unwrap();
    }
}
