//! The connections to every shard of a cluster: a stub per shard with the
//! shard headers and tokens, the local channel where a shard is on this host,
//! retries of transient failures, and the health checks. Model handles and
//! the client itself are built on top of it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ps_proto::cluster::ShardHeaders;
use ps_proto::pb;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::config::ClientConfig;
use crate::error::ClientError;
use crate::local::{LocalMode, LocalShard, NotLocal, Reach};
use crate::stub::ShardStub;

/// The longest pause between two attempts of one RPC.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(2);

/// The connections to every shard of a cluster (cheap to clone: they are shared).
#[derive(Clone)]
pub struct Shards {
    shards: Arc<Vec<ShardStub>>,
    /// The same connections, sending the admin token.
    admin: Arc<Vec<ShardStub>>,
    config: Arc<ClientConfig>,
    /// The connections themselves, for the health service (outside the parameter-server API).
    channels: Arc<Vec<Channel>>,
    /// Per shard: whether it is reached through its local channel.
    reach: Arc<Vec<std::sync::RwLock<Reach>>>,
    /// Held while a shard's local channel is being tried, so it is tried once.
    discovering: Arc<Vec<tokio::sync::Mutex<()>>>,
}

/// Failures worth retrying: the shard is away or busy, or the connection broke
/// under the call. A shard that stops (SIGTERM) or dies resets the streams it
/// had open, which tonic reports as INTERNAL "h2 protocol error: ..."; that is
/// the transport, not the shard's own INTERNAL (an optimizer failure, which
/// must not be retried). Pushes and pulls are safe to repeat.
fn transient(status: &Status) -> bool {
    let busy =
        || status.metadata().get(ps_proto::errors::ERROR_KIND_HEADER).is_some_and(|k| k == ps_proto::errors::BUSY);
    matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled)
        || (status.code() == Code::ResourceExhausted && busy())
        || (status.code() == Code::Internal && status.message().starts_with("h2 protocol error"))
}

/// How often a request held by an online reshard is tried again.
const RESHARDING_POLL: Duration = Duration::from_millis(50);

/// An online reshard holds the request: the step waits at the boundary until the blocks moved.
fn resharding(status: &Status) -> bool {
    status.code() == Code::Unavailable
        && status.metadata().get(ps_proto::errors::ERROR_KIND_HEADER).is_some_and(|k| k == ps_proto::errors::RESHARDING)
}

impl Shards {
    /// Sets up (lazy) connections to every shard; nothing is sent yet.
    pub fn connect(mut config: ClientConfig) -> Result<Self, ClientError> {
        config.shards = ps_proto::cluster::expand_shards(&config.shards)
            .map_err(|reason| ClientError::BadAddress { address: config.shards.join(","), reason })?;
        if config.shards.is_empty() {
            return Err(ClientError::NoShards);
        }
        let count = config.shards.len();
        let admin_token = config.admin_token.as_deref().or(config.auth_token.as_deref());
        let mut shards = Vec::with_capacity(count);
        let mut admin = Vec::with_capacity(count);
        let mut channels = Vec::with_capacity(count);
        for (index, addr) in config.shards.iter().enumerate() {
            let channel = ps_proto::tls::endpoint(addr, config.tls.as_ref())
                .map_err(|e| ClientError::BadAddress { address: addr.clone(), reason: e.to_string() })?
                .connect_lazy();
            let stub = |token: Option<&str>| {
                let headers = ShardHeaders::new(token, index, count).map_err(|_| ClientError::BadToken)?;
                Ok::<_, ClientError>(ShardStub::new(channel.clone(), headers))
            };
            shards.push(stub(config.auth_token.as_deref())?);
            admin.push(stub(admin_token)?);
            channels.push(channel);
        }
        Ok(Self {
            shards: Arc::new(shards),
            admin: Arc::new(admin),
            channels: Arc::new(channels),
            reach: Arc::new((0..count).map(|_| std::sync::RwLock::default()).collect()),
            discovering: Arc::new((0..count).map(|_| tokio::sync::Mutex::default()).collect()),
            config: Arc::new(config),
        })
    }

    /// How these connections were configured.
    pub(crate) fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Number of shards.
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    pub(crate) fn stub(&self, shard: usize) -> ShardStub {
        match self.known_local(shard) {
            Some(Some(local)) => local.grpc.clone(),
            _ => self.shards[shard].clone(),
        }
    }

    /// The stub of `shard` that sends the admin token, over the network
    /// (calls that stop or checkpoint a shard are not retried).
    pub(crate) fn admin_stub(&self, shard: usize) -> Option<ShardStub> {
        self.admin.get(shard).cloned()
    }

    /// How this client uses shards on its host.
    pub fn local_mode(&self) -> LocalMode {
        self.config.local
    }

    /// How this client reaches `shard` through its local channel: None until
    /// the first push or pull found it local (or when it is not).
    pub fn local_channel(&self, shard: usize) -> Option<LocalMode> {
        self.known_local(shard)
            .flatten()
            .map(|local| if local.segments { LocalMode::Segments } else { LocalMode::Socket })
    }

    /// What is known of a shard's local channel: not asked yet (None), or whether it is used.
    fn known_local(&self, shard: usize) -> Option<Option<Arc<LocalShard>>> {
        match &*self.reach[shard].read().unwrap_or_else(|poisoned| poisoned.into_inner()) {
            Reach::Unknown => None,
            Reach::Local(local) => Some(Some(local.clone())),
            Reach::Remote => Some(None),
        }
    }

    /// The shard's local channel if this client can use it, finding out on the first call.
    pub(crate) async fn local_shard(&self, shard: usize) -> Option<Arc<LocalShard>> {
        if self.config.local == LocalMode::Off {
            return None;
        }
        if let Some(known) = self.known_local(shard) {
            return known;
        }
        let _trying = self.discovering[shard].lock().await;
        if let Some(known) = self.known_local(shard) {
            return known;
        }
        let reach = match self.discover(shard).await {
            Ok(local) => {
                tracing::debug!(shard, mode = %self.config.local, "shard reached through its local channel");
                Reach::Local(Arc::new(local))
            }
            // The shard did not answer: ask again on the next call rather than settle for TCP.
            Err(NotLocal::Rpc(status)) if transient(&status) => return None,
            Err(reason) => {
                tracing::debug!(shard, %reason, "shard reached over the network");
                Reach::Remote
            }
        };
        *self.reach[shard].write().unwrap_or_else(|poisoned| poisoned.into_inner()) = reach;
        self.known_local(shard).flatten()
    }

    async fn discover(&self, shard: usize) -> Result<LocalShard, NotLocal> {
        let status = self.shards[shard].clone().get_status(pb::GetStatusRequest::default()).await?.into_inner();
        let count = self.shards.len();
        let headers = |token: Option<&str>| {
            ShardHeaders::new(token, shard, count).map_err(|_| NotLocal::Refused("the token is not printable".into()))
        };
        let admin_token = self.config.admin_token.as_deref().or(self.config.auth_token.as_deref());
        LocalShard::connect(
            status.local,
            headers(self.config.auth_token.as_deref())?,
            headers(admin_token)?,
            self.config.auth_token.as_deref().or(admin_token),
            self.config.local,
        )
        .await
    }

    /// Stops using a shard's local channel (it failed in a way TCP will not).
    pub(crate) fn leave_local(&self, shard: usize, why: &str) {
        tracing::warn!(shard, "local channel given up, back to the network: {why}");
        *self.reach[shard].write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Reach::Remote;
    }

    /// Runs `call` against one shard, retrying transient failures with backoff (doubling up to 2 s).
    pub(crate) async fn retry<T, F, Fut>(&self, shard: usize, call: F) -> Result<T, ClientError>
    where
        F: FnMut(ShardStub) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.retry_on(false, shard, call).await
    }

    /// [`Self::retry`] with the admin token.
    pub(crate) async fn retry_admin<T, F, Fut>(&self, shard: usize, call: F) -> Result<T, ClientError>
    where
        F: FnMut(ShardStub) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.retry_on(true, shard, call).await
    }

    async fn retry_on<T, F, Fut>(&self, admin: bool, shard: usize, mut call: F) -> Result<T, ClientError>
    where
        F: FnMut(ShardStub) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut delay = self.config.retry_backoff;
        let mut attempt = 1;
        loop {
            let stub = match (self.known_local(shard), admin) {
                (Some(Some(local)), false) => local.grpc.clone(),
                (Some(Some(local)), true) => local.admin.clone(),
                (_, false) => self.shards[shard].clone(),
                (_, true) => self.admin[shard].clone(),
            };
            match call(stub).await {
                Ok(value) => return Ok(value),
                // Held at a step boundary while blocks move: as long as the move takes (the
                // shards end the hold themselves if it is abandoned), asked often so the step
                // goes on soon after it.
                Err(status) if resharding(&status) => {
                    tracing::debug!(shard, "the shards are moving blocks; retrying: {}", status.message());
                    tokio::time::sleep(RESHARDING_POLL).await;
                }
                Err(status) if transient(&status) && attempt < self.config.attempts => {
                    tracing::debug!(shard, attempt, code = ?status.code(), "retrying: {}", status.message());
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_RETRY_BACKOFF);
                    attempt += 1;
                }
                Err(status) => return Err(ClientError::Rpc { shard, status }),
            }
        }
    }

    /// Whether each shard's `grpc.health.v1` service reports the parameter
    /// server as SERVING: false while it restores a checkpoint and agrees with
    /// its peers, and once it started to stop. A shard that does not answer is an error.
    pub async fn serving(&self) -> Result<Vec<bool>, ClientError> {
        let mut serving = Vec::with_capacity(self.channels.len());
        for shard in 0..self.channels.len() {
            serving.push(self.shard_serving(shard).await?);
        }
        Ok(serving)
    }

    /// Whether one shard's gRPC health service reports SERVING.
    pub async fn shard_serving(&self, shard: usize) -> Result<bool, ClientError> {
        use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
        let channel =
            self.channels.get(shard).ok_or(ClientError::NoSuchShard { shard, shards: self.channels.len() })?;
        let request = HealthCheckRequest { service: ps_proto::HEALTH_SERVICE_NAME.to_string() };
        let reply = HealthClient::new(channel.clone())
            .check(request)
            .await
            .map_err(|status| ClientError::Rpc { shard, status })?;
        Ok(reply.into_inner().status == ServingStatus::Serving as i32)
    }

    /// Waits until every shard answers, for at most `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        for shard in 0..self.shards.len() {
            loop {
                match self.stub(shard).get_status(pb::GetStatusRequest::default()).await {
                    Ok(_) => break,
                    Err(status) if transient(&status) && tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(status) => return Err(ClientError::Rpc { shard, status }),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the chaos harness: a worker whose pull was open when its shard
    /// stopped on SIGTERM got "h2 protocol error: http2 error" (INTERNAL) and exited.
    #[test]
    fn a_reset_stream_is_retried_and_the_shards_own_internal_error_is_not() {
        assert!(transient(&Status::internal("h2 protocol error: http2 error")));
        assert!(transient(&Status::unavailable("tcp connect error")));
        assert!(!transient(&Status::internal("the optimizer failed on tensor 'w' block 0 at step 3: panic")));
        assert!(!transient(&Status::resource_exhausted("model 'm' has its max_workers")));
        assert!(!transient(&Status::invalid_argument("wrong shape")));
    }
}
