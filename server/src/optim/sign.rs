//! State-light sign optimizers (algorithms.md §5 and Lion): signSGD (no state),
//! Signum (one momentum buffer) and Lion (one momentum buffer).

use super::linalg::sign0;
use super::{Optimizer, OptimizerState, SignConfig, StateError, StateReader, StepContext};

/// signSGD / Signum / Lion state for one slice.
pub struct Sign {
    config: SignConfig,
    momentum: Vec<f32>,
}

impl Sign {
    /// State for `len` parameters (none for signSGD).
    pub fn new(config: SignConfig, len: usize) -> Self {
        let momentum = if config.lion || config.beta1 > 0.0 { vec![0.0; len] } else { Vec::new() };
        Self { config, momentum }
    }

    /// Whether the configuration keeps a momentum buffer (decided by the
    /// config so that export and import agree even for an empty slice).
    fn has_momentum(&self) -> bool {
        self.config.lion || self.config.beta1 > 0.0
    }
}

impl Optimizer for Sign {
    fn step(&mut self, param: &mut [f32], grad: &[f32], ctx: &StepContext) {
        let c = &self.config;
        let lr = c.lr * ctx.lr_scale;
        let wd = c.weight_decay;
        if c.lion {
            // c = β1 m + (1-β1) g;  w = w(1 - ηλ) - η sign(c);  m = β2 m + (1-β2) g.
            let decay = 1.0 - lr * wd;
            for ((w, &g), m) in param.iter_mut().zip(grad).zip(self.momentum.iter_mut()) {
                let update = c.beta1 * *m + (1.0 - c.beta1) * g;
                *w = *w * decay - lr * sign0(update);
                *m = c.beta2 * *m + (1.0 - c.beta2) * g;
            }
        } else if self.momentum.is_empty() {
            for (w, &g) in param.iter_mut().zip(grad) {
                *w -= lr * (sign0(g) + wd * *w);
            }
        } else {
            for ((w, &g), m) in param.iter_mut().zip(grad).zip(self.momentum.iter_mut()) {
                *m = c.beta1 * *m + (1.0 - c.beta1) * g;
                *w -= lr * (sign0(*m) + wd * *w);
            }
        }
    }

    fn state_bytes(&self) -> usize {
        self.momentum.len() * std::mem::size_of::<f32>()
    }

    fn state(&self) -> Vec<(&'static str, Vec<f32>)> {
        if self.momentum.is_empty() { Vec::new() } else { vec![("m", self.momentum.clone())] }
    }

    fn export_state(&self) -> OptimizerState {
        let mut state = OptimizerState::default();
        if self.has_momentum() {
            state.put_buffer("momentum", &self.momentum);
        }
        state
    }

    fn import_state(&mut self, state: &OptimizerState) -> Result<(), StateError> {
        let mut reader = StateReader::new(state);
        let momentum =
            if self.has_momentum() { reader.buffer("momentum", self.momentum.len())?.to_vec() } else { Vec::new() };
        reader.finish()?;
        self.momentum = momentum;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lion_steps_by_the_sign_of_the_interpolation() {
        let config = SignConfig { lr: 0.1, beta1: 0.9, beta2: 0.99, weight_decay: 0.0, lion: true };
        let mut lion = Sign::new(config, 2);
        let mut w = [1.0f32, 1.0];
        lion.step(&mut w, &[2.0, -0.5], &StepContext { t: 1, lr_scale: 1.0 });
        assert_eq!(w, [0.9, 1.1]);
        let m = &lion.state()[0].1;
        assert!((m[0] - 0.02).abs() < 1e-7 && (m[1] + 0.005).abs() < 1e-7);
    }
}
