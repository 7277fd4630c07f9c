//! Operations: `GetStatus`, and the admin calls `Checkpoint`,
//! `ListCheckpoints` and `Rollback` (which the durability layer answers) and
//! `Shutdown`.

use ps_proto::pb;
use tonic::Status;

use super::convert;
use super::service::ParameterService;

impl ParameterService {
    /// Every model's status on this shard (or one model's), with the shard's limits.
    pub(super) fn status(&self, request: pb::GetStatusRequest) -> Result<pb::GetStatusResponse, Status> {
        let models =
            if request.model.is_empty() { self.registry.models() } else { vec![self.registry.get(&request.model)?] };
        let models = models.iter().map(|model| convert::model_status(model)).collect();
        Ok(pb::GetStatusResponse {
            shard_index: self.registry.identity().index,
            num_shards: self.registry.num_shards(),
            models,
            limits: Some(convert::shard_limits(&self.bounds)),
            local: self.local.as_ref().map(|local| local.advertised()),
        })
    }

    /// Asks `serve` to stop as on SIGTERM (a last checkpoint, then exit).
    pub(super) fn stop(&self) {
        tracing::info!("shutdown asked over gRPC");
        // Stored if `serve` is not waiting yet, so the request is never lost.
        self.shutdown.notify_one();
    }
}
