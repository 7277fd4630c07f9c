//! Subspace-Momentum (algorithms.md §3): momentum lives in a rank-r subspace
//! of each matrix and the orthogonal rest of the gradient is applied as plain
//! SGD; AdamSNSM divides the result by the Subset-Norm state of the full
//! gradient. The subspace is re-chosen from the gradient at t = 1 and every
//! t ≡ 0 (mod T); only the momentum is reset then (zero first, then update).

use super::linalg::{self, Dims, Side};
use super::projector::{IndexChoice, Projector, ProjectorShape};
use super::subset_norm::{SubsetAccumulator, SubsetMap, subset_norm_alpha};
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
        }
    }

    /// The projector `select` builds as selection number `selections` (1-based).
    fn projector_shape(&self, selections: usize) -> Result<ProjectorShape<'_>, StateError> {
        let Dims { rows: m, cols: n } = self.dims;
        let by_rows = m >= n;
        let count = if by_rows { m } else { n };
        let rank = self.config.rank.min(count);
        Ok(match &self.config.projection {
            Projection::Svd => {
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
            Projection::Svd => {
                let side = if by_rows { Side::Right } else { Side::Left };
                Projector::Svd { side, basis: linalg::top_singular_basis(g, self.dims, rank, side), rank }
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
                        let norm = |k: usize| -> f32 {
                            if by_rows {
                                g[k * n..(k + 1) * n].iter().map(|x| x * x).sum()
                            } else {
                                (0..m).map(|i| g[i * n + k] * g[i * n + k]).sum()
                            }
                        };
                        let mut order: Vec<usize> = (0..count).collect();
                        order.sort_by(|&a, &b| norm(b).total_cmp(&norm(a)));
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
}

impl Optimizer for SubspaceMomentum {
    fn step(&mut self, param: &mut [f32], grad: &[f32], ctx: &StepContext) {
        let c = self.config.clone();
        let t = ctx.t;
        self.step_t = t;
        let lr = f64::from(c.lr) * f64::from(ctx.lr_scale);
        if self.projector.is_none() || t == 1 || t.is_multiple_of(c.update_gap.max(1)) {
            let projector = self.select(grad);
            // The clean rule of algorithms.md §10.9: zero the momentum, then update it.
            self.momentum_low = vec![0.0; projector.low_len(self.dims)];
            self.projector = Some(projector);
        }
        let projector = self.projector.as_ref().expect("selected above");
        let low = projector.down(grad, self.dims);
        for (m, g) in self.momentum_low.iter_mut().zip(&low) {
            *m = c.beta1 * *m + (1.0 - c.beta1) * g;
        }
        let momentum = projector.up(&self.momentum_low, self.dims);
        let in_subspace = projector.up(&low, self.dims);
        match &mut self.accumulator {
            None => {
                let lr = lr as f32;
                for (((w, g), m), s) in param.iter_mut().zip(grad).zip(&momentum).zip(&in_subspace) {
                    *w -= lr * (m + g - s);
                }
            }
            Some(accumulator) => {
                accumulator.accumulate(grad, c.beta2);
                let alpha = subset_norm_alpha(lr, c.beta1, c.beta2, c.correct_bias, t) as f32;
                let denominators = accumulator.denominators(c.eps);
                let update: Vec<f32> =
                    grad.iter().zip(&momentum).zip(&in_subspace).map(|((g, m), s)| m + g - s).collect();
                accumulator.map.apply(param, &update, &denominators, alpha);
            }
        }
        if c.weight_decay != 0.0 {
            let keep = 1.0 - (lr * f64::from(c.weight_decay)) as f32;
            param.iter_mut().for_each(|w| *w *= keep);
        }
    }

    fn state_bytes(&self) -> usize {
        let Dims { rows: m, cols: n } = self.dims;
        let r = self.config.rank.min(m.max(n));
        // What the state holds once the first subspace is chosen.
        let (low, projector) = match (&self.config.projection, m >= n) {
            (Projection::Index(_), true) => (r * n, r),
            (Projection::Index(_), false) => (m * r, r),
            (Projection::Svd, true) => (m * r, r * n),
            (Projection::Svd, false) => (r * n, m * r),
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
