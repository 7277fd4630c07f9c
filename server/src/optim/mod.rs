//! Optimizer math over plain slices. Nothing here knows about gRPC, blocks or
//! shards: an optimizer instance owns the state of one contiguous slice of
//! parameters (a block, or a whole tensor for the modes that need its shape)
//! and updates it from one aggregated gradient.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

mod adam;
mod buffer;
mod frugal;
pub mod linalg;
mod parallel;
mod placement;
mod projector;
mod sgd;
mod sign;
mod subset_norm;
mod subspace;

pub use adam::{AdamW, Moments};
pub use buffer::Assign;
pub use frugal::{Frugal, GroupPosition, PROJECTABLE_NAMES, projectable_by_name};
pub use linalg::Dims;
pub use placement::Staggered;
pub use projector::Projector;
/// The configurations these update rules run with are the API's own values.
pub use ps_proto::api::{
    AdamWConfig, BlockOrder, FrugalConfig, FrugalMode, InactiveRule, IndexRule, LION_DEFAULT_BETA2, LrSchedule,
    OptimizerConfig, Projection, SgdConfig, SignConfig, SubsetNormConfig, Subsets, SubspaceMomentumConfig, SvdSolver,
};
pub use sgd::Sgd;
pub use sign::Sign;
pub use subset_norm::SubsetNorm;
pub use subspace::SubspaceMomentum;

/// Per-step inputs that are the same for every block of a group.
#[derive(Clone, Copy, Debug)]
pub struct StepContext {
    /// Step counter, 1-based, incremented before the update that uses it.
    pub t: u64,
    /// Multiplies the configured learning rate (1.0 without a schedule).
    pub lr_scale: f32,
}

/// One optimizer instance: the state for one parameter slice and its update rule.
pub trait Optimizer: Send {
    /// Applies one update to `param` from `grad` (same length as `param`).
    fn step(&mut self, param: &mut [f32], grad: &[f32], ctx: &StepContext);
    /// Bytes of optimizer state this instance holds (or will hold once stepping).
    fn state_bytes(&self) -> usize;
    /// Named state buffers as the published test vectors name them (derived views included); checkpoints use [`Optimizer::export_state`].
    fn state(&self) -> Vec<(&'static str, Vec<f32>)>;
    /// A lossless copy of the state: importing it into a fresh instance built
    /// from the same config and slice continues bit-identically.
    fn export_state(&self) -> OptimizerState;
    /// Replaces the state with `state` if it fits this instance; on error nothing changes.
    fn import_state(&mut self, state: &OptimizerState) -> Result<(), StateError>;
    /// Takes back state buffers an export shares with a checkpoint still being
    /// written, copying them; true if it had to. Called before each step, so
    /// that the copy, if any, is measured.
    fn unshare(&mut self) -> bool {
        false
    }
    /// How long the last step spent choosing a subspace (an SVD, a top-k or a
    /// random draw), if it chose one; cleared by the call. The caller reports
    /// it apart from the update time.
    fn take_selection_time(&mut self) -> Option<std::time::Duration> {
        None
    }
}

/// Everything needed to rebuild an optimizer instance exactly: float buffers and integer fields by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OptimizerState {
    /// Float buffers (moments, momenta, accumulators, bases) by field name;
    /// large ones are shared with the optimizer until its next update.
    pub buffers: BTreeMap<String, Arc<Staggered>>,
    /// Integer fields (step counters, flags, enum tags, indices) by field name.
    pub integers: BTreeMap<String, Vec<u64>>,
}

impl OptimizerState {
    fn put_buffer(&mut self, field: &str, values: &[f32]) {
        self.buffers.insert(field.to_string(), Arc::new(Staggered::from(values.to_vec())));
    }

    fn put_shared(&mut self, field: &str, values: &Arc<Staggered>) {
        self.buffers.insert(field.to_string(), values.clone());
    }

    fn put_integers(&mut self, field: &str, values: Vec<u64>) {
        self.integers.insert(field.to_string(), values);
    }

    fn put_integer(&mut self, field: &str, value: u64) {
        self.put_integers(field, vec![value]);
    }
}

/// Why a saved state does not fit an optimizer instance.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StateError {
    /// A field this instance needs is absent.
    #[error("optimizer state has no field '{field}'")]
    Missing {
        /// The field's name.
        field: String,
    },
    /// A field's length differs from what this instance's shape needs.
    #[error("optimizer state field '{field}' has {actual} values where this instance needs {expected}")]
    WrongLength {
        /// The field's name.
        field: String,
        /// The length this instance needs.
        expected: usize,
        /// The length in the state.
        actual: usize,
    },
    /// A field's value cannot belong to this instance (or the field is not one of its fields).
    #[error("optimizer state field '{field}' does not fit: {reason}")]
    Invalid {
        /// The field's name.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(field: &str, reason: impl Into<String>) -> StateError {
    StateError::Invalid { field: field.to_string(), reason: reason.into() }
}

fn check_len(field: &str, expected: usize, actual: usize) -> Result<(), StateError> {
    if expected == actual {
        Ok(())
    } else {
        Err(StateError::WrongLength { field: field.to_string(), expected, actual })
    }
}

/// Reads an [`OptimizerState`] field by field and remembers what was read, so
/// that a state carrying fields of another optimizer or configuration is
/// rejected instead of partly applied.
struct StateReader<'a> {
    state: &'a OptimizerState,
    buffers_read: BTreeSet<&'static str>,
    integers_read: BTreeSet<&'static str>,
}

impl<'a> StateReader<'a> {
    fn new(state: &'a OptimizerState) -> Self {
        Self { state, buffers_read: BTreeSet::new(), integers_read: BTreeSet::new() }
    }

    fn buffer(&mut self, field: &'static str, expected: usize) -> Result<&'a [f32], StateError> {
        self.buffers_read.insert(field);
        let values = self.state.buffers.get(field).ok_or_else(|| StateError::Missing { field: field.to_string() })?;
        check_len(field, expected, values.len())?;
        Ok(values)
    }

    /// An integer list whose length the caller checks (it is not fixed by the shape).
    fn any_integers(&mut self, field: &'static str) -> Result<&'a [u64], StateError> {
        self.integers_read.insert(field);
        self.state
            .integers
            .get(field)
            .map(Vec::as_slice)
            .ok_or_else(|| StateError::Missing { field: field.to_string() })
    }

    fn integers(&mut self, field: &'static str, expected: usize) -> Result<&'a [u64], StateError> {
        let values = self.any_integers(field)?;
        check_len(field, expected, values.len())?;
        Ok(values)
    }

    fn integer(&mut self, field: &'static str) -> Result<u64, StateError> {
        Ok(self.integers(field, 1)?[0])
    }

    fn count(&mut self, field: &'static str) -> Result<usize, StateError> {
        let value = self.integer(field)?;
        usize::try_from(value).map_err(|_| invalid(field, format!("{value} does not fit this machine's usize")))
    }

    fn flag(&mut self, field: &'static str) -> Result<bool, StateError> {
        match self.integer(field)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(invalid(field, format!("a flag is 0 or 1, got {other}"))),
        }
    }

    /// Rejects fields nothing read: they belong to another optimizer or configuration.
    fn finish(self) -> Result<(), StateError> {
        let unread_buffer = self.state.buffers.keys().find(|k| !self.buffers_read.contains(k.as_str()));
        let unread_integer = self.state.integers.keys().find(|k| !self.integers_read.contains(k.as_str()));
        match unread_buffer.or(unread_integer) {
            Some(field) => Err(invalid(field, "not a field of this optimizer and configuration")),
            None => Ok(()),
        }
    }
}

/// What an optimizer instance is built for.
#[derive(Clone, Debug)]
pub struct SliceInfo<'a> {
    /// Tensor name (salts seeded random choices).
    pub name: &'a str,
    /// Row-major view of the slice: rows × (product of the other dimensions).
    pub dims: Dims,
    /// Whether the tensor has two or more dimensions.
    pub matrix: bool,
    /// FRUGAL: the tensor's position among its group's projectable tensors, if it is one.
    pub projectable: Option<GroupPosition>,
}

/// Creates the optimizer of `config` for one slice.
pub fn build(config: &OptimizerConfig, slice: &SliceInfo) -> Box<dyn Optimizer> {
    let len = slice.dims.rows * slice.dims.cols;
    match config {
        OptimizerConfig::Sgd(c) => Box::new(Sgd::new(c.clone(), len)),
        OptimizerConfig::AdamW(c) => Box::new(AdamW::new(c.clone(), len)),
        OptimizerConfig::SubsetNorm(c) => Box::new(SubsetNorm::new(c.clone(), slice.dims, slice.matrix)),
        OptimizerConfig::SubspaceMomentum(c) if slice.matrix => {
            Box::new(SubspaceMomentum::new(c.clone(), slice.dims, slice.name))
        }
        OptimizerConfig::SubspaceMomentum(c) => {
            // 1-D tensors keep the full momentum (the whole vector is the subspace).
            let full =
                SubspaceMomentumConfig { rank: len, projection: Projection::Index(IndexRule::TopK), ..c.clone() };
            Box::new(SubspaceMomentum::new(full, slice.dims, slice.name))
        }
        OptimizerConfig::Frugal(c) => match slice.projectable {
            Some(position) => Box::new(Frugal::new(c.clone(), slice.dims, position, slice.name)),
            None => Box::new(AdamW::new(
                AdamWConfig {
                    lr: c.lr,
                    beta1: c.beta1,
                    beta2: c.beta2,
                    eps: c.eps,
                    weight_decay: c.weight_decay,
                    decoupled: true,
                    freeze_variance_after: 0,
                },
                len,
            )),
        },
        OptimizerConfig::Sign(c) => Box::new(Sign::new(c.clone(), len)),
        OptimizerConfig::Buffer(_) => Box::new(Assign),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::random::mix64;

    const MATRIX: Dims = Dims { rows: 6, cols: 4 };
    const WIDE: Dims = Dims { rows: 4, cols: 6 };
    const NAME: &str = "layers.0.mlp.up_proj.weight";

    fn slice(dims: Dims) -> SliceInfo<'static> {
        SliceInfo { name: NAME, dims, matrix: true, projectable: None }
    }

    /// The last of three projectable tensors: with density 0.5 and period 2
    /// it is state-full at the export after step 3 in ascending and
    /// descending block order, so the imported moments get used.
    fn frugal_slice(dims: Dims) -> SliceInfo<'static> {
        frugal_slice_at(dims, 2)
    }

    fn frugal_slice_at(dims: Dims, index: usize) -> SliceInfo<'static> {
        SliceInfo { projectable: Some(GroupPosition { index, count: 3 }), ..slice(dims) }
    }

    /// Every optimizer mode (and the shape variants whose state differs),
    /// configured so that state-ful paths are taken. Re-selection periods are
    /// short so that selections happen both before the export and after the
    /// import; SM's period of 3 re-selects at t = 1, 3, 6 so that steps 4 and 5
    /// use the imported projector and momentum before step 6 draws a new one.
    pub(crate) fn modes() -> Vec<(&'static str, OptimizerConfig, SliceInfo<'static>)> {
        let sgd =
            |momentum, nesterov| SgdConfig { lr: 0.05, momentum, nesterov, weight_decay: 0.01, ..Default::default() };
        let sn = |subsets, beta1, beta2| SubsetNormConfig {
            lr: 0.05,
            beta1,
            beta2,
            eps: 1e-8,
            correct_bias: beta2 < 1.0,
            weight_decay: 0.01,
            subsets,
            initial_accumulator: 0.01,
        };
        let sm = |projection, adaptive| SubspaceMomentumConfig {
            lr: 0.05,
            eps: 1e-8,
            rank: 2,
            update_gap: 3,
            projection,
            adaptive,
            correct_bias: adaptive,
            weight_decay: 0.01,
            seed: 7,
            ..Default::default()
        };
        let frugal = |mode| FrugalConfig { lr: 0.01, density: 0.5, update_gap: 2, mode, seed: 3, ..Default::default() };
        let block = |order| frugal(FrugalMode::Block { order });
        let sign = |beta1, lion| SignConfig {
            lr: 0.01,
            beta1,
            beta2: if lion { LION_DEFAULT_BETA2 } else { 0.0 },
            weight_decay: 0.01,
            lion,
        };
        let schedule = IndexRule::Schedule(vec![vec![0, 2], vec![1, 5], vec![3, 4]]);
        use OptimizerConfig as C;
        vec![
            ("sgd", C::Sgd(sgd(0.0, false)), slice(MATRIX)),
            ("sgd momentum", C::Sgd(SgdConfig { dampening: 0.1, ..sgd(0.9, false) }), slice(MATRIX)),
            ("sgd nesterov", C::Sgd(sgd(0.9, true)), slice(MATRIX)),
            ("adamw", C::AdamW(AdamWConfig { lr: 0.01, weight_decay: 0.1, ..Default::default() }), slice(MATRIX)),
            (
                "adam-l2",
                C::AdamW(AdamWConfig { lr: 0.01, weight_decay: 0.1, decoupled: false, ..Default::default() }),
                slice(MATRIX),
            ),
            ("adagrad-norm", C::SubsetNorm(sn(Subsets::Whole, 0.0, 1.0)), slice(MATRIX)),
            ("adagrad-sn", C::SubsetNorm(sn(Subsets::Heuristic, 0.0, 1.0)), slice(MATRIX)),
            ("adam-sn", C::SubsetNorm(sn(Subsets::Heuristic, 0.9, 0.999)), slice(MATRIX)),
            ("adam-sn columns", C::SubsetNorm(sn(Subsets::Heuristic, 0.9, 0.999)), slice(WIDE)),
            ("sgd-sm uniform", C::SubspaceMomentum(sm(Projection::Index(IndexRule::Uniform), false)), slice(MATRIX)),
            ("sgd-sm topk", C::SubspaceMomentum(sm(Projection::Index(IndexRule::TopK), false)), slice(MATRIX)),
            ("sgd-sm topk columns", C::SubspaceMomentum(sm(Projection::Index(IndexRule::TopK), false)), slice(WIDE)),
            ("sgd-sm schedule", C::SubspaceMomentum(sm(Projection::Index(schedule), false)), slice(MATRIX)),
            ("adam-sn-sm svd", C::SubspaceMomentum(sm(Projection::Svd(SvdSolver::Exact), true)), slice(MATRIX)),
            ("adam-sn-sm svd left", C::SubspaceMomentum(sm(Projection::Svd(SvdSolver::Exact), true)), slice(WIDE)),
            (
                "adam-sn-sm randomized svd",
                C::SubspaceMomentum(sm(Projection::Svd(SvdSolver::Randomized), true)),
                slice(MATRIX),
            ),
            (
                "adam-sn-sm randomized svd left",
                C::SubspaceMomentum(sm(Projection::Svd(SvdSolver::Randomized), true)),
                slice(WIDE),
            ),
            ("frugal block ascending", C::Frugal(block(BlockOrder::Ascending)), frugal_slice(MATRIX)),
            ("frugal block descending", C::Frugal(block(BlockOrder::Descending)), frugal_slice(MATRIX)),
            ("frugal block inactive at export", C::Frugal(block(BlockOrder::Ascending)), frugal_slice_at(MATRIX, 1)),
            ("frugal block random", C::Frugal(block(BlockOrder::Random)), frugal_slice(MATRIX)),
            (
                "frugal block kept statistics",
                C::Frugal(FrugalConfig { reset_statistics: false, ..block(BlockOrder::Ascending) }),
                frugal_slice(MATRIX),
            ),
            ("frugal columns", C::Frugal(frugal(FrugalMode::Columns)), frugal_slice(MATRIX)),
            (
                "frugal columns schedule",
                C::Frugal(FrugalConfig { schedule: Some(vec![vec![0, 3], vec![1, 2]]), ..frugal(FrugalMode::Columns) }),
                frugal_slice(MATRIX),
            ),
            ("frugal svd", C::Frugal(frugal(FrugalMode::Svd(SvdSolver::Exact))), frugal_slice(MATRIX)),
            ("frugal svd left", C::Frugal(frugal(FrugalMode::Svd(SvdSolver::Exact))), frugal_slice(WIDE)),
            ("frugal randomized svd", C::Frugal(frugal(FrugalMode::Svd(SvdSolver::Randomized))), frugal_slice(MATRIX)),
            (
                "frugal randomized svd left",
                C::Frugal(frugal(FrugalMode::Svd(SvdSolver::Randomized))),
                frugal_slice(WIDE),
            ),
            ("frugal regular tensor", C::Frugal(frugal(FrugalMode::Svd(SvdSolver::Exact))), slice(MATRIX)),
            ("signsgd", C::Sign(sign(0.0, false)), slice(MATRIX)),
            ("signum", C::Sign(sign(0.9, false)), slice(MATRIX)),
            ("lion", C::Sign(sign(0.9, true)), slice(MATRIX)),
        ]
    }

    /// Uniform values in [-1, 1), a pure function of `(t, i)`.
    pub(crate) fn pseudo_random(t: u64, len: usize) -> Vec<f32> {
        (0..len as u64).map(|i| (mix64((t << 32) ^ i) >> 40) as f32 / (1u64 << 23) as f32 - 1.0).collect()
    }

    fn ctx(t: u64) -> StepContext {
        StepContext { t, lr_scale: 1.0 }
    }

    /// A fresh instance stepped `steps` times, with its parameters.
    fn stepped(config: &OptimizerConfig, slice: &SliceInfo, steps: u64) -> (Box<dyn Optimizer>, Vec<f32>) {
        let len = slice.dims.rows * slice.dims.cols;
        let mut optimizer = build(config, slice);
        let mut param = pseudo_random(0, len);
        for t in 1..=steps {
            optimizer.step(&mut param, &pseudo_random(t, len), &ctx(t));
        }
        (optimizer, param)
    }

    /// Each value's bits, so that assertions compare floats exactly (NaN included).
    pub(super) fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn the_table_covers_every_mode() {
        let covered: BTreeSet<&str> = modes().iter().map(|(_, config, _)| config.mode()).collect();
        let all = [
            "sgd",
            "adamw",
            "adam_l2",
            "adagrad_norm",
            "adagrad_sn",
            "adam_sn",
            "adam_sn_sm",
            "sgd_sm",
            "frugal_block",
            "frugal_columns",
            "frugal_svd",
            "lion",
            "signum",
            "signsgd",
        ];
        assert_eq!(covered, BTreeSet::from(all));
    }

    #[test]
    fn export_then_import_continues_bit_identically() {
        for (label, config, slice) in modes() {
            config.validate().unwrap_or_else(|e| panic!("{label}: {e}"));
            let (mut original, mut param) = stepped(&config, &slice, 3);
            let saved = original.export_state();
            let mut restored = build(&config, &slice);
            if saved.buffers.values().any(|b| b.iter().any(|&x| x != 0.0)) {
                assert_ne!(restored.export_state(), saved, "{label}: three steps left no state to restore");
            }
            restored.import_state(&saved).unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_eq!(restored.export_state(), saved, "{label}");
            let mut restored_param = param.clone();
            for t in 4..=8 {
                let grad = pseudo_random(t, param.len());
                original.step(&mut param, &grad, &ctx(t));
                restored.step(&mut restored_param, &grad, &ctx(t));
            }
            assert_eq!(bits(&param), bits(&restored_param), "{label}: parameters diverged after the import");
            assert_eq!(original.export_state(), restored.export_state(), "{label}");
        }
    }

    #[test]
    fn fresh_state_round_trips() {
        for (label, config, slice) in modes() {
            let fresh = build(&config, &slice).export_state();
            let mut other = build(&config, &slice);
            other.import_state(&fresh).unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_eq!(other.export_state(), fresh, "{label}");
        }
    }

    #[test]
    fn wrong_length_missing_or_unknown_fields_are_rejected_without_change() {
        for (label, config, slice) in modes() {
            let (mut optimizer, _) = stepped(&config, &slice, 3);
            let saved = optimizer.export_state();
            let mut reject = |bad: OptimizerState, expected: StateError| {
                assert_eq!(optimizer.import_state(&bad), Err(expected), "{label}");
                assert_eq!(optimizer.export_state(), saved, "{label}: a failed import changed the instance");
            };
            for (field, values) in &saved.buffers {
                let mut bad = saved.clone();
                bad.buffers.insert(field.clone(), Arc::new(vec![0.5; values.len() + 1].into()));
                let expected = values.len();
                reject(bad, StateError::WrongLength { field: field.clone(), expected, actual: expected + 1 });
            }
            for field in saved.buffers.keys() {
                let mut bad = saved.clone();
                bad.buffers.remove(field);
                reject(bad, StateError::Missing { field: field.clone() });
            }
            for field in saved.integers.keys() {
                let mut bad = saved.clone();
                bad.integers.remove(field);
                reject(bad, StateError::Missing { field: field.clone() });
            }
            let mut bad = saved.clone();
            bad.buffers.insert("momentum_of_another_optimizer".into(), Arc::new(vec![0.0].into()));
            let reason = "not a field of this optimizer and configuration".to_string();
            reject(bad, StateError::Invalid { field: "momentum_of_another_optimizer".into(), reason });
        }
    }

    fn invalid_field(result: Result<(), StateError>) -> String {
        match result {
            Err(StateError::Invalid { field, .. }) => field,
            other => panic!("expected StateError::Invalid, got {other:?}"),
        }
    }

    #[test]
    fn states_of_another_shape_or_mode_are_rejected() {
        let adamw = OptimizerConfig::AdamW(AdamWConfig::default());
        let (from_6x4, _) = stepped(&adamw, &slice(MATRIX), 2);
        let mut small = build(&adamw, &slice(Dims { rows: 3, cols: 4 }));
        let error = small.import_state(&from_6x4.export_state()).unwrap_err();
        assert_eq!(error, StateError::WrongLength { field: "m".into(), expected: 12, actual: 24 });

        let lion = OptimizerConfig::Sign(SignConfig {
            lion: true,
            beta1: 0.9,
            beta2: LION_DEFAULT_BETA2,
            ..Default::default()
        });
        let (lion, _) = stepped(&lion, &slice(MATRIX), 2);
        let mut signsgd = build(&OptimizerConfig::Sign(SignConfig::default()), &slice(MATRIX));
        assert_eq!(invalid_field(signsgd.import_state(&lion.export_state())), "momentum");

        let svd = SubspaceMomentumConfig {
            rank: 2,
            update_gap: 3,
            projection: Projection::Svd(SvdSolver::Exact),
            ..Default::default()
        };
        let (svd, _) = stepped(&OptimizerConfig::SubspaceMomentum(svd), &slice(MATRIX), 2);
        let topk = SubspaceMomentumConfig { rank: 2, update_gap: 3, ..Default::default() };
        let mut topk = build(&OptimizerConfig::SubspaceMomentum(topk), &slice(MATRIX));
        assert_eq!(invalid_field(topk.import_state(&svd.export_state())), "projector_kind");

        let sgd = OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, ..Default::default() });
        let (sgd, _) = stepped(&sgd, &slice(MATRIX), 1);
        let mut state = sgd.export_state();
        state.integers.insert("buffer_started".into(), vec![2]);
        let mut fresh = build(&OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, ..Default::default() }), &slice(MATRIX));
        assert_eq!(invalid_field(fresh.import_state(&state)), "buffer_started");
    }

    #[test]
    fn out_of_range_or_unsorted_indices_are_rejected() {
        let config =
            OptimizerConfig::SubspaceMomentum(SubspaceMomentumConfig { rank: 2, update_gap: 3, ..Default::default() });
        let (stepped, _) = stepped(&config, &slice(MATRIX), 1);
        let saved = stepped.export_state();
        let mut fresh = build(&config, &slice(MATRIX));
        for indices in [vec![1, 6], vec![3, 1], vec![2, 2]] {
            let mut bad = saved.clone();
            bad.integers.insert("projector_indices".into(), indices.clone());
            assert_eq!(invalid_field(fresh.import_state(&bad)), "projector_indices", "{indices:?}");
        }
        let mut bad = saved.clone();
        bad.integers.insert("selections".into(), vec![0]);
        assert_eq!(invalid_field(fresh.import_state(&bad)), "selections");
        assert_eq!(fresh.export_state(), build(&config, &slice(MATRIX)).export_state());
    }

    #[test]
    fn whole_tensor_modes_and_projectable_names() {
        assert!(!OptimizerConfig::Sgd(SgdConfig::default()).needs_whole_tensor());
        assert!(!OptimizerConfig::AdamW(AdamWConfig::default()).needs_whole_tensor());
        assert!(!OptimizerConfig::Sign(SignConfig::default()).needs_whole_tensor());
        assert!(OptimizerConfig::SubsetNorm(SubsetNormConfig::default()).needs_whole_tensor());
        let coordinates = SubsetNormConfig { subsets: Subsets::Coordinates, ..Default::default() };
        assert!(!OptimizerConfig::SubsetNorm(coordinates).needs_whole_tensor());
        assert!(OptimizerConfig::SubspaceMomentum(SubspaceMomentumConfig::default()).needs_whole_tensor());
        assert!(OptimizerConfig::Frugal(FrugalConfig::default()).needs_whole_tensor());

        assert!(projectable_by_name("model.layers.3.self_attn.q_proj.weight", &[64, 64]));
        assert!(projectable_by_name("h.0.mlp.c_fc.weight", &[256, 64]));
        assert!(!projectable_by_name("h.0.mlp.c_fc.bias", &[256]), "1-D tensors are never projected");
        assert!(!projectable_by_name("lm_head.weight", &[1000, 64]));
    }
}
