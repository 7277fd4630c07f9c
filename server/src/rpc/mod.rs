//! The gRPC face of a shard: the `paramserver.v1` service (`service`
//! dispatches each RPC to the file of its family), the conversions between
//! wire messages and the store's types, chunk reassembly, auth, the local
//! channel for clients on the shard's host, and the loop that serves it all
//! with the transport settings of `ps_proto`, beside the lease reaper and the
//! health reports. No optimizer math lives here; heavy work goes to the
//! blocking pool.

mod admin;
mod assemble;
pub(crate) mod auth;
pub mod convert;
mod hand_route;
mod identity;
pub mod local;
mod membership;
mod registration;
mod rounds;
mod service;
mod streams;
mod training;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ps_proto::ParameterServerServer;
use ps_proto::transport;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Status};

pub use auth::{BearerAuth, Role};
pub use identity::ShardCheck;
pub use service::ParameterService;

use crate::config::ServerOptions;
use crate::durability::Durability;
use crate::limits::ShardBounds;
use crate::peers::Peers;
use crate::store::{DropReason, Registry, ShardIdentity};

/// Why a shard could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    /// The checkpoint directory cannot be used. (Not a `source`: the message
    /// already holds the cause's, and a source would print it twice.)
    #[error("checkpoint directory: {0}")]
    Checkpoints(crate::durability::checkpoint::CheckpointError),
    /// The local channel's directory or sockets cannot be used.
    #[error("--local-dir: {0}")]
    Local(std::io::Error),
}

impl From<crate::durability::checkpoint::CheckpointError> for ServeError {
    fn from(error: crate::durability::checkpoint::CheckpointError) -> Self {
        ServeError::Checkpoints(error)
    }
}

/// Serves one shard on `listener` until `shutdown` completes. With a
/// checkpoint directory, the shard first restores what it holds there, and on
/// `shutdown` it writes a last checkpoint (at one version on every shard) before it stops.
pub async fn serve(
    options: ServerOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let identity = ShardIdentity { index: options.shard_index, addresses: options.shards.clone() };
    let peers = Peers::new(&identity, options.tokens.for_peers(), options.tls.as_ref().map(|tls| &tls.peers));
    let registry = Arc::new(Registry::new(identity, options.lease));
    let gate = Gate { auth: BearerAuth::new(&options.tokens), shard: ShardCheck::new(registry.cluster.clone()) };
    metrics::gauge!(crate::metrics::SHARDS).set(f64::from(registry.num_shards()));
    let limits = options.limits.clone();
    let bounds = Arc::new(ShardBounds::new(options.limits));
    let durability = Durability::new(&options.checkpoints, registry.clone(), peers.clone(), bounds.clone())?;
    let reaper = tokio::spawn(expire_leases(registry.clone(), peers.clone()));
    let norms = tokio::spawn(send_norm_parts(registry.clone(), peers.clone()));
    let mut shard = ParameterService::new(registry.clone(), peers, durability.clone(), bounds);
    let mut local_servers = None;
    if let Some(dir) = &options.local_dir {
        let (channel, grpc, segments) =
            local::LocalChannel::bind(dir, registry, gate.auth.clone(), shard.bounds.clone())
                .map_err(ServeError::Local)?;
        tracing::info!(dir = %dir.display(), "local channel: gRPC and memory segments on Unix sockets");
        local_servers = Some((channel.clone(), grpc, tokio::spawn(channel.clone().accept(segments))));
        shard = shard.with_local(channel);
    }
    durability.restore_from_disk().await;
    let timer = {
        let durability = durability.clone();
        tokio::spawn(async move { durability.checkpoint_periodically().await })
    };
    let common = {
        let durability = durability.clone();
        tokio::spawn(async move { durability.keep_common_checkpoints().await })
    };
    // grpc.health.v1: NOT_SERVING until every restored model agreed with the
    // peers on where to continue, and again from the start of a shutdown.
    let (health, health_service) = tonic_health::server::health_reporter();
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readiness = tokio::spawn(report_readiness(shard.registry().clone(), health, stopping.clone()));
    let grace = options.checkpoints.shutdown_grace;
    let closing = durability.clone();
    let registry = shard.registry().clone();
    let asked = shard.shutdown.clone();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = asked.notified() => {}
        }
        stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        closing.checkpoint_before_exit(grace).await;
        // Pulls waiting for a version this shard will not reach end now with
        // UNAVAILABLE, so the shutdown does not wait out their long poll and
        // clients retry against the restarted shard.
        for model in registry.models() {
            model.retire();
        }
    };
    let generated = ParameterServerServer::new(shard.clone())
        .max_decoding_message_size(transport::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(transport::MAX_MESSAGE_BYTES);
    let service = InterceptedService::new(hand_route::HandRoute::new(generated, shard), gate);
    let keepalive = (!limits.keepalive_interval.is_zero()).then_some(limits.keepalive_interval);
    let configure = |builder: tonic::transport::Server| {
        builder
            .max_concurrent_streams(Some(limits.max_streams_per_connection))
            .http2_keepalive_interval(keepalive)
            .http2_keepalive_timeout(Some(limits.keepalive_timeout))
            .initial_stream_window_size(Some(transport::STREAM_WINDOW_BYTES))
            .initial_connection_window_size(Some(transport::CONNECTION_WINDOW_BYTES))
            .max_frame_size(Some(transport::SHARD_MAX_FRAME_BYTES))
    };
    // The local gRPC socket serves the same service (and the same limits) as
    // the TCP port, without TLS: the directory's permissions decide who connects.
    let (stopped_tx, stopped_rx) = tokio::sync::watch::channel(false);
    let local = local_servers.map(|(channel, listener, accepting)| {
        let mut stopped = stopped_rx.clone();
        let server = configure(tonic::transport::Server::builder())
            .add_service(service.clone())
            .add_service(health_service.clone())
            .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            });
        (channel, tokio::spawn(server), accepting)
    });
    let shutdown = async move {
        shutdown.await;
        let _ = stopped_tx.send(true);
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &options.tls {
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
        if let Some(ca) = &tls.client_ca_pem {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder.tls_config(config)?;
    }
    let result = configure(builder)
        .add_service(service)
        .add_service(health_service)
        .serve_with_incoming_shutdown(incoming_without_delay(listener), shutdown)
        .await;
    reaper.abort();
    norms.abort();
    timer.abort();
    common.abort();
    readiness.abort();
    if let Some((channel, server, accepting)) = local {
        accepting.abort();
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        channel.remove_sockets();
    }
    Ok(result?)
}

/// Sends each part of a step's gradient norm this shard's models make
/// (`GRAD_CLIP_MEAN`) to the peers that take part in it.
async fn send_norm_parts(registry: Arc<Registry>, peers: Peers) {
    let Some(mut parts) = registry.take_norm_parts() else { return };
    while let Some(part) = parts.recv().await {
        let Ok(model) = registry.get(&part.model) else { continue };
        let to: Vec<u32> = model.norm_shards().iter().copied().filter(|&s| s != part.shard).collect();
        // Retries stop once this copy of the model is no longer the one served at that epoch.
        let (registry, name, epoch) = (registry.clone(), part.model.clone(), part.epoch);
        let current =
            move || registry.get(&name).is_ok_and(|m| Arc::ptr_eq(&m, &model) && m.epoch() == epoch && !m.is_retired());
        peers.share_norm(&part, &to, current);
    }
}

/// What every request passes before it reaches the service: the token first
/// (an unauthenticated caller learns nothing about the cluster), then the shard check.
#[derive(Clone)]
struct Gate {
    auth: BearerAuth,
    shard: ShardCheck,
}

impl Interceptor for Gate {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.shard.check(self.auth.call(request)?)
    }
}

/// Accepted connections with Nagle's algorithm off. The builder's own
/// `tcp_nodelay` only applies when tonic binds the socket itself; without it,
/// small replies wait for delayed ACKs (about 40 ms per round trip).
fn incoming_without_delay(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}

/// The health service's answer for the whole shard ("") and for the
/// parameter-server service: SERVING once no model is recovering, until the
/// shard starts to stop. Checked every 100 ms (recovery takes seconds).
async fn report_readiness(
    registry: Arc<Registry>,
    health: tonic_health::server::HealthReporter,
    stopping: Arc<std::sync::atomic::AtomicBool>,
) {
    use tonic_health::ServingStatus;
    let mut reported = None;
    loop {
        let ready = !stopping.load(std::sync::atomic::Ordering::SeqCst)
            && registry.models().iter().all(|model| !model.is_recovering());
        if reported != Some(ready) {
            let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
            for service in ["", ps_proto::HEALTH_SERVICE_NAME] {
                health.set_service_status(service, status).await;
            }
            tracing::info!(ready, "health: {}", if ready { "SERVING" } else { "NOT_SERVING" });
            reported = Some(ready);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Drops workers whose lease expired and stragglers past a step deadline,
/// every quarter of the shortest of them, lets the steps that were waiting
/// for them complete, and tells the peers, so a drop anywhere is a drop everywhere.
async fn expire_leases(registry: Arc<Registry>, peers: Peers) {
    loop {
        // Listen before reading the models, so a model added in between is not missed.
        let added = registry.model_added().notified();
        tokio::pin!(added);
        added.as_mut().enable();
        let models = registry.models();
        let deadlines = models.iter().filter_map(|m| {
            m.spec.options.contract.step_deadline.or_else(|| m.spec.federated.as_ref().and_then(|r| r.deadline))
        });
        let shortest = deadlines.fold(registry.lease, Duration::min);
        let period = (shortest / 4).max(Duration::from_millis(5));
        // A model registered meanwhile may have a shorter deadline: look again at once.
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = added => continue,
        }
        for model in registry.models() {
            let name = model.name().to_string();
            let checked_model = model.clone();
            let checked = tokio::task::spawn_blocking(move || {
                (checked_model.expire_workers(), checked_model.drop_stragglers(), checked_model.due_round())
            })
            .await;
            let (expired, late, due) = checked.unwrap_or_default();
            if let Some(closing) = due
                && let Err(error) = rounds::close_round(&peers, model, closing).await
            {
                tracing::error!(model = name, %error, "could not apply a round closed at its deadline");
            }
            if !expired.is_empty() {
                tracing::warn!(model = name, workers = ?expired, "lease expired; worker dropped from the barrier");
            }
            if !late.is_empty() {
                tracing::warn!(model = name, workers = ?late, "no push by the step deadline; worker dropped from the model");
            }
            peers.share_drops(&name, &expired, DropReason::LeaseExpired);
            peers.share_drops(&name, &late, DropReason::MissedDeadline);
        }
    }
}
