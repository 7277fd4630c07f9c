//! What a model is, validated: its tensors, its parameter groups (optimizer,
//! wire encodings, aggregation, schedule), its consistency mode and block size.
//! Every structural rule is checked here before anything is allocated. The
//! wire form is translated in `rpc::convert`; nothing here knows protobuf
//! (the push encodings are the codec's enum, which both sides share).

mod glob;
mod init;
mod name;

use std::collections::HashSet;
use std::time::Duration;

use ps_proto::codec;
use ps_proto::layout::{self, BlockPlan};
pub use ps_proto::pb::Encoding;
use ps_proto::transport::{DEFAULT_MAX_BLOCK_ELEMENTS, MAX_BLOCK_ELEMENTS_LIMIT, MAX_MODEL_ELEMENTS, MAX_TENSORS};

pub use glob::glob_match;
pub use init::fill_initial;
pub use name::{NameError, check_name};

use crate::error::ServerError;
use crate::federated::RoundConfig;
use crate::optim::{
    FrugalMode, GroupPosition, IndexRule, LrSchedule, OptimizerConfig, Projection, projectable_by_name,
};

/// How pushes of several workers become updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One update per step, from the mean gradient of every live worker.
    Sync,
    /// Every push is applied as it arrives.
    Async,
    /// As sync, but a push may be up to this many steps ahead of the block's version.
    BoundedStaleness(u64),
    /// Federated rounds: clients push model deltas per round (`ModelSpec::federated`).
    Federated,
}

/// The largest staleness bound: each step ahead keeps one more pending sum per block.
pub const MAX_STALENESS: u64 = 1000;

impl Mode {
    /// Lower-case name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
            Mode::BoundedStaleness(_) => "bounded_staleness",
            Mode::Federated => "federated",
        }
    }

    /// How many steps ahead of a block's version a push may be, in the modes
    /// with a barrier (sync: 0); `None` in async mode.
    pub fn window(self) -> Option<u64> {
        match self {
            Mode::Sync => Some(0),
            Mode::BoundedStaleness(staleness) => Some(staleness),
            Mode::Async | Mode::Federated => None,
        }
    }
}

/// How a tensor's first values are made.
#[derive(Clone, Debug, PartialEq)]
pub enum InitRule {
    /// All zeros.
    Zeros,
    /// Every element the same value.
    Constant(f32),
    /// Normal(mean, std), deterministic in (seed, tensor name, element index).
    Normal {
        /// Mean.
        mean: f32,
        /// Standard deviation.
        std: f32,
        /// Seed.
        seed: u64,
    },
    /// Uniform on [center - half_width, center + half_width).
    Uniform {
        /// Center.
        center: f32,
        /// Half of the width.
        half_width: f32,
        /// Seed.
        seed: u64,
    },
    /// Values come with the registration.
    Provided,
}

/// A tensor as the registration describes it, before it is checked and placed in a group.
#[derive(Clone, Debug)]
pub struct TensorInput {
    /// Unique name.
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<u64>,
    /// Initialization.
    pub init: InitRule,
}

/// One tensor of a validated model.
#[derive(Clone, Debug)]
pub struct TensorDef {
    /// Unique name.
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<u64>,
    /// Initialization.
    pub init: InitRule,
    /// Index of its parameter group.
    pub group: usize,
    /// FRUGAL: position among the group's projectable tensors, if it is one.
    pub projectable: Option<GroupPosition>,
}

/// A parameter group: matching tensors share an optimizer configuration.
#[derive(Clone, Debug)]
pub struct GroupDef {
    /// Group name.
    pub name: String,
    /// Glob patterns ('*' matches any run of characters).
    pub patterns: Vec<String>,
    /// Optimizer for the group.
    pub optimizer: OptimizerConfig,
    /// Encodings accepted for pushes, preferred first (never empty once validated).
    pub push_encodings: Vec<Encoding>,
    /// How a sync step combines the pushes.
    pub aggregation: Aggregation,
    /// Learning-rate factor per step.
    pub schedule: LrSchedule,
    /// FRUGAL: patterns of projectable tensors (empty: FRUGAL's name rule).
    pub projectable_patterns: Vec<String>,
}

/// How a sync step combines the workers' pushes of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aggregation {
    /// Mean of the decoded gradients.
    Mean,
    /// Sign of the summed sign bits, ties to +1.
    MajorityVote,
}

impl GroupDef {
    /// The encodings this group accepts, as a readable list.
    pub fn allowed_encodings(&self) -> String {
        self.push_encodings.iter().map(|e| codec::encoding_label(*e)).collect::<Vec<_>>().join(", ")
    }

    fn is_projectable(&self, name: &str, shape: &[u64]) -> bool {
        if self.projectable_patterns.is_empty() {
            projectable_by_name(name, shape)
        } else {
            shape.len() >= 2 && self.projectable_patterns.iter().any(|p| glob_match(p, name))
        }
    }
}

/// The model-wide settings of a registration.
#[derive(Clone, Copy, Debug)]
pub struct ModelOptions {
    /// Consistency mode.
    pub mode: Mode,
    /// Largest block, in elements (0: the default).
    pub max_block_elements: u64,
    /// Clipping norm the workers apply (0: off).
    pub max_grad_norm: f64,
    /// Sync mode: workers that must push step 0 before it is applied.
    pub min_workers: u32,
    /// Sync mode: how long a step waits for stragglers once its first push arrived.
    pub step_deadline: Option<Duration>,
    /// Sync mode: pushes a step needs before the deadline may complete it (at least 1).
    pub quorum: u32,
    /// The most members the model accepts (0: no cap).
    pub max_workers: u32,
}

impl ModelOptions {
    /// Sync mode with every other setting left at its default: what unit tests build models with.
    #[cfg(test)]
    pub fn sync() -> Self {
        Self {
            mode: Mode::Sync,
            max_block_elements: 0,
            max_grad_norm: 0.0,
            min_workers: 0,
            step_deadline: None,
            quorum: 1,
            max_workers: 0,
        }
    }
}

/// A validated model spec.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    /// Model name.
    pub name: String,
    /// Tensors in spec order.
    pub tensors: Vec<TensorDef>,
    /// Parameter groups in spec order.
    pub groups: Vec<GroupDef>,
    /// Mode, block size (resolved: never 0) and the clipping norm the workers apply.
    pub options: ModelOptions,
    /// Bytes that are equal exactly when two registrations are the same, so an
    /// identical re-registration is told apart from a conflicting one.
    pub fingerprint: Vec<u8>,
    /// Federated mode: the round configuration.
    pub federated: Option<RoundConfig>,
}

/// The shortest step deadline: the deadline is checked every quarter of it,
/// and below this the checks would cost more than the steps.
pub const MIN_STEP_DEADLINE: Duration = Duration::from_millis(20);

fn invalid(message: impl Into<String>) -> ServerError {
    ServerError::InvalidSpec(message.into())
}

/// The block size a registration gets: its own, or the default when it asks for 0.
pub fn effective_block_limit(requested: u64) -> Result<u64, ServerError> {
    match requested {
        0 => Ok(DEFAULT_MAX_BLOCK_ELEMENTS),
        n if n > MAX_BLOCK_ELEMENTS_LIMIT => {
            Err(invalid(format!("max_block_elements {n} exceeds the limit {MAX_BLOCK_ELEMENTS_LIMIT}")))
        }
        n => Ok(n),
    }
}

fn check_group(group: &GroupDef, mode: Mode) -> Result<(), ServerError> {
    let name = &group.name;
    check_name("group", name).map_err(|e| invalid(e.to_string()))?;
    if group.patterns.is_empty() {
        return Err(invalid(format!("group '{name}' has no name patterns")));
    }
    let mut seen = HashSet::new();
    for encoding in &group.push_encodings {
        if !seen.insert(*encoding) {
            return Err(invalid(format!("group '{name}' lists encoding {} twice", codec::encoding_label(*encoding))));
        }
    }
    if group.aggregation == Aggregation::MajorityVote {
        if group.push_encodings != [Encoding::Sign1] {
            return Err(invalid(format!(
                "group '{name}': majority vote counts sign bits, so push_encodings must be exactly [ENCODING_SIGN1]"
            )));
        }
        if mode.window().is_none() {
            return Err(invalid(format!("group '{name}': majority vote needs sync mode")));
        }
    }
    if mode == Mode::Federated && group.push_encodings.contains(&Encoding::Sign1) {
        return Err(invalid(format!(
            "group '{name}': federated updates are pushed in f32, bf16 or f16, not sign1 (model deltas are not signs)"
        )));
    }
    if let OptimizerConfig::Frugal(c) = &group.optimizer
        && c.schedule.is_some()
        && !matches!(c.mode, FrugalMode::Block { .. })
    {
        return Err(invalid(format!("group '{name}': an injected FRUGAL schedule is only accepted in block mode")));
    }
    group.optimizer.validate().map_err(|e| invalid(format!("group '{name}': {e}")))?;
    match group.schedule {
        LrSchedule::WarmupCosine { min_factor, .. } | LrSchedule::WarmupStableDecay { min_factor, .. }
            if !(0.0..=1.0).contains(&min_factor) =>
        {
            Err(invalid(format!("group '{name}': schedule min_factor must be in [0, 1], got {min_factor}")))
        }
        LrSchedule::WarmupStableDecay { total, decay, .. } if decay > total => {
            Err(invalid(format!("group '{name}': decay_steps exceed total_steps")))
        }
        _ => Ok(()),
    }
}

fn check_init(tensor: &str, init: &InitRule) -> Result<(), ServerError> {
    let (value, scale) = match *init {
        InitRule::Constant(value) => (value, 0.0),
        InitRule::Normal { mean, std, .. } => (mean, std),
        InitRule::Uniform { center, half_width, .. } => (center, half_width),
        InitRule::Zeros | InitRule::Provided => (0.0, 0.0),
    };
    if !value.is_finite() || !scale.is_finite() || scale < 0.0 {
        return Err(invalid(format!("tensor '{tensor}': init value and scale must be finite, scale >= 0")));
    }
    Ok(())
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
fn check_selections(groups: &[GroupDef], tensors: &[TensorDef]) -> Result<(), ServerError> {
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
    /// Checks names, shapes, sizes, groups and hyperparameters, assigns every
    /// tensor its group, and numbers FRUGAL's projectable tensors. The
    /// fingerprint is the identity of the registration as sent (see [`ModelSpec::fingerprint`]).
    pub fn new(
        name: String,
        inputs: Vec<TensorInput>,
        mut groups: Vec<GroupDef>,
        options: ModelOptions,
        fingerprint: Vec<u8>,
    ) -> Result<Self, ServerError> {
        let ModelOptions { mode, max_block_elements, max_grad_norm, min_workers, step_deadline, quorum, max_workers } =
            options;
        if max_workers > 0 && min_workers > max_workers {
            return Err(invalid(format!("min_workers {min_workers} exceeds max_workers {max_workers}")));
        }
        if let Mode::BoundedStaleness(staleness) = mode
            && staleness > MAX_STALENESS
        {
            return Err(invalid(format!("staleness {staleness} exceeds the limit {MAX_STALENESS}")));
        }
        if mode == Mode::Async && min_workers > 1 {
            return Err(invalid(format!(
                "min_workers {min_workers} needs sync mode (async applies every push on arrival)"
            )));
        }
        if mode == Mode::Federated && (min_workers > 1 || step_deadline.is_some() || max_workers > 0) {
            return Err(invalid(
                "min_workers, step_deadline_ms and max_workers are for the step modes; a federated model sets \
                 its round deadline, quorum and population in `federated`",
            ));
        }
        if mode == Mode::Async && step_deadline.is_some() {
            return Err(invalid("step_deadline_ms needs sync mode (async steps do not wait for anyone)"));
        }
        if step_deadline.is_some_and(|d| d < MIN_STEP_DEADLINE) {
            return Err(invalid(format!("step_deadline_ms must be at least {} ms", MIN_STEP_DEADLINE.as_millis())));
        }
        check_name("model", &name).map_err(|e| invalid(e.to_string()))?;
        let max_block_elements = effective_block_limit(max_block_elements)?;
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
        for group in &mut groups {
            if !group_names.insert(group.name.clone()) {
                return Err(invalid(format!("group name '{}' appears twice", group.name)));
            }
            if group.push_encodings.is_empty() {
                group.push_encodings.push(Encoding::F32);
            }
            check_group(group, mode)?;
        }
        let mut tensor_names = HashSet::new();
        let mut tensors = Vec::with_capacity(inputs.len());
        let mut total: u64 = 0;
        for TensorInput { name: tensor, shape, init } in inputs {
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
            check_init(&tensor, &init)?;
            tensors.push(TensorDef { name: tensor, shape, init, group, projectable: None });
        }
        // FRUGAL block mode counts tensors: number the projectable ones per group.
        for (g, group) in groups.iter().enumerate() {
            if !matches!(group.optimizer, OptimizerConfig::Frugal(_)) {
                continue;
            }
            let members: Vec<usize> = (0..tensors.len())
                .filter(|&i| tensors[i].group == g && group.is_projectable(&tensors[i].name, &tensors[i].shape))
                .collect();
            for (index, &i) in members.iter().enumerate() {
                tensors[i].projectable = Some(GroupPosition { index, count: members.len() });
            }
        }
        check_selections(&groups, &tensors)?;
        if !max_grad_norm.is_finite() || max_grad_norm < 0.0 {
            return Err(invalid(format!("max_grad_norm must be a finite number >= 0, got {max_grad_norm}")));
        }
        let options = ModelOptions {
            mode,
            max_block_elements,
            max_grad_norm,
            min_workers,
            step_deadline,
            quorum: quorum.max(1),
            max_workers,
        };
        Ok(Self { name, tensors, groups, options, fingerprint, federated: None })
    }

    /// Attaches the round configuration, which federated mode needs and the other modes refuse.
    pub fn with_rounds(mut self, rounds: Option<RoundConfig>) -> Result<Self, ServerError> {
        match (self.options.mode, &rounds) {
            (Mode::Federated, None) => {
                return Err(invalid("CONSISTENCY_MODE_FEDERATED needs the round configuration `federated`"));
            }
            (mode, Some(_)) if mode != Mode::Federated => {
                return Err(invalid(format!(
                    "`federated` is only accepted with CONSISTENCY_MODE_FEDERATED, not {}",
                    mode.as_str()
                )));
            }
            _ => {}
        }
        self.federated = rounds;
        Ok(self)
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
