//! The `paramserver.v1.ParameterServer` service of one shard: its state,
//! and the dispatch of every RPC to the file of its family (`registration`,
//! `membership`, `training`, `rounds`, `admin`, `local`; checkpoints and
//! rollbacks to the durability layer). Nothing here decides anything.

use std::sync::Arc;

use futures::StreamExt;
use ps_proto::pb;
use tonic::{Request, Response, Status, Streaming};

use super::auth::require_admin;
use super::local::LocalChannel;
use super::streams::WeightStream;
use crate::durability::Durability;
use crate::error::ServerError;
use crate::limits::ShardBounds;
use crate::metrics as m;
use crate::peers::Peers;
use crate::store::{Registry, blocking};

/// The `paramserver.v1.ParameterServer` implementation of one shard.
#[derive(Clone)]
pub struct ParameterService {
    pub(super) registry: Arc<Registry>,
    pub(super) peers: Peers,
    pub(super) durability: Arc<Durability>,
    pub(super) bounds: Arc<ShardBounds>,
    /// Notified by the Shutdown RPC; `serve` stops as on SIGTERM.
    pub(super) shutdown: Arc<tokio::sync::Notify>,
    /// The local channel, when the shard serves one.
    pub(super) local: Option<Arc<LocalChannel>>,
}

impl ParameterService {
    /// A service over `registry`, reaching the other shards through `peers`,
    /// keeping its models as `durability` says, within `bounds`.
    pub fn new(registry: Arc<Registry>, peers: Peers, durability: Durability, bounds: Arc<ShardBounds>) -> Self {
        Self { registry, peers, durability: Arc::new(durability), bounds, shutdown: Arc::default(), local: None }
    }

    /// The same service, also serving `local` clients.
    pub fn with_local(mut self, local: Arc<LocalChannel>) -> Self {
        self.local = Some(local);
        self
    }

    pub(super) fn local(&self) -> Result<&Arc<LocalChannel>, ServerError> {
        self.local.as_ref().ok_or(ServerError::NoLocalChannel)
    }

    /// The limits and what is held against them.
    pub fn bounds(&self) -> &ShardBounds {
        &self.bounds
    }

    /// The models this shard serves.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }
}

/// Counts and logs a failed RPC, passing the result through.
pub(super) fn observe<T>(method: &'static str, result: Result<T, Status>) -> Result<T, Status> {
    if let Err(status) = &result {
        metrics::counter!(m::RPC_ERRORS, "method" => method, "code" => format!("{:?}", status.code())).increment(1);
        tracing::warn!(method, code = ?status.code(), message = status.message(), "request rejected");
    }
    result
}

/// Dispatch: each RPC to its family, every failure counted and logged once.
#[tonic::async_trait]
impl pb::parameter_server_server::ParameterServer for ParameterService {
    async fn register_model(
        &self,
        request: Request<Streaming<pb::RegisterModelRequest>>,
    ) -> Result<Response<pb::RegisterModelResponse>, Status> {
        let call = async move {
            require_admin(&request, "RegisterModel")?;
            self.register(request).await
        };
        observe("RegisterModel", call.await).map(Response::new)
    }

    async fn get_layout(&self, request: Request<pb::GetLayoutRequest>) -> Result<Response<pb::Layout>, Status> {
        observe("GetLayout", self.layout_of(request.get_ref()).map_err(Status::from)).map(Response::new)
    }

    async fn plan_layout(&self, request: Request<pb::PlanLayoutRequest>) -> Result<Response<pb::Layout>, Status> {
        observe("PlanLayout", self.plan(request.into_inner()).await.map_err(Status::from)).map(Response::new)
    }

    async fn join_worker(
        &self,
        request: Request<pb::JoinWorkerRequest>,
    ) -> Result<Response<pb::JoinWorkerResponse>, Status> {
        observe("JoinWorker", self.join(request.into_inner()).map_err(Status::from)).map(Response::new)
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        observe("Heartbeat", self.renew_lease(request.into_inner()).map_err(Status::from)).map(Response::new)
    }

    async fn leave_worker(
        &self,
        request: Request<pb::LeaveWorkerRequest>,
    ) -> Result<Response<pb::LeaveWorkerResponse>, Status> {
        observe("LeaveWorker", self.leave(request.into_inner()).await.map_err(Status::from)).map(Response::new)
    }

    // A shard serves PushGradients and PullWeights through `hand_route`, so these two
    // are not reached there; the generated trait needs them, and they run the same code.
    async fn push_gradients(
        &self,
        request: Request<Streaming<pb::GradientChunk>>,
    ) -> Result<Response<pb::PushGradientsResponse>, Status> {
        observe("PushGradients", self.push(request.into_inner()).await).map(Response::new)
    }

    type PullWeightsStream = WeightStream;

    async fn pull_weights(
        &self,
        request: Request<pb::PullWeightsRequest>,
    ) -> Result<Response<Self::PullWeightsStream>, Status> {
        observe("PullWeights", self.pull(request.into_inner())).map(Response::new)
    }

    async fn push_local(
        &self,
        request: Request<pb::LocalPushRequest>,
    ) -> Result<Response<pb::PushGradientsResponse>, Status> {
        observe("PushLocal", self.push_segment(request.into_inner()).await).map(Response::new)
    }

    async fn pull_local(
        &self,
        request: Request<pb::LocalPullRequest>,
    ) -> Result<Response<pb::LocalPullResponse>, Status> {
        observe("PullLocal", self.pull_segment(request.into_inner()).await).map(Response::new)
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        // The status locks every block, which a running update may hold: not on the reactor.
        let service = self.clone();
        let result = blocking(move || service.status(request.into_inner())).await.map_err(Status::from).and_then(|r| r);
        observe("GetStatus", result).map(Response::new)
    }

    async fn get_round_task(
        &self,
        request: Request<pb::GetRoundTaskRequest>,
    ) -> Result<Response<pb::RoundTask>, Status> {
        observe("GetRoundTask", self.round_task(request.into_inner()).await).map(Response::new)
    }

    async fn push_round_update(
        &self,
        request: Request<Streaming<pb::RoundUpdateChunk>>,
    ) -> Result<Response<pb::PushRoundUpdateResponse>, Status> {
        observe("PushRoundUpdate", self.push_round(request).await).map(Response::new)
    }

    async fn complete_round(
        &self,
        request: Request<pb::CompleteRoundRequest>,
    ) -> Result<Response<pb::CompleteRoundResponse>, Status> {
        observe("CompleteRound", self.complete(request.into_inner()).await).map(Response::new)
    }

    async fn commit_round(
        &self,
        request: Request<pb::CommitRoundRequest>,
    ) -> Result<Response<pb::CommitRoundResponse>, Status> {
        let call = async move {
            require_admin(&request, "CommitRound")?;
            self.commit(request.into_inner()).await
        };
        observe("CommitRound", call.await).map(Response::new)
    }

    async fn checkpoint(
        &self,
        request: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointResponse>, Status> {
        let call = async move {
            require_admin(&request, "Checkpoint")?;
            self.durability.checkpoint_model(request.into_inner()).await.map_err(Status::from)
        };
        observe("Checkpoint", call.await).map(Response::new)
    }

    async fn list_checkpoints(
        &self,
        request: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        let call = async move {
            require_admin(&request, "ListCheckpoints")?;
            let durability = self.durability.clone();
            blocking(move || durability.checkpoints_held(&request.into_inner())).await.map_err(Status::from)
        };
        observe("ListCheckpoints", call.await).map(Response::new)
    }

    async fn rollback(&self, request: Request<pb::RollbackRequest>) -> Result<Response<pb::RollbackResponse>, Status> {
        let call = async move {
            require_admin(&request, "Rollback")?;
            self.durability.roll_back(request.into_inner()).await.map_err(Status::from)
        };
        observe("Rollback", call.await).map(Response::new)
    }

    async fn share_step_norm(
        &self,
        request: Request<pb::StepNormRequest>,
    ) -> Result<Response<pb::StepNormResponse>, Status> {
        let call = async move {
            require_admin(&request, "ShareStepNorm")?;
            let part = request.into_inner();
            let model = self.registry.get(&part.model)?;
            model.check_epoch(part.epoch)?;
            let blocks: Vec<((usize, u32), f64)> =
                part.blocks.iter().map(|b| ((b.tensor as usize, b.block), b.sum_of_squares)).collect();
            let updated = blocking(move || model.receive_norm(part.step, part.shard, &blocks)).await??;
            tracing::trace!(updated, "a peer's part of a step's norm");
            Ok(pb::StepNormResponse {})
        };
        observe("ShareStepNorm", call.await).map(Response::new)
    }

    async fn shutdown(&self, request: Request<pb::ShutdownRequest>) -> Result<Response<pb::ShutdownResponse>, Status> {
        observe("Shutdown", require_admin(&request, "Shutdown"))?;
        self.stop();
        Ok(Response::new(pb::ShutdownResponse {}))
    }

    async fn reshard(&self, request: Request<pb::ReshardRequest>) -> Result<Response<pb::ReshardResponse>, Status> {
        let call = async move {
            require_admin(&request, "Reshard")?;
            self.durability.reshard(request.into_inner()).await.map_err(Status::from)
        };
        observe("Reshard", call.await).map(Response::new)
    }

    type FetchBlocksStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::BlockBytes, Status>> + Send>>;

    async fn fetch_blocks(
        &self,
        request: Request<pb::FetchBlocksRequest>,
    ) -> Result<Response<Self::FetchBlocksStream>, Status> {
        let call = async move {
            require_admin(&request, "FetchBlocks")?;
            self.durability.blocks_for_peer(request.into_inner(), BLOCK_BYTES_PIECE).await.map_err(Status::from)
        };
        let pieces = observe("FetchBlocks", call.await)?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(pieces)
            .map(|piece| piece.map(|data| pb::BlockBytes { data: data.into() }).map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Bytes per FetchBlocks message, well under a message's limit; the receiver joins them.
const BLOCK_BYTES_PIECE: usize = 1 << 20;
