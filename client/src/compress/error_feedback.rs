//! Error feedback with the scaled sign compressor, worker side
//! (algorithms.md §6): the residual of what compression dropped stays on the
//! worker and is added back before the next compression.

use ps_proto::codec;
use ps_proto::pb::Encoding;

use crate::Tensors;

/// Error feedback with the scaled sign compressor, per tensor:
/// `q = η g + e;  Δ = (‖q‖₁/d)·sign(q);  e ← q − Δ`. The worker pushes q as
/// sign1 (the client sends its signs and ‖q‖₁/d as the scale, which is Δ
/// exactly) and the server applies `w ← w − mean Δ` (SGD with lr 1).
#[derive(Clone, Debug)]
pub struct ErrorFeedback {
    lr: f32,
    residual: Tensors,
}

impl ErrorFeedback {
    /// Zero residual with learning rate `lr` folded in before compression.
    pub fn new(lr: f32) -> Self {
        Self { lr, residual: Tensors::new() }
    }

    /// Returns q = η g + e for every tensor and keeps the new residual q − Δ,
    /// with Δ decoded exactly as the server will decode it.
    pub fn compress(&mut self, grads: &Tensors) -> Tensors {
        let mut pushed = Tensors::new();
        for (name, g) in grads {
            let e = self.residual.entry(name.clone()).or_insert_with(|| vec![0.0; g.len()]);
            e.resize(g.len(), 0.0);
            let q: Vec<f32> = g.iter().zip(e.iter()).map(|(g, e)| self.lr * g + e).collect();
            let mut delta = vec![0.0; q.len()];
            let sent = codec::decode_into(
                Encoding::Sign1,
                &codec::encode(Encoding::Sign1, &q),
                codec::mean_abs(&q),
                &mut delta,
            );
            debug_assert!(sent.is_ok());
            for ((e, q), d) in e.iter_mut().zip(&q).zip(&delta) {
                *e = q - d;
            }
            pushed.insert(name.clone(), q);
        }
        pushed
    }

    /// The residual buffers.
    pub fn state(&self) -> &Tensors {
        &self.residual
    }

    pub(super) fn state_mut(&mut self) -> &mut Tensors {
        &mut self.residual
    }
}
