//! FRUGAL gradient splitting (algorithms.md §4): a state-full Adam on a
//! subspace of each projectable matrix and a state-free sign (or SGD) step on
//! the rest. The subspace is re-chosen before steps 1, T+1, 2T+1, … and Adam's
//! state (with its own step counter) restarts then. Regular tensors (norms,
//! embeddings, biases, the LM head) are plain AdamW and are built elsewhere.

use super::adam::Moments;
use super::linalg::{self, Dims, Side, round_half_even, sign0};
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
            FrugalMode::Svd => {
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
            FrugalMode::Svd => {
                let (side, rank) = if m >= n {
                    (Side::Right, round_half_even(f64::from(c.density) * n as f64))
                } else {
                    (Side::Left, round_half_even(f64::from(c.density) * m as f64))
                };
                let basis = linalg::top_singular_basis(g, self.dims, rank, side);
                Subspace::Projected(Projector::Svd { side, basis, rank })
            }
        }
    }
}

impl Optimizer for Frugal {
    fn step(&mut self, param: &mut [f32], grad: &[f32], ctx: &StepContext) {
        let c = self.config.clone();
        let t = ctx.t.max(1);
        let gap = c.update_gap.max(1);
        if matches!(self.subspace, Subspace::Unselected) || (t - 1).is_multiple_of(gap) {
            let period = ((t - 1) / gap) as usize;
            let selection = self.select(grad, period);
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
        let free = |x: f32| match c.inactive_rule {
            InactiveRule::SignSgd => sign0(x),
            InactiveRule::Sgd => x,
            InactiveRule::Frozen => 0.0,
        };
        param.iter_mut().for_each(|w| *w *= decay);
        match &self.subspace {
            Subspace::Unselected | Subspace::Inactive => {
                for (w, &g) in param.iter_mut().zip(grad) {
                    *w -= lr_free * free(g);
                }
            }
            Subspace::Whole => {
                let mut direction = vec![0.0; grad.len()];
                self.moments.direction(grad, c.beta1, c.beta2, c.eps, &mut direction);
                for (w, d) in param.iter_mut().zip(&direction) {
                    *w -= lr_active * d;
                }
            }
            Subspace::Projected(projector) => {
                let low = projector.down(grad, self.dims);
                let mut direction = vec![0.0; low.len()];
                self.moments.direction(&low, c.beta1, c.beta2, c.eps, &mut direction);
                let update = projector.up(&direction, self.dims);
                let in_subspace = projector.up(&low, self.dims);
                for (((w, &g), u), s) in param.iter_mut().zip(grad).zip(&update).zip(&in_subspace) {
                    *w -= lr_active * u + lr_free * free(g - s);
                }
            }
        }
    }

    fn unshare(&mut self) -> bool {
        self.moments.unshare()
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
