//! Subset-Norm adaptive step sizes (algorithms.md §1.2, §2): coordinates are
//! split into subsets that share one accumulator of summed squared gradients.
//! One subset is AdaGrad-Norm; one per row or column is the memory-light
//! AdaGradSN / AdamSN (state `max(m, n)` floats for an m×n matrix).

use super::linalg::Dims;
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
        let square_sum = |xs: &[f32]| xs.iter().map(|x| f64::from(x * x)).sum::<f64>();
        match self {
            SubsetMap::Rows { cols } => g.chunks(cols.max(1)).map(square_sum).collect(),
            SubsetMap::Chunks { size } => g.chunks(size.max(1)).map(square_sum).collect(),
            SubsetMap::Whole => vec![square_sum(g)],
            SubsetMap::Coordinates => g.iter().map(|x| f64::from(*x) * f64::from(*x)).collect(),
            SubsetMap::Columns { cols } => {
                let mut sums = vec![0.0f64; cols];
                for row in g.chunks(cols.max(1)) {
                    for (s, x) in sums.iter_mut().zip(row) {
                        *s += f64::from(*x) * f64::from(*x);
                    }
                }
                sums
            }
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

impl SubsetAccumulator {
    pub(crate) fn new(map: SubsetMap, numel: usize, initial: f32) -> Self {
        Self { map, v: vec![initial; map.count(numel)] }
    }

    /// `v ← β2 v + (1-β2) s` (β2 < 1) or `v ← v + s` (β2 = 1), with `s` the subset sums of g².
    pub(crate) fn accumulate(&mut self, g: &[f32], beta2: f32) {
        let sums = self.map.sums_of_squares(g);
        for (v, s) in self.v.iter_mut().zip(sums) {
            *v = if beta2 >= 1.0 {
                (f64::from(*v) + s) as f32
            } else {
                (f64::from(beta2) * f64::from(*v) + (1.0 - f64::from(beta2)) * s) as f32
            };
        }
    }

    /// `sqrt(v) + ε` per subset.
    pub(crate) fn denominators(&self, eps: f32) -> Vec<f32> {
        self.v.iter().map(|v| v.sqrt() + eps).collect()
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
        self.accumulator.accumulate(grad, c.beta2);
        if !self.momentum.is_empty() {
            let (b1, keep) = (c.beta1, 1.0 - c.beta1);
            for (m, &g) in self.momentum.iter_mut().zip(grad) {
                *m = b1 * *m + keep * g;
            }
        }
        let numerator: &[f32] = if self.momentum.is_empty() { grad } else { &self.momentum };
        let alpha = subset_norm_alpha(lr, c.beta1, c.beta2, c.correct_bias, ctx.t) as f32;
        let denominators = self.accumulator.denominators(c.eps);
        self.accumulator.map.apply(param, numerator, &denominators, alpha);
        if c.weight_decay != 0.0 {
            let keep = 1.0 - (lr * f64::from(c.weight_decay)) as f32;
            param.iter_mut().for_each(|w| *w *= keep);
        }
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
