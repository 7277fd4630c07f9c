//! Built-in training tasks: what the training loop needs from a model
//! ([`Trainable`]), which tasks exist ([`TaskKind`]), and their tensors as the
//! servers are told about them. The models live in [`mlp`] and [`lm`].
//! Weights are named like a PyTorch state_dict (`fc1.weight` with shape
//! `(out, in)`), so external trainers can share a model with the built-in workers.

pub mod lm;
pub mod mlp;

use std::sync::Arc;

use candle_core::Device;
use clap::ValueEnum;
use ps_client::Tensors;
use ps_client::spec::TensorSpec;

/// Which built-in task a worker trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TaskKind {
    /// Handwritten digits (8x8, 10 classes), MLP 64-64-10 with cross-entropy.
    Digits,
    /// Synthetic linear regression (8 features), mean squared error.
    Synthetic,
    /// Byte-level transformer language model on Python source text.
    CharLm,
}

/// What the training loop needs from a task.
pub trait Trainable: Send + Sync {
    /// Examples (or sequence start positions) in this worker's training share.
    fn train_len(&self) -> usize;
    /// Examples in the held-out set.
    fn test_len(&self) -> usize;
    /// Loss on a minibatch of training examples and the gradient of every tensor.
    fn loss_and_grads(&self, weights: &Tensors, batch: &[usize]) -> anyhow::Result<(f32, Tensors)>;
    /// Loss (and accuracy, for classification) on the held-out set.
    fn evaluate(&self, weights: &Tensors) -> anyhow::Result<Evaluation>;
}

/// Loss and, for classification, accuracy on a data set.
#[derive(Clone, Copy, Debug)]
pub struct Evaluation {
    /// Mean loss.
    pub loss: f32,
    /// Fraction classified correctly (classification tasks).
    pub accuracy: Option<f32>,
}

/// Loads the data of `kind` and keeps this rank's share of the training set.
pub fn load(kind: TaskKind, rank: usize, world: usize, device: Device) -> anyhow::Result<Arc<dyn Trainable>> {
    Ok(match kind {
        TaskKind::CharLm => Arc::new(lm::CharLm::new(lm::SHAPE, rank, world, device)?),
        TaskKind::Digits | TaskKind::Synthetic => Arc::new(mlp::Mlp::new(kind, rank, world, device)?),
    })
}

impl TaskKind {
    /// The model's tensors and their seeded initialization.
    pub fn tensor_specs(self, seed: u64) -> Vec<TensorSpec> {
        match self {
            TaskKind::CharLm => lm::tensor_specs(lm::SHAPE, seed),
            TaskKind::Digits | TaskKind::Synthetic => mlp::tensor_specs(mlp::layers(self), seed),
        }
    }

    /// Default model name on the server.
    pub fn model_name(self) -> &'static str {
        match self {
            TaskKind::Digits => "digits-mlp",
            TaskKind::Synthetic => "synthetic-linear",
            TaskKind::CharLm => "char-lm",
        }
    }
}
