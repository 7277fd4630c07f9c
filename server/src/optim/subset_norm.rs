//! Subset-Norm adaptive step sizes (algorithms.md §1.2, §2): coordinates are
//! split into subsets that share one accumulator of summed squared gradients.
//! One subset is AdaGrad-Norm; one per row or column is the memory-light
//! AdaGradSN / AdamSN (state `max(m, n)` floats for an m×n matrix).

use super::linalg::Dims;
use super::parallel::{self, Shares};
use super::{Optimizer, OptimizerState, StateError, StateReader, StepContext, SubsetNormConfig, Subsets};

/// Maps each coordinate to its subset.
#[derive(Clone, Copy, Debug)]
pub(crate) enum SubsetMap {
    Rows { cols: usize },
    Columns { cols: usize },
    Coordinates,
    Whole,
    Chunks { size: usize },
}

impl SubsetMap {
    /// Resolves `subsets` for a tensor of `dims` (`matrix` false for 1-D tensors).
    pub(crate) fn new(subsets: Subsets, dims: Dims, matrix: bool) -> Self {
        let numel = dims.rows * dims.cols;
        match subsets {
            Subsets::Heuristic if !matrix => SubsetMap::Coordinates,
            Subsets::Heuristic if dims.rows >= dims.cols => SubsetMap::Rows { cols: dims.cols },
            Subsets::Heuristic => SubsetMap::Columns { cols: dims.cols },
            Subsets::Rows => SubsetMap::Rows { cols: dims.cols },
            Subsets::Columns => SubsetMap::Columns { cols: dims.cols },
            Subsets::Coordinates => SubsetMap::Coordinates,
            Subsets::Whole => SubsetMap::Whole,
            Subsets::Chunks(k) => {
                let wanted = if k < 0 { ((numel as f64).sqrt() / (-k) as f64).floor() as usize } else { k as usize };
                let size = (1..=wanted.clamp(1, numel.max(1))).rev().find(|d| numel.is_multiple_of(*d)).unwrap_or(1);
                SubsetMap::Chunks { size }
            }
        }
    }

    /// Number of subsets of a tensor with `numel` coordinates.
    pub(crate) fn count(self, numel: usize) -> usize {
        match self {
            SubsetMap::Rows { cols } => numel / cols.max(1),
            SubsetMap::Columns { cols } => cols,
            SubsetMap::Coordinates => numel,
            SubsetMap::Whole => 1,
            SubsetMap::Chunks { size } => numel / size,
        }
    }

    /// Sums of squares of `g` per subset, in f64 (per-subset partial sums in f32
    /// runs of a row, which keeps the inner loops vectorizable).
    pub(crate) fn sums_of_squares(self, g: &[f32]) -> Vec<f64> {
        match self {
            SubsetMap::Rows { cols } => g.chunks(cols.max(1)).map(square_sum).collect(),
            SubsetMap::Chunks { size } => g.chunks(size.max(1)).map(square_sum).collect(),
            SubsetMap::Whole => vec![tensor_square_sum(g)],
            SubsetMap::Coordinates => g.iter().map(|x| f64::from(*x) * f64::from(*x)).collect(),
            SubsetMap::Columns { cols } => parallel::column_sums_of_squares(g, cols),
        }
    }

    /// `w -= alpha · num / denominators[subset]` for every coordinate, with a
    /// loop shape per subset kind so the compiler can vectorize it.
    pub(crate) fn apply(self, param: &mut [f32], numerator: &[f32], denominators: &[f32], alpha: f32) {
        let scaled = |w: &mut [f32], n: &[f32], d: f32| {
            let factor = alpha / d;
            for (w, n) in w.iter_mut().zip(n) {
                *w -= factor * n;
            }
        };
        match self {
            SubsetMap::Rows { cols } | SubsetMap::Chunks { size: cols } => {
                for ((w, n), d) in param.chunks_mut(cols.max(1)).zip(numerator.chunks(cols.max(1))).zip(denominators) {
                    scaled(w, n, *d);
                }
            }
            SubsetMap::Whole => scaled(param, numerator, denominators[0]),
            SubsetMap::Coordinates => {
                for ((w, n), d) in param.iter_mut().zip(numerator).zip(denominators) {
                    *w -= alpha * n / d;
                }
            }
            SubsetMap::Columns { cols } => {
                let inverse: Vec<f32> = denominators.iter().map(|d| alpha / d).collect();
                for (w, n) in param.chunks_mut(cols.max(1)).zip(numerator.chunks(cols.max(1))) {
                    for ((w, n), f) in w.iter_mut().zip(n).zip(&inverse) {
                        *w -= f * n;
                    }
                }
            }
        }
    }
}

/// The subset accumulators `v` and how to update them.
#[derive(Clone, Debug)]
pub(crate) struct SubsetAccumulator {
    pub(crate) map: SubsetMap,
    pub(crate) v: Vec<f32>,
}

/// The per-step scalars of a fused Subset-Norm update.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SubsetStep {
    /// Momentum factor (used only when a momentum buffer is given).
    pub(crate) beta1: f32,
    /// Accumulator decay; 1 sums (AdaGrad).
    pub(crate) beta2: f32,
    pub(crate) eps: f32,
    /// The step size α_t.
    pub(crate) alpha: f32,
    /// Weight kept after decoupled decay (1 without decay).
    pub(crate) keep: f32,
}

/// `v ← β2 v + (1-β2) s` (β2 < 1) or `v ← v + s` (β2 = 1), in f64.
#[inline(always)]
pub(crate) fn fold(v: f32, sum: f64, beta2: f32) -> f32 {
    if beta2 >= 1.0 {
        (f64::from(v) + sum) as f32
    } else {
        (f64::from(beta2) * f64::from(v) + (1.0 - f64::from(beta2)) * sum) as f32
    }
}

/// Sum of squares of a run of coordinates, each square in f32, summed in f64
/// over eight interleaved partial sums combined in a fixed order. One running
/// sum would wait on each addition's latency (half the speed of memory); the
/// fixed order keeps the result the same on every run and thread count. It
/// differs from a running sum only in the f64 rounding, far below the f32
/// the accumulator keeps.
#[inline(always)]
pub(crate) fn square_sum(xs: &[f32]) -> f64 {
    const LANES: usize = 8;
    let mut lanes = [0.0f64; LANES];
    let mut runs = xs.chunks_exact(LANES);
    for run in &mut runs {
        for (lane, x) in lanes.iter_mut().zip(run) {
            *lane += f64::from(x * x);
        }
    }
    let tail = runs.remainder().iter().map(|x| f64::from(x * x)).sum::<f64>();
    let [a, b, c, d, e, f, g, h] = lanes;
    (((a + e) + (c + g)) + ((b + f) + (d + h))) + tail
}

/// [`square_sum`] of a whole tensor: fixed pieces of [`parallel::GRAIN`]
/// summed in parallel, their sums added in order.
fn tensor_square_sum(xs: &[f32]) -> f64 {
    use rayon::prelude::*;
    if xs.len() <= parallel::GRAIN {
        return square_sum(xs);
    }
    let pieces: Vec<f64> = xs.par_chunks(parallel::GRAIN).map(square_sum).collect();
    pieces.into_iter().sum()
}

/// Updates one run of coordinates that share the factor `α / d`: momentum
/// (when given) then `w ← (w - factor · numerator) · keep`, in one pass.
#[inline(always)]
fn update_run(w: &mut [f32], g: &[f32], m: &mut [f32], factor: f32, step: &SubsetStep) {
    let keep = step.keep;
    if m.is_empty() {
        for (w, &g) in w.iter_mut().zip(g) {
            *w = (*w - factor * g) * keep;
        }
    } else {
        let (b1, keep1) = (step.beta1, 1.0 - step.beta1);
        for ((w, &g), m) in w.iter_mut().zip(g).zip(m.iter_mut()) {
            *m = b1 * *m + keep1 * g;
            *w = (*w - factor * *m) * keep;
        }
    }
}

impl SubsetAccumulator {
    pub(crate) fn new(map: SubsetMap, numel: usize, initial: f32) -> Self {
        Self { map, v: vec![initial; map.count(numel)] }
    }

    /// `v ← β2 v + (1-β2) s` (β2 < 1) or `v ← v + s` (β2 = 1), with `s` the subset sums of g².
    pub(crate) fn accumulate(&mut self, g: &[f32], beta2: f32) {
        let sums = self.map.sums_of_squares(g);
        for (v, s) in self.v.iter_mut().zip(sums) {
            *v = fold(*v, s, beta2);
        }
    }

    /// Folds per-subset sums of squares into `v` and returns each subset's
    /// factor `α / (sqrt(v) + ε)`.
    pub(crate) fn fold_into_factors(&mut self, sums: &[f64], beta2: f32, eps: f32, alpha: f32) -> Vec<f32> {
        self.v
            .iter_mut()
            .zip(sums)
            .map(|(v, &s)| {
                *v = fold(*v, s, beta2);
                alpha / (v.sqrt() + eps)
            })
            .collect()
    }

    /// `sqrt(v) + ε` per subset.
    pub(crate) fn denominators(&self, eps: f32) -> Vec<f32> {
        self.v.iter().map(|v| v.sqrt() + eps).collect()
    }

    /// One whole Subset-Norm step, fused: folds g² into `v`, updates the
    /// momentum `m` (empty: the numerator is `g` itself) and applies
    /// `w ← (w - α · numerator / (sqrt(v) + ε)) · keep`. Each array is
    /// streamed once (g twice by column subsets, whose sums need every row
    /// first), and row ranges run in parallel. Every coordinate sees the same
    /// operations in the same order as [`Self::accumulate`], [`Self::denominators`]
    /// and [`SubsetMap::apply`] followed by the decay, so the result is
    /// bit-identical to them on any number of threads.
    pub(crate) fn step(&mut self, param: &mut [f32], grad: &[f32], momentum: &mut [f32], step: &SubsetStep) {
        let (beta2, eps, alpha) = (step.beta2, step.eps, step.alpha);
        match self.map {
            SubsetMap::Rows { cols: run } | SubsetMap::Chunks { size: run } => {
                let run = run.max(1);
                let per_task = parallel::runs_per_task(run);
                let task = |_, (((w, g), m), v): parallel::Task<'_>| {
                    let mut m_runs = m.map(|m| m.chunks_mut(run));
                    for ((w, g), v) in w.chunks_mut(run).zip(g.chunks(run)).zip(v.iter_mut()) {
                        *v = fold(*v, square_sum(g), beta2);
                        let factor = alpha / (v.sqrt() + eps);
                        let m = m_runs.as_mut().and_then(Iterator::next).unwrap_or_default();
                        update_run(w, g, m, factor, step);
                    }
                };
                let len = per_task * run;
                parallel::zip_tasks(param, grad, momentum, &mut self.v, Shares::weights(len).with_v(per_task), task);
            }
            SubsetMap::Whole => {
                let v = &mut self.v[0];
                *v = fold(*v, tensor_square_sum(grad), beta2);
                let factor = alpha / (v.sqrt() + eps);
                let len = parallel::runs_per_task(1);
                let mut no_v: [f32; 0] = [];
                parallel::zip_tasks(param, grad, momentum, &mut no_v, Shares::weights(len), |_, (((w, g), m), _)| {
                    update_run(w, g, m.unwrap_or_default(), factor, step)
                });
            }
            SubsetMap::Coordinates => {
                let len = parallel::runs_per_task(1);
                let keep = step.keep;
                let (b1, keep1) = (step.beta1, 1.0 - step.beta1);
                parallel::zip_tasks(
                    param,
                    grad,
                    momentum,
                    &mut self.v,
                    Shares::even(len),
                    |_, (((w, g), m), v)| match m {
                        None => {
                            for ((w, &g), v) in w.iter_mut().zip(g).zip(v.iter_mut()) {
                                *v = fold(*v, f64::from(g) * f64::from(g), beta2);
                                *w = (*w - alpha * g / (v.sqrt() + eps)) * keep;
                            }
                        }
                        Some(m) => {
                            for (((w, &g), v), m) in w.iter_mut().zip(g).zip(v.iter_mut()).zip(m.iter_mut()) {
                                *v = fold(*v, f64::from(g) * f64::from(g), beta2);
                                *m = b1 * *m + keep1 * g;
                                *w = (*w - alpha * *m / (v.sqrt() + eps)) * keep;
                            }
                        }
                    },
                );
            }
            SubsetMap::Columns { cols } => {
                let cols = cols.max(1);
                // Column ranges keep each column's sum in row order, as one thread would.
                let sums = parallel::column_sums_of_squares(grad, cols);
                let factors = self.fold_into_factors(&sums, beta2, eps, alpha);
                let per_task = parallel::runs_per_task(cols);
                let keep = step.keep;
                let (b1, keep1) = (step.beta1, 1.0 - step.beta1);
                let mut no_v: [f32; 0] = [];
                parallel::zip_tasks(
                    param,
                    grad,
                    momentum,
                    &mut no_v,
                    Shares::weights(per_task * cols),
                    |_, (((w, g), m), _)| match m {
                        None => {
                            for (w, g) in w.chunks_mut(cols).zip(g.chunks(cols)) {
                                for ((w, &g), f) in w.iter_mut().zip(g).zip(&factors) {
                                    *w = (*w - f * g) * keep;
                                }
                            }
                        }
                        Some(m) => {
                            for ((w, g), m) in w.chunks_mut(cols).zip(g.chunks(cols)).zip(m.chunks_mut(cols)) {
                                for (((w, &g), m), f) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(&factors) {
                                    *m = b1 * *m + keep1 * g;
                                    *w = (*w - f * *m) * keep;
                                }
                            }
                        }
                    },
                );
            }
        }
    }
}

/// AdamSN / AdaGradSN / AdaGrad-Norm state for one tensor.
pub struct SubsetNorm {
    config: SubsetNormConfig,
    accumulator: SubsetAccumulator,
    momentum: Vec<f32>,
    step_t: u64,
}

impl SubsetNorm {
    /// State for a tensor of `dims` (`matrix` false for 1-D tensors).
    pub fn new(config: SubsetNormConfig, dims: Dims, matrix: bool) -> Self {
        let numel = dims.rows * dims.cols;
        let map = SubsetMap::new(config.subsets, dims, matrix);
        let momentum = if config.beta1 > 0.0 { vec![0.0; numel] } else { Vec::new() };
        let accumulator = SubsetAccumulator::new(map, numel, config.initial_accumulator);
        Self { config, accumulator, momentum, step_t: 0 }
    }
}

/// The SN step size α_t (algorithms.md §2).
pub(crate) fn subset_norm_alpha(lr: f64, beta1: f32, beta2: f32, correct_bias: bool, t: u64) -> f64 {
    if !correct_bias {
        return lr;
    }
    let t = t.min(i32::MAX as u64) as i32;
    let bias1 = if beta1 > 0.0 { 1.0 - f64::from(beta1).powi(t) } else { 1.0 };
    let bias2 = if beta2 < 1.0 { 1.0 - f64::from(beta2).powi(t) } else { 1.0 };
    lr * bias2.sqrt() / bias1
}

impl Optimizer for SubsetNorm {
    fn step(&mut self, param: &mut [f32], grad: &[f32], ctx: &StepContext) {
        let c = &self.config;
        self.step_t = ctx.t;
        let lr = f64::from(c.lr) * f64::from(ctx.lr_scale);
        let alpha = subset_norm_alpha(lr, c.beta1, c.beta2, c.correct_bias, ctx.t) as f32;
        let keep = if c.weight_decay != 0.0 { 1.0 - (lr * f64::from(c.weight_decay)) as f32 } else { 1.0 };
        let step = SubsetStep { beta1: c.beta1, beta2: c.beta2, eps: c.eps, alpha, keep };
        self.accumulator.step(param, grad, &mut self.momentum, &step);
    }

    fn state_bytes(&self) -> usize {
        (self.accumulator.v.len() + self.momentum.len()) * std::mem::size_of::<f32>()
    }

    fn state(&self) -> Vec<(&'static str, Vec<f32>)> {
        let mut state = vec![("v", self.accumulator.v.clone()), ("step", vec![self.step_t as f32])];
        if self.accumulator.map.count(1) == 1 && matches!(self.accumulator.map, SubsetMap::Whole) {
            state.push(("b_squared", self.accumulator.v.clone()));
        }
        if !self.momentum.is_empty() {
            state.push(("m", self.momentum.clone()));
        }
        state
    }

    fn export_state(&self) -> OptimizerState {
        let mut state = OptimizerState::default();
        state.put_buffer("v", &self.accumulator.v);
        // Keyed on the config, as in `new`, so the field set does not depend on the slice's length.
        if self.config.beta1 > 0.0 {
            state.put_buffer("momentum", &self.momentum);
        }
        state.put_integer("step_t", self.step_t);
        state
    }

    fn import_state(&mut self, state: &OptimizerState) -> Result<(), StateError> {
        let mut reader = StateReader::new(state);
        let v = reader.buffer("v", self.accumulator.v.len())?.to_vec();
        let momentum =
            if self.config.beta1 > 0.0 { reader.buffer("momentum", self.momentum.len())?.to_vec() } else { Vec::new() };
        let step_t = reader.integer("step_t")?;
        reader.finish()?;
        self.accumulator.v = v;
        self.momentum = momentum;
        self.step_t = step_t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::tests::bits;

    /// The separate passes the fused step replaces: accumulate, momentum,
    /// denominators, apply, decay.
    fn separate_passes(acc: &mut SubsetAccumulator, w: &mut [f32], g: &[f32], m: &mut [f32], step: &SubsetStep) {
        acc.accumulate(g, step.beta2);
        for (m, &g) in m.iter_mut().zip(g) {
            *m = step.beta1 * *m + (1.0 - step.beta1) * g;
        }
        let numerator: &[f32] = if m.is_empty() { g } else { m };
        acc.map.apply(w, numerator, &acc.denominators(step.eps), step.alpha);
        if step.keep != 1.0 {
            w.iter_mut().for_each(|w| *w *= step.keep);
        }
    }

    #[test]
    fn fused_step_matches_the_separate_passes_in_every_bit() {
        // Larger than one task, so rows (and columns) are split across threads.
        let dims = Dims { rows: 120, cols: 1300 };
        let len = dims.rows * dims.cols;
        let maps = [
            SubsetMap::Rows { cols: dims.cols },
            SubsetMap::Columns { cols: dims.cols },
            SubsetMap::Chunks { size: 520 },
            SubsetMap::Coordinates,
            SubsetMap::Whole,
        ];
        for map in maps {
            for (beta1, beta2, keep) in [(0.0, 1.0, 1.0), (0.9, 0.999, 0.9995)] {
                for threads in [1, 2, 3] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    let w0: Vec<f32> = (0..len).map(|i| ((i * 31) % 97) as f32 / 50.0 - 1.0).collect();
                    let (mut w_ref, mut w_fused) = (w0.clone(), w0);
                    let momentum = if beta1 > 0.0 { vec![0.0; len] } else { Vec::new() };
                    let (mut m_ref, mut m_fused) = (momentum.clone(), momentum);
                    let mut acc_ref = SubsetAccumulator::new(map, len, 0.01);
                    let mut acc_fused = acc_ref.clone();
                    for t in 0..3 {
                        let g: Vec<f32> = (0..len).map(|i| ((i * 13 + t * 7) % 101) as f32 / 40.0 - 1.2).collect();
                        let step = SubsetStep { beta1, beta2, eps: 1e-6, alpha: 0.01 + t as f32 * 1e-3, keep };
                        separate_passes(&mut acc_ref, &mut w_ref, &g, &mut m_ref, &step);
                        pool.install(|| acc_fused.step(&mut w_fused, &g, &mut m_fused, &step));
                    }
                    let case = format!("{map:?}, β1 {beta1}, {threads} threads");
                    assert_eq!(bits(&w_fused), bits(&w_ref), "{case}");
                    assert_eq!(bits(&m_fused), bits(&m_ref), "{case}");
                    assert_eq!(bits(&acc_fused.v), bits(&acc_ref.v), "{case}");
                }
            }
        }
    }

    #[test]
    fn square_sums_do_not_depend_on_the_pieces_and_agree_with_a_running_sum() {
        let xs: Vec<f32> = (0..3 * parallel::GRAIN + 5).map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0).collect();
        let running: f64 = xs.iter().map(|x| f64::from(x * x)).sum();
        let pieces = [1, 2, 3].map(|threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| tensor_square_sum(&xs))
        });
        assert!(pieces.iter().all(|s| s.to_bits() == pieces[0].to_bits()), "{pieces:?}");
        // Far below the f32 the accumulator keeps (ε ≈ 6e-8); the running sum is the less exact one.
        assert!((pieces[0] - running).abs() <= running * 1e-12, "{} vs {running}", pieces[0]);
        assert_eq!(square_sum(&xs[..5]), xs[..5].iter().map(|x| f64::from(x * x)).sum::<f64>());
    }
}
