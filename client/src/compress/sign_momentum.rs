//! Signum with majority vote, worker side (algorithms.md §5): each worker
//! keeps its own momentum and pushes its signs; the servers vote.

use crate::Tensors;

/// Signum with majority vote, worker side: `m ← β m + (1−β) g`; the worker
/// pushes sign1(m) and the server votes. With β = 0 this is signSGD.
#[derive(Clone, Debug)]
pub struct SignMomentum {
    beta: f32,
    momentum: Tensors,
}

impl SignMomentum {
    /// Zero momentum with decay `beta`.
    pub fn new(beta: f32) -> Self {
        Self { beta, momentum: Tensors::new() }
    }

    /// Folds `grads` into the momentum and returns it: what to push as signs.
    pub fn update(&mut self, grads: &Tensors) -> &Tensors {
        for (name, g) in grads {
            let m = self.momentum.entry(name.clone()).or_insert_with(|| vec![0.0; g.len()]);
            m.resize(g.len(), 0.0);
            let (beta, keep) = (self.beta, 1.0 - self.beta);
            for (m, g) in m.iter_mut().zip(g) {
                *m = beta * *m + keep * g;
            }
        }
        &self.momentum
    }

    /// The momentum buffers.
    pub fn state(&self) -> &Tensors {
        &self.momentum
    }

    pub(super) fn state_mut(&mut self) -> &mut Tensors {
        &mut self.momentum
    }
}
