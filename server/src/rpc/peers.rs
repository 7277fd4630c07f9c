//! The shard's line to its peers. Each shard applies the same membership rules
//! (lease, step deadline, quorum), but by its own clock; so that a worker
//! dropped on one shard is dropped on all of them at once, rather than only
//! when each clock gets there, the dropping shard tells every peer with a
//! LeaveWorker, exactly as a leaving worker would. Best effort: a peer that is
//! down applies its own rules when it comes back.

use std::time::Duration;

use ps_proto::cluster::ShardHeaders;
use ps_proto::{ParameterServerClient, pb};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::store::{DropReason, ShardIdentity};

type PeerStub = ParameterServerClient<InterceptedService<Channel, ShardHeaders>>;

/// Lazily connected stubs of every other shard.
#[derive(Clone)]
pub struct Peers {
    stubs: Vec<(u32, PeerStub)>,
}

impl Peers {
    /// Stubs for every shard of `identity` but this one; addresses that do not
    /// parse are skipped with a warning (the shard still serves its clients).
    pub fn new(identity: &ShardIdentity, token: Option<&str>) -> Self {
        let count = identity.addresses.len();
        let stubs = identity
            .addresses
            .iter()
            .enumerate()
            .filter(|(index, _)| *index as u32 != identity.index)
            .filter_map(|(index, address)| {
                let uri = if address.contains("://") { address.clone() } else { format!("http://{address}") };
                let endpoint = match Endpoint::from_shared(uri) {
                    Ok(endpoint) => endpoint,
                    Err(error) => {
                        tracing::warn!(peer = index, address, %error, "peer address does not parse; drops will not be shared with it");
                        return None;
                    }
                };
                // The shard's own token was accepted at startup, so it is printable.
                let headers = ShardHeaders::new(token, index, count).ok()?;
                let channel = endpoint.connect_timeout(Duration::from_secs(2)).tcp_nodelay(true).connect_lazy();
                Some((index as u32, ParameterServerClient::with_interceptor(channel, headers)))
            })
            .collect();
        Self { stubs }
    }

    /// Tells every peer that `workers` were dropped from `model` and why, without waiting for the answers.
    pub fn share_drops(&self, model: &str, workers: &[String], why: DropReason) {
        let reason = match why {
            DropReason::LeaseExpired => pb::LeaveReason::LeaseExpired,
            DropReason::MissedDeadline => pb::LeaveReason::MissedDeadline,
        } as i32;
        for (peer, stub) in &self.stubs {
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
}
