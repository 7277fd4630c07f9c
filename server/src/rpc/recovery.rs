//! Checkpoints across shards and recovery after a restart. Any shard can be
//! asked for a checkpoint; it picks one version for the whole cluster (the
//! current one when no worker is live, else two past the highest block
//! version, which no worker can have pulled yet, so every worker still learns
//! from its pulls that it must save its own state there) and schedules it on
//! every shard. A restarted shard restores its newest intact checkpoint, then
//! asks every peer which checkpoints it holds; every shard rolls back to the
//! newest version all of them hold, under an epoch one above any shard's, and
//! workers learn of it from `epoch-changed`. Until then the restarted shard
//! answers `recovering`. A shard with no copy of a model its peers train
//! refuses to register it afresh (that would fork the model).

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use ps_proto::pb;

use super::service::{ParameterService, blocking};
use crate::checkpoint::{CheckpointStore, CheckpointWriter};
use crate::config::CheckpointOptions;
use crate::error::ServerError;
use crate::limits;
use crate::metrics as m;
use crate::spec::ModelSpec;
use crate::store::{CheckpointPlan, CheckpointSink, Model, ModelSnapshot};

/// How a shard keeps its models across restarts.
pub struct Durability {
    store: Option<CheckpointStore>,
    writer: Option<Arc<CheckpointWriter>>,
    every: u64,
    interval: Duration,
    allow_fresh_rejoin: bool,
    /// One rollback at a time.
    rolling_back: tokio::sync::Mutex<()>,
}

/// Attempts to pick a checkpoint version the run has not passed yet.
const SCHEDULE_ATTEMPTS: u32 = 5;
/// Pause between rounds of asking the peers during recovery.
const RECOVERY_PAUSE: Duration = Duration::from_millis(500);
/// Waiting for a requested checkpoint, when the request gives no timeout.
const DEFAULT_CHECKPOINT_WAIT: Duration = Duration::from_secs(60);

impl Durability {
    /// Checkpoints as `options` say, for shard `shard` of `num_shards`.
    pub fn new(options: &CheckpointOptions, shard: u32, num_shards: u32) -> std::io::Result<Self> {
        let (store, writer) = match &options.dir {
            Some(dir) => {
                let store = CheckpointStore::new(dir.clone(), options.keep, shard, num_shards)
                    .map_err(std::io::Error::other)?;
                let writer = CheckpointWriter::start(store.clone())?;
                (Some(store), Some(writer))
            }
            None => (None, None),
        };
        Ok(Self {
            store,
            writer,
            every: options.every,
            interval: options.interval,
            allow_fresh_rejoin: options.allow_fresh_rejoin,
            rolling_back: tokio::sync::Mutex::new(()),
        })
    }

    /// The checkpoint plan a new copy of a model gets.
    pub fn plan(&self) -> Arc<CheckpointPlan> {
        let sink = self.writer.clone().map(|w| w as Arc<dyn CheckpointSink>);
        Arc::new(CheckpointPlan::new(self.every, sink))
    }

    fn store(&self) -> Result<&CheckpointStore, ServerError> {
        self.store.as_ref().ok_or(ServerError::NoCheckpointDir)
    }
}

fn checkpoint_error(model: &str, reason: impl ToString) -> ServerError {
    ServerError::Checkpoint { model: model.to_string(), reason: reason.to_string() }
}

impl ParameterService {
    /// A model rebuilt from a snapshot under `epoch` (not yet shared).
    fn rebuild(&self, snapshot: &ModelSnapshot, epoch: u64) -> Result<Model, ServerError> {
        let wire = pb::ModelSpec::decode(snapshot.spec.as_slice())
            .map_err(|e| checkpoint_error(&snapshot.model, format!("spec.pb does not decode: {e}")))?;
        let spec = ModelSpec::try_from(wire)?;
        let identity = &self.registry.identity;
        let model = Model::new(spec, identity.index, self.registry.num_shards(), self.registry.lease)
            .with_checkpoints(epoch, self.durability.plan());
        model.restore(snapshot)?;
        if let Some(store) = &self.durability.store {
            model.checkpoints.note_on_disk(&store.versions(&snapshot.model));
        }
        metrics::gauge!(m::EPOCH, "model" => snapshot.model.clone()).set(epoch as f64);
        Ok(model)
    }

    /// At start: restores every model's newest intact checkpoint, marked as
    /// recovering, and starts agreeing with the peers on where to continue.
    pub async fn restore_from_disk(&self) {
        let Some(store) = self.durability.store.clone() else { return };
        let service = self.clone();
        let restored = blocking(move || {
            let mut restored = Vec::new();
            for name in store.models() {
                let Some(snapshot) = store.load_newest(&name) else {
                    tracing::error!(model = name, "no intact checkpoint of the model; it is not restored");
                    continue;
                };
                match service.rebuild(&snapshot, snapshot.epoch) {
                    Ok(model) => {
                        tracing::info!(
                            model = name,
                            version = snapshot.version,
                            epoch = snapshot.epoch,
                            blocks = snapshot.blocks.len(),
                            "restored from checkpoint; agreeing with the peers on the version to continue from"
                        );
                        model.set_recovering(true);
                        let footprint = limits::footprint(&model.spec, service.registry.num_shards());
                        service.bounds.models.record_restored(footprint);
                        restored.push(service.registry.replace(model));
                    }
                    Err(error) => tracing::error!(model = name, %error, "could not restore the checkpoint"),
                }
            }
            restored
        })
        .await
        .unwrap_or_default();
        for model in restored {
            let service = self.clone();
            tokio::spawn(async move { service.recover(model.name().to_string()).await });
        }
    }

    /// Agrees with every peer on the newest checkpoint all of them hold and rolls every shard back to it.
    async fn recover(&self, name: String) {
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
        let store = self.durability.store().map_err(|e| (e, None))?;
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
    pub(super) async fn roll_back(&self, request: pb::RollbackRequest) -> Result<pb::RollbackResponse, ServerError> {
        let _one_at_a_time = self.durability.rolling_back.lock().await;
        let current = self.registry.get(&request.model)?;
        if request.epoch <= current.epoch() && !current.is_recovering() {
            return Ok(pb::RollbackResponse { epoch: current.epoch(), version: current.version_range().0 });
        }
        let (from, to) = current.version_range();
        if current.is_recovering() && (from, to) == (request.version, request.version) {
            // Restored at start from exactly this checkpoint, and nothing applied since: no second read.
            current.resume_as(request.epoch.max(current.epoch()));
            metrics::gauge!(m::EPOCH, "model" => request.model.clone()).set(current.epoch() as f64);
            return Ok(pb::RollbackResponse { epoch: current.epoch(), version: from });
        }
        let store = self.durability.store()?.clone();
        let service = self.clone();
        let (name, version, epoch) = (request.model.clone(), request.version, request.epoch.max(current.epoch()));
        let live = (!current.is_recovering()).then(|| current.membership.ranks());
        let model = blocking(move || {
            let mut snapshot = store.load(&name, version).map_err(|e| checkpoint_error(&name, e))?;
            // A shard that kept running keeps its members; a restarted one takes the checkpoint's.
            if let Some(members) = live {
                snapshot.members = members;
            }
            service.rebuild(&snapshot, epoch)
        })
        .await??;
        let model = self.registry.replace(model);
        current.retire();
        // Checkpoints past the version belong to the abandoned run: a later recovery must not pick them.
        let (store, name) = (self.durability.store()?.clone(), request.model.clone());
        blocking(move || store.discard_after(&name, version)).await?;
        metrics::counter!(m::ROLLBACKS, "model" => request.model.clone()).increment(1);
        tracing::warn!(model = request.model, from, to = version, epoch, "rolled back to a checkpoint");
        Ok(pb::RollbackResponse { epoch: model.epoch(), version: model.version_range().0 })
    }

    /// What this shard holds of a model, for a peer that is recovering or scheduling.
    pub(super) fn checkpoints_held(&self, name: &str) -> pb::ListCheckpointsResponse {
        let versions = self.durability.store.as_ref().map(|s| s.versions(name)).unwrap_or_default();
        match self.registry.get(name) {
            Ok(model) => {
                let (version, max_version) = model.version_range();
                pb::ListCheckpointsResponse {
                    has_model: true,
                    versions,
                    epoch: model.epoch(),
                    version,
                    max_version,
                    live_workers: model.membership.live().len() as u32,
                    holds_blocks: !model.local_blocks().is_empty(),
                }
            }
            Err(_) => pb::ListCheckpointsResponse { versions, ..Default::default() },
        }
    }

    /// The Checkpoint RPC: schedules the version a peer chose, or chooses one for the cluster.
    pub(super) async fn checkpoint_model(
        &self,
        request: pb::CheckpointRequest,
    ) -> Result<pb::CheckpointResponse, ServerError> {
        let model = self.registry.get(&request.model)?;
        self.durability.store()?;
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
            let service = self.clone();
            let own_name = name.clone();
            let mut views = vec![blocking(move || service.checkpoints_held(&own_name)).await?];
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
            let request = pb::CheckpointRequest {
                model: name.clone(),
                version: Some(version),
                ahead: live,
                ..Default::default()
            };
            for (peer, answer) in self.peers.checkpoint(request).await {
                if let Err(status) = answer {
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

    /// Refuses to register afresh a model that a peer holds past version 0:
    /// this shard restarted without its copy, and a fresh one would fork the run.
    pub(super) async fn refuse_fork(&self, name: &str) -> Result<(), ServerError> {
        if self.durability.allow_fresh_rejoin || self.registry.num_shards() == 1 {
            return Ok(());
        }
        for (peer, answer) in self.peers.status(name).await {
            // A peer that is down or does not know the model cannot be forked from.
            let Ok(status) = answer else { continue };
            if let Some(held) = status.models.iter().find(|m| m.name == name && m.max_version > 0) {
                return Err(ServerError::NotRestored { model: name.to_string(), peer, version: held.max_version });
            }
        }
        Ok(())
    }

    /// Shard 0: every `--checkpoint-interval`, checkpoints every model that advanced since the last one.
    pub async fn checkpoint_periodically(&self) {
        let interval = self.durability.interval;
        if interval.is_zero() || self.durability.store.is_none() || self.registry.identity.index != 0 {
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
        if self.durability.store.is_none() {
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
}
