//! Every mapping between the wire (`paramserver.v1`) and the server's own
//! types, in one place: registrations become validated specs (with the
//! documented "zero means the default" rule taken from the optimizers' own
//! defaults), layouts and status become replies, and each error variant gets
//! its gRPC code.

use prost::Message;
use ps_proto::api;
use ps_proto::errors;
use ps_proto::layout::BlockPlan;
use ps_proto::pb;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::error::ServerError;
use crate::spec::ModelSpec;
use crate::store::{JoinError, Model, PushOutcome, ShardIdentity};

/// What a committed push did, as `PushGradients` and `PushLocal` answer it.
impl From<PushOutcome> for pb::PushGradientsResponse {
    fn from(outcome: PushOutcome) -> Self {
        pb::PushGradientsResponse {
            blocks_accepted: outcome.accepted,
            blocks_duplicate: outcome.duplicate,
            blocks_updated: outcome.updated,
        }
    }
}

impl TryFrom<pb::ModelSpec> for ModelSpec {
    type Error = ServerError;

    /// Reads a registration's spec and validates it. Its identity is its
    /// canonical wire form (every default written out), so leaving a field
    /// at zero and sending the default it means are the same registration.
    fn try_from(wire: pb::ModelSpec) -> Result<Self, ServerError> {
        let spec = api::ModelSpec::from_wire(&wire)?;
        let fingerprint = pb::ModelSpec::from(&spec).encode_to_vec();
        ModelSpec::new(spec, fingerprint)
    }
}

/// A model's layout as `PlanLayout`, `RegisterModel` and `GetLayout` return it.
pub fn layout(shard: &ShardIdentity, spec: &ModelSpec, plan: &[BlockPlan]) -> pb::Layout {
    let (mode, staleness) = spec.options.mode.to_wire();
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
        shard_max_grad_norm: spec.options.shard_max_grad_norm,
        staleness,
        federated: spec.federated.as_ref().map(pb::FederatedConfig::from),
        // Set for registered models by `model_layout`.
        epoch: 0,
        checkpoint_every: 0,
        groups: spec
            .groups
            .iter()
            .map(|g| pb::GroupLayout {
                name: g.name.clone(),
                push_encodings: g.push_encodings.iter().map(|e| *e as i32).collect(),
                aggregation: g.aggregation as i32,
                buffers: g.optimizer.is_buffer(),
                buffer_sync: match g.optimizer {
                    api::OptimizerConfig::Buffer(sync) => sync.to_wire() as i32,
                    _ => 0,
                },
                full_precision_steps: g.full_precision_steps(),
            })
            .collect(),
    }
}

/// One model's part of a `GetStatus` reply. Locks every block: call it off the reactor.
pub fn model_status(model: &Model) -> pb::ModelStatus {
    let (min_version, max_version) = model.version_range();
    let (pushes, workers_expired, workers_dropped_late) = model.counters();
    let (mode, staleness) = model.spec.options.mode.to_wire();
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
                pending_bytes: stats.pending_bytes,
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
        common_checkpoint_version: model.checkpoints.common(),
        checkpoint_error: model
            .checkpoints
            .failing()
            .map(|(version, reason)| format!("version {version}: {reason}"))
            .unwrap_or_default(),
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
            | ServerError::Unrestorable { .. }
            | ServerError::NoCheckpointDir
            | ServerError::NoLocalChannel
            | ServerError::FutureNormPart { .. } => Code::FailedPrecondition,
            ServerError::Recovering(_) | ServerError::Resharding { .. } => Code::Unavailable,
            ServerError::Reshard(_) | ServerError::BoundaryPassed { .. } => Code::FailedPrecondition,
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
            | ServerError::BadLrScale(_)
            | ServerError::BadNormPart { .. }
            | ServerError::MixedLrScale { .. }
            | ServerError::LrScaleMismatch { .. }
            | ServerError::BufferNotFromRankZero { .. }
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
            ServerError::Resharding { .. } => Some(errors::RESHARDING),
            ServerError::BoundaryPassed { .. } => Some(errors::BOUNDARY_PASSED),
            ServerError::NotRestored { .. } | ServerError::Unrestorable { .. } => Some(errors::NOT_RESTORED),
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
