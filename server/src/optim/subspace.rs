//! Subspace-Momentum (algorithms.md §3): momentum lives in a rank-r subspace
//! of each matrix and the orthogonal rest of the gradient is applied as plain
//! SGD; AdamSNSM divides the result by the Subset-Norm state of the full
//! gradient. The subspace is re-chosen from the gradient at t = 1 and every
//! t ≡ 0 (mod T); only the momentum is reset then (zero first, then update).

use super::linalg::{self, Dims, Side};
use super::parallel::{self, Shares};
use super::projector::{IndexChoice, Projector, ProjectorShape};
use super::subset_norm::{SubsetAccumulator, SubsetMap, fold, square_sum, subset_norm_alpha};
use super::{
    IndexRule, Optimizer, OptimizerState, Projection, StateError, StateReader, StepContext, SubspaceMomentumConfig,
    invalid,
};
use crate::random::{SplitMix, name_hash};

/// SM state for one matrix.
pub struct SubspaceMomentum {
    config: SubspaceMomentumConfig,
    dims: Dims,
    salt: u64,
    projector: Option<Projector>,
    momentum_low: Vec<f32>,
    accumulator: Option<SubsetAccumulator>,
    selections: usize,
    step_t: u64,
    /// How long the last subspace selection took, until reported.
    selection_time: Option<std::time::Duration>,
}

impl SubspaceMomentum {
    /// State for an m×n matrix named `name` (the name salts random selections).
    pub fn new(config: SubspaceMomentumConfig, dims: Dims, name: &str) -> Self {
        let accumulator = config
            .adaptive
            .then(|| SubsetAccumulator::new(SubsetMap::new(config.subsets, dims, true), dims.rows * dims.cols, 0.0));
        Self {
            salt: name_hash(name),
            config,
            dims,
            projector: None,
            momentum_low: Vec::new(),
            accumulator,
            selections: 0,
            step_t: 0,
            selection_time: None,
        }
    }

    /// The projector `select` builds as selection number `selections` (1-based).
    fn projector_shape(&self, selections: usize) -> Result<ProjectorShape<'_>, StateError> {
        let Dims { rows: m, cols: n } = self.dims;
        let by_rows = m >= n;
        let count = if by_rows { m } else { n };
        let rank = self.config.rank.min(count);
        Ok(match &self.config.projection {
            Projection::Svd(_) => {
                let side = if by_rows { Side::Right } else { Side::Left };
                // The SVD has only min(m, n) vectors to give.
                let kept = rank.min(m.min(n));
                ProjectorShape::Svd { side, rank, basis_len: if by_rows { kept * n } else { m * kept } }
            }
            Projection::Index(rule) => {
                let choice = match rule {
                    IndexRule::Schedule(schedule) if schedule.is_empty() => {
                        return Err(invalid("projector_indices", "the configured schedule is empty"));
                    }
                    IndexRule::Schedule(schedule) => {
                        let entry = &schedule[selections.saturating_sub(1).min(schedule.len() - 1)];
                        IndexChoice::OneOf(std::slice::from_ref(entry))
                    }
                    IndexRule::Uniform | IndexRule::TopK => IndexChoice::Ascending(rank),
                };
                ProjectorShape::Index { rows: by_rows, bound: count, choice }
            }
        })
    }

    fn select(&mut self, g: &[f32]) -> Projector {
        let Dims { rows: m, cols: n } = self.dims;
        let by_rows = m >= n;
        let count = if by_rows { m } else { n };
        let rank = self.config.rank.min(count);
        let projector = match &self.config.projection {
            Projection::Svd(solver) => {
                let side = if by_rows { Side::Right } else { Side::Left };
                let mut probes = SplitMix::new(self.config.seed ^ self.salt, self.selections as u64);
                let basis = linalg::top_singular_basis(g, self.dims, rank, side, *solver, &mut probes);
                Projector::Svd { side, basis, rank }
            }
            Projection::Index(rule) => {
                let indices = match rule {
                    IndexRule::Schedule(schedule) => {
                        schedule[self.selections.min(schedule.len().saturating_sub(1))].clone()
                    }
                    IndexRule::Uniform => {
                        SplitMix::new(self.config.seed ^ self.salt, self.selections as u64).choose(count, rank)
                    }
                    IndexRule::TopK => {
                        // Each norm once (not once per comparison), each summed in f32 in index order.
                        let norms: Vec<f32> = if by_rows {
                            g.chunks(n.max(1)).map(|row| row.iter().map(|x| x * x).sum()).collect()
                        } else {
                            let mut norms = vec![0.0f32; n];
                            for row in g.chunks(n.max(1)) {
                                for (s, x) in norms.iter_mut().zip(row) {
                                    *s += x * x;
                                }
                            }
                            norms
                        };
                        let mut order: Vec<usize> = (0..count).collect();
                        order.sort_by(|&a, &b| norms[b].total_cmp(&norms[a]));
                        let mut kept = order[..rank].to_vec();
                        kept.sort_unstable();
                        kept
                    }
                };
                Projector::Index { rows: by_rows, indices }
            }
        };
        self.selections += 1;
        projector
    }

    /// Counts the step, chooses the subspace when it is due and returns the learning rate.
    fn prepare(&mut self, grad: &[f32], ctx: &StepContext) -> f64 {
        let t = ctx.t;
        self.step_t = t;
        if self.projector.is_none() || t == 1 || t.is_multiple_of(self.config.update_gap.max(1)) {
            let started = std::time::Instant::now();
            let projector = self.select(grad);
            self.selection_time = Some(started.elapsed());
            // The clean rule of algorithms.md §10.9: zero the momentum, then update it.
            self.momentum_low = vec![0.0; projector.low_len(self.dims)];
            self.projector = Some(projector);
        }
        f64::from(self.config.lr) * f64::from(ctx.lr_scale)
    }

    /// Any projector and subset map, through the projector's own shape: the
    /// SVD path (and index projectors with chunk, coordinate or whole subsets).
    fn projected_step(&mut self, param: &mut [f32], grad: &[f32], lr: f64) {
        let c = &self.config;
        let t = self.step_t;
        let projector = self.projector.as_ref().expect("selected before the step");
        let mut low = projector.down(grad, self.dims);
        for (m, g) in self.momentum_low.iter_mut().zip(&low) {
            *m = c.beta1 * *m + (1.0 - c.beta1) * g;
        }
        // u = Pᵀ(m_low) + g − Pᵀ(gl), as (Pᵀ(m_low) + g) − Pᵀ(gl) for index
        // projectors (the fused index path has these bits), and as g + Pᵀ(m_low − gl)
        // for the svd basis: two dense m·n·r products a step instead of three,
        // equal up to f32 rounding.
        // The update is written over a projection's own buffer: no other temporary.
        let update = if matches!(projector, Projector::Svd { .. }) {
            low.iter_mut().zip(&self.momentum_low).for_each(|(g, m)| *g = m - *g);
            let mut update = projector.up(&low, self.dims);
            update.iter_mut().zip(grad).for_each(|(d, g)| *d += g);
            update
        } else {
            let mut update = projector.up(&self.momentum_low, self.dims);
            let in_subspace = projector.up(&low, self.dims);
            update.iter_mut().zip(grad).zip(&in_subspace).for_each(|((m, g), s)| *m = *m + g - s);
            update
        };
        match &mut self.accumulator {
            None => {
                let lr = lr as f32;
                for (w, u) in param.iter_mut().zip(&update) {
                    *w -= lr * u;
                }
            }
            Some(accumulator) => {
                accumulator.accumulate(grad, c.beta2);
                let alpha = subset_norm_alpha(lr, c.beta1, c.beta2, c.correct_bias, t) as f32;
                let denominators = accumulator.denominators(c.eps);
                accumulator.map.apply(param, &update, &denominators, alpha);
            }
        }
        if c.weight_decay != 0.0 {
            let keep = 1.0 - (lr * f64::from(c.weight_decay)) as f32;
            param.iter_mut().for_each(|w| *w *= keep);
        }
    }

    /// An index projector with row or column subsets (or none), fused: the
    /// momentum of the chosen rows or columns, the Subset-Norm statistics and
    /// the update in one pass over the tensor by row ranges in parallel, with
    /// no temporary of its size. Each coordinate gets the operations of
    /// [`Self::projected_step`] in the same order (`(m + g) - s` with `s = g`
    /// on a chosen coordinate, `(0 + g) - 0` elsewhere): the same bits.
    /// False (nothing done) for any other projector or subset map.
    fn index_step(&mut self, param: &mut [f32], grad: &[f32], lr: f64) -> bool {
        let Some(Projector::Index { rows: by_rows, indices }) = &self.projector else { return false };
        let map = self.accumulator.as_ref().map(|a| a.map);
        if !matches!(map, None | Some(SubsetMap::Rows { .. } | SubsetMap::Columns { .. })) {
            return false;
        }
        let c = &self.config;
        let (by_rows, r) = (*by_rows, indices.len());
        let (rows, n) = (self.dims.rows, self.dims.cols.max(1));
        let (beta1, keep1, beta2, eps) = (c.beta1, 1.0 - c.beta1, c.beta2, c.eps);
        let keep = if c.weight_decay != 0.0 { 1.0 - (lr * f64::from(c.weight_decay)) as f32 } else { 1.0 };
        let alpha = match map {
            None => lr as f32,
            Some(_) => subset_norm_alpha(lr, c.beta1, c.beta2, c.correct_bias, self.step_t) as f32,
        };
        // Column subsets need every row's square before any factor is known.
        let column_factors: Option<Vec<f32>> = match &mut self.accumulator {
            Some(accumulator @ SubsetAccumulator { map: SubsetMap::Columns { .. }, .. }) => {
                let sums = parallel::column_sums_of_squares(grad, n);
                Some(accumulator.fold_into_factors(&sums, beta2, eps, alpha))
            }
            _ => None,
        };
        // The chosen rows' momentum first (a few rows); the pass below only reads it.
        let mut chosen_row = vec![usize::MAX; if by_rows { rows } else { 0 }];
        if by_rows {
            for (c, &i) in indices.iter().enumerate() {
                chosen_row[i] = c;
                let g = &grad[i * n..(i + 1) * n];
                for (m, &g) in self.momentum_low[c * n..(c + 1) * n].iter_mut().zip(g) {
                    *m = beta1 * *m + keep1 * g;
                }
            }
        }
        let (momentum_rows, momentum_columns): (&[f32], &mut [f32]) =
            if by_rows { (&self.momentum_low, &mut []) } else { (&[], &mut self.momentum_low) };
        let row_v: &mut [f32] = match &mut self.accumulator {
            Some(SubsetAccumulator { map: SubsetMap::Rows { .. }, v }) => v,
            _ => &mut [],
        };
        let per_task = parallel::runs_per_task(n);
        let shares = Shares { w: per_task * n, m: per_task * r, v: per_task };
        parallel::zip_tasks(param, grad, momentum_columns, row_v, shares, |task, (((w, g), m_columns), v)| {
            let mut numerator = vec![0.0f32; n];
            let mut m_columns = m_columns.map(|m| m.chunks_mut(r.max(1)));
            let mut v = v.iter_mut();
            for (k, (w, g)) in w.chunks_mut(n).zip(g.chunks(n)).enumerate() {
                let i = task * per_task + k;
                match chosen_row.get(i) {
                    Some(&c) if c != usize::MAX => {
                        let m = &momentum_rows[c * n..(c + 1) * n];
                        for ((out, &g), m) in numerator.iter_mut().zip(g).zip(m) {
                            *out = (m + g) - g;
                        }
                    }
                    _ => {
                        for (out, &g) in numerator.iter_mut().zip(g) {
                            *out = (0.0 + g) - 0.0;
                        }
                    }
                }
                if let Some(m) = m_columns.as_mut().and_then(Iterator::next) {
                    for (m, &j) in m.iter_mut().zip(indices) {
                        *m = beta1 * *m + keep1 * g[j];
                        numerator[j] = (*m + g[j]) - g[j];
                    }
                }
                match (&column_factors, v.next()) {
                    (Some(factors), _) => {
                        for ((w, n), f) in w.iter_mut().zip(&numerator).zip(factors) {
                            *w = (*w - f * n) * keep;
                        }
                    }
                    (None, row_v) => {
                        let factor = match row_v {
                            Some(v) => {
                                *v = fold(*v, square_sum(g), beta2);
                                alpha / (v.sqrt() + eps)
                            }
                            None => alpha,
                        };
                        for (w, n) in w.iter_mut().zip(&numerator) {
                            *w = (*w - factor * n) * keep;
                        }
                    }
                }
            }
        });
        true
    }
}

impl Optimizer for SubspaceMomentum {
    fn step(&mut self, param: &mut [f32], grad: &[f32], ctx: &StepContext) {
        let lr = self.prepare(grad, ctx);
        if !self.index_step(param, grad, lr) {
            self.projected_step(param, grad, lr);
        }
    }

    fn take_selection_time(&mut self) -> Option<std::time::Duration> {
        self.selection_time.take()
    }

    fn state_bytes(&self) -> usize {
        let Dims { rows: m, cols: n } = self.dims;
        let r = self.config.rank.min(m.max(n));
        // What the state holds once the first subspace is chosen.
        let (low, projector) = match (&self.config.projection, m >= n) {
            (Projection::Index(_), true) => (r * n, r),
            (Projection::Index(_), false) => (m * r, r),
            (Projection::Svd(_), true) => (m * r, r * n),
            (Projection::Svd(_), false) => (r * n, m * r),
        };
        let v = self.accumulator.as_ref().map_or(0, |a| a.v.len());
        (low + projector + v) * std::mem::size_of::<f32>()
    }

    fn state(&self) -> Vec<(&'static str, Vec<f32>)> {
        let mut state = vec![("momentum_low", self.momentum_low.clone()), ("step", vec![self.step_t as f32])];
        if let Some(projector) = &self.projector {
            state.push(("momentum_full", projector.up(&self.momentum_low, self.dims)));
            state.push(("projector_matrix", projector.projection_matrix(self.dims)));
            state.push(("indices", projector.indices()));
        }
        if let Some(accumulator) = &self.accumulator {
            state.push(("v", accumulator.v.clone()));
        }
        state
    }

    fn export_state(&self) -> OptimizerState {
        let mut state = OptimizerState::default();
        match &self.projector {
            Some(projector) => projector.export_into(&mut state),
            None => state.put_integer("projector_kind", 0),
        }
        state.put_buffer("momentum_low", &self.momentum_low);
        if let Some(accumulator) = &self.accumulator {
            state.put_buffer("v", &accumulator.v);
        }
        state.put_integer("selections", self.selections as u64);
        state.put_integer("step_t", self.step_t);
        state
    }

    fn import_state(&mut self, state: &OptimizerState) -> Result<(), StateError> {
        let mut reader = StateReader::new(state);
        let selections = reader.count("selections")?;
        let kind = reader.integer("projector_kind")?;
        let selected = kind != 0;
        // Every selection installs a projector, and only selections do.
        if selected != (selections > 0) {
            return Err(invalid("selections", format!("{selections} selections do not fit projector_kind {kind}")));
        }
        let projector = if selected {
            Some(Projector::import_from(&mut reader, &self.projector_shape(selections)?)?)
        } else {
            None
        };
        let low_len = projector.as_ref().map_or(0, |p| p.low_len(self.dims));
        let momentum_low = reader.buffer("momentum_low", low_len)?.to_vec();
        let v = match &self.accumulator {
            Some(accumulator) => Some(reader.buffer("v", accumulator.v.len())?.to_vec()),
            None => None,
        };
        let step_t = reader.integer("step_t")?;
        reader.finish()?;
        self.projector = projector;
        self.momentum_low = momentum_low;
        if let (Some(accumulator), Some(v)) = (&mut self.accumulator, v) {
            accumulator.v = v;
        }
        self.selections = selections;
        self.step_t = step_t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::tests::bits;

    #[test]
    fn each_selection_is_timed_and_reported_once() {
        let config = SubspaceMomentumConfig { rank: 2, update_gap: 2, ..Default::default() };
        let dims = Dims { rows: 6, cols: 4 };
        let mut sm = SubspaceMomentum::new(config, dims, "w");
        let (mut w, g) = (vec![0.5f32; 24], vec![0.1f32; 24]);
        let mut chose = Vec::new();
        for t in 1..=4 {
            sm.step(&mut w, &g, &StepContext { t, lr_scale: 1.0 });
            chose.push(sm.take_selection_time().is_some());
            assert!(sm.take_selection_time().is_none(), "reported once");
        }
        // Chosen at t = 1 and at every multiple of the gap.
        assert_eq!(chose, [true, true, false, true]);
    }

    #[test]
    fn fused_index_steps_match_the_projected_path_in_every_bit() {
        // Tall (rows chosen, row subsets) and wide (columns chosen, column
        // subsets), larger than one task so rows are split across threads.
        for dims in [Dims { rows: 1500, cols: 96 }, Dims { rows: 96, cols: 1500 }] {
            for adaptive in [false, true] {
                for rule in [IndexRule::TopK, IndexRule::Uniform] {
                    for threads in [1, 2, 3] {
                        let config = SubspaceMomentumConfig {
                            lr: 1e-2,
                            beta1: 0.9,
                            beta2: 0.999,
                            eps: 1e-6,
                            rank: 24,
                            update_gap: 2,
                            projection: Projection::Index(rule.clone()),
                            adaptive,
                            subsets: super::super::Subsets::Heuristic,
                            correct_bias: adaptive,
                            weight_decay: 0.05,
                            seed: 3,
                        };
                        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                        let len = dims.rows * dims.cols;
                        let (mut reference, mut fused) = (
                            SubspaceMomentum::new(config.clone(), dims, "w"),
                            SubspaceMomentum::new(config, dims, "w"),
                        );
                        let w0: Vec<f32> = (0..len).map(|i| ((i * 31) % 97) as f32 / 50.0 - 1.0).collect();
                        let (mut w_ref, mut w_fused) = (w0.clone(), w0);
                        for t in 1..=5u64 {
                            let g: Vec<f32> =
                                (0..len).map(|i| ((i * 13 + t as usize * 7) % 101) as f32 / 40.0 - 1.2).collect();
                            let ctx = StepContext { t, lr_scale: 0.5 };
                            let lr = reference.prepare(&g, &ctx);
                            reference.projected_step(&mut w_ref, &g, lr);
                            let lr = fused.prepare(&g, &ctx);
                            assert!(pool.install(|| fused.index_step(&mut w_fused, &g, lr)), "the fused path ran");
                        }
                        let case = format!("{dims:?}, adaptive {adaptive}, {rule:?}, {threads} threads");
                        assert_eq!(bits(&w_fused), bits(&w_ref), "{case}");
                        assert_eq!(bits(&fused.momentum_low), bits(&reference.momentum_low), "{case}");
                        let v = |s: &SubspaceMomentum| s.accumulator.as_ref().map(|a| bits(&a.v));
                        assert_eq!(v(&fused), v(&reference), "{case}");
                    }
                }
            }
        }
    }
}
