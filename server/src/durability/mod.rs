//! How a shard keeps its models across restarts: checkpoints on disk
//! ([`checkpoint`]: files only), and the protocol that keeps the shards'
//! copies one history. Any shard can be asked for a checkpoint; it picks one
//! version for the whole cluster and schedules it on every shard
//! (`schedule`). A restarted shard restores its newest intact checkpoint and
//! agrees with every peer on the newest version all of them hold; every shard
//! rolls back to it under a new epoch (`recovery`). A shard with no copy of a
//! model its peers train refuses to register it afresh (that would fork the
//! model). Nothing here knows the gRPC service; peers are reached through
//! [`Peers`].

pub mod checkpoint;
mod moves;
mod recovery;
mod schedule;

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use ps_proto::pb;

use self::checkpoint::{CheckpointError, CheckpointStore, CheckpointWriter};
use crate::config::CheckpointOptions;
use crate::error::ServerError;
use crate::limits::{self, ShardBounds};
use crate::metrics as m;
use crate::peers::Peers;
use crate::spec::ModelSpec;
use crate::store::{CheckpointPlan, CheckpointSink, Model, ModelSnapshot, Registry, blocking};

/// How a shard keeps its models across restarts: its checkpoint store and
/// writer, its cadence, and what it needs to agree with its peers.
#[derive(Clone)]
pub struct Durability {
    store: Option<CheckpointStore>,
    writer: Option<Arc<CheckpointWriter>>,
    every: u64,
    interval: Duration,
    allow_fresh_rejoin: bool,
    /// Models with checkpoints here of which none reads back, and why: they
    /// are not registered afresh, which would lose the run and prune them.
    unrestorable: Arc<parking_lot::Mutex<std::collections::BTreeMap<String, String>>>,
    /// One rollback or reshard phase at a time.
    rolling_back: Arc<tokio::sync::Mutex<()>>,
    /// Online reshard: this shard's copies of models under the new shard list, until SWITCH.
    adopted: Arc<parking_lot::Mutex<std::collections::HashMap<String, Model>>>,
    /// Online reshard: when a prepared change not switched by then is aborted.
    reshard_deadline: Arc<parking_lot::Mutex<Option<std::time::Instant>>>,
    registry: Arc<Registry>,
    peers: Peers,
    bounds: Arc<ShardBounds>,
}

/// The validated spec a snapshot (from disk or from a peer) carries in its wire form.
fn spec_of(snapshot: &ModelSnapshot) -> Result<ModelSpec, ServerError> {
    let wire = pb::ModelSpec::decode(snapshot.spec.as_slice())
        .map_err(|e| checkpoint_error(&snapshot.model, format!("spec.pb does not decode: {e}")))?;
    ModelSpec::try_from(wire)
}

fn checkpoint_error(model: &str, reason: impl ToString) -> ServerError {
    ServerError::Checkpoint { model: model.to_string(), reason: reason.to_string() }
}

impl Durability {
    /// Checkpoints as `options` say, for the models of `registry`, agreeing
    /// with `peers`; restored models count against `bounds`. A directory
    /// holding checkpoints of another shard or cluster size is refused.
    pub fn new(
        options: &CheckpointOptions,
        registry: Arc<Registry>,
        peers: Peers,
        bounds: Arc<ShardBounds>,
    ) -> Result<Self, CheckpointError> {
        let (shard, num_shards) = (registry.identity().index, registry.num_shards());
        let (store, writer) = match &options.dir {
            Some(dir) => {
                let store = CheckpointStore::new(dir.clone(), options.keep, shard, num_shards)?;
                store.check_layout()?;
                let writer = CheckpointWriter::start(store.clone())
                    .map_err(|source| CheckpointError::Io { path: dir.clone(), source })?;
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
            unrestorable: Arc::default(),
            rolling_back: Arc::default(),
            adopted: Arc::default(),
            reshard_deadline: Arc::default(),
            registry,
            peers,
            bounds,
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

    /// A model rebuilt from a snapshot under `epoch` (not yet shared).
    fn rebuild(&self, snapshot: &ModelSnapshot, epoch: u64) -> Result<Model, ServerError> {
        let spec = spec_of(snapshot)?;
        let identity = self.registry.identity();
        let model = Model::new(spec, identity.index, self.registry.num_shards(), self.registry.lease)
            .with_checkpoints(epoch, self.plan());
        model.restore(snapshot)?;
        if let Some(store) = &self.store {
            model.checkpoints.note_on_disk(&store.versions(&snapshot.model));
        }
        metrics::gauge!(m::EPOCH, "model" => snapshot.model.clone()).set(epoch as f64);
        Ok(model)
    }

    /// At start: restores every model's newest intact checkpoint, marked as
    /// recovering, and starts agreeing with the peers on where to continue.
    pub async fn restore_from_disk(&self) {
        let Some(store) = self.store.clone() else { return };
        let durability = self.clone();
        let restored = blocking(move || {
            let mut restored = Vec::new();
            for name in store.models() {
                let snapshot = match store.load_newest(&name) {
                    Ok(snapshot) => snapshot,
                    Err(failures) => {
                        let reason = match failures.first() {
                            Some((version, error)) => format!(
                                "versions {:?} are on disk but none reads back intact (version {version}: {error})",
                                failures.iter().rev().map(|(v, _)| *v).collect::<Vec<_>>()
                            ),
                            None => "its directory holds no complete checkpoint".to_string(),
                        };
                        tracing::error!(
                            model = name,
                            reason,
                            "no intact checkpoint of the model; it is not restored, and registering it is refused"
                        );
                        durability.unrestorable.lock().insert(name, reason);
                        continue;
                    }
                };
                match durability.rebuild(&snapshot, snapshot.epoch) {
                    Ok(model) => {
                        tracing::info!(
                            model = name,
                            version = snapshot.version,
                            epoch = snapshot.epoch,
                            blocks = snapshot.blocks.len(),
                            "restored from checkpoint; agreeing with the peers on the version to continue from"
                        );
                        model.set_recovering(true);
                        let footprint = limits::footprint(&model.spec, durability.registry.num_shards());
                        durability.bounds.models.record_restored(footprint);
                        restored.push(durability.registry.replace(model));
                    }
                    Err(error) => tracing::error!(model = name, %error, "could not restore the checkpoint"),
                }
            }
            restored
        })
        .await
        .unwrap_or_default();
        for model in restored {
            let durability = self.clone();
            tokio::spawn(async move { durability.recover(model.name().to_string()).await });
        }
    }

    /// What this shard holds of a model, for a peer that is recovering or scheduling.
    pub fn checkpoints_held(&self, request: &pb::ListCheckpointsRequest) -> pb::ListCheckpointsResponse {
        let name = request.model.as_str();
        let pinned = match (&self.store, request.pin) {
            (Some(store), Some(version)) => store.pin(name, version),
            _ => false,
        };
        if let (Ok(model), Some(version)) = (self.registry.get(name), request.commit) {
            self.commit_common(&model, version, false);
        }
        let versions = self.store.as_ref().map(|s| s.versions(name)).unwrap_or_default();
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
                    pinned,
                }
            }
            Err(_) => pb::ListCheckpointsResponse { versions, pinned, ..Default::default() },
        }
    }

    /// Refuses to register afresh a model that a peer holds past version 0
    /// (this shard restarted without its copy, and a fresh one would fork the
    /// run), or whose checkpoints here could not be restored (every shard may
    /// have lost it at once; a fresh one would lose the run and prune them).
    pub async fn refuse_fork(&self, name: &str) -> Result<(), ServerError> {
        if let Some(reason) = self.unrestorable.lock().get(name) {
            let dir = self.store.as_ref().map(|s| s.root().display().to_string()).unwrap_or_default();
            return Err(ServerError::Unrestorable {
                model: name.to_string(),
                shard: self.registry.identity().index,
                dir,
                reason: reason.clone(),
            });
        }
        if self.allow_fresh_rejoin || self.registry.num_shards() == 1 {
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
}
