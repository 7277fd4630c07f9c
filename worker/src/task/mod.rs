//! Built-in training tasks: which tasks exist ([`TaskKind`]), their tensors as
//! the servers are told about them, and loading one as a [`Trainable`]. The
//! models live in [`mlp`], [`lm`] and [`llama`], which know only the trait, not this list.
//! Weights are named like a PyTorch state_dict (`fc1.weight` with shape
//! `(out, in)`), so external trainers can share a model with the built-in workers.

pub mod llama;
pub mod lm;
pub mod mlp;
mod text;
mod trainable;

use std::sync::Arc;

use candle_core::Device;
use clap::ValueEnum;
use ps_client::spec::TensorSpec;

use self::mlp::MlpTask;
pub use self::trainable::{Evaluation, Trainable};

/// Which built-in task a worker trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TaskKind {
    /// Handwritten digits (8x8, 10 classes), MLP 64-64-10 with cross-entropy.
    Digits,
    /// Synthetic linear regression (8 features), mean squared error.
    Synthetic,
    /// Byte-level transformer language model on Python source text.
    CharLm,
    /// The Python client's LLaMA-style decoder (`paramserver.models.llama`) at `tiny`,
    /// 0.87 M parameters, on the same text.
    LlamaTiny,
    /// The LLaMA-style decoder at `small`, 4.95 M parameters.
    LlamaSmall,
    /// The LLaMA-style decoder at `base`, 85.3 M parameters (for a GPU).
    LlamaBase,
}

/// Loads the data of `kind` and keeps this rank's share of the training set.
pub fn load(kind: TaskKind, rank: usize, world: usize, device: Device) -> anyhow::Result<Arc<dyn Trainable>> {
    Ok(match kind {
        TaskKind::CharLm => Arc::new(lm::CharLm::new(lm::SHAPE, rank, world, device)?),
        TaskKind::LlamaTiny | TaskKind::LlamaSmall | TaskKind::LlamaBase => {
            Arc::new(llama::Llama::new(kind.llama_shape().expect("a LLaMA task"), rank, world, device)?)
        }
        TaskKind::Digits => Arc::new(mlp::Mlp::new(MlpTask::Digits, rank, world, device)?),
        TaskKind::Synthetic => Arc::new(mlp::Mlp::new(MlpTask::Synthetic, rank, world, device)?),
    })
}

impl TaskKind {
    /// The model's tensors and their seeded initialization.
    pub fn tensor_specs(self, seed: u64) -> Vec<TensorSpec> {
        match self {
            TaskKind::CharLm => lm::tensor_specs(lm::SHAPE, seed),
            TaskKind::LlamaTiny | TaskKind::LlamaSmall | TaskKind::LlamaBase => {
                llama::tensor_specs(self.llama_shape().expect("a LLaMA task"), seed)
            }
            TaskKind::Digits => MlpTask::Digits.tensor_specs(seed),
            TaskKind::Synthetic => MlpTask::Synthetic.tensor_specs(seed),
        }
    }

    /// Default model name on the server.
    pub fn model_name(self) -> &'static str {
        match self {
            TaskKind::Digits => "digits-mlp",
            TaskKind::Synthetic => "synthetic-linear",
            TaskKind::CharLm => "char-lm",
            TaskKind::LlamaTiny => "llama-tiny",
            TaskKind::LlamaSmall => "llama-small",
            TaskKind::LlamaBase => "llama-base",
        }
    }

    /// The decoder's shape, for the LLaMA tasks.
    pub fn llama_shape(self) -> Option<llama::LlamaShape> {
        match self {
            TaskKind::LlamaTiny => Some(llama::TINY),
            TaskKind::LlamaSmall => Some(llama::SMALL),
            TaskKind::LlamaBase => Some(llama::BASE),
            TaskKind::Digits | TaskKind::Synthetic | TaskKind::CharLm => None,
        }
    }
}
