//! The thread that writes checkpoints, one at a time, off the shard's workers.

use std::sync::Arc;

use super::{CheckpointError, CheckpointStore};
use crate::store::{CheckpointPlan, CheckpointSink, ModelSnapshot};

/// Writes snapshots on a thread of its own, one at a time, in the order they come.
pub struct CheckpointWriter {
    queue: std::sync::mpsc::Sender<(ModelSnapshot, Arc<CheckpointPlan>)>,
}

impl CheckpointWriter {
    /// Starts the writer thread for `store`.
    pub fn start(store: CheckpointStore) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = std::sync::mpsc::channel::<(ModelSnapshot, Arc<CheckpointPlan>)>();
        std::thread::Builder::new().name("checkpoint-writer".into()).spawn(move || {
            for (snapshot, plan) in rx {
                let (model, version, epoch) = (snapshot.model.clone(), snapshot.version, snapshot.epoch);
                let mut result = store.write(snapshot);
                if result.is_ok() && plan.is_retired() {
                    // Written for a copy of the model that a rollback replaced meanwhile.
                    store.discard(&model, version);
                    result = Err(CheckpointError::Invalid {
                        path: store.root().to_path_buf(),
                        reason: "discarded: the model was rolled back while it was written".into(),
                    });
                }
                match &result {
                    Ok(report) => {
                        tracing::info!(
                            model,
                            version,
                            epoch,
                            path = report.path,
                            mb = report.bytes as f64 / 1e6,
                            seconds = report.seconds,
                            copy_seconds = report.copy_seconds,
                            "checkpoint written"
                        );
                        metrics::counter!(crate::metrics::CHECKPOINTS, "model" => model.clone(), "result" => "written")
                            .increment(1);
                        metrics::histogram!(crate::metrics::CHECKPOINT_SECONDS, "model" => model.clone())
                            .record(report.seconds);
                        metrics::gauge!(crate::metrics::CHECKPOINT_VERSION, "model" => model.clone())
                            .set(version as f64);
                    }
                    Err(error) => {
                        tracing::error!(model, version, %error, "checkpoint failed");
                        metrics::counter!(crate::metrics::CHECKPOINTS, "model" => model.clone(), "result" => "failed")
                            .increment(1);
                    }
                }
                plan.finished(version, result.map_err(|e| e.to_string()));
            }
        })?;
        Ok(Arc::new(Self { queue: tx }))
    }
}

impl CheckpointSink for CheckpointWriter {
    fn submit(&self, snapshot: ModelSnapshot, plan: Arc<CheckpointPlan>) {
        if self.queue.send((snapshot, plan)).is_err() {
            tracing::error!("the checkpoint writer has stopped; checkpoint not written");
        }
    }
}
