//! FRUGAL gradient splitting (algorithms.md §4): a state-full Adam on a
//! subspace of each projectable matrix and a state-free sign (or SGD) step on
//! the rest. The subspace is re-chosen before steps 1, T+1, 2T+1, … and Adam's
//! state (with its own step counter) restarts then. Regular tensors (norms,
//! embeddings, biases, the LM head) are plain AdamW and are built elsewhere.

use super::adam::Moments;
use super::linalg::{self, Dims, Side, round_half_even, sign0};
use super::parallel::{self, Shares};
use super::projector::{IndexChoice, Projector, ProjectorShape};
use super::{
    BlockOrder, FrugalConfig, FrugalMode, InactiveRule, Optimizer, OptimizerState, StateError, StateReader,
    StepContext, invalid,
};
use crate::random::{SplitMix, name_hash};

/// Name parts that make a 2-D tensor projectable under FRUGAL's default rule.
pub const PROJECTABLE_NAMES: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "up_proj",
    "down_proj",
    "gate_proj",
    "attn",
    "mlp",
    "query",
    "key",
    "value",
];

/// FRUGAL's default rule (algorithms.md §0): 2-D weights of attention and MLP blocks.
pub fn projectable_by_name(name: &str, shape: &[u64]) -> bool {
    shape.len() >= 2 && PROJECTABLE_NAMES.iter().any(|n| name.contains(n))
}

/// Where a tensor sits among its group's projectable tensors (block mode counts tensors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupPosition {
    /// Position in the group's projectable tensors, in spec order.
    pub index: usize,
    /// Number of projectable tensors in the group.
    pub count: usize,
}

/// FRUGAL state of one projectable matrix.
pub struct Frugal {
    config: FrugalConfig,
    dims: Dims,
    position: GroupPosition,
    salt: u64,
    subspace: Subspace,
    moments: Moments,
    /// How long the last subspace selection took, until reported.
    selection_time: Option<std::time::Duration>,
}

/// The state-full part of a tensor in the current period.
enum Subspace {
    /// Before the first step.
    Unselected,
    /// Block mode, not active: only the state-free rule applies.
    Inactive,
    /// Block mode, active: Adam on the whole tensor.
    Whole,
    /// Columns or SVD: Adam on the projection.
    Projected(Projector),
}

impl Frugal {
    /// State for an m×n matrix at `position` among its group's projectable tensors.
    pub fn new(config: FrugalConfig, dims: Dims, position: GroupPosition, name: &str) -> Self {
        Self {
            config,
            dims,
            position,
            salt: name_hash(name),
            subspace: Subspace::Unselected,
            moments: Moments::default(),
            selection_time: None,
        }
    }

    /// Active tensor positions of block mode in `period`.
    fn active_blocks(&self, period: usize) -> Vec<usize> {
        let c = &self.config;
        if let Some(schedule) = &c.schedule {
            return schedule[period.min(schedule.len().saturating_sub(1))].clone();
        }
        let n = self.position.count;
        let active = round_half_even(f64::from(c.density) * n as f64).min(n);
        if active == 0 || n == 0 {
            return Vec::new();
        }
        let window = |start: usize| (0..active).map(|k| (start + k) % n).collect::<Vec<_>>();
        match &c.mode {
            FrugalMode::Block { order: BlockOrder::Ascending } => window((period * active) % n),
            FrugalMode::Block { order: BlockOrder::Descending } => {
                let back = (active + period * active) % n;
                window((n - back) % n)
            }
            _ => SplitMix::new(c.seed, period as u64).choose(n, active),
        }
    }

    /// The projector `select` builds in columns or SVD mode (None in block mode).
    fn projector_shape(&self) -> Option<ProjectorShape<'_>> {
        let c = &self.config;
        let Dims { rows: m, cols: n } = self.dims;
        match &c.mode {
            FrugalMode::Block { .. } => None,
            FrugalMode::Columns => {
                let choice = match &c.schedule {
                    // The period is not part of the state, so any entry of the schedule may be current.
                    Some(schedule) => IndexChoice::OneOf(schedule),
                    None => IndexChoice::Ascending(((f64::from(c.density) * n as f64).floor() as usize).min(n)),
                };
                Some(ProjectorShape::Index { rows: false, bound: n, choice })
            }
            FrugalMode::Svd(_) => {
                let (side, rank) = if m >= n {
                    (Side::Right, round_half_even(f64::from(c.density) * n as f64))
                } else {
                    (Side::Left, round_half_even(f64::from(c.density) * m as f64))
                };
                // The SVD has only min(m, n) vectors to give.
                let kept = rank.min(m.min(n));
                let basis_len = if side == Side::Right { kept * n } else { m * kept };
                Some(ProjectorShape::Svd { side, rank, basis_len })
            }
        }
    }

    /// The subspace for `period`.
    fn select(&self, g: &[f32], period: usize) -> Subspace {
        let c = &self.config;
        let Dims { rows: m, cols: n } = self.dims;
        match &c.mode {
            FrugalMode::Block { .. } => {
                if self.active_blocks(period).contains(&self.position.index) {
                    Subspace::Whole
                } else {
                    Subspace::Inactive
                }
            }
            FrugalMode::Columns => {
                let indices = match &c.schedule {
                    Some(schedule) => schedule[period.min(schedule.len().saturating_sub(1))].clone(),
                    None => {
                        let k = (f64::from(c.density) * n as f64).floor() as usize;
                        SplitMix::new(c.seed ^ self.salt, period as u64).choose(n, k)
                    }
                };
                Subspace::Projected(Projector::Index { rows: false, indices })
            }
            FrugalMode::Svd(solver) => {
                let (side, rank) = if m >= n {
                    (Side::Right, round_half_even(f64::from(c.density) * n as f64))
                } else {
                    (Side::Left, round_half_even(f64::from(c.density) * m as f64))
                };
                let mut probes = SplitMix::new(c.seed ^ self.salt, period as u64);
                let basis = linalg::top_singular_basis(g, self.dims, rank, side, *solver, &mut probes);
                Subspace::Projected(Projector::Svd { side, basis, rank })
            }
        }
    }
}

/// The state-free rule alone on a whole tensor, `w ← w · decay - lr · free(g)`, in one pass.
fn state_free(param: &mut [f32], grad: &[f32], decay: f32, lr: f32, free: impl Fn(f32) -> f32 + Sync) {
    let mut none: [f32; 0] = [];
    parallel::zip_tasks(param, grad, &mut [], &mut none, Shares::weights(parallel::GRAIN), |_, (((w, g), _), _)| {
        for (w, &g) in w.iter_mut().zip(g) {
            *w = *w * decay - lr * free(g);
        }
    });
}

/// One step of FRUGAL's columns mode over the whole matrix: Adam on the
/// chosen columns, the state-free rule on the rest, decay on all.
struct SplitStep<'a> {
    dims: Dims,
    /// The chosen columns, in the order of the moments' columns.
    indices: &'a [usize],
    /// β1, β2, ε and this update's bias corrections `1/(1-β1^t)`, `1/sqrt(1-β2^t)`.
    adam: (f32, f32, f32, f32, f32),
    decay: f32,
    lr_active: f32,
    lr_free: f32,
}

impl SplitStep<'_> {
    /// Updates `param` and the m × r moments row by row, in parallel over row
    /// ranges, gathering each row's chosen columns on the way: no temporary
    /// of the tensor's (or the subspace's) size. Each coordinate gets the
    /// same operations, in the same order, as the projected path's
    /// `w · decay - (lr_active · up(direction(down(g))) + lr_free · free(g - up(down(g))))`,
    /// where a chosen column has `g - g = 0` and any other `u = s = 0`: the same bits.
    fn columns(
        &self,
        param: &mut [f32],
        grad: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        free: impl Fn(f32) -> f32 + Sync + Send,
    ) {
        let Self { dims, indices, adam: (beta1, beta2, eps, inv_bias1, inv_bias2_sqrt), decay, lr_active, lr_free } =
            *self;
        let (keep1, keep2) = (1.0 - beta1, 1.0 - beta2);
        let (n, r) = (dims.cols.max(1), indices.len());
        let (active_zero, free_zero) = (lr_active * 0.0, lr_free * free(0.0));
        let per_task = parallel::runs_per_task(n);
        let shares = Shares { w: per_task * n, m: per_task * r, v: per_task * r };
        parallel::zip_tasks(param, grad, m, v, shares, move |_, (((w, g), m), v)| {
            let m = m.unwrap_or_default();
            // The row's chosen columns, gathered so that Adam's loop runs over
            // contiguous values the compiler can vectorize.
            let (mut chosen, mut chosen_g) = (vec![0.0f32; r], vec![0.0f32; r]);
            for (i, (w, g)) in w.chunks_mut(n).zip(g.chunks(n)).enumerate() {
                let (m, v) = (&mut m[i * r..(i + 1) * r], &mut v[i * r..(i + 1) * r]);
                for ((old, gj), &j) in chosen.iter_mut().zip(chosen_g.iter_mut()).zip(indices) {
                    (*old, *gj) = (w[j], g[j]);
                }
                for (((new, &g), m), v) in chosen.iter_mut().zip(&chosen_g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = beta1 * *m + keep1 * g;
                    *v = beta2 * *v + keep2 * g * g;
                    let u = *m * inv_bias1 / (v.sqrt() * inv_bias2_sqrt + eps);
                    *new = *new * decay - (lr_active * u + free_zero);
                }
                for (w, &g) in w.iter_mut().zip(g) {
                    *w = *w * decay - (active_zero + lr_free * free(g));
                }
                for (new, &j) in chosen.iter().zip(indices) {
                    w[j] = *new;
                }
            }
        });
    }
}

/// The per-step factors of the two rules.
struct Rates {
    decay: f32,
    lr_active: f32,
    lr_free: f32,
    rule: InactiveRule,
}

/// Any projected step, through the subspace's own shape:
/// `w · decay - (lr_active · up(direction(down(g))) + lr_free · free(g - up(down(g))))`.
/// The SVD mode's path; columns mode has a fused one with the same bits.
fn projected_step(
    moments: &mut Moments,
    projector: &Projector,
    dims: Dims,
    c: &FrugalConfig,
    rates: &Rates,
    param: &mut [f32],
    grad: &[f32],
) {
    let &Rates { decay, lr_active, lr_free, rule } = rates;
    let free = |x: f32| match rule {
        InactiveRule::SignSgd => sign0(x),
        InactiveRule::Sgd => x,
        InactiveRule::Frozen => 0.0,
    };
    param.iter_mut().for_each(|w| *w *= decay);
    let low = projector.down(grad, dims);
    let mut direction = vec![0.0; low.len()];
    moments.direction(&low, c.beta1, c.beta2, c.eps, &mut direction);
    let update = projector.up(&direction, dims);
    let in_subspace = projector.up(&low, dims);
    for (((w, &g), u), s) in param.iter_mut().zip(grad).zip(&update).zip(&in_subspace) {
        *w -= lr_active * u + lr_free * free(g - s);
    }
}

impl Optimizer for Frugal {
    fn step(&mut self, param: &mut [f32], grad: &[f32], ctx: &StepContext) {
        let c = self.config.clone();
        let t = ctx.t.max(1);
        let gap = c.update_gap.max(1);
        if matches!(self.subspace, Subspace::Unselected) || (t - 1).is_multiple_of(gap) {
            let period = ((t - 1) / gap) as usize;
            let started = std::time::Instant::now();
            let selection = self.select(grad, period);
            self.selection_time = Some(started.elapsed());
            let low_len = match &selection {
                Subspace::Unselected | Subspace::Inactive => 0,
                Subspace::Whole => grad.len(),
                Subspace::Projected(p) => p.low_len(self.dims),
            };
            if c.reset_statistics || self.moments.m.len() != low_len {
                self.moments = Moments::new(low_len);
            }
            self.subspace = selection;
        }
        let lr = f64::from(c.lr) * f64::from(ctx.lr_scale);
        let decay = (1.0 - lr * f64::from(c.weight_decay)) as f32;
        let lr_active = (lr * f64::from(c.proj_lr_scale)) as f32;
        let lr_free = (lr * f64::from(c.proj_lr_scale) * f64::from(c.inactive_lr_scale)) as f32;
        let dims = self.dims;
        match (&self.subspace, c.inactive_rule) {
            (Subspace::Unselected | Subspace::Inactive, InactiveRule::SignSgd) => {
                state_free(param, grad, decay, lr_free, sign0)
            }
            (Subspace::Unselected | Subspace::Inactive, InactiveRule::Sgd) => {
                state_free(param, grad, decay, lr_free, |g| g)
            }
            (Subspace::Unselected | Subspace::Inactive, InactiveRule::Frozen) => {
                state_free(param, grad, decay, lr_free, |_| 0.0)
            }
            (Subspace::Whole, _) => self.moments.step_weights(param, grad, c.beta1, c.beta2, c.eps, decay, lr_active),
            (Subspace::Projected(Projector::Index { rows: false, indices }), rule) => {
                let (inv_bias1, inv_bias2_sqrt) = self.moments.next_corrections(c.beta1, c.beta2);
                let split = SplitStep {
                    dims,
                    indices,
                    adam: (c.beta1, c.beta2, c.eps, inv_bias1, inv_bias2_sqrt),
                    decay,
                    lr_active,
                    lr_free,
                };
                let (m, v) = self.moments.buffers_mut();
                match rule {
                    InactiveRule::SignSgd => split.columns(param, grad, m, v, sign0),
                    InactiveRule::Sgd => split.columns(param, grad, m, v, |g| g),
                    InactiveRule::Frozen => split.columns(param, grad, m, v, |_| 0.0),
                }
            }
            (Subspace::Projected(projector), rule) => {
                let rates = Rates { decay, lr_active, lr_free, rule };
                projected_step(&mut self.moments, projector, dims, &c, &rates, param, grad)
            }
        }
    }

    fn unshare(&mut self) -> bool {
        self.moments.unshare()
    }

    fn take_selection_time(&mut self) -> Option<std::time::Duration> {
        self.selection_time.take()
    }

    fn state_bytes(&self) -> usize {
        let projector = match &self.subspace {
            Subspace::Projected(p) => p.state_len(),
            _ => 0,
        };
        self.moments.bytes() + projector * std::mem::size_of::<f32>()
    }

    fn state(&self) -> Vec<(&'static str, Vec<f32>)> {
        let active = matches!(self.subspace, Subspace::Whole | Subspace::Projected(_));
        let mut state = vec![("active", vec![if active { 1.0 } else { 0.0 }])];
        if active {
            state.push(("adam_step", vec![self.moments.t as f32]));
            state.push(("m", self.moments.m.to_vec()));
            state.push(("v", self.moments.v.to_vec()));
        }
        if let Subspace::Projected(projector) = &self.subspace {
            state.push(("projector_matrix", projector.projection_matrix(self.dims)));
        }
        state
    }

    fn export_state(&self) -> OptimizerState {
        let mut state = OptimizerState::default();
        let code = match &self.subspace {
            Subspace::Unselected => UNSELECTED,
            Subspace::Inactive => INACTIVE,
            Subspace::Whole => WHOLE,
            Subspace::Projected(projector) => {
                projector.export_into(&mut state);
                PROJECTED
            }
        };
        state.put_integer("subspace", code);
        self.moments.export_into(&mut state);
        state
    }

    fn import_state(&mut self, state: &OptimizerState) -> Result<(), StateError> {
        let mut reader = StateReader::new(state);
        let code = reader.integer("subspace")?;
        let block = matches!(self.config.mode, FrugalMode::Block { .. });
        let subspace = match (code, self.projector_shape()) {
            (UNSELECTED, _) => Subspace::Unselected,
            (INACTIVE, None) => Subspace::Inactive,
            (WHOLE, None) => Subspace::Whole,
            (PROJECTED, Some(shape)) => Subspace::Projected(Projector::import_from(&mut reader, &shape)?),
            _ => {
                let allowed =
                    if block { "0 (unselected), 1 (inactive) or 2 (whole)" } else { "0 (unselected) or 3 (projected)" };
                return Err(invalid("subspace", format!("this instance's mode allows {allowed}, got {code}")));
            }
        };
        // `step` resizes the moments to the subspace at every selection, so they always match it.
        let low_len = match &subspace {
            Subspace::Unselected | Subspace::Inactive => 0,
            Subspace::Whole => self.dims.rows * self.dims.cols,
            Subspace::Projected(projector) => projector.low_len(self.dims),
        };
        let moments = Moments::import_from(&mut reader, low_len)?;
        reader.finish()?;
        self.subspace = subspace;
        self.moments = moments;
        Ok(())
    }
}

const UNSELECTED: u64 = 0;
const INACTIVE: u64 = 1;
const WHOLE: u64 = 2;
const PROJECTED: u64 = 3;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::tests::bits;

    #[test]
    fn fused_paths_match_the_separate_passes_in_every_bit() {
        // Larger than one task, so the fused paths split rows across threads.
        let dims = Dims { rows: 96, cols: 1500 };
        let len = dims.rows * dims.cols;
        let indices: Vec<usize> = (0..dims.cols).filter(|j| (j * 7) % 5 == 1).rev().collect();
        let projector = Projector::Index { rows: false, indices: indices.clone() };
        let c = FrugalConfig { lr: 1e-2, weight_decay: 0.1, ..Default::default() };
        for rule in [InactiveRule::SignSgd, InactiveRule::Sgd, InactiveRule::Frozen] {
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let w0: Vec<f32> = (0..len).map(|i| ((i * 31) % 97) as f32 / 50.0 - 1.0).collect();
                let (mut w_ref, mut w_fused, mut w_whole, mut w_whole_ref) = (w0.clone(), w0.clone(), w0.clone(), w0);
                let low_len = projector.low_len(dims);
                let (mut m_ref, mut m_fused) = (Moments::new(low_len), Moments::new(low_len));
                let (mut whole_ref, mut whole) = (Moments::new(len), Moments::new(len));
                let rates = Rates { decay: 0.999, lr_active: 0.01, lr_free: 0.003, rule };
                for step in 0..3 {
                    let g: Vec<f32> = (0..len).map(|i| ((i * 13 + step * 7) % 101) as f32 / 40.0 - 1.2).collect();
                    projected_step(&mut m_ref, &projector, dims, &c, &rates, &mut w_ref, &g);
                    pool.install(|| {
                        let (b1, b2) = (c.beta1, c.beta2);
                        let corrections = m_fused.next_corrections(b1, b2);
                        let split = SplitStep {
                            dims,
                            indices: &indices,
                            adam: (b1, b2, c.eps, corrections.0, corrections.1),
                            decay: rates.decay,
                            lr_active: rates.lr_active,
                            lr_free: rates.lr_free,
                        };
                        let (m, v) = m_fused.buffers_mut();
                        match rule {
                            InactiveRule::SignSgd => split.columns(&mut w_fused, &g, m, v, sign0),
                            InactiveRule::Sgd => split.columns(&mut w_fused, &g, m, v, |g| g),
                            InactiveRule::Frozen => split.columns(&mut w_fused, &g, m, v, |_| 0.0),
                        }
                        whole.step_weights(&mut w_whole, &g, b1, b2, c.eps, rates.decay, rates.lr_active);
                    });
                    let mut direction = vec![0.0; len];
                    whole_ref.direction(&g, c.beta1, c.beta2, c.eps, &mut direction);
                    for (w, d) in w_whole_ref.iter_mut().zip(&direction) {
                        *w *= rates.decay;
                        *w -= rates.lr_active * d;
                    }
                }
                assert_eq!(bits(&w_fused), bits(&w_ref), "{rule:?} on {threads} threads");
                assert_eq!(bits(&m_fused.m), bits(&m_ref.m));
                assert_eq!(bits(&m_fused.v), bits(&m_ref.v));
                assert_eq!(bits(&w_whole), bits(&w_whole_ref), "whole tensor on {threads} threads");
            }
        }
    }
}
