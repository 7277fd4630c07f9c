from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConsistencyMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONSISTENCY_MODE_UNSPECIFIED: _ClassVar[ConsistencyMode]
    CONSISTENCY_MODE_SYNC: _ClassVar[ConsistencyMode]
    CONSISTENCY_MODE_ASYNC: _ClassVar[ConsistencyMode]
    CONSISTENCY_MODE_BOUNDED_STALENESS: _ClassVar[ConsistencyMode]
    CONSISTENCY_MODE_FEDERATED: _ClassVar[ConsistencyMode]

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_F32: _ClassVar[Encoding]
    ENCODING_BF16: _ClassVar[Encoding]
    ENCODING_F16: _ClassVar[Encoding]
    ENCODING_SIGN1: _ClassVar[Encoding]
    ENCODING_NO_GRADIENT: _ClassVar[Encoding]
    ENCODING_OVERFLOW: _ClassVar[Encoding]

class Aggregation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGGREGATION_MEAN: _ClassVar[Aggregation]
    AGGREGATION_MAJORITY_VOTE: _ClassVar[Aggregation]

class InitKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INIT_KIND_ZEROS: _ClassVar[InitKind]
    INIT_KIND_CONSTANT: _ClassVar[InitKind]
    INIT_KIND_NORMAL: _ClassVar[InitKind]
    INIT_KIND_UNIFORM: _ClassVar[InitKind]
    INIT_KIND_PROVIDED: _ClassVar[InitKind]

class SubsetKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SUBSET_KIND_HEURISTIC: _ClassVar[SubsetKind]
    SUBSET_KIND_ROWS: _ClassVar[SubsetKind]
    SUBSET_KIND_COLUMNS: _ClassVar[SubsetKind]
    SUBSET_KIND_COORDINATES: _ClassVar[SubsetKind]
    SUBSET_KIND_WHOLE: _ClassVar[SubsetKind]
    SUBSET_KIND_CHUNKS: _ClassVar[SubsetKind]

class ProjectionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROJECTION_KIND_SVD: _ClassVar[ProjectionKind]
    PROJECTION_KIND_UNIFORM: _ClassVar[ProjectionKind]
    PROJECTION_KIND_TOPK: _ClassVar[ProjectionKind]

class SvdSolver(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SVD_SOLVER_EXACT: _ClassVar[SvdSolver]
    SVD_SOLVER_RANDOMIZED: _ClassVar[SvdSolver]

class FrugalMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FRUGAL_MODE_BLOCK: _ClassVar[FrugalMode]
    FRUGAL_MODE_COLUMNS: _ClassVar[FrugalMode]
    FRUGAL_MODE_SVD: _ClassVar[FrugalMode]

class BlockOrder(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BLOCK_ORDER_DESCENDING: _ClassVar[BlockOrder]
    BLOCK_ORDER_ASCENDING: _ClassVar[BlockOrder]
    BLOCK_ORDER_RANDOM: _ClassVar[BlockOrder]

class InactiveRule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INACTIVE_RULE_SIGN_SGD: _ClassVar[InactiveRule]
    INACTIVE_RULE_SGD: _ClassVar[InactiveRule]
    INACTIVE_RULE_NONE: _ClassVar[InactiveRule]

class BufferSync(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUFFER_SYNC_BROADCAST: _ClassVar[BufferSync]
    BUFFER_SYNC_MEAN: _ClassVar[BufferSync]

class ScheduleKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCHEDULE_KIND_CONSTANT: _ClassVar[ScheduleKind]
    SCHEDULE_KIND_WARMUP_COSINE: _ClassVar[ScheduleKind]
    SCHEDULE_KIND_WARMUP_STABLE_DECAY: _ClassVar[ScheduleKind]

class GradClip(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRAD_CLIP_MEAN: _ClassVar[GradClip]
    GRAD_CLIP_PER_WORKER: _ClassVar[GradClip]

class FederatedAlgorithm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEDERATED_ALGORITHM_FEDAVG: _ClassVar[FederatedAlgorithm]
    FEDERATED_ALGORITHM_FEDPROX: _ClassVar[FederatedAlgorithm]
    FEDERATED_ALGORITHM_SCAFFOLD: _ClassVar[FederatedAlgorithm]
    FEDERATED_ALGORITHM_FEDSPEED: _ClassVar[FederatedAlgorithm]

class FedSpeedPool(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FED_SPEED_POOL_ALL_CLIENTS: _ClassVar[FedSpeedPool]
    FED_SPEED_POOL_PARTICIPANTS: _ClassVar[FedSpeedPool]

class LeaveReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEAVE_REASON_LEFT: _ClassVar[LeaveReason]
    LEAVE_REASON_LEASE_EXPIRED: _ClassVar[LeaveReason]
    LEAVE_REASON_MISSED_DEADLINE: _ClassVar[LeaveReason]

class WeightPart(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEIGHT_PART_PARAMETERS: _ClassVar[WeightPart]
    WEIGHT_PART_CONTROL_VARIATE: _ClassVar[WeightPart]

class RoundPart(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_PART_DELTA: _ClassVar[RoundPart]
    ROUND_PART_CONTROL: _ClassVar[RoundPart]

class ReshardPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESHARD_PHASE_UNSPECIFIED: _ClassVar[ReshardPhase]
    RESHARD_PHASE_PREPARE: _ClassVar[ReshardPhase]
    RESHARD_PHASE_HOLD: _ClassVar[ReshardPhase]
    RESHARD_PHASE_ADOPT: _ClassVar[ReshardPhase]
    RESHARD_PHASE_SWITCH: _ClassVar[ReshardPhase]
    RESHARD_PHASE_ABORT: _ClassVar[ReshardPhase]
CONSISTENCY_MODE_UNSPECIFIED: ConsistencyMode
CONSISTENCY_MODE_SYNC: ConsistencyMode
CONSISTENCY_MODE_ASYNC: ConsistencyMode
CONSISTENCY_MODE_BOUNDED_STALENESS: ConsistencyMode
CONSISTENCY_MODE_FEDERATED: ConsistencyMode
ENCODING_F32: Encoding
ENCODING_BF16: Encoding
ENCODING_F16: Encoding
ENCODING_SIGN1: Encoding
ENCODING_NO_GRADIENT: Encoding
ENCODING_OVERFLOW: Encoding
AGGREGATION_MEAN: Aggregation
AGGREGATION_MAJORITY_VOTE: Aggregation
INIT_KIND_ZEROS: InitKind
INIT_KIND_CONSTANT: InitKind
INIT_KIND_NORMAL: InitKind
INIT_KIND_UNIFORM: InitKind
INIT_KIND_PROVIDED: InitKind
SUBSET_KIND_HEURISTIC: SubsetKind
SUBSET_KIND_ROWS: SubsetKind
SUBSET_KIND_COLUMNS: SubsetKind
SUBSET_KIND_COORDINATES: SubsetKind
SUBSET_KIND_WHOLE: SubsetKind
SUBSET_KIND_CHUNKS: SubsetKind
PROJECTION_KIND_SVD: ProjectionKind
PROJECTION_KIND_UNIFORM: ProjectionKind
PROJECTION_KIND_TOPK: ProjectionKind
SVD_SOLVER_EXACT: SvdSolver
SVD_SOLVER_RANDOMIZED: SvdSolver
FRUGAL_MODE_BLOCK: FrugalMode
FRUGAL_MODE_COLUMNS: FrugalMode
FRUGAL_MODE_SVD: FrugalMode
BLOCK_ORDER_DESCENDING: BlockOrder
BLOCK_ORDER_ASCENDING: BlockOrder
BLOCK_ORDER_RANDOM: BlockOrder
INACTIVE_RULE_SIGN_SGD: InactiveRule
INACTIVE_RULE_SGD: InactiveRule
INACTIVE_RULE_NONE: InactiveRule
BUFFER_SYNC_BROADCAST: BufferSync
BUFFER_SYNC_MEAN: BufferSync
SCHEDULE_KIND_CONSTANT: ScheduleKind
SCHEDULE_KIND_WARMUP_COSINE: ScheduleKind
SCHEDULE_KIND_WARMUP_STABLE_DECAY: ScheduleKind
GRAD_CLIP_MEAN: GradClip
GRAD_CLIP_PER_WORKER: GradClip
FEDERATED_ALGORITHM_FEDAVG: FederatedAlgorithm
FEDERATED_ALGORITHM_FEDPROX: FederatedAlgorithm
FEDERATED_ALGORITHM_SCAFFOLD: FederatedAlgorithm
FEDERATED_ALGORITHM_FEDSPEED: FederatedAlgorithm
FED_SPEED_POOL_ALL_CLIENTS: FedSpeedPool
FED_SPEED_POOL_PARTICIPANTS: FedSpeedPool
LEAVE_REASON_LEFT: LeaveReason
LEAVE_REASON_LEASE_EXPIRED: LeaveReason
LEAVE_REASON_MISSED_DEADLINE: LeaveReason
WEIGHT_PART_PARAMETERS: WeightPart
WEIGHT_PART_CONTROL_VARIATE: WeightPart
ROUND_PART_DELTA: RoundPart
ROUND_PART_CONTROL: RoundPart
RESHARD_PHASE_UNSPECIFIED: ReshardPhase
RESHARD_PHASE_PREPARE: ReshardPhase
RESHARD_PHASE_HOLD: ReshardPhase
RESHARD_PHASE_ADOPT: ReshardPhase
RESHARD_PHASE_SWITCH: ReshardPhase
RESHARD_PHASE_ABORT: ReshardPhase

class InitRule(_message.Message):
    __slots__ = ("kind", "value", "scale", "seed")
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    kind: InitKind
    value: float
    scale: float
    seed: int
    def __init__(self, kind: _Optional[_Union[InitKind, str]] = ..., value: _Optional[float] = ..., scale: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "init")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    init: InitRule
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., init: _Optional[_Union[InitRule, _Mapping]] = ...) -> None: ...

class SgdConfig(_message.Message):
    __slots__ = ("lr", "momentum", "dampening", "nesterov", "weight_decay")
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    DAMPENING_FIELD_NUMBER: _ClassVar[int]
    NESTEROV_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    lr: float
    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: float
    def __init__(self, lr: _Optional[float] = ..., momentum: _Optional[float] = ..., dampening: _Optional[float] = ..., nesterov: _Optional[bool] = ..., weight_decay: _Optional[float] = ...) -> None: ...

class AdamWConfig(_message.Message):
    __slots__ = ("lr", "beta1", "beta2", "eps", "weight_decay", "l2_decay", "freeze_variance_after")
    LR_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    L2_DECAY_FIELD_NUMBER: _ClassVar[int]
    FREEZE_VARIANCE_AFTER_FIELD_NUMBER: _ClassVar[int]
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    l2_decay: bool
    freeze_variance_after: int
    def __init__(self, lr: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ..., l2_decay: _Optional[bool] = ..., freeze_variance_after: _Optional[int] = ...) -> None: ...

class SubsetNormConfig(_message.Message):
    __slots__ = ("lr", "beta1", "beta2", "eps", "correct_bias", "weight_decay", "subsets", "chunk_size", "initial_accumulator")
    LR_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    CORRECT_BIAS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    SUBSETS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    INITIAL_ACCUMULATOR_FIELD_NUMBER: _ClassVar[int]
    lr: float
    beta1: float
    beta2: float
    eps: float
    correct_bias: bool
    weight_decay: float
    subsets: SubsetKind
    chunk_size: int
    initial_accumulator: float
    def __init__(self, lr: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., correct_bias: _Optional[bool] = ..., weight_decay: _Optional[float] = ..., subsets: _Optional[_Union[SubsetKind, str]] = ..., chunk_size: _Optional[int] = ..., initial_accumulator: _Optional[float] = ...) -> None: ...

class IndexList(_message.Message):
    __slots__ = ("indices",)
    INDICES_FIELD_NUMBER: _ClassVar[int]
    indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, indices: _Optional[_Iterable[int]] = ...) -> None: ...

class SubspaceMomentumConfig(_message.Message):
    __slots__ = ("lr", "beta1", "beta2", "eps", "rank", "update_gap", "projection", "adaptive", "subsets", "correct_bias", "weight_decay", "seed", "indices_schedule", "svd_solver")
    LR_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    UPDATE_GAP_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_FIELD_NUMBER: _ClassVar[int]
    SUBSETS_FIELD_NUMBER: _ClassVar[int]
    CORRECT_BIAS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INDICES_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    SVD_SOLVER_FIELD_NUMBER: _ClassVar[int]
    lr: float
    beta1: float
    beta2: float
    eps: float
    rank: int
    update_gap: int
    projection: ProjectionKind
    adaptive: bool
    subsets: SubsetKind
    correct_bias: bool
    weight_decay: float
    seed: int
    indices_schedule: _containers.RepeatedCompositeFieldContainer[IndexList]
    svd_solver: SvdSolver
    def __init__(self, lr: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., rank: _Optional[int] = ..., update_gap: _Optional[int] = ..., projection: _Optional[_Union[ProjectionKind, str]] = ..., adaptive: _Optional[bool] = ..., subsets: _Optional[_Union[SubsetKind, str]] = ..., correct_bias: _Optional[bool] = ..., weight_decay: _Optional[float] = ..., seed: _Optional[int] = ..., indices_schedule: _Optional[_Iterable[_Union[IndexList, _Mapping]]] = ..., svd_solver: _Optional[_Union[SvdSolver, str]] = ...) -> None: ...

class FrugalConfig(_message.Message):
    __slots__ = ("lr", "beta1", "beta2", "eps", "weight_decay", "density", "update_gap", "proj_lr_scale", "inactive_lr_scale", "inactive_rule", "keep_statistics", "mode", "block_order", "seed", "projectable_patterns", "schedule", "svd_solver")
    LR_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    UPDATE_GAP_FIELD_NUMBER: _ClassVar[int]
    PROJ_LR_SCALE_FIELD_NUMBER: _ClassVar[int]
    INACTIVE_LR_SCALE_FIELD_NUMBER: _ClassVar[int]
    INACTIVE_RULE_FIELD_NUMBER: _ClassVar[int]
    KEEP_STATISTICS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_ORDER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PROJECTABLE_PATTERNS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    SVD_SOLVER_FIELD_NUMBER: _ClassVar[int]
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    density: float
    update_gap: int
    proj_lr_scale: float
    inactive_lr_scale: float
    inactive_rule: InactiveRule
    keep_statistics: bool
    mode: FrugalMode
    block_order: BlockOrder
    seed: int
    projectable_patterns: _containers.RepeatedScalarFieldContainer[str]
    schedule: _containers.RepeatedCompositeFieldContainer[IndexList]
    svd_solver: SvdSolver
    def __init__(self, lr: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ..., density: _Optional[float] = ..., update_gap: _Optional[int] = ..., proj_lr_scale: _Optional[float] = ..., inactive_lr_scale: _Optional[float] = ..., inactive_rule: _Optional[_Union[InactiveRule, str]] = ..., keep_statistics: _Optional[bool] = ..., mode: _Optional[_Union[FrugalMode, str]] = ..., block_order: _Optional[_Union[BlockOrder, str]] = ..., seed: _Optional[int] = ..., projectable_patterns: _Optional[_Iterable[str]] = ..., schedule: _Optional[_Iterable[_Union[IndexList, _Mapping]]] = ..., svd_solver: _Optional[_Union[SvdSolver, str]] = ...) -> None: ...

class SignConfig(_message.Message):
    __slots__ = ("lr", "beta1", "beta2", "weight_decay", "lion")
    LR_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    LION_FIELD_NUMBER: _ClassVar[int]
    lr: float
    beta1: float
    beta2: float
    weight_decay: float
    lion: bool
    def __init__(self, lr: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., weight_decay: _Optional[float] = ..., lion: _Optional[bool] = ...) -> None: ...

class OptimizerConfig(_message.Message):
    __slots__ = ("sgd", "adamw", "subset_norm", "subspace_momentum", "frugal", "sign", "buffer")
    SGD_FIELD_NUMBER: _ClassVar[int]
    ADAMW_FIELD_NUMBER: _ClassVar[int]
    SUBSET_NORM_FIELD_NUMBER: _ClassVar[int]
    SUBSPACE_MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    FRUGAL_FIELD_NUMBER: _ClassVar[int]
    SIGN_FIELD_NUMBER: _ClassVar[int]
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    sgd: SgdConfig
    adamw: AdamWConfig
    subset_norm: SubsetNormConfig
    subspace_momentum: SubspaceMomentumConfig
    frugal: FrugalConfig
    sign: SignConfig
    buffer: BufferConfig
    def __init__(self, sgd: _Optional[_Union[SgdConfig, _Mapping]] = ..., adamw: _Optional[_Union[AdamWConfig, _Mapping]] = ..., subset_norm: _Optional[_Union[SubsetNormConfig, _Mapping]] = ..., subspace_momentum: _Optional[_Union[SubspaceMomentumConfig, _Mapping]] = ..., frugal: _Optional[_Union[FrugalConfig, _Mapping]] = ..., sign: _Optional[_Union[SignConfig, _Mapping]] = ..., buffer: _Optional[_Union[BufferConfig, _Mapping]] = ...) -> None: ...

class BufferConfig(_message.Message):
    __slots__ = ("sync",)
    SYNC_FIELD_NUMBER: _ClassVar[int]
    sync: BufferSync
    def __init__(self, sync: _Optional[_Union[BufferSync, str]] = ...) -> None: ...

class ParamGroup(_message.Message):
    __slots__ = ("name", "patterns", "optimizer", "push_encodings", "aggregation", "schedule")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATTERNS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    PUSH_ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    name: str
    patterns: _containers.RepeatedScalarFieldContainer[str]
    optimizer: OptimizerConfig
    push_encodings: _containers.RepeatedScalarFieldContainer[Encoding]
    aggregation: Aggregation
    schedule: LrSchedule
    def __init__(self, name: _Optional[str] = ..., patterns: _Optional[_Iterable[str]] = ..., optimizer: _Optional[_Union[OptimizerConfig, _Mapping]] = ..., push_encodings: _Optional[_Iterable[_Union[Encoding, str]]] = ..., aggregation: _Optional[_Union[Aggregation, str]] = ..., schedule: _Optional[_Union[LrSchedule, _Mapping]] = ...) -> None: ...

class LrSchedule(_message.Message):
    __slots__ = ("kind", "warmup_steps", "total_steps", "decay_steps", "min_factor")
    KIND_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    DECAY_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_FACTOR_FIELD_NUMBER: _ClassVar[int]
    kind: ScheduleKind
    warmup_steps: int
    total_steps: int
    decay_steps: int
    min_factor: float
    def __init__(self, kind: _Optional[_Union[ScheduleKind, str]] = ..., warmup_steps: _Optional[int] = ..., total_steps: _Optional[int] = ..., decay_steps: _Optional[int] = ..., min_factor: _Optional[float] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("name", "tensors", "groups", "mode", "max_block_elements", "max_grad_norm", "min_workers", "step_deadline_ms", "quorum", "staleness", "max_workers", "federated", "grad_clip")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCK_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    MIN_WORKERS_FIELD_NUMBER: _ClassVar[int]
    STEP_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    MAX_WORKERS_FIELD_NUMBER: _ClassVar[int]
    FEDERATED_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    groups: _containers.RepeatedCompositeFieldContainer[ParamGroup]
    mode: ConsistencyMode
    max_block_elements: int
    max_grad_norm: float
    min_workers: int
    step_deadline_ms: int
    quorum: int
    staleness: int
    max_workers: int
    federated: FederatedConfig
    grad_clip: GradClip
    def __init__(self, name: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., groups: _Optional[_Iterable[_Union[ParamGroup, _Mapping]]] = ..., mode: _Optional[_Union[ConsistencyMode, str]] = ..., max_block_elements: _Optional[int] = ..., max_grad_norm: _Optional[float] = ..., min_workers: _Optional[int] = ..., step_deadline_ms: _Optional[int] = ..., quorum: _Optional[int] = ..., staleness: _Optional[int] = ..., max_workers: _Optional[int] = ..., federated: _Optional[_Union[FederatedConfig, _Mapping]] = ..., grad_clip: _Optional[_Union[GradClip, str]] = ...) -> None: ...

class FederatedConfig(_message.Message):
    __slots__ = ("algorithm", "clients", "participation", "cohort_size", "cohort_schedule", "seed", "local_epochs", "local_steps", "batch_size", "client_lr", "lr_decay", "clip_norm", "weight_decay", "mu", "rho", "alpha", "unnormalized_ascent", "pool", "round_deadline_ms", "quorum", "rounds")
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    PARTICIPATION_FIELD_NUMBER: _ClassVar[int]
    COHORT_SIZE_FIELD_NUMBER: _ClassVar[int]
    COHORT_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_LR_FIELD_NUMBER: _ClassVar[int]
    LR_DECAY_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    MU_FIELD_NUMBER: _ClassVar[int]
    RHO_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    UNNORMALIZED_ASCENT_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    ROUND_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    algorithm: FederatedAlgorithm
    clients: int
    participation: float
    cohort_size: int
    cohort_schedule: _containers.RepeatedCompositeFieldContainer[IndexList]
    seed: int
    local_epochs: int
    local_steps: int
    batch_size: int
    client_lr: float
    lr_decay: float
    clip_norm: float
    weight_decay: float
    mu: float
    rho: float
    alpha: float
    unnormalized_ascent: bool
    pool: FedSpeedPool
    round_deadline_ms: int
    quorum: int
    rounds: int
    def __init__(self, algorithm: _Optional[_Union[FederatedAlgorithm, str]] = ..., clients: _Optional[int] = ..., participation: _Optional[float] = ..., cohort_size: _Optional[int] = ..., cohort_schedule: _Optional[_Iterable[_Union[IndexList, _Mapping]]] = ..., seed: _Optional[int] = ..., local_epochs: _Optional[int] = ..., local_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., client_lr: _Optional[float] = ..., lr_decay: _Optional[float] = ..., clip_norm: _Optional[float] = ..., weight_decay: _Optional[float] = ..., mu: _Optional[float] = ..., rho: _Optional[float] = ..., alpha: _Optional[float] = ..., unnormalized_ascent: _Optional[bool] = ..., pool: _Optional[_Union[FedSpeedPool, str]] = ..., round_deadline_ms: _Optional[int] = ..., quorum: _Optional[int] = ..., rounds: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("tensor", "block", "offset", "length", "encoding", "payload", "scale")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    block: int
    offset: int
    length: int
    encoding: Encoding
    payload: bytes
    scale: float
    def __init__(self, tensor: _Optional[str] = ..., block: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., payload: _Optional[bytes] = ..., scale: _Optional[float] = ...) -> None: ...

class RegisterModelRequest(_message.Message):
    __slots__ = ("spec", "values")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    spec: ModelSpec
    values: TensorChunk
    def __init__(self, spec: _Optional[_Union[ModelSpec, _Mapping]] = ..., values: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class RegisterModelResponse(_message.Message):
    __slots__ = ("created", "layout")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    created: bool
    layout: Layout
    def __init__(self, created: _Optional[bool] = ..., layout: _Optional[_Union[Layout, _Mapping]] = ...) -> None: ...

class GetLayoutRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class PlanLayoutRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: ModelSpec
    def __init__(self, spec: _Optional[_Union[ModelSpec, _Mapping]] = ...) -> None: ...

class TensorLayout(_message.Message):
    __slots__ = ("name", "shape", "group")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    group: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., group: _Optional[str] = ...) -> None: ...

class GroupLayout(_message.Message):
    __slots__ = ("name", "push_encodings", "aggregation", "buffers", "buffer_sync", "full_precision_steps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PUSH_ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    BUFFER_SYNC_FIELD_NUMBER: _ClassVar[int]
    FULL_PRECISION_STEPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    push_encodings: _containers.RepeatedScalarFieldContainer[Encoding]
    aggregation: Aggregation
    buffers: bool
    buffer_sync: BufferSync
    full_precision_steps: int
    def __init__(self, name: _Optional[str] = ..., push_encodings: _Optional[_Iterable[_Union[Encoding, str]]] = ..., aggregation: _Optional[_Union[Aggregation, str]] = ..., buffers: _Optional[bool] = ..., buffer_sync: _Optional[_Union[BufferSync, str]] = ..., full_precision_steps: _Optional[int] = ...) -> None: ...

class BlockPlacement(_message.Message):
    __slots__ = ("tensor", "block", "shard", "row_start", "rows", "offset", "length")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    block: int
    shard: int
    row_start: int
    rows: int
    offset: int
    length: int
    def __init__(self, tensor: _Optional[str] = ..., block: _Optional[int] = ..., shard: _Optional[int] = ..., row_start: _Optional[int] = ..., rows: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class Layout(_message.Message):
    __slots__ = ("model", "shards", "tensors", "blocks", "mode", "groups", "max_grad_norm", "staleness", "federated", "epoch", "checkpoint_every", "shard_max_grad_norm")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    FEDERATED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    SHARD_MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    model: str
    shards: _containers.RepeatedScalarFieldContainer[str]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorLayout]
    blocks: _containers.RepeatedCompositeFieldContainer[BlockPlacement]
    mode: ConsistencyMode
    groups: _containers.RepeatedCompositeFieldContainer[GroupLayout]
    max_grad_norm: float
    staleness: int
    federated: FederatedConfig
    epoch: int
    checkpoint_every: int
    shard_max_grad_norm: float
    def __init__(self, model: _Optional[str] = ..., shards: _Optional[_Iterable[str]] = ..., tensors: _Optional[_Iterable[_Union[TensorLayout, _Mapping]]] = ..., blocks: _Optional[_Iterable[_Union[BlockPlacement, _Mapping]]] = ..., mode: _Optional[_Union[ConsistencyMode, str]] = ..., groups: _Optional[_Iterable[_Union[GroupLayout, _Mapping]]] = ..., max_grad_norm: _Optional[float] = ..., staleness: _Optional[int] = ..., federated: _Optional[_Union[FederatedConfig, _Mapping]] = ..., epoch: _Optional[int] = ..., checkpoint_every: _Optional[int] = ..., shard_max_grad_norm: _Optional[float] = ...) -> None: ...

class JoinWorkerRequest(_message.Message):
    __slots__ = ("model", "worker_id", "rank")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    model: str
    worker_id: str
    rank: int
    def __init__(self, model: _Optional[str] = ..., worker_id: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class JoinWorkerResponse(_message.Message):
    __slots__ = ("lease_ms", "version", "rank")
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    lease_ms: int
    version: int
    rank: int
    def __init__(self, lease_ms: _Optional[int] = ..., version: _Optional[int] = ..., rank: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("model", "worker_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    worker_id: str
    def __init__(self, model: _Optional[str] = ..., worker_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("lease_ms",)
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    lease_ms: int
    def __init__(self, lease_ms: _Optional[int] = ...) -> None: ...

class LeaveWorkerRequest(_message.Message):
    __slots__ = ("model", "worker_id", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    worker_id: str
    reason: LeaveReason
    def __init__(self, model: _Optional[str] = ..., worker_id: _Optional[str] = ..., reason: _Optional[_Union[LeaveReason, str]] = ...) -> None: ...

class LeaveWorkerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GradientChunk(_message.Message):
    __slots__ = ("model", "worker_id", "step", "chunk", "epoch", "lr_scale")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LR_SCALE_FIELD_NUMBER: _ClassVar[int]
    model: str
    worker_id: str
    step: int
    chunk: TensorChunk
    epoch: int
    lr_scale: float
    def __init__(self, model: _Optional[str] = ..., worker_id: _Optional[str] = ..., step: _Optional[int] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., epoch: _Optional[int] = ..., lr_scale: _Optional[float] = ...) -> None: ...

class PushGradientsResponse(_message.Message):
    __slots__ = ("blocks_accepted", "blocks_duplicate", "blocks_updated")
    BLOCKS_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    blocks_accepted: int
    blocks_duplicate: int
    blocks_updated: int
    def __init__(self, blocks_accepted: _Optional[int] = ..., blocks_duplicate: _Optional[int] = ..., blocks_updated: _Optional[int] = ...) -> None: ...

class PullWeightsRequest(_message.Message):
    __slots__ = ("model", "min_version", "tensors", "timeout_ms", "encoding", "part", "epoch")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    model: str
    min_version: int
    tensors: _containers.RepeatedScalarFieldContainer[str]
    timeout_ms: int
    encoding: Encoding
    part: WeightPart
    epoch: int
    def __init__(self, model: _Optional[str] = ..., min_version: _Optional[int] = ..., tensors: _Optional[_Iterable[str]] = ..., timeout_ms: _Optional[int] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., part: _Optional[_Union[WeightPart, str]] = ..., epoch: _Optional[int] = ...) -> None: ...

class WeightChunk(_message.Message):
    __slots__ = ("version", "chunk", "checkpoint", "overflow_steps")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_STEPS_FIELD_NUMBER: _ClassVar[int]
    version: int
    chunk: TensorChunk
    checkpoint: bool
    overflow_steps: int
    def __init__(self, version: _Optional[int] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., checkpoint: _Optional[bool] = ..., overflow_steps: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "last_heartbeat_ms_ago")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_MS_AGO_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    last_heartbeat_ms_ago: int
    def __init__(self, worker_id: _Optional[str] = ..., last_heartbeat_ms_ago: _Optional[int] = ...) -> None: ...

class GroupStatus(_message.Message):
    __slots__ = ("name", "optimizer", "tensors", "parameters", "state_bytes", "pending_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PENDING_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    optimizer: str
    tensors: int
    parameters: int
    state_bytes: int
    pending_bytes: int
    def __init__(self, name: _Optional[str] = ..., optimizer: _Optional[str] = ..., tensors: _Optional[int] = ..., parameters: _Optional[int] = ..., state_bytes: _Optional[int] = ..., pending_bytes: _Optional[int] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "mode", "min_version", "max_version", "blocks", "parameters", "live_workers", "groups", "pushes", "workers_expired", "workers_dropped_late", "staleness", "federated", "epoch", "checkpoint_version", "recovering", "common_checkpoint_version", "checkpoint_error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_VERSION_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    WORKERS_DROPPED_LATE_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    FEDERATED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECOVERING_FIELD_NUMBER: _ClassVar[int]
    COMMON_CHECKPOINT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    mode: ConsistencyMode
    min_version: int
    max_version: int
    blocks: int
    parameters: int
    live_workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    groups: _containers.RepeatedCompositeFieldContainer[GroupStatus]
    pushes: int
    workers_expired: int
    workers_dropped_late: int
    staleness: int
    federated: FederatedStatus
    epoch: int
    checkpoint_version: int
    recovering: bool
    common_checkpoint_version: int
    checkpoint_error: str
    def __init__(self, name: _Optional[str] = ..., mode: _Optional[_Union[ConsistencyMode, str]] = ..., min_version: _Optional[int] = ..., max_version: _Optional[int] = ..., blocks: _Optional[int] = ..., parameters: _Optional[int] = ..., live_workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., groups: _Optional[_Iterable[_Union[GroupStatus, _Mapping]]] = ..., pushes: _Optional[int] = ..., workers_expired: _Optional[int] = ..., workers_dropped_late: _Optional[int] = ..., staleness: _Optional[int] = ..., federated: _Optional[_Union[FederatedStatus, _Mapping]] = ..., epoch: _Optional[int] = ..., checkpoint_version: _Optional[int] = ..., recovering: _Optional[bool] = ..., common_checkpoint_version: _Optional[int] = ..., checkpoint_error: _Optional[str] = ...) -> None: ...

class FederatedStatus(_message.Message):
    __slots__ = ("algorithm", "round", "cohort_size", "contributions", "stragglers_dropped", "rounds_extended", "server_state_bytes", "staged_bytes", "finished")
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    COHORT_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    STRAGGLERS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_EXTENDED_FIELD_NUMBER: _ClassVar[int]
    SERVER_STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STAGED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    algorithm: str
    round: int
    cohort_size: int
    contributions: int
    stragglers_dropped: int
    rounds_extended: int
    server_state_bytes: int
    staged_bytes: int
    finished: bool
    def __init__(self, algorithm: _Optional[str] = ..., round: _Optional[int] = ..., cohort_size: _Optional[int] = ..., contributions: _Optional[int] = ..., stragglers_dropped: _Optional[int] = ..., rounds_extended: _Optional[int] = ..., server_state_bytes: _Optional[int] = ..., staged_bytes: _Optional[int] = ..., finished: _Optional[bool] = ...) -> None: ...

class GetRoundTaskRequest(_message.Message):
    __slots__ = ("model", "client", "after_round", "timeout_ms", "epoch")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    AFTER_ROUND_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    model: str
    client: int
    after_round: int
    timeout_ms: int
    epoch: int
    def __init__(self, model: _Optional[str] = ..., client: _Optional[int] = ..., after_round: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class RoundTask(_message.Message):
    __slots__ = ("round", "selected", "finished", "cohort_size", "lr", "last_included_round", "config")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    COHORT_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    LAST_INCLUDED_ROUND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    round: int
    selected: bool
    finished: bool
    cohort_size: int
    lr: float
    last_included_round: int
    config: FederatedConfig
    def __init__(self, round: _Optional[int] = ..., selected: _Optional[bool] = ..., finished: _Optional[bool] = ..., cohort_size: _Optional[int] = ..., lr: _Optional[float] = ..., last_included_round: _Optional[int] = ..., config: _Optional[_Union[FederatedConfig, _Mapping]] = ...) -> None: ...

class RoundUpdateChunk(_message.Message):
    __slots__ = ("model", "client", "round", "part", "chunk", "epoch")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    model: str
    client: int
    round: int
    part: RoundPart
    chunk: TensorChunk
    epoch: int
    def __init__(self, model: _Optional[str] = ..., client: _Optional[int] = ..., round: _Optional[int] = ..., part: _Optional[_Union[RoundPart, str]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., epoch: _Optional[int] = ...) -> None: ...

class PushRoundUpdateResponse(_message.Message):
    __slots__ = ("blocks_accepted", "blocks_duplicate")
    BLOCKS_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    blocks_accepted: int
    blocks_duplicate: int
    def __init__(self, blocks_accepted: _Optional[int] = ..., blocks_duplicate: _Optional[int] = ...) -> None: ...

class CompleteRoundRequest(_message.Message):
    __slots__ = ("model", "client", "round", "epoch")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    model: str
    client: int
    round: int
    epoch: int
    def __init__(self, model: _Optional[str] = ..., client: _Optional[int] = ..., round: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class CompleteRoundResponse(_message.Message):
    __slots__ = ("contributions", "cohort_size")
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    COHORT_SIZE_FIELD_NUMBER: _ClassVar[int]
    contributions: int
    cohort_size: int
    def __init__(self, contributions: _Optional[int] = ..., cohort_size: _Optional[int] = ...) -> None: ...

class CommitRoundRequest(_message.Message):
    __slots__ = ("model", "round", "clients")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    round: int
    clients: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., round: _Optional[int] = ..., clients: _Optional[_Iterable[int]] = ...) -> None: ...

class CommitRoundResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("shard_index", "num_shards", "models", "limits", "local")
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    shard_index: int
    num_shards: int
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    limits: ShardLimits
    local: LocalChannel
    def __init__(self, shard_index: _Optional[int] = ..., num_shards: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., limits: _Optional[_Union[ShardLimits, _Mapping]] = ..., local: _Optional[_Union[LocalChannel, _Mapping]] = ...) -> None: ...

class LocalChannel(_message.Message):
    __slots__ = ("instance", "grpc_socket", "segment_socket")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    GRPC_SOCKET_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_SOCKET_FIELD_NUMBER: _ClassVar[int]
    instance: str
    grpc_socket: str
    segment_socket: str
    def __init__(self, instance: _Optional[str] = ..., grpc_socket: _Optional[str] = ..., segment_socket: _Optional[str] = ...) -> None: ...

class SegmentRequest(_message.Message):
    __slots__ = ("authorization", "hello", "attach", "open_weights")
    AUTHORIZATION_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ATTACH_FIELD_NUMBER: _ClassVar[int]
    OPEN_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    authorization: str
    hello: SegmentHello
    attach: AttachSegment
    open_weights: OpenWeights
    def __init__(self, authorization: _Optional[str] = ..., hello: _Optional[_Union[SegmentHello, _Mapping]] = ..., attach: _Optional[_Union[AttachSegment, _Mapping]] = ..., open_weights: _Optional[_Union[OpenWeights, _Mapping]] = ...) -> None: ...

class SegmentReply(_message.Message):
    __slots__ = ("hello", "attached", "weights", "error")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    hello: SegmentHello
    attached: SegmentAttached
    weights: WeightsSegment
    error: SegmentError
    def __init__(self, hello: _Optional[_Union[SegmentHello, _Mapping]] = ..., attached: _Optional[_Union[SegmentAttached, _Mapping]] = ..., weights: _Optional[_Union[WeightsSegment, _Mapping]] = ..., error: _Optional[_Union[SegmentError, _Mapping]] = ...) -> None: ...

class SegmentHello(_message.Message):
    __slots__ = ("instance",)
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    instance: str
    def __init__(self, instance: _Optional[str] = ...) -> None: ...

class AttachSegment(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SegmentAttached(_message.Message):
    __slots__ = ("segment",)
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    segment: str
    def __init__(self, segment: _Optional[str] = ...) -> None: ...

class OpenWeights(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class WeightsSegment(_message.Message):
    __slots__ = ("model", "segment", "bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    segment: str
    bytes: int
    def __init__(self, model: _Optional[str] = ..., segment: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class SegmentError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class LocalPushRequest(_message.Message):
    __slots__ = ("model", "worker_id", "step", "epoch", "segment", "chunks", "lr_scale")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    LR_SCALE_FIELD_NUMBER: _ClassVar[int]
    model: str
    worker_id: str
    step: int
    epoch: int
    segment: str
    chunks: _containers.RepeatedCompositeFieldContainer[LocalChunk]
    lr_scale: float
    def __init__(self, model: _Optional[str] = ..., worker_id: _Optional[str] = ..., step: _Optional[int] = ..., epoch: _Optional[int] = ..., segment: _Optional[str] = ..., chunks: _Optional[_Iterable[_Union[LocalChunk, _Mapping]]] = ..., lr_scale: _Optional[float] = ...) -> None: ...

class LocalChunk(_message.Message):
    __slots__ = ("chunk", "segment_offset", "payload_bytes")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    chunk: TensorChunk
    segment_offset: int
    payload_bytes: int
    def __init__(self, chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., segment_offset: _Optional[int] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

class LocalPullRequest(_message.Message):
    __slots__ = ("model", "min_version", "timeout_ms", "epoch")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    model: str
    min_version: int
    timeout_ms: int
    epoch: int
    def __init__(self, model: _Optional[str] = ..., min_version: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class LocalPullResponse(_message.Message):
    __slots__ = ("segment", "slot", "sequence", "blocks", "checkpoint")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    segment: str
    slot: int
    sequence: int
    blocks: _containers.RepeatedCompositeFieldContainer[LocalBlock]
    checkpoint: bool
    def __init__(self, segment: _Optional[str] = ..., slot: _Optional[int] = ..., sequence: _Optional[int] = ..., blocks: _Optional[_Iterable[_Union[LocalBlock, _Mapping]]] = ..., checkpoint: _Optional[bool] = ...) -> None: ...

class LocalBlock(_message.Message):
    __slots__ = ("tensor", "block", "version", "offset", "length", "overflow_steps")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_STEPS_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    block: int
    version: int
    offset: int
    length: int
    overflow_steps: int
    def __init__(self, tensor: _Optional[str] = ..., block: _Optional[int] = ..., version: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., overflow_steps: _Optional[int] = ...) -> None: ...

class ShardLimits(_message.Message):
    __slots__ = ("max_models", "max_model_elements", "max_model_blocks", "min_block_elements", "memory_bytes", "max_spec_bytes", "max_stream_bytes", "max_staged_bytes", "max_streams", "max_streams_per_connection", "max_wait_ms", "stream_idle_timeout_ms", "max_stream_duration_ms", "models", "model_bytes", "staged_bytes", "open_streams", "max_sending_bytes", "sending_bytes")
    MAX_MODELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MIN_BLOCK_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SPEC_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_STAGED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_PER_CONNECTION_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    STREAM_IDLE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MODEL_BYTES_FIELD_NUMBER: _ClassVar[int]
    STAGED_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPEN_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_SENDING_BYTES_FIELD_NUMBER: _ClassVar[int]
    SENDING_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_models: int
    max_model_elements: int
    max_model_blocks: int
    min_block_elements: int
    memory_bytes: int
    max_spec_bytes: int
    max_stream_bytes: int
    max_staged_bytes: int
    max_streams: int
    max_streams_per_connection: int
    max_wait_ms: int
    stream_idle_timeout_ms: int
    max_stream_duration_ms: int
    models: int
    model_bytes: int
    staged_bytes: int
    open_streams: int
    max_sending_bytes: int
    sending_bytes: int
    def __init__(self, max_models: _Optional[int] = ..., max_model_elements: _Optional[int] = ..., max_model_blocks: _Optional[int] = ..., min_block_elements: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., max_spec_bytes: _Optional[int] = ..., max_stream_bytes: _Optional[int] = ..., max_staged_bytes: _Optional[int] = ..., max_streams: _Optional[int] = ..., max_streams_per_connection: _Optional[int] = ..., max_wait_ms: _Optional[int] = ..., stream_idle_timeout_ms: _Optional[int] = ..., max_stream_duration_ms: _Optional[int] = ..., models: _Optional[int] = ..., model_bytes: _Optional[int] = ..., staged_bytes: _Optional[int] = ..., open_streams: _Optional[int] = ..., max_sending_bytes: _Optional[int] = ..., sending_bytes: _Optional[int] = ...) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShutdownResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("model", "wait", "timeout_ms", "version", "ahead")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AHEAD_FIELD_NUMBER: _ClassVar[int]
    model: str
    wait: bool
    timeout_ms: int
    version: int
    ahead: bool
    def __init__(self, model: _Optional[str] = ..., wait: _Optional[bool] = ..., timeout_ms: _Optional[int] = ..., version: _Optional[int] = ..., ahead: _Optional[bool] = ...) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("version", "path", "write_seconds", "bytes", "copy_seconds")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    WRITE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    COPY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    path: str
    write_seconds: float
    bytes: int
    copy_seconds: float
    def __init__(self, version: _Optional[int] = ..., path: _Optional[str] = ..., write_seconds: _Optional[float] = ..., bytes: _Optional[int] = ..., copy_seconds: _Optional[float] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ("model", "pin", "commit")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    model: str
    pin: int
    commit: int
    def __init__(self, model: _Optional[str] = ..., pin: _Optional[int] = ..., commit: _Optional[int] = ...) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("has_model", "versions", "epoch", "version", "max_version", "live_workers", "holds_blocks", "pinned")
    HAS_MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_VERSION_FIELD_NUMBER: _ClassVar[int]
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    HOLDS_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    has_model: bool
    versions: _containers.RepeatedScalarFieldContainer[int]
    epoch: int
    version: int
    max_version: int
    live_workers: int
    holds_blocks: bool
    pinned: bool
    def __init__(self, has_model: _Optional[bool] = ..., versions: _Optional[_Iterable[int]] = ..., epoch: _Optional[int] = ..., version: _Optional[int] = ..., max_version: _Optional[int] = ..., live_workers: _Optional[int] = ..., holds_blocks: _Optional[bool] = ..., pinned: _Optional[bool] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("model", "version", "epoch")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    epoch: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("epoch", "version")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    version: int
    def __init__(self, epoch: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class StepNormRequest(_message.Message):
    __slots__ = ("model", "epoch", "step", "shard", "sum_of_squares", "blocks")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SUM_OF_SQUARES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    model: str
    epoch: int
    step: int
    shard: int
    sum_of_squares: float
    blocks: _containers.RepeatedCompositeFieldContainer[BlockNorm]
    def __init__(self, model: _Optional[str] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., shard: _Optional[int] = ..., sum_of_squares: _Optional[float] = ..., blocks: _Optional[_Iterable[_Union[BlockNorm, _Mapping]]] = ...) -> None: ...

class BlockNorm(_message.Message):
    __slots__ = ("tensor", "block", "sum_of_squares")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    SUM_OF_SQUARES_FIELD_NUMBER: _ClassVar[int]
    tensor: int
    block: int
    sum_of_squares: float
    def __init__(self, tensor: _Optional[int] = ..., block: _Optional[int] = ..., sum_of_squares: _Optional[float] = ...) -> None: ...

class StepNormResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReshardRequest(_message.Message):
    __slots__ = ("phase", "from_shards", "to_shards", "models", "timeout_ms")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    FROM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    TO_SHARDS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    phase: ReshardPhase
    from_shards: _containers.RepeatedScalarFieldContainer[str]
    to_shards: _containers.RepeatedScalarFieldContainer[str]
    models: _containers.RepeatedCompositeFieldContainer[ReshardModel]
    timeout_ms: int
    def __init__(self, phase: _Optional[_Union[ReshardPhase, str]] = ..., from_shards: _Optional[_Iterable[str]] = ..., to_shards: _Optional[_Iterable[str]] = ..., models: _Optional[_Iterable[_Union[ReshardModel, _Mapping]]] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class ReshardModel(_message.Message):
    __slots__ = ("model", "version", "epoch")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    epoch: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class ReshardResponse(_message.Message):
    __slots__ = ("models", "blocks_fetched", "bytes_fetched", "blocks_held")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FETCHED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FETCHED_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_HELD_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ReshardModelState]
    blocks_fetched: int
    bytes_fetched: int
    blocks_held: int
    def __init__(self, models: _Optional[_Iterable[_Union[ReshardModelState, _Mapping]]] = ..., blocks_fetched: _Optional[int] = ..., bytes_fetched: _Optional[int] = ..., blocks_held: _Optional[int] = ...) -> None: ...

class ReshardModelState(_message.Message):
    __slots__ = ("model", "min_version", "max_version", "epoch", "live_workers", "holds_blocks")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    HOLDS_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    model: str
    min_version: int
    max_version: int
    epoch: int
    live_workers: int
    holds_blocks: bool
    def __init__(self, model: _Optional[str] = ..., min_version: _Optional[int] = ..., max_version: _Optional[int] = ..., epoch: _Optional[int] = ..., live_workers: _Optional[int] = ..., holds_blocks: _Optional[bool] = ...) -> None: ...

class FetchBlocksRequest(_message.Message):
    __slots__ = ("model", "version", "blocks")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    blocks: _containers.RepeatedCompositeFieldContainer[BlockRef]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., blocks: _Optional[_Iterable[_Union[BlockRef, _Mapping]]] = ...) -> None: ...

class BlockRef(_message.Message):
    __slots__ = ("tensor", "block")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    block: int
    def __init__(self, tensor: _Optional[str] = ..., block: _Optional[int] = ...) -> None: ...

class BlockBytes(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...
