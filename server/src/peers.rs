//! The shard's line to its peers. Each shard applies the same membership rules
//! (lease, step deadline, quorum), but by its own clock; so that a worker
//! dropped on one shard is dropped on all of them at once, rather than only
//! when each clock gets there, the dropping shard tells every peer with a
//! LeaveWorker, exactly as a leaving worker would. Best effort: a peer that is
//! down applies its own rules when it comes back.
//!
//! Federated rounds use the same line from shard 0: before counting a client,
//! it asks every peer whether it holds the client's whole update
//! (CompleteRound); when it closes a round, it sends the included set to every
//! peer (CommitRound), retrying until each one has applied it.

use std::sync::Arc;
use std::time::Duration;

use ps_proto::cluster::ShardHeaders;
use ps_proto::tls::ClientTls;
use ps_proto::{ParameterServerClient, pb};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::error::ServerError;
use crate::store::{Closing, DropReason, NormPart, ShardIdentity};

/// How often shard 0 asks a peer again that has not opened the round yet (20 ms apart).
const FUTURE_ROUND_ATTEMPTS: u32 = 250;

fn is_future_round(status: &tonic::Status) -> bool {
    status.metadata().get(ps_proto::errors::ERROR_KIND_HEADER).is_some_and(|v| v == ps_proto::errors::FUTURE_ROUND)
}

/// The longest pause between attempts to deliver a round commit to a peer.
const MAX_COMMIT_BACKOFF: Duration = Duration::from_secs(2);

type PeerStub = ParameterServerClient<InterceptedService<Channel, ShardHeaders>>;

/// Every other shard's stub, by index.
type PeerStubs = Vec<(u32, PeerStub)>;

/// Lazily connected stubs of every other shard of the current shard list
/// (replaced when an online reshard changes the list).
#[derive(Clone)]
pub struct Peers {
    stubs: Arc<parking_lot::RwLock<Arc<PeerStubs>>>,
    token: Option<String>,
    tls: Option<ClientTls>,
}

/// A lazily connected stub of the shard at `address`, addressed as shard `index` of `count`.
fn stub(address: &str, index: usize, count: usize, token: Option<&str>, tls: Option<&ClientTls>) -> Option<PeerStub> {
    let endpoint = match ps_proto::tls::endpoint(address, tls) {
        Ok(endpoint) => endpoint,
        Err(error) => {
            tracing::warn!(peer = index, address, %error, "peer address does not parse; drops will not be shared with it");
            return None;
        }
    };
    // The shard's own token was accepted at startup, so it is printable.
    let headers = ShardHeaders::new(token, index, count).ok()?;
    let channel = endpoint.connect_timeout(Duration::from_secs(2)).tcp_nodelay(true).connect_lazy();
    Some(ParameterServerClient::with_interceptor(channel, headers))
}

fn stubs_of(identity: &ShardIdentity, token: Option<&str>, tls: Option<&ClientTls>) -> Vec<(u32, PeerStub)> {
    let count = identity.addresses.len();
    identity
        .addresses
        .iter()
        .enumerate()
        .filter(|(index, _)| *index as u32 != identity.index)
        .filter_map(|(index, address)| Some((index as u32, stub(address, index, count, token, tls)?)))
        .collect()
}

impl Peers {
    /// Stubs for every shard of `identity` but this one; addresses that do not
    /// parse are skipped with a warning (the shard still serves its clients).
    pub fn new(identity: &ShardIdentity, token: Option<&str>, tls: Option<&ClientTls>) -> Self {
        let stubs = stubs_of(identity, token, tls);
        Self {
            stubs: Arc::new(parking_lot::RwLock::new(Arc::new(stubs))),
            token: token.map(str::to_string),
            tls: tls.cloned(),
        }
    }

    /// Points every stub at the shards of `identity` (after an online reshard).
    pub fn follow(&self, identity: &ShardIdentity) {
        *self.stubs.write() = Arc::new(stubs_of(identity, self.token.as_deref(), self.tls.as_ref()));
    }

    fn current(&self) -> Arc<PeerStubs> {
        self.stubs.read().clone()
    }

    /// A stub of shard `index` of the list `addresses`, whichever list is current.
    pub fn of_list(&self, addresses: &[String], index: u32) -> Option<PeerStub> {
        let address = addresses.get(index as usize)?;
        stub(address, index as usize, addresses.len(), self.token.as_deref(), self.tls.as_ref())
    }

    /// Tells every peer that `workers` were dropped from `model` and why, without waiting for the answers.
    pub fn share_drops(&self, model: &str, workers: &[String], why: DropReason) {
        let reason = match why {
            DropReason::LeaseExpired => pb::LeaveReason::LeaseExpired,
            DropReason::MissedDeadline => pb::LeaveReason::MissedDeadline,
        } as i32;
        for (peer, stub) in self.current().iter() {
            for worker in workers {
                let (mut stub, peer) = (stub.clone(), *peer);
                let request = pb::LeaveWorkerRequest { model: model.to_string(), worker_id: worker.clone(), reason };
                tokio::spawn(async move {
                    match stub.leave_worker(request).await {
                        // NOT_FOUND: the peer had dropped it already.
                        Ok(_) => {}
                        Err(status) if status.code() == tonic::Code::NotFound => {}
                        Err(status) => {
                            tracing::debug!(peer, code = ?status.code(), "could not share a drop: {}", status.message())
                        }
                    }
                });
            }
        }
    }

    /// Asks every peer whether it holds `client`'s whole update for `round`.
    pub async fn check_round_update(&self, model: &str, client: u32, round: u64) -> Result<(), ServerError> {
        let stubs = self.current();
        let checks = stubs.iter().map(|(peer, stub)| {
            let mut stub = stub.clone();
            let request = pb::CompleteRoundRequest { model: model.to_string(), client, round, epoch: 0 };
            async move {
                // A peer that has not applied the previous round yet (its commit is
                // on the way) answers future-round: ask again shortly.
                let mut attempts = 0;
                let answer = loop {
                    match stub.complete_round(request.clone()).await {
                        Err(status) if is_future_round(&status) && attempts < FUTURE_ROUND_ATTEMPTS => {
                            attempts += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        answer => break answer,
                    }
                };
                match answer {
                    Ok(_) => Ok(()),
                    // The peer's own words name the missing block or the closed round.
                    Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                        Err(ServerError::RoundCommit(format!("shard {peer}: {}", status.message())))
                    }
                    Err(status) => {
                        Err(ServerError::PeerUnavailable { shard: *peer, message: status.message().to_string() })
                    }
                }
            }
        });
        futures::future::try_join_all(checks).await.map(|_| ())
    }

    /// Sends a closed round to every peer, retrying each until it has applied
    /// it (a repeated commit is harmless there), without waiting.
    pub fn share_commit(&self, model: &str, closing: &Closing) {
        for (peer, stub) in self.current().iter() {
            let (mut stub, peer) = (stub.clone(), *peer);
            let request = pb::CommitRoundRequest {
                model: model.to_string(),
                round: closing.round,
                clients: closing.clients.clone(),
            };
            tokio::spawn(async move {
                let mut pause = Duration::from_millis(20);
                loop {
                    match stub.commit_round(request.clone()).await {
                        Ok(_) => return,
                        Err(status) => {
                            tracing::warn!(peer, round = request.round, code = ?status.code(), "round commit not applied by the peer yet: {}", status.message());
                        }
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_COMMIT_BACKOFF);
                }
            });
        }
    }

    /// Sends this shard's part of a step's norm to every peer that takes part
    /// in it, retrying each until it is taken, without waiting. A peer in
    /// another epoch (a rollback: the step is redone) ends the retries, and so
    /// does `current` turning false (this shard's copy of the model was rolled
    /// back or removed).
    pub fn share_norm(&self, part: &NormPart, to: &[u32], current: impl Fn() -> bool + Clone + Send + 'static) {
        for (peer, stub) in self.current().iter().filter(|(peer, _)| to.contains(peer)) {
            let (mut stub, peer, current) = (stub.clone(), *peer, current.clone());
            let request = pb::StepNormRequest {
                model: part.model.clone(),
                epoch: part.epoch,
                step: part.step,
                shard: part.shard,
                sum_of_squares: part.sum_of_squares(),
                blocks: part
                    .blocks
                    .iter()
                    .map(|&((tensor, block), sum_of_squares)| pb::BlockNorm {
                        tensor: tensor as u32,
                        block,
                        sum_of_squares,
                    })
                    .collect(),
            };
            tokio::spawn(async move {
                let mut pause = Duration::from_millis(5);
                let mut attempts = 0u32;
                while current() {
                    let status = match stub.share_step_norm(request.clone()).await {
                        Ok(_) => return,
                        Err(status) => status,
                    };
                    // A peer without the model (restarted, restoring) gets it back or forces a rollback.
                    if status
                        .metadata()
                        .get(ps_proto::errors::ERROR_KIND_HEADER)
                        .is_some_and(|k| k == ps_proto::errors::EPOCH_CHANGED)
                    {
                        return;
                    }
                    attempts += 1;
                    // A peer that is restarting or recovering is expected; say so only if it lasts.
                    if attempts == 20 {
                        tracing::warn!(peer, model = request.model, step = request.step, code = ?status.code(), "the peer has not taken this shard's part of the step's gradient norm yet; still trying: {}", status.message());
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_COMMIT_BACKOFF);
                }
            });
        }
    }

    /// Calls every peer at once and returns each one's answer, by peer index.
    async fn ask_all<T, F, Fut>(&self, call: F) -> Vec<(u32, Result<T, tonic::Status>)>
    where
        F: Fn(PeerStub) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let stubs = self.current();
        let calls = stubs.iter().map(|(peer, stub)| {
            let answer = call(stub.clone());
            async move { (*peer, answer.await.map(tonic::Response::into_inner)) }
        });
        futures::future::join_all(calls).await
    }

    /// Each peer's checkpoints of `model`, versions and members.
    pub async fn list_checkpoints(
        &self,
        model: &str,
    ) -> Vec<(u32, Result<pb::ListCheckpointsResponse, tonic::Status>)> {
        self.list_checkpoints_with(pb::ListCheckpointsRequest { model: model.to_string(), ..Default::default() }).await
    }

    /// Asks every peer for its checkpoints of a model, with a pin or a commit
    /// of the cluster's recovery point (see `ListCheckpointsRequest`).
    pub async fn list_checkpoints_with(
        &self,
        request: pb::ListCheckpointsRequest,
    ) -> Vec<(u32, Result<pb::ListCheckpointsResponse, tonic::Status>)> {
        self.ask_all(|mut stub| {
            let request = request.clone();
            async move { stub.list_checkpoints(request).await }
        })
        .await
    }

    /// Sends a checkpoint request (a version to schedule, and whether to wait for its write) to every peer.
    pub async fn checkpoint(
        &self,
        request: pb::CheckpointRequest,
    ) -> Vec<(u32, Result<pb::CheckpointResponse, tonic::Status>)> {
        self.ask_all(|mut stub| {
            let request = request.clone();
            async move { stub.checkpoint(request).await }
        })
        .await
    }

    /// Tells every peer to roll `model` back to its checkpoint at `version` under `epoch`.
    pub async fn rollback(
        &self,
        model: &str,
        version: u64,
        epoch: u64,
    ) -> Vec<(u32, Result<pb::RollbackResponse, tonic::Status>)> {
        let request = pb::RollbackRequest { model: model.to_string(), version, epoch };
        self.ask_all(|mut stub| {
            let request = request.clone();
            async move { stub.rollback(request).await }
        })
        .await
    }

    /// Each peer's status of `model`.
    pub async fn status(&self, model: &str) -> Vec<(u32, Result<pb::GetStatusResponse, tonic::Status>)> {
        let request = pb::GetStatusRequest { model: model.to_string() };
        self.ask_all(|mut stub| {
            let request = request.clone();
            async move { stub.get_status(request).await }
        })
        .await
    }
}
