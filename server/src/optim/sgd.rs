//! SGD with optional heavy-ball or Nesterov momentum, following torch.optim.SGD:
//! `d = g + λw; b = μb + (1-τ)d (b = d on the first step); d = d + μb (Nesterov) or b; w -= η d`.

use super::{Optimizer, OptimizerState, SgdConfig, StateError, StateReader, StepContext};

/// SGD state for one slice: the momentum buffer, if momentum is on.
pub struct Sgd {
    config: SgdConfig,
    buffer: Vec<f32>,
    buffer_started: bool,
}

impl Sgd {
    /// Allocates the momentum buffer for `len` parameters when momentum is on.
    pub fn new(config: SgdConfig, len: usize) -> Self {
        let buffer = if config.momentum > 0.0 { vec![0.0; len] } else { Vec::new() };
        Self { config, buffer, buffer_started: false }
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, param: &mut [f32], grad: &[f32], ctx: &StepContext) {
        let c = &self.config;
        let lr = c.lr * ctx.lr_scale;
        let wd = c.weight_decay;
        if c.momentum == 0.0 {
            for (w, &g) in param.iter_mut().zip(grad) {
                *w -= lr * (g + wd * *w);
            }
            return;
        }
        let (mu, keep) = (c.momentum, 1.0 - c.dampening);
        let first = !self.buffer_started;
        self.buffer_started = true;
        let nesterov = c.nesterov;
        for ((w, &g), b) in param.iter_mut().zip(grad).zip(self.buffer.iter_mut()) {
            let d = g + wd * *w;
            *b = if first { d } else { mu * *b + keep * d };
            let direction = if nesterov { d + mu * *b } else { *b };
            *w -= lr * direction;
        }
    }

    fn state_bytes(&self) -> usize {
        self.buffer.len() * std::mem::size_of::<f32>()
    }

    fn state(&self) -> Vec<(&'static str, Vec<f32>)> {
        if self.buffer.is_empty() { Vec::new() } else { vec![("momentum_buffer", self.buffer.clone())] }
    }

    fn export_state(&self) -> OptimizerState {
        let mut state = OptimizerState::default();
        // Keyed on the config, not on the buffer's length, so that export and
        // import agree on the field set even for an empty slice.
        if self.config.momentum > 0.0 {
            state.put_buffer("momentum_buffer", &self.buffer);
        }
        state.put_integer("buffer_started", u64::from(self.buffer_started));
        state
    }

    fn import_state(&mut self, state: &OptimizerState) -> Result<(), StateError> {
        let mut reader = StateReader::new(state);
        let buffer = if self.config.momentum > 0.0 {
            reader.buffer("momentum_buffer", self.buffer.len())?.to_vec()
        } else {
            Vec::new()
        };
        let buffer_started = reader.flag("buffer_started")?;
        reader.finish()?;
        (self.buffer, self.buffer_started) = (buffer, buffer_started);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(config: SgdConfig, grads: &[[f32; 2]]) -> [f32; 2] {
        let mut w = [1.0f32, -2.0];
        let mut opt = Sgd::new(config, 2);
        for (i, g) in grads.iter().enumerate() {
            opt.step(&mut w, g, &StepContext { t: i as u64 + 1, lr_scale: 1.0 });
        }
        w
    }

    #[test]
    fn plain_sgd_with_decay() {
        let c = SgdConfig { lr: 0.1, momentum: 0.0, dampening: 0.0, nesterov: false, weight_decay: 0.5 };
        let w = run(c, &[[1.0, 1.0]]);
        // w - lr * (g + wd * w)
        assert_eq!(w, [1.0 - 0.1 * 1.5, -2.0 - 0.1 * 0.0]);
    }

    #[test]
    fn momentum_and_nesterov_match_torch_by_hand() {
        let heavy = SgdConfig { lr: 0.1, momentum: 0.9, dampening: 0.0, nesterov: false, weight_decay: 0.0 };
        // b1 = g1 = 1; w = 1 - 0.1 = 0.9; b2 = 0.9 + 2 = 2.9; w = 0.9 - 0.29 = 0.61
        let w = run(heavy.clone(), &[[1.0, 0.0], [2.0, 0.0]]);
        assert!((w[0] - 0.61).abs() < 1e-6, "{w:?}");
        let nesterov = SgdConfig { nesterov: true, ..heavy };
        // step1: b = 1, d = 1 + 0.9 = 1.9, w = 0.81; step2: b = 2.9, d = 2 + 2.61 = 4.61, w = 0.349
        let w = run(nesterov, &[[1.0, 0.0], [2.0, 0.0]]);
        assert!((w[0] - 0.349).abs() < 1e-6, "{w:?}");
    }
}
