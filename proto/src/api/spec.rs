//! The model a client registers: tensors with their init rule, parameter
//! groups (optimizer, schedule, wire encodings, aggregation), the consistency
//! mode with its step contract, and the round configuration of a federated
//! model. The shards check the structure of the whole model (names, shapes,
//! which group each tensor falls in) on top of what is checked here.

use std::collections::HashSet;

use super::{
    Aggregation, Encoding, FrugalMode, Init, LrSchedule, Mode, OptimizerConfig, RoundConfig, SpecError, StepContract,
    refuse,
};
use crate::codec;
use crate::pb;
use crate::transport::{DEFAULT_MAX_BLOCK_ELEMENTS, MAX_BLOCK_ELEMENTS_LIMIT};

/// One tensor of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    /// Unique name, e.g. `fc1.weight`.
    pub name: String,
    /// Row-major shape, outermost first (blocks split the first dimension).
    pub shape: Vec<u64>,
    /// How its values start.
    pub init: Init,
}

impl TensorSpec {
    /// A tensor with a name, shape and init rule.
    pub fn new(name: impl Into<String>, shape: &[u64], init: Init) -> Self {
        Self { name: name.into(), shape: shape.to_vec(), init }
    }
}

/// A parameter group: the tensors whose names match one of its patterns
/// (the first group in spec order that matches takes a tensor) share its settings.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupConfig {
    /// Group name.
    pub name: String,
    /// Glob patterns ('*' matches any run of characters).
    pub patterns: Vec<String>,
    /// The optimizer the shards run.
    pub optimizer: OptimizerConfig,
    /// Learning-rate factor per step.
    pub schedule: LrSchedule,
    /// Accepted push encodings, preferred first (never empty once read from
    /// the wire: an empty list there means f32).
    pub push_encodings: Vec<Encoding>,
    /// How a sync step combines the pushes.
    pub aggregation: Aggregation,
}

impl GroupConfig {
    /// A group of the tensors matching `patterns`, with f32 pushes averaged and a constant rate.
    pub fn new(name: impl Into<String>, patterns: &[&str], optimizer: OptimizerConfig) -> Self {
        Self {
            name: name.into(),
            patterns: patterns.iter().map(|p| p.to_string()).collect(),
            optimizer,
            schedule: LrSchedule::Constant,
            push_encodings: vec![Encoding::F32],
            aggregation: Aggregation::Mean,
        }
    }

    /// Steps a 1-bit group pushes as f32 first: its AdamW's `freeze_variance_after`
    /// when its first push encoding is sign1 (1-bit Adam's warm-up), else 0.
    pub fn full_precision_steps(&self) -> u64 {
        match &self.optimizer {
            OptimizerConfig::AdamW(adamw) if self.push_encodings.first() == Some(&Encoding::Sign1) => {
                adamw.freeze_variance_after
            }
            _ => 0,
        }
    }

    /// Whether the shards' clipping (`GRAD_CLIP_MEAN`) counts this group in the
    /// norm and scales its gradients: averaged gradients of trained tensors (a
    /// vote's signs do not change with a scale, and buffers are values).
    pub fn clipped(&self) -> bool {
        self.aggregation == Aggregation::Mean && !self.optimizer.is_buffer()
    }

    /// The encodings this group accepts, as a readable list.
    pub fn allowed_encodings(&self) -> String {
        self.push_encodings.iter().map(|e| codec::encoding_label(*e)).collect::<Vec<_>>().join(", ")
    }

    /// The group of a wire `ParamGroup`, defaults applied (see
    /// [`GroupConfig::check`] for what it must satisfy).
    pub fn from_wire(group: &pb::ParamGroup) -> Result<Self, SpecError> {
        let in_group = |e: SpecError| e.within(format_args!("group '{}'", group.name));
        let mut push_encodings = group
            .push_encodings
            .iter()
            .map(|&value| codec::encoding_from_i32(value).map_err(|e| SpecError(e.to_string())))
            .collect::<Result<Vec<_>, _>>()
            .map_err(in_group)?;
        if push_encodings.is_empty() {
            push_encodings.push(Encoding::F32);
        }
        let aggregation = Aggregation::try_from(group.aggregation)
            .map_err(|_| in_group(SpecError(format!("unknown aggregation {}", group.aggregation))))?;
        Ok(Self {
            name: group.name.clone(),
            patterns: group.patterns.clone(),
            optimizer: OptimizerConfig::from_wire(group.optimizer.as_ref()).map_err(in_group)?,
            schedule: LrSchedule::from_wire(group.schedule).map_err(in_group)?,
            push_encodings,
            aggregation,
        })
    }

    /// Checks what a group can be asked for in `mode`: patterns, encodings
    /// and aggregation that fit together, usable hyperparameters.
    pub fn check(&self, mode: Mode) -> Result<(), SpecError> {
        if self.patterns.is_empty() {
            return refuse("has no name patterns");
        }
        if self.push_encodings.is_empty() {
            return refuse("lists no push encoding");
        }
        let mut seen = HashSet::new();
        for encoding in &self.push_encodings {
            if !seen.insert(*encoding) {
                return refuse(format!("lists encoding {} twice", codec::encoding_label(*encoding)));
            }
            if encoding.carries_no_values() {
                return refuse(format!(
                    "lists {}, which is not a way to send values: every group accepts it for a block without a gradient or a step that overflowed",
                    codec::encoding_label(*encoding)
                ));
            }
        }
        if self.full_precision_steps() > 0 && !self.push_encodings.contains(&Encoding::F32) {
            return refuse(
                "pushes 1-bit signs into an AdamW that freezes v (freeze_variance_after): its first steps go as f32, so push_encodings must list ENCODING_F32 after ENCODING_SIGN1",
            );
        }
        if self.aggregation == Aggregation::MajorityVote {
            if self.push_encodings != [Encoding::Sign1] {
                return refuse("majority vote counts sign bits, so push_encodings must be exactly [ENCODING_SIGN1]");
            }
            if mode.window().is_none() {
                return refuse("majority vote needs sync mode");
            }
        }
        if self.optimizer.is_buffer() {
            if self.aggregation != Aggregation::Mean {
                return refuse(
                    "holds buffers (BufferConfig), whose values are averaged or taken from rank 0: use AGGREGATION_MEAN",
                );
            }
            if self.push_encodings.contains(&Encoding::Sign1) {
                return refuse(
                    "holds buffers (BufferConfig), whose values do not survive sign1: push them in f32, bf16 or f16",
                );
            }
            if mode == Mode::Federated {
                return refuse("holds buffers (BufferConfig), which federated rounds do not synchronise");
            }
        }
        if mode == Mode::Federated && self.push_encodings.contains(&Encoding::Sign1) {
            return refuse("federated updates are pushed in f32, bf16 or f16, not sign1 (model deltas are not signs)");
        }
        // The update rule can follow injected columns too (the test vectors
        // do), but the wire carries injected selections for block mode only.
        if let OptimizerConfig::Frugal(c) = &self.optimizer
            && c.schedule.is_some()
            && !matches!(c.mode, FrugalMode::Block { .. })
        {
            return refuse("an injected FRUGAL schedule is only accepted in block mode");
        }
        self.optimizer.validate()?;
        self.schedule.check()
    }
}

impl From<&GroupConfig> for pb::ParamGroup {
    fn from(group: &GroupConfig) -> Self {
        pb::ParamGroup {
            name: group.name.clone(),
            patterns: group.patterns.clone(),
            optimizer: Some((&group.optimizer).into()),
            push_encodings: group.push_encodings.iter().map(|e| *e as i32).collect(),
            aggregation: group.aggregation as i32,
            schedule: (&group.schedule).into(),
        }
    }
}

/// Which gradient `max_grad_norm` clips (`GradClip` on the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum GradClip {
    /// The shards clip each step's mean gradient by its norm over the whole
    /// model (sync and bounded staleness; async falls back to the workers).
    #[default]
    Mean,
    /// Each worker clips its own gradient before pushing.
    PerWorker,
}

impl GradClip {
    /// The wire value's meaning.
    pub fn from_wire(value: i32) -> Result<Self, SpecError> {
        match pb::GradClip::try_from(value) {
            Ok(pb::GradClip::Mean) => Ok(Self::Mean),
            Ok(pb::GradClip::PerWorker) => Ok(Self::PerWorker),
            Err(_) => refuse(format!("unknown grad_clip {value}; use GRAD_CLIP_MEAN or GRAD_CLIP_PER_WORKER")),
        }
    }

    /// The wire value.
    pub fn to_wire(self) -> pb::GradClip {
        match self {
            Self::Mean => pb::GradClip::Mean,
            Self::PerWorker => pb::GradClip::PerWorker,
        }
    }
}

/// Everything the shards need to hold a model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// Model name.
    pub name: String,
    /// Tensors, in order.
    pub tensors: Vec<TensorSpec>,
    /// Parameter groups, in order.
    pub groups: Vec<GroupConfig>,
    /// Consistency mode.
    pub mode: Mode,
    /// Largest block in elements (at most 16 Mi).
    pub max_block_elements: u64,
    /// Global gradient-norm clipping (0: off), of the gradient `grad_clip` says.
    pub max_grad_norm: f64,
    /// Which gradient `max_grad_norm` clips.
    pub grad_clip: GradClip,
    /// Who a step waits for and who may join.
    pub contract: StepContract,
    /// Federated mode: the round configuration (set with [`ModelSpec::with_rounds`]).
    pub federated: Option<RoundConfig>,
}

impl ModelSpec {
    /// A sync-mode model with the default block size (1 Mi elements), no
    /// clipping and the default step contract.
    pub fn new(name: impl Into<String>, tensors: Vec<TensorSpec>, groups: Vec<GroupConfig>) -> Self {
        Self {
            name: name.into(),
            tensors,
            groups,
            mode: Mode::Sync,
            max_block_elements: DEFAULT_MAX_BLOCK_ELEMENTS,
            max_grad_norm: 0.0,
            grad_clip: GradClip::Mean,
            contract: StepContract::default(),
            federated: None,
        }
    }

    /// The norm each worker clips its own gradient to before pushing (0: none):
    /// with [`GradClip::PerWorker`], and in async mode, where no step has a mean.
    pub fn worker_max_grad_norm(&self) -> f64 {
        match (self.grad_clip, self.mode) {
            (GradClip::PerWorker, _) | (GradClip::Mean, Mode::Async) => self.max_grad_norm,
            _ => 0.0,
        }
    }

    /// The norm the shards clip each step's mean gradient to (0: none).
    pub fn shard_max_grad_norm(&self) -> f64 {
        match (self.grad_clip, self.mode) {
            (GradClip::Mean, Mode::Sync | Mode::BoundedStaleness { .. }) => self.max_grad_norm,
            _ => 0.0,
        }
    }

    /// The same model trained in federated rounds with `config`; the groups'
    /// optimizers become the server optimizer (SGD with lr 1: the plain method).
    pub fn with_rounds(mut self, config: RoundConfig) -> Self {
        self.mode = Mode::Federated;
        self.federated = Some(config);
        self
    }

    /// The spec of a registration's wire `ModelSpec`, every default applied
    /// and checked as [`ModelSpec::check`] does (the shards then check the
    /// model as a whole: names, shapes, which group each tensor falls in).
    pub fn from_wire(wire: &pb::ModelSpec) -> Result<Self, SpecError> {
        let mode = Mode::from_wire(wire.mode, wire.staleness)?;
        let groups = wire.groups.iter().map(GroupConfig::from_wire).collect::<Result<Vec<_>, _>>()?;
        let tensors = wire
            .tensors
            .iter()
            .map(|t| {
                Ok(TensorSpec { name: t.name.clone(), shape: t.shape.clone(), init: Init::from_wire(&t.name, t.init)? })
            })
            .collect::<Result<Vec<_>, SpecError>>()?;
        let federated = match (mode, &wire.federated) {
            (Mode::Federated, Some(config)) => Some(RoundConfig::from_wire(config)?),
            (_, Some(_)) => {
                return refuse(format!(
                    "`federated` is only accepted with CONSISTENCY_MODE_FEDERATED, not {}",
                    mode.as_str()
                ));
            }
            (_, None) => None,
        };
        let spec = Self {
            name: wire.name.clone(),
            tensors,
            groups,
            mode,
            max_block_elements: if wire.max_block_elements == 0 {
                DEFAULT_MAX_BLOCK_ELEMENTS
            } else {
                wire.max_block_elements
            },
            max_grad_norm: wire.max_grad_norm,
            grad_clip: GradClip::from_wire(wire.grad_clip)?,
            contract: StepContract::from_wire(wire),
            federated,
        };
        spec.check()?;
        Ok(spec)
    }

    /// Checks every value on its own and against the mode: the step contract,
    /// the round configuration (required in federated mode, refused in the
    /// others), each group, each init rule, the block size and the clipping norm.
    pub fn check(&self) -> Result<(), SpecError> {
        self.contract.check(self.mode)?;
        match (self.mode, &self.federated) {
            (Mode::Federated, None) => {
                return refuse("CONSISTENCY_MODE_FEDERATED needs the round configuration `federated`");
            }
            (Mode::Federated, Some(config)) => config.check()?,
            (mode, Some(_)) => {
                return refuse(format!(
                    "`federated` is only accepted with CONSISTENCY_MODE_FEDERATED, not {}",
                    mode.as_str()
                ));
            }
            (_, None) => {}
        }
        for group in &self.groups {
            group.check(self.mode).map_err(|e| e.within(format_args!("group '{}'", group.name)))?;
        }
        for tensor in &self.tensors {
            tensor.init.check(&tensor.name)?;
        }
        match self.max_block_elements {
            0 => return refuse("max_block_elements must be at least 1"),
            n if n > MAX_BLOCK_ELEMENTS_LIMIT => {
                return refuse(format!("max_block_elements {n} exceeds the limit {MAX_BLOCK_ELEMENTS_LIMIT}"));
            }
            _ => {}
        }
        if !self.max_grad_norm.is_finite() || self.max_grad_norm < 0.0 {
            return refuse(format!("max_grad_norm must be a finite number >= 0, got {}", self.max_grad_norm));
        }
        Ok(())
    }
}

impl From<&ModelSpec> for pb::ModelSpec {
    /// The wire form, every default written out: two specs that mean the same
    /// model encode to the same bytes.
    fn from(spec: &ModelSpec) -> Self {
        let (mode, staleness) = spec.mode.to_wire();
        pb::ModelSpec {
            name: spec.name.clone(),
            tensors: spec
                .tensors
                .iter()
                .map(|t| pb::TensorSpec { name: t.name.clone(), shape: t.shape.clone(), init: Some((&t.init).into()) })
                .collect(),
            groups: spec.groups.iter().map(pb::ParamGroup::from).collect(),
            mode: mode as i32,
            staleness,
            max_block_elements: spec.max_block_elements,
            max_grad_norm: spec.max_grad_norm,
            grad_clip: spec.grad_clip.to_wire() as i32,
            min_workers: spec.contract.min_workers,
            step_deadline_ms: spec.contract.step_deadline_ms(),
            quorum: spec.contract.quorum,
            max_workers: spec.contract.max_workers,
            federated: spec.federated.as_ref().map(pb::FederatedConfig::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::api::{AdamWConfig, Algorithm, BufferSync};

    fn spec() -> ModelSpec {
        let mut group =
            GroupConfig::new("all", &["*"], OptimizerConfig::AdamW(AdamWConfig { lr: 0.1, ..Default::default() }));
        group.push_encodings = vec![Encoding::Bf16, Encoding::F32];
        group.schedule = LrSchedule::WarmupCosine { warmup: 10, total: 100, min_factor: 0.1 };
        let mut spec = ModelSpec::new(
            "m",
            vec![TensorSpec::new("w", &[4, 3], Init::Normal { mean: 0.0, std: 0.1, seed: 1 })],
            vec![group],
        );
        spec.contract =
            StepContract { min_workers: 2, step_deadline: Some(Duration::from_millis(300)), quorum: 2, max_workers: 4 };
        spec.max_grad_norm = 1.0;
        spec.grad_clip = GradClip::PerWorker;
        spec
    }

    #[test]
    fn a_spec_crosses_the_wire_unchanged_and_its_encoding_is_canonical() {
        let spec = spec();
        let wire = pb::ModelSpec::from(&spec);
        let read = ModelSpec::from_wire(&wire).unwrap();
        assert_eq!(read, spec);
        assert_eq!(pb::ModelSpec::from(&read), wire, "reading and writing again changes nothing");
        let federated =
            ModelSpec::new("f", spec.tensors.clone(), vec![GroupConfig::new("all", &["*"], OptimizerConfig::sgd(1.0))])
                .with_rounds(RoundConfig::new(Algorithm::Scaffold, 10, 0.1));
        assert_eq!(ModelSpec::from_wire(&(&federated).into()), Ok(federated));
    }

    #[test]
    fn zeros_mean_the_defaults_and_give_the_same_spec() {
        let mut wire = pb::ModelSpec::from(&spec());
        wire.max_block_elements = 0;
        wire.quorum = 2;
        let group = &mut wire.groups[0];
        let Some(pb::optimizer_config::Kind::Adamw(adamw)) = group.optimizer.as_mut().and_then(|o| o.kind.as_mut())
        else {
            panic!("an AdamW group")
        };
        (adamw.beta1, adamw.beta2, adamw.eps) = (0.0, 0.0, 0.0);
        assert_eq!(ModelSpec::from_wire(&wire), Ok(spec()));
    }

    #[test]
    fn a_one_bit_group_whose_adamw_freezes_v_must_accept_f32_for_its_warm_up() {
        let adamw =
            OptimizerConfig::AdamW(super::super::AdamWConfig { freeze_variance_after: 5, ..Default::default() });
        let mut group = GroupConfig::new("signs", &["*"], adamw);
        assert_eq!(group.full_precision_steps(), 0, "f32 pushes need no warm-up");
        group.push_encodings = vec![Encoding::Sign1];
        assert!(group.check(Mode::Sync).unwrap_err().0.contains("must list ENCODING_F32 after ENCODING_SIGN1"));
        group.push_encodings = vec![Encoding::Sign1, Encoding::F32];
        assert!(group.check(Mode::Sync).is_ok());
        assert_eq!(group.full_precision_steps(), 5);
    }

    #[test]
    fn groups_that_do_not_fit_their_mode_are_refused() {
        let mut group = GroupConfig::new("votes", &["*"], OptimizerConfig::sgd(0.1));
        group.aggregation = Aggregation::MajorityVote;
        assert!(group.check(Mode::Sync).unwrap_err().0.contains("exactly [ENCODING_SIGN1]"));
        group.push_encodings = vec![Encoding::Sign1];
        assert!(group.check(Mode::Sync).is_ok());
        assert_eq!(group.check(Mode::Async).unwrap_err().0, "majority vote needs sync mode");
        let mut in_async = spec();
        in_async.mode = Mode::Async;
        in_async.contract = StepContract::default();
        in_async.groups = vec![group];
        let error = ModelSpec::from_wire(&(&in_async).into()).unwrap_err().0;
        assert_eq!(error, "group 'votes': majority vote needs sync mode");
        let mut twice = GroupConfig::new("g", &["*"], OptimizerConfig::sgd(0.1));
        twice.push_encodings = vec![Encoding::F16, Encoding::F16];
        assert!(twice.check(Mode::Sync).unwrap_err().0.contains("lists encoding f16 twice"));
        let mut nothing = GroupConfig::new("g", &["*"], OptimizerConfig::sgd(0.1));
        nothing.push_encodings = vec![Encoding::F32, Encoding::NoGradient];
        assert!(nothing.check(Mode::Sync).unwrap_err().0.contains("every group accepts it"));
        let mut rounds = spec();
        rounds.federated = Some(RoundConfig::new(Algorithm::FedAvg, 4, 0.1));
        assert!(ModelSpec::from_wire(&(&rounds).into()).unwrap_err().0.contains("only accepted with"));
    }

    #[test]
    fn buffers_take_values_averaged_or_from_rank_zero_and_nothing_else() {
        let mut buffers = GroupConfig::new("buffers", &["*.running_*"], OptimizerConfig::Buffer(BufferSync::Mean));
        assert!(buffers.check(Mode::Sync).is_ok() && buffers.check(Mode::Async).is_ok());
        assert!(!buffers.clipped(), "values are not clipped");
        assert!(GroupConfig::new("w", &["*"], OptimizerConfig::sgd(0.1)).clipped());
        assert!(buffers.check(Mode::Federated).unwrap_err().0.contains("federated rounds do not synchronise"));
        buffers.push_encodings = vec![Encoding::Sign1];
        assert!(buffers.check(Mode::Sync).unwrap_err().0.contains("do not survive sign1"));
        buffers.aggregation = Aggregation::MajorityVote;
        assert!(buffers.check(Mode::Sync).unwrap_err().0.contains("use AGGREGATION_MEAN"));
    }
}
