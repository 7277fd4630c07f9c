//! Every mapping between the wire (`paramserver.v1`) and the server's own
//! types, in one place: registrations become validated specs (with the
//! documented "zero means the default" rule taken from the optimizers' own
//! defaults), layouts and status become replies, and each error variant gets
//! its gRPC code.

use std::time::Duration;

use prost::Message;
use ps_proto::layout::BlockPlan;
use ps_proto::pb;
use ps_proto::{codec, errors};
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::error::ServerError;
use crate::federated::{Algorithm, ClientRule, ConfigInput, HPool, RoundConfig, Selection};
use crate::optim::{
    AdamWConfig, BlockOrder, FrugalConfig, FrugalMode, InactiveRule, IndexRule, LION_DEFAULT_BETA2, LrSchedule,
    OptimizerConfig, Projection, SgdConfig, SignConfig, SubsetNormConfig, Subsets, SubspaceMomentumConfig,
};
use crate::spec::{self, Aggregation, GroupDef, InitRule, Mode, ModelOptions, ModelSpec, TensorInput};
use crate::store::{JoinError, Model, ShardIdentity, Task};

fn invalid(message: impl Into<String>) -> ServerError {
    ServerError::InvalidSpec(message.into())
}

/// A wire value where zero means "the default".
fn or_default(value: f64, default: f32) -> f32 {
    if value == 0.0 { default } else { value as f32 }
}

/// β1, β2 and ε of the Adam-like optimizers, each defaulted on its own.
fn betas_and_eps(wire: [f64; 3], defaults: [f32; 3]) -> [f32; 3] {
    [0, 1, 2].map(|i| or_default(wire[i], defaults[i]))
}

fn or_default_gap(value: u64, default: u64) -> u64 {
    if value == 0 { default } else { value }
}

fn mode_from_proto(value: i32, staleness: u64) -> Result<Mode, ServerError> {
    let mode = match pb::ConsistencyMode::try_from(value) {
        Ok(pb::ConsistencyMode::Unspecified | pb::ConsistencyMode::Sync) => Mode::Sync,
        Ok(pb::ConsistencyMode::Async) => Mode::Async,
        Ok(pb::ConsistencyMode::BoundedStaleness) => return Ok(Mode::BoundedStaleness(staleness)),
        Ok(pb::ConsistencyMode::Federated) => Mode::Federated,
        Err(_) => return Err(invalid(format!("unknown consistency mode {value}"))),
    };
    if staleness > 0 {
        return Err(invalid(format!(
            "staleness {staleness} needs CONSISTENCY_MODE_BOUNDED_STALENESS, not {}",
            mode.as_str()
        )));
    }
    Ok(mode)
}

/// The wire value of a consistency mode, and its staleness.
pub fn mode_to_proto(mode: Mode) -> (pb::ConsistencyMode, u64) {
    match mode {
        Mode::Sync => (pb::ConsistencyMode::Sync, 0),
        Mode::Async => (pb::ConsistencyMode::Async, 0),
        Mode::BoundedStaleness(staleness) => (pb::ConsistencyMode::BoundedStaleness, staleness),
        Mode::Federated => (pb::ConsistencyMode::Federated, 0),
    }
}

fn rounds_from_proto(wire: &pb::FederatedConfig) -> Result<RoundConfig, ServerError> {
    let algorithm = pb::FederatedAlgorithm::try_from(wire.algorithm).ok().map(|a| match a {
        pb::FederatedAlgorithm::Fedavg => Algorithm::FedAvg,
        pb::FederatedAlgorithm::Fedprox => Algorithm::FedProx,
        pb::FederatedAlgorithm::Scaffold => Algorithm::Scaffold,
        pb::FederatedAlgorithm::Fedspeed => Algorithm::FedSpeed,
    });
    let pool = match pb::FedSpeedPool::try_from(wire.pool) {
        Ok(pb::FedSpeedPool::AllClients) => HPool::AllClients,
        Ok(pb::FedSpeedPool::Participants) => HPool::Participants,
        Err(_) => return Err(invalid(format!("federated config: unknown FedSpeed pool {}", wire.pool))),
    };
    let input = ConfigInput {
        algorithm,
        clients: wire.clients,
        participation: wire.participation,
        cohort_size: wire.cohort_size,
        schedule: wire.cohort_schedule.iter().map(|c| c.indices.clone()).collect(),
        seed: wire.seed,
        client_lr: wire.client_lr,
        lr_decay: wire.lr_decay,
        pool: Some(pool),
        client: ClientRule {
            local_epochs: wire.local_epochs,
            local_steps: wire.local_steps,
            batch_size: wire.batch_size,
            clip_norm: wire.clip_norm,
            weight_decay: wire.weight_decay,
            mu: wire.mu,
            rho: wire.rho,
            alpha: wire.alpha.unwrap_or(1.0),
            unnormalized_ascent: wire.unnormalized_ascent,
        },
        deadline_ms: wire.round_deadline_ms,
        quorum: wire.quorum,
        rounds: wire.rounds,
    };
    if wire.algorithm != 0 && algorithm.is_none() {
        return Err(invalid(format!("federated config: unknown algorithm {}", wire.algorithm)));
    }
    RoundConfig::new(input).map_err(|e| invalid(e.to_string()))
}

/// The wire form of a round configuration, with every default filled in.
pub fn rounds_to_proto(config: &RoundConfig) -> pb::FederatedConfig {
    let algorithm = match config.algorithm {
        Algorithm::FedAvg => pb::FederatedAlgorithm::Fedavg,
        Algorithm::FedProx => pb::FederatedAlgorithm::Fedprox,
        Algorithm::Scaffold => pb::FederatedAlgorithm::Scaffold,
        Algorithm::FedSpeed => pb::FederatedAlgorithm::Fedspeed,
    };
    let (participation, cohort_size, cohort_schedule) = match &config.selection {
        Selection::Bernoulli(p) => (*p, 0, Vec::new()),
        Selection::Cohort(size) => (0.0, *size, Vec::new()),
        Selection::Schedule(cohorts) => {
            (0.0, 0, cohorts.iter().map(|c| pb::IndexList { indices: c.clone() }).collect())
        }
    };
    let rule = &config.client;
    pb::FederatedConfig {
        algorithm: algorithm as i32,
        clients: config.clients,
        participation,
        cohort_size,
        cohort_schedule,
        seed: config.seed,
        local_epochs: rule.local_epochs,
        local_steps: rule.local_steps,
        batch_size: rule.batch_size,
        client_lr: config.client_lr,
        lr_decay: Some(config.lr_decay),
        clip_norm: rule.clip_norm,
        weight_decay: rule.weight_decay,
        mu: rule.mu,
        rho: rule.rho,
        alpha: Some(rule.alpha),
        unnormalized_ascent: rule.unnormalized_ascent,
        pool: match config.pool {
            HPool::AllClients => pb::FedSpeedPool::AllClients,
            HPool::Participants => pb::FedSpeedPool::Participants,
        } as i32,
        round_deadline_ms: config.deadline.map_or(0, |d| d.as_millis() as u64),
        quorum: config.quorum,
        rounds: config.rounds.unwrap_or(0),
    }
}

/// A round task as `GetRoundTask` returns it.
pub fn round_task(config: &RoundConfig, task: &Task) -> pb::RoundTask {
    pb::RoundTask {
        round: task.round,
        selected: task.selected,
        finished: task.finished,
        cohort_size: task.cohort_size,
        lr: task.lr,
        last_included_round: task.last_included_round,
        config: Some(rounds_to_proto(config)),
    }
}

fn aggregation_to_proto(aggregation: Aggregation) -> pb::Aggregation {
    match aggregation {
        Aggregation::Mean => pb::Aggregation::Mean,
        Aggregation::MajorityVote => pb::Aggregation::MajorityVote,
    }
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

fn optimizer_from_proto(group: &str, config: Option<&pb::OptimizerConfig>) -> Result<OptimizerConfig, ServerError> {
    use pb::optimizer_config::Kind;
    let kind =
        config.and_then(|c| c.kind.as_ref()).ok_or_else(|| invalid(format!("group '{group}' has no optimizer")))?;
    let enum_error = |what: &str, value: i32| invalid(format!("group '{group}': unknown {what} {value}"));
    Ok(match kind {
        Kind::Sgd(c) => OptimizerConfig::Sgd(SgdConfig {
            lr: c.lr as f32,
            momentum: c.momentum as f32,
            dampening: c.dampening as f32,
            nesterov: c.nesterov,
            weight_decay: c.weight_decay as f32,
        }),
        Kind::Adamw(c) => {
            let d = AdamWConfig::default();
            let [beta1, beta2, eps] = betas_and_eps([c.beta1, c.beta2, c.eps], [d.beta1, d.beta2, d.eps]);
            OptimizerConfig::AdamW(AdamWConfig {
                lr: c.lr as f32,
                weight_decay: c.weight_decay as f32,
                decoupled: !c.l2_decay,
                beta1,
                beta2,
                eps,
            })
        }
        Kind::SubsetNorm(c) => OptimizerConfig::SubsetNorm(SubsetNormConfig {
            lr: c.lr as f32,
            beta1: c.beta1 as f32,
            beta2: or_default(c.beta2, SubsetNormConfig::default().beta2),
            eps: c.eps as f32,
            correct_bias: c.correct_bias,
            weight_decay: c.weight_decay as f32,
            subsets: subsets_from_proto(group, c.subsets, c.chunk_size)?,
            initial_accumulator: c.initial_accumulator as f32,
        }),
        Kind::SubspaceMomentum(c) => {
            let d = SubspaceMomentumConfig::default();
            let projection = match pb::ProjectionKind::try_from(c.projection) {
                _ if !c.indices_schedule.is_empty() => {
                    Projection::Index(IndexRule::Schedule(index_lists(&c.indices_schedule)))
                }
                Ok(pb::ProjectionKind::Svd) => Projection::Svd,
                Ok(pb::ProjectionKind::Uniform) => Projection::Index(IndexRule::Uniform),
                Ok(pb::ProjectionKind::Topk) => Projection::Index(IndexRule::TopK),
                Err(_) => return Err(enum_error("projection", c.projection)),
            };
            let [beta1, beta2, eps] = betas_and_eps([c.beta1, c.beta2, c.eps], [d.beta1, d.beta2, d.eps]);
            OptimizerConfig::SubspaceMomentum(SubspaceMomentumConfig {
                lr: c.lr as f32,
                beta1,
                beta2,
                eps,
                rank: c.rank as usize,
                update_gap: or_default_gap(c.update_gap, d.update_gap),
                projection,
                adaptive: c.adaptive,
                subsets: subsets_from_proto(group, c.subsets, 0)?,
                correct_bias: c.correct_bias,
                weight_decay: c.weight_decay as f32,
                seed: c.seed,
            })
        }
        Kind::Frugal(c) => {
            let d = FrugalConfig::default();
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
            let [beta1, beta2, eps] = betas_and_eps([c.beta1, c.beta2, c.eps], [d.beta1, d.beta2, d.eps]);
            OptimizerConfig::Frugal(FrugalConfig {
                lr: c.lr as f32,
                density: c.density as f32,
                weight_decay: c.weight_decay as f32,
                beta1,
                beta2,
                eps,
                update_gap: or_default_gap(c.update_gap, d.update_gap),
                proj_lr_scale: or_default(c.proj_lr_scale, d.proj_lr_scale),
                inactive_lr_scale: or_default(c.inactive_lr_scale, d.inactive_lr_scale),
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
            beta2: if c.lion { or_default(c.beta2, LION_DEFAULT_BETA2) } else { c.beta2 as f32 },
            weight_decay: c.weight_decay as f32,
            lion: c.lion,
        }),
    })
}

fn schedule_from_proto(group: &str, schedule: Option<pb::LrSchedule>) -> Result<LrSchedule, ServerError> {
    let Some(s) = schedule else { return Ok(LrSchedule::Constant) };
    let min_factor = s.min_factor as f32;
    Ok(match pb::ScheduleKind::try_from(s.kind) {
        Ok(pb::ScheduleKind::Constant) => LrSchedule::Constant,
        Ok(pb::ScheduleKind::WarmupCosine) => {
            LrSchedule::WarmupCosine { warmup: s.warmup_steps, total: s.total_steps, min_factor }
        }
        Ok(pb::ScheduleKind::WarmupStableDecay) => LrSchedule::WarmupStableDecay {
            warmup: s.warmup_steps,
            total: s.total_steps,
            decay: s.decay_steps,
            min_factor,
        },
        Err(_) => return Err(invalid(format!("group '{group}': unknown schedule kind {}", s.kind))),
    })
}

fn init_from_proto(tensor: &str, rule: Option<pb::InitRule>) -> Result<InitRule, ServerError> {
    let rule = rule.unwrap_or_default();
    let (value, scale) = (rule.value as f32, rule.scale as f32);
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

fn group_from_proto(group: &pb::ParamGroup) -> Result<GroupDef, ServerError> {
    let name = &group.name;
    let push_encodings = group
        .push_encodings
        .iter()
        .map(|&value| codec::encoding_from_i32(value).map_err(|e| invalid(format!("group '{name}': {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let aggregation = match pb::Aggregation::try_from(group.aggregation) {
        Ok(pb::Aggregation::Mean) => Aggregation::Mean,
        Ok(pb::Aggregation::MajorityVote) => Aggregation::MajorityVote,
        Err(_) => return Err(invalid(format!("group '{name}': unknown aggregation {}", group.aggregation))),
    };
    let projectable_patterns = match group.optimizer.as_ref().and_then(|o| o.kind.as_ref()) {
        Some(pb::optimizer_config::Kind::Frugal(c)) => c.projectable_patterns.clone(),
        _ => Vec::new(),
    };
    Ok(GroupDef {
        name: name.clone(),
        patterns: group.patterns.clone(),
        optimizer: optimizer_from_proto(name, group.optimizer.as_ref())?,
        push_encodings,
        aggregation,
        schedule: schedule_from_proto(name, group.schedule)?,
        projectable_patterns,
    })
}

impl TryFrom<pb::ModelSpec> for ModelSpec {
    type Error = ServerError;

    /// Translates and validates a registration's spec.
    fn try_from(wire: pb::ModelSpec) -> Result<Self, ServerError> {
        let mode = mode_from_proto(wire.mode, wire.staleness)?;
        let groups = wire.groups.iter().map(group_from_proto).collect::<Result<Vec<_>, _>>()?;
        let tensors = wire
            .tensors
            .iter()
            .map(|t| {
                Ok(TensorInput {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    init: init_from_proto(&t.name, t.init)?,
                })
            })
            .collect::<Result<Vec<_>, ServerError>>()?;
        // The identity of a registration is its wire form with the defaults the
        // server fills in, so leaving a field out and sending its default agree.
        let mut canonical = wire;
        canonical.mode = mode_to_proto(mode).0 as i32;
        canonical.max_block_elements = spec::effective_block_limit(canonical.max_block_elements)?;
        let options = ModelOptions {
            mode,
            max_block_elements: canonical.max_block_elements,
            max_grad_norm: canonical.max_grad_norm,
            min_workers: canonical.min_workers,
            step_deadline: (canonical.step_deadline_ms > 0).then(|| Duration::from_millis(canonical.step_deadline_ms)),
            quorum: canonical.quorum,
            max_workers: canonical.max_workers,
        };
        let rounds = canonical.federated.as_ref().map(rounds_from_proto).transpose()?;
        ModelSpec::new(canonical.name.clone(), tensors, groups, options, canonical.encode_to_vec())?.with_rounds(rounds)
    }
}

/// A model's layout as `PlanLayout`, `RegisterModel` and `GetLayout` return it.
pub fn layout(shard: &ShardIdentity, spec: &ModelSpec, plan: &[BlockPlan]) -> pb::Layout {
    let (mode, staleness) = mode_to_proto(spec.options.mode);
    pb::Layout {
        model: spec.name.clone(),
        shards: shard.addresses.clone(),
        tensors: spec
            .tensors
            .iter()
            .map(|t| pb::TensorLayout {
                name: t.name.clone(),
                shape: t.shape.clone(),
                group: spec.groups[t.group].name.clone(),
            })
            .collect(),
        blocks: plan.iter().map(|b| b.to_wire(&spec.tensors[b.tensor].name)).collect(),
        mode: mode as i32,
        max_grad_norm: spec.options.max_grad_norm,
        staleness,
        federated: spec.federated.as_ref().map(rounds_to_proto),
        // Set for registered models by `model_layout`.
        epoch: 0,
        checkpoint_every: 0,
        groups: spec
            .groups
            .iter()
            .map(|g| pb::GroupLayout {
                name: g.name.clone(),
                push_encodings: g.push_encodings.iter().map(|e| *e as i32).collect(),
                aggregation: aggregation_to_proto(g.aggregation) as i32,
            })
            .collect(),
    }
}

/// One model's part of a `GetStatus` reply. Locks every block: call it off the reactor.
pub fn model_status(model: &Model) -> pb::ModelStatus {
    let (min_version, max_version) = model.version_range();
    let (pushes, workers_expired, workers_dropped_late) = model.counters();
    let (mode, staleness) = mode_to_proto(model.spec.options.mode);
    pb::ModelStatus {
        name: model.name().to_string(),
        mode: mode as i32,
        staleness,
        min_version,
        max_version,
        blocks: model.local_blocks().len() as u32,
        parameters: model.local_elements(),
        live_workers: model
            .membership
            .live()
            .into_iter()
            .map(|(worker_id, age)| pb::WorkerStatus { worker_id, last_heartbeat_ms_ago: age.as_millis() as u64 })
            .collect(),
        groups: model
            .spec
            .groups
            .iter()
            .zip(model.group_stats())
            .map(|(group, stats)| pb::GroupStatus {
                name: group.name.clone(),
                optimizer: group.optimizer.describe(),
                tensors: stats.tensors,
                parameters: stats.parameters,
                state_bytes: stats.state_bytes,
            })
            .collect(),
        pushes,
        workers_expired,
        workers_dropped_late,
        federated: model.round_stats().map(|stats| pb::FederatedStatus {
            algorithm: model.spec.federated.as_ref().map_or("", |c| c.algorithm.as_str()).to_string(),
            round: stats.round,
            cohort_size: stats.cohort_size,
            contributions: stats.contributions,
            stragglers_dropped: stats.stragglers,
            rounds_extended: stats.extended,
            server_state_bytes: stats.state_bytes,
            staged_bytes: stats.staged_bytes,
            finished: stats.finished,
        }),
        epoch: model.epoch(),
        checkpoint_version: model.checkpoints.newest_written().map_or(0, |r| r.version),
        recovering: model.is_recovering(),
    }
}

/// The layout of a registered model, with its epoch and checkpoint period.
pub fn model_layout(shard: &ShardIdentity, model: &Model) -> pb::Layout {
    pb::Layout {
        epoch: model.epoch(),
        checkpoint_every: model.checkpoints.every(),
        ..layout(shard, &model.spec, &model.plan)
    }
}

impl From<ServerError> for Status {
    fn from(error: ServerError) -> Self {
        let code = match &error {
            ServerError::UnknownModel(_)
            | ServerError::UnknownTensor { .. }
            | ServerError::UnknownBlock { .. }
            | ServerError::UnknownWorker { .. }
            | ServerError::UnknownSegment(_) => Code::NotFound,
            ServerError::WrongShard { .. }
            | ServerError::StaleStep { .. }
            | ServerError::FutureStep { .. }
            | ServerError::NotFederated(_)
            | ServerError::FederatedModel(_)
            | ServerError::RoundClosed { .. }
            | ServerError::FutureRound { .. }
            | ServerError::RunFinished { .. }
            | ServerError::NotSelected { .. }
            | ServerError::MissingRoundUpdate { .. }
            | ServerError::RoundCommit(_)
            | ServerError::EpochChanged { .. }
            | ServerError::NotRestored { .. }
            | ServerError::NoCheckpointDir
            | ServerError::NoLocalChannel => Code::FailedPrecondition,
            ServerError::Recovering(_) => Code::Unavailable,
            ServerError::CheckpointPending { .. } => Code::DeadlineExceeded,
            ServerError::Checkpoint { .. } => Code::Internal,
            ServerError::UnknownClient { .. } | ServerError::RoundParts { .. } => Code::InvalidArgument,
            ServerError::PeerUnavailable { .. } => Code::Unavailable,
            ServerError::TaskTimeout { .. } => Code::DeadlineExceeded,
            ServerError::InvalidSpec(_)
            | ServerError::InvalidName(_)
            | ServerError::SpecNotFirst
            | ServerError::SpecRepeated
            | ServerError::ValuesNotProvided { .. }
            | ServerError::MissingValues { .. }
            | ServerError::EmptyPush
            | ServerError::PushWithoutChunk
            | ServerError::BadSegment { .. }
            | ServerError::MixedPush { .. }
            | ServerError::StepWentBack { .. }
            | ServerError::NonFinite { .. }
            | ServerError::PullEncoding(_)
            | ServerError::Chunk { .. }
            | ServerError::BadPayload { .. } => Code::InvalidArgument,
            ServerError::SpecConflict(_) => Code::AlreadyExists,
            ServerError::Join { reason, .. } => match reason {
                JoinError::RankTaken { .. } | JoinError::RankChanged { .. } => Code::AlreadyExists,
                JoinError::RankTooLarge(_) => Code::InvalidArgument,
                JoinError::Full { .. } => Code::ResourceExhausted,
            },
            ServerError::ChunkTooLarge { .. } | ServerError::LimitExceeded { .. } | ServerError::Busy { .. } => {
                Code::ResourceExhausted
            }
            ServerError::StreamTimeout(_) => Code::DeadlineExceeded,
            ServerError::PullTimeout { .. } => Code::DeadlineExceeded,
            ServerError::Internal(_) | ServerError::OptimizerFailed { .. } => Code::Internal,
        };
        let kind = match &error {
            ServerError::StaleStep { .. } => Some(errors::STALE_STEP),
            ServerError::FutureStep { .. } => Some(errors::FUTURE_STEP),
            ServerError::UnknownWorker { .. } => Some(errors::UNKNOWN_WORKER),
            ServerError::RoundClosed { .. } => Some(errors::ROUND_CLOSED),
            ServerError::FutureRound { .. } => Some(errors::FUTURE_ROUND),
            ServerError::UnknownModel(_) => Some(errors::UNKNOWN_MODEL),
            ServerError::EpochChanged { .. } => Some(errors::EPOCH_CHANGED),
            ServerError::Recovering(_) => Some(errors::RECOVERING),
            ServerError::NotRestored { .. } => Some(errors::NOT_RESTORED),
            ServerError::Busy { .. } => Some(errors::BUSY),
            ServerError::Join { reason: JoinError::RankTaken { .. }, .. } => Some(errors::RANK_TAKEN),
            _ => None,
        };
        let mut status = Status::new(code, error.to_string());
        if let Some(kind) = kind {
            status.metadata_mut().insert(errors::ERROR_KIND_HEADER, MetadataValue::from_static(kind));
        }
        if let ServerError::EpochChanged { epoch, version, .. } = &error {
            status.metadata_mut().insert(errors::EPOCH_HEADER, MetadataValue::from(*epoch));
            status.metadata_mut().insert(errors::RESUME_VERSION_HEADER, MetadataValue::from(*version));
        }
        status
    }
}

/// The limits of a shard and what is held against them, for the status RPC.
pub fn shard_limits(bounds: &crate::limits::ShardBounds) -> pb::ShardLimits {
    let limits = &bounds.limits;
    let (models, model_bytes) = bounds.models.held();
    pb::ShardLimits {
        max_models: limits.max_models as u64,
        max_model_elements: limits.max_model_elements,
        max_model_blocks: limits.max_model_blocks,
        min_block_elements: limits.min_block_elements,
        memory_bytes: limits.memory_bytes,
        max_spec_bytes: limits.max_spec_bytes as u64,
        max_stream_bytes: limits.max_stream_bytes,
        max_staged_bytes: limits.max_staged_bytes,
        max_streams: limits.max_streams as u64,
        max_streams_per_connection: limits.max_streams_per_connection,
        max_wait_ms: limits.max_wait.as_millis() as u64,
        stream_idle_timeout_ms: limits.stream_idle_timeout.as_millis() as u64,
        max_stream_duration_ms: limits.max_stream_duration.as_millis() as u64,
        models: models as u64,
        model_bytes,
        staged_bytes: bounds.staging.held(),
        max_sending_bytes: limits.max_sending_bytes,
        sending_bytes: bounds.sending.held(),
        open_streams: bounds.streams.in_use() as u64,
    }
}

#[cfg(test)]
mod tests {
    use ps_proto::pb::optimizer_config::Kind;

    use super::*;

    fn spec_with(kind: Kind) -> pb::ModelSpec {
        let zeros = Some(pb::InitRule { kind: pb::InitKind::Zeros as i32, ..Default::default() });
        pb::ModelSpec {
            name: "m".into(),
            tensors: vec![
                pb::TensorSpec { name: "layers.0.mlp.up_proj.weight".into(), shape: vec![40, 30], init: zeros },
                pb::TensorSpec { name: "bias".into(), shape: vec![300], init: zeros },
            ],
            groups: vec![pb::ParamGroup {
                name: "all".into(),
                patterns: vec!["*".into()],
                optimizer: Some(pb::OptimizerConfig { kind: Some(kind) }),
                ..Default::default()
            }],
            max_block_elements: 64,
            ..Default::default()
        }
    }

    /// The block rule is the optimizer's: whole tensors for the modes that need
    /// their shape, the model's block size otherwise.
    #[test]
    fn tensors_of_whole_tensor_optimizers_are_one_block() {
        let kinds = [
            (Kind::Sgd(pb::SgdConfig { lr: 0.1, ..Default::default() }), false),
            (Kind::Adamw(pb::AdamWConfig { lr: 0.1, ..Default::default() }), false),
            (Kind::SubsetNorm(pb::SubsetNormConfig { lr: 0.1, eps: 1e-6, ..Default::default() }), true),
            (
                Kind::SubsetNorm(pb::SubsetNormConfig {
                    lr: 0.1,
                    eps: 1e-6,
                    subsets: pb::SubsetKind::Coordinates as i32,
                    ..Default::default()
                }),
                false,
            ),
            (Kind::SubspaceMomentum(pb::SubspaceMomentumConfig { lr: 0.1, rank: 2, ..Default::default() }), true),
            (Kind::Frugal(pb::FrugalConfig { lr: 0.1, density: 0.5, ..Default::default() }), true),
            (Kind::Sign(pb::SignConfig { lr: 0.1, beta1: 0.9, lion: true, ..Default::default() }), false),
        ];
        for (kind, whole) in kinds {
            let validated = ModelSpec::try_from(spec_with(kind.clone())).unwrap();
            let blocks_of_matrix = validated.plan(2).iter().filter(|b| b.tensor == 0).count();
            assert_eq!(
                blocks_of_matrix == 1,
                whole,
                "{kind:?}: {blocks_of_matrix} blocks of 40x30 with 64-element blocks"
            );
        }
    }

    #[test]
    fn identical_registrations_share_a_fingerprint() {
        let kind = Kind::Adamw(pb::AdamWConfig { lr: 0.1, ..Default::default() });
        let a = ModelSpec::try_from(spec_with(kind.clone())).unwrap();
        let mut explicit = spec_with(kind);
        explicit.mode = pb::ConsistencyMode::Sync as i32;
        assert_eq!(a.fingerprint, ModelSpec::try_from(explicit).unwrap().fingerprint);
        let other = spec_with(Kind::Adamw(pb::AdamWConfig { lr: 0.2, ..Default::default() }));
        assert_ne!(a.fingerprint, ModelSpec::try_from(other).unwrap().fingerprint);
    }
}
