//! What a model is, validated as a whole: every tensor in exactly one
//! parameter group, names, shapes and sizes within bounds, FRUGAL's
//! projectable tensors numbered, injected selections that fit the tensors.
//! The values themselves (modes, optimizers, schedules, init rules, round
//! configurations) are the API's types from `ps_proto::api`, which check
//! themselves; nothing here knows protobuf.

mod glob;
mod init;
mod name;

use std::collections::HashSet;

use ps_proto::api::{self, GroupConfig, IndexRule, Init, Mode, OptimizerConfig, Projection, RoundConfig, StepContract};
use ps_proto::layout::{self, BlockPlan};
use ps_proto::transport::{MAX_MODEL_ELEMENTS, MAX_TENSORS};

pub use glob::glob_match;
pub use init::fill_initial;
pub use name::{NameError, check_name};

use crate::error::ServerError;
use crate::optim::{GroupPosition, projectable_by_name};

/// One tensor of a validated model.
#[derive(Clone, Debug)]
pub struct TensorDef {
    /// Unique name.
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<u64>,
    /// Initialization.
    pub init: Init,
    /// Index of its parameter group.
    pub group: usize,
    /// FRUGAL: position among the group's projectable tensors, if it is one.
    pub projectable: Option<GroupPosition>,
}

/// Whether `name` (of shape `shape`) is one of a FRUGAL group's projectable
/// tensors: by its patterns, or FRUGAL's name rule when it has none.
fn is_projectable(group: &GroupConfig, name: &str, shape: &[u64]) -> bool {
    let OptimizerConfig::Frugal(c) = &group.optimizer else { return false };
    if c.projectable_patterns.is_empty() {
        projectable_by_name(name, shape)
    } else {
        shape.len() >= 2 && c.projectable_patterns.iter().any(|p| glob_match(p, name))
    }
}

/// The model-wide settings of a registration.
#[derive(Clone, Copy, Debug)]
pub struct ModelOptions {
    /// Consistency mode.
    pub mode: Mode,
    /// Largest block, in elements.
    pub max_block_elements: u64,
    /// Clipping norm the workers apply to their own gradients (0: off).
    pub max_grad_norm: f64,
    /// Clipping norm the shards apply to each step's mean gradient (0: off).
    pub shard_max_grad_norm: f64,
    /// Who a step waits for and who may join.
    pub contract: StepContract,
}

/// A validated model spec.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    /// Model name.
    pub name: String,
    /// Tensors in spec order.
    pub tensors: Vec<TensorDef>,
    /// Parameter groups in spec order.
    pub groups: Vec<GroupConfig>,
    /// Mode, block size, clipping norm and step contract.
    pub options: ModelOptions,
    /// Bytes that are equal exactly when two registrations are the same, so an
    /// identical re-registration is told apart from a conflicting one.
    pub fingerprint: Vec<u8>,
    /// Federated mode: the round configuration.
    pub federated: Option<RoundConfig>,
}

fn invalid(message: impl Into<String>) -> ServerError {
    ServerError::InvalidSpec(message.into())
}

/// Checks one injected selection: every index below `bound`, none twice.
fn check_selection(group: &str, what: &str, entry: usize, indices: &[usize], bound: usize) -> Result<(), ServerError> {
    let mut seen = HashSet::new();
    for &index in indices {
        if index >= bound {
            return Err(invalid(format!(
                "group '{group}': {what} entry {entry} has index {index}, but there are only {bound} to choose from"
            )));
        }
        if !seen.insert(index) {
            return Err(invalid(format!("group '{group}': {what} entry {entry} lists index {index} twice")));
        }
    }
    Ok(())
}

/// Injected selections must fit every tensor they will be applied to, so no
/// step can index out of range: Subspace-Momentum's index schedules pick rows
/// (m >= n) or columns of each matrix; FRUGAL's block schedules pick positions
/// among the group's projectable tensors.
fn check_selections(groups: &[GroupConfig], tensors: &[TensorDef]) -> Result<(), ServerError> {
    for (g, group) in groups.iter().enumerate() {
        let members = || tensors.iter().filter(move |t| t.group == g);
        match &group.optimizer {
            OptimizerConfig::SubspaceMomentum(c) => {
                let Projection::Index(IndexRule::Schedule(schedule)) = &c.projection else { continue };
                for tensor in members().filter(|t| t.shape.len() >= 2) {
                    let (rows, cols) = (tensor.shape[0], tensor.shape[1..].iter().product::<u64>());
                    let (bound, kind) = if rows >= cols { (rows, "rows") } else { (cols, "columns") };
                    let what = format!(
                        "indices_schedule (tensor '{}' of shape {:?} selects {kind})",
                        tensor.name, tensor.shape
                    );
                    for (entry, indices) in schedule.iter().enumerate() {
                        check_selection(&group.name, &what, entry, indices, bound as usize)?;
                    }
                }
            }
            OptimizerConfig::Frugal(c) => {
                let Some(schedule) = &c.schedule else { continue };
                let count = members().filter(|t| t.projectable.is_some()).count();
                let what = format!("FRUGAL schedule ({count} projectable tensors)");
                for (entry, positions) in schedule.iter().enumerate() {
                    check_selection(&group.name, &what, entry, positions, count)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

impl ModelSpec {
    /// Checks the registration `spec` as a whole and places every tensor in
    /// its group, numbering FRUGAL's projectable tensors. `fingerprint` is the
    /// identity of the registration: its canonical wire form, equal exactly
    /// when two registrations mean the same model.
    pub fn new(spec: api::ModelSpec, fingerprint: Vec<u8>) -> Result<Self, ServerError> {
        spec.check()?;
        let (max_grad_norm, shard_max_grad_norm) = (spec.worker_max_grad_norm(), spec.shard_max_grad_norm());
        let api::ModelSpec {
            name,
            tensors: inputs,
            groups,
            mode,
            max_block_elements,
            max_grad_norm: _,
            grad_clip: _,
            contract,
            federated,
        } = spec;
        check_name("model", &name).map_err(|e| invalid(e.to_string()))?;
        if inputs.is_empty() {
            return Err(invalid("a model needs at least one tensor"));
        }
        if inputs.len() > MAX_TENSORS {
            return Err(invalid(format!("{} tensors exceed the limit of {MAX_TENSORS}", inputs.len())));
        }
        if groups.is_empty() {
            return Err(invalid("a model needs at least one parameter group (for example pattern '*')"));
        }
        let mut group_names = HashSet::new();
        for group in &groups {
            check_name("group", &group.name).map_err(|e| invalid(e.to_string()))?;
            if !group_names.insert(group.name.clone()) {
                return Err(invalid(format!("group name '{}' appears twice", group.name)));
            }
        }
        let mut tensor_names = HashSet::new();
        let mut tensors = Vec::with_capacity(inputs.len());
        let mut total: u64 = 0;
        for api::TensorSpec { name: tensor, shape, init } in inputs {
            check_name("tensor", &tensor).map_err(|e| invalid(e.to_string()))?;
            if !tensor_names.insert(tensor.clone()) {
                return Err(invalid(format!("tensor name '{tensor}' appears twice")));
            }
            if shape.contains(&0) {
                return Err(invalid(format!("tensor '{tensor}' has a zero dimension in {shape:?}")));
            }
            let elements = shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n <= MAX_MODEL_ELEMENTS)
                .ok_or_else(|| invalid(format!("tensor '{tensor}' of shape {shape:?} is too large")))?;
            total += elements;
            if total > MAX_MODEL_ELEMENTS {
                return Err(invalid(format!("the model exceeds {MAX_MODEL_ELEMENTS} elements")));
            }
            let group =
                groups.iter().position(|g| g.patterns.iter().any(|p| glob_match(p, &tensor))).ok_or_else(|| {
                    invalid(format!("tensor '{tensor}' matches no parameter group; add a group with pattern '*'"))
                })?;
            tensors.push(TensorDef { name: tensor, shape, init, group, projectable: None });
        }
        // FRUGAL block mode counts tensors: number the projectable ones per group.
        for (g, group) in groups.iter().enumerate() {
            let members: Vec<usize> = (0..tensors.len())
                .filter(|&i| tensors[i].group == g && is_projectable(group, &tensors[i].name, &tensors[i].shape))
                .collect();
            for (index, &i) in members.iter().enumerate() {
                tensors[i].projectable = Some(GroupPosition { index, count: members.len() });
            }
        }
        check_selections(&groups, &tensors)?;
        let options = ModelOptions { mode, max_block_elements, max_grad_norm, shard_max_grad_norm, contract };
        Ok(Self { name, tensors, groups, options, fingerprint, federated })
    }

    /// Where every block of the model goes on `num_shards` shards: the same on
    /// every shard, so no coordinator is needed.
    pub fn plan(&self, num_shards: u32) -> Vec<BlockPlan> {
        layout::plan(&self.shapes(), &self.block_limits(), num_shards)
    }

    /// Every tensor's shape, in spec order.
    pub fn shapes(&self) -> Vec<&[u64]> {
        self.tensors.iter().map(|t| t.shape.as_slice()).collect()
    }

    /// The largest block of each tensor: the model's block size, or one block
    /// for the whole tensor where its group's optimizer needs the whole tensor.
    pub fn block_limits(&self) -> Vec<u64> {
        self.tensors
            .iter()
            .map(|t| {
                if self.groups[t.group].optimizer.needs_whole_tensor() {
                    u64::MAX
                } else {
                    self.options.max_block_elements
                }
            })
            .collect()
    }
}
