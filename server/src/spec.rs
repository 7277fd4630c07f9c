//! Validated model specs: the boundary where a `pb::ModelSpec` from the wire
//! becomes typed configuration, and every malformed field is rejected with a
//! message before anything is allocated.

use std::collections::HashSet;

use ps_proto::codec;
use ps_proto::pb::{self, Encoding};
use ps_proto::transport::{
    DEFAULT_MAX_BLOCK_ELEMENTS, MAX_BLOCK_ELEMENTS_LIMIT, MAX_MODEL_ELEMENTS, MAX_NAME_BYTES, MAX_TENSORS,
};

use crate::error::ServerError;
use crate::optim::{
    AdamWConfig, BlockOrder, FrugalConfig, FrugalMode, GroupPosition, InactiveRule, IndexRule, LrSchedule,
    OptimizerConfig, Projection, SgdConfig, SignConfig, SubsetNormConfig, Subsets, SubspaceMomentumConfig,
};
use crate::random::{mix64, name_hash};

/// How pushes of several workers become updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One update per step, from the mean gradient of every live worker.
    Sync,
    /// Every push is applied as it arrives.
    Async,
}

impl Mode {
    /// The wire value.
    pub fn to_proto(self) -> pb::ConsistencyMode {
        match self {
            Mode::Sync => pb::ConsistencyMode::Sync,
            Mode::Async => pb::ConsistencyMode::Async,
        }
    }

    /// Lower-case name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
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

/// One tensor of a model.
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
    /// Encodings accepted for pushes, preferred first.
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
    /// Consistency mode.
    pub mode: Mode,
    /// Upper bound of elements per block.
    pub max_block_elements: u64,
    /// The wire form with defaults filled in, to tell identical re-registrations apart from conflicts.
    pub canonical: pb::ModelSpec,
}

fn invalid(message: impl Into<String>) -> ServerError {
    ServerError::InvalidSpec(message.into())
}

/// Checks a user-chosen name (model, tensor, group, worker).
pub fn check_name(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{kind} name must not be empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!("{kind} name is {} bytes; the limit is {MAX_NAME_BYTES}", name.len()));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err(format!("{kind} name {name:?} contains control characters"));
    }
    Ok(())
}

pub use ps_proto::layout::glob_match;

fn or_default(value: f64, default: f64) -> f64 {
    if value == 0.0 { default } else { value }
}

fn subsets_from_proto(group: &str, kind: i32, chunk_size: i64) -> Result<Subsets, ServerError> {
    Ok(match pb::SubsetKind::try_from(kind) {
        Ok(pb::SubsetKind::Heuristic) => Subsets::Heuristic,
        Ok(pb::SubsetKind::Rows) => Subsets::Rows,
        Ok(pb::SubsetKind::Columns) => Subsets::Columns,
        Ok(pb::SubsetKind::Coordinates) => Subsets::Coordinates,
        Ok(pb::SubsetKind::Whole) => Subsets::Whole,
        Ok(pb::SubsetKind::Chunks) if chunk_size != 0 => Subsets::Chunks(chunk_size),
        Ok(pb::SubsetKind::Chunks) => {
            return Err(invalid(format!("group '{group}': chunked subsets need chunk_size != 0")));
        }
        Err(_) => return Err(invalid(format!("group '{group}': unknown subset kind {kind}"))),
    })
}

fn index_lists(lists: &[pb::IndexList]) -> Vec<Vec<usize>> {
    lists.iter().map(|l| l.indices.iter().map(|&i| i as usize).collect()).collect()
}

fn optimizer_from_proto(group: &str, config: Option<pb::OptimizerConfig>) -> Result<OptimizerConfig, ServerError> {
    use pb::optimizer_config::Kind;
    let kind = config.and_then(|c| c.kind).ok_or_else(|| invalid(format!("group '{group}' has no optimizer")))?;
    let enum_error = |what: &str, value: i32| invalid(format!("group '{group}': unknown {what} {value}"));
    let optimizer = match kind {
        Kind::Sgd(c) => OptimizerConfig::Sgd(SgdConfig {
            lr: c.lr as f32,
            momentum: c.momentum as f32,
            dampening: c.dampening as f32,
            nesterov: c.nesterov,
            weight_decay: c.weight_decay as f32,
        }),
        Kind::Adamw(c) => OptimizerConfig::AdamW(AdamWConfig {
            lr: c.lr as f32,
            beta1: or_default(c.beta1, 0.9) as f32,
            beta2: or_default(c.beta2, 0.999) as f32,
            eps: or_default(c.eps, 1e-8) as f32,
            weight_decay: c.weight_decay as f32,
            decoupled: !c.l2_decay,
        }),
        Kind::SubsetNorm(c) => OptimizerConfig::SubsetNorm(SubsetNormConfig {
            lr: c.lr as f32,
            beta1: c.beta1 as f32,
            beta2: or_default(c.beta2, 1.0) as f32,
            eps: c.eps as f32,
            correct_bias: c.correct_bias,
            weight_decay: c.weight_decay as f32,
            subsets: subsets_from_proto(group, c.subsets, c.chunk_size)?,
            initial_accumulator: c.initial_accumulator as f32,
        }),
        Kind::SubspaceMomentum(c) => {
            let projection = match pb::ProjectionKind::try_from(c.projection) {
                _ if !c.indices_schedule.is_empty() => {
                    Projection::Index(IndexRule::Schedule(index_lists(&c.indices_schedule)))
                }
                Ok(pb::ProjectionKind::Svd) => Projection::Svd,
                Ok(pb::ProjectionKind::Uniform) => Projection::Index(IndexRule::Uniform),
                Ok(pb::ProjectionKind::Topk) => Projection::Index(IndexRule::TopK),
                Err(_) => return Err(enum_error("projection", c.projection)),
            };
            OptimizerConfig::SubspaceMomentum(SubspaceMomentumConfig {
                lr: c.lr as f32,
                beta1: or_default(c.beta1, 0.9) as f32,
                beta2: or_default(c.beta2, 0.999) as f32,
                eps: or_default(c.eps, 1e-6) as f32,
                rank: c.rank as usize,
                update_gap: if c.update_gap == 0 { 200 } else { c.update_gap },
                projection,
                adaptive: c.adaptive,
                subsets: subsets_from_proto(group, c.subsets, 0)?,
                correct_bias: c.correct_bias,
                weight_decay: c.weight_decay as f32,
                seed: c.seed,
            })
        }
        Kind::Frugal(c) => {
            let mode = match pb::FrugalMode::try_from(c.mode) {
                Ok(pb::FrugalMode::Block) => FrugalMode::Block {
                    order: match pb::BlockOrder::try_from(c.block_order) {
                        Ok(pb::BlockOrder::Descending) => BlockOrder::Descending,
                        Ok(pb::BlockOrder::Ascending) => BlockOrder::Ascending,
                        Ok(pb::BlockOrder::Random) => BlockOrder::Random,
                        Err(_) => return Err(enum_error("block order", c.block_order)),
                    },
                },
                Ok(pb::FrugalMode::Columns) => FrugalMode::Columns,
                Ok(pb::FrugalMode::Svd) => FrugalMode::Svd,
                Err(_) => return Err(enum_error("FRUGAL mode", c.mode)),
            };
            if !c.schedule.is_empty() && !matches!(mode, FrugalMode::Block { .. }) {
                return Err(invalid(format!(
                    "group '{group}': an injected FRUGAL schedule is only accepted in block mode"
                )));
            }
            OptimizerConfig::Frugal(FrugalConfig {
                lr: c.lr as f32,
                beta1: or_default(c.beta1, 0.9) as f32,
                beta2: or_default(c.beta2, 0.999) as f32,
                eps: or_default(c.eps, 1e-8) as f32,
                weight_decay: c.weight_decay as f32,
                density: c.density as f32,
                update_gap: if c.update_gap == 0 { 200 } else { c.update_gap },
                proj_lr_scale: or_default(c.proj_lr_scale, 1.0) as f32,
                inactive_lr_scale: or_default(c.inactive_lr_scale, 1.0) as f32,
                inactive_rule: match pb::InactiveRule::try_from(c.inactive_rule) {
                    Ok(pb::InactiveRule::SignSgd) => InactiveRule::SignSgd,
                    Ok(pb::InactiveRule::Sgd) => InactiveRule::Sgd,
                    Ok(pb::InactiveRule::None) => InactiveRule::Frozen,
                    Err(_) => return Err(enum_error("inactive rule", c.inactive_rule)),
                },
                reset_statistics: !c.keep_statistics,
                mode,
                seed: c.seed,
                schedule: (!c.schedule.is_empty()).then(|| index_lists(&c.schedule)),
            })
        }
        Kind::Sign(c) => OptimizerConfig::Sign(SignConfig {
            lr: c.lr as f32,
            beta1: c.beta1 as f32,
            beta2: if c.lion { or_default(c.beta2, 0.99) as f32 } else { c.beta2 as f32 },
            weight_decay: c.weight_decay as f32,
            lion: c.lion,
        }),
    };
    optimizer.validate().map_err(|e| invalid(format!("group '{group}': {e}")))?;
    Ok(optimizer)
}

fn schedule_from_proto(group: &str, schedule: Option<pb::LrSchedule>) -> Result<LrSchedule, ServerError> {
    let Some(s) = schedule else { return Ok(LrSchedule::Constant) };
    let min_factor = s.min_factor as f32;
    if !(0.0..=1.0).contains(&min_factor) {
        return Err(invalid(format!("group '{group}': schedule min_factor must be in [0, 1], got {min_factor}")));
    }
    Ok(match pb::ScheduleKind::try_from(s.kind) {
        Ok(pb::ScheduleKind::Constant) => LrSchedule::Constant,
        Ok(pb::ScheduleKind::WarmupCosine) => {
            LrSchedule::WarmupCosine { warmup: s.warmup_steps, total: s.total_steps, min_factor }
        }
        Ok(pb::ScheduleKind::WarmupStableDecay) => {
            if s.decay_steps > s.total_steps {
                return Err(invalid(format!("group '{group}': decay_steps exceed total_steps")));
            }
            LrSchedule::WarmupStableDecay {
                warmup: s.warmup_steps,
                total: s.total_steps,
                decay: s.decay_steps,
                min_factor,
            }
        }
        Err(_) => return Err(invalid(format!("group '{group}': unknown schedule kind {}", s.kind))),
    })
}

/// FRUGAL's rule for projectable tensors (algorithms.md §0): 2-D linear
/// weights of attention and MLP blocks.
const FRUGAL_PROJECTABLE_NAMES: &[&str] = &[
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

fn is_projectable(group: &GroupDef, name: &str, shape: &[u64]) -> bool {
    if shape.len() < 2 {
        return false;
    }
    if group.projectable_patterns.is_empty() {
        FRUGAL_PROJECTABLE_NAMES.iter().any(|n| name.contains(n))
    } else {
        group.projectable_patterns.iter().any(|p| glob_match(p, name))
    }
}

/// The group's accepted push encodings and aggregation, checked against each other and the mode.
fn wire_options(group: &pb::ParamGroup, mode: Mode) -> Result<(Vec<Encoding>, Aggregation), ServerError> {
    let mut encodings = Vec::new();
    for &value in &group.push_encodings {
        let encoding = codec::encoding_from_i32(value).map_err(|e| invalid(format!("group '{}': {e}", group.name)))?;
        if encodings.contains(&encoding) {
            return Err(invalid(format!(
                "group '{}' lists encoding {} twice",
                group.name,
                codec::encoding_label(encoding)
            )));
        }
        encodings.push(encoding);
    }
    if encodings.is_empty() {
        encodings.push(Encoding::F32);
    }
    let aggregation = match pb::Aggregation::try_from(group.aggregation) {
        Ok(pb::Aggregation::Mean) => Aggregation::Mean,
        Ok(pb::Aggregation::MajorityVote) => Aggregation::MajorityVote,
        Err(_) => return Err(invalid(format!("group '{}': unknown aggregation {}", group.name, group.aggregation))),
    };
    if aggregation == Aggregation::MajorityVote {
        if encodings != [Encoding::Sign1] {
            return Err(invalid(format!(
                "group '{}': majority vote counts sign bits, so push_encodings must be exactly [ENCODING_SIGN1]",
                group.name
            )));
        }
        if mode != Mode::Sync {
            return Err(invalid(format!("group '{}': majority vote needs sync mode", group.name)));
        }
    }
    Ok((encodings, aggregation))
}

fn init_from_proto(tensor: &str, rule: Option<pb::InitRule>) -> Result<InitRule, ServerError> {
    let rule = rule.unwrap_or_default();
    let (value, scale) = (rule.value as f32, rule.scale as f32);
    if !value.is_finite() || !scale.is_finite() || scale < 0.0 {
        return Err(invalid(format!("tensor '{tensor}': init value and scale must be finite, scale >= 0")));
    }
    let kind = pb::InitKind::try_from(rule.kind)
        .map_err(|_| invalid(format!("tensor '{tensor}': unknown init kind {}", rule.kind)))?;
    Ok(match kind {
        pb::InitKind::Zeros => InitRule::Zeros,
        pb::InitKind::Constant => InitRule::Constant(value),
        pb::InitKind::Normal => InitRule::Normal { mean: value, std: scale, seed: rule.seed },
        pb::InitKind::Uniform => InitRule::Uniform { center: value, half_width: scale, seed: rule.seed },
        pb::InitKind::Provided => InitRule::Provided,
    })
}

impl ModelSpec {
    /// Validates a wire spec: names, shapes, sizes, groups and hyperparameters.
    pub fn from_proto(spec: pb::ModelSpec) -> Result<Self, ServerError> {
        check_name("model", &spec.name).map_err(invalid)?;
        let mode = match pb::ConsistencyMode::try_from(spec.mode) {
            Ok(pb::ConsistencyMode::Unspecified | pb::ConsistencyMode::Sync) => Mode::Sync,
            Ok(pb::ConsistencyMode::Async) => Mode::Async,
            Err(_) => return Err(invalid(format!("unknown consistency mode {}", spec.mode))),
        };
        let max_block_elements = match spec.max_block_elements {
            0 => DEFAULT_MAX_BLOCK_ELEMENTS,
            n if n > MAX_BLOCK_ELEMENTS_LIMIT => {
                return Err(invalid(format!("max_block_elements {n} exceeds the limit {MAX_BLOCK_ELEMENTS_LIMIT}")));
            }
            n => n,
        };
        if spec.tensors.is_empty() {
            return Err(invalid("a model needs at least one tensor"));
        }
        if spec.tensors.len() > MAX_TENSORS {
            return Err(invalid(format!("{} tensors exceed the limit of {MAX_TENSORS}", spec.tensors.len())));
        }
        if spec.groups.is_empty() {
            return Err(invalid("a model needs at least one parameter group (for example pattern '*')"));
        }
        let mut group_names = HashSet::new();
        let mut groups = Vec::with_capacity(spec.groups.len());
        for group in &spec.groups {
            check_name("group", &group.name).map_err(invalid)?;
            if !group_names.insert(group.name.as_str()) {
                return Err(invalid(format!("group name '{}' appears twice", group.name)));
            }
            if group.patterns.is_empty() {
                return Err(invalid(format!("group '{}' has no name patterns", group.name)));
            }
            let (push_encodings, aggregation) = wire_options(group, mode)?;
            let projectable_patterns = match &group.optimizer.as_ref().and_then(|o| o.kind.as_ref()) {
                Some(pb::optimizer_config::Kind::Frugal(c)) => c.projectable_patterns.clone(),
                _ => Vec::new(),
            };
            groups.push(GroupDef {
                name: group.name.clone(),
                patterns: group.patterns.clone(),
                optimizer: optimizer_from_proto(&group.name, group.optimizer.clone())?,
                push_encodings,
                aggregation,
                schedule: schedule_from_proto(&group.name, group.schedule)?,
                projectable_patterns,
            });
        }
        let mut tensor_names = HashSet::new();
        let mut tensors = Vec::with_capacity(spec.tensors.len());
        let mut total: u64 = 0;
        for tensor in &spec.tensors {
            check_name("tensor", &tensor.name).map_err(invalid)?;
            if !tensor_names.insert(tensor.name.as_str()) {
                return Err(invalid(format!("tensor name '{}' appears twice", tensor.name)));
            }
            if tensor.shape.contains(&0) {
                return Err(invalid(format!("tensor '{}' has a zero dimension in {:?}", tensor.name, tensor.shape)));
            }
            let elements = tensor
                .shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n <= MAX_MODEL_ELEMENTS)
                .ok_or_else(|| invalid(format!("tensor '{}' of shape {:?} is too large", tensor.name, tensor.shape)))?;
            total += elements;
            if total > MAX_MODEL_ELEMENTS {
                return Err(invalid(format!("the model exceeds {MAX_MODEL_ELEMENTS} elements")));
            }
            let group = groups.iter().position(|g| g.patterns.iter().any(|p| glob_match(p, &tensor.name))).ok_or_else(
                || {
                    invalid(format!(
                        "tensor '{}' matches no parameter group; add a group with pattern '*'",
                        tensor.name
                    ))
                },
            )?;
            tensors.push(TensorDef {
                name: tensor.name.clone(),
                shape: tensor.shape.clone(),
                init: init_from_proto(&tensor.name, tensor.init)?,
                group,
                projectable: None,
            });
        }
        // FRUGAL block mode counts tensors: number the projectable ones per group.
        for (g, group) in groups.iter().enumerate() {
            if !matches!(group.optimizer, OptimizerConfig::Frugal(_)) {
                continue;
            }
            let members: Vec<usize> = (0..tensors.len())
                .filter(|&i| tensors[i].group == g && is_projectable(group, &tensors[i].name, &tensors[i].shape))
                .collect();
            for (index, &i) in members.iter().enumerate() {
                tensors[i].projectable = Some(GroupPosition { index, count: members.len() });
            }
        }
        if !spec.max_grad_norm.is_finite() || spec.max_grad_norm < 0.0 {
            return Err(invalid(format!("max_grad_norm must be a finite number >= 0, got {}", spec.max_grad_norm)));
        }
        let mut canonical = spec;
        canonical.mode = mode.to_proto() as i32;
        canonical.max_block_elements = max_block_elements;
        Ok(Self { name: canonical.name.clone(), tensors, groups, mode, max_block_elements, canonical })
    }
}

/// Fills `out` with the initial values of elements `offset..offset + out.len()`
/// of a tensor. Random rules hash (seed, tensor name, element index), so every
/// shard computes the same values whatever the layout.
pub fn fill_initial(rule: &InitRule, tensor: &str, offset: u64, out: &mut [f32]) {
    match *rule {
        InitRule::Zeros | InitRule::Provided => out.fill(0.0),
        InitRule::Constant(value) => out.fill(value),
        InitRule::Normal { mean, std, seed } => {
            let key = stream_key(seed, tensor);
            for (i, value) in out.iter_mut().enumerate() {
                let index = offset + i as u64;
                let u1 = unit_interval(mix64(key ^ index.wrapping_mul(2)));
                let u2 = unit_interval(mix64(key ^ index.wrapping_mul(2).wrapping_add(1)));
                // Box-Muller; u1 is in (0, 1], so the log is finite.
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                *value = mean + std * z as f32;
            }
        }
        InitRule::Uniform { center, half_width, seed } => {
            let key = stream_key(seed, tensor);
            for (i, value) in out.iter_mut().enumerate() {
                let u = unit_interval(mix64(key ^ (offset + i as u64)));
                *value = center + half_width * (2.0 * u as f32 - 1.0);
            }
        }
    }
}

fn stream_key(seed: u64, tensor: &str) -> u64 {
    mix64(name_hash(tensor) ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Maps 64 random bits to (0, 1].
fn unit_interval(bits: u64) -> f64 {
    ((bits >> 11) + 1) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_init_does_not_depend_on_the_split() {
        let rule = InitRule::Normal { mean: 0.0, std: 1.0, seed: 7 };
        let mut whole = vec![0.0; 1000];
        fill_initial(&rule, "w", 0, &mut whole);
        let mut tail = vec![0.0; 400];
        fill_initial(&rule, "w", 600, &mut tail);
        assert_eq!(&whole[600..], &tail[..]);
        let mean: f32 = whole.iter().sum::<f32>() / 1000.0;
        let var: f32 = whole.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / 1000.0;
        assert!(mean.abs() < 0.1 && (var - 1.0).abs() < 0.15, "mean {mean} var {var}");
        let mut other = vec![0.0; 1000];
        fill_initial(&rule, "v", 0, &mut other);
        assert_ne!(whole, other);
        let uniform = InitRule::Uniform { center: 1.0, half_width: 0.5, seed: 1 };
        fill_initial(&uniform, "u", 0, &mut whole);
        assert!(whole.iter().all(|x| (0.5..1.5).contains(x)));
    }
}
