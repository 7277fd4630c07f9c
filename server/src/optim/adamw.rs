//! AdamW exactly as algorithms.md §1.1 (PyTorch's ε placement): decay first with
//! the unscaled η, then `m, v` updates and `w -= η/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + ε)`.

use super::{Optimizer, StepContext};

/// Hyperparameters of AdamW.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate η.
    pub lr: f32,
    /// First-moment decay β1.
    pub beta1: f32,
    /// Second-moment decay β2.
    pub beta2: f32,
    /// ε added to the bias-corrected root of `v`.
    pub eps: f32,
    /// Decoupled weight decay λ.
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// AdamW state for one slice: first and second moments (8 bytes per parameter).
pub struct AdamW {
    config: AdamWConfig,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl AdamW {
    /// Allocates zeroed moments for `len` parameters.
    pub fn new(config: AdamWConfig, len: usize) -> Self {
        Self { config, m: vec![0.0; len], v: vec![0.0; len] }
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, param: &mut [f32], grad: &[f32], ctx: &StepContext) {
        let c = &self.config;
        let lr = f64::from(c.lr) * f64::from(ctx.lr_scale);
        let t = ctx.t.min(i32::MAX as u64) as i32;
        // Scalars in f64, as PyTorch computes them in Python floats.
        let bias1 = 1.0 - f64::from(c.beta1).powi(t);
        let bias2_sqrt = (1.0 - f64::from(c.beta2).powi(t)).sqrt();
        let step_size = (lr / bias1) as f32;
        let inv_bias2_sqrt = (1.0 / bias2_sqrt) as f32;
        let decay = (1.0 - lr * f64::from(c.weight_decay)) as f32;
        let (b1, b2, eps) = (c.beta1, c.beta2, c.eps);
        let (one_minus_b1, one_minus_b2) = (1.0 - b1, 1.0 - b2);
        for (((w, &g), m), v) in param.iter_mut().zip(grad).zip(self.m.iter_mut()).zip(self.v.iter_mut()) {
            *m = b1 * *m + one_minus_b1 * g;
            *v = b2 * *v + one_minus_b2 * g * g;
            let denom = v.sqrt() * inv_bias2_sqrt + eps;
            *w = *w * decay - step_size * *m / denom;
        }
    }

    fn state_bytes(&self) -> usize {
        (self.m.len() + self.v.len()) * std::mem::size_of::<f32>()
    }

    fn state(&self) -> Vec<(&'static str, &[f32])> {
        vec![("exp_avg", &self.m), ("exp_avg_sq", &self.v)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_each_weight_by_about_lr() {
        // With bias correction the first Adam step is lr * sign(g) (up to ε).
        let mut w = [0.5f32, -0.5, 0.0];
        let mut opt = AdamW::new(AdamWConfig { lr: 0.01, ..Default::default() }, 3);
        opt.step(&mut w, &[3.0, -0.2, 1e-3], &StepContext { t: 1, lr_scale: 1.0 });
        assert!((w[0] - 0.49).abs() < 1e-6);
        assert!((w[1] + 0.49).abs() < 1e-6);
        assert!((w[2] + 0.01).abs() < 1e-5);
        assert_eq!(opt.state_bytes(), 24);
    }

    #[test]
    fn decoupled_decay_uses_the_old_weight() {
        let mut w = [2.0f32];
        let mut opt = AdamW::new(AdamWConfig { lr: 0.1, weight_decay: 0.5, ..Default::default() }, 1);
        opt.step(&mut w, &[1.0], &StepContext { t: 1, lr_scale: 1.0 });
        // 2 * (1 - 0.05) - 0.1 * 1 / (1 + 1e-8)
        assert!((w[0] - 1.8).abs() < 1e-6, "{w:?}");
    }
}
