//! What the training loop needs from a model, whatever it is: the contract
//! between `train` and the built-in models.

use ps_client::Tensors;

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
