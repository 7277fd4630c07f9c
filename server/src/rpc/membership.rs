//! Membership: `JoinWorker` (a rank that agrees on every shard),
//! `Heartbeat` and `LeaveWorker` (with the reason a peer dropped a worker).

use ps_proto::pb;

use super::service::ParameterService;
use super::streams::check_worker_name;
use crate::error::ServerError;
use crate::store::{DropReason, blocking};

impl ParameterService {
    /// Joins a worker with the rank it asks for (or the smallest free one).
    pub(super) fn join(&self, request: pb::JoinWorkerRequest) -> Result<pb::JoinWorkerResponse, ServerError> {
        check_worker_name(&request.worker_id)?;
        let model = self.registry.get(&request.model)?;
        model.check_serving()?;
        let rank = model.membership.join(&request.worker_id, request.rank).map_err(|reason| ServerError::Join {
            model: request.model.clone(),
            worker: request.worker_id.clone(),
            reason,
        })?;
        model.publish_live_workers();
        tracing::info!(model = request.model, worker = request.worker_id, rank, "worker joined");
        Ok(pb::JoinWorkerResponse {
            lease_ms: model.membership.lease().as_millis() as u64,
            version: model.version_range().0,
            rank,
        })
    }

    /// Renews a member's lease.
    pub(super) fn renew_lease(&self, request: pb::HeartbeatRequest) -> Result<pb::HeartbeatResponse, ServerError> {
        let model = self.registry.get(&request.model)?;
        if !model.membership.heartbeat(&request.worker_id) {
            return Err(model.not_a_member(&request.worker_id));
        }
        Ok(pb::HeartbeatResponse { lease_ms: model.membership.lease().as_millis() as u64 })
    }

    /// A member leaves (or a peer tells of one it dropped); steps waiting only for it complete.
    pub(super) async fn leave(&self, request: pb::LeaveWorkerRequest) -> Result<pb::LeaveWorkerResponse, ServerError> {
        let model = self.registry.get(&request.model)?;
        if !model.membership.leave(&request.worker_id) {
            return Err(model.not_a_member(&request.worker_id));
        }
        // A peer that dropped the worker says why, so every shard counts it the same.
        let told = match pb::LeaveReason::try_from(request.reason) {
            Ok(pb::LeaveReason::LeaseExpired) => Some(DropReason::LeaseExpired),
            Ok(pb::LeaveReason::MissedDeadline) => Some(DropReason::MissedDeadline),
            _ => None,
        };
        match told {
            Some(why) => {
                model.count_drops(why, 1);
                tracing::warn!(
                    model = request.model,
                    worker = request.worker_id,
                    ?why,
                    "worker dropped by a peer shard"
                );
            }
            None => tracing::info!(model = request.model, worker = request.worker_id, "worker left"),
        }
        // Steps that were waiting only for this worker can complete now.
        blocking(move || model.complete_ready_steps()).await?;
        Ok(pb::LeaveWorkerResponse {})
    }
}
