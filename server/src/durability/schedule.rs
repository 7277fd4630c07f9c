//! Checkpoints at one version on every shard. The shard asked picks the
//! version: the current one when no worker is live, else two past the highest
//! block version, which no worker can have pulled yet, so every worker still
//! learns from its pulls that it must save its own state there. Also the
//! timer of shard 0 and the last checkpoint on SIGTERM.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ps_proto::pb;

use super::checkpoint::CheckpointStore;
use super::{Durability, checkpoint_error};
use crate::error::ServerError;
use crate::metrics as m;
use crate::store::{Model, blocking};

/// Attempts to pick a checkpoint version the run has not passed yet.
const SCHEDULE_ATTEMPTS: u32 = 5;
/// Waiting for a requested checkpoint, when the request gives no timeout.
const DEFAULT_CHECKPOINT_WAIT: Duration = Duration::from_secs(60);
/// How often a shard learns which checkpoint versions every shard holds.
pub const COMMON_CHECK: Duration = Duration::from_secs(2);

impl Durability {
    /// The Checkpoint RPC: schedules the version a peer chose, or chooses one for the cluster.
    pub async fn checkpoint_model(
        &self,
        request: pb::CheckpointRequest,
    ) -> Result<pb::CheckpointResponse, ServerError> {
        let model = self.registry.get(&request.model)?;
        self.store()?;
        let timeout = match request.timeout_ms {
            0 => DEFAULT_CHECKPOINT_WAIT,
            ms => Duration::from_millis(ms),
        };
        if let Some(version) = request.version {
            let scheduled = model.clone();
            let ahead = request.ahead;
            blocking(move || scheduled.schedule_checkpoint(version, ahead)).await??;
            if !request.wait {
                return Ok(pb::CheckpointResponse { version, ..Default::default() });
            }
            return self.own_part_written(&model, version, timeout).await;
        }
        let version = self.schedule_everywhere(&model).await?;
        if !request.wait {
            return Ok(pb::CheckpointResponse { version, ..Default::default() });
        }
        let mut done = self.own_part_written(&model, version, timeout).await?;
        // The checkpoint is complete once every shard wrote its part (they are scheduled already).
        let request = pb::CheckpointRequest {
            model: model.name().to_string(),
            version: Some(version),
            wait: true,
            timeout_ms: timeout.as_millis() as u64,
            ahead: false,
        };
        for (peer, answer) in self.peers.checkpoint(request).await {
            let part = answer
                .map_err(|status| checkpoint_error(model.name(), format!("shard {peer}: {}", status.message())))?;
            done.bytes += part.bytes;
            done.write_seconds = done.write_seconds.max(part.write_seconds);
            done.copy_seconds += part.copy_seconds;
        }
        Ok(done)
    }

    /// Waits until this shard has written its part of the checkpoint at `version`.
    async fn own_part_written(
        &self,
        model: &Model,
        version: u64,
        timeout: Duration,
    ) -> Result<pb::CheckpointResponse, ServerError> {
        match model.checkpoints.wait_written(version, timeout).await {
            Some(Ok(report)) => Ok(pb::CheckpointResponse {
                version,
                path: report.path,
                write_seconds: report.seconds,
                bytes: report.bytes,
                copy_seconds: report.copy_seconds,
            }),
            Some(Err(reason)) => Err(checkpoint_error(model.name(), reason)),
            None => Err(ServerError::CheckpointPending {
                model: model.name().to_string(),
                version,
                at: model.version_range().0,
                waited_ms: timeout.as_millis() as u64,
            }),
        }
    }

    /// Picks one version for a checkpoint of `model` and schedules it on every shard.
    async fn schedule_everywhere(&self, model: &Arc<Model>) -> Result<u64, ServerError> {
        let name = model.name().to_string();
        let mut last_error = None;
        for _ in 0..SCHEDULE_ATTEMPTS {
            let durability = self.clone();
            let own_name = name.clone();
            let own = pb::ListCheckpointsRequest { model: own_name, ..Default::default() };
            let mut views = vec![blocking(move || durability.checkpoints_held(&own)).await?];
            for (peer, answer) in self.peers.list_checkpoints(&name).await {
                views.push(answer.map_err(|status| ServerError::PeerUnavailable {
                    shard: peer,
                    message: status.message().to_string(),
                })?);
            }
            let highest = views.iter().filter(|v| v.holds_blocks).map(|v| v.max_version).max().unwrap_or(0);
            let live = views.iter().any(|v| v.live_workers > 0);
            // Two ahead: no worker can have pulled that version from any shard yet.
            let version = if live { highest + 2 } else { highest };
            let scheduled = model.clone();
            let mut result = blocking(move || scheduled.schedule_checkpoint(version, live)).await?;
            if let Err(held @ ServerError::Resharding { .. }) = result {
                // An online reshard holds the model: the caller retries once it is over.
                return Err(held);
            }
            let request = pb::CheckpointRequest {
                model: name.clone(),
                version: Some(version),
                ahead: live,
                ..Default::default()
            };
            for (peer, answer) in self.peers.checkpoint(request).await {
                if let Err(status) = answer {
                    let kind = status.metadata().get(ps_proto::errors::ERROR_KIND_HEADER);
                    if kind.is_some_and(|k| k == ps_proto::errors::RESHARDING) {
                        let reason = format!("shard {peer}: {}", status.message());
                        return Err(ServerError::Resharding { model: name, version, reason });
                    }
                    result = Err(checkpoint_error(&name, format!("shard {peer}: {}", status.message())));
                }
            }
            match result {
                Ok(()) => {
                    tracing::info!(model = name, version, "checkpoint scheduled on every shard");
                    return Ok(version);
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| checkpoint_error(&name, "could not schedule")))
    }

    /// Shard 0: every `--checkpoint-interval`, checkpoints every model that advanced since the last one.
    pub async fn checkpoint_periodically(&self) {
        let interval = self.interval;
        if interval.is_zero() || self.store.is_none() || self.registry.identity().index != 0 {
            return;
        }
        loop {
            tokio::time::sleep(interval).await;
            for model in self.registry.models() {
                let (_, highest) = model.version_range();
                let newest = model.checkpoints.newest_written().map_or(0, |r| r.version);
                // Nothing new since the last checkpoint, or one already on its way while workers train.
                let training = !model.membership.live().is_empty();
                if newest >= highest || model.is_recovering() || (training && model.checkpoints.has_pending()) {
                    continue;
                }
                if let Err(error) = self.schedule_everywhere(&model).await {
                    tracing::warn!(model = model.name(), %error, "timed checkpoint not scheduled");
                }
            }
        }
    }

    /// On SIGTERM: a checkpoint of every model at one version on every shard,
    /// waiting up to `grace` for this shard's part to be written.
    pub async fn checkpoint_before_exit(&self, grace: Duration) {
        if self.store.is_none() {
            return;
        }
        let deadline = tokio::time::Instant::now() + grace;
        for model in self.registry.models() {
            if model.is_recovering() {
                continue;
            }
            let version = match self.schedule_everywhere(&model).await {
                Ok(version) => version,
                Err(error) => {
                    tracing::error!(model = model.name(), %error, "no checkpoint at shutdown");
                    continue;
                }
            };
            tracing::info!(model = model.name(), version, "shutting down: waiting for the last checkpoint");
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match model.checkpoints.wait_written(version, left).await {
                Some(Ok(report)) => {
                    tracing::info!(model = model.name(), version, path = report.path, "last checkpoint written")
                }
                Some(Err(reason)) => tracing::error!(model = model.name(), version, reason, "last checkpoint failed"),
                None => tracing::error!(
                    model = model.name(),
                    version,
                    at = model.version_range().0,
                    "the run did not reach the last checkpoint within the shutdown grace; the previous one stands"
                ),
            }
        }
    }

    /// Keeps `version` of `model` on disk as the cluster's recovery point
    /// (letting go of the versions pinned before it; after a rollback to it,
    /// of every other pin), and reports it.
    pub(super) fn commit_common(&self, model: &Model, version: u64, rolled_back: bool) {
        if let Some(store) = &self.store {
            store.commit(model.name(), version, rolled_back);
            if let Some(committed) = store.committed(model.name()) {
                model.checkpoints.set_common(committed);
                metrics::gauge!(m::CHECKPOINT_COMMON_VERSION, "model" => model.name().to_string())
                    .set(committed as f64);
            }
        }
    }

    /// Shard 0: the newest version every shard holds becomes the cluster's
    /// recovery point in two phases, so some version is kept on every shard at
    /// every moment whatever `--checkpoint-keep` says (a shard whose writes
    /// failed for a while, then crashed, must still find a version its peers
    /// hold): every shard pins it if it still holds it, and only when all did,
    /// each is told it is committed and lets the older pins go. A shard that
    /// missed the commit keeps the pin, and a later commit releases it.
    async fn commit_newest_common(&self, store: &CheckpointStore, model: &Model) {
        let name = model.name().to_string();
        let (listing, own_name) = (store.clone(), name.clone());
        let mut common = blocking(move || listing.versions(&own_name)).await.unwrap_or_default();
        for (_, answer) in self.peers.list_checkpoints(&name).await {
            match answer {
                Ok(held) => common.retain(|v| held.versions.contains(v)),
                // A peer that is away: keep what is kept now.
                Err(_) => return,
            }
        }
        let Some(&newest) = common.last() else { return };
        if store.committed(&name).is_some_and(|committed| committed >= newest) {
            return;
        }
        let (pinning, own_name) = (store.clone(), name.clone());
        if !blocking(move || pinning.pin(&own_name, newest)).await.unwrap_or(false) {
            return;
        }
        let pin = pb::ListCheckpointsRequest { model: name.clone(), pin: Some(newest), commit: None };
        let answers = self.peers.list_checkpoints_with(pin).await;
        if !answers.iter().all(|(_, answer)| answer.as_ref().is_ok_and(|held| held.pinned)) {
            return; // a peer pruned it meanwhile, or is away: a newer one next time
        }
        self.commit_common(model, newest, false);
        let commit = pb::ListCheckpointsRequest { model: name, pin: None, commit: Some(newest) };
        self.peers.list_checkpoints_with(commit).await;
    }

    /// Every shard, every [`COMMON_CHECK`]: a warning when this shard's
    /// writes start or stop failing, the failing gauge; on shard 0, the
    /// cluster's recovery point moved to the newest version every shard holds
    /// ([`Durability::commit_newest_common`]).
    pub async fn keep_common_checkpoints(&self) {
        let Some(store) = self.store.clone() else { return };
        let mut reported: HashMap<String, Option<u64>> = HashMap::new();
        loop {
            tokio::time::sleep(COMMON_CHECK).await;
            for model in self.registry.models() {
                let name = model.name().to_string();
                let failing = model.checkpoints.failing();
                let seen = reported.entry(name.clone()).or_default();
                match (&failing, *seen) {
                    (Some((version, reason)), before) if before != Some(*version) => tracing::error!(
                        model = name,
                        version,
                        reason,
                        common = model.checkpoints.common(),
                        "checkpoint writes are failing on this shard; training goes on, and a recovery would go \
                         back to the newest version every shard holds (`common`)"
                    ),
                    (None, Some(_)) => tracing::info!(model = name, "checkpoint writes succeed again"),
                    _ => {}
                }
                *seen = failing.as_ref().map(|(version, _)| *version);
                metrics::gauge!(m::CHECKPOINT_FAILING, "model" => name.clone())
                    .set(f64::from(u8::from(failing.is_some())));
                if model.is_recovering() || self.registry.identity().index != 0 {
                    continue;
                }
                self.commit_newest_common(&store, &model).await;
            }
        }
    }
}
