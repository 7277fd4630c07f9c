//! Error feedback with the scaled sign compressor, worker side
//! (algorithms.md §6): the residual of what compression dropped stays on the
//! worker and is added back before the next compression.

#[cfg(doc)]
use ps_proto::codec;

use crate::Tensors;

/// Error feedback with the scaled sign compressor, per tensor:
/// `q = η g + e;  Δ = (‖q‖₁/d)·sign(q);  e ← q − Δ`. The worker pushes q as
/// sign1 (the client sends its signs and ‖q‖₁/d as the scale, which is Δ
/// exactly) and the server applies `w ← w − mean Δ` (SGD with lr 1).
#[derive(Debug)]
pub struct ErrorFeedback {
    lr: f32,
    residual: Tensors,
    /// The last q, kept so that every step reuses its buffers.
    pushed: Tensors,
}

/// A copy of the state (learning rate and residual); the reused push buffer starts empty.
impl Clone for ErrorFeedback {
    fn clone(&self) -> Self {
        Self { lr: self.lr, residual: self.residual.clone(), pushed: Tensors::new() }
    }
}

impl ErrorFeedback {
    /// Zero residual with learning rate `lr` folded in before compression.
    pub fn new(lr: f32) -> Self {
        Self { lr, residual: Tensors::new(), pushed: Tensors::new() }
    }

    /// Returns q = η g + e for every tensor and keeps the new residual q − Δ,
    /// with Δ exactly as the server will decode it: `±(‖q‖₁/d)` by the sign
    /// bit of q, the scale summed in f64 in element order as
    /// [`codec::mean_abs`] does. Two passes over reused buffers, since the
    /// residual update needs the scale of the whole tensor.
    pub fn compress(&mut self, grads: &Tensors) -> &Tensors {
        self.pushed.retain(|name, _| grads.contains_key(name));
        for (name, g) in grads {
            let e = self.residual.entry(name.clone()).or_insert_with(|| vec![0.0; g.len()]);
            e.resize(g.len(), 0.0);
            let q = self.pushed.entry(name.clone()).or_default();
            q.resize(g.len(), 0.0);
            let mut abs_sum = 0.0f64;
            for ((q, g), e) in q.iter_mut().zip(g).zip(e.iter()) {
                *q = self.lr * g + e;
                abs_sum += f64::from(q.abs());
            }
            let scale = if q.is_empty() { 0.0 } else { (abs_sum / q.len() as f64) as f32 };
            for (e, q) in e.iter_mut().zip(q.iter()) {
                *e = q - if *q < 0.0 { -scale } else { scale };
            }
        }
        &self.pushed
    }

    /// The residual buffers.
    pub fn state(&self) -> &Tensors {
        &self.residual
    }

    pub(super) fn state_mut(&mut self) -> &mut Tensors {
        &mut self.residual
    }
}

#[cfg(test)]
mod tests {
    use ps_proto::codec;
    use ps_proto::pb::Encoding;

    use super::*;

    /// The two-pass form against the definition: encode q as sign1, decode it
    /// with its mean absolute value, subtract; bit for bit, zeros and -0 included.
    #[test]
    fn residual_is_q_minus_the_decoded_signs_bit_for_bit() {
        let mut ef = ErrorFeedback::new(0.3);
        let mut reference = Tensors::new();
        let mut seed = 7u32;
        for step in 0..3 {
            let values: Vec<f32> = (0..1000)
                .map(|i| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    match i % 97 {
                        0 => 0.0,
                        1 => -0.0,
                        _ => (seed >> 8) as f32 / (1 << 24) as f32 - 0.5,
                    }
                })
                .collect();
            let grads: Tensors = [("w".to_string(), values), ("b".to_string(), vec![0.0; step])].into();
            let pushed = ef.compress(&grads).clone();
            for (name, g) in &grads {
                let e = reference.entry(name.clone()).or_insert_with(|| vec![0.0; g.len()]);
                e.resize(g.len(), 0.0);
                let q: Vec<f32> = g.iter().zip(e.iter()).map(|(g, e)| 0.3 * g + e).collect();
                let mut delta = vec![0.0; q.len()];
                codec::decode_into(
                    Encoding::Sign1,
                    &codec::encode(Encoding::Sign1, &q),
                    codec::mean_abs(&q),
                    &mut delta,
                )
                .unwrap();
                let want: Vec<u32> = q.iter().zip(&delta).map(|(q, d)| (q - d).to_bits()).collect();
                *e = q.iter().zip(&delta).map(|(q, d)| q - d).collect();
                let got: Vec<u32> = ef.state()[name].iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "residual of {name} at step {step}");
                assert_eq!(pushed[name], q, "pushed {name} at step {step}");
            }
            assert_eq!(pushed.len(), grads.len());
        }
    }
}
