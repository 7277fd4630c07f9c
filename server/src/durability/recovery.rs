//! Recovery after a restart: the restarted shard asks every peer which
//! checkpoints it holds, and every shard rolls back to the newest version all
//! of them hold, under an epoch one above any shard's. Workers learn of it
//! from `epoch-changed`; until then the restarted shard answers `recovering`.

use std::time::Duration;

use ps_proto::pb;

use super::{Durability, checkpoint_error};
use crate::error::ServerError;
use crate::metrics as m;
use crate::store::blocking;

/// Pause between rounds of asking the peers during recovery.
const RECOVERY_PAUSE: Duration = Duration::from_millis(500);

impl Durability {
    /// Agrees with every peer on the newest checkpoint all of them hold and rolls every shard back to it.
    pub(super) async fn recover(&self, name: String) {
        let mut refused: Vec<u64> = Vec::new();
        loop {
            match self.try_recover(&name, &refused).await {
                Ok((version, epoch)) => {
                    tracing::info!(
                        model = name,
                        version,
                        epoch,
                        "recovered: every shard continues from this checkpoint"
                    );
                    return;
                }
                Err((error, bad)) => {
                    tracing::warn!(model = name, %error, "recovery not finished; asking the peers again");
                    refused.extend(bad);
                }
            }
            tokio::time::sleep(RECOVERY_PAUSE).await;
        }
    }

    async fn try_recover(&self, name: &str, refused: &[u64]) -> Result<(u64, u64), (ServerError, Option<u64>)> {
        let store = self.store().map_err(|e| (e, None))?;
        let mut common: Vec<u64> = store.versions(name);
        let own = self.registry.get(name).map_err(|e| (e, None))?;
        let mut epoch = own.epoch();
        for (peer, answer) in self.peers.list_checkpoints(name).await {
            let held = answer.map_err(|status| {
                (ServerError::PeerUnavailable { shard: peer, message: status.message().to_string() }, None)
            })?;
            if !held.has_model && held.versions.is_empty() {
                return Err((
                    checkpoint_error(name, format!("shard {peer} holds neither the model nor a checkpoint of it")),
                    None,
                ));
            }
            epoch = epoch.max(held.epoch);
            // A shard without blocks of the model fits any version; one that failed to restore it does not.
            if held.holds_blocks || !held.has_model {
                common.retain(|v| held.versions.contains(v));
            }
        }
        let Some(version) = common.into_iter().rev().find(|v| !refused.contains(v)) else {
            return Err((checkpoint_error(name, "no checkpoint version is held by every shard"), None));
        };
        let epoch = epoch + 1;
        tracing::info!(model = name, version, epoch, "rolling every shard back to the newest common checkpoint");
        for (peer, answer) in self.peers.rollback(name, version, epoch).await {
            if let Err(status) = answer {
                let bad = (status.code() == tonic::Code::Internal).then_some(version);
                return Err((ServerError::PeerUnavailable { shard: peer, message: status.message().to_string() }, bad));
            }
        }
        let request = pb::RollbackRequest { model: name.to_string(), version, epoch };
        let done = self.roll_back(request).await.map_err(|e| (e, Some(version)))?;
        Ok((done.version, done.epoch))
    }

    /// Restores this shard's checkpoint at the version asked and continues under the epoch asked.
    pub async fn roll_back(&self, request: pb::RollbackRequest) -> Result<pb::RollbackResponse, ServerError> {
        let _one_at_a_time = self.rolling_back.lock().await;
        let current = self.registry.get(&request.model)?;
        if request.epoch <= current.epoch() && !current.is_recovering() {
            return Ok(pb::RollbackResponse { epoch: current.epoch(), version: current.version_range().0 });
        }
        let (from, to) = current.version_range();
        if current.is_recovering() && (from, to) == (request.version, request.version) {
            // Restored at start from exactly this checkpoint, and nothing applied since: no second read.
            current.resume_as(request.epoch.max(current.epoch()));
            self.commit_common(&current, from, true);
            metrics::gauge!(m::EPOCH, "model" => request.model.clone()).set(current.epoch() as f64);
            return Ok(pb::RollbackResponse { epoch: current.epoch(), version: from });
        }
        let store = self.store()?.clone();
        let durability = self.clone();
        let (name, version, epoch) = (request.model.clone(), request.version, request.epoch.max(current.epoch()));
        // A shard that kept running keeps its members; a restarted one takes the
        // checkpoint's. The running copy refuses requests while the checkpoint
        // loads (clients retry), and its members are read once it is loaded: read
        // before, a worker that joined or left meanwhile was lost or came back
        // (found by the 2 -> 3 -> 2 reshard test: a worker that had left came
        // back holding a rank another shard had given away).
        let keeps_members = !current.is_recovering();
        if keeps_members {
            current.set_recovering(true);
        }
        let running = current.clone();
        let rebuilt = blocking(move || {
            let mut snapshot = store.load(&name, version).map_err(|e| checkpoint_error(&name, e))?;
            if keeps_members {
                snapshot.members = running.membership.ranks();
            }
            durability.rebuild(&snapshot, epoch)
        })
        .await
        .and_then(|rebuilt| rebuilt);
        let model = match rebuilt {
            Ok(model) => model,
            Err(error) => {
                if keeps_members {
                    current.set_recovering(false);
                }
                return Err(error);
            }
        };
        let model = self.registry.replace(model);
        current.retire();
        // Every shard holds the version it rolled back to: until they all hold
        // a newer one, it is the recovery point, however many checkpoints
        // follow here (a peer whose writes fail may hold none of them).
        self.commit_common(&model, version, true);
        // Checkpoints past the version belong to the abandoned run: a later recovery must not pick them.
        let (store, name) = (self.store()?.clone(), request.model.clone());
        blocking(move || store.discard_after(&name, version)).await?;
        metrics::counter!(m::ROLLBACKS, "model" => request.model.clone()).increment(1);
        tracing::warn!(model = request.model, from, to = version, epoch, "rolled back to a checkpoint");
        Ok(pb::RollbackResponse { epoch: model.epoch(), version: model.version_range().0 })
    }
}
