//! Adam with decoupled (AdamW) or L2 weight decay, exactly as algorithms.md
//! §1.1 with PyTorch's ε placement: `w -= η/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + ε)`.
//! AdamW decays first, with the unscaled η; Adam-L2 adds `λw` to the gradient.

use std::sync::Arc;

use super::parallel::{self, Shares};
use super::placement::Staggered;
use super::{AdamWConfig, Optimizer, OptimizerState, StateError, StateReader, StepContext};

/// Adam's moments and its own step counter, shared with FRUGAL's state-full part.
/// The moments are shared with a checkpoint being written (no copy is made to
/// export them) and copied before an update only if the write still holds them.
/// They start at their own page offsets (lanes 1 and 2, `placement.rs`), away
/// from the weights' and the gradient's, which an update streams beside them.
#[derive(Clone, Debug, Default)]
pub struct Moments {
    /// First moment.
    pub m: Arc<Staggered>,
    /// Second moment.
    pub v: Arc<Staggered>,
    /// Updates applied to these moments (restarts when they are reset).
    pub t: u64,
}

/// The placement lanes of `m` and `v` (lane 0 is where weights and gradients land).
const MOMENT_LANES: (usize, usize) = (1, 2);

impl Moments {
    /// Zeroed moments for `len` parameters.
    pub fn new(len: usize) -> Self {
        let (m, v) = MOMENT_LANES;
        Self { m: Arc::new(Staggered::zeros(len, m)), v: Arc::new(Staggered::zeros(len, v)), t: 0 }
    }

    /// Counts one more update and returns its bias corrections
    /// `(1/(1-β1^t), 1/sqrt(1-β2^t))`, computed in f64 as PyTorch computes
    /// them in Python floats.
    pub(super) fn next_corrections(&mut self, beta1: f32, beta2: f32) -> (f32, f32) {
        self.t += 1;
        let t = self.t.min(i32::MAX as u64) as i32;
        let inv_bias1 = (1.0 / (1.0 - f64::from(beta1).powi(t))) as f32;
        let inv_bias2_sqrt = (1.0 / (1.0 - f64::from(beta2).powi(t)).sqrt()) as f32;
        (inv_bias1, inv_bias2_sqrt)
    }

    /// Both moments, writable (copied first if a checkpoint still shares them).
    pub(super) fn buffers_mut(&mut self) -> (&mut [f32], &mut [f32]) {
        (Arc::make_mut(&mut self.m).as_mut_slice(), Arc::make_mut(&mut self.v).as_mut_slice())
    }

    /// Folds `g` into the moments and writes Adam's direction
    /// `m̂ / (sqrt(v̂) + ε)` (PyTorch form, without η) into `out`.
    pub fn direction(&mut self, g: &[f32], beta1: f32, beta2: f32, eps: f32, out: &mut [f32]) {
        self.stream(out, g, (beta1, beta2, eps), move |o, direction| *o = direction);
    }

    /// Folds `g` into the moments and moves `w` along Adam's direction in the
    /// same pass: `w ← w · decay - lr · m̂ / (sqrt(v̂) + ε)`, the same bits as
    /// [`Moments::direction`] followed by that update, without the temporary.
    #[allow(clippy::too_many_arguments)]
    pub fn step_weights(&mut self, w: &mut [f32], g: &[f32], beta1: f32, beta2: f32, eps: f32, decay: f32, lr: f32) {
        // `move`: the closure holds the two factors, not references to them, which the
        // compiler could not keep in registers across the stores to `w` (the loop ran
        // scalar on the AMD EPYC VM, a third of AdamW's rate).
        self.stream(w, g, (beta1, beta2, eps), move |w, direction| *w = *w * decay - lr * direction);
    }

    /// One pass over `target`, `g` and both moments, in tasks on the rayon
    /// pool: folds each gradient value in and hands `apply` its target value
    /// and Adam's direction there.
    #[inline(always)]
    fn stream(
        &mut self,
        target: &mut [f32],
        g: &[f32],
        (beta1, beta2, eps): (f32, f32, f32),
        apply: impl Fn(&mut f32, f32) + Sync + Send,
    ) {
        let (inv_bias1, inv_bias2_sqrt) = self.next_corrections(beta1, beta2);
        let (keep1, keep2) = (1.0 - beta1, 1.0 - beta2);
        let (m, v) = self.buffers_mut();
        parallel::zip_tasks(target, g, m, v, Shares::even(parallel::GRAIN), move |_, (((target, g), m), v)| {
            let m = m.unwrap_or_default();
            for (((x, &g), m), v) in target.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                *m = beta1 * *m + keep1 * g;
                *v = beta2 * *v + keep2 * g * g;
                apply(x, *m * inv_bias1 / (v.sqrt() * inv_bias2_sqrt + eps));
            }
        });
    }

    /// Takes the moments back from a checkpoint still writing them (copying
    /// them); true if it had to.
    pub fn unshare(&mut self) -> bool {
        let shared = Arc::get_mut(&mut self.m).is_none() || Arc::get_mut(&mut self.v).is_none();
        Arc::make_mut(&mut self.m);
        Arc::make_mut(&mut self.v);
        shared
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        (self.m.len() + self.v.len()) * std::mem::size_of::<f32>()
    }

    /// Writes `m`, `v` and `moments_t`.
    pub(super) fn export_into(&self, state: &mut OptimizerState) {
        state.put_shared("m", &self.m);
        state.put_shared("v", &self.v);
        state.put_integer("moments_t", self.t);
    }

    /// Reads moments of `len` parameters written by [`Moments::export_into`].
    pub(super) fn import_from(reader: &mut StateReader, len: usize) -> Result<Self, StateError> {
        let m = Arc::new(Staggered::copy_of(reader.buffer("m", len)?, MOMENT_LANES.0));
        let v = Arc::new(Staggered::copy_of(reader.buffer("v", len)?, MOMENT_LANES.1));
        let t = reader.integer("moments_t")?;
        Ok(Self { m, v, t })
    }
}

/// Adam / AdamW state for one slice: first and second moments (8 bytes per parameter).
pub struct AdamW {
    config: AdamWConfig,
    moments: Moments,
    step_t: u64,
}

impl AdamW {
    /// Allocates zeroed moments for `len` parameters.
    pub fn new(config: AdamWConfig, len: usize) -> Self {
        Self { config, moments: Moments::new(len), step_t: 0 }
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, param: &mut [f32], grad: &[f32], ctx: &StepContext) {
        let c = &self.config;
        let lr = f64::from(c.lr) * f64::from(ctx.lr_scale);
        let t = ctx.t.min(i32::MAX as u64) as i32;
        self.step_t = ctx.t;
        // After the freeze, v and its correction stay at step K's (1-bit Adam).
        let frozen = c.freeze_variance_after > 0 && ctx.t > c.freeze_variance_after;
        let t2 = if frozen { c.freeze_variance_after.min(i32::MAX as u64) as i32 } else { t };
        let step_size = (lr / (1.0 - f64::from(c.beta1).powi(t))) as f32;
        let inv_bias2_sqrt = (1.0 / (1.0 - f64::from(c.beta2).powi(t2)).sqrt()) as f32;
        let (b1, b2, eps) = (c.beta1, c.beta2, c.eps);
        let (keep1, keep2) = (1.0 - b1, 1.0 - b2);
        let (decay, l2) =
            if c.decoupled { ((1.0 - lr * f64::from(c.weight_decay)) as f32, 0.0) } else { (1.0, c.weight_decay) };
        let Moments { m, v, .. } = &mut self.moments;
        let (m, v) = (Arc::make_mut(m), Arc::make_mut(v));
        let lanes = param.iter_mut().zip(grad).zip(m.iter_mut()).zip(v.iter_mut());
        if frozen {
            // A loop of its own rather than β2 = 1: `0 · g²` is NaN for an infinite g.
            for (((w, &g), m), v) in lanes {
                let g = g + l2 * *w;
                *m = b1 * *m + keep1 * g;
                let denom = v.sqrt() * inv_bias2_sqrt + eps;
                *w = *w * decay - step_size * *m / denom;
            }
            return;
        }
        for (((w, &g), m), v) in lanes {
            let g = g + l2 * *w;
            *m = b1 * *m + keep1 * g;
            *v = b2 * *v + keep2 * g * g;
            let denom = v.sqrt() * inv_bias2_sqrt + eps;
            *w = *w * decay - step_size * *m / denom;
        }
    }

    fn state_bytes(&self) -> usize {
        self.moments.bytes()
    }

    fn unshare(&mut self) -> bool {
        self.moments.unshare()
    }

    fn state(&self) -> Vec<(&'static str, Vec<f32>)> {
        vec![("m", self.moments.m.to_vec()), ("v", self.moments.v.to_vec()), ("step", vec![self.step_t as f32])]
    }

    fn export_state(&self) -> OptimizerState {
        let mut state = OptimizerState::default();
        self.moments.export_into(&mut state);
        state.put_integer("step_t", self.step_t);
        state
    }

    fn import_state(&mut self, state: &OptimizerState) -> Result<(), StateError> {
        let mut reader = StateReader::new(state);
        let moments = Moments::import_from(&mut reader, self.moments.m.len())?;
        let step_t = reader.integer("step_t")?;
        reader.finish()?;
        self.moments = moments;
        self.step_t = step_t;
        Ok(())
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

    #[test]
    fn a_frozen_variance_keeps_v_and_its_correction_from_step_k() {
        let config = AdamWConfig { lr: 0.1, freeze_variance_after: 2, ..Default::default() };
        let (mut frozen, mut plain) =
            (AdamW::new(config.clone(), 1), AdamW::new(AdamWConfig { freeze_variance_after: 0, ..config }, 1));
        let (mut w_frozen, mut w_plain) = ([0.0f32], [0.0f32]);
        let grads = [1.0f32, -0.5, 2.0, 4.0];
        for (t, g) in grads.iter().enumerate().take(2) {
            let ctx = StepContext { t: t as u64 + 1, lr_scale: 1.0 };
            frozen.step(&mut w_frozen, &[*g], &ctx);
            plain.step(&mut w_plain, &[*g], &ctx);
        }
        assert_eq!(w_frozen, w_plain, "identical up to the freeze");
        let v_at_k = frozen.moments.v[0];
        // The same rule in f64: m keeps moving with its own correction, v and 1-β2^K do not.
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let (mut m, mut w) = (f64::from(frozen.moments.m[0]), f64::from(w_frozen[0]));
        for (t, g) in grads.iter().enumerate().skip(2) {
            let t = t as i32 + 1;
            frozen.step(&mut w_frozen, &[*g], &StepContext { t: t as u64, lr_scale: 1.0 });
            m = b1 * m + (1.0 - b1) * f64::from(*g);
            let denom = f64::from(v_at_k).sqrt() / (1.0 - b2.powi(2)).sqrt() + eps;
            w -= 0.1 / (1.0 - b1.powi(t)) * m / denom;
            assert_eq!(frozen.moments.v[0], v_at_k, "v frozen at step {t}");
            // f32 against f64 over four steps; a v that kept moving would miss by 1e-2.
            assert!((f64::from(w_frozen[0]) - w).abs() < 1e-5, "step {t}: {} vs {w}", w_frozen[0]);
            plain.step(&mut w_plain, &[*g], &StepContext { t: t as u64, lr_scale: 1.0 });
        }
        assert!((w_plain[0] - w_frozen[0]).abs() > 1e-2, "{w_plain:?} {w_frozen:?}");
        // An infinite gradient after the freeze leaves v as it was (no 0·∞).
        frozen.step(&mut w_frozen, &[f32::INFINITY], &StepContext { t: 5, lr_scale: 1.0 });
        assert_eq!(frozen.moments.v[0], v_at_k);
    }
}
