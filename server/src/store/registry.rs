//! The models this shard serves, by name, and where this shard sits in the cluster.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

use super::cluster::{Cluster, ShardIdentity};
use super::model::{Model, NormPart};
use crate::error::ServerError;
use crate::spec::ModelSpec;

/// All models of this shard.
pub struct Registry {
    /// Where this shard sits in the cluster, now and after a reshard under way.
    pub cluster: Arc<Cluster>,
    /// Lease given to joining workers.
    pub lease: Duration,
    models: RwLock<HashMap<String, Arc<Model>>>,
    /// Woken when a model is added, so the reaper can shorten its period at once
    /// for a model with a short step deadline instead of polling for new models.
    added: tokio::sync::Notify,
    /// Every model's parts of its steps' norms, for the peers (`GRAD_CLIP_MEAN`).
    norm_outbox: tokio::sync::mpsc::UnboundedSender<NormPart>,
    /// Its other end, taken once by the task that sends them.
    norm_parts: parking_lot::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<NormPart>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new(identity: ShardIdentity, lease: Duration) -> Self {
        let (norm_outbox, norm_parts) = tokio::sync::mpsc::unbounded_channel();
        Self {
            cluster: Arc::new(Cluster::new(identity)),
            lease,
            models: RwLock::new(HashMap::new()),
            added: tokio::sync::Notify::new(),
            norm_outbox,
            norm_parts: parking_lot::Mutex::new(Some(norm_parts)),
        }
    }

    /// The parts of the steps' norms this shard's models send to the peers;
    /// `None` once taken (one task sends them).
    pub fn take_norm_parts(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<NormPart>> {
        self.norm_parts.lock().take()
    }

    /// The current shard list and this shard's place in it.
    pub fn identity(&self) -> Arc<ShardIdentity> {
        self.cluster.identity()
    }

    /// Number of shards in the cluster.
    pub fn num_shards(&self) -> u32 {
        self.cluster.identity().count()
    }

    /// A registered model.
    pub fn get(&self, name: &str) -> Result<Arc<Model>, ServerError> {
        self.models.read().get(name).cloned().ok_or_else(|| ServerError::UnknownModel(name.to_string()))
    }

    /// The registered model with this name if it was registered with the same spec.
    pub fn existing(&self, spec: &ModelSpec) -> Result<Option<Arc<Model>>, ServerError> {
        match self.models.read().get(&spec.name) {
            Some(model) if model.spec.fingerprint == spec.fingerprint => Ok(Some(model.clone())),
            Some(_) => Err(ServerError::SpecConflict(spec.name.clone())),
            None => Ok(None),
        }
    }

    /// Adds a model unless one with the same name won a race; returns whether it was added.
    pub fn insert(&self, model: Model) -> Result<(bool, Arc<Model>), ServerError> {
        let mut models = self.models.write();
        if let Some(existing) = models.get(model.name()) {
            return if existing.spec.fingerprint == model.spec.fingerprint {
                Ok((false, existing.clone()))
            } else {
                Err(ServerError::SpecConflict(model.name().to_string()))
            };
        }
        model.set_outbox(self.norm_outbox.clone());
        let model = Arc::new(model);
        models.insert(model.name().to_string(), model.clone());
        self.added.notify_waiters();
        Ok((true, model))
    }

    /// Puts `model` in place of the model of the same name (a rollback), returning it shared.
    pub fn replace(&self, model: Model) -> Arc<Model> {
        model.set_outbox(self.norm_outbox.clone());
        let model = Arc::new(model);
        self.models.write().insert(model.name().to_string(), model.clone());
        self.added.notify_waiters();
        model
    }

    /// Takes a model out of this shard (one dropped from the shard list by a reshard).
    pub fn remove(&self, name: &str) -> Option<Arc<Model>> {
        self.models.write().remove(name)
    }

    /// Notified whenever a model is added.
    pub fn model_added(&self) -> &tokio::sync::Notify {
        &self.added
    }

    /// Every model, sorted by name.
    pub fn models(&self) -> Vec<Arc<Model>> {
        let mut models: Vec<_> = self.models.read().values().cloned().collect();
        models.sort_by(|a, b| a.name().cmp(b.name()));
        models
    }
}
